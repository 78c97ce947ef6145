"""The embedded Argilla server: a real argilla-server 2.8 with the SQLite search backend, used the way the
web UI and our annotation code use it (owner through the `argilla` client, annotators through /api/v1/me/...).

One server per module (started in a temporary state folder); each test that changes responses makes its
own dataset. Needs .venv-argilla (`make setup`).
"""

import contextlib
import json
import os
import signal
import socket
import stat
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import argilla as rg
import httpx
import pytest

from annotation import server
from pipeline import cli
from tests.conftest import module_argilla, rlhf, wait_until

K = 3  # candidate responses per prompt
N_RECORDS = 12
RESPONSES = [f"response-{k}" for k in range(1, K + 1)]

PENDING = {"type": "terms", "scope": {"entity": "response", "property": "status"}, "values": ["pending"]}
RECORD_PENDING = {"type": "terms", "scope": {"entity": "record", "property": "status"}, "values": ["pending"]}


def _status_filter(status: str) -> dict:
    return {"type": "terms", "scope": {"entity": "response", "property": "status"}, "values": [status]}


@pytest.fixture(scope="module")
def argilla_server(tmp_path_factory):
    yield from module_argilla(tmp_path_factory, annotators=2)


@pytest.fixture(scope="module")
def make_dataset(argilla_server):
    """Create a ranking dataset with N_RECORDS records as the owner; returns its id."""
    client = server.argilla_client(argilla_server.connection())

    def make(min_submitted: int = 1) -> str:
        settings = rg.Settings(
            fields=[rg.TextField("prompt")] + [rg.TextField(name) for name in RESPONSES],
            questions=[rg.RankingQuestion("ranking", values=RESPONSES)],
            metadata=[
                rg.TermsMetadataProperty("policy"),
                rg.IntegerMetadataProperty("length"),
                rg.FloatMetadataProperty("temperature"),
            ],
            distribution=rg.TaskDistribution(min_submitted=min_submitted),
        )
        dataset = rg.Dataset(
            name=f"batch-{uuid.uuid4().hex[:8]}",
            workspace=argilla_server.workspace,
            settings=settings,
            client=client,
        )
        dataset.create()
        dataset.records.log(
            [
                {
                    "prompt": f"Prompt {i}: tell me about {'cats' if i % 3 == 0 else 'dogs'}",
                    **{name: f"candidate {name} for prompt {i}" for name in RESPONSES},
                    "policy": f"sft:v{1 + i % 2}",
                    "length": 10 * i,
                    "temperature": 0.5 + i / 10,
                }
                for i in range(N_RECORDS)
            ]
        )
        return str(dataset.id)

    return make


@pytest.fixture(scope="module")
def shared_dataset(make_dataset):
    """A dataset nobody responds to: for the read-only tests."""
    return make_dataset()


def annotator(info: server.ServerInfo, number: int) -> httpx.Client:
    return server.http_client(info.connection(info.annotators[number - 1]))


def search(client: httpx.Client, dataset_id: str, *filters, sort=None, text=None, limit=50, offset=0):
    """The annotator's record search, as the UI calls it. Returns (records, total)."""
    body: dict = {}
    if filters:
        body["filters"] = {"and": list(filters)}
    if sort:
        body["sort"] = sort
    if text:
        body["query"] = {"text": {"q": text}}
    response = client.post(
        f"/api/v1/me/datasets/{dataset_id}/records/search",
        params={"include": "responses", "limit": limit, "offset": offset},
        json=body,
    )
    assert response.status_code == 200, response.text
    result = response.json()
    return [item["record"] for item in result["items"]], result["total"]


