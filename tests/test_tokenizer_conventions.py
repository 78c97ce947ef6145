"""Every stage on models as published: pad = eos, no pad at all, no generation markers, a default
system prompt, bos added by the template or by the tokenizer (see `tests/conventions.py`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset

from common.models import choose_pad_token, load_tokenizer, tokenizer_summary
from common.outcomes import InputError
from common.reward_model import encode
from pipeline.store import Store
from policy.generation import encode_prompt
from policy.sft import with_assistant_masks
from tests.conftest import rlhf
from tests.conventions import CONVENTIONS, build_tokenizer, published_model

CHAT = [name for name, spec in CONVENTIONS.items() if spec["template"]]


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_auto_pad_is_an_existing_token_distinct_from_eos_where_there_is_one(convention):
    tokenizer = build_tokenizer(convention)
    size, eos = len(tokenizer), tokenizer.eos_token
    choice = choose_pad_token(tokenizer)
    assert tokenizer.pad_token == CONVENTIONS[convention]["pad"], choice
    assert (tokenizer.eos_token, len(tokenizer)) == (eos, size)  # no token added, eos untouched
    assert (tokenizer.pad_token != eos) == (convention != "gpt2")
    assert "auto" in choice


def test_pad_token_setting_names_an_existing_token_or_eos(tmp_path):
    model = published_model("chatml", tmp_path / "m")
    assert load_tokenizer(model, "eos").pad_token == "<|im_end|>"
    assert load_tokenizer(model, "<|im_start|>").pad_token == "<|im_start|>"
    with pytest.raises(InputError, match=r"'<pad>' is not a token of this tokenizer's vocabulary"):
        load_tokenizer(model, "<pad>")
    # A tokenizer saved with its chosen pad keeps it: stages downstream inherit the choice.
    tokenizer = load_tokenizer(model)
    tokenizer.save_pretrained(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.pad_token == "<|endoftext|>" and "as published" in again.rlhf_pad_choice


@pytest.mark.parametrize("convention", CHAT)
def test_assistant_turns_are_found_without_generation_markers(convention):
    tokenizer = build_tokenizer(convention)
    choose_pad_token(tokenizer)
    assert tokenizer_summary(tokenizer)["generation_markers"] is False
    messages = [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "hi there"},
        {"role": "user", "content": "And bye?"},
        {"role": "assistant", "content": "bye now"},
    ]
    row = with_assistant_masks(Dataset.from_list([{"messages": messages}]), tokenizer)[0]
    ids, mask = row["input_ids"], row["assistant_masks"]
    assert len(ids) == len(mask)
    trained = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    untrained = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    eos = tokenizer.eos_token
    # Both answers and the eos that ends each, nothing of the user's turns or the template's headers.
    assert trained.replace("\n", "") == f"hi there{eos}bye now{eos}"
    assert "Say hi." in untrained and "And bye?" in untrained and "hi there" not in untrained


@pytest.mark.parametrize("convention", CHAT)
def test_a_chat_prompt_starts_with_one_bos_at_most(convention):
    tokenizer = build_tokenizer(convention)
    bos = tokenizer.bos_token_id
    for ids in (
        encode_prompt(tokenizer, "Describe the ocean.", chat=True),
        encode(tokenizer, "Describe the ocean.", "It is wide."),
    ):
        assert ids.count(bos) <= 1 or convention == "chatml"  # ChatML's bos opens every turn
        assert ids[1] != bos


def _write_data(folder: Path) -> None:
    prompts = [
        "Describe the ocean.",
        "Why is the sky blue?",
        "What is coffee?",
        "Describe a bicycle.",
        "What is the capital of France?",
        "Write one short sentence.",
    ]
    sft = [
        {
            "messages": [
                {"role": "user", "content": p},
                {"role": "assistant", "content": "A short answer."},
                {"role": "user", "content": "Shorter?"},
                {"role": "assistant", "content": "yes."},
            ]
        }
        for p in prompts
    ]
    pairs = [
        {
            "prompt": [{"role": "user", "content": p}],
            "chosen": [{"role": "assistant", "content": "a short answer."}],
            "rejected": [{"role": "assistant", "content": "I do not know, sorry about that."}],
        }
        for p in prompts * 2
    ]
    for name, rows in (
        ("sft", sft),
        ("prompts", [{"prompt": p} for p in prompts]),
        ("prefs", pairs),
    ):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


WORKFLOW = """
name: conventions
stages:
  sft:
    inputs: {model: ./model, data: ./sft.jsonl}
    config: {steps: 2, batch_size: 4, eval_examples: 0, lora_r: 4, logging_steps: 1}
  sample:
    inputs: {policy: sft, prompts: ./prompts.jsonl}
    config: {k: 2, num_prompts: 3, max_new_tokens: 6, batch_size: 8}
  reward:
    inputs: {model: ./model, preferences: ./prefs.jsonl}
    config: {epochs: 1, batch_size: 4, lora_r: 4, held_out_fraction: 0.3, min_accuracy: 0.0, eval_batch_size: 8}
  dpo:
    inputs: {policy: sft, preferences: ./prefs.jsonl}
    config: {epochs: 1, batch_size: 4, lora_r: 4}
  ppo:
    inputs: {policy: sft, reward: reward, prompts: ./prompts.jsonl}
    config: {updates: 2, batch_size: 4, minibatches: 2, ppo_epochs: 1, max_new_tokens: 6, forward_batch_size: 8, lora_r: 4}
  rloo:
    inputs: {policy: sft, reward: reward, prompts: ./prompts.jsonl}
    config: {steps: 2, batch_size: 4, num_generations: 2, max_new_tokens: 6, lora_r: 4, logging_steps: 1}
  evaluate:
    inputs:
      policies: {sft: sft, dpo: dpo, ppo: ppo, rloo: rloo}
      reward: reward
      reference: sft
      prompts: ./prompts.jsonl
    config: {samples_per_prompt: 2, max_new_tokens: 6, bootstrap_samples: 100, batch_size: 8}
