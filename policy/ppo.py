"""The `ppo` stage: proximal policy optimization of a policy against a reward model, our implementation.

Inputs: `policy` (the SFT policy: an adapter with `base.json`, or a full model), `reward` (a reward-model
directory, see `common.reward_model`) and optionally `prompts` (JSONL/Parquet with a `prompt` column;
without it, the task's train prompts). With a task, the rollouts' pass rate is reported (`pass_rate`
per update; `pass_rate_sampled` at the end).

Each update:
1. Rollouts: `batch_size` prompts (a seeded shuffle, different rows per process), one response each,
   sampled in left-padded batches with the KV cache, every response from its own seeded random stream
   (`policy.generation`), with the policy's LoRA folded into the base weights while generating.
2. Scoring, without gradients: one pass of the policy and value model gives the rollout log-probabilities
   and values; one pass of the reference gives its log-probabilities; the reward model scores each
   (prompt, response) formatted exactly as it was trained. Scores are normalized by their running mean
   and standard deviation; a response cut at `max_new_tokens` without eos gets `missing_eos_score`.
3. Rewards and advantages: every token is penalized by `kl_coef * (log pi - log pi_ref)`, the score is
   added at the last token; GAE gives advantages (whitened over the batch) and returns.
4. Optimization: `ppo_epochs` passes over the batch in `minibatches` minibatches, the clipped policy loss
   plus `vf_coef` times the clipped value loss, one AdamW step per minibatch.

The models, chosen to keep one copy of each set of weights in memory:
- Policy: an SFT adapter is trained further (so the output is an adapter on the same base as the SFT
  policy, as small as it, loaded the same way), and the KL reference is a frozen second copy of that
  adapter on the same base, switched in for the reference pass. A full model gets a fresh LoRA adapter,
  and the reference is the model with the adapter disabled.
- Value model: initialised from the reward model, whose score head becomes the value head applied at
  every token. It starts by predicting, at every prefix, the reward model's opinion of it, a better
  start than a random head, and it shares the reward model's tokenizer and inputs. With `value_model:
  lora` (default) it is the reward model with a LoRA adapter and a trained copy of the head, and
  rewards are scored by the same weights with the adapter disabled.
Dropout is off throughout: before the first step of an update, the new and old policies agree exactly.

Under `accelerate launch` (DDP, DeepSpeed ZeRO-2): the policy and value model are prepared together with
the optimizer; each process draws its own prompts and random streams; metrics are averaged over
processes; only the main process writes checkpoints (beside the per-process random states), logs and
the output. See `workflows/accelerate/README.md`.

Checkpoints go to `out_dir/scratch/checkpoint-<update>/` every `checkpoint_every` updates, written to a
temporary directory and renamed into place. A rerun after a crash resumes from the last one: prompts,
random streams and minibatch order are derived from (seed, update), so it continues as if never stopped.

Reads top to bottom: check, load, resume, train (rollouts, advantages, optimization), save, measure.
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import tasks
from common.configs import lora_config
from common.data import load_prompts
from common.models import (
    base_of,
    compute_dtype,
    dtype_name,
    is_adapter,
    load_causal_lm,
    load_tokenizer,
    pick_device,
    save_model,
    set_threads,
    source_reference,
)
from common.outcomes import InputError
from common.reward_model import check_reward_status, check_tokenizers_match, load_reward_model, score_batch
from common.training import SCRATCH, Table, last_checkpoint, log_to_wandb, wandb_run
from policy import audit, engines, ppo_math, vllm_engine
from policy.configs import PPOConfig
from policy.generation import Completion, Sampling, derive_seed, encode_prompts, generate, left_pad, stop_ids

POLICY, REFERENCE = "default", "reference"
"""Adapter names: the one trained, and the frozen copy of the SFT adapter that is the KL reference."""
STATE_FILE = "ppo_state.json"
"""In a checkpoint: the update index, the running reward statistics and the per-update metrics."""
HISTORY_FILE = "ppo.json"
"""In the output: the inputs, the model setup and every update's metrics."""


