"""Tasks: what makes alignment measurable without people.

A task supplies prompts, split into `train` and `held_out`, and a verdict on a response to one of them:
1.0 for a pass, 0.0 for a fail, or a score in between. One task definition serves

- the simulated annotators (`annotation/simulate.py`) and the demo preference pairs
  (`reward/demo_preferences.py`): they rank candidates by `Task.preference` (the verdict, or a finer
  grading of it) plus noise (`ranks`, `simulated_ranks` here);
- `evaluate` and the end-of-stage checks of SFT, DPO, RLOO and GRPO: the pass rate, greedy and sampled
  (`pass_rate` here, measured on a model by `policy.evaluate.task_pass_rates`);
- RLOO and GRPO with `reward: task`: the verdict is the reward;
- the stages without a `prompts` (or SFT `data`) input: the task's prompts (train split for sample, PPO,
  RLOO and GRPO, held-out split for evaluate) and SFT examples.

Built in: `arithmetic` (the offline demo, `tasks/arithmetic.py`) and `instructions` (verifiable format
constraints for real models, `tasks/instructions.py`). A user's task is a Python reference
`module:function` (importable, e.g. from `PYTHONPATH`): the function is called with the `options` of
the config as keyword arguments and returns a `Task`.

A workflow names its task once, at the top (`task: {name: arithmetic}`); every stage whose config has
a `task` field gets it unless it sets its own. Pure Python (no torch): `policy`, `reward` and
`annotation` import this package, it imports none of them.
"""

from __future__ import annotations

import functools
import importlib
import json
import random
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from common.outcomes import InputError

Split = Literal["train", "held_out"]
SPLITS: tuple[str, ...] = ("train", "held_out")
BUILT_IN = ("arithmetic", "instructions")
"""Names of the built-in tasks."""
_REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class TaskError(InputError):
    """A prompt the task cannot judge (a record without the fields its verdict needs), or a task that
    cannot be built. The message names the task and what was expected."""


class Task:
    """A task: prompts with a train / held-out split and a verdict on responses.

    Subclasses set `name` and `fields` and implement `prompts` and `verdict`; `sft_examples`,
    `preference` and `describe` have defaults. Records are dicts `{"id", "prompt", ...}` that carry the
    fields the verdict needs, so they can travel through samples, annotation batches and preference
    files and be judged anywhere.
    """

    name: str = "task"
    """How the task is named in manifests and messages."""
    fields: tuple[str, ...] = ()
    """Record fields, besides `prompt`, that the verdict needs."""
    max_new_tokens: int = 64
    """Response budget in tokens: enough for a passing response (its stop token included); the default
    length of the responses that stages generate to judge (`evaluate`, end-of-stage checks)."""

    def prompts(self, split: Split) -> list[dict[str, Any]]:
        """The records of a split, in a fixed order: `{"id", "prompt", ...fields}`."""
        raise NotImplementedError

    def verdict(self, record: dict[str, Any], response: str) -> float:
        """1.0 when the response passes, 0.0 when it fails, or a score in [0, 1]."""
        raise NotImplementedError

    def preference(self, record: dict[str, Any], response: str) -> float:
        """How much a simulated annotator likes the response (higher is better; equal values tie): the
        verdict, unless a task grades failures more finely (arithmetic: by distance to the answer)."""
        return self.verdict(record, response)

    def sft_examples(self) -> list[dict[str, Any]]:
        """Train-split examples in TRL's conversational prompt/completion format."""
        raise TaskError(f"task {self.name!r} has no SFT examples; give the sft stage a `data` input")

    def describe(self) -> dict[str, Any]:
        """What identifies the task and its settings, for manifests and generation records."""
        return {"name": self.name}

    def missing(self, record: dict[str, Any]) -> list[str]:
        """The fields the verdict needs that the record lacks (empty when it can be judged)."""
        return [name for name in ("prompt", *self.fields) if record.get(name) is None]

    def judge(self, record: dict[str, Any], response: str, finished: bool = True) -> float:
        """The verdict on a response, 0 for a response cut off before its end (`finished` False). Raises
        `TaskError` when the record lacks the fields the verdict needs."""
        if missing := self.missing(record):
            raise TaskError(
                f"task {self.name!r} cannot judge prompt {record.get('id', '?')!r}: it lacks "
                f"{', '.join(missing)} (prompts for this task must carry them)"
            )
        return self.verdict(record, response) if finished else 0.0


