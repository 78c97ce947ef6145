"""The `evaluate` stage: compare policies on held-out prompts.

Inputs: `policies` (label -> policy: adapter or complete model), and optionally `reward` (a reward model),
`reference` (the policy KL is measured against, usually the SFT policy) and `prompts` (JSONL/Parquet with
a `prompt` column and the fields the task's verdict needs; default: the task's held-out prompts).

Every policy answers every prompt greedily once and `samples_per_prompt` times by sampling. Sample j of a
prompt is drawn with the random stream seeded by (`seed`, the prompt's tokens, j) (`policy.generation`),
so policies that tokenize alike share their random numbers: a comparison between two policies is paired,
and a policy compared with itself gets identical samples. Measured per policy, first per prompt, then
averaged over prompts:

- `pass_rate_greedy`, `pass_rate_sampled` (with a task): the task's verdicts (`tasks.Task.judge`: 1 pass,
  0 fail, or a score in between; a response cut off before its stop token fails), the sampled ones
  averaged per prompt;
- `reward_mean` (with `reward`): the reward model's mean score of the samples;
- `win_rate` (with `reward`), against the baseline policy: per prompt, `prompt_mean` compares the mean
  reward of the policy's samples with the baseline's (1 win, 1/2 tie, 0 loss); `sample_pairs` compares
  every sample of the policy with every sample of the baseline and scores the fraction won, ties half.
  The baseline's own win rate is 1/2;
- `kl` (with `reference`): KL(policy || reference) estimated from the policy's samples: the mean over
  responses of the sum over response tokens (stop token included) of log p_policy - log p_reference,
  both at temperature 1 (the estimate is unbiased when sampling at temperature 1);
- `length_mean`: response length in tokens, the stop token excluded, mean over samples;
- `entropy` (with `reference`): the policy's entropy per token, estimated from its own samples: the mean
  over responses of -log p_policy(response) / its tokens (stop token included), at temperature 1.

Each policy with `reward` gets `reward_gain` (its mean reward minus the baseline's, paired), and a
reward-hacking audit (`policy/audit.py`): with a task, a policy whose reward rose over the baseline's while
its pass rate did not is flagged `gaming_suspected`, the share of its top-reward responses that the task
fails is set beside the baseline's, and its failing responses with the highest rewards are listed; the
report's summary says in a sentence which policies look like they game the reward model.

Each mean has a 95% (`confidence`) percentile bootstrap interval from resampling prompts (seeded; one set
of resamples shared by all policies). For each policy other than the baseline, `improvement_sampled` and
`improvement_greedy` are the differences in pass rate from the baseline, with paired bootstrap intervals
(the same resampled prompts for both). The manifest's metrics are named `<policy>.<metric>`
(`sft.pass_rate_sampled`, `dpo.improvement_sampled_ci_low`, ...).

Payload (`eval-report`): `report.json` (settings, prompts, every metric with its interval, per-prompt
values), `responses.jsonl` (per prompt: every policy's greedy and sampled responses, verdicts and
rewards), `report.md` (a table and the audit's sentences) and `chart.png` (pass rates with intervals and mean reward per policy).
With a W&B run: a table of greedy responses side by side and the chart.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import tasks
from common import stats
from common.data import load_prompts
from common.models import (
    compute_dtype,
    dtype_name,
    load_causal_lm,
    merged_for_inference,
    pick_device,
    set_threads,
    source_reference,
    tokenizer_fingerprint,
)
from common.outcomes import InputError
from common.training import Table, log_to_wandb, wandb_run
from policy import audit, engines
from policy.configs import EvaluateConfig
from policy.generation import Completion, HFEngine, Sampling, encode_prompts, left_pad, sample_candidates
from tasks import Task, pass_rate

REPORT_FILE = "report.json"
RESPONSES_FILE = "responses.jsonl"
MARKDOWN_FILE = "report.md"
CHART_FILE = "chart.png"
METRICS = (
    "pass_rate_sampled",
    "pass_rate_greedy",
    "reward_mean",
    "win_rate",
    "kl",
    "length_mean",
    "entropy",
)
"""Per-policy metrics, in the order reports show them."""
IMPROVEMENTS = ("improvement_sampled", "improvement_greedy", "reward_gain")
"""Per-policy differences from the baseline (paired)."""
AUDIT_METRICS = ("gaming_suspected", "top_reward_fail_rate", "reward_verdict_correlation")
"""Per-policy figures of the reward-hacking audit that go into the manifest."""


@dataclass
class PolicyResult:
    """One policy's responses and per-prompt values (one entry per prompt; None when not measured)."""

    label: str
    source: Path | str
    greedy: list[str]
    sampled: list[list[str]]
    per_prompt: dict[str, np.ndarray | None] = field(default_factory=dict)
    sample_rewards: np.ndarray | None = None
    """(prompts, samples) rewards, for pairwise win rates."""
    verdicts_greedy: list[float] | None = None
    verdicts_sampled: list[list[float]] | None = None
    dtype: str = "float32"
    """What it generated in (`precision: auto` depends on the model and the machine)."""