def run(config: PPOConfig, inputs: dict[str, Path | str], out_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()

    # Check: everything that can be told without loading weights
    policy_source, reward_source = inputs["policy"], inputs["reward"]
    task = tasks.load(config.task) if config.task is not None else None
    records = prompt_records(config, inputs.get("prompts"), task)
    if not isinstance(reward_source, Path):
        raise InputError(f"ppo: the reward model must be a local directory, got {reward_source!r}")
    check_reward_status(reward_source, config.allow_rejected_reward, "ppo")
    tokenizer = load_tokenizer(policy_source)
    check_tokenizers_match(
        tokenizer,
        reward_tokenizer(reward_source),
        policy=f"the policy {policy_source}",
        reward=f"the reward model {reward_source}",
    )
    check_policy_source(policy_source)
    prompt_ids = encode_prompts(tokenizer, [r["prompt"] for r in records], config.prompt_format)

    # Load
    accelerator = make_accelerator(config)
    set_threads(config.cpu_threads)
    device = accelerator.device
    dtype = compute_dtype(config.precision, device, policy_source)
    torch.manual_seed(config.seed)
    policy, base = load_policy(policy_source, config, device, dtype)
    critic, scorer, reward_mode = load_value_model(reward_source, config, device, dtype)
    check_lengths(config, policy, critic, prompt_ids)
    model = PolicyAndValue(policy, critic)
    optimizer = make_optimizer(model, config)
    total_steps = config.updates * config.ppo_epochs * config.minibatches
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total_steps))
    configure_deepspeed(accelerator, config)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_save_state_pre_hook(keep_trainable_weights)
    trainable = {
        "policy": count_trainable(policy),
        "value": count_trainable(critic),
    }

    # Resume
    scratch = out_dir / SCRATCH
    moments = ppo_math.RunningMoments()
    history: list[dict] = []
    start = 0
    checkpoint = last_checkpoint(scratch, STATE_FILE)
    if checkpoint is not None:
        start, moments, history = load_checkpoint(accelerator, checkpoint)
        if accelerator.is_main_process:
            print(f"ppo: resuming from update {start} of {config.updates} ({checkpoint})", flush=True)

    # Train
    unwrapped: PolicyAndValue = accelerator.unwrap_model(model)
    durations = []
    bar = tqdm(
        total=config.updates,
        initial=start,
        desc="ppo",
        unit="update",
        disable=not accelerator.is_main_process,
    )
    with contextlib.ExitStack() as stack:
        server = (
            vllm_rollouts(
                config, base, unwrapped.policy, tokenizer, scratch, prompt_ids, dtype, accelerator, stack
            )
            if config.engine == "vllm"
            else None
        )
        for update in range(start, config.updates):
            clock = time.perf_counter()
            rows = prompt_rows(len(records), update, config, accelerator)
            rollouts = collect_rollouts(
                unwrapped,
                scorer,
                reward_mode,
                tokenizer,
                [records[r] for r in rows],
                [prompt_ids[r] for r in rows],
                update,
                config,
                accelerator,
                task,
                server,
            )
            moments.update(accelerator.gather(rollouts.raw_scores))
            advantages, returns, kl = advantages_and_returns(rollouts, moments, config)
            stats = optimize(
                model, optimizer, scheduler, rollouts, advantages, returns, config, accelerator, update
            )
            metrics = update_metrics(rollouts, kl, stats, accelerator, scheduler)
            metrics["seconds"] = time.perf_counter() - clock
            history.append(metrics)
            if accelerator.is_main_process:
                log_update(metrics, update + 1, bar)
            if (update + 1) % config.checkpoint_every == 0 and update + 1 < config.updates:
                save_checkpoint(accelerator, scratch, update + 1, moments, history)
            durations.append(time.perf_counter() - clock)
    bar.close()
    if accelerator.is_main_process:
        log_rollouts(rollouts)

    # Save
    if accelerator.is_main_process:
        policy = accelerator.unwrap_model(model).policy
        if REFERENCE in policy.peft_config:
            policy.delete_adapter(REFERENCE)
        save_model(policy, tokenizer, out_dir, base=base)
        record = {
            "policy": source_reference(policy_source),
            "reward": source_reference(reward_source),
            "setup": setup_description(policy_source, config),
            "history": history,
        }
        (out_dir / HISTORY_FILE).write_text(json.dumps(record, indent=2) + "\n")
    accelerator.wait_for_everyone()

    # Measure
    engine: dict[str, Any] = {"engine": config.engine}
    if server is not None:  # which adapters the rollouts came from: one per update, named by digest
        engine.update(vllm_adapters_loaded=len(server.sync.pushed), vllm_adapter_last=server.sync.current)
        gaps = [entry["generator_logprob_gap"] for entry in history if "generator_logprob_gap" in entry]
        if gaps:
            engine["generator_logprob_gap_max"] = max(gaps)
    return engine | final_metrics(
        history,
        config,
        task is not None,
        start,
        durations,
        trainable,
        processes=accelerator.num_processes,
        device=str(device),
        dtype=dtype_name(unwrapped.policy),
        duration=time.perf_counter() - started,
    )


