"""The `sample` stage and the batched generation helpers (tiny random models, CPU)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from peft import LoraConfig, get_peft_model

from common.models import load_causal_lm, write_base_reference
from common.outcomes import InputError
from policy import generation, sample
from policy.configs import SampleConfig
from policy.demo_model import build_model, train_tokenizer
from policy.generation import (
    Completion,
    HFEngine,
    Sampling,
    SeededSampler,
    encode_prompts,
    generate,
    left_pad,
    sample_candidates,
)
from tasks import arithmetic

TINY = {"k": 3, "max_new_tokens": 6, "num_prompts": 6, "device": "cpu", "task": {"name": "arithmetic"}}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random model with the demo tokenizer: its samples are random tokens, all distinct. Weights
    are drawn with std 0.5 (not 0.02) so that greedy decoding does not just repeat the last token."""
    out = tmp_path_factory.mktemp("base")
    tokenizer = train_tokenizer(arithmetic.pretraining_corpus())
    torch.manual_seed(0)
    model = build_model(tokenizer, layers=1, hidden_size=32, intermediate_size=64, heads=2)
    with torch.no_grad():
        for weight in (p for p in model.parameters() if p.dim() >= 2):
            weight.normal_(0, 0.5)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_dir(base_dir, tmp_path_factory):
    """A LoRA adapter with random (not zero) B matrices, so it changes the base's outputs; the layout of
    the SFT stage's output: adapter files, tokenizer, base.json."""
    out = tmp_path_factory.mktemp("adapter")
    model, tokenizer = load_causal_lm(base_dir, device=torch.device("cpu"))
    torch.manual_seed(1)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_base_reference(out, base_dir)
    return out


@pytest.fixture(scope="module")
def policy(base_dir):
    return load_causal_lm(base_dir, device=torch.device("cpu"))


