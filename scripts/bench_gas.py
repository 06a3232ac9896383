#!/usr/bin/env python3
"""Gas of batched usage settlement (protocol v2) on anvil, against one OPEN transfer per request.

Workload: 20 payers and 50 adapters (2 contributors each); every record picks its payer and its adapter
uniformly at random (seeded), 10-500 input and 10-500 output tokens; each payer signs running cumulative
caps, so the commit checks one voucher (an ecrecover) per payer. Before measuring, one warm-up batch is
committed, finalized and distributed, so storage slots are in their steady state (a live network's payers
and adapters have balances already). Per request = (commit gas + finalize gas) / records.
Naive baseline: the gas of one `OPEN.transfer` from a payer to an adapter owner, measured in the same run.
Then the cost of each defence and challenge: the marginal commit gas of one more payer (its voucher check,
cap bookkeeping and escrow collection), with the payer's own key and with an authorised signer key;
`commitChallenge`; and each fraud proof on the largest batch (estimated on a batch holding every kind of
cheat at once, so nothing is voided first; each includes refunding 20 payers and slashing), a distribution
and a claim.

    .venv/bin/python scripts/bench_gas.py            # 100, 1,000 and 10,000 records
    .venv/bin/python scripts/bench_gas.py --quick    # 100 and 1,000 records
The last line is `RESULT gas_per_request_10k=<gas> naive_gas_per_request=<gas>` (10k: the largest size).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eth_account import Account  # noqa: E402
from eth_account.signers.local import LocalAccount  # noqa: E402

from attribution.aggregation import Batch, BatchLeaf, Tree, build_batch, price, sorted_leaves  # noqa: E402
from attribution.chain import Chain, challenge_commitment  # noqa: E402
from attribution.deploy import Contracts, DeployConfig, deploy_contracts  # noqa: E402
from attribution.devchain import Anvil  # noqa: E402
from attribution.merkle import SumNode  # noqa: E402
from attribution.signing import sign_request  # noqa: E402
from attribution.types import Domain, InferenceRequest, UsageRecord  # noqa: E402
from tests.attribution.helpers import assemble_batch  # noqa: E402  (dishonest batches are test tools)

PAYERS, ADAPTERS = 20, 50
E18 = 10**18
FEE = 10**9
CONFIG = DeployConfig(min_stake=1_000 * E18, challenge_window=600, thaw_period=3_600, unbonding_delay=3_600,
                      notice_period=1_200, max_request_ttl=600, max_commit_delay=300)


class Bench:
    def __init__(self, chain: Chain, contracts: Contracts, deployer: LocalAccount, node: LocalAccount,
                 payers: list[LocalAccount], prices: dict[int, tuple[int, int]], rng: random.Random) -> None:
        self.chain, self.c, self.deployer, self.node = chain, contracts, deployer, node
        self.payers, self.prices, self.rng = payers, prices, rng
        self.domain = Domain(chain.chain_id, contracts.settlement.address)
        self.caps = {payer.address: 0 for payer in payers}

    def leaf(self, served_at: int, payer: LocalAccount | None = None, adapter: int | None = None,
             cap: int | None = None, signer: LocalAccount | None = None) -> BatchLeaf:
        rng = self.rng
        payer = payer or rng.choice(self.payers)
        adapter = adapter or rng.randint(1, ADAPTERS)
        tokens_in, tokens_out = rng.randint(10, 500), rng.randint(10, 500)
        adapter_amount, charge = price(*self.prices[adapter], FEE, tokens_in, tokens_out)
        max_charge = charge + charge // 4
        if cap is None:
            cap = self.caps[payer.address] = self.caps[payer.address] + max_charge
        request = InferenceRequest(payer.address, self.node.address, adapter, rng.randbytes(32), tokens_in, 512,
                                   max_charge, cap, served_at + 300)
        record = UsageRecord(request.digest(self.domain), 0, tokens_out, adapter_amount, charge, rng.randbytes(32),
                             served_at)
        return BatchLeaf(request, sign_request(request, self.domain, (signer or payer).key), record)

    async def leaves(self, count: int) -> list[BatchLeaf]:
        served_at = await self.chain.timestamp() - 1
        return [self.leaf(served_at) for _ in range(count)]

    async def commit(self, batch: Batch, cid: str = "bafkreibench") -> tuple[int, int]:
        batch_id, receipt = await self.c.settlement.commit_batch(self.node, self.node.address, batch, cid)
        return batch_id, receipt["gasUsed"]

    async def settle(self, batch: Batch) -> tuple[int, int, int]:
        """Commits and finalizes; returns (batch id, commit gas, finalize gas)."""
        batch_id, commit = await self.commit(batch)
        await self.chain.increase_time(CONFIG.challenge_window)
        final = await self.c.settlement.finalize_batch(self.deployer, batch_id, batch.totals())
        return batch_id, commit, final["gasUsed"]

    async def distribute_all(self) -> int:
        gas = 0
        for adapter in range(1, ADAPTERS + 1):
            if await self.c.settlement.undistributed_of(adapter, 0):
                gas = (await self.c.settlement.distribute(self.deployer, adapter, 0))["gasUsed"]
        return gas

    async def estimate(self, sender: LocalAccount, data: str) -> int:
        return await self.chain.w3.eth.estimate_gas({"from": sender.address, "to": self.c.settlement.address,
                                                     "data": data})


async def setup(chain: Chain, keys: list[str], rng: random.Random) -> tuple[Bench, LocalAccount]:
    deployer, node = Account.from_key(keys[0]), Account.from_key(keys[1])
    deployments = await deploy_contracts(chain, keys[0], CONFIG)
    c = Contracts.attach(chain, deployments)
    payers = [Account.from_key(rng.randbytes(32)) for _ in range(PAYERS)]
    await c.token.mint(deployer, node.address, 1_000_000 * E18)
    await c.token.approve(node, c.nodes.address, 2**256 - 1)
    await c.nodes.register(node, node.address, "http://127.0.0.1:8000", FEE, 500_000 * E18)
    for payer in payers:
        await chain.rpc("anvil_setBalance", [payer.address, hex(10**20)])
        await c.token.mint(deployer, payer.address, 1_000_000 * E18)
        await c.token.approve(payer, c.escrow.address, 2**256 - 1)
        await c.escrow.deposit(payer, node.address, 500_000 * E18)
    dapp = Account.from_key(rng.randbytes(32))
    await c.escrow.authorize_signer(payers[0], dapp.address)
    prices = {}
    contributor = Account.from_key(keys[2]).address
    for adapter in range(1, ADAPTERS + 1):
        prices[adapter] = (rng.randint(1, 9) * 10**12, rng.randint(1, 9) * 10**12)
        await c.adapters.register(deployer, f"bafy-bench-adapter-{adapter}", bytes(32), *prices[adapter],
                                  [deployer.address, contributor], [6_000, 4_000])
    await chain.increase_time(10)
    return Bench(chain, c, deployer, node, payers, prices, rng), dapp


async def naive_transfer_gas(bench: Bench) -> int:
    owner = bench.deployer.address  # every adapter owner already holds OPEN in steady state
    gases = []
    for payer in bench.payers[:10]:
        receipt = await bench.c.token.transfer(payer, owner, bench.rng.randint(10**14, 10**16))
        gases.append(receipt["gasUsed"])
    return round(sum(gases) / len(gases))


async def per_payer_gas(bench: Bench, dapp: LocalAccount) -> dict[str, int]:
    """Marginal commit gas of one more payer entry (2 -> 3 payers, one record each, same adapter), and the
    extra gas when a voucher is signed by an authorised signer key instead of the payer's own."""
    served_at = await bench.chain.timestamp() - 1

    async def commit_gas(count: int, signer: LocalAccount | None) -> int:
        leaves = [bench.leaf(served_at, payer, 1, signer=signer if i == 0 else None)
                  for i, payer in enumerate(bench.payers[:count])]
        snapshot = await bench.chain.snapshot()
        _, gas = await bench.commit(build_batch(leaves))
        await bench.chain.revert(snapshot)
        return gas

    two = await commit_gas(2, None)
    return {
        "one more payer (voucher signed with its own key)": await commit_gas(3, None) - two,
        "voucher signed by an authorised signer key (extra)": await commit_gas(2, dapp) - two,
    }


