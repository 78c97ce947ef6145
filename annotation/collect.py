"""The `collect` stage: snapshot an annotation batch's rankings and turn them into preference pairs.

Reads every record of the batch's dataset with its responses through the REST API as the owner
(`GET /api/v1/datasets/{id}/records?include=responses`, page by page: the argilla 2.8 client drops the
`rank` of ranking answers), keeps the submitted and discarded responses (drafts are work in progress),
maps each ranking back to the record's candidates (placeholder slots are ignored) and converts them
(`annotation/preferences.py`). An annotator whose rankings mostly equal the order the responses were
shown in (`max_display_order_fraction`) is left out, and named in the manifest. Below `min_records` / `min_fraction` ranked records it raises `Waiting`
("37/200 records ranked") and writes nothing.

Outputs (the runner seals each as an artifact; identical content is not republished, so nothing here
records when it was collected):
- `rankings/`: `rankings.jsonl`, one row per submitted or discarded response: record id, prompt id,
  prompt, candidates, annotator, ranks per candidate (1 = best, equal = tie; null when discarded),
  status, created/updated time of the response, `simulated`, comment; and `summary.json` (counts);
- `preferences/`: `preferences.jsonl` in TRL's prompt/chosen/rejected format (conversational when the
  policy has a chat template), with `prompt_id`, `record_id`, candidate indices, `agreement`, `votes`,
  the prompt's fields (the task's, such as `answer`) and `simulated`; and `summary.json` (counts per
  policy, agreement statistics, and with a task `correct_chosen_fraction`). With a `previous` input (the
  pairs of earlier rounds) those pairs come first, then this batch's (`pairs_previous`, `pairs_this_batch`).

Reads top to bottom: load, read, convert and check, save, measure.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tasks
from annotation import argilla_dataset as layout
from annotation import preferences, server, simulate
from annotation.argilla_dataset import Api
from annotation.configs import CollectConfig
from common.data import PREFERENCES_FILE, load_preferences, write_jsonl
from common.outcomes import InputError, Waiting
from common.training import Table, log_to_wandb, wandb_run

RANKINGS_FILE = "rankings.jsonl"
SUMMARY_FILE = "summary.json"
STATUSES = ("submitted", "discarded")
TABLE_PAIRS = 200
"""The W&B table shows at most this many preference pairs."""


def run(config: CollectConfig, inputs: dict[str, Path | str], out_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()

    # Load
    batch_dir = Path(inputs["batch"])
    try:
        batch, records = layout.load_batch(batch_dir)
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"collect: {batch_dir} is not a readable annotation batch: {err}") from None

    # Read
    connection = batch_connection(batch)
    clock = time.perf_counter()
    with Api(connection) as api, paused_gc():
        check_dataset(api, batch)
        server_records = api.records(batch["dataset"]["id"])
        usernames = {user["id"]: user["username"] for user in api.users()}
    read_s = time.perf_counter() - clock

    # Convert and check
    with paused_gc():
        rankings = snapshot(records, server_records, usernames)
        display = preferences.display_order_check(rankings)
        left_out = suspect_annotators(display, config.max_display_order_fraction)
        rows, summary = preferences.to_preferences(
            records,
            rankings,
            config.policy,
            chat=batch["chat"],
            min_rankings=batch["annotators_per_record"],
            left_out=frozenset(left_out),
        )
        summary.update(display_order=display, annotators_left_out=left_out)
    for annotator, why in left_out.items():
        print(f"collect: the rankings of {annotator} are left out: {why}", flush=True)
    if left_out and summary["rankings"] == summary["rankings_left_out"]:
        raise InputError(
            f"collect: every ranking of batch {batch['dataset']['name']} is left out by the display-order check "
            f"({'; '.join(f'{a}: {why}' for a, why in left_out.items())}); a UI that saves rankings in display "
            "order (argilla#5712) is the likely cause: check the Argilla version, or set "
            "max_display_order_fraction: null to keep them"
        )
    if "previous" in inputs:
        rows, summary = with_previous(rows, summary, inputs["previous"], chat=batch["chat"])
    need = required_records(config, len(records))
    if summary["records_ranked"] < need:
        raise Waiting(
            f"{summary['records_ranked']}/{len(records)} records ranked (collect needs {need}); "
            f"annotators rank at {connection.url}, dataset {batch['dataset']['name']}"
        )

    # Save
    rankings_summary = summarize_rankings(batch, records, rankings, summary)
    _write(out_dir / "rankings", RANKINGS_FILE, rankings, rankings_summary)
    preferences_summary = {
        "dataset": batch["dataset"],
        "samples": batch["samples"],
        "policy_artifact": batch.get("policy"),
        "format": "conversational" if batch["chat"] else "standard",
        "annotators_per_record": batch["annotators_per_record"],
        **summary,
        "correct_chosen_fraction": correct_chosen_fraction(
            rows, tasks.load(config.task) if config.task else None
        ),
    }
    _write(out_dir / "preferences", PREFERENCES_FILE, rows, preferences_summary)
    log_tables(rows, preferences.record_agreement(records, rankings))

    # Measure
    return {
        "records": len(records),
        **{key: value for key, value in summary.items() if key != "policy"},
        "responses": len(rankings),
        "simulated_responses": rankings_summary["simulated_responses"],
        "correct_chosen_fraction": preferences_summary["correct_chosen_fraction"],
        "policy": config.policy,
        "dataset": batch["dataset"]["name"],
        "url": connection.url,
        "read_s": read_s,
        "duration_s": time.perf_counter() - started,
    }


def with_previous(
    rows: list[dict[str, Any]], summary: dict[str, Any], previous: Path | str, chat: bool
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The pairs of earlier rounds (the `previous` input) followed by this batch's: a second round's reward
    model learns from every comparison made so far. Both must be in the same format."""
    earlier = load_preferences(previous, "collect")
    if (earlier.format == "conversational") != chat:
        raise InputError(
            f"collect: the previous pairs ({previous}) are {earlier.format} and this batch's are "
            f"{'conversational' if chat else 'plain'}; expected one format (the same policy's chat template)"
        )
    return [*earlier.rows, *rows], {
        **summary,
        "pairs": len(earlier.rows) + len(rows),
        "pairs_this_batch": len(rows),
        "pairs_previous": len(earlier.rows),
    }


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection while a large page is decoded and converted: those build tens of
    thousands of small objects and would trigger full rescans of the runner's heap (torch, wandb), about
    0.2 s of a 1,000-record collect. The garbage left meanwhile is collected afterwards as usual."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# --- read ---


