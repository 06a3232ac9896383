"""Typed async clients of the OpenLoRA contracts over web3.py's `AsyncWeb3`.

`Chain` owns the connection and sends transactions signed locally (eth-account with the coincurve
backend); reverts come back as `ContractRevert` carrying the custom error's name and arguments. One small
client per contract wraps its functions with Python names and types. The dev-chain helpers (time travel,
snapshots) only work on anvil.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from eth_abi import encode as abi_encode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_hash.auto import keccak
from web3 import AsyncWeb3
from web3.exceptions import ContractLogicError, TransactionNotFound, Web3RPCError
from web3.types import TxReceipt

from attribution.aggregation import Batch, Tree
from attribution.artifacts import abi_type, decode_revert, load_artifact
from attribution.errors import ChainError
from attribution.fees import FeePolicy
from attribution.types import Domain

log = logging.getLogger(__name__)
# How long a receipt may lag behind the nonce it used before the nonce counts as taken by someone else.
_RECEIPT_GRACE_S = 5.0

Totals = tuple[list[tuple[str, int]], list[tuple[int, int, int]]]
BeforeSend = Callable[[bytes, int], Awaitable[None]]  # (hash, nonce) of a signed transaction about to be broadcast


class Chain:
    """A connection to an EVM JSON-RPC endpoint and a local transaction signer (EIP-1559 fees, stuck
    transactions replaced with higher fees: `attribution.fees`)."""

    def __init__(self, w3: AsyncWeb3, chain_id: int, fees: FeePolicy | None = None) -> None:
        self.w3 = w3
        self.chain_id = chain_id
        self.fees = fees or FeePolicy()
        self.replacements = 0  # transactions sent again with higher fees (for metrics and tests)
        self._locks: dict[str, asyncio.Lock] = {}

    @classmethod
    async def connect(cls, rpc_url: str, timeout: float = 10.0, fees: FeePolicy | None = None) -> Chain:
        # No web3 retries: the submitter backs off on its own and the node's ledger serves recent values
        # through an outage; retrying inside each read only stalls them (seconds per call).
        provider = AsyncWeb3.AsyncHTTPProvider(
            rpc_url, request_kwargs={"timeout": timeout}, exception_retry_configuration=None
        )
        w3 = AsyncWeb3(provider)
        try:
            chain_id = await w3.eth.chain_id
        except Exception as exc:  # connection refused, DNS, timeouts, bad JSON: one user-facing error
            raise ChainError(f"cannot reach the chain at {rpc_url}: {exc.__class__.__name__}") from exc
        return cls(w3, chain_id, fees)

    async def close(self) -> None:
        await self.w3.provider.disconnect()

    async def call(self, fn: Any) -> Any:
        try:
            return await fn.call()
        except ContractLogicError as exc:
            raise decode_revert(exc.data) from None

    async def transact(self, sender: LocalAccount, fn: Any = None, *, to: str | None = None, data: str | None = None,
                       gas: int | None = None, within: float | None = None,
                       before_send: BeforeSend | None = None) -> TxReceipt:
        """Signs and sends a transaction calling `fn` (or raw `to`/`data`), waits for its receipt, and while
        it waits unmined past `fees.replace_after`, sends it again with the same nonce and higher fees.
        A revert at estimation raises `ContractRevert`; a mined failure raises `ChainError`, and so does a
        transaction still unmined `replace_after` after its fees reached `fees.max_fee_per_gas` (it may
        still be mined later: whoever sends next from this account waits for it, see the submitter).
        With `within` (seconds), a transaction that must not be mined late (a commit: late is fraud) and is
        still unmined then, or stuck at the cap before, is cancelled rather than left in the pool: its nonce
        goes to an empty transfer to the sender with both fees one bump above the last version's (even past
        the cap: 21,000 gas), and `ChainError` is raised. `before_send(hash, nonce)` is awaited for every
        signed version before it is broadcast (a write-ahead log of what may be mined: the submitter journals
        its commits there); if it raises, that version is not sent."""
        if fn is not None:
            to, data = fn.address, fn._encode_transaction_data()
        lock = self._locks.setdefault(sender.address, asyncio.Lock())
        async with lock:
            tx: dict[str, Any] = {"from": sender.address, "data": data, "value": 0, "chainId": self.chain_id}
            if to is not None:
                tx["to"] = to
            if gas is None:
                try:
                    estimate = await self.w3.eth.estimate_gas(tx)
                except ContractLogicError as exc:
                    raise decode_revert(exc.data) from None
                except Web3RPCError as exc:
                    raise ChainError(f"transaction rejected: {exc}") from None
                gas = estimate + estimate // 5 + 10_000
            tx["gas"] = gas
            tx["nonce"] = await self.w3.eth.get_transaction_count(sender.address, "pending")
            cancel_at = None if within is None else time.monotonic() + within
            receipt = await self._send_until_mined(sender, tx, cancel_at, before_send)
        if receipt["status"] != 1:
            raise ChainError(f"transaction {receipt['transactionHash'].hex()} failed on chain")
        return receipt

    async def confirm(self, receipt: TxReceipt, confirmations: int) -> TxReceipt:
        """Waits until the block of `receipt` has `confirmations` blocks (itself included), then reads the receipt
        again: the transaction may have left that block meanwhile (a reorg). Mined again elsewhere, its new
        block is waited for in turn; no longer mined, or failed this time, raises `ChainError`."""
        tx_hash = receipt["transactionHash"]
        while True:
            while await self.w3.eth.block_number < receipt["blockNumber"] + confirmations - 1:
                await asyncio.sleep(0.5)
            try:
                now = await self.w3.eth.get_transaction_receipt(tx_hash)
            except TransactionNotFound:
                raise ChainError(f"transaction {tx_hash.hex()} left the chain before {confirmations} confirmations") from None
            if now["status"] != 1:
                raise ChainError(f"transaction {tx_hash.hex()} failed on chain")
            if now["blockHash"] == receipt["blockHash"]:
                return now
            receipt = now

    async def market_fees(self) -> tuple[int, int]:
        """(maxFeePerGas, maxPriorityFeePerGas) a new transaction would be sent with now."""
        block = await self.w3.eth.get_block("latest")
        return self.fees.initial(int(block.get("baseFeePerGas", 0)), int(await self.w3.eth.max_priority_fee))

    async def _send_until_mined(
        self, sender: LocalAccount, tx: dict[str, Any], cancel_at: float | None, before_send: BeforeSend | None
    ) -> TxReceipt:
        fees: tuple[int, int] | None = await self.market_fees()
        sent: list[bytes] = []  # every version of this nonce: whichever is mined is the receipt
        while True:
            if fees is not None:
                await self._send_version(sender, tx, fees, sent, before_send)
            wait = self.fees.replace_after
            if cancel_at is not None:
                wait = max(min(wait, cancel_at - time.monotonic()), 0.0)
            receipt = await self._first_receipt(sender.address, tx["nonce"], sent, wait)
            if receipt is not None:
                return receipt
            if cancel_at is not None and time.monotonic() >= cancel_at:
                return await self._cancel(sender, tx, sent, "was not mined by its deadline")
            if fees is None:
                stuck = f"still unmined at the fee cap ({self.fees.max_fee_per_gas} wei per gas)"
                if cancel_at is not None:  # left in the pool, it could be mined at any time, after its deadline too
                    return await self._cancel(sender, tx, sent, stuck)
                raise ChainError(f"transaction of nonce {tx['nonce']} {stuck}")
            fees = self.fees.bumped(fees, await self.market_fees())
            if fees is not None:
                self.replacements += 1
                log.warning(
                    "transaction %s unmined after %.0f s: sending it again (nonce %d) at maxFeePerGas %d, tip %d",
                    sent[-1].hex(), self.fees.replace_after, tx["nonce"], *fees,
                )  # fmt: skip

    async def _send_version(
        self,
        sender: LocalAccount,
        tx: dict[str, Any],
        fees: tuple[int, int],
        sent: list[bytes],
        before_send: BeforeSend | None = None,
    ) -> None:
        """Signs `tx` at `fees` and sends it (after `before_send`); its hash joins `sent` (the versions of its nonce)."""
        tx["maxFeePerGas"], tx["maxPriorityFeePerGas"] = fees
        signed = Account.sign_transaction(tx, sender.key)
        if before_send is not None:
            await before_send(bytes(signed.hash), tx["nonce"])
        try:
            sent.append(await self.w3.eth.send_raw_transaction(signed.raw_transaction))
        except Web3RPCError as exc:
            if not sent:
                raise ChainError(f"transaction rejected: {exc}") from None
            # e.g. "nonce too low": a version sent before was mined meanwhile; its receipt follows
            log.warning("replacement of nonce %d not accepted: %s", tx["nonce"], exc)

    async def _cancel(self, sender: LocalAccount, tx: dict[str, Any], sent: list[bytes], why: str) -> TxReceipt:
        """Spends the nonce of `tx` (which `why`) on an empty transfer to the sender, priced one bump above the
        last version (so it replaces it); the receipt of `tx` if a version of it is mined first after all,
        else ChainError."""
        nonce = tx["nonce"]
        fees = self.fees.cancellation((tx["maxFeePerGas"], tx["maxPriorityFeePerGas"]))
        versions = len(sent)
        log.warning("transaction of nonce %d %s: cancelling it (maxFeePerGas %d)", nonce, why, fees[0])
        await self._send_version(sender, self._empty_transfer(sender, nonce), fees, sent)
        receipt = await self._first_receipt(sender.address, nonce, sent, self.fees.replace_after)
        if receipt is not None and receipt["transactionHash"] in sent[:versions]:
            return receipt  # the transaction itself was mined before the cancellation could replace it
        if receipt is not None:
            raise ChainError(f"transaction of nonce {nonce} {why}: cancelled")
        raise ChainError(f"transaction of nonce {nonce} {why}; its cancellation is pending")

    async def cancel(self, sender: LocalAccount, nonce: int) -> bytes:
        """Sends an empty transfer to the sender with `nonce`, priced to replace any version of a transaction
        this client signed (all at most the cap, a cancellation one bump above): for a transaction whose fees
        are unknown, e.g. sent before a restart. Returns its hash; does not wait."""
        cap = self.fees.max_fee_per_gas
        cancel = self._empty_transfer(sender, nonce)
        cancel["maxFeePerGas"], cancel["maxPriorityFeePerGas"] = self.fees.cancellation(
            self.fees.cancellation((cap, cap))
        )
        log.warning("cancelling the pending transaction of nonce %d (maxFeePerGas %d)", nonce, cancel["maxFeePerGas"])
        try:
            return await self.w3.eth.send_raw_transaction(Account.sign_transaction(cancel, sender.key).raw_transaction)
        except Web3RPCError as exc:  # e.g. "nonce too low": it was mined meanwhile
            raise ChainError(f"cancelling nonce {nonce}: {exc}") from None

    def _empty_transfer(self, sender: LocalAccount, nonce: int) -> dict[str, Any]:
        """What takes a nonce back: 0 wei from the sender to itself, no data (21,000 gas)."""
        return {"from": sender.address, "to": sender.address, "value": 0, "data": b"", "gas": 21_000,
                "nonce": nonce, "chainId": self.chain_id}  # fmt: skip

    async def _first_receipt(self, sender: str, nonce: int, hashes: list[bytes], timeout: float) -> TxReceipt | None:
        """The receipt of whichever of `hashes` is mined within `timeout` seconds, else None."""
        deadline = time.monotonic() + timeout
        while True:
            for tx_hash in reversed(hashes):
                try:
                    return await self.w3.eth.get_transaction_receipt(tx_hash)
                except TransactionNotFound:
                    pass
            if await self.w3.eth.get_transaction_count(sender, "latest") > nonce:
                # The nonce was used, but by none of ours we saw mined yet. A node may report the new
                # nonce before it serves the receipt (anvil did, in the default suite): look again for
                # a short while, then fail.
                grace = time.monotonic() + _RECEIPT_GRACE_S
                while True:
                    for tx_hash in reversed(hashes):
                        with contextlib.suppress(TransactionNotFound):
                            return await self.w3.eth.get_transaction_receipt(tx_hash)
                    if time.monotonic() >= grace:
                        raise ChainError(
                            f"nonce {nonce} of {sender} was used by a transaction this client did not send"
                        )
                    await asyncio.sleep(0.1)
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.05)

    async def deploy(self, sender: LocalAccount, artifact_name: str, *args: Any) -> str:
        artifact = load_artifact(artifact_name)
        factory = self.w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
        data = factory.constructor(*args).data_in_transaction
        receipt = await self.transact(sender, data=data)
        return receipt["contractAddress"]

    # ----- dev chain (anvil) helpers

    async def rpc(self, method: str, params: Sequence[Any] = ()) -> Any:
        response = await self.w3.provider.make_request(method, list(params))
        if "error" in response:
            raise ChainError(f"{method} failed: {response['error']}")
        return response.get("result")

    async def timestamp(self) -> int:
        block = await self.w3.eth.get_block("latest")
        return int(block["timestamp"])

    async def increase_time(self, seconds: int) -> None:
        """Moves the dev chain's clock forward and mines a block at the new time."""
        await self.rpc("evm_increaseTime", [seconds])
        await self.rpc("evm_mine")

    async def snapshot(self) -> str:
        return await self.rpc("evm_snapshot")

    async def revert(self, snapshot_id: str) -> None:
        await self.rpc("evm_revert", [snapshot_id])


