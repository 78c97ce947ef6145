"""Workflow files: parse YAML with line numbers, validate against the typed stage configs, order stages.

A workflow file looks like::

    name: demo
    wandb: {project: rlhf-demo}
    stages:
      pretrain:
        config: {steps: 1500}
      sft:
        kind: sft                 # defaults to the stage name when that is a stage kind
        inputs: {model: pretrain} # a stage of this file, an artifact (`sft:v3`, `sft:latest`),
        config: {method: lora}    # or, where the slot allows it, a local path or a hub id

A workflow names its task once, at the top (`task: {name: arithmetic, options: {max_operand: 19}}`, see
`tasks/`): every stage whose config has a `task` field gets it, unless the stage sets its own (`task:
null` turns it off for that stage). It is then part of each such stage's resolved config, so it is in
the manifest and the cache key. `defaults:` does the same for any other setting (`defaults: {precision:
bfloat16}`): each stage whose config has the field gets the value unless it sets its own; a key that no
stage kind has is an error.

A variant of another workflow names it with `extends: other.yaml` (a path relative to this file): it
starts from that workflow's description, W&B settings, task and stages; a stage it defines replaces the
one of the same name, or adds one (a `task:` of the variant applies to the stages it defines). With the
same configs the shared stages have the same cache keys, so running the variant after the original runs
only what it adds or changes.

`--set stages.S.config.F=V` (and `stages.S.inputs.SLOT=REF`) on the command line overrides one value
of the file before it is validated, exactly as if the file said it (a value is read as YAML: `0.2`,
`true`, `null`, `[a, b]`, `{noise: 0.1}`); an inherited stage is overridden in the file that defines it.
A relative path given with `--set` is relative to the current directory.

Every problem is reported as a `WorkflowError` that names the key path and its line (in the file
that has it), or the `--set` argument that gave the value.

A stage that repeats another with a few changes says so with `like: other` (a stage defined before it in
this file, or in the workflow it extends): it gets that stage's kind and config, and its own `config:`
replaces single settings on top (`like: reward` with `config: {seed: 1}`), so a second round of the loop
stays in step with the first. Inputs are never copied.

A workflow file holds plain values only: strings, numbers (`1e-4` is a number, as in YAML 1.2), booleans,
null, mappings and lists. Other YAML tags (`!!python/...`, `!!set`, `!custom`), merge keys, nesting
deeper than `MAX_DEPTH` and aliases that expand to more than `MAX_ALIAS_VALUES` values are errors, so a
hostile file fails at once. Stage configs take values as written (`common.configs.StageConfig` is strict).
Inputs are checked here as far as the file can tell (stages exist and produce a kind the input takes,
local paths exist); artifact references are looked up in the store by `Runner.check` before any stage
runs.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from common.outcomes import InputError
from common.sources import HUB_ID, PACKAGE, package_file
from pipeline import registry
from tasks import TaskConfig

ARTIFACT_REF = re.compile(r"^(?P<name>[A-Za-z0-9_][A-Za-z0-9_.-]*):(?P<version>v[0-9]+|latest)$")
STAGE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
STAGE_KEYS = {"kind", "like", "inputs", "config", "artifact"}
TOP_KEYS = {"name", "description", "extends", "stages", "wandb", "task", "defaults"}
WANDB_KEYS = {"project", "entity", "tags"}


class WorkflowError(Exception):
    """A problem with a workflow file, located by key path and line: one line of text, whatever the file
    holds (a control character in a key or value is shown escaped)."""

    def __init__(self, file: str, line: int | None, key: str, message: str):
        self.file, self.line, self.key, self.message = file, line, key, message
        where = f"{file}:{line}" if line else file
        text = f"{where}: {key}: {message}" if key else f"{where}: {message}"
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in text))


@dataclass(frozen=True)
class Override:
    """One `--set KEY=VALUE`: `path` is KEY split at its dots (`stages`, the stage, `config` or `inputs`, ...)."""

    arg: str
    stage: str
    path: tuple[str, ...]
    value: Any


def parse_override(arg: str) -> Override:
    """`stages.S.config.F=V` or `stages.S.inputs.SLOT=REF`; V is read as a YAML scalar or flow value."""
    usage = "expected stages.STAGE.config.FIELD=VALUE or stages.STAGE.inputs.SLOT=REFERENCE"
    key, sep, text = arg.partition("=")
    match = re.match(r"^stages\.(?P<stage>.+?)\.(?P<section>config|inputs)\.(?P<rest>.+)$", key)
    if not sep or match is None or "" in match.group("rest").split("."):
        raise WorkflowError(f"--set {arg}", None, "", usage)
    try:
        value, _ = load_yaml(text, f"--set {arg}")
    except WorkflowError as err:
        problem = err.message.removeprefix("invalid YAML: ")
        raise WorkflowError(f"--set {arg}", None, key, f"invalid YAML value: {problem}") from None
    stage = match.group("stage")
    path = ("stages", stage, match.group("section"), *match.group("rest").split("."))
    return Override(arg=arg, stage=stage, path=path, value=value)


@dataclass(frozen=True)
class InputRef:
    """Where a stage input comes from: exactly one of `stage`, `artifact`, `path`, `hub_id` is set."""

    raw: str
    stage: str | None = None
    artifact: str | None = None
    path: Path | None = None
    hub_id: str | None = None
    where: tuple[str, int | None, str] = field(default=("<workflow>", None, ""), compare=False)
    """The file (or `--set` argument), line and key path that give this input: errors about it name them."""

    def error(self, message: str) -> WorkflowError:
        return WorkflowError(*self.where, message)


@dataclass
class Stage:
    name: str
    kind: str
    config: BaseModel
    inputs: dict[str, InputRef]
    artifact: str
    line: int | None = None
    overrides: tuple[str, ...] = ()
    """The `--set` arguments that changed this stage's config or inputs."""

    @property
    def spec(self) -> registry.StageKind:
        return registry.STAGES[self.kind]

    def upstream(self) -> list[str]:
        return [ref.stage for ref in self.inputs.values() if ref.stage]

    def outputs(self) -> dict[str, str]:
        """Artifact name -> kind for each output of this stage (a single output is named as the stage's
        `artifact`, several are `artifact.output`)."""
        outputs = self.spec.outputs(self.config)
        return {
            (f"{self.artifact}.{name}" if name else self.artifact): kind for name, kind in outputs.items()
        }


