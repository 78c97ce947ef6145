"""`publish: adapter`: reward, DPO and GRPO publish the LoRA adapter they trained (reward models with their
score head) on the model input, stacked when that input is the SFT adapter, instead of a full model.
The adapter artifacts are small, load with `load_causal_lm` / `load_reward_model` (each base's digest
checked), and give the numbers of the same training published merged. Tiny demo models on the CPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from common.models import (
    BASE_FILE,
    is_adapter,
    load_causal_lm,
    load_tokenizer,
    merged_causal_lm,
    save_model,
    write_base_reference,
)
from common.outcomes import InputError
from common.reward_model import load_reward_model, score_batch
from pipeline.registry import STAGES
from policy import dpo, evaluate, online_rl, ppo, sample
from policy.configs import DPOConfig, EvaluateConfig, GRPOConfig, PPOConfig, RLOOConfig, SampleConfig
from policy.export import export_merged
from reward import train
from reward.configs import RewardConfig
from reward.demo_preferences import write_preferences
from tests import tiny_policies
from tests.conftest import rlhf
from tests.test_dpo import FAST as DPO_FAST
from tests.test_dpo import pairs, write_pairs
from tests.test_online_rl import FAST as ONLINE_FAST
from tests.test_reward import easy_pairs

REWARD = {
    "method": "lora",
    "lora_r": 4,
    "lr": 3e-3,
    "epochs": 2,
    "batch_size": 16,
    "held_out_fraction": 0.25,
    "min_accuracy": 0.0,
    "device": "cpu",
}
"""A LoRA reward model on the tiny model in a few seconds (the gate is not what is tested here)."""
ARITHMETIC = {"name": "arithmetic"}


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def logits(model_dir: Path, text: str = "What is 7 + 12? 7 + 12 = 19") -> torch.Tensor:
    model, tokenizer = load_causal_lm(model_dir, device=torch.device("cpu"))
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def stacked_adapter(sft: Path, out_dir: Path, seed: int = 2) -> Path:
    """A random LoRA adapter on the SFT adapter's merged weights, saved the way stages save adapters."""
    torch.manual_seed(seed)
    lora = LoraConfig(r=2, target_modules=["q_proj", "o_proj"], init_lora_weights=False)
    save_model(get_peft_model(merged_causal_lm(sft), lora), load_tokenizer(sft), out_dir, base=sft)
    return out_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> SimpleNamespace:
    """A tiny random base and an SFT-like LoRA adapter on it."""
    root = tmp_path_factory.mktemp("models")
    base = tiny_policies.random_model(root / "base")
    return SimpleNamespace(base=base, sft=tiny_policies.lora_adapter(base, root / "sft"))


# --- stacked adapters ---


def test_a_stacked_adapter_records_its_adapter_base_and_loads_on_its_merged_weights(models, tmp_path):
    top = stacked_adapter(models.sft, tmp_path / "top")
    record = json.loads((top / BASE_FILE).read_text())
    assert record["path"] == str(models.sft.resolve()) and record["adapter"] is True

    model, _ = load_causal_lm(top, device=torch.device("cpu"))
    assert set(model.peft_config) == {"default"}  # one adapter: the one below is merged into its base
    sft = merged_causal_lm(models.sft)
    for name, tensor in model.get_base_model().state_dict().items():
        if "lora_" not in name and "base_layer" not in name:
            assert torch.equal(tensor, sft.state_dict()[name]), name
    assert not torch.allclose(logits(top), logits(models.sft), atol=1e-3)  # the top adapter does something

    deeper = stacked_adapter(top, tmp_path / "deeper", seed=3)  # any depth
    expected = merged_causal_lm(deeper)
    by_hand = merged_causal_lm(top)
    assert not torch.equal(
        expected.state_dict()["model.layers.0.self_attn.q_proj.weight"],
        by_hand.state_dict()["model.layers.0.self_attn.q_proj.weight"],
    )
    export_merged(deeper, tmp_path / "exported")
    assert not is_adapter(tmp_path / "exported")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    for name, tensor in expected.state_dict().items():
        assert torch.equal(tensor, exported.state_dict()[name]), name


