"""Content digests: one definition, shared by the artifact store and by whatever checks a model it loads
(an adapter's base). No torch import.

A directory's digest is the hash of its sorted (relative path, sha256) list, the manifest excepted, so an
artifact's digest (its manifest's `digest`) and the digest of a plain directory are the same quantity.
A manifest itself is sealed by a digest of its own content (`seal`), and read back with its shape checked
(`read_manifest`), here too, so that the store and a model loader reading an adapter's base agree.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_tree(root: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under `root` (relative POSIX paths), except the manifest."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != MANIFEST:
            files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return files


def tree_digest(files: dict[str, dict[str, Any]]) -> str:
    """One digest for a payload: the hash of its sorted (path, sha256) list."""
    listing = "\n".join(f"{rel} {meta['sha256']}" for rel, meta in sorted(files.items()))
    return hashlib.sha256(listing.encode()).hexdigest()


def content_digest(path: Path) -> str:
    """The digest of a directory (`tree_digest` of its files) or of one file (its sha256)."""
    return tree_digest(hash_tree(path)) if path.is_dir() else sha256_file(path)


# --- manifests ------------------------------------------------------------------------------------

SEAL = "manifest_seal"
"""The manifest field that seals the rest of it: `{"sha256": ..., "fields": {field: sha256[:16]}}`, written
at publish time, so an edit of any field (status, config, inputs, metrics, cache key, ...) is detected and
named. Manifests published before seals existed have none: they load, and their files are still verified."""

MANIFEST_FIELDS: dict[str, type] = {
    "kind": str,
    "digest": str,
    "files": dict,
    "name": str,
    "version": int,
    "ref": str,
    "stage": dict,
    "status": str,
    "config": dict,
    "cache_key": str,
    "inputs": list,
    "metrics": dict,
    SEAL: dict,
}
"""The fields readers rely on, with their JSON types; the first three are required."""
REQUIRED_FIELDS = ("kind", "digest", "files")


class ManifestError(ValueError):
    """A manifest that cannot be read as one: not JSON, truncated, or with fields of the wrong type."""


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of an artifact folder, checked for the shape readers rely on (`ManifestError` if not)."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except OSError as err:
        raise ManifestError(f"{MANIFEST} cannot be read ({err.strerror or err})") from None
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError: truncated or garbage
        raise ManifestError(f"{MANIFEST} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{MANIFEST} holds {_json_type(manifest)}, expected an object")
    for field in REQUIRED_FIELDS:
        if field not in manifest:
            raise ManifestError(f"{MANIFEST} has no {field!r} field")
    for field, expected in MANIFEST_FIELDS.items():
        value = manifest.get(field)
        if field in manifest and (not isinstance(value, expected) or isinstance(value, bool)):
            raise ManifestError(
                f"{MANIFEST} field {field!r} is {_json_type(value)}, expected {_json_type(expected())}"
            )
    for rel, meta in manifest["files"].items():
        if not (
            isinstance(meta, dict) and isinstance(meta.get("sha256"), str) and type(meta.get("size")) is int
        ):
            raise ManifestError(f"{MANIFEST} files.{rel} is not a {{sha256, size}} record")
    if not all(isinstance(item, dict) for item in manifest.get("inputs", [])):
        raise ManifestError(f"{MANIFEST} field 'inputs' holds something other than input records")
    return manifest


def seal(manifest: dict[str, Any]) -> dict[str, Any]:
    """The seal of a manifest (as JSON would read it back): the sha256 of its content, the seal excepted,
    and a short digest of each field, to name the fields that changed."""
    body = {key: value for key, value in manifest.items() if key != SEAL}
    return {"sha256": _json_digest(body), "fields": {key: _json_digest(v)[:16] for key, v in body.items()}}


def seal_problems(manifest: dict[str, Any]) -> list[str] | None:
    """What changed in a manifest since it was sealed (empty when nothing); None when it has no seal."""
    recorded = manifest.get(SEAL)
    if recorded is None:
        return None
    now = seal(manifest)
    if recorded.get("sha256") == now["sha256"]:
        return []
    before = recorded.get("fields")
    if not isinstance(before, dict):
        return [f"{MANIFEST} was edited after publishing (its seal too)"]
    changed = sorted(k for k in set(before) | set(now["fields"]) if before.get(k) != now["fields"].get(k))
    what = f"fields changed: {', '.join(changed)}" if changed else "its seal was edited"
    return [f"{MANIFEST} was edited after publishing ({what})"]


def _json_digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer"}
    names.update({float: "a number", type(None): "null"})
    return names.get(type(value), type(value).__name__)