def cheating_batch(bench: Bench, leaves: list[BatchLeaf], replayed: BatchLeaf) -> tuple[Batch, dict[str, int]]:
    """A batch with one cheat of every kind, each where its proof finds it (all sums stay committable)."""
    served_at = leaves[0].record.served_at
    bad = leaves[0]
    bad = replace(bad, record=replace(bad.record, charge=bad.record.charge + 1))  # not price x tokens
    owner = next(p for p in bench.payers if p.address == replayed.request.payer)
    # Overlap: a request on the same interval as one of the previous batch.
    dup = bench.leaf(served_at, payer=owner, cap=replayed.request.cumulative_cap)
    leaves = [bad, dup, *leaves[1:-1]]
    payer_order = sorted_leaves(leaves, Tree.PAYER)
    adapter_order = sorted_leaves(leaves, Tree.ADAPTER)
    # Misordered: swap two payer-tree neighbours of different payers.
    swap = next(i for i in range(10, len(payer_order) - 1)
                if payer_order[i].request.payer != payer_order[i + 1].request.payer)
    payer_order[swap], payer_order[swap + 1] = payer_order[swap + 1], payer_order[swap]
    # Missing: an adapter-tree leaf replaced by a twin with the same key and amounts, another prompt.
    missing_at = len(adapter_order) // 2
    twin = adapter_order[missing_at]
    adapter_order[missing_at] = replace(twin, request=replace(twin.request, prompt_hash=bytes(32)))
    honest = assemble_batch(payer_order, adapter_order)
    # Leaf sum lie in the payer tree and internal-node sum lie in the adapter tree.
    lie_leaf = 5
    leaf_node = honest.payer_tree.node(0, lie_leaf)
    lie_node = honest.adapter_tree.node(1, 3)
    payers = dict(honest.payer_totals)
    payers[payer_order[lie_leaf].request.payer] -= 1
    # Total mismatch: move one wei between the first two payers' totals.
    entries = list(payers.items())
    entries[0] = (entries[0][0], entries[0][1] + 1)
    entries[1] = (entries[1][0], entries[1][1] - 1)
    group = adapter_order[6].request.adapter_id
    adapters = [(a, v, amt - (1 if a == group else 0)) for a, v, amt in honest.adapter_totals]
    batch = assemble_batch(payer_order, adapter_order, payer_totals=entries, adapter_totals=adapters,
                           payer_tamper={(0, lie_leaf): SumNode(leaf_node.hash, leaf_node.sum - 1)},
                           adapter_tamper={(1, 3): SumNode(lie_node.hash, lie_node.sum - 1)})
    assert all(leaf.request.adapter_id == group for leaf in adapter_order[6:8])
    where = {"bad": batch.index_of(Tree.PAYER, bad), "dup": batch.index_of(Tree.PAYER, dup), "swap": swap,
             "missing": batch.index_of(Tree.PAYER, twin), "lie_leaf": lie_leaf}
    return batch, where


