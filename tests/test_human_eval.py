"""The `human_eval` stage on a real embedded Argilla server: blind pairs of an evaluate report's responses,
judged by simulated judges through the annotators' HTTP API, un-blinded into win rates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import tasks
from annotation import argilla_dataset as layout
from annotation import human_eval
from annotation.configs import HumanEvalConfig, SimulatedAnnotators
from common.outcomes import InputError, Waiting
from policy import evaluate
from policy.configs import EvaluateConfig
from tasks import arithmetic
from tests import tiny_policies
from tests.conftest import module_argilla

RECORDS = arithmetic.train_prompts()[:16]
TASK = tasks.load({"name": "arithmetic"})


@pytest.fixture(scope="module")
def argilla(tmp_path_factory):
    yield from module_argilla(tmp_path_factory, annotators=1)


@pytest.fixture(autouse=True)
def local_server(argilla, monkeypatch):
    monkeypatch.delenv("ARGILLA_API_URL", raising=False)
    monkeypatch.delenv("ARGILLA_API_KEY", raising=False)
    monkeypatch.setenv("RLHF_ARGILLA_HOME", str(argilla.home))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """An evaluate report comparing `good` (answers the prompts mostly right) with `bad` (untrained), the
    baseline, scored by a tiny reward model."""
    root = tmp_path_factory.mktemp("report")
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in RECORDS)
    )
    inputs = {
        "policies": {
            "bad": tiny_policies.random_model(root / "bad", seed=3),
            "good": tiny_policies.memorized_model(root / "good", RECORDS),
        },
        "reward": tiny_policies.reward_model(root / "reward"),
        "prompts": prompts,
    }
    config = EvaluateConfig(
        samples_per_prompt=2,
        max_new_tokens=10,
        bootstrap_samples=200,
        device="cpu",
        task={"name": "arithmetic"},
    )
    (root / "out").mkdir()
    evaluate.run(config, inputs, root / "out")
    return root / "out"


def run(report: Path, out: Path, **config) -> dict:
    out.mkdir(parents=True)
    settings = {"task": {"name": "arithmetic"}, "bootstrap_samples": 300, **config}
    return human_eval.run(HumanEvalConfig(**settings), {"evaluation": report}, out)


def test_judged_pairs_are_unblinded_into_the_win_rate_the_judges_gave(argilla, report, tmp_path):
    bots = SimulatedAnnotators(annotators=3, noise=0.0, seed=1)
    metrics = run(report, tmp_path / "out", dataset="he-exact", annotators_per_record=2, simulate=bots)
    pairs = [
        json.loads(line) for line in (tmp_path / "out" / human_eval.JUDGMENTS_FILE).read_text().splitlines()
    ]
    assert len(pairs) == len(RECORDS) == metrics["pairs"]
    asked = [p for p in pairs if not p.get("identical")]
    assert asked and all(len(p["judgments"]) == 2 for p in asked)
    for pair in asked:  # noise 0: every judge prefers the response the task prefers, whatever the order
        record = {"prompt": pair["prompt"], "answer": pair["answer"]}
        ours, theirs = (TASK.preference(record, pair[f"{who}_response"]) for who in ("policy", "baseline"))
        assert pair["score"] == (1.0 if ours > theirs else 0.0 if ours < theirs else 0.5)
    assert {pair["shown"][0] for pair in asked} == {"good", "bad"}  # both orders were shown
    win = metrics["good.human_win_rate"]
    assert win == pytest.approx(sum(p["score"] for p in pairs) / len(pairs))
    assert (
        win > 0.7 and metrics["good.human_win_rate_ci_low"] <= win <= metrics["good.human_win_rate_ci_high"]
    )
    assert metrics["judge_agreement"] == 1.0 and metrics["judgments"] == 2 * len(asked)
    assert metrics["human_task_agreement"]["value"] == 1.0
    assert metrics["human_rm_agreement"]["pairs"] > 0 and 0 <= metrics["human_rm_agreement"]["value"] <= 1
    assert "good" in (tmp_path / "out" / human_eval.MARKDOWN_FILE).read_text()


def test_the_same_responses_draw_the_same_judgments_wherever_the_report_lies(argilla, report, tmp_path):
    """Pair ids and the bots' draws follow the evaluation's responses, not its artifact digest (which covers
    paths and durations): a fresh clone reproduces the demo's human win rates."""
    copies = []
    for index in range(2):
        copy = tmp_path / f"clone{index}" / "evaluate"
        shutil.copytree(report, copy)
        (copy / "manifest.json").write_text(json.dumps({"digest": f"{index}" * 64, "path": str(copy)}))
        copies.append(copy)
    assert human_eval.report_digest(copies[0]) == human_eval.report_digest(copies[1])
    bots = SimulatedAnnotators(annotators=2, noise=0.5, seed=4)
    judged = []
    for index, copy in enumerate(copies):
        out = tmp_path / f"out{index}"
        run(copy, out, dataset=f"he-clone-{index}", annotators_per_record=2, simulate=bots)
        judged.append(
            [json.loads(line) for line in (out / human_eval.JUDGMENTS_FILE).read_text().splitlines()]
        )
    assert [p["record_id"] for p in judged[0]] == [p["record_id"] for p in judged[1]]
    assert [[j["value"] for j in p["judgments"]] for p in judged[0]] == [
        [j["value"] for j in p["judgments"]] for p in judged[1]
    ]
    assert any(len({j["value"] for j in p["judgments"]}) > 1 for p in judged[0])  # the noise did draw


