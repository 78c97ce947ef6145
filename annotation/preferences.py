"""Rankings -> pairwise preferences, and agreement between annotators. Pure Python: no server, no I/O.

A ranking gives each of a record's K candidates a rank (1 = best; equal ranks are ties), so it implies
up to K(K-1)/2 ordered pairs (better, worse); a tied pair implies none. With several annotators per
record each candidate pair (i, j) collects votes: how many annotators put i above j, j above i, or tie
them. A pair's `agreement` is the fraction of the record's annotators whose ranking agrees with its
direction. The policy decides which pairs become training rows:

- `majority`:  (i over j) when more than half of the annotators put i above j (ties count against);
- `unanimous`: (i over j) when every annotator puts i above j;
- `all`:       every annotator's every pair, one row per annotator (contradicting rows included).

Only submitted rankings count. Discarded responses give nothing; a record is ranked once it has
`min_rankings` submitted rankings, and only ranked records give pairs.

Rankings saved in display order: an Argilla UI bug (argilla#5712) saved rankings as 1, 2, 3 ... in the
order the responses were shown, whatever the annotator chose. `display_order_check` counts, per annotator,
the rankings of records with at least `DISPLAY_CHECK_MIN_CANDIDATES` candidates that equal the display
order (slot 1 ranked 1, slot 2 ranked 2, ...), against what chance gives (1/k! for a strict ranking of k:
the display order is shuffled per record); collect leaves out the rankings of annotators above its
`max_display_order_fraction`.

Inter-annotator agreement, over records with at least two rankings (averaged over those records):
- `agreement_pairwise_mean`: for every two annotators, the fraction of candidate pairs they order the same
  way (both i above j, both j above i, or both tied);
- `kendall_w_mean`: Kendall's coefficient of concordance W with the correction for ties (0 = no agreement
  beyond chance, 1 = identical rankings); a record where every annotator ties every candidate has none.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from statistics import mean
from typing import Any, Literal

from annotation import argilla_dataset as layout

Policy = Literal["majority", "unanimous", "all"]
POLICIES: tuple[Policy, ...] = ("majority", "unanimous", "all")
COUNTS = (
    "records_ranked",
    "records_incomplete",
    "records_discarded",
    "records_multi_annotated",
    "rankings",
    "rankings_unreadable",
    "discards",
    "pairs_implied",
    "ties",
    "pairs_contested",
    "rankings_left_out",
    *(f"pairs_{what}_{policy}" for policy in POLICIES for what in ("kept", "dropped")),
)
"""The counts `to_preferences` reports (see its docstring)."""


@dataclass(frozen=True)
class Votes:
    """How the annotators of a record order candidates i and j (i < j)."""

    i_better: int = 0
    j_better: int = 0
    tie: int = 0

    @property
    def annotators(self) -> int:
        return self.i_better + self.j_better + self.tie


def ordered_pairs(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """(better, worse) candidate indices for every untied pair of a ranking, in (i, j) order."""
    pairs = []
    for i, j in itertools.combinations(range(len(ranks)), 2):
        if ranks[i] < ranks[j]:
            pairs.append((i, j))
        elif ranks[j] < ranks[i]:
            pairs.append((j, i))
    return pairs


def tied_pairs(ranks: Sequence[int]) -> int:
    return sum(ranks[i] == ranks[j] for i, j in itertools.combinations(range(len(ranks)), 2))


def pair_votes(rankings: Sequence[Sequence[int]]) -> dict[tuple[int, int], Votes]:
    """Votes per candidate pair (i, j), i < j, over the rankings of one record."""
    k = len(rankings[0])
    votes = {}
    for i, j in itertools.combinations(range(k), 2):
        i_better = sum(r[i] < r[j] for r in rankings)
        j_better = sum(r[j] < r[i] for r in rankings)
        votes[(i, j)] = Votes(i_better, j_better, len(rankings) - i_better - j_better)
    return votes


def kept(votes: Votes, policy: Policy) -> tuple[int, int] | None:
    """Which way a pair goes under `majority`/`unanimous`: (0, 1) for i over j, (1, 0) for j over i, or None."""
    n = votes.annotators
    for better, direction in ((votes.i_better, (0, 1)), (votes.j_better, (1, 0))):
        if policy == "majority" and 2 * better > n:
            return direction
        if policy == "unanimous" and better == n > 0:
            return direction
    return None


def pairwise_agreement(rankings: Sequence[Sequence[int]]) -> float | None:
    """Mean over annotator pairs of the fraction of candidate pairs they order alike (None below 2 rankings)."""
    if len(rankings) < 2 or len(rankings[0]) < 2:
        return None
    scores = []
    for a, b in itertools.combinations(rankings, 2):
        pairs = list(itertools.combinations(range(len(a)), 2))
        same = sum(_sign(a[i] - a[j]) == _sign(b[i] - b[j]) for i, j in pairs)
        scores.append(same / len(pairs))
    return mean(scores)


def kendall_w(rankings: Sequence[Sequence[int]]) -> float | None:
    """Kendall's W (tie-corrected) of m >= 2 rankings of the same n >= 2 items; None when undefined."""
    m, n = len(rankings), len(rankings[0]) if rankings else 0
    if m < 2 or n < 2:
        return None
    fractional = [fractional_ranks(r) for r in rankings]
    totals = [sum(r[i] for r in fractional) for i in range(n)]
    average = sum(totals) / n
    s = sum((total - average) ** 2 for total in totals)
    ties = sum(t**3 - t for r in rankings for t in _group_sizes(r))
    denominator = m * m * (n**3 - n) - m * ties
    return 12 * s / denominator if denominator > 0 else None


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def _group_sizes(ranks: Sequence[int]) -> list[int]:
    counts: dict[int, int] = defaultdict(int)
    for rank in ranks:
        counts[rank] += 1
    return list(counts.values())