class ContractClient:
    """Base of the typed clients: a contract instance bound to a `Chain`."""

    artifact = ""

    def __init__(self, chain: Chain, address: str) -> None:
        self.chain = chain
        self.address = AsyncWeb3.to_checksum_address(address)
        self.contract = chain.w3.eth.contract(address=self.address, abi=load_artifact(self.artifact).abi)

    async def _call(self, name: str, *args: Any) -> Any:
        return await self.chain.call(self.contract.functions[name](*args))

    async def _send(
        self,
        sender: LocalAccount,
        name: str,
        *args: Any,
        gas: int | None = None,
        within: float | None = None,
        before_send: BeforeSend | None = None,
    ) -> TxReceipt:
        fn = self.contract.functions[name](*args)
        return await self.chain.transact(sender, fn, gas=gas, within=within, before_send=before_send)

    def events(self, receipt: TxReceipt, name: str) -> list[dict[str, Any]]:
        """Decoded `name` events this contract emitted in `receipt`."""
        event = self.contract.events[name]()
        ours = [log for log in receipt["logs"] if log["address"] == self.address]
        return [dict(event.process_log(log)["args"]) for log in ours if log["topics"][0] == self._topic(name)]

    def _topic(self, name: str) -> bytes:
        abi = next(item for item in self.contract.abi if item.get("type") == "event" and item["name"] == name)
        types = ",".join(abi_type(p) for p in abi["inputs"])
        return keccak(f"{name}({types})".encode())


