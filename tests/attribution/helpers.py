"""Shared scenario for the attribution tests (one deployment with a node, payers and adapters), and the tools
that build DISHONEST batches (arbitrary orders, totals, vouchers and tampered tree nodes). Those tools
live here, not in the package: a node never needs them."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3.types import TxReceipt

from attribution.aggregation import (
    Batch,
    BatchLeaf,
    Tree,
    Voucher,
    best_vouchers,
    honest_totals,
    price,
    sorted_leaves,
)
from attribution.chain import Chain, name_commitment
from attribution.deploy import Contracts, DeployConfig, Deployments, deploy_contracts
from attribution.errors import ContractRevert
from attribution.merkle import SumNode, SumTree, depth_for, parent
from attribution.signing import sign_request, sign_usage_record
from attribution.types import Domain, InferenceRequest, UsageRecord

E18 = 10**18
CONFIG = DeployConfig(
    min_stake=1_000 * E18,
    challenge_window=3_600,
    thaw_period=7_200,
    unbonding_delay=7_200,
    notice_period=1_200,
    max_request_ttl=600,
    max_commit_delay=300,
    protocol_fee_bps=250,
    slash_bps=5_000,
    challenger_reward_bps=5_000,
    min_slash=10 * E18,
    max_payers_per_batch=8,
    max_adapter_entries_per_batch=8,
)
NODE_STAKE = 2_000 * E18
NODE_FEE = 10**9
DEPOSIT = 1_000 * E18
PRICES = {1: (10**12, 2 * 10**12), 2: (3 * 10**12, 5 * 10**12)}
SPLITS = {1: (7_000, 3_000), 2: (10_000,)}


@dataclass
class World:
    """Accounts and clients of the shared scenario (see `setup_world`). `caps` is each payer's running
    cumulative cap at the node, as a payer's client keeps it."""

    chain: Chain
    deployments: Deployments
    c: Contracts
    keys: list[str]
    caps: dict[str, int] = field(default_factory=dict)

    def account(self, i: int) -> LocalAccount:
        return Account.from_key(self.keys[i])

    @property
    def deployer(self) -> LocalAccount:
        return self.account(0)

    @property
    def node(self) -> LocalAccount:
        return self.account(1)

    @property
    def node_signer(self) -> LocalAccount:
        return self.account(2)

    @property
    def payer_a(self) -> LocalAccount:
        return self.account(3)

    @property
    def payer_b(self) -> LocalAccount:
        return self.account(4)

    @property
    def owner(self) -> LocalAccount:
        """Owner of adapters 1 and 2, first contributor of both."""
        return self.account(5)

    @property
    def contributor(self) -> LocalAccount:
        return self.account(6)

    @property
    def challenger(self) -> LocalAccount:
        return self.account(7)

    @property
    def dapp_signer(self) -> LocalAccount:
        """Authorised by payer A."""
        return self.account(8)

    @property
    def stranger(self) -> LocalAccount:
        return self.account(9)

    @property
    def domain(self) -> Domain:
        return Domain(self.chain.chain_id, self.c.settlement.address)

    async def leaf(self, payer: LocalAccount, adapter_id: int = 1, input_tokens: int = 100,
                   output_tokens: int = 50, *, served_at: int | None = None, signer_key: str | None = None,
                   node: str | None = None, version: int = 0, prices: tuple[int, int] | None = None,
                   fee: int = NODE_FEE, **overrides: Any) -> BatchLeaf:
        """A valid leaf (unless overridden) served one second before the chain's current time. Its interval
        follows the payer's last one: maxCharge = 2 x charge, cumulativeCap = running total (both can be
        overridden; an overridden cap does not move the running total)."""
        if served_at is None:
            served_at = await self.chain.timestamp() - 1
        if adapter_id == 0:
            price_in, price_out = 0, 0
        else:
            price_in, price_out = prices or PRICES[adapter_id]
        adapter_amount, charge = price(price_in, price_out, fee, input_tokens, output_tokens)
        max_charge = overrides.pop("max_charge", max(charge * 2, 1))
        cap = overrides.pop("cumulative_cap", None)
        if cap is None:
            cap = self.caps.get(payer.address, 0) + max_charge
            self.caps[payer.address] = cap
        request = InferenceRequest(
            payer=payer.address,
            node=node or self.node.address,
            adapter_id=adapter_id,
            prompt_hash=secrets.token_bytes(32),
            input_tokens=input_tokens,
            max_tokens=max(output_tokens, 256),
            max_charge=max_charge,
            cumulative_cap=cap,
            deadline=served_at + 300,
        )
        request = replace(request, **{k: v for k, v in overrides.items() if hasattr(request, k)})
        signature = sign_request(request, self.domain, signer_key or payer.key)
        record = UsageRecord(
            request_digest=request.digest(self.domain),
            terms_version=version,
            output_tokens=output_tokens,
            adapter_amount=adapter_amount,
            charge=charge,
            response_hash=secrets.token_bytes(32),
            served_at=served_at,
        )
        record = replace(record, **{k: v for k, v in overrides.items() if hasattr(record, k)})
        return BatchLeaf(request, signature, record, sign_usage_record(record, self.domain, self.node_signer.key))

    async def commit(self, batch: Batch, cid: str = "bafkreitest", sender: LocalAccount | None = None,
                     node: str | None = None) -> int:
        batch_id, _ = await self.c.settlement.commit_batch(sender or self.node_signer, node or self.node.address,
                                                           batch, cid)
        return batch_id