def run_stage(tmp_path, name, inputs, **config):
    out = tmp_path / name
    out.mkdir()
    metrics = sample.run(SampleConfig(**{**TINY, **config}), inputs, out)
    lines = (out / "samples.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines], metrics, out


# --- the stage ---


def test_k_candidates_per_demo_prompt_with_answers_and_metrics(base_dir, tmp_path):
    samples, metrics, out = run_stage(tmp_path, "s", {"policy": base_dir}, duplicates="keep")
    demo = arithmetic.train_prompts()[:6]
    assert [s["id"] for s in samples] == [r["id"] for r in demo]
    assert [s["prompt"] for s in samples] == [r["prompt"] for r in demo]
    assert [s["answer"] for s in samples] == [r["answer"] for r in demo]
    assert all(
        len(s["candidates"]) == 3 and all(isinstance(c, str) for c in s["candidates"]) for s in samples
    )
    assert metrics["prompts"] == 6 and metrics["candidates"] == 18
    assert 18 <= metrics["new_tokens"] <= 6 * 3 * 6 and 0 <= metrics["truncated_fraction"] <= 1
    assert metrics["mean_distinct_candidates"] == 3.0
    for key in (
        "duplicates_removed",
        "tokens_per_s",
        "generation_s",
        "duration_s",
        "pass_rate_sampled",
        "mixed_fraction",
    ):
        assert key in metrics
    assert 0 <= metrics["pass_rate_sampled"] <= 1 and metrics["tokens_per_s"] > 0
    generation = json.loads((out / "generation.json").read_text())
    assert {k: generation[k] for k in ("k", "seed", "temperature", "top_p", "max_new_tokens")} == {
        "k": 3,
        "seed": 0,
        "temperature": 1.0,
        "top_p": 1.0,
        "max_new_tokens": 6,
    }
    assert generation["policy"]["path"] == str(base_dir.resolve())
    assert generation["prompt_format"] == "chat"
    assert generation["prompts"] == {
        "task": {"name": "arithmetic", "max_operand": 19, "split_seed": 0},
        "split": "train",
    }


def test_held_out_split_and_the_pass_rate_counts_passing_candidates_that_ended(
    base_dir, tmp_path, monkeypatch
):
    # A stand-in sampler: the first candidate right, the second right but cut off, the third wrong.
    def fake(engine, prompt_ids, k, sampling, **_):
        drawn = [("right", True), ("right", False), ("wrong", True)]
        return [[Completion(text, [7], ended) for text, ended in drawn] for _ in prompt_ids]

    monkeypatch.setattr(sample, "sample_candidates", fake)
    monkeypatch.setattr(arithmetic, "is_correct", lambda response, answer: response == "right")
    samples, metrics, _ = run_stage(tmp_path, "s", {"policy": base_dir}, split="held_out", num_prompts=4)
    assert [s["id"] for s in samples] == [r["id"] for r in arithmetic.held_out_prompts()[:4]]
    assert metrics["pass_rate_sampled"] == pytest.approx(1 / 3)
    assert metrics["mixed_fraction"] == 1.0
    assert metrics["duplicates_removed"] == 4  # "right" twice per prompt


def test_same_seed_gives_identical_bytes_whatever_the_batch_size_and_another_seed_differs(base_dir, tmp_path):
    _, _, first = run_stage(tmp_path, "a", {"policy": base_dir}, seed=0, batch_size=128)
    _, _, again = run_stage(tmp_path, "b", {"policy": base_dir}, seed=0, batch_size=4)
    _, _, other = run_stage(tmp_path, "c", {"policy": base_dir}, seed=1)
    assert (first / "samples.jsonl").read_bytes() == (again / "samples.jsonl").read_bytes()
    assert (first / "samples.jsonl").read_bytes() != (other / "samples.jsonl").read_bytes()


def test_a_prompts_candidates_do_not_depend_on_the_other_prompts(base_dir, tmp_path):
    many, _, _ = run_stage(tmp_path, "a", {"policy": base_dir}, num_prompts=6)
    few, _, _ = run_stage(tmp_path, "b", {"policy": base_dir}, num_prompts=2)
    assert few == many[:2]


def test_duplicates_removed_marked_or_kept(base_dir, tmp_path):
    # Greedy decoding repeats one candidate K times.
    removed, metrics, _ = run_stage(tmp_path, "r", {"policy": base_dir}, temperature=0)
    assert all(len(s["candidates"]) == 1 and "duplicate_of" not in s for s in removed)
    assert metrics["duplicates_removed"] == 6 * 2 and metrics["mean_distinct_candidates"] == 1.0
    assert metrics["new_tokens"] <= 6 * 6  # generated once per prompt
    marked, metrics, _ = run_stage(tmp_path, "m", {"policy": base_dir}, temperature=0, duplicates="mark")
    assert all(s["duplicate_of"] == [None, 0, 0] and len(set(s["candidates"])) == 1 for s in marked)
    assert metrics["duplicates"] == 12 and metrics["duplicates_removed"] == 0
    kept, _, _ = run_stage(tmp_path, "k", {"policy": base_dir}, temperature=0, duplicates="keep")
    assert [s["candidates"] for s in kept] == [s["candidates"] for s in marked]


def test_duplicate_handling_keeps_the_first_occurrence_in_order():
    assert sample.duplicate_indices(["a", "b", "a", "c", "b", "a"]) == [None, None, 0, None, 1, 0]
    record = {"id": "x", "prompt": "p", "answer": 1}
    assert sample.to_sample(record, ["b", "a", "b", "c"], "remove") == {
        "id": "x",
        "prompt": "p",
        "candidates": ["b", "a", "c"],
        "answer": 1,
    }
    assert sample.to_sample(record, ["b", "a", "b"], "mark")["duplicate_of"] == [None, None, 0]


def test_adapter_policy_samples_on_its_base(base_dir, adapter_dir, tmp_path):
    from_adapter, metrics, out = run_stage(tmp_path, "a", {"policy": adapter_dir})
    from_base, _, _ = run_stage(tmp_path, "b", {"policy": base_dir})
    assert metrics["candidates"] == 18
    assert [s["candidates"] for s in from_adapter] != [s["candidates"] for s in from_base]
    generation = json.loads((out / "generation.json").read_text())
    assert generation["policy"]["base"]["path"] == str(base_dir.resolve())


def test_prompts_file_with_ids_chat_messages_and_extra_columns(base_dir, tmp_path):
    rows = [
        {"id": "q1", "prompt": "What is 2 + 3?", "answer": 5, "topic": "sums"},
        {"prompt": [{"role": "user", "content": "What is 4 + 4?"}], "answer": 8, "topic": "chat"},
        {"id": "q3", "prompt": "Compute 1 + 1.", "answer": 2, "topic": "sums"},
    ]
    file = tmp_path / "prompts.jsonl"
    file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    samples, metrics, _ = run_stage(
        tmp_path, "s", {"policy": base_dir, "prompts": file}, num_prompts=None, task=None
    )
    assert [s["id"] for s in samples[::2]] == ["q1", "q3"] and samples[1]["id"].startswith("p-")
    assert [(s["prompt"], s["answer"], s["topic"]) for s in samples] == [
        (r["prompt"], r["answer"], r["topic"]) for r in rows
    ]
    assert all(len(s["candidates"]) == 3 for s in samples)
    assert "pass_rate_sampled" not in metrics  # no task, no verdicts

    table = tmp_path / "prompts.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"prompt": r["prompt"], "topic": r["topic"]} for r in rows[::2]]), table
    )
    samples, metrics, _ = run_stage(tmp_path, "p", {"policy": base_dir, "prompts": table}, num_prompts=1)
    assert len(samples) == 1 and samples[0]["topic"] == "sums" and len(samples[0]["candidates"]) == 3
    assert "pass_rate_sampled" in metrics  # the arithmetic task judges a prompt that asks a sum