class OpenTokenClient(ContractClient):
    artifact = "OpenToken"

    async def balance_of(self, account: str) -> int:
        return await self._call("balanceOf", account)

    async def total_supply(self) -> int:
        return await self._call("totalSupply")

    async def allowance(self, owner: str, spender: str) -> int:
        return await self._call("allowance", owner, spender)

    async def nonces(self, owner: str) -> int:
        return await self._call("nonces", owner)

    async def mint(self, sender: LocalAccount, to: str, amount: int) -> TxReceipt:
        return await self._send(sender, "mint", to, amount)

    async def approve(self, sender: LocalAccount, spender: str, amount: int) -> TxReceipt:
        return await self._send(sender, "approve", spender, amount)

    async def transfer(self, sender: LocalAccount, to: str, amount: int) -> TxReceipt:
        return await self._send(sender, "transfer", to, amount)


def name_commitment(name: str, adapter_id: int, salt: bytes) -> bytes:
    """What `AdapterRegistry.commitName` takes to claim `name` for `adapter_id`: keccak256(abi.encode(...))."""
    return keccak(abi_encode(["string", "uint64", "bytes32"], [name, adapter_id, salt]))


@dataclass(frozen=True)
class AdapterInfo:
    owner: str
    base_model: bytes
    cid: str
    version_count: int


