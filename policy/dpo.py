"""The `dpo` stage: direct preference optimization on TRL's `DPOTrainer`.

Inputs: `policy`, the SFT policy (an adapter or a complete model), which is both the starting point and the
frozen reference; `preferences`, a directory with `preferences.jsonl` (or a JSONL file) in TRL's
explicit-prompt format: `prompt`, `chosen`, `rejected`, either all plain strings or all lists of
`{role, content}` messages (conversational: the prompt's turns, then one assistant turn each); any other
field (`prompt_id`, `agreement`, `votes`, the task's fields such as `answer`) is carried along and
ignored by training. `common.data.load_preferences` reads them: pairs whose chosen and rejected responses
are the same are dropped and counted. With a task that can judge the pairs' prompts, the metrics end with
its held-out pass rate (`task_eval`).

An SFT adapter is merged into its base and a new LoRA adapter is trained on the merged weights, so the
reference (the same model with the adapter disabled) is exactly the SFT policy; the result is published
as one complete model, or with `publish: adapter` as the new adapter on the SFT policy (`policy/tuning.py`
says how and why). Loss terms, beta and the adapter come from the config.

Reads top to bottom: check, load, train, save, measure.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

import tasks
from common.data import load_preferences
from common.models import load_tokenizer, pick_device, set_threads
from common.outcomes import InputError
from common.training import (
    SCRATCH,
    count_parameters,
    final_train_loss,
    last_checkpoint,
    set_loss_chunk,
    trainer_arguments,
)
from policy import tuning
from policy.configs import DPOConfig


def run(config: DPOConfig, inputs: dict[str, Path | str], out_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()

    # Check: everything that can be told without loading the model
    device = pick_device(config.device)
    task = tasks.load(config.task) if config.task is not None else None
    if config.task_eval and task is None:
        raise InputError("dpo: task_eval needs a task (the workflow's top-level `task:` or this stage's)")
    preferences = load_preferences(
        inputs["preferences"], "dpo", config.min_distinct_fraction, config.min_agreement
    )
    rows, data_format = preferences.rows, preferences.format
    if config.pairs == "best_vs_rest":
        rows = best_vs_rest(rows)
    if not rows:
        raise InputError("dpo: no preference pair is left after keeping the best-versus-rest pairs")
    check_tokenizer(load_tokenizer(inputs["policy"]), data_format, rows[0])
    set_threads(config.cpu_threads)

    # Load: the SFT policy's complete weights (an adapter merged into its base)
    scratch = out_dir / SCRATCH
    trainer, tokenizer = build_trainer(config, inputs["policy"], rows, scratch, device)

    # Train
    trainable, total = count_parameters(trainer.model)
    checkpoint = last_checkpoint(scratch)
    if checkpoint is not None:
        print(f"dpo: resuming from {checkpoint.name}", flush=True)
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    # Save
    model = tuning.publish(trainer.model, tokenizer, out_dir, config, "dpo", dict(inputs))

    # Measure
    measured: dict[str, Any] = {}
    judgeable = task is not None and not any(task.missing(row) for row in rows)
    if task is not None and (config.task_eval or (config.task_eval is None and judgeable)):
        from policy.evaluate import task_pass_rates

        measured = task_pass_rates(model, tokenizer, task, config.task_eval_samples, config.seed)
    return {
        **measured,
        **training_metrics(trainer),
        "train_loss": final_train_loss(trainer, result.training_loss),
        "pairs": len(rows),
        "pairs_given": preferences.given,
        "pairs_dropped_identical": preferences.dropped_identical,
        "pairs_dropped_agreement": preferences.dropped_agreement,
        "prompts": len({json.dumps(row["prompt"], sort_keys=True) for row in rows}),
        "data_format": data_format,
        "method": config.method,
        "publish": config.publish,
        "loss_type": "+".join(config.loss_type),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "steps": trainer.state.global_step,
        "train_seconds": result.metrics["train_runtime"],
        "device": str(device),
        "duration_seconds": time.perf_counter() - started,
    }


# --- check ---


def best_vs_rest(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per prompt, the pairs whose chosen response is the best one: chosen in some pair of the prompt and
    rejected in none. A prompt whose preferences name no such response (a cycle) gives no pairs."""
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_prompt.setdefault(json.dumps(row["prompt"], sort_keys=True), []).append(row)
    kept = []
    for pairs in by_prompt.values():
        rejected = {json.dumps(row["rejected"], sort_keys=True) for row in pairs}
        kept += [row for row in pairs if json.dumps(row["chosen"], sort_keys=True) not in rejected]
    return kept


