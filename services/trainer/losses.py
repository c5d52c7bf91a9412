"""The trainer's math as pure functions, unit-tested against hand-computed cases.

Shapes: rollout tensors are [T, N] (time, env); per-sample tensors are [B].
"""

from __future__ import annotations

import math

import torch


def gae(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor,
        truncated: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), [T, N] -> (advantages, returns).

    `next_values[t]` is V(s_{t+1}): the next step's value inside an episode, the value of the
    final observation when step t truncated (we bootstrap through a time limit), and ignored
    when it terminated. The recursion never crosses an episode end (terminated or truncated).
    The last row is the rollout's end: its next_values is the bootstrap value.
    """
    T = rewards.shape[0]
    adv = torch.zeros_like(rewards, dtype=torch.float32)
    lastgaelam = torch.zeros_like(rewards[0], dtype=torch.float32)
    for t in reversed(range(T)):
        nextnonterminal = 1.0 - terminated[t].float()
        delta = rewards[t].float() + gamma * next_values[t].float() * nextnonterminal - values[t].float()
        notdone = 1.0 - torch.maximum(terminated[t].float(), truncated[t].float())
        lastgaelam = delta + gamma * lam * notdone * lastgaelam
        adv[t] = lastgaelam
    return adv, adv + values.float()


def normalize(x: torch.Tensor, eps: float = 1e-8, mean: torch.Tensor | None = None,
              std: torch.Tensor | None = None) -> torch.Tensor:
    """(x - mean) / (std + eps); the moments default to x's own (data parallel passes the global ones)."""
    if mean is None or std is None:
        if x.numel() < 2:
            return x - x.mean()
        mean, std = x.mean(), x.std()
    return (x - mean) / (std + eps)


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip_coef: float,
                  weights: torch.Tensor | None = None):
    """Clipped surrogate (Schulman et al. 2017, eq. 7) on sequence-level ratios; (loss, stats).

    `weights`: per-sample factors on the surrogate (the truncated importance weights of
    `rollout.tis_cap`, which correct for a sampler that is not the trainer: verl's / slime's TIS)."""
    logratio = logp - old_logp
    ratio = logratio.exp()
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1 - clip_coef, 1 + clip_coef)
    per_sample = torch.maximum(pg1, pg2)
    loss = (per_sample * weights).mean() if weights is not None else per_sample.mean()
    with torch.no_grad():
        # approx_kl: the k3 estimator, as in CleanRL (http://joschu.net/blog/kl-approx.html)
        stats = {"approx_kl": float(((ratio - 1) - logratio).mean()),
                 "clipfrac": float(((ratio - 1).abs() > clip_coef).float().mean()),
                 "ratio_mean": float(ratio.mean()), "ratio_min": float(ratio.min()), "ratio_max": float(ratio.max())}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float | None):
    """0.5 * squared error, clipped around the rollout's values with its own range (CleanRL)."""
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * unclipped.mean()
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum(unclipped, (clipped - returns) ** 2).mean()


def kl_per_token(student_lp: torch.Tensor, teacher_lp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per sampled token estimate of KL(student || teacher), clipped to [0, inf) (DESIGN §4).

    With r = p_teacher / p_student at a token sampled from the student:
    k1 = -log r, abs = |log r|, k3 = (r - 1) - log r (Schulman's unbiased, non-negative one).
    """
    log_r = teacher_lp.float() - student_lp.float()
    if estimator == "k1":
        k = -log_r
    elif estimator == "abs":
        k = log_r.abs()
    elif estimator == "k3":
        k = torch.expm1(log_r) - log_r
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}")
    return k.clamp_min(0.0)


def thought_kl(student_lp: torch.Tensor, teacher_lp: torch.Tensor, estimator: str = "k1") -> float:
    """KL_t: the mean of the clipped per-token estimates over a step's thought tokens."""
    if student_lp.numel() == 0:
        return 0.0
    return float(kl_per_token(student_lp, teacher_lp, estimator).mean())


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy along the last axis of a distribution given by its log-probs (e.g. log_softmax)."""
    return -(logprobs.exp() * logprobs).sum(-1)


def explained_variance(pred: torch.Tensor, target: torch.Tensor) -> float:
    var = float(target.var()) if target.numel() > 1 else 0.0
    return float("nan") if var == 0 else 1.0 - float((target - pred).var()) / var


def cosine_lr_factor(step: int, total: int, warmup: int = 0, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up, then a cosine that reaches `min_ratio` exactly at `total`
    (the whole run, so the LR never rises again: DESIGN §5.9)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