@dataclass(frozen=True)
class AdapterTerms:
    since: int
    retired: bool
    price_in: int
    price_out: int


class AdapterRegistryClient(ContractClient):
    artifact = "AdapterRegistry"

    async def register(self, sender: LocalAccount, cid: str, base_model: bytes, price_in: int, price_out: int,
                       contributors: Sequence[str], shares_bps: Sequence[int]) -> int:
        """Registers an adapter owned by `sender`; returns its id."""
        receipt = await self._send(sender, "register", cid, base_model, price_in, price_out,
                                   list(contributors), list(shares_bps))
        return self.events(receipt, "AdapterRegistered")[0]["adapterId"]

    async def update_prices(self, sender: LocalAccount, adapter_id: int, price_in: int, price_out: int) -> TxReceipt:
        return await self._send(sender, "updatePrices", adapter_id, price_in, price_out)

    async def update_shares(self, sender: LocalAccount, adapter_id: int, contributors: Sequence[str],
                            shares_bps: Sequence[int]) -> TxReceipt:
        return await self._send(sender, "updateShares", adapter_id, list(contributors), list(shares_bps))

    async def retire(self, sender: LocalAccount, adapter_id: int) -> TxReceipt:
        return await self._send(sender, "retire", adapter_id)

    async def transfer_ownership(self, sender: LocalAccount, adapter_id: int, new_owner: str) -> TxReceipt:
        return await self._send(sender, "transferAdapterOwnership", adapter_id, new_owner)

    async def claim_name(
        self, sender: LocalAccount, name: str, adapter_id: int, poll: float = 1.0, timeout: float | None = None
    ) -> TxReceipt:
        """Points `name` at `adapter_id` (owned by `sender`). A name `sender` already holds is moved at once; a
        free one is committed to, then claimed once the chain's clock has passed `nameCommitDelay` (commit and
        reveal: a claim seen in the mempool cannot be taken first). ChainError if the chain's latest block
        does not reach that time within `timeout` seconds (default: the delay and 10 minutes more; a dev chain
        that mines only on demand never does)."""
        if await self.adapter_id_by_name(name) != 0:
            return await self.set_name(sender, name, adapter_id)
        salt = secrets.token_bytes(32)
        receipt = await self.commit_name(sender, name_commitment(name, adapter_id, salt))
        committed_at = (await self.chain.w3.eth.get_block(receipt["blockNumber"]))["timestamp"]
        delay = await self.name_commit_delay()
        ready = committed_at + delay
        give_up = time.monotonic() + (delay + 600 if timeout is None else timeout)
        while await self.chain.timestamp() < ready:  # the latest block's: gas is estimated on it
            if time.monotonic() > give_up:
                raise ChainError(f"the chain's clock did not reach {ready} to claim the name {name!r}")
            await asyncio.sleep(poll)
        return await self.set_name(sender, name, adapter_id, salt)

    async def commit_name(self, sender: LocalAccount, commitment: bytes) -> TxReceipt:
        """Step one of claiming a free name: `commitment` is `name_commitment(name, adapter_id, salt)`."""
        return await self._send(sender, "commitName", commitment)

    async def set_name(self, sender: LocalAccount, name: str, adapter_id: int, salt: bytes = bytes(32)) -> TxReceipt:
        """Step two (a free name: `salt` of its commitment, made at least `nameCommitDelay` ago), or a move of a
        name `sender`'s adapter holds to another adapter of `sender`'s (`salt` unused)."""
        return await self._send(sender, "setName", name, adapter_id, salt)

    async def name_commit_delay(self) -> int:
        return await self._call("nameCommitDelay")

    async def adapter_id_by_name(self, name: str) -> int:
        return await self._call("adapterIdByName", name)

    async def adapter_count(self) -> int:
        return await self._call("adapterCount")

    async def adapter_id_of(self, cid: str) -> int:
        return await self._call("adapterIdOf", cid)

    async def adapter(self, adapter_id: int) -> AdapterInfo:
        return AdapterInfo(*await self._call("adapter", adapter_id))

    async def terms(self, adapter_id: int, version: int) -> AdapterTerms:
        return AdapterTerms(*await self._call("terms", adapter_id, version))

    async def split(self, adapter_id: int, version: int) -> tuple[list[str], list[int]]:
        contributors, shares = await self._call("split", adapter_id, version)
        return list(contributors), list(shares)

    async def version_at(self, adapter_id: int, timestamp: int) -> tuple[int, AdapterTerms] | None:
        """(version, terms) in force at `timestamp`, None before registration or for unknown ids."""
        found, version, retired, price_in, price_out = await self._call("versionAt", adapter_id, timestamp)
        if not found:
            return None
        return version, AdapterTerms(0, retired, price_in, price_out)


