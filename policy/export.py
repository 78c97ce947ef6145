"""Export a policy or reward model as one self-contained Hugging Face model directory.

`export_merged` folds an adapter into its base model's weights (LoRA, DoRA, QLoRA, IA3; a stacked adapter
into its base adapter merged into its own base) and writes the result with its tokenizer and chat
template, so `AutoModelForCausalLM.from_pretrained(out_dir)` and `AutoTokenizer.from_pretrained(out_dir)`
load it with no PEFT and no base model around. A reward model (a directory with `reward.json`, published
merged or as an adapter) becomes a complete sequence classifier with its `reward.json`, loadable by
`AutoModelForSequenceClassification` and `load_reward_model`. A full-model source is re-saved the same way.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from common.models import check_mergeable, is_adapter, load_tokenizer, merged_causal_lm, save_model
from common.outcomes import InputError
from common.reward_model import REWARD_FILE, load_reward_model


def export_merged(source: Path, out_dir: Path) -> None:
    """Write the merged model of `source` (an adapter or a full model directory) into `out_dir`, which
    must not exist or be empty. Weights as safetensors, in the dtype of the base model (a reward model:
    float32, as the reward stage saves it)."""
    if not source.is_dir():
        raise InputError(f"export: {source} is not a model or adapter directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"export: {out_dir} is not empty; choose a new directory")
    if is_adapter(source):
        try:
            check_mergeable(source, "serve it as an adapter on its base")
        except InputError as err:
            raise InputError(f"export: {err}") from None
    if (source / REWARD_FILE).is_file():
        reward_model, tokenizer = load_reward_model(source)
        reward_model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        shutil.copy(source / REWARD_FILE, out_dir / REWARD_FILE)
        return
    model = merged_causal_lm(source)
    save_model(model.eval(), load_tokenizer(source), out_dir)