@dataclass
class Workflow:
    name: str
    file: Path
    stages: dict[str, Stage]  # in execution order
    description: str = ""
    wandb: dict[str, Any] = field(default_factory=dict)
    task: dict[str, Any] | None = None
    """The top-level `task:`, validated (`tasks.TaskConfig` as a dict), filled into the stages' configs."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """The top-level `defaults:`, filled into the configs of the stages that have each setting."""

    def select(self, until: str | None = None, only: str | None = None) -> list[Stage]:
        """The stages to run: all, `until` and everything it depends on, or `only` one."""
        for option, name in (("--until", until), ("--only", only)):
            if name is not None and name not in self.stages:
                raise WorkflowError(
                    str(self.file),
                    None,
                    option,
                    f"no stage named {name!r} (stages: {', '.join(self.stages)})",
                )
        if only is not None:
            return [self.stages[only]]
        if until is None:
            return list(self.stages.values())
        needed, todo = set(), [until]
        while todo:
            name = todo.pop()
            if name not in needed:
                needed.add(name)
                todo.extend(self.stages[name].upstream())
        return [s for s in self.stages.values() if s.name in needed]


# --- YAML with line numbers -------------------------------------------------------------------

Path_ = tuple[Any, ...]

MAX_DEPTH = 64
"""Deepest nesting of mappings and lists a workflow file may have (real ones nest a few levels)."""
MAX_ALIAS_VALUES = 10_000
"""Most values that YAML aliases (`*name`) may add by repeating what they point to: a file without
aliases is as large as its text, while a few hundred bytes of nested aliases can expand to billions."""
YAML = "tag:yaml.org,2002:"
PLAIN_TAGS = {YAML + t for t in ("str", "int", "float", "bool", "null")}


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, bounded in nesting (its composer recurses once per level), and reading
    `1e-4` and `1e4` as numbers (YAML 1.2 floats; YAML 1.1 needs `1.0e-4`), as people write them."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.depth >= MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


_Loader.add_implicit_resolver(
    YAML + "float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


class _Builder:
    """Turns a composed YAML node into plain Python, recording the line of every key. Only plain values
    are accepted (strings, numbers, booleans, null, mappings, lists): any other tag (`!!python/...`,
    `!!set`, `!custom`) is an error, and so are aliases that expand too much or nest too deep."""

    def __init__(self, file: str, loader: _Loader):
        self.file = file
        self.lines: dict[Path_, int] = {}
        self.scalar = loader.construct_object
        self.seen: set[int] = set()
        self.inside: set[int] = set()
        """The collections being built, outer to inner: an alias to one of them would never end."""
        self.repeated = 0

    def fail(self, node: yaml.Node, path: Path_, message: str) -> WorkflowError:
        key = _dotted(path) if len(path) <= 8 else _dotted(path[:8]) + "..."
        return WorkflowError(self.file, node.start_mark.line + 1, key, message)

    def build(self, node: yaml.Node, path: Path_) -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if id(node) in self.seen:  # reached again through an alias
            self.repeated += 1
            if self.repeated > MAX_ALIAS_VALUES:
                raise self.fail(node, path, f"YAML aliases expand to more than {MAX_ALIAS_VALUES} values")
        self.seen.add(id(node))
        if id(node) in self.inside:
            raise self.fail(node, path, "a YAML alias refers to a mapping or list that contains it")
        if len(path) > MAX_DEPTH:
            raise self.fail(node, path, f"nested deeper than {MAX_DEPTH} levels (through YAML aliases)")
        if isinstance(node, yaml.CollectionNode):
            self.inside.add(id(node))
            try:
                return self.collection(node, path)
            finally:
                self.inside.discard(id(node))
        if node.tag == YAML + "timestamp":  # `2024-01-01` is the text as written, not a date object
            return node.value
        self.check_tag(node, path, *PLAIN_TAGS)
        return self.scalar(node)

    def collection(self, node: yaml.CollectionNode, path: Path_) -> Any:
        if isinstance(node, yaml.SequenceNode):
            self.check_tag(node, path, YAML + "seq")
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        self.check_tag(node, path, YAML + "map")
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == YAML + "merge":
                raise self.fail(
                    key_node, path, "YAML merge keys (<<) are not supported; use `defaults:` or `extends:`"
                )
            key = self.build(key_node, path) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, (str, int, float, bool)):
                raise WorkflowError(self.file, line, _dotted(path), "mapping keys must be plain scalars")
            if key in out:
                raise WorkflowError(self.file, line, _dotted((*path, key)), "duplicate key")
            self.lines[(*path, key)] = line
            out[key] = self.build(value_node, (*path, key))
        return out

    def check_tag(self, node: yaml.Node, path: Path_, *allowed: str) -> None:
        if node.tag not in allowed:
            tag = node.tag.replace(YAML, "!!", 1)
            raise self.fail(
                node, path, f"unsupported YAML tag {tag}: a workflow holds plain values, mappings and lists"
            )


def load_yaml(text: str, file: str) -> tuple[Any, dict[Path_, int]]:
    """The plain value of a YAML document (None when empty) and the line of every key path in it."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark else None
        problem = ", ".join(part for part in (err.context, err.problem) if part)
        raise WorkflowError(file, line, "", f"invalid YAML: {problem}") from None
    except yaml.YAMLError as err:
        raise WorkflowError(file, None, "", f"invalid YAML: {err}") from None
    finally:
        loader.dispose()
    if node is None:
        return None, {}
    builder = _Builder(file, loader)
    return builder.build(node, ()), builder.lines


