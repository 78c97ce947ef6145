"""The artifact store: immutable, versioned stage outputs with a manifest each.

Layout under the store root (`artifacts/` in the working directory unless `RLHF_STORE` is set)::

    <name>/v<N>/manifest.json     the record: kind, files and digests, config, inputs, metrics, ...
    <name>/v<N>/...               the payload
    .staging/<name>-<key>/        work in progress of a stage run (survives a crash, for resume)
    .staging/<name>-<key>.lock    held by the process running that stage
    .lock                         held while a version number is allocated and published

A version is written in a staging directory and renamed into place with its manifest already
inside, so a version directory that exists is complete. Nothing is ever overwritten. The manifest is
sealed (`common.digests.seal`): `verify` names any field edited since, as it names any changed file.
A manifest that cannot be read (not JSON, wrong types) is reported as corrupt; it hides nothing else.

A store that cannot be written (read-only, full disk) is a `StoreWriteError` naming its root, raised
before anything is written where it can be seen first, and never leaves a half-published version.
Staging folders of failed runs and stale lock files are listed by `leftovers` and removed by `remove`
(`rlhf artifacts gc`), never while a live process holds their lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.digests import (
    MANIFEST,
    SEAL,
    ManifestError,
    hash_tree,
    read_manifest,
    seal,
    seal_problems,
    tree_digest,
)
from common.training import SCRATCH

REF = re.compile(r"^(?P<name>[A-Za-z0-9_][A-Za-z0-9_.-]*)(?::(?P<version>v[0-9]+|latest))?$")
STAGING = ".staging"
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
"""Errors that mean "this file system will not take the write", not a bug of the code writing."""


class StoreError(Exception):
    """A missing artifact, a bad reference, or an artifact that fails verification."""


class CorruptManifest(StoreError):
    """An artifact version whose manifest cannot be read (not JSON, truncated, wrong types)."""

    def __init__(self, ref: str, path: Path, reason: str):
        super().__init__(f"{ref} ({path}): {reason}")
        self.reason = reason


class StoreWriteError(StoreError):
    """The store cannot be written (read-only, full disk); the message names its root."""


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

    @property
    def sealed(self) -> bool:
        """Whether its manifest carries a seal (published since seals exist), so edits are detectable."""
        return SEAL in self.manifest


@dataclass(frozen=True)
class Corrupt:
    """A version whose manifest cannot be read: listed as such, never loaded."""

    name: str
    version: int
    path: Path
    reason: str

    @property
    def ref(self) -> str:
        return f"{self.name}:v{self.version}"


@dataclass(frozen=True)
class Leftover:
    """Something under `.staging` that no finished run needs: a failed run's folder and/or its lock file."""

    key: str
    """`<name>-<cache key prefix>`: the folder is `.staging/<key>`, its lock `.staging/<key>.lock`."""
    folder: Path | None
    lock: Path | None
    size: int
    in_use: bool
    """A live process holds its lock: a stage is running in it."""
    checkpoints: bool
    """It holds checkpoints of an interrupted run (removing it means the next run starts over)."""

    @property
    def paths(self) -> list[Path]:
        return [p for p in (self.folder, self.lock) if p is not None]

    @property
    def description(self) -> str:
        if self.folder is None:
            return "stale lock file"
        if self.checkpoints:
            return "staging folder with checkpoints of an interrupted run (the next run would start over)"
        return "staging folder of a failed run"


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
        """Resolve `name`, `name:latest` or `name:v3` (`CorruptManifest` when its manifest is unreadable)."""
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
        try:
            manifest = read_manifest(path)
        except ManifestError as err:
            raise CorruptManifest(f"{name}:v{version}", path, str(err)) from None
        return Artifact(name=name, version=version, path=path, manifest=manifest)

    def entries(self) -> Iterator[Artifact | Corrupt]:
        """Every version in the store, a corrupt one as a `Corrupt` record in its place."""
        for name in self.names():
            for version in self.versions(name):
                try:
                    yield self._load(name, version)
                except CorruptManifest as err:
                    yield Corrupt(name, version, self.root / name / f"v{version}", err.reason)

    def all(self) -> Iterator[Artifact]:
        """Every readable version (corrupt ones are skipped: see `entries`)."""
        return (entry for entry in self.entries() if isinstance(entry, Artifact))

    def find(self, name: str, cache_key: str) -> Artifact | None:
        """The newest version of `name` produced by a stage run with this cache key. A version whose
        manifest is corrupt or was edited since publishing is not trusted to say what produced it."""
        for version in reversed(self.versions(name)):
            try:
                artifact = self._load(name, version)
            except CorruptManifest:
                continue
            if artifact.manifest.get("cache_key") == cache_key and not self.check_manifest(artifact):
                return artifact
        return None

    def check_manifest(self, artifact: Artifact) -> list[str]:
        """The manifest's own problems, without reading the payload: fields edited since it was sealed,
        or a name and version other than where it is stored."""
        problems = seal_problems(artifact.manifest) or []
        m = artifact.manifest
        if (m.get("name"), m.get("version")) not in ((artifact.name, artifact.version), (None, None)):
            problems.append(
                f"the manifest names {m.get('name')}:v{m.get('version')}, stored as {artifact.ref}"
            )
        return problems

    def verify(self, artifact: Artifact) -> list[str]:
        """Check the manifest's seal and recompute every digest. Returns the problems found (empty when
        intact). An artifact published before seals existed has its files verified only."""
        problems = self.check_manifest(artifact)
        expected = artifact.manifest["files"]
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
        """The chain back to the roots, depth first: (depth, artifact or external input record). An input
        missing from the store is marked `missing`, one with an unreadable manifest `corrupt`, and one that
        is its own ancestor (only an edited manifest can say so) `cycle`."""
        out: list[tuple[int, Artifact | dict[str, Any]]] = []

        def walk(node: Artifact, depth: int, above: frozenset[str]) -> None:
            out.append((depth, node))
            for item in node.manifest.get("inputs", []):
                if isinstance(item.get("ref"), str) and item.get("version") is not None:
                    if item["ref"] in above | {node.ref}:
                        out.append((depth + 1, {**item, "cycle": True}))
                        continue
                    try:
                        walk(self.get(item["ref"]), depth + 1, above | {node.ref})
                    except CorruptManifest as err:
                        out.append((depth + 1, {**item, "corrupt": err.reason}))
                    except StoreError:
                        out.append((depth + 1, {**item, "missing": True}))
                else:
                    out.append((depth + 1, item))

        walk(artifact, 0, frozenset())
        return out

    # --- writing ---------------------------------------------------------------------------------

    @contextmanager
    def lock(self, name: str = ".lock") -> Iterator[None]:
        """An exclusive inter-process lock on the store (or on one staging area). The lock file may be
        removed by its holder (`gc`, a finished stage): a waiter that then gets the lock on the removed
        file opens the new one and waits again, so two holders never think they have the same lock."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            with open(path, "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                if not _same_file(handle, path):
                    continue
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
                return

    def staging(self, name: str, cache_key: str) -> Path:
        """A stable work directory for one stage run: the same key finds it again after a crash.

        Keyed by the artifact name and the cache key (kind, resolved config, input digests; the first 64
        bits name it), so a folder found again belongs to the same stage run, and resuming its
        checkpoints is right; a changed config or input gets another folder. Used under `staging_lock`."""
        path = self.root / STAGING / f"{name}-{cache_key[:16]}"
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise self._write_error(err) from None
        return path

    @contextmanager
    def staging_lock(self, name: str, cache_key: str) -> Iterator[None]:
        """Held while a stage runs in its staging folder: a second process running the same stage waits,
        and `gc` leaves the folder alone. The lock file goes once the folder is gone (published)."""
        folder = self.root / STAGING / f"{name}-{cache_key[:16]}"
        with self.lock(f"{STAGING}/{folder.name}.lock"):
            try:
                yield
            finally:
                if not folder.exists():
                    Path(f"{folder}.lock").unlink(missing_ok=True)

    def check_writable(self) -> None:
        """Raise `StoreWriteError` unless the store can take a new artifact. A root without its owner's
        write permission counts as read-only for everyone, root included (who would write past it)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise self._write_error(err) from None
        for folder in (self.root, self.root / STAGING):
            if folder.is_dir() and (
                not os.access(folder, os.W_OK) or not folder.stat().st_mode & stat.S_IWUSR
            ):
                raise StoreWriteError(
                    f"the store {self.root} is read-only ({folder} is not writable): nothing was written"
                )

    def publish(self, name: str, payload: Path, manifest: dict[str, Any]) -> Artifact:
        """Seal `payload` as the next version of `name`. `payload` is moved, not copied.

        The manifest gets the file digests, name and version, and its seal, and is written into the
        payload, which is then renamed into place under the store lock: no reader ever sees a version
        without its manifest, and two publishers never get the same version. When the store cannot be
        written (`StoreWriteError`), no version appears and the payload stays where it was.
        """
        self.check_writable()
        files = hash_tree(payload)
        try:
            with self.lock():
                taken = [int(p.name[1:]) for p in (self.root / name).glob("v*") if p.name[1:].isdigit()]
                version = max(taken, default=0) + 1
                sealed = {"name": name, "version": version, "ref": f"{name}:v{version}", **manifest}
                sealed.update(files=files, digest=tree_digest(files))
                sealed = json.loads(json.dumps(sealed, default=str))  # sealed as it will be read back
                sealed[SEAL] = seal(sealed)
                try:
                    _write_json(payload / MANIFEST, sealed)
                    (self.root / name).mkdir(parents=True, exist_ok=True)
                    os.rename(payload, self.root / name / f"v{version}")  # atomic; never replaces a version
                except OSError:
                    (payload / MANIFEST).unlink(missing_ok=True)
                    with contextlib.suppress(OSError):
                        (self.root / name).rmdir()  # only when empty: a name this publish created
                    raise
        except OSError as err:
            raise self._write_error(err) from None
        return self._load(name, version)

    def _write_error(self, err: OSError, outcome: str = "nothing was published") -> StoreWriteError:
        where = f" ({err.filename})" if err.filename else ""
        return StoreWriteError(
            f"cannot write to the store {self.root}: {err.strerror or err}{where}; {outcome}"
        )

    # --- leftovers -------------------------------------------------------------------------------

    def leftovers(self) -> list[Leftover]:
        """Staging folders of failed or interrupted runs and stale lock files, with their sizes; those
        whose lock a live process holds are marked `in_use` (a stage is running there)."""
        staging = self.root / STAGING
        if not staging.is_dir():
            return []
        keys = sorted({p.name.removesuffix(".lock") for p in staging.iterdir()})
        out = []
        for key in keys:
            folder, lock = staging / key, staging / f"{key}.lock"
            there = [p if p.exists() or p.is_symlink() else None for p in (folder, lock)]
            out.append(
                Leftover(
                    key=key,
                    folder=there[0],
                    lock=there[1],
                    size=sum(_size(p) for p in there if p is not None),
                    in_use=_locked(lock),
                    checkpoints=(folder / SCRATCH).is_dir(),
                )
            )
        return out

    def remove(self, leftover: Leftover) -> bool:
        """Remove a leftover under its lock; False (nothing removed) when a live process holds it."""
        staging = self.root / STAGING
        lock = staging / f"{leftover.key}.lock"
        try:
            with open(lock, "a") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False
                if not _same_file(handle, lock):
                    return False  # removed and recreated meanwhile: someone else's now
                folder = staging / leftover.key
                if folder.is_symlink() or folder.is_file():
                    folder.unlink()
                elif folder.exists():
                    shutil.rmtree(folder)
                lock.unlink()
        except OSError as err:
            raise self._write_error(err, f"{leftover.key} was not removed") from None
        return True


def _same_file(handle: Any, path: Path) -> bool:
    """Whether the open `handle` is still the file at `path` (not removed or replaced)."""
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


def _locked(lock: Path) -> bool:
    """Whether a live process holds the lock file (flock locks die with their process)."""
    if not lock.is_file():
        return False
    with open(lock, "rb") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def _size(path: Path) -> int:
    """Bytes under `path`, symbolic links not followed."""
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_symlink() or p.is_file())


def _write_json(path: Path, data: Any) -> None:
    with path.open("w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
