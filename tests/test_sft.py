"""The `sft` stage and `export_merged` on a tiny demo model (CPU, a few steps each)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.models import load_causal_lm
from common.outcomes import InputError
from common.training import set_loss_chunk
from policy import sft
from policy.configs import SFTConfig
from policy.demo_model import build_model, train_tokenizer
from policy.export import export_merged
from tasks import arithmetic
from tests.conftest import REPO, wait_until

LAYERS, HIDDEN, INTERMEDIATE = 2, 32, 64
FAST = {"steps": 4, "batch_size": 4, "eval_examples": 4, "task_eval": False, "logging_steps": 2}
"""A few steps on a few examples: enough to exercise a method, nothing to learn from."""
METHOD_SETTINGS = {
    "lora": {"lora_r": 4},
    "dora": {"lora_r": 4},
    "ia3": {},
    "prompt_tuning": {"virtual_tokens": 4},
    "prefix_tuning": {"virtual_tokens": 4},
    "freeze": {"trainable_blocks": 1},
    "full": {"lr": 1e-3},
}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A freshly initialised tiny demo model with its tokenizer (untrained: the tests check mechanics)."""
    out_dir = tmp_path_factory.mktemp("base")
    tokenizer = train_tokenizer(arithmetic.pretraining_corpus())
    torch.manual_seed(0)
    build_model(tokenizer, LAYERS, HIDDEN, INTERMEDIATE, heads=2).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """40 demo examples as conversational prompt/completion JSONL."""
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    path.write_text("".join(json.dumps(example) + "\n" for example in arithmetic.sft_examples()[:40]))
    return path


def expected_trainable(method: str, model: torch.nn.Module, config: SFTConfig) -> int:
    """What each method should train, computed from the architecture."""
    blocks = model.model.layers
    linears = [m for m in blocks.modules() if isinstance(m, torch.nn.Linear)]
    if method == "lora":
        return sum(config.lora_r * (m.in_features + m.out_features) for m in linears)
    if method == "dora":  # LoRA plus a magnitude per output feature
        return sum(config.lora_r * (m.in_features + m.out_features) + m.out_features for m in linears)
    if method == "ia3":  # PEFT's Llama defaults: scale the outputs of k/v, the input of the MLP's down_proj
        return LAYERS * (HIDDEN + HIDDEN + INTERMEDIATE)
    if method == "prompt_tuning":
        return config.virtual_tokens * HIDDEN
    if method == "prefix_tuning":  # a key and a value per virtual token and layer
        return config.virtual_tokens * LAYERS * 2 * HIDDEN
    if method == "freeze":
        return sum(p.numel() for block in blocks[-config.trainable_blocks :] for p in block.parameters())
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("method", list(METHOD_SETTINGS))
def test_each_method_trains_what_it_should_and_writes_its_output(method, base, data, tmp_path):
    config = SFTConfig(method=method, **FAST, **METHOD_SETTINGS[method])
    metrics = sft.run(config, {"model": base, "data": data}, tmp_path)

    base_model = AutoModelForCausalLM.from_pretrained(base)
    assert metrics["trainable_parameters"] == expected_trainable(method, base_model, config)
    assert 0 < metrics["trainable_fraction"] <= 1
    assert metrics["steps"] == 4
    for key in ("train_loss", "eval_loss", "tokens_per_second", "peak_memory_mb", "duration_seconds"):
        assert metrics[key] is not None and metrics[key] == metrics[key] and metrics[key] >= 0, key
    assert "pass_rate_greedy" not in metrics  # task_eval is off

    files = {p.name for p in tmp_path.iterdir()} - {"scratch"}
    assert {
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    } <= files
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["pad_token_id"] is not None and generation["pad_token_id"] != generation["eos_token_id"]
    if method in sft.ADAPTER_METHODS:
        assert {"adapter_config.json", "adapter_model.safetensors", "base.json"} <= files
        assert not {"model.safetensors", "config.json"} & files
        assert json.loads((tmp_path / "base.json").read_text())["path"] == str(base.resolve())
        model, _ = load_causal_lm(tmp_path)  # loads on top of its base, found through base.json
        assert type(model).__name__.startswith("PeftModel")
    else:
        assert {"config.json", "model.safetensors"} <= files
        assert "adapter_config.json" not in files
        trained, initial = load_file(tmp_path / "model.safetensors"), load_file(base / "model.safetensors")
        changed = {name for name in initial if not torch.equal(trained[name], initial[name])}
        last = f"model.layers.{LAYERS - 1}."
        if method == "freeze":
            assert changed and all(name.startswith(last) for name in changed)
        else:
            assert any(name.startswith("model.layers.0.") for name in changed)


