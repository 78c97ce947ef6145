"""Config pieces shared by the stages of several packages, each field declared once. No torch here:
validating a workflow imports this module."""

from __future__ import annotations

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
