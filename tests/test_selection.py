"""Choosing what annotators see (`annotation/selection.py`): the anchored ensemble of reward heads
disagrees where the pairs so far say little, and `choose` sends the budget there (or draws at random),
leaving out prompts that already have pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from annotation import selection
from annotation.configs import Selection
from common.outcomes import InputError
from tasks import arithmetic
from tests import tiny_policies


def test_heads_agree_where_the_pairs_say_a_lot_and_disagree_where_they_say_nothing():
    hidden = 16
    start = torch.zeros(hidden)
    start[0] = 1.0
    generator = torch.Generator().manual_seed(0)
    differences = torch.zeros(200, hidden)
    differences[:, 0] = 1.0 + 0.1 * torch.randn(
        200, generator=generator
    )  # every pair: more of feature 0 wins
    heads = selection.fit_heads(differences, start, count=8, seed=0)
    features = torch.zeros(4, hidden)
    features[1, 0] = 0.5  # record A: its candidates differ along the direction the pairs covered
    features[3, 5] = 3.0  # record B: along one no pair ever showed
    seen, unseen = selection.disagreement(features, [(0, 2), (2, 4)], heads)
    assert unseen > 5 * seen


def records(n: int) -> list[dict]:
    return [
        {
            "record_id": f"r{i}",
            "prompt_id": r["id"],
            "prompt": r["prompt"],
            "answer": r["answer"],
            "candidates": [
                arithmetic.render_response(r["a"], r["b"]),
                f"{r['a']} + {r['b']} = {r['answer'] + 10}",
            ],
        }
        for i, r in enumerate(arithmetic.train_prompts()[:n])
    ]


def previous_pairs(folder: Path, pool: list[dict]) -> Path:
    folder.mkdir(parents=True)
    rows = [
        {
            "prompt": r["prompt"],
            "chosen": r["candidates"][0],
            "rejected": r["candidates"][1],
            "prompt_id": r["prompt_id"],
        }
        for r in pool
    ]
    (folder / "preferences.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_random_choice_is_seeded_and_leaves_out_prompts_with_pairs(tmp_path):
    pool = records(20)
    previous = previous_pairs(tmp_path / "previous", pool[:5])
    chosen, scored, counts = selection.choose(pool, Selection(budget=6, by="random", seed=1), None, previous)
    again, _, _ = selection.choose(pool, Selection(budget=6, by="random", seed=1), None, previous)
    other, _, _ = selection.choose(pool, Selection(budget=6, by="random", seed=2), None, previous)
    assert len(chosen) == 6 and chosen == again and chosen != other
    assert not {r["prompt_id"] for r in chosen} & {r["prompt_id"] for r in pool[:5]}
    assert counts == {"pool": 15, "pool_left_out_previous": 5, "selected": 6, "select_by": "random"}
    assert sum(row["chosen"] for row in scored) == 6


def test_disagreement_scores_every_record_with_a_real_reward_model(tmp_path):
    pool = records(16)
    reward = tiny_policies.reward_model(tmp_path / "reward")
    previous = previous_pairs(tmp_path / "previous", pool[:6])
    chosen, scored, counts = selection.choose(pool, Selection(budget=4, heads=4), reward, previous)
    assert counts["pool"] == 10 and len(chosen) == 4
    top = sorted(scored, key=lambda row: -row["score"])[:4]
    assert {row["record_id"] for row in top} == {r["record_id"] for r in chosen}
    assert len({round(row["score"], 9) for row in scored}) > 1  # the scores tell records apart


def test_model_based_choices_need_their_inputs(tmp_path):
    with pytest.raises(InputError, match="needs a `reward` input"):
        selection.choose(records(4), Selection(budget=2, by="spread"), None, None)
    reward = tiny_policies.reward_model(tmp_path / "reward")
    with pytest.raises(InputError, match="needs a `previous` input"):
        selection.choose(records(4), Selection(budget=2), reward, None)
