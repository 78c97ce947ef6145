"""The `rloo` and `grpo` stages: on-policy RL on TRL's `RLOOTrainer` / `GRPOTrainer`, rewarded by a reward
model or by the task's verdict.

Inputs: `policy`, the SFT policy (an adapter or a complete model), which is the starting point and the
frozen KL reference; `reward`, a reward-model artifact (with `reward: model`, the default; none with
`reward: task`); optionally `prompts` (JSONL/Parquet with a `prompt` column, a string or a list of chat
messages; default: the task's train prompts, with the fields its verdict needs).

Each step samples `num_generations` completions for each of `batch_size / num_generations` prompts, scores
them and pushes up the completions that beat the others of their prompt (RLOO: each against the mean of
the others; GRPO: against the group mean, scaled), with a KL penalty to the SFT policy of weight `kl_coef`
(RLOO subtracts it from the reward, GRPO adds it to the loss).

`reward: model`: the reward function is a callable around `common.reward_model.score_batch`, so
completions are formatted exactly as the reward model was trained (its chat template, eos); on prompts
the task can judge it also logs their pass rate (`pass_rate` in the training logs). Before any training
the stage refuses a reward model whose tokenizer or chat template differs from the policy's, and one whose
manifest says its acceptance gate rejected it (unless `allow_rejected_reward`).
`reward: task`: a verifiable reward, `TaskReward`: the task's verdict on each completion (`Task.judge`,
0 for a completion cut off at `max_new_tokens`). Every prompt must be one the task can judge.

The result is published as one complete model, or with `publish: adapter` as the new adapter on the SFT
policy (see `policy/tuning.py`).

Reads top to bottom: check, load, train, save, measure.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import tasks
from common.data import load_prompts
from common.models import dtype_name, load_tokenizer, pick_device, set_threads
from common.outcomes import InputError
from common.reward_model import (
    check_reward_status,
    check_tokenizers_match,
    load_reward_model,
    response_text,
    score_batch,
)
from common.training import (
    SCRATCH,
    count_parameters,
    final_train_loss,
    last_checkpoint,
    set_loss_chunk,
    trainer_arguments,
)
from policy import audit, tuning, vllm_engine
from policy.configs import GRPOConfig, OnlineRLConfig, RLOOConfig
from policy.generation import Sampling, derive_seed
from tasks import Task


def run_rloo(config: RLOOConfig, inputs: dict[str, Path | str], out_dir: Path) -> dict[str, Any]:
    return run(config, inputs, out_dir, "rloo")


def run_grpo(config: GRPOConfig, inputs: dict[str, Path | str], out_dir: Path) -> dict[str, Any]:
    return run(config, inputs, out_dir, "grpo")


def run(config: OnlineRLConfig, inputs: dict[str, Path | str], out_dir: Path, stage: str) -> dict[str, Any]:
    started = time.perf_counter()

    # Check: everything that can be told before loading the policy's weights
    device = pick_device(config.device)
    task = tasks.load(config.task) if config.task is not None else None
    check_reward_source(config, inputs, stage)
    check_engine(config, stage)
    if config.task_eval and task is None:
        raise InputError(
            f"{stage}: task_eval needs a task (the workflow's top-level `task:` or this stage's)"
        )
    policy_tokenizer = load_tokenizer(inputs["policy"])
    rows = prompt_rows(config, inputs.get("prompts"), policy_tokenizer, stage, task)
    if config.reward == "task":
        assert task is not None  # the config's validator makes sure
        reward: Any = TaskReward(task, config.max_new_tokens, policy_tokenizer.eos_token_id)
    else:
        reward_dir = Path(inputs["reward"])
        check_reward_status(reward_dir, config.allow_rejected_reward, stage)
        reward_model, reward_tokenizer = load_reward_model(reward_dir, device=device)
        check_tokenizers_match(
            policy_tokenizer, reward_tokenizer, "the policy", f"the reward model {reward_dir}"
        )
        judged = task if task is not None and all(TASK_RECORD in row for row in rows) else None
        reward = RewardModel(
            reward_model, reward_tokenizer, config.reward_batch_size, judged, config.max_new_tokens
        )
    set_threads(config.cpu_threads)

    # Load: the SFT policy's complete weights (an adapter merged into its base)
    scratch = out_dir / SCRATCH
    model, tokenizer = tuning.load_start(
        inputs["policy"], scratch, stage, config.method, device, config.precision
    )

    # Train
    from datasets import Dataset

    trainer_class, args = trainer_and_args(config, stage, device, scratch, inputs["policy"])
    set_loss_chunk(config.loss_chunk_size, device)
    with contextlib.ExitStack() as stack:
        if config.engine == "vllm":
            trainer_class = with_vllm_rollouts(trainer_class)
        trainer = trainer_class(
            model=model,
            reward_funcs=reward,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=tuning.lora_config(config),
        )
        if config.engine == "vllm":
            trainer.rollout_server = vllm_rollouts(config, model, trainer, scratch, stack, stage)
        trainable, total = count_parameters(trainer.model)
        checkpoint = last_checkpoint(scratch)
        if checkpoint is not None:
            print(f"{stage}: resuming from {checkpoint.name}", flush=True)
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    engine: dict[str, Any] = {"engine": config.engine}
    if config.engine == "vllm":  # which adapters the rollouts came from: one per optimizer step
        sync = trainer.rollout_server.server.sync
        engine.update(vllm_adapters_loaded=len(sync.pushed), vllm_adapter_last=sync.current)

    # Save
    model = tuning.publish(trainer.model, tokenizer, out_dir, config, stage, dict(inputs))

    # Measure
    measured: dict[str, Any] = {}
    if task is not None and (config.task_eval or (config.task_eval is None and "prompts" not in inputs)):
        from policy.evaluate import task_pass_rates

        measured = task_pass_rates(model, tokenizer, task, config.task_eval_samples, config.seed)
    trained = training_metrics(trainer)
    return {
        **engine,
        **measured,
        **trained,
        **gaming_check(trained, config),
        "train_loss": final_train_loss(trainer, result.training_loss),
        "prompts": len(rows),
        "method": config.method,
        "publish": config.publish,
        "reward_source": config.reward,
        "kl_coef": config.kl_coef,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "steps": trainer.state.global_step,
        "completions": trainer.state.global_step * config.batch_size * config.gradient_accumulation_steps,
        "train_seconds": result.metrics["train_runtime"],
        "device": str(device),
        "dtype": dtype_name(model),
        "duration_seconds": time.perf_counter() - started,
    }


# --- check ---


def check_engine(config: OnlineRLConfig, stage: str) -> None:
    """`engine: vllm` sends the trained adapter to the server after each step: a LoRA, not full weights
    (which TRL sends to its own `trl vllm-serve` over NCCL, on GPUs only)."""
    if config.engine == "vllm" and config.method != "lora":
        raise InputError(
            f"{stage}: engine: vllm needs method: lora (the server takes the trained adapter at each step; "
            "full weights cannot be loaded into it at run time)"
        )


def check_reward_source(config: OnlineRLConfig, inputs: dict[str, Path | str], stage: str) -> None:
    """Exactly one source of rewards: a `reward` input (`reward: model`) or the task (`reward: task`)."""
    if config.reward == "model" and "reward" not in inputs:
        raise InputError(
            f"{stage}: no `reward` input; give a reward model (inputs.reward), or set `reward: task` to reward "
            "completions by the task's verdict"
        )
    if config.reward == "task" and "reward" in inputs:
        raise InputError(
            f"{stage}: `reward: task` rewards completions by the task's verdict, so the `reward` input "
            f"({inputs['reward']}) would be unused; remove one of them"
        )


# --- data ---

TASK_RECORD = "task_record"
"""The column of the training rows that holds the task's record of the prompt (JSON), for the verdict."""


