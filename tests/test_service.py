"""Service mode through the real command: `rlhf serve` waits at `collect`, bots rank in the background,
the reward stage runs once enough is ranked; SIGTERM in the middle of a stage publishes nothing, and the
next `rlhf serve` finishes the job. Needs the embedded Argilla (`make setup`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from annotation import server, simulate
from annotation.configs import SimulatedAnnotators
from common.training import TRAINER_STATE
from pipeline.store import Store
from tests import tiny_policies
from tests.conftest import module_argilla, wait_until
from tests.test_annotation import make_samples

pytestmark = pytest.mark.slow

WORKFLOW = """\
name: service
task: {name: arithmetic}
stages:
  annotate:
    inputs: {samples: 'sample:v1'}
  collect:
    inputs: {batch: annotate}
    config: {min_records: 8}
  reward:
    inputs: {model: ./base, preferences: collect}
    config: {min_accuracy: 0.0, epochs: 400, batch_size: 8, save_steps: 50, held_out_fraction: 0.25}
"""


@pytest.fixture(scope="module")
def argilla(tmp_path_factory):
    yield from module_argilla(tmp_path_factory, annotators=1)


def serve(workspace: Path, log: Path, argilla_home: Path, interval: float = 1) -> subprocess.Popen:
    env = {**os.environ, "RLHF_ARGILLA_HOME": str(argilla_home)}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "serve", "service.yaml", "--interval", str(interval)],
        cwd=workspace,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def wait_for(condition, what: str, log: Path, timeout: float = 300) -> None:
    """`wait_until` with the end of the service's log in the failure message."""
    wait_until(
        condition, timeout, lambda: f"timed out waiting for {what}; service log:\n{log.read_text()[-4000:]}"
    )


def test_serve_triggers_the_reward_model_and_stops_cleanly_on_sigterm(argilla, workspace):
    store = Store(workspace / "artifacts")
    samples = make_samples(workspace / "payload", n=8, ks=(4,))
    (samples / "manifest.json").unlink()
    store.publish("sample", samples, {"kind": "samples", "status": "ok"})
    tiny_policies.random_model(workspace / "base")
    (workspace / "service.yaml").write_text(WORKFLOW)
    log = workspace / "service.log"

    service = serve(workspace, log, argilla.home)
    try:
        wait_for(lambda: "waiting at collect: 0/8 records ranked" in log.read_text(), "the first wait", log)
        assert store.versions("reward") == []

        bots = simulate.rank_in_background(
            store.get("annotate:v1").path, SimulatedAnnotators(annotators=1), server.connect(argilla.home)
        )
        staging = store.root / ".staging"
        # a complete checkpoint (its trainer state written last), the one the next run resumes from
        checkpoint = f"reward-*/scratch/checkpoint-*/{TRAINER_STATE}"
        wait_for(lambda: any(staging.glob(checkpoint)), "a reward checkpoint", log)
        bots.stop()
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=60) in (0, 130)
    finally:
        if service.poll() is None:
            service.kill()
    text = log.read_text()
    assert "stopped on signal: nothing half-written was published" in text
    assert store.versions("collect.preferences") == [1]
    assert store.versions("reward") == []  # interrupted mid-training: no version, no half artifact

    log2 = workspace / "service-2.log"
    service = serve(workspace, log2, argilla.home)
    try:
        wait_for(lambda: store.versions("reward") == [1], "the resumed reward stage", log2)
        wait_for(lambda: "up to date" in log2.read_text(), "the service to wait again", log2)
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=60) in (0, 130)
    finally:
        if service.poll() is None:
            service.kill()
    text = log2.read_text()
    assert "resuming from checkpoint-" in text  # the reward stage continued from its checkpoint
    assert "ran reward -> reward:v1" in text
    assert store.verify(store.get("reward:v1")) == []
    assert "collect.preferences:v1" in {item.get("ref") for item in store.get("reward:v1").manifest["inputs"]}


def test_an_argilla_event_starts_training_without_waiting_for_a_poll(argilla, workspace):
    """`rlhf serve` registers a webhook on the embedded Argilla; when the bots complete the last needed
    record, Argilla's `record.completed` call wakes it: the reward stage starts within 10 s of the last
    submission although the poll interval is an hour. Stopping deletes the webhook."""
    import json

    from annotation import argilla_dataset as layout

    store = Store(workspace / "artifacts")
    samples = make_samples(workspace / "payload", n=8, ks=(3,))
    (samples / "manifest.json").unlink()
    store.publish("sample", samples, {"kind": "samples", "status": "ok"})
    tiny_policies.random_model(workspace / "base")
    (workspace / "service.yaml").write_text(WORKFLOW.replace("epochs: 400", "epochs: 1"))
    log = workspace / "service.log"
    service = serve(workspace, log, argilla.home, interval=3600)
    try:
        wait_for(lambda: "webhooks: Argilla calls http://127.0.0.1:" in log.read_text(), "the webhook", log)
        wait_for(lambda: "waiting at collect: 0/8 records ranked" in log.read_text(), "the first wait", log)
        connection = server.connect(argilla.home)
        with layout.Api(connection) as api:
            assert (
                len([w for w in api.get("/api/v1/webhooks")["items"] if "rlhf serve" in w["description"]])
                == 1
            )
        bots = simulate.rank_in_background(
            store.get("annotate:v1").path, SimulatedAnnotators(annotators=1), connection
        )
        wait_for(lambda: store.versions("reward") == [1], "the reward stage", log, timeout=120)
        bots.stop()
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=60) in (0, 130)
    finally:
        if service.poll() is None:
            service.kill()
    text = log.read_text()
    assert "event record.completed from Argilla" in text
    with layout.Api(connection) as api:
        batch = json.loads((store.get("annotate:v1").path / "batch.json").read_text())
        submitted = [
            r["inserted_at"] for rec in api.records(batch["dataset"]["id"]) for r in rec["responses"]
        ]
        assert not [w for w in api.get("/api/v1/webhooks")["items"] if "rlhf serve" in w["description"]]
    from datetime import datetime, timezone

    last = max(datetime.fromisoformat(t).replace(tzinfo=timezone.utc) for t in submitted)
    started = datetime.fromisoformat(store.get("reward:v1").manifest["started_at"])
    delay = (started - last).total_seconds()
    print(f"delay from the last submission to the reward stage's start: {delay:.1f} s")
    assert delay < 10, text[-3000:]
