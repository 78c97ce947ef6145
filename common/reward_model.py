"""Reward models as stages hand them on: load one (checking its score head and tokenizer), check that a
policy tokenizes exactly like it, and score (prompt, response) pairs exactly as it was trained.

A reward-model directory holds one complete sequence-classification model with a single output
(`num_labels: 1`, the score head included in its weights), its tokenizer with chat template, and
`reward.json` (how it formats text, its tokenizer's fingerprint, what it was trained from). Or, published
with `publish: adapter`, a sequence-classification LoRA adapter whose weights carry the trained score
head, with `base.json` naming the model it was trained on (which may itself be an adapter: the SFT
policy), its tokenizer and `reward.json`: loading builds the classifier on that base (`sequence_classifier`,
as training did) and merges the adapter in, so scores are those of the merged publication. The reward
stage (`reward/`) writes it; the policy stages (PPO, RLOO/GRPO, evaluation), which may not import
`reward/`, load it with `load_reward_model` and score with `score_batch`.

Text is formatted one way for training and scoring: with the chat template when the tokenizer has one
(the prompt as the user turn, or the conversation so far; the response as the assistant turn), else as
the plain concatenation prompt + response + eos. The reward is the score head's output at the last
token, which the model finds as the last token that is not the pad token.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from common.models import (
    ADAPTER_CONFIG,
    base_of,
    check_mergeable,
    is_adapter,
    load_tokenizer,
    merge_adapter,
    merged_causal_lm,
    tokenizer_fingerprint,
)
from common.outcomes import InputError
from common.sources import split_revision

REWARD_FILE = "reward.json"
"""`{"format": "chat" | "plain", "tokenizer_fingerprint": ..., "trained_from": ...}` in a reward-model dir."""

Text = str | list[dict[str, Any]]
"""A prompt or response: plain text, or a list of `{"role", "content"}` messages."""


# --- loading ---


def load_reward_model(
    path: Path, device: torch.device | None = None, dtype: torch.dtype | str = "auto"
) -> tuple[Any, Any]:
    """(model, tokenizer) of a reward-model directory, in eval mode on `device` (default: the CPU); an
    adapter reward model comes merged into its base, as one plain sequence classifier.

    Raises `InputError` before loading any weights when the directory is not a reward model (no
    sequence-classification config with one label or adapter, no tokenizer), and after loading them when
    the score head is missing from the weights, the tokenizer is not the one it was trained with, or an
    adapter's base is not the one it was trained on."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = Path(path)
    what = f"reward model {path}"
    adapter = is_adapter(path)
    if adapter:
        task = json.loads((path / ADAPTER_CONFIG).read_text()).get("task_type")
        if task != "SEQ_CLS":
            raise InputError(
                f"{what} is a PEFT adapter for {task or 'no stated task'}, not for a sequence classifier (a "
                "reward model is trained by the reward stage)"
            )
    elif not (path / "config.json").is_file():
        raise InputError(f"{what}: no config.json, so it is not a model directory; wrong path?")
    else:
        config = AutoConfig.from_pretrained(str(path))
        architectures = config.architectures or []
        if not any(name.endswith("ForSequenceClassification") for name in architectures):
            raise InputError(
                f"{what} has no score head: its architecture is {', '.join(architectures) or 'unknown'}, not a "
                "sequence classifier (a reward model is trained by the reward stage from such a model)"
            )
        if config.num_labels != 1:
            raise InputError(
                f"{what} has {config.num_labels} outputs; a reward model has one (num_labels: 1)"
            )
    if not (path / "tokenizer_config.json").is_file():
        raise InputError(
            f"{what} has no tokenizer (tokenizer_config.json); it must carry the one it was trained with"
        )
    tokenizer = load_tokenizer(path)
    info = json.loads((path / REWARD_FILE).read_text()) if (path / REWARD_FILE).is_file() else {}
    if info.get("format") == "chat" and not tokenizer.chat_template:
        raise InputError(f"{what} was trained with a chat template, but its tokenizer has none")
    if info.get("tokenizer_fingerprint") not in (None, tokenizer_fingerprint(tokenizer)):
        raise InputError(f"{what}: its tokenizer is not the one it was trained with (fingerprint differs)")

    if adapter:
        model = adapter_reward_model(path, what, dtype)
    else:
        model, loading = AutoModelForSequenceClassification.from_pretrained(
            str(path), dtype=dtype, output_loading_info=True
        )
        if loading["missing_keys"]:
            raise InputError(
                f"{what} has no trained score head: {', '.join(sorted(loading['missing_keys']))} missing from "
                "its weights (they would be randomly initialised)"
            )
    set_pad_token(model, tokenizer)
    model.to(device or torch.device("cpu"))
    model.eval()
    return model, tokenizer


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def adapter_reward_model(path: Path, what: str, dtype: torch.dtype | str) -> Any:
    """The reward adapter at `path` merged into the classifier built on its base, in float32 (the dtype the
    reward stage trains in and saves a merged reward model in), then cast to `dtype` (`auto`: kept). Every
    weight the base lacks (the score head) must come from the adapter, trained."""
    from peft import PeftModel
    from safetensors import safe_open

    check_mergeable(path, "a reward adapter is a LoRA adapter")
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise InputError(
            f"{what} is an adapter without {ADAPTER_WEIGHTS} (weights load from safetensors only)"
        )
    model, head = sequence_classifier(base_of(path), torch.float32)
    with safe_open(str(path / ADAPTER_WEIGHTS), "pt") as weights:
        saved = set(weights.keys())
    missing = sorted(name for name in head if not any(key.endswith(f".{name}") for key in saved))
    if missing:
        raise InputError(
            f"{what} has no trained score head: {', '.join(missing)} missing from its adapter weights (they "
            "would be randomly initialised)"
        )
    model = merge_adapter(PeftModel.from_pretrained(model, str(path)))
    return model if dtype == "auto" else model.to(dtype)