def prompt_rows(
    config: OnlineRLConfig, prompts: Path | str | None, tokenizer: Any, stage: str, task: Task | None
) -> list[dict[str, Any]]:
    """Training rows `{"prompt", "task_record"?}`: a prompt as chat messages when the policy has a chat
    template (TRL renders it with the template and opens the assistant turn), else as plain text; the
    prompt's record (JSON) when the task can judge it. With `reward: task` every prompt must be judgeable."""
    from policy.sample import task_records

    chat = bool(tokenizer.chat_template)
    if prompts is None:
        records, _ = task_records(task, "train", config.num_prompts, stage)
    else:
        records = load_prompts(prompts, stage, config.num_prompts)
    if config.reward == "task":
        from policy.evaluate import check_judgeable

        assert task is not None
        check_judgeable(task, records, f"the prompts in {prompts}", stage)
    rows = []
    for record in records:
        prompt = record["prompt"]
        if isinstance(prompt, list) and not chat:
            raise InputError(
                f"{stage}: the prompts are chat messages, but the policy's tokenizer has no chat template"
            )
        if isinstance(prompt, str) and chat:
            prompt = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, str) and prompts is None:
            prompt = plain_prompt(prompt)
        row: dict[str, Any] = {"prompt": prompt}
        if task is not None and not task.missing(record):
            row[TASK_RECORD] = json.dumps(record, default=str)
        rows.append(row)
    return rows