async def setup_world(chain: Chain, keys: list[str]) -> Deployments:
    """Deploys and funds the scenario; run once per session, then snapshot. Both payers deposit DEPOSIT
    into their accounts for the node; payer A authorises the dApp signer."""
    deployments = await deploy_contracts(chain, keys[0], CONFIG)
    world = World(chain, deployments, Contracts.attach(chain, deployments), keys)
    c = world.c
    for i in range(1, 10):
        await c.token.mint(world.deployer, world.account(i).address, 1_000_000 * E18)
    await c.token.approve(world.node, c.nodes.address, 2**256 - 1)
    await c.nodes.register(world.node, world.node_signer.address, "http://node.test", NODE_FEE, NODE_STAKE)
    for payer in (world.payer_a, world.payer_b):
        await c.token.approve(payer, c.escrow.address, 2**256 - 1)
        await c.escrow.deposit(payer, world.node.address, DEPOSIT)
    await c.escrow.authorize_signer(world.payer_a, world.dapp_signer.address)
    await c.adapters.register(world.owner, "bafy-adapter-one", b"\x01" * 32, *PRICES[1],
                              [world.owner.address, world.contributor.address], list(SPLITS[1]))
    await c.adapters.register(world.owner, "bafy-adapter-two", b"\x01" * 32, *PRICES[2],
                              [world.owner.address], list(SPLITS[2]))
    await chain.increase_time(100)  # records served "one second ago" then postdate every registration
    return deployments


async def claim(world: World, sender: LocalAccount, name: str, adapter_id: int) -> TxReceipt:
    """`sender` claims the free `name` for `adapter_id`: commit, move the dev chain's clock past the commit
    delay, reveal (what `claim_name` does waiting in real time)."""
    salt = secrets.token_bytes(32)
    await world.c.adapters.commit_name(sender, name_commitment(name, adapter_id, salt))
    await world.chain.increase_time(CONFIG.name_commit_delay)
    return await world.c.adapters.set_name(sender, name, adapter_id, salt)


@contextlib.contextmanager
def reverts(error: str) -> Iterator[pytest.ExceptionInfo[ContractRevert]]:
    """Expects a `ContractRevert` with the custom error `error`."""
    with pytest.raises(ContractRevert) as info:
        yield info
    assert info.value.error == error, f"expected {error}, got {info.value}"


# ---------------------------------------------------------------- dishonest batches


