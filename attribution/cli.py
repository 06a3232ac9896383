"""`openlora chain ...` subcommands. The lead wires `register_cli` into the `openlora` console script:

    openlora chain deploy --rpc-url http://127.0.0.1:8545 --private-key 0x... --out deployments.json

Each subcommand's parser carries `handler`: `sys.exit(args.handler(args))` runs it. Errors print one line
to stderr (`openlora: error: ...`) and return status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from attribution.deploy import DeployConfig, deploy_all
from attribution.errors import AttributionError


def _private_key(value: str) -> str:
    raw = value.removeprefix("0x")
    if len(raw) != 64 or any(ch not in "0123456789abcdefABCDEF" for ch in raw):
        raise argparse.ArgumentTypeError("a private key is 32 bytes of hex")
    return "0x" + raw


def register_cli(subparsers: Any) -> None:
    """Adds the `chain` command group (`chain deploy`) to an argparse subparsers object."""
    chain = subparsers.add_parser("chain", help="on-chain settlement: deploy the contracts")
    commands = chain.add_subparsers(dest="chain_command", required=True)
    deploy = commands.add_parser("deploy", help="deploy OpenToken (or use --token), the registries, the escrow "
                                                "and UsageSettlement; write a deployments JSON")
    deploy.add_argument("--rpc-url", default="http://127.0.0.1:8545", help="JSON-RPC endpoint")
    deploy.add_argument("--private-key", type=_private_key,
                        default="0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
                        help="deployer key (default: anvil's first dev account)")
    deploy.add_argument("--out", type=Path, default=Path("deployments.json"), help="deployments JSON to write")
    defaults = DeployConfig()
    for f in fields(DeployConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("token", "treasury"):
            deploy.add_argument(flag, default=None, help=f"address (default: {'deploy OpenToken' if f.name == 'token' else 'deployer'})")
        else:
            deploy.add_argument(flag, type=int, default=getattr(defaults, f.name), help=f"default {getattr(defaults, f.name)}")
    deploy.set_defaults(handler=_deploy)


def _deploy(args: argparse.Namespace) -> int:
    """Handler of `chain deploy`: returns the exit status; errors print one line on stderr."""
    config = DeployConfig(**{f.name: getattr(args, f.name) for f in fields(DeployConfig)})
    try:
        deployments = asyncio.run(deploy_all(args.rpc_url, args.private_key, config, args.out))
    except (AttributionError, OSError) as exc:
        print(f"openlora: error: {exc}", file=sys.stderr)
        return 1
    print(f"deployed to chain {deployments.chain_id}; wrote {args.out}")
    for name, address in deployments.contracts.items():
        print(f"  {name:<16} {address}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m attribution.cli chain deploy ...`) until `openlora` wires it."""
    parser = argparse.ArgumentParser(prog="openlora")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