def plain_prompt(prompt: str) -> str:
    """A task's prompt for a policy without a chat template: the text and a line break (as the demo's
    pretraining corpus asks its questions)."""
    return prompt + "\n"


# --- train ---


def ended(ids: list[int], max_new_tokens: int, eos_token_id: int | None) -> bool:
    """Whether a completion ended at its stop token rather than being cut off at `max_new_tokens`."""
    return len(ids) < max_new_tokens or (bool(ids) and ids[-1] == eos_token_id)


class TaskReward:
    """A TRL reward function: the task's verdict on each completion (`Task.judge`: a completion cut off at
    `max_new_tokens` fails)."""

    __name__ = "task"

    def __init__(self, task: Task, max_new_tokens: int, eos_token_id: int | None):
        self.task, self.max_new_tokens, self.eos_token_id = task, max_new_tokens, eos_token_id

    def __call__(
        self,
        prompts: list[Any],
        completions: list[Any],
        completion_ids: list[list[int]],
        task_record: list[str],
        **_: Any,
    ) -> list[float]:
        return [
            self.task.judge(
                json.loads(record), response_text(c), ended(ids, self.max_new_tokens, self.eos_token_id)
            )
            for c, ids, record in zip(completions, completion_ids, task_record, strict=True)
        ]


class RewardModel:
    """A TRL reward function: the reward model's score of each (prompt, completion), formatted as in its
    training. With a task that can judge the prompts it also logs the completions' pass rate (`pass_rate`)."""

    __name__ = "reward_model"

    def __init__(
        self, model: Any, tokenizer: Any, batch_size: int, task: Task | None = None, max_new_tokens: int = 0
    ):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.verdict = TaskReward(task, max_new_tokens, tokenizer.eos_token_id) if task is not None else None

    def __call__(
        self,
        prompts: list[Any],
        completions: list[Any],
        completion_ids: list[list[int]] | None = None,
        task_record: list[str] | None = None,
        log_metric: Any = None,
        **_: Any,
    ) -> list[float]:
        rewards = score_batch(self.model, self.tokenizer, prompts, completions, self.batch_size)
        if self.verdict is not None and task_record is not None and completion_ids is not None and log_metric:
            verdicts = self.verdict(prompts, completions, completion_ids, task_record)
            log_metric("pass_rate", tasks.pass_rate(verdicts))
        return rewards


def trainer_and_args(
    config: OnlineRLConfig, stage: str, device: torch.device, scratch: Path, model: Path | str
) -> tuple[type, Any]:
    """TRL's trainer class and its arguments: the settings both share, then each one's own."""
    common = {
        **trainer_arguments(config, device, scratch, model),
        "num_generations": config.num_generations,
        "max_completion_length": config.max_new_tokens,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "top_k": 0,
        "beta": config.kl_coef,  # explicit: GRPO's default 0 would drop the KL term
        "num_iterations": config.num_iterations,
        "epsilon": config.epsilon,
    }
    if stage == "rloo":
        from trl import RLOOConfig as TRLRLOOConfig
        from trl import RLOOTrainer

        assert isinstance(config, RLOOConfig)
        return RLOOTrainer, TRLRLOOConfig(**common, normalize_advantages=config.normalize_advantages)
    from trl import GRPOConfig as TRLGRPOConfig
    from trl import GRPOTrainer

    assert isinstance(config, GRPOConfig)
    return GRPOTrainer, TRLGRPOConfig(
        **common, loss_type=config.loss_type, scale_rewards=config.scale_rewards
    )


# --- rollouts from vLLM ---


