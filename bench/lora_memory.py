"""Peak memory of training a ~110M-parameter Llama in full against LoRA, through the SFT stage's trainer.

The model: 32k vocabulary, 12 blocks of hidden size 768 (MLP 2048, 12 heads), tied embeddings, fp32,
built from config. Each run is a fresh subprocess that imports what training needs, builds the model and
the SFT stage's own trainer (`policy.sft.build_trainer`: TRL's `SFTTrainer` with the stage's arguments,
loss chunks and, for `lora`, its rank-16 adapter on every linear layer of the blocks, the base frozen),
and trains `--steps` steps on random sequences of `--seq-len` tokens (batch 1 x 128) as `text` data.
`full` trains every weight with the same trainer (AdamW: two float32 moments per weight).

Both modes run twice, with the same `SFTConfig` memory settings each time:
- `lean` (the figures at the top level): `loss_chunk_size` at its default (0: by device, 4096
  vocabulary entries per chunk of the loss on a CPU, 32768 on a GPU) and `gradient_checkpointing: true`;
- `plain` (under `"plain"`): the settings this project trained with before: TRL's chunk size (32768, the
  whole 32k vocabulary at once) and no gradient checkpointing.
Each run logs its loss and gradient norm at every step; `loss_max_abs_diff` (`grad_norm_max_rel_diff`)
is the largest difference between the losses (relative difference between the gradient norms) of the
same steps with and without the memory settings: the same numbers, to float rounding.

`ratio` (the acceptance figure) is full/LoRA of the peak memory of training: on a GPU
`torch.cuda.max_memory_allocated`; on a CPU the rise of the process's peak resident set size over its
size after the imports, before the model is built (`policy.sft.PeakMemory`, what the SFT stage reports as
`peak_memory_mb`). So the model's weights count, and the interpreter and libraries (`baseline_mb`, the
same in both modes) do not, as on a GPU. Until 2026-12-02 `ratio` was the ratio of the whole processes'
peak resident sets, libraries included (2.11-2.14), around a plain `model(input_ids, labels=...)` step
with the full logits rather than the stage's trainer. The whole processes' ratio is still reported, as
`raw_ratio` (their peak resident sets: `full_rss_mb`, `lora_rss_mb`; on a GPU the same as `ratio`).

    .venv/bin/python bench/lora_memory.py [--steps 3] [--seq-len 128]

Prints one JSON object as its last line: {"ratio": full/lora, "full_mb": ..., "lora_mb": ..., ...}.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

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
SETTINGS = {
    "lean": {"gradient_checkpointing": True},  # loss_chunk_size: the stage's default
    "plain": {"gradient_checkpointing": False, "loss_chunk_size": 32768},
}
"""The memory settings of each run (`SFTConfig` fields); anything not named is the stage's default."""
SPECIALS = ["<unk>", "<pad>", "</s>"]


