"""The `ppo` stage: its arithmetic against hand-computed examples, its guards, its models (reference,
value model, reward scoring), a short run on tiny models, and resuming after `kill -9`."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForSequenceClassification

from common.models import load_causal_lm, save_model, tokenizer_fingerprint
from common.outcomes import InputError
from common.reward_model import REWARD_FILE, check_reward_status, load_reward_model, score_batch
from pipeline.store import Store
from policy import ppo, ppo_math
from policy.configs import PPOConfig
from policy.demo_model import build_model, train_tokenizer
from tasks import arithmetic
from tests.conftest import REPO, publish_reward_model, rlhf, wait_until

FAST = {
    "updates": 2,
    "batch_size": 4,
    "minibatches": 2,
    "ppo_epochs": 2,
    "max_new_tokens": 6,
    "task": {"name": "arithmetic"},
}
"""A couple of tiny updates: enough to exercise every step, nothing to learn from."""


# --- tiny inputs ---


def reward_model_from(base: Path, out_dir: Path, seed: int = 1) -> Path:
    """A reward-model directory built from the base's config: a sequence classifier with a random head."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    config = LlamaConfig.from_pretrained(base)
    config.num_labels, config.id2label, config.label2id = 1, {0: "LABEL_0"}, {"LABEL_0": 0}
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    info = {"format": "chat", "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)}
    (out_dir / REWARD_FILE).write_text(json.dumps(info))
    return out_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> SimpleNamespace:
    """A tiny untrained demo model (`base`), an SFT-like LoRA adapter on it with non-zero weights
    (`sft`) and a reward model from the same base (`reward`)."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = train_tokenizer(arithmetic.pretraining_corpus())
    torch.manual_seed(0)
    model = build_model(tokenizer, layers=2, hidden_size=32, intermediate_size=64, heads=2)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    adapter = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, parameter in adapter.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)  # an adapter that changes the model, like a trained one
    save_model(adapter, tokenizer, root / "sft", base=root / "base")
    reward_model_from(root / "base", root / "reward")
    return SimpleNamespace(root=root, base=root / "base", sft=root / "sft", reward=root / "reward")


# --- the arithmetic ---


def test_gae_matches_a_hand_computed_example():
    # Row 1: three tokens, gamma 1, lambda 0.5.
    #   t=2: delta = 1 + 0 - 0.7 = 0.3                 A = 0.3
    #   t=1: delta = 0 + 0.7 - 0.6 = 0.1               A = 0.1 + 0.5 * 0.3 = 0.25
    #   t=0: delta = 0 + 0.6 - 0.5 = 0.1               A = 0.1 + 0.5 * 0.25 = 0.225
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    advantages, returns = ppo_math.gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5)
    assert torch.allclose(advantages, torch.tensor([[0.225, 0.25, 0.3]]))
    assert torch.allclose(returns, torch.tensor([[0.725, 0.85, 1.0]]))

    # Row 2: two tokens then padding (whose reward and value must not leak in), gamma 0.9, lambda 0.8.
    #   t=1: delta = 1 + 0 - 2 = -1                    A = -1
    #   t=0: delta = 0.2 + 0.9 * 2 - 1 = 1             A = 1 + 0.9 * 0.8 * -1 = 0.28
    rewards = torch.tensor([[0.2, 1.0, 9.0]])
    values = torch.tensor([[1.0, 2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    advantages, returns = ppo_math.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert torch.allclose(advantages, torch.tensor([[0.28, -1.0, 0.0]]))
    assert torch.allclose(returns, torch.tensor([[1.28, 1.0, 0.0]]))


def test_kl_penalty_is_per_token_and_the_score_comes_at_the_last_token():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5, -3.0], [-2.0, -1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    rewards, kl = ppo_math.token_rewards(torch.tensor([2.0, -1.0]), logprobs, ref_logprobs, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    expected = torch.tensor([[-0.05, 0.1, 2.0, 0.0], [-0.1 - 1.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(rewards, expected)


def test_missing_eos_gets_the_fixed_score_and_the_others_are_normalized():
    raw = torch.tensor([3.0, 1.0, 5.0])
    finished = torch.tensor([True, True, False])
    scores = ppo_math.final_scores(raw, finished, mean=1.0, std=2.0, missing_eos_score=-3.0)
    assert scores.tolist() == [1.0, 0.0, -3.0]
    unpenalized = ppo_math.final_scores(raw, finished, mean=0.0, std=1.0, missing_eos_score=None)
    assert unpenalized.tolist() == [3.0, 1.0, 5.0]


def test_policy_loss_clips_the_ratio():
    old = torch.zeros(1, 2)
    new = torch.tensor([[math.log(1.5), math.log(1.5)]], requires_grad=True)
    advantages = torch.tensor([[1.0, -1.0]])
    result = ppo_math.policy_loss(new, old, advantages, torch.ones(1, 2), clip_range=0.2)
    # A > 0: ratio 1.5 is clipped to 1.2 (-1.2 > -1.5); A < 0: the unclipped 1.5 is the larger loss.
    assert result.loss.item() == pytest.approx((-1.2 + 1.5) / 2)
    assert result.clip_fraction.item() == pytest.approx(0.5)
    assert result.approx_kl.item() == pytest.approx(0.5 * math.log(1.5) ** 2)
    result.loss.backward()
    assert new.grad[0, 0].item() == 0.0  # the clipped token gives no gradient
    assert new.grad[0, 1].item() == pytest.approx(1.5 / 2)  # d(-A * ratio)/d(log pi) / tokens


def test_value_loss_clips_the_value_change():
    old = torch.tensor([[0.0, 0.0]])
    values = torch.tensor([[1.0, 0.1]], requires_grad=True)
    returns = torch.tensor([[2.0, 1.0]])
    result = ppo_math.value_loss(values, old, returns, torch.ones(1, 2), clip_range=0.2)
    # Token 1: unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> 3.24; token 2: both (0.1-1)^2 = 0.81.
    assert result.loss.item() == pytest.approx(0.5 * (3.24 + 0.81) / 2)
    assert result.clip_fraction.item() == pytest.approx(0.5)
    result.loss.backward()
    assert values.grad[0, 0].item() == 0.0


def test_whiten_and_running_moments():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    white = ppo_math.whiten(x, mask)
    assert white[mask.bool()].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert white[~mask.bool()].abs().sum().item() == 0.0
    moments = ppo_math.RunningMoments()
    batches = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0]), torch.tensor([-4.0, 0.5])]
    for batch in batches:
        moments.update(batch)
    everything = torch.cat(batches).double()
    assert moments.mean == pytest.approx(everything.mean().item())
    assert moments.std == pytest.approx(everything.std().item())


# --- guards ---


def test_refuses_a_reward_model_with_another_chat_template(tiny, tmp_path):
    other = reward_model_from(tiny.base, tmp_path / "other-reward")
    config_file = other / "tokenizer_config.json"
    template = (other / "chat_template.jinja").read_text()
    (other / "chat_template.jinja").write_text(template.replace("<|assistant|>", "Assistant: "))
    assert config_file.exists()
    with pytest.raises(InputError) as error:
        ppo.run(PPOConfig(**FAST), {"policy": tiny.sft, "reward": other}, tmp_path / "out")
    message = str(error.value)
    assert str(tiny.sft) in message and str(other) in message and "chat template" in message


def test_refuses_a_rejected_reward_model_unless_allowed(tiny, tmp_path):
    rejected = reward_model_from(tiny.base, tmp_path / "rejected-reward")
    manifest = {"ref": "reward:v3", "status": "rejected", "status_reason": "held-out accuracy 0.51 < 0.6"}
    (rejected / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"reward:v3 was rejected .*accuracy 0\.51.*allow_rejected_reward"):
        ppo.run(PPOConfig(**FAST), {"policy": tiny.sft, "reward": rejected}, tmp_path / "out")
    check_reward_status(rejected, allow_rejected=True, stage="ppo")  # allowed: no error


def test_config_checks_minibatches_divide_the_batch():
    with pytest.raises(ValueError, match="not a multiple of minibatches"):
        PPOConfig(batch_size=10, minibatches=4)


# --- the models ---


def test_reference_is_the_frozen_sft_adapter(tiny):
    policy, base = ppo.load_policy(tiny.sft, PPOConfig(), torch.device("cpu"), torch.float32)
    assert base == tiny.base
    sft, _ = load_causal_lm(tiny.sft)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name and ".default." in name:
                parameter.add_(0.5)  # PPO has moved the policy
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    with torch.no_grad():
        moved = policy(input_ids=ids).logits
        with ppo.reference_policy(policy):
            reference = policy(input_ids=ids).logits
        expected = sft(input_ids=ids).logits
    assert torch.allclose(reference, expected, atol=1e-5)
    assert not torch.allclose(moved, expected, atol=1e-3)
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in name for name in trainable)


def test_rewards_are_scored_by_the_unchanged_reward_model(tiny):
    config = PPOConfig()
    critic, scorer, mode = ppo.load_value_model(tiny.reward, config, torch.device("cpu"), torch.float32)
    assert mode == "lora" and scorer is critic
    with torch.no_grad():
        for parameter in critic.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3)  # training has moved the value model, head copy included
    plain, tokenizer = load_reward_model(tiny.reward)
    prompts, responses = ["What is 1 + 2?", "What is 3 + 4?"], ["1 + 2 = 3", "3 + 4 = 8"]
    expected = score_batch(plain, tokenizer, prompts, responses)
    with critic.disable_adapter():
        scored = score_batch(critic, tokenizer, prompts, responses)
    moved = score_batch(critic, tokenizer, prompts, responses)
    assert scored == pytest.approx(expected, abs=1e-5)
    assert moved != pytest.approx(expected, abs=1e-3)


def test_rollout_log_probs_do_not_depend_on_padding(tiny):
    """Left padding (with position ids from the mask) gives each row what it gets alone."""
    policy, _ = ppo.load_policy(tiny.sft, PPOConfig(), torch.device("cpu"), torch.float32)
    critic, _, _ = ppo.load_value_model(tiny.reward, PPOConfig(), torch.device("cpu"), torch.float32)
    model = ppo.PolicyAndValue(policy, critic)
    rows = [([1, 40, 41, 42, 43, 44], [50, 51, 2]), ([1, 45], [52, 2])]

    def forward(pairs):
        prompts = [p for p, _ in pairs]
        width = max(len(r) for _, r in pairs)
        from policy.generation import left_pad

        ids, prompt_mask = left_pad(prompts, 0)
        responses = torch.zeros(len(pairs), width, dtype=torch.long)
        mask = torch.zeros(len(pairs), width, dtype=torch.long)
        for i, (_, r) in enumerate(pairs):
            responses[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        attention = torch.cat([prompt_mask, mask], dim=1)
        positions = (attention.cumsum(1) - 1).clamp(min=0)
        with torch.no_grad():
            logits, values = model(torch.cat([ids, responses], 1), attention, positions, width)
        return ppo_math.token_logprobs(logits, responses, 1.0), values

    together, values = forward(rows)
    for i, row in enumerate(rows):
        alone, alone_values = forward([row])
        n = len(row[1])
        assert torch.allclose(together[i, :n], alone[0, :n], atol=1e-5)
        assert torch.allclose(values[i, :n], alone_values[0, :n], atol=1e-5)


# --- runs ---


def test_a_short_run_trains_the_adapter_and_logs_each_update(tiny, tmp_path, monkeypatch):
    logged = []
    fake_wandb = SimpleNamespace(
        run=SimpleNamespace(log=logged.append), Table=lambda columns, data: {"columns": columns, "data": data}
    )
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    config = PPOConfig(**FAST, checkpoint_every=1)
    metrics = ppo.run(config, {"policy": tiny.sft, "reward": tiny.reward}, out_dir)

    assert metrics["updates"] == 2 and metrics["episodes"] == 8
    assert metrics["resumed_from_update"] is None
    assert 0 <= metrics["pass_rate_sampled"] <= 1 and 0 <= metrics["pass_rate_sampled_initial"] <= 1
    assert len(logged) == 3  # two updates, then a table of the last rollouts
    table = logged[2]["ppo/rollouts"]
    assert table["columns"][:2] == ["prompt", "response"] and len(table["data"]) == 4
    expected_keys = {
        "reward",
        "kl",
        "entropy",
        "policy_clip_fraction",
        "value_clip_fraction",
        "value_loss",
        "policy_loss",
        "approx_kl",
        "response_length",
        "eos_rate",
        "pass_rate",
    }
    assert {f"ppo/{key}" for key in expected_keys} <= set(logged[0])
    assert logged[0]["ppo/kl"] == pytest.approx(0.0, abs=1e-5)  # the first rollouts are the reference's

    # The output is an adapter on the SFT policy's base, and training changed it.
    assert json.loads((out_dir / "base.json").read_text())["path"] == str(tiny.base.resolve())
    trained, _ = load_causal_lm(out_dir)
    sft, _ = load_causal_lm(tiny.sft)
    trained_lora = {k: v for k, v in trained.state_dict().items() if "lora_B" in k}
    sft_lora = sft.state_dict()
    assert trained_lora and any(not torch.equal(v, sft_lora[k]) for k, v in trained_lora.items())
    assert not (out_dir / "reference").exists()  # the frozen reference copy is not saved
    assert (out_dir / ppo.SCRATCH / "checkpoint-1" / ppo.STATE_FILE).is_file()
    assert len(json.loads((out_dir / ppo.HISTORY_FILE).read_text())["history"]) == 2


def test_a_full_model_policy_gets_a_fresh_adapter_and_a_full_value_model(tiny, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    config = PPOConfig(**{**FAST, "updates": 1}, value_model="full", lora_r=2)
    metrics = ppo.run(config, {"policy": tiny.base, "reward": tiny.reward}, out_dir)
    assert metrics["updates"] == 1
    adapter_config = json.loads((out_dir / "adapter_config.json").read_text())
    assert adapter_config["r"] == 2
    model, _ = load_causal_lm(out_dir)  # loads on its base
    assert model.peft_config["default"].r == 2


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(tiny, workspace):
    """`rlhf run` killed with SIGKILL mid-run: the rerun resumes from the last checkpoint and the
    published policy reports exactly the configured number of updates."""
    publish_reward_model(workspace, tiny.reward)
    updates = 30
    workflow = workspace / "wf.yaml"
    workflow.write_text(
        "name: ppo-resume\n"
        "task: {name: arithmetic}\n"
        "stages:\n"
        "  ppo:\n"
        f"    inputs: {{policy: {tiny.sft}, reward: 'rm:v1'}}\n"
        f"    config: {{updates: {updates}, batch_size: 4, minibatches: 2, ppo_epochs: 1,\n"
        "              max_new_tokens: 6, checkpoint_every: 3}\n"
    )
    env = {**os.environ, "WANDB_MODE": "disabled"}
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", str(workflow)],
        cwd=workspace,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    staging = workspace / "artifacts" / ".staging"

    def checkpointed() -> list[Path]:
        assert process.poll() is None, "the run ended before its first checkpoint"
        return list(staging.glob("ppo-*/scratch/checkpoint-*"))

    wait_until(checkpointed, 300, "no checkpoint within 5 minutes", interval=0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (workspace / "artifacts" / "ppo").exists()  # nothing was published
    checkpoints = sorted(int(p.name.split("-")[1]) for p in staging.glob("ppo-*/scratch/checkpoint-*"))
    assert checkpoints and checkpoints[-1] < updates

    result = rlhf("run", str(workflow), cwd=workspace, env={"WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"ppo: resuming from update (\d+) of 30", result.stdout)
    assert match, result.stdout
    assert int(match.group(1)) == checkpoints[-1]
    manifest = json.loads((workspace / "artifacts" / "ppo" / "v1" / "manifest.json").read_text())
    assert manifest["metrics"]["updates"] == updates
    assert manifest["metrics"]["resumed_from_update"] == checkpoints[-1]
    assert (
        len(json.loads((workspace / "artifacts" / "ppo" / "v1" / ppo.HISTORY_FILE).read_text())["history"])
        == updates
    )
    assert not [p for p in staging.glob("ppo-*") if p.is_dir()]  # the scratch space went with publishing


@pytest.mark.slow
def test_two_processes_under_torchrun(tiny, workspace):
    """`rlhf run --only ppo` under torchrun with two CPU processes (gloo): they share one run and one
    cache decision, both train (DDP), and only the main process publishes one artifact."""
    store = publish_reward_model(workspace, tiny.reward)
    workflow = workspace / "wf.yaml"
    config = json.dumps({**FAST, "checkpoint_every": 1})  # JSON is YAML
    workflow.write_text(
        f"stages:\n  ppo:\n    inputs: {{policy: {tiny.sft}, reward: 'rm:v1'}}\n    config: {config}\n"
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "pipeline.cli"]
    result = subprocess.run(
        [*command, "run", str(workflow), "--only", "ppo"],
        cwd=workspace,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert Store(workspace / "artifacts").versions("ppo") == [1]
    manifest = Store(workspace / "artifacts").get("ppo:v1").manifest
    assert manifest["metrics"]["processes"] == 2
    assert manifest["metrics"]["episodes"] == 2 * FAST["updates"] * FAST["batch_size"]
    assert result.stdout.count("ppo:v1") >= 1 and result.stdout.count("running") == 1  # rank 0 speaks
    history = json.loads((store.get("ppo:v1").path / ppo.HISTORY_FILE).read_text())["history"]
    assert len(history) == FAST["updates"]

    again = subprocess.run(
        [*command, "run", str(workflow), "--only", "ppo"],
        cwd=workspace,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0 and "cached" in again.stdout, again.stdout[-3000:] + again.stderr[-3000:]
    assert Store(workspace / "artifacts").versions("ppo") == [1]


def test_a_multi_process_launch_needs_one_distributed_stage(workspace):
    (workspace / "wf.yaml").write_text("stages:\n  pretrain: {}\n")
    result = rlhf("run", "wf.yaml", cwd=workspace, env={"WORLD_SIZE": "2", "RANK": "0"})
    assert result.returncode == 2
    assert "use --only with one of: none" in result.stderr


@pytest.mark.parametrize("name", ["multi_gpu.yaml", "deepspeed_zero2.yaml"])
def test_shipped_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(REPO / "workflows" / "accelerate" / name))
    expected = DistributedType.DEEPSPEED if "deepspeed" in name else DistributedType.MULTI_GPU
    assert config.distributed_type == expected and config.num_processes >= 2
    if expected == DistributedType.DEEPSPEED:
        assert config.deepspeed_config["zero_stage"] == 2
