"""What the training stages share about their trainers: resuming, counting, reporting. No torch import."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

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
    """The last logged training loss (a mean over the last `logging_steps` steps), else the mean loss."""
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses[-1] if losses else mean_loss


def wandb_run() -> Any:
    """The W&B run the runner opened around this stage, if any; W&B is never required."""
    wandb = sys.modules.get("wandb")
    return wandb.run if wandb is not None else None
