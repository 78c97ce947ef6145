"""Batched generation from a causal LM: prompts rendered and tokenized, left-padded batches through
`model.generate` with the KV cache, completions cut at the stop token and decoded.

Used by the `sample` stage (K candidates per prompt) and meant for every stage that generates (SFT and
policy evaluation, PPO/RLOO rollouts).

Reproducible sampling. `generate` with `seeds` gives each sequence its own random stream: every step,
each row draws one uniform number from its own `torch.Generator` and picks its token by inverse-CDF
over the temperature/top-k/top-p-filtered distribution (the same filters as `model.generate`). The
chosen token is handed to `generate` as a one-hot score, so decoding runs in greedy mode. A row's tokens
then depend only on its prompt, its seed and the model, not on the batch it is in, the batch size or
the order of the rows: up to floating-point differences between batch shapes (padding, kernels), which
can flip a token only when its uniform number falls on a boundary of the distribution to within about
1e-7 (CPU, float32); on GPU, lower precision and shape-dependent kernels make that more likely.
Without `seeds`, sampling uses `model.generate`'s own sampler and torch's global generator.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast

import torch
from tqdm.auto import tqdm
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from common.models import contiguous_head_input, dtype_name
from common.outcomes import InputError

Prompt = str | list[dict[str, Any]]
"""A prompt: plain text, or a chat conversation (`[{"role": ..., "content": ...}, ...]`)."""
PromptFormat = Literal["auto", "chat", "plain"]


@dataclass(frozen=True)
class Sampling:
    """How to pick each next token."""

    temperature: float = 1.0
    """0 is greedy decoding."""
    top_p: float = 1.0
    top_k: int = 0
    """0 keeps every token."""
    max_new_tokens: int = 32
    min_new_tokens: int = 0
    """The stop tokens are suppressed until this many tokens were generated (for fixed-length runs)."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Completion:
    """One generated sequence."""

    text: str
    """Decoded without special tokens (and without the stop token), stripped."""
    token_ids: list[int]
    """The generated tokens, the stop token included when `finished`."""
    finished: bool
    """Ended with a stop token; False when cut at `max_new_tokens`."""


# --- prompts ---


def uses_chat_template(tokenizer: Any, prompt_format: PromptFormat = "auto") -> bool:
    """Whether prompts are rendered with the chat template (`auto`: when the tokenizer has one)."""
    if prompt_format == "chat" and not tokenizer.chat_template:
        raise InputError("prompt_format: chat was asked for, but the tokenizer has no chat template")
    return prompt_format == "chat" or (prompt_format == "auto" and bool(tokenizer.chat_template))


def encode_prompt(tokenizer: Any, prompt: Prompt, chat: bool) -> list[int]:
    """Token ids of a prompt: with the chat template and the assistant turn opened, or as plain text
    (with the tokenizer's special tokens, such as bos)."""
    if isinstance(prompt, list):
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
            raise InputError(
                f"a chat prompt must be a list of {{role, content}} messages, got {prompt!r:.200}"
            )
        if not chat:
            raise InputError(
                "a prompt is a list of chat messages, but prompts are rendered as plain text "
                "(the tokenizer has no chat template, or prompt_format is plain)"
            )
    elif not isinstance(prompt, str):
        raise InputError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    if not chat:
        return list(tokenizer(prompt)["input_ids"])
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template has them


