"""Simulated annotators: bot accounts that rank an annotation batch through the annotator's HTTP API.

Each bot is an account `bot-N` (role annotator, named "Simulated annotator N (bot)") and works like a
person in the web UI: it asks for its pending queue (`POST /api/v1/me/datasets/{id}/records/search`, the
UI's query) and answers each record (`POST /api/v1/records/{id}/responses`, the UI's submit/discard
call; or, with `bulk`, `POST /api/v1/me/responses/bulk`, the UI's bulk mode). Its ranking is the task's
(`tasks.ranks`: by `Task.preference`, the verdict or a finer grading of it) perturbed by seeded adjacent
swaps; its comment says it is simulated, and collect marks its rankings `simulated`. A record the task
cannot judge (it lacks the fields the verdict needs) is an error, not a random ranking.

`rank_batch` runs the bots until every queue is empty: side by side when every bot answers every record
(`independent`), else in turn, one page of queue each. With a `stop` event it keeps polling for new
records until the event is set, so it can run in a background thread while a pipeline waits for rankings
(`rank_in_background`).
"""

from __future__ import annotations

import dataclasses
import random
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import tasks
from annotation import argilla_dataset as layout
from annotation import server
from annotation.argilla_dataset import Api
from annotation.configs import SimulatedAnnotators
from tasks import Task, TaskError

BOT_PREFIX = "bot-"
PAGE = 50
"""Records a bot takes from its queue at a time."""
PENDING = [
    {"type": "terms", "scope": {"entity": "response", "property": "status"}, "values": ["pending"]},
    {"type": "terms", "scope": {"entity": "record", "property": "status"}, "values": ["pending"]},
]
"""The UI's pending queue: records this user has not answered that still need rankings."""


@dataclasses.dataclass(frozen=True)
class Bot:
    username: str
    api_key: str = dataclasses.field(repr=False)


def is_simulated(username: str) -> bool:
    """Whether an account is one of the simulated annotators."""
    return username.startswith(BOT_PREFIX)


# --- the ranking a bot gives ---


def check_judgeable(task: Task | None, records: list[dict[str, Any]]) -> Task:
    """The task, when it can judge every record of a batch; else a `TaskError` naming the first record it
    cannot judge (simulated annotators never rank at random)."""
    if task is None:
        raise TaskError(
            "simulated annotators rank by a task's verdict, and none is set: give the workflow a top-level "
            "`task:` (or the annotate stage a `task`)"
        )
    for record in records:
        if missing := task.missing(record):
            raise TaskError(
                f"simulated annotators: task {task.name!r} cannot judge record {record.get('prompt_id')!r} "
                f"(prompt {str(record.get('prompt'))[:60]!r}): it lacks {', '.join(missing)}"
            )
    return task


def seeded_start(
    bot: str, record: dict[str, Any], config: SimulatedAnnotators, comment: bool
) -> tuple[random.Random, str, dict[str, Any] | None]:
    """A bot's random stream for a record (seeded by the bot, the record and the seed), its label, and the
    body of a discard when it discards the record (with probability `discard`, the stream's first draw)."""
    rng = random.Random(f"{config.seed}:{bot}:{record['record_id']}")
    label = f"Simulated annotator {bot} (bot)"
    if rng.random() >= config.discard:
        return rng, label, None
    note = {layout.COMMENT: {"value": f"{label}: discarded at random"}} if comment else {}
    return rng, label, {"status": "discarded", "values": note} if note else {"status": "discarded"}


def bot_answer(
    bot: str, record: dict[str, Any], slots: int, config: SimulatedAnnotators, comment: bool, task: Task
) -> dict[str, Any]:
    """The response body bot `bot` submits for a batch record (seeded by the bot, the record and the seed)."""
    rng, label, discarded = seeded_start(bot, record, config, comment)
    if discarded is not None:
        return discarded
    ranks = tasks.simulated_ranks(task, record, record["candidates"], config.noise, rng)
    ranking = layout.slot_ranking(ranks, layout.record_order(record), slots)
    values: dict[str, Any] = {layout.RANKING: {"value": ranking}}
    if comment:
        values[layout.COMMENT] = {
            "value": f"{label}: ranked by the {task.name} task's verdict, noise {config.noise}"
        }
    return {"status": "submitted", "values": values}


