"""`openlora devnet up | down`: the whole local network in one command.

`up` starts anvil, deploys the contracts, registers this node (stake, signer, fee), funds a demo payer's
escrow with the node, starts the node (the bundled model, its local IPFS node, the journal and the
submitter), publishes demo adapters to IPFS and registers them on chain with contributor splits and prices,
then prints a ready-to-paste paid client command. It stays in the foreground; Ctrl-C, SIGTERM or
`openlora devnet down` (which signals the process recorded in `<dir>/devnet.json`) stops exactly what it
started: the node, its IPFS node and anvil.

Accounts are anvil's well-known dev keys (never use them on a real chain): 0 deploys and is the treasury,
1 runs the node, 2 is the demo payer, 3 and 4 contribute the demo adapters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_hash.auto import keccak

from node.config import Settings

log = logging.getLogger(__name__)

OPEN = 10**18
# Short windows so that a demo batch commits within seconds and finalizes within minutes.
DEVNET_CONFIG = {
    "challenge_window": 120,
    "max_request_ttl": 300,
    "max_commit_delay": 600,
    "notice_period": 1_200,
    "name_commit_delay": 0,  # one user, no mempool to read: claims need no wait (anvil mines on demand)
    "thaw_period": 1_200,
    "unbonding_delay": 600,
    "min_stake": 100 * OPEN,
}
BATCH_INTERVAL = 30.0  # the devnet node commits every 30 s
NODE_STAKE = 10_000 * OPEN
NODE_FEE_PER_TOKEN = 10**12  # 0.000001 OPEN per token
PAYER_DEPOSIT = 1_000 * OPEN


@dataclass(frozen=True)
class DemoAdapter:
    name: str
    seed: int
    price_in: int  # OPEN wei per input token
    price_out: int  # per output token
    shares_bps: tuple[int, int]  # contributors: dev accounts 3 and 4


DEMO_ADAPTERS = (
    DemoAdapter("demo-poet", 1, 2 * 10**12, 5 * 10**12, (7_000, 3_000)),
    DemoAdapter("demo-coder", 2, 3 * 10**12, 8 * 10**12, (5_000, 5_000)),
    DemoAdapter("demo-lawyer", 3, 5 * 10**12, 9 * 10**12, (9_000, 1_000)),
    DemoAdapter("demo-chef", 4, 1 * 10**12, 2 * 10**12, (3_333, 6_667)),
)


def devnet_dir(settings: Settings) -> Path:
    return settings.cache_dir / "devnet"


def state_file(settings: Settings) -> Path:
    return devnet_dir(settings) / "devnet.json"


async def _fund_and_register(rpc_url: str, keys: list[str], deployments_path: Path, endpoint: str) -> None:
    """Stake and register the node, fund the payer's escrow with it."""
    from attribution.chain import Chain
    from attribution.deploy import Contracts, Deployments

    deployer, operator, payer = (Account.from_key(k) for k in keys[:3])
    chain = await Chain.connect(rpc_url)
    try:
        c = Contracts.attach(chain, Deployments.load(deployments_path))
        await c.token._send(deployer, "mint", operator.address, NODE_STAKE)
        await c.token._send(deployer, "mint", payer.address, PAYER_DEPOSIT)
        await c.token._send(operator, "approve", c.nodes.address, NODE_STAKE)
        await c.nodes._send(operator, "register", operator.address, endpoint, NODE_FEE_PER_TOKEN, NODE_STAKE)
        await c.token._send(payer, "approve", c.escrow.address, PAYER_DEPOSIT)
        await c.escrow._send(payer, "deposit", operator.address, PAYER_DEPOSIT)
    finally:
        await chain.close()


async def _set_endpoint(rpc_url: str, operator_key: str, deployments_path: Path, endpoint: str) -> None:
    from attribution.chain import Chain
    from attribution.deploy import Contracts, Deployments

    chain = await Chain.connect(rpc_url)
    try:
        await Contracts.attach(chain, Deployments.load(deployments_path)).nodes.set_endpoint(
            Account.from_key(operator_key), endpoint
        )
    finally:
        await chain.close()