"""


@pytest.mark.slow  # one `rlhf run` of seven stages per convention: about a minute each on 2 cores
@pytest.mark.parametrize("convention", CHAT)
def test_every_stage_runs_on_a_model_as_published(convention, workspace):
    published_model(convention, workspace / "model")
    _write_data(workspace)
    # SmolLM2's conventions also run every stage in bf16, as workflows/smollm2.yaml does on a CPU
    defaults = "defaults: {precision: bfloat16}\n" if convention == "chatml" else ""
    (workspace / "wf.yaml").write_text(defaults + WORKFLOW)
    result = rlhf("run", "wf.yaml", cwd=workspace)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    store = Store(workspace / "artifacts")
    expected_pad = CONVENTIONS[convention]["pad"]
    for stage in ("sft", "reward"):
        summary = store.get(f"{stage}:latest").manifest["metrics"]["tokenizer"]
        assert summary["pad_token"] == expected_pad and "auto" in summary["pad_choice"]
        assert summary["generation_markers"] is False
    sft = store.get("sft:latest").manifest
    assert sft["config"]["precision"] == ("bfloat16" if convention == "chatml" else "auto")
    assert sft["metrics"]["loss_on"].startswith("assistant turns (found by rendering")
    # The choice travels with the saved tokenizer: every later stage uses the same pad token.
    for stage in ("sft", "dpo", "ppo", "rloo", "reward"):
        saved = json.loads((store.get(f"{stage}:latest").path / "tokenizer_config.json").read_text())
        assert saved["pad_token"] == expected_pad, stage
    samples = [json.loads(line) for line in (store.get("sample:latest").path / "samples.jsonl").open()]
    assert len(samples) == 3 and all(s["candidates"] for s in samples)
    report = store.get("evaluate:latest").manifest
    assert report["kind"] == "eval-report"
