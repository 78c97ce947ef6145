"""The `evaluate` stage on tiny demo policies and a tiny reward model (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import tasks
from common import stats
from common.models import load_causal_lm
from common.outcomes import InputError
from policy import evaluate
from policy.configs import EvaluateConfig
from policy.generation import HFEngine, Sampling, encode_prompts, sample_candidates
from tasks import arithmetic
from tests import tiny_policies
from tests.conftest import rlhf

RECORDS = arithmetic.train_prompts()[:12]
ARITHMETIC = {"name": "arithmetic"}
FAST = {
    "samples_per_prompt": 4,
    "max_new_tokens": 10,
    "bootstrap_samples": 500,
    "device": "cpu",
    "task": ARITHMETIC,
}
METRICS = ("pass_rate_sampled", "pass_rate_greedy", "reward_mean", "win_rate", "kl", "length_mean")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """`good` answers most of the 12 prompts right (greedy all, sampled some), `bad` is untrained, `adapter`
    is `good` with a random LoRA adapter on top; plus a random reward model and the prompts file."""
    root = tmp_path_factory.mktemp("models")
    good = tiny_policies.memorized_model(root / "good", RECORDS)
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in RECORDS)
    )
    return {
        "good": good,
        "bad": tiny_policies.random_model(root / "bad", seed=3),
        "adapter": tiny_policies.lora_adapter(good, root / "adapter"),
        "reward": tiny_policies.reward_model(root / "reward"),
        "prompts": prompts,
    }


def evaluate_stage(out: Path, models: dict[str, Path], labels: dict[str, str], **config) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    inputs = {
        "policies": {label: models[name] for label, name in labels.items()},
        "reward": models["reward"],
        "reference": models["good"],
        "prompts": models["prompts"],
    }
    return evaluate.run(EvaluateConfig(**{**FAST, **config}), inputs, out)


@pytest.fixture(scope="module")
def report(models, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("report")
    metrics = evaluate_stage(out, models, {"good": "good", "bad": "bad", "adapter": "adapter"})
    return metrics, out


def test_writes_the_report_files(report):
    _, out = report
    data = json.loads((out / evaluate.REPORT_FILE).read_text())
    assert data["baseline"] == "good" and data["prompts"]["count"] == 12
    assert set(data["policies"]) == {"good", "bad", "adapter"}
    assert all(len(values) == 12 for entry in data["per_prompt"].values() for values in entry.values())
    assert (out / evaluate.CHART_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / evaluate.MARKDOWN_FILE).read_text()
    assert all(f"| {label} |" in table for label in ("good", "bad", "adapter"))
    responses = [json.loads(line) for line in (out / evaluate.RESPONSES_FILE).read_text().splitlines()]
    assert len(responses) == 12 and len(responses[0]["bad"]["sampled"]) == 4


def test_metrics_carry_every_key_per_policy(report):
    metrics, _ = report
    for label in ("good", "bad", "adapter"):
        for name in METRICS:
            assert isinstance(metrics[f"{label}.{name}"], float), f"{label}.{name}"
            assert f"{label}.{name}_ci_low" in metrics and f"{label}.{name}_ci_high" in metrics
    for label in ("bad", "adapter"):
        for name in ("improvement_sampled", "improvement_greedy"):
            assert f"{label}.{name}" in metrics and f"{label}.{name}_ci_low" in metrics
    assert "good.improvement_sampled" not in metrics  # the baseline has none


def test_values_are_sensible_and_intervals_contain_them(report):
    metrics, _ = report
    assert metrics["good.pass_rate_greedy"] > 0.5 and 0 < metrics["good.pass_rate_sampled"] < 1
    assert metrics["bad.pass_rate_sampled"] == 0 and metrics["bad.improvement_sampled"] < 0
    assert metrics["bad.improvement_sampled_ci_high"] < 0  # clearly worse: the interval excludes 0
    assert metrics["good.kl"] == 0  # the reference itself
    assert metrics["bad.kl"] > 1 and metrics["adapter.kl"] > 0
    assert metrics["good.win_rate"] == 0.5  # the baseline against itself
    for key, value in metrics.items():
        if key.endswith("_ci_low"):
            name = key.removesuffix("_ci_low")
            assert value <= metrics[name] <= metrics[name + "_ci_high"], name
    wide = metrics["good.pass_rate_sampled_ci_high"] - metrics["good.pass_rate_sampled_ci_low"]
    assert 0 < wide < 0.6


def test_same_seed_gives_the_same_report_and_another_seed_another(models, report, tmp_path):
    _, first = report
    evaluate_stage(tmp_path / "again", models, {"good": "good", "bad": "bad", "adapter": "adapter"})
    for name in (evaluate.REPORT_FILE, evaluate.RESPONSES_FILE, evaluate.MARKDOWN_FILE):
        assert (tmp_path / "again" / name).read_text() == (first / name).read_text(), name
    evaluate_stage(tmp_path / "other", models, {"good": "good", "bad": "bad"}, seed=1)
    ours = [json.loads(line)["bad"]["sampled"] for line in (first / evaluate.RESPONSES_FILE).open()]
    theirs = [
        json.loads(line)["bad"]["sampled"] for line in (tmp_path / "other" / evaluate.RESPONSES_FILE).open()
    ]
    assert ours != theirs


@pytest.mark.parametrize("win_rate_by", ["prompt_mean", "sample_pairs"])
def test_a_policy_compared_with_itself_has_no_improvement_and_wins_half(win_rate_by, models, tmp_path):
    metrics = evaluate_stage(
        tmp_path, models, {"a": "adapter", "b": "adapter", "c": "good"}, win_rate_by=win_rate_by
    )
    for name in ("improvement_sampled", "improvement_greedy"):
        assert metrics[f"b.{name}"] == metrics[f"b.{name}_ci_low"] == metrics[f"b.{name}_ci_high"] == 0
    assert metrics["b.win_rate"] == metrics["b.win_rate_ci_low"] == metrics["b.win_rate_ci_high"] == 0.5
    assert metrics["c.win_rate"] != 0.5  # another policy is judged by its rewards
    assert metrics["a.reward_mean"] == metrics["b.reward_mean"]


def test_response_log_probabilities_match_a_forward_pass_per_sequence(models):
    model, tokenizer = load_causal_lm(models["adapter"], device=torch.device("cpu"))
    prompt_ids = encode_prompts(tokenizer, [r["prompt"] for r in RECORDS[:6]])
    drawn = sample_candidates(
        HFEngine(model, tokenizer), prompt_ids, 2, Sampling(1.0, max_new_tokens=8), seed=0
    )
    rows = [(ids, c.token_ids) for ids, pair in zip(prompt_ids, drawn, strict=True) for c in pair]
    expected = []
    with torch.no_grad():
        for prompt, response in rows:
            logps = torch.log_softmax(model(input_ids=torch.tensor([prompt + response])).logits[0], dim=-1)
            expected.append(sum(logps[len(prompt) - 1 + j, t].item() for j, t in enumerate(response)))
    batched = evaluate.sequence_logprobs(model, rows, tokenizer.pad_token_id, batch_size=5)
    assert batched == pytest.approx(expected, abs=1e-4)
    assert len({round(x, 4) for x in expected}) > 1  # different responses, different log-probabilities


def test_the_arithmetic_pass_rate_is_the_fraction_of_right_answers_that_ended(models, report):
    """What `accuracy_*` measured before tasks: a response counts when it ended and parses to the answer."""
    metrics, _ = report
    model, tokenizer = load_causal_lm(models["good"], device=torch.device("cpu"))
    prompt_ids = encode_prompts(tokenizer, [r["prompt"] for r in RECORDS])
    for name, samples, sampling in (
        ("greedy", 1, Sampling(0.0, max_new_tokens=10)),
        ("sampled", 4, Sampling(1.0, max_new_tokens=10)),
    ):
        drawn = sample_candidates(HFEngine(model, tokenizer, 256), prompt_ids, samples, sampling, seed=0)
        right = [
            [c.finished and arithmetic.is_correct(c.text, r["answer"]) for c in d]
            for d, r in zip(drawn, RECORDS, strict=True)
        ]
        assert metrics[f"good.pass_rate_{name}"] == pytest.approx(float(np.mean(right)), abs=1e-12)


def test_without_prompts_it_takes_the_task_s_held_out_split(models, tmp_path):
    inputs = {"policies": {"good": models["good"]}}
    config = EvaluateConfig(**{**FAST, "num_prompts": 5, "samples_per_prompt": 1, "bootstrap_samples": 100})
    metrics = evaluate.run(config, inputs, tmp_path)
    report = json.loads((tmp_path / evaluate.REPORT_FILE).read_text())
    assert report["prompts"]["ids"] == [r["id"] for r in arithmetic.held_out_prompts()[:5]]
    assert report["prompts"]["source"] == {"task": tasks.load(ARITHMETIC).describe(), "split": "held_out"}
    assert {"good.pass_rate_greedy", "good.pass_rate_sampled"} <= set(metrics)


def test_without_a_task_there_is_no_pass_rate_and_without_prompts_it_is_an_error(models, tmp_path):
    inputs = {"policies": {"good": models["good"]}, "prompts": models["prompts"]}
    plain = {**FAST, "task": None, "samples_per_prompt": 1, "bootstrap_samples": 100}
    metrics = evaluate.run(EvaluateConfig(**plain), inputs, tmp_path)
    assert "good.length_mean" in metrics and not any("pass_rate" in key for key in metrics)
    with pytest.raises(InputError, match="evaluate: no `prompts` input and no task"):
        evaluate.run(EvaluateConfig(**plain), {"policies": {"good": models["good"]}}, tmp_path)


def test_prompts_the_task_cannot_judge_are_an_error(models, tmp_path):
    prompts = tmp_path / "chat.jsonl"
    prompts.write_text(json.dumps({"prompt": "Tell me a joke."}) + "\n")
    inputs = {"policies": {"good": models["good"]}, "prompts": prompts}
    with pytest.raises(
        InputError, match=r"task 'arithmetic' cannot judge the prompts in .*row 1 lacks answer"
    ):
        evaluate.run(EvaluateConfig(**FAST), inputs, tmp_path)


def test_an_unknown_baseline_is_a_clear_error(models, tmp_path):
    with pytest.raises(InputError, match="baseline 'sft' is not one of the policies' labels: good, bad"):
        evaluate_stage(tmp_path, models, {"good": "good", "bad": "bad"}, baseline="sft")


def test_bootstrap_interval_of_a_mean_and_of_a_paired_difference():
    rng = np.random.default_rng(0)
    config = EvaluateConfig(bootstrap_samples=2000)
    small, large = rng.random(50), rng.random(2000)
    ci_small = stats.estimate(small, evaluate.resamples(50, config), 0.95)
    ci_large = stats.estimate(large, evaluate.resamples(2000, config), 0.95)
    assert ci_small["ci_low"] < small.mean() < ci_small["ci_high"]
    assert ci_large["ci_high"] - ci_large["ci_low"] < (ci_small["ci_high"] - ci_small["ci_low"]) / 4
    # a paired difference has a much narrower interval than the difference of two unpaired means
    base = rng.random(200)
    better = np.clip(base + 0.05 + rng.normal(0, 0.01, 200), 0, None)
    indices = evaluate.resamples(200, config)
    paired = stats.estimate(better - base, indices, 0.95)
    assert 0 < paired["ci_low"] < 0.05 < paired["ci_high"] < 0.06


@pytest.mark.slow  # a subprocess that imports the stack: about 30 s on a busy 2-core machine
def test_runs_through_rlhf_and_logs_a_table_and_the_chart(workspace, models):
    workflow = {
        "name": "eval",
        "task": ARITHMETIC,
        "stages": {
            "evaluate": {
                "inputs": {
                    "policies": {"good": str(models["good"]), "adapter": str(models["adapter"])},
                    "reference": str(models["good"]),
                    "prompts": str(models["prompts"]),
                },
                "config": {**{k: v for k, v in FAST.items() if k != "task"}, "baseline": "adapter"},
            }
        },
    }
    (workspace / "wf.yaml").write_text(yaml.safe_dump(workflow))
    result = rlhf("run", "wf.yaml", cwd=workspace)
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = json.loads((workspace / "artifacts" / "evaluate" / "v1" / "manifest.json").read_text())
    assert manifest["kind"] == "eval-report"
    assert manifest["metrics"]["baseline"] == "adapter" and "good.improvement_sampled" in manifest["metrics"]
    assert "good.reward_mean" not in manifest["metrics"]  # no reward model given

    from tests.wandb_offline import run_files, summarize

    runs = [summarize(f) for f in run_files(workspace / "runs" / "wandb")]
    run = next(r for r in runs if r.get("job_type") == "evaluate")
    assert {"responses", "chart"} <= run["history_keys"]
