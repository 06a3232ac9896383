"""scripts/bench_engines.py: its workload and its report. The systems it measures (the node on each
engine, vLLM alone) run in the slow suite's vLLM tests; here, the arithmetic of the result line."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_engines import SERVED, Run, Sizes, bodies, median, report  # noqa: E402


def test_workload_round_robin_over_the_adapters_and_the_base_model() -> None:
    requests = bodies(Sizes(7, 2, 5, 1), ["a", "b"])
    assert [r["model"] for r in requests] == ["a", "b", SERVED, "a", "b", SERVED, "a"]
    assert all(r["max_tokens"] == 5 and r["ignore_eos"] and r["temperature"] == 0 and r["stream"] for r in requests)
    assert len({r["messages"][0]["content"] for r in requests}) == 7  # no two prompts alike


def test_median_of_each_column() -> None:
    runs = [Run(10, 1, 3), Run(30, 2, 1), Run(20, 9, 2)]
    assert median(runs) == Run(20, 2, 2)


def test_report_ends_with_the_overhead_of_the_node_in_front_of_vllm(capsys) -> None:
    runs = {
        "openlora": [Run(50.0, 0.5, 0.7)],
        "vllm": [Run(100.0, 1.0, 1.5), Run(80.0, 1.2, 1.6), Run(120.0, 0.9, 1.1)],  # median 100
        "node+vllm": [Run(96.0, 1.1, 1.6)],
    }
    report(runs, "header")
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "RESULT node_overhead_vs_vllm=0.040"
    assert lines[2].split() == ["openlora", "50.0", "0.50s", "0.70s", "0.50"]
    assert lines[3].split() == ["node+vLLM", "96.0", "1.10s", "1.60s", "0.96"]
    assert lines[4].split() == ["vLLM", "alone", "100.0", "1.00s", "1.50s", "1.00"]