def test_every_level_of_a_stacked_adapter_is_checked(tmp_path):
    base = tiny_policies.random_model(tmp_path / "base")
    sft = tiny_policies.lora_adapter(base, tmp_path / "sft")
    top = stacked_adapter(sft, tmp_path / "top")
    load_causal_lm(top, device=torch.device("cpu"))

    readme = sft / "README.md"
    readme.write_text(readme.read_text() + "\nedited")  # the middle level changed
    with pytest.raises(InputError, match=r"sft is not the one it was trained on") as caught:
        load_causal_lm(top, device=torch.device("cpu"))
    assert "\n" not in str(caught.value)

    top = stacked_adapter(sft, tmp_path / "top-again")  # on the SFT adapter as it is now
    load_causal_lm(top, device=torch.device("cpu"))
    (base / "generation_config.json").write_text("{}")  # the bottom level changed
    with pytest.raises(InputError, match=r"base is not the one it was trained on"):
        load_causal_lm(top, device=torch.device("cpu"))


def test_nothing_stacks_on_a_prompt_tuning_adapter(models, tmp_path):
    model, tokenizer = load_causal_lm(models.base, device=torch.device("cpu"))
    prompt = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    save_model(get_peft_model(model, prompt), tokenizer, tmp_path / "prompt", base=models.base)
    with pytest.raises(
        InputError, match=r"prompt_tuning adapter.*cannot be merged; nothing can be stacked on it"
    ):
        write_base_reference(tmp_path, tmp_path / "prompt")


# --- the reward stage ---


@pytest.fixture(scope="module")
def rewards(models, tmp_path_factory) -> dict[str, SimpleNamespace]:
    """The same reward training (same seed) from the base and from the SFT adapter, each published merged
    and as an adapter: `rewards[source].merged` / `.adapter` are (metrics, directory)."""
    root = tmp_path_factory.mktemp("reward")
    preferences = write_preferences(easy_pairs(), root / "preferences")
    found = {}
    for name in ("base", "sft"):
        source = getattr(models, name)
        runs = {}
        for publish in ("merged", "adapter"):
            (out := root / f"{name}-{publish}").mkdir()
            config = RewardConfig(**REWARD, publish=publish)
            runs[publish] = (train.run(config, {"preferences": preferences, "model": source}, out), out)
        found[name] = SimpleNamespace(source=source, merged=runs["merged"], adapter=runs["adapter"])
    return found


def held_out_scores(reward_dir: Path, held: list[dict]) -> list[float]:
    model, tokenizer = load_reward_model(reward_dir)
    prompts = [r["prompt"] for r in held for _ in range(2)]
    responses = [r[side] for r in held for side in ("chosen", "rejected")]
    return score_batch(model, tokenizer, prompts, responses, batch_size=64)


@pytest.mark.parametrize("source", ["base", "sft"])
def test_a_reward_adapter_is_small_and_scores_like_the_merged_reward_model(rewards, source):
    rewards = rewards[source]
    (merged_metrics, merged), (metrics, adapter) = rewards.merged, rewards.adapter
    files = {p.name for p in adapter.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        BASE_FILE,
        "reward.json",
        "eval.json",
    } <= files
    assert {"tokenizer.json", "chat_template.jinja", "held_out.jsonl"} <= files
    assert not files & {"model.safetensors", "config.json"}  # no full weights
    assert weights_bytes(adapter) * 5 < weights_bytes(merged)
    record = json.loads((adapter / BASE_FILE).read_text())
    assert record["path"] == str(rewards.source.resolve())
    assert record.get("adapter", False) == is_adapter(rewards.source)  # stacked on the SFT adapter

    assert (metrics["publish"], merged_metrics["publish"]) == ("adapter", "merged")
    for key in ("accuracy", "margin_mean", "train_loss", "train_accuracy"):
        assert metrics[key] == pytest.approx(merged_metrics[key], abs=1e-5), key
    held = [json.loads(line) for line in (adapter / "held_out.jsonl").read_text().splitlines()]
    recorded = [r[f"reward_{side}"] for r in held for side in ("chosen", "rejected")]
    from_adapter, from_merged = held_out_scores(adapter, held), held_out_scores(merged, held)
    assert max(abs(a - b) for a, b in zip(from_adapter, from_merged, strict=True)) <= 1e-5
    assert max(abs(a - b) for a, b in zip(from_adapter, recorded, strict=True)) <= 1e-5
    assert len({round(x, 4) for x in recorded}) > 2  # a trained model, not a constant

    exported = adapter.parent / f"{source}-exported"
    export_merged(adapter, exported)  # rlhf export --merged: a complete reward model
    assert {"model.safetensors", "config.json", "reward.json"} <= {p.name for p in exported.iterdir()}
    assert not is_adapter(exported)
    assert AutoModelForSequenceClassification.from_pretrained(exported).config.num_labels == 1
    from_export = held_out_scores(exported, held)
    assert max(abs(a - b) for a, b in zip(from_export, from_merged, strict=True)) <= 1e-5


