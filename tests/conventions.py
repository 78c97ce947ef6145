"""Tiny models whose tokenizers follow the conventions of published chat models, built offline.

Each convention reproduces what a real model ships with, not what would be convenient:
- `chatml`: SmolLM2-135M-Instruct: bos `<|im_start|>`, eos `<|im_end|>`, pad = eos, unk `<|endoftext|>`,
  a ChatML template that adds a default system prompt, no `{% generation %}` markers, and a tokenizer
  that adds no bos to plain text.
- `zephyr`: TinyLlama-1.1B-Chat (Llama 2 tokenizer): bos `<s>` added to every text by the tokenizer, eos
  `</s>`, pad = eos, unk `<unk>`, a Zephyr template that ends every turn with eos.
- `llama3`: Llama 3 Instruct: no pad token, no unk token, bos `<|begin_of_text|>` added both by the
  template and by the tokenizer (a naive `tokenizer(template_text)` doubles it), eos `<|eot_id|>`,
  reserved special tokens.
- `gpt2`: GPT-2: one token `<|endoftext|>` is bos, eos and unk; no pad, no chat template.

The model directories are written as published (`save_pretrained`, the model's config keeping the
published pad id), not through `common.models.save_model`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""SmolLM2-135M-Instruct's template, verbatim."""

ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
"""TinyLlama-1.1B-Chat-v1.0's template, verbatim."""

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
"""Meta-Llama-3-8B-Instruct's template, verbatim."""

CONVENTIONS: dict[str, dict[str, Any]] = {
    "chatml": {
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "tokens": {
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "pad_token": "<|im_end|>",
            "unk_token": "<|endoftext|>",
        },
        "template": CHATML_TEMPLATE,
        "add_bos": False,
        "pad": "<|endoftext|>",
    },
    "zephyr": {
        "specials": ["<unk>", "<s>", "</s>"],
        "tokens": {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"},
        "template": ZEPHYR_TEMPLATE,
        "add_bos": True,
        "pad": "<unk>",
    },
    "llama3": {
        "specials": [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|reserved_special_token_0|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ],
        "tokens": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        "template": LLAMA3_TEMPLATE,
        "add_bos": True,
        "pad": "<|reserved_special_token_0|>",
    },
    "gpt2": {
        "specials": ["<|endoftext|>"],
        "tokens": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
        "template": None,
        "add_bos": False,
        "pad": "<|endoftext|>",
    },
}
"""Per convention: its special tokens, which of them the tokenizer names bos/eos/pad/unk, its chat
template, whether the tokenizer adds bos to plain text, and the pad token `auto` should choose."""

CORPUS = [
    "The ocean covers most of the planet and holds most of its water.",
    "Coffee is brewed from roasted beans; many people drink it in the morning.",
    "A bicycle has two wheels, pedals and a chain that turns the back wheel.",
    "Write a short answer. Keep it brief, in lowercase, and end with a full stop.",
    "What is the capital of France? Paris is the capital of France.",
    "Answer in one sentence: why is the sky blue? Sunlight scatters in the air.",
] * 4


def build_tokenizer(convention: str) -> PreTrainedTokenizerFast:
    """A small byte-level BPE with the convention's special tokens, template and bos behaviour."""
    spec = CONVENTIONS[convention]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=spec["specials"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    bos = spec["tokens"]["bos_token"]
    if spec["add_bos"]:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        chat_template=spec["template"],
        model_max_length=512,
        extra_special_tokens=[t for t in spec["specials"] if t not in spec["tokens"].values()],
        **spec["tokens"],
    )


def published_model(convention: str, out_dir: Path, seed: int = 0) -> Path:
    """A freshly initialised 2-layer Llama with the convention's tokenizer, saved as a hub model would be:
    its config and generation config carry the published pad id (eos, or none)."""
    tokenizer = build_tokenizer(convention)
    special = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        **special,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(**special)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
