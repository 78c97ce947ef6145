"""Typed configs of the policy stages. Each field's docstring is its only description."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class PretrainConfig(StageConfig):
    seed: int = 0
    """Seed for data generation, initialisation and data order."""
    steps: int = Field(1500, ge=1)
    """Optimizer steps."""
    batch_size: int = Field(32, ge=1)
    """Sequences per step."""
    seq_len: int = Field(64, ge=8)
    """Tokens per training sequence (the corpus is packed into sequences of this length)."""
    lr: float = Field(3e-3, gt=0)
    """Peak learning rate (linear warm-up, cosine decay)."""
    warmup_steps: int = Field(100, ge=0)
    """Linear warm-up steps."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay."""
    # --- the demo model, used when no `model` input is given ---
    layers: int = Field(4, ge=1)
    """Transformer blocks of the demo model."""
    hidden_size: int = Field(128, ge=8)
    """Hidden size of the demo model."""
    intermediate_size: int = Field(512, ge=8)
    """MLP width of the demo model."""
    heads: int = Field(4, ge=1)
    """Attention heads of the demo model."""
    vocab_size: int = Field(320, ge=64)
    """Upper bound on the size of the byte-level BPE vocabulary trained on the demo corpus (256 bytes,
    special tokens, then merges; the demo corpus runs out of merges at about 280)."""
    # --- the demo task ---
    max_operand: int = Field(19, ge=1)
    """Demo task: operands are drawn from 0..max_operand."""
    eval_prompts: int = Field(256, ge=1)
    """At most this many held-out demo prompts (in a fixed order) are asked at the end, in the plain
    pretraining format, to measure greedy and temperature-1 accuracy; the default takes all of them."""
    text_column: str = "text"
    """Column holding the documents, when a `data` input is given."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: `auto` picks CUDA when available."""


PeftMethod = Literal["lora", "dora", "qlora", "ia3", "prompt_tuning", "prefix_tuning", "freeze", "full"]


class SFTConfig(StageConfig):
    """Supervised fine-tuning on TRL's `SFTTrainer` (draft: the SFT implementer refines the fields)."""

    seed: int = 0
    """Seed for initialisation and data order."""
    method: PeftMethod = "lora"
    """What is trained: a PEFT adapter (`lora`, `dora`, `qlora`, `ia3`, `prompt_tuning`, `prefix_tuning`),
    the last `freeze_keep` transformer blocks (`freeze`), or every weight (`full`)."""
    steps: int = Field(400, ge=1)
    """Optimizer steps."""
    batch_size: int = Field(32, ge=1)
    """Examples per device per step."""
    lr: float = Field(2e-3, gt=0)
    """Peak learning rate."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: `auto` picks CUDA when available."""


class SampleConfig(StageConfig):
    """K candidate responses per prompt (draft: the sampling implementer refines the fields)."""

    seed: int = 0
    """Seed of the sampler: the same seed gives the same candidates."""
    k: int = Field(4, ge=1)
    """Candidates per prompt."""
    temperature: float = Field(1.0, ge=0)
    """Sampling temperature (0 = greedy, which gives one distinct candidate)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    max_new_tokens: int = Field(32, ge=1)
    """Longest response, in tokens."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to generate: `auto` picks CUDA when available."""
