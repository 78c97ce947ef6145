"""Bootstrap intervals over prompts: the one definition behind every interval a report shows (`evaluate`,
`human_eval`). Pure numpy."""

from __future__ import annotations

import numpy as np


def resamples(count: int, samples: int, seed: int) -> np.ndarray:
    """(samples, count) indices drawn with replacement from `count` prompts: one seeded set, shared by every
    figure of a report, so differences between policies are paired."""
    return np.random.default_rng(seed).integers(0, count, size=(samples, count))


def estimate(values: np.ndarray, indices: np.ndarray, confidence: float) -> dict[str, float]:
    """The mean of per-prompt values and its percentile bootstrap interval."""
    means = values[indices].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return {"value": float(values.mean()), "ci_low": float(low), "ci_high": float(high)}
