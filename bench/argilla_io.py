"""Benchmark: annotation I/O against the embedded Argilla server (SQLite search backend).

Measures, on a fresh temporary server (or the one of --home):
- push_1000_s: the `annotate` stage's push (`annotation.push.run`) of 1,000 prompts with 2..6 candidates
  each, dataset creation included (target <= 5 s);
- collect_1000_s: the `collect` stage (`annotation.collect.run`) on those 1,000 records, each ranked by 3
  annotators (3,000 rankings, created in bulk by the owner beforehand; target <= 2 s);
- queue_query_ms_10000: the annotator's pending-queue query the web UI sends in focus mode
  (`POST /api/v1/me/datasets/{id}/records/search?include=responses&limit=10`, response status pending
  for this user and record status pending), median over 30 requests, on a dataset of 10,000 records
  (pushed by the same push code) of which each of 2 annotators has answered 20% (target <= 100 ms).
It also reports the rate of a bot's per-record submissions (the endpoint the UI's submit button calls).

    .venv/bin/python bench/argilla_io.py [--records 1000] [--queue-records 10000] [--home DIR]

The last line printed is the JSON `{"push_1000_s": ..., "collect_1000_s": ..., "queue_query_ms_10000": ...}`
(keys named after the default sizes). Times depend on the machine's load: compare runs on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tasks
from annotation import argilla_dataset as layout
from annotation import collect, push, server, simulate
from annotation.configs import AnnotateConfig, CollectConfig, SimulatedAnnotators

TARGETS = {"push_1000_s": 5.0, "collect_1000_s": 2.0, "queue_query_ms_10000": 100.0}
PENDING = simulate.PENDING
ARITHMETIC = tasks.load({"name": "arithmetic"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1000, help="records pushed and collected")
    parser.add_argument("--queue-records", type=int, default=10_000, help="records behind the queue query")
    parser.add_argument("--repeat", type=int, default=30, help="queue queries timed")
    parser.add_argument("--home", type=Path, help="use (and leave running) the server of this state folder")
    args = parser.parse_args()

    os.environ.pop("ARGILLA_API_URL", None)
    os.environ.pop("ARGILLA_API_KEY", None)
    with tempfile.TemporaryDirectory(prefix="bench-argilla-io-") as scratch:
        if args.home is None:
            with server.temporary_server(annotators=3) as info:
                result = run(info, args, Path(scratch))
        else:
            info = server.serve(args.home, port=server.free_port(), annotators=3, quiet=True)
            result = run(info, args, Path(scratch))
    for key, value in result.items():
        verdict = "met" if value <= TARGETS[key] else "MISSED"
        print(f"{key:<22} {value:10.3f}   target <= {TARGETS[key]:g}: {verdict}")
    print(json.dumps(result))


def run(info: server.ServerInfo, args: argparse.Namespace, scratch: Path) -> dict[str, float]:
    os.environ["RLHF_ARGILLA_HOME"] = str(info.home)
    print(f"server {info.url}; load average {os.getloadavg()[0]:.2f}", flush=True)

    # push
    samples = write_samples(scratch / "samples", args.records)
    batch_dir = scratch / "batch"
    batch_dir.mkdir()
    start = time.perf_counter()
    metrics = push.run(AnnotateConfig(annotators_per_record=3), {"samples": samples}, batch_dir)
    push_s = time.perf_counter() - start
    print(
        f"push: {metrics['records']} records in {push_s:.2f} s ({metrics['records_per_s']:.0f} records/s in the bulk upserts)"
    )

    # collect: 3 rankings per record, created in bulk by the owner
    batch, records = layout.load_batch(batch_dir)
    start = time.perf_counter()
    add_rankings(info, batch, records, info.annotators[:3], share=1.0)
    print(f"(3 x {len(records)} rankings created in bulk in {time.perf_counter() - start:.1f} s)")
    start = time.perf_counter()
    result = collect.run(CollectConfig(min_records=len(records)), {"batch": batch_dir}, scratch / "collect")
    collect_s = time.perf_counter() - start
    print(
        f"collect: {result['records_ranked']} ranked records, {result['rankings']} rankings, {result['pairs']} pairs "
        f"in {collect_s:.2f} s (reading from the server: {result['read_s']:.2f} s)"
    )

    # a bot's per-record submissions (the UI's submit call), on a fresh small batch
    bot_rate = bot_submissions(info, scratch)
    print(f"bot submissions through POST /api/v1/records/{{id}}/responses: {bot_rate:.0f} responses/s")

    # the pending queue of an annotator on a 10,000-record dataset
    queue_samples = write_samples(scratch / "queue-samples", args.queue_records)
    queue_dir = scratch / "queue-batch"
    queue_dir.mkdir()
    start = time.perf_counter()
    push.run(AnnotateConfig(annotators_per_record=2), {"samples": queue_samples}, queue_dir)
    print(f"(pushed {args.queue_records} records in {time.perf_counter() - start:.1f} s)")
    queue_batch, queue_records = layout.load_batch(queue_dir)
    for number, login in enumerate(info.annotators[:2]):
        half = len(queue_records) // 10  # each answers 20%, half of it overlapping with the other
        add_rankings(info, queue_batch, queue_records[number * half :][: 2 * half], [login], share=1.0)
    times, server_ms, pending = time_queue(info, queue_batch["dataset"]["id"], args.repeat)
    print(
        f"queue query: median {statistics.median(times):.1f} ms, p95 {percentile(times, 0.95):.1f} ms, "
        f"server {statistics.median(server_ms):.1f} ms ({pending} records pending for annotator-1)"
    )
    return {
        "push_1000_s": round(push_s, 3),
        "collect_1000_s": round(collect_s, 3),
        "queue_query_ms_10000": round(statistics.median(times), 1),
    }


def write_samples(folder: Path, n: int) -> Path:
    """A samples folder of n addition prompts, 2..6 candidates each (near misses of the answer)."""
    folder.mkdir(parents=True)
    with (folder / "samples.jsonl").open("w") as file:
        for i in range(n):
            a, b = i % 97, i // 97
            k = 2 + i % 5
            candidates = [f"{a} + {b} = {a + b + d}" for d in range(k)]
            row = {
                "id": f"bench-{i}",
                "prompt": f"What is {a} + {b}?",
                "candidates": candidates,
                "answer": a + b,
            }
            file.write(json.dumps(row) + "\n")
    (folder / "generation.json").write_text(
        json.dumps({"policy": {"ref": "bench:v1"}, "prompt_format": "chat"})
    )
    manifest = {"name": "bench", "version": 1, "ref": "bench:v1", "digest": uuid.uuid4().hex * 2}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def add_rankings(info, batch: dict, records: list[dict], logins, share: float) -> None:
    """Every login ranks the records (ground truth order), written with the owner's bulk upsert."""
    with layout.Api(info.connection()) as api:
        users = {user["username"]: user["id"] for user in api.users()}
        items = []
        for record in records[: int(len(records) * share)]:
            ranks = tasks.ranks(ARITHMETIC, record, record["candidates"])
            value = layout.slot_ranking(ranks, layout.record_order(record), batch["slots"])
            responses = [
                {
                    "values": {"ranking": {"value": value}},
                    "status": "submitted",
                    "user_id": users[login.username],
                }
                for login in logins
            ]
            items.append({"external_id": record["record_id"], "responses": responses})
        for start in range(0, len(items), layout.BULK_SIZE):
            api.put(
                f"/api/v1/datasets/{batch['dataset']['id']}/records/bulk",
                json={"items": items[start : start + layout.BULK_SIZE]},
            )


