"""The Argilla dataset of an annotation batch: its layout, and the REST calls push, collect and the bots share.

Layout (one dataset per batch, one record per prompt):
- fields `prompt` and `response_1`..`response_K` (markdown text), K the most candidates any prompt has;
  slot s shows candidate `display_order[s]`, a shuffle seeded by the record id (`display_order`), so a
  response's position says nothing about how it was drawn, and rankings saved in display order whatever
  the annotator chose (an Argilla UI bug, argilla#5712) stand out in collect's check;
- a required RankingQuestion `ranking` over `response_1`..`response_K` and an optional TextQuestion
  `comment`; a submitted ranking gives every option a rank from 1 (best); equal ranks are ties;
- record metadata `prompt_id` and `candidates` (hidden from annotators), dataset metadata recording the
  samples artifact, the policy and the generation settings.

Prompts with fewer candidates than K: Argilla 2.8 cannot vary a question's options per record (a submitted
ranking must rank every option of the question), and the UI hides a missing optional field but still lists
its option. So every slot is filled: a missing candidate's field holds a placeholder telling the annotator
to rank it last, and collect ignores the ranks of placeholder slots, wherever the annotator put them.

Everything goes through the REST API (`/api/v1/...`) with the owner's (or an admin's) API key: the argilla
2.8 client drops the `rank` of ranking answers, and the bulk endpoints are what makes a push fast.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import httpx

from annotation import server
from annotation.server import ArgillaServerError

BATCH_FILE = "batch.json"
RECORDS_FILE = "records.jsonl"
RECORD_KEYS = ("record_id", "prompt_id", "prompt", "candidates", "display_order")
"""What a record of records.jsonl is; any other key of a record is a field of its prompt (the task's, such
as `answer`), carried from the samples to the preference pairs so that the task can judge them."""
PROMPT = "prompt"
RANKING = "ranking"
COMMENT = "comment"
MAX_CANDIDATES = 50
"""Argilla's limit on the options of a ranking question."""
BULK_SIZE = 500
"""Records per bulk upsert request (argilla-server's maximum)."""
PAGE_SIZE = 1000
"""Records per page when listing a dataset (argilla-server's maximum)."""
RETRIES = (0.5, 1.0, 2.0)
"""Pauses before retrying an idempotent request (GET, PUT) that could not reach the server."""


