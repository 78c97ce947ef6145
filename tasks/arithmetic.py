"""The `arithmetic` task, the offline demo: add two small integers, asked as a chat question.

"What is 7 + 12?" is answered "7 + 12 = 19". The answer restates the sum before the result, so a tiny
model computes in one fixed format whatever the phrasing, and the result is written digit by digit.

The pretraining corpus plays the part of the web: it states every sum, but unreliably: a fixed share
of its answers are carry slips, off by ten ("7 + 15 = 12", a carry forgotten; "7 + 12 = 29", one
added), so the base model knows the arithmetic yet often samples a wrong answer. Alignment then has
something real to fix: making the policy reliable, not teaching it facts.

Operand pairs are split once into train and held-out pairs by a seeded hash of the pair. Everything
the pipeline trains on after pretraining (SFT data, prompts sampled for annotation, preference pairs,
RL prompts) uses train pairs only; evaluations use the held-out prompts.

`ArithmeticTask` is the task (`tasks.Task`): options `max_operand` (19) and `split_seed` (0); records
`{"id", "prompt", "answer", "a", "b"}`; the verdict is 1.0 when the response parses to the answer
(`is_correct`), else 0.0; simulated annotators grade failures by distance to the answer (`preference`).
A record without `answer` is judged by the sum its prompt asks ("What is 7 + 12?"), so prompt files
of sums need no answer column. The pretraining corpus and the plain-text format are for the `pretrain`
stage, which builds the demo model.

Pure Python (no torch).
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Any

from tasks import Split, Task

MAX_OPERAND = 19
"""Operands are drawn from 0..MAX_OPERAND unless a caller says otherwise."""
HELD_OUT_FRACTION = 0.2
"""About this fraction of the operand pairs is held out."""
SPLIT_SEED = 0
"""Default seed of the train / held-out split."""
CORPUS_NOISE = 0.5
"""Share of the pretraining corpus's answers that are wrong (carry slips)."""
CORPUS_COPIES = 5
"""Times each question appears in the pretraining corpus (each copy draws its own answer)."""
SLIPS = ((10, 1), (-10, 1))
"""(offset from the right answer, weight) of the corpus's wrong answers: a carry added or forgotten.
Slips, not off-by-one answers, because the demo's reward model must learn to tell them from right ones:
with layers added it ranks right-versus-slip pairs right 0.99 of the time, right-versus-off-by-one
pairs barely above chance (0.61)."""

PHRASINGS = (
    "What is {a} + {b}?",
    "What is {a} plus {b}?",
    "Compute {a} + {b}.",
)
"""The ways a question is asked; every pair is asked in every phrasing."""

_ANSWER = re.compile(r"^\s*(?:.*=\s*)?(-?\d+)\s*\.?\s*$", re.DOTALL)
_SUM = re.compile(r"(-?\d+)\s*(?:\+|plus)\s*(-?\d+)")


def operand_pairs(max_operand: int = MAX_OPERAND) -> list[tuple[int, int]]:
    """All ordered pairs `(a, b)` with `0 <= a, b <= max_operand`."""
    return [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]


