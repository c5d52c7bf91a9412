"""TIES / linear merging against an independent, entry-by-entry computation (DESIGN §4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from services.teacher.adapters import Adapter, LoraFactor
from services.teacher.merging import linear_merge, merge_adapters, merge_weights, ties_merge


def direct_ties(deltas: list[np.ndarray], weights: list[float], density: float, scale: float = 1.0) -> np.ndarray:
    """TIES written out the slow way: sort each delta, keep its top-k, vote entry by entry."""
    shape = deltas[0].shape
    n = deltas[0].size
    k = int(density * n)
    trimmed = []
    for d in deltas:
        flat = d.reshape(-1).astype(np.float64)
        order = np.argsort(-np.abs(flat), kind="stable")
        t = np.zeros(n)
        t[order[:k]] = flat[order[:k]]
        trimmed.append(t)
    out = np.zeros(n)
    for j in range(n):
        mass = sum(w * t[j] for w, t in zip(weights, trimmed))
        if mass == 0:
            continue
        sign = 1.0 if mass > 0 else -1.0
        num = den = 0.0
        for w, t in zip(weights, trimmed):
            if t[j] != 0 and math.copysign(1.0, t[j]) == sign:
                num += w * t[j]
                den += w
        out[j] = num / den if den else 0.0
    return (out * scale).reshape(shape)


def test_merge_weights_sma_and_ema():
    assert torch.allclose(merge_weights(4, "sma"), torch.full((4,), 0.25, dtype=torch.float64))
    w = merge_weights(3, "ema", 0.5)
    raw = torch.tensor([0.5 * 0.5**2, 0.5 * 0.5, 0.5], dtype=torch.float64)  # oldest -> newest, age 2,1,0
    assert torch.allclose(w, raw / raw.sum())
    assert abs(float(merge_weights(5, "ema", 0.3).sum()) - 1) < 1e-12
    assert w[-1] > w[0]  # the newest weighs most


@pytest.mark.parametrize("weighting", ["sma", "ema"])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_equals_direct_computation(weighting, density):
    rng = np.random.default_rng(0)
    K = 4
    deltas = [rng.normal(size=(9, 7)).astype(np.float32) for _ in range(K)]
    w = merge_weights(K, weighting, 0.4)
    got, st = ties_merge(torch.tensor(np.stack(deltas)), w, density, scale=0.7)
    want = direct_ties(deltas, w.tolist(), density, scale=0.7)
    assert np.allclose(got.numpy(), want, atol=1e-6)
    # The three steps really happen: trimming leaves holes, the vote drops disagreeing entries.
    if density < 1:
        assert st.kept < st.entries
    assert 0 < st.conflicts <= st.voted <= st.entries


def test_ties_weighted_mean_is_not_plain_mean():
    # Two agreeing entries with EMA weights: the disjoint mean is weighted, not uniform.
    d = torch.tensor([[[1.0]], [[3.0]]])
    w = torch.tensor([0.25, 0.75], dtype=torch.float64)
    got, _ = ties_merge(d.clone(), w, density=1.0)
    assert got.item() == pytest.approx(0.25 * 1 + 0.75 * 3)
    # Disagreeing: the elected sign is that of the weighted mass, the other side is dropped.
    d = torch.tensor([[[2.0]], [[-1.0]]])
    got, st = ties_merge(d.clone(), torch.tensor([0.2, 0.8], dtype=torch.float64), density=1.0)
    assert got.item() == pytest.approx(-1.0)  # 0.2*2 - 0.8*1 < 0: only the negative entry survives
    assert st.conflicts == 1


def test_linear_merge():
    d = torch.randn(3, 4, 5)
    w = merge_weights(3, "ema", 0.5)
    got, _ = linear_merge(d.clone(), w, scale=2.0)
    want = 2.0 * sum(float(w[i]) * d[i] for i in range(3))
    assert torch.allclose(got, want, atol=1e-6)


def _adapter(rng, shapes: dict[str, tuple[int, int]], r: int, scaling: float) -> Adapter:
    factors = {n: LoraFactor(torch.tensor(rng.normal(size=(r, i)), dtype=torch.float32),
                             torch.tensor(rng.normal(size=(o, r)), dtype=torch.float32), scaling)
               for n, (o, i) in shapes.items()}
    return Adapter(factors=factors, rank=r, alpha=scaling * r, use_rslora=False)


def test_merge_adapters_module_by_module_with_missing_modules():
    rng = np.random.default_rng(1)
    shapes = {"a.weight": (6, 5), "b.weight": (4, 8)}
    ads = [_adapter(rng, shapes, 2, 0.5), _adapter(rng, {"a.weight": (6, 5)}, 3, 2.0), _adapter(rng, shapes, 2, 1.0)]
    w = merge_weights(3, "sma")
    res = merge_adapters(ads, w, "ties", density=0.5, scale=1.0)
    assert set(res.delta) == {"a.weight", "b.weight"}
    for name in shapes:
        deltas = [(a.factors[name].scaling * a.factors[name].B @ a.factors[name].A).numpy() if name in a.factors
                  else np.zeros(shapes[name], dtype=np.float32) for a in ads]
        assert np.allclose(res.delta[name].numpy(), direct_ties(deltas, w.tolist(), 0.5), atol=1e-5)
    for key in ("sign_conflict_fraction", "kept_density", "norm_ratio", "seconds"):
        assert key in res.stats
    assert 0 < res.stats["kept_density"] <= 1 and 0 < res.stats["norm_ratio"]
    lin = merge_adapters(ads, w, "linear")
    want = sum(float(w[i]) * ads[i].factors["a.weight"].delta() for i in range(3))
    assert torch.allclose(lin.delta["a.weight"], want, atol=1e-5)