def test_freeze_cannot_keep_more_blocks_than_the_model_has(base, data, tmp_path):
    with pytest.raises(InputError, match="only 2 blocks"):
        sft.run(
            SFTConfig(method="freeze", trainable_blocks=3, **FAST), {"model": base, "data": data}, tmp_path
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_qlora_on_cpu_is_a_clear_error_before_anything_loads(tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("nothing may load before the method is checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", no_loading)
    with pytest.raises(InputError, match=r"qlora .*CUDA GPU.*method: lora"):
        sft.run(SFTConfig(method="qlora"), {"model": tmp_path / "nowhere"}, tmp_path)


def test_data_in_no_known_format_lists_the_formats_and_the_columns_found(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "What is 1 + 2?", "answer": "3"}) + "\n")
    with pytest.raises(InputError) as error:  # the model does not exist: the data is checked first
        sft.run(SFTConfig(), {"model": tmp_path / "no-model", "data": path}, tmp_path)
    message = str(error.value)
    assert "question" in message and "answer" in message
    for accepted in ("prompt/completion", "messages", "text"):
        assert accepted in message


def test_mixed_plain_and_conversational_columns_are_rejected(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        json.dumps({"prompt": "What is 1 + 2?", "completion": [{"role": "assistant", "content": "3"}]}) + "\n"
    )
    with pytest.raises(
        InputError, match=r"mixed\.jsonl line 1: `completion` is a list; the prompt is a string"
    ):
        sft.run(SFTConfig(), {"model": tmp_path / "no-model", "data": path}, tmp_path)


def test_missing_data_says_what_was_expected(tmp_path):
    with pytest.raises(
        InputError, match=r"missing\.jsonl does not exist; expected a JSONL, JSON or Parquet file"
    ):
        sft.run(SFTConfig(), {"model": tmp_path / "no-model", "data": tmp_path / "missing.jsonl"}, tmp_path)


def test_an_adapter_as_the_model_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(InputError, match="is an adapter; merge it"):
        sft.run(SFTConfig(), {"model": tmp_path}, tmp_path / "out")


def test_settings_of_another_method_are_rejected():
    with pytest.raises(ValidationError, match="does not use lora_r"):
        SFTConfig(method="ia3", lora_r=8)
    with pytest.raises(ValidationError, match="does not use trainable_blocks"):
        SFTConfig(method="lora", trainable_blocks=2)
    assert SFTConfig(method="freeze", trainable_blocks=2).trainable_blocks == 2


def plain_prompt_completion() -> list[dict]:
    return [
        {
            "prompt": arithmetic.plain_prompt(e["prompt"][0]["content"]),
            "completion": e["completion"][0]["content"],
        }
        for e in arithmetic.sft_examples()[:40]
    ]


def messages() -> list[dict]:
    return [{"messages": e["prompt"] + e["completion"]} for e in arithmetic.sft_examples()[:40]]


@pytest.mark.parametrize(
    ("rows", "save", "expected"),
    [
        (plain_prompt_completion, "jsonl", "prompt/completion (plain)"),
        (messages, "parquet", "messages (conversational)"),
        (messages, "saved", "messages (conversational)"),
        (lambda: [{"text": "What is 1 + 2?\n1 + 2 = 3"}] * 10, "jsonl", "text (plain)"),
    ],
    ids=["plain-prompt-completion-jsonl", "messages-parquet", "messages-saved-dataset", "text-jsonl"],
)
def test_data_formats_and_files_are_recognised(rows, save, expected, tmp_path):
    dataset = Dataset.from_list(rows())
    if save == "jsonl":
        path = tmp_path / "data.jsonl"
        dataset.to_json(path)
    elif save == "parquet":
        path = tmp_path / "data.parquet"
        dataset.to_parquet(path)
    else:
        path = tmp_path / "saved"
        dataset.save_to_disk(path)
    (tmp_path / "manifest.json").write_text('{"kind": "dataset"}')  # as in an artifact directory
    loaded, data_format = sft.load_data(path, SFTConfig())
    assert data_format == expected
    assert len(loaded) == len(dataset)
    if save != "saved":  # the folder, like an artifact directory, finds the same data
        assert sft.load_data(tmp_path, SFTConfig())[1] == expected


@pytest.mark.parametrize(
    "rows", [plain_prompt_completion, messages], ids=["plain-prompt-completion", "messages"]
)
def test_plain_prompt_completion_and_messages_data_train_on_the_response_only(rows, base, tmp_path):
    path = tmp_path / "data.jsonl"
    Dataset.from_list(rows()).to_json(path)
    metrics = sft.run(SFTConfig(**FAST), {"model": base, "data": path}, tmp_path / "out")
    assert metrics["steps"] == 4 and metrics["train_loss"] > 0

    # the labels the trainer saw: the response (and eos) only
    tokenizer = AutoTokenizer.from_pretrained(base)
    dataset, data_format = sft.load_data(path, SFTConfig())
    trainer = build_trainer(base, dataset, data_format, tmp_path / "probe")
    example = trainer.train_dataset[0]
    trained = [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != -100]
    response = rows()[0].get("completion") or rows()[0]["messages"][-1]["content"]
    assert tokenizer.decode(trained) == response + "<|eos|>"


