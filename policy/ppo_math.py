"""The arithmetic of PPO for language models, as plain functions on tensors (no models, no I/O).

Shapes: a batch of B rollouts, each a response of at most T tokens, right-padded. `mask` is 1 for the
response's tokens (its eos included, when it has one) and 0 for the padding after them. Position t of a
response is the decision "which token comes next, given the prompt and the first t response tokens";
its value `values[:, t]` estimates the return from there on.

Used by `policy/ppo.py`; unit-tested against hand-computed examples in `tests/test_ppo.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of `x` over the positions where `mask` is 1 (all of the batch's tokens together)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """`x` shifted to mean 0 and scaled to variance 1 over the masked positions; 0 elsewhere."""
    mean = masked_mean(x, mask)
    variance = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(variance + eps) * mask


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """The index of each row's last response token (every response has at least one)."""
    return mask.sum(dim=1).long() - 1


def token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, kl), both [B, T]: every response token is penalized by `kl_coef` times its KL estimate
    `log pi(token) - log pi_ref(token)` (the sampled token's log-ratio, whose expectation under the policy
    is the KL divergence), and the sequence's score is added at its last token only."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards, kl


def final_scores(
    raw: torch.Tensor,
    finished: torch.Tensor,
    mean: float,
    std: float,
    missing_eos_score: float | None,
) -> torch.Tensor:
    """The score each rollout is rewarded with: the reward model's score, normalized as
    `(raw - mean) / std` (pass 0 and 1 to keep it as it is), and for a response that ran into the token
    limit without eos (`finished` False), the fixed `missing_eos_score` instead, when set."""
    scores = (raw - mean) / std
    if missing_eos_score is not None:
        scores = torch.where(finished, scores, torch.full_like(scores, missing_eos_score))
    return scores


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) by generalized advantage estimation:
    `delta_t = r_t + gamma * V_{t+1} - V_t`, `A_t = delta_t + gamma * lam * A_{t+1}`, `R_t = A_t + V_t`,
    with `V` and `A` taken as 0 after a response's last token. Both are 0 on the padding."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


@dataclass
class PolicyLoss:
    loss: torch.Tensor
    clip_fraction: torch.Tensor
    """Fraction of tokens where the clipped objective was the one taken (the update was limited)."""
    approx_kl: torch.Tensor
    """`0.5 * mean((log pi - log pi_old)^2)`: how far this step has moved from the rollout policy."""


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> PolicyLoss:
    """PPO's clipped surrogate: the mean over tokens of
    `max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))`, `ratio = pi / pi_old`."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return PolicyLoss(
        loss=masked_mean(torch.maximum(unclipped, clipped), mask),
        clip_fraction=masked_mean((clipped > unclipped).float(), mask).detach(),
        approx_kl=(0.5 * masked_mean(log_ratio.detach() ** 2, mask)),
    )


@dataclass
class ValueLoss:
    loss: torch.Tensor
    clip_fraction: torch.Tensor
    """Fraction of tokens where the clipped value's error was the larger one (the one taken)."""


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> ValueLoss:
    """The clipped value loss: the mean over tokens of `0.5 * max((V - R)^2, (V_clip - R)^2)`, where
    `V_clip = V_old + clip(V - V_old, -eps, eps)` keeps the value from moving far in one update."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    return ValueLoss(
        loss=0.5 * masked_mean(torch.maximum(unclipped, clipped), mask),
        clip_fraction=masked_mean((clipped > unclipped).float(), mask).detach(),
    )


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """The entropy of each position's next-token distribution, [B, T]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(token) of each position's token under the distribution sampled from (logits / temperature)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return torch.gather(logp, -1, tokens.unsqueeze(-1)).squeeze(-1)


@dataclass
class RunningMoments:
    """Mean and standard deviation of every score seen so far (Chan et al.'s parallel update), used to
    normalize the reward model's scores; its state is part of the checkpoint."""

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, values: torch.Tensor) -> None:
        values = values.double().flatten()
        n = values.numel()
        if n == 0:
            return
        batch_mean = values.mean().item()
        batch_m2 = ((values - batch_mean) ** 2).sum().item()
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        """The standard deviation (1 until two values were seen; never below 1e-6)."""
        if self.count < 2:
            return 1.0
        return max((self.m2 / (self.count - 1)) ** 0.5, 1e-6)