def test_a_reward_adapter_keeps_the_hand_off_checks(rewards, models, tmp_path):
    _, adapter = rewards["sft"].adapter
    headless = tmp_path / "headless"
    shutil.copytree(adapter, headless)
    weights = load_file(headless / "adapter_model.safetensors")
    del weights[next(key for key in weights if key.endswith(".score.weight"))]
    save_file(weights, headless / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"no trained score head: score\.weight missing from its adapter"):
        load_reward_model(headless)

    swapped = tmp_path / "swapped"
    shutil.copytree(adapter, swapped)
    (swapped / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    with pytest.raises(InputError, match="not the one it was trained with"):
        load_reward_model(swapped)

    with pytest.raises(InputError, match=r"is a PEFT adapter for .*not for a sequence classifier"):
        load_reward_model(models.sft)


def test_a_reward_adapter_refuses_a_changed_base(tmp_path):
    base = tiny_policies.random_model(tmp_path / "base")
    sft = tiny_policies.lora_adapter(base, tmp_path / "sft")
    preferences = write_preferences(easy_pairs(prompts=16), tmp_path / "preferences")
    (out := tmp_path / "reward").mkdir()
    config = RewardConfig(**{**REWARD, "epochs": 1}, publish="adapter")
    train.run(config, {"preferences": preferences, "model": sft}, out)
    load_reward_model(out)

    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))
    with pytest.raises(InputError, match="base is not the one it was trained on") as caught:
        load_reward_model(out)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("value_model", ["lora", "full"])
def test_ppo_trains_against_a_reward_adapter(rewards, models, value_model, tmp_path):
    _, adapter = rewards["sft"].adapter
    config = PPOConfig(
        task=ARITHMETIC,
        updates=2,
        batch_size=4,
        minibatches=2,
        ppo_epochs=2,
        max_new_tokens=6,
        value_model=value_model,
    )
    metrics = ppo.run(config, {"policy": models.sft, "reward": adapter}, tmp_path)
    assert metrics["updates"] == 2 and metrics["trainable_parameters_value"] > 0
    assert all(isinstance(metrics[k], float) for k in ("reward_final", "value_loss_final", "kl_final"))
    _, scorer, kind = ppo.load_value_model(adapter, config, torch.device("cpu"), torch.float32)
    assert kind == value_model and hasattr(scorer, "score")


def test_ppo_continues_a_stacked_policy_adapter(policies, rewards, models, tmp_path):
    """PPO from DPO's stacked adapter trains that adapter further; its output sits on the same SFT adapter."""
    _, dpo_adapter = policies.adapter
    config = PPOConfig(
        task=ARITHMETIC, updates=1, batch_size=4, minibatches=2, ppo_epochs=1, max_new_tokens=6
    )
    ppo.run(config, {"policy": dpo_adapter, "reward": rewards["sft"].adapter[1]}, tmp_path)
    record = json.loads((tmp_path / BASE_FILE).read_text())
    assert record["path"] == str(models.sft.resolve()) and record["adapter"] is True
    assert not torch.allclose(logits(tmp_path), logits(dpo_adapter), atol=1e-6)


# --- DPO and GRPO ---


@pytest.fixture(scope="module")
def policies(models, tmp_path_factory) -> SimpleNamespace:
    """DPO from the SFT adapter, published merged and as an adapter (same seed)."""
    root = tmp_path_factory.mktemp("dpo")
    preferences = write_pairs(root / "preferences", pairs())
    runs = {}
    for publish in ("merged", "adapter"):
        out = root / publish
        out.mkdir()
        config = DPOConfig(**DPO_FAST, publish=publish)
        runs[publish] = (dpo.run(config, {"policy": models.sft, "preferences": preferences}, out), out)
    return SimpleNamespace(merged=runs["merged"], adapter=runs["adapter"])


