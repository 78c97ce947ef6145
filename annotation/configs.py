"""Typed configs of the annotation stages. Each field's docstring is its only description."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class SimulatedAnnotators(StageConfig):
    """Bot accounts that rank through the same HTTP API as a person's browser (labelled as simulation)."""

    annotators: int = Field(3, ge=1)
    """How many bot annotators rank."""
    noise: float = Field(0.1, ge=0, le=1)
    """Probability that a bot swaps two adjacent candidates of its ground-truth ranking."""
    seed: int = 0
    """Seed of the bots' noise."""


class AnnotateConfig(StageConfig):
    """Push candidates to Argilla for ranking (draft: the annotation implementer refines the fields)."""

    annotators_per_record: int = Field(1, ge=1)
    """How many annotators must submit a ranking for a record to count as done."""
    simulate: SimulatedAnnotators | None = None
    """Let bot annotators rank the batch right after the push (demo and tests); omit for humans."""


class CollectConfig(StageConfig):
    """Read submitted rankings and turn them into preference pairs (draft)."""

    min_records: int = Field(1, ge=1)
    """Ranked records needed before the batch is used; below it the stage reports progress and waits."""
    policy: Literal["majority", "unanimous", "all"] = "majority"
    """With several annotators per record: keep a pair when most agree, when all agree, or every vote."""
