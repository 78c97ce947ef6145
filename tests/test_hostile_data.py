"""Hostile data files through `rlhf run` on tiny workflows: each is refused with exit status 2 and one line
on stderr that names the file (and the line, row or byte offset where that applies), with no traceback and
nothing published. A local data file is checked before any stage runs (`pipeline.runner.check_data`); data
that comes as an artifact is checked by the stage, before it loads a model. Both read it with
`common.data`, the one reader of each format, whose accepted edge cases are tested at the end."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from common import data
from common.outcomes import InputError
from pipeline.store import Store
from tests import tiny_policies
from tests.conftest import rlhf

RUN_ENV = {"WANDB_MODE": "disabled"}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> SimpleNamespace:
    """A tiny demo policy and a reward model on the same tokenizer."""
    root = tmp_path_factory.mktemp("models")
    policy = tiny_policies.random_model(root / "policy")
    return SimpleNamespace(policy=policy, reward=tiny_policies.reward_model(root / "reward"))


@pytest.fixture
def store(workspace, models) -> Store:
    """The workspace's store with the tiny reward model published as `rm:v1` (for PPO, RLOO and GRPO)."""
    store = Store(workspace / "artifacts")
    payload = workspace / "rm-payload"
    shutil.copytree(models.reward, payload)
    store.publish("rm", payload, {"kind": "reward-model", "status": "ok", "stage": {"name": "reward"}})
    return store


def stage_entry(kind: str, source: str, models: SimpleNamespace) -> dict:
    """A tiny `kind` stage that reads `source` (a data file or an artifact reference)."""
    policy = str(models.policy)
    rl = {"steps": 1, "batch_size": 2, "num_generations": 2, "max_new_tokens": 4}
    return {
        "sft": {"inputs": {"model": policy, "data": source}, "config": {"steps": 1, "batch_size": 2}},
        "sample": {"inputs": {"policy": policy, "prompts": source}, "config": {"k": 2, "max_new_tokens": 4}},
        "ppo": {
            "inputs": {"policy": policy, "reward": "rm:v1", "prompts": source},
            "config": {"updates": 1, "batch_size": 2, "minibatches": 1, "ppo_epochs": 1, "max_new_tokens": 4},
        },
        "rloo": {"inputs": {"policy": policy, "reward": "rm:v1", "prompts": source}, "config": rl},
        "grpo": {"inputs": {"policy": policy, "reward": "rm:v1", "prompts": source}, "config": rl},
        "evaluate": {
            "inputs": {"policies": {"tiny": policy}, "prompts": source},
            "config": {"samples_per_prompt": 1, "max_new_tokens": 4},
        },
        "reward": {
            "inputs": {"model": policy, "preferences": source},
            "config": {"method": "full", "epochs": 1, "batch_size": 2},
        },
        "dpo": {
            "inputs": {"policy": policy, "preferences": source},
            "config": {"epochs": 1, "batch_size": 2},
        },
    }[kind]


def run_stage(workspace: Path, kind: str, source: str, models: SimpleNamespace, *args: str):
    workflow = {"name": "hostile", "stages": {kind: stage_entry(kind, source, models)}}
    (workspace / "wf.yaml").write_text(yaml.safe_dump(workflow))
    return rlhf("run", "wf.yaml", *args, cwd=workspace, env=RUN_ENV, timeout=300)