def test_dpo_publishes_a_stacked_adapter_that_loads_as_the_merged_policy(policies, models):
    (merged_metrics, merged), (metrics, adapter) = policies.merged, policies.adapter
    assert is_adapter(adapter) and not (adapter / "model.safetensors").exists()
    assert weights_bytes(adapter) * 5 < weights_bytes(merged)
    record = json.loads((adapter / BASE_FILE).read_text())
    assert record["path"] == str(models.sft.resolve()) and record["adapter"] is True
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(models.sft.resolve())  # not the scratch copy
    lineage = json.loads((adapter / "policy.json").read_text())
    assert lineage["publish"] == "adapter" and "stacked" in lineage["format"]
    assert metrics["publish"] == "adapter" and metrics["train_loss"] == pytest.approx(
        merged_metrics["train_loss"], abs=1e-6
    )

    expected = logits(merged)
    assert torch.allclose(logits(adapter), expected, atol=1e-5)
    assert not torch.allclose(logits(models.sft), expected, atol=1e-3)  # DPO moved the policy

    export_merged(adapter, adapter.parent / "exported")
    exported = AutoModelForCausalLM.from_pretrained(adapter.parent / "exported")
    tokenizer = load_tokenizer(adapter)
    with torch.no_grad():
        alone = exported(**tokenizer("What is 7 + 12? 7 + 12 = 19", return_tensors="pt")).logits
    assert torch.allclose(alone, expected, atol=1e-5)


def test_dpo_on_a_complete_model_publishes_an_adapter_on_it(models, tmp_path):
    preferences = write_pairs(tmp_path / "preferences", pairs(8))
    outs = {}
    for publish in ("merged", "adapter"):
        outs[publish] = tmp_path / publish
        outs[publish].mkdir()
        config = DPOConfig(**DPO_FAST, publish=publish)
        dpo.run(config, {"policy": models.base, "preferences": preferences}, outs[publish])
    record = json.loads((outs["adapter"] / BASE_FILE).read_text())
    assert record["path"] == str(models.base.resolve()) and "adapter" not in record  # not stacked
    assert "stacked" not in json.loads((outs["adapter"] / "policy.json").read_text())["format"]
    assert torch.allclose(logits(outs["adapter"]), logits(outs["merged"]), atol=1e-5)


def test_sample_and_evaluate_take_the_adapter_policy_and_reward_model(policies, rewards, models, tmp_path):
    _, merged = policies.merged
    _, adapter = policies.adapter
    samples = {}
    for name, policy in (("merged", merged), ("adapter", adapter)):
        (out := tmp_path / name).mkdir()
        config = SampleConfig(k=3, max_new_tokens=6, num_prompts=6, device="cpu", task=ARITHMETIC)
        sample.run(config, {"policy": policy}, out)
        samples[name] = (out / "samples.jsonl").read_text()
    assert samples["adapter"] == samples["merged"]

    (out := tmp_path / "evaluate").mkdir()
    config = EvaluateConfig(
        samples_per_prompt=2,
        max_new_tokens=8,
        num_prompts=8,
        bootstrap_samples=100,
        device="cpu",
        task=ARITHMETIC,
    )
    inputs = {
        "policies": {"merged": merged, "adapter": adapter},
        "reward": rewards["sft"].adapter[1],
        "reference": models.sft,
    }
    evaluate.run(config, inputs, out)
    report = json.loads((out / evaluate.REPORT_FILE).read_text())
    per_prompt = report["per_prompt"]
    for name in ("pass_rate_greedy", "pass_rate_sampled", "reward_mean", "kl"):
        assert per_prompt["adapter"][name] == pytest.approx(per_prompt["merged"][name], abs=1e-4), name


@pytest.mark.parametrize("stage", ["grpo"])
def test_online_rl_publishes_a_stacked_adapter(stage, models, rewards, tmp_path):
    runs = {}
    config_class = {"grpo": GRPOConfig, "rloo": RLOOConfig}[stage]
    for publish in ("merged", "adapter"):
        (out := tmp_path / publish).mkdir()
        config = config_class(**ONLINE_FAST, publish=publish)
        inputs = {"policy": models.sft, "reward": rewards["sft"].adapter[1]}
        runs[publish] = (getattr(online_rl, f"run_{stage}")(config, inputs, out), out)
    (metrics, adapter), (_, merged) = runs["adapter"], runs["merged"]
    assert metrics["publish"] == "adapter" and is_adapter(adapter)
    assert json.loads((adapter / BASE_FILE).read_text())["adapter"] is True
    assert torch.allclose(logits(adapter), logits(merged), atol=1e-5)
    assert not torch.allclose(logits(models.sft), logits(merged), atol=1e-4)