def bot_submissions(info, scratch: Path, n: int = 100) -> float:
    samples = write_samples(scratch / "bot-samples", n)
    batch_dir = scratch / "bot-batch"
    batch_dir.mkdir()
    push.run(AnnotateConfig(task={"name": "arithmetic"}), {"samples": samples}, batch_dir)
    batch, records = layout.load_batch(batch_dir)
    counts = simulate.rank_batch(
        info.connection(), batch, records, SimulatedAnnotators(annotators=1), ARITHMETIC
    )
    return counts["responses"] / counts["seconds"]


def time_queue(info, dataset_id: str, repeat: int) -> tuple[list[float], list[float], int]:
    times, server_ms, total = [], [], 0
    with server.http_client(info.connection(info.annotators[0])) as client:
        for _ in range(repeat + 1):
            start = time.perf_counter()
            response = client.post(
                f"/api/v1/me/datasets/{dataset_id}/records/search",
                params={"include": "responses", "limit": 10},
                json={"filters": {"and": PENDING}},
            )
            times.append((time.perf_counter() - start) * 1000)
            response.raise_for_status()
            server_ms.append(float(response.headers["Server-Timing"].split("dur=")[1]))
            total = response.json()["total"]
    return times[1:], server_ms[1:], total  # the first request warms caches


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


if __name__ == "__main__":
    main()
