"""Shared fixtures. Every test runs offline, on the CPU, with its store and run directory in tmp."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests share 2 cores with Argilla servers and subprocesses: idle OpenMP threads sleep instead of spinning
# (see `common.configs.DeviceSettings.cpu_threads` for what each policy costs).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A working directory with its own artifact store and W&B offline directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RLHF_STORE", str(tmp_path / "artifacts"))
    monkeypatch.setenv("RLHF_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def rlhf(
    *args: str, cwd: Path, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run the real `rlhf` command in a subprocess (as a user would)."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], timeout: float, message: str | Callable[[], str], interval: float = 0.1
) -> T:
    """Poll `predicate` until it returns something truthy, and return that; raise AssertionError(`message`)
    (a callable is called then, e.g. to show a log) when `timeout` seconds pass first. Tests wait on a
    condition with a bound like this, never for a fixed time."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(message() if callable(message) else message)
        time.sleep(interval)
    return result


@pytest.fixture
def embedded_argilla(workspace, monkeypatch):
    """The home of the embedded Argilla server for a test that runs annotation through `rlhf` (no external
    server configured); the server is stopped when the test ends."""
    from annotation import server

    home = workspace / "argilla"
    monkeypatch.setenv("RLHF_ARGILLA_HOME", str(home))
    monkeypatch.delenv("ARGILLA_API_URL", raising=False)
    monkeypatch.delenv("ARGILLA_API_KEY", raising=False)
    yield home
    server.stop(home)


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory) -> Path:
    """An 'SFT policy' laid out like the sft stage's output: a LoRA adapter on a tiny random base (one per
    test module)."""
    from tests import tiny_policies  # torch and transformers: only for the tests that use it

    base = tiny_policies.random_model(tmp_path_factory.mktemp("base"))
    return tiny_policies.lora_adapter(base, tmp_path_factory.mktemp("sft"))


def module_argilla(tmp_path_factory, annotators: int):
    """A real embedded Argilla server for a test module (use from a module-scoped fixture); fails the
    tests, without a traceback, when its environment is missing."""
    from annotation import server

    try:
        server.server_python()
    except server.ArgillaServerError as error:
        pytest.fail(str(error), pytrace=False)
    # a state folder that serve creates
    with server.temporary_server(
        annotators=annotators, home=tmp_path_factory.mktemp("argilla") / "home"
    ) as info:
        yield info


def publish_reward_model(workspace: Path, reward: Path) -> Any:
    """Publish a copy of the reward-model directory `reward` as `rm:v1` in the workspace's store (gate passed),
    for workflows that refer to it; the store."""
    import shutil

    from pipeline.store import Store

    payload = workspace / "reward-payload"
    shutil.copytree(reward, payload)
    store = Store(workspace / "artifacts")
    store.publish("rm", payload, {"kind": "reward-model", "status": "ok", "stage": {"name": "reward"}})
    return store