def batch_connection(batch: dict[str, Any]) -> server.Connection:
    """The server of the batch: ARGILLA_API_URL/KEY for a batch pushed to an external server, else the
    local one (started if needed: its database keeps the rankings across restarts)."""
    if batch["server"]["external"]:
        connection = server.connect()
        if not connection.external:
            raise server.ArgillaServerError(
                f"the batch was pushed to {batch['server']['url']}: set ARGILLA_API_URL and ARGILLA_API_KEY"
            )
        return connection
    return server.connect(start=True)


def check_dataset(api: Api, batch: dict[str, Any]) -> None:
    dataset = batch["dataset"]
    try:
        found = api.get(f"/api/v1/datasets/{dataset['id']}")
    except server.ArgillaServerError as err:
        if "-> 404" not in str(err):
            raise
        raise InputError(
            f"collect: dataset {dataset['name']!r} ({dataset['id']}) is not on {api.url}; the batch was "
            f"pushed to {batch['server']['url']} (another server, or a deleted state folder?)"
        ) from None
    if found["name"] != dataset["name"]:
        raise InputError(
            f"collect: dataset {dataset['id']} on {api.url} is {found['name']!r}, not {dataset['name']!r}"
        )


def snapshot(
    records: list[dict[str, Any]], server_records: list[dict[str, Any]], usernames: dict[str, str]
) -> list[dict[str, Any]]:
    """One row per submitted or discarded response to a batch record, in batch order then by annotator."""
    order = {record["record_id"]: position for position, record in enumerate(records)}
    by_id = {record["record_id"]: record for record in records}
    rows = []
    for server_record in server_records:
        record = by_id.get(server_record.get("external_id"))
        if record is None:
            continue  # added to the dataset by hand: not part of the batch
        for response in server_record.get("responses") or []:
            if response["status"] not in STATUSES:
                continue
            annotator = usernames.get(response["user_id"], response["user_id"])
            values = response.get("values") or {}
            row = {
                "record_id": record["record_id"],
                "argilla_id": server_record["id"],
                "prompt_id": record["prompt_id"],
                "prompt": record["prompt"],
                "candidates": record["candidates"],
                "annotator": annotator,
                "status": response["status"],
                "ranks": candidate_ranks(values, layout.record_order(record)),
                "display_order": layout.record_order(record),
                "simulated": simulate.is_simulated(annotator),
                "created_at": response["inserted_at"],
                "updated_at": response["updated_at"],
            }
            comment = (values.get(layout.COMMENT) or {}).get("value")
            if comment:
                row["comment"] = comment
            rows.append(row)
    rows.sort(key=lambda row: (order[row["record_id"]], row["annotator"], row["status"]))
    return rows


