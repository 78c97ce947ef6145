"""The exit-code contract of every command (DESIGN.md): 0 done; 1 a stage failed or was rejected, or a
server was lost once a stage had started; 2 bad usage or bad input detected before any work; 3 waiting
(tests/test_annotation.py covers 3 with a real server). Each failing case prints one line, no traceback.
Artifacts are small payloads published with the Store API; no model is trained here."""

from __future__ import annotations

import json
import socket

import pytest

from pipeline.store import Store
from tests.conftest import rlhf
from tests.test_hostile_store import one_line_error, publish

SAMPLES = {
    "samples.jsonl": json.dumps({"id": "p1", "prompt": "Say hi.", "candidates": ["hi", "hello"]}) + "\n"
}


@pytest.fixture
def store(workspace) -> Store:
    store = Store(workspace / "artifacts")
    publish(store, "sample", SAMPLES, kind="samples")
    publish(store, "notes", {"notes.txt": "x"}, kind="samples")
    return store


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


CASES = [
    # (command line, expected exit code)
    (["--help"], 0),
    ([], 2),
    (["no-such-command"], 2),
    (["validate", "missing.yaml"], 2),
    (["validate", "ok.yaml"], 0),
    (["validate", "bad-ref.yaml"], 2),
    (["run", "bad-ref.yaml"], 2),
    (["run", "ok.yaml", "--only", "nosuchstage"], 2),
    (["artifacts", "list"], 0),
    (["artifacts", "show", "sample:v1"], 0),
    (["artifacts", "show", "sample:v9"], 2),
    (["artifacts", "show", "not a ref"], 2),
    (["artifacts", "lineage", "sample:v1"], 0),
    (["artifacts", "lineage", "ghost:latest"], 2),
    (["artifacts", "verify", "sample:v1"], 0),
    (["artifacts", "verify", "ghost:v1"], 2),
    (["artifacts", "gc"], 0),
    (["export", "sample:v1", "--merged", "out"], 2),  # not a model
    (["export", "ghost:v1", "--merged", "out"], 2),
    (["score", "notes:v1", "--prompt", "p", "--response", "r"], 2),  # not a reward model
    (["score", "./no-such-dir", "--prompt", "p", "--response", "r"], 2),
]


@pytest.mark.parametrize(("argv", "code"), CASES, ids=[" ".join(a) or "(none)" for a, _ in CASES])
def test_every_command_keeps_the_exit_code_contract(workspace, store, argv, code):
    (workspace / "ok.yaml").write_text("stages:\n  annotate:\n    inputs: {samples: 'sample:v1'}\n")
    (workspace / "bad-ref.yaml").write_text("stages:\n  annotate:\n    inputs: {samples: 'sample:v9'}\n")
    result = rlhf(*argv, cwd=workspace)
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    if code == 2 and argv and argv[0] not in ("no-such-command",):
        one_line_error(result.stderr)


def test_an_argilla_server_lost_once_the_stage_started_is_a_failed_stage(workspace, store):
    """ARGILLA_API_URL names a real port that nothing listens on (a server that went away): the annotate
    stage has started, so the run fails with 1, one line, nothing published."""
    (workspace / "wf.yaml").write_text("stages:\n  annotate:\n    inputs: {samples: 'sample:v1'}\n")
    env = {"ARGILLA_API_URL": f"http://127.0.0.1:{closed_port()}", "ARGILLA_API_KEY": "k" * 16}
    result = rlhf("run", "wf.yaml", cwd=workspace, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    line = one_line_error(result.stderr, after_a_stage=True)
    assert line.startswith("failed") and "annotate" in line and "k" * 16 not in result.stdout + result.stderr
    assert Store(workspace / "artifacts").versions("annotate") == []