def tampered_tree(nodes: Sequence[SumNode], depth: int, tamper: Mapping[tuple[int, int], SumNode]) -> SumTree:
    """A tree over `nodes` whose node (level, index) is replaced by `tamper[(level, index)]`; the levels above
    a replaced node are rebuilt from it, as a cheating node would."""
    tree = SumTree(nodes, depth)
    for level in range(depth + 1):
        if level > 0:
            below = tree.levels[level - 1]
            tree.levels[level] = [parent(below[2 * i], below[2 * i + 1]) for i in range(len(below) // 2)]
        for (at_level, index), node in tamper.items():
            if at_level == level:
                tree.levels[level][index] = node
    return tree


def assemble_batch(
    payer_leaves: Sequence[BatchLeaf],
    adapter_leaves: Sequence[BatchLeaf],
    *,
    depth: int | None = None,
    payer_totals: list[tuple[str, int]] | None = None,
    adapter_totals: list[tuple[int, int, int]] | None = None,
    vouchers: Mapping[str, Voucher] | None = None,
    payer_tamper: Mapping[tuple[int, int], SumNode] | None = None,
    adapter_tamper: Mapping[tuple[int, int], SumNode] | None = None,
) -> Batch:
    """A batch from leaves in the given orders. Totals default to the honest ones of the payer leaves,
    vouchers to each payer's highest-cap leaf (or `vouchers[payer]`), and `*_tamper` replaces tree nodes."""
    if depth is None:
        depth = depth_for(max(len(payer_leaves), len(adapter_leaves)))
    honest_payers, honest_adapters = honest_totals(payer_leaves)
    payer_totals = honest_payers if payer_totals is None else payer_totals
    chosen = {**best_vouchers([*payer_leaves, *adapter_leaves]), **(vouchers or {})}
    return Batch(
        payer_leaves=list(payer_leaves),
        adapter_leaves=list(adapter_leaves),
        payer_tree=tampered_tree([leaf.node(Tree.PAYER) for leaf in payer_leaves], depth, payer_tamper or {}),
        adapter_tree=tampered_tree([leaf.node(Tree.ADAPTER) for leaf in adapter_leaves], depth, adapter_tamper or {}),
        payer_totals=payer_totals,
        adapter_totals=honest_adapters if adapter_totals is None else adapter_totals,
        vouchers=[chosen[payer] for payer, _ in payer_totals],
    )


def withheld_batch(visible: Sequence[BatchLeaf], phantom: Mapping[str, int], vouchers: Mapping[str, Voucher]
                   ) -> Batch:
    """Issue 9 attack 1: a batch whose payer tree holds, besides `visible`, one slot per payer in `phantom`
    with a made-up hash (a leaf whose preimage the node never reveals) carrying that charge. Totals follow
    the tree, so the commit adds up; no proof can open the phantom slots."""
    payer_leaves = sorted_leaves(visible, Tree.PAYER)
    payer_nodes = [leaf.node(Tree.PAYER) for leaf in payer_leaves]
    payer_nodes += [SumNode(secrets.token_bytes(32), amount) for amount in phantom.values()]
    depth = depth_for(len(payer_nodes))
    payers, adapters = honest_totals(visible)
    totals = dict(payers)
    for payer, amount in phantom.items():
        totals[payer] = totals.get(payer, 0) + amount
    payer_totals = sorted(totals.items(), key=lambda entry: int(entry[0], 16))
    chosen = {**best_vouchers(visible), **vouchers}
    return Batch(
        payer_leaves=payer_leaves,
        adapter_leaves=sorted_leaves(visible, Tree.ADAPTER),
        payer_tree=SumTree(payer_nodes, depth),
        adapter_tree=SumTree([leaf.node(Tree.ADAPTER) for leaf in sorted_leaves(visible, Tree.ADAPTER)], depth),
        payer_totals=payer_totals,
        adapter_totals=adapters,
        vouchers=[chosen[payer] for payer, _ in payer_totals],
    )