def ranks(task: Task, record: dict[str, Any], candidates: list[str]) -> list[int]:
    """The task's ranks (1 = best): candidates by `Task.preference`, best first; equal values tie. (On the
    arithmetic task: right answers first, then wrong ones by distance to the answer, no answer last.)"""
    keys = [-task.preference(record, text) for text in candidates]
    levels = sorted(set(keys))
    return [levels.index(key) + 1 for key in keys]


def simulated_ranks(
    task: Task, record: dict[str, Any], candidates: list[str], noise: float, rng: random.Random
) -> list[int]:
    """A bot's ranks: the task's with each adjacent pair of rank levels swapped with probability `noise`
    (one pass, best to worst)."""
    truth = ranks(task, record, candidates)
    levels = list(range(1, max(truth) + 1))
    for position in range(len(levels) - 1):
        if rng.random() < noise:
            levels[position], levels[position + 1] = levels[position + 1], levels[position]
    new_rank = {level: position + 1 for position, level in enumerate(levels)}
    return [new_rank[rank] for rank in truth]


def pass_rate(verdicts: list[float]) -> float:
    """The pass rate of a list of verdicts (the mean; a score counts by its value). The one definition of
    `pass_rate_greedy` / `pass_rate_sampled` wherever they are reported: each response judged by
    `Task.judge` (cut-off responses fail), sampled responses averaged per prompt, then over prompts."""
    return sum(verdicts) / len(verdicts) if verdicts else 0.0


class TaskConfig(BaseModel):
    """The task of a stage: where its prompts, SFT examples and verdicts come from (`tasks/`). Set once at
    the top of a workflow (`task:`); a stage's own `task` wins."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    name: str
    """`arithmetic` (the demo: adding two small integers), `instructions` (prompts with verifiable format
    constraints, for real models), or `module:function`: a function of an importable module that takes
    the `options` as keyword arguments and returns a `tasks.Task`."""
    options: dict[str, Any] = {}
    """Keyword arguments of the task, e.g. `{max_operand: 19}` for arithmetic, `{train_prompts: 400}` for
    instructions (see each task's docstring)."""

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name in BUILT_IN:
            return name
        if not _REFERENCE.match(name):
            raise ValueError(
                f"unknown task {name!r}: expected one of {', '.join(BUILT_IN)} or a Python reference "
                "module:function"
            )
        _factory(name)
        return name

    @model_validator(mode="after")
    def _builds(self) -> TaskConfig:
        load(self)  # wrong options are an error of the workflow file, not of a stage halfway through
        return self


def _factory(name: str) -> Any:
    """The function that builds task `name`."""
    if name == "arithmetic":
        from tasks import arithmetic

        return arithmetic.ArithmeticTask
    if name == "instructions":
        from tasks import instructions

        return instructions.InstructionsTask
    module_name, _, function_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any failure to import is the user's module's problem, reported in one line
        raise ValueError(
            f"task {name!r}: cannot import module {module_name!r} ({type(err).__name__}: {err}); "
            "it must be importable, e.g. from PYTHONPATH"
        ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"task {name!r}: module {module_name!r} has no function {function_name!r}")
    return function


def load(config: TaskConfig | dict[str, Any]) -> Task:
    """The task a config names (built once per name and options)."""
    if isinstance(config, dict):
        config = TaskConfig.model_validate(config)
    return _build(config.name, json.dumps(config.options, sort_keys=True))


@functools.cache
def _build(name: str, options: str) -> Task:
    kwargs = json.loads(options)
    try:
        task = _factory(name)(**kwargs)
    except TypeError as err:
        raise ValueError(f"task {name!r}: bad options {kwargs}: {err}") from None
    except TaskError as err:
        raise ValueError(str(err)) from None
    if not isinstance(task, Task):
        raise ValueError(f"task {name!r}: the function returned {type(task).__name__}, not a tasks.Task")
    return task


class UsesTask(BaseModel):
    """The `task` field of every stage config that uses a task (mixed into those configs)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    task: TaskConfig | None = None
    """The task (`tasks/`) whose prompts (or SFT examples) the stage uses when it has no prompts (or data)
    input, and whose verdicts judge responses (pass rates, simulated rankings, `reward: task`); null: none.
    The workflow's top-level `task:` fills it in unless the stage sets its own."""
