"""The `pretrain` stage: train a small causal LM on plain text.

Without inputs it builds the demo tokenizer and model (`policy.demo_model`) and trains them on the
plain-text demo corpus of the `arithmetic` task (every sum, a share of them wrong; the task's
`options` set its operands; without a task, the default arithmetic task), so the base model knows the arithmetic of the demo task, unreliably, but not the
chat format (that is SFT's job). With a `model` input it continues pretraining that model with its own
tokenizer, on the `data` input when given, else on the demo corpus. With a task, the metrics end with
its held-out pass rate, the prompts asked in the plain pretraining format.

Reads top to bottom: load, check, train, save, measure.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationMixin,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

import tasks
from common.data import load_texts
from common.models import pick_device, set_threads, training_attention, uses_bf16
from common.outcomes import InputError
from common.sources import split_revision
from common.training import log_to_wandb
from policy.configs import PretrainConfig
from policy.demo_model import build_model, train_tokenizer
from tasks import arithmetic

LOG_EVERY = 20
"""Steps between loss/lr reports to W&B and the progress bar."""


def run(config: PretrainConfig, inputs: dict[str, Path | str], out_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    device = pick_device(config.device)
    set_threads(config.cpu_threads)

    # Load
    task = tasks.load(config.task) if config.task is not None else None
    if task is None and "data" not in inputs:
        task = tasks.load({"name": "arithmetic"})  # the demo corpus is the arithmetic task's
    texts = (
        load_texts(inputs["data"], config.text_column, "pretrain")
        if "data" in inputs
        else demo_corpus(config, task)
    )
    torch.manual_seed(config.seed)
    model: PreTrainedModel
    if "model" in inputs:
        name, revision = split_revision(inputs["model"])
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(name, revision=revision, dtype=torch.float32)
    else:
        tokenizer = train_tokenizer(texts, config.vocab_size)
        model = build_model(
            tokenizer, config.layers, config.hidden_size, config.intermediate_size, config.heads
        )
    documents = tokenize(texts, tokenizer)

    # Check
    check(config, model, tokenizer, documents)

    # Train
    model.to(device)  # type: ignore[arg-type]  # transformers wraps `to` in functools.wraps, which mypy misreads
    stats = train(model, documents, config, device)

    # Save
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    # Measure
    measured: dict[str, Any] = {}
    if task is not None:
        held_out = task.prompts("held_out")[: config.eval_prompts]
        measured["pass_rate_greedy"] = plain_pass_rate(model, tokenizer, task, held_out, sample=False)
        torch.manual_seed(config.seed)
        measured["pass_rate_sampled"] = plain_pass_rate(model, tokenizer, task, held_out, sample=True)
        measured["eval_prompts"] = len(held_out)
    return {
        "train_loss": stats["train_loss"],
        **measured,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "train_tokens": stats["tokens"],
        "tokens_per_second": stats["tokens"] / stats["seconds"],
        "train_seconds": stats["seconds"],
        "duration_seconds": time.perf_counter() - started,
        "device": str(device),
    }


# --- load ---


def demo_corpus(config: PretrainConfig, task: tasks.Task | None) -> list[str]:
    """The arithmetic task's plain-text corpus (its `max_operand`)."""
    if not isinstance(task, arithmetic.ArithmeticTask):
        raise InputError(
            "pretrain: without a `data` input the stage trains on the demo corpus, which belongs to the "
            f"arithmetic task, not {task.name if task else 'none'}; set `task: {{name: arithmetic}}` "
            "or give `data`"
        )
    return arithmetic.pretraining_corpus(
        task.max_operand, noise=config.corpus_noise, copies=config.corpus_copies, seed=config.seed
    )


