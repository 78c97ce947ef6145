"""Reward models: training on human comparisons, held-out evaluation with an acceptance gate, scoring."""
