"""The `annotate` stage: push a `samples` artifact to Argilla as a ranking dataset.

Reads `samples.jsonl` (one line per prompt: `id`, `prompt`, `candidates`, and the prompt record's other
fields, such as the task's `answer` or `constraints`),
`generation.json` (the policy and the generation settings) and the artifact's `manifest.json`; creates (or
reuses) the batch's dataset (layout in `annotation/argilla_dataset.py`) and upserts one record per prompt
with at least two distinct candidates, in bulk. A record's `external_id` is a hash of the samples file,
the prompt and the candidates, so a repeated or retried push updates records instead of adding them.
With `select`, only a budget of records is pushed, chosen where rankings teach the reward model most
(`annotation/selection.py`; their scores in `selection.jsonl`). With `simulate`, bot annotators then rank
the batch by the task's verdict (`annotation/simulate.py`);
every record must be one the task can judge, which is checked before anything is pushed.

Payload (kind `annotation-batch`): `batch.json` (server URL, never a key; workspace; dataset name and id;
the samples artifact; the policy; generation settings; whether prompts are chat; annotators per record;
the number of slots K; the question names; the record ids; the simulated annotators' settings and the
task, if any) and `records.jsonl` (per record: id, prompt id, prompt, candidates in slot order, and the
prompt's other fields, which the task's verdict needs): what collect needs to map rankings back to
candidates without the samples artifact.

Reads top to bottom: load, check, push, save, measure.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import tasks
from annotation import argilla_dataset as layout
from annotation import server, simulate
from annotation.argilla_dataset import Api
from annotation.configs import AnnotateConfig
from common.data import SAMPLES_FILE
from common.outcomes import InputError

GENERATION_FILE = "generation.json"
BATCH_FILE = layout.BATCH_FILE
RECORDS_FILE = layout.RECORDS_FILE
SAMPLE_KEYS = ("id", "duplicate_of")
"""Fields of a sample that the record holds under another name, or that do not concern annotators."""


def run(config: AnnotateConfig, inputs: dict[str, Path | str], out_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()

    # Load
    samples_dir = Path(inputs["samples"])
    samples, generation, source = load_samples(samples_dir)

    # Check (and choose)
    records, skipped = to_records(samples, source["samples_sha256"])
    selected: dict[str, Any] = {}
    if config.select is not None:
        from annotation import selection

        records, scored, selected = selection.choose(
            records,
            config.select,
            Path(inputs["reward"]) if "reward" in inputs else None,
            Path(inputs["previous"]) if "previous" in inputs else None,
        )
        if not records:
            raise InputError("annotate: select left no record to push (every prompt has pairs in `previous`)")
    slots = max(len(record["candidates"]) for record in records)
    chat = uses_chat(generation, samples)
    task = tasks.load(config.task) if config.task is not None else None
    if config.simulate is not None:
        simulate.check_judgeable(task, records)

    # Push
    connection = server.connect(start=True)
    name = config.dataset or default_dataset_name(source)
    with Api(connection) as api:
        workspace_id = api.workspace_id(config.workspace, create=True)
        dataset, comment = ensure_dataset(
            api, workspace_id, name, config, slots, dataset_metadata(source, generation)
        )
        members = ensure_members(api, workspace_id, config.annotators, external=connection.external)
        clock = time.perf_counter()
        new, present = upsert_records(api, dataset["id"], records, slots)
        push_s = time.perf_counter() - clock

    batch = {
        "server": {"url": connection.url, "external": connection.external},
        "workspace": config.workspace,
        "dataset": {"name": name, "id": dataset["id"]},
        "samples": source,
        "policy": generation.get("policy"),
        "generation": {key: value for key, value in generation.items() if key != "policy"},
        "chat": chat,
        "annotators_per_record": config.annotators_per_record,
        "slots": slots,
        "questions": {"ranking": layout.RANKING, "comment": layout.COMMENT if comment else None},
        "records": RECORDS_FILE,
        "record_ids": [record["record_id"] for record in records],
        "simulated_annotators": config.simulate.model_dump() if config.simulate else None,
        "task": config.task.model_dump() if config.task else None,
    }

    simulated: dict[str, Any] = {}
    if config.simulate is not None:
        simulated = simulate.rank_batch(connection, batch, records, config.simulate, task, bulk=True)

    # Save
    (out_dir / BATCH_FILE).write_text(json.dumps(batch, indent=2, ensure_ascii=False) + "\n")
    with (out_dir / RECORDS_FILE).open("w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
    if config.select is not None:
        with (out_dir / selection.SELECTION_FILE).open("w", encoding="utf-8") as file:
            for row in scored:
                file.write(json.dumps(row) + "\n")

    # Measure
    return {
        "records": len(records),
        "records_new": new,
        "records_present": present,
        "skipped_prompts": sum(skipped.values()),
        **selected,
        **{f"skipped_{reason}": count for reason, count in skipped.items()},
        "slots": slots,
        "annotators_per_record": config.annotators_per_record,
        "members_added": members,
        "push_s": push_s,
        "records_per_s": len(records) / push_s if push_s else None,
        "dataset": name,
        "dataset_id": dataset["id"],
        "workspace": config.workspace,
        "url": connection.url,
        "external_server": connection.external,
        **{f"simulated_{key}": value for key, value in simulated.items()},
        "duration_s": time.perf_counter() - started,
    }


# --- load ---


def load_samples(samples_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """The samples, the generation record and the artifact's reference (`ref`, `digest`)."""
    path = samples_dir / SAMPLES_FILE
    if not path.is_file():
        raise InputError(f"annotate: {samples_dir} has no {SAMPLES_FILE}; expected a `samples` artifact")
    samples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                samples.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise InputError(f"annotate: {path} line {number} is not JSON: {err}") from None
    generation_path = samples_dir / GENERATION_FILE
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
    content = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest_path = samples_dir / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        source = {
            "ref": manifest.get("ref"),
            "name": manifest.get("name"),
            "version": manifest.get("version"),
            "digest": manifest["digest"],
            "samples_sha256": content,
        }
    else:  # a samples folder that is not an artifact (tests, hand-made batches)
        source = {"path": str(samples_dir.resolve()), "digest": content, "samples_sha256": content}
    return samples, generation, source


