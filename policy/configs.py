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
    """Target size of the BPE vocabulary trained on the demo corpus."""
    # --- the demo task ---
    max_operand: int = Field(19, ge=1)
    """Demo task: operands are drawn from 0..max_operand."""
    eval_prompts: int = Field(64, ge=1)
    """Held-out prompts used to measure greedy accuracy at the end."""
    text_column: str = "text"
    """Column holding the text, when a `data` input is given."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: `auto` picks CUDA when available."""