def judge_answer(
    bot: str, pair: dict[str, Any], config: SimulatedAnnotators, comment: bool, task: Task
) -> dict[str, Any]:
    """A bot's answer to a blind pair of `human_eval` (`pair["responses"]`, in display order): the better
    one by `Task.preference` (equal: a tie); with probability `noise` another answer, drawn at random.
    Seeded by the bot, the pair and the seed."""
    rng, label, discarded = seeded_start(bot, pair, config, comment)
    if discarded is not None:
        return discarded
    first, second = (task.preference(pair, response) for response in pair["responses"])
    truth = "first" if first > second else "second" if second > first else "tie"
    if rng.random() < config.noise:
        truth = rng.choice([value for value in layout.JUDGMENTS if value != truth])
    values: dict[str, Any] = {layout.PREFERENCE: {"value": truth}}
    if comment:
        values[layout.COMMENT] = {
            "value": f"{label}: judged by the {task.name} task's verdict, noise {config.noise}"
        }
    return {"status": "submitted", "values": values}


# --- accounts ---


def ensure_bots(api: Api, workspace_id: str, count: int) -> list[Bot]:
    """Accounts bot-1..bot-`count` (created when missing) in the workspace; their API keys."""
    users = {user["username"]: user for user in api.users()}
    members = {user["id"] for user in api.get(f"/api/v1/workspaces/{workspace_id}/users")["items"]}
    bots = []
    for number in range(1, count + 1):
        username = f"{BOT_PREFIX}{number}"
        user = users.get(username)
        if user is None:
            body = {
                "first_name": f"Simulated annotator {number}",
                "last_name": "(bot)",
                "username": username,
                "role": "annotator",
                "password": secrets.token_urlsafe(18),  # never used: bots authenticate with their API key
            }
            user = api.post("/api/v1/users", json=body)
        if user["id"] not in members:
            api.post(f"/api/v1/workspaces/{workspace_id}/users", json={"user_id": user["id"]})
        bots.append(Bot(username, user["api_key"]))
    return bots


# --- ranking a batch ---