def run(config: EvaluateConfig, inputs: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    set_threads(config.cpu_threads)
    device = pick_device(config.device)

    # Load and check
    task = tasks.load(config.task) if config.task is not None else None
    records, prompt_source = load_records(config, inputs.get("prompts"), task)
    policies: dict[str, Path | str] = dict(inputs["policies"])
    if not policies:
        raise InputError("evaluate: no policies to compare (inputs.policies is empty)")
    baseline = config.baseline_label(list(policies))
    if baseline not in policies:
        raise InputError(
            f"evaluate: baseline {baseline!r} is not one of the policies' labels: {', '.join(policies)}"
        )
    judge = load_judge(inputs.get("reward"), device, config.precision)
    reference = load_reference(inputs.get("reference"), device, config.precision)

    # Generate and measure, one policy at a time
    results = {}
    for label, source in policies.items():
        clock = time.perf_counter()
        results[label] = evaluate_policy(
            label, source, records, config, device, judge, reference, task, out_dir
        )
        print(f"evaluate: {label} in {time.perf_counter() - clock:.1f}s", flush=True)

    # Compare
    report = build_report(config, records, prompt_source, results, baseline, inputs)

    # Save
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    write_responses(out_dir / RESPONSES_FILE, records, results)
    (out_dir / MARKDOWN_FILE).write_text(markdown(report))
    figure = chart(report, out_dir / CHART_FILE)
    log_responses(records, results, out_dir / CHART_FILE, report["audit"])
    import matplotlib.pyplot as plt

    plt.close(figure)

    # Measure
    metrics: dict[str, Any] = {
        "baseline": baseline,
        "prompts": len(records),
        "policies": list(policies),
        "engine": config.engine,
    }
    metrics["dtype"] = {label: result.dtype for label, result in results.items()}
    if judge is not None:
        metrics["dtype"]["reward"] = dtype_name(judge.model)
    for label, entry in report["policies"].items():
        for name in (*METRICS, *IMPROVEMENTS):
            if name not in entry:
                continue
            value = entry[name]
            metrics[f"{label}.{name}"] = value["value"]
            if value.get("ci_low") is not None:
                metrics[f"{label}.{name}_ci_low"] = value["ci_low"]
                metrics[f"{label}.{name}_ci_high"] = value["ci_high"]
    for label, checked in report["audit"].items():
        for name in AUDIT_METRICS:
            if name in checked:
                metrics[f"{label}.{name}"] = checked[name]
    if report["audit"]:
        metrics["gaming_suspected"] = [
            label for label, a in report["audit"].items() if a.get("gaming_suspected")
        ]
    metrics["duration_s"] = time.perf_counter() - started
    return metrics


# --- load ---


def load_records(
    config: EvaluateConfig, prompts: Path | str | None, task: Task | None
) -> tuple[list[dict[str, Any]], Any]:
    """The prompts (`{"id", "prompt", ...fields}`), the first `num_prompts` of them, and where they came from:
    the `prompts` input, or else the task's `split`. With a task, every prompt must be one it can judge."""
    from policy.sample import task_records

    if prompts is None:
        return task_records(task, config.split, config.num_prompts, "evaluate")
    records = load_prompts(prompts, "evaluate", config.num_prompts)
    if task is not None:
        check_judgeable(task, records, f"the prompts in {prompts}", "evaluate")
    return records, source_reference(prompts)


def check_judgeable(task: Task, records: list[dict[str, Any]], what: str, stage: str) -> None:
    """Refuse prompts the task cannot judge (a pass rate over some of them would mislead)."""
    for number, record in enumerate(records, 1):
        if missing := task.missing(record):
            raise InputError(
                f"{stage}: task {task.name!r} cannot judge {what}: row {number} lacks {', '.join(missing)}; "
                "give prompts with the fields the task needs, or set no task for this stage (`task: null`)"
            )


@dataclass
class Judge:
    """The reward model that scores responses."""

    model: Any
    tokenizer: Any
    source: Path


def load_judge(source: Path | str | None, device: torch.device, precision: str) -> Judge | None:
    if source is None:
        return None
    from common.reward_model import load_reward_model

    dtype = compute_dtype(precision, device, source)
    model, tokenizer = load_reward_model(Path(source), device=device, dtype=dtype)
    return Judge(model, tokenizer, Path(source))


@dataclass
class Reference:
    model: Any
    tokenizer: Any
    fingerprint: str
    source: Path | str


def load_reference(source: Path | str | None, device: torch.device, precision: str) -> Reference | None:
    if source is None:
        return None
    model, tokenizer = load_causal_lm(source, device=device)
    dtype = compute_dtype(precision, device, source)
    return Reference(merged_for_inference(model, dtype), tokenizer, tokenizer_fingerprint(tokenizer), source)


# --- one policy ---


@torch.no_grad()
def evaluate_policy(
    label: str,
    source: Path | str,
    records: list[dict[str, Any]],
    config: EvaluateConfig,
    device: torch.device,
    judge: Judge | None,
    reference: Reference | None,
    task: Task | None,
    out_dir: Path,
) -> PolicyResult:
    """Generate greedy and sampled responses of one policy (with `config.engine`) and measure them."""
    model, tokenizer = load_causal_lm(source, device=device)
    if reference is not None and tokenizer_fingerprint(tokenizer) != reference.fingerprint:
        raise InputError(
            f"evaluate: policy {label!r} and the reference do not share tokenizer and chat template, so the KL "
            "between them (a sum over tokens) is undefined; compare policies of one family, or omit `reference`"
        )
    # an adapter folded into its base generates faster
    model = merged_for_inference(model, compute_dtype(config.precision, device, source))
    prompts = [record["prompt"] for record in records]
    prompt_ids = encode_prompts(tokenizer, prompts, "auto")
    max_new_tokens = response_budget(config.max_new_tokens, task)
    sampling = Sampling(config.temperature, config.top_p, max_new_tokens=max_new_tokens)
    with engines.open_engine(
        config, source, tokenizer, device, out_dir, prompt_ids, sampling, model
    ) as engine:
        greedy = sample_candidates(
            engine, prompt_ids, 1, Sampling(0.0, max_new_tokens=max_new_tokens), seed=config.seed
        )
        sampled = sample_candidates(engine, prompt_ids, config.samples_per_prompt, sampling, seed=config.seed)

    result = PolicyResult(
        label,
        source,
        greedy=[drawn[0].text for drawn in greedy],
        sampled=[[c.text for c in drawn] for drawn in sampled],
        dtype=engine.dtype,
    )
    result.per_prompt["length_mean"] = np.array(
        [np.mean([len(c.token_ids) - c.finished for c in drawn]) for drawn in sampled]
    )
    if task is not None:
        result.verdicts_greedy = [
            verdicts(task, r, drawn)[0] for drawn, r in zip(greedy, records, strict=True)
        ]
        result.verdicts_sampled = [
            verdicts(task, r, drawn) for drawn, r in zip(sampled, records, strict=True)
        ]
        result.per_prompt["pass_rate_greedy"] = np.array(result.verdicts_greedy, dtype=float)
        result.per_prompt["pass_rate_sampled"] = np.array([pass_rate(v) for v in result.verdicts_sampled])
    if judge is not None:
        from common.reward_model import score_batch

        flat = [(prompt, c.text) for prompt, drawn in zip(prompts, sampled, strict=True) for c in drawn]
        rewards = score_batch(
            judge.model,
            judge.tokenizer,
            [p for p, _ in flat],
            [r for _, r in flat],
            batch_size=config.reward_batch_size,
        )
        result.sample_rewards = np.array(rewards).reshape(len(records), config.samples_per_prompt)
        result.per_prompt["reward_mean"] = result.sample_rewards.mean(axis=1)
    if reference is not None:
        rows = [(ids, c.token_ids) for ids, drawn in zip(prompt_ids, sampled, strict=True) for c in drawn]
        policy_logps = np.array(sequence_logprobs(model, rows, tokenizer.pad_token_id, config.batch_size))
        tokens = np.array([max(1, len(response)) for _, response in rows])
        result.per_prompt["entropy"] = (-policy_logps / tokens).reshape(len(records), -1).mean(axis=1)
        if same_source(source, reference.source):
            result.per_prompt["kl"] = np.zeros(len(records))  # the reference itself
        else:
            reference_logps = sequence_logprobs(
                reference.model, rows, tokenizer.pad_token_id, config.batch_size
            )
            kl = (policy_logps - np.array(reference_logps)).reshape(len(records), -1)
            result.per_prompt["kl"] = kl.mean(axis=1)
    return result


def same_source(a: Path | str, b: Path | str) -> bool:
    return a == b if isinstance(a, str) or isinstance(b, str) else a.resolve() == b.resolve()


def response_budget(max_new_tokens: int | None, task: Task | None) -> int:
    """The longest response: as configured, else the task's budget, else 64 tokens."""
    return max_new_tokens or (task.max_new_tokens if task is not None else 64)


def verdicts(task: Task, record: dict[str, Any], completions: list[Completion]) -> list[float]:
    """The task's verdict on each completion of a prompt (a completion cut off before its end fails)."""
    return [task.judge(record, c.text, c.finished) for c in completions]


@torch.no_grad()
def sequence_logprobs(
    model: Any, rows: list[tuple[list[int], list[int]]], pad_token_id: int, batch_size: int
) -> list[float]:
    """For each (prompt ids, response ids): the sum of log p(response token | what precedes it), at
    temperature 1. Rows are left-padded in batches of similar length, with position ids as in generation,
    and logits are computed for the response positions only (batch x response length x vocabulary)."""
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i][1]), len(rows[i][0])))
    sums = [0.0] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        sequences = [list(rows[i][0]) + list(rows[i][1]) for i in chunk]
        input_ids, attention = left_pad(sequences, pad_token_id, device)
        keep = max(len(rows[i][1]) for i in chunk)  # the last `keep` tokens hold every response
        positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
        logits = model(
            input_ids=input_ids, attention_mask=attention, position_ids=positions, logits_to_keep=keep + 1
        ).logits[:, :-1]
        targets = input_ids[:, -keep:]
        token_logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        lengths = torch.tensor([len(rows[i][1]) for i in chunk], device=device)
        response = torch.arange(keep, device=device).unsqueeze(0) >= (keep - lengths).unsqueeze(1)
        totals = (token_logps * response).sum(dim=1)
        for index, value in zip(chunk, totals.tolist(), strict=True):
            sums[index] = value
    return sums