def _dotted(path: Path_) -> str:
    return ".".join(str(p) for p in path)


# --- validation -------------------------------------------------------------------------------


class _Checker:
    def __init__(self, file: str, lines: dict[Path_, int], overrides: Sequence[Override] = ()):
        self.file, self.lines = file, lines
        self.overrides = list(overrides)
        """The `--set` values applied to this file: a problem at or below one is reported as theirs."""

    def override_at(self, path: Path_) -> Override | None:
        """The `--set` that gave the value at `path` (or at a key above it)."""
        return next((o for o in reversed(self.overrides) if tuple(path[: len(o.path)]) == o.path), None)

    def line(self, path: Path_) -> int | None:
        """The line of `path`, or of its nearest ancestor that has one."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get(())

    def locate(self, path: Path_) -> tuple[str, int | None, str]:
        """The file and line that give the value at `path` (or the `--set` argument), and its key path."""
        given = self.override_at(path)
        if given is not None:
            return f"--set {given.arg}", None, _dotted(path)
        return self.file, self.line(path), _dotted(path)

    def fail(self, path: Path_, message: str) -> WorkflowError:
        below = [o.arg for o in self.overrides if o.path[: len(path)] == tuple(path)]
        if below and self.override_at(path) is None:
            message += f" (with --set {', '.join(below)})"
        return WorkflowError(*self.locate(path), message)

    def apply(self, stages: dict[str, Any], override: Override) -> None:
        """Set the value of one `--set` in the raw stages of this file (creating mappings on the way)."""
        self.overrides.append(override)
        parent: Path_ = ("stages", override.stage)
        if stages.get(override.stage) is None:
            stages[override.stage] = {}
        node = stages[override.stage]
        for key in override.path[2:-1]:
            if not isinstance(node, dict):
                break
            parent = (*parent, key)
            if node.get(key) is None:
                node[key] = {}
            node = node[key]
        if not isinstance(node, dict):
            raise WorkflowError(
                f"--set {override.arg}",
                None,
                _dotted(parent),
                f"is {_type_name(node)} in {self.file}, not a mapping to set {override.path[-1]!r} in",
            )
        node[override.path[-1]] = override.value

    def mapping(self, value: Any, path: Path_, allowed: set[str] | None = None) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a mapping, got {_type_name(value)}")
        if allowed is not None:
            for key in value:
                if key not in allowed:
                    raise self.fail((*path, key), f"unknown key (allowed: {', '.join(sorted(allowed))})")
        return value


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}.get(
        type(value), type(value).__name__
    )


def parse(
    text: str,
    file: str = "<workflow>",
    base_dir: Path | None = None,
    _extending: tuple[Path, ...] = (),
    overrides: Sequence[str | Override] = (),
) -> Workflow:
    """Parse and validate a workflow, with `overrides` (`--set` arguments) applied. Raises `WorkflowError`
    naming the key path and line (or the `--set` argument)."""
    wanted = [o if isinstance(o, Override) else parse_override(o) for o in overrides]
    data, lines = load_yaml(text, file)
    check = _Checker(file, lines)
    top = check.mapping(data, (), TOP_KEYS)
    base_dir = base_dir or Path(file).resolve().parent
    raw_stages = check.mapping(top.get("stages"), ("stages",))
    inherited = [o for o in wanted if o.stage not in raw_stages]
    base = _base_workflow(check, top, base_dir, _extending, inherited) if "extends" in top else None
    if "stages" not in top and base is None:
        raise check.fail(("stages",), "missing: a workflow needs a `stages` mapping")
    for override in wanted:
        if override.stage in raw_stages:
            check.apply(raw_stages, override)
    if not raw_stages and base is None:
        raise check.fail(("stages",), "no stages defined")
    name = top.get("name", Path(file).stem)
    if not isinstance(name, str) or not STAGE_NAME.match(name):
        raise check.fail(("name",), "expected a name made of letters, digits, '_', '.', '-'")
    wandb_cfg = {**(base.wandb if base else {}), **check.mapping(top.get("wandb"), ("wandb",), WANDB_KEYS)}
    task = _top_task(check, top, base)
    defaults = _top_defaults(check, top, base)

    stages: dict[str, Stage] = dict(base.stages) if base else {}
    names = set(stages) | set(raw_stages)
    for stage_name, raw in raw_stages.items():
        path: Path_ = ("stages", stage_name)
        if not isinstance(stage_name, str) or not STAGE_NAME.match(stage_name):
            raise check.fail(path, "stage names are made of letters, digits, '_', '.', '-'")
        stages[stage_name] = _parse_stage(
            check, stage_name, raw, path, names, base_dir, task, defaults, before=stages
        )

    if not _extending:  # the file named on the command line: every --set must have found its stage
        for override in wanted:
            if override.stage not in stages:
                raise WorkflowError(
                    f"--set {override.arg}",
                    None,
                    f"stages.{override.stage}",
                    f"no stage named {override.stage!r} (stages: {', '.join(stages)})",
                )
    order = _topological_order(check, stages)
    _check_kinds(stages)
    _check_upstream(stages)
    return Workflow(
        name=name,
        file=Path(file),
        stages={n: stages[n] for n in order},
        description=str(top.get("description", base.description if base else "")),
        wandb=wandb_cfg,
        task=task,
        defaults=defaults,
    )


def _base_workflow(
    check: _Checker,
    top: dict[str, Any],
    base_dir: Path,
    extending: tuple[Path, ...],
    overrides: Sequence[Override] = (),
) -> Workflow:
    """The workflow that `extends` names, loaded and validated in its own file."""
    value = top["extends"]
    if not isinstance(value, str) or not value.strip():
        raise check.fail(("extends",), f"expected the path of a workflow file, got {_type_name(value)}")
    path = Path(value).expanduser()
    path = (path if path.is_absolute() else base_dir / path).resolve()
    if not path.is_file():
        raise check.fail(("extends",), f"{value!r}: no such workflow file ({path})")
    chain = (*extending, Path(check.file).resolve())
    if path in chain:
        raise check.fail(
            ("extends",), "a workflow cannot extend itself: " + " -> ".join(p.name for p in (*chain, path))
        )
    return load(path, _extending=chain, overrides=overrides)


def _top_task(check: _Checker, top: dict[str, Any], base: Workflow | None) -> dict[str, Any] | None:
    """The workflow's `task:` (validated), else the one of the workflow it extends, else None."""
    if "task" not in top:
        return base.task if base else None
    if top["task"] is None:
        return None
    raw = check.mapping(top["task"], ("task",))
    try:
        return TaskConfig.model_validate(raw).model_dump(mode="json")
    except ValidationError as err:
        first = err.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = f"unknown key (allowed: {', '.join(TaskConfig.model_fields)})"
        raise check.fail(("task", *first["loc"]), message) from None


