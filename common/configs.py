"""Config pieces shared by the stages of several packages, each field declared once. No torch here:
validating a workflow imports this module."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class StageConfig(BaseModel):
    """The base of every stage's config: unknown keys are errors, each field's docstring is its only
    description, and a validated config does not change."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class TokenizerSettings(StageConfig):
    """Settings of stages that bring a model in from outside the pipeline (a hub id, a local directory or
    a base-model artifact), where the tokenizer comes as published."""

    pad_token: str = "auto"
    """The pad token when the published one is missing or is the eos token (SmolLM2 and TinyLlama pad
    with eos, Llama 3 and Mistral have no pad token): `auto` keeps a published pad token distinct from
    eos, else takes the unk token or a pad-like token the vocabulary reserves (`<|endoftext|>`,
    `<|finetune_right_pad_id|>`, ...), and eos only when there is none; `eos`; or any token of the
    vocabulary. No token is added, so the embeddings stay as published. The choice is saved with the
    tokenizer (stages downstream inherit it) and recorded in the manifest (`tokenizer.pad_choice`)."""


class PrecisionSettings(StageConfig):
    """Settings of stages that run a model forward (train, generate or score)."""

    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """Arithmetic of training and generation. `bfloat16` computes in bf16: trainers in bf16 mixed
    precision, and the frozen weights (a LoRA's base, models that only generate or score) held in bf16;
    on a GPU with bf16 and on a CPU with native bf16 (AVX512-BF16, AMX) it is about twice as fast as
    float32 (SmolLM2-135M on 2 CPU cores: a LoRA training step 1.7-1.9x, generation 1.8x), and log
    probabilities differ by up to ~0.1 nats a token. `float32` never uses bf16. `auto` is bfloat16 on a
    CUDA GPU that supports it and float32 on a CPU, where the demo's 1M-parameter model gains nothing."""
