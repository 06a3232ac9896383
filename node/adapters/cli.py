"""`openlora adapter publish | inspect | prefetch`: content-addressed adapters from the shell.

Which IPFS node: `--ipfs-api-url` / `--ipfs-gateway` (or OPENLORA_IPFS_API_URL / _GATEWAYS) when
given; else the local node of a running `openlora serve` (found through its repo's endpoints
file); else a local node started for the command over the same repo, so what is published now is
served later.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from node.adapters.errors import AdapterError, InvalidAdapterError
from node.adapters.ipfs import KuboRpcClient, LocalIpfsNode, fetch_verified, import_directory
from node.adapters.ipfs_source import DiskCache, IpfsAdapterSource, parse_adapter_cid, read_index
from node.adapters.peft_format import CONFIG_FILE, BaseModelShape, LoraAdapter, load_adapter, read_config
from node.adapters.sources import ADAPTER_NAME
from node.config import Settings

_FLAGS = ("cache_dir", "ipfs_api_url", "model", "max_lora_rank", "max_adapter_bytes", "adapter_index")


def register_cli(subparsers: argparse._SubParsersAction, add_flags) -> None:
    adapter = subparsers.add_parser("adapter", help="publish, inspect and prefetch content-addressed adapters")
    commands = adapter.add_subparsers(title="commands", required=True, metavar="COMMAND")

    publish = commands.add_parser("publish", help="validate a PEFT adapter directory, add it to IPFS, print its CID")
    publish.add_argument("directory", type=Path)
    publish.add_argument("--name", help="also map NAME to the CID in the node's adapter index")
    publish.add_argument("--no-validate", action="store_true", help="skip the check against the base model")
    _common(publish, add_flags)
    publish.set_defaults(run=lambda args: asyncio.run(_publish(args)))

    inspect = commands.add_parser("inspect", help="fetch and verify an adapter by CID or name, print what it is")
    inspect.add_argument("cid", help="CID, ipfs://CID, or a name in the adapter index")
    _common(inspect, add_flags)
    inspect.set_defaults(run=lambda args: asyncio.run(_inspect(args)))

    prefetch = commands.add_parser("prefetch", help="fetch and verify an adapter into the node's disk cache")
    prefetch.add_argument("cid", help="CID, ipfs://CID, or a name in the adapter index")
    _common(prefetch, add_flags)
    prefetch.set_defaults(run=lambda args: asyncio.run(_prefetch(args)))


def _common(parser: argparse.ArgumentParser, add_flags) -> None:
    add_flags(parser, _FLAGS)
    parser.add_argument(
        "--ipfs-gateway", action="append", dest="ipfs_gateways", default=argparse.SUPPRESS, metavar="URL",
        help="trustless gateway to fetch from (repeatable; env OPENLORA_IPFS_GATEWAYS as a JSON list)",
    )  # fmt: skip


def _settings(args: argparse.Namespace) -> Settings:
    names = (*_FLAGS, "ipfs_gateways")
    return Settings(**{n: getattr(args, n) for n in names if hasattr(args, n)})


@asynccontextmanager
async def ipfs_endpoints(settings: Settings) -> AsyncIterator[tuple[str | None, list[str]]]:
    """(RPC API URL, gateways): configured, a running local node's, or a local node started now."""
    if settings.ipfs_gateways or settings.ipfs_api_url:
        yield settings.ipfs_api_url, list(settings.ipfs_gateways)
        return
    running = await LocalIpfsNode.running_endpoints(settings.ipfs_repo)
    if running:
        yield running["api"], [running["gateway"]]
        return
    async with LocalIpfsNode(settings.ipfs_repo) as node:
        yield node.api_url, [node.gateway_url]


def base_shape(settings: Settings) -> BaseModelShape:
    """The served base model's dimensions, from its config (no weights loaded)."""
    from node.engine.prepare import served_base_shape  # the command needs the model; the package does not

    return served_base_shape(settings, progress=True)


def _validate(settings: Settings, directory: Path, name: str, base: BaseModelShape | None = None) -> LoraAdapter:
    base = base or base_shape(settings)
    return load_adapter(directory, name, base, settings.max_lora_rank, max_bytes=settings.max_adapter_bytes)


def _index_file(settings: Settings) -> Path:
    return settings.adapter_index or settings.default_adapter_index


