"""scripts/bench_peers.py: the harness around the systems it compares. Its vLLM side needs
.venv-peers (several GB, built by the benchmark itself, not by CI); our engine's worker runs here
for real, against transformers and PEFT as references."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_peers  # noqa: E402
from bench_peers import Run, Worker, agreement, busy_neighbour, system_prompt  # noqa: E402


def test_agreement_counts_identical_requests_and_tokens_before_the_first_difference() -> None:
    ours = [[1, 2, 3], [1, 2, 3], [1, 2, 3]]
    assert agreement(ours, [[1, 2, 3], [1, 2, 3], [1, 2, 3]]) == "3/3 identical, 3 tokens"
    assert agreement(ours, [[9, 2, 3], [9, 2, 3], [9, 2, 3]]) == "0/3 identical, 0 tokens"
    assert agreement(ours, [[1, 2, 9], [1, 9, 3], [1, 2, 3]]) == "1/3 identical, 2 tokens"  # (2 + 1 + 3) / 3


def test_run_rates_and_percentiles() -> None:
    result = {"wall": 2.0, "ttft": [float(t) for t in range(20, 0, -1)], "tokens": [[0] * 5] * 20}
    run = Run.of(result)
    assert run.tok_s == 50.0  # 100 tokens in 2 s
    assert run.ttft_p50 == 10.5
    assert run.ttft_p95 == 19.0  # nearest rank: the 19th of 20
    one = Run.of({"wall": 1.0, "ttft": [0.25], "tokens": [[1, 2]]})
    assert (one.ttft_p50, one.ttft_p95) == (0.25, 0.25)


def test_busy_neighbour_keeps_a_core_busy_and_is_gone_after() -> None:
    def cpu_s(pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, clock ticks

    with busy_neighbour() as proc:
        time.sleep(0.3)
        before = cpu_s(proc.pid)
        time.sleep(0.5)
        assert cpu_s(proc.pid) - before > 0.05  # spinning, not sleeping (a loaded machine gives it less than 0.5)
        assert proc.poll() is None
    assert proc.poll() is not None


def test_busy_neighbour_ends_by_itself_at_its_limit() -> None:
    with busy_neighbour(limit_s=0.2) as proc:
        assert proc.wait(timeout=30) == 0


def test_system_prompt_is_about_the_asked_length(smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    for target in (50, 1000):
        n = len(tokenizer(system_prompt(tokenizer, target))["input_ids"])
        assert target <= n <= target + 60  # one rule more than needed at most
    assert system_prompt(tokenizer, 1000) == system_prompt(tokenizer, 1000)  # the same for both systems


def test_engine_spec_gives_room_for_every_prefix_request(smollm2_dir: Path, tmp_path: Path) -> None:
    adapters = {f"a{i}": tmp_path / f"a{i}" for i in range(3)}
    spec = bench_peers.engine_spec(smollm2_dir, "bfloat16", adapters, bench_peers.FULL, longest=1100)
    assert spec["kv_cache_tokens"] >= 64 * (1100 + 64) and spec["kv_cache_tokens"] % 2048 == 0
    # SmolLM2-135M: 30 layers, 3 KV heads of 64, K and V, bf16
    assert spec["kv_cache_bytes"] == spec["kv_cache_tokens"] * 30 * 2 * 3 * 64 * 2
    assert spec["adapters_dir"] == str(tmp_path) and spec["max_loras"] == 3


def _worker_spec(model_dir: Path, adapter_dir: Path, prompts: list[list[int]]) -> dict:
    return {
        "model": str(model_dir),
        "dtype": "float32",
        "max_num_seqs": 4,
        "max_prefill_tokens": 2048,
        "kv_cache_tokens": 4096,
        "adapters_dir": str(adapter_dir.parent),
        "adapters": {adapter_dir.name: str(adapter_dir)},
        "max_loras": 1,
        "max_lora_rank": 8,
        "warmup": {"prompts": prompts[:1], "adapters": [None], "max_tokens": 2},
        "workloads": {
            "base": {"prompts": prompts, "adapters": [None, None], "max_tokens": 6},
            "mixed": {"prompts": prompts, "adapters": [adapter_dir.name, None], "max_tokens": 6},
        },
    }


@pytest.mark.slow
def test_openlora_worker_serves_the_references_tokens(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from node.adapters.synthetic import make_random_adapter

    adapter = make_random_adapter(tiny_model_dir, tmp_path / "adapters" / "ad0", rank=8, seed=3, std=0.1)
    prompts = [[5, 17, 42, 99, 7], [12, 3, 77]]
    worker = Worker(
        "openlora",
        [sys.executable, str(ROOT / "scripts" / "peer_openlora.py")],
        _worker_spec(tiny_model_dir, adapter, prompts),
        tmp_path,
        {"PYTHONPATH": str(ROOT)},
    )
    try:
        base, mixed = worker.run("base"), worker.run("mixed")
    finally:
        worker.close()
    assert worker.proc.returncode == 0  # shut down cleanly when stdin closed

    def greedy(model, prompt: list[int]) -> list[int]:
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
        return out[0, len(prompt) :].tolist()

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    want_base = [greedy(hf, p) for p in prompts]
    peft = PeftModel.from_pretrained(hf, adapter).eval()
    want_adapter = greedy(peft, prompts[0])
    assert base.tokens == want_base
    assert mixed.tokens == [want_adapter, want_base[1]]
    assert want_adapter != want_base[0]  # the adapter changes the output: the check above can fail
    for run in (base, mixed):
        assert run.tok_s > 0 and 0 < run.ttft_p50 <= run.ttft_p95


@pytest.mark.slow
def test_a_worker_that_fails_is_reported_with_its_log(tiny_model_dir: Path, tmp_path: Path) -> None:
    from node.adapters.synthetic import make_random_adapter

    adapter = make_random_adapter(tiny_model_dir, tmp_path / "adapters" / "ad0", rank=8, seed=3)
    spec = _worker_spec(tiny_model_dir, adapter, [[5, 17, 42]])
    argv = [sys.executable, str(ROOT / "scripts" / "peer_openlora.py")]
    worker = Worker("openlora", argv, spec, tmp_path, {"PYTHONPATH": str(ROOT)})
    with pytest.raises(SystemExit, match=r"(?s)openlora worker exited with status 1.*KeyError: 'nope'"):
        worker.run("nope")
    worker.close()

    with pytest.raises(SystemExit, match=r"(?s)openlora worker exited with status 1.*does not exist"):
        Worker("openlora", argv, {**spec, "model": str(tmp_path / "missing")}, tmp_path, {"PYTHONPATH": str(ROOT)})