async def _publish_demo_adapters(
    settings: Settings, ipfs_api_url: str, index_file: Path, keys: list[str], deployments_path: Path
) -> dict[str, str]:
    """Makes (once, cached), publishes, registers and names (on chain) the demo adapters; returns name -> CID."""
    from attribution.chain import Chain
    from attribution.deploy import Contracts, Deployments
    from node.adapters.cli import add_to_index
    from node.adapters.ipfs import KuboRpcClient, import_directory
    from node.adapters.synthetic import make_random_adapter
    from node.engine.prepare import prepare_model, served_name

    base_dir = prepare_model(settings)
    base_name = served_name(settings, base_dir)
    base_model = keccak(base_name.encode())  # the registry's id of a base model
    owner = Account.from_key(keys[0])
    contributors = [Account.from_key(k).address for k in keys[3:5]]
    cids: dict[str, str] = {}
    chain = await Chain.connect(settings.chain_rpc_url)
    try:
        c = Contracts.attach(chain, Deployments.load(deployments_path))
        for demo in DEMO_ADAPTERS:
            directory = settings.cache_dir / "devnet-adapters" / base_dir.name / demo.name  # per base model
            if not (directory / "adapter_model.safetensors").is_file():
                await asyncio.to_thread(make_random_adapter, base_dir, directory, seed=demo.seed)
            dag = await asyncio.to_thread(import_directory, directory)
            async with KuboRpcClient(ipfs_api_url) as client:
                await client.dag_import(dag.car_chunks())
                await client.pin_add(dag.root)
            cid = str(dag.root)
            add_to_index(index_file, demo.name, cid)
            adapter_id = await c.adapters.adapter_id_of(cid)
            if adapter_id == 0:
                adapter_id = await c.adapters.register(
                    owner, cid, base_model, demo.price_in, demo.price_out, contributors, demo.shares_bps
                )
            if await c.adapters.adapter_id_by_name(demo.name) != adapter_id:  # the registry's name for it
                await c.adapters.claim_name(owner, demo.name, adapter_id)
            cids[demo.name] = cid
    finally:
        await chain.close()
    return cids


@dataclass(frozen=True)
class Provisioned:
    """What `provision` wrote into its directory: everything a node and a client need."""

    directory: Path
    deployments: Path
    keystore: Path
    password_file: Path
    payer_key: Path
    adapter_index: Path
    adapters: dict[str, str]
    payer: str


async def provision(
    settings: Settings, rpc_url: str, ipfs_api_url: str, directory: Path, node_endpoint: str
) -> Provisioned:
    """Deploys the contracts to a dev chain, stakes and registers the node, funds the demo payer's escrow,
    publishes and registers the demo adapters, and writes the node's keystore (V3, random password in a
    file beside it), the payer's key and the adapter index into `directory`."""
    from attribution.deploy import DeployConfig, deploy_all
    from attribution.devchain import dev_private_keys
    from attribution.keys import DEV_CHAIN_IDS, write_keystore

    keys = dev_private_keys(5)
    directory.mkdir(parents=True, exist_ok=True)
    deployments_path = directory / "deployments.json"
    deployments = await deploy_all(rpc_url, keys[0], DeployConfig(**DEVNET_CONFIG), out=deployments_path)
    if deployments.chain_id not in DEV_CHAIN_IDS:
        raise SystemExit(
            f"openlora: error: devnet provisioning uses well-known keys: chain {deployments.chain_id} is not a dev chain"
        )
    await _fund_and_register(rpc_url, keys, deployments_path, node_endpoint)
    password_file = directory / "node-key.password"
    password_file.touch(mode=0o600)
    password_file.write_text(secrets.token_hex(16) + "\n")
    keystore = directory / "node-key.json"
    write_keystore(keystore, bytes.fromhex(keys[1].removeprefix("0x")), password_file.read_text().strip())
    payer_key = directory / "payer.key"
    payer_key.touch(mode=0o600)
    payer_key.write_text(keys[2] + "\n")
    index_file = directory / "adapter-index.json"
    chain_settings = settings.model_copy(update={"chain_rpc_url": rpc_url})
    cids = await _publish_demo_adapters(chain_settings, ipfs_api_url, index_file, keys, deployments_path)
    return Provisioned(
        directory, deployments_path, keystore, password_file, payer_key, index_file, cids,
        Account.from_key(keys[2]).address,
    )  # fmt: skip


@dataclass
class LocalNetwork:
    """A running local network: anvil, an IPFS node, the provisioned contracts and keys, and the node."""

    anvil: Any
    ipfs: Any
    provisioned: Provisioned
    app: Any
    url: str
    settings: Settings
    runner: Any = None

    async def restart(self) -> None:
        """Stops the node and starts it again over the same journal (what a crash-free restart does)."""
        from node.api.app import create_app
        from node.api.server import start_server

        await self.runner.cleanup()
        self.app = create_app(self.settings)
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        self.runner, self.url = await start_server(self.app, host, int(port))


