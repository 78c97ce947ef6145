"""Seconds per PPO update: our `ppo` stage against TRL 1.12's experimental `PPOTrainer` (the last TRL
release that has one), on the same tiny configuration.

Both sides start from the same files and settings:
- policy: one full causal LM (default: the demo model, 4 layers x 128, built untrained from config
  here; or `--policy DIR`, e.g. an SFT adapter merged with `rlhf export --merged`), trained with a fresh
  LoRA adapter (r=16, alpha=32, every linear layer) whose disabled state is the KL reference;
- reward model: one sequence classifier (default: built from the same config with a seeded head; or
  `--reward DIR`, a reward-model artifact); the value model is a full copy of it, trained in full
  (TRL's design; our stage's `value_model: full`);
- the demo task's train prompts in the chat format; 32 rollouts per update, `--response-length` new
  tokens at most (stopping at eos), temperature 1, 4 PPO epochs of 2 minibatches (one optimizer step
  each), the same learning rates, KL coefficient 0.05, clip ranges, gamma, lambda, missing-eos penalty.

TRL runs in its own virtual environment, created here on first use (`.venv-bench-trl/`, git-ignored, or
`--trl-venv`): `pip install torch==2.13.0 'trl==1.12.*' peft`; pip resolves the same transformers, peft
and accelerate versions as ours. This project's `.venv` is not touched.

Each side runs `--updates` updates in a fresh subprocess with the same thread settings, `--repeats`
times, alternating; a side's time is the mean over its updates after the first (warm-up), and its
fastest repeat counts (other processes on the machine only ever slow a run down). Ours is also timed
with its default LoRA value model (`ours_lora_value_step_s`, not part of the ratio).

    .venv/bin/python bench/ppo_vs_trl.py [--updates 20] [--repeats 2] [--policy DIR --reward DIR]

Prints one JSON object as its last line:
{"ratio": ours_step_s / trl_step_s, "ours_step_s": ..., "trl_step_s": ..., ...}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRL_REQUIREMENTS = ["torch==2.13.0", "trl==1.12.*", "peft"]
SETTINGS = {
    "batch_size": 32,
    "minibatches": 2,
    "ppo_epochs": 4,
    "lr": 1e-4,
    "kl_coef": 0.05,
    "clip_range": 0.2,
    "value_clip_range": 0.2,
    "vf_coef": 0.1,
    "gamma": 1.0,
    "lam": 0.95,
    "temperature": 1.0,
    "missing_eos_penalty": 1.0,
    "lora_r": 16,
    "lora_alpha": 32,
    "forward_batch_size": 64,
    "seed": 0,
}
"""The settings both sides use (names: ours; the TRL side maps them to its own)."""


# --- inputs ---


def build_inputs(root: Path) -> tuple[Path, Path]:
    """The demo model (untrained) as the policy and a reward model from the same config."""
    sys.path.insert(0, str(REPO))
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from common.models import tokenizer_fingerprint
    from policy.demo_model import build_model, train_tokenizer
    from tasks import arithmetic

    tokenizer = train_tokenizer(arithmetic.pretraining_corpus())
    torch.manual_seed(0)
    model = build_model(tokenizer)
    model.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    config = LlamaConfig.from_pretrained(root / "policy")
    config.num_labels, config.id2label, config.label2id = 1, {0: "LABEL_0"}, {"LABEL_0": 0}
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(root / "reward")
    tokenizer.save_pretrained(root / "reward")
    info = {"format": "chat", "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)}
    (root / "reward" / "reward.json").write_text(json.dumps(info))
    return root / "policy", root / "reward"


def trl_python(venv: Path) -> Path:
    """The TRL 1.12 environment's python, created when missing."""
    python = venv / "bin" / "python"
    if not (venv / ".installed").exists():
        print(f"creating {venv} with {' '.join(TRL_REQUIREMENTS)}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *TRL_REQUIREMENTS], check=True)
        (venv / ".installed").write_text("\n".join(TRL_REQUIREMENTS) + "\n")
    return python


# --- the two sides (each runs in its own subprocess) ---


def ours(policy: Path, reward: Path, updates: int, response_length: int, value_model: str, out: Path) -> dict:
    sys.path.insert(0, str(REPO))
    from policy import ppo
    from policy.configs import PPOConfig

    s = SETTINGS
    config = PPOConfig(
        seed=s["seed"],
        updates=updates,
        batch_size=s["batch_size"],
        ppo_epochs=s["ppo_epochs"],
        minibatches=s["minibatches"],
        lr=s["lr"],
        value_lr=s["lr"],  # TRL trains policy and value model at one learning rate
        kl_coef=s["kl_coef"],
        clip_range=s["clip_range"],
        value_clip_range=s["value_clip_range"],
        vf_coef=s["vf_coef"],
        gamma=s["gamma"],
        lam=s["lam"],
        temperature=s["temperature"],
        missing_eos_score=-s["missing_eos_penalty"],
        max_new_tokens=response_length,
        forward_batch_size=s["forward_batch_size"],
        lora_r=s["lora_r"],
        lora_alpha=s["lora_alpha"],
        value_model=value_model,
        checkpoint_every=updates + 1,  # TRL saves nothing either
        device="cpu",
        task={"name": "arithmetic"},  # its train prompts, as the TRL side gets them
    )
    out.mkdir(parents=True, exist_ok=True)
    metrics = ppo.run(config, {"policy": policy, "reward": reward}, out)
    return {"step_s": metrics["seconds_per_update"], "reward_final": metrics["reward_final"]}


def trl(policy: Path, reward: Path, updates: int, response_length: int, out: Path) -> dict:
    """TRL 1.12's PPOTrainer on the same inputs (run with the TRL environment's python)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    sys.path.insert(0, str(REPO))
    from tasks import arithmetic  # pure Python

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    s = SETTINGS
    tokenizer = AutoTokenizer.from_pretrained(policy, padding_side="left")
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["prompt"]}], add_generation_prompt=True, tokenize=False
        )
        for r in arithmetic.train_prompts()
    ]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    dataset = Dataset.from_dict({"input_ids": ids})
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(
        reward, dtype=torch.float32, num_labels=1
    )
    value_model = AutoModelForSequenceClassification.from_pretrained(
        reward, dtype=torch.float32, num_labels=1
    )
    args = PPOConfig(
        output_dir=str(out),
        seed=s["seed"],
        total_episodes=updates * s["batch_size"],
        per_device_train_batch_size=s["batch_size"],
        gradient_accumulation_steps=1,
        num_mini_batches=s["minibatches"],
        num_ppo_epochs=s["ppo_epochs"],
        learning_rate=s["lr"],
        kl_coef=s["kl_coef"],
        cliprange=s["clip_range"],
        cliprange_value=s["value_clip_range"],
        vf_coef=s["vf_coef"],
        gamma=s["gamma"],
        lam=s["lam"],
        temperature=s["temperature"],
        missing_eos_penalty=s["missing_eos_penalty"],
        response_length=response_length,
        stop_token="eos",
        local_rollout_forward_batch_size=s["forward_batch_size"],
        num_sample_generations=0,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1,
    )
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=model,
        ref_model=None,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=dataset,
        eval_dataset=dataset.select(range(8)),
        peft_config=LoraConfig(
            task_type="CAUSAL_LM",
            r=s["lora_r"],
            lora_alpha=s["lora_alpha"],
            lora_dropout=0.0,
            target_modules="all-linear",
        ),
        callbacks=[Clock()],
    )
    trainer.train()
    steps = [b - a for a, b in itertools.pairwise(ends)][1:]  # the first update includes warm-up
    scores = [entry["objective/scores"] for entry in trainer.state.log_history if "objective/scores" in entry]
    return {"step_s": sum(steps) / len(steps), "reward_final": scores[-1] if scores else None}


# --- the driver ---


def side(python: Path, name: str, args: argparse.Namespace, policy: Path, reward: Path, work: Path) -> dict:
    out = work / f"{name}-{time.monotonic_ns()}"
    command = [
        str(python),
        str(Path(__file__).resolve()),
        "--side",
        name,
        "--policy",
        str(policy),
        "--reward",
        str(reward),
        "--updates",
        str(args.updates),
        "--response-length",
        str(args.response_length),
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
    env.update(WANDB_MODE="disabled", TRL_EXPERIMENTAL_SILENCE="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"{name} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"{name}: {report}", file=sys.stderr, flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--response-length", type=int, default=16)
    parser.add_argument("--policy", type=Path, help="a full causal LM (default: the demo model, untrained)")
    parser.add_argument("--reward", type=Path, help="a reward-model directory (default: built here)")
    parser.add_argument("--trl-venv", type=Path, default=REPO / ".venv-bench-trl")
    parser.add_argument("--side", choices=["ours", "ours-lora-value", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side is not None:  # one side, in its own process
        if args.side == "trl":
            report = trl(args.policy, args.reward, args.updates, args.response_length, args.out)
        else:
            value = "lora" if args.side == "ours-lora-value" else "full"
            report = ours(args.policy, args.reward, args.updates, args.response_length, value, args.out)
        print(json.dumps(report))
        return

    python_trl = trl_python(args.trl_venv)
    with tempfile.TemporaryDirectory(prefix="ppo-vs-trl-") as tmp:
        work = Path(tmp)
        policy, reward = args.policy, args.reward
        if policy is None or reward is None:
            built_policy, built_reward = build_inputs(work)
            policy, reward = policy or built_policy, reward or built_reward
        runs: dict[str, list[dict]] = {"ours": [], "trl": [], "ours-lora-value": []}
        for _ in range(args.repeats):
            runs["ours"].append(side(Path(sys.executable), "ours", args, policy, reward, work))
            runs["trl"].append(side(python_trl, "trl", args, policy, reward, work))
        runs["ours-lora-value"].append(
            side(Path(sys.executable), "ours-lora-value", args, policy, reward, work)
        )
    best = {name: min(r["step_s"] for r in reports) for name, reports in runs.items()}
    print(
        json.dumps(
            {
                "ratio": best["ours"] / best["trl"],
                "ours_step_s": best["ours"],
                "trl_step_s": best["trl"],
                "ours_lora_value_step_s": best["ours-lora-value"],
                "updates": args.updates,
                "repeats": args.repeats,
                "response_length": args.response_length,
                "episodes_per_update": SETTINGS["batch_size"],
                "policy": str(args.policy or "demo model, untrained"),
                "reward": str(args.reward or "built from the demo config, seeded head"),
                "ours_runs": [r["step_s"] for r in runs["ours"]],
                "trl_runs": [r["step_s"] for r in runs["trl"]],
            }
        )
    )


if __name__ == "__main__":
    main()
