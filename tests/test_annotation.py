"""Annotation stages on a real embedded Argilla server: push, simulated annotators, collect, the conversion.

One server per module (temporary state folder; needs .venv-argilla, `make setup`); each test pushes its own
samples (a distinct digest gives a distinct dataset). The conversion tests at the end need no server.
"""

from __future__ import annotations

import itertools
import json
import random
import uuid
from pathlib import Path

import pytest

import tasks
from annotation import argilla_dataset as layout
from annotation import collect, preferences, push, server, simulate
from annotation.configs import AnnotateConfig, CollectConfig, SimulatedAnnotators
from common.outcomes import InputError, Waiting
from pipeline.store import Store
from tasks import TaskError, arithmetic
from tests.conftest import module_argilla, rlhf, wait_until

TASK = tasks.load({"name": "arithmetic"})

# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def argilla(tmp_path_factory):
    yield from module_argilla(tmp_path_factory, annotators=2)


@pytest.fixture(autouse=True)
def local_server(request, monkeypatch):
    """Point the stages at the module's server (as `rlhf annotation serve` would have set up)."""
    monkeypatch.delenv("ARGILLA_API_URL", raising=False)
    monkeypatch.delenv("ARGILLA_API_KEY", raising=False)
    if "argilla" in request.fixturenames:
        monkeypatch.setenv("RLHF_ARGILLA_HOME", str(request.getfixturevalue("argilla").home))