@contextlib.asynccontextmanager
async def local_network(
    settings: Settings,
    directory: Path,
    *,
    chain_port: int | None = None,
    ipfs_repo: Path | None = None,
    serve: bool = True,
    **node_settings: Any,
) -> AsyncIterator[LocalNetwork]:
    """Anvil, an IPFS node, everything provisioned, and the node serving on `settings.host:port` (0: a free
    port) with its journal in `directory`; all stopped on exit. `node_settings` override the node's. With
    `serve=False` no node is started: the yielded network's `settings` say how to run one (as a process)."""
    from attribution.devchain import Anvil
    from node.adapters.ipfs import LocalIpfsNode
    from node.api.app import create_app
    from node.api.server import start_server

    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("journal.sqlite*"):  # a fresh chain: an old journal's records are void
        stale.unlink()
    anvil = Anvil(port=chain_port)
    await asyncio.to_thread(anvil.start)
    try:
        async with LocalIpfsNode(ipfs_repo or settings.ipfs_repo) as ipfs:
            endpoint = f"http://{settings.host}:{settings.port}"
            done = await provision(settings, anvil.rpc_url, ipfs.api_url, directory, endpoint)
            update = {
                "chain_rpc_url": anvil.rpc_url,
                "deployments": done.deployments,
                "node_keystore": done.keystore,
                "node_key_password_file": done.password_file,
                "journal_path": directory / "journal.sqlite",
                "batch_interval": BATCH_INTERVAL,
                "ipfs_gateways": [ipfs.gateway_url],
                "ipfs_api_url": ipfs.api_url,
                "adapter_index": done.adapter_index,
            }
            node = settings.model_copy(update={**update, **node_settings})
            if not serve:
                yield LocalNetwork(anvil, ipfs, done, None, "", node)
                return
            app = create_app(node)
            runner, url = await start_server(app, settings.host, settings.port)
            net = LocalNetwork(anvil, ipfs, done, app, url, node, runner)
            if url != endpoint:  # port 0: the kernel chose one; the registry gets the address it chose
                await _set_endpoint(anvil.rpc_url, anvil.private_keys[1], done.deployments, url)
            try:
                yield net
            finally:
                await net.runner.cleanup()
    finally:
        anvil.stop()


async def up(settings: Settings, *, chain_port: int | None = None) -> None:
    """Runs the devnet until a signal arrives (see the module docstring)."""
    _refuse_if_running(settings)
    try:
        async with local_network(settings, devnet_dir(settings), chain_port=chain_port) as net:
            _write_state(settings, net.anvil.rpc_url, net.url, net.provisioned.adapters)
            _print_ready(net.url, net.anvil.rpc_url, net.ipfs.gateway_url, net.provisioned)
            await _wait_for_signal()
            log.info("devnet: shutting down")
    finally:
        state_file(settings).unlink(missing_ok=True)


def down(settings: Settings, timeout: float = 30.0) -> bool:
    """Signals a running `devnet up` to stop and waits for it; False when none was running."""
    state = _read_state(settings)
    if state is None:
        return False
    pid = state["pid"]
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        raise SystemExit(f"openlora: error: the devnet process {pid} did not stop within {timeout:.0f} s")
    state_file(settings).unlink(missing_ok=True)
    return True


def _refuse_if_running(settings: Settings) -> None:
    state = _read_state(settings)
    if state is not None:
        raise SystemExit(
            f"openlora: error: a devnet is already running (pid {state['pid']}, {state['node']}): `openlora devnet down`"
        )


def _read_state(settings: Settings) -> dict | None:
    try:
        state = json.loads(state_file(settings).read_text())
    except (OSError, ValueError):
        return None
    return state if _alive(state.get("pid", -1)) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    with contextlib.suppress(OSError):  # a zombie is not alive
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


def _write_state(settings: Settings, rpc_url: str, node_url: str, cids: dict[str, str]) -> None:
    state = {"pid": os.getpid(), "chain": rpc_url, "node": node_url, "adapters": cids}
    tmp = state_file(settings).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(state_file(settings))


def _print_ready(url: str, rpc_url: str, gateway: str, done: Provisioned) -> None:
    print(
        f"\nOpenLoRA devnet is up: node {url}, chain {rpc_url}, adapters {', '.join(done.adapters)}.\n"
        f"Demo payer {done.payer} has {PAYER_DEPOSIT // OPEN} OPEN in escrow with the node. Send a paid request:\n\n"
        f"  .venv/bin/openlora client chat --node-url {url} --model {next(iter(done.adapters))} "
        f'--key-file {done.payer_key} "What is the capital of France?"\n\n'
        f"Audit it: .venv/bin/openlora audit --rpc-url {rpc_url} --deployments {done.deployments} "
        f"--ipfs-gateway {gateway}\n"
        "Stop with Ctrl-C or `.venv/bin/openlora devnet down`.\n",
        flush=True,
    )


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
