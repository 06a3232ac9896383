"""`openlora client chat|completions`: one paid request from the command line.

    openlora client chat --node-url http://127.0.0.1:8000 --model SmolLM2-135M-Instruct \\
        --key-env PAYER_KEY [--stream] [--max-tokens N] [--max-charge WEI] "What is the capital of France?"

The answer goes to stdout (streamed as it arrives with --stream); one line on stderr summarises the
verified usage record (charge, tokens). Any error is one line on stderr (`openlora: error: ...`), exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attribution.caps import CapLedger, default_state_path
from attribution.errors import ClientError, RequestBuildError

if TYPE_CHECKING:  # the client imports openai (~1 s): only the client commands pay for it
    from attribution.client import Answer


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is less than {low}")
        return value

    return parse


def register_cli(subparsers: Any, default_tokenizer: Callable[[], Path] | None = None) -> None:
    """Adds `client chat` and `client completions`. `default_tokenizer` finds the base model directory
    whose tokenizer counts input tokens when --tokenizer is not given (the node's CLI passes its own)."""
    client = subparsers.add_parser("client", help="send a paid, signed request to a node and verify its usage record")
    commands = client.add_subparsers(title="commands", required=True, metavar="COMMAND")
    for name, what in (
        ("chat", "a chat completion (the prompt is one user message)"),
        ("completions", "a text completion"),
    ):
        cmd = commands.add_parser(name, help=what)
        cmd.add_argument("prompt", help="the prompt text")
        cmd.add_argument("--node-url", default="http://127.0.0.1:8000", help="the node's base URL")
        cmd.add_argument("--model", required=True, help="a model name from the node's /v1/models")
        key = cmd.add_mutually_exclusive_group(required=True)
        key.add_argument("--key-file", type=Path, help="file holding the payer's (or an authorised signer's) hex key")
        key.add_argument("--key-env", metavar="VAR", help="environment variable holding that hex key")
        cmd.add_argument("--payer", help="payer address when the key is an authorised signer (default: the key's)")
        cmd.add_argument("--system", help="a system message before the prompt (chat only)")
        cmd.add_argument("--stream", action="store_true", help="print the answer as it is generated")
        cmd.add_argument("--max-tokens", type=_int_at_least(1), help="output token cap (default: 256)")
        cmd.add_argument("--max-charge", type=_int_at_least(1), help="charge cap in OPEN wei (default: prices x caps)")
        cmd.add_argument(
            "--node-fee", type=_int_at_least(0), help="node fee per token in wei (default: what the node advertises)"
        )
        cmd.add_argument(
            "--ttl",
            type=_int_at_least(1),
            help="seconds until the request expires (default: 60, at most the node's maxRequestTtl)",
        )
        cmd.add_argument("--tokenizer", type=Path, help="the node's base model directory (default: the bundled model)")
        cmd.add_argument("--state-file", type=Path, default=default_state_path(), help="cumulativeCap counters")
        cmd.set_defaults(handler=lambda args, kind=name: _run(args, kind, default_tokenizer))


def read_key(args: argparse.Namespace) -> str:
    """The hex private key from --key-file or --key-env; RequestBuildError when it is absent or not a key."""
    if args.key_file is not None:
        try:
            text = args.key_file.read_text().strip()
        except OSError as exc:
            raise RequestBuildError(f"cannot read the key file {args.key_file}: {exc.strerror}") from None
        source = f"the key file {args.key_file}"
    else:
        text = os.environ.get(args.key_env, "").strip()
        if not text:
            raise RequestBuildError(f"the environment variable {args.key_env} is not set or empty")
        source = f"${args.key_env}"
    raw = text.removeprefix("0x")
    if len(raw) != 64 or any(ch not in "0123456789abcdefABCDEF" for ch in raw):
        raise RequestBuildError(f"{source} does not hold a private key (0x and 64 hex digits)")
    return "0x" + raw


def _run(args: argparse.Namespace, kind: str, default_tokenizer: Callable[[], Path] | None) -> int:
    """Handler: returns the exit status; every error is one line on stderr."""
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # not one INFO line per HTTP call
    try:
        if kind == "completions" and args.system is not None:
            raise RequestBuildError("--system is for chat; a completion has no system message")
        if args.tokenizer is None and default_tokenizer is None:
            raise RequestBuildError("give --tokenizer: the node's base model directory")
        tokenizer = args.tokenizer if args.tokenizer is not None else default_tokenizer()  # type: ignore[misc]
        answer = asyncio.run(_send(args, kind, read_key(args), tokenizer))
    except (ClientError, OSError, ValueError) as exc:
        print(f"openlora: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(f"openlora: {answer.summary()}", file=sys.stderr)
    return 0


async def _send(args: argparse.Namespace, kind: str, key: str, tokenizer: Path) -> Answer:
    from attribution.client import DEFAULT_MAX_TOKENS, DEFAULT_TTL, OpenLoRAClient

    async with OpenLoRAClient(
        args.node_url,
        key,
        tokenizer=tokenizer,
        payer=args.payer,
        ledger=CapLedger(args.state_file),
        ttl=args.ttl or DEFAULT_TTL,
        node_fee_per_token=args.node_fee,
    ) as client:
        caps = {"max_tokens": args.max_tokens or DEFAULT_MAX_TOKENS, "max_charge": args.max_charge}
        system = [{"role": "system", "content": args.system}] if args.system else []
        messages = [*system, {"role": "user", "content": args.prompt}]
        if not args.stream:
            if kind == "chat":
                answer = await client.chat(args.model, messages, **caps)
            else:
                answer = await client.completion(args.model, args.prompt, **caps)
            print(answer.text)
            return answer
        if kind == "chat":
            stream = client.stream_chat(args.model, messages, **caps)
        else:
            stream = client.stream_completion(args.model, args.prompt, **caps)
        async for delta in stream:
            print(delta, end="", flush=True)
        print()
        assert stream.answer is not None, "a stream that ends without an error has a verified answer"
        return stream.answer