def build_trainer(base: Path, dataset: Dataset, data_format: str, out_dir: Path):
    from trl import SFTTrainer

    config = SFTConfig(**FAST)
    tokenizer = AutoTokenizer.from_pretrained(base)
    masking = sft.loss_mask(tokenizer, data_format, config)
    return SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(base),
        args=sft.training_args(config, masking, torch.device("cpu"), out_dir, base),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=sft.peft_config(config),
    )


def test_precision_bfloat16_trains_in_bf16_on_a_cpu_too_and_auto_not_a_small_model(base, tmp_path):
    cpu = torch.device("cpu")
    assert sft.training_args(SFTConfig(precision="bfloat16"), "completion", cpu, tmp_path, base).bf16
    assert not sft.training_args(SFTConfig(), "completion", cpu, tmp_path, base).bf16


@pytest.fixture
def tile_widths(monkeypatch) -> list[int]:
    """The width (vocabulary entries) of every chunk of logits TRL's fused LM head computes in the test, on
    the CPU; the chunk size set in the test is undone after it."""
    import trl.kernels.chunked_logprob as kernel
    import trl.trainer.utils as fused_head

    monkeypatch.setattr(fused_head, "_CHUNKED_LOGPROB_CHUNK_SIZE", fused_head._CHUNKED_LOGPROB_CHUNK_SIZE)
    widths: list[int] = []
    fold = kernel._forward_tile
    monkeypatch.setattr(
        kernel, "_forward_tile", lambda tile, *a, **k: widths.append(tile.shape[1]) or fold(tile, *a, **k)
    )
    return widths


