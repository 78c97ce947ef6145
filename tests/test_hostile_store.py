"""A store under attack or accident: edited and corrupt manifests, moved stores, read-only and full
disks, leftovers of failed runs, and command-line arguments that may be artifacts or folders.

Artifacts are small payloads published with the Store API; where a model is needed, the tiny models of
`tests/tiny_policies.py`. The one fake is `disk_full` (an ENOSPC from fsync, as a full disk gives it on
delayed-allocation file systems): a tiny tmpfs needs mount privileges. A real kernel write failure is
also used: a file size limit (RLIMIT_FSIZE, EFBIG).
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.digests import MANIFEST, SEAL
from common.models import BASE_FILE, base_of, load_causal_lm
from common.outcomes import InputError
from pipeline import cli
from pipeline.store import Store, StoreWriteError
from tests import tiny_policies

KEY = "0123456789abcdef" * 4


def publish(
    store: Store, name: str, files: dict[str, str], kind: str = "samples", inputs: list | None = None
):
    """A small artifact, published the way the runner does (payload in staging, then sealed)."""
    payload = store.staging(name, f"{name}-{len(store.versions(name))}".ljust(64, "0"))
    for rel, text in files.items():
        (payload / rel).parent.mkdir(parents=True, exist_ok=True)
        (payload / rel).write_text(text)
    stage = {"name": name, "kind": "test", "workflow": "w", "run_id": "r"}
    manifest = {
        "kind": kind,
        "stage": stage,
        "status": "ok",
        "config": {"lr": 0.1},
        "cache_key": KEY,
        "inputs": inputs or [],
        "metrics": {"accuracy": 0.5},
    }
    return store.publish(name, payload, manifest)


def publish_folder(store: Store, name: str, folder: Path, kind: str):
    payload = store.staging(name, KEY)
    shutil.copytree(folder, payload, dirs_exist_ok=True)
    return store.publish(name, payload, {"kind": kind, "stage": {"name": name}, "cache_key": KEY})


def edit_manifest(path: Path, **changes) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    manifest.update(changes)
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2))


def one_line_error(err: str, after_a_stage: bool = False) -> str:
    """The error output: one line, no traceback (`after_a_stage`: the last line, after what the stage
    printed while it ran, such as progress bars)."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    if after_a_stage:
        assert [line for line in lines if line.startswith(("error", "failed"))] == lines[-1:], err
        return lines[-1]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def store(workspace, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return Store(workspace / "artifacts")


class DiskFull:
    """The only fake: fsync reports a full disk (ENOSPC) until `free()`."""

    def __init__(self) -> None:
        self.fsync = os.fsync
        os.fsync = self.no_space

    @staticmethod
    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def free(self) -> None:
        os.fsync = self.fsync


@pytest.fixture
def disk_full():
    full = DiskFull()
    yield full
    full.free()


def model_workflow(folder: Path, source: str) -> Path:
    """A workflow whose one stage (`model`) copies a model into the store: quick, and a real stage."""
    path = folder / "wf.yaml"
    path.write_text(f"name: hostile\nstages:\n  model:\n    inputs: {{source: '{source}'}}\n")
    return path


# --- an edited manifest ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("status", "rejected"),
        ("config", {"lr": 0.2}),
        ("inputs", [{"slot": "x", "ref": "other:v1", "digest": "0" * 64}]),
        ("metrics", {"accuracy": 0.99}),
        ("cache_key", "f" * 64),
        ("kind", "policy"),
        ("added", "a field nobody published"),
    ],
)
def test_verify_names_the_edited_manifest_field(store, capsys, field, value):
    artifact = publish(store, "a", {"data.txt": "one"})
    assert store.verify(artifact) == [] and artifact.sealed
    edit_manifest(artifact.path, **{field: value})

    problems = store.verify(store.get("a:v1"))

    assert problems == [f"{MANIFEST} was edited after publishing (fields changed: {field})"]
    assert cli.main(["artifacts", "verify", "a:v1"]) == 1
    assert f"fields changed: {field}" in capsys.readouterr().err