def tokenize(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of each text (with bos when the tokenizer adds it), ended by eos."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [ids + eos for ids in tokenizer(texts)["input_ids"]]


# --- check ---


def check(
    config: PretrainConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    documents: list[list[int]],
) -> None:
    """Raise one error listing every problem found before training starts."""
    problems = []
    total = sum(len(ids) for ids in documents)
    if total < config.batch_size * config.seq_len:
        problems.append(
            f"the data has {total} tokens, fewer than one batch ({config.batch_size} x {config.seq_len})"
        )
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and config.seq_len > max_positions:
        problems.append(f"seq_len {config.seq_len} exceeds the model's {max_positions} positions")
    embeddings = cast(torch.nn.Embedding, model.get_input_embeddings())  # transformers types it as any Module
    if len(tokenizer) > embeddings.num_embeddings:
        problems.append(f"the tokenizer has {len(tokenizer)} tokens, more than the model's embeddings")
    if tokenizer.eos_token_id is None:
        problems.append("the tokenizer has no eos token, so documents cannot be separated")
    if problems:
        raise InputError("pretrain: " + "; ".join(problems))


# --- train ---


def batches(documents: list[list[int]], config: PretrainConfig) -> Iterator[torch.Tensor]:
    """Endless `[batch_size, seq_len]` blocks: documents shuffled each epoch (seeded), concatenated, cut."""
    rng = random.Random(config.seed)
    size = config.batch_size * config.seq_len
    buffer: list[int] = []
    while True:
        for index in rng.sample(range(len(documents)), len(documents)):
            buffer.extend(documents[index])
            while len(buffer) >= size:
                yield torch.tensor(buffer[:size]).view(config.batch_size, config.seq_len)
                del buffer[:size]


def learning_rate_factor(step: int, config: PretrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1 at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(
    model: PreTrainedModel, documents: list[list[int]], config: PretrainConfig, device: torch.device
) -> dict[str, float]:
    """AdamW on packed blocks; under bf16 the forward runs in autocast over the fp32 master weights.
    Losses stay tensors between reports, so a step never waits on a `.item()`."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.95),
        foreach=True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, config))
    bf16 = uses_bf16(config.precision, device, model)
    with training_attention(model, bf16, device, config.seq_len):
        model.train()
        recent: list[torch.Tensor] = []
        started = time.perf_counter()
        stream = batches(documents, config)
        progress = tqdm(range(config.steps), desc="pretrain", unit="step")
        for step in progress:
            block = next(stream).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=block, labels=block).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            recent = [*recent[-(LOG_EVERY - 1) :], loss.detach()]
            if (step + 1) % LOG_EVERY == 0 or step + 1 == config.steps:
                mean_loss = torch.stack(recent).mean().item()
                progress.set_postfix(loss=f"{mean_loss:.3f}")
                log_to_wandb({"train/loss": mean_loss, "train/lr": scheduler.get_last_lr()[0]}, step=step + 1)
    progress.close()
    model.eval()
    seconds = time.perf_counter() - started
    return {
        "train_loss": torch.stack(recent).mean().item(),
        "tokens": config.steps * config.batch_size * config.seq_len,
        "seconds": seconds,
    }


# --- measure ---


@torch.no_grad()
def plain_pass_rate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: tasks.Task,
    records: list[dict],
    sample: bool,
) -> float:
    """The task's pass rate (`tasks.pass_rate` of `Task.judge`) on records asked in the plain pretraining
    format, greedy or sampled at temperature 1. A base model writes on after its answer, so the response
    is the generated first line. (Chat policies are measured by `policy.evaluate.task_pass_rates`.)"""
    if not records:
        return 0.0
    assert isinstance(model, GenerationMixin)  # a causal LM generates (PreTrainedModel alone does not)
    batch_size = 64 if tokenizer.pad_token_id is not None else 1
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    verdicts: list[float] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        prompts = [arithmetic.plain_prompt(record["prompt"]) for record in chunk]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
        output = model.generate(
            **encoded,
            max_new_tokens=task.max_new_tokens,
            do_sample=sample,
            temperature=1.0 if sample else None,
            top_k=0 if sample else None,
            top_p=1.0 if sample else None,
            pad_token_id=tokenizer.pad_token_id,
        )
        responses = tokenizer.batch_decode(
            output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True
        )
        verdicts += [
            task.judge(record, response.split("\n")[0])
            for response, record in zip(responses, chunk, strict=True)
        ]
    tokenizer.padding_side = padding_side
    return tasks.pass_rate(verdicts)
