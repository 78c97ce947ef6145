"""The `sample` stage: K candidate responses per prompt from a policy, for annotators to rank.

The policy is an adapter (loaded on its base), a full model directory or a hub id. Prompts come from
the `prompts` input (JSONL or Parquet with a `prompt` column: a string or a list of chat messages;
optional `id`; every other column is carried through) or, without it, from the task's `split`
(`tasks/`), whose records carry the fields its verdict needs (arithmetic: `answer`) through to the
annotation batch, the simulated annotators and the preference pairs. Prompts are rendered with the
policy's chat template when it has one. With a task, the metrics include the candidates' pass rate.

Reproducible: the same config and policy give byte-identical samples; each candidate has its own
random stream (seeded from `seed`, the prompt and the candidate index), so `batch_size` and the other
prompts do not change it (see `policy.generation`).

Payload: `samples.jsonl`, one line per prompt `{"id", "prompt", "candidates": [...], "duplicate_of"?,
...carried columns}`, and `generation.json`, the generation settings and the policy it sampled.

Reads top to bottom: load, check, generate, save, measure.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

import tasks
from common.data import SAMPLES_FILE, load_prompts, write_jsonl
from common.models import (
    load_tokenizer,
    model_config,
    pick_device,
    set_threads,
    source_reference,
    tokenizer_fingerprint,
)
from common.outcomes import InputError
from common.training import Table, log_to_wandb, wandb_run
from policy import engines
from policy.configs import SampleConfig
from policy.generation import Completion, Sampling, encode_prompts, sample_candidates, uses_chat_template
from tasks import Task

GENERATION_FILE = "generation.json"
RESERVED_COLUMNS = ("candidates", "duplicate_of")
"""Written by this stage, so a prompts file may not have them."""
TABLE_PROMPTS = 200
"""The W&B samples table shows the candidates of at most this many prompts."""


def run(config: SampleConfig, inputs: dict[str, Path | str], out_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    set_threads(config.cpu_threads)
    device = pick_device(config.device)

    # Load
    task = tasks.load(config.task) if config.task is not None else None
    if "prompts" in inputs:
        records, source = (
            load_prompts(inputs["prompts"], "sample", config.num_prompts),
            source_reference(inputs["prompts"]),
        )
        if reserved := [c for c in RESERVED_COLUMNS if any(c in record for record in records)]:
            raise InputError(
                f"sample: the prompts in {inputs['prompts']} have columns {reserved}, which this stage writes"
            )
        if task is not None:
            from policy.evaluate import check_judgeable

            check_judgeable(task, records, f"the prompts in {inputs['prompts']}", "sample")
    else:
        records, source = task_records(task, config.split, config.num_prompts, "sample")
    tokenizer = load_tokenizer(inputs["policy"])
    prompt_ids = encode_prompts(tokenizer, [record["prompt"] for record in records], config.prompt_format)
    sampling = Sampling(config.temperature, config.top_p, max_new_tokens=config.max_new_tokens)

    # Check
    check(config, model_config(inputs["policy"]), tokenizer, prompt_ids)

    # Generate
    with engines.open_engine(
        config, inputs["policy"], tokenizer, device, out_dir, prompt_ids, sampling
    ) as engine:
        torch.manual_seed(config.seed)
        clock = time.perf_counter()
        completions = sample_candidates(
            engine, prompt_ids, config.k, sampling, seed=config.seed, progress="sample"
        )
    generation_s = time.perf_counter() - clock

    # Save
    samples = [
        to_sample(record, [c.text for c in drawn], config.duplicates)
        for record, drawn in zip(records, completions, strict=True)
    ]
    write_jsonl(out_dir / SAMPLES_FILE, samples)
    generation = generation_record(config, inputs, tokenizer, source)
    (out_dir / GENERATION_FILE).write_text(json.dumps(generation, indent=2) + "\n")

    # Measure
    metrics = measure(samples, completions, sampling, records, task)
    metrics.update(
        tokens_per_s=metrics["new_tokens"] / generation_s,
        generation_s=generation_s,
        duration_s=time.perf_counter() - started,
        device=str(device),
        dtype=engine.dtype,
        engine=config.engine,
    )
    log_table(samples, task)
    return metrics


# --- load ---


def task_records(
    task: Task | None, split: str, limit: int | None, stage: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The first `limit` records of the task's split (`{"id", "prompt", ...fields}`, in their fixed order)
    and where they came from; the stages without a prompts input take their prompts here."""
    if task is None:
        raise InputError(
            f"{stage}: no `prompts` input and no task to take prompts from; give the stage prompts, or a task "
            "(the workflow's top-level `task:`, e.g. `task: {name: arithmetic}`, or the stage's `task`)"
        )
    return task.prompts(split)[:limit], {"task": task.describe(), "split": split}  # type: ignore[arg-type]


