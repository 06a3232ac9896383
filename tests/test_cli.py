"""The `openlora` command: help, argument errors, and `serve` as a real process."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from node.cli import main

OPENLORA = Path(sys.executable).parent / "openlora"  # the console script pyproject declares


def test_console_script_help():
    result = subprocess.run([OPENLORA, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "serve" in result.stdout and "model" in result.stdout


@pytest.mark.parametrize("argv", [["serve", "--help"], ["model", "prepare", "--help"]])
def test_subcommand_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    assert "--model" in capsys.readouterr().out


def test_serve_help_lists_engine_flags(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--host", "--port", "--max-num-seqs", "--num-kv-blocks", "--kv-block-size", "--max-model-len",
                 "--dtype", "--threads"):  # fmt: skip
        assert flag in out
    assert "OPENLORA_PORT" in out


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("argv", [[], ["bogus"], ["serve", "--no-such-flag"], ["model"], ["serve", "--port"]], ids=repr)
def test_usage_errors_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert one_line(capsys.readouterr().err).startswith("openlora")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--model", "/no/such/model"], "model directory /no/such/model does not exist"),
        (["serve", "--port", "eighty"], "--port: Input should be a valid integer"),
        (["serve", "--dtype", "float8"], "--dtype: String should match pattern"),
        (["serve", "--device", "banana"], "--device: String should match pattern"),
        (["serve", "--ipfs-timeout", "0"], "--ipfs-timeout: Input should be greater than 0"),
        (["serve", "--adapters", "/no/such/dir"], "adapter directory /no/such/dir does not exist"),
        (["serve", "--ipfs-gateway", "notaurl"], "gateway 'notaurl' is not an http(s) URL"),
        (["serve", "--ipfs-gateway", "http://127.0.0.1:8080", "--ipfs-gateway", "ftp://x"], "'ftp://x' is not"),
        (["serve", "--ipfs-api-url", "127.0.0.1:5001"], "IPFS API '127.0.0.1:5001' is not an http(s) URL"),
        (["model", "prepare", "--model", "/no/such/model"], "does not exist"),
        (["serve", "--engine", "tgi"], "--engine: Input should be 'openlora' or 'vllm'"),
        (["serve", "--engine-url", "http://10.1.2.3:8000"], "is not on the loopback interface"),
        (["serve", "--engine-url", "127.0.0.1:8000"], "engine URL '127.0.0.1:8000' is not an http(s) URL"),
    ],
)
def test_bad_values_exit_1_with_one_line(argv, message, capsys):
    assert main(argv) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("openlora: error: ") and message in line


def test_vllm_without_its_python_is_one_line(tiny_model_dir, tmp_path, capsys):
    argv = ["serve", "--model", str(tiny_model_dir), "--port", "0", "--cache-dir", str(tmp_path), "--engine", "vllm",
            "--vllm-python", str(tmp_path / "no-python")]  # fmt: skip
    assert main(argv) == 1
    line = one_line(capsys.readouterr().err)
    assert line == f"openlora: error: --vllm-python {tmp_path / 'no-python'} does not exist"


def test_engine_args_repeat_and_keep_their_dashes():
    from node.cli import SERVE_FLAGS, _settings, build_parser

    args = build_parser().parse_args(["serve", "--engine-arg=--enforce-eager", "--engine-arg", "--max-loras 4"])
    assert _settings(args, SERVE_FLAGS).engine_args == ["--enforce-eager", "--max-loras 4"]


def test_flags_override_env_which_overrides_defaults(monkeypatch, capsys):
    monkeypatch.setenv("OPENLORA_PORT", "not-a-port")
    assert main(["serve", "--model", "/no/such/model"]) == 1
    assert "--port" in capsys.readouterr().err  # the env var was read
    assert main(["serve", "--port", "0", "--model", "/no/such/model"]) == 1
    assert "does not exist" in capsys.readouterr().err  # the flag won over the env var


def test_model_prepare_with_a_model_dir_prints_it(tiny_model_dir, capsys):
    assert main(["model", "prepare", "--model", str(tiny_model_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(tiny_model_dir)


def test_serve_answers_health_and_stops_cleanly_on_sigterm(tiny_model_dir):
    proc = subprocess.Popen(
        [OPENLORA, "serve", "--model", str(tiny_model_dir), "--port", "0", "--served-model-name", "tiny"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = None
        deadline = time.monotonic() + 120
        log = []
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line, f"serve exited early: {''.join(log)}"
            log.append(line)
            if match := re.search(r"serving tiny at (http://\S+)", line):
                url = match.group(1)
        assert url is not None, "".join(log)
        with urllib.request.urlopen(f"{url}/health", timeout=10) as resp:
            assert resp.status == 200
            assert json.loads(resp.read())["status"] == "ok"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert "shutting down" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


@pytest.mark.slow
def test_model_prepare_bundled_model(smollm2_dir):
    result = subprocess.run([OPENLORA, "model", "prepare"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == smollm2_dir
    assert (smollm2_dir / "config.json").is_file()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_serve_on_cuda_without_cuda_is_one_line(capsys):
    assert main(["serve", "--device", "cuda"]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("openlora: error: --device") and "CUDA is not available" in line
