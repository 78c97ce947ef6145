"""Benchmark: the `sample` stage's batched generation against generating for one prompt at a time.

Both sides use the same model, prompts and settings: K candidates per demo train prompt at
temperature 1 (top_p 1), `max_new_tokens` 32, the KV cache, stopping at eos.
- batched: `policy.generation.sample_candidates`, what the stage runs (left-padded batches of
  `--batch-size` sequences, each sequence with its own seeded sampler);
- baseline: a loop calling `model.generate(num_return_sequences=K)` for one prompt at a time;
- with `--per-sequence`, also a loop generating one sequence per call.
The two sides draw different random samples, so their responses differ a little in length: the
speedup is the ratio of throughputs (new tokens per second, eos included), with the seconds and token
counts of each side printed too. Each side is warmed up, then the sides are timed in turn
`--repeat` times and each keeps its best time (the machine may be shared).

The model is `--model DIR` (e.g. a pretrain artifact), else a demo-size model (4 layers, 128 dims)
pretrained here for `--pretrain-steps` steps on the demo corpus (300 steps: about a minute on 2 idle
cores), so that responses have realistic lengths: the base model answers "7 + 12 = 19" and stops at
eos. Prompts are rendered in the plain format it was trained on (a base model does not know the chat
format; `--prompt-format chat` for an SFT model). `--pretrain-steps 0` uses a freshly initialised
model instead: it seldom emits eos, so nearly every sequence is `max_new_tokens` long on both sides.

    .venv/bin/python bench/sampling.py [--model DIR] [--prompts 64] [--k 4] [--batch-size 128]

Prints progress, then one JSON object as its last line. Target: speedup >= 5.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.models import load_causal_lm, set_threads
from policy import pretrain
from policy.configs import PretrainConfig, SampleConfig
from policy.demo_model import build_model, train_tokenizer
from policy.generation import (
    Completion,
    HFEngine,
    Sampling,
    encode_prompts,
    sample_candidates,
    stop_ids,
    to_completion,
)
from tasks import arithmetic

TARGET = 5.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="a model directory; default: pretrain a demo model here")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--k", type=int, default=SampleConfig().k)
    parser.add_argument("--max-new-tokens", type=int, default=SampleConfig().max_new_tokens)
    parser.add_argument("--batch-size", type=int, default=SampleConfig().batch_size)
    parser.add_argument("--prompt-format", choices=("plain", "chat"), default="plain")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--per-sequence", action="store_true", help="also time one sequence per call")
    args = parser.parse_args()
    set_threads()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, described = args.model, str(args.model)
        if model_dir is None:
            model_dir, described = Path(tmp) / "model", f"demo model, {args.pretrain_steps} pretraining steps"
            make_model(model_dir, args.pretrain_steps)
        model, tokenizer = load_causal_lm(model_dir, device=torch.device("cpu"))

    records = arithmetic.train_prompts()[: args.prompts]
    prompt_ids = encode_prompts(tokenizer, [r["prompt"] for r in records], args.prompt_format)
    sampling = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens)
    sides = {
        "batched": lambda: sample_candidates(
            HFEngine(model, tokenizer, args.batch_size), prompt_ids, args.k, sampling, seed=0
        ),
        "per_prompt": lambda: per_prompt(model, tokenizer, prompt_ids, args.k, sampling, args.k),
    }
    if args.per_sequence:
        sides["per_sequence"] = lambda: per_prompt(model, tokenizer, prompt_ids, args.k, sampling, 1)

    results = time_sides(sides, records, args.repeat)
    batched, baseline = results["batched"], results["per_prompt"]
    summary = {
        "speedup": round(batched["tokens_per_s"] / baseline["tokens_per_s"], 2),
        "tokens_per_s": round(batched["tokens_per_s"], 1),
        "baseline_tokens_per_s": round(baseline["tokens_per_s"], 1),
        "target": TARGET,
        "meets_target": batched["tokens_per_s"] / baseline["tokens_per_s"] >= TARGET,
        **(
            {
                "speedup_vs_per_sequence": round(
                    batched["tokens_per_s"] / results["per_sequence"]["tokens_per_s"], 2
                )
            }
            if "per_sequence" in results
            else {}
        ),
        "sides": results,
        "prompts": len(records),
        "k": args.k,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "prompt_format": args.prompt_format,
        "model": described,
        "parameters": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "device": "cpu",
    }
    print(json.dumps(summary))


def make_model(out_dir: Path, steps: int) -> None:
    """A demo-size model: pretrained for `steps` steps with the pretrain stage, or freshly initialised."""
    out_dir.mkdir(parents=True)
    if steps > 0:
        print(f"pretraining a demo model for {steps} steps ...", file=sys.stderr)
        config = PretrainConfig(steps=steps, eval_prompts=64, task={"name": "arithmetic"})
        metrics = pretrain.run(config, {}, out_dir)
        print(f"  held-out greedy pass rate {metrics['pass_rate_greedy']:.2f}", file=sys.stderr)
        return
    config = PretrainConfig()
    tokenizer = train_tokenizer(arithmetic.pretraining_corpus(), config.vocab_size)
    torch.manual_seed(0)
    model = build_model(tokenizer, config.layers, config.hidden_size, config.intermediate_size, config.heads)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


@torch.no_grad()
def per_prompt(
    model, tokenizer, prompt_ids: list[list[int]], k: int, sampling: Sampling, per_call: int
) -> list[list[Completion]]:
    """The loop: one prompt at a time, `per_call` sequences per `generate` call (K or 1)."""
    stops = stop_ids(model, tokenizer)
    completions = []
    for ids in prompt_ids:
        input_ids = torch.tensor([ids])
        drawn: list[Completion] = []
        while len(drawn) < k:
            output = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=0,
                max_new_tokens=sampling.max_new_tokens,
                num_return_sequences=per_call,
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
            )
            drawn += [to_completion(tokenizer, row, stops) for row in output[:, len(ids) :].tolist()]
        completions.append(drawn)
    return completions


def time_sides(sides: dict, records: list[dict], repeat: int) -> dict[str, dict]:
    """Warm each side up, then time the sides in turn `repeat` times (so a burst of load from other
    processes hits them alike) and keep each side's best time; tokens and accuracy of its last run."""
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    completions = {name: run() for name, run in sides.items()}
    for _ in range(repeat):
        for name, run in sides.items():
            clock = time.perf_counter()
            completions[name] = run()
            seconds[name].append(time.perf_counter() - clock)
    return {name: describe(name, completions[name], seconds[name], records) for name in sides}


def describe(
    name: str, completions: list[list[Completion]], seconds: list[float], records: list[dict]
) -> dict:
    drawn = [c for candidates in completions for c in candidates]
    tokens = sum(len(c.token_ids) for c in drawn)
    right = sum(
        arithmetic.is_correct(c.text, r["answer"])
        for cs, r in zip(completions, records, strict=True)
        for c in cs
    )
    result = {
        "seconds": round(min(seconds), 3),
        "all_seconds": [round(s, 3) for s in seconds],
        "new_tokens": tokens,
        "tokens_per_s": tokens / min(seconds),
        "mean_tokens_per_sequence": round(tokens / len(drawn), 2),
        "finished_fraction": round(sum(c.finished for c in drawn) / len(drawn), 3),
        "accuracy": round(right / len(drawn), 3),
    }
    print(f"{name}: {json.dumps(result)}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