def assert_refused(result, names: Path, pattern: str, store: Store, before: list[str]) -> str:
    """Exit 2, one line on stderr naming `names` followed by `pattern`, no traceback, nothing published."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    message = lines[0]
    assert message.startswith("error: "), message
    assert str(names.resolve()) in message, message
    assert re.search(re.escape(str(names.resolve())) + pattern, message), message
    assert store.names() == before, "something was published"
    return message


# --- the files ---


def jsonl(*rows: object) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


PROMPT = {"prompt": "What is 1 + 2?"}
CHAT = [{"role": "user", "content": "What is 1 + 2?"}]
ANSWER = [{"role": "assistant", "content": "1 + 2 = 3"}]
PAIR = {"prompt": CHAT, "chosen": ANSWER, "rejected": [{"role": "assistant", "content": "1 + 2 = 4"}]}
LATIN1 = b'{"prompt": "What is 1 + 2?"}\n{"prompt": "caf\xe9 au lait?"}\n'
DEEP = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
ARRAY_WITH_ERROR = b'[\n  {"prompt": "a"},\n  {"prompt": "b",}\n]\n'


def cut(content: bytes, keep: int) -> bytes:
    return content[:keep]


# (stage, file name, content, what the message says after the file's path)
CASES: dict[str, tuple[str, str, bytes | None, str]] = {
    # prompts: sample, ppo, rloo, grpo, evaluate
    "prompts-zero-bytes": ("sample", "prompts.jsonl", b"", r" is empty \(0 bytes\)"),
    "prompts-blank-lines-only": ("sample", "prompts.jsonl", b"\n   \n\t\n", r" has no rows"),
    "prompts-invalid-json-line-3": (
        "sample",
        "prompts.jsonl",
        jsonl(PROMPT, PROMPT) + b'{"prompt": "What is 2 + 2?"\n',
        r" line 3: not valid JSON",
    ),
    "prompts-latin-1": (
        "sample",
        "prompts.jsonl",
        LATIN1,
        rf" is not UTF-8 text: byte offset {LATIN1.index(0xE9)} \(line 2\) is 0xe9",
    ),
    "prompts-utf-16": (
        "ppo",
        "prompts.jsonl",
        json.dumps(PROMPT).encode("utf-16"),
        r" is not UTF-8 text: byte offset 0 \(line 1\)",
    ),
    "prompt-is-a-number": (
        "sample",
        "prompts.jsonl",
        jsonl(PROMPT, {"prompt": 7}),
        r" line 2: `prompt` is a number",
    ),
    "prompt-is-a-list-of-strings": (
        "evaluate",
        "prompts.jsonl",
        jsonl({"prompt": ["What is", "1 + 2?"]}),
        r" line 1: `prompt` message 1 is a string, not a \{role, content\} object",
    ),
    "prompt-message-without-content": (
        "grpo",
        "prompts.jsonl",
        jsonl(PROMPT, {"prompt": [{"role": "user"}]}),
        r" line 2: `prompt` message 1 has no `content`",
    ),
    "prompt-empty-string": (
        "ppo",
        "prompts.jsonl",
        jsonl(PROMPT, {"prompt": ""}),
        r" line 2: `prompt` is empty",
    ),
    "prompt-whitespace-only": (
        "rloo",
        "prompts.jsonl",
        jsonl(PROMPT, PROMPT | {"id": 2}, {"prompt": " \n\t "}),
        r" line 3: `prompt` is empty",
    ),
    "prompt-chat-without-text": (
        "sample",
        "prompts.jsonl",
        jsonl({"prompt": [{"role": "user", "content": "  "}]}),
        r" line 1: `prompt` is empty",
    ),
    "prompts-without-prompt-column": (
        "sample",
        "prompts.jsonl",
        jsonl({"question": "What is 1 + 2?", "answer": 3}),
        r" line 1: no `prompt` column \(found columns \['question', 'answer'\]\)",
    ),
    "prompts-line-is-an-array": (
        "sample",
        "prompts.jsonl",
        b'["What is 1 + 2?"]\n',
        r" line 1: is a list, not a JSON object",
    ),
    "prompts-nested-too-deeply": (
        "grpo",
        "prompts.jsonl",
        DEEP,
        r" line 1: not readable JSON \(nested too deeply\)",
    ),
    "prompts-repeated-ids": (
        "sample",
        "prompts.jsonl",
        jsonl(PROMPT | {"id": "q1"}, {"prompt": "What is 2 + 2?", "id": "q1"}),
        r" line 2: repeats the id 'q1' of .*prompts\.jsonl line 1",
    ),
    "prompt-id-is-a-list": (
        "sample",
        "prompts.jsonl",
        jsonl(PROMPT | {"id": [1]}),
        r" line 1: `id` is a list",
    ),
    "prompts-json-array-with-an-error": (
        "evaluate",
        "prompts.json",
        ARRAY_WITH_ERROR,
        r" line 3: not valid JSON \(Expecting property name",
    ),
    "prompts-empty-json-array": ("sample", "prompts.json", b"[]\n", r" has no rows"),
    "prompts-csv": (
        "sample",
        "prompts.csv",
        b"prompt\nWhat is 1 + 2?\n",
        r": expected a \.jsonl, \.json or \.parquet",
    ),
    "parquet-zero-bytes": ("sample", "prompts.parquet", b"", r" is empty \(0 bytes\)"),
    "parquet-not-parquet": ("ppo", "prompts.parquet", jsonl(PROMPT), r" is not a readable Parquet file"),
    "parquet-truncated": (
        "sample",
        "prompts.parquet",
        cut(parquet(pa.table({"prompt": ["What is 1 + 2?"] * 50})), 200),
        r" is not a readable Parquet file",
    ),
    "parquet-no-rows": (
        "sample",
        "prompts.parquet",
        parquet(pa.table({"prompt": pa.array([], pa.string())})),
        r" has no rows",
    ),
    "parquet-prompt-is-a-number": (
        "sample",
        "prompts.parquet",
        parquet(pa.table({"prompt": [1, 2]})),
        r" row 1: `prompt` is a number",
    ),
    "parquet-prompt-is-null": (
        "evaluate",
        "prompts.parquet",
        parquet(pa.table({"prompt": ["What is 1 + 2?", None]})),
        r" row 2: `prompt` is null",
    ),
    # SFT data
    "sft-zero-bytes": ("sft", "sft.jsonl", b"", r" is empty \(0 bytes\)"),
    "sft-completion-is-a-number": (
        "sft",
        "sft.jsonl",
        jsonl({"prompt": "1 + 2 =", "completion": " 3"}, {"prompt": "2 + 2 =", "completion": 4}),
        r" line 2: `completion` is a number",
    ),
    "sft-unknown-columns": (
        "sft",
        "sft.jsonl",
        jsonl({"question": "1 + 2?", "answer": "3"}),
        r" line 1: fits none of the SFT data formats \(found columns \['question', 'answer'\]\)",
    ),
    "sft-row-without-completion": (
        "sft",
        "sft.jsonl",
        jsonl(
            {"prompt": CHAT, "completion": ANSWER}, {"prompt": CHAT, "completion": ANSWER}, {"prompt": CHAT}
        ),
        r" line 3: no `completion` column \(found columns \['prompt'\]\)",
    ),
    "sft-messages-is-a-string": (
        "sft",
        "sft.jsonl",
        jsonl({"messages": CHAT + ANSWER}, {"messages": "1 + 2 = 3"}),
        r" line 2: `messages` is a string",
    ),
    "sft-mixed-rows": (
        "sft",
        "sft.jsonl",
        jsonl({"prompt": "1 + 2 =", "completion": " 3"}, {"prompt": CHAT, "completion": ANSWER}),
        r" line 2: is conversational, the rows before it are plain",
    ),
    "sft-no-assistant-turn": (
        "sft",
        "sft.jsonl",
        jsonl({"messages": CHAT}),
        r" line 1: `messages` has no assistant turn",
    ),
    "sft-content-is-null": (
        "sft",
        "sft.jsonl",
        jsonl({"messages": [*CHAT, {"role": "assistant", "content": None}]}),
        r" line 1: `messages` message 2 has a `content` that is null",
    ),
    "sft-empty-prompt": (
        "sft",
        "sft.parquet",
        parquet(pa.table({"prompt": ["1 + 2 =", ""], "completion": [" 3", " 4"]})),
        r" row 2: `prompt` is empty",
    ),
    # preferences: reward, dpo
    "preferences-zero-bytes": ("dpo", "preferences.jsonl", b"", r" is empty \(0 bytes\)"),
    "preferences-without-chosen": (
        "reward",
        "preferences.jsonl",
        jsonl({"prompt": CHAT, "rejected": ANSWER}),
        r" line 1: no `chosen` column \(found columns \['prompt', 'rejected'\]\)",
    ),
    "preferences-chosen-is-a-number": (
        "reward",
        "preferences.jsonl",
        jsonl({"prompt": "1 + 2 =", "chosen": 3, "rejected": "4"}),
        r" line 1: `chosen` is a number",
    ),
    "preferences-invalid-json-line-2": (
        "dpo",
        "preferences.jsonl",
        jsonl(PAIR) + b"{'prompt': 'single quotes'}\n",
        r" line 2: not valid JSON",
    ),
    "preferences-empty-prompt": (
        "dpo",
        "preferences.jsonl",
        jsonl(PAIR, PAIR | {"prompt": [{"role": "user", "content": ""}]}),
        r" line 2: `prompt` is empty",
    ),
    "preferences-response-from-the-user": (
        "dpo",
        "preferences.jsonl",
        jsonl(PAIR | {"rejected": [{"role": "user", "content": "1 + 2 = 4"}]}),
        r" line 1: `rejected` message 1 has the role 'user', not 'assistant'",
    ),
    "preferences-agreement-is-text": (
        "reward",
        "preferences.jsonl",
        jsonl(PAIR | {"agreement": "high"}),
        r" line 1: `agreement` is a string; expected a number from 0 to 1",
    ),
    "preferences-mixed-formats": (
        "reward",
        "preferences.jsonl",
        jsonl(PAIR, {"prompt": "1 + 2 =", "chosen": "3", "rejected": "4"}),
        r" line 2: is plain, the rows before it are conversational",
    ),
    "preferences-all-identical": (
        "dpo",
        "preferences.jsonl",
        jsonl(*[PAIR | {"rejected": ANSWER}] * 3),
        r": all 3 pairs have the same chosen and rejected response",
    ),
    "preferences-parquet-chosen-is-null": (
        "reward",
        "preferences.parquet",
        parquet(
            pa.table({"prompt": ["1 + 2 ="], "chosen": pa.array([None], pa.string()), "rejected": ["4"]})
        ),
        r" row 1: `chosen` is null",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_data_file_is_refused_before_any_stage_runs(case, workspace, models, store):
    kind, name, content, pattern = CASES[case]
    file = workspace / "data" / name
    file.parent.mkdir()
    file.write_bytes(content)
    result = run_stage(workspace, kind, str(file), models)
    message = assert_refused(result, file, pattern, store, ["rm"])
    assert message.startswith(f"error: stages.{kind}.inputs.")
    assert "running" not in result.stdout


def test_pairs_without_an_agreement_are_refused_before_any_stage_runs_when_min_agreement_is_set(
    workspace, models, store
):
    file = workspace / "preferences.jsonl"
    file.write_bytes(jsonl(PAIR | {"agreement": 1.0}, PAIR))
    entry = stage_entry("reward", str(file), models)
    entry["config"]["min_agreement"] = 1.0
    (workspace / "wf.yaml").write_text(yaml.safe_dump({"name": "hostile", "stages": {"reward": entry}}))
    result = rlhf("run", "wf.yaml", cwd=workspace, env=RUN_ENV, timeout=300)
    message = assert_refused(
        result, file, r" line 2: has no `agreement`, which min_agreement \(1\.0\)", store, ["rm"]
    )
    assert message.startswith("error: stages.reward.inputs.preferences: ")
    assert "running" not in result.stdout


def test_a_folder_without_data_files_is_refused(workspace, models, store):
    folder = workspace / "prompts"
    folder.mkdir()
    (folder / "notes.txt").write_text("What is 1 + 2?\n")
    (folder / "manifest.json").write_text("{}")  # an artifact's manifest is not data
    result = run_stage(workspace, "sample", str(folder), models)
    assert_refused(result, folder, r"; expected a `prompt` column", store, ["rm"])
    assert "no .jsonl, .json or .parquet file in" in result.stderr


def test_a_collect_folder_names_its_preferences_file(workspace, models, store):
    folder = workspace / "collected"
    folder.mkdir()
    (folder / data.PREFERENCES_FILE).write_bytes(b"\n\n")
    (folder / "summary.json").write_text('{"pairs": 0}')
    result = run_stage(workspace, "reward", str(folder), models)
    assert_refused(result, folder / data.PREFERENCES_FILE, r" has no rows", store, ["rm"])


def test_bad_data_of_a_later_stage_stops_the_run_before_the_first_stage(workspace, models, store):
    file = workspace / "sft.jsonl"
    file.write_bytes(jsonl({"prompt": "1 + 2 =", "completion": " 3"}) + b"{not json}\n")
    workflow = {
        "name": "hostile",
        "task": {"name": "arithmetic"},
        "stages": {
            "pretrain": {"config": {"steps": 1, "layers": 1, "hidden_size": 16, "intermediate_size": 32}},
            "tune": {"kind": "sft", "inputs": {"model": "pretrain", "data": str(file)}},
        },
    }
    (workspace / "wf.yaml").write_text(yaml.safe_dump(workflow))
    result = rlhf("run", "wf.yaml", cwd=workspace, env=RUN_ENV)
    message = assert_refused(result, file, r" line 2: not valid JSON", store, ["rm"])
    assert message.startswith("error: stages.tune.inputs.data: ")
    assert "pretrain" not in result.stdout  # it never started

    result = rlhf("validate", "wf.yaml", cwd=workspace)  # validating reads the data files too
    assert_refused(result, file, r" line 2: not valid JSON", store, ["rm"])


def publish_data(store: Store, workspace: Path, name: str, kind: str, file: str, content: bytes) -> str:
    payload = workspace / f"{name}-payload"
    payload.mkdir()
    (payload / file).write_bytes(content)
    return store.publish(name, payload, {"kind": kind, "status": "ok", "stage": {"name": name}}).ref


@pytest.mark.parametrize(
    ("kind", "artifact_kind", "file", "content", "pattern"),
    [
        (
            "dpo",
            "preferences",
            "preferences.jsonl",
            jsonl(PAIR, *[PAIR | {"rejected": ANSWER}] * 3),
            r": 3 of the 4 pairs have the same chosen and rejected response, leaving 1 \(25%\), fewer than "
            r"min_distinct_fraction \(0\.5\)",
        ),
        ("sample", "dataset", "prompts.jsonl", jsonl(PROMPT) + b"\x00\x01\n", r" line 2: not valid JSON"),
        ("sft", "dataset", "sft.jsonl", jsonl({"text": ""}), r" line 1: `text` is an empty string"),
    ],
    ids=["dpo-mostly-identical-pairs", "sample-binary-line", "sft-empty-text"],
)
def test_bad_data_in_an_artifact_is_refused_by_the_stage_before_it_loads_a_model(
    kind, artifact_kind, file, content, pattern, workspace, models, store
):
    ref = publish_data(store, workspace, "given", artifact_kind, file, content)
    result = run_stage(workspace, kind, ref, models)
    message = assert_refused(result, store.get(ref).path / file, pattern, store, ["given", "rm"])
    assert message.startswith(f"error: {kind}: ")


# --- what the readers accept ---


def test_byte_order_marks_line_separators_json_arrays_and_crlf_are_read(tmp_path):
    file = tmp_path / "prompts.jsonl"
    file.write_bytes(b"\xef\xbb\xbf" + jsonl(PROMPT).replace(b"\n", b"\r\n") + jsonl({"prompt": "a\u2028b"}))
    assert [r["prompt"] for r in data.load_prompts(file, "sample")] == ["What is 1 + 2?", "a\u2028b"]
    array = tmp_path / "prompts.json"
    array.write_text(json.dumps([PROMPT, {"prompt": CHAT, "id": 7}], indent=2))
    records = data.load_prompts(array, "sample")
    assert [r["id"] for r in records] == [data.prompt_id(PROMPT["prompt"]), 7]
    table = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": ["x", "y"], "id": [None, "b"]}), table)
    assert [r["id"] for r in data.load_prompts(table, "sample")] == [data.prompt_id("x"), "b"]


def test_identical_pairs_are_dropped_and_counted_and_the_floor_is_configurable(tmp_path):
    file = tmp_path / "preferences.jsonl"
    file.write_bytes(jsonl(PAIR, PAIR | {"prompt_id": "x"}, PAIR | {"rejected": ANSWER}))
    loaded = data.load_preferences(file, "dpo", min_distinct_fraction=0.5)
    assert (loaded.given, loaded.dropped_identical, len(loaded.rows), loaded.format) == (
        3,
        1,
        2,
        "conversational",
    )
    assert loaded.rows[0]["prompt_id"] == data.prompt_id(CHAT) and loaded.rows[1]["prompt_id"] == "x"
    with pytest.raises(InputError, match=r"^dpo: .*preferences\.jsonl: 1 of the 3 pairs .* fewer than"):
        data.load_preferences(file, "dpo", min_distinct_fraction=0.9)


def test_min_agreement_drops_and_counts_disputed_pairs_and_needs_an_agreement(tmp_path):
    file = tmp_path / "preferences.jsonl"
    file.write_bytes(
        jsonl(
            PAIR | {"agreement": 1.0},
            PAIR | {"agreement": 2 / 3, "prompt_id": "disputed"},
            PAIR | {"agreement": 1.0, "rejected": ANSWER},  # identical: counted as such, not as disputed
            PAIR | {"agreement": 1, "prompt_id": "whole"},
        )
    )
    everything = data.load_preferences(file, "reward")
    assert (len(everything.rows), everything.dropped_identical, everything.dropped_agreement) == (3, 1, 0)
    agreed = data.load_preferences(file, "reward", min_agreement=1.0)
    assert (agreed.given, agreed.dropped_identical, agreed.dropped_agreement) == (4, 1, 1)
    assert [row.get("prompt_id") for row in agreed.rows] == [data.prompt_id(CHAT), "whole"]
    assert len(data.load_preferences(file, "reward", min_agreement=0.6).rows) == 3
    with pytest.raises(InputError, match=r"^reward: .*none of the 3 pairs has an agreement of at least"):
        data.load_preferences(file, "reward", min_agreement=1.0 + 1e-9)
    missing = tmp_path / "no_agreement.jsonl"
    missing.write_bytes(jsonl(PAIR | {"agreement": 1.0}, PAIR))
    assert len(data.load_preferences(missing, "dpo").rows) == 2  # not asked for: not needed
    with pytest.raises(InputError, match=r"^dpo: .*no_agreement\.jsonl line 2: has no `agreement`"):
        data.load_preferences(missing, "dpo", min_agreement=0.5)


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_the_writer_and_the_readers_round_trip(suffix, tmp_path):
    rows = [{"prompt": CHAT, "completion": ANSWER}, {"prompt": CHAT, "completion": ANSWER}]
    path = tmp_path / f"sft.{suffix}"
    if suffix == "jsonl":
        data.write_jsonl(path, rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    assert data.load_sft(path, "sft") == (rows, "prompt/completion (conversational)")
