"""A person ranks in the real Argilla web UI (headless Chromium), and collect returns exactly that ranking.

Needs .venv-argilla (`make setup`) and Debian's chromium at /usr/bin/chromium (`bash
annotation/setup_browser.sh`), driven by Playwright's Python package without a downloaded browser.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from annotation import argilla_dataset as layout
from annotation import collect, push, server
from annotation.configs import AnnotateConfig, CollectConfig
from tests.conftest import module_argilla, wait_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def argilla(tmp_path_factory):
    yield from module_argilla(tmp_path_factory, annotators=1)


@pytest.fixture
def browser_page(tmp_path):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `bash annotation/setup_browser.sh`", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tempfile.mkdtemp(prefix="chromium-", dir=tmp_path),  # a fresh profile
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000},
        )
        context.set_default_timeout(30_000)
        try:
            yield context.new_page()
        finally:
            context.close()


def test_a_ranking_made_in_the_web_ui_is_collected_exactly(argilla, browser_page, tmp_path, monkeypatch):
    monkeypatch.delenv("ARGILLA_API_URL", raising=False)
    monkeypatch.delenv("ARGILLA_API_KEY", raising=False)
    monkeypatch.setenv("RLHF_ARGILLA_HOME", str(argilla.home))
    samples = tmp_path / "samples"
    samples.mkdir()
    rows = [
        {
            "id": "p1",
            "prompt": "What is 2 + 3?",
            "candidates": ["2 + 3 = 5", "2 + 3 = 6", "2 + 3 = 4"],
            "answer": 5,
        },
        {
            "id": "p2",
            "prompt": "What is 4 + 3?",
            "candidates": ["4 + 3 = 7", "4 + 3 = 8", "4 + 3 = 9", "4 + 3 = 1"],
            "answer": 7,
        },
    ]
    (samples / "samples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (samples / "generation.json").write_text(
        json.dumps({"policy": {"ref": "sft:v1"}, "prompt_format": "plain"})
    )
    (tmp_path / "batch").mkdir()
    metrics = push.run(AnnotateConfig(), {"samples": samples}, tmp_path / "batch")
    batch, records = layout.load_batch(tmp_path / "batch")
    login = argilla.annotators[0]
    page = browser_page

    try:
        # Log in as the annotator and open the dataset from the home page.
        page.goto(f"{argilla.url}/sign-in", wait_until="networkidle")
        page.fill("input[name=Username]", login.username)
        page.fill("input[name=Password]", login.password)
        page.locator("button[type=submit]").click()
        page.get_by_text(metrics["dataset"]).click()
        page.wait_for_url("**/annotation-mode**")
        page.wait_for_selector("#response_1")

        # The record in focus (the queue order is per user): find it by its prompt.
        text = page.locator("body").inner_text()
        [record] = [r for r in records if r["prompt"] in text]
        k = len(record["candidates"])
        # The last candidate is the best (dragged into box 1); the others tie in box 2 (keyboard: focus
        # an item, type its box number); placeholder slots go to the last box.
        boxes = page.locator(".draggable__slot-box")
        page.locator(f"#{layout.slot(k - 1)}").drag_to(boxes.nth(0))
        unranked = [index for index in range(batch["slots"]) if index != k - 1]
        for index, following in zip(unranked, [*unranked[1:], None], strict=True):
            box = 2 if index < k else batch["slots"]
            rank_with_keyboard(page, layout.slot(index), box, layout.slot(following) if following else None)
        page.get_by_role("button", name="Submit").click()
        wait_for_responses(argilla, batch["dataset"]["id"], count=1)
    except Exception as error:
        shot = tmp_path / "failure.png"
        page.screenshot(path=str(shot), full_page=True)
        pytest.fail(f"driving the Argilla UI failed: {error}\nscreenshot: {shot}", pytrace=False)

    result = collect.run(CollectConfig(), {"batch": tmp_path / "batch"}, tmp_path / "collect")
    rankings = [
        json.loads(line) for line in (tmp_path / "collect/rankings/rankings.jsonl").read_text().splitlines()
    ]
    assert [(r["record_id"], r["annotator"], r["status"], r["simulated"]) for r in rankings] == [
        (record["record_id"], login.username, "submitted", False)
    ]
    best = record["display_order"][k - 1]  # the candidate slot k showed
    assert rankings[0]["ranks"] == [1 if c == best else 2 for c in range(k)]
    pairs = [
        json.loads(line)
        for line in (tmp_path / "collect/preferences/preferences.jsonl").read_text().splitlines()
    ]
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {
        (record["candidates"][best], other) for c, other in enumerate(record["candidates"]) if c != best
    }
    assert result["records_ranked"] == 1 and result["ties"] == (k - 1) * (k - 2) // 2


def rank_with_keyboard(page, card: str, box: int, following: str | None) -> None:
    """Focus `card`, type its box number and wait until the card is in that box. The UI reads digits typed
    within 300 ms of each other as one number (boxes 2 then 2 would be box 22), then resets and focuses
    the first unranked card: with a `following` card to rank, wait for that reset too."""
    page.locator(f"#{card}").focus()
    page.keyboard.press(str(box))
    in_box = page.locator(".draggable__slot-box").nth(box - 1).locator(f"#{card}")
    wait_until(lambda: in_box.count() == 1, 10, f"{card} did not move to box {box}")
    if following is not None:
        wait_until(
            lambda: page.evaluate("document.activeElement && document.activeElement.id") == following,
            10,
            f"the UI did not move the focus to {following} after ranking {card}",
        )


def wait_for_responses(info: server.ServerInfo, dataset_id: str, count: int, timeout: float = 20.0) -> None:
    with layout.Api(info.connection()) as api:
        wait_until(
            lambda: sum(len(r["responses"]) for r in api.records(dataset_id)) >= count,
            timeout,
            f"the server has no submitted response after {timeout:.0f} s",
        )


def test_a_blind_judgment_made_in_the_web_ui_is_unblinded_exactly(
    argilla, browser_page, tmp_path, monkeypatch
):
    """`human_eval`: a person picks "Response 1 is better" on a blind pair; the report credits whichever
    policy was shown first, and nothing on the page names a policy."""
    from annotation import human_eval
    from annotation.configs import HumanEvalConfig
    from common.outcomes import Waiting

    monkeypatch.delenv("ARGILLA_API_URL", raising=False)
    monkeypatch.delenv("ARGILLA_API_KEY", raising=False)
    monkeypatch.setenv("RLHF_ARGILLA_HOME", str(argilla.home))
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.json").write_text(json.dumps({"baseline": "sft", "policies": {"sft": {}, "dpo": {}}}))
    row = {
        "id": "p1",
        "prompt": "What is 6 + 7?",
        "answer": 13,
        "sft": {"greedy": "6 + 7 = 13", "sampled": ["6 + 7 = 14"], "rewards": [0.1]},
        "dpo": {"greedy": "6 + 7 = 13", "sampled": ["6 + 7 = 13"], "rewards": [0.9]},
    }
    (report / "responses.jsonl").write_text(json.dumps(row) + "\n")
    config = HumanEvalConfig(dataset="he-ui", task={"name": "arithmetic"}, bootstrap_samples=100)
    (tmp_path / "first").mkdir()
    with pytest.raises(Waiting):
        human_eval.run(config, {"evaluation": report}, tmp_path / "first")  # pushes, then waits

    login = argilla.annotators[0]
    page = browser_page
    try:
        page.goto(f"{argilla.url}/sign-in", wait_until="networkidle")
        page.fill("input[name=Username]", login.username)
        page.fill("input[name=Password]", login.password)
        page.locator("button[type=submit]").click()
        page.get_by_text("he-ui").click()
        page.wait_for_url("**/annotation-mode**")
        page.get_by_text("Which response is better?").wait_for()
        text = page.locator("body").inner_text()
        assert "6 + 7 = 14" in text and "6 + 7 = 13" in text
        assert "dpo" not in text and "sft" not in text  # blind
        page.get_by_text("Response 1 is better").click()
        page.get_by_role("button", name="Submit").click()
        with layout.Api(argilla.connection()) as api:
            dataset = api.find_dataset(api.workspace_id("rlhf"), "he-ui")
        assert dataset is not None
        wait_for_responses(argilla, dataset["id"], count=1)
    except Exception as error:
        shot = tmp_path / "failure.png"
        page.screenshot(path=str(shot), full_page=True)
        pytest.fail(f"driving the Argilla UI failed: {error}\nscreenshot: {shot}", pytrace=False)

    (tmp_path / "second").mkdir()
    metrics = human_eval.run(config, {"evaluation": report}, tmp_path / "second")
    [pair] = [json.loads(line) for line in (tmp_path / "second" / "judgments.jsonl").read_text().splitlines()]
    assert [(j["annotator"], j["value"]) for j in pair["judgments"]] == [(login.username, "first")]
    shown_first_is_dpo = pair["shown"][0] == "dpo"
    assert metrics["dpo.human_win_rate"] == (1.0 if shown_first_is_dpo else 0.0)
