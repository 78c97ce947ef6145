"""The artifact store: atomic publish, never overwrite, locking, verification, lineage."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from pipeline.store import MANIFEST, Store, StoreError


def _payload(root: Path, name: str, files: dict[str, str]) -> Path:
    folder = root / "work" / name
    folder.mkdir(parents=True)
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    return folder


def _publish(store: Store, name: str, text: str, inputs: list | None = None, key: str = "k"):
    payload = _payload(store.root.parent, f"{name}-{text}", {"data.txt": text, "sub/more.txt": text * 2})
    stage = {"name": name, "kind": "test", "workflow": "w", "run_id": "r"}
    return store.publish(
        name, payload, {"kind": "samples", "stage": stage, "cache_key": key, "inputs": inputs or []}
    )


def test_publish_assigns_versions_and_records_digests(tmp_path):
    store = Store(tmp_path / "artifacts")
    first, second = _publish(store, "a", "one"), _publish(store, "a", "two")
    assert (first.ref, second.ref) == ("a:v1", "a:v2")
    assert store.get("a").ref == store.get("a:latest").ref == "a:v2"
    assert store.get("a:v1").path.joinpath("data.txt").read_text() == "one"
    manifest = json.loads((first.path / MANIFEST).read_text())
    assert set(manifest["files"]) == {"data.txt", "sub/more.txt"}
    assert manifest["digest"] == first.digest != second.digest
    assert store.verify(first) == []


def test_bad_references_say_what_exists(tmp_path):
    store = Store(tmp_path / "artifacts")
    _publish(store, "a", "one")
    with pytest.raises(StoreError, match=r"no artifact named 'b'.*artifacts: a"):
        store.get("b:v1")
    with pytest.raises(StoreError, match=r"a has no version v7 \(versions: v1\)"):
        store.get("a:v7")
    with pytest.raises(StoreError, match="bad artifact reference"):
        store.get("a:seven")


def test_tampering_is_detected(tmp_path):
    store = Store(tmp_path / "artifacts")
    artifact = _publish(store, "a", "one")
    (artifact.path / "data.txt").write_text("changed")
    (artifact.path / "sub/more.txt").unlink()
    (artifact.path / "extra.bin").write_text("x")
    problems = store.verify(artifact)
    assert any(p.startswith("data.txt: sha256") for p in problems)
    assert "missing file sub/more.txt" in problems
    assert "unexpected file extra.bin" in problems


def test_version_directory_without_manifest_is_invisible_and_not_reused(tmp_path):
    store = Store(tmp_path / "artifacts")
    (store.root / "a" / "v1").mkdir(parents=True)
    (store.root / "a" / "v1" / "half.bin").write_text("partial")
    assert store.versions("a") == []
    assert _publish(store, "a", "one").ref == "a:v2"
    assert (store.root / "a" / "v1" / "half.bin").read_text() == "partial"


def _publish_many(root: str, worker: int, count: int) -> list[str]:
    store = Store(Path(root))
    return [_publish(store, "shared", f"w{worker}-{i}").ref for i in range(count)]


def test_concurrent_publishers_never_collide(tmp_path):
    root = tmp_path / "artifacts"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        refs = pool.starmap(_publish_many, [(str(root), w, 10) for w in range(4)])
    flat = [r for worker in refs for r in worker]
    assert len(flat) == len(set(flat)) == 40
    store = Store(root)
    assert store.versions("shared") == list(range(1, 41))
    assert all(store.verify(a) == [] for a in store.all())


def test_lineage_walks_back_to_the_roots(tmp_path):
    store = Store(tmp_path / "artifacts")
    base = _publish(store, "base", "b")
    mid = _publish(
        store,
        "mid",
        "m",
        inputs=[{"slot": "model", "ref": base.ref, "name": "base", "version": 1, "digest": base.digest}],
    )
    ext = {"slot": "data", "path": "/data/x.jsonl", "digest": "abc"}
    top = _publish(
        store,
        "top",
        "t",
        inputs=[{"slot": "model", "ref": mid.ref, "name": "mid", "version": 1, "digest": mid.digest}, ext],
    )
    chain = [(depth, getattr(node, "ref", None) or node["path"]) for depth, node in store.lineage(top)]
    assert chain == [(0, "top:v1"), (1, "mid:v1"), (2, "base:v1"), (1, "/data/x.jsonl")]


def test_find_by_cache_key(tmp_path):
    store = Store(tmp_path / "artifacts")
    _publish(store, "a", "one", key="k1")
    _publish(store, "a", "two", key="k2")
    assert store.find("a", "k1").ref == "a:v1"
    assert store.find("a", "k2").ref == "a:v2"
    assert store.find("a", "k3") is None
