"""Measures of a reward model on scored preference pairs, and its acceptance gate. Pure Python.

A scored pair is a preference row (`prompt`, `chosen`, `rejected`, `prompt_id`, optional `agreement` and
the prompt's fields, such as the task's `answer`) plus `reward_chosen`, `reward_rejected` and the response lengths `length_chosen`,
`length_rejected` in tokens (the response alone, without prompt or special tokens). A pair is ranked
correctly when reward(chosen) > reward(rejected); its margin is reward(chosen) - reward(rejected).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import fmean, pstdev
from typing import Any

from annotation.preferences import fractional_ranks
from common.reward_model import response_text
from reward.configs import RewardConfig
from tasks import Task

AGREEMENT_BUCKETS = ("1.0", "0.66-1.0", "<0.66")
"""Annotator agreement: unanimous, at least 0.66 (e.g. 2 of 3) but not unanimous, below 0.66."""


def margin(pair: dict[str, Any]) -> float:
    return pair["reward_chosen"] - pair["reward_rejected"]


def pairwise(pairs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy, mean margin and mean Bradley-Terry loss (-log sigmoid(margin)) of the pairs."""
    if not pairs:
        return {"pairs": 0, "accuracy": None, "margin_mean": None, "loss": None}
    margins = [margin(p) for p in pairs]
    return {
        "pairs": len(pairs),
        "accuracy": sum(m > 0 for m in margins) / len(margins),
        "margin_mean": fmean(margins),
        "loss": fmean(_softplus(-m) for m in margins),
    }


def by_agreement(pairs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Accuracy and pair count per annotator-agreement bucket (`unknown`: rows without `agreement`)."""
    buckets: dict[str, list[dict[str, Any]]] = {name: [] for name in (*AGREEMENT_BUCKETS, "unknown")}
    for pair in pairs:
        buckets[agreement_bucket(pair.get("agreement"))].append(pair)
    return {
        name: {"pairs": len(members), "accuracy": pairwise(members)["accuracy"]}
        for name, members in buckets.items()
        if members or name != "unknown"
    }


def agreement_bucket(agreement: float | None) -> str:
    if agreement is None:
        return "unknown"
    if agreement >= 1.0:
        return "1.0"
    return "0.66-1.0" if agreement >= 0.66 else "<0.66"


def length_bias(pairs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How the reward relates to response length (in tokens).

    - `length_pearson`, `length_spearman`: correlation of reward with length over the distinct held-out
      responses (a response in several pairs counts once); null when all lengths are equal;
    - `accuracy_longer_lost` / `accuracy_longer_won`: accuracy on the pairs where the chosen response is
      shorter / longer than the rejected one (equal lengths in neither), with their pair counts;
    - `longer_chosen_rate` (the data) and `longer_preferred_rate` (the model): how often the longer
      response of a pair of unequal lengths is the chosen one / gets the higher reward."""
    responses: dict[tuple[str, str], tuple[float, int]] = {}
    for pair in pairs:
        for side in ("chosen", "rejected"):
            key = (pair["prompt_id"], response_text(pair[side]))
            responses[key] = (pair[f"reward_{side}"], pair[f"length_{side}"])
    rewards = [reward for reward, _ in responses.values()]
    lengths = [float(length) for _, length in responses.values()]
    longer_lost = [p for p in pairs if p["length_chosen"] < p["length_rejected"]]
    longer_won = [p for p in pairs if p["length_chosen"] > p["length_rejected"]]
    unequal = len(longer_lost) + len(longer_won)
    model_prefers_longer = sum(margin(p) < 0 for p in longer_lost) + sum(margin(p) > 0 for p in longer_won)
    return {
        "length_unit": "response tokens",
        "length_pearson": pearson(rewards, lengths),
        "length_spearman": pearson(fractional_ranks(rewards), fractional_ranks(lengths)),
        "length_responses": len(responses),
        "accuracy_longer_lost": pairwise(longer_lost)["accuracy"],
        "pairs_longer_lost": len(longer_lost),
        "accuracy_longer_won": pairwise(longer_won)["accuracy"],
        "pairs_longer_won": len(longer_won),
        "longer_chosen_rate": len(longer_won) / unequal if unequal else None,
        "longer_preferred_rate": model_prefers_longer / unequal if unequal else None,
    }


def task_breakdown(pairs: Sequence[dict[str, Any]], task: Task | None) -> dict[str, Any] | None:
    """For pairs the task can judge: accuracy on pairs of a passing and a failing response (verdict 1 and
    not), and on pairs of two failing ones (ranked by a finer preference, on arithmetic the distance to the
    answer); None without a task or when it cannot judge every pair."""
    if not pairs or task is None or any(task.missing(p) for p in pairs):
        return None

    def passes(pair: dict[str, Any], side: str) -> bool:
        return task.verdict(pair, response_text(pair[side])) == 1.0

    correct = [p for p in pairs if passes(p, "chosen") != passes(p, "rejected")]
    both_wrong = [p for p in pairs if not passes(p, "chosen") and not passes(p, "rejected")]
    return {
        "accuracy_correct_vs_wrong": pairwise(correct)["accuracy"],
        "pairs_correct_vs_wrong": len(correct),
        "accuracy_wrong_vs_wrong": pairwise(both_wrong)["accuracy"],
        "pairs_wrong_vs_wrong": len(both_wrong),
    }


def reward_stats(pairs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation of the rewards of every held-out response (for normalising in PPO)."""
    rewards = [p["reward_chosen"] for p in pairs] + [p["reward_rejected"] for p in pairs]
    return {
        "reward_mean": fmean(rewards) if rewards else None,
        "reward_std": pstdev(rewards) if len(rewards) > 1 else None,
    }


def worst(pairs: Sequence[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The `count` pairs with the lowest margin (the most confidently misranked first)."""
    keys = ("prompt_id", "prompt", "chosen", "rejected", "agreement", "reward_chosen", "reward_rejected")
    return [{**{k: p.get(k) for k in keys}, "margin": margin(p)} for p in sorted(pairs, key=margin)[:count]]


def gate(metrics: dict[str, Any], config: RewardConfig) -> str | None:
    """Why the reward model is rejected (each figure against its bound), or None when it passes."""
    problems = []
    accuracy = metrics["accuracy"]
    if accuracy < config.min_accuracy:
        problems.append(
            f"held-out accuracy {accuracy:.3f} < min_accuracy {config.min_accuracy:g} "
            f"({metrics['held_out_pairs']} pairs)"
        )
    correlation, bound = metrics.get("length_spearman"), config.max_length_correlation
    if bound is not None and correlation is not None and abs(correlation) > bound:
        problems.append(
            f"|Spearman correlation of reward with response length| {abs(correlation):.3f} "
            f"> max_length_correlation {bound:g}"
        )
    return "; ".join(problems) or None


# --- statistics ---


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson's correlation coefficient; None when either side is constant or there are under 2 points."""
    if len(xs) < 2:
        return None
    mx, my = fmean(xs), fmean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))
