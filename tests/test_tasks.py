"""The tasks (`tasks/`): prompts, splits, verdicts, SFT examples, configs. Pure Python, fast."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from pydantic import ValidationError

import tasks
from tasks import TaskConfig, TaskError, arithmetic, instructions


def test_tasks_import_without_torch():
    code = "import sys, tasks, tasks.arithmetic, tasks.instructions; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --- arithmetic ---


def test_arithmetic_task_is_the_demo_task():
    task = tasks.load({"name": "arithmetic"})
    assert task.prompts("train") == arithmetic.train_prompts()
    assert task.prompts("held_out") == arithmetic.held_out_prompts()
    assert task.sft_examples() == arithmetic.sft_examples()
    small = tasks.load({"name": "arithmetic", "options": {"max_operand": 5}})
    assert small.prompts("held_out") == arithmetic.held_out_prompts(5)
    assert small.describe() == {"name": "arithmetic", "max_operand": 5, "split_seed": 0}


def test_arithmetic_verdict_and_preference():
    task = tasks.load({"name": "arithmetic"})
    record = {"id": "x", "prompt": "What is 7 + 12?", "answer": 19}
    assert task.judge(record, "7 + 12 = 19") == 1.0
    assert task.judge(record, "7 + 12 = 19", finished=False) == 0.0  # cut off: fails
    assert task.judge(record, "7 + 12 = 18") == 0.0
    # annotators grade failures: right > off by one > off by ten > no answer; equal distances tie
    grades = [task.preference(record, r) for r in ("19", "7 + 12 = 18", "20", "29", "nineteen")]
    assert grades[0] > grades[1] == grades[2] > grades[3] > grades[4] == 0
    # a prompt that asks a sum is judged without an answer field; one that does not, is an error
    assert task.judge({"prompt": [{"role": "user", "content": "Compute 12 plus 7."}]}, "19") == 1.0
    with pytest.raises(TaskError, match=r"cannot judge prompt 'q'.*answer"):
        task.judge({"id": "q", "prompt": "Tell me a joke."}, "19")


# --- instructions ---


@pytest.fixture(scope="module")
def every_type():
    return tasks.load({"name": "instructions", "options": {"types": list(instructions.CHECKS)}})


def test_instructions_prompts_are_deterministic_and_balanced(every_type):
    again = instructions.InstructionsTask(types=list(instructions.CHECKS))
    assert every_type.prompts("train") == again.prompts("train")
    assert every_type.prompts("held_out") == again.prompts("held_out")
    other = instructions.InstructionsTask(types=list(instructions.CHECKS), seed=1)
    assert other.prompts("train") != every_type.prompts("train")
    train = every_type.prompts("train")
    assert len(train) == 512 and len({r["id"] for r in train}) == 512
    first = [r["constraints"][0]["type"] for r in train[: 3 * len(instructions.CHECKS)]]
    assert all(first.count(kind) == 3 for kind in instructions.CHECKS)  # any first N are balanced
    assert all(r["id"] == instructions.record_id(r["prompt"]) for r in train)


def _parameters(records):
    values = set()
    for record in records:
        for c in record["constraints"]:
            for key in ("word", "phrase"):
                if key in c:
                    values.add((c["type"], c[key]))
            if "keys" in c:
                values.add((c["type"], tuple(c["keys"])))
    return values


def test_instructions_split_is_disjoint_by_topic_and_parameters_but_shares_types(every_type):
    train, held_out = every_type.prompts("train"), every_type.prompts("held_out")
    assert not {r["topic"] for r in train} & {r["topic"] for r in held_out}
    assert not _parameters(train) & _parameters(held_out)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    types = lambda records: {c["type"] for r in records for c in r["constraints"]}  # noqa: E731
    assert types(train) == types(held_out) == set(instructions.CHECKS)


GOOD_AND_BAD = [
    ({"type": "max_words", "n": 5}, "  Bees make honey.\n", "Bees make honey from nectar every day."),
    ({"type": "max_words", "n": 3}, "- One two\n- three", ""),
    ({"type": "include_word", "word": "simple"}, "It is **Simple**, really.", "It is simpler than that."),
    ({"type": "avoid_word", "word": "also"}, "Bees make honey.", "They ALSO make wax."),
    ({"type": "lowercase", "word": None}, "bees make honey, 100%.", "Bees make honey."),
    ({"type": "uppercase"}, "BEES MAKE HONEY 2X.", "BEES make honey."),
    ({"type": "bullets", "n": 2}, "Here:\n- one\n* two", "- one\n- two\n- three"),
    ({"type": "bullets", "n": 3}, "1. one\n2) two\n • three", "one, two, three"),
    (
        {"type": "end_with", "phrase": "Hope this helps."},
        "Bees are busy. hope this helps! ",
        "Hope this helps. Bye.",
    ),
    ({"type": "start_with", "word": "Sure"}, "**Sure!** Bees make honey.", "Surely bees make honey."),
    ({"type": "start_with", "word": "Well"}, '"Well, bees."', "Oh well, bees."),
    (
        {"type": "json_keys", "keys": ["topic", "summary"]},
        '```json\n{"topic": "bees", "summary": "x"}\n```',
        '{"topic": "bees"}',
    ),
    ({"type": "json_keys", "keys": ["a", "b"]}, ' {"a": 1, "b": [2]} ', 'Sure! {"a": 1, "b": 2}'),
    ({"type": "no_commas"}, "Bees make honey and wax.", "Bees make honey, and wax."),
]


@pytest.mark.parametrize(("constraint", "good", "bad"), GOOD_AND_BAD)
def test_instruction_checkers_on_hand_written_responses(constraint, good, bad):
    constraint = {k: v for k, v in constraint.items() if v is not None}
    record = {"id": "r", "prompt": "p", "constraints": [constraint]}
    task = instructions.InstructionsTask()
    assert task.judge(record, good) == 1.0, good
    assert task.judge(record, bad) == 0.0, bad
    assert task.judge(record, good, finished=False) == 0.0


def test_every_constraint_type_has_a_good_and_a_bad_example():
    assert {c["type"] for c, _, _ in GOOD_AND_BAD} == set(instructions.CHECKS)


def test_instructions_verdict_needs_every_constraint_and_preference_counts_them():
    record = {"prompt": "p", "constraints": [{"type": "lowercase"}, {"type": "no_commas"}]}
    task = instructions.InstructionsTask()
    assert task.verdict(record, "bees make honey") == 1.0
    assert task.verdict(record, "bees, honey") == 0.0 and task.preference(record, "bees, honey") == 0.5
    assert task.preference(record, "Bees, honey") == 0.0
    with pytest.raises(TaskError, match="constraints"):
        task.judge({"id": "q", "prompt": "Describe bees."}, "bees")


@pytest.mark.parametrize("per_prompt", [1, 2])
def test_instructions_sft_examples_pass_their_own_verdicts(per_prompt):
    task = instructions.InstructionsTask(types=list(instructions.CHECKS), constraints_per_prompt=per_prompt)
    examples, records = task.sft_examples(), task.prompts("train")
    assert len(examples) == len(records)
    for example, record in zip(examples, records, strict=True):
        assert example["prompt"] == [{"role": "user", "content": record["prompt"]}]
        response = example["completion"][0]["content"]
        assert task.verdict(record, response) == 1.0, (record["prompt"], response)
        assert len(response.split()) <= 45  # short: fits the task's 64-token budget


def test_default_types_are_the_calibrated_ones():
    task = instructions.InstructionsTask()
    assert {c["type"] for r in task.prompts("train") for c in r["constraints"]} == set(
        instructions.DEFAULT_TYPES
    )
    assert task.max_new_tokens == 64


# --- configs ---


def test_task_config_errors_are_one_line_and_name_what_is_wrong():
    with pytest.raises(
        ValidationError, match="unknown task 'nope': expected one of arithmetic, instructions"
    ):
        TaskConfig(name="nope")
    with pytest.raises(ValidationError, match="cannot import module 'no_such_module'"):
        TaskConfig(name="no_such_module:make")
    with pytest.raises(ValidationError, match="has no function 'missing'"):
        TaskConfig(name="tasks.arithmetic:missing")
    with pytest.raises(ValidationError, match=r"bad options.*max_operandd"):
        TaskConfig(name="arithmetic", options={"max_operandd": 3})
    with pytest.raises(ValidationError, match="unknown constraint types"):
        TaskConfig(name="instructions", options={"types": ["rhyme"]})


def test_a_user_task_is_a_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_task.py").write_text(
        textwrap.dedent(
            """
            import tasks

            class Yes(tasks.Task):
                name = "yes"
                fields = ("want",)

                def __init__(self, word="yes"):
                    self.word = word

                def prompts(self, split):
                    return [{"id": f"{split}-1", "prompt": f"Say {self.word}.", "want": self.word}]

                def verdict(self, record, response):
                    return float(response.strip().lower() == record["want"])

            def make(word="yes"):
                return Yes(word)

            def not_a_task():
                return 42
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    task = tasks.load({"name": "my_task:make", "options": {"word": "oui"}})
    record = task.prompts("held_out")[0]
    assert record["prompt"] == "Say oui." and task.judge(record, " Oui ") == 1.0
    with pytest.raises(TaskError, match="no SFT examples"):
        task.sft_examples()
    with pytest.raises(ValidationError, match=r"returned int, not a tasks.Task"):
        TaskConfig(name="my_task:not_a_task")
