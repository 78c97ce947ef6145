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
the manifest and the cache key.

A variant of another workflow names it with `extends: other.yaml` (a path relative to this file): it
starts from that workflow's description, W&B settings, task and stages; a stage it defines replaces the
one of the same name, or adds one (a `task:` of the variant applies to the stages it defines). With the same configs the shared stages have the same cache keys, so running
the variant after the original runs only what it adds or changes.

Every problem is reported as a `WorkflowError` that names the key path and its line (in the file
that has it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline import registry
from tasks import TaskConfig

ARTIFACT_REF = re.compile(r"^(?P<name>[A-Za-z0-9_][A-Za-z0-9_.-]*):(?P<version>v[0-9]+|latest)$")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
STAGE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
STAGE_KEYS = {"kind", "inputs", "config", "artifact"}
TOP_KEYS = {"name", "description", "extends", "stages", "wandb", "task"}
WANDB_KEYS = {"project", "entity", "tags"}


class WorkflowError(Exception):
    """A problem with a workflow file, located by key path and line."""

    def __init__(self, file: str, line: int | None, key: str, message: str):
        self.file, self.line, self.key, self.message = file, line, key, message
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


@dataclass(frozen=True)
class InputRef:
    """Where a stage input comes from: exactly one of `stage`, `artifact`, `path`, `hub_id` is set."""

    raw: str
    stage: str | None = None
    artifact: str | None = None
    path: Path | None = None
    hub_id: str | None = None


@dataclass
class Stage:
    name: str
    kind: str
    config: BaseModel
    inputs: dict[str, InputRef]
    artifact: str
    line: int | None = None

    @property
    def spec(self) -> registry.StageKind:
        return registry.STAGES[self.kind]

    def upstream(self) -> list[str]:
        return [ref.stage for ref in self.inputs.values() if ref.stage]


@dataclass
class Workflow:
    name: str
    file: Path
    stages: dict[str, Stage]  # in execution order
    description: str = ""
    wandb: dict[str, Any] = field(default_factory=dict)
    task: dict[str, Any] | None = None
    """The top-level `task:`, validated (`tasks.TaskConfig` as a dict), filled into the stages' configs."""

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


def _construct(node: yaml.Node, path: Path_, lines: dict[Path_, int], file: str) -> Any:
    """Turn a composed YAML node into plain Python, recording the line of every key."""
    lines.setdefault(path, node.start_mark.line + 1)
    scalar = yaml.SafeLoader("").construct_object
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = scalar(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, (str, int, float, bool)):
                raise WorkflowError(
                    file, key_node.start_mark.line + 1, _dotted(path), "mapping keys must be plain scalars"
                )
            if key in out:
                raise WorkflowError(
                    file, key_node.start_mark.line + 1, _dotted((*path, key)), "duplicate key"
                )
            lines[(*path, key)] = key_node.start_mark.line + 1
            out[key] = _construct(value_node, (*path, key), lines, file)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, (*path, i), lines, file) for i, item in enumerate(node.value)]
    return scalar(node)