def fractional_ranks(ranks: Sequence[float]) -> list[float]:
    """Ranks 1..n of the values, ascending, with ties sharing the mean of the positions they span
    ([1, 2, 2] -> [1, 2.5, 2.5]): Kendall's W here, and Pearson on them is Spearman's rho."""
    order = sorted(range(len(ranks)), key=lambda i: ranks[i])
    result = [0.0] * len(ranks)
    position = 0
    while position < len(order):
        end = position
        while end + 1 < len(order) and ranks[order[end + 1]] == ranks[order[position]]:
            end += 1
        for index in order[position : end + 1]:
            result[index] = (position + end) / 2 + 1
        position = end + 1
    return result


# --- the conversion ---


def training_example(prompt: Any, chosen: str, rejected: str, chat: bool) -> dict[str, Any]:
    """TRL's preference format: conversational (lists of messages) when `chat`, else plain strings."""
    if not chat:
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    return {
        "prompt": messages,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def group_by_record(rankings: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The rankings rows of each record id."""
    by_record: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rankings:
        by_record[row["record_id"]].append(row)
    return by_record


def is_ranking(row: dict[str, Any]) -> bool:
    """Whether a rankings row is a submitted, readable ranking (the only kind that counts)."""
    return row["status"] == "submitted" and row.get("ranks") is not None


def to_preferences(
    records: Iterable[dict[str, Any]],
    rankings: Iterable[dict[str, Any]],
    policy: Policy,
    *,
    chat: bool,
    min_rankings: int = 1,
    left_out: frozenset[str] = frozenset(),
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Preference rows and counts from a batch's records and its annotators' rankings.

    `records`: `{"record_id", "prompt_id", "prompt", "candidates", ...the prompt's fields}` (the batch's
    records.jsonl; the prompt's fields, such as the task's `answer`, are carried into each pair).
    `rankings`: `{"record_id", "annotator", "status", "ranks", "simulated"?}` with `ranks` aligned with the
    record's candidates (the rows of rankings.jsonl); statuses other than submitted give no pairs.
    `left_out`: annotators whose rankings count towards a record's completeness but give no pairs and no
    agreement (`rankings_left_out` counts them).
    """
    by_record = group_by_record(rankings)

    rows: list[dict[str, Any]] = []
    counts: dict[str, int] = dict.fromkeys(COUNTS, 0)
    agreements: list[float] = []
    concordances: list[float] = []
    for record in records:
        responses = by_record.get(record["record_id"], [])
        submitted = [r for r in responses if is_ranking(r)]
        discarded = [r for r in responses if r["status"] == "discarded"]
        counts["discards"] += len(discarded)
        counts["rankings_unreadable"] += sum(
            r["status"] == "submitted" and r.get("ranks") is None for r in responses
        )
        if discarded and not submitted:
            counts["records_discarded"] += 1
        if not submitted:
            continue
        if len(submitted) < min_rankings:
            counts["records_incomplete"] += 1
            continue
        k = len(record["candidates"])
        if bad := [r["annotator"] for r in submitted if len(r["ranks"]) != k]:
            raise ValueError(
                f"record {record['record_id']}: rankings of {bad} do not rank its {k} candidates"
            )
        counts["records_ranked"] += 1
        counts["rankings"] += len(submitted)
        counts["rankings_left_out"] += sum(r["annotator"] in left_out for r in submitted)
        submitted = [r for r in submitted if r["annotator"] not in left_out]
        if not submitted:
            continue
        ranks = [r["ranks"] for r in submitted]
        for r in ranks:
            counts["pairs_implied"] += len(ordered_pairs(r))
            counts["ties"] += tied_pairs(r)
        if len(submitted) >= 2:
            counts["records_multi_annotated"] += 1
            if (a := pairwise_agreement(ranks)) is not None:  # None when the record has one candidate
                agreements.append(a)
            if (w := kendall_w(ranks)) is not None:
                concordances.append(w)

        votes = pair_votes(ranks)
        contested = [pair for pair, v in votes.items() if v.i_better or v.j_better]
        counts["pairs_contested"] += len(contested)
        for name in ("majority", "unanimous"):
            counts[f"pairs_kept_{name}"] += sum(kept(votes[pair], name) is not None for pair in contested)
        counts["pairs_kept_all"] += sum(len(ordered_pairs(r)) for r in ranks)

        simulated_all = all(r.get("simulated", False) for r in submitted)
        if policy == "all":
            for ranking in submitted:
                for better, worse in ordered_pairs(ranking["ranks"]):
                    row = _row(record, better, worse, votes, chat)
                    row.update(
                        annotator=ranking["annotator"], simulated=bool(ranking.get("simulated", False))
                    )
                    rows.append(row)
        else:
            for i, j in contested:
                direction = kept(votes[(i, j)], policy)
                if direction is not None:
                    better, worse = (i, j) if direction == (0, 1) else (j, i)
                    row = _row(record, better, worse, votes, chat)
                    row["simulated"] = simulated_all
                    rows.append(row)

    for name in ("majority", "unanimous"):
        counts[f"pairs_dropped_{name}"] = counts["pairs_contested"] - counts[f"pairs_kept_{name}"]
    counts["pairs_dropped_all"] = 0
    summary = {
        "policy": policy,
        "pairs": len(rows),
        **counts,
        "pairs_kept": counts[f"pairs_kept_{policy}"],
        "pairs_dropped": counts[f"pairs_dropped_{policy}"],
        "agreement_pairwise_mean": mean(agreements) if agreements else None,
        "kendall_w_mean": mean(concordances) if concordances else None,
    }
    return rows, summary


DISPLAY_CHECK_MIN_CANDIDATES = 3
"""Records with fewer candidates are left out of the display-order check (2 responses in display order is
a coin flip)."""


def display_order_check(rankings: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per annotator: `rankings` (submitted rankings of records with at least DISPLAY_CHECK_MIN_CANDIDATES
    candidates), `in_display_order` (how many of them rank slot s at s + 1 for every slot), `fraction`, and
    `chance` (the fraction a strict ranking at random would give: the mean of 1/k!). Rows as in
    `to_preferences`, with `display_order` (the candidate each slot showed)."""
    checked: dict[str, dict[str, Any]] = {}
    for row in rankings:
        order = row.get("display_order")
        if not is_ranking(row) or order is None or len(order) < DISPLAY_CHECK_MIN_CANDIDATES:
            continue
        entry = checked.setdefault(row["annotator"], {"rankings": 0, "in_display_order": 0, "chance": 0.0})
        entry["rankings"] += 1
        entry["in_display_order"] += all(row["ranks"][c] == s + 1 for s, c in enumerate(order))
        entry["chance"] += 1 / math.factorial(len(order))
    for entry in checked.values():
        entry["fraction"] = entry["in_display_order"] / entry["rankings"]
        entry["chance"] /= entry["rankings"]
    return dict(sorted(checked.items()))


def record_agreement(
    records: Iterable[dict[str, Any]], rankings: Iterable[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Per record with at least one submitted ranking: how its annotators ranked and how far they agreed.

    `{"record_id", "prompt", "rankings", "discards", "mean_ranks", "consensus_best", "agreement",
    "kendall_w"}`: `mean_ranks` is each candidate's mean rank, `consensus_best` the candidate with the
    lowest one (the first of equals; a candidate as in `records`), `agreement` and `kendall_w` None below
    two rankings.
    """
    by_record = group_by_record(rankings)
    summaries = []
    for record in records:
        responses = by_record.get(record["record_id"], [])
        ranks = [r["ranks"] for r in responses if is_ranking(r)]
        if not ranks:
            continue
        mean_ranks = [mean(r[i] for r in ranks) for i in range(len(ranks[0]))]
        best = mean_ranks.index(min(mean_ranks))
        summaries.append(
            {
                "record_id": record["record_id"],
                "prompt": record["prompt"],
                "rankings": len(ranks),
                "discards": sum(r["status"] == "discarded" for r in responses),
                "mean_ranks": mean_ranks,
                "consensus_best": record["candidates"][best],
                "agreement": pairwise_agreement(ranks),
                "kendall_w": kendall_w(ranks),
            }
        )
    return summaries


def _row(
    record: dict[str, Any], better: int, worse: int, votes: dict[tuple[int, int], Votes], chat: bool
) -> dict[str, Any]:
    v = votes[(min(better, worse), max(better, worse))]
    chosen_votes, rejected_votes = (v.i_better, v.j_better) if better < worse else (v.j_better, v.i_better)
    row = training_example(record["prompt"], record["candidates"][better], record["candidates"][worse], chat)
    row.update(
        prompt_id=record["prompt_id"],
        record_id=record["record_id"],
        chosen_index=better,
        rejected_index=worse,
        agreement=chosen_votes / v.annotators,
        votes={"chosen": chosen_votes, "rejected": rejected_votes, "tie": v.tie},
    )
    row.update({k: v for k, v in record.items() if k not in layout.RECORD_KEYS and k not in row})
    return row