# --- check ---


def check(config: SampleConfig, model_config: Any, tokenizer: Any, prompt_ids: list[list[int]]) -> None:
    """Raise one error listing every problem found before generating."""
    problems = []
    if tokenizer.eos_token_id is None:
        problems.append("the policy's tokenizer has no eos token, so responses cannot end")
    positions = getattr(model_config, "max_position_embeddings", None)
    longest = max(len(ids) for ids in prompt_ids)
    if positions is not None and longest + config.max_new_tokens > positions:
        problems.append(
            f"the longest prompt ({longest} tokens) plus max_new_tokens ({config.max_new_tokens}) "
            f"exceeds the policy's {positions} positions"
        )
    if problems:
        raise InputError("sample: " + "; ".join(problems))


# --- save ---


def duplicate_indices(candidates: list[str]) -> list[int | None]:
    """For each candidate, the index of its first identical candidate, or None for a first occurrence."""
    first: dict[str, int] = {}
    return [None if first.setdefault(text, i) == i else first[text] for i, text in enumerate(candidates)]


def to_sample(record: dict[str, Any], candidates: list[str], duplicates: str) -> dict[str, Any]:
    """A line of `samples.jsonl`: id, prompt, candidates (duplicates handled), carried columns."""
    marks = duplicate_indices(candidates)
    sample: dict[str, Any] = {"id": record["id"], "prompt": record["prompt"]}
    if duplicates == "remove":
        sample["candidates"] = [text for text, mark in zip(candidates, marks, strict=True) if mark is None]
    else:
        sample["candidates"] = candidates
    if duplicates == "mark":
        sample["duplicate_of"] = marks
    return {**sample, **{key: value for key, value in record.items() if key not in sample}}


def generation_record(
    config: SampleConfig, inputs: dict[str, Path | str], tokenizer: Any, prompts: Any
) -> dict[str, Any]:
    """What produced the candidates: the policy, the prompts and the generation settings."""
    return {
        "policy": source_reference(inputs["policy"]),
        "prompts": prompts,
        "k": config.k,
        "seed": config.seed,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "max_new_tokens": config.max_new_tokens,
        "duplicates": config.duplicates,
        "prompt_format": "chat" if uses_chat_template(tokenizer, config.prompt_format) else "plain",
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }


# --- measure ---


def measure(
    samples: list[dict[str, Any]],
    completions: list[list[Completion]],
    sampling: Sampling,
    records: list[dict[str, Any]],
    task: Task | None,
) -> dict[str, Any]:
    """Counts and, with a task, the candidates' pass rate (over all K drawn, before duplicates are removed;
    as `evaluate` counts it) and the fraction of prompts with both a passing and a failing candidate
    (useful preference pairs)."""
    generated = [drawn[:1] if sampling.greedy else drawn for drawn in completions]  # greedy ran once
    drawn_count = sum(len(drawn) for drawn in completions)
    distinct = [len(set(c.text for c in drawn)) for drawn in completions]
    metrics: dict[str, Any] = {
        "prompts": len(samples),
        "candidates": sum(len(sample["candidates"]) for sample in samples),
        "duplicates": drawn_count - sum(distinct),
        "duplicates_removed": drawn_count - sum(len(sample["candidates"]) for sample in samples),
        "mean_distinct_candidates": sum(distinct) / len(distinct),
        "new_tokens": sum(len(c.token_ids) for drawn in generated for c in drawn),
        "truncated_fraction": sum(not c.finished for drawn in generated for c in drawn)
        / sum(len(drawn) for drawn in generated),
    }
    if task is not None:
        from policy.evaluate import verdicts

        judged = [verdicts(task, record, drawn) for drawn, record in zip(completions, records, strict=True)]
        metrics["pass_rate_sampled"] = tasks.pass_rate([tasks.pass_rate(v) for v in judged])
        metrics["mixed_fraction"] = sum(max(v) > min(v) for v in judged) / len(judged)
    return metrics


def log_table(samples: list[dict[str, Any]], task: Task | None) -> None:
    """A W&B table of the candidates of the first `TABLE_PROMPTS` prompts, when the runner opened a run."""
    if wandb_run() is None:
        return
    columns = ["prompt_id", "prompt", "candidate_index", "candidate"] + (["verdict"] if task else [])
    rows = []
    for sample in samples[:TABLE_PROMPTS]:
        prompt = sample["prompt"] if isinstance(sample["prompt"], str) else json.dumps(sample["prompt"])
        for index, text in enumerate(sample["candidates"]):
            verdict = [task.judge(sample, text)] if task else []
            rows.append([str(sample["id"]), prompt, index, text, *verdict])
    log_to_wandb({"samples": Table(columns, rows)})
