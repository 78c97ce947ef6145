"""`rlhf export` and `rlhf score` on tiny demo models, through the command line entry point."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.models import load_causal_lm
from common.reward_model import load_reward_model, score_batch
from pipeline import cli
from tests import tiny_policies


def test_export_writes_a_merged_model_that_answers_like_the_adapter(tmp_path, capsys):
    base = tiny_policies.random_model(tmp_path / "base")
    adapter = tiny_policies.lora_adapter(base, tmp_path / "adapter")
    out = tmp_path / "merged"

    assert cli.main(["export", str(adapter), "--merged", str(out)]) == 0

    merged = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    with_adapter, _ = load_causal_lm(adapter, device=torch.device("cpu"))
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 3 + 4?"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, atol=1e-4, rtol=1e-4)


def test_export_refuses_a_directory_that_is_not_empty(tmp_path, capsys):
    base = tiny_policies.random_model(tmp_path / "base")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")

    assert cli.main(["export", str(base), "--merged", str(tmp_path / "taken")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_score_prints_what_the_reward_model_gives_each_response(tmp_path, capsys):
    reward = tiny_policies.reward_model(tmp_path / "reward")
    responses = ["3 + 4 = 7", "3 + 4 = 8"]

    assert (
        cli.main(
            ["score", str(reward), "--prompt", "What is 3 + 4?", "--json"]
            + [arg for r in responses for arg in ("--response", r)]
        )
        == 0
    )

    printed = json.loads(capsys.readouterr().out)
    model, tokenizer = load_reward_model(reward, device=torch.device("cpu"))
    expected = score_batch(model, tokenizer, ["What is 3 + 4?"] * 2, responses)
    assert [row["response"] for row in printed] == responses
    assert [row["score"] for row in printed] == expected


def test_score_of_an_unknown_artifact_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RLHF_STORE", str(tmp_path / "store"))

    assert cli.main(["score", "reward:v9", "--prompt", "p", "--response", "r"]) == 2
    assert "no artifact named 'reward'" in capsys.readouterr().err
