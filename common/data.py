"""The data files stages read, one reader per format, shared by every stage that reads it.

- SFT data (`load_sft`, the `sft` stage): prompt/completion, messages or text.
- Prompts (`load_prompts`: `sample`, `ppo`, `rloo`, `grpo`, `evaluate`): a `prompt` column, an optional `id`
  and any other columns (the fields a task's verdict needs) carried along.
- Preferences (`load_preferences`: `reward`, `dpo`; written by `collect`): `prompt`, `chosen`, `rejected`.
- Texts (`load_texts`, the `pretrain` stage): documents in one column.

A source is a .jsonl, .json (JSON lines or one JSON array) or .parquet file, a folder of them (an
artifact's own files such as manifest.json are skipped), a folder written by `datasets.save_to_disk`, or
a hub data set id. Every problem is an `InputError` of one line that names the file and the line (JSON
lines), item (JSON array) or row (Parquet) at fault, what was found and what was expected; the runner
prints it and exits 2. Reading checks every row, so bad data fails in seconds, before any model loads.

No torch here; pyarrow and datasets are imported only when a source needs them.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.outcomes import InputError

SUFFIXES = (".jsonl", ".json", ".parquet")
NOT_DATA = {
    "manifest.json",
    "base.json",
    "summary.json",
    "dataset_info.json",
    "state.json",
    "dataset_dict.json",
}
"""JSON files found beside data files (an artifact's manifest, a data set's metadata) that are not data."""
SAVED_DATASET = ("dataset_info.json", "state.json", "dataset_dict.json")
"""Files that mark a folder written by `datasets.save_to_disk`."""
SAMPLES_FILE = "samples.jsonl"
"""The `sample` stage's hand-off: one line per prompt with its candidates."""
PREFERENCES_FILE = "preferences.jsonl"
"""The file of a preferences folder (collect's output); a folder without it is read like any other."""

MESSAGES = "a list of {role, content} messages"
PROMPTS = f"a `prompt` column (a string or {MESSAGES}), an optional `id` and any other columns"
SFT_FORMATS = (
    f"prompt/completion (`prompt` and `completion`: both strings, or {MESSAGES} and a list of assistant "
    "messages), messages (a `messages` column of conversations with an assistant turn) or text (a `text` "
    "column of strings)"
)
PREFERENCES = (
    "`prompt`, `chosen` and `rejected`: all three strings (plain), or a prompt as a list of {role, content} "
    "messages and the responses as lists of assistant messages (conversational)"
)


@dataclass(frozen=True)
class Row:
    """One row of a data source and where it is (`data.jsonl line 3`, `data.parquet row 7`)."""

    where: str
    values: dict[str, Any]


@dataclass(frozen=True)
class Preferences:
    """Preference pairs as a stage trains on them."""

    rows: list[dict[str, Any]]
    """Every pair with different chosen and rejected responses, each with a `prompt_id`."""
    format: str
    """`conversational` or `plain`."""
    given: int
    """Pairs in the data."""
    dropped_identical: int
    """Pairs dropped because chosen and rejected are the same response (they teach nothing)."""
    dropped_agreement: int = 0
    """Pairs dropped because fewer of their annotators agreed than `min_agreement` asks."""


# --- formats ---


