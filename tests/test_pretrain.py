"""The demo task, the demo tokenizer and model, and the `pretrain` stage (tiny configs, CPU)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.outcomes import InputError
from pipeline import workflow
from policy import pretrain
from policy.configs import PretrainConfig
from policy.demo_model import EOS, ROLE_TOKENS, build_model, train_tokenizer
from tasks import arithmetic
from tests.conftest import REPO

TINY = {
    "steps": 40,
    "batch_size": 8,
    "seq_len": 32,
    "warmup_steps": 5,
    "lr": 3e-3,  # 40 steps of a tiny model: faster than the demo model's rate
    "layers": 1,
    "hidden_size": 32,
    "intermediate_size": 64,
    "heads": 2,
    "eval_prompts": 8,
    "cpu_threads": 1,  # tiny models gain nothing from threads, and lose a lot on a busy machine
    "task": {"name": "arithmetic"},
}
CONVERSATION = [
    {"role": "user", "content": "What is 7 + 12?"},
    {"role": "assistant", "content": "7 + 12 = 19"},
    {"role": "user", "content": "What is 3 + 4?"},
    {"role": "assistant", "content": "3 + 4 = 7"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(arithmetic.pretraining_corpus(), vocab_size=320)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("pretrain")
    metrics = pretrain.run(PretrainConfig(**TINY), {}, out_dir)
    return out_dir, metrics


# --- demo task ---


def test_the_demo_corpus_is_the_arithmetic_task_s(tmp_path):
    with pytest.raises(
        InputError, match=r"pretrain: without a `data` input .* arithmetic task, not instructions"
    ):
        pretrain.run(PretrainConfig(**{**TINY, "task": {"name": "instructions"}}), {}, tmp_path)


def test_split_is_disjoint_and_covers_all_pairs():
    train, held_out = arithmetic.split_pairs()
    assert not set(train) & set(held_out)
    assert sorted(train + held_out) == arithmetic.operand_pairs()
    assert 0.1 < len(held_out) / len(arithmetic.operand_pairs()) < 0.3
    assert arithmetic.split_pairs(split_seed=1)[1] != held_out


def test_no_text_after_pretraining_mentions_a_held_out_pair():
    held_out = set(arithmetic.split_pairs()[1])
    texts = [json.dumps(example) for example in arithmetic.sft_examples()]
    texts += [record["prompt"] for record in arithmetic.train_prompts()]
    mentioned = {(int(a), int(b)) for text in texts for a, b in re.findall(r"(\d+) (?:\+|plus) (\d+)", text)}
    assert mentioned, "the pattern must find the pairs of the training texts"
    assert not mentioned & held_out
    held_out_prompts = {record["prompt"] for record in arithmetic.held_out_prompts()}
    assert not held_out_prompts & {record["prompt"] for record in arithmetic.train_prompts()}


def test_pretraining_corpus_states_every_sum_with_the_configured_share_of_carry_slips():
    corpus = arithmetic.pretraining_corpus(noise=0.35, copies=3)
    assert len(corpus) == len(arithmetic.operand_pairs()) * len(arithmetic.PHRASINGS) * 3
    stated = [tuple(int(n) for n in re.findall(r"\d+", doc.split("\n")[1])) for doc in corpus]
    assert {(a, b) for a, b, _ in stated} == set(arithmetic.operand_pairs())
    errors = [c - (a + b) for a, b, c in stated if c != a + b]
    small = sum(a + b < 10 for a, b in arithmetic.operand_pairs()) / len(arithmetic.operand_pairs())
    expected = 0.35 * (1 - small / 2)  # below ten only the added carry can slip in
    assert expected - 0.03 < len(errors) / len(stated) < expected + 0.03
    assert set(errors) == {-10, 10} and all(c >= 0 for _, _, c in stated)
    assert arithmetic.pretraining_corpus() == arithmetic.pretraining_corpus()  # seeded
    clean = arithmetic.pretraining_corpus(noise=0.0, copies=1)
    assert all(eval(doc.split("\n")[1].replace("=", "==")) for doc in clean)


def test_records_have_stable_unique_ids_and_correct_answers():
    records = arithmetic.held_out_prompts()
    assert len({record["id"] for record in records}) == len(records)
    assert records == arithmetic.held_out_prompts()
    assert len(records) == len(arithmetic.split_pairs()[1]) * len(arithmetic.PHRASINGS)
    for record in records:
        assert record["id"] == arithmetic.record_id(record["prompt"])
        a, b = (int(n) for n in re.findall(r"\d+", record["prompt"]))
        assert record["answer"] == a + b


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        ("7 + 12 = 19", 19),
        ("19", 19),
        (" 19.", 19),
        ("7 + 12 = 18", 18),
        ("7 + 12 =", None),
        ("nineteen", None),
        ("7 + 12 = 19 and 3", None),
        ("", None),
    ],
)
def test_parse_answer(response, answer):
    assert arithmetic.parse_answer(response) == answer


def test_correct_response_is_correct_and_a_wrong_one_is_not():
    assert arithmetic.is_correct(arithmetic.render_response(7, 12), 19)
    assert not arithmetic.is_correct("7 + 12 = 18", 19)
    assert not arithmetic.is_correct("garbage", 19)


def test_sft_examples_are_conversational_prompt_completion():
    example = arithmetic.sft_examples()[0]
    assert set(example) == {"prompt", "completion"}
    assert example["prompt"][0]["role"] == "user"
    assert example["completion"][0]["role"] == "assistant"
    assert arithmetic.parse_answer(example["completion"][0]["content"]) is not None


# --- tokenizer and model ---


def test_special_tokens_are_distinct_single_tokens(tokenizer):
    ids = [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id]
    ids += tokenizer.convert_tokens_to_ids(list(ROLE_TOKENS))
    assert len(set(ids)) == len(ids)
    for token in ROLE_TOKENS:
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [
            tokenizer.convert_tokens_to_ids(token)
        ]
    assert 250 < len(tokenizer) <= 320


def test_numbers_tokenise_digit_by_digit(tokenizer):
    tokens = tokenizer.tokenize("What is 123 + 4567? 123 + 4567 = 4690")
    digit_tokens = [token for token in tokens if any(ch.isdigit() for ch in token)]
    assert digit_tokens == list("123456712345674690")


def test_any_text_round_trips(tokenizer):
    text = "Ünïcode ✓ {tabs}\tand\nnewlines 1234"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_chat_template_ends_each_assistant_turn_exactly_at_eos(tokenizer):
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert text.endswith("7" + EOS)
    assert f"7 + 12 = 19{EOS}<|user|>" in text
    rendered = tokenizer.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = rendered["input_ids"], rendered["assistant_masks"]
    assert ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.eos_token_id
    masked = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert masked == f"7 + 12 = 19{EOS}3 + 4 = 7{EOS}"


def test_generation_prompt_is_a_prefix_of_the_conversation(tokenizer):
    prompt = tokenizer.apply_chat_template(CONVERSATION[:1], add_generation_prompt=True, return_dict=True)
    prompt = prompt["input_ids"]
    full = tokenizer.apply_chat_template(CONVERSATION[:2], return_dict=True)["input_ids"]
    assert prompt[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert full[: len(prompt)] == prompt
    assert tokenizer.decode(full[len(prompt) :]) == f"7 + 12 = 19{EOS}"


def test_trl_accepts_the_chat_template_for_assistant_only_loss(tokenizer):
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    assert has_generation_markers(tokenizer.chat_template)
    assert is_chat_template_stop_token_trained(tokenizer)


def test_demo_model_has_about_a_million_parameters_and_agrees_with_the_tokenizer(tokenizer):
    model = build_model(tokenizer)
    assert 1.0e6 < sum(p.numel() for p in model.parameters()) < 1.2e6
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    for config in (model.config, model.generation_config):
        assert config.pad_token_id == tokenizer.pad_token_id
        assert config.eos_token_id == tokenizer.eos_token_id
        assert config.bos_token_id == tokenizer.bos_token_id


# --- the stage ---


def test_run_writes_a_model_that_loads_offline_and_generates(trained):
    out_dir, _ = trained
    assert list(out_dir.glob("*.safetensors"))
    assert not list(out_dir.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.chat_template is not None
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    prompt = tokenizer.apply_chat_template(
        CONVERSATION[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert output.shape[1] > prompt["input_ids"].shape[1]


def test_run_reports_metrics_and_learns(trained):
    _, metrics = trained
    expected = {
        "train_loss",
        "pass_rate_greedy",
        "pass_rate_sampled",
        "eval_prompts",
        "parameters",
        "tokens_per_second",
        "train_seconds",
        "duration_seconds",
        "device",
    }
    assert expected <= set(metrics)
    json.dumps(metrics)
    assert metrics["device"] == "cpu"
    assert metrics["eval_prompts"] == TINY["eval_prompts"]
    assert 0.0 <= metrics["pass_rate_greedy"] <= 1.0
    assert metrics["tokens_per_second"] > 0
    # An untrained model is near ln(vocab) ~ 5.6 nats; 40 small steps get well below.
    assert metrics["train_loss"] < 3.5


def test_same_seed_gives_identical_weights_and_another_seed_does_not(trained, tmp_path):
    out_dir, _ = trained
    first = AutoModelForCausalLM.from_pretrained(out_dir).state_dict()
    without_task = pretrain.run(PretrainConfig(**{**TINY, "task": None}), {}, tmp_path / "same")
    assert "pass_rate_greedy" in without_task  # no task and no data: the default arithmetic task
    same = AutoModelForCausalLM.from_pretrained(tmp_path / "same").state_dict()
    pretrain.run(PretrainConfig(**TINY, seed=1), {}, tmp_path / "other")
    other = AutoModelForCausalLM.from_pretrained(tmp_path / "other").state_dict()
    assert all(torch.equal(first[name], same[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


def test_bf16_is_deterministic_differs_from_float32_and_saves_float32_weights(trained, tmp_path):
    """`precision: bfloat16` computes in bf16 autocast over fp32 master weights: the same seed gives the
    same weights, not those of float32, and the saved model is float32 (with the attention it was built
    with: training swaps in eager attention on the CPU)."""
    config = PretrainConfig(**TINY, precision="bfloat16")
    metrics = pretrain.run(config, {}, tmp_path / "a")
    pretrain.run(config, {}, tmp_path / "b")
    first = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    float32 = AutoModelForCausalLM.from_pretrained(trained[0]).state_dict()
    weights = first.state_dict()
    assert all(torch.equal(weights[name], again[name]) for name in weights)
    assert not all(torch.equal(weights[name], float32[name]) for name in weights)
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}
    assert metrics["train_loss"] < 3.5


def test_training_leaves_the_attention_implementation_as_it_found_it(tokenizer):
    model = build_model(tokenizer, layers=1, hidden_size=32, intermediate_size=64, heads=2)
    before = model.config._attn_implementation
    assert before != "eager"  # else the test would show nothing
    documents = pretrain.tokenize(arithmetic.pretraining_corpus(copies=1)[:200], tokenizer)
    config = PretrainConfig(**{**TINY, "steps": 2, "precision": "bfloat16"})
    pretrain.train(model, documents, config, torch.device("cpu"))
    assert model.config._attn_implementation == before


def test_continues_pretraining_a_model_on_a_jsonl_data_set(trained, tmp_path):
    out_dir, _ = trained
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"body": f"{n} is a number."}) + "\n" for n in range(200)))
    config = PretrainConfig(**{**TINY, "steps": 5, "text_column": "body"})
    metrics = pretrain.run(config, {"model": out_dir, "data": data}, tmp_path / "continued")
    assert metrics["parameters"] == AutoModelForCausalLM.from_pretrained(out_dir).num_parameters()
    before = AutoModelForCausalLM.from_pretrained(out_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "continued").state_dict()
    assert not all(torch.equal(before[name], after[name]) for name in before)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "continued")
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(out_dir).get_vocab()


def test_a_missing_text_column_is_a_clear_error(trained, tmp_path):
    out_dir, _ = trained
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(
        InputError, match=r"data\.jsonl line 1: no `text` column \(found columns \['content'\]\)"
    ):
        pretrain.run(PretrainConfig(**TINY), {"model": out_dir, "data": data}, tmp_path / "out")


def test_logs_loss_and_lr_to_an_open_wandb_run(tmp_path):
    """A real offline W&B run, opened as the runner opens one, read back from its file."""
    from tests.wandb_offline import offline_run, records, run_files

    with offline_run(tmp_path, "pretrain-test"):
        (tmp_path / "out").mkdir()
        pretrain.run(PretrainConfig(**TINY), {}, tmp_path / "out")
    history = [r.history for f in run_files(tmp_path / "wandb") for r in records(f) if r.HasField("history")]
    assert [h.step.num for h in history] == [20, 40]
    for h in history:
        assert {"train/loss", "train/lr"} <= {i.nested_key[0] if i.nested_key else i.key for i in h.item}


@pytest.mark.slow
def test_the_demo_workflow_s_pretrain_config_learns_the_demo_task(tmp_path):
    """The base model knows arithmetic, unreliably: greedy answers mostly right, samples clearly less."""
    config = workflow.load(REPO / "workflows" / "demo.yaml").stages["pretrain"].config
    metrics = pretrain.run(config, {}, tmp_path)
    assert metrics["pass_rate_greedy"] >= 0.85
    assert metrics["pass_rate_sampled"] <= metrics["pass_rate_greedy"] - 0.2
