"""Config pieces shared by the stages of several packages, each field declared once. No torch here:
validating a workflow imports this module."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StageConfig(BaseModel):
    """The base of every stage's config: unknown keys are errors, each field's docstring is its only
    description, and a validated config does not change. Values are taken as written, never converted
    (strict): `steps: true` or `lr: "1e-4"` (a quoted string) is an error, not 1 or 0.0001 (the workflow
    loader reads unquoted `1e-4` as a number); an integer is a valid float. Floats are finite: `.nan`
    and `.inf` are errors."""

    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, frozen=True, strict=True, allow_inf_nan=False
    )


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


class PublishSettings(StageConfig):
    """Settings of stages that train a LoRA adapter on a model input and may publish it merged or not
    (the reward stage; DPO, RLOO and GRPO). They have a `method`, of which `lora` trains an adapter."""

    publish: Literal["merged", "adapter"] = "merged"
    """What a `method: lora` run publishes. `merged`: one complete model, the adapter merged in (loads with
    plain transformers and needs nothing else; costs a full copy of the weights, 538 MB for a 135M model
    in float32). `adapter`: the trained adapter alone (reward models: with their score head), a few MB,
    with `base.json` naming the stage's model input as its base, whose digest is checked at every load
    (the artifact kind is `adapter`; reward models stay `reward-model`). When that input is itself an
    adapter (the SFT stage's output) the result is a stacked adapter: loading it merges the input adapter
    into its own base first, which gives exactly the weights training started from. Same numbers either
    way; `rlhf export --merged` turns a policy adapter into a complete model at any time."""

    @model_validator(mode="after")
    def _adapter_needs_lora(self) -> PublishSettings:
        method = getattr(self, "method", None)
        if self.publish == "adapter" and method != "lora":
            raise ValueError(f"publish: adapter needs method: lora (method {method!r} trains no adapter)")
        return self


class PrecisionSettings(StageConfig):
    """Settings of stages that run a model forward (train, generate or score)."""

    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """Arithmetic of training and generation. `bfloat16` computes in bf16: trainers in bf16 mixed
    precision, and the frozen weights (a LoRA's base, models that only generate or score) held in bf16;
    on a GPU with bf16 and on a CPU with native bf16 (AVX512-BF16, AMX) it is about twice as fast as
    float32 (SmolLM2-135M on 2 CPU cores: a LoRA training step 1.7-1.9x, generation 1.8x), and log
    probabilities differ by up to ~0.1 nats a token. `float32` never uses bf16. `auto` is bfloat16 on a
    CUDA GPU that supports it and float32 on a CPU, where the demo's 1M-parameter model gains nothing."""


class PreferenceSettings(StageConfig):
    """Settings of the stages that train on preference pairs (the reward stage, DPO)."""

    min_distinct_fraction: float = Field(0.5, ge=0, le=1)
    """A pair whose chosen and rejected responses are the same teaches nothing: it is dropped and counted
    (`pairs_dropped_identical` in the metrics). When fewer than this fraction of the pairs is left (or
    none), the data is taken for broken (e.g. duplicate candidates ranked apart) and the stage stops before
    loading any model."""