@dataclass(frozen=True)
class NodeInfo:
    registered: bool
    signer: str
    stake: int
    unbonding: int
    unbonding_end: int
    endpoint: str


class NodeRegistryClient(ContractClient):
    artifact = "NodeRegistry"

    async def register(self, sender: LocalAccount, signer: str, endpoint: str, fee_per_token: int,
                       stake: int) -> TxReceipt:
        return await self._send(sender, "register", signer, endpoint, fee_per_token, stake)

    async def add_stake(self, sender: LocalAccount, amount: int) -> TxReceipt:
        return await self._send(sender, "addStake", amount)

    async def set_signer(self, sender: LocalAccount, signer: str) -> TxReceipt:
        return await self._send(sender, "setSigner", signer)

    async def set_endpoint(self, sender: LocalAccount, endpoint: str) -> TxReceipt:
        return await self._send(sender, "setEndpoint", endpoint)

    async def set_fee(self, sender: LocalAccount, fee_per_token: int) -> TxReceipt:
        return await self._send(sender, "setFee", fee_per_token)

    async def unbond(self, sender: LocalAccount, amount: int) -> TxReceipt:
        return await self._send(sender, "unbond", amount)

    async def withdraw_unbonded(self, sender: LocalAccount) -> TxReceipt:
        return await self._send(sender, "withdrawUnbonded")

    async def node_of(self, node: str) -> NodeInfo:
        return NodeInfo(*await self._call("nodeOf", node))

    async def is_active(self, node: str) -> bool:
        return await self._call("isActive", node)

    async def fee_at(self, node: str, timestamp: int) -> int | None:
        found, fee = await self._call("feeAt", node, timestamp)
        return fee if found else None

    async def min_stake(self) -> int:
        return await self._call("minStake")

    async def slashable_of(self, node: str) -> int:
        return await self._call("slashableOf", node)


