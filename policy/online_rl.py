"""The `rloo` and `grpo` stages: on-policy RL with the reward model, on TRL's `RLOOTrainer` / `GRPOTrainer`.

Inputs: `policy`, the SFT policy (an adapter or a complete model), which is the starting point and the
frozen KL reference; `reward`, a reward-model artifact; optionally `prompts` (JSONL/Parquet with a `prompt`
column, a string or a list of chat messages; default: the demo task's train prompts, with their answers).

Each step samples `num_generations` completions for each of `batch_size / num_generations` prompts, scores
them with the reward model and pushes up the completions that beat the others of their prompt (RLOO: each
against the mean of the others; GRPO: against the group mean, scaled), with a KL penalty to the SFT policy
of weight `kl_coef` (RLOO subtracts it from the reward, GRPO adds it to the loss).

The reward function is a callable around `common.reward_model.score_batch`, so completions are formatted
exactly as the reward model was trained (its chat template, eos). Passing the reward model itself to TRL
would render the text with the same template; the callable also counts demo answers (`demo_accuracy` in
the training logs). Before any training the stage refuses a reward model whose tokenizer or chat template
differs from the policy's, and one whose manifest says its acceptance gate rejected it (unless
`allow_rejected_reward`). The result is published as one complete model, or with `publish: adapter` as the
new adapter on the SFT policy (see `policy/tuning.py`).

Reads top to bottom: check, load, train, save, measure.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from common import demo_task
from common.models import load_tokenizer, pick_device, set_threads
from common.outcomes import InputError
from common.reward_model import (
    check_reward_status,
    check_tokenizers_match,
    load_reward_model,
    response_text,
    score_batch,
)
from common.training import count_parameters, last_checkpoint
from policy import tuning
from policy.configs import GRPOConfig, OnlineRLConfig, RLOOConfig

SCRATCH = "scratch"
"""The runner drops `out_dir/scratch/` when the stage finishes and keeps it across a crash."""


def run_rloo(config: RLOOConfig, inputs: dict[str, Path | str], out_dir: Path) -> dict[str, Any]:
    return run(config, inputs, out_dir, "rloo")


def run_grpo(config: GRPOConfig, inputs: dict[str, Path | str], out_dir: Path) -> dict[str, Any]:
    return run(config, inputs, out_dir, "grpo")


def run(config: OnlineRLConfig, inputs: dict[str, Path | str], out_dir: Path, stage: str) -> dict[str, Any]:
    started = time.perf_counter()

    # Check: everything that can be told before loading the policy's weights
    device = pick_device(config.device)
    reward_dir = Path(inputs["reward"])
    check_reward_status(reward_dir, config.allow_rejected_reward, stage)
    policy_tokenizer = load_tokenizer(inputs["policy"])
    reward_model, reward_tokenizer = load_reward_model(reward_dir, device=device)
    check_tokenizers_match(policy_tokenizer, reward_tokenizer, "the policy", f"the reward model {reward_dir}")
    demo = "prompts" not in inputs
    rows = prompt_rows(config, inputs.get("prompts"), policy_tokenizer, stage)
    set_threads()

    # Load: the SFT policy's complete weights (an adapter merged into its base)
    scratch = out_dir / SCRATCH
    model, tokenizer = tuning.load_start(inputs["policy"], scratch, stage, config.method, device)

    # Train
    from datasets import Dataset

    reward = RewardModel(reward_model, reward_tokenizer, config.reward_batch_size)
    trainer_class, args = trainer_and_args(config, stage, device, scratch)
    trainer = trainer_class(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=tuning.lora_config(config),
    )
    trainable, total = count_parameters(trainer.model)
    checkpoint = last_checkpoint(scratch)
    if checkpoint is not None:
        print(f"{stage}: resuming from {checkpoint.name}", flush=True)
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    # Save
    model = tuning.publish(trainer.model, tokenizer, out_dir, config, stage, dict(inputs))

    # Measure
    measured: dict[str, Any] = {}
    if config.demo_eval or (config.demo_eval is None and demo):
        from policy.evaluate import demo_accuracy

        measured = demo_accuracy(model, tokenizer, config.max_operand, config.demo_samples, config.seed)
    return {
        **measured,
        **training_metrics(trainer),
        "train_loss": result.training_loss,
        "prompts": len(rows),
        "method": config.method,
        "publish": config.publish,
        "kl_coef": config.kl_coef,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "steps": trainer.state.global_step,
        "completions": trainer.state.global_step * config.batch_size * config.gradient_accumulation_steps,
        "train_seconds": result.metrics["train_runtime"],
        "device": str(device),
        "duration_seconds": time.perf_counter() - started,
    }


# --- data ---


def prompt_rows(
    config: OnlineRLConfig, prompts: Path | str | None, tokenizer: Any, stage: str
) -> list[dict[str, Any]]:
    """Training rows `{"prompt", "answer"?}`: a prompt as chat messages when the policy has a chat template
    (TRL renders it with the template and opens the assistant turn), else as plain text."""
    chat = bool(tokenizer.chat_template)
    if prompts is None:
        records = demo_task.train_prompts(config.max_operand)[: config.num_prompts]
        return [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}]
                if chat
                else demo_task.plain_prompt(r["prompt"]),
                "answer": r["answer"],
            }
            for r in records
        ]
    from policy.sample import load_prompts

    try:
        records = load_prompts(prompts, config.num_prompts)
    except InputError as err:
        raise InputError(f"{stage}: " + str(err).removeprefix("sample: ")) from None
    rows = []
    for record in records:
        prompt = record["prompt"]
        if isinstance(prompt, list) and not chat:
            raise InputError(
                f"{stage}: the prompts are chat messages, but the policy's tokenizer has no chat template"
            )
        row = {
            "prompt": [{"role": "user", "content": prompt}] if chat and isinstance(prompt, str) else prompt
        }
        if isinstance(record.get("answer"), int):  # demo-style prompts: the reward function counts answers
            row["answer"] = record["answer"]
        rows.append(row)
    if "answer" in rows[0] and not all("answer" in row for row in rows):
        raise InputError(
            f"{stage}: the `answer` column of {prompts} must hold an integer on every row, or none"
        )
    return rows


# --- train ---


class RewardModel:
    """A TRL reward function: the reward model's score of each (prompt, completion), formatted as in its
    training. On demo prompts (an `answer` column) it also logs the fraction of correct completions."""

    __name__ = "reward_model"

    def __init__(self, model: Any, tokenizer: Any, batch_size: int):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def __call__(
        self,
        prompts: list[Any],
        completions: list[Any],
        answer: list[int] | None = None,
        log_metric: Any = None,
        **_: Any,
    ) -> list[float]:
        rewards = score_batch(self.model, self.tokenizer, prompts, completions, self.batch_size)
        if answer is not None and log_metric is not None:
            right = [
                demo_task.is_correct(response_text(c), a) for c, a in zip(completions, answer, strict=True)
            ]
            log_metric("demo_accuracy", sum(right) / len(right))
        return rewards


def trainer_and_args(
    config: OnlineRLConfig, stage: str, device: torch.device, scratch: Path
) -> tuple[type, Any]:
    """TRL's trainer class and its arguments: the settings both share, then each one's own."""
    common = {
        "output_dir": str(scratch),
        "seed": config.seed,
        "max_steps": config.steps,
        "per_device_train_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "learning_rate": config.lr,
        "lr_scheduler_type": "cosine",
        "warmup_steps": config.warmup_ratio,  # below 1: a fraction of the steps
        "weight_decay": config.weight_decay,
        "num_generations": config.num_generations,
        "max_completion_length": config.max_new_tokens,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "top_k": 0,
        "beta": config.kl_coef,  # explicit: GRPO's default 0 would drop the KL term
        "num_iterations": config.num_iterations,
        "epsilon": config.epsilon,
        "activation_checkpointing": config.gradient_checkpointing,  # TRL's default is on
        **tuning.precision(device),
        "logging_steps": config.logging_steps,
        "save_strategy": "steps",
        "save_steps": config.save_steps,
        "save_total_limit": 2,
        "report_to": tuning.report_to(),
        "disable_tqdm": False,
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


# --- measure ---


def training_metrics(trainer: Any) -> dict[str, Any]:
    """Reward, KL, completion length and demo accuracy at the first and last logging step (each a mean over
    `logging_steps` steps)."""
    metrics: dict[str, Any] = {}
    for key, name in (
        ("reward", "reward"),
        ("kl", "kl"),
        ("completions/mean_length", "completion_length"),
        ("demo_accuracy", "train_demo_accuracy"),
    ):
        values = tuning.logged(trainer, key)
        if values:
            metrics[f"{name}_first"], metrics[f"{name}_last"] = values[0], values[-1]
    return metrics