# --- compare ---


def win_rates(policy: PolicyResult, baseline: PolicyResult, method: str) -> np.ndarray:
    """Per prompt: how often the policy beats the baseline under the reward model (ties count half)."""
    assert policy.sample_rewards is not None and baseline.sample_rewards is not None
    if method == "prompt_mean":
        mine, theirs = policy.sample_rewards.mean(axis=1), baseline.sample_rewards.mean(axis=1)
        return (mine > theirs) + 0.5 * (mine == theirs)
    mine = policy.sample_rewards[:, :, None]
    theirs = baseline.sample_rewards[:, None, :]
    return ((mine > theirs) + 0.5 * (mine == theirs)).mean(axis=(1, 2))


def resamples(prompts: int, config: EvaluateConfig) -> np.ndarray:
    """(bootstrap_samples, prompts) indices of prompts drawn with replacement: one set, seeded, for all."""
    return stats.resamples(prompts, config.bootstrap_samples, config.seed)


def build_report(
    config: EvaluateConfig,
    records: list[dict[str, Any]],
    prompt_source: Any,
    results: dict[str, PolicyResult],
    baseline: str,
    inputs: dict[str, Any],
) -> dict[str, Any]:
    indices = resamples(len(records), config)
    base = results[baseline]
    policies: dict[str, Any] = {}
    per_prompt: dict[str, Any] = {}
    for label, result in results.items():
        values = dict(result.per_prompt)
        if result.sample_rewards is not None and base.sample_rewards is not None:
            values["win_rate"] = win_rates(result, base, config.win_rate_by)
        entry: dict[str, Any] = {"source": source_reference(result.source)}
        for name in METRICS:
            if (value := values.get(name)) is not None:
                entry[name] = stats.estimate(value, indices, config.confidence)
        if label != baseline:
            for name, metric in zip(
                IMPROVEMENTS, ("pass_rate_sampled", "pass_rate_greedy", "reward_mean"), strict=True
            ):
                ours, theirs = values.get(metric), base.per_prompt.get(metric)
                if ours is not None and theirs is not None:
                    difference = ours - theirs
                    entry[name] = stats.estimate(difference, indices, config.confidence)
        policies[label] = entry
        per_prompt[label] = {name: value.tolist() for name, value in values.items() if value is not None}
    return {
        "baseline": baseline,
        "prompts": {"source": prompt_source, "count": len(records), "ids": [r["id"] for r in records]},
        "settings": config.model_dump(mode="json"),
        "inputs": {
            slot: source_reference(value)
            for slot, value in inputs.items()
            if slot != "policies" and value is not None
        },
        "confidence": config.confidence,
        "policies": policies,
        "audit": audit_policies(results, policies, records, baseline, config.audit_examples),
        "per_prompt": per_prompt,
        "definitions": DEFINITIONS | {"win_rate": WIN_RATE[config.win_rate_by]},
    }