# --- check ---


def reward_tokenizer(reward: Path) -> Any:
    """The reward model's tokenizer, read before its weights (`load_reward_model` checks the rest)."""
    if not reward.is_dir():
        raise InputError(f"ppo: the reward model {reward} does not exist (expected a reward-model directory)")
    if not (reward / "tokenizer_config.json").is_file():
        raise InputError(
            f"ppo: the reward model {reward} has no tokenizer (tokenizer_config.json); "
            "expected a reward-model artifact written by the reward stage"
        )
    return load_tokenizer(reward)


def check_policy_source(source: Path | str) -> None:
    """An adapter policy must be one whose frozen copy can serve as the reference (not prompt learning)."""
    if not is_adapter(source):
        return
    assert isinstance(source, Path)
    config = json.loads((source / "adapter_config.json").read_text())
    if config.get("peft_type") in ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING"):
        raise InputError(
            f"ppo: the policy {source} is a {config['peft_type'].lower()} adapter; PPO trains LoRA-style "
            "adapters only. Merge it into its base first (rlhf export --merged) and use the merged model."
        )


def check_lengths(config: PPOConfig, policy: Any, critic: Any, prompt_ids: list[list[int]]) -> None:
    longest = max(len(ids) for ids in prompt_ids) + config.max_new_tokens
    for what, model in (("policy", policy), ("reward model", critic)):
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions is not None and longest > positions:
            raise InputError(
                f"ppo: the longest prompt plus max_new_tokens is {longest} tokens, more than the {what}'s "
                f"{positions} positions; lower max_new_tokens or shorten the prompts"
            )


# --- load ---


def prompt_records(
    config: PPOConfig, prompts: Path | str | None, task: tasks.Task | None
) -> list[dict[str, Any]]:
    """The first `num_prompts` rows of the prompts file, or of the task's train prompts
    (`{"id", "prompt", ...fields}`); with a task, every prompt must be one it can judge."""
    from policy.evaluate import check_judgeable
    from policy.sample import task_records

    if prompts is None:
        return task_records(task, "train", config.num_prompts, "ppo")[0]
    records = load_prompts(prompts, "ppo", config.num_prompts)
    if task is not None:
        check_judgeable(task, records, f"the prompts in {prompts}", "ppo")
    return records


def make_accelerator(config: PPOConfig) -> Any:
    """The `Accelerator`: the processes and devices `accelerate launch` set up, or this process alone on
    `config.device`."""
    from accelerate import Accelerator

    device = pick_device(config.device)  # refuses `cuda` without a GPU
    return Accelerator(cpu=device.type == "cpu")


def load_policy(
    source: Path | str, config: PPOConfig, device: torch.device, dtype: torch.dtype
) -> tuple[Any, Path | str]:
    """(the policy as a `PeftModel` with a trainable adapter, the base model the output adapter sits on).

    An SFT adapter is trained further, and a frozen copy of it is loaded beside it as the reference;
    a full model gets a fresh LoRA adapter, and the reference is the model with the adapter disabled."""
    from peft import get_peft_model

    if is_adapter(source):
        assert isinstance(source, Path)
        policy, _ = load_causal_lm(source, trainable=True, device=device, dtype=dtype)
        policy.load_adapter(str(source), adapter_name=REFERENCE, is_trainable=False)
        policy.set_adapter(POLICY)
        base = base_of(source)
    else:
        model, _ = load_causal_lm(source, device=device, dtype=dtype)
        policy = get_peft_model(model, lora_config(config))
        base = source
    policy.eval()  # no dropout: pi / pi_old is exactly 1 before an update's first step
    return policy, base


def load_value_model(
    source: Path, config: PPOConfig, device: torch.device, dtype: torch.dtype
) -> tuple[Any, Any, str]:
    """(value model, the model that scores rewards, `lora` or `full`), both from the reward model."""
    reward_model, _ = load_reward_model(source, device=device, dtype=dtype)
    if not hasattr(reward_model, "score") or not hasattr(reward_model, reward_model.base_model_prefix):
        raise InputError(
            f"ppo: the reward model {source} ({type(reward_model).__name__}) has no `score` head on a "
            "backbone, which the value model is built from"
        )
    if config.value_model == "full":
        critic, _ = load_reward_model(source, device=device, dtype=torch.float32)
        critic.requires_grad_(True)
        return critic, reward_model, "full"
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        task_type="SEQ_CLS",  # the score head goes to `modules_to_save`: a trained copy beside the original
        r=config.value_lora_r,
        lora_alpha=2 * config.value_lora_r,
        lora_dropout=0.0,
        target_modules=config.target_modules,
    )
    critic = get_peft_model(reward_model, lora)
    critic.eval()
    return critic, critic, "lora"