def _top_defaults(check: _Checker, top: dict[str, Any], base: Workflow | None) -> dict[str, Any]:
    """The workflow's `defaults:` over those of the workflow it extends; each key must be a setting of
    some stage kind (the task has its own key)."""
    raw = check.mapping(top.get("defaults"), ("defaults",))
    known = {field for spec in registry.STAGES.values() for field in spec.config.model_fields} - {"task"}
    for key in raw:
        if key not in known:
            raise check.fail(
                ("defaults", key),
                "no stage kind has this setting"
                + (" (the task is set with the top-level `task:`)" if key == "task" else ""),
            )
    return {**(base.defaults if base else {}), **raw}


def _filled(
    raw_config: dict[str, Any],
    config_class: type[BaseModel],
    task: dict[str, Any] | None,
    defaults: dict[str, Any],
) -> tuple[dict[str, Any], set[str]]:
    """A stage's config with the workflow's task and defaults filled in where its config has the field and
    does not set it itself, and the names of the fields filled from `defaults`."""
    fields = config_class.model_fields
    filled = {key for key in defaults if key in fields and key not in raw_config}
    config = {**raw_config, **{key: defaults[key] for key in filled}}
    if task is not None and "task" in fields and "task" not in raw_config:
        config["task"] = task
    return config, filled