def sequence_classifier(source: Path | str, dtype: torch.dtype | str = "auto") -> tuple[Any, set[str]]:
    """A sequence classifier with one output on the weights of `source`, and the names of the weights it
    has that `source` lacks: the score head, freshly initialised from torch's random state. `source` is a
    model directory or hub id (its backbone read as `AutoModelForSequenceClassification` reads it), or an
    adapter, merged into its base first (`common.models.merged_causal_lm`; the same weights and the same
    initialisation of the head as from a directory holding the merged model). The reward stage trains on
    this model; `load_reward_model` puts a reward adapter on it."""
    from transformers import AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the new score head and the unused LM head are expected
    try:
        if is_adapter(source):
            causal = merged_causal_lm(source, None if dtype == "auto" else dtype)  # type: ignore[arg-type]
            config = copy.deepcopy(causal.config)
            config.num_labels = 1
            if type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
                raise InputError(
                    f"{source}: transformers has no sequence classifier for {config.model_type} models, so no "
                    "reward model can be built on it"
                )
            # transformers types the mapping's values as tuples, and from_pretrained as returning the model
            # alone; each value is a model class, whose from_pretrained returns (model, loading info) here
            classifier: Any = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)]
            model, loading = classifier.from_pretrained(
                None,
                config=config,
                state_dict=causal.state_dict(),
                dtype=causal.dtype,
                output_loading_info=True,
            )
        else:
            name, revision = split_revision(source)
            model, loading = AutoModelForSequenceClassification.from_pretrained(
                name, revision=revision, num_labels=1, dtype=dtype, output_loading_info=True
            )
    finally:
        logging.set_verbosity(verbosity)
    return model, set(loading["missing_keys"])


def set_pad_token(model: Any, tokenizer: Any) -> None:
    """Make the model find the last real token: the tokenizer's pad token in its config. A sequence
    classifier reads the score at the last token that is not padding; `load_tokenizer` chose a pad token
    distinct from eos wherever the vocabulary has one, so that token is the eos ending the response."""
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id


# --- the hand-off checks ---


def check_reward_status(reward_dir: Path, allow_rejected: bool, stage: str) -> None:
    """Refuse a reward model whose manifest says its acceptance gate rejected it, unless allowed (the
    stage's `allow_rejected_reward`, which `rlhf run --allow-rejected` also sets)."""
    manifest = reward_dir / "manifest.json"
    if not manifest.is_file():
        return  # a local directory, not an artifact: nothing says it was gated
    record = json.loads(manifest.read_text())
    if record.get("status") == "rejected" and not allow_rejected:
        raise InputError(
            f"{stage}: the reward model {record.get('ref', reward_dir)} was rejected by its acceptance gate "
            f"({record.get('status_reason', 'no reason recorded')}); optimizing a policy against it would "
            "exploit its errors. Train a better one, or set allow_rejected_reward: true (or run with "
            "--allow-rejected) to use it anyway"
        )


