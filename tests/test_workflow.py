"""Workflow files: every malformed case names the key path and the line, exits 2, prints no traceback."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pipeline import workflow
from pipeline.workflow import WorkflowError
from tests.conftest import REPO, rlhf

GOOD = """\
name: small
stages:
  pretrain:
    config: {steps: 3}
  again:
    kind: pretrain
    inputs: {model: pretrain}
"""

# (case, file text, expected key path, expected line, words the message must contain)
MALFORMED = [
    (
        "unknown key",
        "stages:\n  pretrain:\n    config:\n      steps: 3\n      stepz: 4\n",
        "stages.pretrain.config.stepz",
        5,
        "unknown key",
    ),
    ("unknown stage key", "stages:\n  pretrain:\n    confg: {}\n", "stages.pretrain.confg", 3, "unknown key"),
    ("unknown top-level key", "stagez: {}\nstages:\n  pretrain: {}\n", "stagez", 1, "unknown key"),
    (
        "wrong type",
        "stages:\n  pretrain:\n    config:\n      lr: fast\n",
        "stages.pretrain.config.lr",
        4,
        "valid number",
    ),
    (
        "out of range",
        "stages:\n  pretrain:\n    config:\n      steps: 0\n",
        "stages.pretrain.config.steps",
        4,
        "greater than or equal",
    ),
    ("missing stages", "name: x\n", "stages", 1, "missing"),
    ("missing kind", "stages:\n  warmup:\n    config: {}\n", "stages.warmup.kind", 2, "missing"),
    ("unknown kind", "stages:\n  a:\n    kind: pretrian\n", "stages.a.kind", 3, "unknown stage kind"),
    (
        "missing stage",
        "stages:\n  pretrain: {}\n  b:\n    kind: pretrain\n    inputs: {model: pretrian}\n",
        "stages.b.inputs.model",
        5,
        "pretrian",
    ),
    (
        "bad reference",
        "stages:\n  b:\n    kind: pretrain\n    inputs:\n      model: 'sft:v'\n",
        "stages.b.inputs.model",
        5,
        "not a stage",
    ),
    (
        "cycle",
        "stages:\n  a:\n    kind: pretrain\n    inputs: {model: b}\n  b:\n    kind: pretrain\n    inputs: {model: a}\n",
        "stages.a.inputs",
        4,
        "cycle: a -> b -> a",
    ),
    ("invalid yaml", "stages:\n  a: {kind: pretrain\n  b: 1\n", "", 3, "invalid YAML"),
    ("tab indentation", "stages:\n\tpretrain: {}\n", "", 2, "invalid YAML"),
    ("duplicate key", "stages:\n  pretrain: {}\n  pretrain: {}\n", "stages.pretrain", 3, "duplicate"),
    (
        "not a mapping",
        "stages:\n  pretrain:\n    config: [1, 2]\n",
        "stages.pretrain.config",
        3,
        "expected a mapping",
    ),
    (
        "unknown task",
        "task: {name: adding}\nstages:\n  pretrain: {}\n",
        "task.name",
        1,
        "unknown task 'adding'",
    ),
    (
        "task module that does not import",
        "task:\n  name: no_such_module:make\nstages:\n  pretrain: {}\n",
        "task.name",
        2,
        "cannot import module 'no_such_module'",
    ),
    (
        "bad task options",
        "task:\n  name: arithmetic\n  options: {max_operandd: 3}\nstages:\n  pretrain: {}\n",
        "task",
        1,
        "unexpected keyword argument 'max_operandd'",
    ),
    (
        "unknown task key",
        "task: {name: arithmetic, opts: {}}\nstages:\n  pretrain: {}\n",
        "task.opts",
        1,
        "unknown key",
    ),
    (
        "unknown task of a stage",
        "stages:\n  pretrain:\n    config:\n      task: {name: adding}\n",
        "stages.pretrain.config.task.name",
        4,
        "unknown task 'adding'",
    ),
]


@pytest.mark.parametrize(("case", "text", "key", "line", "words"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_workflow_names_key_and_line(case, text, key, line, words):
    with pytest.raises(WorkflowError) as caught:
        workflow.parse(text, "wf.yaml")
    err = caught.value
    assert (err.key, err.line) == (key, line), str(err)
    assert words in err.message
    assert str(err).startswith(f"wf.yaml:{line}: ")


@pytest.mark.parametrize(
    "case", ["unknown key", "wrong type", "missing stage", "cycle", "invalid yaml", "unknown task"]
)
def test_cli_reports_malformed_workflow_without_traceback(case, tmp_path):
    _, text, key, line, _ = next(m for m in MALFORMED if m[0] == case)
    (tmp_path / "bad.yaml").write_text(text)
    for command in (["validate", "bad.yaml"], ["run", "bad.yaml"]):
        result = rlhf(*command, cwd=tmp_path)
        assert result.returncode == 2
        assert f"bad.yaml:{line}: {key}" in result.stderr
        assert "Traceback" not in result.stderr + result.stdout
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "artifacts").exists()


def test_missing_workflow_file_is_a_usage_error(tmp_path):
    result = rlhf("validate", "nowhere.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "nowhere.yaml: no such file" in result.stderr


def test_binary_file_is_a_usage_error_without_traceback(tmp_path):
    file = tmp_path / "model.bin"
    file.write_bytes(b"name: x\n\x80\xff\x00")
    result = rlhf("validate", str(file), cwd=tmp_path)
    assert result.returncode == 2
    assert f"{file}:2: not UTF-8 text" in result.stderr and "Traceback" not in result.stderr


def test_unknown_stage_for_until(tmp_path):
    (tmp_path / "wf.yaml").write_text(GOOD)
    result = rlhf("run", "wf.yaml", "--until", "sft", cwd=tmp_path)
    assert result.returncode == 2
    assert "no stage named 'sft'" in result.stderr


def test_good_workflow_orders_stages_and_defaults_kind():
    wf = workflow.parse(GOOD, "wf.yaml")
    assert list(wf.stages) == ["pretrain", "again"]
    assert wf.stages["pretrain"].kind == "pretrain"
    assert wf.stages["pretrain"].config.steps == 3
    assert wf.stages["again"].inputs["model"].stage == "pretrain"
    assert [s.name for s in wf.select(until="pretrain")] == ["pretrain"]
    assert [s.name for s in wf.select(only="again")] == ["again"]


def test_stages_are_ordered_by_dependency_not_by_file_order():
    text = "stages:\n  b:\n    kind: pretrain\n    inputs: {model: a}\n  a:\n    kind: pretrain\n"
    assert list(workflow.parse(text, "wf.yaml").stages) == ["a", "b"]


def test_input_references(tmp_path):
    (tmp_path / "model").mkdir()
    text = textwrap.dedent("""\
        stages:
          a: {kind: pretrain, inputs: {model: 'base:v3'}}
          b: {kind: pretrain, inputs: {model: 'base:latest'}}
          c: {kind: pretrain, inputs: {model: ./model}}
          d: {kind: pretrain, inputs: {model: Qwen/Qwen2.5-0.5B}}
        """)
    wf = workflow.parse(text, str(tmp_path / "wf.yaml"))
    refs = {name: stage.inputs["model"] for name, stage in wf.stages.items()}
    assert refs["a"].artifact == "base:v3"
    assert refs["b"].artifact == "base:latest"
    assert refs["c"].path == (tmp_path / "model").resolve()
    assert refs["d"].hub_id == "Qwen/Qwen2.5-0.5B"


def test_a_variant_extends_a_workflow_replacing_and_adding_stages(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "name: base\ndescription: the original\nwandb: {project: p, tags: [a]}\n" + GOOD.split("\n", 1)[1]
    )
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "variant.yaml").write_text(
        textwrap.dedent("""\
            extends: ../base.yaml
            wandb: {tags: [b]}
            stages:
              pretrain:
                config: {steps: 5}
              third:
                kind: pretrain
                inputs: {model: again}
            """)
    )
    base = workflow.load(tmp_path / "base.yaml")
    variant = workflow.load(tmp_path / "more" / "variant.yaml")
    assert variant.name == "variant" and variant.description == "the original"
    assert variant.wandb == {"project": "p", "tags": ["b"]}
    assert list(variant.stages) == ["pretrain", "again", "third"]
    assert variant.stages["pretrain"].config.steps == 5  # replaced
    assert variant.stages["again"].config == base.stages["again"].config  # inherited: the same cache key
    assert variant.stages["third"].inputs["model"].stage == "again"


def test_top_level_task_fills_the_stages_that_take_a_task_and_a_stage_s_own_wins(tmp_path):
    (tmp_path / "wf.yaml").write_text(
        textwrap.dedent("""\
            task: {name: arithmetic, options: {max_operand: 9}}
            stages:
              pretrain: {}
              sft:
                inputs: {model: pretrain}
              sample:
                inputs: {policy: sft}
                config: {task: {name: instructions}}
              evaluate:
                inputs: {policies: [sft]}
                config: {task: null}
            """)
    )
    flow = workflow.load(tmp_path / "wf.yaml")
    arithmetic = {"name": "arithmetic", "options": {"max_operand": 9}}
    assert flow.task == arithmetic
    assert flow.stages["pretrain"].config.task.model_dump() == arithmetic
    assert flow.stages["sft"].config.task.model_dump() == arithmetic
    assert flow.stages["sample"].config.task.model_dump() == {"name": "instructions", "options": {}}
    assert flow.stages["evaluate"].config.task is None  # turned off for this stage
    # in the resolved config, so in the manifest and the cache key
    assert flow.stages["sft"].config.model_dump(mode="json")["task"] == arithmetic
    other = workflow.parse((tmp_path / "wf.yaml").read_text().replace("9", "7"), str(tmp_path / "wf.yaml"))
    assert other.stages["sft"].config != flow.stages["sft"].config
    # a variant inherits the task; a task of its own applies to the stages it defines
    (tmp_path / "variant.yaml").write_text(
        "extends: wf.yaml\ntask: {name: instructions}\nstages:\n  rloo:\n"
        "    inputs: {policy: sft}\n    config: {reward: task}\n"
    )
    variant = workflow.load(tmp_path / "variant.yaml")
    assert variant.stages["rloo"].config.task.name == "instructions"
    assert variant.stages["sft"].config == flow.stages["sft"].config
    assert workflow.load(tmp_path / "variant.yaml").task == {"name": "instructions", "options": {}}


def test_extends_problems_name_the_file_and_line(tmp_path):
    (tmp_path / "a.yaml").write_text("name: a\nextends: missing.yaml\n")
    with pytest.raises(WorkflowError, match=r"a\.yaml:2: extends: 'missing.yaml': no such workflow file"):
        workflow.load(tmp_path / "a.yaml")
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nstages:\n  pretrain: {}\n")
    with pytest.raises(WorkflowError, match=r"cannot extend itself: a\.yaml -> b\.yaml -> a\.yaml"):
        workflow.load(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("stages:\n  pretrain:\n    config: {stepz: 3}\n")
    with pytest.raises(WorkflowError, match=r"b\.yaml:3: stages\.pretrain\.config\.stepz: unknown key"):
        workflow.load(tmp_path / "a.yaml")  # a mistake in the base is reported in the base
    (tmp_path / "b.yaml").write_text(GOOD)
    (tmp_path / "a.yaml").write_text(
        "extends: b.yaml\nstages:\n  more:\n    kind: pretrain\n    inputs: {model: nope}\n"
    )
    with pytest.raises(
        WorkflowError, match=r"a\.yaml:5: stages\.more\.inputs\.model: 'nope' is not a stage of this workflow"
    ):
        workflow.load(tmp_path / "a.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "workflows").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_workflows_validate(path: Path):
    wf = workflow.load(path)
    assert wf.stages


@pytest.mark.parametrize(
    "path", sorted((REPO / "workflows" / "templates").glob("*.yaml")), ids=lambda p: p.name
)
def test_templates_validate_once_their_data_exists(path: Path, tmp_path):
    copy = tmp_path / path.name
    copy.write_text(path.read_text())
    (tmp_path / "data").mkdir()
    for name in ("sft.jsonl", "prompts.jsonl", "eval_prompts.jsonl"):
        (tmp_path / "data" / name).write_text("")
    wf = workflow.load(copy)
    assert {"sft", "annotate", "collect", "reward", "ppo", "evaluate"} <= set(wf.stages)


def test_many_input_slot_takes_a_list_or_a_mapping():
    text = textwrap.dedent("""\
        stages:
          pretrain: {}
          more: {kind: pretrain, inputs: {model: pretrain}}
          evaluate:
            inputs:
              policies: [pretrain, more, 'more:v1']
              reference: pretrain
          labelled:
            kind: evaluate
            inputs:
              policies: {base: pretrain, tuned: more}
        """)
    wf = workflow.parse(text, "wf.yaml")
    assert set(wf.stages["evaluate"].inputs) == {
        "policies.pretrain",
        "policies.more",
        "policies.more:v1",
        "reference",
    }
    assert wf.stages["labelled"].inputs["policies.tuned"].stage == "more"
    assert list(wf.stages).index("labelled") > list(wf.stages).index("more")


@pytest.mark.parametrize(
    ("policies", "line", "key", "words"),
    [
        ("[pretrain, 3]", 4, "stages.evaluate.inputs.policies.1", "got int"),
        ("[pretrain, pretrain]", 4, "stages.evaluate.inputs.policies.1", "given twice"),
        ("[]", 4, "stages.evaluate.inputs.policies", "at least one"),
        ("{a: nowhere}", 4, "stages.evaluate.inputs.policies.a", "nowhere"),
    ],
)
def test_many_input_slot_errors(policies, line, key, words):
    text = f"stages:\n  pretrain: {{}}\n  evaluate:\n    inputs: {{policies: {policies}}}\n"
    with pytest.raises(WorkflowError) as caught:
        workflow.parse(text, "wf.yaml")
    assert (caught.value.key, caught.value.line) == (key, line)
    assert words in caught.value.message