class PolicyAndValue(torch.nn.Module):
    """The policy and the value model as one module, so that DDP/DeepSpeed wrap (and synchronize the
    gradients of) both; its forward gives the policy's logits and the values at response positions."""

    def __init__(self, policy: Any, critic: Any):
        super().__init__()
        self.policy = policy
        self.critic = critic

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            self.policy_logits(input_ids, attention_mask, position_ids, width),
            self.values(input_ids, attention_mask, position_ids, width),
        )

    def policy_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, width: int
    ) -> torch.Tensor:
        """[B, width, vocab]: the logits that predict each of the last `width` tokens (the response)."""
        output = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=width + 1,
        )
        return output.logits[:, :-1]

    def values(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, width: int
    ) -> torch.Tensor:
        """[B, width]: the value head at the positions that predict each of the last `width` tokens."""
        model = self.critic.get_base_model() if hasattr(self.critic, "get_base_model") else self.critic
        backbone = getattr(model, model.base_model_prefix)
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return model.score(hidden[:, -width - 1 : -1]).squeeze(-1).float()


def make_optimizer(model: PolicyAndValue, config: PPOConfig) -> torch.optim.Optimizer:
    value_lr = config.value_lr or (config.lr if config.value_model == "lora" else config.lr / 10)
    groups = [
        {"params": [p for p in model.policy.parameters() if p.requires_grad], "lr": config.lr},
        {"params": [p for p in model.critic.parameters() if p.requires_grad], "lr": value_lr},
    ]
    return torch.optim.AdamW(groups, eps=1e-5, weight_decay=0.0)


def configure_deepspeed(accelerator: Any, config: PPOConfig) -> None:
    """DeepSpeed wants its micro-batch size stated when no data loader is prepared: one minibatch."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        ds = plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = config.batch_size // config.minibatches
        ds["gradient_accumulation_steps"] = 1
        ds.setdefault("gradient_clipping", config.max_grad_norm)
        if ds.get("zero_optimization", {}).get("stage", 0) == 3:
            raise InputError(
                "ppo: DeepSpeed ZeRO-3 is not supported (rollouts generate with the whole model on each "
                "process); use ZeRO-2 (workflows/accelerate/deepspeed_zero2.yaml)"
            )


def count_trainable(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- rollouts ---


def prompt_rows(count: int, update: int, config: PPOConfig, accelerator: Any) -> list[int]:
    """The prompt indices of this process's rollouts in `update`: consecutive slices of an endless
    sequence of seeded shuffles of all prompts (one per pass), so every prompt is used once per pass,
    and processes take different rows."""
    per_update = config.batch_size * accelerator.num_processes
    first = update * per_update + accelerator.process_index * config.batch_size
    rows = []
    for position in range(first, first + config.batch_size):
        epoch, offset = divmod(position, count)
        rows.append(shuffled(count, config.seed, epoch)[offset])
    return rows


@functools.lru_cache(maxsize=2)
def shuffled(count: int, seed: int, epoch: int) -> list[int]:
    """The prompt order of pass `epoch` over `count` prompts."""
    order = list(range(count))
    random.Random(derive_seed(seed, "prompts", epoch)).shuffle(order)
    return order


@contextlib.contextmanager
def generation_weights(policy: Any, config: PPOConfig) -> Iterator[None]:
    """Fold the trained adapter into the base weights while generating (float32 weights only, where
    unfolding restores them to rounding), else leave the model as it is."""
    weights_dtype = next(policy.parameters()).dtype
    if not config.merge_for_generation or weights_dtype != torch.float32:
        yield
        return
    policy.merge_adapter([POLICY])
    try:
        yield
    finally:
        policy.unmerge_adapter()


@contextlib.contextmanager
def reference_policy(policy: Any) -> Iterator[None]:
    """The KL reference: the frozen copy of the SFT adapter, or the model with the adapter disabled."""
    if REFERENCE not in policy.peft_config:
        with policy.disable_adapter():
            yield
        return
    policy.set_adapter(REFERENCE, inference_mode=True)
    try:
        yield
    finally:
        policy.set_adapter(POLICY)  # makes the trained adapter trainable again, and the reference frozen


def vllm_rollouts(
    config: PPOConfig,
    base: Path | str,
    policy: Any,
    tokenizer: Any,
    scratch: Path,
    prompt_ids: list[list[int]],
    dtype: torch.dtype,
    accelerator: Any,
    stack: contextlib.ExitStack,
) -> vllm_engine.RolloutServer:
    """A vLLM server serving the policy's base (stopped when `stack` closes), or the external one."""
    return vllm_engine.rollout_server(
        stack,
        vllm_engine.Served(vllm_engine.merged(base, scratch)),
        config.vllm,
        stage="ppo",
        processes=accelerator.num_processes,
        dtype=str(dtype).removeprefix("torch."),
        max_model_len=engines.response_budget(prompt_ids, config.max_new_tokens),
        lora_rank=policy.peft_config[POLICY].r,
        seed=config.seed,
        tokenizer=tokenizer,
        stop_token_ids=stop_ids(policy, tokenizer),
        folder=scratch / "vllm-adapters",
    )