def audit_policies(
    results: dict[str, PolicyResult],
    policies: dict[str, Any],
    records: list[dict[str, Any]],
    baseline: str,
    examples: int,
) -> dict[str, dict[str, Any]]:
    """The reward-hacking audit of each policy scored by a reward model (`policy/audit.py`); empty without
    one. `judged` says whether a task's verdicts were there to check the rewards against."""
    audits: dict[str, dict[str, Any]] = {}
    base = results[baseline]
    for label, result in results.items():
        if result.sample_rewards is None:
            continue
        if result.verdicts_sampled is None or base.verdicts_sampled is None:
            audits[label] = {"judged": False}
            continue
        rewards, verdicts_ = result.sample_rewards, np.array(result.verdicts_sampled, dtype=float)
        assert base.sample_rewards is not None
        reason = None
        if label != baseline:
            entry = policies[label]
            reason = audit.gaming_reason(entry["reward_gain"], entry.get("improvement_sampled"))
        audits[label] = {
            "judged": True,
            "gaming_suspected": reason is not None,
            "reason": reason,
            "top_reward_fail_rate": audit.top_reward_fail_rate(rewards, verdicts_),
            "baseline_top_reward_fail_rate": audit.top_reward_fail_rate(
                base.sample_rewards, np.array(base.verdicts_sampled, dtype=float)
            ),
            "reward_verdict_correlation": audit.reward_verdict_correlation(rewards, verdicts_),
            "top_reward_failures": audit.top_reward_failures(
                records, result.sampled, rewards, verdicts_, examples
            ),
        }
    return audits


