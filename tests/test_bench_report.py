"""The README's benchmark table is rendered from the benchmarks' stored JSON results, never typed."""

from __future__ import annotations

import importlib.util
import json
import sys

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("bench_report", REPO / "bench" / "report.py")
assert spec is not None and spec.loader is not None
report = importlib.util.module_from_spec(spec)
sys.modules["bench_report"] = report  # dataclasses look their module up there
spec.loader.exec_module(report)


def test_the_readme_table_is_the_rendering_of_the_stored_results():
    readme = (REPO / "README.md").read_text()
    table = readme.split(report.START, 1)[1].split(report.END, 1)[0].strip()
    assert table == report.render(report.stored())


def test_every_benchmark_has_a_row_and_a_stored_result_that_renders():
    results = report.stored()
    for name in report.scripts():
        assert name in report.ROWS, f"bench/{name}.py has no row"
        assert name in results, f"bench/{name}.py has no stored result: run bench/report.py run {name}"
        assert results[name]["benchmark"] == name
        assert report.ROWS[name].result(results[name]["result"])  # the figures it reads are there


def test_table_rewrites_only_the_marked_section(tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    stored = {
        "benchmark": "lora_memory",
        "date": "2026-12-02",
        "cpus": 2,
        "cpu": "Test CPU 9",
        "command": "c",
    }
    figures = {
        "ratio": 3.25,
        "full_mb": 3000.0,
        "lora_mb": 923.1,
        "raw_ratio": 2.2,
        "plain": {"ratio": 2.3},
        "loss_max_abs_diff": {"full": 0.0, "lora": 1e-7},
    }
    (results / "lora_memory.json").write_text(json.dumps({**stored, "result": figures}))
    monkeypatch.setattr(report, "RESULTS", results)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.START}\nold typed table\n{report.END}\noutro\n")
    report.write_table(readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{report.END}\noutro\n")
    assert "old typed table" not in text
    assert "| `bench/lora_memory.py` |" in text and "full/LoRA 3.25 (3,000 MB against 923 MB" in text
    assert "| 2026-12-02, 2 CPUs (Test CPU 9) |" in text  # the figures depend on the CPU model: it is named
    assert "| `bench/sampling.py` |" in text and "not measured" in text