async def fraud_gas(bench: Bench, size: int, previous_id: int, previous: Batch) -> dict[str, int]:
    s, ch = bench.c.settlement, bench.c.settlement.contract.functions
    replayed = previous.payer_leaves[0]
    leaves = await bench.leaves(size)
    batch, where = cheating_batch(bench, leaves, replayed)
    batch_id, _ = await bench.commit(batch, "bafkreicheat")
    totals = batch.totals()
    node, siblings = batch.node_proof(Tree.ADAPTER, 1, 3)
    t = batch.adapter_tree
    lower, upper = batch.total_boundaries(Tree.PAYER, 0)
    twin = batch.payer_leaves[where["missing"]]
    calls = {
        "invalid record (price)": ch.proveInvalidRecord(batch_id, totals, 0, batch.leaf_proof(Tree.PAYER, where["bad"])),
        "leaf sum mismatch": ch.proveLeafSumMismatch(batch_id, totals, 0, batch.leaf_proof(Tree.PAYER, where["lie_leaf"]),
                                                     batch.payer_tree.node(0, where["lie_leaf"]).sum),
        "node sum mismatch": ch.proveNodeSumMismatch(batch_id, totals, 1, 1, 3, node, siblings,
                                                     t.node(0, 6).as_tuple(), t.node(0, 7).as_tuple()),
        "misorder": ch.proveMisorder(batch_id, totals, 0, batch.leaf_proof(Tree.PAYER, where["swap"]),
                                     batch.leaf_proof(Tree.PAYER, where["swap"] + 1)),
        "total mismatch": ch.proveTotalMismatch(batch_id, totals, 0, 0, lower, upper),
        "missing record": ch.proveMissingRecord(batch_id, totals, 0, batch.leaf_proof(Tree.PAYER, where["missing"]),
                                                batch.missing_slot(Tree.ADAPTER, twin)),
        "overlap (duplicate)": ch.proveDuplicate(batch_id, totals, batch.leaf_proof(Tree.PAYER, where["dup"]),
                                                 previous_id, previous.leaf_proof(Tree.PAYER, 0)),
    }
    challenger = bench.deployer
    gas = {}
    first = True
    for name, fn in calls.items():
        data = fn._encode_transaction_data()
        if first:  # what a challenger pays to claim its reward before proving
            receipt = await s.commit_challenge(challenger, challenge_commitment(challenger.address, data))
            gas["commitChallenge"] = receipt["gasUsed"]
            first = False
        gas[name] = await bench.estimate(challenger, data)
    return gas


