"""The runner: resolve each stage's inputs, skip it when cached, run it, seal its outputs as artifacts.

First the local data files given to the selected stages are read and checked (`common.data`), then
the inputs that no selected stage produces are resolved (`Runner.check`): a bad data file or an artifact
reference the store does not have is an input error (exit 2) before any stage runs, even when its stage
comes last. Then for every selected stage, in dependency order:
1. resolve inputs to artifacts (verified: manifest seal checked, digests recomputed; a tampered or
   corrupt artifact is refused as bad input, a `StoreError`), local paths (digested) or hub ids
   (pinned to the commit their revision names now);
2. compute the cache key = hash(stage kind, resolved config, input digests);
3. if every output already has an artifact with that key, report it cached (unless --force);
4. otherwise check that the store can be written (a read-only store is refused before any work), run
   the stage in a staging directory kept per cache key (so a crashed run resumes from its
   checkpoints), inside a W&B run, and publish each output atomically with its manifest. A file system
   that refuses a write (full disk) fails the stage with one line; nothing half-written is published.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from rich.console import Console

from annotation.server import ArgillaServerError
from common import data
from common.digests import content_digest, hash_tree, tree_digest
from common.outcomes import InputError, Waiting
from common.sources import PACKAGE, resolve_commit, split_revision
from common.training import SCRATCH
from pipeline import tracking
from pipeline.distributed import Group
from pipeline.store import WRITE_ERRNOS, Artifact, CorruptManifest, Store, StoreError, StoreWriteError
from pipeline.workflow import InputRef, Stage, Workflow

REJECTED = "rejected"
"""A stage returns `{"rejected": "reason", ...}` in its metrics to publish its output marked rejected."""
LIBRARIES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "datasets",
    "tokenizers",
    "wandb",
    "argilla",
    "pydantic",
)


class StageFailed(Exception):
    """A stage could not run or its output was rejected; the message says why."""


@dataclass
class ResolvedInput:
    slot: str
    source: Path | str
    """What the stage function receives: an artifact or local directory/file, or a hub id."""
    digest: str
    record: dict[str, Any]
    """What the manifest records about this input."""
    artifact: Artifact | None = None


@dataclass
class StageResult:
    stage: str
    status: Literal["ran", "unchanged", "cached", "waiting", "rejected"]
    """`unchanged`: an always-run stage (collect) ran and produced exactly its last output again."""
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    seconds: float = 0.0
    message: str = ""


def new_run_id(workflow: Workflow) -> str:
    return f"{workflow.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def cache_key(stage: Stage, inputs: list[ResolvedInput]) -> str:
    record = {
        "kind": stage.kind,
        "config": stage.config.model_dump(mode="json"),
        "inputs": {item.slot: item.digest for item in inputs},
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


class Runner:
    def __init__(
        self,
        workflow: Workflow,
        store: Store,
        console: Console | None = None,
        force: bool = False,
        allow_rejected: bool = False,
    ):
        self.workflow = workflow
        self.store = store
        self.console = console or Console(highlight=False)
        self.force = force
        self.allow_rejected = allow_rejected
        self.group = Group()
        """The processes of a multi-GPU launch (usually just this one); only the main one publishes."""
        if not self.group.main:
            self.console = Console(quiet=True)
        self.run_id = self.group.share(new_run_id(workflow))
        self.done: dict[str, dict[str, Artifact]] = {}
        """Stage name -> its artifacts (by artifact name), for the stages resolved so far."""
        self._verified: set[Path] = set()
        self._commits: dict[str, str] = {}
        """Hub id as written -> the commit it resolved to in this run."""

    def run(self, until: str | None = None, only: str | None = None) -> list[StageResult]:
        """Run the selected stages. Stops at the first waiting stage; raises `StageFailed` on failure."""
        selected = self.workflow.select(until=until, only=only)
        for stage in selected:
            check_data(stage)
        self.check(selected)
        results = []
        for index, stage in enumerate(selected, 1):
            label = f"[{index}/{len(selected)}] {stage.name}"
            result = self.run_stage(stage, label)
            results.append(result)
            if result.status == "waiting":
                break
        self.group.close()
        return results

    # --- one stage ---------------------------------------------------------------------------------

    def run_stage(self, stage: Stage, label: str | None = None) -> StageResult:
        label = label or stage.name
        inputs = self.resolve_inputs(stage)
        key = cache_key(stage, inputs)
        outputs = stage.outputs()

        may_skip = not self.force and not stage.spec.always_run
        cached = self.group.share(self._cached(outputs, key) if may_skip and self.group.main else None)
        if cached:
            self.done[stage.name] = cached
            refs = ", ".join(a.ref for a in cached.values())
            self.console.print(f"{label}  [cyan]cached[/]  {refs}")
            return StageResult(stage.name, "cached", cached)
        if not self.group.main:
            return self._execute(stage, label, inputs, key, outputs)

        try:
            self.store.check_writable()  # before any work: a read-only store is bad input (exit 2)
        except StoreWriteError as err:
            raise StoreWriteError(f"stage {stage.name} cannot run: {err}") from None
        with self.store.staging_lock(stage.artifact, key):  # a second process waits, then finds it cached
            if self.group.size == 1 and may_skip and (cached := self._cached(outputs, key)):
                self.done[stage.name] = cached
                self.console.print(
                    f"{label}  [cyan]cached[/]  {', '.join(a.ref for a in cached.values())} (published meanwhile)"
                )
                return StageResult(stage.name, "cached", cached)
            return self._execute(stage, label, inputs, key, outputs)

    def _cached(self, outputs: dict[str, str], key: str) -> dict[str, Artifact] | None:
        found = {name: self.store.find(name, key) for name in outputs}
        if all(found.values()):
            return found  # type: ignore[return-value]
        return None

    def _execute(
        self, stage: Stage, label: str, inputs: list[ResolvedInput], key: str, outputs: dict[str, str]
    ) -> StageResult:
        out_dir = self.store.staging(stage.artifact, key)
        for leftover in out_dir.iterdir() if self.group.main else ():
            if leftover.name != SCRATCH:  # a crashed attempt's payload is redone; its checkpoints are kept
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        if (out_dir / SCRATCH).exists():
            self.console.print(f"{label}  [yellow]resuming[/] from the checkpoints of an interrupted run")

        config = stage.config.model_dump(mode="json")
        wandb_cfg = self.workflow.wandb
        tracker = tracking.StageRun(
            project=wandb_cfg.get("project", f"rlhf-{self.workflow.name}"),
            entity=wandb_cfg.get("entity"),
            group=self.run_id,
            stage=stage.name,
            kind=stage.kind,
            config={
                "stage": stage.name,
                "kind": stage.kind,
                "workflow": self.workflow.name,
                **config,
                "inputs": {i.slot: i.record for i in inputs},
            },
            tags=list(wandb_cfg.get("tags", [])),
            active=self.group.main,
        )
        for item in inputs:
            if item.artifact is not None:
                tracker.use(item.artifact)

        started = datetime.now(timezone.utc)
        self.console.print(f"{label}  [bold]running[/] ({stage.kind})")
        clock = time.perf_counter()
        self.group.barrier()  # the payload directory is clean before any process writes to it
        try:
            function = stage.spec.load()
            metrics = (
                function(stage_config(stage, self.allow_rejected), stage_inputs(stage, inputs), out_dir) or {}
            )
        except Waiting as waiting:
            seconds = time.perf_counter() - clock
            tracker.finish({"waiting": str(waiting)})
            self.console.print(f"{label}  [yellow]waiting[/]: {waiting}")
            return StageResult(stage.name, "waiting", seconds=seconds, message=str(waiting))
        except OSError as err:
            tracker.finish(failed=True)
            if err.errno not in WRITE_ERRNOS:
                raise
            where = f" ({err.filename})" if err.filename else ""
            raise StageFailed(
                f"{stage.name}: {err.strerror}{where} while writing to the store {self.store.root}; "
                f"nothing was published (its staging folder {out_dir} is redone by the next run)"
            ) from None
        except ArgillaServerError as err:  # lost (or never reached) once the stage started: the stage failed
            tracker.finish(failed=True)
            raise StageFailed(f"{stage.name}: {err}") from None
        except BaseException:
            tracker.finish(failed=True)
            raise
        seconds = time.perf_counter() - clock
        self.group.barrier()  # every process has finished writing
        if not self.group.main:
            self.done[stage.name] = self.group.share({})
            return StageResult(stage.name, "ran", self.done[stage.name], seconds)

        shutil.rmtree(out_dir / SCRATCH, ignore_errors=True)
        rejected = metrics.get(REJECTED)
        manifest = {
            "stage": {
                "name": stage.name,
                "kind": stage.kind,
                "workflow": self.workflow.name,
                "workflow_file": str(self.workflow.file),
                "run_id": self.run_id,
                **({"overrides": list(stage.overrides)} if stage.overrides else {}),
            },
            "status": REJECTED if rejected else "ok",
            **({"status_reason": rejected} if rejected else {}),
            "config": tracking.redact(config),
            "cache_key": key,
            "inputs": [item.record for item in inputs],
            "metrics": tracking.redact(metrics),
            "wandb": tracker.info,
            "versions": library_versions(),
            "code": code_version(),
            "started_at": started.isoformat(timespec="seconds"),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "duration_s": round(seconds, 3),
        }
        published: dict[str, Artifact] = {}
        reused = 0
        for name, kind in outputs.items():
            payload = out_dir if len(outputs) == 1 else out_dir / name.rsplit(".", 1)[-1]
            if not payload.is_dir():
                tracker.finish(failed=True)
                raise StageFailed(f"stage {stage.name} did not write its {kind!r} output to {payload}")
            unchanged = self.store.find(name, key) if stage.spec.always_run else None
            if unchanged is not None and unchanged.digest == tree_digest(hash_tree(payload)):
                published[name] = unchanged  # same inputs, same result: no new version
                reused += 1
                continue
            try:
                published[name] = artifact = self.store.publish(name, payload, {"kind": kind, **manifest})
            except StoreWriteError as err:
                tracker.finish(failed=True)
                raise StageFailed(f"{stage.name}: {err}") from None
            tracker.publish(artifact)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tracker.finish(metrics)
        self.done[stage.name] = self.group.share(published)

        refs = ", ".join(f"{a.ref} → {a.path}" for a in published.values())
        if reused == len(outputs):
            self.console.print(f"{label}  [cyan]unchanged[/] in {_duration(seconds)}  {refs}")
            return StageResult(stage.name, "unchanged", published, seconds)
        if rejected:
            self.console.print(
                f"{label}  [red]rejected[/] in {_duration(seconds)}: {rejected}  ({refs}, marked rejected)"
            )
            raise StageFailed(f"{stage.name}: {rejected}")
        self.console.print(f"{label}  [green]done[/] in {_duration(seconds)}  {refs}{_headline(metrics)}")
        return StageResult(stage.name, "ran", published, seconds)

    # --- inputs ------------------------------------------------------------------------------------

    def check(self, selected: list[Stage], full: bool = True) -> None:
        """Resolve, before any of the `selected` stages runs, each of their inputs that none of them
        produces: an artifact reference (`sft:v3`, `sft:latest`) must name an artifact of a kind its slot
        takes, or it is a `WorkflowError` naming the file, line and key (nothing has run). With `full`
        (`rlhf run`), every such input is resolved as its stage will resolve it (verified, not rejected;
        the artifacts of the stages `--only` skips; hub ids pinned), so a later stage's input cannot fail
        after earlier stages trained; without it (`rlhf validate`) only the references are looked up."""
        produced = {stage.name for stage in selected}
        for stage in selected:
            for slot_name, ref in stage.inputs.items():
                if not full:
                    if ref.artifact is not None:
                        self.artifact(ref, stage.spec.inputs[slot_name.split(".", 1)[0]].kinds)
                elif ref.stage not in produced and ref.path is None:
                    try:
                        self.resolve_input(stage, slot_name, ref)
                    except InputError as err:  # a hub id that names no model
                        raise ref.error(str(err)) from None

    def resolve_inputs(self, stage: Stage) -> list[ResolvedInput]:
        return [self.resolve_input(stage, slot_name, ref) for slot_name, ref in stage.inputs.items()]

    def resolve_input(self, stage: Stage, slot_name: str, ref: InputRef) -> ResolvedInput:
        """One input of `stage`: an upstream stage's artifact, an artifact reference, a local path or a
        hub id, as the stage function receives it and the manifest records it."""
        slot = stage.spec.inputs[slot_name.split(".", 1)[0]]  # "policies.sft" for a many-slot
        where = f"{stage.name}.inputs.{slot_name}"
        if ref.stage is not None:
            candidates = self._artifacts_of(ref.stage)
            matching = [a for a in candidates.values() if a.kind in slot.kinds]
            if not matching:
                kinds = ", ".join(a.kind for a in candidates.values())
                raise StageFailed(
                    f"{where}: stage {ref.stage} produces {kinds}, expected one of {', '.join(slot.kinds)}"
                )
            return self._from_artifact(slot_name, matching[0], slot.kinds, where)
        if ref.artifact is not None:
            return self._from_artifact(slot_name, self.artifact(ref, slot.kinds, where), slot.kinds, where)
        if ref.path is not None:
            if not ref.path.exists():
                raise StageFailed(f"{where}: {ref.path} does not exist")
            digest = content_digest(ref.path)
            record = {"slot": slot_name, "path": str(ref.path), "digest": digest}
            if ref.raw.startswith(PACKAGE):
                record["package"] = ref.raw.removeprefix(PACKAGE)
            return ResolvedInput(slot_name, ref.path, digest, record)
        assert ref.hub_id is not None
        return self._from_hub(slot_name, ref.hub_id)

    def artifact(self, ref: InputRef, kinds: tuple[str, ...], where: str | None = None) -> Artifact:
        """The artifact that a reference (`sft:v3`, `sft:latest`) names, of one of `kinds`; otherwise a
        `WorkflowError` naming the reference's file, line and key. With `where` (the input is about to
        be used), it is verified first: its kind is read from the manifest."""
        assert ref.artifact is not None
        try:
            artifact = self.store.get(ref.artifact)
        except CorruptManifest as err:
            raise StoreError(f"{where or ref.raw}: {err}") from None
        except StoreError as err:
            raise ref.error(str(err)) from None
        if where is not None:
            self._verify(artifact, where)
        if artifact.kind not in kinds:
            raise ref.error(
                f"{artifact.ref} is a {artifact.kind!r} artifact, expected one of {', '.join(kinds)}"
            )
        return artifact

    def _from_hub(self, slot: str, hub_id: str) -> ResolvedInput:
        """A hub id pinned to the commit its revision names now (asked once per run): the stage gets
        `org/name@<commit>`, and the commit is part of the cache key, so a moved branch reruns."""
        if hub_id not in self._commits:
            self._commits[hub_id] = resolve_commit(hub_id)
        repo, revision = split_revision(hub_id)
        commit = self._commits[hub_id]
        pinned = f"{repo}@{commit}"
        record = {
            "slot": slot,
            "hub_id": repo,
            **({"revision": revision} if revision else {}),
            "commit": commit,
            "digest": "hub:" + pinned,
        }
        return ResolvedInput(slot, pinned, record["digest"], record)

    def _verify(self, artifact: Artifact, where: str) -> None:
        """Refuse a tampered or corrupt artifact as bad input, before any work (checked once per run)."""
        if artifact.path not in self._verified:
            problems = self.store.verify(artifact)
            if problems:
                raise StoreError(f"{where}: {artifact.ref} fails verification: {'; '.join(problems[:5])}")
            self._verified.add(artifact.path)

    def _from_artifact(
        self, slot: str, artifact: Artifact, kinds: tuple[str, ...], where: str
    ) -> ResolvedInput:
        """An artifact as an input: verified first (its kind and status are read from the manifest), then
        refused when of another kind or rejected (unless allowed)."""
        self._verify(artifact, where)
        if artifact.kind not in kinds:
            raise StageFailed(
                f"{where}: {artifact.ref} is a {artifact.kind!r} artifact, expected one of {', '.join(kinds)}"
            )
        if artifact.manifest.get("status") == REJECTED and not self.allow_rejected:
            raise StageFailed(
                f"{where}: {artifact.ref} was rejected ({artifact.manifest.get('status_reason')}); "
                "use --allow-rejected to consume it anyway"
            )
        record = {
            "slot": slot,
            "ref": artifact.ref,
            "name": artifact.name,
            "version": artifact.version,
            "kind": artifact.kind,
            "digest": artifact.digest,
            **({"status": REJECTED} if artifact.manifest.get("status") == REJECTED else {}),
        }
        return ResolvedInput(slot, artifact.path, artifact.digest, record, artifact)

    def _artifacts_of(self, stage_name: str) -> dict[str, Artifact]:
        """The artifacts of an upstream stage: run in this invocation, or found by its cache key."""
        if stage_name in self.done:
            return self.done[stage_name]
        stage = self.workflow.stages[stage_name]
        key = cache_key(stage, self.resolve_inputs(stage))
        found = self._cached(stage.outputs(), key)
        if found is None:
            raise StageFailed(
                f"stage {stage_name} has no artifact for its current config and inputs; "
                f"run it first (rlhf run {self.workflow.file} --until {stage_name})"
            )
        self.done[stage_name] = found
        return found


def check_data(stage: Stage) -> None:
    """Read the local data files given to a stage as the stage will (`Slot.data`), so that a bad one is an
    `InputError` in seconds, not after the stages before it have run."""
    for slot_name, ref in stage.inputs.items():
        kind = stage.spec.inputs[slot_name.split(".", 1)[0]].data
        if kind is not None and ref.path is not None:
            data.check(
                kind,
                ref.path,
                f"stages.{stage.name}.inputs.{slot_name}",
                getattr(stage.config, "min_agreement", None),
            )


def stage_config(stage: Stage, allow_rejected: bool) -> Any:
    """The config the stage function runs with: `--allow-rejected` reaches the stages that guard their
    reward model themselves (their `allow_rejected_reward`). The cache key and manifest keep the workflow's
    config; the manifest's input record says the input was rejected."""
    if allow_rejected and "allow_rejected_reward" in type(stage.config).model_fields:
        return stage.config.model_copy(update={"allow_rejected_reward": True})
    return stage.config


def stage_inputs(stage: Stage, inputs: list[ResolvedInput]) -> dict[str, Any]:
    """What the stage function receives: slot -> source, or slot -> {label: source} for a many-slot."""
    out: dict[str, Any] = {}
    for item in inputs:
        slot, _, label = item.slot.partition(".")
        if stage.spec.inputs[slot].many:
            out.setdefault(slot, {})[label] = item.source
        else:
            out[slot] = item.source
    return out


def _duration(seconds: float) -> str:
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m {rest:04.1f}s" if minutes else f"{rest:.1f}s"


def _headline(metrics: dict[str, Any], limit: int = 4) -> str:
    shown = [
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ][:limit]
    return ("  " + " ".join(shown)) if shown else ""


@functools.cache
def library_versions() -> dict[str, str]:
    import platform

    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


@functools.cache
def code_version() -> dict[str, Any]:
    """This project's version and, when run from a git checkout, its commit and whether it is dirty."""
    info: dict[str, Any] = {"package": importlib.metadata.version("rlhf-pipeline")}
    source = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=10
        )
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            status = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=source,
                capture_output=True,
                text=True,
                timeout=10,
            )
            info["git_dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info