@dataclass(frozen=True)
class EscrowAccount:
    """A payer's account for one node: `balance` includes the `thawing` part announced for withdrawal."""

    balance: int
    thawing: int
    thaw_end: int

    @property
    def available(self) -> int:
        """What a node may still count on for new requests (thawing funds can leave before it commits)."""
        return self.balance - self.thawing


class PaymentEscrowClient(ContractClient):
    artifact = "PaymentEscrow"

    async def deposit(self, sender: LocalAccount, node: str, amount: int) -> TxReceipt:
        return await self._send(sender, "deposit", node, amount)

    async def deposit_for(self, sender: LocalAccount, payer: str, node: str, amount: int) -> TxReceipt:
        return await self._send(sender, "depositFor", payer, node, amount)

    async def deposit_with_permit(self, sender: LocalAccount, node: str, amount: int, deadline: int, v: int,
                                  r: bytes, s: bytes) -> TxReceipt:
        return await self._send(sender, "depositWithPermit", node, amount, deadline, v, r, s)

    async def request_withdrawal(self, sender: LocalAccount, node: str, amount: int) -> TxReceipt:
        return await self._send(sender, "requestWithdrawal", node, amount)

    async def withdraw(self, sender: LocalAccount, node: str) -> TxReceipt:
        return await self._send(sender, "withdraw", node)

    async def authorize_signer(self, sender: LocalAccount, signer: str) -> TxReceipt:
        return await self._send(sender, "authorizeSigner", signer)

    async def revoke_signer(self, sender: LocalAccount, signer: str) -> TxReceipt:
        return await self._send(sender, "revokeSigner", signer)

    async def account_of(self, payer: str, node: str) -> EscrowAccount:
        return EscrowAccount(*await self._call("accountOf", payer, node))

    async def signer_of(self, payer: str, signer: str) -> tuple[int, int]:
        """[since, until) of a signer key: (0, 0) if never authorised, until = 2**64-1 if not revoked."""
        since, until = await self._call("signerOf", payer, signer)
        return since, until

    async def signer_valid_at(self, payer: str, signer: str, timestamp: int) -> bool:
        return await self._call("signerValidAt", payer, signer, timestamp)

    async def collected_of(self, payer: str, node: str) -> int:
        """What the node's committed, not voided batches charged `payer` (never above its signed caps)."""
        return await self._call("collectedOf", payer, node)

    async def total_collected(self) -> int:
        return await self._call("totalCollected")