def test_the_chunked_loss_equals_the_plain_loss_in_value_and_gradient(tile_widths):
    """TRL's fused LM head, with the vocabulary cut into chunks by `set_loss_chunk`, gives the model's own loss
    over the full logits and the same gradient for every weight (tied embeddings included), on a padded
    batch with ignored labels."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, tie_word_embeddings=True, **shape))
    input_ids = torch.randint(0, 300, (2, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :3] = -100  # a prompt

    def loss_and_gradients(**fused: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **fused).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    plain, plain_gradients = loss_and_gradients()
    assert set_loss_chunk(0, torch.device("cuda")) == 32768  # 0 picks by device; TRL's size on a GPU
    assert set_loss_chunk(0, torch.device("cpu")) == 4096
    assert set_loss_chunk(64, torch.device("cpu")) == 64
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does
    chunked, chunked_gradients = loss_and_gradients(fused_lm_head=True)

    assert tile_widths == [64, 64, 64, 64, 44]  # the logits were computed a chunk at a time
    torch.testing.assert_close(chunked, plain)
    assert chunked_gradients.keys() == plain_gradients.keys()
    for name, gradient in plain_gradients.items():
        torch.testing.assert_close(chunked_gradients[name], gradient, msg=name)


def test_memory_settings_train_to_the_same_losses(base, data, tmp_path, tile_widths):
    """Gradient checkpointing and a loss chunk smaller than the demo vocabulary change memory, not the
    training: the same steps end at the same train and eval losses."""
    vocabulary = len(AutoTokenizer.from_pretrained(base))
    runs = {
        "lean": ({"gradient_checkpointing": True, "loss_chunk_size": 64}, 64),
        "plain": ({"gradient_checkpointing": False, "loss_chunk_size": 32768}, vocabulary),
    }
    losses = []
    for name, (settings, widest) in runs.items():
        tile_widths.clear()
        metrics = sft.run(SFTConfig(**FAST, **settings), {"model": base, "data": data}, tmp_path / name)
        assert max(tile_widths) == widest  # the stage computes its loss in chunks of its loss_chunk_size
        losses.append((metrics["train_loss"], metrics["eval_loss"]))
    assert vocabulary > 64
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_reports_to_wandb_only_when_a_run_is_open(monkeypatch, tmp_path, base):
    class FakeWandb:
        run = None

    monkeypatch.setitem(sys.modules, "wandb", FakeWandb)
    args = sft.training_args(SFTConfig(), "completion", torch.device("cpu"), tmp_path, base)
    assert args.report_to in ([], ["none"], "none")
    assert not args.bf16 and not args.gradient_checkpointing and not args.disable_tqdm
    FakeWandb.run = object()
    args = sft.training_args(SFTConfig(), "completion", torch.device("cpu"), tmp_path, base)
    assert args.report_to == ["wandb"]


def test_without_data_it_trains_on_the_task_s_sft_examples_and_measures_its_pass_rate(base, tmp_path):
    config = SFTConfig(**{**FAST, "task_eval": None, "task_eval_samples": 1}, task={"name": "arithmetic"})
    metrics = sft.run(config, {"model": base}, tmp_path)
    assert metrics["train_examples"] + metrics["eval_examples"] == len(arithmetic.sft_examples())
    assert metrics["task_prompts"] == len(arithmetic.held_out_prompts())
    assert metrics["pass_rate_greedy"] == 0.0 and metrics["pass_rate_sampled"] == 0.0  # 4 steps teach nothing


def test_without_data_or_task_and_task_eval_without_task_are_input_errors(base, data, tmp_path):
    with pytest.raises(InputError, match="sft: no `data` input and no task"):
        sft.run(SFTConfig(**FAST), {"model": base}, tmp_path)
    with pytest.raises(InputError, match="sft: task_eval needs a task"):
        sft.run(SFTConfig(**{**FAST, "task_eval": True}), {"model": base, "data": data}, tmp_path)


# --- export ---


def greedy_answers(model, tokenizer, prompts: list[str]) -> list[list[int]]:
    tokenizer.padding_side = "left"
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(
            **encoded, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return output[:, encoded["input_ids"].shape[1] :].tolist()


def test_merged_export_loads_alone_and_answers_like_the_adapter(base, data, tmp_path):
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    config = SFTConfig(steps=20, batch_size=8, lr=1e-2, lora_r=4, task_eval=False, eval_examples=0)
    sft.run(config, {"model": base, "data": data}, adapter)

    export_merged(adapter, merged)
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in merged.iterdir()
    }
    assert not (merged / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert type(model).__name__ == "LlamaForCausalLM"

    prompts = [r["prompt"] for r in arithmetic.held_out_prompts()[:20]]
    with_adapter, adapter_tokenizer = load_causal_lm(adapter)
    before = greedy_answers(AutoModelForCausalLM.from_pretrained(base), tokenizer, prompts)
    expected = greedy_answers(with_adapter, adapter_tokenizer, prompts)
    assert expected != before, "the adapter must change the answers for this comparison to mean anything"
    assert greedy_answers(model, tokenizer, prompts) == expected


def test_export_of_a_full_model_resaves_it(base, tmp_path):
    export_merged(base, tmp_path / "out")
    original, copy = load_file(base / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert original.keys() == copy.keys() and all(torch.equal(original[k], copy[k]) for k in original)
    with pytest.raises(InputError, match="not empty"):
        export_merged(base, tmp_path / "out")


def test_prompt_tuning_adapters_cannot_be_merged(base, data, tmp_path):
    sft.run(
        SFTConfig(method="prompt_tuning", virtual_tokens=2, **FAST),
        {"model": base, "data": data},
        tmp_path / "a",
    )
    with pytest.raises(InputError, match="cannot be merged"):
        export_merged(tmp_path / "a", tmp_path / "merged")


# --- resume ---


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_checkpoint(workspace, base, data):
    steps, save_steps = 60, 10
    (workspace / "wf.yaml").write_text(
        "name: resume\nstages:\n  sft:\n"
        f"    inputs: {{model: {base}, data: {data}}}\n"
        f"    config: {{steps: {steps}, save_steps: {save_steps}, batch_size: 2, lora_r: 4, logging_steps: 5,"
        " eval_examples: 0, task_eval: false}\n"
    )
    command = [sys.executable, "-m", "pipeline.cli", "run", "wf.yaml"]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(
        command, cwd=workspace, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    staging = workspace / "artifacts" / ".staging"

    def checkpointed() -> list[Path]:
        assert first.poll() is None, "the run ended before its first checkpoint"
        return list(staging.glob("sft-*/scratch/checkpoint-*/trainer_state.json"))

    wait_until(checkpointed, 300, "no checkpoint within 5 minutes", interval=0.05)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert not (workspace / "artifacts" / "sft").exists(), (
        "killed after the last step: nothing left to resume"
    )

    second = subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    resumed = re.search(r"sft: resuming from step (\d+)", second.stdout + second.stderr)
    assert resumed, second.stdout + second.stderr
    step = int(resumed.group(1))
    assert step % save_steps == 0 and 0 < step < steps
    manifest = json.loads((workspace / "artifacts" / "sft" / "v1" / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == steps
    assert manifest["metrics"]["resumed_from_step"] == step
    assert not (workspace / "artifacts" / "sft" / "v1" / "scratch").exists()
    assert (workspace / "artifacts" / "sft" / "v1" / "adapter_model.safetensors").exists()


# --- the demo task, end to end ---