def test_a_removed_field_or_an_edited_seal_is_detected(store):
    artifact = publish(store, "a", {"data.txt": "one"})
    manifest = json.loads((artifact.path / MANIFEST).read_text())
    del manifest["metrics"]
    (artifact.path / MANIFEST).write_text(json.dumps(manifest))
    assert "fields changed: metrics" in store.verify(store.get("a:v1"))[0]

    manifest = json.loads((artifact.path / MANIFEST).read_text())
    manifest[SEAL] = {"sha256": "0" * 64}  # a seal edited to hide the edit
    (artifact.path / MANIFEST).write_text(json.dumps(manifest))
    assert store.verify(store.get("a:v1")) == [f"{MANIFEST} was edited after publishing (its seal too)"]


def test_a_version_folder_moved_to_another_number_is_detected(store):
    artifact = publish(store, "a", {"data.txt": "one"})
    artifact.path.rename(artifact.path.parent / "v7")

    assert store.verify(store.get("a:v7")) == ["the manifest names a:v1, stored as a:v7"]


def test_an_artifact_published_before_seals_loads_and_says_so(store, capsys):
    artifact = publish(store, "a", {"data.txt": "one"})
    manifest = json.loads((artifact.path / MANIFEST).read_text())
    del manifest[SEAL]
    (artifact.path / MANIFEST).write_text(json.dumps(manifest))

    assert cli.main(["artifacts", "verify", "a:v1"]) == 0
    assert "no manifest digest recorded" in capsys.readouterr().out
    (artifact.path / "data.txt").write_text("changed")  # its files are still verified
    assert cli.main(["artifacts", "verify", "a:v1"]) == 1
    assert "data.txt: sha256" in capsys.readouterr().err


def test_an_edited_manifest_is_no_cache_hit(store):
    artifact = publish(store, "a", {"data.txt": "one"})
    assert store.find("a", KEY) == artifact
    edit_manifest(artifact.path, cache_key="e" * 64)

    assert store.find("a", "e" * 64) is None  # an edited cache key does not make a cached result
    assert store.find("a", KEY) is None


@pytest.mark.parametrize("tamper", ["manifest", "payload"])
def test_a_stage_refuses_a_tampered_input_before_any_work(store, capsys, tamper):
    base = publish_folder(store, "base", tiny_policies.random_model(store.root.parent / "made"), "base-model")
    model_workflow(store.root.parent, "base:v1")
    if tamper == "manifest":
        edit_manifest(base.path, metrics={"parameters": 1})
        what = "fields changed: metrics"
    else:
        (base.path / "config.json").write_text("{}")
        what = "config.json: sha256"

    capsys.readouterr()  # what building the models printed
    assert cli.main(["run", "wf.yaml"]) == 2

    line = one_line_error(capsys.readouterr().err)
    assert "model.inputs.source: base:v1 fails verification" in line and what in line
    assert store.versions("model") == [] and not list((store.root / ".staging").glob("model-*"))


# --- a corrupt manifest ---------------------------------------------------------------------------

CORRUPTIONS = {
    "invalid JSON": lambda text: text.replace('"kind"', "kind", 1),
    "truncated": lambda text: text[: len(text) // 2],
    "empty": lambda text: "",
    "not an object": lambda text: "[1, 2, 3]\n",
    "files of the wrong type": lambda text: json.dumps({**json.loads(text), "files": ["data.txt"]}),
    "no kind": lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "kind"}),
    "inputs of the wrong type": lambda text: json.dumps({**json.loads(text), "inputs": ["a:v1"]}),
    "binary garbage": lambda text: "\udcff\udcfe",
}