DEFINITIONS = {
    "pass_rate_greedy": "mean over prompts of the task's verdict on the greedy response (a response cut off fails)",
    "pass_rate_sampled": "mean over prompts of the mean verdict on the sampled responses (a response cut off fails)",
    "reward_mean": "mean reward-model score of the sampled responses",
    "kl": "mean over sampled responses of sum over response tokens of log p_policy - log p_reference",
    "length_mean": "mean sampled response length in tokens, stop token excluded",
    "entropy": "mean over sampled responses of -log p_policy(response) per token (an estimate of the entropy per token)",
    "improvement_sampled": "pass_rate_sampled minus the baseline's (paired bootstrap interval)",
    "improvement_greedy": "pass_rate_greedy minus the baseline's (paired bootstrap interval)",
    "reward_gain": "reward_mean minus the baseline's (paired bootstrap interval)",
    "top_reward_fail_rate": f"share of the policy's top {audit.TOP_FRACTION:.0%} samples by reward that the task fails",
    "gaming_suspected": "reward_gain's interval above 0 while improvement_sampled's is not (policy/audit.py)",
    "intervals": "percentile bootstrap over prompts, one seeded set of resamples shared by every policy",
}
WIN_RATE = {
    "prompt_mean": "per prompt, the policy's mean sample reward against the baseline's: 1 win, 1/2 tie, 0 loss",
    "sample_pairs": "per prompt, the fraction of (policy sample, baseline sample) pairs the policy's sample wins, ties half",
}