def make_samples(
    folder: Path, n: int = 12, ks: tuple[int, ...] = (2, 3, 4, 5, 6), chat: bool = True, digest: str = ""
) -> Path:
    """A samples artifact folder: demo prompts with K candidates each (cycling through `ks`), near misses
    of the right answer, one unparseable; a unique digest (unless given: the dataset name derives from it)
    so every call makes a new dataset."""
    folder.mkdir(parents=True)
    rows = []
    for i, record in enumerate(arithmetic.train_prompts()[:n]):
        a, b = record["a"], record["b"]
        k = ks[i % len(ks)]
        candidates = [arithmetic.render_response(a, b)] + [
            f"{a} + {b} = {a + b + d}" for d in range(1, k - 1)
        ]
        candidates.append(f"{a} + {b} =")  # unparseable
        rows.append(
            {"id": record["id"], "prompt": record["prompt"], "candidates": candidates[:k], "answer": a + b}
        )
    (folder / "samples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    generation = {"policy": {"ref": "sft:v1", "digest": "0" * 64}, "k": max(ks), "temperature": 1.0}
    generation["prompt_format"] = "chat" if chat else "plain"
    (folder / "generation.json").write_text(json.dumps(generation))
    manifest = {"name": "sample", "version": 1, "ref": "sample:v1", "digest": digest or uuid.uuid4().hex * 2}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


ARITHMETIC = {"name": "arithmetic"}


def run_push(samples: Path, out: Path, **config) -> dict:
    out.mkdir(parents=True)
    return push.run(AnnotateConfig(**{"task": ARITHMETIC, **config}), {"samples": samples}, out)


def run_collect(batch: Path, out: Path, previous: Path | None = None, **config) -> dict:
    out.mkdir(parents=True)
    inputs: dict[str, Path | str] = {"batch": batch, **({"previous": previous} if previous else {})}
    return collect.run(CollectConfig(**{"task": ARITHMETIC, **config}), inputs, out)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def owner_records(info: server.ServerInfo, dataset_id: str) -> list[dict]:
    with layout.Api(info.connection()) as api:
        return api.records(dataset_id)


# ------------------------------------------------------------------------------------------------- push


def test_push_creates_a_ranking_dataset_the_annotators_see(argilla, tmp_path):
    samples = make_samples(tmp_path / "samples", n=10)
    metrics = run_push(samples, tmp_path / "batch", annotators_per_record=2)
    batch, records = layout.load_batch(tmp_path / "batch")

    assert (metrics["records"], metrics["records_new"], metrics["records_present"]) == (10, 10, 0)
    assert batch["server"] == {"url": argilla.url, "external": False}
    assert batch["slots"] == 6 and batch["annotators_per_record"] == 2 and batch["chat"] is True
    assert batch["samples"]["ref"] == "sample:v1" and batch["policy"]["ref"] == "sft:v1"
    assert batch["record_ids"] == [r["record_id"] for r in records]
    assert [len(r["candidates"]) for r in records[:5]] == [2, 3, 4, 5, 6]
    secrets = [argilla.owner.api_key, *(login.api_key for login in argilla.annotators)]
    assert not [s for s in secrets for f in (tmp_path / "batch").iterdir() if s in f.read_text()]

    dataset_id = batch["dataset"]["id"]
    with server.http_client(argilla.connection(argilla.annotators[0])) as annotator:
        assert dataset_id in {d["id"] for d in annotator.get("/api/v1/me/datasets").json()["items"]}
        dataset = annotator.get(f"/api/v1/datasets/{dataset_id}").json()
        questions = annotator.get(f"/api/v1/datasets/{dataset_id}/questions").json()["items"]
    assert dataset["distribution"] == {"strategy": "overlap", "min_submitted": 2}
    assert "Discard" in dataset["guidelines"] and "Ties are allowed" in dataset["guidelines"]
    assert (
        dataset["metadata"]["samples"]["ref"] == "sample:v1" and dataset["metadata"]["generation"]["k"] == 6
    )
    ranking = next(q for q in questions if q["name"] == "ranking")
    assert ranking["required"] and [o["value"] for o in ranking["settings"]["options"]] == [
        f"response_{i}" for i in range(1, 7)
    ]
    assert {q["name"] for q in questions} == {"ranking", "comment"}

    by_external = {r["external_id"]: r for r in owner_records(argilla, dataset_id)}
    two = by_external[records[0]["record_id"]]  # a prompt with 2 candidates in 6 slots
    order = records[0]["display_order"]  # slot s shows candidate order[s]
    assert [two["fields"][f"response_{s + 1}"] for s in (0, 1)] == [
        records[0]["candidates"][c] for c in order
    ]
    assert "No response in this slot" in two["fields"]["response_3"]
    assert two["metadata"] == {"prompt_id": records[0]["prompt_id"], "candidates": 2}


def test_a_new_workspace_gets_the_annotators_as_members(argilla, tmp_path):
    samples = make_samples(tmp_path / "samples", n=3)
    metrics = run_push(samples, tmp_path / "batch", workspace=f"team-{uuid.uuid4().hex[:6]}")
    assert metrics["members_added"] == len(argilla.annotators)
    with server.http_client(argilla.connection(argilla.annotators[1])) as annotator:
        assert metrics["dataset_id"] in {
            d["id"] for d in annotator.get("/api/v1/me/datasets").json()["items"]
        }
    with pytest.raises(InputError, match="no account named"):
        run_push(samples, tmp_path / "unknown", annotators=["nobody"])


def test_pushing_the_same_samples_twice_adds_no_record(argilla, tmp_path):
    samples = make_samples(tmp_path / "samples", n=15)
    first = run_push(samples, tmp_path / "one")
    second = run_push(samples, tmp_path / "two")
    assert (first["records_new"], second["records_new"], second["records_present"]) == (15, 0, 15)
    assert first["dataset_id"] == second["dataset_id"]
    assert len(owner_records(argilla, first["dataset_id"])) == 15


def test_the_same_samples_drawn_again_get_the_same_record_ids(argilla, tmp_path):
    """A rerun draws the same samples into a new artifact (its timings differ): the records keep their ids,
    so simulated annotators, seeded by record, rank them alike and a rerun of the demo reproduces it."""
    first = make_samples(tmp_path / "first", n=5)
    again = make_samples(tmp_path / "again", n=5)
    one, two = run_push(first, tmp_path / "one"), run_push(again, tmp_path / "two")
    assert one["dataset_id"] != two["dataset_id"]  # another artifact, another dataset
    ids = [[r["record_id"] for r in layout.load_batch(tmp_path / name)[1]] for name in ("one", "two")]
    assert ids[0] == ids[1] and len(set(ids[0])) == 5


def test_prompts_without_two_distinct_candidates_are_left_out(argilla, tmp_path):
    samples = make_samples(tmp_path / "samples", n=4, ks=(3,))
    rows = read_jsonl(samples / "samples.jsonl")
    rows[0]["candidates"] = ["1 + 2 = 3", "1 + 2 = 3"]  # duplicates: one distinct candidate
    rows[1]["candidates"] = [rows[1]["candidates"][0]] * 2 + rows[1]["candidates"][1:]
    (samples / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = run_push(samples, tmp_path / "batch")
    _, records = layout.load_batch(tmp_path / "batch")
    assert (metrics["records"], metrics["skipped_single_candidate"]) == (3, 1)
    assert len(records[0]["candidates"]) == 3  # the repeated candidate is shown once


def test_push_interrupted_by_a_stopped_server_completes_on_retry(argilla, tmp_path, monkeypatch):
    samples = make_samples(tmp_path / "samples", n=23)
    monkeypatch.setattr(layout, "BULK_SIZE", 5)
    monkeypatch.setattr(layout, "RETRIES", (0.1,))
    port = int(argilla.url.rsplit(":", 1)[1])
    bulk_puts = []
    real_put = layout.Api.put

    def put_then_stop(self, path, **kwargs):
        answer = real_put(self, path, **kwargs)
        if path.endswith("/records/bulk"):
            bulk_puts.append(len(kwargs["json"]["items"]))
            if len(bulk_puts) == 2:
                server.stop(argilla.home)  # the server goes away in the middle of the push
        return answer

    monkeypatch.setattr(layout.Api, "put", put_then_stop)
    with pytest.raises(server.ArgillaServerError, match="cannot reach the Argilla server"):
        run_push(samples, tmp_path / "first")
    assert bulk_puts == [5, 5]

    monkeypatch.setattr(layout.Api, "put", real_put)
    server.serve(argilla.home, port=port, annotators=2, quiet=True)
    metrics = run_push(samples, tmp_path / "retry")
    assert (metrics["records_new"], metrics["records_present"]) == (13, 10)
    records = owner_records(argilla, metrics["dataset_id"])
    external_ids = [r["external_id"] for r in records]
    assert len(external_ids) == 23 and len(set(external_ids)) == 23


# ------------------------------------------------------------------------------------- bots and collect


def test_collect_returns_what_the_bots_submitted(argilla, tmp_path):
    # A fixed digest fixes the record ids, on which the bots' seeded decisions depend.
    samples = make_samples(tmp_path / "samples", n=12, digest="b0" * 32)
    bots = SimulatedAnnotators(annotators=3, noise=0.3, discard=0.3, seed=7)
    metrics = run_push(samples, tmp_path / "batch", annotators_per_record=2, simulate=bots)
    batch, records = layout.load_batch(tmp_path / "batch")
    by_id = {r["record_id"]: r for r in records}
    # Which bots would submit (not discard) each record is seeded; a record completes when 2 of 3 do.
    willing = {
        r["record_id"]: sum(
            simulate.bot_answer(f"bot-{n}", r, batch["slots"], bots, True, TASK)["status"] == "submitted"
            for n in (1, 2, 3)
        )
        for r in records
    }
    complete = {rid for rid, n in willing.items() if n >= 2}
    assert 0 < len(complete) < 12  # this seed leaves some records discarded by 2 bots out of 3
    assert metrics["simulated_responses"] == metrics["simulated_rankings"] + metrics["simulated_discards"]

    result = run_collect(tmp_path / "batch", tmp_path / "collect", policy="all")
    rankings = read_jsonl(tmp_path / "collect" / "rankings" / "rankings.jsonl")

    # Every submitted/discarded response on the server, and nothing else, with the ranks the bot sent.
    on_server = [
        (record["external_id"], response["status"])
        for record in owner_records(argilla, batch["dataset"]["id"])
        for response in record["responses"]
    ]
    assert sorted((r["record_id"], r["status"]) for r in rankings) == sorted(on_server)
    assert len(rankings) == metrics["simulated_responses"]
    for row in rankings:
        assert row["simulated"] and row["annotator"].startswith("bot-")
        sent = simulate.bot_answer(
            row["annotator"], by_id[row["record_id"]], batch["slots"], bots, True, TASK
        )
        assert row["status"] == sent["status"]
        if row["status"] == "submitted":
            ranks = {v["value"]: v["rank"] for v in sent["values"]["ranking"]["value"]}
            order = by_id[row["record_id"]]["display_order"]  # slot s showed candidate order[s]
            by_candidate = {c: ranks[layout.slot(s)] for s, c in enumerate(order)}
            assert row["ranks"] == [by_candidate[c] for c in range(len(row["candidates"]))]
            assert "Simulated annotator" in row["comment"]
        else:
            assert row["ranks"] is None

    # Ranked records have exactly 2 rankings; the `all` policy keeps every pair of every one of them.
    counted = [r for r in rankings if r["status"] == "submitted" and r["record_id"] in complete]
    assert result["records_ranked"] == len(complete) and result["rankings"] == len(counted) == 2 * len(
        complete
    )
    assert result["records_discarded"] == sum(n == 0 for n in willing.values())
    pairs = read_jsonl(tmp_path / "collect" / "preferences" / "preferences.jsonl")
    assert len(pairs) == sum(len(preferences.ordered_pairs(r["ranks"])) for r in counted)
    for pair in pairs:
        record = by_id[pair["record_id"]]
        assert pair["record_id"] in complete
        assert pair["prompt"] == [{"role": "user", "content": record["prompt"]}]
        assert pair["chosen"][0]["content"] == record["candidates"][pair["chosen_index"]]
        assert pair["answer"] == record["answer"] and pair["simulated"] is True
    summary = json.loads((tmp_path / "collect" / "preferences" / "summary.json").read_text())
    assert summary["format"] == "conversational" and summary["pairs"] == len(pairs)
    assert 0 < summary["kendall_w_mean"] <= 1 and summary["correct_chosen_fraction"] > 0.5


def test_bots_that_each_rank_every_record_work_side_by_side_and_send_what_they_would_in_turn(
    argilla, tmp_path, monkeypatch
):
    monkeypatch.setattr(simulate, "PAGE", 4)  # 12 records: three pages per bot
    samples = make_samples(tmp_path / "samples", n=12, digest="b1" * 32)
    bots = SimulatedAnnotators(annotators=3, noise=0.3, discard=0.2, seed=5)
    batch_dir = tmp_path / "batch"
    metrics = run_push(samples, batch_dir, annotators_per_record=3, simulate=bots)
    batch, records = layout.load_batch(batch_dir)
    assert simulate.independent(batch, bots)
    assert metrics["simulated_responses"] == 3 * 12

    sent = {
        (f"bot-{n}", r["record_id"]): simulate.bot_answer(f"bot-{n}", r, batch["slots"], bots, True, TASK)
        for n in (1, 2, 3)
        for r in records
    }
    with layout.Api(argilla.connection()) as api:
        users = {user["id"]: user["username"] for user in api.users()}
    received = {
        (users[response["user_id"]], record["external_id"]): response
        for record in owner_records(argilla, batch["dataset"]["id"])
        for response in record["responses"]
    }
    assert received.keys() == sent.keys()  # each bot answered each record once
    for key, body in sent.items():
        assert received[key]["status"] == body["status"]
        if body["status"] == "submitted":
            ranking = received[key]["values"][layout.RANKING]["value"]
            assert ranking == body["values"][layout.RANKING]["value"]
    assert metrics["simulated_discards"] == sum(b["status"] == "discarded" for b in sent.values()) > 0


def test_bots_take_turns_when_which_bot_answers_which_record_depends_on_their_order():
    batch = {"annotators_per_record": 2}
    assert not simulate.independent(batch, SimulatedAnnotators(annotators=3))  # 2 of 3 complete a record
    assert simulate.independent(batch, SimulatedAnnotators(annotators=2))
    assert not simulate.independent(batch, SimulatedAnnotators(annotators=2, max_records=5))
    assert not simulate.independent({}, SimulatedAnnotators(annotators=2))  # a batch that does not say
    assert not simulate.independent({"annotators_per_record": 1}, SimulatedAnnotators(annotators=1))


def test_an_annotator_whose_rankings_follow_the_display_order_is_left_out(argilla, tmp_path):
    """Argilla's UI once saved rankings as 1, 2, 3 ... in display order whatever the annotator chose
    (argilla#5712). Today's UI does not, so the fault is produced by hand: one account submits such
    rankings through the REST call the UI makes, next to two honest simulated annotators."""
    samples = make_samples(tmp_path / "samples", n=30, ks=(3, 4, 5))
    bots = SimulatedAnnotators(annotators=2, noise=0.0, seed=1)
    run_push(samples, tmp_path / "batch", annotators_per_record=3, simulate=bots)
    batch, records = layout.load_batch(tmp_path / "batch")
    assert all(sorted(r["display_order"]) == list(range(len(r["candidates"]))) for r in records)
    assert sum(r["display_order"] != sorted(r["display_order"]) for r in records) > 20  # shuffled
    with layout.Api(argilla.connection()) as owner:
        [*_, faulty] = simulate.ensure_bots(owner, owner.workspace_id(batch["workspace"]), 3)
    in_display_order = [{"value": layout.slot(s), "rank": s + 1} for s in range(batch["slots"])]
    with layout.Api(server.Connection(argilla.url, faulty.api_key)) as api:
        for item in owner_records(argilla, batch["dataset"]["id"]):
            body = {"status": "submitted", "values": {"ranking": {"value": in_display_order}}}
            api.post(f"/api/v1/records/{item['id']}/responses", json=body)

    checked = run_collect(tmp_path / "batch", tmp_path / "checked", policy="all")
    assert list(checked["annotators_left_out"]) == [faulty.username]
    figures = checked["display_order"]
    assert figures[faulty.username]["fraction"] == 1.0 and figures[faulty.username]["rankings"] == 30
    assert all(figures[f"bot-{n}"]["fraction"] < 0.3 for n in (1, 2))
    assert checked["records_ranked"] == 30 and checked["rankings_left_out"] == 30
    pairs = read_jsonl(tmp_path / "checked" / "preferences" / "preferences.jsonl")
    assert pairs and checked["correct_chosen_fraction"] == 1.0  # the honest bots' pairs only
    assert all(p.get("annotator") != faulty.username for p in pairs)

    unchecked = run_collect(
        tmp_path / "batch", tmp_path / "unchecked", policy="all", max_display_order_fraction=None
    )
    assert unchecked["annotators_left_out"] == {} and unchecked["pairs"] > checked["pairs"]


def test_select_pushes_only_its_budget_and_records_every_score(argilla, tmp_path):
    samples = make_samples(tmp_path / "samples", n=12)
    previous = tmp_path / "previous"
    previous.mkdir()
    first = arithmetic.train_prompts()[0]
    row = {"prompt": first["prompt"], "chosen": "x", "rejected": "y", "prompt_id": first["id"]}
    (previous / "preferences.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "batch").mkdir()
    config = AnnotateConfig(task=ARITHMETIC, select={"budget": 4, "by": "random", "seed": 3})
    metrics = push.run(config, {"samples": samples, "previous": previous}, tmp_path / "batch")
    _, records = layout.load_batch(tmp_path / "batch")
    scored = read_jsonl(tmp_path / "batch" / "selection.jsonl")
    assert metrics["records"] == len(records) == 4 and metrics["pool"] == 11 == len(scored)
    assert first["id"] not in {r["prompt_id"] for r in records}  # it has pairs already
    assert {r["record_id"] for r in scored if r["chosen"]} == {r["record_id"] for r in records}
    assert len(owner_records(argilla, metrics["dataset_id"])) == 4


def test_display_order_check_counts_rankings_of_three_or_more_candidates():
    rows = [
        {**ranking([1, 2, 3], "a"), "display_order": [0, 1, 2]},  # in display order
        {**ranking([2, 1, 3], "a"), "display_order": [1, 0, 2]},  # slot 1 (candidate 1) ranked 1: in order
        {**ranking([1, 2, 3], "a"), "display_order": [2, 1, 0]},  # reversed
        {**ranking([1, 2], "a"), "display_order": [0, 1]},  # two candidates: not checked
        {**ranking(None, "a", status="discarded"), "display_order": [0, 1, 2]},
    ]
    figures = preferences.display_order_check(rows)
    assert figures == {"a": {"rankings": 3, "in_display_order": 2, "chance": 1 / 6, "fraction": 2 / 3}}


def test_a_second_round_publishes_the_earlier_pairs_with_its_own(argilla, tmp_path):
    bots = SimulatedAnnotators(annotators=2, noise=0.1, seed=1)
    for round_ in (1, 2):
        samples = make_samples(tmp_path / f"samples{round_}", n=6, digest=f"{round_}c" * 32)
        run_push(samples, tmp_path / f"batch{round_}", annotators_per_record=2, simulate=bots)
    first = run_collect(tmp_path / "batch1", tmp_path / "collect1")
    alone = run_collect(tmp_path / "batch2", tmp_path / "alone")
    earlier = tmp_path / "collect1" / "preferences"
    both = run_collect(tmp_path / "batch2", tmp_path / "both", previous=earlier)
    pairs = read_jsonl(tmp_path / "both" / "preferences" / "preferences.jsonl")
    assert first["pairs"] > 0 and alone["pairs"] > 0
    assert (both["pairs_previous"], both["pairs_this_batch"]) == (first["pairs"], alone["pairs"])
    assert pairs == read_jsonl(earlier / "preferences.jsonl") + read_jsonl(
        tmp_path / "alone" / "preferences" / "preferences.jsonl"
    )
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "1 + 1", "chosen": "2", "rejected": "3"}) + "\n")
    with pytest.raises(InputError, match=r"collect: the previous pairs \(.*plain\.jsonl\) are plain"):
        run_collect(tmp_path / "batch2", tmp_path / "mixed", previous=plain)


