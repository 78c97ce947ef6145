"""Read the records of an offline W&B run (`run-*.wandb`), to check what a stage logged.

wandb 0.31 no longer ships a Python reader, so this decodes the file directly: a 7-byte header
(":W&B", magic, version), then a LevelDB-style log of 32 KiB blocks whose chunks (crc32, length,
type) carry serialized `wandb_internal_pb2.Record` messages.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[pb.Record]:
    data = Path(path).read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", f"{path} is not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        chunk, pos = data[pos : pos + length], pos + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def summarize(path: Path) -> dict:
    """The run's group, job type and name, its artifacts (used and logged) and the keys it logged."""
    out: dict = {"used": [], "logged": [], "history_keys": set(), "summary_keys": set()}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(
                group=record.run.run_group,
                job_type=record.run.job_type,
                name=record.run.display_name,
                config={item.key for item in record.run.config.update},
            )
        elif kind == "artifact":
            entry = (record.artifact.name, record.artifact.type, record.artifact.digest)
            (out["used"] if record.artifact.use_after_commit else out["logged"]).append(entry)
        elif kind == "history":
            out["history_keys"].update(
                item.nested_key[0] if item.nested_key else item.key for item in record.history.item
            )
        elif kind == "summary":
            out["summary_keys"].update(
                item.nested_key[0] if item.nested_key else item.key for item in record.summary.update
            )
    return out


def run_files(wandb_dir: Path) -> list[Path]:
    return sorted(Path(wandb_dir).rglob("offline-run-*/run-*.wandb"))


@contextmanager
def offline_run(directory: Path, project: str) -> Iterator[Any]:
    """A real offline W&B run in this process, opened as the runner opens one, whose file is complete on
    exit. `run.finish()` can return before W&B's service has written the run's last records (its history
    among them: seen about once in a dozen runs on a busy machine), so on exit the run is finished and the
    service is shut down too (`wandb.teardown()` waits for it), as it is when the runner's process exits."""
    import wandb

    run = wandb.init(dir=directory, project=project, mode="offline")
    try:
        yield run
    finally:
        run.finish()
        wandb.teardown()
