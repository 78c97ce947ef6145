"""The `reward` stage: a reward model trained on human preference pairs, with a held-out acceptance gate.

Inputs: `preferences` (a directory holding `preferences.jsonl`, or a JSONL file, in TRL's explicit-prompt
preference format: `prompt`, `chosen`, `rejected`, conversational or plain, with optional `prompt_id` and
`agreement`; read by `common.data.load_preferences`, which drops pairs whose chosen and rejected responses
are the same) and `model` (a model directory, a PEFT adapter directory, which is merged into its base
first, or a hub id). The model gets a score head (`common.reward_model.sequence_classifier`, one label)
and is trained with TRL's `RewardTrainer` (Bradley-Terry loss), with LoRA by default.

The pairs of a seeded fraction of the prompts are held out. After training the reward model is
measured on them (`reward.evaluation`): pairwise accuracy, mean margin, accuracy by annotator agreement,
length bias, the worst-misranked pairs. Below `min_accuracy` (or above `max_length_correlation`) it is
still published, but the stage returns `rejected` and the runner marks it so.

Output (`reward-model`): one complete sequence-classification model with the LoRA update merged in (so
it loads with plain transformers, needs no base model on disk, and its score head is an ordinary weight
that the loader can check), or with `publish: adapter` the LoRA adapter with its trained score head and
`base.json` naming the `model` input (a stacked adapter when that is the SFT adapter); either way its
tokenizer and chat template, `reward.json` (text format, tokenizer fingerprint, what it was trained
from), `eval.json` (the evaluation) and `held_out.jsonl` (every held-out pair with its rewards). Load it
with `common.reward_model.load_reward_model`: the adapter is merged in, and scores are the same.

Reads top to bottom: check, load, train, save, measure.
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path
from typing import Any

import torch

import tasks
from common.configs import lora_config
from common.data import load_preferences
from common.models import (
    load_tokenizer,
    merge_adapter,
    pick_device,
    set_threads,
    source_reference,
    tokenizer_fingerprint,
    tokenizer_summary,
    training_attention,
    write_base_reference,
)
from common.outcomes import InputError
from common.reward_model import (
    REWARD_FILE,
    encode,
    response_text,
    score_ids,
    sequence_classifier,
    set_pad_token,
)
from common.training import (
    SCRATCH,
    Table,
    count_parameters,
    final_train_loss,
    last_checkpoint,
    log_to_wandb,
    trainer_arguments,
    wandb_run,
)
from reward import evaluation
from reward.configs import RewardConfig

EVAL_FILE = "eval.json"
HELD_OUT_FILE = "held_out.jsonl"


def run(config: RewardConfig, inputs: dict[str, Path | str], out_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()

    # Check: everything that can be told without loading the model
    device = pick_device(config.device)
    preferences = load_preferences(
        inputs["preferences"], "reward", config.min_distinct_fraction, config.min_agreement
    )
    rows, data_format = preferences.rows, preferences.format
    source = inputs["model"]
    tokenizer = load_tokenizer(source, config.pad_token)
    check_tokenizer(tokenizer, data_format)
    train_rows, held_out_rows = split_by_prompt(rows, config.held_out_fraction, config.seed)
    train_rows, train_too_long = tokenize_pairs(train_rows, tokenizer, config.max_length)
    held_out_rows, held_out_too_long = tokenize_pairs(held_out_rows, tokenizer, config.max_length)
    if not train_rows or not held_out_rows:
        raise InputError(
            f"reward: no pairs left to {'train on' if not train_rows else 'evaluate'} after leaving out the "
            f"pairs longer than max_length {config.max_length} tokens"
        )
    set_threads(config.cpu_threads)

    # Load
    model = load_model(source, config, tokenizer)

    # Train
    from datasets import Dataset

    scratch = out_dir / SCRATCH
    args = training_args(config, device, scratch, source)
    longest = max(len(r[side]) for r in train_rows for side in ("chosen_ids", "rejected_ids"))
    with training_attention(model, args.bf16, device, longest):
        trainer = trainer_class(config.lm_loss_weight)(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(
                [{"chosen_ids": r["chosen_ids"], "rejected_ids": r["rejected_ids"]} for r in train_rows]
            ),
            processing_class=tokenizer,
            peft_config=peft_config(config, model),
        )
        trainable, total = count_parameters(trainer.model)
        checkpoint = last_checkpoint(scratch)
        if checkpoint is not None:
            print(f"reward: resuming from {checkpoint.name}", flush=True)
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    # Save (an adapter before it is merged for measuring)
    if config.publish == "adapter":
        save(trainer.model, tokenizer, out_dir, source, data_format)
    model, merge_difference = merged(trainer.model, held_out_rows, tokenizer, config)
    if config.publish == "merged":
        save(model, tokenizer, out_dir, source, data_format)

    # Measure
    scored = score_pairs(model, tokenizer, held_out_rows, config.eval_batch_size)
    train_sample = random.Random(config.seed).sample(
        train_rows, min(config.train_eval_pairs, len(train_rows))
    )
    train_scored = score_pairs(model, tokenizer, train_sample, config.eval_batch_size)
    held_out = evaluation.pairwise(scored)
    metrics: dict[str, Any] = {
        "accuracy": held_out["accuracy"],
        "margin_mean": held_out["margin_mean"],
        "train_accuracy": evaluation.pairwise(train_scored)["accuracy"],
        "loss": held_out["loss"],
        "held_out_pairs": len(scored),
        "held_out_prompts": len({r["prompt_id"] for r in scored}),
        "accuracy_by_agreement": evaluation.by_agreement(scored),
        **evaluation.length_bias(scored),
        **(evaluation.task_breakdown(scored, tasks.load(config.task) if config.task else None) or {}),
        **evaluation.reward_stats(scored),
        "train_pairs": len(train_rows),
        "train_prompts": len({r["prompt_id"] for r in train_rows}),
        "pairs_too_long": train_too_long + held_out_too_long,
        "pairs_dropped_identical": preferences.dropped_identical,
        "pairs_dropped_agreement": preferences.dropped_agreement,
        "data_format": data_format,
        "text_format": "chat" if tokenizer.chat_template else "plain",
        "tokenizer": tokenizer_summary(tokenizer),
        "method": config.method,
        "publish": config.publish,
        "added_layers": config.added_layers,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "steps": trainer.state.global_step,
        "train_loss": final_train_loss(trainer, result.training_loss),
        "train_seconds": result.metrics["train_runtime"],
        "merge_max_abs_difference": merge_difference,
        "device": str(device),
    }
    rejected = evaluation.gate(metrics, config)
    metrics["gate"] = "rejected" if rejected else "passed"
    worst = evaluation.worst(scored, config.worst_pairs)
    write_evaluation(out_dir, metrics, worst, scored, config)
    log_evaluation(metrics, worst)
    metrics["duration_seconds"] = time.perf_counter() - started
    if rejected:
        metrics = {"rejected": rejected, **metrics}
    return metrics


# --- check ---


def check_tokenizer(tokenizer: Any, data_format: str) -> None:
    if data_format == "conversational" and not tokenizer.chat_template:
        raise InputError(
            "reward: the preferences are conversational but the model's tokenizer has no chat template"
        )


def split_by_prompt(
    rows: list[dict[str, Any]], fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held_out): the pairs of a seeded draw of `fraction` of the prompt ids (at least one) are
    held out, so no prompt has pairs on both sides."""
    prompts = sorted({row["prompt_id"] for row in rows})
    if len(prompts) < 2:
        raise InputError(
            f"reward: the preferences come from {len(prompts)} prompt; holding prompts out needs at least 2"
        )
    random.Random(seed).shuffle(prompts)
    held = set(prompts[: min(len(prompts) - 1, max(1, round(fraction * len(prompts))))])
    return [r for r in rows if r["prompt_id"] not in held], [r for r in rows if r["prompt_id"] in held]


