"""Typed configs of the annotation stages. Each field's docstring is its only description."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from common.configs import StageConfig
from tasks import UsesTask


class SimulatedAnnotators(StageConfig):
    """Bot annotators (accounts `bot-1`..`bot-N`, role annotator, labelled "simulated" in the UI and in the
    rankings) that rank through the same HTTP endpoints as a person's browser: they take records from their
    pending queue and submit a ranking by the task's verdict (`Task.preference`; on the arithmetic task right
    answers first, then wrong answers by their distance to the right one, unparseable answers last; equally
    good candidates tie), perturbed by noise. They need a task that can judge every record of the batch."""

    annotators: int = Field(3, ge=1)
    """How many bot annotators rank (bot-1..bot-N); a record gets rankings until `annotators_per_record`
    bots have submitted one, so more bots than that only spread the work."""
    noise: float = Field(0.1, ge=0, le=1)
    """Probability of each adjacent swap in a bot's task order (one pass from best to worst), so
    a bot sometimes prefers the worse of two neighbouring candidates."""
    discard: float = Field(0.0, ge=0, le=1)
    """Probability that a bot discards a record instead of ranking it (as a person does with an
    unreadable record)."""
    max_records: int | None = Field(None, ge=1)
    """Each bot answers at most this many records (null: its whole queue), e.g. to leave a batch partly
    ranked in a demo of the waiting state."""
    seed: int = 0
    """Seed of the bots' choices: the same seed gives each bot the same ranking of the same record."""


class DatasetSettings(StageConfig):
    """The Argilla dataset of a stage that asks people (`annotate`, `human_eval`). Connects to
    ARGILLA_API_URL with ARGILLA_API_KEY when both are set, else to the embedded local server
    ($RLHF_ARGILLA_HOME, started if it is not running)."""

    dataset: str | None = Field(None, min_length=1, max_length=200)
    """Name of the Argilla dataset; null derives it from the input artifact (`samples-1a2b3c4d`). A
    dataset of that name that already exists is reused (its records are updated, not duplicated)."""
    workspace: str = Field("rlhf", min_length=1)
    """Argilla workspace of the dataset; created when missing. The embedded server's accounts belong to
    `rlhf`."""
    annotators_per_record: int = Field(1, ge=1)
    """How many annotators must submit an answer (a ranking, a judgment) for a record to count as done
    (Argilla's task distribution `min_submitted`): a record leaves everyone's queue once it has this many."""
    annotators: list[str] | None = None
    """Usernames that must see the dataset: added to the workspace when they are not members. Null: every
    annotator account of the embedded server; on an external server, membership is left as it is."""
    comment: bool = True
    """Offer annotators an optional free-text comment next to their answer."""
    guidelines: str | None = Field(None, min_length=1, max_length=10_000)
    """Guidelines shown to annotators (markdown); null uses the built-in ones (what comes first, ties,
    when to discard)."""


class Selection(StageConfig):
    """Which records of the pool `annotate` pushes (`annotation/selection.py`)."""

    budget: int = Field(ge=1)
    """Records to push (all of the pool when it is smaller)."""
    by: Literal["disagreement", "spread", "random"] = "disagreement"
    """`disagreement`: where an ensemble of reward heads, fitted on bootstrap resamples of the `previous`
    pairs over the `reward` model's features, disagrees most; `spread`: where the `reward` model separates
    the candidates least; `random`: a seeded draw."""
    heads: int = Field(8, ge=2)
    """Size of the ensemble of reward heads (`disagreement`)."""
    seed: int = 0
    """Seed of the draw (`random`) and of the bootstrap resamples (`disagreement`)."""


class AnnotateConfig(DatasetSettings, UsesTask):
    """Push a `samples` artifact to Argilla as a ranking dataset, one record per prompt (`annotation/push.py`).
    Record ids derive from the content (samples digest, prompt, candidates), so pushing again, or retrying
    an interrupted push, adds no duplicate."""

    simulate: SimulatedAnnotators | None = None
    """Let bot annotators rank the batch right after the push (demo and tests); omit for humans."""
    select: Selection | None = None
    """Push only `budget` records of the pool, chosen where rankings teach the reward model most (inputs
    `reward` and `previous`) or at random; null pushes every record. Prompts with pairs in `previous`
    are left out of the pool."""