async def _publish(args: argparse.Namespace) -> None:
    settings = _settings(args)
    directory: Path = args.directory
    if not directory.is_dir():
        raise AdapterError(f"{directory} does not exist or is not a directory")
    if not (directory / CONFIG_FILE).is_file():
        raise InvalidAdapterError(f"{directory} is not a PEFT adapter directory ({CONFIG_FILE} missing)", "missing")
    console = Console(stderr=True, soft_wrap=True)
    if args.name is not None:
        _check_name(args.name)
    if not args.no_validate:
        base = base_shape(settings)
        if args.name in (base.name, *base.aliases):
            raise AdapterError(f"--name {args.name!r} is the base model's name")
        adapter = _validate(settings, directory, directory.name, base)
        console.print(f"valid: rank {adapter.rank}, targets {', '.join(adapter.target_modules)}")
    dag = await asyncio.to_thread(import_directory, directory)
    async with ipfs_endpoints(settings) as (api_url, _):
        if api_url is None:
            raise AdapterError("publishing needs an IPFS RPC API: pass --ipfs-api-url (Kubo's, port 5001)")
        with Progress(
            "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            console=console, transient=True,
        ) as progress:  # fmt: skip
            task = progress.add_task("importing into IPFS", total=dag.dag_size)

            def chunks() -> Iterator[bytes]:
                for chunk in dag.car_chunks():
                    progress.advance(task, len(chunk))
                    yield chunk

            async with KuboRpcClient(api_url) as client:
                await client.dag_import(chunks())
                await client.pin_add(dag.root)
    cid = str(dag.root)
    if args.name:
        index_file = _index_file(settings)
        add_to_index(index_file, args.name, cid)
        console.print(f"indexed {args.name!r} -> {cid} in {index_file}")
    print(cid)


def add_to_index(index_file: Path, name: str, cid: str) -> None:
    """Maps `name` to `cid` in the node's adapter index (atomically: a serving node may be reading it)."""
    _check_name(name)
    index = _read_index(index_file)
    index[name] = cid
    index_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".index-", dir=index_file.parent)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, index_file)


def _check_name(name: str) -> None:
    if parse_adapter_cid(name) is not None or name.startswith("ipfs://"):
        raise AdapterError(f"--name {name!r} looks like a CID: an adapter's CID already names it")
    if not ADAPTER_NAME.match(name):
        raise AdapterError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (up to 128, not first)")


def _read_index(index_file: Path) -> dict[str, str]:
    if not index_file.is_file():
        return {}
    try:
        return read_index(index_file)
    except ValueError as exc:
        raise AdapterError(str(exc)) from None


def _resolve(settings: Settings, name: str) -> str:
    cid = parse_adapter_cid(name) or _read_index(_index_file(settings)).get(name)
    if cid is None:
        raise AdapterError(f"{name!r} is neither a CID nor a name in the adapter index {_index_file(settings)}")
    return cid


async def _inspect(args: argparse.Namespace) -> None:
    settings = _settings(args)
    cid = _resolve(settings, args.cid)
    async with ipfs_endpoints(settings) as (_, gateways):
        with tempfile.TemporaryDirectory(prefix="openlora-inspect-") as tmp:
            path = await fetch_verified(
                cid, gateways, Path(tmp), max_bytes=settings.max_adapter_bytes, timeout=settings.ipfs_timeout
            )
            _print_adapter(settings, cid, path)


def _print_adapter(settings: Settings, cid: str, path: Path) -> None:
    """Describe the verified adapter; raises InvalidAdapterError (exit status 1) after the table
    when this node would refuse it."""
    table = Table(title=f"adapter {cid}", show_header=False)
    if path.is_file():
        table.add_row("verified", f"a single file of {path.stat().st_size} bytes, every block")
        Console().print(table)
        raise InvalidAdapterError(f"{cid} is a single file; an adapter is a directory ({CONFIG_FILE}, weights)")
    files = sorted(f for f in path.rglob("*") if f.is_file())
    table.add_row("verified", f"{len(files)} files, {sum(f.stat().st_size for f in files)} bytes, every block")
    for f in files:
        table.add_row("  " + str(f.relative_to(path)), f"{f.stat().st_size} bytes")
    cfg = read_config(path, cid) if (path / CONFIG_FILE).is_file() else {}
    for key in ("base_model_name_or_path", "r", "lora_alpha", "use_rslora", "target_modules", "peft_version"):
        if key in cfg:
            table.add_row(key, str(cfg[key]))
    try:
        adapter = _validate(settings, path, cid)
    except InvalidAdapterError as exc:
        table.add_row("valid for this node", f"NO: {exc}")
        Console().print(table)
        raise
    table.add_row("valid for this node", f"yes: rank {adapter.rank}, scale {adapter.scale:g}")
    Console().print(table)


async def _prefetch(args: argparse.Namespace) -> None:
    settings = _settings(args)
    cid = _resolve(settings, args.cid)
    async with ipfs_endpoints(settings) as (_, gateways):
        source = IpfsAdapterSource(
            gateways,
            DiskCache(settings.adapter_cache_dir, settings.adapter_cache_bytes),
            max_adapter_bytes=settings.max_adapter_bytes,
            timeout=settings.ipfs_timeout,
        )
        path = await source.fetch(cid)
    _validate(settings, path, cid)
    print(path)
