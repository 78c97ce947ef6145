"""The `dpo` stage on tiny demo policies (CPU, a few steps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from common.models import is_adapter, load_causal_lm, tokenizer_fingerprint
from common.outcomes import InputError
from pipeline.registry import STAGES
from policy import dpo, tuning
from policy.configs import DPOConfig
from tasks import arithmetic
from tests import tiny_policies

FAST = {"epochs": 1, "batch_size": 8, "logging_steps": 1, "lora_r": 4, "task_eval": False, "device": "cpu"}


def pairs(records: int = 16) -> list[dict]:
    """Per demo prompt: correct > off by one, and off by one > off by ten (a pair whose chosen is wrong)."""
    rows = []
    for r in arithmetic.train_prompts()[:records]:
        a, b, s = r["a"], r["b"], r["answer"]
        prompt = [{"role": "user", "content": r["prompt"]}]
        right, near, far = (f"{a} + {b} = {x}" for x in (s, s + 1, s + 10))
        for chosen, rejected in ((right, near), (right, far), (near, far)):
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                    "prompt_id": r["id"],
                    "answer": s,
                }
            )
    return rows


def write_pairs(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preferences.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


@pytest.fixture(scope="module")
def trained(sft_adapter, tmp_path_factory) -> tuple[dict, Path]:
    preferences = write_pairs(tmp_path_factory.mktemp("preferences"), pairs())
    out = tmp_path_factory.mktemp("dpo")
    # with the arithmetic task, which judges these pairs, the end-of-stage check runs by default
    config = DPOConfig(**{**FAST, "task_eval": None, "task_eval_samples": 1}, task={"name": "arithmetic"})
    metrics = dpo.run(config, {"policy": sft_adapter, "preferences": preferences}, out)
    return metrics, out


def test_writes_a_complete_policy_that_loads_and_differs_from_the_sft_policy(trained, sft_adapter):
    _, out = trained
    assert not is_adapter(out) and not (out / "base.json").exists()  # stands on its own
    _, tokenizer = load_causal_lm(out, device=torch.device("cpu"))
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(load_causal_lm(sft_adapter)[1])
    before, after = tiny_policies.state(sft_adapter), tiny_policies.state(out)
    assert before.keys() == after.keys()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert any("q_proj" in name for name in changed) and any("mlp" in name for name in changed)
    lineage = json.loads((out / tuning.POLICY_FILE).read_text())
    assert lineage["stage"] == "dpo" and lineage["inputs"]["policy"]["path"] == str(sft_adapter.resolve())


def test_reports_training_metrics(trained):
    metrics, _ = trained
    # best_vs_rest keeps the two pairs per prompt whose chosen is the correct answer
    assert (metrics["pairs_given"], metrics["pairs"], metrics["prompts"]) == (48, 32, 16)
    assert metrics["steps"] == 4  # 32 pairs, 8 per step, one epoch
    assert metrics["loss_type"] == "sigmoid+sft" and metrics["method"] == "lora"
    for key in ("reward_accuracy_last", "reward_margin_last", "logp_chosen_last", "logp_rejected_last"):
        assert isinstance(metrics[key], float)
    assert 0 <= metrics["pass_rate_greedy"] <= 1 and 0 <= metrics["pass_rate_sampled"] <= 1
    assert metrics["task_prompts"] == len(arithmetic.held_out_prompts())


@pytest.mark.parametrize("precompute", [True, False])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_reference_stays_the_frozen_sft_policy(method, precompute, sft_adapter, tmp_path):
    rows = pairs(8)
    settings = {k: v for k, v in FAST.items() if k != "lora_r" or method == "lora"}
    config = DPOConfig(
        **settings, method=method, lr=1e-2 if method == "lora" else 1e-3, precompute_reference=precompute
    )
    trainer, tokenizer = dpo.build_trainer(
        config, sft_adapter, rows, tmp_path / "scratch", torch.device("cpu")
    )
    trainer.train()

    sft, _ = load_causal_lm(sft_adapter, device=torch.device("cpu"))
    batch = tokenizer(
        tokenizer.apply_chat_template([[*rows[0]["prompt"], *rows[0]["chosen"]]], tokenize=False),
        return_tensors="pt",
        add_special_tokens=False,
    )
    with torch.no_grad():
        expected = sft(**batch).logits
        policy = trainer.model.eval()
        trained_logits = policy(**batch).logits
    assert not torch.allclose(trained_logits, expected, atol=1e-3)  # the policy moved away from SFT
    if precompute:  # the reference's log-probabilities, taken before training, are the SFT policy's
        assert trainer.ref_model is None  # and no frozen copy stays in memory
        for index in (0, len(rows) - 1):
            for side in ("chosen", "rejected"):
                measured = trainer.train_dataset[index][f"ref_{side}_logps"]
                assert measured == pytest.approx(completion_logp(sft, tokenizer, rows[index], side), abs=1e-4)
        return
    with torch.no_grad():
        if method == "lora":
            with policy.disable_adapter():
                reference = policy(**batch).logits
        else:
            reference = trainer.ref_model(**batch).logits
    assert torch.allclose(reference, expected, atol=1e-5)  # the reference is the SFT policy, untouched


def test_the_reference_is_precomputed_when_it_pays():
    assert dpo.precomputes_reference(DPOConfig(epochs=5))  # scored once instead of five times
    assert not dpo.precomputes_reference(DPOConfig(epochs=1))  # once either way: no separate pass
    assert dpo.precomputes_reference(DPOConfig(epochs=1, method="full"))  # no frozen copy in memory
    assert not dpo.precomputes_reference(DPOConfig(epochs=5, precompute_reference=False))


def completion_logp(model, tokenizer, row: dict, side: str) -> float:
    """log p(response | prompt) under `model`: the tokens the chat template adds after the prompt."""
    prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)
    full = tokenizer.apply_chat_template([*row["prompt"], *row[side]], tokenize=True)
    prompt, full = (list(ids["input_ids"] if hasattr(ids, "keys") else ids) for ids in (prompt, full))
    assert full[: len(prompt)] == prompt
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full])).logits[0, :-1].float()
    logps = torch.log_softmax(logits, dim=-1)[torch.arange(len(full) - 1), torch.tensor(full[1:])]
    return logps[len(prompt) - 1 :].sum().item()


def test_best_vs_rest_keeps_the_pairs_of_the_undominated_response():
    rows = pairs(2)
    kept = dpo.best_vs_rest(rows)
    assert len(kept) == 4
    assert all(arithmetic.is_correct(row["chosen"][0]["content"], row["answer"]) for row in kept)
    cycle = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "b", "rejected": "a"},
    ]
    assert dpo.best_vs_rest(cycle) == []


def test_conversational_preferences_need_a_chat_template(sft_adapter, tmp_path):
    plain_policy = tmp_path / "plain"
    model, tokenizer = load_causal_lm(sft_adapter, device=torch.device("cpu"))
    tokenizer.chat_template = None
    model.merge_and_unload().save_pretrained(plain_policy)
    tokenizer.save_pretrained(plain_policy)
    (plain_policy / "chat_template.jinja").unlink(missing_ok=True)
    preferences = write_pairs(tmp_path / "prefs", pairs(2))
    with pytest.raises(InputError, match="no chat template"):
        dpo.run(DPOConfig(**FAST), {"policy": plain_policy, "preferences": preferences}, tmp_path / "out")


def test_plain_preferences_for_a_chat_policy_are_refused(sft_adapter, tmp_path):
    rows = [
        {"prompt": "What is 1 + 2?\n", "chosen": "1 + 2 = 3", "rejected": "1 + 2 = 4"},
        {"prompt": "What is 2 + 2?\n", "chosen": "2 + 2 = 4", "rejected": "2 + 2 = 5"},
    ]
    preferences = write_pairs(tmp_path / "prefs", rows)
    with pytest.raises(InputError, match="plain text, but the policy has a chat template"):
        dpo.run(DPOConfig(**FAST), {"policy": sft_adapter, "preferences": preferences}, tmp_path / "out")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            '{"prompt": "p", "chosen": "a"}',
            r"line 1: no `rejected` column \(found columns \['prompt', 'chosen'\]\)",
        ),
        ("not json", "line 1: not valid JSON"),
        (
            '{"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}',
            "line 1: `chosen` is a list; the prompt is a string, so the responses must be too",
        ),
    ],
)
def test_malformed_preferences_are_clear_errors_before_the_policy_loads(line, message, tmp_path):
    (tmp_path / "preferences.jsonl").write_text(line + "\n")
    inputs = {"policy": tmp_path / "no-policy", "preferences": tmp_path}
    with pytest.raises(InputError, match="^dpo: .*preferences.jsonl " + message):
        dpo.run(DPOConfig(**FAST), inputs, tmp_path / "out")


def test_pairs_with_identical_responses_are_dropped_counted_and_bounded(sft_adapter, tmp_path):
    rows = pairs(4)
    same = [{**row, "rejected": row["chosen"]} for row in rows[:3]]
    preferences = write_pairs(tmp_path / "preferences", rows + same)
    metrics = dpo.run(
        DPOConfig(**FAST, pairs="all"), {"policy": sft_adapter, "preferences": preferences}, tmp_path / "out"
    )
    assert metrics["pairs_dropped_identical"] == 3
    assert metrics["pairs_given"] == len(rows) + 3 and metrics["pairs"] == len(rows)
    with pytest.raises(
        InputError, match=r"3 of the 15 pairs have the same chosen and rejected.*min_distinct_fraction"
    ):
        dpo.run(
            DPOConfig(**FAST, min_distinct_fraction=0.9),
            {"policy": sft_adapter, "preferences": preferences},
            tmp_path / "out2",
        )


def test_config_checks_loss_weights_and_method_settings():
    with pytest.raises(ValidationError, match="loss_weights has 1 weights for 2"):
        DPOConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    with pytest.raises(ValidationError, match="exo_pair needs label_smoothing"):
        DPOConfig(loss_type=["exo_pair"])
    # TRL's sigmoid loss ignores label_smoothing (no conservative DPO any more): refused, not ignored
    with pytest.raises(
        ValidationError, match=r"label_smoothing 0.1 has no effect on loss_type \['sigmoid', 'sft'\]"
    ):
        DPOConfig(loss_type=["sigmoid", "sft"], label_smoothing=0.1)
    assert DPOConfig(loss_type=["robust", "sft"], label_smoothing=0.1).label_smoothing == 0.1
    with pytest.raises(ValidationError, match="does not use lora_r"):
        DPOConfig(method="full", lora_r=4)
    with pytest.raises(ValidationError, match="lora_dropout would have no effect: the dpo stage turns every"):
        DPOConfig(lora_dropout=0.05)
    with pytest.raises(ValidationError):
        DPOConfig(loss_type=["not_a_loss"])
    assert DPOConfig().loss_type == ["sigmoid", "sft"]


def test_registry_entry_uses_this_config():
    stage = STAGES["dpo"]
    assert stage.config is DPOConfig and stage.load() is dpo.run
    assert stage.outputs(DPOConfig()) == {"": "policy"}