@dataclass(frozen=True)
class BatchHeader:
    node: str
    committed_at: int
    depth: int
    status: int  # 0 none, 1 pending, 2 finalized, 3 voided
    payer_root: bytes
    adapter_root: bytes
    payer_sum: int
    adapter_sum: int
    totals_hash: bytes
    covered: int  # part of payer_sum the node's stake paid because a payer's escrow fell short


def challenge_commitment(challenger: str, calldata: bytes | str) -> bytes:
    """What `commitChallenge` takes before a proof: keccak256(abi.encode(challenger, keccak256(calldata)))."""
    if isinstance(calldata, str):
        calldata = bytes.fromhex(calldata.removeprefix("0x"))
    return keccak(bytes.fromhex(challenger.removeprefix("0x")).rjust(32, b"\0") + keccak(calldata))


class UsageSettlementClient(ContractClient):
    artifact = "UsageSettlement"

    PENDING, FINALIZED, VOIDED = 1, 2, 3

    async def domain(self) -> Domain:
        return Domain(self.chain.chain_id, self.address)

    async def commit_batch(
        self,
        sender: LocalAccount,
        node: str,
        batch: Batch,
        cid: str,
        within: float | None = None,
        commit_by: int = 2**64 - 1,
        before_send: BeforeSend | None = None,
    ) -> tuple[int, TxReceipt]:
        """Commits `batch` (roots, totals, one voucher per payer) for `node`; returns (batch id, receipt). With
        `within`, a commit still unmined after that many seconds is cancelled (`Chain.transact`); whatever
        happens to the cancellation, the contract refuses the commit if mined after `commit_by` (chain time).
        `before_send` sees every version's hash and nonce before it is broadcast (`Chain.transact`)."""
        receipt = await self._send(sender, "commitBatch", node, batch.commitment(cid, commit_by), batch.totals(),
                                   batch.vouchers_abi(), within=within, before_send=before_send)
        return self.events(receipt, "BatchCommitted")[0]["batchId"], receipt

    async def finalize_batch(self, sender: LocalAccount, batch_id: int, totals: Totals) -> TxReceipt:
        return await self._send(sender, "finalizeBatch", batch_id, totals)

    async def distribute(self, sender: LocalAccount, adapter_id: int, version: int) -> TxReceipt:
        return await self._send(sender, "distributeAdapterRevenue", adapter_id, version)

    async def claim(self, sender: LocalAccount, to: str | None = None) -> TxReceipt:
        return await self._send(sender, "claim", to or sender.address)

    async def commit_challenge(self, sender: LocalAccount, commitment: bytes) -> TxReceipt:
        return await self._send(sender, "commitChallenge", commitment)

    async def prove(self, sender: LocalAccount, fn: Any, *, commit: bool = True) -> TxReceipt:
        """Sends a fraud proof. It is first estimated (an honest batch makes it revert here, with the reason,
        before anything is spent); with `commit` the proof is then committed to in its own block
        ({commitChallenge}) so the reward is the sender's, not whoever copies the pending proof."""
        data = fn._encode_transaction_data()
        tx = {"from": sender.address, "to": self.address, "data": data, "value": 0}
        try:
            await self.chain.w3.eth.estimate_gas(tx)
        except ContractLogicError as exc:
            raise decode_revert(exc.data) from None
        if commit:
            await self.commit_challenge(sender, challenge_commitment(sender.address, data))
        return await self.chain.transact(sender, fn)

    # Fraud proofs: each returns the receipt of the voiding transaction.

    async def prove_invalid_record(self, sender: LocalAccount, batch_id: int, batch: Batch, tree: Tree,
                                   index: int, *, commit: bool = True) -> TxReceipt:
        f = self.contract.functions.proveInvalidRecord
        return await self.prove(sender, f(batch_id, batch.totals(), int(tree), batch.leaf_proof(tree, index)),
                                commit=commit)

    async def prove_leaf_sum_mismatch(self, sender: LocalAccount, batch_id: int, batch: Batch, tree: Tree,
                                      index: int, *, commit: bool = True) -> TxReceipt:
        claimed = batch.tree(tree).node(0, index).sum
        f = self.contract.functions.proveLeafSumMismatch
        return await self.prove(sender, f(batch_id, batch.totals(), int(tree), batch.leaf_proof(tree, index), claimed),
                                commit=commit)

    async def prove_node_sum_mismatch(self, sender: LocalAccount, batch_id: int, batch: Batch, tree: Tree,
                                      level: int, index: int, *, commit: bool = True) -> TxReceipt:
        node, siblings = batch.node_proof(tree, level, index)
        t = batch.tree(tree)
        left, right = t.node(level - 1, 2 * index), t.node(level - 1, 2 * index + 1)
        f = self.contract.functions.proveNodeSumMismatch
        return await self.prove(sender, f(batch_id, batch.totals(), int(tree), level, index, node, siblings,
                                          left.as_tuple(), right.as_tuple()), commit=commit)

    async def prove_misorder(self, sender: LocalAccount, batch_id: int, batch: Batch, tree: Tree,
                             index: int, *, commit: bool = True) -> TxReceipt:
        f = self.contract.functions.proveMisorder
        return await self.prove(sender, f(batch_id, batch.totals(), int(tree), batch.leaf_proof(tree, index),
                                          batch.leaf_proof(tree, index + 1)), commit=commit)

    async def prove_total_mismatch(self, sender: LocalAccount, batch_id: int, batch: Batch, tree: Tree,
                                   entry: int, *, commit: bool = True) -> TxReceipt:
        lower, upper = batch.total_boundaries(tree, entry)
        f = self.contract.functions.proveTotalMismatch
        return await self.prove(sender, f(batch_id, batch.totals(), int(tree), entry, lower, upper), commit=commit)

    async def prove_missing_record(self, sender: LocalAccount, batch_id: int, batch: Batch, source: Tree,
                                   index: int, *, commit: bool = True) -> TxReceipt:
        leaf = batch.leaves(source)[index]
        f = self.contract.functions.proveMissingRecord
        return await self.prove(sender, f(batch_id, batch.totals(), int(source), batch.leaf_proof(source, index),
                                          batch.missing_slot(source.other, leaf)), commit=commit)

    async def prove_duplicate(self, sender: LocalAccount, batch_id: int, batch: Batch, index: int,
                              other_batch_id: int, other_batch: Batch, other_index: int, *,
                              commit: bool = True) -> TxReceipt:
        f = self.contract.functions.proveDuplicate
        return await self.prove(sender, f(batch_id, batch.totals(), batch.leaf_proof(Tree.PAYER, index),
                                          other_batch_id, other_batch.leaf_proof(Tree.PAYER, other_index)),
                                commit=commit)

    # Views

    async def batch_of(self, batch_id: int) -> BatchHeader:
        return BatchHeader(*await self._call("batchOf", batch_id))

    async def batch_count(self) -> int:
        return await self._call("batchCount")

    async def claimable_of(self, account: str) -> int:
        return await self._call("claimableOf", account)

    async def undistributed_of(self, adapter_id: int, version: int) -> int:
        return await self._call("undistributedOf", adapter_id, version)

    async def pending_charges_of(self, node: str) -> int:
        return await self._call("pendingChargesOf", node)

    async def deficit_of(self, batch_id: int, payer: str) -> int:
        return await self._call("deficitOf", batch_id, payer)

    async def challenge_committed_at(self, commitment: bytes) -> int:
        return await self._call("challengeCommittedAt", commitment)

    async def check_leaf(self, node: str, committed_at: int, leaf_abi: tuple[Any, ...]) -> int:
        """The contract's verdict on a leaf (the `Fraud` enum value, 0 = valid)."""
        return await self._call("checkLeaf", node, committed_at, leaf_abi)