def candidate_ranks(values: dict[str, Any], order: list[int]) -> list[int] | None:
    """The ranks of the record's candidates (slot s shows candidate `order[s]`; placeholder slots dropped),
    or None without a full ranking."""
    answer = (values.get(layout.RANKING) or {}).get("value") or []
    by_slot = {item["value"]: item.get("rank") for item in answer}
    ranks: list[int | None] = [None] * len(order)
    for position, candidate in enumerate(order):
        if isinstance(rank := by_slot.get(layout.slot(position)), int):
            ranks[candidate] = rank
    return [rank for rank in ranks if rank is not None] if None not in ranks else None


# --- check ---


DISPLAY_CHECK_MIN_RANKINGS = 10
"""An annotator is judged on the display-order check only after this many checked rankings."""


def suspect_annotators(display: dict[str, dict[str, Any]], threshold: float | None) -> dict[str, str]:
    """The annotators whose rankings are left out, with why (`preferences.display_order_check` figures)."""
    if threshold is None:
        return {}
    return {
        annotator: (
            f"{entry['in_display_order']} of {entry['rankings']} rankings in display order "
            f"({entry['fraction']:.0%}; chance {entry['chance']:.0%}, limit {threshold:.0%})"
        )
        for annotator, entry in display.items()
        if entry["rankings"] >= DISPLAY_CHECK_MIN_RANKINGS and entry["fraction"] > threshold
    }


def required_records(config: CollectConfig, total: int) -> int:
    need = config.min_records
    if config.min_fraction is not None:
        need = max(need, math.ceil(config.min_fraction * total))
    return min(need, total)


# --- save and measure ---


def summarize_rankings(
    batch: dict[str, Any],
    records: list[dict[str, Any]],
    rankings: list[dict[str, Any]],
    summary: dict[str, Any],
) -> dict[str, Any]:
    annotators: dict[str, dict[str, int]] = {}
    for row in rankings:
        counts = annotators.setdefault(row["annotator"], dict.fromkeys(STATUSES, 0))
        counts[row["status"]] += 1
    return {
        "dataset": batch["dataset"],
        "samples": batch["samples"],
        "records": len(records),
        "records_ranked": summary["records_ranked"],
        "records_discarded": summary["records_discarded"],
        "annotators_per_record": batch["annotators_per_record"],
        "responses": len(rankings),
        **{status: sum(row["status"] == status for row in rankings) for status in STATUSES},
        "simulated_responses": sum(row["simulated"] for row in rankings),
        "annotators": dict(sorted(annotators.items())),
    }


def correct_chosen_fraction(rows: list[dict[str, Any]], task: tasks.Task | None) -> float | None:
    """Among pairs the task can judge where exactly one side passes (verdict 1): how often it is the chosen
    one. None without a task or such pairs."""
    hits = total = 0
    for row in rows:
        if task is None or task.missing(row):
            continue
        passes = [task.verdict(row, _text(row[side])) == 1.0 for side in ("chosen", "rejected")]
        if passes[0] != passes[1]:
            total += 1
            hits += passes[0]
    return hits / total if total else None


def log_tables(rows: list[dict[str, Any]], agreement: list[dict[str, Any]]) -> None:
    """W&B tables, when the runner opened a run: `preferences` (the first `TABLE_PAIRS` pairs) and
    `rankings` (the first `TABLE_PAIRS` ranked records: mean ranks, consensus best, agreement)."""
    if wandb_run() is None:
        return
    pairs = [
        [
            row["prompt_id"],
            layout.render_prompt(row["prompt"]),
            _text(row["chosen"]),
            _text(row["rejected"]),
            row["agreement"],
            json.dumps(row["votes"]),
            row.get("simulated", False),
        ]
        for row in rows[:TABLE_PAIRS]
    ]
    ranked = [
        [
            record["record_id"],
            layout.render_prompt(record["prompt"]),
            record["rankings"],
            record["discards"],
            record["agreement"],
            record["kendall_w"],
            json.dumps([round(r, 2) for r in record["mean_ranks"]]),
            record["consensus_best"],
        ]
        for record in agreement[:TABLE_PAIRS]
    ]
    log_to_wandb(
        {
            "preferences": Table(
                ["prompt_id", "prompt", "chosen", "rejected", "agreement", "votes", "simulated"], pairs
            ),
            "rankings": Table(
                [
                    "record_id",
                    "prompt",
                    "rankings",
                    "discards",
                    "agreement",
                    "kendall_w",
                    "mean_ranks",
                    "consensus_best",
                ],
                ranked,
            ),
        }
    )


def _text(side: Any) -> str:
    """A response as text (the assistant message of a conversational row)."""
    return side if isinstance(side, str) else side[-1]["content"]


def _write(folder: Path, name: str, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / name, rows)
    (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