def check_tokenizers_match(
    policy_tokenizer: Any, reward_tokenizer: Any, policy: str = "the policy", reward: str = "the reward model"
) -> None:
    """Raise `InputError` saying what differs (vocabulary, special tokens, chat template) unless both
    tokenizers have the same `tokenizer_fingerprint`. Policy stages call it before any training, so a
    reward model never scores text rendered by another tokenizer or template."""
    if tokenizer_fingerprint(policy_tokenizer) == tokenizer_fingerprint(reward_tokenizer):
        return
    differences = []
    a, b = policy_tokenizer.get_vocab(), reward_tokenizer.get_vocab()
    if a != b:
        changed = sum(a.get(token) != b.get(token) for token in a.keys() | b.keys())
        differences.append(f"vocabulary ({len(a)} vs {len(b)} tokens, {changed} differ)")
    sa, sb = policy_tokenizer.special_tokens_map, reward_tokenizer.special_tokens_map
    special = sorted(key for key in sa.keys() | sb.keys() if str(sa.get(key)) != str(sb.get(key)))
    if special:
        differences.append(
            "special tokens (" + ", ".join(f"{k}: {sa.get(k)!r} vs {sb.get(k)!r}" for k in special) + ")"
        )
    ta, tb = policy_tokenizer.chat_template or "", reward_tokenizer.chat_template or ""
    if ta != tb:
        detail = "one has none" if not (ta and tb) else "they differ"
        differences.append(f"chat template ({detail})")
    raise InputError(
        f"{policy} and {reward} do not tokenize alike: {'; '.join(differences) or 'fingerprints differ'}. "
        "Train the reward model from the policy's model (or its SFT model) so both share tokenizer and chat template."
    )


# --- formatting and scoring ---


def encode(tokenizer: Any, prompt: Text, response: Text) -> list[int]:
    """Token ids of a (prompt, response) pair, as the reward model is trained on and scores them."""
    if tokenizer.chat_template:
        messages = as_messages(prompt, "user") + as_messages(response, "assistant")
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    if not (isinstance(prompt, str) and isinstance(response, str)):
        raise InputError("conversational prompts and responses need a tokenizer with a chat template")
    text = prompt + response
    if tokenizer.eos_token and not text.endswith(tokenizer.eos_token):
        text += tokenizer.eos_token
    return list(tokenizer(text)["input_ids"])


def as_messages(text: Text, role: str) -> list[dict[str, Any]]:
    """A plain text as one message of `role`; a list of messages as it is."""
    if isinstance(text, str):
        return [{"role": role, "content": text}]
    if isinstance(text, list) and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in text):
        return text
    raise InputError(f"expected a string or a list of {{role, content}} messages, got {str(text)[:80]!r}")


def response_text(response: Text) -> str:
    """The text of a response: itself, or the content of its messages."""
    return response if isinstance(response, str) else "".join(str(m["content"]) for m in response)


@torch.no_grad()
def score_batch(
    model: Any, tokenizer: Any, prompts: Sequence[Text], responses: Sequence[Text], batch_size: int = 32
) -> list[float]:
    """The reward of each (prompt, response) pair, formatted as in training (see `encode`)."""
    sequences = [encode(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
    return score_ids(model, sequences, tokenizer.pad_token_id, batch_size)


@torch.no_grad()
def score_ids(
    model: Any, sequences: Sequence[Sequence[int]], pad_token_id: int, batch_size: int = 32
) -> list[float]:
    """The reward of each token sequence. Sequences are batched by length and padded on the right, as in
    training; a sequence's reward does not depend on the others in its batch (up to float rounding)."""
    return score_and_features(model, sequences, pad_token_id, batch_size, features=False)[0]


@torch.no_grad()
def score_and_features(
    model: Any,
    sequences: Sequence[Sequence[int]],
    pad_token_id: int,
    batch_size: int = 32,
    features: bool = True,
) -> tuple[list[float], torch.Tensor | None]:
    """The reward of each token sequence and, with `features`, what the score head read to give it: the
    hidden state at the sequence's last token ([len(sequences), hidden], float32), so that other heads can
    be fitted on the same representation (`annotation/selection.py`)."""
    training = model.training
    model.eval()
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []
    hook = (
        model.score.register_forward_hook(lambda _, args, __: captured.append(args[0])) if features else None
    )
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)
    rewards = [0.0] * len(sequences)
    pooled: torch.Tensor | None = None
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = len(sequences[chunk[0]])
            input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, index in enumerate(chunk):
                ids = sequences[index]
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, : len(ids)] = 1
            logits = model(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
            ).logits
            for index, value in zip(chunk, logits[:, 0].float().tolist(), strict=True):
                rewards[index] = value
            if features:
                hidden = captured.pop()
                if pooled is None:
                    pooled = torch.zeros(len(sequences), hidden.shape[-1])
                last = torch.tensor([len(sequences[i]) - 1 for i in chunk], device=hidden.device)
                pooled[chunk] = hidden[torch.arange(len(chunk), device=hidden.device), last].float().cpu()
    finally:
        if hook is not None:
            hook.remove()
        model.train(training)
    return rewards, pooled
