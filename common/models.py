"""Loading and saving models the way stages hand them to each other.

A model input is a directory (an artifact or a local path) or a hub id (`org/name@<commit>` as the
runner hands it on; see `common/sources.py`). A directory holds either complete weights (`config.json`
+ safetensors) or a PEFT adapter (`adapter_config.json`) plus a `base.json` that says which model the
adapter sits on, with that model's digest: an adapter is never loaded on a base that has changed since.
The base may itself be an adapter (a stacked adapter: DPO, RLOO or GRPO with `publish: adapter` on the
SFT stage's adapter): loading one merges each adapter below it into its own base, bottom up, so the top
adapter sits on exactly the weights it was trained on, and checks the digest of every level.
Every model directory carries its tokenizer and chat template, so whoever loads it gets exactly the
tokenizer it was trained with.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from common.digests import MANIFEST, ManifestError, content_digest, read_manifest
from common.outcomes import InputError
from common.sources import split_revision

if TYPE_CHECKING:
    from transformers import PreTrainedModel

BASE_FILE = "base.json"
ADAPTER_CONFIG = "adapter_config.json"


def pick_device(preference: str = "auto") -> torch.device:
    """`auto` is CUDA when available, else CPU; `cpu`/`cuda` are taken as asked."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise InputError("device: cuda was asked for, but no CUDA device is available")
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


AUTO_BF16_MIN_PARAMETERS = 20_000_000
"""`precision: auto` on a CPU with native bf16 computes in bf16 from this many parameters on: a decoding
step of such a model is bound by reading its weights from memory, which bf16 halves. Below it (the
demo's 1M-parameter model, the tests' tiny ones) the weights sit in the caches, a step is per-operation
overhead, and bf16 gains nothing (measured: `bench/generation_limit.py`) but would change the results."""


_NOTED: set[str] = set()