def load_prompts(source: Path | str, stage: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The prompts (the first `limit` of them), each `{"id", "prompt", ...other columns}`: the `id` given
    (a string or an integer, unique) or derived from the prompt."""
    records: list[dict[str, Any]] = []
    places: dict[str, str] = {}
    for row in read_rows(source, stage, PROMPTS):
        values = row.values
        if "prompt" not in values:
            raise _error(
                stage, row.where, f"no `prompt` column (found {_columns(values)}); expected {PROMPTS}"
            )
        _check_prompt(values["prompt"], stage, row.where)
        given = values.get("id")
        if given is not None and (isinstance(given, bool) or not isinstance(given, (str, int))):
            raise _error(stage, row.where, f"`id` is {_kind(given)}; expected a string or an integer")
        record = {"id": prompt_id(values["prompt"]) if given is None else given}
        record.update((key, value) for key, value in values.items() if key != "id")
        key = json.dumps(record["id"])
        if key in places:
            raise _error(
                stage,
                row.where,
                f"repeats the id {record['id']!r} of {places[key]} (without ids: the same prompt); ids are unique",
            )
        places[key] = row.where
        records.append(record)
    if limit is not None and len(records) > limit:
        print(f"{stage}: using the first {limit} of the {len(records)} prompts in {source} (num_prompts)")
        records = records[:limit]
    return records


def load_sft(source: Path | str, stage: str) -> tuple[list[dict[str, Any]], str]:
    """The SFT examples (only the columns of their format) and the format, e.g. `prompt/completion
    (conversational)`."""
    return sft_examples(read_rows(source, stage, f"SFT data: {SFT_FORMATS}"), stage)


def sft_examples(rows: list[Row], stage: str) -> tuple[list[dict[str, Any]], str]:
    """`load_sft` for rows already read (a task's SFT examples): the format is that of the first row's
    columns, and every row must be in it."""
    first = rows[0].values
    columns: tuple[str, ...]
    if "prompt" in first and "completion" in first:
        layout, columns = "prompt/completion", ("prompt", "completion")
    elif "messages" in first:
        layout, columns = "messages", ("messages",)
    elif "text" in first:
        layout, columns = "text", ("text",)
    else:
        raise _error(
            stage,
            rows[0].where,
            f"fits none of the SFT data formats (found {_columns(first)}); expected {SFT_FORMATS}",
        )
    kind = None
    examples = []
    for row in rows:
        values = row.values
        if missing := [c for c in columns if c not in values]:
            raise _error(
                stage,
                row.where,
                f"no `{missing[0]}` column (found {_columns(values)}); the data is {layout} "
                f"(from {rows[0].where})",
            )
        if layout == "prompt/completion":
            this = _check_prompt(values["prompt"], stage, row.where)
            if this == "plain" and not isinstance(values["completion"], str):
                raise _error(
                    stage,
                    row.where,
                    f"`completion` is {_kind(values['completion'])}; the prompt is a string, so "
                    "the completion must be one too",
                )
            if this == "conversational":
                _check_messages(values["completion"], "completion", stage, row.where, assistant=True)
        elif layout == "messages":
            this = _check_messages(values["messages"], "messages", stage, row.where)
            if not any(m["role"] == "assistant" for m in values["messages"]):
                raise _error(
                    stage, row.where, "`messages` has no assistant turn, so there is nothing to learn"
                )
        else:
            this = "plain"
            if not isinstance(values["text"], str) or not values["text"].strip():
                raise _error(
                    stage, row.where, f"`text` is {_kind(values['text'])}; expected a non-empty string"
                )
        if kind is not None and this != kind:
            raise _error(
                stage, row.where, f"is {this}, the rows before it are {kind}; one data set has one format"
            )
        kind = this
        examples.append({column: values[column] for column in columns})
    return examples, f"{layout} ({kind})"


def load_preferences(
    source: Path | str, stage: str, min_distinct_fraction: float = 0.0, min_agreement: float | None = None
) -> Preferences:
    """The preference pairs. A pair whose chosen and rejected responses are identical is dropped and counted;
    when no pair is left, or fewer than `min_distinct_fraction` of them, the data is refused. With
    `min_agreement` (`common.configs.PreferenceSettings`), a pair whose `agreement` is below it is dropped
    and counted too, and a pair without one is an error."""
    if isinstance(source, Path) and (source / PREFERENCES_FILE).is_file():
        source = source / PREFERENCES_FILE
    kept, dropped, disputed, kind = [], 0, 0, None
    for row in read_rows(source, stage, f"preference pairs: {PREFERENCES}"):
        values = row.values
        if missing := [c for c in ("prompt", "chosen", "rejected") if c not in values]:
            raise _error(
                stage,
                row.where,
                f"no {' or '.join(f'`{c}`' for c in missing)} column (found {_columns(values)}); expected {PREFERENCES}",
            )
        this = _check_prompt(values["prompt"], stage, row.where)
        for side in ("chosen", "rejected"):
            if this == "plain" and not isinstance(values[side], str):
                raise _error(
                    stage,
                    row.where,
                    f"`{side}` is {_kind(values[side])}; the prompt is a string, so the responses must be too",
                )
            if this == "conversational":
                _check_messages(values[side], side, stage, row.where, assistant=True)
        if kind is not None and this != kind:
            raise _error(
                stage, row.where, f"is {this}, the rows before it are {kind}; one data set has one format"
            )
        kind = this
        agreement = values.get("agreement")
        if agreement is not None and (
            isinstance(agreement, bool) or not isinstance(agreement, (int, float)) or not 0 <= agreement <= 1
        ):
            raise _error(
                stage, row.where, f"`agreement` is {_kind(agreement)}; expected a number from 0 to 1"
            )
        if min_agreement is not None and agreement is None:
            raise _error(
                stage,
                row.where,
                f"has no `agreement`, which min_agreement ({min_agreement}) filters on; expected the fraction "
                "of annotators who ranked the pair this way (collect writes it), or min_agreement: null",
            )
        given = values.get("prompt_id")
        if given is not None and (isinstance(given, bool) or not isinstance(given, (str, int))):
            raise _error(stage, row.where, f"`prompt_id` is {_kind(given)}; expected a string or an integer")
        if _same(values["chosen"], values["rejected"]):
            dropped += 1
            continue
        if min_agreement is not None and agreement is not None and agreement < min_agreement:
            disputed += 1
            continue
        kept.append({**values, "prompt_id": prompt_id(values["prompt"]) if given is None else given})
    total = len(kept) + dropped + disputed
    distinct = total - dropped
    if not distinct:
        raise InputError(
            f"{stage}: {source}: all {total} pairs have the same chosen and rejected response, so no pair is "
            "left to learn from; expected pairs of two different responses"
        )
    if distinct < min_distinct_fraction * total:
        raise InputError(
            f"{stage}: {source}: {dropped} of the {total} pairs have the same chosen and rejected response, "
            f"leaving {distinct} ({distinct / total:.0%}), fewer than min_distinct_fraction "
            f"({min_distinct_fraction}); identical responses ranked apart (e.g. duplicate candidates) suggest "
            "broken data"
        )
    if not kept:
        raise InputError(
            f"{stage}: {source}: none of the {distinct} pairs has an agreement of at least min_agreement "
            f"({min_agreement}), so no pair is left to learn from; expected a lower min_agreement, or more "
            "annotators per record"
        )
    assert kind is not None
    return Preferences(kept, kind, total, dropped, disputed)


def load_texts(source: Path | str, column: str, stage: str) -> list[str]:
    """The non-empty documents of a text column."""
    texts = []
    for row in read_rows(source, stage, f"a `{column}` column of documents (strings)"):
        if column not in row.values:
            raise _error(stage, row.where, f"no `{column}` column (found {_columns(row.values)})")
        value = row.values[column]
        if value is not None and not isinstance(value, str):
            raise _error(stage, row.where, f"`{column}` is {_kind(value)}; expected a string")
        if value:
            texts.append(value)
    if not texts:
        raise InputError(f"{stage}: {source} has no text in its `{column}` column")
    return texts


def check(kind: str, source: Path, stage: str, min_agreement: float | None = None) -> None:
    """Read `source` as the stages that take `kind` data will (`sft`, `prompts`, `preferences`, or `texts`,
    whose column comes from the stage's config, so only the files are read), raising its first problem.
    Preferences are read with the stage's `min_agreement` (a pair without an `agreement` is an error);
    what else depends on a stage's config (`min_distinct_fraction`) is left to the stage."""
    if kind == "sft":
        load_sft(source, stage)
    elif kind == "prompts":
        load_prompts(source, stage)
    elif kind == "preferences":
        load_preferences(source, stage, min_agreement=min_agreement)
    elif kind == "texts":
        read_rows(source, stage, "documents")
    else:
        raise ValueError(f"unknown data kind {kind!r}")


def prompt_id(prompt: Any) -> str:
    """An id derived from the prompt's content (for rows that have none)."""
    return "p-" + hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).hexdigest()[:12]


def write_jsonl(file: Path, rows: list[dict[str, Any]]) -> None:
    """JSON lines as every reader here reads them (UTF-8, one object per line)."""
    with file.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


# --- values ---


def _check_prompt(value: Any, stage: str, where: str) -> str:
    """`plain` for a string, `conversational` for a list of messages; an error for anything else and for a
    prompt with no text."""
    if isinstance(value, str):
        kind = "plain"
        blank = not value.strip()
    elif isinstance(value, list):
        kind = _check_messages(value, "prompt", stage, where)
        blank = not any(m["content"].strip() for m in value)
    else:
        raise _error(stage, where, f"`prompt` is {_kind(value)}; expected a string or {MESSAGES}")
    if blank:
        raise _error(stage, where, "`prompt` is empty or only whitespace; every prompt needs text")
    return kind


def _check_messages(value: Any, column: str, stage: str, where: str, assistant: bool = False) -> str:
    """`conversational` when `value` is a non-empty list of {role, content} messages with string values
    (all of them assistant messages when `assistant`); an error saying what is wrong otherwise."""
    expected = "a list of assistant messages" if assistant else MESSAGES
    if not isinstance(value, list) or not value:
        raise _error(stage, where, f"`{column}` is {_kind(value)}; expected {expected}")
    for number, message in enumerate(value, 1):
        if not isinstance(message, dict):
            problem = f"is {_kind(message)}, not a {{role, content}} object"
        elif missing := [key for key in ("role", "content") if key not in message]:
            problem = f"has no `{missing[0]}`"
        elif not isinstance(message["role"], str) or not isinstance(message["content"], str):
            bad = "role" if not isinstance(message["role"], str) else "content"
            problem = f"has a `{bad}` that is {_kind(message[bad])}, not a string"
        elif assistant and message["role"] != "assistant":
            problem = f"has the role {message['role']!r}, not 'assistant'"
        else:
            continue
        raise _error(stage, where, f"`{column}` message {number} {problem}; expected {expected}")
    return "conversational"


def _same(chosen: Any, rejected: Any) -> bool:
    return json.dumps(chosen, sort_keys=True) == json.dumps(rejected, sort_keys=True)


def _kind(value: Any) -> str:
    """What a value is, in words, for error messages (never the value itself, which may be long)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string" if value.strip() else "an empty string"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _columns(values: dict[str, Any]) -> str:
    return f"columns {list(values)}" if values else "no columns"


def _error(stage: str, where: str, problem: str) -> InputError:
    return InputError(f"{stage}: {where}: {problem}")


# --- files ---


def read_rows(source: Path | str, stage: str, expected: str) -> list[Row]:
    """Every row of a source (see the module's docstring); a source without rows is an error."""
    if isinstance(source, str):
        return _hub(source, stage)
    if not source.exists():
        raise InputError(
            f"{stage}: {source} does not exist; expected a JSONL, JSON or Parquet file with {expected}"
        )
    if source.is_dir() and any((source / name).exists() for name in SAVED_DATASET):
        return _saved(source, stage)
    files = (
        sorted(
            f for f in source.rglob("*") if f.suffix in SUFFIXES and f.name not in NOT_DATA and f.is_file()
        )
        if source.is_dir()
        else [source]
    )
    if not files:
        raise InputError(f"{stage}: no .jsonl, .json or .parquet file in {source}; expected {expected}")
    rows = []
    for file in files:
        rows += _read_file(file, stage, expected)
    return rows


def _read_file(file: Path, stage: str, expected: str) -> list[Row]:
    if file.suffix not in SUFFIXES:
        raise InputError(
            f"{stage}: cannot read {file}: expected a .jsonl, .json or .parquet file with {expected}"
        )
    try:
        data = file.read_bytes()
    except OSError as err:
        raise InputError(f"{stage}: {file} cannot be read ({err.strerror or type(err).__name__})") from None
    if not data:
        raise InputError(f"{stage}: {file} is empty (0 bytes); expected {expected}")
    if file.suffix == ".parquet":
        rows = _parquet(file, stage)
    else:
        text = _decode(data, file, stage)
        array = file.suffix == ".json" and text.lstrip().startswith("[")
        rows = _json_array(text, file, stage) if array else _json_lines(text, file, stage)
    if not rows:
        raise InputError(
            f"{stage}: {file} has no rows (only blank lines or an empty array); expected {expected}"
        )
    return rows


def _decode(data: bytes, file: Path, stage: str) -> str:
    """The text of a JSON file: UTF-8, a byte-order mark allowed."""
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = skip + err.start
        line = data[:offset].count(b"\n") + 1
        raise InputError(
            f"{stage}: {file} is not UTF-8 text: byte offset {offset} (line {line}) is 0x{data[offset]:02x}; "
            "expected UTF-8 encoded JSON"
        ) from None


def _parse(text: str, stage: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise _error(stage, where, f"not valid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise _error(stage, where, "not readable JSON (nested too deeply)") from None


def _json_lines(text: str, file: Path, stage: str) -> list[Row]:
    rows = []
    # split at line feeds only: str.splitlines would also split at U+2028 and others, which JSON strings may hold
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{file} line {number}"
        value = _parse(line, stage, where)
        if not isinstance(value, dict):
            raise _error(stage, where, f"is {_kind(value)}, not a JSON object; expected one object per line")
        rows.append(Row(where, value))
    return rows


def _json_array(text: str, file: Path, stage: str) -> list[Row]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise _error(
            stage, f"{file} line {err.lineno}", f"not valid JSON ({err.msg} at column {err.colno})"
        ) from None
    except RecursionError:
        raise _error(stage, str(file), "not readable JSON (nested too deeply)") from None
    rows = []
    for number, item in enumerate(items, 1):
        where = f"{file} item {number}"
        if not isinstance(item, dict):
            raise _error(stage, where, f"is {_kind(item)}, not a JSON object; expected an array of objects")
        rows.append(Row(where, item))
    return rows


def _parquet(file: Path, stage: str) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise InputError(f"{stage}: {file} is not a readable Parquet file ({_first_line(err)})") from None
    return [Row(f"{file} row {number}", values) for number, values in enumerate(table.to_pylist(), 1)]


def _saved(folder: Path, stage: str) -> list[Row]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(folder))
    except Exception as err:  # datasets raises many kinds for a damaged folder
        raise InputError(f"{stage}: {folder} is not a readable saved data set ({_first_line(err)})") from None
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    rows = [Row(f"{folder} row {number}", values) for number, values in enumerate(dataset.to_list(), 1)]
    if not rows:
        raise InputError(f"{stage}: the saved data set {folder} has no rows")
    return rows


def _hub(name: str, stage: str) -> list[Row]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split="train")
    except Exception as err:  # no network, no such data set, no train split, ...
        raise InputError(f"{stage}: the data set {name} cannot be loaded ({_first_line(err)})") from None
    rows = [Row(f"{name} row {number}", values) for number, values in enumerate(dataset.to_list(), 1)]
    if not rows:
        raise InputError(f"{stage}: the data set {name} has no rows")
    return rows


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
