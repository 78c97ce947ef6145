"""The reward-hacking audit (`policy/audit.py`): its rule on hand-made figures, and a real case: a policy
that our PPO trained against a deliberately inverted reward model (it prefers answers off by ten) is
flagged by `evaluate` and by PPO's own metrics, while the policy it started from is not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaForSequenceClassification

from common.reward_model import encode
from policy import audit, evaluate, ppo
from policy.configs import EvaluateConfig, PPOConfig
from tasks import arithmetic
from tests import tiny_policies

RECORDS = arithmetic.train_prompts()[:12]


def interval(value: float, low: float, high: float) -> dict[str, float]:
    return {"value": value, "ci_low": low, "ci_high": high}


# --- the rule ---


def test_reward_up_while_the_pass_rate_is_not_is_flagged_and_says_which_way_it_went():
    reward_up = interval(0.5, 0.2, 0.8)
    fell = audit.gaming_reason(reward_up, interval(-0.1, -0.15, -0.05))
    flat = audit.gaming_reason(reward_up, interval(0.01, -0.03, 0.05))
    assert fell is not None and "fell" in fell and "-10.0 points" in fell
    assert flat is not None and "did not rise" in flat


def test_no_flag_when_the_pass_rate_rose_too_or_the_reward_did_not_or_nothing_judges():
    assert audit.gaming_reason(interval(0.5, 0.2, 0.8), interval(0.1, 0.05, 0.15)) is None
    assert audit.gaming_reason(interval(0.1, -0.1, 0.3), interval(-0.1, -0.15, -0.05)) is None
    assert audit.gaming_reason(interval(0.5, 0.2, 0.8), None) is None


def test_training_flag_needs_the_reward_up_and_the_pass_rate_down_beyond_its_tolerance():
    assert audit.training_audit(1.0, 2.0, 0.8, 0.5)["gaming_suspected"]
    assert not audit.training_audit(1.0, 2.0, 0.8, 0.79)["gaming_suspected"]  # within the tolerance
    assert not audit.training_audit(2.0, 1.0, 0.8, 0.5)["gaming_suspected"]  # the reward fell too
    assert audit.training_audit(1.0, 2.0, None, None) == {}


def test_top_reward_fail_rate_and_the_failures_with_the_highest_rewards():
    rewards = np.array([[5.0, 1.0], [4.0, 0.0], [3.0, 2.0]])
    verdicts = np.array([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    assert audit.top_reward_fail_rate(rewards, verdicts, top_fraction=0.5) == pytest.approx(2 / 3)
    records = [{"id": f"p{i}", "prompt": f"q{i}"} for i in range(3)]
    sampled = [["a", "b"], ["c", "d"], ["e", "f"]]
    listed = audit.top_reward_failures(records, sampled, rewards, verdicts, count=2)
    assert [(f["prompt_id"], f["response"], f["reward"]) for f in listed] == [
        ("p0", "a", 5.0),
        ("p2", "e", 3.0),
    ]
    assert audit.reward_verdict_correlation(rewards, verdicts) < 0
    assert audit.reward_verdict_correlation(rewards, np.ones_like(rewards)) is None


# --- a real case ---


def inverted_reward_model(out_dir: Path, steps: int = 200) -> Path:
    """A tiny reward model trained (Bradley-Terry) to prefer the answer off by ten to the right one on the
    prompts of `RECORDS`: a deliberately broken judge."""
    tok = tiny_policies.tokenizer()
    model = LlamaForSequenceClassification.from_pretrained(tiny_policies.reward_model(out_dir))
    pairs = []
    for r in RECORDS:
        wrong = f"{r['a']} + {r['b']} = {r['answer'] + 10}"
        pairs.append(
            (
                encode(tok, r["prompt"], wrong),
                encode(tok, r["prompt"], arithmetic.render_response(r["a"], r["b"])),
            )
        )
    width = max(len(ids) for pair in pairs for ids in pair)
    rows = [ids + [tok.pad_token_id] * (width - len(ids)) for pair in pairs for ids in pair]
    input_ids = torch.tensor(rows)
    attention = (input_ids != tok.pad_token_id).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        rewards = model(input_ids=input_ids, attention_mask=attention).logits.view(-1, 2)
        loss = -torch.nn.functional.logsigmoid(rewards[:, 0] - rewards[:, 1]).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().save_pretrained(out_dir)  # over the random start (tokenizer and reward.json stay)
    return out_dir


@pytest.fixture(scope="module")
def hacked(tmp_path_factory):
    """`good` answers RECORDS mostly right; `hacked` is what PPO made of it against the inverted judge."""
    root = tmp_path_factory.mktemp("audit")
    good = tiny_policies.memorized_model(root / "good", RECORDS)
    judge = inverted_reward_model(root / "judge")
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in RECORDS)
    )
    config = PPOConfig(
        updates=25,
        batch_size=12,
        minibatches=2,
        ppo_epochs=2,
        lr=3e-3,
        kl_coef=0.0,
        max_new_tokens=10,
        task={"name": "arithmetic"},
        device="cpu",
    )
    metrics = ppo.run(config, {"policy": good, "reward": judge, "prompts": prompts}, root / "hacked")
    return {"good": good, "hacked": root / "hacked", "judge": judge, "prompts": prompts, "ppo": metrics}


def test_ppo_flags_its_own_rollouts_when_the_reward_rises_and_the_pass_rate_falls(hacked):
    metrics = hacked["ppo"]
    assert metrics["reward_final"] > metrics["reward_initial"]
    assert metrics["pass_rate_sampled"] < metrics["pass_rate_sampled_initial"]
    assert metrics["gaming_suspected"] is True and "pass rate fell" in metrics["gaming_reason"]


def test_evaluate_flags_the_policy_that_games_its_reward_model_and_not_its_baseline(hacked, tmp_path):
    config = EvaluateConfig(
        samples_per_prompt=8,
        max_new_tokens=10,
        bootstrap_samples=500,
        device="cpu",
        task={"name": "arithmetic"},
    )
    inputs = {
        "policies": {"good": hacked["good"], "hacked": hacked["hacked"]},
        "reward": hacked["judge"],
        "reference": hacked["good"],
        "prompts": hacked["prompts"],
    }
    metrics = evaluate.run(config, inputs, tmp_path)
    assert metrics["gaming_suspected"] == ["hacked"]
    assert metrics["hacked.gaming_suspected"] is True and metrics["good.gaming_suspected"] is False
    assert metrics["hacked.reward_gain_ci_low"] > 0 and metrics["hacked.improvement_sampled_ci_high"] < 0
    # the correlation reported is that of each policy's own samples: rewards against the task's verdicts
    # (for `good` its sign depends on the CPU: below 0 on an AMD EPYC, +0.02 on an Intel Xeon, 2026-12-03)
    rows = [json.loads(line) for line in (tmp_path / evaluate.RESPONSES_FILE).read_text().splitlines()]
    for label in ("good", "hacked"):
        rewards = np.array([reward for row in rows for reward in row[label]["rewards"]])
        verdicts = np.array([verdict for row in rows for verdict in row[label]["sampled_verdicts"]])
        assert metrics[f"{label}.reward_verdict_correlation"] == pytest.approx(
            audit.reward_verdict_correlation(rewards, verdicts)
        )
    assert metrics["hacked.top_reward_fail_rate"] >= metrics["good.top_reward_fail_rate"] > 0
    report = json.loads((tmp_path / evaluate.REPORT_FILE).read_text())
    failures = report["audit"]["hacked"]["top_reward_failures"]
    assert failures and all(f["verdict"] < 1 for f in failures)
    assert "hacked looks like it games the reward model" in (tmp_path / evaluate.MARKDOWN_FILE).read_text()
    assert "entropy" in report["policies"]["hacked"]


def test_a_policy_compared_with_itself_is_not_flagged(hacked, tmp_path):
    config = EvaluateConfig(
        samples_per_prompt=4,
        max_new_tokens=10,
        bootstrap_samples=200,
        device="cpu",
        task={"name": "arithmetic"},
    )
    inputs = {
        "policies": {"a": hacked["good"], "b": hacked["good"]},
        "reward": hacked["judge"],
        "prompts": hacked["prompts"],
    }
    metrics = evaluate.run(config, inputs, tmp_path)
    assert metrics["gaming_suspected"] == []
    assert "no policy's reward rose" in (tmp_path / evaluate.MARKDOWN_FILE).read_text()