@dataclass
class Rollouts:
    """One update's rollouts of one process, as tensors of B rows: the prompt (left-padded) and the
    response (right-padded) side by side, and what the scoring passes found."""

    input_ids: torch.Tensor
    """[B, P + R] prompt and response tokens."""
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    responses: torch.Tensor
    """[B, R] the response tokens (eos included when finished), padded on the right."""
    mask: torch.Tensor
    """[B, R] float, 1 on response tokens."""
    logprobs: torch.Tensor
    """[B, R] log pi_old of each response token (at the sampling temperature)."""
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor
    """[B, R] the entropy of the policy's next-token distribution at each response position."""
    raw_scores: torch.Tensor
    """[B] the reward model's scores."""
    finished: torch.Tensor
    """[B] bool: the response ended with eos."""
    verdicts: list[float] | None
    """Demo prompts only: whether each response is right (and finished)."""
    prompts: list[Any]
    texts: list[str]
    """The responses, decoded."""
    generator_logprob_gap: float | None = None
    """`engine: vllm` at temperature 1: the largest difference between the server's log-probability of a
    response token and the one computed here (the loss uses the latter): near 0 in float32 when the
    server has the current adapter; larger in bf16, or when it has not."""

    def columns(self, rows: torch.Tensor) -> tuple[slice, int]:
        """For the rows `rows`: the columns of `input_ids` that hold any of their tokens (leading padding
        and trailing response padding dropped) and the width of their longest response."""
        width = int(self.mask[rows].sum(dim=1).max().item())
        prompt_width = self.input_ids.shape[1] - self.responses.shape[1]
        first = int(self.attention_mask[rows, :prompt_width].any(dim=0).float().argmax().item())
        return slice(first, prompt_width + width), width


def collect_rollouts(
    model: PolicyAndValue,
    scorer: Any,
    reward_mode: str,
    tokenizer: Any,
    records: list[dict[str, Any]],
    prompt_ids: list[list[int]],
    update: int,
    config: PPOConfig,
    accelerator: Any,
    task: tasks.Task | None,
    server: vllm_engine.RolloutServer | None = None,
) -> Rollouts:
    """One response per prompt, each row from its own random stream (seeded by the seed, the update, the
    process and the row), then scored (`score_rollouts`, which computes the log-probabilities the loss
    uses in this process, whatever generated). Sampled here with the adapter folded in, or (`server`) by
    vLLM after the current adapter was loaded into it."""
    seeds = [
        derive_seed(config.seed, "rollout", update, accelerator.process_index, i) for i in range(len(records))
    ]
    sampling = Sampling(config.temperature, max_new_tokens=config.max_new_tokens)
    if server is not None:
        completions = server.generate(model.policy, prompt_ids, sampling, seeds, POLICY)
    else:
        with generation_weights(model.policy, config):
            completions = generate(
                model.policy,
                tokenizer,
                prompt_ids,
                sampling,
                seeds=seeds,
                batch_size=config.forward_batch_size,
                stop_token_ids=stop_ids(model.policy, tokenizer),
            )
    rollouts = score_rollouts(
        model, scorer, reward_mode, tokenizer, records, prompt_ids, completions, config, task
    )
    if server is not None and config.temperature == 1.0:  # the server's log-probabilities are untempered
        served = torch.zeros_like(rollouts.logprobs)
        for row, values in enumerate(server.engine.logprobs):
            served[row, : len(values)] = torch.tensor(values, dtype=served.dtype)
        gap = ((served - rollouts.logprobs).abs() * rollouts.mask).max()
        rollouts.generator_logprob_gap = gap.item()
    return rollouts


