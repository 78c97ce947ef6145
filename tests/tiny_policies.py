"""Tiny demo policies and reward models for the policy-optimization tests, built in seconds on the CPU.

Every model uses the demo tokenizer (with its chat template) and is written the way stages hand models
on: a complete model directory, or a LoRA adapter with `base.json`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForSequenceClassification

from common.models import load_causal_lm, save_model, tokenizer_fingerprint, write_base_reference
from policy.demo_model import build_model, train_tokenizer
from tasks import arithmetic

LAYERS, HIDDEN, INTERMEDIATE, HEADS = 2, 32, 64, 2


@functools.cache
def tokenizer() -> Any:
    return train_tokenizer(arithmetic.pretraining_corpus())


def random_model(out_dir: Path, seed: int = 0) -> Path:
    """A freshly initialised tiny demo model."""
    torch.manual_seed(seed)
    model = build_model(tokenizer(), LAYERS, HIDDEN, INTERMEDIATE, HEADS)
    save_model(model, tokenizer(), out_dir)
    return out_dir


def memorized_model(out_dir: Path, records: list[dict], steps: int = 150, seed: int = 0) -> Path:
    """A tiny model trained (every weight, teacher forcing on the chat-formatted conversation) to answer
    `records` right: after the default steps it answers most of them right greedily, and sampling at
    temperature 1 gets some wrong, so accuracies are neither 0 nor 1."""
    tok = tokenizer()
    torch.manual_seed(seed)
    model = build_model(tok, LAYERS, HIDDEN, INTERMEDIATE, HEADS)
    texts = [
        tok.apply_chat_template(
            [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": arithmetic.render_response(r["a"], r["b"])},
            ],
            tokenize=False,
        )
        for r in records
    ]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    save_model(model.eval(), tok, out_dir)
    return out_dir


def lora_adapter(base_dir: Path, out_dir: Path, seed: int = 1) -> Path:
    """A LoRA adapter on `base_dir` with random (not zero) B matrices, so it changes the base's outputs; laid
    out like the SFT stage's output (adapter files, tokenizer, `base.json`)."""
    model, tok = load_causal_lm(base_dir, device=torch.device("cpu"))
    torch.manual_seed(seed)
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    write_base_reference(out_dir, base_dir)
    return out_dir


def reward_model(out_dir: Path, seed: int = 0, chat_template: str | None = None) -> Path:
    """A tiny random reward model (sequence classifier with one output) laid out like the reward stage's
    output; `chat_template` replaces the tokenizer's template (to make a mismatched one)."""
    tok = tokenizer()
    if chat_template is not None:
        tok = train_tokenizer(arithmetic.pretraining_corpus())
        tok.chat_template = chat_template
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=tok.model_max_length,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # rewards that differ visibly between responses
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    info = {"format": "chat", "tokenizer_fingerprint": tokenizer_fingerprint(tok)}
    (out_dir / "reward.json").write_text(json.dumps(info) + "\n")
    return out_dir


def state(model_dir: Path) -> dict[str, torch.Tensor]:
    """The weights of a model directory (an adapter merged into its base), by name."""
    model, _ = load_causal_lm(model_dir, device=torch.device("cpu"))
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