def respond(client: httpx.Client, record_id: str, status: str, ranking: list[str] | None = None) -> dict:
    body: dict = {"status": status}
    if ranking is not None:
        body["values"] = {"ranking": {"value": [{"value": v, "rank": r} for r, v in enumerate(ranking, 1)]}}
    response = client.post(f"/api/v1/records/{record_id}/responses", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def ids(records) -> set[str]:
    return {record["id"] for record in records}


def test_annotator_sees_the_dataset_of_the_workspace(argilla_server, shared_dataset):
    with annotator(argilla_server, 1) as client:
        datasets = client.get("/api/v1/me/datasets").json()["items"]
        me = client.get("/api/v1/me").json()
    assert shared_dataset in {d["id"] for d in datasets}
    assert me["username"] == "annotator-1" and me["role"] == "annotator"


def test_web_ui_is_served_and_the_printed_passwords_log_in(argilla_server):
    page = httpx.get(f"{argilla_server.url}/", follow_redirects=True, timeout=10)
    assert page.status_code == 200 and "<html" in page.text.lower()
    for login in (argilla_server.owner, *argilla_server.annotators):
        form = {"username": login.username, "password": login.password}
        token = httpx.post(f"{argilla_server.url}/api/v1/token", data=form, timeout=10)
        assert token.status_code == 201, login.username
    text = argilla_server.logins_text()
    assert argilla_server.url in text and all(login.password in text for login in argilla_server.annotators)


def test_pending_queue_lists_every_record_once_across_pages(argilla_server, shared_dataset):
    with annotator(argilla_server, 1) as one, annotator(argilla_server, 2) as two:
        first, total = search(one, shared_dataset, PENDING, RECORD_PENDING, limit=5)
        second, _ = search(one, shared_dataset, PENDING, RECORD_PENDING, limit=5, offset=5)
        third, _ = search(one, shared_dataset, PENDING, RECORD_PENDING, limit=5, offset=10)
        everything, _ = search(two, shared_dataset, PENDING, RECORD_PENDING)
    assert total == N_RECORDS
    assert len(first) == len(second) == 5 and len(third) == 2
    assert ids(first) | ids(second) | ids(third) == ids(everything)
    assert len(ids(everything)) == N_RECORDS


def test_queues_and_progress_follow_the_annotators_responses(argilla_server, make_dataset):
    dataset_id = make_dataset(min_submitted=1)
    with annotator(argilla_server, 1) as one, annotator(argilla_server, 2) as two:
        queue, _ = search(one, dataset_id, PENDING, RECORD_PENDING, limit=4)
        submitted, drafted, discarded, _ = (record["id"] for record in queue)

        respond(one, submitted, "submitted", ranking=["response-2", "response-3", "response-1"])
        respond(one, drafted, "draft", ranking=["response-1", "response-2", "response-3"])
        respond(one, discarded, "discarded")

        pending_one, total_one = search(one, dataset_id, PENDING, RECORD_PENDING)
        assert total_one == N_RECORDS - 3
        assert not ids(pending_one) & {submitted, drafted, discarded}
        for status, record_id in (("submitted", submitted), ("draft", drafted), ("discarded", discarded)):
            records, total = search(one, dataset_id, _status_filter(status))
            assert (ids(records), total) == ({record_id}, 1), status

        # min_submitted=1: the submitted record is complete and leaves everyone's pending queue;
        # the draft and the discarded one stay in annotator-2's queue.
        pending_two, total_two = search(two, dataset_id, PENDING, RECORD_PENDING)
        assert total_two == N_RECORDS - 1
        assert submitted not in ids(pending_two) and {drafted, discarded} <= ids(pending_two)
        assert search(two, dataset_id, _status_filter("submitted"))[1] == 0

        metrics_one = one.get(f"/api/v1/me/datasets/{dataset_id}/metrics").json()["responses"]
        metrics_two = two.get(f"/api/v1/me/datasets/{dataset_id}/metrics").json()["responses"]
    assert metrics_one == {
        "total": N_RECORDS,
        "submitted": 1,
        "draft": 1,
        "discarded": 1,
        "pending": N_RECORDS - 3,
    }
    assert metrics_two == {
        "total": N_RECORDS,
        "submitted": 0,
        "draft": 0,
        "discarded": 0,
        "pending": N_RECORDS,
    }

    with server.http_client(argilla_server.connection()) as owner:
        progress = owner.get(f"/api/v1/datasets/{dataset_id}/progress").json()
        records = owner.get(f"/api/v1/datasets/{dataset_id}/records", params={"include": "responses"}).json()
    assert (progress["total"], progress["completed"], progress["pending"]) == (N_RECORDS, 1, N_RECORDS - 1)
    [answer] = [r["responses"][0] for r in records["items"] if r["id"] == submitted]
    assert answer["status"] == "submitted"
    assert answer["values"]["ranking"]["value"] == [
        {"value": "response-2", "rank": 1},
        {"value": "response-3", "rank": 2},
        {"value": "response-1", "rank": 3},
    ]


def test_a_record_stays_pending_for_others_until_enough_submissions(argilla_server, make_dataset):
    dataset_id = make_dataset(min_submitted=2)
    with annotator(argilla_server, 1) as one, annotator(argilla_server, 2) as two:
        record_id = search(one, dataset_id, PENDING, RECORD_PENDING, limit=1)[0][0]["id"]
        respond(one, record_id, "submitted", ranking=RESPONSES)
        assert record_id in ids(search(two, dataset_id, PENDING, RECORD_PENDING)[0])

        respond(two, record_id, "submitted", ranking=list(reversed(RESPONSES)))
        assert record_id not in ids(search(two, dataset_id, PENDING, RECORD_PENDING)[0])
        assert search(one, dataset_id, RECORD_PENDING)[1] == N_RECORDS - 1


def test_metadata_filters_text_query_and_sorting(argilla_server, shared_dataset):
    def metadata(name: str) -> dict:
        return {"entity": "metadata", "metadata_property": name}

    with annotator(argilla_server, 1) as client:
        v1, total = search(
            client, shared_dataset, {"type": "terms", "scope": metadata("policy"), "values": ["sft:v1"]}
        )
        assert total == N_RECORDS // 2 and {r["metadata"]["policy"] for r in v1} == {"sft:v1"}

        ranged, total = search(
            client, shared_dataset, {"type": "range", "scope": metadata("length"), "ge": 30, "le": 60}
        )
        assert sorted(r["metadata"]["length"] for r in ranged) == [30, 40, 50, 60] and total == 4

        hot, _ = search(
            client,
            shared_dataset,
            PENDING,
            {"type": "range", "scope": metadata("temperature"), "ge": 1.0},
            {"type": "terms", "scope": metadata("policy"), "values": ["sft:v2"]},
        )
        assert sorted(r["metadata"]["length"] for r in hot) == [50, 70, 90, 110]

        cats, total = search(client, shared_dataset, text="CATS")
        assert total == 4 and all("cats" in r["fields"]["prompt"] for r in cats)
        assert search(client, shared_dataset, text="cats Prompt 3:")[1] == 1  # every word must match
        assert search(client, shared_dataset, text='"prompt 1:"')[1] == 1  # a quoted phrase
        assert search(client, shared_dataset, text="100%")[1] == 0  # LIKE wildcards are literal

        by_length = [{"scope": metadata("length"), "order": "desc"}]
        records, _ = search(client, shared_dataset, PENDING, sort=by_length, limit=3)
        assert [r["metadata"]["length"] for r in records] == [110, 100, 90]
        records, _ = search(
            client,
            shared_dataset,
            sort=[{"scope": {"entity": "record", "property": "inserted_at"}, "order": "asc"}],
        )
        assert [r["metadata"]["length"] for r in records] == [10 * i for i in range(N_RECORDS)]


def test_metadata_metrics(argilla_server, shared_dataset):
    with annotator(argilla_server, 1) as client:
        properties = client.get(f"/api/v1/me/datasets/{shared_dataset}/metadata-properties").json()["items"]
        metrics = {
            p["name"]: client.get(f"/api/v1/metadata-properties/{p['id']}/metrics").json() for p in properties
        }
    assert metrics["policy"] == {
        "type": "terms",
        "total": N_RECORDS,
        "values": [{"term": "sft:v1", "count": 6}, {"term": "sft:v2", "count": 6}],
    }
    assert (metrics["length"]["min"], metrics["length"]["max"]) == (0, 10 * (N_RECORDS - 1))
    assert metrics["temperature"]["min"] == pytest.approx(0.5)
    assert metrics["temperature"]["max"] == pytest.approx(0.5 + (N_RECORDS - 1) / 10)


def test_owner_searches_by_suggestion_response_vector_and_date(argilla_server):
    """The other search features the server can send (the owner's search spans all users' responses)."""
    client = server.argilla_client(argilla_server.connection())
    settings = rg.Settings(
        fields=[rg.TextField("prompt")],
        questions=[rg.LabelQuestion("quality", labels=["good", "bad"])],
        vectors=[rg.VectorField("embedding", dimensions=2)],
    )
    dataset = rg.Dataset(
        name="searches", workspace=argilla_server.workspace, settings=settings, client=client
    )
    dataset.create()
    dataset.records.log(
        [
            rg.Record(
                fields={"prompt": f"prompt {i}"},
                vectors={"embedding": [1.0, i / 10]},
                suggestions=[
                    rg.Suggestion("quality", "good" if i < 4 else "bad", score=i / 10, agent=f"judge-{i % 2}")
                ],
            )
            for i in range(6)
        ]
    )
    dataset_id = str(dataset.id)
    with annotator(argilla_server, 1) as one:
        by_insertion = [{"scope": {"entity": "record", "property": "inserted_at"}, "order": "asc"}]
        first = search(one, dataset_id, sort=by_insertion, limit=1)[0][0]["id"]  # prompt 0
        answer = {"status": "submitted", "values": {"quality": {"value": "bad"}}}
        assert one.post(f"/api/v1/records/{first}/responses", json=answer).status_code == 201

    def owner_search(*filters, sort=None, body=None):
        request = body or {}
        if filters:
            request["filters"] = {"and": list(filters)}
        if sort:
            request["sort"] = sort
        response = owner.post(f"/api/v1/datasets/{dataset_id}/records/search", json=request)
        assert response.status_code == 200, response.text
        return [item["record"]["fields"]["prompt"] for item in response.json()["items"]]

    def suggestion(prop: str) -> dict:
        return {"entity": "suggestion", "question": "quality", "property": prop}

    with server.http_client(argilla_server.connection()) as owner:
        assert len(owner_search({"type": "terms", "scope": suggestion("value"), "values": ["bad"]})) == 2
        assert len(owner_search({"type": "terms", "scope": suggestion("agent"), "values": ["judge-1"]})) == 3
        assert owner_search({"type": "range", "scope": suggestion("score"), "ge": 0.25, "le": 0.45}) == [
            "prompt 3",
            "prompt 4",
        ]
        assert owner_search(sort=[{"scope": suggestion("score"), "order": "desc"}])[0] == "prompt 5"

        answered = {
            "type": "terms",
            "scope": {"entity": "response", "question": "quality"},
            "values": ["bad"],
        }
        assert owner_search(answered) == ["prompt 0"]
        by_response = owner_search(
            sort=[{"scope": {"entity": "response", "property": "status"}, "order": "asc"}]
        )
        assert by_response[0] == "prompt 0"  # records without a response sort last

        now = datetime.now(timezone.utc)
        recent = {"entity": "record", "property": "inserted_at"}
        window = {
            "type": "range",
            "scope": recent,
            "ge": (now - timedelta(hours=1)).isoformat(),
            "le": now.isoformat(),
        }
        assert len(owner_search(window)) == 6
        assert owner_search({"type": "range", "scope": recent, "le": "2000-01-01T00:00:00"}) == []

        nearest = {"query": {"vector": {"name": "embedding", "value": [1.0, 0.5]}}}
        assert owner_search(body=nearest)[0] == "prompt 5"


def test_serve_is_idempotent_and_connect_prefers_the_environment(argilla_server, monkeypatch):
    again = server.serve(argilla_server.home, annotators=2, quiet=True)
    assert again.pids == argilla_server.pids and again.url == argilla_server.url
    assert server.status(argilla_server.home) == again

    monkeypatch.setenv("RLHF_ARGILLA_HOME", str(argilla_server.home))
    monkeypatch.delenv("ARGILLA_API_URL", raising=False)
    monkeypatch.delenv("ARGILLA_API_KEY", raising=False)
    assert server.connect() == server.Connection(argilla_server.url, argilla_server.owner.api_key)

    monkeypatch.setenv("ARGILLA_API_URL", "https://argilla.example.org/")
    monkeypatch.setenv("ARGILLA_API_KEY", "external-key")
    assert server.connect() == server.Connection("https://argilla.example.org", "external-key", external=True)


def _secrets(home) -> list[str]:
    """Every secret of the server of `home`: passwords and API keys, Valkey's password, the session key."""
    credentials = json.loads((home / "credentials.json").read_text())
    found = [credentials["valkey_password"], credentials["auth_secret_key"]]
    for user in credentials["users"]:
        found += [user["password"], user["api_key"]]
    return found


def _files_showing_secrets(home) -> list[str]:
    """Files of `home` that contain a secret, except the two that must: credentials.json and the database
    (argilla keeps the API keys there)."""
    secrets = [secret.encode() for secret in _secrets(home)]
    showing = []
    for root, _, names in os.walk(home):
        for name in names:
            path = os.path.join(root, name)
            if name == "credentials.json" or name.startswith("argilla.db"):
                continue
            with contextlib.suppress(FileNotFoundError), open(path, "rb") as file:
                content = file.read()
            if any(secret in content for secret in secrets):
                showing.append(os.path.relpath(path, home))
    return showing


def _open_modes(home) -> list[str]:
    """What in `home` (itself included) is not owner-only: folders other than 0700, files other than 0600."""
    wrong = []
    for root, _, names in os.walk(home):
        for path, expected in [(root, 0o700)] + [(os.path.join(root, name), 0o600) for name in names]:
            with contextlib.suppress(FileNotFoundError):
                mode = stat.S_IMODE(os.lstat(path).st_mode)
                if not os.path.islink(path) and mode != expected:
                    wrong.append(f"{os.path.relpath(path, home)}: {mode:o}")
    return wrong


def test_credentials_are_private_and_logs_hold_no_secret(argilla_server):
    path = argilla_server.home / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secrets = _secrets(argilla_server.home)
    logins = [argilla_server.owner, *argilla_server.annotators]
    assert {login.password for login in logins} | {login.api_key for login in logins} <= set(secrets)

    logs = list((argilla_server.home / "logs").glob("*.log"))
    assert {log.name for log in logs} == {"redis.log", "server.log", "worker.log"}
    assert _files_showing_secrets(argilla_server.home) == []
    assert not [secret for secret in secrets if secret in repr(argilla_server)]


def test_a_new_state_folder_is_owner_only(argilla_server):
    home = argilla_server.home
    assert {"argilla.db", "credentials.json", "logs", "redis", "run", "tmp"} <= {
        p.name for p in home.iterdir()
    }
    assert any((home / "tmp").rglob("*.js"))  # argilla's copy of its web UI is in there too
    assert _open_modes(home) == []


def test_valkey_refuses_clients_without_its_password(argilla_server):
    """No other local user can read argilla's queues or enqueue a job for its worker."""
    port = json.loads((argilla_server.home / "run" / "redis.pid").read_text())["port"]
    enqueue = b"*3\r\n$5\r\nLPUSH\r\n$16\r\nrq:queue:default\r\n$4\r\njob1\r\n"
    guess = b"*2\r\n$4\r\nAUTH\r\n$5\r\nguess\r\n"
    for commands, expected in (
        (b"PING\r\n", [b"-NOAUTH"]),
        (enqueue, [b"-NOAUTH"]),
        (guess + enqueue, [b"-WRONGPASS", b"-NOAUTH"]),
    ):
        with socket.create_connection((server.HOST, port), timeout=5) as sock:
            sock.sendall(commands)
            reply = b""
            while reply.count(b"\r\n") < len(expected) and (chunk := sock.recv(256)):
                reply += chunk
        assert [line.split(b" ")[0] for line in reply.splitlines()] == expected, reply

    valkey_password = json.loads((argilla_server.home / "credentials.json").read_text())["valkey_password"]
    for pid in server.status(argilla_server.home).pids.values():  # command lines are public
        assert valkey_password.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()


def test_the_worker_runs_argilla_jobs_through_the_protected_valkey(argilla_server, make_dataset):
    """A changed distribution is applied to the records by a job of argilla's worker."""
    dataset_id = make_dataset(min_submitted=1)
    with annotator(argilla_server, 1) as client:
        record_id = search(client, dataset_id, PENDING, RECORD_PENDING, limit=1)[0][0]["id"]
        respond(client, record_id, "submitted", ranking=RESPONSES)
    with server.http_client(argilla_server.connection()) as owner:
        assert owner.get(f"/api/v1/records/{record_id}").json()["status"] == "completed"
        two_needed = {"distribution": {"strategy": "overlap", "min_submitted": 2}}
        assert owner.patch(f"/api/v1/datasets/{dataset_id}", json=two_needed).status_code == 200

        def status() -> str:
            return owner.get(f"/api/v1/records/{record_id}").json()["status"]

        wait_until(
            lambda: status() == "pending", 60, lambda: f"the worker did not update the record ({status()})"
        )


def test_an_annotator_reads_only_their_own_response_to_a_record(argilla_server):
    """GET /api/v1/records/{id}: annotators rank independently; the owner sees every response."""
    client = server.argilla_client(argilla_server.connection())
    settings = rg.Settings(
        fields=[rg.TextField("prompt")] + [rg.TextField(name) for name in RESPONSES],
        questions=[rg.RankingQuestion("ranking", values=RESPONSES)],
        metadata=[
            rg.TermsMetadataProperty("policy", visible_for_annotators=False),
            rg.TermsMetadataProperty("topic"),
        ],
        distribution=rg.TaskDistribution(min_submitted=2),
    )
    dataset = rg.Dataset(
        name=f"blind-{uuid.uuid4().hex[:8]}",
        workspace=argilla_server.workspace,
        settings=settings,
        client=client,
    )
    dataset.create()
    dataset.records.log(
        [{"prompt": "p", **{name: name for name in RESPONSES}, "policy": "sft:v1", "topic": "t"}]
    )
    with annotator(argilla_server, 1) as one, annotator(argilla_server, 2) as two:
        record_id = search(one, str(dataset.id))[0][0]["id"]
        mine = {
            "annotator-1": respond(one, record_id, "submitted", ranking=RESPONSES)["id"],
            "annotator-2": respond(two, record_id, "draft", ranking=list(reversed(RESPONSES)))["id"],
        }
        for username, client in (("annotator-1", one), ("annotator-2", two)):
            record = client.get(f"/api/v1/records/{record_id}")
            assert record.status_code == 200, record.text
            assert [r["id"] for r in record.json()["responses"]] == [mine[username]], username
            assert record.json()["metadata"] == {"topic": "t"}, username
    with server.http_client(argilla_server.connection()) as owner:
        record = owner.get(f"/api/v1/records/{record_id}").json()
    assert {r["id"] for r in record["responses"]} == set(mine.values())
    assert record["metadata"] == {"policy": "sft:v1", "topic": "t"}
    with server.http_client(argilla_server.connection()) as owner:  # and nothing was deleted on the way
        listed = owner.get(f"/api/v1/datasets/{dataset.id}/records", params={"include": "responses"}).json()
    assert {r["id"] for r in listed["items"][0]["responses"]} == set(mine.values())


def _dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as stat_file:  # a zombie: exited, not reaped yet
        return stat_file.read().rsplit(")", 1)[1].split()[0] == "Z"


def test_responses_survive_stop_and_start(argilla_server, make_dataset):
    dataset_id = make_dataset(min_submitted=1)
    with annotator(argilla_server, 1) as client:
        record_id = search(client, dataset_id, PENDING, RECORD_PENDING, limit=1)[0][0]["id"]
        respond(client, record_id, "submitted", ranking=["response-3", "response-1", "response-2"])

    assert server.stop(argilla_server.home) is True
    assert server.status(argilla_server.home) is None
    assert all(_dead(pid) for pid in argilla_server.pids.values())
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{argilla_server.url}/api/v1/version", timeout=2)
    assert not (argilla_server.home / "tmp").exists()

    port = int(argilla_server.url.rsplit(":", 1)[1])
    restarted = server.serve(argilla_server.home, port=port, annotators=2, quiet=True)
    assert restarted.owner == argilla_server.owner and restarted.annotators == argilla_server.annotators
    with annotator(restarted, 1) as client:
        records, total = search(client, dataset_id, _status_filter("submitted"))
        pending_total = search(client, dataset_id, PENDING, RECORD_PENDING)[1]
    assert (ids(records), total, pending_total) == ({record_id}, 1, N_RECORDS - 1)
    assert records[0]["responses"][0]["values"]["ranking"]["value"][0] == {"value": "response-3", "rank": 1}


def test_a_reused_state_folder_with_open_modes_is_tightened_at_start(argilla_server):
    home = argilla_server.home
    assert server.stop(home)
    (home / "notes.txt").write_text("left here by hand")
    for root, _, names in os.walk(home):
        os.chmod(root, 0o755)
        for name in names:
            os.chmod(os.path.join(root, name), 0o644)
    assert len(_open_modes(home)) > 5

    port = int(argilla_server.url.rsplit(":", 1)[1])
    restarted = server.serve(home, port=port, annotators=2, quiet=True)
    assert _open_modes(home) == []
    with annotator(restarted, 1) as client:
        assert client.get("/api/v1/me").status_code == 200


def test_serve_recovers_from_a_crashed_server(argilla_server):
    before = server.status(argilla_server.home)
    assert before is not None
    os.killpg(before.pids["server"], signal.SIGKILL)
    # Half running is not running: without its server process, the worker and Valkey are no server.
    wait_until(lambda: server.status(argilla_server.home) is None, 10, "a half-running server still counts")

    port = int(before.url.rsplit(":", 1)[1])
    after = server.serve(argilla_server.home, port=port, annotators=2, quiet=True)
    assert all(_dead(pid) for pid in before.pids.values())  # the old worker and Valkey were stopped
    assert set(after.pids.values()).isdisjoint(before.pids.values())
    with annotator(after, 1) as client:
        assert client.get("/api/v1/me").status_code == 200


def test_status_ignores_stale_pid_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "credentials.json").write_text("{}")
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    for name in server.PROCESSES:
        (run / f"{name}.pid").write_text(f'{{"pid": {dead}, "start_time": "1", "port": 1}}')
    assert server.status(tmp_path) is None
    # a live process with another start time is a reused pid, not ours
    (run / "server.pid").write_text(f'{{"pid": {os.getpid()}, "start_time": "1", "port": 1}}')
    assert server.status(tmp_path) is None
    assert server.stop(tmp_path) is False


