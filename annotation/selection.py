"""Choosing what annotators see: the `select` setting of `annotate`.

From the pool of records a samples artifact gives (prompts with two or more distinct candidates, less the
prompts that already have pairs in the `previous` input), only `budget` records are pushed, chosen:

- `random`: a seeded draw;
- `spread`: where the current reward model (input `reward`) separates the candidates least: the smallest
  gap between a record's highest and lowest candidate reward first;
- `disagreement`: where an ensemble of reward heads disagrees most. The heads share the reward model's
  representation (the hidden state its score head reads, `common.reward_model.score_and_features`). Each
  is anchored at the score head plus its own random perturbation and fitted (Bradley-Terry, with a pull
  towards its anchor) on a bootstrap resample of the pairs so far (input `previous`): where those pairs
  say a lot the heads agree, where they say little each keeps its own perturbation, so they disagree
  there (an anchored ensemble). A record's disagreement is, over its candidate pairs, the largest
  variance across heads of P(one candidate is better than the other).

The records' scores go to `selection.jsonl` in the batch (record id, prompt id, score, chosen or not).
Loads torch and the reward model only for `spread` and `disagreement`.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from annotation.configs import Selection
from common.outcomes import InputError

SELECTION_FILE = "selection.jsonl"


def choose(
    records: list[dict[str, Any]], config: Selection, reward: Path | None, previous: Path | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(the chosen records in pool order, every pool record's score, counts)."""
    seen = previous_prompts(previous)
    pool = [record for record in records if record["prompt_id"] not in seen]
    if config.by != "random" and reward is None:
        raise InputError(f"annotate: select by {config.by} needs a `reward` input (the current reward model)")
    if config.by == "disagreement" and previous is None:
        raise InputError(
            "annotate: select by disagreement needs a `previous` input: the pairs the reward model was trained "
            "on, which the ensemble of heads is fitted to"
        )
    if config.by == "random":
        scores = [random.Random(f"{config.seed}:{r['record_id']}").random() for r in pool]
    else:
        assert reward is not None
        scores = model_scores(pool, config, reward, previous)
    ranked = sorted(range(len(pool)), key=lambda i: -scores[i])
    chosen = set(ranked[: config.budget])
    rows = [
        {"record_id": r["record_id"], "prompt_id": r["prompt_id"], "score": scores[i], "chosen": i in chosen}
        for i, r in enumerate(pool)
    ]
    counts = {
        "pool": len(pool),
        "pool_left_out_previous": len(records) - len(pool),
        "selected": len(chosen),
        "select_by": config.by,
    }
    return [r for i, r in enumerate(pool) if i in chosen], rows, counts


def previous_prompts(previous: Path | None) -> set[str]:
    if previous is None:
        return set()
    from common.data import load_preferences

    return {str(row.get("prompt_id")) for row in load_preferences(previous, "annotate", 0.0).rows}


def model_scores(
    pool: list[dict[str, Any]], config: Selection, reward: Path, previous: Path | None
) -> list[float]:
    """Per record: the negative reward spread of its candidates (`spread`), or the heads' disagreement."""

    from common.reward_model import encode, load_reward_model, score_and_features

    model, tokenizer = load_reward_model(reward)
    sequences = [encode(tokenizer, r["prompt"], c) for r in pool for c in r["candidates"]]
    rewards, features = score_and_features(model, sequences, tokenizer.pad_token_id, features=True)
    assert features is not None
    bounds, start = [], 0
    for record in pool:
        bounds.append((start, start + len(record["candidates"])))
        start += len(record["candidates"])
    if config.by == "spread":
        return [-(max(rewards[a:b]) - min(rewards[a:b])) for a, b in bounds]

    assert previous is not None
    from common.data import load_preferences

    pairs = load_preferences(previous, "annotate", 0.0).rows
    chosen = [encode(tokenizer, p["prompt"], p["chosen"]) for p in pairs]
    rejected = [encode(tokenizer, p["prompt"], p["rejected"]) for p in pairs]
    _, pair_features = score_and_features(model, chosen + rejected, tokenizer.pad_token_id, features=True)
    assert pair_features is not None
    differences = pair_features[: len(pairs)] - pair_features[len(pairs) :]
    heads = fit_heads(
        differences, model.score.weight.detach().float().view(-1).cpu(), config.heads, config.seed
    )
    return disagreement(features, bounds, heads)


def disagreement(features: Any, bounds: list[tuple[int, int]], heads: Any) -> list[float]:
    """Per record (its candidates' rows `a:b` of `features`): over its candidate pairs, the largest variance
    across `heads` of P(candidate i better than j) = sigmoid(head . (f_i - f_j))."""
    import torch

    values = features @ heads.T  # [candidates, heads]
    scores = []
    for a, b in bounds:
        block = values[a:b]
        gaps = block.unsqueeze(0) - block.unsqueeze(1)  # [c, c, heads]: candidate i's score minus j's
        scores.append(float(torch.sigmoid(gaps).var(dim=-1).max()))
    return scores


def fit_heads(
    differences: Any, start: Any, count: int, seed: int, steps: int = 200, spread: float = 0.5
) -> Any:
    """`count` linear heads ([count, hidden]). Head k is anchored at `start` plus a random perturbation of
    norm about `spread` x |start|, and fitted from its anchor on a bootstrap resample of the pairs
    (`differences`: chosen minus rejected features) by Bradley-Terry with an L2 pull to its anchor."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    scale = float(start.norm()) or 1.0
    hidden = start.numel()
    heads = []
    for _ in range(count):
        sample = differences[torch.randint(0, len(differences), (len(differences),), generator=generator)]
        anchor = start + torch.randn(hidden, generator=generator) * spread * scale / hidden**0.5
        weight = anchor.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([weight], lr=0.01 * scale / hidden**0.5)
        for _ in range(steps):
            loss = torch.nn.functional.softplus(-(sample @ weight)).mean()
            loss = loss + 1e-3 * ((weight - anchor) ** 2).sum() / scale**2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        heads.append(weight.detach())
    return torch.stack(heads)
