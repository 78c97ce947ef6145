"""The demo tokenizer and tiny model, built locally so the whole loop runs offline.

The tokenizer is a byte-level BPE trained on the demo corpus: every byte has a token (any text can be
encoded), digits are always single tokens (numbers tokenise digit by digit), and a few merges cover
the words of the demo task. It has distinct pad, bos and eos tokens, role tokens, and a chat template
whose assistant turn ends exactly at the eos token, with `{% generation %}` markers so TRL's
`assistant_only_loss` trains the model to emit eos.

The model is a small Llama built from config with tied embeddings.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = tuple(f"<|{role}|>" for role in ROLES)

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>' -}}"
    "{%- generation -%}{{- message['content'] + eos_token -}}{%- endgeneration -%}"
    "{%- elif message['role'] in ['system', 'user'] -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] -}}"
    "{%- else -%}"
    "{{- raise_exception('unknown role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)
"""`<|bos|><|user|>What is 7 + 12?<|assistant|>7 + 12 = 19<|eos|>`: nothing follows the eos."""


def train_tokenizer(texts: list[str], vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE tokenizer on `texts` and wrap it for transformers."""
    specials = [PAD, BOS, EOS, *ROLE_TOKENS]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # Plain text starts with bos, like the chat template; offsets stay untrimmed for assistant masks.
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A",
                pair=f"{BOS} $A {BOS} $B",
                special_tokens=[(BOS, tokenizer.token_to_id(BOS))],
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        extra_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    layers: int = 4,
    hidden_size: int = 128,
    intermediate_size: int = 512,
    heads: int = 4,
) -> LlamaForCausalLM:
    """A freshly initialised small Llama for `tokenizer` (seed torch first for reproducible weights)."""
    special_ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        tie_word_embeddings=True,
        **special_ids,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(**special_ids)
    return model
