"""W&B tracking: one W&B run per stage run, grouped by workflow run, with artifact lineage.

Offline by default (`WANDB_MODE=offline`, no account needed); `WANDB_MODE=online` uploads and
`WANDB_MODE=disabled` turns tracking off. Every W&B file stays under the project's run directory
(`runs/wandb` unless `RLHF_RUNS` is set). W&B artifacts hold the manifest and a reference to the
payload directory (not a copy), so the same store artifact always has the same W&B digest and the
lineage graph in W&B matches `rlhf artifacts lineage`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pipeline.store import MANIFEST, Artifact

SECRET_KEY = re.compile(
    r"(api[_-]?key|access[_-]?key|private[_-]?key|password|passwd|passphrase|secret|credential|authori[sz]ation"
    r"|^auth$|cookie|^token$|(access|auth|bearer|id|refresh|session|hf|hub|api)[_-]?token$)",
    re.IGNORECASE,
)
"""Keys whose values are secrets. Deliberately not every key with "token" in it (`max_new_tokens`)."""

REDACTED = "<redacted>"

URL_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)[^\s/?#]+@", re.IGNORECASE)
"""The `user:password@` of a URL (`redis://:password@host`, `https://user:token@host`): up to its last `@`,
so a password with a raw `@` in it is hidden whole."""

URL_PARAMETER = re.compile(r"(?P<name>[?&;][^=&#\s]+=)(?P<value>[^&#\s]*)")
"""A query parameter of a URL (`?api_key=...`); its value is hidden when its name is a `SECRET_KEY`."""


def redact(value: Any) -> Any:
    """A copy of `value` with secrets replaced by `<redacted>`, recursively: the value of every mapping entry
    whose key looks like a secret (`SECRET_KEY`), and in every string the credentials of a URL (its
    `user:password@` and secret query parameters). The input is left as it was."""
    if isinstance(value, dict):
        return {k: (REDACTED if SECRET_KEY.search(str(k)) else redact(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [redact(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, str):
        return _redact_urls(value)
    return value


def _redact_urls(text: str) -> str:
    """`text` with the credentials of every URL in it hidden (a URL may sit inside a message or a list)."""
    text = URL_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return URL_PARAMETER.sub(
        lambda m: f"{m['name']}{REDACTED}" if SECRET_KEY.search(m["name"][1:-1]) else m[0], text
    )


def runs_root() -> Path:
    return Path(os.environ.get("RLHF_RUNS", "runs")).resolve()


def configure_environment() -> Path:
    """Keep W&B offline unless the user chose otherwise, with all its files in the run directory."""
    root = runs_root() / "wandb"
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_DIR", str(root))
    os.environ.setdefault("WANDB_DATA_DIR", str(root / "data"))
    os.environ.setdefault("WANDB_CACHE_DIR", str(root / "cache"))
    os.environ.setdefault("WANDB_CONFIG_DIR", str(root / "config"))
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_DISABLE_GIT", "true")
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        Path(os.environ[var]).mkdir(parents=True, exist_ok=True)
    return Path(os.environ["WANDB_DIR"])


def enabled() -> bool:
    return os.environ.get("WANDB_MODE", "offline") != "disabled"


class StageRun:
    """The W&B run of one stage run. A no-op when tracking is disabled."""

    def __init__(
        self,
        project: str,
        entity: str | None,
        group: str,
        stage: str,
        kind: str,
        config: dict[str, Any],
        tags: list[str],
        active: bool = True,
    ):
        self.run = None
        if not active or not enabled():
            return
        import wandb

        configure_environment()
        self.run = wandb.init(
            project=project,
            entity=entity,
            group=group,
            job_type=kind,
            name=stage,
            tags=tags,
            config=redact(config),
            dir=os.environ["WANDB_DIR"],
            settings=wandb.Settings(console="off", save_code=False, x_disable_stats=True),
            reinit="finish_previous",  # makes it `wandb.run`, which stages and HF's W&B callback log to
        )

    @property
    def info(self) -> dict[str, Any] | None:
        """What the manifest records about this run."""
        if self.run is None:
            return None
        return {
            "id": self.run.id,
            "path": "/".join(p for p in (self.run.entity, self.run.project, self.run.id) if p),
            "project": self.run.project,
            "group": self.run.group,
            "mode": os.environ.get("WANDB_MODE", "offline"),
            "dir": str(Path(self.run.dir).parent),
        }

    def use(self, artifact: Artifact) -> None:
        """Declare a store artifact as an input of this run."""
        if self.run is None:
            return
        wandb_artifact = _wandb_artifact(artifact)
        if self.run.offline:
            # `use_artifact` refuses offline runs; this records the same "log, then use" that it
            # performs online for a draft artifact, and `wandb sync` replays it.
            self.run._log_artifact(wandb_artifact, use_after_commit=True)
        else:
            self.run.use_artifact(wandb_artifact)

    def publish(self, artifact: Artifact) -> None:
        if self.run is not None:
            self.run.log_artifact(_wandb_artifact(artifact), aliases=[f"store-v{artifact.version}"])

    def log(self, data: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(data)

    def finish(self, metrics: dict[str, Any] | None = None, failed: bool = False) -> None:
        if self.run is None:
            return
        for key, value in _flatten(redact(metrics or {})).items():
            self.run.summary[key] = value
        self.run.finish(exit_code=1 if failed else 0)
        self.run = None


def _wandb_artifact(artifact: Artifact) -> Any:
    import wandb

    manifest = artifact.manifest
    result = wandb.Artifact(
        name=artifact.name,
        type=artifact.kind,
        metadata={"ref": artifact.ref, "digest": artifact.digest, "cache_key": manifest.get("cache_key")},
    )
    result.add_file(str(artifact.path / MANIFEST), name=MANIFEST)
    result.add_reference(artifact.path.as_uri(), name="payload", checksum=False)
    return result


def _flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}/"))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[name] = value
    return flat
