"""The runner through the real `rlhf` command and the real `pretrain` stage on a tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO

from pipeline.store import Store
from tests.conftest import rlhf, wait_until
from tests.wandb_offline import run_files, summarize

TINY = "{steps: %d, batch_size: 4, seq_len: 32, layers: 1, hidden_size: 32, intermediate_size: 64, heads: 2, vocab_size: 96, eval_prompts: 4, warmup_steps: 1, seed: %d}"


def tiny_workflow(folder: Path, steps: int = 3, seed: int = 0, second: bool = True) -> Path:
    text = f"name: tiny\nstages:\n  pretrain:\n    config: {TINY % (steps, seed)}\n"
    if second:
        text += (
            f"  more:\n    kind: pretrain\n    inputs: {{model: pretrain}}\n    config: {TINY % (2, seed)}\n"
        )
    path = folder / "tiny.yaml"
    path.write_text(text)
    return path


def test_run_publishes_artifacts_with_full_manifest_and_wandb_runs(workspace):
    tiny_workflow(workspace)
    result = rlhf("run", "tiny.yaml", cwd=workspace)
    assert result.returncode == 0, result.stderr
    assert "pretrain:v1" in result.stdout and "more:v1" in result.stdout

    store = Store(workspace / "artifacts")
    base, more = store.get("pretrain:v1"), store.get("more:v1")
    m = more.manifest
    assert (m["name"], m["version"], m["kind"], m["status"]) == ("more", 1, "base-model", "ok")
    assert m["stage"]["workflow"] == "tiny" and m["stage"]["kind"] == "pretrain"
    assert m["config"]["steps"] == 2
    assert m["inputs"] == [
        {
            "slot": "model",
            "ref": "pretrain:v1",
            "name": "pretrain",
            "version": 1,
            "kind": "base-model",
            "digest": base.digest,
        }
    ]
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(m["files"])
    assert {"torch", "transformers", "python"} <= set(m["versions"])
    assert m["code"]["package"] == "0.1.0"
    assert m["finished_at"] >= m["started_at"]
    assert "train_loss" in m["metrics"]
    assert store.verify(more) == []

    # One W&B run per stage, in one group, with the lineage of the store.
    runs = {summarize(f)["name"]: summarize(f) for f in run_files(workspace / "runs" / "wandb")}
    assert set(runs) == {"pretrain", "more"}
    assert runs["pretrain"]["group"] == runs["more"]["group"] == m["stage"]["run_id"]
    assert runs["more"]["job_type"] == "pretrain"
    logged = {name: digest for name, _, digest in runs["pretrain"]["logged"]}
    used = {name: digest for name, _, digest in runs["more"]["used"]}
    assert used == {"pretrain": logged["pretrain"]}
    assert m["wandb"]["id"] in str(run_files(workspace / "runs" / "wandb"))


def test_second_run_is_cached_and_creates_no_version(workspace):
    tiny_workflow(workspace)
    assert rlhf("run", "tiny.yaml", cwd=workspace).returncode == 0
    before = sorted(a.ref for a in Store(workspace / "artifacts").all())
    again = rlhf("run", "tiny.yaml", cwd=workspace)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("cached") >= 2 and "running" not in again.stdout
    assert sorted(a.ref for a in Store(workspace / "artifacts").all()) == before == ["more:v1", "pretrain:v1"]

    forced = rlhf("run", "tiny.yaml", "--only", "more", "--force", cwd=workspace)
    assert forced.returncode == 0, forced.stderr
    assert sorted(a.ref for a in Store(workspace / "artifacts").all()) == [
        "more:v1",
        "more:v2",
        "pretrain:v1",
    ]

    tiny_workflow(workspace, seed=1)  # a config change invalidates the stage and everything downstream
    changed = rlhf("run", "tiny.yaml", "--until", "pretrain", cwd=workspace)
    assert changed.returncode == 0 and "pretrain:v2" in changed.stdout and "more" not in changed.stdout


def test_set_values_reach_the_manifest_and_the_cache_key(workspace):
    tiny_workflow(workspace, second=False)
    setting = ("--set", "stages.pretrain.config.steps=2", "--set", "stages.pretrain.config.seed=4")
    env = {"WANDB_MODE": "disabled"}

    first = rlhf("run", "tiny.yaml", *setting, cwd=workspace, env=env)

    assert first.returncode == 0, first.stderr
    manifest = Store(workspace / "artifacts").get("pretrain:v1").manifest
    assert (manifest["config"]["steps"], manifest["config"]["seed"]) == (2, 4)
    assert manifest["stage"]["overrides"] == [
        "stages.pretrain.config.steps=2",
        "stages.pretrain.config.seed=4",
    ]
    again = rlhf("run", "tiny.yaml", *setting, cwd=workspace, env=env)
    assert again.returncode == 0 and "cached" in again.stdout
    # The same values written in the file are the same stage: cached, no new version.
    tiny_workflow(workspace, steps=2, seed=4, second=False)
    written = rlhf("run", "tiny.yaml", cwd=workspace, env=env)
    assert written.returncode == 0 and "cached" in written.stdout and "pretrain:v2" not in written.stdout
    other = rlhf("run", "tiny.yaml", "--set", "stages.pretrain.config.steps=3", cwd=workspace, env=env)
    assert other.returncode == 0 and "pretrain:v2" in other.stdout


def test_only_needs_upstream_artifacts(workspace):
    tiny_workflow(workspace)
    result = rlhf("run", "tiny.yaml", "--only", "more", cwd=workspace)
    assert result.returncode == 1
    assert "stage pretrain has no artifact for its current config" in result.stderr
    assert "--until pretrain" in result.stderr


def test_tampered_input_is_refused_and_verify_fails(workspace):
    tiny_workflow(workspace, second=False)
    assert rlhf("run", "tiny.yaml", cwd=workspace).returncode == 0
    assert rlhf("artifacts", "verify", "pretrain:v1", cwd=workspace).returncode == 0
    weights = workspace / "artifacts" / "pretrain" / "v1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")

    verify = rlhf("artifacts", "verify", "pretrain:v1", cwd=workspace)
    assert verify.returncode == 1 and "model.safetensors: sha256" in verify.stderr
    tiny_workflow(workspace)
    result = rlhf("run", "tiny.yaml", cwd=workspace)
    assert result.returncode == 2  # a bad input, refused before any work
    assert "pretrain:v1 fails verification" in result.stderr
    assert not (workspace / "artifacts" / "more").exists()


def test_artifacts_commands(workspace):
    tiny_workflow(workspace)
    assert rlhf("run", "tiny.yaml", cwd=workspace).returncode == 0
    listing = json.loads(rlhf("artifacts", "list", "--json", cwd=workspace).stdout)
    assert [a["ref"] for a in listing] == ["more:v1", "pretrain:v1"]
    shown = json.loads(rlhf("artifacts", "show", "more:latest", "--json", cwd=workspace).stdout)
    assert shown["ref"] == "more:v1"
    lineage = rlhf("artifacts", "lineage", "more:v1", cwd=workspace)
    lines = lineage.stdout.splitlines()
    assert lines[0].startswith("more:v1") and "pretrain:v1" in lines[1] and lines[1].startswith("  └─ ")
    missing = rlhf("artifacts", "show", "nothing:v1", cwd=workspace)
    assert missing.returncode == 2 and "no artifact named 'nothing'" in missing.stderr


def _start(workspace: Path, output: IO[str] | int = subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", "tiny.yaml"],
        cwd=workspace,
        stdout=output,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ.copy(),
    )


def test_kill_9_mid_stage_leaves_no_visible_version_and_rerun_completes(workspace):
    tiny_workflow(workspace, steps=400, second=False)
    log = workspace / "run.log"
    with log.open("w") as output:
        process = _start(workspace, output)

    def training() -> bool:
        assert process.poll() is None, f"the stage finished before it could be killed:\n{log.read_text()}"
        return "loss=" in log.read_text()  # the progress bar shows the loss from step 20 of 400

    wait_until(training, 120, lambda: f"the stage reported no loss within 2 minutes:\n{log.read_text()}")
    assert any((workspace / "artifacts" / ".staging").glob("pretrain-*/"))  # it runs in its staging folder
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    assert Store(workspace / "artifacts").versions("pretrain") == []
    assert not (workspace / "artifacts" / "pretrain").exists()
    result = rlhf("run", "tiny.yaml", cwd=workspace)
    assert result.returncode == 0, result.stderr
    store = Store(workspace / "artifacts")
    assert store.versions("pretrain") == [1] and store.verify(store.get("pretrain:v1")) == []
    assert not any((workspace / "artifacts" / ".staging").glob("pretrain-*/"))


def test_two_processes_on_one_store(workspace):
    """The same stage started twice runs once; the other process finds it published."""
    tiny_workflow(workspace, steps=60, second=False)
    first, second = _start(workspace), _start(workspace)
    out = [p.communicate(timeout=300)[0] for p in (first, second)]
    assert first.returncode == second.returncode == 0, out
    assert Store(workspace / "artifacts").versions("pretrain") == [1]
    assert sum("published meanwhile" in o for o in out) == 1


def test_concurrent_forced_runs_get_distinct_versions(workspace):
    tiny_workflow(workspace, steps=3, second=False)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run", "tiny.yaml", "--force"],
            cwd=workspace,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert Store(workspace / "artifacts").versions("pretrain") == [1, 2, 3]
