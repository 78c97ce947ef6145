"""Typed configs of the policy stages. Each field's docstring is its only description."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
    cpu_threads: int = Field(0, ge=0)
    """Torch threads when running on the CPU; 0 takes every CPU this process may run on. On a busy
    machine fewer is faster: torch's waiting threads spin, so more threads than free cores slow a run
    down several times (starting the process with `OMP_WAIT_POLICY=PASSIVE` avoids that)."""


PeftMethod = Literal["lora", "dora", "qlora", "ia3", "prompt_tuning", "prefix_tuning", "freeze", "full"]
LORA_METHODS = ("lora", "dora", "qlora")


class SFTConfig(StageConfig):
    """Supervised fine-tuning on TRL's `SFTTrainer`. The defaults take the pretrained demo model to about
    95% held-out greedy accuracy in the chat format in about half a minute on 2 CPU cores."""

    seed: int = 0
    """Seed for adapter initialisation, the eval split and the data order."""
    method: PeftMethod = "lora"
    """What is trained: a PEFT adapter (`lora`, `dora`, `qlora` = LoRA on a 4-bit base, CUDA and
    bitsandbytes only; `ia3`; `prompt_tuning`; `prefix_tuning`), the last `trainable_blocks` transformer
    blocks (`freeze`), or every weight (`full`). Adapter methods publish an `adapter` artifact, `freeze`
    and `full` a `merged-model`."""
    steps: int = Field(400, ge=1)
    """Optimizer steps (the data is repeated as often as needed)."""
    batch_size: int = Field(32, ge=1)
    """Examples per device per micro-batch."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    lr: float = Field(2e-3, gt=0)
    """Peak learning rate (linear warm-up, then cosine decay to 0). Adapters want a larger rate than
    `full` fine-tuning (e.g. 2e-3 against 2e-4)."""
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    """Fraction of `steps` spent warming the learning rate up linearly."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    max_length: int | None = Field(1024, ge=8)
    """Examples are cut to this many tokens; null keeps them whole."""
    completion_only_loss: bool = True
    """Train on the completion (prompt/completion data) or the assistant turns (messages data, which
    needs a chat template with `{% generation %}` markers, or one TRL knows how to patch) only; false
    trains on every token. A `text` data set always trains on every token."""
    # --- method settings ---
    lora_r: int = Field(16, ge=1)
    """`lora`/`dora`/`qlora`: rank of the update matrices."""
    lora_alpha: float = Field(32, gt=0)
    """`lora`/`dora`/`qlora`: scaling numerator; the update is scaled by `lora_alpha / lora_r`."""
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """`lora`/`dora`/`qlora`: dropout on the adapter's input."""
    target_modules: str | list[str] = "all-linear"
    """`lora`/`dora`/`qlora`: the modules that get an adapter: `all-linear` (every linear layer of the
    transformer blocks, not the output head) or a list of module names such as `[q_proj, v_proj]`.
    `ia3` uses PEFT's defaults for the architecture (keys, values and the MLP output)."""
    virtual_tokens: int = Field(16, ge=1)
    """`prompt_tuning`/`prefix_tuning`: number of trained virtual tokens (prefix tuning: per layer)."""
    trainable_blocks: int = Field(1, ge=1)
    """`freeze`: how many of the last transformer blocks are trained; every other weight (embeddings,
    earlier blocks, final norm, output head) stays frozen."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 20-30% slower (worth it for
    large models only)."""
    # --- evaluation, logging, checkpoints ---
    eval_examples: int = Field(64, ge=0)
    """Examples held out of the data (a seeded draw, at most a fifth of the data) to measure the eval
    loss once at the end; 0 disables it."""
    demo_eval: bool | None = None
    """Measure held-out accuracy on the demo task (addition) at the end, asked in the chat format: greedy
    and sampled at temperature 1. Null: only when training on the demo data (no `data` input)."""
    demo_samples: int = Field(4, ge=1)
    """Samples per held-out prompt for the sampled (temperature 1) demo accuracy."""
    max_operand: int = Field(19, ge=1)
    """Demo task: operands are drawn from 0..max_operand (match the pretrain stage's setting)."""
    logging_steps: int = Field(10, ge=1)
    """Steps between loss reports (progress bar and W&B)."""
    save_steps: int = Field(100, ge=1)
    """Steps between checkpoints (kept under the stage's `scratch/`, the last two only, dropped when the
    stage finishes): a rerun after a crash resumes from the last one."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: `auto` picks CUDA when available."""

    @model_validator(mode="after")
    def _settings_match_method(self) -> SFTConfig:
        """A setting of another method than the one chosen is a mistake, not something to ignore."""
        owners = {
            "lora_r": LORA_METHODS,
            "lora_alpha": LORA_METHODS,
            "lora_dropout": LORA_METHODS,
            "target_modules": LORA_METHODS,
            "virtual_tokens": ("prompt_tuning", "prefix_tuning"),
            "trainable_blocks": ("freeze",),
        }
        wrong = [
            f"{name} (for {'/'.join(methods)})"
            for name, methods in owners.items()
            if name in self.model_fields_set and self.method not in methods
        ]
        if wrong:
            raise ValueError(f"method {self.method!r} does not use {', '.join(wrong)}")
        return self