def test_collect_waits_below_the_threshold(argilla, tmp_path):
    samples = make_samples(tmp_path / "samples", n=10)
    bots = SimulatedAnnotators(annotators=1, max_records=3, noise=0.0)
    run_push(samples, tmp_path / "batch", simulate=bots)

    out = tmp_path / "waiting"
    with pytest.raises(Waiting, match=r"^3/10 records ranked"):
        run_collect(tmp_path / "batch", out, min_records=5)
    assert list(out.iterdir()) == []  # nothing written
    with pytest.raises(Waiting, match="3/10 records ranked"):
        run_collect(tmp_path / "batch", tmp_path / "fraction", min_fraction=0.5)
    metrics = run_collect(tmp_path / "batch", tmp_path / "enough", min_records=3)
    assert metrics["records_ranked"] == 3 and metrics["pairs"] > 0


def test_a_restart_of_the_server_loses_no_ranking(argilla, tmp_path):
    samples = make_samples(tmp_path / "samples", n=8)
    run_push(samples, tmp_path / "batch", simulate=SimulatedAnnotators(annotators=2, seed=3))
    run_collect(tmp_path / "batch", tmp_path / "before")

    port = int(argilla.url.rsplit(":", 1)[1])
    assert server.stop(argilla.home)
    server.serve(argilla.home, port=port, annotators=2, quiet=True)
    run_collect(tmp_path / "batch", tmp_path / "after")
    for output in ("rankings/rankings.jsonl", "rankings/summary.json", "preferences/preferences.jsonl"):
        before, after = (tmp_path / d / output for d in ("before", "after"))
        assert before.read_bytes() == after.read_bytes(), output
    assert len(read_jsonl(tmp_path / "after" / "rankings" / "rankings.jsonl")) == 8