def tokenize_pairs(
    rows: list[dict[str, Any]], tokenizer: Any, max_length: int | None
) -> tuple[list[dict[str, Any]], int]:
    """The rows with `chosen_ids`/`rejected_ids` (formatted as `common.reward_model.encode` does) and the
    response lengths in tokens; pairs longer than `max_length` are dropped and counted."""
    kept, too_long = [], 0
    for row in rows:
        chosen = encode(tokenizer, row["prompt"], row["chosen"])
        rejected = encode(tokenizer, row["prompt"], row["rejected"])
        if max_length is not None and max(len(chosen), len(rejected)) > max_length:
            too_long += 1
            continue
        kept.append(
            {
                **row,
                "chosen_ids": chosen,
                "rejected_ids": rejected,
                "length_chosen": response_length(tokenizer, row["chosen"]),
                "length_rejected": response_length(tokenizer, row["rejected"]),
            }
        )
    return kept, too_long


def response_length(tokenizer: Any, response: Any) -> int:
    return len(tokenizer(response_text(response), add_special_tokens=False)["input_ids"])


# --- load ---


def load_model(source: Path | str, config: RewardConfig, tokenizer: Any) -> Any:
    """The model with a freshly initialised (seeded) score head, in fp32 (mixed precision on a GPU keeps
    fp32 master weights). An adapter is merged into its base first."""
    torch.manual_seed(config.seed)
    model, _ = sequence_classifier(source, torch.float32)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise InputError(
            f"reward: the tokenizer has {len(tokenizer)} tokens, more than the model's "
            f"{model.get_input_embeddings().num_embeddings} embeddings"
        )
    set_pad_token(model, tokenizer)
    if config.added_layers:
        model = add_layers(model, config.added_layers)
    if config.lm_loss_weight and not ties_embeddings(model):
        raise InputError(
            "reward: lm_loss_weight needs a model whose output embeddings are its input embeddings "
            f"(tie_word_embeddings); {source} has its own LM head, which a reward model does not keep: set "
            "lm_loss_weight to 0"
        )
    return model


