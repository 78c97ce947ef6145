"""The `rloo` and `grpo` stages on tiny demo policies with a tiny reward model or the task's verdict (CPU, a few
steps)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

import tasks
from common.models import is_adapter, load_causal_lm
from common.outcomes import InputError
from common.reward_model import check_reward_status, load_reward_model, score_batch
from pipeline.registry import STAGES
from policy import online_rl
from policy.configs import GRPOConfig, RLOOConfig
from tasks import arithmetic
from tests import tiny_policies

ARITHMETIC = {"name": "arithmetic"}

FAST = {
    "steps": 2,
    "num_generations": 2,
    "batch_size": 4,
    "max_new_tokens": 6,
    "num_prompts": 8,
    "logging_steps": 1,
    "lora_r": 4,
    "lr": 1e-2,
    "task_eval": False,
    "device": "cpu",
    "task": ARITHMETIC,
}
CONFIGS = {"rloo": RLOOConfig, "grpo": GRPOConfig}
RUNS = {"rloo": online_rl.run_rloo, "grpo": online_rl.run_grpo}


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory) -> Path:
    return tiny_policies.reward_model(tmp_path_factory.mktemp("reward"))


@pytest.mark.parametrize("stage", ["rloo", "grpo"])
def test_trains_a_few_steps_and_writes_a_complete_policy(stage, sft_adapter, reward_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    metrics = RUNS[stage](CONFIGS[stage](**FAST), {"policy": sft_adapter, "reward": reward_dir}, out)
    assert metrics["steps"] == 2 and metrics["completions"] == 8 and metrics["prompts"] == 8
    for key in (
        "reward_first",
        "reward_last",
        "kl_last",
        "completion_length_last",
        "train_pass_rate_last",
    ):
        assert isinstance(metrics[key], float), key
    assert not is_adapter(out)
    load_causal_lm(out, device=torch.device("cpu"))  # loads as a complete model
    before, after = tiny_policies.state(sft_adapter), tiny_policies.state(out)
    assert any(not torch.equal(before[name], after[name]) for name in before)
    assert json.loads((out / "policy.json").read_text())["stage"] == stage


@pytest.mark.parametrize("stage", ["rloo", "grpo"])
def test_a_reward_model_with_another_chat_template_is_refused(stage, sft_adapter, tmp_path):
    other = tiny_policies.reward_model(tmp_path / "reward", chat_template="{{ messages[0]['content'] }}")
    with pytest.raises(InputError, match="chat template"):
        RUNS[stage](CONFIGS[stage](**FAST), {"policy": sft_adapter, "reward": other}, tmp_path / "out")


@pytest.mark.parametrize("stage", ["rloo", "grpo"])
def test_a_rejected_reward_model_is_refused_unless_allowed(stage, sft_adapter, reward_dir, tmp_path):
    rejected = tmp_path / "reward"
    shutil.copytree(reward_dir, rejected)
    manifest = {"ref": "reward:v3", "status": "rejected", "status_reason": "held-out accuracy 0.52 < 0.6"}
    (rejected / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"reward:v3 was rejected .*0\.52 < 0\.6.*allow_rejected_reward"):
        RUNS[stage](CONFIGS[stage](**FAST), {"policy": sft_adapter, "reward": rejected}, tmp_path / "out")
    check_reward_status(rejected, allow_rejected=True, stage=stage)  # allowed: no error
    (rejected / "manifest.json").write_text(json.dumps({**manifest, "status": "ok"}))
    check_reward_status(rejected, allow_rejected=False, stage=stage)


def _records(answer: int, n: int) -> list[str]:
    return [json.dumps({"id": "q", "prompt": "What is 1 + 2?", "answer": answer})] * n


def test_reward_function_scores_as_the_reward_model_and_logs_the_pass_rate(reward_dir):
    model, tokenizer = load_reward_model(reward_dir)
    task = tasks.load(ARITHMETIC)
    function = online_rl.RewardModel(model, tokenizer, batch_size=2, task=task, max_new_tokens=6)
    prompts = [[{"role": "user", "content": "What is 1 + 2?"}]] * 3
    completions = [[{"role": "assistant", "content": text}] for text in ("1 + 2 = 3", "1 + 2 = 4", "3")]
    logged = {}
    rewards = function(
        prompts,
        completions,
        completion_ids=[[1, 2]] * 3,
        task_record=_records(3, 3),
        log_metric=logged.__setitem__,
        trainer_state=None,
    )
    assert rewards == pytest.approx(score_batch(model, tokenizer, prompts, completions))
    assert len(set(rewards)) == 3
    assert logged == {"pass_rate": pytest.approx(2 / 3)}


def test_the_task_reward_is_the_verdict_and_a_cut_off_completion_fails():
    eos = tiny_policies.tokenizer().eos_token_id
    function = online_rl.TaskReward(tasks.load(ARITHMETIC), max_new_tokens=4, eos_token_id=eos)
    completions = ["1 + 2 = 3", "1 + 2 = 4", "3", "3", "3"]
    ids = [[5, eos], [5, 6, eos], [5, 6, 7, eos], [5, 6, 7, 8], [5]]  # the 4th is cut off at 4 tokens
    rewards = function(
        [None] * 5, completions, completion_ids=ids, task_record=_records(3, 5), log_metric=None
    )
    assert rewards == [1.0, 0.0, 1.0, 0.0, 1.0]


@pytest.fixture(scope="module")
def half_right(tmp_path_factory) -> Path:
    """A complete tiny policy that answers the first 8 train prompts right often but not always."""
    return tiny_policies.memorized_model(
        tmp_path_factory.mktemp("half"), arithmetic.train_prompts()[:8], steps=60
    )


@pytest.mark.parametrize("stage", ["rloo", "grpo"])
def test_trains_on_the_task_s_verdict_without_a_reward_model(stage, half_right, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    config = CONFIGS[stage](**{**FAST, "reward": "task", "max_new_tokens": 12, "steps": 3})
    metrics = RUNS[stage](config, {"policy": half_right}, out)
    assert metrics["reward_source"] == "task" and metrics["steps"] == 3
    assert 0 <= metrics["reward_first"] <= 1 and 0 <= metrics["reward_last"] <= 1  # pass rates
    before, after = tiny_policies.state(half_right), tiny_policies.state(out)
    assert any(not torch.equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize("stage", ["rloo", "grpo"])
def test_exactly_one_source_of_rewards(stage, sft_adapter, reward_dir, tmp_path):
    with pytest.raises(InputError, match=f"{stage}: `reward: task` .* would be unused"):
        RUNS[stage](
            CONFIGS[stage](**FAST, reward="task"), {"policy": sft_adapter, "reward": reward_dir}, tmp_path
        )
    with pytest.raises(InputError, match=f"{stage}: no `reward` input.*`reward: task`"):
        RUNS[stage](CONFIGS[stage](**FAST), {"policy": sft_adapter}, tmp_path)
    with pytest.raises(ValidationError, match="reward: task needs a task"):
        CONFIGS[stage](**{**FAST, "task": None}, reward="task")


@pytest.mark.parametrize("stage", ["rloo", "grpo"])
def test_kl_coefficient_is_passed_explicitly(stage, sft_adapter, tmp_path):
    for kl in (0.0, 0.05, 0.3):
        _, args = online_rl.trainer_and_args(
            CONFIGS[stage](**FAST, kl_coef=kl), stage, torch.device("cpu"), tmp_path, sft_adapter
        )
        assert args.beta == kl
    _, args = online_rl.trainer_and_args(CONFIGS[stage](), stage, torch.device("cpu"), tmp_path, sft_adapter)
    assert args.beta == 0.05  # not GRPO's own default of 0 (no KL term)
    assert args.bf16 is False and args.activation_checkpointing is False and args.report_to == []


def test_config_checks():
    with pytest.raises(ValidationError, match="multiple of num_generations"):
        GRPOConfig(num_generations=4, batch_size=6)
    with pytest.raises(ValidationError, match="does not use lora_alpha"):
        RLOOConfig(method="full", lora_alpha=8)
    with pytest.raises(ValidationError):
        RLOOConfig(loss_type="dapo")  # a GRPO setting
    assert GRPOConfig().kl_coef > 0


def test_registry_entries_use_the_split_configs():
    assert STAGES["rloo"].config is RLOOConfig and STAGES["rloo"].load() is online_rl.run_rloo
    assert STAGES["grpo"].config is GRPOConfig and STAGES["grpo"].load() is online_rl.run_grpo


def test_prompts_from_a_file_are_chat_messages_for_a_chat_policy(tmp_path):
    file = tmp_path / "prompts.jsonl"
    lines = [
        {"prompt": "What is 1 + 2?", "answer": 3},
        {"prompt": [{"role": "user", "content": "Hi"}], "answer": 0},
    ]
    file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    task = tasks.load(ARITHMETIC)
    rows = online_rl.prompt_rows(GRPOConfig(), file, tiny_policies.tokenizer(), "grpo", task)
    assert [row["prompt"] for row in rows] == [
        [{"role": "user", "content": "What is 1 + 2?"}],
        [{"role": "user", "content": "Hi"}],
    ]
    assert [json.loads(row["task_record"])["answer"] for row in rows] == [3, 0]
    assert (
        "task_record"
        not in online_rl.prompt_rows(GRPOConfig(), file, tiny_policies.tokenizer(), "grpo", None)[0]
    )
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(InputError, match=r"^grpo: .*bad\.jsonl line 1: no `prompt` column"):
        online_rl.prompt_rows(GRPOConfig(), tmp_path / "bad.jsonl", tiny_policies.tokenizer(), "grpo", task)
    demo = online_rl.prompt_rows(GRPOConfig(num_prompts=5), None, tiny_policies.tokenizer(), "grpo", task)
    records = arithmetic.train_prompts()[:5]
    assert [json.loads(row["task_record"]) for row in demo] == records
    (tmp_path / "jokes.jsonl").write_text(json.dumps({"prompt": "Tell me a joke."}) + "\n")
    with pytest.raises(InputError, match="grpo: task 'arithmetic' cannot judge"):
        online_rl.prompt_rows(
            GRPOConfig(reward="task", task=ARITHMETIC),
            tmp_path / "jokes.jsonl",
            tiny_policies.tokenizer(),
            "grpo",
            task,
        )