def encode_prompts(
    tokenizer: Any, prompts: Sequence[Prompt], prompt_format: PromptFormat = "auto"
) -> list[list[int]]:
    """Token ids of each prompt (see `encode_prompt`); `auto` uses the chat template when there is one."""
    chat = uses_chat_template(tokenizer, prompt_format)
    return [encode_prompt(tokenizer, prompt, chat) for prompt in prompts]


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)` of sequences padded on the left, so they all end where generation starts."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        if ids:
            input_ids[row, width - len(ids) :] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


# --- seeds ---


def derive_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed from `seed` and JSON-able parts (e.g. a prompt's token ids and a candidate index)."""
    digest = hashlib.sha256(json.dumps([seed, *parts], separators=(",", ":")).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


CDF_CHUNK_ELEMENTS = 2**18
"""`SeededSampler` computes the cumulative distributions of this many (float64) scores at a time: 2 MB,
which stays in a core's cache (measured on 128 rows of SmolLM2's 49k vocabulary: 4 rows at a time took a
quarter of the time of all at once)."""


class SeededSampler(LogitsProcessor):
    """Samples the next token of each row from the row's own generator (see the module docstring) and
    returns scores that are 0 for that token and -inf elsewhere, for `generate` in greedy mode.

    The processed scores are therefore not log-probabilities; compute those with a forward pass."""

    def __init__(self, sampling: Sampling, seeds: Sequence[int]):
        self.warpers: list[LogitsProcessor] = []
        if sampling.temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k:
            self.warpers.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(sampling.top_p))
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        uniform = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators])
        uniform = uniform.to(scores.device)
        tokens = torch.empty((scores.shape[0], 1), dtype=torch.long, device=scores.device)
        # A few rows at a time: each row's distribution is computed alone anyway, and a chunk's float64 CDF
        # stays in the cache, where the whole batch's (50 MB for 128 rows of a 49k vocabulary) is paged in
        # afresh every step, which took most of a decoding step.
        rows = max(1, CDF_CHUNK_ELEMENTS // scores.shape[1])
        for start in range(0, scores.shape[0], rows):
            cdf = scores[start : start + rows].float().softmax(dim=-1).double().cumsum(dim=-1)
            targets = uniform[start : start + rows].unsqueeze(1) * cdf[:, -1:]
            # The first token whose cumulative probability exceeds the target: never one of probability 0.
            found = torch.searchsorted(cdf, targets, right=True).clamp_(max=cdf.shape[1] - 1)
            tokens[start : start + rows] = found
        # The scores are `generate`'s copy of the step's logits (or a warper's output): overwritten in place.
        # LogitsProcessor declares the legacy FloatTensor; tensor operations are typed as returning Tensor
        return cast(torch.FloatTensor, scores.fill_(float("-inf")).scatter_(1, tokens, 0.0))


# --- generation ---


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokens that end a completion: the tokenizer's eos and the model's generation-config eos."""
    return generation_stop_ids(getattr(model, "generation_config", None), tokenizer)


def generation_stop_ids(generation_config: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's eos and the eos of a generation config (None: the tokenizer's alone)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(ids)


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    sampling: Sampling,
    *,
    seeds: Sequence[int] | None = None,
    batch_size: int = 64,
    stop_token_ids: Sequence[int] | None = None,
    progress: str | None = None,
) -> list[Completion]:
    """One completion per prompt (token ids, e.g. from `encode_prompts`), in the order given.

    Rows are sorted by prompt length and generated `batch_size` at a time, left-padded, with a static
    KV cache. With `seeds` (one per row) each row samples from its own generator (see the module
    docstring), so the result does not depend on `batch_size` or on the other prompts; greedy decoding
    ignores them. `stop_token_ids` default to `stop_ids(model, tokenizer)`. `progress` is the label of
    a tqdm bar over batches (None: no bar).
    """
    if seeds is not None and len(seeds) != len(prompt_ids):
        raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts")
    if any(len(ids) == 0 for ids in prompt_ids):
        raise InputError("a prompt has no tokens; generation needs at least one (e.g. bos)")
    stops = list(stop_token_ids) if stop_token_ids is not None else stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops or [0])[0]
    do_sample = not sampling.greedy and seeds is None  # else greedy, or sampled by `SeededSampler`
    contiguous_head_input(model)  # the first step's logits come from a strided slice
    config = GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        min_new_tokens=sampling.min_new_tokens or None,
        do_sample=do_sample,
        # Without sampling, the warpers are left at transformers' defaults (which it ignores then).
        temperature=sampling.temperature if do_sample else 1.0,
        top_p=sampling.top_p if do_sample else 1.0,
        top_k=sampling.top_k if do_sample else 50,
        num_beams=1,
        use_cache=True,
        # Allocated once per batch (prompt + max_new_tokens) and written in place; the dynamic cache grows
        # by concatenation, copying itself at every step (SmolLM2 in bf16, batch 128: decoding ~15% faster).
        cache_implementation="static",
        eos_token_id=stops,
        pad_token_id=pad_id,
    )
    order = sorted(range(len(prompt_ids)), key=lambda row: len(prompt_ids[row]))
    results: list[Completion | None] = [None] * len(prompt_ids)
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    for rows in tqdm(batches, desc=progress, unit="batch", disable=progress is None):
        input_ids, attention_mask = left_pad([prompt_ids[row] for row in rows], pad_id, model.device)
        processors = LogitsProcessorList()
        if seeds is not None and not sampling.greedy:
            processors.append(SeededSampler(sampling, [seeds[row] for row in rows]))
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            logits_processor=processors,
        )
        for row, new_tokens in zip(rows, output[:, input_ids.shape[1] :].tolist(), strict=True):
            results[row] = to_completion(tokenizer, new_tokens, stops)
    return results  # type: ignore[return-value]


def to_completion(tokenizer: Any, new_tokens: list[int], stops: Sequence[int]) -> Completion:
    """Cut at the first stop token (what follows is padding) and decode what precedes it."""
    end = next((i for i, token in enumerate(new_tokens) if token in stops), None)
    kept = new_tokens if end is None else new_tokens[:end]
    text = tokenizer.decode(kept, skip_special_tokens=True).strip()
    return Completion(text, new_tokens if end is None else new_tokens[: end + 1], end is not None)


class Engine(Protocol):
    """What generates: `HFEngine` (this process) or `policy.vllm_engine.VLLMEngine` (a vLLM server)."""

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        sampling: Sampling,
        *,
        seeds: Sequence[int] | None = None,
        progress: str | None = None,
    ) -> list[Completion]: ...


@dataclass
class HFEngine:
    """`generate` on a model in this process (`engine: hf`)."""

    model: Any
    tokenizer: Any
    batch_size: int = 64
    stop_token_ids: Sequence[int] | None = None

    @property
    def dtype(self) -> str:
        """What it computes in (`float32`, `bfloat16`)."""
        return dtype_name(self.model)

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        sampling: Sampling,
        *,
        seeds: Sequence[int] | None = None,
        progress: str | None = None,
    ) -> list[Completion]:
        return generate(
            self.model,
            self.tokenizer,
            prompt_ids,
            sampling,
            seeds=seeds,
            batch_size=self.batch_size,
            stop_token_ids=self.stop_token_ids,
            progress=progress,
        )


def sample_candidates(
    engine: Engine,
    prompt_ids: Sequence[Sequence[int]],
    k: int,
    sampling: Sampling,
    *,
    seed: int,
    progress: str | None = None,
) -> list[list[Completion]]:
    """K completions per prompt. Candidate j of a prompt is seeded by `derive_seed(seed, its token ids,
    j)`: the same prompt gets the same candidates wherever it appears and however rows are batched.
    Greedy decoding generates once per prompt and repeats the completion K times."""
    copies = 1 if sampling.greedy else k
    rows = [ids for ids in prompt_ids for _ in range(copies)]
    seeds = [derive_seed(seed, list(ids), j) for ids in prompt_ids for j in range(copies)]
    completions = engine.generate(rows, sampling, seeds=seeds, progress=progress)
    return [completions[i * copies : (i + 1) * copies] * (k // copies) for i in range(len(prompt_ids))]