def ties_embeddings(model: Any) -> bool:
    return bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))


RESIDUAL_WRITERS = ("o_proj", "down_proj", "out_proj", "c_proj", "dense_4h_to_h", "fc2", "wo", "w2")
"""Names of the projections through which a decoder block writes to the residual stream."""


def add_layers(model: Any, count: int) -> Any:
    """The model with `count` more blocks on top of its own, whose residual-writing projections are zero:
    at first every block added passes its input through, so the rewards are exactly those of `model`."""
    import copy

    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(model.config)
    text = config.get_text_config()
    own = text.num_hidden_layers
    text.num_hidden_layers = own + count
    if getattr(text, "layer_types", None):
        text.layer_types = [*text.layer_types, *[text.layer_types[-1]] * count]
    grown = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    writers = [name for name in missing if any(f".{w}." in f".{name}" for w in RESIDUAL_WRITERS)]
    with torch.no_grad():
        parameters = dict(grown.named_parameters())
        for name in writers:
            parameters[name].zero_()
    probe = torch.tensor([list(range(1, 9))])
    with torch.no_grad():
        same = torch.allclose(grown.eval()(probe).logits, model.eval()(probe).logits, atol=1e-5)
    if unexpected or not writers or not same:
        raise InputError(
            f"reward: added_layers is not supported for {type(model).__name__}: its blocks do not write to "
            f"the residual stream through any of {', '.join(RESIDUAL_WRITERS)}; set added_layers to 0"
        )
    grown.train()
    return grown


def added_blocks(model: Any, added: int) -> list[str]:
    """The module names of the `added` blocks on top of the model's own (e.g. `model.layers.4`)."""
    total = model.config.get_text_config().num_hidden_layers
    return [
        name
        for name, _ in model.named_modules()
        if (match := re.fullmatch(r".*\.layers\.(\d+)", name)) and int(match.group(1)) >= total - added
    ]


def peft_config(config: RewardConfig, model: Any) -> Any:
    """LoRA for sequence classification: PEFT adds the score head to `modules_to_save`, so it is trained
    in full, as are the added blocks (LoRA goes on the model's own blocks only); None for `full`."""
    if config.method != "lora":
        return None
    added = added_blocks(model, config.added_layers)
    return lora_config(
        config,
        "SEQ_CLS",
        exclude_modules=rf"({'|'.join(re.escape(name) for name in added)})\..*" if added else None,
        modules_to_save=added or None,
    )


# --- train ---


def trainer_class(lm_loss_weight: float) -> type:
    """TRL's `RewardTrainer`, or with a positive `lm_loss_weight` one that adds that times the next-token
    cross-entropy of the chosen sequences (`RewardConfig.lm_loss_weight`), logged as `lm_loss`."""
    from trl import RewardTrainer

    if not lm_loss_weight:
        return RewardTrainer

    class LanguageModelRegularized(RewardTrainer):
        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            # The score head reads the final (normalised) hidden state of every position, then the reward
            # is taken at the last token: what it reads is what a causal LM's head would read.
            hidden: list[torch.Tensor] = []
            plain = self.accelerator.unwrap_model(model)  # DDP wraps it; PEFT forwards `score`
            hook = plain.score.register_forward_hook(lambda _, args, __: hidden.append(args[0]))
            try:
                loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            finally:
                hook.remove()
            chosen = inputs["input_ids"].shape[0] // 2  # TRL stacks the chosen sequences, then the rejected
            logits = hidden[0][:chosen, :-1] @ plain.get_input_embeddings().weight.T
            targets = inputs["input_ids"][:chosen, 1:].masked_fill(
                inputs["attention_mask"][:chosen, 1:] == 0, -100
            )
            lm_loss = torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100
            )
            self._metrics["train" if model.training else "eval"]["lm_loss"].append(lm_loss.item())
            loss = loss + lm_loss_weight * lm_loss
            return (loss, outputs) if return_outputs else loss

    return LanguageModelRegularized