def corrupt(path: Path, how: str) -> None:
    text = (path / MANIFEST).read_text()
    (path / MANIFEST).write_bytes(CORRUPTIONS[how](text).encode("utf-8", "surrogateescape"))


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_list_reports_a_corrupt_manifest_on_its_row_and_goes_on(store, capsys, how):
    publish(store, "a", {"data.txt": "one"})
    broken = publish(store, "b", {"data.txt": "two"})
    publish(store, "c", {"data.txt": "three"})
    corrupt(broken.path, how)

    assert cli.main(["artifacts", "list", "--json"]) == 0
    rows = {row["ref"]: row for row in json.loads(capsys.readouterr().out)}
    assert list(rows) == ["a:v1", "b:v1", "c:v1"]
    assert rows["b:v1"]["status"] == "corrupt" and rows["b:v1"]["problems"][0].startswith("manifest.json")
    assert rows["a:v1"]["status"] == rows["c:v1"]["status"] == "ok"

    assert cli.main(["artifacts", "list"]) == 0
    table = capsys.readouterr().out
    assert "corrupt: manifest.json" in table and "c:v1" in table

    assert cli.main(["artifacts", "show", "b:v1"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "b:v1" in line and str(broken.path) in line and "manifest.json" in line


def test_verify_and_lineage_of_a_corrupt_manifest(store, capsys):
    base = publish(store, "base", {"data.txt": "b"})
    record = {"slot": "model", "ref": "base:v1", "name": "base", "version": 1, "digest": base.digest}
    publish(store, "top", {"data.txt": "t"}, inputs=[record])
    corrupt(base.path, "truncated")

    assert cli.main(["artifacts", "lineage", "top:v1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("top:v1") and "base:v1" in out[1] and "corrupt manifest" in out[1]
    assert cli.main(["artifacts", "lineage", "base:v1"]) == 2
    assert "not valid JSON" in one_line_error(capsys.readouterr().err)
    assert cli.main(["artifacts", "verify", "base:v1"]) == 1
    assert "FAILED verification" in one_line_error(capsys.readouterr().err)
    # The corrupt version is never a cache hit, and its number is never given again.
    assert store.find("base", KEY) is None
    assert publish(store, "base", {"data.txt": "b2"}).ref == "base:v2"


def test_edited_manifests_that_loop_or_carry_odd_values_do_not_break_the_commands(store, capsys):
    a, b = publish(store, "a", {"data.txt": "one"}), publish(store, "b", {"data.txt": "two"})
    record = {"slot": "x", "name": "b", "version": 1, "ref": "b:v1", "digest": b.digest}
    edit_manifest(a.path, inputs=[record], wandb="not a run", finished_at=5, stage={"name": 7})
    edit_manifest(b.path, inputs=[{**record, "name": "a", "ref": "a:v1", "digest": a.digest}])

    assert cli.main(["artifacts", "lineage", "a:v1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].startswith("a:v1") and lines[1].startswith("  └─ b:v1")
    assert lines[2].startswith("    └─ a:v1") and "cycle" in lines[2]
    assert cli.main(["artifacts", "show", "a:v1"]) == 0
    assert "warning: manifest.json was edited after publishing" in capsys.readouterr().out
    assert cli.main(["artifacts", "list"]) == 0
    assert "edited" in capsys.readouterr().out
    assert cli.main(["artifacts", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(row["ref"], row["status"]) for row in rows] == [("a:v1", "edited"), ("b:v1", "edited")]
    assert "fields changed: finished_at, inputs, stage, wandb" in rows[0]["problems"][0]


def test_a_stage_refuses_a_corrupt_input_with_one_line(store, capsys):
    base = publish_folder(store, "base", tiny_policies.random_model(store.root.parent / "made"), "base-model")
    model_workflow(store.root.parent, "base:v1")
    corrupt(base.path, "files of the wrong type")

    capsys.readouterr()  # what building the models printed
    assert cli.main(["run", "wf.yaml"]) == 2

    line = one_line_error(capsys.readouterr().err)
    assert "model.inputs.source: base:v1" in line and "files" in line
    assert store.versions("model") == []


# --- an adapter's base, in a copied or moved store ------------------------------------------------


@pytest.fixture
def adapter_store(tmp_path):
    """A store holding a tiny base model and a LoRA adapter on it, written in the store's staging area as
    a stage writes it."""
    store = Store(tmp_path / "original")
    base = publish_folder(store, "base", tiny_policies.random_model(tmp_path / "made"), "base-model")
    staging = store.staging("sft", KEY)
    tiny_policies.lora_adapter(base.path, staging)
    store.publish("sft", staging, {"kind": "adapter", "stage": {"name": "sft"}, "cache_key": KEY})
    return store


def test_a_copied_store_loads_its_adapter_after_the_original_is_deleted(adapter_store, tmp_path):
    record = json.loads((adapter_store.root / "sft" / "v1" / BASE_FILE).read_text())
    assert (record["ref"], record["in_store"]) == ("base:v1", True)
    before, _ = load_causal_lm(adapter_store.root / "sft" / "v1", device=torch.device("cpu"))
    expected = {name: tensor.clone() for name, tensor in before.state_dict().items()}

    copy = tmp_path / "elsewhere" / "store"
    copy.parent.mkdir()
    subprocess.run(["cp", "-r", str(adapter_store.root), str(copy)], check=True)
    shutil.rmtree(adapter_store.root)

    copied = Store(copy)
    assert all(copied.verify(a) == [] for a in copied.all())
    assert base_of(copy / "sft" / "v1") == copy / "base" / "v1"
    model, _ = load_causal_lm(copy / "sft" / "v1", device=torch.device("cpu"))
    for (name, want), got in zip(expected.items(), model.state_dict().values(), strict=True):
        assert torch.equal(want, got), name


def test_a_copied_store_never_reads_a_base_outside_itself(adapter_store, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(adapter_store.root, copy)
    shutil.rmtree(copy / "base")  # the original store still has it, at the path base.json recorded

    with pytest.raises(InputError, match=rf"its base model base:v1 is not in its store {copy}") as caught:
        load_causal_lm(copy / "sft" / "v1", device=torch.device("cpu"))
    assert "\n" not in str(caught.value)


def test_a_copied_store_refuses_a_changed_base_of_its_own(adapter_store, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(adapter_store.root, copy)
    weights = copy / "base" / "v1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))

    with pytest.raises(InputError, match=r"copy/base/v1 is not the one it was trained on"):
        base_of(copy / "sft" / "v1")
    assert base_of(adapter_store.root / "sft" / "v1") == adapter_store.root / "base" / "v1"


# --- a store that cannot be written ---------------------------------------------------------------


@pytest.fixture
def read_only(store):
    """Makes the store root read-only (chmod -w) until the test ends."""
    folders: list[Path] = []

    def make(folder: Path) -> None:
        folder.chmod(folder.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        folders.append(folder)

    yield make
    for folder in folders:
        folder.chmod(folder.stat().st_mode | stat.S_IWUSR)


def test_a_read_only_store_refuses_a_stage_before_any_work(store, read_only, capsys):
    publish(store, "a", {"data.txt": "one"})
    tiny_policies.random_model(store.root.parent / "local")
    model_workflow(store.root.parent, "./local")
    before = sorted(p.relative_to(store.root) for p in store.root.rglob("*"))
    read_only(store.root)

    capsys.readouterr()  # what building the models printed
    assert cli.main(["run", "wf.yaml"]) == 2

    line = one_line_error(capsys.readouterr().err)
    assert f"stage model cannot run: the store {store.root} is read-only" in line
    assert sorted(p.relative_to(store.root) for p in store.root.rglob("*")) == before


def test_a_read_only_store_still_serves_what_it_holds(store, read_only, capsys):
    tiny_policies.random_model(store.root.parent / "local")
    model_workflow(store.root.parent, "./local")
    assert cli.main(["run", "wf.yaml"]) == 0
    assert store.leftovers() == []  # a finished stage leaves neither its staging folder nor its lock
    read_only(store.root)
    capsys.readouterr()

    assert cli.main(["run", "wf.yaml"]) == 0
    assert "cached" in capsys.readouterr().out
    for command in (
        ["artifacts", "list"],
        ["artifacts", "show", "model:v1"],
        ["artifacts", "verify", "model"],
    ):
        assert cli.main(command) == 0
    with pytest.raises(StoreWriteError, match=f"the store {store.root} is read-only"):
        publish(store, "b", {"data.txt": "one"})


def test_a_full_disk_at_publish_leaves_no_version_and_keeps_the_payload(store, disk_full):
    payload = store.staging("a", KEY)
    (payload / "data.txt").write_text("one")

    with pytest.raises(StoreWriteError, match=f"cannot write to the store {store.root}: No space left"):
        store.publish("a", payload, {"kind": "samples"})

    assert store.versions("a") == [] and not (store.root / "a").exists()
    assert sorted(p.name for p in payload.iterdir()) == ["data.txt"]  # no half-written manifest
    disk_full.free()
    assert store.publish("a", payload, {"kind": "samples"}).ref == "a:v1"


def test_a_file_size_limit_at_publish_leaves_no_version(store):
    """A real write failure from the kernel: the manifest outgrows RLIMIT_FSIZE (EFBIG)."""
    payload = store.staging("a", KEY)
    (payload / "data.txt").write_text("one")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256, hard))
    try:
        with pytest.raises(StoreWriteError, match=f"cannot write to the store {store.root}: File too large"):
            store.publish("a", payload, {"kind": "samples", "config": {"padding": "x" * 512}})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    assert store.versions("a") == [] and not (store.root / "a").exists()
    assert not (payload / MANIFEST).exists()


def test_a_full_disk_during_a_run_fails_the_stage_with_one_line(store, disk_full, capsys):
    tiny_policies.random_model(store.root.parent / "local")
    model_workflow(store.root.parent, "./local")
    capsys.readouterr()  # what building the model printed

    assert cli.main(["run", "wf.yaml"]) == 1

    line = one_line_error(capsys.readouterr().err, after_a_stage=True)
    assert f"the store {store.root}" in line and "No space left on device" in line
    assert store.versions("model") == [] and not (store.root / "model").exists()
    disk_full.free()
    assert cli.main(["run", "wf.yaml"]) == 0  # the next run redoes the stage and publishes it
    assert store.versions("model") == [1] and store.verify(store.get("model:v1")) == []


# --- leftovers of failed runs ---------------------------------------------------------------------


def test_gc_lists_leftovers_and_removes_them_only_with_yes(store, capsys):
    artifact = publish(store, "a", {"data.txt": "one"})
    failed = store.root / ".staging" / "sft-00112233aabbccdd"
    (failed / "scratch" / "checkpoint-2").mkdir(parents=True)
    (failed / "scratch" / "checkpoint-2" / "weights.bin").write_bytes(bytes(3000))
    stale = store.root / ".staging" / "dpo-8899aabbccddeeff.lock"
    stale.touch()

    assert cli.main(["artifacts", "gc"]) == 0
    out = capsys.readouterr().out
    assert "would remove" in out and "sft-00112233aabbccdd" in out and "2.9 KB" in out
    assert "checkpoints of an interrupted run" in out and "stale lock file" in out
    assert failed.exists() and stale.exists()

    assert cli.main(["artifacts", "gc", "--yes"]) == 0
    assert "removed" in capsys.readouterr().out
    assert not failed.exists() and not stale.exists()
    assert (store.root / ".lock").exists() and store.verify(store.get("a:v1")) == [] == store.verify(artifact)
    assert cli.main(["artifacts", "gc"]) == 0
    assert "nothing to remove" in capsys.readouterr().out


def test_gc_never_removes_a_staging_folder_a_live_process_holds(store, capsys):
    busy = store.staging("busy", KEY)
    (busy / "partial.bin").write_bytes(bytes(100))
    lock = Path(f"{busy}.lock")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('locked', flush=True); sys.stdin.read()",
            str(lock),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert [item.in_use for item in store.leftovers()] == [True]

        assert cli.main(["artifacts", "gc", "--yes"]) == 0
        assert "kept" in capsys.readouterr().out
        assert (busy / "partial.bin").exists() and lock.exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)

    assert cli.main(["artifacts", "gc", "--yes"]) == 0
    assert not busy.exists() and not lock.exists()


def test_a_staging_folder_belongs_to_one_cache_key(store):
    """A staging folder is found again by the same stage run (same name and cache key) to resume it, and
    never by another."""
    first = store.staging("sft", KEY)
    assert store.staging("sft", KEY) == first
    assert store.staging("sft", "f" + KEY[1:]) != first and store.staging("dpo", KEY) != first


def test_a_stage_lock_goes_with_its_stage_and_a_held_one_is_never_removed(store):
    lock = store.root / ".staging" / f"a-{KEY[:16]}.lock"
    with store.staging_lock("a", KEY):
        assert lock.exists()
    assert not lock.exists()  # no staging folder left behind: its lock file went with it
    repo = Path(__file__).resolve().parent.parent
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pipeline.store import Store; "
            "held = Store(sys.argv[1]).staging_lock('a', sys.argv[2]); held.__enter__(); print('locked', flush=True); "
            "sys.stdin.read()",
            str(store.root),
            KEY,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        [leftover] = store.leftovers()
        assert leftover.in_use and leftover.description == "stale lock file"
        assert not store.remove(leftover) and lock.exists()
    finally:
        holder.kill()  # dies holding it, as a crashed run does
        holder.wait(timeout=30)
    [leftover] = store.leftovers()  # its holder is gone: now a stale lock
    assert not leftover.in_use and store.remove(leftover) and store.leftovers() == []


# --- export and score: kinds, and references before folders --------------------------------------


def test_export_and_score_refuse_artifacts_of_other_kinds(store, capsys):
    publish(store, "samples", {"samples.jsonl": "{}\n"}, kind="samples")
    publish(store, "pol", {"data.txt": "x"}, kind="policy")
    out = store.root.parent / "merged"

    assert cli.main(["export", "samples:v1", "--merged", str(out)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert (
        "export: samples:v1 is a 'samples' artifact; export takes one of:" in line and "reward-model" in line
    )
    assert not out.exists()
    assert cli.main(["score", "pol:latest", "--prompt", "p", "--response", "r"]) == 2
    assert "score takes one of: reward-model" in one_line_error(capsys.readouterr().err)
    # The same rule for an artifact folder given as a path.
    assert cli.main(["export", "artifacts/samples/v1", "--merged", str(out)]) == 2
    assert "is a 'samples' artifact" in one_line_error(capsys.readouterr().err)


def test_a_tampered_artifact_folder_given_as_a_path_is_refused(store, capsys):
    artifact = publish(store, "pol", {"data.txt": "x"}, kind="policy")
    edit_manifest(artifact.path, status="ok", metrics={})

    assert cli.main(["export", "./artifacts/pol/v1", "--merged", "out"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "failed verification" in line and "fields changed: metrics" in line


def test_an_artifact_reference_wins_over_a_folder_of_the_same_name(store, capsys):
    publish_folder(
        store, "reward", tiny_policies.reward_model(store.root.parent / "made", seed=0), "reward-model"
    )
    tiny_policies.reward_model(store.root.parent / "reward", seed=1)  # ./reward: another reward model
    (store.root.parent / "other").mkdir()
    capsys.readouterr()  # what building the models printed

    def scores(arg: str) -> list[float]:
        assert cli.main(["score", arg, "--prompt", "What is 3 + 4?", "--response", "7", "--json"]) == 0
        return [row["score"] for row in json.loads(capsys.readouterr().out)]

    from_store, from_folder = scores("reward"), scores("./reward")
    assert scores("reward:v1") == scores("reward:latest") == from_store != from_folder
    assert scores(str(store.root.parent / "made")) == from_store

    assert cli.main(["score", "other", "--prompt", "p", "--response", "r"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "no artifact named 'other'" in line and "write ./other" in line