async def main(quick: bool, seed: int) -> None:
    rng = random.Random(seed)
    sizes = [100, 1_000] if quick else [100, 1_000, 10_000]
    with Anvil() as anvil:
        chain = await Chain.connect(anvil.rpc_url, timeout=120)
        started = time.monotonic()
        bench, dapp = await setup(chain, anvil.private_keys, rng)
        warm = build_batch(await bench.leaves(200))
        await bench.settle(warm)
        await bench.distribute_all()
        naive = await naive_transfer_gas(bench)
        print(f"workload: {PAYERS} payers, {ADAPTERS} adapters, random (payer, adapter) per record; "
              f"anvil default hardfork; seed {seed}")
        print(f"{'records':>8} {'payers':>6} {'adapters':>8} {'cells':>6} {'depth':>5} {'commit gas':>11} "
              f"{'finalize gas':>12} {'gas/request':>11} {'naive/request':>13}")
        results = {}
        last = None
        for size in sizes:
            leaves = await bench.leaves(size)
            batch = build_batch(leaves)
            batch_id, commit, final = await bench.settle(batch)
            cells = len({(leaf.request.payer, leaf.request.adapter_id) for leaf in leaves})
            per_request = (commit + final) / size
            results[size] = per_request
            last = (batch_id, batch)
            print(f"{size:>8} {len(batch.payer_totals):>6} {len(batch.adapter_totals):>8} {cells:>6} "
                  f"{batch.depth:>5} {commit:>11} {final:>12} {per_request:>11.1f} {naive:>13}")
        distribute = await bench.distribute_all()
        claim = (await bench.c.settlement.claim(bench.node))["gasUsed"]
        payer_gas = await per_payer_gas(bench, dapp)
        assert last is not None
        proofs = await fraud_gas(bench, sizes[-1], *last)
        print("\ndefences at commit, marginal gas of one more payer entry (voucher ecrecover, cap check and "
              "update, escrow collection):")
        for name, gas in payer_gas.items():
            print(f"  {name:<52} {gas:>9}")
        print(f"\nchallenges on a {sizes[-1]}-record batch (depth {last[1].depth}; a proof voids the batch, refunds "
              f"{PAYERS} payers, slashes the node), gas:")
        for name, gas in proofs.items():
            print(f"  {name:<52} {gas:>9}")
        print(f"  {'distribute (2 contributors)':<52} {distribute:>9}")
        print(f"  {'claim':<52} {claim:>9}")
        print(f"(ran in {time.monotonic() - started:.0f} s)")
        await chain.close()
    print(f"RESULT gas_per_request_10k={results[sizes[-1]]:.0f} naive_gas_per_request={naive}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 and 1,000 records only")
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.quick, args.seed))