def worker(mode: str, settings: str, steps: int, seq_len: int) -> dict:
    """Train `steps` steps in this process through the SFT stage's trainer and report its peak memory."""
    import peft  # noqa: F401  (imported before the baseline, as the stage has it imported)
    import torch
    import trl.trainer.utils as fused_head
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    from common.models import pick_device, set_threads
    from policy import sft
    from policy.configs import SFTConfig

    config = SFTConfig(
        method=mode,
        steps=steps,
        batch_size=1,
        max_length=seq_len,
        eval_examples=0,
        logging_steps=1,
        precision="float32",  # the figure compares memory in float32, as the PEFT table it follows
        **SETTINGS[settings],
    )
    device = pick_device(config.device)
    set_threads(config.cpu_threads)
    tokenizer = random_token_tokenizer()
    rng = random.Random(0)
    texts = [
        " ".join(f"t{rng.randrange(len(SPECIALS), MODEL['vocab_size'])}" for _ in range(seq_len - 1))
        for _ in range(steps)
    ]  # the trainer appends eos: seq_len tokens each
    data = Dataset.from_list([{"text": text} for text in texts])
    masking = sft.loss_mask(tokenizer, "text", config)

    import_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    memory = sft.PeakMemory(device)  # the baseline: everything imported, nothing built
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL)).to(device)
    parameters = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as scratch:
        trainer = sft.build_trainer(config, model, tokenizer, data, None, masking, device, Path(scratch))
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    peak_mb, method = memory.peak_mb()
    cuda = device.type == "cuda"
    baseline_mb = 0.0 if cuda else memory.baseline_kb / 1024
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {
        "peak_mb": peak_mb,
        "rss_mb": peak_mb if cuda else max(import_peak_mb, baseline_mb + peak_mb),
        "baseline_mb": baseline_mb,
        "method": method,
        "parameters": parameters,
        "trainable": trainable,
        "tokens_per_step": trainer.state.num_input_tokens_seen / steps,
        "seconds_per_step": seconds / steps,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "grad_norms": [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry],
        "settings": {
            "loss_chunk_size": fused_head._CHUNKED_LOGPROB_CHUNK_SIZE,  # as set by the stage's trainer
            "gradient_checkpointing": config.gradient_checkpointing,
        },
    }


def random_token_tokenizer() -> object:
    """A word-level tokenizer whose words `t3` ... `t31999` are the model's token ids, so random text is a
    random token sequence over the whole vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + [f"t{i}" for i in range(len(SPECIALS), MODEL["vocab_size"])]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="</s>"
    )


def measure(mode: str, settings: str, steps: int, seq_len: int) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, settings]
    command += ["--steps", str(steps), "--seq-len", str(seq_len)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{mode} ({settings}) failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratios(full: dict, lora: dict) -> dict:
    return {
        "ratio": round(full["peak_mb"] / lora["peak_mb"], 3),
        "full_mb": round(full["peak_mb"], 1),
        "lora_mb": round(lora["peak_mb"], 1),
        "raw_ratio": round(full["rss_mb"] / lora["rss_mb"], 3),
        "full_rss_mb": round(full["rss_mb"], 1),
        "lora_rss_mb": round(lora["rss_mb"], 1),
        "seconds_per_step_full": round(full["seconds_per_step"], 3),
        "seconds_per_step_lora": round(lora["seconds_per_step"], 3),
        "settings": full["settings"],
    }


def largest_difference(runs: dict, mode: str, key: str, relative: bool = False) -> float:
    """The largest difference of `key` (a value per step) between the same steps with and without the memory
    settings; relative to the value without them when `relative`."""
    pairs = list(zip(runs[mode, "lean"][key], runs[mode, "plain"][key], strict=True))
    return max(abs(a - b) / (abs(b) if relative else 1) for a, b in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "SETTINGS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.seq_len)))
        return
    runs = {
        (mode, settings): measure(mode, settings, args.steps, args.seq_len)
        for settings in SETTINGS
        for mode in ("full", "lora")
    }
    lean, plain = (ratios(runs["full", s], runs["lora", s]) for s in SETTINGS)
    result = {
        **lean,
        "plain": plain,
        "loss_max_abs_diff": {mode: largest_difference(runs, mode, "losses") for mode in ("full", "lora")},
        "grad_norm_max_rel_diff": {
            mode: largest_difference(runs, mode, "grad_norms", relative=True) for mode in ("full", "lora")
        },
        "losses": {f"{mode}_{settings}": run["losses"] for (mode, settings), run in runs.items()},
        "baseline_mb": round(max(run["baseline_mb"] for run in runs.values()), 1),
        "method": runs["full", "lean"]["method"],
        "parameters": runs["full", "lean"]["parameters"],
        "trainable_full": runs["full", "lean"]["trainable"],
        "trainable_lora": runs["lora", "lean"]["trainable"],
        "batch": f"1 x {runs['full', 'lean']['tokens_per_step']:.0f} tokens",
        "steps": args.steps,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