class CollectConfig(StageConfig, UsesTask):
    """Snapshot the rankings of an annotation batch and turn them into preference pairs (`annotation/collect.py`).

    A record counts as ranked once `annotators_per_record` annotators (set at push) have submitted a
    ranking; only ranked records give pairs. Discarded records and ties give none.
    """

    min_records: int = Field(1, ge=1)
    """Ranked records needed before the batch is used; below it the stage reports "n/N records ranked"
    and waits (nothing is published, later stages do not run). Capped at the batch's size."""
    min_fraction: float | None = Field(None, gt=0, le=1)
    """Also wait until this fraction of the batch's records is ranked (null: no such condition)."""
    max_display_order_fraction: float | None = Field(0.5, gt=0, le=1)
    """Leave out the rankings of an annotator when more than this fraction of their rankings (of records
    with 3 or more candidates, at least 10 of them) equals the order the responses were shown in: the
    signature of an Argilla UI bug that saved 1, 2, 3 ... whatever was chosen (argilla#5712), or of an
    annotator who does not read. The display order is shuffled per record, so chance is 1/6 or less. The
    figures are in the manifest either way (`display_order`); null turns the check off."""
    policy: Literal["majority", "unanimous", "all"] = "majority"
    """With several annotators per record: `majority` keeps a pair when more than half of the record's
    annotators rank its chosen response above the rejected one, `unanimous` when all do, `all` keeps
    every annotator's pairs as separate rows (disagreements included)."""


class HumanEvalConfig(DatasetSettings, UsesTask):
    """Blind pairwise human evaluation (`annotation/human_eval.py`): for each held-out prompt of an
    `evaluate` report, one response of a policy and one of the baseline, in a random order and without
    names, judged in Argilla (first better / second better / about the same); then un-blinded into each
    policy's human win rate against the baseline, with bootstrap intervals, agreement between annotators
    and between the annotators and the reward model. Waits (publishes nothing) until enough pairs are
    judged, like `collect`."""

    policies: list[str] | None = Field(None, min_length=1)
    """Labels of the report's policies to judge against the baseline; null: every policy but the baseline."""
    baseline: str | None = None
    """The label every policy is compared with; null: the report's baseline."""
    num_prompts: int | None = Field(100, ge=1)
    """Prompts to judge (the report's first N, in its order); null: all. Each policy adds one pair per prompt."""
    response: Literal["sampled", "greedy", "top_reward"] = "sampled"
    """Which response of each policy is shown: its first sampled response (what users get at temperature
    1), its greedy one, or its sample the reward model scored highest (`top_reward`: a spot check of the
    responses the reward model likes most, the reward-hacking audit's question put to people)."""
    seed: int = 0
    """Seed of the order in which each pair's two responses are shown."""
    min_fraction: float = Field(1.0, gt=0, le=1)
    """Wait until this fraction of the pairs is judged (by `annotators_per_record` annotators each)."""
    confidence: float = Field(0.95, gt=0, lt=1)
    """Coverage of the bootstrap intervals (over prompts)."""
    bootstrap_samples: int = Field(2000, ge=100)
    """Bootstrap resamples of the prompts."""
    simulate: SimulatedAnnotators | None = None
    """Let bot judges answer right after the push (demo and tests): the better response by the task's
    verdict (`Task.preference`), a tie when equal, another answer at random with probability `noise`."""


def judged_policies(
    config: HumanEvalConfig, labels: list[str], report_baseline: str
) -> tuple[str, list[str]]:
    """(baseline, policies) that `human_eval` judges among an evaluation's policy `labels`; `ValueError`
    saying what is wrong when they are not there or leave nothing to judge. One rule for the stage, which
    reads the report, and for the workflow check, which reads the evaluate stage before anything runs."""
    baseline = config.baseline or report_baseline
    policies = config.policies or [label for label in labels if label != baseline]
    if unknown := [label for label in [baseline, *policies] if label not in labels]:
        raise ValueError(
            f"{', '.join(map(repr, unknown))} not among the evaluated policies ({', '.join(labels)})"
        )
    if baseline in policies or not policies:
        raise ValueError(f"give policies other than the baseline {baseline!r} to judge")
    return baseline, policies


def check_evaluate_stage(config: HumanEvalConfig, upstream: dict[str, Any]) -> None:
    """The workflow check of a `human_eval` stage whose `evaluation` is an `evaluate` stage of the same
    workflow (`upstream`: slot -> that stage): what it judges must be among that stage's policies."""
    evaluate = upstream.get("evaluation")
    if evaluate is None:
        return
    labels = [key.split(".", 1)[1] for key in evaluate.inputs if key.startswith("policies.")]
    if labels:  # an evaluate stage (only it takes policies), so its config is an EvaluateConfig
        judged_policies(config, labels, evaluate.config.baseline_label(labels))
