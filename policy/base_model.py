"""The `model` stage: a pretrained model enters the store as a `base-model` artifact.

Its `source` input, as the runner hands it on:
- `org/name@<commit>`: a hub id, pinned by the runner to the commit its revision named (part of the
  cache key). Its config, tokenizer and safetensors weights are fetched into the local Hugging Face
  cache, or read from it when offline;
- a directory: a local model directory (its content digest is the cache key's) or a model artifact;
- a `.gguf` file (also `package:<python package>/<file>`): loaded and dequantized by transformers, its
  sha256 in the cache key, its quantization type in the metrics.

Weights are only ever read from safetensors (or GGUF), and code shipped with a model only runs with
`trust_remote_code: true`. The artifact holds the weights as safetensors in the configured dtype, the
config, the generation config and the tokenizer exactly as published (its pad token too: choosing one
is up to the stages that train) with its chat template. The metrics say what came in: parameter count,
architecture, dtype, vocabulary size, the tokenizer's special tokens and template, and the source.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import torch

from common.digests import sha256_file
from common.models import is_adapter, tokenizer_summary
from common.outcomes import InputError
from common.sources import split_revision
from common.training import count_parameters
from policy.configs import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
"""What is fetched of a hub repository: config, tokenizer and safetensors weights (no pickles)."""


def run(config: ModelConfig, inputs: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    source = inputs["source"]

    # Load
    if isinstance(source, str):
        folder, origin = fetch(source, config.trust_remote_code)
        model, tokenizer = load_directory(folder, config)
    elif source.is_file() and source.suffix == ".gguf":
        model, tokenizer = load_gguf(source, config)
        origin = gguf_info(source)
    elif source.is_dir():
        model, tokenizer = load_directory(source, config)
        origin = {"format": "safetensors", "path": str(source)}
    else:
        raise InputError(f"model: {source} is neither a model directory nor a .gguf file")

    # Save
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    # Measure
    return {
        "parameters": count_parameters(model)[1],
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "dtype": config.dtype,
        "vocab_size": model.config.get_text_config().vocab_size,
        "tokenizer": tokenizer_summary(tokenizer),
        "source": origin,
    }


def fetch(hub_id: str, trust_remote_code: bool) -> tuple[Path, dict[str, Any]]:
    """The local snapshot of a pinned hub id: downloaded (weights, config, tokenizer only) or, offline,
    found in the local cache."""
    from huggingface_hub import snapshot_download

    repo, commit = split_revision(hub_id)
    patterns = HUB_FILES + (["*.py"] if trust_remote_code else [])
    try:
        folder = snapshot_download(repo, revision=commit, allow_patterns=patterns)
    except Exception as err:
        raise InputError(f"model: {hub_id} cannot be fetched: {_first_line(err)}") from None
    return Path(folder), {"format": "hub", "hub_id": repo, "commit": commit}


def load_directory(folder: Path, config: ModelConfig) -> tuple[Any, Any]:
    """(model, tokenizer) from a model directory: safetensors weights only, remote code only if asked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_adapter(folder):
        raise InputError(
            f"model: {folder} is a PEFT adapter; give the model it sits on, or merge it first (rlhf export --merged)"
        )
    if not (folder / "config.json").is_file():
        raise InputError(f"model: {folder} has no config.json, so it is not a model directory")
    if not any(folder.glob("*.safetensors")):
        found = ", ".join(sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth")))
        raise InputError(
            f"model: {folder} has no safetensors weights{f' ({found} are not loaded: pickles can run code)' if found else ''}"
        )
    options = {"trust_remote_code": config.trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **options)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=DTYPES[config.dtype], use_safetensors=True, **options
        )
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise InputError(
                f"model: {folder} needs the code it ships with to load; set trust_remote_code: true in the "
                "stage's config if you trust it"
            ) from None
        raise InputError(f"model: {folder} cannot be loaded as a causal LM: {_first_line(err)}") from None
    return model, tokenizer


def load_gguf(file: Path, config: ModelConfig) -> tuple[Any, Any]:
    """(model, tokenizer) from a GGUF file: dequantized to float32 by transformers, then cast to the
    configured dtype, and no longer marked quantized (so that it saves as plain safetensors)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError) as err:
        raise InputError(f"model: {file} cannot be loaded by transformers: {_first_line(err)}") from None
    if (quantizer := getattr(model, "hf_quantizer", None)) is not None:
        quantizer.remove_quantization_config(model)
    # transformers wraps `to` in functools.wraps, which mypy reads as an unbound function
    return model.to(DTYPES[config.dtype]), tokenizer  # type: ignore[arg-type]


def gguf_info(file: Path) -> dict[str, Any]:
    """What the manifest records about a GGUF file: its sha256 and quantization (the file type it declares,
    e.g. `MOSTLY_Q4_1` -> `Q4_1`, and how many tensors have each type)."""
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(str(file))
    tensor_types = collections.Counter(tensor.tensor_type.name for tensor in reader.tensors)
    field = reader.fields.get("general.file_type")
    file_type = None
    if field is not None:
        value = int(field.parts[field.data[0]][0])
        try:
            file_type = LlamaFileType(value).name
        except ValueError:
            file_type = str(value)
    quantized = [name for name, _ in tensor_types.most_common() if name not in ("F32", "F16", "BF16")]
    return {
        "format": "gguf",
        "file": file.name,
        "sha256": sha256_file(file),
        "file_type": file_type,
        "quantization": file_type.removeprefix("MOSTLY_")
        if file_type
        else (quantized[0] if quantized else None),
        "tensor_types": dict(tensor_types.most_common()),
    }


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
