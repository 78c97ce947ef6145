"""The reward stage: held-out split by prompt, acceptance gate, the reward-model hand-off (score head,
tokenizer, chat template) and scoring. Fast tests use a tiny demo model built here; the slow one runs the
stage through `rlhf run` and checks the runner marks a rejected reward model."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

import tasks
from common.outcomes import InputError
from common.reward_model import (
    check_tokenizers_match,
    encode,
    load_reward_model,
    score_batch,
)
from policy.demo_model import build_model, train_tokenizer
from reward import train
from reward.configs import RewardConfig
from reward.demo_preferences import demo_pairs, write_preferences
from reward.evaluation import task_breakdown
from tasks import arithmetic
from tests.conftest import rlhf

# Fast settings for the tiny model: full fine-tuning learns the easy pairs below in a few dozen steps.
TINY = {"method": "full", "lr": 3e-3, "epochs": 4, "batch_size": 16, "held_out_fraction": 0.25}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(arithmetic.pretraining_corpus())


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer) -> Path:
    """A tiny, untrained demo Llama with the demo tokenizer (and its chat template)."""
    path = tmp_path_factory.mktemp("tiny-model")
    torch.manual_seed(0)
    build_model(tokenizer, layers=2, hidden_size=64, intermediate_size=128, heads=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def easy_pairs(prompts: int = 48, flip: float = 0.0, seed: int = 0) -> list[dict]:
    """Correct answers preferred over unanswered ones ("7 + 12 =") and wrong-format ones: learnable by an
    untrained tiny model from the form of the response alone; `flip` swaps a random share of the pairs."""
    rng = random.Random(seed)
    rows = []
    for record in arithmetic.train_prompts()[:prompts]:
        a, b = record["a"], record["b"]
        for bad in (f"{a} + {b} =", f"{a + b} is what {a} + {b} makes, I think"):
            good = arithmetic.render_response(a, b)
            chosen, rejected = (bad, good) if rng.random() < flip else (good, bad)
            rows.append(
                {
                    "prompt": [{"role": "user", "content": record["prompt"]}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                    "prompt_id": record["id"],
                    "agreement": rng.choice([1.0, 2 / 3, 0.5]),
                }
            )
    return rows


def train_stage(tmp_path: Path, model: Path, rows: list[dict], **config) -> tuple[dict, Path]:
    preferences = write_preferences(rows, tmp_path / "preferences")
    out_dir = tmp_path / "reward-model"
    out_dir.mkdir()
    metrics = train.run(
        RewardConfig(**{**TINY, **config}), {"preferences": preferences, "model": model}, out_dir
    )
    return metrics, out_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model) -> tuple[dict, Path]:
    """A reward model trained on the easy pairs: (metrics, artifact directory)."""
    return train_stage(tmp_path_factory.mktemp("trained"), tiny_model, easy_pairs())


# --- the held-out split ---


def test_split_is_by_prompt_seeded_and_disjoint():
    rows = demo_pairs(prompts=60)
    train_rows, held_out = train.split_by_prompt(rows, 0.2, seed=0)
    train_ids = {r["prompt_id"] for r in train_rows}
    held_ids = {r["prompt_id"] for r in held_out}
    assert not train_ids & held_ids
    assert len(train_rows) + len(held_out) == len(rows)
    assert len(held_ids) == 12  # 20% of the 60 prompts
    again = train.split_by_prompt(rows, 0.2, seed=0)[1]
    assert again == held_out
    assert {r["prompt_id"] for r in train.split_by_prompt(rows, 0.2, seed=1)[1]} != held_ids


def test_split_needs_two_prompts_and_holds_out_at_least_one():
    rows = demo_pairs(prompts=3)
    train_rows, held_out = train.split_by_prompt(rows, 0.01, seed=0)
    assert len({r["prompt_id"] for r in held_out}) == 1 and train_rows
    with pytest.raises(InputError, match="at least 2"):
        train.split_by_prompt(demo_pairs(prompts=1), 0.5, seed=0)


def test_stage_keeps_held_out_prompts_out_of_training(trained):
    metrics, out_dir = trained
    held = [json.loads(line) for line in (out_dir / "held_out.jsonl").read_text().splitlines()]
    assert {r["prompt_id"] for r in held}.isdisjoint(
        {r["prompt_id"] for r in train.split_by_prompt(easy_pairs(), 0.25, seed=0)[0]}
    )
    assert metrics["held_out_prompts"] == 12 and metrics["train_prompts"] == 36
    assert metrics["held_out_pairs"] == len(held) == 24


# --- evaluation and the gate ---


def test_learnable_preferences_pass_the_gate(trained):
    metrics, out_dir = trained
    assert "rejected" not in metrics and metrics["gate"] == "passed"
    assert metrics["accuracy"] >= 0.9 and metrics["margin_mean"] > 0
    buckets = metrics["accuracy_by_agreement"]
    assert set(buckets) == {"1.0", "0.66-1.0", "<0.66"}
    assert sum(b["pairs"] for b in buckets.values()) == metrics["held_out_pairs"]
    assert metrics["length_unit"] == "response tokens"
    assert -1 <= metrics["length_spearman"] <= 1 and -1 <= metrics["length_pearson"] <= 1
    assert metrics["pairs_longer_lost"] + metrics["pairs_longer_won"] == metrics["held_out_pairs"]
    report = json.loads((out_dir / "eval.json").read_text())
    assert report["metrics"]["accuracy"] == metrics["accuracy"]
    margins = [pair["margin"] for pair in report["worst_pairs"]]
    assert margins == sorted(margins) and len(margins) == 20


def test_gate_rejects_a_reward_model_trained_on_random_labels(tmp_path, tiny_model):
    metrics, out_dir = train_stage(tmp_path, tiny_model, easy_pairs(flip=0.5, seed=1))
    assert 0.25 <= metrics["accuracy"] <= 0.75
    assert metrics["rejected"] == (
        f"held-out accuracy {metrics['accuracy']:.3f} < min_accuracy 0.6 ({metrics['held_out_pairs']} pairs)"
    )
    assert metrics["gate"] == "rejected"
    assert (out_dir / "model.safetensors").exists()  # still published, for inspection


def test_gate_on_length_correlation():
    from reward.evaluation import gate

    config = RewardConfig(max_length_correlation=0.5)
    passed = {"accuracy": 0.95, "held_out_pairs": 10, "length_spearman": -0.4}
    assert gate(passed, config) is None
    assert gate({**passed, "length_spearman": 0.8}, config) == (
        "|Spearman correlation of reward with response length| 0.800 > max_length_correlation 0.5"
    )
    assert gate({**passed, "length_spearman": 0.8}, RewardConfig()) is None  # no bound by default


# --- the hand-off: saved model, score head, tokenizer ---


def test_loaded_reward_model_scores_exactly_as_at_the_end_of_training(trained):
    _, out_dir = trained
    model, tokenizer = load_reward_model(out_dir)
    held = [json.loads(line) for line in (out_dir / "held_out.jsonl").read_text().splitlines()]
    prompts = [r["prompt"] for r in held for _ in range(2)]
    responses = [r[side] for r in held for side in ("chosen", "rejected")]
    expected = [r[f"reward_{side}"] for r in held for side in ("chosen", "rejected")]
    scores = score_batch(model, tokenizer, prompts, responses, batch_size=64)
    assert max(abs(a - b) for a, b in zip(scores, expected, strict=True)) <= 1e-6
    assert len(set(expected)) > 2  # the rewards differ between responses: not a constant model


def test_added_layers_start_out_passing_their_input_through(tiny_model, tokenizer):
    plain = train.load_model(tiny_model, RewardConfig(), tokenizer)
    grown = train.load_model(tiny_model, RewardConfig(added_layers=2), tokenizer)
    assert (plain.config.num_hidden_layers, grown.config.num_hidden_layers) == (2, 4)
    ids = torch.tensor([tokenizer("What is 7 + 12? 7 + 12 = 19")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(plain.eval()(ids).logits, grown.eval()(ids).logits, atol=1e-6)
    assert train.added_blocks(grown, 2) == ["model.layers.2", "model.layers.3"]
    lora = train.peft_config(RewardConfig(added_layers=2), grown)
    assert lora.modules_to_save == ["model.layers.2", "model.layers.3"]  # trained in full, no adapter


def test_the_language_model_term_is_the_causal_lms_own_loss_on_the_chosen_sequences(
    tmp_path, tiny_model, tokenizer
):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    config = RewardConfig(**TINY, lm_loss_weight=2.0)
    rows, _ = train.tokenize_pairs(easy_pairs(prompts=4), tokenizer, None)
    dataset = Dataset.from_list(
        [{"chosen_ids": r["chosen_ids"], "rejected_ids": r["rejected_ids"]} for r in rows]
    )
    model = train.load_model(tiny_model, config, tokenizer)
    args = train.training_args(config, torch.device("cpu"), tmp_path, tiny_model)

    def loss(weight: float) -> tuple[float, dict]:
        trainer = train.trainer_class(weight)(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer
        )
        batch = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            return trainer.compute_loss(model.train(), batch).item(), batch

    regularized, batch = loss(2.0)
    plain, same = loss(0.0)
    assert torch.equal(batch["input_ids"], same["input_ids"])
    # computed independently: the causal LM the reward model was made from, on the chosen half of the batch
    chosen = batch["input_ids"].shape[0] // 2
    ids, mask = batch["input_ids"][:chosen], batch["attention_mask"][:chosen]
    with torch.no_grad():
        causal = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        expected = causal(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    assert regularized - plain == pytest.approx(2.0 * expected.item(), rel=1e-4)
    assert expected.item() > 1.0  # an untrained model: the term is not vanishingly small


def test_a_language_model_term_needs_tied_embeddings(tmp_path, tiny_model, tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    untied = AutoConfig.from_pretrained(tiny_model)
    untied.tie_word_embeddings = False
    AutoModelForCausalLM.from_config(untied).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert train.load_model(tmp_path, RewardConfig(), tokenizer) is not None
    with pytest.raises(InputError, match="lm_loss_weight needs a model whose output embeddings"):
        train.load_model(tmp_path, RewardConfig(lm_loss_weight=1.0), tokenizer)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_reward_model_with_added_layers_trains_saves_and_reloads(tmp_path, tiny_model, method):
    metrics, out_dir = train_stage(tmp_path, tiny_model, easy_pairs(), added_layers=1, method=method)
    assert metrics["added_layers"] == 1 and metrics["accuracy"] >= 0.9
    assert json.loads((out_dir / "config.json").read_text())["num_hidden_layers"] == 3
    model, tokenizer = load_reward_model(out_dir)
    held = [json.loads(line) for line in (out_dir / "held_out.jsonl").read_text().splitlines()]
    scores = score_batch(model, tokenizer, [r["prompt"] for r in held], [r["chosen"] for r in held], 64)
    assert max(abs(a - r["reward_chosen"]) for a, r in zip(scores, held, strict=True)) <= 1e-6


def test_reward_model_artifact_contents(trained):
    _, out_dir = trained
    info = json.loads((out_dir / "reward.json").read_text())
    assert info["format"] == "chat" and info["data_format"] == "conversational"
    config = json.loads((out_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["pad_token_id"] != config["eos_token_id"]
    assert "score.weight" in load_file(out_dir / "model.safetensors")
    assert (out_dir / "chat_template.jinja").exists()
    assert not (out_dir / "adapter_config.json").exists()


def test_a_causal_lm_is_not_a_reward_model(tiny_model):
    with pytest.raises(InputError, match="has no score head: its architecture is LlamaForCausalLM"):
        load_reward_model(tiny_model)


def test_missing_score_weights_are_a_clear_error(trained, tmp_path):
    _, out_dir = trained
    broken = tmp_path / "broken"
    shutil.copytree(out_dir, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["score.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"no trained score head: score\.weight missing"):
        load_reward_model(broken)


def test_a_reward_model_without_its_tokenizer_is_refused(trained, tmp_path):
    _, out_dir = trained
    broken = tmp_path / "broken"
    shutil.copytree(out_dir, broken)
    (broken / "tokenizer_config.json").unlink()
    with pytest.raises(InputError, match="has no tokenizer"):
        load_reward_model(broken)
    shutil.copytree(out_dir, tmp_path / "swapped")
    (tmp_path / "swapped" / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    with pytest.raises(InputError, match="not the one it was trained with"):
        load_reward_model(tmp_path / "swapped")


def test_tokenizer_mismatch_is_a_clear_error(tokenizer):
    same = train_tokenizer(arithmetic.pretraining_corpus())
    check_tokenizers_match(tokenizer, same)  # no error

    other_template = train_tokenizer(arithmetic.pretraining_corpus())
    other_template.chat_template = tokenizer.chat_template.replace("<|assistant|>", "<|assistant|>\n")
    with pytest.raises(
        InputError, match=r"the policy and the reward model do not tokenize alike: chat template"
    ):
        check_tokenizers_match(tokenizer, other_template)

    other_vocab = train_tokenizer(arithmetic.pretraining_corpus(), vocab_size=270)
    with pytest.raises(InputError, match=r"vocabulary \(\d+ vs \d+ tokens"):
        check_tokenizers_match(tokenizer, other_vocab, policy="policy sft:v1", reward="reward:v2")


# --- scoring ---


def test_encode_applies_the_chat_template_as_training_did(tokenizer):
    ids = encode(tokenizer, "What is 7 + 12?", "7 + 12 = 19")
    assert tokenizer.decode(ids) == "<|bos|><|user|>What is 7 + 12?<|assistant|>7 + 12 = 19<|eos|>"
    messages = encode(
        tokenizer,
        [{"role": "user", "content": "What is 7 + 12?"}],
        [{"role": "assistant", "content": "7 + 12 = 19"}],
    )
    assert messages == ids
    plain = train_tokenizer(arithmetic.pretraining_corpus())
    plain.chat_template = None
    assert plain.decode(encode(plain, "What is 7 + 12?\n", "7 + 12 = 19")) == (
        "<|bos|>What is 7 + 12?\n7 + 12 = 19<|eos|>"
    )
    with pytest.raises(InputError, match="chat template"):
        encode(plain, [{"role": "user", "content": "hi"}], "hello")


def test_score_of_a_sequence_does_not_depend_on_batch_padding(trained):
    _, out_dir = trained
    model, tokenizer = load_reward_model(out_dir)
    prompts = ["What is 7 + 12?", "What is 3 + 4?", "Compute 11 + 19.", "What is 2 plus 2?"]
    responses = ["7 + 12 = 19", "3 + 4 = 7 and that is my final answer, nothing else", "11 + 19 =", "4"]
    alone = [score_batch(model, tokenizer, [p], [r])[0] for p, r in zip(prompts, responses, strict=True)]
    together = score_batch(model, tokenizer, prompts, responses, batch_size=4)
    pairs = score_batch(model, tokenizer, prompts, responses, batch_size=2)
    assert max(abs(a - b) for a, b in zip(alone, together, strict=True)) < 1e-5
    assert max(abs(a - b) for a, b in zip(alone, pairs, strict=True)) < 1e-5
    assert len({round(s, 4) for s in alone}) == 4  # distinct sequences, distinct rewards


def test_score_responses_for_the_cli(trained):
    from reward.score import score_responses

    _, out_dir = trained
    good, bad = score_responses(out_dir, "What is 7 + 12?", ["7 + 12 = 19", "7 + 12 ="])
    assert good > bad


# --- inputs and config ---


def test_preference_file_problems_are_clear(tmp_path):
    file = tmp_path / "prefs.jsonl"
    file.write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(
        InputError,
        match=r"prefs\.jsonl line 1: no `rejected` column \(found columns \['prompt', 'chosen'\]\)",
    ):
        train.run(RewardConfig(**TINY), {"preferences": file, "model": tmp_path / "no-model"}, tmp_path)
    file.write_text(
        json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
        + "\n"
        + json.dumps({"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"})
        + "\n"
    )
    with pytest.raises(
        InputError, match=r"prefs\.jsonl line 2: `chosen` is a string; expected a list of assistant"
    ):
        train.run(RewardConfig(**TINY), {"preferences": file, "model": tmp_path / "no-model"}, tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        train.run(RewardConfig(**TINY), {"preferences": tmp_path / "missing", "model": tmp_path}, tmp_path)


def test_identical_pairs_are_dropped_and_counted(tmp_path, tiny_model):
    rows = easy_pairs(prompts=8)
    same = [{**row, "chosen": row["rejected"]} for row in rows[:2]]
    metrics, _ = train_stage(tmp_path, tiny_model, rows + same, epochs=1)
    assert metrics["pairs_dropped_identical"] == 2
    assert metrics["train_pairs"] + metrics["held_out_pairs"] == len(rows)


def test_min_agreement_trains_and_measures_on_the_pairs_annotators_agree_on(tmp_path, tiny_model):
    rows = easy_pairs(prompts=16)
    metrics, out_dir = train_stage(tmp_path, tiny_model, rows, epochs=1, min_agreement=1.0)
    agreed = [row for row in rows if row["agreement"] == 1.0]
    assert 0 < len(agreed) < len(rows)
    assert metrics["pairs_dropped_agreement"] == len(rows) - len(agreed)
    assert metrics["train_pairs"] + metrics["held_out_pairs"] == len(agreed)
    held_out = [json.loads(line) for line in (out_dir / train.HELD_OUT_FILE).read_text().splitlines()]
    assert held_out and all(row["agreement"] == 1.0 for row in held_out)


def test_conversational_data_needs_a_chat_template(tmp_path, tiny_model):
    plain_model = tmp_path / "plain-model"
    shutil.copytree(tiny_model, plain_model)
    (plain_model / "chat_template.jinja").unlink()
    with pytest.raises(InputError, match="conversational but the model's tokenizer has no chat template"):
        train_stage(tmp_path, plain_model, easy_pairs(prompts=4))


def test_config_refuses_lora_settings_with_full_fine_tuning():
    with pytest.raises(ValidationError, match="does not use lora_r"):
        RewardConfig(method="full", lora_r=8)
    with pytest.raises(ValidationError):
        RewardConfig(held_out_fraction=0)


def test_registry_entry():
    from pipeline.registry import STAGES

    stage = STAGES["reward"]
    assert stage.config is RewardConfig
    assert stage.load() is train.run
    assert stage.outputs(RewardConfig()) == {"": "reward-model"}
    assert stage.inputs["preferences"].required and stage.inputs["model"].required
    assert "adapter" in stage.inputs["model"].kinds


# --- through the runner ---


@pytest.mark.slow
def test_rlhf_run_publishes_a_rejected_reward_model_and_fails(workspace):
    rows = easy_pairs(prompts=24, flip=0.5, seed=2)
    preferences = write_preferences(rows, workspace / "preferences")
    workflow = {
        "name": "rm",
        "task": {"name": "arithmetic"},
        "stages": {
            "pretrain": {
                "config": {
                    "steps": 3,
                    "layers": 1,
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "heads": 2,
                    "eval_prompts": 4,
                }
            },
            "reward": {
                "inputs": {"model": "pretrain", "preferences": str(preferences)},
                "config": {**TINY, "epochs": 1},
            },
            "ppo": {
                "inputs": {"policy": "pretrain", "reward": "reward"},
                "config": {
                    "updates": 1,
                    "batch_size": 2,
                    "minibatches": 1,
                    "ppo_epochs": 1,
                    "max_new_tokens": 4,
                },
            },
        },
    }
    (workspace / "wf.yaml").write_text(yaml.safe_dump(workflow))
    result = rlhf("run", "wf.yaml", cwd=workspace)
    assert result.returncode == 1, result.stdout + result.stderr
    assert not (workspace / "artifacts" / "ppo").exists()
    assert "rejected" in result.stdout and "held-out accuracy" in result.stdout
    manifest = json.loads((workspace / "artifacts" / "reward" / "v1" / "manifest.json").read_text())
    assert manifest["status"] == "rejected" and manifest["kind"] == "reward-model"
    assert manifest["status_reason"].startswith("held-out accuracy")
    assert manifest["metrics"]["gate"] == "rejected"
    model, _ = load_reward_model(workspace / "artifacts" / "reward" / "v1")
    assert model.config.num_labels == 1

    from tests.wandb_offline import run_files, summarize

    runs = [summarize(f) for f in run_files(workspace / "runs" / "wandb")]
    reward_run = next(r for r in runs if r.get("job_type") == "reward")
    assert "eval/worst_pairs" in reward_run["history_keys"]
    assert "eval/accuracy" in reward_run["history_keys"]

    # Downstream, the runner refuses the rejected reward model; --allow-rejected reaches PPO's own guard too
    result = rlhf("run", "wf.yaml", "--only", "ppo", cwd=workspace)
    assert result.returncode == 1 and "reward:v1 was rejected" in result.stdout + result.stderr
    assert "--allow-rejected" in result.stdout + result.stderr
    result = rlhf("run", "wf.yaml", "--only", "ppo", "--allow-rejected", cwd=workspace)
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = json.loads((workspace / "artifacts" / "ppo" / "v1" / "manifest.json").read_text())
    assert manifest["config"]["allow_rejected_reward"] is False  # the workflow's config, as cached
    assert {"slot": "reward", "ref": "reward:v1", "status": "rejected"}.items() <= next(
        i for i in manifest["inputs"] if i["slot"] == "reward"
    ).items()


def test_the_task_breakdown_splits_pairs_by_the_verdict():
    def pair(chosen: str, rejected: str, margin: float) -> dict:
        prompt = [{"role": "user", "content": "What is 2 + 3?"}]
        return {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "answer": 5,
            "reward_chosen": margin,
            "reward_rejected": 0.0,
        }

    pairs = [
        pair("2 + 3 = 5", "2 + 3 = 6", 1.0),
        pair("2 + 3 = 5", "2 + 3 = 15", -1.0),
        pair("2 + 3 = 6", "x", 1.0),
    ]
    assert task_breakdown(pairs, tasks.load({"name": "arithmetic"})) == {
        "accuracy_correct_vs_wrong": 0.5,
        "pairs_correct_vs_wrong": 2,
        "accuracy_wrong_vs_wrong": 1.0,
        "pairs_wrong_vs_wrong": 1,
    }
    assert task_breakdown(pairs, None) is None
    assert task_breakdown(pairs, tasks.load({"name": "instructions"})) is None  # it cannot judge sums
