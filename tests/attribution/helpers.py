"""Shared scenario for the attribution tests: one deployment with a node, payers and adapters."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from attribution.batch import BatchLeaf, price
from attribution.chain import Chain
from attribution.deploy import Contracts, DeployConfig, Deployments, deploy_contracts
from attribution.eip712 import Domain, InferenceRequest, UsageRecord, sign_request
from attribution.errors import ContractRevert

E18 = 10**18
CONFIG = DeployConfig(
    min_stake=1_000 * E18,
    batch_interval=600,
    challenge_window=3_600,
    thaw_period=7_200,
    unbonding_delay=7_200,
    notice_period=60,
    max_request_ttl=600,
    protocol_fee_bps=250,
    slash_bps=5_000,
    challenger_reward_bps=5_000,
)
NODE_STAKE = 2_000 * E18
NODE_FEE = 10**9
DEPOSIT = 1_000 * E18
PRICES = {1: (10**12, 2 * 10**12), 2: (3 * 10**12, 5 * 10**12)}
SPLITS = {1: (7_000, 3_000), 2: (10_000,)}


@dataclass
class World:
    """Accounts and clients of the shared scenario (see `setup_world`)."""

    chain: Chain
    deployments: Deployments
    c: Contracts
    keys: list[str]

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
                   output_tokens: int = 50, *, nonce: int | None = None, served_at: int | None = None,
                   signer_key: str | None = None, node: str | None = None, version: int = 0,
                   prices: tuple[int, int] | None = None, fee: int = NODE_FEE, **record_overrides: Any) -> BatchLeaf:
        """A valid leaf (unless overridden) served one second before the chain's current time."""
        if served_at is None:
            served_at = await self.chain.timestamp() - 1
        price_in, price_out = prices or PRICES[adapter_id]
        adapter_amount, charge = price(price_in, price_out, fee, input_tokens, output_tokens)
        request = InferenceRequest(
            payer=payer.address,
            node=node or self.node.address,
            adapter_id=adapter_id,
            prompt_hash=secrets.token_bytes(32),
            max_tokens=max(output_tokens, 256),
            max_charge=charge * 2,
            nonce=secrets.randbits(64) if nonce is None else nonce,
            deadline=served_at + 300,
        )
        request = replace(request, **{k: v for k, v in record_overrides.items() if hasattr(request, k)})
        signature = sign_request(request, self.domain, signer_key or payer.key)
        record = UsageRecord(
            request_digest=request.digest(self.domain),
            terms_version=version,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            adapter_amount=adapter_amount,
            charge=charge,
            response_hash=secrets.token_bytes(32),
            served_at=served_at,
        )
        record = replace(record, **{k: v for k, v in record_overrides.items() if hasattr(record, k)})
        return BatchLeaf(request, signature, record)


async def setup_world(chain: Chain, keys: list[str]) -> Deployments:
    """Deploys and funds the scenario; run once per session, then snapshot."""
    deployments = await deploy_contracts(chain, keys[0], CONFIG)
    world = World(chain, deployments, Contracts.attach(chain, deployments), keys)
    c = world.c
    for i in range(1, 10):
        await c.token.mint(world.deployer, world.account(i).address, 1_000_000 * E18)
    await c.token.approve(world.node, c.nodes.address, 2**256 - 1)
    await c.nodes.register(world.node, world.node_signer.address, "http://node.test", NODE_FEE, NODE_STAKE)
    for payer in (world.payer_a, world.payer_b):
        await c.token.approve(payer, c.escrow.address, 2**256 - 1)
        await c.escrow.deposit(payer, DEPOSIT)
    await c.escrow.authorize_signer(world.payer_a, world.dapp_signer.address)
    await c.adapters.register(world.owner, "bafy-adapter-one", b"\x01" * 32, *PRICES[1],
                              [world.owner.address, world.contributor.address], list(SPLITS[1]))
    await c.adapters.register(world.owner, "bafy-adapter-two", b"\x01" * 32, *PRICES[2],
                              [world.owner.address], list(SPLITS[2]))
    await chain.increase_time(100)  # records served "one second ago" then postdate every registration
    return deployments


@contextlib.contextmanager
def reverts(error: str) -> Iterator[pytest.ExceptionInfo[ContractRevert]]:
    """Expects a `ContractRevert` with the custom error `error`."""
    with pytest.raises(ContractRevert) as info:
        yield info
    assert info.value.error == error, f"expected {error}, got {info.value}"