def uses_chat(generation: dict[str, Any], samples: list[dict[str, Any]]) -> bool:
    """Whether the policy was prompted through its chat template (then preferences are conversational).

    From `generation.json` (`prompt_format` or `chat_template`), else from the policy folder's tokenizer
    files; prompts given as chat messages are conversational in any case.
    """
    if any(isinstance(sample.get("prompt"), list) for sample in samples):
        return True
    if "prompt_format" in generation:
        return generation["prompt_format"] == "chat"
    if "chat_template" in generation:
        return bool(generation["chat_template"])
    path = (generation.get("policy") or {}).get("path")
    if path:
        folder = Path(path)
        if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
            return True
        config = folder / "tokenizer_config.json"
        if config.is_file():
            return bool(json.loads(config.read_text()).get("chat_template"))
    return False


# --- check ---


def to_records(samples: list[dict[str, Any]], digest: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """One record per prompt with >= 2 distinct candidates (identical candidates are shown once).

    Returns the records and the counts of prompts left out, by reason.
    """
    problems, records, seen = [], [], set()
    skipped = {"single_candidate": 0, "duplicate": 0}
    for line, sample in enumerate(samples, 1):
        candidates = sample.get("candidates")
        if "prompt" not in sample or not isinstance(candidates, list):
            problems.append(f"line {line} lacks `prompt` or a `candidates` list")
            continue
        if not all(isinstance(c, str) for c in candidates):
            problems.append(f"line {line} has candidates that are not strings")
            continue
        try:
            layout.render_prompt(sample["prompt"])
        except ValueError as err:
            problems.append(f"line {line}: {err}")
            continue
        distinct = list(dict.fromkeys(candidates))
        if len(distinct) > layout.MAX_CANDIDATES:
            problems.append(
                f"line {line} has {len(distinct)} candidates; Argilla ranks at most {layout.MAX_CANDIDATES}"
            )
            continue
        if len(distinct) < 2:
            skipped["single_candidate"] += 1
            continue
        record_id = content_id(digest, sample["prompt"], distinct)
        if record_id in seen:
            skipped["duplicate"] += 1
            continue
        seen.add(record_id)
        record = {
            "record_id": record_id,
            "prompt_id": str(sample.get("id", record_id)),
            "prompt": sample["prompt"],
            "candidates": distinct,
            "display_order": layout.display_order(record_id, len(distinct)),
        }
        record.update(
            {
                k: v
                for k, v in sample.items()
                if k not in (*layout.RECORD_KEYS, *SAMPLE_KEYS) and v is not None
            }
        )
        records.append(record)
    if problems:
        raise InputError(f"annotate: the samples are malformed: {'; '.join(problems[:5])}")
    if not records:
        raise InputError(
            f"annotate: no prompt has two distinct candidates to rank ({len(samples)} prompts); "
            "sample with k >= 2 and a temperature above 0"
        )
    return records, skipped


def content_id(digest: str, prompt: Any, candidates: list[str]) -> str:
    """A record id from the digest of the samples file, the prompt and the candidates. The file, not the
    artifact: the same samples drawn again (the artifact differs in its timings) give the same ids, so
    simulated annotators, seeded by record, rank them the same and a rerun of the demo reproduces it."""
    content = json.dumps([digest, prompt, candidates], ensure_ascii=False, sort_keys=True)
    return "rec-" + hashlib.sha256(content.encode()).hexdigest()[:32]


# --- push ---


def default_dataset_name(source: dict[str, Any]) -> str:
    """`<samples artifact name>-v<version>-<digest[:8]>`, or `samples-<digest[:8]>`."""
    if source.get("name") and source.get("version"):
        return f"{source['name']}-v{source['version']}-{source['digest'][:8]}"
    return f"samples-{source['digest'][:8]}"


def dataset_metadata(source: dict[str, Any], generation: dict[str, Any]) -> dict[str, Any]:
    return {
        "created_by": "rlhf annotate",
        "samples": source,
        "policy": generation.get("policy"),
        "generation": {key: value for key, value in generation.items() if key != "policy"},
    }


def ensure_dataset(
    api: Api, workspace_id: str, name: str, config: AnnotateConfig, slots: int, metadata: dict[str, Any]
) -> tuple[dict[str, Any], bool]:
    """The batch's dataset, created and published when missing, and whether it has the comment question.

    A half-created dataset (a crash between the calls) is completed; guidelines, annotators per record and
    metadata of an existing one are updated. An existing dataset must have the same fields and ranking
    options.
    """
    settings = {
        "guidelines": config.guidelines or layout.guidelines(config.annotators_per_record, slots),
        "distribution": {"strategy": "overlap", "min_submitted": config.annotators_per_record},
        "metadata": metadata,
    }
    expected_fields = layout.field_specs(slots)
    dataset, existing = layout.ensure_dataset(
        api,
        workspace_id,
        name,
        settings,
        expected_fields,
        layout.question_specs(slots, config.comment),
        layout.metadata_specs(),
    )
    if existing is None:
        return dataset, config.comment
    fields, questions = existing["fields"], existing["questions"]
    ranking = questions.get(layout.RANKING)
    options = [o["value"] for o in ranking["settings"]["options"]] if ranking else None
    if fields != {f["name"] for f in expected_fields} or options != [layout.slot(i) for i in range(slots)]:
        raise InputError(
            f"annotate: dataset {name!r} exists with another layout (fields {sorted(fields)}, ranking "
            f"options {options}; this batch needs {slots} response slots): set `dataset` to a new name"
        )
    return dataset, layout.COMMENT in questions


def ensure_members(api: Api, workspace_id: str, usernames: list[str] | None, *, external: bool) -> int:
    """Add the annotators to the workspace (so they see the dataset); returns how many were added."""
    if usernames is None and external:
        return 0
    users = {user["username"]: user for user in api.users()}
    if usernames is None:
        wanted = [user for user in users.values() if user["role"] == "annotator"]
    else:
        if missing := [name for name in usernames if name not in users]:
            raise InputError(f"annotate: no account named {missing} on {api.url} (config `annotators`)")
        wanted = [users[name] for name in usernames]
    members = {user["id"] for user in api.get(f"/api/v1/workspaces/{workspace_id}/users")["items"]}
    added = 0
    for user in wanted:
        if user["id"] not in members:
            api.post(f"/api/v1/workspaces/{workspace_id}/users", json={"user_id": user["id"]})
            added += 1
    return added


def upsert_records(api: Api, dataset_id: str, records: list[dict[str, Any]], slots: int) -> tuple[int, int]:
    """Create or update the records by `external_id`, in bulk. Returns (new, already present)."""
    existing = {record["external_id"] for record in api.records(dataset_id, responses=False)}
    present = sum(record["record_id"] in existing for record in records)
    for start in range(0, len(records), layout.BULK_SIZE):
        items = [
            {
                "external_id": record["record_id"],
                "fields": layout.record_fields(
                    record["prompt"], record["candidates"], layout.record_order(record), slots
                ),
                "metadata": {"prompt_id": record["prompt_id"], "candidates": len(record["candidates"])},
            }
            for record in records[start : start + layout.BULK_SIZE]
        ]
        api.put(f"/api/v1/datasets/{dataset_id}/records/bulk", json={"items": items})
    return len(records) - present, present