def test_without_prompts_or_task_or_with_prompts_the_task_cannot_judge_it_is_an_error(base_dir, tmp_path):
    with pytest.raises(InputError, match="sample: no `prompts` input and no task"):
        run_stage(tmp_path, "a", {"policy": base_dir}, task=None)
    file = tmp_path / "jokes.jsonl"
    file.write_text(json.dumps({"prompt": "Tell me a joke."}) + "\n")
    with pytest.raises(
        InputError, match=r"sample: task 'arithmetic' cannot judge the prompts in .*row 1 lacks"
    ):
        run_stage(tmp_path, "b", {"policy": base_dir, "prompts": file})


def test_prompts_without_a_prompt_column_or_missing_are_input_errors(base_dir, tmp_path):
    file = tmp_path / "bad.jsonl"
    file.write_text(json.dumps({"question": "What is 1 + 1?", "reference": 2}) + "\n")
    with pytest.raises(
        InputError, match=r"bad\.jsonl line 1: no `prompt` column.*\['question', 'reference'\]"
    ):
        sample.run(SampleConfig(**TINY), {"policy": base_dir, "prompts": file}, tmp_path)
    with pytest.raises(InputError, match=r"absent\.jsonl does not exist.*`prompt` column"):
        sample.run(SampleConfig(**TINY), {"policy": base_dir, "prompts": tmp_path / "absent.jsonl"}, tmp_path)
    file.write_text(json.dumps({"prompt": "a", "id": 1}) + "\n" + json.dumps({"prompt": "b", "id": 1}) + "\n")
    with pytest.raises(InputError, match=r"bad\.jsonl line 2: repeats the id 1 of .*bad\.jsonl line 1"):
        sample.run(SampleConfig(**TINY), {"policy": base_dir, "prompts": file}, tmp_path)


def test_a_samples_table_goes_to_the_open_wandb_run(base_dir, tmp_path, monkeypatch):
    """A real offline W&B run, opened as the runner opens one: the table is read back from its file."""
    from tests.wandb_offline import offline_run, records, run_files

    monkeypatch.setattr(sample, "TABLE_PROMPTS", 2)
    with offline_run(tmp_path, "sample-test"):
        samples, _, _ = run_stage(tmp_path, "s", {"policy": base_dir})
    [table_file] = (tmp_path / "wandb").rglob("samples_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["prompt_id", "prompt", "candidate_index", "candidate", "verdict"]
    expected = [[s["id"], s["prompt"], i, c] for s in samples[:2] for i, c in enumerate(s["candidates"])]
    assert [row[:4] for row in table["data"]] == expected
    assert all(row[4] == 0.0 for row in table["data"])  # random tokens never add up
    assert any(r.HasField("history") for f in run_files(tmp_path / "wandb") for r in records(f))


# --- generation helpers ---


def test_left_padded_batches_give_the_unbatched_greedy_result(policy):
    model, tokenizer = policy
    prompts = [
        "What is 1 + 2?",
        "Compute 13 + 19.",
        "Hi",
        [{"role": "user", "content": "What is 10 plus 17?"}],
    ]
    ids = encode_prompts(tokenizer, prompts)
    assert len({len(i) for i in ids}) == len(ids)  # every row of the batch is padded differently
    greedy = Sampling(temperature=0, max_new_tokens=8)
    batched = generate(model, tokenizer, ids, greedy, batch_size=len(ids))
    alone = [generate(model, tokenizer, [i], greedy)[0] for i in ids]
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    assert len({tuple(c.token_ids) for c in batched}) > 1
    # The check can fail: the same batch with its padding attended to gives other tokens.
    input_ids, attention_mask = left_pad(ids, tokenizer.pad_token_id)
    ignored = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(attention_mask), max_new_tokens=8, do_sample=False
    )
    assert ignored[:, input_ids.shape[1] :].tolist() != [c.token_ids for c in batched]