def _parse_stage(
    check: _Checker,
    name: str,
    raw: Any,
    path: Path_,
    names: set[str],
    base_dir: Path,
    task: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
    before: dict[str, Stage] | None = None,
) -> Stage:
    body = check.mapping(raw, path, STAGE_KEYS)
    liked = _liked(check, body, path, name, before or {})
    kind = body.get("kind", liked.kind if liked else name if name in registry.STAGES else None)
    if kind is None:
        raise check.fail(
            (*path, "kind"),
            f"missing: {name!r} is not a stage kind, so `kind` is required (one of: {', '.join(registry.STAGES)})",
        )
    if kind not in registry.STAGES:
        raise check.fail(
            (*path, "kind"), f"unknown stage kind {kind!r} (one of: {', '.join(registry.STAGES)})"
        )
    spec = registry.STAGES[kind]

    raw_config = check.mapping(body.get("config"), (*path, "config"))
    if liked is not None:
        if kind != liked.kind:
            raise check.fail(
                (*path, "kind"), f"is {kind!r}, but `like: {liked.name}` is a {liked.kind!r} stage"
            )
        raw_config = {**liked.config.model_dump(exclude_unset=True), **raw_config}
    filled_config, from_defaults = _filled(raw_config, spec.config, task, defaults or {})
    try:
        config = spec.config.model_validate(filled_config)
    except ValidationError as err:
        first = err.errors()[0]
        loc = (*path, "config", *first["loc"])
        if first["loc"] and first["loc"][0] in from_defaults:
            loc = ("defaults", *first["loc"])
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            allowed = _fields_at(spec.config, first["loc"][:-1])
            message = f"unknown key (allowed: {', '.join(allowed)})" if allowed else "unknown key"
        elif first["type"] == "missing":
            message = "missing required field"
        elif "input" in first and not isinstance(first["input"], dict):
            message = f"{message} (got {first['input']!r})"
        raise check.fail(loc, message) from None

    raw_inputs = check.mapping(body.get("inputs"), (*path, "inputs"), set(spec.inputs))
    inputs: dict[str, InputRef] = {}
    for slot_name, slot in spec.inputs.items():
        slot_path = (*path, "inputs", slot_name)
        if slot_name not in raw_inputs:
            if slot.required:
                raise check.fail(slot_path, f"missing required input ({slot.doc})")
            continue
        value = raw_inputs[slot_name]
        if slot.many:
            for label, item_path, item in _many(check, value, slot_path):
                folder = Path.cwd() if check.override_at(item_path) else base_dir
                inputs[f"{slot_name}.{label}"] = _parse_ref(check, item, slot, item_path, names, name, folder)
            continue
        if not isinstance(value, str):
            raise check.fail(
                slot_path, f"expected a stage name or artifact reference, got {_type_name(value)}"
            )
        folder = Path.cwd() if check.override_at(slot_path) else base_dir
        inputs[slot_name] = _parse_ref(check, value, slot, slot_path, names, name, folder)

    artifact = body.get("artifact", name)
    if not isinstance(artifact, str) or not STAGE_NAME.match(artifact):
        raise check.fail((*path, "artifact"), "expected a name made of letters, digits, '_', '.', '-'")
    overridden = tuple(o.arg for o in check.overrides if o.stage == name)
    return Stage(
        name=name,
        kind=kind,
        config=config,
        inputs=inputs,
        artifact=artifact,
        line=check.line(path),
        overrides=overridden,
    )


