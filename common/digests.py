"""Content digests: one definition, shared by the artifact store and by whatever checks a model it loads
(an adapter's base). No torch import.

A directory's digest is the hash of its sorted (relative path, sha256) list, the manifest excepted, so an
artifact's digest (its manifest's `digest`) and the digest of a plain directory are the same quantity.
"""

from __future__ import annotations

import hashlib
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
