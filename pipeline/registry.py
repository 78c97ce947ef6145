"""The stage kinds a workflow can use. One explicit table: add a stage here and nowhere else.

A stage is a plain function `run(config, inputs, out_dir) -> metrics` in its own module:
- `config` is the stage's validated pydantic config;
- `inputs` maps each input slot to a `pathlib.Path` (an artifact's directory or a local path) or a
  `str` (a hub id pinned to its commit, `org/name@<sha>`, for slots that accept one); a slot with
  `many=True` maps to a dict label -> those;
- `out_dir` is an empty directory to write the payload into. A stage with several outputs writes each
  into `out_dir/<output name>/`. Anything under `out_dir/scratch/` (checkpoints) is dropped before the
  payload is sealed, and it survives a crash: a rerun with the same cache key gets the same `out_dir`,
  so the stage can resume from its checkpoints;
- the returned metrics (a JSON-able dict) go into the manifest and to W&B.

Config classes live in light modules (`policy/configs.py`, ...) so that validating a workflow does
not import torch; the stage module is imported only when the stage runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from annotation import configs as annotation_configs
from policy import configs as policy_configs
from reward import configs as reward_configs

MODEL_KINDS = ("base-model", "merged-model", "policy")
POLICY_KINDS = ("adapter", *MODEL_KINDS)


@dataclass(frozen=True)
class Slot:
    """An input of a stage kind."""

    kinds: tuple[str, ...]
    """Artifact kinds accepted."""
    doc: str
    required: bool = True
    external: bool = False
    """Also accepts a local path (relative to the workflow file), `package:<python package>/<file>`, or
    (for models) a hub id, `org/name` or `org/name@revision`."""
    many: bool = False
    """Takes several inputs, as a list or a mapping label -> reference; the stage receives a dict
    label -> path (a list is labelled by its references, e.g. `sft`, `dpo:v2`)."""
    data: str | None = None
    """The data format of the slot (`sft`, `prompts`, `preferences` or `texts`, read by `common.data`): a
    local file or folder given here is read and checked before any stage of the run starts."""


@dataclass(frozen=True)
class StageKind:
    name: str
    config: type[BaseModel]
    run: str
    """`module:function` of the stage's run function, imported when the stage runs."""
    inputs: dict[str, Slot]
    outputs: Callable[[Any], dict[str, str]]
    """Output name -> artifact kind, given the config. A single output is named ''."""
    always_run: bool = False
    """Reads external state (an annotation server), so a matching cache key is not enough to skip it."""
    distributed: bool = False
    """Runs under `accelerate launch`/`torchrun` with several processes (the stage builds an Accelerator
    or a TRL trainer); the others refuse a multi-process launch."""
    doc: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    check_upstream: Callable[[Any, dict[str, Any]], None] | None = None
    """`(config, {slot: the workflow's stage that feeds it})`: raises `ValueError` when the config contradicts
    a stage it reads from, so the workflow is refused before anything runs, not when the stage is reached."""

    def load(self) -> Callable[..., dict[str, Any]]:
        module, _, function = self.run.partition(":")
        return getattr(importlib.import_module(module), function)


def _single(kind: str) -> Callable[[Any], dict[str, str]]:
    return lambda config: {"": kind}


def _publish(config: Any) -> dict[str, str]:
    """DPO, RLOO, GRPO: a complete `policy`, or with `publish: adapter` an `adapter` on the input policy."""
    return {"": "adapter" if config.publish == "adapter" else "policy"}


