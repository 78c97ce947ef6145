"""The `human_eval` stage: blind pairwise human evaluation of policies in Argilla, un-blinded into win rates.

Input `evaluation`: an `evaluate` report (`report.json`, `responses.jsonl`), whose held-out prompts, policy
responses and reward-model scores it reuses, so people judge exactly what the automatic figures measured.
For each of the first `num_prompts` prompts and each policy, one pair: the policy's response and the
baseline's (the first sampled, or the greedy one), shown as "Response 1" and "Response 2" in an order
drawn per pair (seeded), with no policy name anywhere an annotator can see (the record id is a hash). A
pair whose two responses are the same text is not asked: it counts as a tie (`pairs_identical`).

The dataset has a label question (Response 1 better / Response 2 better / about the same) and an optional
comment; Argilla's task distribution (`min_submitted` = `annotators_per_record`) takes a pair out of the
queues once it has its judgments. With `simulate`, bot judges answer by the task's verdict plus noise
(`annotation/simulate.py`). Below `min_fraction` judged pairs the stage raises `Waiting` and publishes
nothing; run it again (or `rlhf serve`) when more judgments are in: the push is idempotent.

Un-blinded (payload, kind `eval-report`): per policy and prompt a score, the mean over the pair's judges
of 1 (the policy's response judged better), 1/2 (about the same) or 0; `human_win_rate` is its mean over
prompts with a percentile bootstrap interval (`common.stats`); `judge_agreement`, over pairs with two or
more judgments, the fraction of judge pairs that gave the same answer; `human_rm_agreement`, over pairs
the judges' majority did not call a tie, the fraction where the reward model (its scores in the report)
prefers the same response; with a task, `human_task_agreement` likewise against the task's verdict.
Files: `report.json`, `judgments.jsonl` (every pair un-blinded, with its judgments) and `report.md`.

Reads top to bottom: load, check, push, read, measure, save.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

import tasks
from annotation import argilla_dataset as layout
from annotation import push, server, simulate
from annotation.argilla_dataset import Api
from annotation.configs import HumanEvalConfig, judged_policies
from common import stats
from common.digests import sha256_file
from common.outcomes import InputError, Waiting
from common.training import Table, log_to_wandb, wandb_run

REPORT_FILE = "report.json"
JUDGMENTS_FILE = "judgments.jsonl"
MARKDOWN_FILE = "report.md"
SCORE = {"first": 1.0, "tie": 0.5, "second": 0.0}
"""A judgment as the score of the response shown first."""


def run(config: HumanEvalConfig, inputs: dict[str, Path | str], out_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()

    # Load
    report_dir = Path(inputs["evaluation"])
    report, rows = load_report(report_dir)

    # Check
    try:
        baseline, policies = judged_policies(config, list(report["policies"]), report["baseline"])
    except ValueError as err:
        raise InputError(f"human_eval: {err}") from None
    rows = rows[: config.num_prompts] if config.num_prompts else rows
    digest = report_digest(report_dir)
    pairs, identical = make_pairs(rows, policies, baseline, config, digest)
    task = tasks.load(config.task) if config.task is not None else None
    if config.simulate is not None:
        simulate.check_judgeable(task, pairs)

    # Push
    connection = server.connect(start=True)
    name = config.dataset or f"human-eval-{digest[:8]}"
    with Api(connection) as api:
        workspace_id = api.workspace_id(config.workspace, create=True)
        dataset, comment = ensure_dataset(api, workspace_id, name, config)
        push.ensure_members(api, workspace_id, config.annotators, external=connection.external)
        upsert_pairs(api, dataset["id"], pairs)
    batch = {
        "dataset": {"name": name, "id": dataset["id"]},
        "workspace": config.workspace,
        "slots": layout.PAIR_SLOTS,
        "questions": {"comment": layout.COMMENT if comment else None},
    }
    if config.simulate is not None:
        assert task is not None
        bots, judged_task = config.simulate, task
        simulate.rank_batch(
            connection,
            batch,
            pairs,
            bots,
            task,
            bulk=True,
            answer=lambda bot, pair: simulate.judge_answer(bot, pair, bots, comment, judged_task),
        )

    # Read
    with Api(connection) as api:
        server_records = api.records(dataset["id"])
        usernames = {user["id"]: user["username"] for user in api.users()}
    judgments = read_judgments(server_records, usernames)
    done = [p for p in pairs if len(judgments.get(p["record_id"], [])) >= config.annotators_per_record]
    need = max(1, round(config.min_fraction * len(pairs)))
    if len(done) < need:
        raise Waiting(
            f"{len(done)}/{len(pairs)} pairs judged (human_eval needs {need}); annotators judge at "
            f"{connection.url}, dataset {name}"
        )

    # Measure
    unblinded = [unblind(pair, judgments.get(pair["record_id"], []), task) for pair in pairs]
    unblinded += identical
    result = measure(unblinded, policies, config)

    # Save
    full = {
        "baseline": baseline,
        "evaluation": {"path": str(report_dir), "prompts": report.get("prompts", {}).get("source")},
        "prompts": len(rows),
        "dataset": {"name": name, "url": connection.url},
        "settings": config.model_dump(mode="json"),
        **result,
    }
    (out_dir / REPORT_FILE).write_text(json.dumps(full, indent=2) + "\n")
    with (out_dir / JUDGMENTS_FILE).open("w", encoding="utf-8") as file:
        for pair in unblinded:
            file.write(json.dumps(pair, ensure_ascii=False) + "\n")
    (out_dir / MARKDOWN_FILE).write_text(markdown(full))
    log_pairs(unblinded)

    metrics: dict[str, Any] = {"baseline": baseline, "prompts": len(rows), "pairs": len(unblinded)}
    for label, entry in result["policies"].items():
        win = entry["human_win_rate"]
        metrics[f"{label}.human_win_rate"] = win["value"]
        metrics[f"{label}.human_win_rate_ci_low"] = win["ci_low"]
        metrics[f"{label}.human_win_rate_ci_high"] = win["ci_high"]
    for key in (
        "judgments",
        "pairs_identical",
        "judge_agreement",
        "human_rm_agreement",
        "human_task_agreement",
    ):
        metrics[key] = result[key]
    metrics.update(dataset=name, url=connection.url, duration_s=time.perf_counter() - started)
    return metrics


# --- load ---


def load_report(report_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """An evaluate report and its responses (one row per prompt, every policy's responses and rewards)."""
    try:
        report = json.loads((report_dir / "report.json").read_text())
        lines = (report_dir / "responses.jsonl").read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError) as err:
        raise InputError(f"human_eval: {report_dir} is not a readable evaluate report: {err}") from None
    if not (
        isinstance(report, dict)
        and isinstance(report.get("baseline"), str)
        and isinstance(report.get("policies"), dict)
    ):
        raise InputError(
            f"human_eval: {report_dir}/report.json lacks `baseline` (a label) and `policies` (by label)"
        )
    for number, row in enumerate(rows, 1):
        entries = [row.get(label) for label in report["policies"]] if isinstance(row, dict) else [None]
        if (
            not isinstance(row, dict)
            or "id" not in row
            or "prompt" not in row
            or not all(
                isinstance(e, dict) and isinstance(e.get("sampled"), list) and e["sampled"] and "greedy" in e
                for e in entries
            )
        ):
            raise InputError(
                f"human_eval: {report_dir}/responses.jsonl line {number}: expected `id`, `prompt` and, for each "
                f"policy ({', '.join(report['policies'])}), its `greedy` and `sampled` responses"
            )
    if not rows:
        raise InputError(f"human_eval: {report_dir}/responses.jsonl has no prompts")
    return report, rows


