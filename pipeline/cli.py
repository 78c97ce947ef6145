"""The `rlhf` command.

Exit status: 0 done, 1 a stage failed or was rejected, 2 bad usage, an invalid workflow file or bad data,
3 waiting for annotations (run again later to continue).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from annotation.server import ArgillaServerError
from common.digests import MANIFEST, ManifestError, read_manifest
from common.outcomes import InputError
from pipeline import tracking, workflow
from pipeline.registry import POLICY_KINDS
from pipeline.runner import Runner, StageFailed, StageResult, check_data
from pipeline.store import Artifact, Corrupt, CorruptManifest, Store, StoreError

EXIT_FAILED, EXIT_USAGE, EXIT_WAITING = 1, 2, 3

console = Console(highlight=False, soft_wrap=True)
errors = Console(stderr=True, highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USAGE
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.handler(args)
    except (workflow.WorkflowError, StoreError, InputError, ArgillaServerError) as err:
        errors.print(f"[red]error[/]: {escape(str(err))}")
        return EXIT_USAGE
    except StageFailed as err:
        errors.print(f"[red]failed[/]: {escape(str(err))}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        errors.print("[yellow]interrupted[/]: nothing half-written was published; run again to resume")
        return 130


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf", description="A staged RLHF pipeline with versioned artifacts."
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    validate = commands.add_parser(
        "validate", help="check a workflow file and the data files it names, without running anything"
    )
    validate.add_argument("file", type=Path)
    _set_option(validate)
    validate.set_defaults(handler=cmd_validate)

    run = commands.add_parser("run", help="run a workflow's stages, skipping those already cached")
    run.add_argument("file", type=Path)
    _set_option(run)
    which = run.add_mutually_exclusive_group()
    which.add_argument("--until", metavar="STAGE", help="run STAGE and the stages it depends on")
    which.add_argument("--only", metavar="STAGE", help="run STAGE alone (its inputs must exist)")
    run.add_argument("--force", action="store_true", help="rerun the selected stages even when cached")
    run.add_argument(
        "--allow-rejected",
        action="store_true",
        help="let stages consume artifacts marked rejected (e.g. a reward model below its gate)",
    )
    run.set_defaults(handler=cmd_run)

    serve = commands.add_parser("serve", help="keep running a workflow, triggered by annotation progress")
    serve.add_argument("file", type=Path)
    _set_option(serve)
    serve.add_argument("--interval", type=float, default=30.0, help="seconds between polls (default 30)")
    serve.add_argument("--allow-rejected", action="store_true", help="as for `run`")
    serve.add_argument(
        "--no-webhooks",
        action="store_true",
        help="poll only; by default Argilla's events (a record completed) wake the service at once",
    )
    serve.set_defaults(handler=cmd_serve)

    artifacts = commands.add_parser("artifacts", help="list, show, trace and verify artifacts")
    verbs = artifacts.add_subparsers(title="verbs", metavar="VERB")
    listing = verbs.add_parser("list", help="every artifact version in the store")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_artifacts_list)
    show = verbs.add_parser("show", help="one artifact's manifest")
    show.add_argument("ref", help="name, name:latest or name:v3")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_artifacts_show)
    lineage = verbs.add_parser("lineage", help="the chain of inputs back to the roots")
    lineage.add_argument("ref")
    lineage.set_defaults(handler=cmd_artifacts_lineage)
    verify = verbs.add_parser(
        "verify",
        help="check the manifest's seal and recompute every digest; exit 1 on any change or a corrupt manifest",
    )
    verify.add_argument("ref")
    verify.set_defaults(handler=cmd_artifacts_verify)
    gc = verbs.add_parser(
        "gc", help="list (or with --yes remove) staging folders of failed runs and stale lock files"
    )
    gc.add_argument("--yes", action="store_true", help="remove them (default: only list them)")
    gc.set_defaults(handler=cmd_artifacts_gc)

    export = commands.add_parser(
        "export", help="write a policy or reward model as one merged Hugging Face model"
    )
    export.add_argument(
        "ref",
        help="a policy or reward-model artifact (name:vN, name:latest) or a model/adapter directory "
        "(a path: with a '/', or starting with '.' or '~')",
    )
    export.add_argument("--merged", required=True, type=Path, metavar="DIR", help="new directory to write")
    export.set_defaults(handler=cmd_export)

    score = commands.add_parser("score", help="score responses to a prompt with a reward model")
    score.add_argument(
        "ref", help="a reward-model artifact (name:vN, name:latest) or directory (./name, /path, ...)"
    )
    score.add_argument("--prompt", required=True, help="the user's message")
    score.add_argument("--response", required=True, action="append", help="a response; repeat for several")
    score.add_argument("--json", action="store_true", help="print the scores as JSON")
    score.set_defaults(handler=cmd_score)

    annotation = commands.add_parser("annotation", help="the embedded Argilla server for local ranking")
    verbs = annotation.add_subparsers(title="verbs", metavar="VERB")
    serve = verbs.add_parser(
        "serve", help="start Argilla (UI, worker, Redis) on 127.0.0.1 and print the logins"
    )
    serve.add_argument(
        "--port",
        type=int,
        help="default: $RLHF_ARGILLA_PORT, else the port it had last time (when free), else 6900 or a free port",
    )
    serve.add_argument("--annotators", type=int, default=3, help="annotator accounts to create (default 3)")
    serve.set_defaults(handler=cmd_annotation_serve)
    verbs.add_parser("stop", help="stop the embedded server").set_defaults(handler=cmd_annotation_stop)
    verbs.add_parser("status", help="is it running, where, and who can log in").set_defaults(
        handler=cmd_annotation_status
    )
    return parser


def _set_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="override a value of the workflow file, validated like the file: stages.STAGE.config.FIELD=VALUE "
        "(nested: stages.annotate.config.simulate.noise=0.2) or stages.STAGE.inputs.SLOT=REFERENCE; VALUE is "
        "read as YAML; repeatable",
    )


# --- commands ---------------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    wf = workflow.load(args.file, overrides=args.overrides)
    for stage in wf.stages.values():
        check_data(stage)
    Runner(wf, Store(), console=console).check(list(wf.stages.values()), full=False)  # artifact references
    given = f" (with --set {', '.join(args.overrides)})" if args.overrides else ""
    console.print(
        f"{escape(str(args.file))}: ok — workflow {wf.name!r}, {len(wf.stages)} stages: {' -> '.join(wf.stages)}{given}"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    wf = workflow.load(args.file, overrides=args.overrides)
    wf.select(until=args.until, only=args.only)  # reject an unknown stage name before any work
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1:
        stage = wf.stages.get(args.only or "")
        if stage is None or not stage.spec.distributed:
            capable = ", ".join(n for n, s in wf.stages.items() if s.spec.distributed) or "none"
            raise workflow.WorkflowError(
                str(args.file),
                None,
                "--only",
                f"a launch with {processes} processes runs one training stage: use --only with one of: {capable}",
            )
    store = Store()
    runner = Runner(wf, store, console=console, force=args.force, allow_rejected=args.allow_rejected)
    console.print(f"workflow [bold]{wf.name}[/] · run {runner.run_id} · store {store.root}")
    server_was_up = _embedded_server() is not None
    try:
        results = runner.run(until=args.until, only=args.only)
    except BaseException:
        if not server_was_up and _embedded_server() is not None:  # a failed run leaves no server behind
            from annotation import server as argilla

            argilla.stop()
            console.print("Argilla: stopped the server this run started")
        raise
    server = _embedded_server()
    waiting = any(r.status == "waiting" for r in results)
    _summary(results)
    if server is not None:
        _annotation_summary(server, keep=waiting or server_was_up)
    return EXIT_WAITING if waiting else 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pipeline.service import Service, run_service

    wf = workflow.load(args.file, overrides=args.overrides)
    service = Service(
        wf,
        Store(),
        console,
        interval=args.interval,
        allow_rejected=args.allow_rejected,
        webhooks=not args.no_webhooks,
    )
    run_service(service)
    return 0


def _summary(results: list[StageResult]) -> None:
    table = Table(title="summary", show_edge=False)
    for column in ("stage", "status", "artifact", "path"):
        table.add_column(column)
    for result in results:
        if not result.artifacts:
            table.add_row(result.stage, result.status, "-", result.message)
        for artifact in result.artifacts.values():
            table.add_row(result.stage, result.status, artifact.ref, _relative(artifact.path))
    console.print(table)
    for result in results:
        for artifact in result.artifacts.values():
            metrics = artifact.manifest.get("metrics", {})
            if artifact.kind == "reward-model" and "accuracy" in metrics:
                bound = artifact.manifest.get("config", {}).get("min_accuracy")
                console.print(
                    f"reward model {artifact.ref}: held-out pairwise accuracy {metrics['accuracy']:.3f}"
                    f" (gate {metrics.get('gate', '?')}, min_accuracy {bound})"
                )
            if artifact.kind == "eval-report" and (artifact.path / "report.md").exists():
                console.print(f"\n[bold]evaluation[/] ({artifact.ref})")
                console.print((artifact.path / "report.md").read_text().strip())
                if (artifact.path / "chart.png").exists():
                    console.print(f"chart: {_relative(artifact.path / 'chart.png')}")
    if tracking.enabled() and any(r.status == "ran" for r in results):
        wandb_dir = Path(os.environ.get("WANDB_DIR", tracking.runs_root() / "wandb")) / "wandb"
        if os.environ.get("WANDB_MODE", "offline") == "offline":
            console.print(
                f"W&B offline runs: {_relative(wandb_dir)}  (upload with: wandb sync {_relative(wandb_dir)}/offline-run-*)"
            )


def _embedded_server() -> Any:
    """The embedded Argilla server's record when it is running (None when not, or when an external
    server is configured, which this command neither starts nor stops)."""
    if os.environ.get("ARGILLA_API_URL"):
        return None
    from annotation import server

    return server.status()


def _annotation_summary(info: Any, keep: bool) -> None:
    """Where to look at the rankings; stops the embedded server when this run started it and nobody
    is left to rank."""
    from annotation import server

    login = info.annotators[0].username if info.annotators else info.owner.username
    credentials = info.home / "credentials.json"
    if keep:
        console.print(
            f"Argilla: {info.url}  (log in as {login}; passwords in {credentials}; stop with: rlhf annotation stop)"
        )
        return
    server.stop()
    console.print(
        f"Argilla: stopped the server this run started. To look at the rankings: rlhf annotation serve, then "
        f"open {info.url} and log in as {login} (passwords in {credentials})"
    )


def cmd_artifacts_list(args: argparse.Namespace) -> int:
    store = Store()
    entries = list(store.entries())
    if args.json:
        print(json.dumps([_brief(store, e) for e in entries], indent=2))
        return 0
    table = Table(show_edge=False)
    for column in ("artifact", "kind", "status", "stage", "created", "digest"):
        table.add_column(column)
    for row in (_brief(store, e) for e in entries):
        table.add_row(
            row["ref"],
            row.get("kind", "?"),
            f"[red]{row['status']}: {'; '.join(row['problems'])}[/]" if "problems" in row else row["status"],
            str(row.get("stage") or "-"),
            str(row.get("created") or ""),
            (row.get("digest") or "")[:12],
        )
    console.print(table if entries else f"no artifacts in {store.root}")
    return 0


def cmd_artifacts_show(args: argparse.Namespace) -> int:
    store = Store()
    artifact = store.get(args.ref)
    if args.json:
        print(json.dumps(artifact.manifest, indent=2))
        return 0
    m = artifact.manifest
    stage = m.get("stage", {})
    console.print(f"[bold]{artifact.ref}[/]  {artifact.kind}  ({m.get('status', 'ok')})  {artifact.path}")
    for problem in store.check_manifest(artifact):
        console.print(f"[red]warning[/]: {problem}")
    if stage:
        console.print(
            f"stage {stage.get('name')} ({stage.get('kind')}) of workflow {stage.get('workflow')}, run {stage.get('run_id')}"
        )
    console.print(
        f"created {m.get('finished_at')} in {m.get('duration_s')} s · digest {artifact.digest} · cache key {m.get('cache_key', '')[:16]}"
    )
    for item in m.get("inputs", []):
        console.print(f"  input {item.get('slot')}: {_input_label(item)}  ({str(item.get('digest'))[:12]})")
    console.print("config: " + json.dumps(m.get("config", {})))
    console.print("metrics: " + json.dumps(m.get("metrics", {})))
    if isinstance(m.get("wandb"), dict):
        console.print(f"W&B run: {m['wandb'].get('path')} ({m['wandb'].get('mode')})")
    console.print(f"{len(m['files'])} files, {sum(f['size'] for f in m['files'].values())} bytes")
    return 0


def cmd_artifacts_lineage(args: argparse.Namespace) -> int:
    store = Store()
    for depth, node in store.lineage(store.get(args.ref)):
        indent = "  " * depth + ("└─ " if depth else "")
        if isinstance(node, Artifact):
            stage = node.manifest.get("stage", {}).get("name", "-")
            console.print(f"{indent}{node.ref}  [dim]{node.kind} · stage {stage} · {node.digest[:12]}[/]")
        else:
            if node.get("corrupt"):
                where = f"corrupt manifest: {node['corrupt']}"
            elif node.get("cycle"):
                where = "cycle: an input of itself (an edited manifest)"
            else:
                where = "missing from store" if node.get("missing") else "external"
            console.print(f"{indent}{_input_label(node)}  [dim]{where} · {str(node.get('digest'))[:12]}[/]")
    return 0


def _input_label(item: dict[str, Any]) -> str:
    """An input as a manifest records it: an artifact reference, a path, or a hub id at its commit."""
    if item.get("hub_id"):
        commit = item.get("commit")
        return f"{item['hub_id']}@{str(commit)[:12]}" if commit else str(item["hub_id"])
    return str(item.get("ref") or item.get("path") or "?")


def cmd_artifacts_verify(args: argparse.Namespace) -> int:
    """Exit 1 when anything changed since publishing, or when the manifest cannot be read at all."""
    store = Store()
    try:
        artifact = store.get(args.ref)
    except CorruptManifest as err:
        errors.print(f"[red]{args.ref} FAILED verification[/]: {err}")
        return EXIT_FAILED
    problems = store.verify(artifact)
    if problems:
        errors.print(f"[red]{artifact.ref} FAILED verification[/]:")
        for problem in problems:
            errors.print(f"  {problem}")
        return EXIT_FAILED
    note = (
        ""
        if artifact.sealed
        else "; no manifest digest recorded (published before manifests were sealed): "
        "edits of its manifest cannot be detected"
    )
    console.print(f"{artifact.ref}: ok ({len(artifact.manifest['files'])} files verified{note})")
    return 0


def cmd_artifacts_gc(args: argparse.Namespace) -> int:
    """Staging folders of failed runs and stale lock files: listed (dry run), or removed with --yes.
    A folder whose lock a live process holds (a stage running there) is never removed."""
    store = Store()
    leftovers = store.leftovers()
    if not leftovers:
        console.print(f"nothing to remove in {store.root}")
        return 0
    if args.yes:
        store.check_writable()
    freed, kept = 0, 0
    for item in leftovers:
        label = ", ".join(_relative(p) for p in item.paths)
        if item.in_use or (args.yes and not store.remove(item)):
            console.print(f"{'kept':<12} {label}  [dim]in use by a running stage[/]")
            kept += 1
            continue
        verb = "removed" if args.yes else "would remove"
        console.print(f"{verb:<12} {label}  {_human(item.size)}  [dim]{item.description}[/]")
        freed += item.size
    done = "freed" if args.yes else "would free"
    hint = "" if args.yes else " (dry run: rlhf artifacts gc --yes removes them)"
    console.print(f"{done} {_human(freed)}; {kept} kept{hint}")
    return 0


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


EXPORTABLE = (*POLICY_KINDS, "reward-model")


def cmd_export(args: argparse.Namespace) -> int:
    from policy.export import export_merged

    source = model_argument(args.ref, EXPORTABLE, "export")
    with console.status(f"merging {args.ref}"):
        export_merged(source, args.merged)
    console.print(f"wrote {args.merged} (a complete model: loads with transformers alone)")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from reward.score import score_responses

    scores = score_responses(model_argument(args.ref, ("reward-model",), "score"), args.prompt, args.response)
    if args.json:
        print(
            json.dumps(
                [{"response": r, "score": s} for r, s in zip(args.response, scores, strict=True)], indent=2
            )
        )
        return 0
    for response, value in zip(args.response, scores, strict=True):
        console.print(f"{value:+.4f}  {response}")
    return 0


def looks_like_path(arg: str) -> bool:
    """The one rule for a command-line argument that may be an artifact or a directory: a path looks like
    one (has a '/', or starts with '.' or '~'); anything else is an artifact reference, even when a folder
    of that name is in the working directory (reach it as ./name)."""
    return "/" in arg or arg.startswith((".", "~"))


def model_argument(arg: str, kinds: tuple[str, ...], command: str) -> Path:
    """The directory an argument names (`looks_like_path`): a path as given, or an artifact's directory.
    An artifact (or a directory that is one, holding a manifest) must be of one of `kinds` and intact."""
    if looks_like_path(arg):
        path = Path(arg).expanduser()
        if not path.is_dir():
            raise InputError(f"{command}: {arg} is not a directory")
        if not (path / MANIFEST).is_file():
            return path
        try:
            manifest = read_manifest(path)
        except ManifestError as err:
            raise InputError(f"{command}: {arg}: {err}") from None
        artifact = Artifact(str(manifest.get("name", path.name)), manifest.get("version", 0), path, manifest)
        store = Store(path.parent.parent)
    else:
        store = Store()
        try:
            artifact = store.get(arg)
        except StoreError as err:
            if isinstance(err, CorruptManifest) or not Path(arg).is_dir():
                raise
            raise StoreError(
                f"{err} (for the folder {arg} in the working directory, write ./{arg})"
            ) from None
    if artifact.kind not in kinds:
        raise InputError(
            f"{command}: {arg} is a {artifact.kind!r} artifact; {command} takes one of: {', '.join(kinds)}"
        )
    problems = store.verify(artifact)
    if problems:
        raise InputError(f"{command}: {arg} failed verification: " + "; ".join(problems[:3]))
    return artifact.path


def cmd_annotation_serve(args: argparse.Namespace) -> int:
    from annotation import server

    server.serve(port=args.port, annotators=args.annotators)
    console.print(f"state: {server.default_home()} · stop with: rlhf annotation stop")
    return 0


def cmd_annotation_stop(args: argparse.Namespace) -> int:
    from annotation import server

    console.print("stopped" if server.stop() else "not running")
    return 0


def cmd_annotation_status(args: argparse.Namespace) -> int:
    from annotation import server

    info = server.status()
    if info is None:
        console.print(f"not running (state: {server.default_home()}); start it with: rlhf annotation serve")
        return EXIT_FAILED
    console.print(f"running at {info.url} · workspace {info.workspace} · state {info.home}")
    console.print("logins: " + ", ".join(login.username for login in (info.owner, *info.annotators)))
    console.print(f"passwords and API keys: {info.home / 'credentials.json'}")
    return 0


def _brief(store: Store, entry: Artifact | Corrupt) -> dict[str, Any]:
    """A row of `rlhf artifacts list`: a corrupt manifest, or one edited since publishing, has the status
    `corrupt` or `edited` and says why in `problems`."""
    row: dict[str, Any] = {"ref": entry.ref, "name": entry.name, "version": entry.version}
    if isinstance(entry, Corrupt):
        return {**row, "status": "corrupt", "problems": [entry.reason], "path": str(entry.path)}
    m = entry.manifest
    if edited := store.check_manifest(entry):
        row.update(problems=edited)
    return {
        **row,
        "kind": entry.kind,
        "status": "edited" if edited else m.get("status", "ok"),
        "stage": m.get("stage", {}).get("name"),
        "path": str(entry.path),
        "digest": entry.digest,
        "created": m.get("finished_at"),
    }


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
