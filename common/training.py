"""What the training stages share about their trainers: resuming, counting, reporting. No torch import."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCRATCH = "scratch"
"""The folder inside a stage's staging directory for its checkpoints: kept when a run is interrupted (the
next run resumes from it), removed before the artifact is published."""

TRAINER_STATE = "trainer_state.json"
"""The file a Hugging Face trainer writes last into a checkpoint: its presence marks a complete one."""


def last_checkpoint(scratch: Path, state_file: str = TRAINER_STATE) -> Path | None:
    """The newest complete `checkpoint-<step>` folder under `scratch` (one that holds `state_file`)."""
    found = [
        (int(path.name.split("-", 1)[1]), path)
        for path in scratch.glob("checkpoint-*")
        if path.name.split("-", 1)[1].isdigit() and (path / state_file).is_file()
    ]
    return max(found)[1] if found else None


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters; PEFT counts 4-bit weights at their unpacked size."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def final_train_loss(trainer: Any, mean_loss: float) -> float:
    """`train_loss` in every training stage's metrics, one meaning: the last logged training loss, a mean
    over the last `logging_steps` optimizer steps (what training ended at, not its average over the run,
    which the early steps dominate); the run's mean loss when nothing was logged."""
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses[-1] if losses else mean_loss


def trainer_arguments(config: Any, device: Any, scratch: Path, model: Any) -> dict[str, Any]:
    """The arguments every Hugging Face / TRL trainer of the pipeline shares (SFT, reward, DPO, RLOO,
    GRPO), from a config with `common.configs.TrainerSettings`, `seed`, `lr`, `batch_size` and either
    `steps` or `epochs`, and the `model` it trains (its size decides `precision: auto`); each stage adds
    its trainer's own. Checkpoints go to `scratch` every `save_steps`
    (the last two kept: the last one may be half-written when the process is killed)."""
    from common.models import trainer_precision  # imports torch

    length = {"max_steps": config.steps} if hasattr(config, "steps") else {"num_train_epochs": config.epochs}
    return {
        "output_dir": str(scratch),
        "seed": config.seed,
        **length,
        "per_device_train_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "learning_rate": config.lr,
        "lr_scheduler_type": "cosine",
        "warmup_steps": config.warmup_ratio,  # below 1: a fraction of the steps
        "weight_decay": config.weight_decay,
        "activation_checkpointing": config.gradient_checkpointing,  # TRL defaults to on; transformers 5 name
        **trainer_precision(config.precision, device, model),  # TRL defaults to bf16 everywhere
        "logging_steps": config.logging_steps,
        "save_strategy": "steps",
        "save_steps": config.save_steps,
        "save_total_limit": 2,
        "report_to": ["wandb"] if wandb_run() is not None else "none",
        "disable_tqdm": False,
    }


LOSS_CHUNK = {"cpu": 4096, "cuda": 32768}
"""`loss_chunk_size: 0` by device type (`common.configs.ChunkedLossSettings`); 32768 is TRL's own size."""


def set_loss_chunk(size: int, device: Any) -> int:
    """Make the fused LM head of TRL's trainers (SFT, DPO, RLOO, GRPO) compute the logits `size` vocabulary
    entries at a time in this process (`common.configs.ChunkedLossSettings.loss_chunk_size`; 0 picks by the
    type of `device`) and return that size. Like the thread count, a setting of the process, which the stage
    in it sets before training."""
    import trl.trainer.utils as fused_head  # reads its chunk size at every call

    if not hasattr(fused_head, "_CHUNKED_LOGPROB_CHUNK_SIZE"):  # a TRL that sizes its chunks elsewhere
        raise RuntimeError("this TRL version has no _CHUNKED_LOGPROB_CHUNK_SIZE; update set_loss_chunk")
    chunk = size or LOSS_CHUNK.get(device.type, LOSS_CHUNK["cuda"])
    fused_head._CHUNKED_LOGPROB_CHUNK_SIZE = chunk
    return chunk


@dataclass(frozen=True)
class Table:
    """Rows for a W&B table (see `log_to_wandb`)."""

    columns: list[str]
    rows: list[list[Any]]


def log_to_wandb(values: dict[str, Any], step: int | None = None) -> None:
    """The one way stages log to W&B: numbers as they are, a `Table` as a W&B table, a `Path` as an
    image. Nothing happens when the runner opened no W&B run in this process (a stage run outside the
    runner, a process other than the main one); callers that build large tables check `wandb_run()` first."""
    run = wandb_run()
    if run is None:
        return
    import wandb

    def convert(value: Any) -> Any:
        if isinstance(value, Table):
            return wandb.Table(columns=list(value.columns), data=value.rows)  # wandb's list[str | int]
        if isinstance(value, Path):
            return wandb.Image(str(value))
        return value

    data = {key: convert(value) for key, value in values.items()}
    run.log(data) if step is None else run.log(data, step=step)


def wandb_run() -> Any:
    """The W&B run the runner opened around this stage, if any; W&B is never required."""
    wandb = sys.modules.get("wandb")
    return wandb.run if wandb is not None else None