def test_external_server_mode_starts_nothing(argilla, tmp_path, monkeypatch):
    empty_home = tmp_path / "no-local-server"
    monkeypatch.setenv("RLHF_ARGILLA_HOME", str(empty_home))
    monkeypatch.setenv("ARGILLA_API_URL", argilla.url + "/")
    monkeypatch.setenv("ARGILLA_API_KEY", argilla.owner.api_key)
    samples = make_samples(tmp_path / "samples", n=5)
    metrics = run_push(samples, tmp_path / "batch", simulate=SimulatedAnnotators(annotators=1))
    result = run_collect(tmp_path / "batch", tmp_path / "collect")

    assert not empty_home.exists() and server.status(empty_home) is None
    batch, _ = layout.load_batch(tmp_path / "batch")
    assert batch["server"] == {"url": argilla.url, "external": True}
    assert metrics["external_server"] and metrics["members_added"] == 0
    assert argilla.owner.api_key not in (tmp_path / "batch" / "batch.json").read_text()
    assert result["records_ranked"] == 5

    monkeypatch.delenv("ARGILLA_API_URL")
    monkeypatch.delenv("ARGILLA_API_KEY")
    with pytest.raises(server.ArgillaServerError, match="ARGILLA_API_URL"):
        run_collect(tmp_path / "batch", tmp_path / "no-env")