def test_seeded_sampling_does_not_depend_on_batching(policy):
    model, tokenizer = policy
    ids = encode_prompts(tokenizer, ["What is 1 + 2?", "Compute 13 + 19.", "Hi"])
    settings = Sampling(temperature=0.9, top_p=0.95, max_new_tokens=8)
    together = sample_candidates(HFEngine(model, tokenizer, 12), ids, 4, settings, seed=3)
    one_by_one = sample_candidates(HFEngine(model, tokenizer, 1), ids, 4, settings, seed=3)
    reversed_order = sample_candidates(HFEngine(model, tokenizer, 5), ids[::-1], 4, settings, seed=3)
    assert together == one_by_one == reversed_order[::-1]
    assert len({c.text for drawn in together for c in drawn}) == 12


def test_generation_stops_at_a_stop_token_and_decodes_what_precedes_it(policy):
    model, tokenizer = policy
    ids = encode_prompts(tokenizer, ["What is 1 + 2?"])
    seeded = {"sampling": Sampling(max_new_tokens=8), "seeds": [5]}
    full = generate(model, tokenizer, ids, stop_token_ids=[], **seeded)[0].token_ids
    # Stop at the first token that did not occur before it: the tokens up to there are unchanged.
    stop_at = next((i for i, t in enumerate(full) if i and t not in full[:i]), 0)
    assert stop_at > 0
    stopped = generate(model, tokenizer, ids, stop_token_ids=[full[stop_at]], **seeded)[0]
    assert stopped.finished and stopped.token_ids == full[: stop_at + 1]
    assert stopped.text == tokenizer.decode(full[:stop_at], skip_special_tokens=True).strip()


def test_prompts_are_rendered_with_the_chat_template_unless_plain_is_asked(policy):
    _, tokenizer = policy
    [chat] = encode_prompts(tokenizer, ["What is 1 + 2?"])
    assert tokenizer.decode(chat) == "<|bos|><|user|>What is 1 + 2?<|assistant|>"
    [plain] = encode_prompts(tokenizer, ["What is 1 + 2?"], "plain")
    assert tokenizer.decode(plain) == "<|bos|>What is 1 + 2?"
    with pytest.raises(InputError, match="chat messages"):
        encode_prompts(tokenizer, [[{"role": "user", "content": "Hi"}]], "plain")


def test_the_seeded_sampler_draws_from_the_filtered_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    rows = 4000
    scores = SeededSampler(Sampling(), range(rows))(None, logits.repeat(rows, 1))
    picked = scores.argmax(dim=1)
    assert (scores.isfinite().sum(dim=1) == 1).all()  # one token per row, for greedy decoding
    frequencies = torch.bincount(picked, minlength=4) / rows
    assert torch.allclose(frequencies, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    nucleus = SeededSampler(Sampling(top_p=0.7), range(rows))(None, logits.repeat(rows, 1)).argmax(dim=1)
    assert set(nucleus.tolist()) == {0, 1}  # 0.5 + 0.3 covers 0.7
    assert abs((nucleus == 0).float().mean().item() - 0.5 / 0.8) < 0.03
    cold = SeededSampler(Sampling(temperature=0.25), range(rows))(None, logits.repeat(rows, 1)).argmax(dim=1)
    assert (cold == 0).float().mean() > 0.85  # (0.5/0.3)**4: the top token dominates


def test_the_seeded_sampler_picks_the_same_tokens_however_many_rows_it_takes_at_a_time(monkeypatch):
    torch.manual_seed(0)
    scores = torch.randn(7, 1000) * 3
    seeds = list(range(7))
    monkeypatch.setattr(generation, "CDF_CHUNK_ELEMENTS", 2000)  # two rows at a time
    chunked = SeededSampler(Sampling(), seeds)(None, scores.clone()).argmax(dim=1)
    monkeypatch.setattr(generation, "CDF_CHUNK_ELEMENTS", 10**9)  # every row at once
    whole = SeededSampler(Sampling(), seeds)(None, scores.clone()).argmax(dim=1)
    alone = [
        SeededSampler(Sampling(), [seed])(None, scores[[row]].clone()).argmax().item()
        for row, seed in enumerate(seeds)
    ]
    assert chunked.tolist() == whole.tolist() == alone
    assert len(set(alone)) > 1
