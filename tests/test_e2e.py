"""The whole loop, as `make demo` runs it, on a reduced demo: pretrain -> sft -> sample -> annotate (the
embedded Argilla, simulated annotators) -> collect -> reward -> dpo, ppo, rloo -> evaluate -> human_eval, through the real
`rlhf` command. Checks the artifacts, their lineage, the offline W&B runs and the closing summary; the
quality figures of the full demo are the demo's own business (see README)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from annotation import server
from pipeline.store import Store
from tests import wandb_offline
from tests.conftest import REPO, rlhf

pytestmark = pytest.mark.slow

REDUCED = {
    "pretrain": {"steps": 60, "warmup_steps": 10, "eval_prompts": 8},
    "sft": {"steps": 10, "eval_examples": 8, "task_eval_samples": 1, "save_steps": 5},
    "sample": {"k": 3, "num_prompts": 12},
    "annotate": {"annotators_per_record": 1, "simulate": {"annotators": 1, "noise": 0.0}},
    "collect": {"min_records": 6},
    "reward": {"min_accuracy": 0.0, "epochs": 1},
    "dpo": {"epochs": 1, "task_eval": False},
    "ppo": {"updates": 2, "batch_size": 8, "minibatches": 2, "ppo_epochs": 1, "num_prompts": 16},
    "rloo": {"steps": 2, "batch_size": 8, "num_generations": 4, "num_prompts": 8, "task_eval": False},
    "evaluate": {"num_prompts": 6, "samples_per_prompt": 2, "bootstrap_samples": 100},
    "human_eval": {"num_prompts": 6, "bootstrap_samples": 100, "annotators_per_record": 1},
}
OUTPUTS = {  # artifact -> the artifacts its manifest names as inputs
    "pretrain": set(),
    "sft": {"pretrain"},
    "sample": {"sft"},
    "annotate": {"sample"},
    "collect.rankings": {"annotate"},
    "collect.preferences": {"annotate"},
    "reward": {"pretrain", "collect.preferences"},
    "dpo": {"sft", "collect.preferences"},
    "ppo": {"sft", "reward"},
    "rloo": {"sft", "reward"},
    "evaluate": {"sft", "dpo", "ppo", "rloo", "reward"},
    "human_eval": {"evaluate"},
}
TABLES = {
    "sample": {"samples"},
    "collect": {"preferences", "rankings"},
    "reward": {"eval/worst_pairs"},
    "evaluate": {"responses"},
    "human_eval": {"human_eval/pairs"},
}


ROUND_2 = {  # the README's second round: sample from round 1's DPO policy, rank, train on it
    "sample_2": {"kind": "sample", "inputs": {"policy": "dpo"}, "config": {**REDUCED["sample"], "seed": 1}},
    "annotate_2": {"kind": "annotate", "inputs": {"samples": "sample_2"}, "config": REDUCED["annotate"]},
    "collect_2": {"kind": "collect", "inputs": {"batch": "annotate_2"}, "config": REDUCED["collect"]},
    "dpo_2": {
        "kind": "dpo",
        "inputs": {"policy": "dpo", "preferences": "collect_2"},
        "config": REDUCED["dpo"],
    },
}


def reduced_demo(folder: Path) -> Path:
    workflow = yaml.safe_load((REPO / "workflows" / "demo.yaml").read_text())
    for name, config in REDUCED.items():
        stage = workflow["stages"][name]
        stage["config"] = {**stage.get("config", {}), **config}
    workflow["stages"].update(ROUND_2)
    file = folder / "demo-reduced.yaml"
    file.write_text(yaml.safe_dump(workflow, sort_keys=False))
    return file


def test_reduced_demo_runs_the_loop_with_lineage_and_wandb_review(workspace, monkeypatch):
    argilla_home = workspace / "argilla"
    monkeypatch.setenv("RLHF_ARGILLA_HOME", str(argilla_home))
    monkeypatch.delenv("ARGILLA_API_URL", raising=False)
    monkeypatch.delenv("ARGILLA_API_KEY", raising=False)
    file = reduced_demo(workspace)
    assert set(REDUCED) | set(ROUND_2) == set(yaml.safe_load(file.read_text())["stages"])  # all reduced

    try:
        done = rlhf("run", str(file), cwd=workspace, timeout=1500)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

        # Every artifact, built on exactly the artifacts of this run it should be built on.
        store = Store(workspace / "artifacts")
        for name, upstream in OUTPUTS.items():
            artifact = store.get(f"{name}:latest")
            assert store.verify(artifact) == []
            assert {item["ref"].split(":")[0] for item in artifact.manifest["inputs"]} == upstream, name
        # Round 2 is built on round 1's policy, and the lineage command shows it.
        assert {i["ref"] for i in store.get("dpo_2:latest").manifest["inputs"]} == {
            "dpo:v1",
            "collect_2.preferences:v1",
        }
        lineage = rlhf("artifacts", "lineage", "dpo_2:latest", cwd=workspace).stdout
        for ref in ("dpo_2:v1", "dpo:v1", "collect_2.preferences:v1", "sample_2:v1", "sft:v1", "pretrain:v1"):
            assert ref in lineage, lineage
        report = store.get("evaluate:latest")
        assert {
            "sft.pass_rate_sampled",
            "dpo.improvement_sampled",
            "dpo.win_rate",
            "ppo.kl",
            "rloo.improvement_sampled",
        } <= set(report.manifest["metrics"])
        assert (report.path / "chart.png").stat().st_size > 0
        assert "ppo.gaming_suspected" in report.manifest["metrics"]
        judged = store.get("human_eval:latest").manifest["metrics"]
        assert 0 <= judged["dpo.human_win_rate"] <= 1 and "human_rm_agreement" in judged

        # The closing summary: evaluation table, chart, where the rankings are, how to upload W&B.
        out = done.stdout
        assert "evaluation" in out and "chart: " in out and "wandb sync" in out
        assert "reward model reward:v1: held-out pairwise accuracy" in out
        assert "Argilla: stopped the server this run started" in out and "log in as" in out
        assert server.status(argilla_home) is None

        # One W&B run per stage in one group; the review tables; W&B lineage matches ours.
        runs = {}
        for run_file in wandb_offline.run_files(workspace / "runs" / "wandb"):
            summary = wandb_offline.summarize(run_file)
            runs[summary["name"]] = summary
        assert set(runs) == set(REDUCED) | set(ROUND_2)
        assert {name: runs[name]["job_type"] for name in ROUND_2} == {
            n: s["kind"] for n, s in ROUND_2.items()
        }
        assert len({summary["group"] for summary in runs.values()}) == 1
        for job, keys in TABLES.items():
            assert keys <= runs[job]["history_keys"] | runs[job]["summary_keys"], (job, keys)
        for name, upstream in OUTPUTS.items():
            job = name.split(".")[0]
            used = {entry[0] for entry in runs[job]["used"]}
            assert upstream <= used, (name, used)

        # A second run changes nothing.
        before = json.loads(rlhf("artifacts", "list", "--json", cwd=workspace).stdout)
        again = rlhf("run", str(file), cwd=workspace, timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
        assert json.loads(rlhf("artifacts", "list", "--json", cwd=workspace).stdout) == before
        assert all(store.versions(name) == [1] for name in OUTPUTS)
    finally:
        server.stop(argilla_home)