def score_rollouts(
    model: PolicyAndValue,
    scorer: Any,
    reward_mode: str,
    tokenizer: Any,
    records: list[dict[str, Any]],
    prompt_ids: list[list[int]],
    completions: list[Completion],
    config: PPOConfig,
    task: tasks.Task | None,
) -> Rollouts:
    """Tensors of the rollouts, with log-probabilities (policy and reference), values, entropies and the
    reward model's scores: no gradients, `forward_batch_size` rows per pass."""
    device = next(model.policy.parameters()).device
    pad = tokenizer.pad_token_id
    prompts, prompt_mask = left_pad(prompt_ids, pad, device)
    width = max(len(c.token_ids) for c in completions)
    responses = torch.full((len(completions), width), pad, dtype=torch.long)
    for row, completion in enumerate(completions):
        responses[row, : len(completion.token_ids)] = torch.tensor(completion.token_ids)
    responses = responses.to(device)
    lengths = torch.tensor([len(c.token_ids) for c in completions], device=device)
    mask = (torch.arange(width, device=device)[None, :] < lengths[:, None]).long()
    attention_mask = torch.cat([prompt_mask, mask], dim=1)
    batch = Rollouts(
        input_ids=torch.cat([prompts, responses], dim=1),
        attention_mask=attention_mask,
        position_ids=(attention_mask.cumsum(dim=1) - 1).clamp(min=0),
        responses=responses,
        mask=mask.float(),
        logprobs=torch.zeros(mask.shape, device=device),
        ref_logprobs=torch.zeros(mask.shape, device=device),
        values=torch.zeros(mask.shape, device=device),
        entropy=torch.zeros(mask.shape, device=device),
        raw_scores=torch.zeros(len(completions), device=device),
        finished=torch.tensor([c.finished for c in completions], device=device),
        verdicts=None,
        prompts=[r["prompt"] for r in records],
        texts=[c.text for c in completions],
    )
    with torch.no_grad():
        for start in range(0, len(completions), config.forward_batch_size):
            rows = torch.arange(
                start, min(start + config.forward_batch_size, len(completions)), device=device
            )
            columns, w = batch.columns(rows)
            inputs = (
                batch.input_ids[rows, columns],
                attention_mask[rows, columns],
                batch.position_ids[rows, columns],
            )
            logits, values = model(*inputs, w)
            tokens = responses[rows, :w]
            batch.logprobs[rows, :w] = ppo_math.token_logprobs(logits, tokens, config.temperature)
            batch.entropy[rows, :w] = ppo_math.entropy_from_logits(logits / config.temperature)
            batch.values[rows, :w] = values
            with reference_policy(model.policy):
                ref_logits = model.policy_logits(*inputs, w)
            batch.ref_logprobs[rows, :w] = ppo_math.token_logprobs(ref_logits, tokens, config.temperature)
        with model.critic.disable_adapter() if reward_mode == "lora" else contextlib.nullcontext():
            scores = score_batch(
                scorer, tokenizer, batch.prompts, batch.texts, batch_size=config.forward_batch_size
            )
    batch.raw_scores = torch.tensor(scores, device=device)
    for name in ("logprobs", "ref_logprobs", "values", "entropy"):
        setattr(batch, name, getattr(batch, name) * batch.mask)
    if task is not None:
        batch.verdicts = [
            task.judge(r, c.text, c.finished) for c, r in zip(completions, records, strict=True)
        ]
    return batch


# --- advantages ---


