"""Does choosing what annotators see teach the reward model more than a random choice, for the same budget?

On the demo's samples (a `make demo` store: `sample:latest`, `pretrain:latest`): a seeded fifth of the
prompts becomes a fixed held-out set, ranked once; the rest is the pool. For each seed, through `rlhf run`
as a user runs it: a first reward model learns from `--start` records drawn at random from the pool; then
`--budget` more records are chosen from what is left, once at random and once by the disagreement of an
ensemble of reward heads over that first model (`annotate`'s `select`, `annotation/selection.py`), ranked
by the simulated annotators, and a reward model is trained on the start and the new pairs of each arm
with the demo's reward settings. Both are scored on the same held-out pairs.

    .venv/bin/python bench/active_selection.py [--seeds 0 1 2] [--start 100] [--budget 200] [--store DIR]

Everything runs in a temporary copy of the store with an embedded Argilla of its own. Prints one JSON
object as its last line: {"rm_accuracy_random": mean, "rm_accuracy_selected": mean, "budget": ...,
"per_seed": [...], "spread_random": ..., "spread_selected": ...}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
HELD_OUT_FRACTION = 0.2


def split_samples(store_dir: Path) -> None:
    """Publish `pool` and `heldout` sample artifacts: the demo samples' prompts split by a hash."""
    sys.path.insert(0, str(REPO))
    from pipeline.store import Store

    store = Store(store_dir)
    sample = store.get("sample:latest")
    lines = (sample.path / "samples.jsonl").read_text().splitlines()
    parts: dict[str, list[str]] = {"pool": [], "heldout": []}
    for line in lines:
        digest = hashlib.sha256(json.loads(line)["id"].encode()).digest()
        held = int.from_bytes(digest[:8], "big") / 2**64 < HELD_OUT_FRACTION
        parts["heldout" if held else "pool"].append(line)
    for name, rows in parts.items():
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / name
            folder.mkdir()
            (folder / "samples.jsonl").write_text("\n".join(rows) + "\n")
            shutil.copy(sample.path / "generation.json", folder / "generation.json")
            store.publish(name, folder, {"kind": "samples", "status": "ok"})


def workflow(seed: int, start: int, budget: int) -> dict:
    demo = yaml.safe_load((REPO / "workflows" / "demo.yaml").read_text())
    annotate = {"annotators_per_record": 3, "simulate": {"annotators": 3, "noise": 0.1}}
    reward = {**demo["stages"]["reward"]["config"], "min_accuracy": 0.0}

    def arm(name: str, select: dict, inputs: dict) -> dict:
        return {
            f"annotate_{name}": {
                "kind": "annotate",
                "inputs": {"samples": "pool:latest", **inputs},
                "config": {
                    **annotate,
                    "dataset": f"active-{name}-{seed}",
                    "select": {**select, "seed": seed},
                },
            },
            f"collect_{name}": {
                "kind": "collect",
                "inputs": {"batch": f"annotate_{name}", **({"previous": "collect_start"} if inputs else {})},
            },
            f"reward_{name}": {
                "kind": "reward",
                "inputs": {"model": "pretrain:latest", "preferences": f"collect_{name}"},
                "config": reward,
            },
        }

    stages = {
        "annotate_heldout": {
            "kind": "annotate",
            "inputs": {"samples": "heldout:latest"},
            "config": {**annotate, "dataset": "active-heldout"},
        },
        "collect_heldout": {"kind": "collect", "inputs": {"batch": "annotate_heldout"}},
        **arm("start", {"budget": start, "by": "random"}, {}),
        **arm("random", {"budget": budget, "by": "random"}, {"previous": "collect_start"}),
        **arm(
            "selected",
            {"budget": budget, "by": "disagreement"},
            {"previous": "collect_start", "reward": "reward_start"},
        ),
    }
    return {"name": f"active-selection-{seed}", "task": demo["task"], "stages": stages}


def accuracy(reward_dir: Path, pairs_dir: Path) -> float:
    """Pairwise accuracy of a reward model on preference pairs."""
    from common.data import load_preferences
    from common.reward_model import load_reward_model, score_batch

    model, tokenizer = load_reward_model(reward_dir)
    rows = load_preferences(pairs_dir, "bench", 0.0).rows
    prompts = [r["prompt"] for r in rows]
    chosen = score_batch(model, tokenizer, prompts, [r["chosen"] for r in rows], batch_size=128)
    rejected = score_batch(model, tokenizer, prompts, [r["rejected"] for r in rows], batch_size=128)
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--start", type=int, default=100)
    parser.add_argument("--budget", type=int, default=200)
    parser.add_argument("--store", type=Path, default=Path(os.environ.get("RLHF_STORE", "artifacts")))
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from annotation import server
    from pipeline.store import Store

    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    for var in ("ARGILLA_API_URL", "ARGILLA_API_KEY", "RLHF_STORE", "RLHF_RUNS", "RLHF_ARGILLA_HOME"):
        env.pop(var, None)
    per_seed = []
    with tempfile.TemporaryDirectory(prefix="active-selection-") as tmp:
        work = Path(tmp)
        shutil.copytree(args.store, work / "artifacts", symlinks=True)
        split_samples(work / "artifacts")
        try:
            for seed in args.seeds:
                file = work / f"active-{seed}.yaml"
                file.write_text(yaml.safe_dump(workflow(seed, args.start, args.budget), sort_keys=False))
                done = subprocess.run(
                    [sys.executable, "-m", "pipeline.cli", "run", str(file)],
                    cwd=work,
                    env=env,
                    capture_output=True,
                    text=True,
                )
                print(done.stdout[-1500:], flush=True)
                if done.returncode != 0:
                    raise SystemExit(f"seed {seed}: exit {done.returncode}\n{done.stderr[-3000:]}")
                store = Store(work / "artifacts")
                heldout = store.get("collect_heldout.preferences:latest").path
                figures = {
                    "seed": seed,
                    "heldout_pairs": len((heldout / "preferences.jsonl").read_text().splitlines()),
                }
                for arm in ("start", "random", "selected"):
                    figures[f"rm_accuracy_{arm}"] = round(
                        accuracy(store.get(f"reward_{arm}:latest").path, heldout), 4
                    )
                    figures[f"pairs_{arm}"] = store.get(f"collect_{arm}.preferences:latest").manifest[
                        "metrics"
                    ]["pairs"]
                print(json.dumps(figures), flush=True)
                per_seed.append(figures)
        finally:
            server.stop(work / "runs" / "argilla")

    def values(arm: str) -> list[float]:
        return [f[f"rm_accuracy_{arm}"] for f in per_seed]

    result = {
        "rm_accuracy_random": round(statistics.mean(values("random")), 4),
        "rm_accuracy_selected": round(statistics.mean(values("selected")), 4),
        "rm_accuracy_start": round(statistics.mean(values("start")), 4),
        "spread_random": round(max(values("random")) - min(values("random")), 4),
        "spread_selected": round(max(values("selected")) - min(values("selected")), 4),
        "budget": args.budget,
        "start": args.start,
        "seeds": args.seeds,
        "per_seed": per_seed,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
