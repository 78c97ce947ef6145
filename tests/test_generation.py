"""What `precision: auto` computes in, and how generating processes share a small machine's cores.

The bf16 decision depends on the CPU; the tests replace the CPU's capabilities so that they check the
rule the same way on any machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from common import models
from common.models import (
    AUTO_BF16_MIN_PARAMETERS,
    native_bf16,
    parameter_count,
    uses_bf16,
    write_base_reference,
)
from tests import tiny_policies
from tests.conftest import REPO

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> Path:
    """A model directory with a config only (no weights): a Llama of about 50M parameters."""
    out = tmp_path_factory.mktemp("large")
    LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8
    ).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return tiny_policies.random_model(tmp_path_factory.mktemp("small"))


@pytest.fixture
def native(monkeypatch):
    """Pretend the CPU has native bf16 (AMX-BF16)."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True, "avx512_bf16": True})


def test_a_cpu_has_native_bf16_with_amx_or_avx512_bf16_only(monkeypatch):
    for capabilities, expected in [
        ({"amx_bf16": True}, True),
        ({"avx512_bf16": True}, True),
        ({"avx512_f": True, "avx2": True}, False),
        ({}, False),
    ]:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda c=capabilities: c)
        assert native_bf16(CPU) is expected, capabilities


def test_parameters_are_counted_from_the_config_without_weights(large, small):
    assert 40e6 < parameter_count(large) < 60e6 and not list(large.glob("*.safetensors"))
    loaded, _ = models.load_causal_lm(small, device=CPU)
    assert parameter_count(small) <= sum(p.numel() for p in loaded.parameters()) < AUTO_BF16_MIN_PARAMETERS


def test_auto_is_bf16_on_a_native_bf16_cpu_for_large_models_only(native, large, small):
    assert uses_bf16("auto", CPU, large) and models.compute_dtype("auto", CPU, large) == torch.bfloat16
    assert not uses_bf16("auto", CPU, small)  # the demo's size: stays float32
    assert not uses_bf16("auto", CPU)  # no model to size: float32
    assert not uses_bf16("float32", CPU, large)
    assert uses_bf16("bfloat16", CPU, small)
    assert models.trainer_precision("auto", CPU, large)["bf16"]
    assert not models.trainer_precision("auto", CPU, small)["bf16"]


def test_auto_is_float32_on_a_cpu_without_native_bf16(monkeypatch, large):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_f": True})
    assert not uses_bf16("auto", CPU, large)
    assert uses_bf16("bfloat16", CPU, large)  # asked for: emulated, slow, but as asked


def test_explicit_bf16_on_a_cpu_without_it_says_so_once(monkeypatch, large, capsys):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_f": True})
    monkeypatch.setattr(models, "_NOTED", set())
    assert uses_bf16("bfloat16", CPU, large) and uses_bf16("bfloat16", CPU, large)
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 1 and "without native bf16" in notes[0] and "float32" in notes[0]
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    monkeypatch.setattr(models, "_NOTED", set())
    assert uses_bf16("bfloat16", CPU, large) and not capsys.readouterr().err


@pytest.mark.parametrize(
    ("bf16", "device", "longest", "inside"),
    [
        (True, "cpu", 64, "eager"),
        (True, "cpu", models.EAGER_ATTENTION_MAX_LENGTH, "eager"),
        (True, "cpu", models.EAGER_ATTENTION_MAX_LENGTH + 1, "sdpa"),  # long: sdpa is faster
        (False, "cpu", 64, "sdpa"),  # float32: left alone
        (True, "cuda", 64, "sdpa"),  # a GPU's flash attention is the fast one
    ],
)
def test_training_attention_is_eager_only_where_it_is_faster_and_is_restored(
    small, bf16, device, longest, inside
):
    model, _ = models.load_causal_lm(small, device=CPU)
    model.set_attn_implementation("sdpa")
    with models.training_attention(model, bf16, torch.device(device), longest):
        assert model.config._attn_implementation == inside
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError), models.training_attention(model, bf16, torch.device(device), longest):
        raise RuntimeError("a failed step")
    assert model.config._attn_implementation == "sdpa"


def test_an_adapter_is_sized_by_the_weights_below_it(native, large, small, tmp_path):
    for base in (large, small):
        adapter = tmp_path / base.name
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text("{}")
        write_base_reference(adapter, base)
        assert uses_bf16("auto", CPU, adapter) is (base == large)


def test_quantized_weights_are_not_float_weights(native, large, tmp_path):
    config = json.loads((large / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert parameter_count(tmp_path) is None
    assert not uses_bf16("auto", CPU, tmp_path)


# --- threads ---


@pytest.mark.parametrize(("processes", "expected"), [(None, 2), ("1", 2), ("2", 1), ("3", 1)])
def test_threads_default_to_the_cores_shared_among_the_launched_processes(processes, expected):
    """`cpu_threads: 0` under `accelerate launch` on a 2-core machine: each process takes its share of the
    cores, never fewer than one (oversubscribed, spinning threads slow every process several times)."""
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_WORLD_SIZE"}
    if processes:
        env["LOCAL_WORLD_SIZE"] = processes
    probe = (
        "import os, torch; from common.models import set_threads; os.sched_setaffinity(0, {0, 1}); "
        "set_threads(0); print(torch.get_num_threads()); set_threads(3); print(torch.get_num_threads())"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(expected), "3"]


def test_the_output_head_gets_contiguous_input_on_the_first_generation_step(tmp_path):
    """The first step's logits come from a strided slice of the hidden states; torch multiplies such an
    input by a frozen weight through a per-row copy of the weight (20 s for SmolLM2's head at batch 128
    in bf16), so the loaded model's head makes its input contiguous (its hook is added once)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from common.models import contiguous_head_input, load_causal_lm
    from policy.generation import Sampling, generate

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(64)}, unk_token="t0")),
        pad_token="t0",
        eos_token="t1",
    )
    tokenizer.save_pretrained(tmp_path / "m")
    model, tokenizer = load_causal_lm(tmp_path / "m", device=CPU)
    contiguous_head_input(model)  # a second call adds nothing
    seen: list[bool] = []
    model.lm_head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    prompts = [[5, 6, 7, 8], [9, 10]]
    generate(model, tokenizer, prompts, Sampling(max_new_tokens=3), seeds=[0, 1], stop_token_ids=[])
    assert len(seen) == 3 and all(seen)  # every step, the first (a slice of the hidden states) included
    assert len(model.lm_head._forward_pre_hooks) == 2  # ours (once) and the probe
