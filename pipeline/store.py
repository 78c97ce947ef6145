"""The artifact store: immutable, versioned stage outputs with a manifest each.

Layout under the store root (`artifacts/` in the working directory unless `RLHF_STORE` is set)::

    <name>/v<N>/manifest.json     the record: kind, files and digests, config, inputs, metrics, ...
    <name>/v<N>/...               the payload
    .staging/<name>-<key>/        work in progress of a stage run (survives a crash, for resume)
    .lock                         held while a version number is allocated and published

A version is written in a staging directory and renamed into place with its manifest already
inside, so a version directory that exists is complete. Nothing is ever overwritten.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.digests import MANIFEST, hash_tree, tree_digest

REF = re.compile(r"^(?P<name>[A-Za-z0-9_][A-Za-z0-9_.-]*)(?::(?P<version>v[0-9]+|latest))?$")


class StoreError(Exception):
    """A missing artifact, a bad reference, or an artifact that fails verification."""


def default_root() -> Path:
    return Path(os.environ.get("RLHF_STORE", "artifacts")).resolve()


@dataclass(frozen=True)
class Artifact:
    name: str
    version: int
    path: Path
    manifest: dict[str, Any]

    @property
    def ref(self) -> str:
        return f"{self.name}:v{self.version}"

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def digest(self) -> str:
        return self.manifest["digest"]


class Store:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else default_root()

    # --- reading ---------------------------------------------------------------------------------

    def names(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def versions(self, name: str) -> list[int]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        found = (re.fullmatch(r"v([0-9]+)", p.name) for p in folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m and (folder / m.group(0) / MANIFEST).exists())

    def get(self, ref: str) -> Artifact:
        """Resolve `name`, `name:latest` or `name:v3`."""
        match = REF.match(ref)
        if not match:
            raise StoreError(f"bad artifact reference {ref!r}: expected 'name', 'name:latest' or 'name:v3'")
        name, version = match.group("name"), match.group("version") or "latest"
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise StoreError(f"no artifact named {name!r} in {self.root} (artifacts: {known})")
        number = versions[-1] if version == "latest" else int(version[1:])
        if number not in versions:
            raise StoreError(
                f"{name} has no version v{number} (versions: {', '.join(f'v{v}' for v in versions)})"
            )
        return self._load(name, number)

    def _load(self, name: str, version: int) -> Artifact:
        path = self.root / name / f"v{version}"
        manifest = json.loads((path / MANIFEST).read_text())
        return Artifact(name=name, version=version, path=path, manifest=manifest)

    def all(self) -> Iterator[Artifact]:
        for name in self.names():
            for version in self.versions(name):
                yield self._load(name, version)

    def find(self, name: str, cache_key: str) -> Artifact | None:
        """The newest version of `name` produced by a stage run with this cache key."""
        for version in reversed(self.versions(name)):
            artifact = self._load(name, version)
            if artifact.manifest.get("cache_key") == cache_key:
                return artifact
        return None

    def verify(self, artifact: Artifact) -> list[str]:
        """Recompute every digest. Returns the problems found (empty when intact)."""
        problems = []
        expected = artifact.manifest.get("files", {})
        actual = hash_tree(artifact.path)
        for rel in sorted(set(expected) | set(actual)):
            if rel not in actual:
                problems.append(f"missing file {rel}")
            elif rel not in expected:
                problems.append(f"unexpected file {rel}")
            elif actual[rel]["sha256"] != expected[rel]["sha256"]:
                problems.append(
                    f"{rel}: sha256 {actual[rel]['sha256'][:12]}… != recorded {expected[rel]['sha256'][:12]}…"
                )
        if tree_digest(expected) != artifact.manifest.get("digest"):
            problems.append("manifest digest does not match its file list")
        return problems

    def lineage(self, artifact: Artifact) -> list[tuple[int, Artifact | dict[str, Any]]]:
        """The chain back to the roots, depth first: (depth, artifact or external input record)."""
        out: list[tuple[int, Artifact | dict[str, Any]]] = []

        def walk(node: Artifact, depth: int) -> None:
            out.append((depth, node))
            for item in node.manifest.get("inputs", []):
                if item.get("ref") and item.get("version") is not None:
                    try:
                        walk(self.get(item["ref"]), depth + 1)
                    except StoreError:
                        out.append((depth + 1, {**item, "missing": True}))
                else:
                    out.append((depth + 1, item))

        walk(artifact, 0)
        return out

    # --- writing ---------------------------------------------------------------------------------

    @contextmanager
    def lock(self, name: str = ".lock") -> Iterator[None]:
        """An exclusive inter-process lock on the store (or on one staging area)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / name, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def staging(self, name: str, cache_key: str) -> Path:
        """A stable work directory for one stage run: the same key finds it again after a crash."""
        path = self.root / ".staging" / f"{name}-{cache_key[:16]}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def publish(self, name: str, payload: Path, manifest: dict[str, Any]) -> Artifact:
        """Seal `payload` as the next version of `name`. `payload` is moved, not copied.

        The manifest gets the file digests, name and version, and is written into the payload,
        which is then renamed into place under the store lock: no reader ever sees a version without
        its manifest, and two publishers never get the same version.
        """
        files = hash_tree(payload)
        with self.lock():
            taken = [int(p.name[1:]) for p in (self.root / name).glob("v*") if p.name[1:].isdigit()]
            version = max(taken, default=0) + 1
            sealed = {"name": name, "version": version, "ref": f"{name}:v{version}", **manifest}
            sealed.update(files=files, digest=tree_digest(files))
            _write_json(payload / MANIFEST, sealed)
            target = self.root / name / f"v{version}"
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(payload, target)  # atomic on one file system; never replaces a version
        return self._load(name, version)


def _write_json(path: Path, data: Any) -> None:
    with path.open("w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