def load_yaml(text: str, file: str) -> tuple[Any, dict[Path_, int]]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark else None
        raise WorkflowError(file, line, "", f"invalid YAML: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise WorkflowError(file, None, "", f"invalid YAML: {err}") from None
    lines: dict[Path_, int] = {}
    if node is None:
        return {}, lines
    return _construct(node, (), lines, file), lines


def _dotted(path: Path_) -> str:
    return ".".join(str(p) for p in path)


# --- validation -------------------------------------------------------------------------------


class _Checker:
    def __init__(self, file: str, lines: dict[Path_, int]):
        self.file, self.lines = file, lines

    def line(self, path: Path_) -> int | None:
        """The line of `path`, or of its nearest ancestor that has one."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get(())

    def fail(self, path: Path_, message: str) -> WorkflowError:
        return WorkflowError(self.file, self.line(path), _dotted(path), message)

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
    text: str, file: str = "<workflow>", base_dir: Path | None = None, _extending: tuple[Path, ...] = ()
) -> Workflow:
    """Parse and validate a workflow. Raises `WorkflowError` naming the key path and line."""
    data, lines = load_yaml(text, file)
    check = _Checker(file, lines)
    top = check.mapping(data, (), TOP_KEYS)
    base_dir = base_dir or Path(file).resolve().parent
    base = _base_workflow(check, top, base_dir, _extending) if "extends" in top else None
    if "stages" not in top and base is None:
        raise check.fail(("stages",), "missing: a workflow needs a `stages` mapping")
    raw_stages = check.mapping(top.get("stages"), ("stages",))
    if not raw_stages and base is None:
        raise check.fail(("stages",), "no stages defined")
    name = top.get("name", Path(file).stem)
    if not isinstance(name, str) or not STAGE_NAME.match(name):
        raise check.fail(("name",), "expected a name made of letters, digits, '_', '.', '-'")
    wandb_cfg = {**(base.wandb if base else {}), **check.mapping(top.get("wandb"), ("wandb",), WANDB_KEYS)}
    task = _top_task(check, top, base)

    stages: dict[str, Stage] = dict(base.stages) if base else {}
    names = set(stages) | set(raw_stages)
    for stage_name, raw in raw_stages.items():
        path: Path_ = ("stages", stage_name)
        if not isinstance(stage_name, str) or not STAGE_NAME.match(stage_name):
            raise check.fail(path, "stage names are made of letters, digits, '_', '.', '-'")
        stages[stage_name] = _parse_stage(check, stage_name, raw, path, names, base_dir, task)

    order = _topological_order(check, stages)
    return Workflow(
        name=name,
        file=Path(file),
        stages={n: stages[n] for n in order},
        description=str(top.get("description", base.description if base else "")),
        wandb=wandb_cfg,
        task=task,
    )


def _base_workflow(
    check: _Checker, top: dict[str, Any], base_dir: Path, extending: tuple[Path, ...]
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
    return load(path, _extending=chain)


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


def _with_task(
    raw_config: dict[str, Any], config_class: type[BaseModel], task: dict[str, Any] | None
) -> dict[str, Any]:
    """A stage's config with the workflow's task filled in, when its config has a `task` field and does not
    set one itself."""
    if task is None or "task" not in config_class.model_fields or "task" in raw_config:
        return raw_config
    return {**raw_config, "task": task}


def _parse_stage(
    check: _Checker,
    name: str,
    raw: Any,
    path: Path_,
    names: set[str],
    base_dir: Path,
    task: dict[str, Any] | None = None,
) -> Stage:
    body = check.mapping(raw, path, STAGE_KEYS)
    kind = body.get("kind", name if name in registry.STAGES else None)
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
    try:
        config = spec.config.model_validate(_with_task(raw_config, spec.config, task))
    except ValidationError as err:
        first = err.errors()[0]
        loc = (*path, "config", *first["loc"])
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = f"unknown key (allowed: {', '.join(spec.config.model_fields)})"
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
                inputs[f"{slot_name}.{label}"] = _parse_ref(
                    check, item, slot, item_path, names - {name}, base_dir
                )
            continue
        if not isinstance(value, str):
            raise check.fail(
                slot_path, f"expected a stage name or artifact reference, got {_type_name(value)}"
            )
        inputs[slot_name] = _parse_ref(check, value, slot, slot_path, names - {name}, base_dir)

    artifact = body.get("artifact", name)
    if not isinstance(artifact, str) or not STAGE_NAME.match(artifact):
        raise check.fail((*path, "artifact"), "expected a name made of letters, digits, '_', '.', '-'")
    return Stage(name=name, kind=kind, config=config, inputs=inputs, artifact=artifact, line=check.line(path))


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
    check: _Checker, value: str, slot: registry.Slot, path: Path_, stages: set[str], base_dir: Path
) -> InputRef:
    if value in stages:
        return InputRef(raw=value, stage=value)
    if ARTIFACT_REF.match(value):
        return InputRef(raw=value, artifact=value)
    if not slot.external:
        raise check.fail(
            path,
            f"no stage named {value!r} in this workflow, and not an artifact reference like 'name:v3' or 'name:latest'",
        )
    local = Path(value).expanduser()
    local = local if local.is_absolute() else base_dir / local
    if local.exists():
        return InputRef(raw=value, path=local.resolve())
    if value.startswith((".", "/", "~")) or not HUB_ID.match(value):
        raise check.fail(
            path,
            f"{value!r} is not a stage of this workflow, an artifact reference, an existing path or a hub id",
        )
    return InputRef(raw=value, hub_id=value)


def _topological_order(check: _Checker, stages: dict[str, Stage]) -> list[str]:
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = [*trail[trail.index(name) :], name]
            raise check.fail(("stages", name, "inputs"), f"dependency cycle: {' -> '.join(cycle)}")
        state[name] = "visiting"
        for upstream in stages[name].upstream():
            visit(upstream, [*trail, name])
        state[name] = "done"
        order.append(name)

    for name in stages:
        visit(name, [])
    return order


def load(file: str | Path, _extending: tuple[Path, ...] = ()) -> Workflow:
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
    return parse(text, str(file), base_dir=path.resolve().parent, _extending=_extending)
