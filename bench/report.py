"""Run the benchmarks, keep their JSON results, and write the README's benchmark table from them.

Every script under bench/ prints one JSON object as its last line. `run` executes the named scripts (all of
them by default), stores each one's object in `bench/results/NAME.json` (with the date, the command and
the machine's CPU count), then rewrites the table; `table` only rewrites the table from the stored
results. The README's table sits between two markers and is never typed by hand: a test renders it from
the stored results and compares (`tests/test_bench_report.py`).

    .venv/bin/python bench/report.py run [NAME ...]   # e.g. run lora_memory generation_limit
    .venv/bin/python bench/report.py table

How each result reads in the table (what it measures, the figure, the target) is defined once, in `ROWS`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
README = REPO / "README.md"
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


@dataclass(frozen=True)
class Row:
    measures: str
    result: Callable[[dict[str, Any]], str]
    target: str


def _num(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


ROWS: dict[str, Row] = {
    "sft_overhead": Row(
        "SFT through `rlhf run` against the same `SFTTrainer` call written directly",
        lambda r: (
            f"ours/direct {r['ratio']:.2f} ({r['ours_s']:.1f} s against {r['direct_s']:.1f} s; "
            f"CPU time {r['cpu_ratio']:.2f})"
        ),
        "<= 1.05",
    ),
    "sampling": Row(
        "the `sample` stage (batched, left padding, KV cache) against one prompt at a time, demo model",
        lambda r: (
            f"speedup {r['speedup']:.1f}x ({_num(r['tokens_per_s'])} new tokens/s; K={r['k']}, "
            f"{r['prompts']} prompts)"
        ),
        ">= 5",
    ),
    "generation_limit": Row(
        "new tokens/s of batched sampling (batch 32, 64 tokens) against the memory-bandwidth bound measured in "
        "the same run",
        lambda r: (
            "; ".join(
                f"{model} {precision} {_num(rate)} tokens/s = {r['fraction_of_bound'][model][precision]:.2f} of bound"
                for model, rates in r["tokens_per_second"].items()
                for precision, rate in rates.items()
            )
            + f" ({r['bandwidth_gb_s']:.1f} GB/s, {r['threads']} threads)"
        ),
        "reported",
    ),
    "lora_memory": Row(
        "training memory of full fine-tuning against LoRA through the SFT stage's trainer (chunked loss, "
        "gradient checkpointing), 110M-parameter Llama, float32, batch 1 x 128",
        lambda r: (
            f"full/LoRA {r['ratio']:.2f} ({_num(r['full_mb'])} MB against {_num(r['lora_mb'])} MB; whole "
            f"processes {r['raw_ratio']:.2f}; without the memory settings {r['plain']['ratio']:.2f}; largest "
            f"loss difference {max(r['loss_max_abs_diff'].values()):.1e})"
        ),
        ">= 3",
    ),
    "reward_seeds": Row(
        "the demo's reward model on three draws of the simulated rankings (three annotator seeds)",
        lambda r: (
            "held-out accuracy "
            + ", ".join(f"{a:.3f}" for a in r["accuracies"])
            + f" (seeds {', '.join(map(str, r['seeds']))}; "
            + f"{', '.join(map(str, r['held_out_pairs']))} held-out pairs"
            + (
                "; right against wrong "
                + ", ".join(f"{a:.3f}" for a in r["accuracy_correct_vs_wrong"])
                + ", two wrong answers "
                + ", ".join(f"{a:.3f}" for a in r["accuracy_wrong_vs_wrong"])
                if r.get("accuracy_wrong_vs_wrong")
                else ""
            )
            + ")"
        ),
        ">= 0.93 each",
    ),
    "active_selection": Row(
        "`annotate`'s `select: {by: disagreement}` against a random choice of as many records, on the demo",
        lambda r: (
            f"reward-model held-out accuracy {r['rm_accuracy_selected']:.3f} (spread {r['spread_selected']:.3f}) "
            f"against {r['rm_accuracy_random']:.3f} (spread {r['spread_random']:.3f}); {r['budget']} records on a "
            f"start of {r['start']} ({r['rm_accuracy_start']:.3f}), seeds {', '.join(map(str, r['seeds']))}"
        ),
        "selected above random by more than the seed spread",
    ),
    "argilla_io": Row(
        "push 1,000 records; collect 1,000 ranked records; an annotator's pending queue with 10,000 records",
        lambda r: (
            f"{r['push_1000_s']:.2f} s; {r['collect_1000_s']:.2f} s; {r['queue_query_ms_10000']:.0f} ms"
        ),
        "<= 5 s; <= 2 s; <= 100 ms",
    ),
    "ppo_vs_trl": Row(
        "our PPO step against TRL's `PPOTrainer` on the same tiny setup (TRL in its own throwaway venv)",
        lambda r: (
            f"ours/TRL {r['ratio']:.2f} ({r['ours_step_s']:.2f} s against {r['trl_step_s']:.2f} s "
            f"per update of {r['episodes_per_update']} episodes)"
        ),
        "<= 1.0",
    ),
    "vllm_sampling": Row(
        "the `sample` stage with `engine: vllm` against `engine: hf` on SmolLM2-135M-Instruct (same prompts, K "
        "and lengths), and their log-probabilities in float32",
        lambda r: (
            f"vLLM/HF {r['ratio']:.2f} for an adapter policy ({_num(r['tokens_per_s']['adapter/vllm'])} against "
            f"{_num(r['tokens_per_s']['adapter/hf'])} new tokens/s; served merged), {r['ratio_base']:.2f} on the "
            f"base model, {r['ratio_lora']:.2f} with the adapter as a LoRA in the server; {r['precision']}, "
            f"{r['prompts']} prompts x {r['k']} x {r['max_new_tokens']} tokens; largest float32 log-probability "
            f"difference {r['parity_max_abs_logprob']:.1e}"
        ),
        "parity <= 1e-3; ratio reported (GPU: the point)",
    ),
    "instructions_calibration": Row(
        "the `instructions` task's constraint types on SmolLM2-135M-Instruct, as published",
        lambda r: f"{r['prompts']} prompts, {len(r) - 2} constraint types",
        "reported",
    ),
}


def scripts() -> list[str]:
    return sorted(p.stem for p in BENCH.glob("*.py") if p.stem != "report")


def run(name: str) -> dict[str, Any]:
    """Run one benchmark script (its output streams through) and store its last line's JSON object."""
    command = [sys.executable, str(BENCH / f"{name}.py")]
    process = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=REPO, check=False)
    sys.stdout.write(process.stdout)
    lines = process.stdout.strip().splitlines()
    if process.returncode != 0 or not lines:
        raise SystemExit(f"bench/{name}.py failed (exit {process.returncode})")
    stored = {
        "benchmark": name,
        "date": datetime.date.today().isoformat(),
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "command": f"python bench/{name}.py",
        "result": json.loads(lines[-1]),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(stored, indent=1) + "\n")
    return stored


