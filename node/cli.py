"""The `openlora` command.

Settings come from three places, strongest first: flags given on the command line, `OPENLORA_*`
environment variables, defaults. Flags have no argparse defaults, so `Settings(**flags)` holds
exactly the flags that were given and pydantic-settings fills in the rest (and validates all).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from pydantic import ValidationError

from node.config import Settings

log = logging.getLogger("openlora")

# Settings fields each command takes as flags (`max_num_seqs` -> `--max-num-seqs`).
SERVE_FLAGS = (
    "host", "port", "model", "served_model_name", "cache_dir", "dtype", "device", "threads",
    "max_num_seqs", "num_kv_blocks", "kv_block_size", "max_model_len", "max_prefill_tokens", "prefix_caching",
    "engine", "engine_url", "engine_args", "vllm_python", "vllm_start_timeout", "default_max_tokens",
    "max_body_bytes", "adapters_dir", "max_loras", "max_lora_rank", "host_adapters",
    "max_adapter_bytes", "model_lookups_per_s", "ipfs_gateways", "ipfs_api_url", "local_ipfs", "adapter_index", "adapter_cache_bytes",
    "ipfs_timeout", "chain_rpc_url", "deployments", "node_keystore", "node_key_password_file", "node_address",
    "allow_unsigned", "journal_path", "batch_max_records", "batch_interval", "confirmations",
    "tx_replace_after", "tx_fee_bump", "tx_max_fee_gwei", "kernel_cache", "kernel_cflags", "force_triton",
)  # fmt: skip
# Secrets (OPENLORA_NODE_KEY_PASSWORD, OPENLORA_NODE_PRIVATE_KEY, OPENLORA_ENGINE_API_KEY) are environment-only:
# a flag would show in `ps`. So is the kernel's C compiler: make's CC, not OPENLORA_CC.
PREPARE_FLAGS = ("model", "cache_dir")
DEVNET_FLAGS = (
    "host", "port", "model", "cache_dir", "dtype", "threads", "max_loras", "allow_unsigned", "engine", "engine_url",
    "engine_args", "vllm_python",
)  # fmt: skip
FLAG_ALIASES = {"adapters_dir": ("--adapters",)}
# repeatable: one gateway, one vLLM option ("--engine-arg=--enforce-eager", "--engine-arg '--max-loras 4'") per flag
FLAG_NAMES = {"ipfs_gateways": "--ipfs-gateway", "engine_args": "--engine-arg"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_settings_flags(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    for name in names:
        field = Settings.model_fields[name]
        default = field.get_default(call_default_factory=True)
        notes = ([] if default is None else [f"default: {default}"]) + [f"env OPENLORA_{name.upper()}"]
        repeated = name in FLAG_NAMES
        parser.add_argument(
            FLAG_NAMES.get(name, f"--{name.replace('_', '-')}"),
            *FLAG_ALIASES.get(name, ()),
            action="append" if repeated else "store",
            dest=name,
            default=argparse.SUPPRESS,  # absent flags stay absent: env vars and defaults fill in
            metavar=name.upper(),
            help=f"{field.description or name.replace('_', ' ')} ({'; '.join(notes)})",
        )


def _settings(args: argparse.Namespace, names: Sequence[str]) -> Settings:
    return Settings(**{name: getattr(args, name) for name in names if hasattr(args, name)})


def _serve(args: argparse.Namespace) -> None:
    from node.engine.prepare import prepare_model

    settings = _settings(args, SERVE_FLAGS)
    # Validates --model, or finds (first run: builds) the bundled model with a progress display.
    model_dir = prepare_model(settings, progress=True)
    asyncio.run(_run_server(settings.model_copy(update={"model": str(model_dir)})))


async def _run_server(settings: Settings) -> None:
    from node.api.app import create_app
    from node.api.keys import ENGINE
    from node.api.server import start_server

    app = create_app(settings)
    runner, url = await start_server(app, settings.host, settings.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("serving %s at %s", app[ENGINE].model_name, url)
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        await runner.cleanup()


def _model_prepare(args: argparse.Namespace) -> None:
    from node.engine.prepare import prepare_model

    print(prepare_model(_settings(args, PREPARE_FLAGS), progress=True))


def _register_serve(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="run the OpenAI-compatible inference server")
    _add_settings_flags(serve, SERVE_FLAGS)
    serve.set_defaults(run=_serve)


def _register_model(subparsers: argparse._SubParsersAction) -> None:
    model = subparsers.add_parser("model", help="manage the base model")
    commands = model.add_subparsers(title="commands", required=True, metavar="COMMAND")
    prepare = commands.add_parser(
        "prepare", help="convert the bundled GGUF model into the cache (or check --model) and print its directory"
    )
    _add_settings_flags(prepare, PREPARE_FLAGS)
    prepare.set_defaults(run=_model_prepare)


def _devnet_up(args: argparse.Namespace) -> None:
    from node.devnet import up
    from node.engine.prepare import prepare_model

    settings = _settings(args, DEVNET_FLAGS)
    model_dir = prepare_model(settings, progress=True)
    asyncio.run(up(settings.model_copy(update={"model": str(model_dir)}), chain_port=args.chain_port))


def _devnet_down(args: argparse.Namespace) -> None:
    from node.devnet import down

    print("devnet stopped" if down(_settings(args, ("cache_dir",))) else "no devnet is running")


def _devnet_provision(args: argparse.Namespace) -> None:
    from node.devnet import provision

    done = asyncio.run(
        provision(
            _settings(args, ("model", "cache_dir")), args.rpc_url, args.ipfs_api_url, args.out, args.node_endpoint
        )
    )
    print(json.dumps({"deployments": str(done.deployments), "adapters": done.adapters, "payer": done.payer}))


def _register_devnet(subparsers: argparse._SubParsersAction) -> None:
    devnet = subparsers.add_parser("devnet", help="the whole local network: chain, IPFS, contracts, payer, node")
    commands = devnet.add_subparsers(title="commands", required=True, metavar="COMMAND")
    up = commands.add_parser("up", help="start everything in the foreground and print a paid client command")
    _add_settings_flags(up, DEVNET_FLAGS)
    up.add_argument("--chain-port", type=int, default=None, help="anvil's port (default: a free one)")
    up.set_defaults(run=_devnet_up)
    down = commands.add_parser("down", help="stop a running `devnet up` and everything it started")
    _add_settings_flags(down, ("cache_dir",))
    down.set_defaults(run=_devnet_down)
    provision = commands.add_parser(
        "provision", help="deploy, stake the node, fund the payer, publish demo adapters into DIR (a dev chain only)"
    )
    provision.add_argument("--rpc-url", required=True, help="the dev chain (anvil)")
    provision.add_argument("--ipfs-api-url", required=True, help="Kubo RPC API to publish the demo adapters to")
    provision.add_argument("--node-endpoint", required=True, help="the URL the node registers on chain")
    provision.add_argument("--out", type=Path, required=True, help="directory for keys, deployments, adapter index")
    _add_settings_flags(provision, ("model", "cache_dir"))
    provision.set_defaults(run=_devnet_provision)


def _command_groups() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Each entry adds one group of subcommands. Packages with commands of their own register here."""
    from attribution.cli import register_cli as register_chain
    from attribution.client_cli import register_cli as register_client
    from node.adapters.cli import register_cli as register_adapter
    from node.audit_cli import register_cli as register_audit

    return [
        _register_serve,
        _register_model,
        _register_devnet,
        lambda sp: register_adapter(sp, _add_settings_flags),
        register_chain,
        register_audit,
        lambda sp: register_client(sp, default_tokenizer=_base_model_dir),
    ]


def _base_model_dir() -> Path:
    """The base model directory `serve` would load (its tokenizer counts a client's input tokens)."""
    from node.engine.prepare import prepare_model

    return prepare_model(Settings(), progress=True)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="openlora", description="OpenLoRA node: multi-LoRA inference with on-chain attribution.")
    subparsers = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    for register in _command_groups():
        register(subparsers)
    return parser


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors(include_url=False)
        )
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from attribution.errors import AttributionError
    from node.adapters.errors import AdapterError
    from node.adapters.ipfs import IpfsError
    from node.engine import EngineError

    if hasattr(args, "handler"):  # attribution's commands report their own errors and return a status
        return args.handler(args)
    try:
        args.run(args)
    except (EngineError, AdapterError, IpfsError, AttributionError, ValidationError, OSError) as exc:
        print(f"openlora: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
