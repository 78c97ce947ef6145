"""Score responses with a reward model directory: what `rlhf score REF --prompt TEXT --response TEXT` runs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from common.models import pick_device
from common.reward_model import load_reward_model, score_batch


def score_responses(path: Path, prompt: str, responses: Sequence[str], device: str = "auto") -> list[float]:
    """The reward of each response to `prompt` (a user message, formatted with the reward model's chat
    template when it has one, exactly as in training). Raises `InputError` when `path` is not a reward model."""
    model, tokenizer = load_reward_model(path, device=pick_device(device))
    return score_batch(model, tokenizer, [prompt] * len(responses), list(responses))