STAGES: dict[str, StageKind] = {
    stage.name: stage
    for stage in [
        StageKind(
            name="model",
            config=policy_configs.ModelConfig,
            run="policy.base_model:run",
            inputs={
                "source": Slot(
                    MODEL_KINDS,
                    "the model: a hub id (org/name or org/name@revision), a local model directory, a .gguf "
                    "file, package:<python package>/<file>, or a model artifact",
                    external=True,
                ),
            },
            outputs=_single("base-model"),
            doc="Bring a pretrained model into the store as a base-model artifact (hub id pinned to its "
            "commit, local directory or GGUF file digested).",
        ),
        StageKind(
            name="pretrain",
            config=policy_configs.PretrainConfig,
            run="policy.pretrain:run",
            inputs={
                "model": Slot(
                    MODEL_KINDS,
                    "a model to continue pretraining; omit to build the demo model from config",
                    required=False,
                    external=True,
                ),
                "data": Slot(
                    ("dataset",),
                    "a text data set (JSONL/Parquet with a `text` column); omit for the demo corpus",
                    required=False,
                    external=True,
                    data="texts",
                ),
            },
            outputs=_single("base-model"),
            doc="Train a small causal LM from config on the generated demo corpus, or continue pretraining a model.",
        ),
        StageKind(
            name="sft",
            distributed=True,
            config=policy_configs.SFTConfig,
            run="policy.sft:run",
            inputs={
                "model": Slot(
                    MODEL_KINDS,
                    "the model to fine-tune: an artifact, a local path or a hub id",
                    external=True,
                ),
                "data": Slot(
                    ("dataset",),
                    "SFT data (JSONL, Parquet or a saved `datasets` dir); omit for the task's SFT examples",
                    required=False,
                    external=True,
                    data="sft",
                ),
            },
            outputs=lambda config: {"": "merged-model" if config.method in ("freeze", "full") else "adapter"},
            doc="Supervised fine-tuning with LoRA or another PEFT method (TRL SFTTrainer).",
        ),
        StageKind(
            name="sample",
            config=policy_configs.SampleConfig,
            run="policy.sample:run",
            inputs={
                "policy": Slot(
                    POLICY_KINDS, "the policy to sample from: an adapter or a full model", external=True
                ),
                "prompts": Slot(
                    ("dataset",),
                    "prompts (JSONL/Parquet with a `prompt` column); omit for the task's prompts (`split`)",
                    required=False,
                    external=True,
                    data="prompts",
                ),
            },
            outputs=_single("samples"),
            doc="Draw K candidate responses per prompt for annotators to rank.",
        ),
        StageKind(
            name="dpo",
            distributed=True,
            config=policy_configs.DPOConfig,
            run="policy.dpo:run",
            inputs={
                "policy": Slot(
                    POLICY_KINDS, "the SFT policy to optimize; also the frozen reference", external=True
                ),
                "preferences": Slot(
                    ("preferences",), "prompt/chosen/rejected pairs", external=True, data="preferences"
                ),
            },
            outputs=_publish,
            doc="Direct preference optimization on the comparisons (TRL DPOTrainer).",
        ),
        StageKind(
            name="ppo",
            distributed=True,
            config=policy_configs.PPOConfig,
            run="policy.ppo:run",
            inputs={
                "policy": Slot(
                    POLICY_KINDS, "the SFT policy to optimize; also the KL reference", external=True
                ),
                "reward": Slot(("reward-model",), "the reward model (refused if its gate rejected it)"),
                "prompts": Slot(
                    ("dataset",),
                    "prompts (JSONL/Parquet with a `prompt` column); omit for the task's train prompts",
                    required=False,
                    external=True,
                    data="prompts",
                ),
            },
            outputs=_single("policy"),
            doc="PPO against the reward model with a per-token KL penalty to the SFT policy (our implementation).",
        ),
        StageKind(
            name="rloo",
            distributed=True,
            config=policy_configs.RLOOConfig,
            run="policy.online_rl:run_rloo",
            inputs={
                "policy": Slot(
                    POLICY_KINDS, "the SFT policy to optimize; also the KL reference", external=True
                ),
                "reward": Slot(
                    ("reward-model",),
                    "the reward model (refused if its gate rejected it); none with `reward: task`",
                    required=False,
                ),
                "prompts": Slot(
                    ("dataset",),
                    "prompts; omit for the task's train prompts",
                    required=False,
                    external=True,
                    data="prompts",
                ),
            },
            outputs=_publish,
            doc="REINFORCE leave-one-out with the reward model or the task's verdict (TRL RLOOTrainer).",
        ),
        StageKind(
            name="grpo",
            distributed=True,
            config=policy_configs.GRPOConfig,
            run="policy.online_rl:run_grpo",
            inputs={
                "policy": Slot(
                    POLICY_KINDS, "the SFT policy to optimize; also the KL reference", external=True
                ),
                "reward": Slot(
                    ("reward-model",),
                    "the reward model (refused if its gate rejected it); none with `reward: task`",
                    required=False,
                ),
                "prompts": Slot(
                    ("dataset",),
                    "prompts; omit for the task's train prompts",
                    required=False,
                    external=True,
                    data="prompts",
                ),
            },
            outputs=_publish,
            doc="Group relative policy optimization with the reward model or the task's verdict (TRL GRPOTrainer).",
        ),
        StageKind(
            name="evaluate",
            config=policy_configs.EvaluateConfig,
            run="policy.evaluate:run",
            inputs={
                "policies": Slot(
                    POLICY_KINDS,
                    "the policies to compare: a list, or a mapping label -> reference",
                    many=True,
                    external=True,
                ),
                "reward": Slot(
                    ("reward-model",), "the reward model that judges mean reward and win rate", required=False
                ),
                "reference": Slot(
                    POLICY_KINDS,
                    "the policy KL is measured against (usually the SFT policy)",
                    required=False,
                    external=True,
                ),
                "prompts": Slot(
                    ("dataset",),
                    "held-out prompts; omit for the task's held-out split",
                    required=False,
                    external=True,
                    data="prompts",
                ),
            },
            outputs=_single("eval-report"),
            doc="Compare policies: the task's pass rate, reward, win rate, KL and length with bootstrap intervals.",
        ),
        StageKind(
            name="annotate",
            config=annotation_configs.AnnotateConfig,
            run="annotation.push:run",
            inputs={
                "samples": Slot(("samples",), "the candidates to rank"),
                "reward": Slot(
                    ("reward-model",),
                    "the current reward model, for `select` by disagreement or spread",
                    required=False,
                ),
                "previous": Slot(
                    ("preferences",),
                    "the pairs so far: their prompts leave the pool, and `select` by disagreement fits its "
                    "heads on them",
                    required=False,
                    external=True,
                    data="preferences",
                ),
            },
            outputs=_single("annotation-batch"),
            doc="Push candidates to Argilla as a ranking dataset.",
        ),
        StageKind(
            name="human_eval",
            config=annotation_configs.HumanEvalConfig,
            run="annotation.human_eval:run",
            inputs={
                "evaluation": Slot(
                    ("eval-report",), "an evaluate report: its prompts, policies' responses and rewards"
                )
            },
            outputs=_single("eval-report"),
            always_run=True,
            doc="Blind pairwise human evaluation in Argilla: each policy's human win rate against the baseline; "
            "waits below the threshold.",
            check_upstream=annotation_configs.check_evaluate_stage,
        ),
        StageKind(
            name="collect",
            config=annotation_configs.CollectConfig,
            run="annotation.collect:run",
            inputs={
                "batch": Slot(("annotation-batch",), "the pushed annotation batch"),
                "previous": Slot(
                    ("preferences",),
                    "pairs of earlier rounds, published with this batch's (a later round learns from all)",
                    required=False,
                    external=True,
                    data="preferences",
                ),
            },
            outputs=lambda config: {"rankings": "rankings", "preferences": "preferences"},
            always_run=True,
            doc="Snapshot submitted rankings and convert them to preference pairs; waits below the threshold.",
        ),
        StageKind(
            name="reward",
            distributed=True,
            config=reward_configs.RewardConfig,
            run="reward.train:run",
            inputs={
                "preferences": Slot(
                    ("preferences",),
                    "preference pairs (prompt/chosen/rejected JSONL): collect's output or a local file",
                    external=True,
                    data="preferences",
                ),
                "model": Slot(
                    POLICY_KINDS,
                    "the model to start from (an adapter is merged into its base first; with publish: "
                    "adapter, the base of the published adapter): an artifact, a local path or a hub id",
                    external=True,
                ),
            },
            outputs=_single("reward-model"),
            doc="Train a reward model on preference pairs (TRL RewardTrainer); gate it on held-out accuracy.",
        ),
    ]
}
