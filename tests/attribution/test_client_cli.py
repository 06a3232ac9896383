"""`openlora client chat|completions`: bad input is one clear line (exit 1; argparse usage errors exit 2),
and a node that takes no paid requests (a real node without a chain) is reported as such."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.cli import main
from tests.api.conftest import serve_node

KEY = "0x" + "11" * 32


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "payer.key"
    path.write_text(KEY + "\n")
    return path


@pytest.fixture(scope="module")
def nowhere() -> Iterator[str]:
    """A URL where nothing listens: its port stays bound (never listening) by this module, so no server
    started meanwhile can take it (a port probed free and let go could be anybody's by the time it is used)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{held.getsockname()[1]}"


def base(tmp_path: Path, tokenizer: Path, node_url: str) -> list[str]:
    return ["--node-url", node_url, "--model", "m", "--tokenizer", str(tokenizer),
            "--state-file", str(tmp_path / "caps.json")]  # fmt: skip


@pytest.mark.parametrize("command", ["chat", "completions"])
def test_help_lists_the_flags(command, capsys):
    code, out, _ = run(["client", command, "--help"], capsys)
    assert code == 0
    for flag in ("--node-url", "--model", "--key-file", "--key-env", "--stream", "--max-tokens", "--max-charge"):
        assert flag in out


@pytest.mark.parametrize(
    "argv",
    [
        ["client", "chat", "--model", "m", "--key-env", "K"],  # no prompt
        ["client", "chat", "--key-env", "K", "hi"],  # no --model
        ["client", "chat", "--model", "m", "hi"],  # no key
        ["client", "chat", "--model", "m", "--key-env", "K", "--key-file", "f", "hi"],  # two keys
        ["client", "chat", "--model", "m", "--key-env", "K", "--max-tokens", "0", "hi"],
        ["client", "chat", "--model", "m", "--key-env", "K", "--max-charge", "ten", "hi"],
        ["client", "completions", "--model", "m", "--key-env", "K", "--node-fee", "-1", "hi"],
    ],
    ids=["no prompt", "no model", "no key", "two keys", "max-tokens 0", "max-charge ten", "negative fee"],
)
def test_usage_errors_exit_2(argv, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2
    assert "openlora client" in err


def test_an_unset_key_variable(tmp_path, tiny_model_dir, nowhere, capsys, monkeypatch):
    monkeypatch.delenv("OPENLORA_TEST_KEY", raising=False)
    code, out, err = run(["client", "chat", *base(tmp_path, tiny_model_dir, nowhere), "--key-env", "OPENLORA_TEST_KEY", "hi"],
                         capsys)  # fmt: skip
    assert (code, out) == (1, "")
    assert one_line(err) == "openlora: error: the environment variable OPENLORA_TEST_KEY is not set or empty"


@pytest.mark.parametrize("content", ["", "0x1234", "11" * 31 + "zz", '{"crypto": {}}'])
def test_a_key_file_without_a_key(tmp_path, tiny_model_dir, nowhere, capsys, content):
    path = tmp_path / "bad.key"
    path.write_text(content)
    code, _, err = run(
        ["client", "chat", *base(tmp_path, tiny_model_dir, nowhere), "--key-file", str(path), "hi"], capsys
    )
    assert code == 1
    assert one_line(err) == f"openlora: error: the key file {path} does not hold a private key (0x and 64 hex digits)"


def test_a_missing_key_file(tmp_path, tiny_model_dir, nowhere, capsys):
    missing = tmp_path / "nope.key"
    code, _, err = run(
        ["client", "chat", *base(tmp_path, tiny_model_dir, nowhere), "--key-file", str(missing), "hi"], capsys
    )
    assert code == 1
    assert one_line(err) == f"openlora: error: cannot read the key file {missing}: No such file or directory"


def test_a_system_message_on_completions(tmp_path, tiny_model_dir, nowhere, key_file, capsys):
    argv = [
        "client",
        "completions",
        *base(tmp_path, tiny_model_dir, nowhere),
        "--key-file",
        str(key_file),
        "--system",
        "x",
        "hi",
    ]
    code, _, err = run(argv, capsys)
    assert code == 1
    assert "--system is for chat" in one_line(err)


def test_an_unreachable_node(tmp_path, tiny_model_dir, nowhere, key_file, capsys):
    code, out, err = run(
        ["client", "chat", *base(tmp_path, tiny_model_dir, nowhere), "--key-file", str(key_file), "hi"], capsys
    )
    assert (code, out) == (1, "")
    assert one_line(err).startswith(f"openlora: error: cannot reach the node at {nowhere}")
    assert not (tmp_path / "caps.json").exists()  # nothing was allocated


async def test_a_node_without_a_chain_takes_no_paid_requests(tmp_path, tiny_model_dir, key_file, capsys):
    async with serve_node(tiny_model_dir) as node:  # a real node; the CLI runs in a thread beside its loop
        argv = ["client", "chat", "--node-url", node.url, "--model", "tiny", "--key-file", str(key_file),
                "--tokenizer", str(tiny_model_dir), "--state-file", str(tmp_path / "caps.json"), "hi"]  # fmt: skip
        code, out, err = await asyncio.to_thread(run, argv, capsys)
    assert (code, out) == (1, "")
    assert one_line(err) == (
        f"openlora: error: the node at {node.url} takes no paid requests (no /v1/attribution): without a chain it "
        "serves unsigned requests for free"
    )