def test_bots_rank_in_the_background_while_collect_polls(argilla, tmp_path):
    samples = make_samples(tmp_path / "samples", n=6)
    run_push(samples, tmp_path / "batch")
    with pytest.raises(Waiting, match="0/6"):
        run_collect(tmp_path / "batch", tmp_path / "early", min_records=6)
    bots = simulate.rank_in_background(tmp_path / "batch", SimulatedAnnotators(annotators=2))
    attempts = itertools.count()

    def collected() -> dict | None:
        try:
            return run_collect(tmp_path / "batch", tmp_path / f"poll-{next(attempts)}", min_records=6)
        except Waiting:
            return None

    try:
        metrics = wait_until(
            collected, 60, "the background bots did not rank the batch within a minute", interval=0.5
        )
    finally:
        counts = bots.stop()
    assert metrics["records_ranked"] == 6 and counts["rankings"] == 6


def test_the_runner_waits_then_publishes_once(argilla, workspace):
    """Through `rlhf run`: collect waits (exit 3), publishes when enough is ranked, and a rerun with the
    same rankings publishes no new version."""
    store = Store(workspace / "artifacts")
    samples = make_samples(workspace / "payload", n=6)
    (samples / "manifest.json").unlink()
    store.publish("sample", samples, {"kind": "samples", "status": "ok"})
    (workspace / "annotate.yaml").write_text(
        "name: annot\ntask: {name: arithmetic}\nstages:\n"
        "  annotate:\n    inputs: {samples: 'sample:v1'}\n"
        "    config: {simulate: {annotators: 1, max_records: 2}}\n"
        "  collect:\n    inputs: {batch: annotate}\n    config: {min_records: 4}\n"
    )
    env = {"RLHF_ARGILLA_HOME": str(argilla.home)}
    waiting = rlhf("run", "annotate.yaml", cwd=workspace, env=env)
    assert waiting.returncode == 3, waiting.stdout + waiting.stderr
    assert "2/6 records ranked" in waiting.stdout
    assert store.versions("collect.preferences") == []

    batch = store.get("annotate:v1").path
    simulate.rank_batch(
        server.connect(argilla.home), *layout.load_batch(batch), SimulatedAnnotators(annotators=1), TASK
    )
    for _ in range(2):
        done = rlhf("run", "annotate.yaml", cwd=workspace, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
    assert store.versions("collect.preferences") == [1] and store.versions("collect.rankings") == [1]
    assert store.versions("annotate") == [1]


# ------------------------------------------------------------------------------- the bots' ranking rule


def test_arithmetic_ranks_correct_first_then_by_distance_unparseable_last():
    candidates = ["2 + 3 = 7", "2 + 3 = 5", "five", "2 + 3 = 4", "5", "2 + 3 = 6"]
    record = {"prompt": "What is 2 + 3?", "answer": 5}
    assert tasks.ranks(TASK, record, candidates) == [3, 1, 4, 2, 1, 2]
    assert tasks.ranks(TASK, {"prompt": "What is 2 + 3?"}, candidates) == [3, 1, 4, 2, 1, 2]


def test_instructions_ranks_by_the_verdict():
    task = tasks.load({"name": "instructions"})
    record = {"prompt": "p", "constraints": [{"type": "no_commas"}, {"type": "max_words", "n": 4}]}
    candidates = [
        "Bees, bees, bees, bees, bees.",
        "Bees make honey.",
        "Bees make honey and wax daily.",
        "Bees, honey.",
    ]
    assert tasks.ranks(task, record, candidates) == [3, 1, 2, 2]  # both, one of two, none


def test_noise_swaps_adjacent_levels_and_is_seeded():
    candidates = ["1 + 1 = 2", "1 + 1 = 3", "1 + 1 = 5"]
    record = {"record_id": "r", "prompt": "What is 1 + 1?", "candidates": candidates}
    assert tasks.simulated_ranks(TASK, record, candidates, 0.0, random.Random(0)) == [1, 2, 3]
    assert tasks.simulated_ranks(TASK, record, candidates, 1.0, random.Random(0)) == [
        3,
        1,
        2,
    ]  # best bubbles down
    draws = {tuple(tasks.simulated_ranks(TASK, record, candidates, 0.5, random.Random(s))) for s in range(50)}
    assert len(draws) > 1 and (1, 2, 3) in draws
    config = SimulatedAnnotators(noise=0.5, seed=1)
    assert simulate.bot_answer("bot-1", record, 4, config, True, TASK) == simulate.bot_answer(
        "bot-1", record, 4, config, True, TASK
    )
    ranking = simulate.bot_answer("bot-1", record, 4, config, False, TASK)["values"]["ranking"]["value"]
    assert ranking[3] == {"value": "response_4", "rank": 4}  # the placeholder slot goes last


def test_records_the_task_cannot_judge_are_an_error_not_a_random_ranking(tmp_path):
    joke = {"record_id": "r", "prompt_id": "p-1", "prompt": "Tell me a joke.", "candidates": ["a", "b"]}
    with pytest.raises(TaskError, match=r"task 'arithmetic' cannot judge record 'p-1'.*answer"):
        simulate.check_judgeable(TASK, [joke])
    with pytest.raises(TaskError, match=r"none is set.*top-level `task:`"):
        simulate.check_judgeable(None, [joke])
    # the annotate stage refuses before it connects to any server
    samples = make_samples(tmp_path / "samples", n=3)
    rows = [{**json.loads(line), "prompt": "Tell me a joke."} for line in (samples / "samples.jsonl").open()]
    for row in rows:
        del row["answer"]
    (samples / "samples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(InputError, match="cannot judge"):
        run_push(samples, tmp_path / "batch", simulate=SimulatedAnnotators())


# ---------------------------------------------------------------------------- conversion (no server)


def record(k: int, record_id: str = "r1", answer: int | None = None) -> dict:
    row = {
        "record_id": record_id,
        "prompt_id": f"p-{record_id}",
        "prompt": "Q?",
        "candidates": [f"c{i}" for i in range(k)],
    }
    if answer is not None:
        row["answer"] = answer
    return row


def ranking(
    ranks: list[int] | None, annotator: str = "ann", status: str = "submitted", record_id: str = "r1"
) -> dict:
    return {"record_id": record_id, "annotator": annotator, "status": status, "ranks": ranks}


def pairs_of(rows: list[dict]) -> set[tuple[int, int]]:
    return {(row["chosen_index"], row["rejected_index"]) for row in rows}


def test_ties_give_no_pair():
    rows, summary = preferences.to_preferences([record(3)], [ranking([1, 1, 2])], "majority", chat=False)
    assert pairs_of(rows) == {(0, 2), (1, 2)}
    assert (summary["ties"], summary["pairs_implied"], summary["pairs"]) == (1, 2, 2)
    rows, summary = preferences.to_preferences([record(2)], [ranking([1, 1])], "all", chat=False)
    assert rows == [] and summary["records_ranked"] == 1 and summary["ties"] == 1


def test_discarded_responses_and_records_give_nothing():
    records = [record(3, "r1"), record(3, "r2")]
    rankings = [
        ranking(None, "a", "discarded", "r1"),
        ranking(None, "b", "discarded", "r1"),
        ranking(None, "a", "discarded", "r2"),
        ranking([3, 2, 1], "b", "submitted", "r2"),
        ranking([1, 2, 3], "c", "draft", "r2"),
    ]
    rows, summary = preferences.to_preferences(records, rankings, "unanimous", chat=False)
    assert pairs_of(rows) == {(2, 1), (2, 0), (1, 0)}
    assert all(row["record_id"] == "r2" and row["agreement"] == 1.0 for row in rows)
    assert (summary["records_discarded"], summary["discards"], summary["records_ranked"]) == (1, 3, 1)


def test_three_disagreeing_annotators_under_each_policy():
    rankings = [ranking([1, 2, 3], "a"), ranking([2, 1, 3], "b"), ranking([3, 1, 2], "c")]
    majority, summary = preferences.to_preferences([record(3)], rankings, "majority", chat=False)
    assert {(r["chosen_index"], r["rejected_index"]): r["agreement"] for r in majority} == {
        (1, 0): pytest.approx(2 / 3),
        (0, 2): pytest.approx(2 / 3),
        (1, 2): 1.0,
    }
    assert next(r for r in majority if r["chosen_index"] == 1 and r["rejected_index"] == 0)["votes"] == {
        "chosen": 2,
        "rejected": 1,
        "tie": 0,
    }
    unanimous, _ = preferences.to_preferences([record(3)], rankings, "unanimous", chat=False)
    assert pairs_of(unanimous) == {(1, 2)}
    everything, _ = preferences.to_preferences([record(3)], rankings, "all", chat=False)
    assert len(everything) == 9 and {r["annotator"] for r in everything} == {"a", "b", "c"}
    assert (
        sum(r["annotator"] == "c" and (r["chosen_index"], r["rejected_index"]) == (2, 0) for r in everything)
        == 1
    )

    assert summary["pairs_contested"] == 3
    assert (summary["pairs_kept_majority"], summary["pairs_dropped_majority"]) == (3, 0)
    assert (summary["pairs_kept_unanimous"], summary["pairs_dropped_unanimous"]) == (1, 2)
    assert summary["pairs_kept_all"] == 9
    assert summary["agreement_pairwise_mean"] == pytest.approx(5 / 9)
    assert summary["kendall_w_mean"] == pytest.approx(96 / 216)  # rank sums 6, 4, 8: S = 8, m = n = 3


def test_a_split_or_tied_vote_is_dropped_by_majority():
    two = [ranking([1, 2], "a"), ranking([2, 1], "b")]
    assert preferences.to_preferences([record(2)], two, "majority", chat=False)[0] == []
    tied = [ranking([1, 2], "a"), ranking([1, 1], "b"), ranking([1, 1], "c")]
    assert preferences.to_preferences([record(2)], tied, "majority", chat=False)[0] == []
    [row] = preferences.to_preferences([record(2)], tied, "all", chat=False)[0]
    assert row["agreement"] == pytest.approx(1 / 3) and row["votes"] == {"chosen": 1, "rejected": 0, "tie": 2}


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6])
def test_a_strict_ranking_of_k_gives_every_pair(k):
    order = random.Random(k).sample(range(1, k + 1), k)
    rows, summary = preferences.to_preferences([record(k, answer=7)], [ranking(order)], "majority", chat=True)
    assert len(rows) == k * (k - 1) // 2 == summary["pairs_implied"]
    for row in rows:
        assert order[row["chosen_index"]] < order[row["rejected_index"]]
        assert row["chosen"] == [{"role": "assistant", "content": f"c{row['chosen_index']}"}]
        assert row["prompt"] == [{"role": "user", "content": "Q?"}] and row["answer"] == 7


