"""Benchmark: an annotator's pending-queue search on the embedded Argilla server (SQLite search backend).

Serves a local server, logs RECORDS ranking records (K=4 candidates, 2 metadata properties) as the owner,
lets two annotators submit rankings for a share of them, then times the search the web UI sends for the
pending queue (`POST /api/v1/me/datasets/{id}/records/search`: response status pending for this user and
record status pending, with the records' responses; the UI asks for 10 records in focus mode), over HTTP
and in the search engine alone (the SQL: one page query and one count). Target: <= 100 ms at 10,000 records.

    .venv/bin/python bench/argilla_pending_queue.py [--records 10000] [--home DIR]

With --home the server and its data are kept (and reused by the next run with the same --records);
without it everything happens in a temporary folder. Logging 10,000 records takes minutes: that is
argilla-server's own bulk path on SQLite, not the search backend.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import argilla as rg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from annotation import server

K = 4
TARGET_MS = 100.0
PENDING_FILTERS = [
    {"type": "terms", "scope": {"entity": "response", "property": "status"}, "values": ["pending"]},
    {"type": "terms", "scope": {"entity": "record", "property": "status"}, "values": ["pending"]},
]

# Runs in .venv-argilla: the search engine alone, on the server's database.
ENGINE_TIMER = r"""
import asyncio, importlib.util, json, sys, time, uuid
spec = importlib.util.spec_from_file_location("sql_search", sys.argv[1])
engine_module = importlib.util.module_from_spec(spec); spec.loader.exec_module(engine_module)
from argilla_server.database import AsyncSessionLocal
from argilla_server.models import Dataset, User
from argilla_server.search_engine.base import AndFilter, RecordFilterScope, ResponseFilterScope, TermsFilter

async def main(dataset_id, username, limit, repeat):
    async with AsyncSessionLocal() as db:
        dataset = await Dataset.get(db, uuid.UUID(dataset_id))
        user = await User.get_by(db, username=username)
    engine = await engine_module.SQLiteSearchEngine.new_instance()
    times = []
    for _ in range(repeat + 1):
        pending = AndFilter([
            TermsFilter(ResponseFilterScope(property="status", user=user), ["pending"]),
            TermsFilter(RecordFilterScope(property="status"), ["pending"]),
        ])
        start = time.perf_counter()
        await engine.search(dataset, filter=pending, offset=0, limit=limit, user_id=user.id)
        times.append((time.perf_counter() - start) * 1000)
    print(json.dumps(times[1:]))