def check_tokenizer(tokenizer: Any, data_format: str, example: dict[str, Any]) -> None:
    """The policy must read the data the way it was trained to: conversational pairs through its chat
    template, plain pairs only when it has none (a chat policy shown plain prompts sees a format it was not
    fine-tuned on, and its samples in the annotation loop would have been conversational)."""
    if data_format == "conversational" and not tokenizer.chat_template:
        raise InputError(
            "dpo: the preferences are conversational (lists of chat messages) but the policy's tokenizer has no "
            "chat template to render them; use a policy fine-tuned in the chat format, or plain-text preferences"
        )
    if data_format == "plain" and tokenizer.chat_template:
        raise InputError(
            "dpo: the preferences are plain text, but the policy has a chat template, so it answers prompts "
            "rendered as chat (as the sample stage shows them); give conversational preferences (prompt, chosen "
            "and rejected as lists of {role, content} messages)"
        )
    if data_format == "conversational":
        try:
            prompt = tokenizer.apply_chat_template(
                example["prompt"], add_generation_prompt=True, tokenize=False
            )
            full = tokenizer.apply_chat_template(example["prompt"] + example["chosen"], tokenize=False)
        except Exception as err:
            raise InputError(
                f"dpo: the policy's chat template cannot render the preferences: {err}"
            ) from None
        if not full.startswith(prompt):
            raise InputError(
                "dpo: the policy's chat template renders a prompt with the generation prompt differently from the "
                "same prompt followed by a response, so the response tokens cannot be told apart from the prompt"
            )


# --- train ---


def build_trainer(
    config: DPOConfig, policy: Path | str, rows: list[dict[str, Any]], scratch: Path, device: torch.device
) -> tuple[Any, Any]:
    """TRL's `DPOTrainer` on the SFT policy's complete weights, and the tokenizer. The reference is the SFT
    policy: with `lora`, the model with the new adapter disabled; with `full`, a frozen copy that TRL loads
    from the model's `name_or_path` (the merged SFT weights)."""
    from datasets import Dataset
    from trl import DPOTrainer

    model, tokenizer = tuning.load_start(policy, scratch, "dpo", config.method, device, config.precision)
    set_loss_chunk(config.loss_chunk_size, device)
    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=training_args(config, device, scratch, policy),
        train_dataset=Dataset.from_list(
            [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in rows]
        ),
        processing_class=tokenizer,
        peft_config=tuning.lora_config(config),
    )
    return trainer, tokenizer


def precomputes_reference(config: DPOConfig) -> bool:
    """`precompute_reference`, null resolved: for more than one epoch, or when the reference would be a
    frozen copy of the model (`method: full`)."""
    if config.precompute_reference is not None:
        return config.precompute_reference
    return config.epochs > 1 or config.method == "full"


def training_args(config: DPOConfig, device: torch.device, scratch: Path, model: Path | str) -> Any:
    from trl import DPOConfig as TRLConfig

    return TRLConfig(
        **trainer_arguments(config, device, scratch, model),
        beta=config.beta,
        loss_type=list(config.loss_type),
        loss_weights=config.loss_weights,
        label_smoothing=config.label_smoothing,
        max_length=config.max_length,
        disable_dropout=True,  # DPOConfig.dropout_off says why
        precompute_ref_log_probs=precomputes_reference(config),
    )


# --- measure ---


def training_metrics(trainer: Any) -> dict[str, Any]:
    """The implicit-reward accuracy and margin, and the log-probabilities of chosen and rejected responses,
    at the first and the last logging step (means over `logging_steps` steps)."""
    return tuning.first_and_last(
        trainer,
        {
            "rewards/accuracies": "reward_accuracy",
            "rewards/margins": "reward_margin",
            "logps/chosen": "logp_chosen",
            "logps/rejected": "logp_rejected",
        },
    )
