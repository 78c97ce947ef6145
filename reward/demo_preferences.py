"""Synthetic demo preference pairs: what simulated annotators ranking K sampled answers would give.

For development, tests and benchmarks of the reward stage without a policy or an annotation server. Per
demo train prompt ("What is 7 + 12?") it makes K distinct candidates: usually the correct answer
("7 + 12 = 19"), plus wrong ones that are mostly near misses (off by 1 or 2, a wrong operand restated,
digits swapped, off by ten) and sometimes unparseable ("7 + 12 =", "7 + 12 = 19 19"). Each annotator ranks
them as the simulated annotators of `annotation/simulate.py` do (`tasks.simulated_ranks` on the
arithmetic task: correct first, then by distance to the answer, unparseable last; adjacent rank levels
swapped with probability `noise`), and the pairs a majority
agrees on become rows in TRL's prompt/chosen/rejected format, with `agreement` and `votes`.

Pure Python. `python -m reward.demo_preferences OUT_DIR [--prompts N] [--flip F]` writes a preferences
directory (`preferences.jsonl`, `summary.json`) that a workflow can give the reward stage as a path.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path
from typing import Any

import tasks
from common.data import PREFERENCES_FILE, write_jsonl
from tasks import arithmetic


def candidates(a: int, b: int, k: int, correct: bool, rng: random.Random) -> list[str]:
    """K distinct responses to "a + b": the correct one first when `correct`, then wrong ones in a random order."""
    s = a + b
    near = [s - 1, s + 1, s - 2, s + 2]
    pool: list[tuple[float, str]] = [(3.0, f"{a} + {b} = {n}") for n in near if n >= 0]
    pool += [(1.0, f"{a} + {b + 1} = {s + 1}"), (1.0, f"{a + 1} + {b} = {s + 1}")]
    if s >= 10 and str(s)[::-1] != str(s):
        pool.append((1.0, f"{a} + {b} = {int(str(s)[::-1])}"))
    pool += [(1.0, f"{a} + {b} = {s + 10}"), (1.0, f"{a} + {b} =")]
    pool += [(0.5, f"{a} + {b} = {s} {s}"), (0.5, f"{a} + {b} = {s}{s % 10}")]
    chosen = [arithmetic.render_response(a, b)] if correct else []
    while len(chosen) < k and pool:
        weights = [w for w, _ in pool]
        index = rng.choices(range(len(pool)), weights)[0]
        chosen.append(pool.pop(index)[1])
    return chosen


def demo_pairs(
    prompts: int = 500,
    k: int = 4,
    annotators: int = 3,
    noise: float = 0.1,
    correct_rate: float = 0.8,
    flip: float = 0.0,
    chat: bool = True,
    seed: int = 0,
    max_operand: int = arithmetic.MAX_OPERAND,
) -> list[dict[str, Any]]:
    """Preference rows for the first `prompts` demo train prompts; `flip` is the probability that a row's
    chosen and rejected are swapped (1/2 makes the labels random)."""
    rng = random.Random(seed)
    rows = []
    task = arithmetic.ArithmeticTask(max_operand=max_operand)
    for record in arithmetic.train_prompts(max_operand)[:prompts]:
        a, b, answer = record["a"], record["b"], record["answer"]
        responses = candidates(a, b, k, rng.random() < correct_rate, rng)
        rankings = [tasks.simulated_ranks(task, record, responses, noise, rng) for _ in range(annotators)]
        for i, j in itertools.combinations(range(len(responses)), 2):
            i_votes = sum(r[i] < r[j] for r in rankings)
            j_votes = sum(r[j] < r[i] for r in rankings)
            if max(i_votes, j_votes) * 2 <= annotators:
                continue  # no majority (ties count against)
            better, worse, votes = (i, j, i_votes) if i_votes > j_votes else (j, i, j_votes)
            if rng.random() < flip:
                better, worse = worse, better
            prompt: Any = record["prompt"]
            chosen: Any = responses[better]
            rejected: Any = responses[worse]
            if chat:
                prompt = [{"role": "user", "content": prompt}]
                chosen = [{"role": "assistant", "content": chosen}]
                rejected = [{"role": "assistant", "content": rejected}]
            else:
                prompt = arithmetic.plain_prompt(prompt)
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "prompt_id": record["id"],
                    "agreement": votes / annotators,
                    "votes": {"chosen": votes, "rejected": annotators - votes, "tie": 0},
                    "answer": answer,
                }
            )
    return rows


def write_preferences(rows: list[dict[str, Any]], out_dir: Path, **settings: Any) -> Path:
    """A preferences directory: `preferences.jsonl` and `summary.json` (counts and the settings)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / PREFERENCES_FILE, rows)
    summary = {
        "pairs": len(rows),
        "prompts": len({row["prompt_id"] for row in rows}),
        "synthetic": True,
        **settings,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--annotators", type=int, default=3)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--flip", type=float, default=0.0)
    parser.add_argument("--plain", action="store_true", help="plain strings instead of chat messages")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    settings = {
        "num_prompts": args.prompts,
        "k": args.k,
        "annotators": args.annotators,
        "noise": args.noise,
        "flip": args.flip,
        "chat": not args.plain,
        "seed": args.seed,
    }
    rows = demo_pairs(
        prompts=args.prompts,
        k=args.k,
        annotators=args.annotators,
        noise=args.noise,
        flip=args.flip,
        chat=not args.plain,
        seed=args.seed,
    )
    write_preferences(rows, args.out_dir, **settings)
    print(f"{len(rows)} pairs from {settings['num_prompts']} prompts -> {args.out_dir}")


if __name__ == "__main__":
    main()