def load_batch(batch_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """batch.json and the records (records.jsonl) of an annotation-batch artifact."""
    batch = json.loads((batch_dir / BATCH_FILE).read_text())
    lines = (batch_dir / batch.get("records", RECORDS_FILE)).read_text(encoding="utf-8").splitlines()
    return batch, [json.loads(line) for line in lines if line.strip()]


def slot(index: int) -> str:
    """The field and ranking value of slot `index` (0-based): `response_1`, ..."""
    return f"response_{index + 1}"


def display_order(record_id: str, k: int) -> list[int]:
    """The candidate each of a record's first k slots shows (slot s shows candidate `order[s]`): a shuffle
    seeded by the record id, the same on every push. Sampled candidates come in the order they were
    first drawn, so the likeliest answer would otherwise nearly always be Response 1."""
    order = list(range(k))
    random.Random(f"display:{record_id}").shuffle(order)
    return order


def record_order(record: dict[str, Any]) -> list[int]:
    """A batch record's display order (batches pushed before there was one show candidates in order)."""
    return record.get("display_order") or list(range(len(record["candidates"])))


def slot_ranking(ranks: list[int], order: list[int], slots: int) -> list[dict[str, Any]]:
    """The ranking answer that gives candidate c rank `ranks[c]` (slot s shows candidate `order[s]`);
    placeholder slots go last, tied."""
    last = max(ranks) + 1
    return [{"value": slot(s), "rank": ranks[order[s]] if s < len(order) else last} for s in range(slots)]


def slot_index(value: str) -> int:
    """The candidate index of a ranking value (`response_3` -> 2)."""
    return int(value.removeprefix("response_")) - 1


def empty_slot(present: int) -> str:
    return (
        f"*(No response in this slot: this prompt has only {present} responses. "
        "Rank it last; it is ignored.)*"
    )


def guidelines(annotators_per_record: int, slots: int) -> str:
    """The built-in guidelines, written for someone who has never seen the project."""
    shared = (
        "Each record is ranked by one person."
        if annotators_per_record == 1
        else f"Each record is ranked by {annotators_per_record} people independently; you see only your own ranking."
    )
    return f"""# Rank the responses

Each record shows a **prompt** (a question or a request) and up to {slots} **responses** written by an AI
model. Put the responses in order, **best first**. {shared}

## What makes a response better
1. **Correct** first: a response that answers the prompt correctly beats any wrong one, however well
   written. Among wrong responses, the one closer to correct ranks higher.
2. Then **complete and clear**: it does what was asked, without missing parts or rambling.
3. A response that is empty, cut off, or not an answer at all goes last.

## How to rank
- Drag each response name (*Response 1*, *Response 2*, ...) into a rank box: box 1 is the best.
  With the keyboard: click a response name and press its rank's number.
- **Ties are allowed**: when two responses are equally good (for example the same answer in other
  words), put them in the same box.
- Every response must be in a box before you can **Submit**.
- Some prompts have fewer responses than there are boxes: the missing ones read *"No response in this
  slot"*. Put them in the last box; they are ignored.

## When to discard
Press **Discard** instead of ranking when you cannot judge the record: the prompt or the responses are
unreadable (garbled text, a language you do not read, broken formatting), or the prompt makes no sense.
Do not guess. A comment saying why helps.

## Comment (optional)
Anything worth telling us about this record: a problem with the prompt, why you discarded it.
"""


def render_prompt(prompt: Any) -> str:
    """A prompt as the annotator sees it: the text, or a chat's messages one by one."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(m, dict) and "content" in m for m in prompt):
        if len(prompt) == 1:
            return str(prompt[0]["content"])
        return "\n\n".join(f"**{m.get('role', 'user')}:** {m['content']}" for m in prompt)
    raise ValueError(f"a prompt is a string or a list of chat messages, not {type(prompt).__name__}")


def record_fields(prompt: Any, candidates: list[str], order: list[int], slots: int) -> dict[str, str]:
    fields = {PROMPT: render_prompt(prompt)}
    for index in range(slots):
        shown = candidates[order[index]] if index < len(order) else empty_slot(len(candidates))
        fields[slot(index)] = shown
    return fields


def field_specs(slots: int) -> list[dict[str, Any]]:
    text = {"type": "text", "use_markdown": True}
    specs = [{"name": PROMPT, "title": "Prompt", "required": True, "settings": text}]
    specs += [
        {"name": slot(i), "title": f"Response {i + 1}", "required": True, "settings": text}
        for i in range(slots)
    ]
    return specs


def question_specs(slots: int, comment: bool) -> list[dict[str, Any]]:
    options = [{"value": slot(i), "text": f"Response {i + 1}"} for i in range(slots)]
    specs = [
        {
            "name": RANKING,
            "title": "Rank the responses, best first",
            "description": "Box 1 is the best. Equally good responses may share a box. Empty slots go last.",
            "required": True,
            "settings": {"type": "ranking", "options": options},
        }
    ]
    if comment:
        specs.append(
            {
                "name": COMMENT,
                "title": "Comment (optional)",
                "required": False,
                "settings": {"type": "text", "use_markdown": False},
            }
        )
    return specs


def metadata_specs() -> list[dict[str, Any]]:
    return [
        {
            "name": "prompt_id",
            "title": "Prompt id",
            "settings": {"type": "terms"},
            "visible_for_annotators": False,
        },
        {
            "name": "candidates",
            "title": "Candidates",
            "settings": {"type": "integer"},
            "visible_for_annotators": False,
        },
    ]


# --- the blind pairwise layout of `human_eval` ---

PREFERENCE = "preference"
PAIR_SLOTS = 2
JUDGMENTS = {"first": "Response 1 is better", "second": "Response 2 is better", "tie": "About the same"}
"""The label question's values and what annotators read."""


def pair_question_specs(comment: bool) -> list[dict[str, Any]]:
    specs = [
        {
            "name": PREFERENCE,
            "title": "Which response is better?",
            "description": "Judge what was asked. The responses come in a random order, without names.",
            "required": True,
            "settings": {
                "type": "label_selection",
                "options": [{"value": value, "text": text} for value, text in JUDGMENTS.items()],
            },
        }
    ]
    if comment:
        specs.append(question_specs(1, comment=True)[1])
    return specs


def pair_guidelines(judges_per_pair: int) -> str:
    return f"""# Which response is better?

Each record shows a **prompt** and two **responses** from different AI assistants, in a random order and
without names. Choose the one that does better what the prompt asks (correct, follows every instruction,
clear); **About the same** when you cannot tell them apart. Each record is judged by {judges_per_pair}
annotator{"s" if judges_per_pair != 1 else ""}; you will not see the others' answers.

## Comment (optional)
Why, in a few words, or a problem with the prompt. Discard a record you cannot judge.
"""


def ensure_dataset(
    api: Api,
    workspace_id: str,
    name: str,
    settings: dict[str, Any],
    fields: list[dict[str, Any]],
    questions: list[dict[str, Any]],
    metadata: list[dict[str, Any]],
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A dataset, created and published when missing, with `settings` (guidelines, distribution, metadata)
    up to date. A half-created one (a crash between the calls) is completed. Returns the dataset and, when
    it was already published, what it has (`{"fields": names, "questions": name -> spec}`) for the caller
    to check against its layout; None when this call published it."""
    dataset = api.find_dataset(workspace_id, name)
    if dataset is None:
        dataset = api.post("/api/v1/datasets", json={"name": name, "workspace_id": workspace_id, **settings})
    elif any(dataset.get(key) != value for key, value in settings.items()):
        dataset = api.patch(f"/api/v1/datasets/{dataset['id']}", json=settings)
    dataset_id = dataset["id"]
    present_fields = {field["name"] for field in api.get(f"/api/v1/datasets/{dataset_id}/fields")["items"]}
    present = {q["name"]: q for q in api.get(f"/api/v1/datasets/{dataset_id}/questions")["items"]}
    if dataset["status"] == "ready":
        return dataset, {"fields": present_fields, "questions": present}
    for spec in fields:
        if spec["name"] not in present_fields:
            api.post(f"/api/v1/datasets/{dataset_id}/fields", json=spec)
    for spec in questions:
        if spec["name"] not in present:
            api.post(f"/api/v1/datasets/{dataset_id}/questions", json=spec)
    properties = {
        p["name"] for p in api.get(f"/api/v1/me/datasets/{dataset_id}/metadata-properties")["items"]
    }
    for spec in metadata:
        if spec["name"] not in properties:
            api.post(f"/api/v1/datasets/{dataset_id}/metadata-properties", json=spec)
    return api.put(f"/api/v1/datasets/{dataset_id}/publish"), None


class Api:
    """An httpx client on an Argilla server whose errors say which call failed and why (never the key)."""

    def __init__(self, connection: server.Connection, timeout: float = 120.0):
        self.url = connection.url
        self.client = server.http_client(connection, timeout=timeout)
        self.local = httpx.URL(connection.url).host in ("127.0.0.1", "localhost", "::1")
        """On this machine: large pages are fetched uncompressed (compressing costs the server more than
        the transfer saves)."""

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        pauses = RETRIES if method in ("GET", "PUT") else ()
        for attempt in range(len(pauses) + 1):
            try:
                response = self.client.request(method, path, **kwargs)
                break
            except httpx.TransportError as err:
                if attempt == len(pauses):
                    raise ArgillaServerError(
                        f"cannot reach the Argilla server at {self.url} ({method} {path}): {err}"
                    ) from None
                time.sleep(pauses[attempt])
        if response.is_error:
            raise ArgillaServerError(
                f"{method} {path} on {self.url} -> {response.status_code}: {response.text[:500]}"
            )
        return response.json() if response.content else None

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> Any:
        return self.request("PUT", path, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> Any:
        return self.request("PATCH", path, **kwargs)

    # --- lookups ---

    def workspace_id(self, name: str, *, create: bool = False) -> str:
        for workspace in self.get("/api/v1/me/workspaces")["items"]:
            if workspace["name"] == name:
                return workspace["id"]
        if not create:
            raise ArgillaServerError(f"no workspace {name!r} on {self.url} (or no access to it)")
        return self.post("/api/v1/workspaces", json={"name": name})["id"]

    def find_dataset(self, workspace_id: str, name: str) -> dict[str, Any] | None:
        for dataset in self.get("/api/v1/me/datasets")["items"]:
            if dataset["workspace_id"] == workspace_id and dataset["name"] == name:
                return dataset
        return None

    def users(self) -> list[dict[str, Any]]:
        """Every account (owner key), or the members of the workspaces this key sees (admin key)."""
        try:
            return self.get("/api/v1/users")["items"]
        except ArgillaServerError:
            users: dict[str, dict[str, Any]] = {}
            for workspace in self.get("/api/v1/me/workspaces")["items"]:
                for user in self.get(f"/api/v1/workspaces/{workspace['id']}/users")["items"]:
                    users[user["id"]] = user
            return list(users.values())

    def records(self, dataset_id: str, *, responses: bool = True) -> list[dict[str, Any]]:
        """Every record of a dataset (with its responses), page by page; each record once."""
        for _ in range(2):  # the listing has no ORDER BY: if records moved between pages, read again
            found: dict[str, dict[str, Any]] = {}
            total, offset = None, 0
            while total is None or offset < total:
                params: dict[str, Any] = {"offset": offset, "limit": PAGE_SIZE}
                if responses:
                    params["include"] = "responses"
                headers = {"Accept-Encoding": "identity"} if self.local else None
                page = self.get(f"/api/v1/datasets/{dataset_id}/records", params=params, headers=headers)
                total = page["total"]
                found.update((record["id"], record) for record in page["items"])
                if not page["items"]:
                    break
                offset += len(page["items"])
            if len(found) == total:
                break
        return list(found.values())