def cpu_model() -> str:
    """The CPU's model name (`/proc/cpuinfo`; else `platform.processor()`): the demo's figures depend on it."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def stored() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}


def render(results: dict[str, dict[str, Any]]) -> str:
    """The README's table: one row per benchmark script, from its stored result (or "not measured")."""
    lines = ["| benchmark | measures | result | target | measured |", "| --- | --- | --- | --- | --- |"]
    for name in scripts():
        row = ROWS.get(name)
        if row is None:
            raise SystemExit(f"bench/{name}.py has no row in bench/report.py ROWS: add one")
        entry = results.get(name)
        figure = row.result(entry["result"]) if entry else "not measured"
        when = f"{entry['date']}, {entry['cpus']} CPUs" if entry else "-"
        if entry and entry.get("cpu"):
            when += f" ({entry['cpu']})"
        lines.append(f"| `bench/{name}.py` | {row.measures} | {figure} | {row.target} | {when} |")
    return "\n".join(lines)


def write_table(readme: Path = README) -> None:
    text = readme.read_text()
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    readme.write_text(f"{before}{START}\n{render(stored())}\n{END}{after}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["run", "table"])
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: every script under bench/)")
    args = parser.parse_args()
    if args.action == "run":
        for name in args.names or scripts():
            if name not in scripts():
                raise SystemExit(f"no benchmark bench/{name}.py (benchmarks: {', '.join(scripts())})")
            print(f"== bench/{name}.py", flush=True)
            run(name)
    write_table()


if __name__ == "__main__":
    main()