# --- save ---


def write_responses(file: Path, records: list[dict[str, Any]], results: dict[str, PolicyResult]) -> None:
    with file.open("w", encoding="utf-8") as out:
        for index, record in enumerate(records):
            row: dict[str, Any] = {"id": record["id"], "prompt": record["prompt"]}
            row.update({k: v for k, v in record.items() if k not in row})  # the task's fields
            for label, result in results.items():
                entry: dict[str, Any] = {"greedy": result.greedy[index], "sampled": result.sampled[index]}
                if result.verdicts_greedy is not None and result.verdicts_sampled is not None:
                    entry["greedy_verdict"] = result.verdicts_greedy[index]
                    entry["sampled_verdicts"] = result.verdicts_sampled[index]
                if result.sample_rewards is not None:
                    entry["rewards"] = result.sample_rewards[index].tolist()
                row[label] = entry
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def _cell(entry: dict[str, Any], name: str, percent: bool) -> str:
    if name not in entry:
        return "–"
    value = entry[name]
    show = (lambda x: f"{100 * x:.1f}") if percent else (lambda x: f"{x:.3g}")
    return f"{show(value['value'])} [{show(value['ci_low'])}, {show(value['ci_high'])}]"


def markdown(report: dict[str, Any]) -> str:
    """A table: one row per policy, the metrics with their intervals (pass rates in percent)."""
    columns = [*METRICS, *IMPROVEMENTS]
    percent = {
        "pass_rate_sampled",
        "pass_rate_greedy",
        "win_rate",
        "improvement_sampled",
        "improvement_greedy",
    }
    header = "| policy | " + " | ".join(columns) + " |"
    lines = [
        f"# Policy evaluation ({report['prompts']['count']} prompts, baseline `{report['baseline']}`)",
        "",
        f"Values with {report['confidence']:.0%} bootstrap intervals over prompts; pass rates, win rates and "
        "improvements in percent.",
        "",
        header,
        "|" + "---|" * (len(columns) + 1),
    ]
    for label, entry in report["policies"].items():
        cells = [_cell(entry, name, name in percent) for name in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    audits = report.get("audit", {})
    if sentences := audit.summary_lines(audits, report["baseline"]):
        lines += ["", *sentences]
    if judged := {label: a for label, a in audits.items() if a.get("judged")}:
        lines += [
            "",
            "| policy | top-reward responses failing | reward-verdict correlation | gaming suspected |",
            "|---|---|---|---|",
        ]
        for label, checked in judged.items():
            correlation = checked["reward_verdict_correlation"]
            lines.append(
                f"| {label} | {100 * checked['top_reward_fail_rate']:.1f} | "
                f"{'–' if correlation is None else f'{correlation:.2f}'} | "
                f"{'yes' if checked['gaming_suspected'] else 'no'} |"
            )
    lines += ["", "Definitions:", ""]
    lines += [f"- `{name}`: {text}" for name, text in report["definitions"].items()]
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], file: Path) -> Any:
    """Pass rate (greedy, sampled) with interval error bars, and mean reward, per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(report["policies"])
    entries = [report["policies"][label] for label in labels]
    has_pass_rate = any("pass_rate_sampled" in e for e in entries)
    has_reward = any("reward_mean" in e for e in entries)
    panels = [
        p
        for p, present in (("pass rate", has_pass_rate), ("reward", has_reward), ("length", True))
        if present
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    positions = np.arange(len(labels))
    for axis, panel in zip(axes[0], panels, strict=True):
        names = {
            "pass rate": ["pass_rate_greedy", "pass_rate_sampled"],
            "reward": ["reward_mean"],
            "length": ["length_mean"],
        }[panel]
        width = 0.8 / len(names)
        for offset, name in enumerate(names):
            values = [e[name]["value"] if name in e else np.nan for e in entries]
            low = [e[name]["value"] - e[name]["ci_low"] if name in e else 0 for e in entries]
            high = [e[name]["ci_high"] - e[name]["value"] if name in e else 0 for e in entries]
            axis.bar(
                positions + (offset - (len(names) - 1) / 2) * width,
                values,
                width,
                yerr=[low, high],
                capsize=3,
                label=name.replace("_", " "),
            )
        axis.set_xticks(positions, labels, rotation=20, ha="right")
        axis.set_title(
            {"pass rate": "pass rate", "reward": "mean reward", "length": "length (tokens)"}[panel]
        )
        if panel == "pass rate":
            axis.set_ylim(0, 1)
            axis.legend(fontsize=8, loc="lower right")
    figure.suptitle(f"{report['prompts']['count']} prompts, {report['confidence']:.0%} bootstrap intervals")
    figure.tight_layout()
    figure.savefig(file, dpi=110)
    return figure


def log_responses(
    records: list[dict[str, Any]],
    results: dict[str, PolicyResult],
    chart_file: Path,
    audits: dict[str, dict[str, Any]],
) -> None:
    """Greedy responses side by side (prompt, per policy: response and the task's verdict), the chart, and
    the audit: per policy its figures, and its failing responses with the highest rewards."""
    if wandb_run() is None:
        return
    judged = all(result.verdicts_greedy is not None for result in results.values())
    columns = ["prompt"]
    for label in results:
        columns += [label] + ([f"{label} verdict"] if judged else [])
    rows = []
    for index, record in enumerate(records):
        prompt = record["prompt"] if isinstance(record["prompt"], str) else json.dumps(record["prompt"])
        row: list[Any] = [prompt]
        for result in results.values():
            row.append(result.greedy[index])
            if judged:
                assert result.verdicts_greedy is not None
                row.append(result.verdicts_greedy[index])
        rows.append(row)
    logged: dict[str, Any] = {"responses": Table(columns, rows), "chart": chart_file}
    if checked := {label: a for label, a in audits.items() if a.get("judged")}:
        logged["audit"] = Table(
            ["policy", "gaming_suspected", "reason", "top_reward_fail_rate", "reward_verdict_correlation"],
            [
                [
                    label,
                    a["gaming_suspected"],
                    a["reason"] or "",
                    a["top_reward_fail_rate"],
                    a["reward_verdict_correlation"],
                ]
                for label, a in checked.items()
            ],
        )
        logged["audit_top_reward_failures"] = Table(
            ["policy", "prompt", "response", "reward", "verdict"],
            [
                [label, str(f["prompt"]), f["response"], f["reward"], f["verdict"]]
                for label, a in checked.items()
                for f in a["top_reward_failures"]
            ],
        )
    log_to_wandb(logged)


# --- for other stages: the task's pass rate at the end of training ---


def task_pass_rates(
    model: Any,
    tokenizer: Any,
    task: Task,
    samples: int,
    seed: int = 0,
    batch_size: int = 256,
    prompt_format: str = "auto",
) -> dict[str, Any]:
    """The held-out pass rate of a policy in memory, counted as in this stage: `pass_rate_greedy`, and
    `pass_rate_sampled` over `samples` answers per prompt at temperature 1 (seeded as in `evaluate`),
    responses of at most `task.max_new_tokens` tokens; plus `task_prompts`, how many prompts were asked.
    The one measurement behind the end-of-stage checks of pretrain, SFT, DPO, RLOO and GRPO."""
    records = task.prompts("held_out")
    was_training = model.training
    model.eval()
    prompt_ids = encode_prompts(tokenizer, [r["prompt"] for r in records], prompt_format)  # type: ignore[arg-type]
    budget = task.max_new_tokens
    engine = HFEngine(model, tokenizer, batch_size)
    greedy = sample_candidates(engine, prompt_ids, 1, Sampling(0.0, max_new_tokens=budget), seed=seed)
    sampled = sample_candidates(engine, prompt_ids, samples, Sampling(1.0, max_new_tokens=budget), seed=seed)
    model.train(was_training)
    return {
        "pass_rate_greedy": pass_rate(
            [verdicts(task, r, d)[0] for d, r in zip(greedy, records, strict=True)]
        ),
        "pass_rate_sampled": pass_rate(
            [pass_rate(verdicts(task, r, d)) for d, r in zip(sampled, records, strict=True)]
        ),
        "task_prompts": len(records),
    }