def vllm_rollouts(
    config: OnlineRLConfig, model: Any, trainer: Any, scratch: Path, stack: contextlib.ExitStack, stage: str
) -> VLLMRollouts:
    """A vLLM server serving the start weights (stopped when `stack` closes), or the external one; the
    trainer's LoRA adapter is loaded into it before each step's rollouts."""
    start = model.config._name_or_path  # `tuning.load_start` loads the start weights from their folder
    server = vllm_engine.rollout_server(
        stack,
        vllm_engine.Served(Path(start) if Path(start).is_dir() else start),
        config.vllm,
        stage=stage,
        processes=trainer.accelerator.num_processes,
        dtype=dtype_name(model),
        max_model_len=min(
            config.max_new_tokens + MAX_PROMPT_TOKENS,
            getattr(model.config, "max_position_embeddings", None) or 1 << 30,
        ),
        lora_rank=config.lora_r,
        seed=config.seed,
        tokenizer=trainer.processing_class,
        stop_token_ids=list(trainer.eos_token_ids),
        folder=scratch / "vllm-adapters",
    )
    return VLLMRollouts(server, config)


MAX_PROMPT_TOKENS = 1024
"""The server's room for a prompt (TRL's trainers do not truncate prompts by default)."""


@dataclass
class VLLMRollouts:
    """The server and the sampling settings of TRL's `engine: vllm` rollouts."""

    server: vllm_engine.RolloutServer
    config: OnlineRLConfig
    calls: dict[int, int] = field(default_factory=dict)
    """Generation calls per optimizer step so far (a step may generate more than once)."""

    def completions(self, trainer: Any, prompt_ids: list[list[int]]) -> list[list[int]]:
        """The completion token ids (eos included when finished) of one sampled completion per prompt row
        (TRL repeats each prompt `num_generations` times), after the current adapter reached the server.
        Row i of generation call c of step s on process p is seeded by (seed, s, c, p, i), so a resumed
        run draws what the uninterrupted one did."""
        step = trainer.state.global_step
        call = self.calls.get(step, 0)
        self.calls[step] = call + 1
        process = trainer.accelerator.process_index
        seeds = [
            derive_seed(self.config.seed, "rollout", step, call, process, i) for i in range(len(prompt_ids))
        ]
        sampling = Sampling(
            self.config.temperature, self.config.top_p, max_new_tokens=self.config.max_new_tokens
        )
        model = trainer.accelerator.unwrap_model(trainer.model)
        return [c.token_ids for c in self.server.generate(model, prompt_ids, sampling, seeds)]


def with_vllm_rollouts(trainer_class: type) -> type:
    """`trainer_class` (TRL's RLOO or GRPO trainer) generating through `trainer.rollout_server`: its
    log-probabilities, the old policy's included, are computed by the trainer as without vLLM (TRL's
    own vLLM path would take the server's for importance sampling)."""

    class VLLMRolloutTrainer(trainer_class):  # type: ignore[misc, valid-type]
        rollout_server: VLLMRollouts

        def _generate_single_turn(self, prompt_ids: list[list[int]], *args: Any, **kwargs: Any) -> Any:
            completion_ids = self.rollout_server.completions(self, prompt_ids)
            # GRPO's returns the sampling log-probabilities too: none, so none are used
            return (completion_ids, None) if trainer_class.__name__ == "GRPOTrainer" else completion_ids

    VLLMRolloutTrainer.__name__ = f"VLLM{trainer_class.__name__}"
    return VLLMRolloutTrainer


# --- measure ---


def training_metrics(trainer: Any) -> dict[str, Any]:
    """Reward, KL, completion length and the completions' pass rate at the first and last logging step (each
    a mean over `logging_steps` steps)."""
    return tuning.first_and_last(
        trainer,
        {
            "reward": "reward",
            "kl": "kl",
            "completions/mean_length": "completion_length",
            "pass_rate": "train_pass_rate",
        },
    )


def gaming_check(metrics: dict[str, Any], config: OnlineRLConfig) -> dict[str, Any]:
    """The reward-hacking rule (`policy/audit.py`) on the rollouts, first logged steps against the last:
    only with a reward model (the task's verdict as reward cannot be gamed against itself)."""
    if config.reward != "model" or "reward_first" not in metrics:
        return {}
    return audit.training_audit(
        metrics["reward_first"],
        metrics["reward_last"],
        metrics.get("train_pass_rate_first"),
        metrics.get("train_pass_rate_last"),
    )