def test_annotators_see_no_policy_name(argilla, report, tmp_path):
    bots = SimulatedAnnotators(annotators=1, noise=0.0)
    run(report, tmp_path / "out", dataset="he-blind", simulate=bots)
    with layout.Api(argilla.connection()) as api:
        records = api.records(metrics_dataset_id(api, "he-blind"))
    assert len(records) == len([p for p in read_pairs(tmp_path / "out") if not p.get("identical")])
    for record in records:
        shown = json.dumps([record["fields"], record.get("metadata"), record["external_id"]])
        assert "good" not in shown and "bad" not in shown
        assert set(record["fields"]) == {"prompt", "response_1", "response_2"}


def test_it_waits_until_the_pairs_are_judged_and_pushing_again_adds_nothing(argilla, report, tmp_path):
    with pytest.raises(Waiting, match=r"0/\d+ pairs judged"):
        run(report, tmp_path / "first", dataset="he-wait", annotators_per_record=2)
    assert not any((tmp_path / "first").iterdir())  # nothing published
    bots = SimulatedAnnotators(annotators=2, noise=0.2, seed=3)
    metrics = run(report, tmp_path / "second", dataset="he-wait", annotators_per_record=2, simulate=bots)
    with layout.Api(argilla.connection()) as api:
        records = api.records(metrics_dataset_id(api, "he-wait"))
    assert len(records) == len([p for p in read_pairs(tmp_path / "second") if not p.get("identical")])
    assert 0 < metrics["judge_agreement"] < 1  # noisy judges disagree sometimes


def test_a_spot_check_shows_each_policy_s_highest_reward_sample(argilla, report, tmp_path):
    bots = SimulatedAnnotators(annotators=1, noise=0.0)
    run(report, tmp_path / "out", dataset="he-top", response="top_reward", simulate=bots)
    rows = {
        json.loads(line)["id"]: json.loads(line)
        for line in (report / "responses.jsonl").read_text().splitlines()
    }
    for pair in read_pairs(tmp_path / "out"):
        if pair.get("identical"):
            continue
        good = rows[pair["prompt_id"]]["good"]
        best = max(range(len(good["rewards"])), key=good["rewards"].__getitem__)
        assert (
            pair["policy_response"] == good["sampled"][best]
            and pair["policy_reward"] == good["rewards"][best]
        )


def test_unknown_policies_are_a_clear_error(report, tmp_path):
    with pytest.raises(InputError, match="'nope' not among the evaluated policies"):
        run(report, tmp_path / "out", policies=["nope"])


def read_pairs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / human_eval.JUDGMENTS_FILE).read_text().splitlines()]


def metrics_dataset_id(api: layout.Api, name: str) -> str:
    dataset = api.find_dataset(api.workspace_id("rlhf"), name)
    assert dataset is not None
    return dataset["id"]


@pytest.mark.parametrize(
    ("report_json", "responses", "message"),
    [
        ("", "", "not a readable evaluate report"),  # empty
        ('{"baseline": "sft"', "", "not a readable evaluate report"),  # malformed
        ('{"baseline": 3, "policies": []}', "", "lacks `baseline`"),  # wrong types
        ('{"baseline": "sft", "policies": {"sft": {}}}', "", "has no prompts"),
        (
            '{"baseline": "sft", "policies": {"sft": {}}}',
            '{"id": "p", "prompt": "q", "sft": "x"}\n',
            "line 1",
        ),
    ],
)
def test_a_broken_report_is_one_clear_error(tmp_path, report_json, responses, message):
    (tmp_path / "report.json").write_text(report_json)
    (tmp_path / "responses.jsonl").write_text(responses)
    with pytest.raises(InputError, match=message):
        run(tmp_path, tmp_path / "out")
