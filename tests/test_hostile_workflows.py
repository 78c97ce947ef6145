"""Hostile workflow files: each is refused by `rlhf validate` and by `rlhf run` before anything runs, with
exit 2 and one line naming the file, line and key; no traceback, nothing published, nothing executed."""

from __future__ import annotations

import json
import re
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline import workflow
from pipeline.store import Store
from pipeline.workflow import WorkflowError
from tests.conftest import rlhf

TINY = (
    "{steps: 2, batch_size: 4, seq_len: 32, layers: 1, hidden_size: 32, intermediate_size: 64, heads: 2, "
    "vocab_size: 96, eval_prompts: 4, warmup_steps: 1}"
)
LAUGHS = "\n".join(
    [
        'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]',
        *(
            f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]"
            for prev, name in zip("abcdefgh", "bcdefghi", strict=True)
        ),
        "stages: {pretrain: {}}",
        "",
    ]
)


@dataclass(frozen=True)
class Hostile:
    id: str
    text: str
    where: str
    """What the error line says after `error: `: the file (or --set argument), line and key path."""
    words: str
    args: tuple[str, ...] = ()


def _yaml(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


HOSTILE = [
    # --- references that the artifact store does not have (the store holds sft:v1, prefs:v1, prefs:v2)
    Hostile(
        "artifact version that does not exist",
        _yaml("""
            stages:
              dpo:
                inputs:
                  policy: 'sft:v1'
                  preferences: 'prefs:v99'
            """),
        "wf.yaml:5: stages.dpo.inputs.preferences",
        "prefs has no version v99 (versions: v1, v2)",
    ),
    Hostile(
        "latest of an unknown artifact name",
        _yaml("""
            stages:
              dpo:
                inputs:
                  policy: 'nosuch:latest'
                  preferences: 'prefs:latest'
            """),
        "wf.yaml:4: stages.dpo.inputs.policy",
        "no artifact named 'nosuch'",
    ),
    Hostile(
        "missing artifact of a stage after a training stage",
        _yaml(f"""
            stages:
              pretrain:
                config: {TINY}
              dpo:
                inputs:
                  policy: pretrain
                  preferences: 'prefs:v99'
            """),
        "wf.yaml:7: stages.dpo.inputs.preferences",
        "prefs has no version v99",
    ),
    Hostile(
        "artifact of a kind the input does not take",
        _yaml("""
            stages:
              dpo:
                inputs:
                  policy: 'sft:v1'
                  preferences: 'sft:v1'
            """),
        "wf.yaml:5: stages.dpo.inputs.preferences",
        "sft:v1 is a 'adapter' artifact, expected one of preferences",
    ),
    Hostile(
        "missing artifact in a list of inputs",
        _yaml("""
            stages:
              evaluate:
                inputs:
                  policies:
                    - 'sft:v1'
                    - 'sft:v7'
            """),
        "wf.yaml:6: stages.evaluate.inputs.policies.1",
        "sft has no version v7",
    ),
    Hostile(
        "bad reference syntax",
        "stages:\n  annotate:\n    inputs: {samples: 'samples:v1.5'}\n",
        "wf.yaml:3: stages.annotate.inputs.samples",
        "not an artifact reference",
    ),
    # --- local paths are never taken for hub ids
    Hostile(
        "data file that does not exist",
        _yaml("""
            stages:
              pretrain: {}
              sft:
                inputs:
                  model: pretrain
                  data: data/train.jsonl
            """),
        "wf.yaml:6: stages.sft.inputs.data",
        "'data/train.jsonl': no such file or directory",
    ),
    Hostile(
        "preferences file that looks like a hub id",
        "stages:\n  dpo:\n    inputs: {policy: 'sft:v1', preferences: prefs/train.parquet}\n",
        "wf.yaml:3: stages.dpo.inputs.preferences",
        "'prefs/train.parquet': no such file or directory",
    ),
    Hostile(
        "model directory that does not exist",
        "stages:\n  model:\n    inputs: {source: ./models/tiny}\n",
        "wf.yaml:3: stages.model.inputs.source",
        "'./models/tiny': no such file or directory",
    ),
    # --- wiring between the stages of the file
    Hostile(
        "stage output of the wrong kind",
        _yaml("""
            stages:
              pretrain: {}
              dpo:
                inputs:
                  policy: pretrain
                  preferences: pretrain
            """),
        "wf.yaml:6: stages.dpo.inputs.preferences",
        "stage 'pretrain' produces base-model, expected one of preferences",
    ),
    Hostile(
        "stage taking its own output",
        "stages:\n  pretrain:\n    inputs: {model: pretrain}\n",
        "wf.yaml:3: stages.pretrain.inputs.model",
        "cannot take its own output",
    ),
    # --- YAML
    Hostile("billion laughs", LAUGHS, "wf.yaml:1: ", "YAML aliases expand to more than 10000 values"),
    Hostile(
        "alias to a mapping that contains it",
        "stages:\n  pretrain:\n    config: &loop {steps: *loop}\n",
        "wf.yaml:3: stages.pretrain.config.steps",
        "refers to a mapping or list that contains it",
    ),
    Hostile(
        "python object tag",
        "stages:\n  pretrain:\n    config: !!python/object/apply:os.system ['touch pwned']\n",
        "wf.yaml:3: stages.pretrain.config",
        "unsupported YAML tag !!python/object/apply:os.system",
    ),
    Hostile(
        "python name tag on a value",
        "stages:\n  pretrain:\n    config:\n      steps: !!python/name:os.system ''\n",
        "wf.yaml:4: stages.pretrain.config.steps",
        "unsupported YAML tag !!python/name:os.system",
    ),
    Hostile(
        "custom tag",
        "stages:\n  pretrain:\n    config:\n      lr: !secret 3\n",
        "wf.yaml:4: stages.pretrain.config.lr",
        "unsupported YAML tag !secret",
    ),
    Hostile(
        "binary tag",
        "stages:\n  pretrain:\n    config: {seed: !!binary aGVsbG8=}\n",
        "wf.yaml:3: stages.pretrain.config.seed",
        "unsupported YAML tag !!binary",
    ),
    Hostile(
        "set tag",
        "stages: !!set {pretrain}\n",
        "wf.yaml:1: stages",
        "unsupported YAML tag !!set",
    ),
    Hostile(
        "merge key",
        "base: &base {steps: 3}\nstages:\n  pretrain:\n    config:\n      <<: *base\n",
        "wf.yaml:5: stages.pretrain.config",
        "merge keys (<<) are not supported",
    ),
    Hostile(
        "duplicate key",
        "stages:\n  pretrain:\n    config:\n      steps: 3\n      steps: 4\n",
        "wf.yaml:5: stages.pretrain.config.steps",
        "duplicate key",
    ),
    Hostile(
        "deep nesting",
        "stages: " + "[" * 5000 + "]" * 5000 + "\n",
        "wf.yaml:1: ",
        "nested deeper than 64 levels",
    ),
    Hostile(
        "several documents",
        "stages: {pretrain: {}}\n---\nstages: {pretrain: {}}\n",
        "wf.yaml:2: ",
        "expected a single document in the stream, but found another document",
    ),
    Hostile(
        "control character in a key",
        'stages:\n  pretrain:\n    config:\n      "st\\neps": 3\n',
        "wf.yaml:4: stages.pretrain.config.st\\neps",
        "unknown key",
    ),
    Hostile(
        "console markup in a value",
        'stages:\n  sft:\n    inputs: {model: "[/bold]x"}\n',
        "wf.yaml:3: stages.sft.inputs.model",
        "'[/bold]x' is not a stage of this workflow",
    ),
    # --- config values: no conversions, finite floats
    Hostile(
        "nan learning rate",
        "stages:\n  pretrain:\n    config:\n      lr: .nan\n",
        "wf.yaml:4: stages.pretrain.config.lr",
        "finite number",
    ),
    Hostile(
        "infinite weight decay",
        "stages:\n  pretrain:\n    config: {weight_decay: .inf}\n",
        "wf.yaml:3: stages.pretrain.config.weight_decay",
        "finite number",
    ),
    Hostile(
        "negative infinity in a nested setting",
        "stages:\n  annotate:\n    config:\n      simulate: {annotators: 2, noise: -.inf}\n",
        "wf.yaml:4: stages.annotate.config.simulate.noise",
        "finite number",
    ),
    Hostile(
        "boolean for a number",
        "stages:\n  pretrain:\n    config:\n      steps: true\n",
        "wf.yaml:4: stages.pretrain.config.steps",
        "valid integer (got True)",
    ),
    Hostile(
        "quoted number",
        "stages:\n  pretrain:\n    config:\n      lr: '1e-4'\n",
        "wf.yaml:4: stages.pretrain.config.lr",
        "valid number (got '1e-4')",
    ),
    Hostile(
        "fraction for an integer",
        "stages:\n  pretrain:\n    config: {batch_size: 4.5}\n",
        "wf.yaml:3: stages.pretrain.config.batch_size",
        "valid integer (got 4.5)",
    ),
    Hostile(
        "nan in the defaults",
        "defaults:\n  lr: .nan\nstages:\n  pretrain: {}\n",
        "wf.yaml:2: defaults.lr",
        "finite number",
    ),
    *(
        Hostile(
            f"engine settings: {what}",
            f"stages:\n  sample:\n    inputs: {{policy: 'sft:v1'}}\n    config:\n      {setting}\n",
            f"wf.yaml:5: {where}",
            words,
        )
        for what, setting, where, words in (
            ("an engine that does not exist", "engine: vlm", "stages.sample.config.engine", "'hf' or 'vllm'"),
            ("an unknown vllm key", "vllm: {kv: 1}", "stages.sample.config.vllm.kv", "unknown key"),
            (
                "a number as text",
                "vllm: {kv_cache_gb: '2'}",
                "stages.sample.config.vllm.kv_cache_gb",
                "number",
            ),
            ("vllm settings as a list", "vllm: [1]", "stages.sample.config.vllm", "dictionary"),
            (
                "server options as text",
                "vllm: {extra_args: --x}",
                "stages.sample.config.vllm.extra_args",
                "list",
            ),
        )
    ),
    Hostile(
        "infinity given with --set",
        "stages:\n  pretrain: {}\n",
        "--set stages.pretrain.config.lr=.inf: stages.pretrain.config.lr",
        "finite number",
        ("--set", "stages.pretrain.config.lr=.inf"),
    ),
]


def _publish(store: Store, folder: Path, name: str, kind: str) -> None:
    payload = folder / f"payload-{name}"
    payload.mkdir(parents=True)
    (payload / "data.json").write_text(json.dumps({"name": name}))
    store.publish(name, payload, {"kind": kind, "stage": {"name": name, "kind": kind}, "cache_key": name})


@pytest.fixture
def stocked(workspace) -> Store:
    """The workspace's store with an SFT adapter (`sft:v1`) and two preference sets (`prefs:v1`, `v2`)."""
    store = Store(workspace / "artifacts")
    for name, kind in (("sft", "adapter"), ("prefs", "preferences"), ("prefs", "preferences")):
        _publish(store, workspace / "made", name, kind)
    return store


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


@pytest.mark.parametrize("case", HOSTILE, ids=[case.id for case in HOSTILE])
def test_hostile_workflow_is_refused_before_anything_runs(case: Hostile, stocked: Store, workspace: Path):
    (workspace / "wf.yaml").write_text(case.text)
    before = _snapshot(stocked.root)
    for command in ("validate", "run"):
        result = rlhf(command, "wf.yaml", *case.args, cwd=workspace, timeout=120)
        output = result.stdout + result.stderr
        assert result.returncode == 2, output
        assert "Traceback" not in output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"error: {case.where}"), lines[0]
        assert re.match(r"error: (wf\.yaml:\d+|--set \S+): ", lines[0]), lines[0]
        assert case.words in lines[0], lines[0]
    assert _snapshot(stocked.root) == before  # nothing published, nothing staged
    assert not (workspace / "runs").exists()  # no stage started a W&B run
    assert not (workspace / "pwned").exists()


