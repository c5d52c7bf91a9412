"""The trainer's pure math against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from services.trainer.losses import (cosine_lr_factor, entropy, explained_variance, gae, kl_per_token, normalize, ppo_clip_loss, thought_kl,
                                     value_loss)


def _col(*xs):
    return torch.tensor(xs, dtype=torch.float32).unsqueeze(1)  # [T, N=1]


REWARDS, VALUES = _col(1.0, 0.0, 2.0), _col(0.5, 0.4, 0.3)


def test_gae_hand_computed_no_episode_end():
    # gamma 0.9, lambda 0.8; next_values[2] = 0.9 is the bootstrap of the rollout's end.
    adv, ret = gae(REWARDS, VALUES, _col(0.4, 0.3, 0.9), _col(0, 0, 0), _col(0, 0, 0), 0.9, 0.8)
    # d2 = 2 + .9*.9 - .3 = 2.51; d1 = .9*.3 - .4 = -.13; d0 = 1 + .9*.4 - .5 = .86
    # A1 = -.13 + .72*2.51 = 1.6772; A0 = .86 + .72*1.6772 = 2.067584
    assert torch.allclose(adv[:, 0], torch.tensor([2.067584, 1.6772, 2.51]), atol=1e-5)
    assert torch.allclose(ret, adv + VALUES)


def test_gae_bootstraps_on_truncation_not_termination():
    # Step 1 ends its episode; next_values[1] = 0.7 is the value of the final observation.
    trunc, _ = gae(REWARDS, VALUES, _col(0.4, 0.7, 0.9), _col(0, 0, 0), _col(0, 1, 0), 0.9, 0.8)
    # d1 = .9*.7 - .4 = .23, no carry over the boundary; A0 = .86 + .72*.23
    assert torch.allclose(trunc[:, 0], torch.tensor([1.0256, 0.23, 2.51]), atol=1e-5)
    term, _ = gae(REWARDS, VALUES, _col(0.4, 0.7, 0.9), _col(0, 1, 0), _col(0, 0, 0), 0.9, 0.8)
    # terminated: V(final) is ignored: d1 = -.4; A0 = .86 - .72*.4
    assert torch.allclose(term[:, 0], torch.tensor([0.572, -0.4, 2.51]), atol=1e-5)


def test_gae_columns_are_independent_envs():
    r = torch.cat([REWARDS, REWARDS * 0], dim=1)
    v = torch.cat([VALUES, VALUES], dim=1)
    nv = torch.cat([_col(0.4, 0.3, 0.9)] * 2, dim=1)
    z = torch.zeros_like(r)
    adv, _ = gae(r, v, nv, z, z, 0.9, 0.8)
    alone, _ = gae(REWARDS, VALUES, _col(0.4, 0.3, 0.9), z[:, :1], z[:, :1], 0.9, 0.8)
    assert torch.allclose(adv[:, :1], alone)
    assert not torch.allclose(adv[:, 1:], alone)


def test_ppo_clip_loss_hand_computed():
    old = torch.zeros(3)
    new = torch.log(torch.tensor([1.5, 0.5, 1.0]))
    adv = torch.tensor([1.0, 1.0, -2.0])
    loss, st = ppo_clip_loss(new, old, adv, clip_coef=0.2)
    # sample 0: min(1.5, 1.2)*1 -> 1.2; sample 1: min(.5, .8) -> .5; sample 2: ratio 1 -> -2
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 2.0) / 3, abs=1e-6)
    assert st["clipfrac"] == pytest.approx(2 / 3)
    loss_same, st_same = ppo_clip_loss(old, old, adv, 0.2)
    assert st_same["ratio_mean"] == 1.0 and st_same["clipfrac"] == 0.0 and st_same["approx_kl"] == 0.0


def test_value_loss_clipped_with_own_range():
    old, ret = torch.tensor([0.0]), torch.tensor([1.0])
    assert value_loss(torch.tensor([0.9]), old, ret, None).item() == pytest.approx(0.5 * 0.01)
    # clipped prediction 0.2 -> (0.2-1)^2 = .64 beats (0.9-1)^2: the pessimistic max
    assert value_loss(torch.tensor([0.9]), old, ret, 0.2).item() == pytest.approx(0.5 * 0.64)


def test_kl_estimators_and_clip_at_zero():
    s = torch.tensor([-1.0, -2.0, -0.5])
    t = torch.tensor([-1.5, -1.0, -0.5])
    # log r = t - s = [-.5, 1, 0]
    assert torch.allclose(kl_per_token(s, t, "k1"), torch.tensor([0.5, 0.0, 0.0]))  # -1 clipped to 0
    assert torch.allclose(kl_per_token(s, t, "abs"), torch.tensor([0.5, 1.0, 0.0]))
    k3 = kl_per_token(s, t, "k3")
    assert torch.allclose(k3, torch.tensor([math.exp(-0.5) - 1 + 0.5, math.e - 1 - 1, 0.0]), atol=1e-6)
    assert thought_kl(s, t, "k1") == pytest.approx(0.5 / 3)
    assert thought_kl(torch.tensor([]), torch.tensor([])) == 0.0
    with pytest.raises(ValueError):
        kl_per_token(s, t, "k2")


def test_cosine_lr_spans_the_whole_run_and_never_rises():
    total = 40
    f = [cosine_lr_factor(s, total, warmup=0, min_ratio=0.1) for s in range(total + 5)]
    assert f[0] == 1.0 and f[total] == pytest.approx(0.1) and f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f, f[1:]))
    w = [cosine_lr_factor(s, total, warmup=4) for s in range(6)]
    assert w[:4] == [0.25, 0.5, 0.75, 1.0] and w[4] == 1.0


def test_normalize():
    x = normalize(torch.tensor([1.0, 2.0, 3.0]))
    assert x.mean().abs() < 1e-6 and x.std().item() == pytest.approx(1.0, abs=1e-4)


def test_entropy_and_explained_variance():
    uniform = torch.log(torch.full((2, 4), 0.25))
    assert torch.allclose(entropy(uniform), torch.full((2,), math.log(4)))
    peaked = torch.log_softmax(torch.tensor([[50.0, 0.0, 0.0]]), dim=-1)
    assert entropy(peaked).item() < 1e-6
    y = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert explained_variance(y, y) == 1.0 and explained_variance(torch.zeros(4), y) == pytest.approx(0.0)