def training_args(config: RewardConfig, device: torch.device, scratch: Path, model: Path | str) -> Any:
    from trl import RewardConfig as TRLRewardConfig

    return TRLRewardConfig(
        **trainer_arguments(config, device, scratch, model),
        center_rewards_coefficient=config.center_rewards_coefficient,
        max_length=None,  # pairs over max_length were left out, and counted, before
        eval_strategy="no",  # the held-out evaluation runs once, at the end, on the saved model
        disable_dropout=True,  # RewardConfig.dropout_off says why
    )


def merged(
    model: Any, rows: list[dict[str, Any]], tokenizer: Any, config: RewardConfig
) -> tuple[Any, float | None]:
    """The trained model as one plain model (LoRA merged into the weights, the trained score head in place
    of the original), in eval mode, and the largest change merging made to a held-out reward."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model.eval(), None
    sample = [ids for row in rows[:64] for ids in (row["chosen_ids"], row["rejected_ids"])]
    before = score_ids(model, sample, tokenizer.pad_token_id, config.eval_batch_size)
    model = merge_adapter(model).eval()
    after = score_ids(model, sample, tokenizer.pad_token_id, config.eval_batch_size)
    return model, max(abs(a - b) for a, b in zip(before, after, strict=True))


# --- save ---


def save(model: Any, tokenizer: Any, out_dir: Path, source: Path | str, data_format: str) -> None:
    """The reward model (a complete model, or a `PeftModel`'s adapter with its score head and `base.json`
    naming `source`), its tokenizer and `reward.json`."""
    from peft import PeftModel

    set_pad_token(model, tokenizer)
    model.config.get_text_config().eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if isinstance(model, PeftModel):
        write_base_reference(out_dir, source)
    info = {
        "format": "chat" if tokenizer.chat_template else "plain",
        "data_format": data_format,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "trained_from": source_reference(source),
    }
    (out_dir / REWARD_FILE).write_text(json.dumps(info, indent=2) + "\n")


# --- measure ---


def score_pairs(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], batch_size: int
) -> list[dict[str, Any]]:
    """The rows with `reward_chosen` and `reward_rejected` (token ids dropped)."""
    sequences = [ids for row in rows for ids in (row["chosen_ids"], row["rejected_ids"])]
    rewards = score_ids(model, sequences, tokenizer.pad_token_id, batch_size)
    return [
        {
            **{k: v for k, v in row.items() if k not in ("chosen_ids", "rejected_ids")},
            "reward_chosen": rewards[2 * i],
            "reward_rejected": rewards[2 * i + 1],
        }
        for i, row in enumerate(rows)
    ]


def write_evaluation(
    out_dir: Path,
    metrics: dict[str, Any],
    worst: list[dict[str, Any]],
    scored: list[dict[str, Any]],
    config: RewardConfig,
) -> None:
    report = {
        "metrics": metrics,
        "gate": {
            "min_accuracy": config.min_accuracy,
            "max_length_correlation": config.max_length_correlation,
        },
        "worst_pairs": worst,
    }
    (out_dir / EVAL_FILE).write_text(json.dumps(report, indent=2) + "\n")
    with (out_dir / HELD_OUT_FILE).open("w") as file:
        for row in scored:
            file.write(json.dumps(row) + "\n")


def log_evaluation(metrics: dict[str, Any], worst: list[dict[str, Any]]) -> None:
    """The evaluation under `eval/`, and a table of the worst-misranked held-out pairs."""
    if wandb_run() is None:
        return
    flat = {
        f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    for bucket, values in metrics["accuracy_by_agreement"].items():
        if values["accuracy"] is not None:
            flat[f"eval/accuracy_agreement_{bucket}"] = values["accuracy"]
    columns = ["prompt", "chosen", "rejected", "reward_chosen", "reward_rejected", "margin", "agreement"]
    rows = [
        [
            response_text(pair["prompt"]),
            response_text(pair["chosen"]),
            response_text(pair["rejected"]),
            pair["reward_chosen"],
            pair["reward_rejected"],
            pair["margin"],
            pair["agreement"],
        ]
        for pair in worst
    ]
    log_to_wandb({**flat, "eval/worst_pairs": Table(columns, rows)})