def is_held_out(a: int, b: int, split_seed: int = SPLIT_SEED) -> bool:
    """Whether the pair `(a, b)` is held out. Depends on the pair and the seed only, not on `max_operand`."""
    digest = hashlib.sha256(f"{split_seed}:{a}+{b}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < HELD_OUT_FRACTION


def split_pairs(
    max_operand: int = MAX_OPERAND, split_seed: int = SPLIT_SEED
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The operand pairs as `(train, held_out)`, each in a fixed order."""
    pairs = operand_pairs(max_operand)
    held_out = [pair for pair in pairs if is_held_out(*pair, split_seed)]
    train = [pair for pair in pairs if not is_held_out(*pair, split_seed)]
    return train, held_out


def record_id(prompt: str) -> str:
    """A stable id derived from the prompt text."""
    return "add-" + hashlib.sha256(prompt.encode()).hexdigest()[:12]


def make_records(pairs: list[tuple[int, int]]) -> list[dict]:
    """One record `{"id", "prompt", "answer", "a", "b"}` per pair and phrasing, sorted by id.

    Sorting by the content-derived id gives a fixed order that mixes pairs and phrasings, so the first
    N records are a fair sample.
    """
    records = [
        {"id": record_id(p), "prompt": p, "answer": a + b, "a": a, "b": b}
        for a, b in pairs
        for p in (phrasing.format(a=a, b=b) for phrasing in PHRASINGS)
    ]
    return sorted(records, key=lambda record: record["id"])


def train_prompts(max_operand: int = MAX_OPERAND, split_seed: int = SPLIT_SEED) -> list[dict]:
    """Records of the train pairs (for SFT and for sampling candidates to annotate)."""
    return make_records(split_pairs(max_operand, split_seed)[0])


def held_out_prompts(max_operand: int = MAX_OPERAND, split_seed: int = SPLIT_SEED) -> list[dict]:
    """Records of the held-out pairs (for evaluation only)."""
    return make_records(split_pairs(max_operand, split_seed)[1])


def render_response(a: int, b: int) -> str:
    """The correct response to a question about `a` and `b`, e.g. "7 + 12 = 19"."""
    return f"{a} + {b} = {a + b}"


def parse_answer(response: str) -> int | None:
    """The number a response answers: the integer after the last "=", or the whole response when it is
    an integer ("19", "19."). None when the response has no such answer ("7 + 12 =", "nineteen")."""
    match = _ANSWER.match(response)
    return int(match.group(1)) if match else None


def is_correct(response: str, answer: int) -> bool:
    """Whether the response parses to `answer`."""
    return parse_answer(response) == answer


def plain_prompt(prompt: str) -> str:
    """A question in the plain-text pretraining format (no chat template); the model continues it."""
    return prompt + "\n"


def plain_text(prompt: str, response: str) -> str:
    """A question and its response in the plain-text pretraining format."""
    return plain_prompt(prompt) + response


def slip(answer: int, rng: random.Random) -> int:
    """`answer` after a slip drawn by `SLIPS`. A slip that would make it negative (forgetting a carry that
    a sum below ten does not have) cannot happen: the answer stays right."""
    offset = rng.choices([o for o, _ in SLIPS], [w for _, w in SLIPS])[0]
    return answer + offset if answer + offset >= 0 else answer


def pretraining_corpus(
    max_operand: int = MAX_OPERAND, noise: float = CORPUS_NOISE, copies: int = CORPUS_COPIES, seed: int = 0
) -> list[str]:
    """Plain-text documents such as "What is 7 + 12?\\n7 + 12 = 19": every operand pair (held-out pairs
    too, as a web would) in every phrasing, `copies` times, each answer slipping with probability `noise`
    (see `slip`: sums below ten slip half as often). Seeded, in a shuffled order."""
    rng = random.Random(seed)
    documents = []
    for a, b in operand_pairs(max_operand):
        for phrasing in PHRASINGS:
            for _ in range(copies):
                answer = slip(a + b, rng) if rng.random() < noise else a + b
                documents.append(plain_text(phrasing.format(a=a, b=b), f"{a} + {b} = {answer}"))
    rng.shuffle(documents)
    return documents


def sft_examples(max_operand: int = MAX_OPERAND, split_seed: int = SPLIT_SEED) -> list[dict]:
    """Train records in TRL's conversational prompt/completion format."""
    return [
        {
            "prompt": [{"role": "user", "content": record["prompt"]}],
            "completion": [{"role": "assistant", "content": render_response(record["a"], record["b"])}],
        }
        for record in train_prompts(max_operand, split_seed)
    ]


def prompt_answer(prompt: Any) -> int | None:
    """The answer to the sum a prompt asks ("What is 7 + 12?" -> 19; the last user turn of a chat), or
    None when it asks none."""
    if isinstance(prompt, list):
        prompt = next((m.get("content", "") for m in reversed(prompt) if m.get("role") == "user"), "")
    match = _SUM.search(prompt) if isinstance(prompt, str) else None
    return int(match.group(1)) + int(match.group(2)) if match else None


class ArithmeticTask(Task):
    """The demo task as a `tasks.Task` (see the module docstring)."""

    name = "arithmetic"
    fields = ("answer",)
    max_new_tokens = 16  # "19 + 19 = 38" and the stop token are 12 tokens of the demo tokenizer

    def __init__(self, max_operand: int = MAX_OPERAND, split_seed: int = SPLIT_SEED):
        if not isinstance(max_operand, int) or max_operand < 1:
            raise TypeError(f"max_operand must be a positive integer, got {max_operand!r}")
        self.max_operand, self.split_seed = max_operand, split_seed

    def prompts(self, split: Split) -> list[dict[str, Any]]:
        pick = train_prompts if split == "train" else held_out_prompts
        return pick(self.max_operand, self.split_seed)

    def answer(self, record: dict[str, Any]) -> int | None:
        answer = record.get("answer")
        return answer if isinstance(answer, int) else prompt_answer(record.get("prompt"))

    def missing(self, record: dict[str, Any]) -> list[str]:
        return [] if self.answer(record) is not None else ["answer (an integer, or a sum in the prompt)"]

    def verdict(self, record: dict[str, Any], response: str) -> float:
        return float(is_correct(response, self.answer(record)))  # type: ignore[arg-type]

    def preference(self, record: dict[str, Any], response: str) -> float:
        """1 for the right answer, 1 / (1 + distance) for a wrong number, 0 when no number is answered:
        equally distant answers tie."""
        parsed = parse_answer(response)
        return 0.0 if parsed is None else 1 / (1 + abs(parsed - self.answer(record)))  # type: ignore[operator]

    def sft_examples(self) -> list[dict[str, Any]]:
        return sft_examples(self.max_operand, self.split_seed)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "max_operand": self.max_operand, "split_seed": self.split_seed}
