"""Deploys the OpenLoRA contracts to a chain and writes a deployments JSON.

Order: [OpenToken] -> AdapterRegistry -> NodeRegistry -> PaymentEscrow -> UsageSettlement. The node
registry and the escrow take the settlement's address as an immutable; it is predicted from the deployer's
nonce (CREATE address = keccak(rlp([deployer, nonce]))[12:]) and the settlement's constructor checks it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_hash.auto import keccak
from eth_utils import to_checksum_address

from attribution.chain import (
    AdapterRegistryClient,
    Chain,
    NodeRegistryClient,
    OpenTokenClient,
    PaymentEscrowClient,
    UsageSettlementClient,
)
from attribution.errors import DeploymentError

DAY = 86_400
NAME_COMMIT_LIFETIME = DAY  # AdapterRegistry.NAME_COMMIT_LIFETIME


@dataclass(frozen=True)
class DeployConfig:
    """Economic and timing parameters. Times in seconds, amounts in OPEN wei, shares in basis points.

    The periods are tied: a node serves a request at most `max_request_ttl` before its deadline and commits
    it at most `max_commit_delay` after, so a signer revocation (`notice_period`) and a withdrawal
    (`thaw_period`) must take longer than both together, or a payer could pull out from under served work;
    unbonding must outlast the challenge window, or a node could leave before its batch can be voided.
    The contracts check the same rules at deployment.
    """

    token: str | None = None  # existing OPEN address; None deploys the OpenToken stand-in
    treasury: str | None = None  # protocol fee and slash recipient; None = deployer
    min_stake: int = 1_000 * 10**18
    challenge_window: int = DAY
    thaw_period: int = 3 * DAY  # must exceed max_request_ttl + max_commit_delay
    unbonding_delay: int = 7 * DAY  # must exceed challenge_window
    notice_period: int = 2 * 3_600  # signer revocations, prices, fees; must exceed max_request_ttl + max_commit_delay
    name_commit_delay: int = 60  # between committing to a free adapter name and claiming it (front-running)
    max_request_ttl: int = 600  # a record is served within [deadline - ttl, deadline]
    max_commit_delay: int = 3_600  # and committed at most this long after the deadline
    protocol_fee_bps: int = 250
    slash_bps: int = 5_000  # of a voided batch's charges
    challenger_reward_bps: int = 5_000  # of the slash
    min_slash: int = 100 * 10**18
    max_payers_per_batch: int = 256  # bound the gas of a commit and of a void
    max_adapter_entries_per_batch: int = 512  # bound the gas of a finalize

    def validate(self) -> None:
        serve = self.max_request_ttl + self.max_commit_delay
        if self.notice_period <= serve:
            raise DeploymentError("notice_period must exceed max_request_ttl + max_commit_delay")
        if self.thaw_period <= serve:
            raise DeploymentError("thaw_period must exceed max_request_ttl + max_commit_delay")
        if self.unbonding_delay <= self.challenge_window:
            raise DeploymentError("unbonding_delay must exceed challenge_window")
        for name in ("challenge_window", "max_commit_delay", "max_payers_per_batch", "max_adapter_entries_per_batch"):
            if getattr(self, name) <= 0:
                raise DeploymentError(f"{name} must be positive")
        for name in ("protocol_fee_bps", "challenger_reward_bps"):
            if not 0 <= getattr(self, name) <= 10_000:
                raise DeploymentError(f"{name} must be within 0..10000")
        if not 0 < self.slash_bps <= 10_000:
            raise DeploymentError("slash_bps must be within 1..10000")
        if min(self.max_request_ttl, self.min_stake, self.min_slash) < 0:
            raise DeploymentError("durations and amounts must not be negative")
        if not 0 <= self.name_commit_delay < NAME_COMMIT_LIFETIME:  # else a commitment expires before it ripens
            raise DeploymentError(f"name_commit_delay must be within 0..{NAME_COMMIT_LIFETIME - 1}")
        if self.treasury is not None and int(self.treasury, 16) == 0:
            raise DeploymentError("treasury must not be the zero address")


@dataclass(frozen=True)
class Deployments:
    """Where everything is: what the node and the CLI load."""

    chain_id: int
    deployer: str
    contracts: dict[str, str]
    config: dict[str, Any] = field(default_factory=dict)
    block_number: int = 0

    def save(self, path: Path | str) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path | str) -> Deployments:
        try:
            data = json.loads(Path(path).read_text())
            return cls(chain_id=data["chain_id"], deployer=data["deployer"], contracts=data["contracts"],
                       config=data.get("config", {}), block_number=data.get("block_number", 0))
        except (OSError, ValueError, KeyError) as exc:
            raise DeploymentError(f"cannot read deployments file {path}: {exc}") from exc


def create_address(deployer: str, nonce: int) -> str:
    """CREATE address: keccak256(rlp([deployer, nonce]))[12:] (the list is always < 56 bytes)."""
    if nonce == 0:
        encoded_nonce = b"\x80"
    elif nonce < 0x80:
        encoded_nonce = bytes([nonce])
    else:
        raw = nonce.to_bytes((nonce.bit_length() + 7) // 8, "big")
        encoded_nonce = bytes([0x80 + len(raw)]) + raw
    payload = b"\x94" + bytes.fromhex(deployer[2:]) + encoded_nonce
    return to_checksum_address(keccak(bytes([0xC0 + len(payload)]) + payload)[12:])


@dataclass
class Contracts:
    """Typed clients of one deployment."""

    token: OpenTokenClient
    adapters: AdapterRegistryClient
    nodes: NodeRegistryClient
    escrow: PaymentEscrowClient
    settlement: UsageSettlementClient

    @classmethod
    def attach(cls, chain: Chain, deployments: Deployments) -> Contracts:
        c = deployments.contracts
        return cls(
            token=OpenTokenClient(chain, c["OpenToken"]),
            adapters=AdapterRegistryClient(chain, c["AdapterRegistry"]),
            nodes=NodeRegistryClient(chain, c["NodeRegistry"]),
            escrow=PaymentEscrowClient(chain, c["PaymentEscrow"]),
            settlement=UsageSettlementClient(chain, c["UsageSettlement"]),
        )


async def deploy_contracts(chain: Chain, deployer_private_key: str, config: DeployConfig) -> Deployments:
    """Deploys with an open `Chain`; see `deploy_all`."""
    config.validate()
    deployer = Account.from_key(deployer_private_key)
    contracts: dict[str, str] = {}
    if config.token is None:
        contracts["OpenToken"] = await chain.deploy(deployer, "OpenToken", deployer.address)
    else:
        contracts["OpenToken"] = to_checksum_address(config.token)
    token = contracts["OpenToken"]
    contracts["AdapterRegistry"] = await chain.deploy(
        deployer, "AdapterRegistry", config.notice_period, config.name_commit_delay
    )
    nonce = await chain.w3.eth.get_transaction_count(deployer.address, "pending")
    settlement = create_address(deployer.address, nonce + 2)
    contracts["NodeRegistry"] = await chain.deploy(
        deployer, "NodeRegistry", token, settlement, config.min_stake, config.unbonding_delay, config.notice_period
    )
    contracts["PaymentEscrow"] = await chain.deploy(
        deployer, "PaymentEscrow", token, settlement, config.thaw_period, config.notice_period
    )
    settlement_config = (
        token, contracts["PaymentEscrow"], contracts["NodeRegistry"], contracts["AdapterRegistry"],
        config.treasury or deployer.address, config.challenge_window, config.max_request_ttl,
        config.max_commit_delay, config.protocol_fee_bps, config.slash_bps, config.challenger_reward_bps,
        config.min_slash, config.max_payers_per_batch, config.max_adapter_entries_per_batch,
    )
    contracts["UsageSettlement"] = await chain.deploy(deployer, "UsageSettlement", settlement_config)
    if contracts["UsageSettlement"] != settlement:
        raise DeploymentError("the deployer sent another transaction during deployment; deploy again")
    return Deployments(
        chain_id=chain.chain_id,
        deployer=deployer.address,
        contracts=contracts,
        config=asdict(config),
        block_number=await chain.w3.eth.block_number,
    )


async def deploy_all(rpc_url: str, deployer_private_key: str, config: DeployConfig | None = None,
                     out: Path | str | None = None) -> Deployments:
    """Deploys every contract to the chain at `rpc_url` and writes the deployments JSON to `out`."""
    config = config or DeployConfig()
    config.validate()
    chain = await Chain.connect(rpc_url)
    try:
        deployments = await deploy_contracts(chain, deployer_private_key, config)
    finally:
        await chain.close()
    if out is not None:
        deployments.save(out)
    return deployments