def test_records_below_the_annotators_per_record_are_incomplete():
    rows, summary = preferences.to_preferences(
        [record(3)], [ranking([1, 2, 3])], "all", chat=False, min_rankings=2
    )
    assert rows == [] and (summary["records_ranked"], summary["records_incomplete"]) == (0, 1)


def test_plain_and_message_prompts():
    assert preferences.training_example("Q?", "a", "b", chat=False) == {
        "prompt": "Q?",
        "chosen": "a",
        "rejected": "b",
    }
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}]
    assert preferences.training_example(messages, "a", "b", chat=True)["prompt"] == messages


def test_kendall_w_with_and_without_ties():
    assert preferences.kendall_w([[1, 2, 3], [1, 2, 3]]) == pytest.approx(1.0)
    assert preferences.kendall_w([[1, 2], [2, 1]]) == pytest.approx(0.0)
    assert preferences.kendall_w([[1, 1], [1, 1]]) is None
    # Tied ranks use mid-ranks and the tie correction: W stays 1 for identical tied rankings.
    assert preferences.kendall_w([[1, 1, 2], [1, 1, 2], [1, 1, 2]]) == pytest.approx(1.0)
    assert preferences.pairwise_agreement([[1, 1, 2], [1, 1, 2]]) == 1.0
    assert preferences.pairwise_agreement([[1, 2, 3]]) is None


