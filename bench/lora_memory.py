"""Peak memory of full fine-tuning against LoRA on a ~110M-parameter Llama built from config.

The model: 32k vocabulary, 12 blocks of hidden size 768 (MLP 2048, 12 heads), tied embeddings, fp32.
Each mode runs in a fresh subprocess that builds the model, then trains a few AdamW steps on one
random sequence of 128 tokens (batch 1 x 128): `full` trains every weight; `lora` trains rank-16
adapters on every linear layer of the blocks (PEFT), the base frozen. On CUDA the peak is
`torch.cuda.max_memory_allocated`; on CPU it is the subprocess's peak resident set size
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`), which also counts the interpreter and libraries
(`baseline_mb`: the resident size after imports, before the model is built), so the ratio of the
peaks understates the ratio of what training itself needs (`training_ratio`).

    .venv/bin/python bench/lora_memory.py [--steps 3] [--seq-len 128]

Prints one JSON object as its last line: {"ratio": full/lora, "full_mb": ..., "lora_mb": ..., ...}.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

MODEL = {
    "vocab_size": 32000,
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}


def worker(mode: str, steps: int, seq_len: int) -> dict:
    """Train `steps` steps in this process and report its peak memory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL)).to(device)
    parameters = sum(p.numel() for p in model.parameters())
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules="all-linear")
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    batch = torch.randint(0, MODEL["vocab_size"], (1, seq_len), device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model.train()
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    if cuda:
        peak_mb, method = torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
    else:
        peak_mb, method = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak RSS (getrusage ru_maxrss) of a fresh subprocess per mode",
        )
    return {
        "peak_mb": peak_mb,
        "baseline_mb": 0.0 if cuda else baseline_mb,
        "method": method,
        "parameters": parameters,
        "trainable": sum(p.numel() for p in trainable),
        "seconds_per_step": seconds / steps,
        "loss": loss.item(),
    }


def measure(mode: str, steps: int, seq_len: int) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        mode,
        "--steps",
        str(steps),
        "--seq-len",
        str(seq_len),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--worker", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.seq_len)))
        return
    full, lora = measure("full", args.steps, args.seq_len), measure("lora", args.steps, args.seq_len)
    result = {
        "ratio": round(full["peak_mb"] / lora["peak_mb"], 3),
        "full_mb": round(full["peak_mb"], 1),
        "lora_mb": round(lora["peak_mb"], 1),
        "baseline_mb": round(max(full["baseline_mb"], lora["baseline_mb"]), 1),
        "training_ratio": round(
            (full["peak_mb"] - full["baseline_mb"]) / (lora["peak_mb"] - lora["baseline_mb"]), 3
        ),
        "method": full["method"],
        "parameters": full["parameters"],
        "trainable_full": full["trainable"],
        "trainable_lora": lora["trainable"],
        "batch": f"1 x {args.seq_len} tokens",
        "steps": args.steps,
        "seconds_per_step_full": round(full["seconds_per_step"], 3),
        "seconds_per_step_lora": round(lora["seconds_per_step"], 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