# --- configs and the registry ---


def test_publish_adapter_needs_lora_and_no_added_layers():
    for make in (
        lambda: RewardConfig(method="full", publish="adapter"),
        lambda: DPOConfig(method="full", publish="adapter"),
        lambda: GRPOConfig(method="full", publish="adapter"),
    ):
        with pytest.raises(ValidationError, match="publish: adapter needs method: lora"):
            make()
    with pytest.raises(ValidationError, match="publish: adapter cannot carry added_layers"):
        RewardConfig(publish="adapter", added_layers=2)
    assert RewardConfig().publish == DPOConfig().publish == RLOOConfig().publish == "merged"


def test_the_output_kind_follows_publish():
    for stage, config in (("dpo", DPOConfig), ("rloo", RLOOConfig), ("grpo", GRPOConfig)):
        assert STAGES[stage].outputs(config()) == {"": "policy"}
        assert STAGES[stage].outputs(config(publish="adapter")) == {"": "adapter"}
    assert STAGES["reward"].outputs(RewardConfig(publish="adapter")) == {"": "reward-model"}


def test_a_bad_publish_setting_is_one_line_before_anything_runs(workspace):
    workflow = {
        "name": "bad",
        "stages": {
            "dpo": {
                "inputs": {"policy": "./sft", "preferences": "./preferences"},
                "config": {"method": "full", "publish": "adapter"},
            }
        },
    }
    (workspace / "bad.yaml").write_text(yaml.safe_dump(workflow))
    result = rlhf("validate", "bad.yaml", cwd=workspace)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "stages.dpo.config" in lines[0] and "needs method: lora" in lines[0]


# --- through the runner and the CLI ---


def test_rlhf_run_publishes_adapters_that_verify_export_and_score(models, workspace):
    """sft -> reward and dpo with `publish: adapter`, as a user runs them: the artifacts are `adapter`
    and `reward-model` kinds whose bases are store artifacts, they verify, export and score."""
    write_preferences(easy_pairs(prompts=16), workspace / "reward-pairs")
    write_pairs(workspace / "dpo-pairs", pairs())
    workflow = {
        "name": "adapters",
        "task": ARITHMETIC,
        "stages": {
            "sft": {
                "inputs": {"model": str(models.base)},
                "config": {"steps": 2, "batch_size": 8, "lora_r": 4, "task_eval": False, "eval_examples": 0},
            },
            "reward": {
                "inputs": {"model": "sft", "preferences": "./reward-pairs"},
                "config": {**REWARD, "epochs": 1, "publish": "adapter"},
            },
            "dpo": {
                "inputs": {"policy": "sft", "preferences": "./dpo-pairs"},
                "config": {**DPO_FAST, "publish": "adapter"},
            },
        },
    }
    (workspace / "adapters.yaml").write_text(yaml.safe_dump(workflow))
    env = {"WANDB_MODE": "disabled"}
    result = rlhf("run", "adapters.yaml", cwd=workspace, env=env)
    assert result.returncode == 0, result.stdout + result.stderr

    for ref, kind in (("reward:v1", "reward-model"), ("dpo:v1", "adapter")):
        shown = json.loads(rlhf("artifacts", "show", ref, "--json", cwd=workspace, env=env).stdout)
        assert shown["kind"] == kind and shown["config"]["publish"] == "adapter"
        assert rlhf("artifacts", "verify", ref, cwd=workspace, env=env).returncode == 0
        record = json.loads((workspace / "artifacts" / ref.replace(":", "/") / BASE_FILE).read_text())
        assert record["ref"] == "sft:v1" and record["adapter"] is True

    exported = workspace / "exported"
    assert rlhf("export", "dpo:v1", "--merged", str(exported), cwd=workspace, env=env).returncode == 0
    AutoModelForCausalLM.from_pretrained(exported)
    exported = workspace / "exported-reward"
    assert rlhf("export", "reward:v1", "--merged", str(exported), cwd=workspace, env=env).returncode == 0
    AutoModelForSequenceClassification.from_pretrained(exported)
    scored = rlhf(
        "score",
        "reward:v1",
        "--prompt",
        "What is 7 + 12?",
        "--response",
        "7 + 12 = 19",
        "--json",
        cwd=workspace,
        env=env,
    )
    assert scored.returncode == 0, scored.stderr
    assert isinstance(json.loads(scored.stdout)[0]["score"], float)