def test_record_agreement_summarizes_each_ranked_record():
    records = [record(3, "r1"), record(3, "r2"), record(3, "r3")]
    rankings = [
        ranking([1, 2, 3], "a", record_id="r1"),
        ranking([2, 1, 3], "b", record_id="r1"),
        ranking([3, 1, 2], "c", record_id="r1"),
        ranking([2, 1, 3], "a", record_id="r2"),
        ranking(None, "b", "discarded", "r2"),
        ranking(None, "a", "discarded", "r3"),
    ]
    first, second = preferences.record_agreement(records, rankings)  # r3 has no ranking: left out
    assert first["mean_ranks"] == [2, pytest.approx(4 / 3), pytest.approx(8 / 3)]
    assert first["consensus_best"] == "c1" and first["rankings"] == 3 and first["discards"] == 0
    assert first["agreement"] == pytest.approx(5 / 9) and first["kendall_w"] == pytest.approx(96 / 216)
    assert (second["record_id"], second["consensus_best"], second["discards"]) == ("r2", "c1", 1)
    assert second["agreement"] is None and second["kendall_w"] is None


def test_collect_maps_ranks_back_and_ignores_placeholder_slots():
    values = {
        "ranking": {
            "value": [
                {"value": "response_1", "rank": 3},
                {"value": "response_2", "rank": 1},
                {"value": "response_3", "rank": 2},
                {"value": "response_4", "rank": 4},
            ]
        }
    }
    assert collect.candidate_ranks(values, [0, 1]) == [3, 1]
    assert collect.candidate_ranks(values, [1, 0]) == [1, 3]  # slot 1 showed candidate 1
    assert collect.candidate_ranks({}, [0, 1]) is None
    records = [record(2)]
    rows, _ = preferences.to_preferences(records, [ranking([3, 1])], "majority", chat=False)
    assert pairs_of(rows) == {(1, 0)}


def test_http_errors_name_the_call_but_never_the_key(argilla):
    with (
        layout.Api(server.Connection(argilla.url, "not-a-key")) as api,
        pytest.raises(server.ArgillaServerError) as error,
    ):
        api.get("/api/v1/me")
    assert "GET /api/v1/me" in str(error.value) and "not-a-key" not in str(error.value)