def advantages_and_returns(
    rollouts: Rollouts, moments: ppo_math.RunningMoments, config: PPOConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(whitened advantages, returns, per-token KL estimate), each [B, R]."""
    mean, std = (moments.mean, moments.std) if config.normalize_reward else (0.0, 1.0)
    scores = ppo_math.final_scores(
        rollouts.raw_scores, rollouts.finished, mean, std, config.missing_eos_score
    )
    rewards, kl = ppo_math.token_rewards(
        scores, rollouts.logprobs, rollouts.ref_logprobs, rollouts.mask, config.kl_coef
    )
    advantages, returns = ppo_math.gae(rewards, rollouts.values, rollouts.mask, config.gamma, config.lam)
    return ppo_math.whiten(advantages, rollouts.mask), returns, kl


# --- optimization ---


def optimize(
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rollouts: Rollouts,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    config: PPOConfig,
    accelerator: Any,
    update: int,
) -> dict[str, float]:
    """`ppo_epochs` passes over the rollouts in shuffled minibatches, one optimizer step each; the means
    of the losses and clip fractions over all steps."""
    count = rollouts.mask.shape[0]
    size = count // config.minibatches
    generator = torch.Generator().manual_seed(
        derive_seed(config.seed, "minibatches", update, accelerator.process_index)
    )
    params = [p for group in optimizer.param_groups for p in group["params"]]
    totals: dict[str, float] = {}
    steps = 0
    for _ in range(config.ppo_epochs):
        order = torch.randperm(count, generator=generator).to(rollouts.mask.device)
        for start in range(0, count, size):
            rows = order[start : start + size]
            columns, w = rollouts.columns(rows)
            logits, values = model(
                rollouts.input_ids[rows, columns],
                rollouts.attention_mask[rows, columns],
                rollouts.position_ids[rows, columns],
                w,
            )
            mask = rollouts.mask[rows, :w]
            logprobs = ppo_math.token_logprobs(logits, rollouts.responses[rows, :w], config.temperature)
            pg = ppo_math.policy_loss(
                logprobs, rollouts.logprobs[rows, :w], advantages[rows, :w], mask, config.clip_range
            )
            vf = ppo_math.value_loss(
                values, rollouts.values[rows, :w], returns[rows, :w], mask, config.value_clip_range
            )
            loss = pg.loss + config.vf_coef * vf.loss
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            for key, value in (
                ("policy_loss", pg.loss),
                ("value_loss", vf.loss),
                ("policy_clip_fraction", pg.clip_fraction),
                ("value_clip_fraction", vf.clip_fraction),
                ("approx_kl", pg.approx_kl),
            ):
                totals[key] = totals.get(key, 0.0) + value.item()
            steps += 1
    return {key: value / steps for key, value in totals.items()}


# --- logging ---


def update_metrics(
    rollouts: Rollouts,
    kl: torch.Tensor,
    stats: dict[str, float],
    accelerator: Any,
    scheduler: Any,
) -> dict[str, float]:
    """One update's metrics, averaged over processes (each has the same number of rollouts)."""
    mask = rollouts.mask
    local = {
        "reward": rollouts.raw_scores.mean().item(),
        "reward_std": rollouts.raw_scores.std().item() if len(rollouts.raw_scores) > 1 else 0.0,
        "kl": kl.sum(dim=1).mean().item(),
        "entropy": ppo_math.masked_mean(rollouts.entropy, mask).item(),
        "response_length": mask.sum(dim=1).mean().item(),
        "eos_rate": rollouts.finished.float().mean().item(),
        "value_mean": ppo_math.masked_mean(rollouts.values, mask).item(),
        **stats,
    }
    if rollouts.verdicts is not None:
        local["pass_rate"] = tasks.pass_rate(rollouts.verdicts)
    if rollouts.generator_logprob_gap is not None:
        local["generator_logprob_gap"] = rollouts.generator_logprob_gap
    values = torch.tensor(list(local.values()), device=mask.device)
    averaged = accelerator.reduce(values, reduction="mean") if accelerator.num_processes > 1 else values
    metrics = dict(zip(local, averaged.tolist(), strict=True))
    metrics["lr"] = scheduler.get_last_lr()[0]
    return metrics


def log_update(metrics: dict[str, float], update: int, bar: Any) -> None:
    """To W&B (when the runner opened a run in this process) and the progress bar."""
    log_to_wandb({f"ppo/{key}": value for key, value in metrics.items()} | {"ppo/update": update})
    postfix = {"reward": metrics["reward"], "kl": metrics["kl"], "eos": metrics["eos_rate"]}
    if "pass_rate" in metrics:
        postfix["pass"] = metrics["pass_rate"]
    bar.set_postfix({key: f"{value:.3f}" for key, value in postfix.items()}, refresh=False)
    bar.update(1)


def log_rollouts(rollouts: Rollouts) -> None:
    """A W&B table of the last update's rollouts (prompt, response, score, ...), when a run is open."""
    if wandb_run() is None:
        return
    columns = ["prompt", "response", "score", "finished"] + (["verdict"] if rollouts.verdicts else [])
    rows = [
        [
            p if isinstance(p, str) else json.dumps(p),
            text,
            score,
            finished,
            *([rollouts.verdicts[i]] if rollouts.verdicts else []),
        ]
        for i, (p, text, score, finished) in enumerate(
            zip(
                rollouts.prompts,
                rollouts.texts,
                rollouts.raw_scores.tolist(),
                rollouts.finished.tolist(),
                strict=True,
            )
        )
    ]
    log_to_wandb({"ppo/rollouts": Table(columns, rows)})


# --- checkpoints ---


def keep_trainable_weights(models: list[Any], weights: list[dict[str, Any]], output_dir: str) -> None:
    """`accelerator.save_state` hook: checkpoint the trained weights only (adapters, value head), not
    the frozen base models, which the rerun loads from the inputs again."""
    for model, state in zip(models, weights, strict=False):
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        for key in [k for k in state if k not in trainable]:
            del state[key]


def save_checkpoint(
    accelerator: Any, scratch: Path, update: int, moments: ppo_math.RunningMoments, history: list[dict]
) -> None:
    """Write `scratch/checkpoint-<update>` atomically (a temporary directory renamed into place) and
    drop the older ones. Every process writes its random states into it; the main process the rest."""
    temporary = scratch / f".tmp-checkpoint-{update}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"update": update, "reward_moments": vars(moments), "history": history}
        (temporary / STATE_FILE).write_text(json.dumps(state) + "\n")
        target = scratch / f"checkpoint-{update}"
        shutil.rmtree(target, ignore_errors=True)
        temporary.rename(target)
        for old in scratch.glob("checkpoint-*"):
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator: Any, checkpoint: Path) -> tuple[int, ppo_math.RunningMoments, list[dict]]:
    """Restore the trained weights, optimizer, scheduler and random states; (update, moments, history)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.load_state(str(checkpoint), load_module_strict=False)
    else:
        accelerator.load_state(str(checkpoint), strict=False)
    state = json.loads((checkpoint / STATE_FILE).read_text())
    return state["update"], ppo_math.RunningMoments(**state["reward_moments"]), state["history"]


# --- measure ---


def setup_description(policy_source: Path | str, config: PPOConfig) -> dict[str, str]:
    if is_adapter(policy_source):
        policy = "the SFT adapter, trained further; reference: a frozen copy of it"
    else:
        policy = f"a fresh LoRA adapter (r={config.lora_r}) on the model; reference: the adapter disabled"
    value = (
        "the reward model with a LoRA adapter and a trained copy of its score head; rewards: adapter disabled"
        if config.value_model == "lora"
        else "a full copy of the reward model, trained; rewards: the frozen reward model"
    )
    return {"policy": policy, "value_model": value}


def final_metrics(
    history: list[dict[str, float]],
    config: PPOConfig,
    judged: bool,
    resumed_from: int,
    durations: list[float],
    trainable: dict[str, int],
    processes: int,
    device: str,
    dtype: str,
    duration: float,
) -> dict[str, Any]:
    """Initial (first update, i.e. the SFT policy's rollouts) and final (mean over the last
    `metrics_window` updates) values, counts and timings."""
    window = history[-config.metrics_window :]

    def final(key: str) -> float:
        return sum(entry[key] for entry in window) / len(window)

    timed = durations[1:] or durations  # the first update of a process includes warm-up
    metrics: dict[str, Any] = {
        "reward_final": final("reward"),
        "reward_initial": history[0]["reward"],
        "kl_final": final("kl"),
        "entropy_final": final("entropy"),
        "eos_rate_final": final("eos_rate"),
        "response_length_final": final("response_length"),
        "value_loss_final": final("value_loss"),
    }
    if judged:
        metrics["pass_rate_sampled"] = final("pass_rate")
        metrics["pass_rate_sampled_initial"] = history[0]["pass_rate"]
        metrics.update(
            audit.training_audit(
                metrics["reward_initial"],
                metrics["reward_final"],
                metrics["pass_rate_sampled_initial"],
                metrics["pass_rate_sampled"],
            )
        )
    metrics.update(
        updates=len(history),
        episodes=len(history) * config.batch_size * processes,
        resumed_from_update=resumed_from or None,
        seconds_per_update=sum(timed) / len(timed) if timed else None,
        trainable_parameters_policy=trainable["policy"],
        trainable_parameters_value=trainable["value"],
        processes=processes,
        device=device,
        dtype=dtype,
        duration_seconds=duration,
    )
    return metrics