class SampleConfig(StageConfig):
    """K candidate responses per prompt, for annotators to rank (`policy/sample.py`).

    The same config and policy give byte-identical samples on the same hardware: each candidate is drawn
    with its own random stream, seeded from `seed`, the prompt and the candidate's index, so neither
    `batch_size` nor the other prompts in a batch change it (up to floating-point differences between
    batch shapes, which on CPU in float32 in practice never change a token).
    """

    seed: int = 0
    """Seed of the sampler: the same seed gives the same candidates, another seed other candidates."""
    k: int = Field(4, ge=1)
    """Candidates drawn per prompt (before duplicates are removed)."""
    temperature: float = Field(1.0, ge=0)
    """Sampling temperature; 0 is greedy decoding, which draws one candidate and repeats it K times (so
    `duplicates: remove` leaves one)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: draw from the smallest set of tokens holding this much probability (1 = all)."""
    max_new_tokens: int = Field(32, ge=1)
    """Longest response, in tokens; a response stops earlier at the tokenizer's eos token."""
    duplicates: Literal["remove", "mark", "keep"] = "remove"
    """Identical candidates of one prompt: `remove` keeps the first occurrence only, `mark` keeps all and
    adds `duplicate_of` (per candidate: the index of its first occurrence, or null), `keep` does nothing."""
    prompt_format: Literal["auto", "chat", "plain"] = "auto"
    """How prompts are shown to the policy: `chat` renders them with the tokenizer's chat template and
    the assistant turn opened, `plain` tokenizes the prompt text as it is, `auto` is `chat` when the
    tokenizer has a chat template."""
    num_prompts: int | None = Field(256, ge=1)
    """Sample for at most this many prompts: the first N demo prompts (in their fixed order) or the first
    N rows of the `prompts` file; null takes all."""
    demo_split: Literal["train", "held_out"] = "train"
    """Without a `prompts` input: the demo task's prompts to use. Held-out prompts are for evaluation,
    so annotation samples the train prompts."""
    max_operand: int = Field(19, ge=1)
    """Demo task: operands are drawn from 0..max_operand (as in the pretrain stage)."""
    batch_size: int = Field(128, ge=1)
    """Sequences generated together (prompts x candidates, split at any point). Changes speed and
    memory, not the samples."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to generate: `auto` picks CUDA when available."""


class DPOConfig(StageConfig):
    """Direct preference optimization on TRL's `DPOTrainer` (draft: the implementer refines the fields)."""

    seed: int = 0
    """Seed for data order and dropout."""
    beta: float = Field(0.1, gt=0)
    """Strength of the implicit KL constraint to the reference (SFT) policy."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: `auto` picks CUDA when available."""


class PPOConfig(StageConfig):
    """Our PPO with a reward model, a value model and a KL penalty to the SFT policy (draft)."""

    seed: int = 0
    """Seed for rollouts and initialisation."""
    updates: int = Field(100, ge=1)
    """PPO updates (each: a batch of rollouts, then several epochs of optimization on it)."""
    kl_coef: float = Field(0.05, ge=0)
    """Per-token KL penalty coefficient against the reference (SFT) policy."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: `auto` picks CUDA when available."""


class OnlineRLConfig(StageConfig):
    """RLOO / GRPO on TRL's trainers with the reward-model artifact as reward function (draft)."""

    seed: int = 0
    """Seed for generation and data order."""
    kl_coef: float = Field(0.05, ge=0)
    """KL coefficient (TRL's `beta`), set explicitly: GRPO's default of 0 disables the KL term."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: `auto` picks CUDA when available."""


class EvaluateConfig(StageConfig):
    """Compare policies on held-out prompts (draft)."""

    seed: int = 0
    """Seed of sampling and bootstrap."""
    baseline: str | None = None
    """Label of the policy others are compared against (win rate); default: the first one."""
    samples_per_prompt: int = Field(8, ge=1)
    """Samples per prompt for sampled accuracy and mean reward."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to generate: `auto` picks CUDA when available."""
