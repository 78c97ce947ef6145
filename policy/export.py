"""Export a policy as one self-contained Hugging Face model directory.

`export_merged` folds an adapter into its base model's weights (LoRA, DoRA, QLoRA, IA3) and writes the
result with its tokenizer and chat template, so `AutoModelForCausalLM.from_pretrained(out_dir)` and
`AutoTokenizer.from_pretrained(out_dir)` load it with no PEFT and no base model around. A full-model
source is re-saved the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from common.models import ADAPTER_CONFIG, is_adapter, load_causal_lm, save_model
from common.outcomes import InputError

UNMERGEABLE = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING")
"""PEFT types that add virtual tokens at inference instead of changing weights: nothing to merge."""


def export_merged(source: Path, out_dir: Path) -> None:
    """Write the merged model of `source` (an adapter or a full model directory) into `out_dir`, which
    must not exist or be empty. Weights as safetensors, in the dtype of the base model."""
    if not source.is_dir():
        raise InputError(f"export: {source} is not a model or adapter directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"export: {out_dir} is not empty; choose a new directory")
    if is_adapter(source):
        peft_type = json.loads((source / ADAPTER_CONFIG).read_text()).get("peft_type", "")
        if peft_type in UNMERGEABLE:
            raise InputError(
                f"export: {source} is a {peft_type.lower()} adapter, which adds virtual tokens at inference "
                "rather than changing weights, so it cannot be merged; serve it as an adapter on its base"
            )
    model, tokenizer = load_causal_lm(source, device=torch.device("cpu"))
    if is_adapter(source):
        model = model.merge_and_unload()
    save_model(model, tokenizer, out_dir)