def test_references_that_the_store_has_validate(stocked: Store, workspace: Path):
    (workspace / "wf.yaml").write_text(
        _yaml("""
            stages:
              dpo:
                inputs: {policy: 'sft:v1', preferences: 'prefs:latest'}
              evaluate:
                inputs: {policies: [dpo, 'sft:v1']}
            """)
    )
    result = rlhf("validate", "wf.yaml", cwd=workspace)
    assert result.returncode == 0, result.stderr
    assert "ok — workflow 'wf', 2 stages: dpo -> evaluate" in result.stdout


def test_run_checks_the_inputs_of_the_stages_it_runs(stocked: Store, workspace: Path):
    """With --only, a bad reference of a stage that does not run is not in the way, and the stage that
    runs must find the artifacts of the stages it takes inputs from, before anything starts."""
    (workspace / "wf.yaml").write_text(
        _yaml(f"""
            stages:
              pretrain:
                config: {TINY}
              more:
                kind: pretrain
                inputs: {{model: pretrain}}
              dpo:
                inputs: {{policy: more, preferences: 'prefs:v99'}}
            """)
    )
    before = _snapshot(stocked.root)
    result = rlhf("run", "wf.yaml", "--only", "more", cwd=workspace)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    assert "stage pretrain has no artifact for its current config" in result.stderr
    assert "prefs:v99" not in result.stderr
    result = rlhf("run", "wf.yaml", "--until", "dpo", cwd=workspace)
    assert result.returncode == 2 and "wf.yaml:8: stages.dpo.inputs.preferences" in result.stderr
    assert _snapshot(stocked.root) == before


