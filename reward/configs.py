"""Typed config of the reward stage. Each field's docstring is its only description. No torch here:
validating a workflow imports this module."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from common.configs import (
    LoraSettings,
    PrecisionSettings,
    PreferenceSettings,
    PublishSettings,
    TokenizerSettings,
    TrainerSettings,
)
from tasks import UsesTask


class RewardConfig(
    TokenizerSettings,
    PrecisionSettings,
    PublishSettings,
    TrainerSettings,
    LoraSettings,
    PreferenceSettings,
    UsesTask,
):
    """A reward model trained on preference pairs with TRL's `RewardTrainer` (Bradley-Terry loss), measured
    on a held-out split by prompt and gated on its held-out pairwise accuracy. On the demo the 4-layer
    model alone stays near 0.65 held-out accuracy however long it trains (it knows which digit should
    come next only at its last layer, with no layer left to compare it with the digit that came); with
    `added_layers: 4`, every weight trained (`method: full`) for 15 epochs at lr 3e-4, in batches of 16 and
    bf16 on the pairs all three annotators agree on (`min_agreement: 1.0`), 0.90-0.97 over three annotator
    seeds; with `lm_loss_weight: 2` as well, as in the demo workflow, 0.94-0.97 (measured figures: README,
    "What the demo measures today")."""

    dropout_off = (
        "the reward stage turns every dropout off (TRL's disable_dropout), so that both scores of a pair "
        "come from one network"
    )

    seed: int = 0
    """Seed for the held-out split, the score head and adapter initialisation, and the data order."""
    method: Literal["lora", "full"] = "lora"
    """What is trained: a LoRA adapter on every linear layer plus the score head (`lora`), or every
    weight (`full`). The published reward model is one complete sequence-classification model (LoRA merged
    in), so loading it needs neither PEFT nor the model it started from; or, with `lora` and `publish:
    adapter`, the adapter and its score head on the `model` input."""
    epochs: float = Field(2.0, gt=0)
    """Passes over the training pairs."""
    batch_size: int = Field(32, ge=1)
    """Pairs per device per micro-batch (each pair is two sequences)."""
    lr: float = Field(2e-3, gt=0)
    """Peak learning rate (linear warm-up, then cosine decay to 0). LoRA wants a larger rate than `full`
    fine-tuning (e.g. 2e-3 against 1e-4)."""
    center_rewards_coefficient: float | None = Field(0.01, ge=0)
    """Weight of a penalty on the squared mean reward, which keeps rewards centred on 0 (useful for PPO);
    null disables it."""
    max_length: int | None = Field(1024, ge=8)
    """Pairs whose chosen or rejected sequence (prompt and response, in tokens) is longer are left out of
    training and evaluation, and counted; null keeps every pair."""
    added_layers: int = Field(0, ge=0)
    """Transformer blocks added on top of the model before training, initialised to pass their input
    through unchanged and trained in full (LoRA leaves them alone). A reward model must compare the
    response with what the model expected at each token, which the model only knows at its last layer:
    a small model has no layer left to compare in. The demo's 4-layer model needs 3-4; a 7B one, none.
    Supported for decoder models whose blocks write to the residual stream through `o_proj` and
    `down_proj`-style projections (Llama, Qwen, Mistral, Gemma, Phi-3, GPT-2 ...); others are a clear error."""
    lm_loss_weight: float = Field(0.0, ge=0)
    """Weight of a language-modelling loss added to the Bradley-Terry loss: the next-token cross-entropy of
    every chosen sequence (prompt and response), read from the hidden states the score head reads through
    the model's own output embeddings, so the reward model keeps knowing what text should come next while
    it learns to rank (Yang et al. 2024, "Regularizing Hidden States Enables Learning Generalizable Reward
    Model for LLMs"). Needs output embeddings tied to the input embeddings (small models, SmolLM2, Qwen2.5
    up to 3B; a clear error otherwise). 0 turns it off. On the demo, weight 2: held-out accuracy 0.94 on
    each of three annotator seeds, where without it 0.90-0.97 (README, "What the demo measures today"),
    for ~10% more training time; weights 1 and 3 did worse on some seeds. Not measured on a real model
    beyond a check: SmolLM2-135M, LoRA, one epoch of 240 synthetic arithmetic pairs, 0.41 held-out with
    weight 1 against 0.54 without. Measure before turning it on."""
    # --- held-out evaluation and the acceptance gate ---
    held_out_fraction: float = Field(0.1, gt=0, lt=1)
    """Fraction of the prompts (by `prompt_id`, a seeded draw, at least one) whose pairs are held out of
    training to evaluate the reward model. No prompt has pairs on both sides."""
    min_accuracy: float = Field(0.6, ge=0, le=1)
    """Acceptance gate: a reward model whose held-out pairwise accuracy is below this is still published,
    but marked rejected, and the run fails."""
    max_length_correlation: float | None = Field(None, gt=0, le=1)
    """Acceptance gate, optional: reject a reward model when the absolute Spearman correlation between
    its reward and the response length in tokens, over the held-out responses, exceeds this."""
    worst_pairs: int = Field(20, ge=0)
    """The held-out pairs with the lowest margin (misranked ones first) listed in `eval.json` and in a
    W&B table."""
    train_eval_pairs: int = Field(512, ge=0)
    """Training pairs (a seeded draw) scored at the end, to compare train and held-out accuracy."""
    eval_batch_size: int = Field(64, ge=1)
    """Sequences scored together in the evaluation."""

    @model_validator(mode="after")
    def _adapter_keeps_the_architecture(self) -> RewardConfig:
        if self.publish == "adapter" and self.added_layers:
            raise ValueError(
                "publish: adapter cannot carry added_layers (the added blocks change the base model's "
                "architecture); publish: merged, or added_layers: 0"
            )
        return self
