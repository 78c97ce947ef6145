"""Wall time of SFT through `rlhf run` against the same `SFTTrainer` call written directly.

Both sides run as fresh subprocesses on the same base model (the demo model: built untrained from
config here, or `--base DIR`, e.g. a pretrain artifact), with the same data (the demo task's SFT
examples), the same held-out eval slice, steps, batch size, learning rate, LoRA settings and seed:

- ours: `python -m pipeline.cli run wf.yaml` on a one-stage workflow in a fresh store, with
  `WANDB_MODE=offline` as users have it. It pays for what the pipeline adds: CLI and workflow
  validation, hashing the input, the W&B run, checkpoints every `save_steps`, hashing and publishing
  the artifact.
- direct: this script with `--direct`: builds the data set, calls `SFTTrainer` with the same TRL
  arguments and trains, no checkpoints, no W&B.

Both sides do the same work after training, because the stage does it: the eval loss on the held-out
slice (`trainer.evaluate()`), saving the adapter and tokenizer, and the task's end-of-stage check
(greedy and temperature-1 pass rate on the held-out prompts, through the same `task_pass_rates`
function, so the evaluation work is identical by construction). The ratio then measures the pipeline's overhead, not
a difference in what was computed.

Each side runs `--repeats` times, alternating, and the fastest run of each counts (other processes on
the machine only ever slow a run down). The CPU time of each side (user + system, from
`getrusage(RUSAGE_CHILDREN)`) is reported too: on a busy machine it is steadier than wall time. Choose `--steps` so that a run takes a minute or more: the
fixed costs (process start, imports, the W&B run) are then a few percent.

    .venv/bin/python bench/sft_overhead.py [--steps 1000] [--repeats 2] [--base DIR]

Prints one JSON object as its last line: {"ratio": ours/direct, "ours_s": ..., "direct_s": ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def direct(base: Path, steps: int, out_dir: Path) -> None:
    """The same SFT, written directly against TRL."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    import tasks
    from policy.evaluate import task_pass_rates

    config = stage_config(steps)
    task = tasks.load(config["task"])
    dataset = Dataset.from_list(task.sft_examples())
    parts = dataset.train_test_split(test_size=config["eval_examples"], seed=config["seed"])
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(out_dir / "trainer"),
            seed=config["seed"],
            max_steps=steps,
            per_device_train_batch_size=config["batch_size"],
            per_device_eval_batch_size=config["batch_size"],
            learning_rate=config["lr"],
            lr_scheduler_type="cosine",
            warmup_steps=config["warmup_ratio"],
            max_length=1024,
            completion_only_loss=True,
            activation_checkpointing=False,
            bf16=False,
            use_cpu=not torch.cuda.is_available(),
            eval_strategy="no",
            logging_steps=10,
            save_strategy="no",
            report_to="none",
            disable_tqdm=False,
        ),
        train_dataset=parts["train"],
        eval_dataset=parts["test"],
        processing_class=tokenizer,
        peft_config=LoraConfig(
            task_type="CAUSAL_LM",
            r=config["lora_r"],
            lora_alpha=config["lora_alpha"],
            target_modules="all-linear",
        ),
    )
    trainer.train()
    trainer.evaluate()
    trainer.model.save_pretrained(out_dir / "adapter")
    tokenizer.save_pretrained(out_dir / "adapter")
    measured = task_pass_rates(trainer.model, tokenizer, task, config["task_eval_samples"], config["seed"])
    print(json.dumps(measured))


def stage_config(steps: int) -> dict:
    """The stage's config for this benchmark: its defaults, with `steps` set."""
    from policy.configs import SFTConfig

    return SFTConfig(steps=steps, task={"name": "arithmetic"}).model_dump()


def build_base(out_dir: Path) -> Path:
    import torch

    from policy.demo_model import build_model, train_tokenizer
    from tasks import arithmetic

    tokenizer = train_tokenizer(arithmetic.pretraining_corpus())
    torch.manual_seed(0)
    build_model(tokenizer).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the subprocess and the children it waited for, its stdout)."""
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return seconds, cpu, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--base", type=Path, help="base model directory (default: the demo model, untrained)")
    parser.add_argument("--direct", type=Path, metavar="OUT_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.direct:
        direct(args.base, args.steps, args.direct)
        return

    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO),
    }
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        env.pop(var, None)
    ours, theirs, ours_cpu, theirs_cpu = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="sft-overhead-") as tmp:
        work = Path(tmp)
        base = args.base.resolve() if args.base else build_base(work / "base")
        for repeat in range(args.repeats):
            run_dir = work / f"ours-{repeat}"
            run_dir.mkdir()
            (run_dir / "wf.yaml").write_text(
                "name: overhead\ntask: {name: arithmetic}\nstages:\n  sft:\n"
                f"    inputs: {{model: {base}}}\n    config: {{steps: {args.steps}}}\n"
            )
            run_env = {**env, "RLHF_STORE": str(run_dir / "artifacts"), "RLHF_RUNS": str(run_dir / "runs")}
            seconds, cpu, _ = timed(
                [sys.executable, "-m", "pipeline.cli", "run", "wf.yaml"], run_dir, run_env
            )
            ours.append(seconds)
            ours_cpu.append(cpu)
            manifest = json.loads((run_dir / "artifacts" / "sft" / "v1" / "manifest.json").read_text())
            command = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--base",
                str(base),
                "--steps",
                str(args.steps),
                "--direct",
                str(work / f"direct-{repeat}"),
            ]
            seconds, cpu, output = timed(command, work, env)
            theirs.append(seconds)
            theirs_cpu.append(cpu)
            print(f"repeat {repeat}: ours {ours[-1]:.1f}s, direct {theirs[-1]:.1f}s", file=sys.stderr)
    metrics = manifest["metrics"]
    direct_accuracy = json.loads(output.strip().splitlines()[-1])
    print(
        json.dumps(
            {
                "ratio": round(min(ours) / min(theirs), 3),
                "ours_s": round(min(ours), 2),
                "direct_s": round(min(theirs), 2),
                "ours_all_s": [round(s, 2) for s in ours],
                "direct_all_s": [round(s, 2) for s in theirs],
                "cpu_ratio": round(min(ours_cpu) / min(theirs_cpu), 3),
                "ours_cpu_s": round(min(ours_cpu), 2),
                "direct_cpu_s": round(min(theirs_cpu), 2),
                "steps": args.steps,
                "base": "given" if args.base else "demo model, untrained",
                "ours_pass_rate_greedy": metrics.get("pass_rate_greedy"),
                "direct_pass_rate_greedy": direct_accuracy["pass_rate_greedy"],
                "ours_train_seconds": round(metrics["train_seconds"], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