def rank_batch(
    connection: server.Connection,
    batch: dict[str, Any],
    records: list[dict[str, Any]],
    config: SimulatedAnnotators,
    task: Task | None,
    *,
    stop: threading.Event | None = None,
    poll_s: float = 1.0,
    bulk: bool = False,
    answer: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Let the bots rank the batch until their queues are empty (or, with `stop`, until it is set).

    `batch` is the content of an annotation batch's batch.json, `records` its records.jsonl; `task` ranks
    them (every record must be one it can judge). `answer(bot, record)` gives a bot's response body; by
    default its ranking (`bot_answer`). Returns counts.
    """
    started = time.perf_counter()
    task = check_judgeable(task, records)
    dataset_id, slots = batch["dataset"]["id"], batch["slots"]
    comment = bool(batch.get("questions", {}).get("comment"))
    if answer is None:

        def answer(bot: str, record: dict[str, Any]) -> dict[str, Any]:
            return bot_answer(bot, record, slots, config, comment, task)

    by_id = {record["record_id"]: record for record in records}
    with Api(connection) as owner:
        workspace_id = owner.workspace_id(batch["workspace"])
        bots = ensure_bots(owner, workspace_id, config.annotators)
    clients = {bot.username: Api(server.Connection(connection.url, bot.api_key)) for bot in bots}
    answered: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    counting = threading.Lock()

    def page(bot: str, api: Api) -> bool:
        """Bot `bot` answers the next page of its queue; whether it answered anything."""
        room = PAGE if config.max_records is None else min(PAGE, config.max_records - answered[bot])
        if room <= 0:
            return False
        queue = api.post(
            f"/api/v1/me/datasets/{dataset_id}/records/search",
            params={"limit": room},
            json={"filters": {"and": PENDING}},
        )["items"]
        answers = []
        for item in queue:
            record = by_id.get(item["record"]["external_id"])
            if record is not None:  # a record that is not in the batch is left alone
                answers.append((item["record"]["id"], answer(bot, record)))
        _submit(api, answers, bulk)
        with counting:
            answered[bot] += len(answers)
            statuses.update(body["status"] for _, body in answers)
        return bool(answers)

    try:
        if stop is None and independent(batch, config):
            with ThreadPoolExecutor(len(clients), thread_name_prefix="bot") as pool:
                work = [pool.submit(_until_empty, page, bot, api) for bot, api in clients.items()]
                for future in work:
                    future.result()
        else:
            while True:
                progress = False
                for bot, api in clients.items():
                    progress = page(bot, api) or progress
                if stop is not None and stop.is_set():
                    break
                if not progress:
                    if stop is None:
                        break
                    stop.wait(poll_s)
    finally:
        for api in clients.values():
            api.client.close()
    return {
        "annotators": len(bots),
        "responses": sum(answered.values()),
        "rankings": statuses["submitted"],
        "discards": statuses["discarded"],
        "seconds": time.perf_counter() - started,
    }


def independent(batch: dict[str, Any], config: SimulatedAnnotators) -> bool:
    """Whether the bots may rank side by side: each answers its whole queue (no `max_records`) and no record
    is complete before every bot has answered it (the batch wants at least as many rankings per record as
    there are bots), so which bot answers which record does not depend on their order. Side by side, the
    server works on one bot's page while it waits on another's database calls (the demo's 2,631 rankings
    on 2 cores: 27 s instead of 33 s in turn); otherwise they take turns, a page each, and the result is
    the same on every run."""
    bots = config.annotators
    return config.max_records is None and bots > 1 and int(batch.get("annotators_per_record") or 0) >= bots


def _until_empty(page: Callable[[str, Api], bool], bot: str, api: Api) -> None:
    while page(bot, api):
        pass


def _submit(api: Api, answers: list[tuple[str, dict[str, Any]]], bulk: bool) -> None:
    if bulk and answers:
        items = [{"record_id": record_id, **body} for record_id, body in answers]
        result = api.post("/api/v1/me/responses/bulk", json={"items": items})
        errors = [item["error"] for item in result["items"] if item.get("error")]
        if errors:
            raise server.ArgillaServerError(f"bulk responses rejected: {errors[:3]}")
        return
    for record_id, body in answers:
        api.post(f"/api/v1/records/{record_id}/responses", json=body)


class BackgroundBots:
    """Bots ranking a batch in a background thread until `stop()`; for service-mode demos and tests."""

    def __init__(
        self,
        batch_dir: Path,
        config: SimulatedAnnotators,
        connection: server.Connection | None = None,
        poll_s: float = 0.5,
        task: Task | None = None,
    ):
        batch, records = layout.load_batch(Path(batch_dir))
        if task is None and batch.get("task") is not None:
            import tasks

            task = tasks.load(batch["task"])
        task = check_judgeable(task, records)
        self._stop = threading.Event()
        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None

        def work() -> None:
            try:
                self.result = rank_batch(
                    connection or server.connect(),
                    batch,
                    records,
                    config,
                    task,
                    stop=self._stop,
                    poll_s=poll_s,
                )
            except BaseException as err:  # reported by stop()
                self.error = err

        self._thread = threading.Thread(target=work, name="simulated-annotators", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> dict[str, Any]:
        """Stop the bots (after the page they are answering) and return their counts."""
        self._stop.set()
        self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        if self.result is None:
            raise TimeoutError("the simulated annotators did not stop in time")
        return self.result


def rank_in_background(
    batch_dir: Path,
    config: SimulatedAnnotators,
    connection: server.Connection | None = None,
    task: Task | None = None,
) -> BackgroundBots:
    """Start bots ranking the batch of `batch_dir` (an annotation-batch artifact) in a background thread, by
    `task` (default: the task recorded in the batch)."""
    return BackgroundBots(batch_dir, config, connection, task=task)
