"""The generation engine of a stage (`engine: hf | vllm`, `common.configs.EngineSettings`): a policy
loaded here for `generate`, or served by vLLM (`policy.vllm_engine`). Both give `generate(prompt_ids,
sampling, seeds=...)` with the same completions format, and say what they computed in (`dtype`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from common.models import compute_dtype, load_causal_lm, merged_for_inference
from common.training import SCRATCH
from policy.generation import HFEngine, Sampling, generation_stop_ids


def response_budget(prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> int:
    """The server's context length for these prompts: the longest prompt and its response, rounded up to
    a multiple of 64."""
    longest = max(len(ids) for ids in prompt_ids) + max_new_tokens
    return -(-longest // 64) * 64


@contextlib.contextmanager
def open_engine(
    config: Any,
    source: Path | str,
    tokenizer: Any,
    device: torch.device,
    out_dir: Path,
    prompt_ids: Sequence[Sequence[int]],
    sampling: Sampling,
    model: Any = None,
) -> Iterator[Any]:
    """An engine that generates from the policy `source` as `config` (an `EngineSettings` and
    `PrecisionSettings`, with a `batch_size`) says: `hf` on `model` when given (loaded here otherwise),
    `vllm` on a server (a policy it cannot load as an adapter is merged under `out_dir`'s scratch folder)
    that is stopped on exit, however the block ends."""
    dtype = compute_dtype(config.precision, device, source)
    if config.engine == "hf":
        if model is None:
            model, _ = load_causal_lm(source, device=device)
            # an adapter folded into its base generates faster
            model = merged_for_inference(model, dtype)
        yield HFEngine(model, tokenizer, config.batch_size)
        return
    from policy import vllm_engine

    served = vllm_engine.serving_form(source, out_dir / SCRATCH, config.vllm.merge_adapters)
    with vllm_engine.serve(
        served,
        config.vllm,
        dtype=str(dtype).removeprefix("torch."),
        max_model_len=response_budget(prompt_ids, sampling.max_new_tokens),
        seed=getattr(config, "seed", 0),
    ) as server:
        name = vllm_engine.adapter_name(served.adapter) if served.adapter is not None else server.base_name
        # the tokenizer's eos, as `load_causal_lm` aligns a loaded model's generation config to it
        yield vllm_engine.VLLMEngine(
            server, name, tokenizer, generation_stop_ids(None, tokenizer), str(dtype).removeprefix("torch.")
        )