def test_a_new_server_takes_the_configured_port_or_its_last_one_or_steps_aside_from_a_taken_6900(
    monkeypatch, tmp_path
):
    last = server.free_port()
    (tmp_path / server.PORT_FILE).write_text(str(last))
    monkeypatch.setenv("RLHF_ARGILLA_PORT", "7123")
    assert server.default_port(tmp_path) == 7123
    monkeypatch.setenv("RLHF_ARGILLA_PORT", "http")
    with pytest.raises(server.ArgillaServerError, match="RLHF_ARGILLA_PORT must be a port number"):
        server.default_port()
    monkeypatch.delenv("RLHF_ARGILLA_PORT")
    assert server.default_port(tmp_path) == last  # the address printed last time stays right
    with socket.socket() as held:
        held.bind((server.HOST, last))
        held.listen()
        assert server.default_port(tmp_path) != last
    with socket.socket() as taken:  # 6900 held here (or already by a server elsewhere)
        with contextlib.suppress(OSError):
            taken.bind((server.HOST, server.DEFAULT_PORT))
            taken.listen()
        port = server.default_port()
        assert port != server.DEFAULT_PORT and server._port_free(port)


def test_serve_prints_the_logins_once_and_nothing_else_shows_a_secret(embedded_argilla, capsys):
    """`rlhf annotation serve` prints the logins and where they are kept; status, the run summary and the
    files of the state folder show no secret."""
    home = embedded_argilla
    served = rlhf(
        "annotation", "serve", "--port", str(server.free_port()), "--annotators", "2", cwd=home.parent
    )
    assert served.returncode == 0, served.stderr
    info = server.status(home)
    assert info is not None
    for login in (info.owner, *info.annotators):
        assert served.stdout.count(login.password) == 1, login.username
    assert served.stdout.count(info.owner.api_key) == 1
    assert str(home / "credentials.json") in served.stdout
    printed = (
        set(_secrets(home))
        - {info.owner.api_key}
        - {login.password for login in (info.owner, *info.annotators)}
    )
    assert not [
        secret for secret in printed if secret in served.stdout
    ]  # other API keys, Valkey's, session key
    assert not [secret for secret in _secrets(home) if secret in served.stderr]

    shown = rlhf("annotation", "status", cwd=home.parent)
    assert shown.returncode == 0 and str(home / "credentials.json") in shown.stdout, shown.stderr
    cli._annotation_summary(info, keep=True)
    cli._annotation_summary(info, keep=False)  # stops the server
    summaries = capsys.readouterr()
    assert server.status(home) is None and "credentials.json" in summaries.out
    for output in (shown.stdout, shown.stderr, summaries.out, summaries.err):
        assert not [secret for secret in _secrets(home) if secret in output]
    assert _files_showing_secrets(home) == []
    assert _open_modes(home) == []


def test_a_run_that_fails_after_starting_the_server_stops_it(embedded_argilla, workspace):
    """The embedded server a run starts is stopped when a later stage fails, as it is when the run ends."""
    from tests import tiny_policies

    policy = tiny_policies.random_model(workspace / "policy", seed=1)
    (workspace / "not-a-model").mkdir()
    (workspace / "wf.yaml").write_text(
        "name: fails\ntask: {name: arithmetic}\nstages:\n"
        f"  sample: {{inputs: {{policy: {policy}}}, config: {{k: 3, num_prompts: 4, max_new_tokens: 6}}}}\n"
        "  annotate: {inputs: {samples: sample}, config: {simulate: {annotators: 1, noise: 0.0}}}\n"
        "  collect: {inputs: {batch: annotate}}\n"
        f"  reward: {{inputs: {{model: {workspace / 'not-a-model'}, preferences: collect}}}}\n"
    )
    done = rlhf("run", "wf.yaml", cwd=workspace, timeout=600)
    assert done.returncode != 0 and "[4/4] reward" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    assert "stopped the server this run started" in done.stdout
    assert server.status(embedded_argilla) is None
