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


@dataclass(frozen=True)
class DeployConfig:
    """Economic and timing parameters. Times in seconds, amounts in OPEN wei, shares in basis points."""

    token: str | None = None  # existing OPEN address; None deploys the OpenToken stand-in
    treasury: str | None = None  # protocol fee and slash recipient; None = deployer
    min_stake: int = 1_000 * 10**18
    batch_interval: int = 3_600  # how often nodes commit (off chain; bounds the thaw period)
    challenge_window: int = DAY
    thaw_period: int = 3 * DAY  # must exceed batch_interval + challenge_window
    unbonding_delay: int = 7 * DAY  # must exceed challenge_window
    notice_period: int = 600  # delay before price, fee and signer-revocation changes take effect
    max_request_ttl: int = 3_600  # a record is served within [deadline - ttl, deadline]
    protocol_fee_bps: int = 250
    slash_bps: int = 5_000
    challenger_reward_bps: int = 5_000

    def validate(self) -> None:
        if self.thaw_period <= self.batch_interval + self.challenge_window:
            raise DeploymentError("thaw_period must exceed batch_interval + challenge_window")
        if self.unbonding_delay <= self.challenge_window:
            raise DeploymentError("unbonding_delay must exceed challenge_window")
        for name in ("protocol_fee_bps", "slash_bps", "challenger_reward_bps"):
            if not 0 <= getattr(self, name) <= 10_000:
                raise DeploymentError(f"{name} must be within 0..10000")
        if min(self.challenge_window, self.max_request_ttl, self.min_stake) < 0:
            raise DeploymentError("durations and amounts must not be negative")


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
    contracts["AdapterRegistry"] = await chain.deploy(deployer, "AdapterRegistry", config.notice_period)
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
        config.protocol_fee_bps, config.slash_bps, config.challenger_reward_bps,
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
