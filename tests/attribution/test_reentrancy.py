"""A token that calls back its recipient on transfer, and a recipient that re-enters the paying function
(escrow withdraw, node unbonded withdraw, settlement claim), cannot take more than its own due."""

from __future__ import annotations

from eth_account.signers.local import LocalAccount

from attribution.aggregation import build_batch
from attribution.artifacts import load_artifact
from attribution.chain import Chain
from attribution.deploy import Contracts, deploy_contracts
from attribution.errors import ContractRevert
from tests.attribution.helpers import CONFIG, World

E18 = 10**18
REENTRANT = "0x3ee5aeb5"  # ReentrancyGuardReentrantCall()
# Explicit gas: estimation would settle on the least gas that succeeds, which starves the token's
# try/catch hook (the attack) instead of exercising it.
GAS = 3_000_000


class Attacker:
    def __init__(self, chain: Chain, owner: LocalAccount, address: str) -> None:
        self.chain, self.owner, self.address = chain, owner, address
        self.contract = chain.w3.eth.contract(address=address, abi=load_artifact("ReentrantReceiver").abi)

    async def execute(self, target, fn) -> None:
        await self.chain.transact(
            self.owner, self.contract.functions.execute(target.address, fn._encode_transaction_data()), gas=GAS)

    async def arm(self, target, fn, times: int = 3) -> None:
        await self.chain.transact(self.owner, self.contract.functions.arm(target.address, fn._encode_transaction_data(), times))

    async def report(self) -> tuple[int, int, bytes]:
        f = self.contract.functions
        return await f.attempts().call(), await f.successes().call(), await f.lastError().call()


async def hook_world(world: World) -> tuple[Contracts, Attacker]:
    chain, deployer = world.chain, world.deployer
    hook = await chain.deploy(deployer, "HookToken")
    deployments = await deploy_contracts(chain, world.keys[0], CONFIG.__class__(**{**CONFIG.__dict__, "token": hook}))
    c = Contracts.attach(chain, deployments)
    c.token.contract = chain.w3.eth.contract(address=hook, abi=load_artifact("HookToken").abi)
    attacker = Attacker(chain, world.stranger, await chain.deploy(world.stranger, "ReentrantReceiver"))
    for account in (world.node.address, world.payer_a.address, attacker.address):
        await chain.transact(deployer, c.token.contract.functions.mint(account, 100_000 * E18))
    return c, attacker


async def test_reentrant_escrow_withdraw(world: World) -> None:
    c, attacker = await hook_world(world)
    await c.token.approve(world.payer_a, c.escrow.address, 2**256 - 1)
    node = world.node.address
    await c.escrow.deposit(world.payer_a, node, 50 * E18)  # someone else's money in the escrow
    tf, ef = c.token.contract.functions, c.escrow.contract.functions
    await attacker.execute(c.token, tf.approve(c.escrow.address, 2**256 - 1))
    await attacker.execute(c.escrow, ef.deposit(node, 10 * E18))
    await attacker.execute(c.escrow, ef.requestWithdrawal(node, 10 * E18))
    await world.chain.increase_time(CONFIG.thaw_period)
    await attacker.arm(c.escrow, ef.withdraw(node))
    await attacker.execute(c.escrow, ef.withdraw(node))
    attempts, successes, error = await attacker.report()
    assert attempts == 1 and successes == 0 and error.hex().startswith(REENTRANT[2:])
    assert await c.token.balance_of(attacker.address) == 100_000 * E18
    assert await c.token.balance_of(c.escrow.address) == 50 * E18


async def test_reentrant_node_withdraw(world: World) -> None:
    c, attacker = await hook_world(world)
    tf, nf = c.token.contract.functions, c.nodes.contract.functions
    await c.token.approve(world.node, c.nodes.address, 2**256 - 1)
    await c.nodes.register(world.node, world.node.address, "http://honest", 1, 1_000 * E18)
    await attacker.execute(c.token, tf.approve(c.nodes.address, 2**256 - 1))
    await attacker.execute(c.nodes, nf.register(attacker.address, "http://evil", 1, 1_000 * E18))
    await attacker.execute(c.nodes, nf.unbond(1_000 * E18))
    await world.chain.increase_time(CONFIG.unbonding_delay)
    await attacker.arm(c.nodes, nf.withdrawUnbonded())
    await attacker.execute(c.nodes, nf.withdrawUnbonded())
    attempts, successes, error = await attacker.report()
    assert attempts == 1 and successes == 0 and error.hex().startswith(REENTRANT[2:])
    assert await c.token.balance_of(attacker.address) == 100_000 * E18
    assert await c.token.balance_of(c.nodes.address) == 1_000 * E18


async def test_reentrant_claim(world: World) -> None:
    c, attacker = await hook_world(world)
    await c.token.approve(world.node, c.nodes.address, 2**256 - 1)
    await c.nodes.register(world.node, world.node_signer.address, "http://node", 10**9, 1_000 * E18)
    await c.token.approve(world.payer_a, c.escrow.address, 2**256 - 1)
    await c.escrow.deposit(world.payer_a, world.node.address, 100 * E18)
    await c.adapters.register(world.owner, "bafy-evil", bytes(32), 10**12, 10**12, [attacker.address], [10_000])
    await world.chain.increase_time(10)
    world.c = c  # sign leaves for this deployment's settlement
    batch = build_batch([await world.leaf(world.payer_a, 1, prices=(10**12, 10**12)) for _ in range(3)])
    batch_id, _ = await c.settlement.commit_batch(world.node, world.node.address, batch, "x")
    await world.chain.increase_time(CONFIG.challenge_window)
    await c.settlement.finalize_batch(world.stranger, batch_id, batch.totals())
    await c.settlement.distribute(world.stranger, 1, 0)
    due = await c.settlement.claimable_of(attacker.address)
    assert due > 0
    sf = c.settlement.contract.functions
    await attacker.arm(c.settlement, sf.claim(attacker.address))
    await attacker.execute(c.settlement, sf.claim(attacker.address))
    attempts, successes, error = await attacker.report()
    assert attempts == 1 and successes == 0 and error.hex().startswith(REENTRANT[2:])
    assert await c.token.balance_of(attacker.address) == 100_000 * E18 + due
    assert await c.settlement.claimable_of(attacker.address) == 0
    try:
        await world.chain.transact(world.stranger, attacker.contract.functions.execute(
            c.settlement.address, sf.claim(attacker.address)._encode_transaction_data()))
    except ContractRevert as exc:
        assert exc.error == "ReentrantReceiverCallFailed"
    else:
        raise AssertionError("a second claim must fail")