def note_once(text: str) -> None:
    """Print `note: text` to stderr, once per process."""
    if text not in _NOTED:
        _NOTED.add(text)
        print(f"note: {text}", file=sys.stderr, flush=True)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively: a CUDA GPU with bf16, or a CPU with AMX-BF16 or
    AVX512-BF16 (elsewhere torch emulates bf16 matrix products on the CPU, slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    capabilities = torch.cpu.get_capabilities()
    return device.type == "cpu" and bool(capabilities.get("amx_bf16") or capabilities.get("avx512_bf16"))


def uses_bf16(
    precision: str, device: torch.device, model: Path | str | torch.nn.Module | None = None
) -> bool:
    """Whether a stage with this `precision` setting (`common.configs.PrecisionSettings`) computes in bf16
    on `device` for `model` (a model directory, adapter directory or hub id: the weights it runs). `auto`:
    on a GPU with bf16; on a CPU with native bf16 when the model has float weights and at least
    `AUTO_BF16_MIN_PARAMETERS` parameters (never when `model` is not given); float32 otherwise."""
    if precision == "bfloat16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise InputError("precision: bfloat16 was asked for, but this GPU does not support bf16")
        if device.type == "cpu" and not native_bf16(device):
            note_once(
                "precision: bfloat16 on a CPU without native bf16 (AVX512-BF16 or AMX): torch emulates it, "
                "slower than float32; `precision: auto` or `float32` avoids that"
            )
        return True
    if precision != "auto" or not native_bf16(device):
        return False
    if device.type == "cuda":
        return True
    parameters = parameter_count(model) if model is not None else None
    return parameters is not None and parameters >= AUTO_BF16_MIN_PARAMETERS


EAGER_ATTENTION_MAX_LENGTH = 256
"""Training in bf16 on a CPU, sequences up to this many tokens run forward and backward faster with eager
attention than with torch's CPU flash attention (`sdpa`), whose bf16 backward is slow; longer ones are
faster with `sdpa`. Measured on 2 cores with AVX512-BF16, seconds a step in bf16 autocast, sdpa / eager:
SmolLM2-135M 16 x 64 1.63 / 1.42, 8 x 128 2.00 / 1.53, 4 x 256 1.89 / 1.70, 4 x 384 3.52 / 4.23; the
reward stage on SmolLM2 (360 arithmetic pairs, batches of 8) 75.9 s / 53.9 s of training, and on the demo's
model 150 s / 93 s. In float32 neither is clearly faster (the demo's pretraining step: 0.152 / 0.139 s), and
the pipeline leaves float32 training alone."""


@contextmanager
def training_attention(model: Any, bf16: bool, device: torch.device, longest: int) -> Iterator[None]:
    """Within the block, `model` (a transformers model, before any PEFT wrapping) trains with eager
    attention when that is faster: bf16 on a CPU, sequences of at most `EAGER_ATTENTION_MAX_LENGTH`
    tokens (`longest`). Its own implementation is back on exit, so what is saved and loaded later is
    unchanged; eager and sdpa compute the same attention (results differ in the last bits)."""
    own = model.config._attn_implementation
    switch = bf16 and device.type == "cpu" and longest <= EAGER_ATTENTION_MAX_LENGTH and own != "eager"
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(own)


def compute_dtype(
    precision: str, device: torch.device, model: Path | str | torch.nn.Module | None = None
) -> torch.dtype:
    """The dtype of weights that are not trained (or trained under an adapter): bf16 or float32."""
    return torch.bfloat16 if uses_bf16(precision, device, model) else torch.float32


def dtype_name(model: Any) -> str:
    """The dtype a model computes in (`bfloat16`, `float32`), as the stages that generate record it in
    their metrics (`dtype`): what `precision: auto` chose depends on the model and the machine."""
    return str(model.dtype).removeprefix("torch.")


def trainer_precision(
    precision: str, device: torch.device, model: Path | str | torch.nn.Module | None = None
) -> dict[str, Any]:
    """Hugging Face / TRL trainer arguments for the device and precision: bf16 mixed precision or none
    (TRL's configs default to bf16 everywhere, which a CPU without native bf16 runs slowly)."""
    return {
        "bf16": uses_bf16(precision, device, model),
        "fp16": False,
        "use_cpu": device.type == "cpu",
        "dataloader_pin_memory": device.type == "cuda",
    }


def parameter_count(source: Path | str | torch.nn.Module) -> int | None:
    """The parameters of a model: of a loaded one, or of a model directory, adapter directory (the complete
    weights below it, each base's digest checked) or hub id, counted from its config on the meta device
    without reading weights; None for quantized weights (they are not float) or a config transformers
    cannot build."""
    from transformers import AutoModel

    if isinstance(source, torch.nn.Module):
        return sum(p.numel() for p in source.parameters())
    config = model_config(source)
    if getattr(config, "quantization_config", None):
        return None
    try:
        with torch.device("meta"):
            model = AutoModel.from_config(config)
    except (ValueError, KeyError):
        return None
    return sum(p.numel() for p in model.parameters())


def is_adapter(source: Path | str) -> bool:
    return isinstance(source, Path) and (source / ADAPTER_CONFIG).exists()


def write_base_reference(out_dir: Path, base: Path | str) -> None:
    """Record in an adapter's directory the model it sits on: an artifact (its reference and digest), a
    local directory (its content digest) or a hub id (its commit). A base that is itself an adapter
    (mergeable: LoRA-like, not prompt learning) makes a stacked adapter."""
    if isinstance(base, Path):
        record: dict[str, Any] = {"path": str(base.resolve())}
        if (base / MANIFEST).exists():
            m = _manifest_of(base)
            record.update(ref=m.get("ref"), digest=m["digest"])
            if out_dir.resolve().is_relative_to(base.resolve().parent.parent):
                record["in_store"] = True  # base and adapter in one store: the base is read from there only
        else:
            record["digest"] = _content_digest(base)
        if is_adapter(base):
            check_mergeable(base, "nothing can be stacked on it")
            record["adapter"] = True  # a stacked adapter: its base is merged into its own base first
            _name_base_in_peft_config(out_dir, base)
    else:
        repo, revision = split_revision(base)
        record = {"hub_id": repo, **({"revision": revision} if revision else {})}
    (out_dir / BASE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _name_base_in_peft_config(out_dir: Path, base: Path) -> None:
    """PEFT's own record of the base (`base_model_name_or_path`) names the adapter below, not the merged
    copy training loaded (a scratch directory that is gone once the stage ends)."""
    config_file = out_dir / ADAPTER_CONFIG
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = str(base.resolve())
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def base_of(adapter_dir: Path) -> Path | str:
    """The base model of an adapter directory: a hub id (`org/name@<commit>`), or a directory whose
    content still has the digest recorded when the adapter was written (refused otherwise).

    An artifact base is looked for in the adapter's own store first (`<store>/<name>/<vN>`, beside the
    adapter), so a copied or moved store uses its own copy. A base that was in the adapter's store when the
    adapter was written (`in_store`) is read from there only, never from the path recorded then (a store
    never reads outside itself); any other base (a local directory, another store's artifact, or a record
    written before `in_store` existed) is then looked for at the recorded path."""
    file = adapter_dir / BASE_FILE
    if not file.exists():
        raise InputError(
            f"{adapter_dir} is an adapter without {BASE_FILE}: cannot tell which base model it needs"
        )
    try:
        record = json.loads(file.read_text())
    except ValueError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("path", record.get("hub_id")), str):
        raise InputError(f"{file} is not a base model record (expected JSON with a path or a hub_id)")
    if "hub_id" in record:
        revision = record.get("revision")
        return f"{record['hub_id']}@{revision}" if revision else str(record["hub_id"])
    ref, recorded = record.get("ref"), Path(record["path"])
    store = adapter_dir.resolve().parent.parent
    found = _artifact_beside(adapter_dir, ref)
    if found is None and ref and record.get("in_store"):
        raise InputError(
            f"{adapter_dir}: its base model {ref} is not in its store {store} (it was published there with "
            "the adapter, and is read from the adapter's own store only)"
        )
    if found is None:
        found = recorded if recorded.is_dir() else None
    if found is None:
        raise InputError(
            f"{adapter_dir}: its base model {ref or recorded} is not found (looked in "
            f"{', '.join(str(p) for p in ([store / ref.replace(':', '/')] if ref else []) + [recorded])})"
        )
    expected = record.get("digest")
    if expected is not None and (actual := _content_digest(found)) != expected:
        raise InputError(
            f"{adapter_dir}: its base model {found} is not the one it was trained on (digest {actual[:12]}… "
            f"!= recorded {expected[:12]}…: a file of the base changed); refusing to load it"
        )
    return found


def _artifact_beside(adapter_dir: Path, ref: str | None) -> Path | None:
    """The artifact `ref` (`name:vN`) in the store that holds `adapter_dir`, if it is there and readable."""
    if not ref or ref.count(":") != 1:
        return None
    name, version = ref.split(":")
    beside = adapter_dir.resolve().parent.parent / name / version
    try:
        return beside if read_manifest(beside).get("ref") == ref else None
    except ManifestError:
        return None


def _manifest_of(folder: Path) -> dict[str, Any]:
    """An artifact's manifest, read by a stage (an unreadable one is the stage's bad input)."""
    try:
        return read_manifest(folder)
    except ManifestError as err:
        raise InputError(f"{folder}: {err}") from None


_DIGESTS: dict[Path, tuple[Any, str]] = {}


def _content_digest(folder: Path) -> str:
    """`content_digest` of a model directory, computed again only when a file's size or mtime changed
    (a base is checked every time an adapter on it is loaded)."""
    folder = folder.resolve()
    stats = tuple(
        (str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()
    )
    known = _DIGESTS.get(folder)
    if known is None or known[0] != stats:
        known = _DIGESTS[folder] = (stats, content_digest(folder))
    return known[1]


PAD_CANDIDATES = (
    "<|finetune_right_pad_id|>",
    "<|pad|>",
    "<pad>",
    "[PAD]",
    "<|endoftext|>",
    "<|reserved_special_token_0|>",
)
"""Tokens a published vocabulary reserves for padding or never uses in chat text, tried in this order
(after the unk token) when the tokenizer's pad token is missing or is its eos token: Llama 3.1's
`<|finetune_right_pad_id|>`, the usual pad spellings, ChatML models' `<|endoftext|>` (SmolLM2, Qwen),
Llama 3.0's first reserved token."""


def choose_pad_token(tokenizer: Any, setting: str = "auto") -> str:
    """Give `tokenizer` the pad token its stages use, and return how it was chosen (for manifests).

    Models are published with pad = eos (SmolLM2, TinyLlama) or with no pad token at all (Llama 3,
    Mistral). Padding is always masked out, so any token would do for the model; but a pad token equal
    to eos lets code that looks for "the last token that is not padding" (a sequence classifier's
    score) skip the eos that ends a response. So, with `auto`: a published pad token distinct from eos
    is kept; otherwise the unk token or the first of `PAD_CANDIDATES` in the vocabulary (distinct from
    eos and bos) becomes the pad token, which adds no token and leaves the embeddings as they are; with
    none of them, eos pads and every stage relies on attention masks alone. `eos` asks for eos; any
    other value names a token that must already be in the vocabulary.
    """
    eos, bos, published = tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token
    if setting == "auto":
        if published is not None and published != eos:
            return f"{published} (as published)"
        vocab = tokenizer.get_vocab()
        for token in (tokenizer.unk_token, *PAD_CANDIDATES):
            if token is not None and token in vocab and token not in (eos, bos):
                tokenizer.pad_token = token
                was = "eos" if published == eos else "none"
                return f"{token} (auto; the published pad token was {was})"
        if eos is None:
            raise InputError(
                "the tokenizer has neither a pad nor an eos token; set pad_token to one of its tokens"
            )
        tokenizer.pad_token = eos
        return f"{eos} (auto: eos, no unused token found; padding is told apart by attention masks)"
    if setting == "eos":
        if eos is None:
            raise InputError("pad_token: eos was asked for, but the tokenizer has no eos token")
        tokenizer.pad_token = eos
        return f"{eos} (eos, as configured)"
    if setting not in tokenizer.get_vocab():
        raise InputError(
            f"pad_token: {setting!r} is not a token of this tokenizer's vocabulary; name an existing token "
            "(adding one would change the model's embeddings), or use auto or eos"
        )
    tokenizer.pad_token = setting
    return f"{setting} (as configured)"


def model_config(source: Path | str) -> Any:
    """The transformers config of a model directory, hub id or adapter directory (its base's, down to complete
    weights), without reading weights."""
    from transformers import AutoConfig

    while is_adapter(source):
        assert isinstance(source, Path)
        source = base_of(source)
    name, revision = split_revision(source)
    return AutoConfig.from_pretrained(name, revision=revision)


def load_tokenizer(source: Path | str, pad_token: str = "auto") -> Any:
    """The tokenizer of a model directory, adapter directory or hub id, with its pad token chosen by
    `choose_pad_token` (a tokenizer saved by a stage already has one, so `auto` keeps it)."""
    from transformers import AutoTokenizer

    name, revision = split_revision(source)
    tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
    tokenizer.rlhf_pad_choice = choose_pad_token(tokenizer, pad_token)
    return tokenizer


def has_generation_markers(tokenizer: Any) -> bool:
    """Whether the chat template marks the assistant's tokens with `{% generation %}` (which TRL's
    assistant-only loss needs to find them)."""
    return bool(re.search(r"{%-?\s*generation\s*-?%}", tokenizer.chat_template or ""))


def tokenizer_summary(tokenizer: Any) -> dict[str, Any]:
    """What a manifest records about the tokenizer a stage used: its special tokens, how the pad token
    was chosen, and what its chat template does (the conventions stages must handle)."""
    template = tokenizer.chat_template or ""
    summary: dict[str, Any] = {
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "unk_token": tokenizer.unk_token,
        "pad_choice": getattr(tokenizer, "rlhf_pad_choice", f"{tokenizer.pad_token} (as given)"),
        "chat_template": bool(template),
    }
    if template:
        probe = "PROBE-7f3a"
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": probe}], tokenize=False)
        before = rendered.split(probe)[0]
        summary["generation_markers"] = has_generation_markers(tokenizer)
        summary["template_adds_bos"] = bool(tokenizer.bos_token) and before.startswith(tokenizer.bos_token)
        summary["default_system_prompt"] = "system" in before
    return summary


def load_causal_lm(
    source: Path | str,
    *,
    trainable: bool = False,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) from a model directory, an adapter directory or a hub id.

    An adapter is loaded on top of its base as a `PeftModel`, frozen unless `trainable`; a stacked
    adapter on its base's merged weights (`merged_causal_lm`). `dtype` None loads weights as stored.
    """
    device = device or pick_device()
    tokenizer = load_tokenizer(source)
    if is_adapter(source):
        assert isinstance(source, Path)
        model = _adapter_on_its_base(source, dtype, trainable)
    else:
        model = merged_causal_lm(source, dtype)
    model.to(device)
    if not trainable:
        model.eval()
    _align_special_tokens(model, tokenizer)
    return model, tokenizer


def _contiguous_input(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0].contiguous(), *args[1:])


def contiguous_head_input(model: Any) -> Any:
    """`model` with its output head given contiguous input (a forward pre-hook; once per model).

    Generation's first step computes logits for the last position only, a strided slice of the hidden
    states, and torch multiplies a non-contiguous 3-D input by a weight that does not require grad by
    expanding the weight per row: SmolLM2's 49k x 576 head in bf16 took 20.9 s for a batch of 128 instead
    of 13 ms, once per `generate` call (every frozen model: sampling, evaluation, PPO rollouts, the task
    checks), which was most of the sample stage's time. Copying the slice costs one row per sequence.
    `policy.generation.generate` applies it to every model it is given; `policy.tuning.load_start` to the
    models TRL's trainers generate with."""
    head = model.get_output_embeddings()
    if head is not None and not getattr(head, "_contiguous_input", False):
        head.register_forward_pre_hook(_contiguous_input)
        head._contiguous_input = True
    return model


def merged_causal_lm(source: Path | str, dtype: torch.dtype | None = None) -> Any:
    """The complete weights of a model directory, hub id or adapter directory, as a plain causal LM on the
    CPU. An adapter is merged into its base; a base that is itself an adapter is merged into its own base
    first, and so on down to complete weights, every base's digest checked. Adapters are folded in at the
    precision the weights are stored in (as `rlhf export --merged` writes them), then the result is cast
    to `dtype` (None: kept as stored). The one way adapters are merged: `rlhf export --merged`, the start
    of DPO/RLOO/GRPO, the reward stage and the loading of stacked adapters all come here."""
    if not is_adapter(source):
        from transformers import AutoModelForCausalLM

        name, revision = split_revision(source)
        return AutoModelForCausalLM.from_pretrained(name, revision=revision, dtype=dtype or "auto")
    assert isinstance(source, Path)
    check_mergeable(source, "serve it as an adapter on its base")
    model = merge_adapter(_adapter_on_its_base(source, None, trainable=False))
    return model.to(dtype) if dtype is not None else model


def _adapter_on_its_base(adapter: Path, dtype: torch.dtype | None, trainable: bool) -> Any:
    from peft import PeftModel

    base = merged_causal_lm(base_of(adapter), dtype)
    return PeftModel.from_pretrained(base, str(adapter), is_trainable=trainable)


def check_mergeable(adapter: Path, hint: str) -> None:
    """Raise `InputError` (ending with `hint`) when the adapter cannot be merged into its base weights:
    prompt learning (prompt, prefix and p-tuning) adds virtual tokens at inference instead of changing
    weights. PEFT's own `is_prompt_learning` decides, here and in `merge_adapter`."""
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(adapter))
    if config.is_prompt_learning:
        raise InputError(
            f"{adapter} is a {str(config.peft_type).split('.')[-1].lower()} adapter, which adds virtual tokens "
            f"at inference rather than changing weights, so it cannot be merged; {hint}"
        )


def merge_adapter(model: Any) -> Any:
    """The one adapter merge: a `PeftModel` whose adapter can be folded into the base weights (LoRA, DoRA,
    IA3, ...; not prompt learning, not on a quantized base) merged and unwrapped; anything else returned
    as it is."""
    from peft import PeftModel

    if (
        isinstance(model, PeftModel)
        and not model.peft_config[model.active_adapter].is_prompt_learning
        and not getattr(model.get_base_model(), "is_quantized", False)
        and hasattr(model.base_model, "merge_and_unload")
    ):
        return model.merge_and_unload()
    return model


def _align_special_tokens(model: Any, tokenizer: Any) -> None:
    for config in (model.config, model.generation_config):
        if config is not None:
            config.pad_token_id = tokenizer.pad_token_id
            config.eos_token_id = tokenizer.eos_token_id


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of what must match between a policy, its reference and its reward model: the
    vocabulary, the special tokens and the chat template."""
    parts = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": tokenizer.chat_template or "",
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def set_threads(threads: int = 0) -> None:
    """On CPU, use `threads` torch threads, or (0) the cores this process may run on shared among the
    processes of this machine that `accelerate launch` (or torchrun) started (`LOCAL_WORLD_SIZE`): torch's
    default takes every core in every process, and processes that outnumber the cores slow each other down
    several times. See `common.configs.DeviceSettings.cpu_threads`."""
    if not torch.cuda.is_available():
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0)) // max(1, processes)))


def save_model(model: Any, tokenizer: Any, out_dir: Path, base: Path | str | None = None) -> None:
    """Write a model directory the way stages hand models on: the weights (a PEFT adapter, or the full
    model, as safetensors), the tokenizer with its chat template, a generation config whose pad and eos
    tokens are the tokenizer's and, for an adapter, `base.json` naming the model it sits on (`base`)."""
    from peft import PeftModel

    _align_special_tokens(model, tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if isinstance(model, PeftModel):
        if base is None:
            raise ValueError("saving an adapter needs its base model, for base.json")
        # peft types the base model as any torch Module; an adapter's base is a transformers model
        base_model = cast("PreTrainedModel", model.get_base_model())
        base_model.generation_config.save_pretrained(out_dir)
        write_base_reference(out_dir, base)


def source_reference(source: Path | str) -> dict[str, Any]:
    """What a stage records about an input it read (a model, an adapter, a data set): the artifact's
    `ref` and `digest` when the directory is an artifact (has a `manifest.json`), else its path, or a hub
    id and its revision (the commit the runner pinned); for an adapter also its base (the content of
    `base.json`)."""
    if not isinstance(source, Path):
        repo, revision = split_revision(source)
        return {"hub_id": repo, **({"revision": revision} if revision else {})}
    record: dict[str, Any] = {"path": str(source.resolve())}
    if (source / MANIFEST).is_file():
        m = _manifest_of(source)
        record.update(ref=m.get("ref"), digest=m.get("digest"), kind=m.get("kind"))
    if (source / BASE_FILE).is_file():
        record["base"] = json.loads((source / BASE_FILE).read_text())
    return record


def merged_for_inference(model: Any, dtype: torch.dtype | None = None) -> Any:
    """A `PeftModel` whose adapter can be folded into the base weights (LoRA, DoRA, IA3, ...) merged and
    unwrapped, for faster generation; anything else (prompt learning, a quantized base, a plain model)
    is returned unmerged. Then cast to `dtype` when given (after merging, so that the adapter is folded
    in at the loaded precision). Only for a frozen model that is not saved afterwards."""
    model = merge_adapter(model)
    if dtype is not None and not getattr(model, "is_quantized", False):
        model = model.to(dtype)
    return model