def _liked(
    check: _Checker, body: dict[str, Any], path: Path_, name: str, before: dict[str, Stage]
) -> Stage | None:
    """The stage named by `like:`, which must come before this one (or from the extended workflow)."""
    if "like" not in body:
        return None
    liked = body["like"]
    if not isinstance(liked, str) or liked not in before or liked == name:
        known = ", ".join(n for n in before if n != name) or "none"
        raise check.fail(
            (*path, "like"),
            f"expected the name of a stage defined before this one (defined before it: {known}), got {liked!r}",
        )
    return before[liked]


def _fields_at(config: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the (nested) config model at `loc`; empty when it is not one."""
    model: Any = config
    for key in loc:
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            return []
        options = typing.get_args(field.annotation) or (field.annotation,)
        model = next((t for t in options if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


def _many(check: _Checker, value: Any, path: Path_) -> list[tuple[str, Path_, str]]:
    """A slot that takes several inputs: a list (labelled by the references themselves) or a
    mapping label -> reference. Returns (label, key path, reference) triples."""
    if isinstance(value, list):
        items = [(str(v), (*path, i), v) for i, v in enumerate(value)]
    elif isinstance(value, dict):
        items = [(str(k), (*path, k), v) for k, v in value.items()]
    else:
        raise check.fail(
            path,
            f"expected a list or a mapping of stage names or artifact references, got {_type_name(value)}",
        )
    if not items:
        raise check.fail(path, "expected at least one input")
    labels = set()
    for label, item_path, item in items:
        if not isinstance(item, str):
            raise check.fail(
                item_path, f"expected a stage name or artifact reference, got {_type_name(item)}"
            )
        if label in labels:
            raise check.fail(item_path, f"{label!r} is given twice")
        labels.add(label)
    return items


def _parse_ref(
    check: _Checker,
    value: str,
    slot: registry.Slot,
    path: Path_,
    stages: set[str],
    own: str,
    base_dir: Path,
) -> InputRef:
    """What an input names: a stage of this workflow (`stages`, other than the stage itself, `own`), an
    artifact reference, or (where the slot takes one) a file in a package, an existing local path or a
    hub id. A value that looks like a path is never taken for a hub id: `data/x.jsonl` must exist."""
    where = check.locate(path)
    if value == own:
        raise check.fail(path, f"stage {own!r} cannot take its own output as an input")
    if value in stages:
        return InputRef(raw=value, stage=value, where=where)
    if ARTIFACT_REF.match(value):
        return InputRef(raw=value, artifact=value, where=where)
    if not slot.external:
        looks = " (it looks like a path: this input takes no local files)" if _path_like(value) else ""
        raise check.fail(
            path,
            f"no stage named {value!r} in this workflow, and not an artifact reference like 'name:v3' or "
            f"'name:latest'{looks}",
        )
    if value.startswith(PACKAGE):
        try:
            return InputRef(raw=value, path=package_file(value), where=where)
        except InputError as err:
            raise check.fail(path, str(err)) from None
    local = Path(value).expanduser()
    local = local if local.is_absolute() else base_dir / local
    if local.exists():
        return InputRef(raw=value, path=local.resolve(), where=where)
    if _path_like(value):
        raise check.fail(path, f"{value!r}: no such file or directory ({local})")
    if not HUB_ID.match(value):
        raise check.fail(
            path,
            f"{value!r} is not a stage of this workflow, an artifact reference, an existing path, "
            "a hub id (org/name or org/name@revision) or package:<python package>/<file>",
        )
    return InputRef(raw=value, hub_id=value, where=where)


FILE_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt", ".yaml", ".yml", ".gguf"}
FILE_SUFFIXES |= {".safetensors", ".bin", ".pt", ".arrow", ".gz", ".zip", ".tar"}
"""Endings that make a value with a `/` a file name rather than a hub id (`org/name`)."""


def _path_like(value: str) -> bool:
    """Written as a local path: starts with `.`, `/` or `~`, or has a path separator and a file ending."""
    if value.startswith((".", "/", "~")) or "\\" in value:
        return True
    name = value.split("@", 1)[0]
    return "/" in name and Path(name).suffix.lower() in FILE_SUFFIXES


def _topological_order(check: _Checker, stages: dict[str, Stage]) -> list[str]:
    """Stage names, each after the stages it takes inputs from (otherwise in file order). Depth first
    with an explicit stack, so that a chain of thousands of stages needs no recursion."""
    order: list[str] = []
    state: dict[str, str] = {}
    for root in stages:
        if root in state:
            continue
        state[root] = "visiting"
        trail = [(root, iter(stages[root].upstream()))]
        while trail:
            name, pending = trail[-1]
            upstream = next(pending, None)
            if upstream is None:
                trail.pop()
                state[name] = "done"
                order.append(name)
            elif state.get(upstream) == "visiting":
                names = [n for n, _ in trail]
                cycle = [*names[names.index(upstream) :], upstream]
                raise check.fail(("stages", upstream, "inputs"), f"dependency cycle: {' -> '.join(cycle)}")
            elif upstream not in state:
                state[upstream] = "visiting"
                trail.append((upstream, iter(stages[upstream].upstream())))
    return order


def _check_kinds(stages: dict[str, Stage]) -> None:
    """Each input taken from a stage of this workflow gets an artifact kind its slot accepts (known from
    the stages' configs), so a wrong wiring is refused before anything runs."""
    for stage in stages.values():
        for slot_name, ref in stage.inputs.items():
            if ref.stage is None:
                continue
            slot = stage.spec.inputs[slot_name.split(".", 1)[0]]
            produced = set(stages[ref.stage].outputs().values())
            if not produced & set(slot.kinds):
                raise ref.error(
                    f"stage {ref.stage!r} produces {', '.join(sorted(produced))}, "
                    f"expected one of {', '.join(slot.kinds)}"
                )


def _check_upstream(stages: dict[str, Stage]) -> None:
    """Each stage whose kind checks its config against the stages it reads from (`StageKind.check_upstream`)
    is checked here; the error names the input that wires them."""
    for stage in stages.values():
        if stage.spec.check_upstream is None:
            continue
        wired = {slot: ref for slot, ref in stage.inputs.items() if ref.stage}
        try:
            stage.spec.check_upstream(stage.config, {slot: stages[ref.stage] for slot, ref in wired.items()})  # type: ignore[index]
        except ValueError as err:
            ref = next(iter(wired.values()))
            raise ref.error(f"stage {stage.name!r} reads stage {ref.stage!r}: {err}") from None


def load(
    file: str | Path, _extending: tuple[Path, ...] = (), overrides: Sequence[str | Override] = ()
) -> Workflow:
    """Load and validate a workflow file, with `overrides` (`--set` arguments) applied."""
    path = Path(file)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise WorkflowError(str(file), None, "", "no such file") from None
    except IsADirectoryError:
        raise WorkflowError(str(file), None, "", "is a directory, expected a YAML workflow file") from None
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise WorkflowError(str(file), line, "", "not UTF-8 text, expected a YAML workflow file") from None
    except PermissionError:
        raise WorkflowError(str(file), None, "", "cannot be read (permission denied)") from None
    return parse(text, str(file), base_dir=path.resolve().parent, _extending=_extending, overrides=overrides)