def report_digest(report_dir: Path) -> str:
    """The digest of the evaluation's responses (`responses.jsonl`): it names the dataset and salts the pair
    ids, so the same responses make the same pairs and draw the same simulated judgments in any store or
    clone (the artifact's own digest also covers its manifest: input paths, durations), and other responses
    make a dataset of their own."""
    return sha256_file(report_dir / "responses.jsonl")


# --- check ---

RESERVED = ("id", "prompt")


def make_pairs(
    rows: list[dict[str, Any]], policies: list[str], baseline: str, config: HumanEvalConfig, salt: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The pairs to ask about (`record_id`, `prompt_id`, `prompt`, `responses` in display order, who wrote
    each (`shown`), their rewards, the prompt's fields for the task) and the pairs of identical responses,
    already un-blinded as ties. `salt` (`report_digest`) makes the pair ids those of this evaluation."""
    asked, identical = [], []
    for row in rows:
        fields = {k: v for k, v in row.items() if k not in RESERVED and not isinstance(v, dict)}
        theirs = response_of(row[baseline], config.response)
        for label in policies:
            ours = response_of(row[label], config.response)
            pair_id = hashlib.sha256(f"{salt}:{row['id']}:{label}:{baseline}".encode()).hexdigest()[:16]
            common = {"record_id": pair_id, "prompt_id": row["id"], "prompt": row["prompt"], **fields}
            if ours[0] == theirs[0]:
                identical.append(
                    {**common, "policy": label, "identical": True, "judgments": [], "score": 0.5}
                )
                continue
            shown = [label, baseline]
            random.Random(f"{config.seed}:{pair_id}").shuffle(shown)
            by_label = {label: ours, baseline: theirs}
            asked.append(
                {
                    **common,
                    "policy": label,
                    "baseline": baseline,
                    "shown": shown,
                    "responses": [by_label[who][0] for who in shown],
                    "rewards": [by_label[who][1] for who in shown],
                }
            )
    return asked, identical


def response_of(entry: dict[str, Any], which: str) -> tuple[str, float | None]:
    """A policy's response to a prompt in the report (its first sample, its greedy response, or its sample
    the reward model scored highest) and its reward (sampled responses only: the report scores samples)."""
    if which == "greedy":
        return entry["greedy"], None
    rewards = entry.get("rewards")
    if which == "top_reward":
        if not rewards:
            raise InputError(
                "human_eval: response: top_reward needs a report with rewards (evaluate with a reward model)"
            )
        best = max(range(len(rewards)), key=rewards.__getitem__)
        return entry["sampled"][best], rewards[best]
    return entry["sampled"][0], (rewards[0] if rewards else None)


# --- push ---


def ensure_dataset(
    api: Api, workspace_id: str, name: str, config: HumanEvalConfig
) -> tuple[dict[str, Any], bool]:
    settings = {
        "guidelines": config.guidelines or layout.pair_guidelines(config.annotators_per_record),
        "distribution": {"strategy": "overlap", "min_submitted": config.annotators_per_record},
        "metadata": {"created_by": "rlhf human_eval"},
    }
    fields = layout.field_specs(layout.PAIR_SLOTS)
    dataset, existing = layout.ensure_dataset(
        api, workspace_id, name, settings, fields, layout.pair_question_specs(config.comment), []
    )
    if existing is None:
        return dataset, config.comment
    if layout.PREFERENCE not in existing["questions"] or existing["fields"] != {f["name"] for f in fields}:
        raise InputError(
            f"human_eval: dataset {name!r} exists with another layout (fields {sorted(existing['fields'])}, "
            f"questions {sorted(existing['questions'])}): set `dataset` to a new name"
        )
    return dataset, layout.COMMENT in existing["questions"]


def upsert_pairs(api: Api, dataset_id: str, pairs: list[dict[str, Any]]) -> None:
    """Create or update the pairs' records by `external_id` (a hash: it names no policy)."""
    order = list(range(layout.PAIR_SLOTS))
    for start in range(0, len(pairs), layout.BULK_SIZE):
        items = [
            {
                "external_id": pair["record_id"],
                "fields": layout.record_fields(pair["prompt"], pair["responses"], order, layout.PAIR_SLOTS),
            }
            for pair in pairs[start : start + layout.BULK_SIZE]
        ]
        api.put(f"/api/v1/datasets/{dataset_id}/records/bulk", json={"items": items})


# --- read ---


def read_judgments(
    server_records: list[dict[str, Any]], usernames: dict[str, str]
) -> dict[str, list[dict[str, Any]]]:
    """Per record (external id): its submitted judgments `{"annotator", "value", "simulated", "comment"?}`."""
    judgments: dict[str, list[dict[str, Any]]] = {}
    for record in server_records:
        for response in record.get("responses") or []:
            values = response.get("values") or {}
            value = (values.get(layout.PREFERENCE) or {}).get("value")
            if response["status"] != "submitted" or value not in SCORE:
                continue
            annotator = usernames.get(response["user_id"], response["user_id"])
            entry = {"annotator": annotator, "value": value, "simulated": simulate.is_simulated(annotator)}
            if comment := (values.get(layout.COMMENT) or {}).get("value"):
                entry["comment"] = comment
            judgments.setdefault(record["external_id"], []).append(entry)
    for entries in judgments.values():
        entries.sort(key=lambda entry: entry["annotator"])
    return judgments


def unblind(pair: dict[str, Any], judgments: list[dict[str, Any]], task: tasks.Task | None) -> dict[str, Any]:
    """The pair with its judgments, and `score`: how the policy's response fared, the mean over judges of
    1 (better), 1/2 (about the same), 0 (worse); None without judgments. With a task, each response's
    verdict. Rewards and verdicts as `policy_*` / `baseline_*`."""
    policy_first = pair["shown"][0] == pair["policy"]
    scores = [SCORE[j["value"]] if policy_first else 1 - SCORE[j["value"]] for j in judgments]
    ours, theirs = (0, 1) if policy_first else (1, 0)
    row = {
        **{k: v for k, v in pair.items() if k not in ("responses", "rewards")},
        "policy_response": pair["responses"][ours],
        "baseline_response": pair["responses"][theirs],
        "policy_reward": pair["rewards"][ours],
        "baseline_reward": pair["rewards"][theirs],
        "judgments": judgments,
        "score": float(np.mean(scores)) if scores else None,
    }
    if task is not None:
        row["policy_verdict"] = task.judge(pair, pair["responses"][ours])
        row["baseline_verdict"] = task.judge(pair, pair["responses"][theirs])
    return row


# --- measure ---


def measure(pairs: list[dict[str, Any]], policies: list[str], config: HumanEvalConfig) -> dict[str, Any]:
    """Per policy the human win rate against the baseline with its interval; agreement figures."""
    scored = [p for p in pairs if p["score"] is not None]
    result: dict[str, Any] = {"policies": {}}
    for label in policies:
        mine = sorted((p for p in scored if p["policy"] == label), key=lambda p: str(p["prompt_id"]))
        values = np.array([p["score"] for p in mine], dtype=float)  # one pair per prompt and policy
        indices = stats.resamples(len(values), config.bootstrap_samples, config.seed)
        outcomes = Counter("win" if p["score"] > 0.5 else "loss" if p["score"] < 0.5 else "tie" for p in mine)
        result["policies"][label] = {
            "human_win_rate": stats.estimate(values, indices, config.confidence),
            "pairs": len(mine),
            "pairs_identical": sum(bool(p.get("identical")) for p in mine),
            "wins": outcomes["win"],
            "ties": outcomes["tie"],
            "losses": outcomes["loss"],
        }
    result["judgments"] = sum(len(p["judgments"]) for p in pairs)
    result["pairs_identical"] = sum(bool(p.get("identical")) for p in pairs)
    result["judge_agreement"] = judge_agreement(pairs)
    result["human_rm_agreement"] = side_agreement(pairs, "reward")
    result["human_task_agreement"] = side_agreement(pairs, "verdict")
    result["definitions"] = DEFINITIONS
    return result


def judge_agreement(pairs: list[dict[str, Any]]) -> float | None:
    """Over pairs with two or more judgments: the fraction of judge pairs that gave the same answer."""
    same = total = 0
    for pair in pairs:
        values = [j["value"] for j in pair["judgments"]]
        for i in range(len(values)):
            for j in range(i + 1, len(values)):
                same += values[i] == values[j]
                total += 1
    return same / total if total else None


def side_agreement(pairs: list[dict[str, Any]], what: str) -> dict[str, Any]:
    """How often the judges' majority and the reward model (`reward`) or the task (`verdict`) prefer the
    same response: over pairs the majority did not call a tie, where the other side does not tie either."""
    agree = counted = 0
    for pair in pairs:
        score, ours, theirs = pair["score"], pair.get(f"policy_{what}"), pair.get(f"baseline_{what}")
        if score is None or score == 0.5 or ours is None or theirs is None or ours == theirs:
            continue
        counted += 1
        agree += (score > 0.5) == (ours > theirs)
    return {"value": agree / counted if counted else None, "pairs": counted}


DEFINITIONS = {
    "human_win_rate": "mean over prompts of the judges' mean score of the policy's response against the "
    "baseline's: 1 better, 1/2 about the same (identical responses too), 0 worse; percentile bootstrap over prompts",
    "judge_agreement": "over pairs with two or more judgments, the fraction of judge pairs with the same answer",
    "human_rm_agreement": "over pairs whose judges' majority is not a tie and whose rewards differ, the fraction "
    "where the reward model prefers the response the judges preferred",
    "human_task_agreement": "likewise with the task's verdict in place of the reward model",
}


# --- save ---


def markdown(report: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "–" if x is None else f"{100 * x:.1f}"

    lines = [
        f"# Blind human evaluation against `{report['baseline']}` ({report['prompts']} prompts)",
        "",
        "| policy | human win rate | wins | ties | losses | pairs |",
        "|---|---|---|---|---|---|",
    ]
    for label, entry in report["policies"].items():
        win = entry["human_win_rate"]
        lines.append(
            f"| {label} | {pct(win['value'])} [{pct(win['ci_low'])}, {pct(win['ci_high'])}] | {entry['wins']} | "
            f"{entry['ties']} | {entry['losses']} | {entry['pairs']} |"
        )
    rm, task = report["human_rm_agreement"], report["human_task_agreement"]
    lines += [
        "",
        f"Judgments: {report['judgments']}; agreement between judges: {pct(report['judge_agreement'])}%; "
        f"judges and reward model agree on {pct(rm['value'])}% of {rm['pairs']} pairs"
        + (
            f"; judges and the task's verdict on {pct(task['value'])}% of {task['pairs']}"
            if task["pairs"]
            else ""
        )
        + ".",
        "",
        "Definitions:",
        "",
        *[f"- `{name}`: {text}" for name, text in report["definitions"].items()],
    ]
    return "\n".join(lines) + "\n"


def log_pairs(pairs: list[dict[str, Any]]) -> None:
    """The un-blinded pairs as a W&B table."""
    if wandb_run() is None:
        return
    columns = [
        "policy",
        "prompt",
        "policy_response",
        "baseline_response",
        "score",
        "judgments",
        "policy_reward",
        "baseline_reward",
    ]
    rows = [
        [
            p["policy"],
            layout.render_prompt(p["prompt"]),
            p.get("policy_response", ""),
            p.get("baseline_response", ""),
            p["score"],
            ", ".join(j["value"] for j in p["judgments"]),
            p.get("policy_reward"),
            p.get("baseline_reward"),
        ]
        for p in pairs
    ]
    log_to_wandb({"human_eval/pairs": Table(columns, rows)})
