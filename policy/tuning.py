"""Where the policy optimization stages (DPO, RLOO, GRPO) start and what they publish.

They start from the SFT policy, which is also their reference: DPO's implicit KL anchor, the KL penalty
of RLOO and GRPO. So that the reference is exactly the SFT policy and the result stands on its own:

1. An SFT adapter is merged into its base weights, written to `scratch/start/` (a full model is used
   where it is). The model is loaded from there, so its `name_or_path` names the SFT policy.
2. `lora` trains a new LoRA adapter on those weights; TRL's trainers then take the same model with the
   adapter disabled as the reference: the SFT policy, with no second copy in memory. `full` trains every
   weight, and the trainers load their frozen reference from the model's `name_or_path`, the SFT weights
   again. (Training the SFT adapter itself would also work, since TRL then keeps a frozen copy of it as
   the reference, but its rank and target modules would be the SFT stage's, not this stage's.)
3. `publish: merged` (the default) publishes one complete model, the new adapter merged in: weights,
   tokenizer with chat template, generation config and `policy.json` (what it was trained from, and how).
   It loads with `load_causal_lm` (or plain transformers) without a chain of artifacts that must all
   still exist; the price is a full copy of the weights per policy. `publish: adapter` (`lora` only)
   publishes the new adapter alone, with `base.json` naming the input policy: a complete model, or the
   SFT adapter itself, which makes a stacked adapter. Loading a stacked adapter merges the SFT adapter
   into its base in memory (`common.models.merged_causal_lm`, the same merge as step 1), so the new
   adapter sits on exactly the weights it was trained on; each level's digest is checked.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from common import configs
from common.models import (
    compute_dtype,
    contiguous_head_input,
    is_adapter,
    load_tokenizer,
    merge_adapter,
    save_model,
    source_reference,
)
from common.outcomes import InputError
from common.sources import split_revision

START = "start"
"""Under the stage's scratch directory: the merged SFT weights the stage starts from."""
POLICY_FILE = "policy.json"
"""In a published policy: what it was trained from and how."""


def starting_point(source: Path | str, scratch: Path, stage: str) -> Path | str:
    """A complete model to start from: `source` itself, or its adapter merged into its base (as loading a
    stacked adapter on it merges it: `common.models.merged_causal_lm`)."""
    if not is_adapter(source):
        return source
    from policy.export import export_merged

    start = scratch / START
    shutil.rmtree(start, ignore_errors=True)  # a crashed run may have left half of it
    try:
        export_merged(Path(source), start)
    except InputError as err:
        raise InputError(f"{stage}: the policy cannot be merged to start from: {err}") from None
    return start


def load_start(
    source: Path | str, scratch: Path, stage: str, method: str, device: torch.device, precision: str
) -> tuple[Any, Any]:
    """(model, tokenizer) to train: the SFT policy's complete weights (see the module docstring).

    Under a LoRA adapter in the `precision`'s dtype; fp32 for `full` (mixed precision keeps fp32 master
    weights)."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(source)
    start = starting_point(source, scratch, stage)
    dtype = compute_dtype(precision, device, source) if method == "lora" else torch.float32
    name, revision = split_revision(start)
    model = AutoModelForCausalLM.from_pretrained(name, revision=revision, dtype=dtype)
    for config in (model.config, model.generation_config):
        config.pad_token_id = tokenizer.pad_token_id
        config.eos_token_id = tokenizer.eos_token_id
    return contiguous_head_input(model), tokenizer


def lora_config(config: Any) -> Any:
    """The new adapter's PEFT configuration (`method: lora`), or None (`full`)."""
    if config.method != "lora":
        return None
    return configs.lora_config(config)


def publish(
    model: Any, tokenizer: Any, out_dir: Path, config: Any, stage: str, inputs: dict[str, Any]
) -> Any:
    """Write the trained policy as `config.publish` asks (see the module docstring) and `policy.json`;
    returns the trained model with any adapter merged in, for measuring (the same numbers either way)."""
    if config.publish == "adapter":
        save_model(model, tokenizer, out_dir, base=inputs["policy"])
    model = merge_adapter(model).eval()
    if config.publish == "merged":
        save_model(model, tokenizer, out_dir)
    record = lineage(stage, config, inputs)
    (out_dir / POLICY_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return model


def lineage(stage: str, config: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """`policy.json`: the stage, its method, what was published and the inputs it read (artifact refs and
    digests)."""
    if config.publish == "merged":
        published = "complete model (a trained LoRA adapter is merged in)"
    elif is_adapter(inputs["policy"]):
        published = (
            "LoRA adapter stacked on the input policy's adapter (base.json), merged into its base on load"
        )
    else:
        published = "LoRA adapter on the input policy (base.json)"
    return {
        "stage": stage,
        "method": config.method,
        "publish": config.publish,
        "format": published,
        "reference": "the input policy (SFT), frozen",
        "inputs": {slot: source_reference(source) for slot, source in inputs.items()},
    }


def first_and_last(trainer: Any, names: dict[str, str]) -> dict[str, float]:
    """For each logged `key -> name`: `name_first` and `name_last`, the values of `key` at the first and the
    last logging step of the trainer's log history (each a mean over `logging_steps` steps)."""
    metrics: dict[str, float] = {}
    for key, name in names.items():
        values = [entry[key] for entry in trainer.state.log_history if key in entry]
        if values:
            metrics[f"{name}_first"], metrics[f"{name}_last"] = values[0], values[-1]
    return metrics