def test_billion_laughs_fails_fast():
    started = time.perf_counter()
    with pytest.raises(WorkflowError, match="YAML aliases expand to more than"):
        workflow.parse(LAUGHS, "wf.yaml")
    assert time.perf_counter() - started < 1.0


def test_aliases_within_the_bound_are_expanded():
    text = "stages:\n  pretrain:\n    config: &tiny {steps: 2, seed: 1}\n  more:\n    kind: pretrain\n    config: *tiny\n"
    wf = workflow.parse(text, "wf.yaml")
    assert wf.stages["more"].config == wf.stages["pretrain"].config


@pytest.mark.parametrize(
    ("written", "value"), [("1e-4", 1e-4), ("5E-5", 5e-5), ("1.0e-4", 1e-4), ("2e3", 2e3), ("+1.5e+2", 150.0)]
)
def test_scientific_numbers_are_numbers_as_written(written: str, value: float):
    wf = workflow.parse(f"stages:\n  pretrain:\n    config: {{lr: {written}}}\n", "wf.yaml")
    assert wf.stages["pretrain"].config.lr == value
    wf = workflow.parse(
        "stages:\n  pretrain: {}\n", "wf.yaml", overrides=[f"stages.pretrain.config.lr={written}"]
    )
    assert wf.stages["pretrain"].config.lr == value


def test_a_date_like_value_stays_text():
    wf = workflow.parse("description: 2024-01-01\nstages:\n  pretrain: {}\n", "wf.yaml")
    assert wf.description == "2024-01-01"


def test_a_chain_of_5000_stages_is_ordered_without_recursion(tmp_path: Path):
    count = 5000
    stages = [f"  s{i}: {{kind: pretrain, inputs: {{model: s{i - 1}}}}}" for i in range(count - 1, 0, -1)]
    (tmp_path / "chain.yaml").write_text("stages:\n" + "\n".join(stages) + "\n  s0: {kind: pretrain}\n")
    wf = workflow.load(tmp_path / "chain.yaml")
    assert list(wf.stages) == [f"s{i}" for i in range(count)]
    assert len(wf.select(until=f"s{count - 1}")) == count
    result = rlhf("validate", "chain.yaml", cwd=tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