asyncio.run(main(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--answered", type=float, default=0.2, help="share of records each annotator answers")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--home", type=Path, help="keep the server and its data here (default: temporary)")
    args = parser.parse_args()

    if args.home is None:
        with server.temporary_server(annotators=2) as info:
            run(info, args)
    else:
        run(server.serve(args.home, port=server.free_port(), annotators=2, quiet=True), args)
        print(f"server left running: stop it with server.stop({str(args.home)!r})")


def run(info: server.ServerInfo, args: argparse.Namespace) -> None:
    dataset_id = _dataset(info, args.records, args.answered)
    me = info.annotators[0]
    print(
        f"pending-queue search of {me.username}, {args.repeat} times, {args.records} records in the dataset:"
    )
    with server.http_client(info.connection(me)) as client:
        for limit in (10, 50):
            http_ms, server_ms, total = _time_http(client, dataset_id, limit, args.repeat)
            engine_ms = _time_engine(info, dataset_id, me.username, limit, args.repeat)
            print(f"limit={limit} ({total} records pending)")
            _report("HTTP request, client side", http_ms)
            _report("HTTP request, Server-Timing", server_ms)
            _report("search engine alone (page + count SQL)", engine_ms)
            verdict = "met" if statistics.median(http_ms) <= TARGET_MS else "MISSED"
            print(f"  target <= {TARGET_MS:.0f} ms (median of the HTTP request): {verdict}")


def _dataset(info: server.ServerInfo, records: int, answered: float) -> str:
    """The benchmark dataset of `records` records: reused when this server already has it."""
    client = server.argilla_client(info.connection())
    name = f"bench-{records}"
    existing = client.datasets(name, workspace=info.workspace)
    if existing is not None:
        return str(existing.id)

    responses = [f"response-{k}" for k in range(1, K + 1)]
    settings = rg.Settings(
        fields=[rg.TextField("prompt")] + [rg.TextField(name) for name in responses],
        questions=[rg.RankingQuestion("ranking", values=responses)],
        metadata=[rg.TermsMetadataProperty("policy"), rg.IntegerMetadataProperty("length")],
        distribution=rg.TaskDistribution(min_submitted=2),
    )
    dataset = rg.Dataset(name=name, workspace=info.workspace, settings=settings, client=client)
    dataset.create()
    start = time.perf_counter()
    rows = [
        {
            "prompt": f"Prompt {i}: write a short poem about the number {i}.",
            **{name: f"Candidate {name} for prompt {i}. " * 8 for name in responses},
            "policy": f"sft:v{i % 3}",
            "length": i % 500,
        }
        for i in range(records)
    ]
    dataset.records.log(rows, batch_size=500)
    print(f"logged {records} records in {time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    count = _answer(info, str(dataset.id), answered)
    print(f"2 annotators submitted {count} rankings each in {time.perf_counter() - start:.0f} s")
    return str(dataset.id)


def _answer(info: server.ServerInfo, dataset_id: str, share: float) -> int:
    """Each annotator submits a ranking for `share` of the records (half overlapping), in bulk requests."""
    with server.http_client(info.connection()) as owner:
        record_ids: list[str] = []
        while True:
            params = {"offset": len(record_ids), "limit": 1000}
            items = owner.get(f"/api/v1/datasets/{dataset_id}/records", params=params).json()["items"]
            record_ids += [item["id"] for item in items]
            if len(items) < 1000:
                break
    count = int(len(record_ids) * share)
    ranking = {"ranking": {"value": [{"value": f"response-{k}", "rank": k} for k in range(1, K + 1)]}}
    for number, login in enumerate(info.annotators):
        chosen = record_ids[number * count // 2 :][:count]
        with server.http_client(info.connection(login), timeout=300) as client:
            for start in range(0, len(chosen), 100):
                batch = chosen[start : start + 100]
                items = [{"values": ranking, "status": "submitted", "record_id": rid} for rid in batch]
                client.post("/api/v1/me/responses/bulk", json={"items": items}).raise_for_status()
    return count


def _time_http(client, dataset_id: str, limit: int, repeat: int) -> tuple[list[float], list[float], int]:
    http_ms, server_ms, total = [], [], 0
    for _ in range(repeat + 1):
        start = time.perf_counter()
        response = client.post(
            f"/api/v1/me/datasets/{dataset_id}/records/search",
            params={"include": "responses", "limit": limit},
            json={"filters": {"and": PENDING_FILTERS}},
        )
        http_ms.append((time.perf_counter() - start) * 1000)
        response.raise_for_status()
        server_ms.append(float(response.headers["Server-Timing"].split("dur=")[1]))
        total = response.json()["total"]
    return http_ms[1:], server_ms[1:], total  # the first request warms caches


def _time_engine(
    info: server.ServerInfo, dataset_id: str, username: str, limit: int, repeat: int
) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ARGILLA_")}
        env.update(
            ARGILLA_DATABASE_URL=f"sqlite+aiosqlite:///{info.home / 'argilla.db'}?check_same_thread=False",
            ARGILLA_HOME_PATH=tmp,
            HF_HUB_DISABLE_TELEMETRY="1",
            TMPDIR=tmp,  # importing argilla_server copies its web UI there
        )
        engine_file = Path(server.__file__).with_name("sql_search.py")
        command = [str(server.server_python()), "-c", ENGINE_TIMER, str(engine_file), dataset_id, username]
        out = subprocess.run(
            [*command, str(limit), str(repeat)], env=env, capture_output=True, text=True, check=True
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _report(label: str, times: list[float]) -> None:
    ordered = sorted(times)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    median = statistics.median(times)
    print(f"  {label:<40} median {median:6.1f} ms   p95 {p95:6.1f} ms   max {max(times):6.1f} ms")


if __name__ == "__main__":
    main()
