"""Exact merging of LoRA checkpoints in weight space (DESIGN §4 "Checkpoints and merge").

For each LoRA module m and checkpoint i the full delta is `tau_i = (alpha/r) * B_i @ A_i`.
TIES (Yadav et al. 2023, "TIES-Merging", Alg. 1), per module:
  1. trim:  keep the top-`density` fraction of each tau_i by magnitude (the rest -> 0);
  2. elect: sign of sum_i w_i * trimmed_i;
  3. disjoint weighted mean: sum_i w_i trimmed_i [sign agrees] / sum_i w_i [sign agrees];
then times `scale`. `linear` is scale * sum_i w_i tau_i; weights are SMA (uniform) or EMA
(alpha (1-alpha)^age, age 0 = newest), normalised to sum 1.

Unlike peft's `add_weighted_adapter(combination_type="ties")`, which runs TIES on A and on B
separately (B_m A_m is then not the TIES of the B_i A_i, DESIGN §5.2), we merge the products.
Module by module: the extra memory is one module's K deltas, never K models.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from services.teacher.adapters import Adapter


def merge_weights(n: int, weighting: str = "sma", ema_alpha: float = 0.5) -> torch.Tensor:
    """Weights of n checkpoints ordered oldest -> newest, summing to 1."""
    if n <= 0:
        return torch.zeros(0, dtype=torch.float64)
    if weighting == "sma":
        w = torch.ones(n, dtype=torch.float64)
    elif weighting == "ema":
        ages = torch.arange(n - 1, -1, -1, dtype=torch.float64)  # newest has age 0
        w = ema_alpha * (1.0 - ema_alpha) ** ages
    else:
        raise ValueError(f"unknown weighting {weighting!r}")
    return w / w.sum()


@dataclass
class ModuleStats:
    """Counts one module contributes to the merge statistics."""

    entries: int = 0
    """Entries of the merged delta."""
    voted: int = 0
    """Entries where at least one trimmed delta is non-zero."""
    conflicts: int = 0
    """Entries where the trimmed deltas hold both signs."""
    kept: int = 0
    """Non-zero entries of the merged delta."""
    merged_sq: float = 0.0
    ckpt_sq: list[float] = field(default_factory=list)
    """Squared Frobenius norm of each checkpoint's (untrimmed) delta."""

    def add(self, other: "ModuleStats") -> None:
        self.entries += other.entries
        self.voted += other.voted
        self.conflicts += other.conflicts
        self.kept += other.kept
        self.merged_sq += other.merged_sq
        if not self.ckpt_sq:
            self.ckpt_sq = [0.0] * len(other.ckpt_sq)
        self.ckpt_sq = [a + b for a, b in zip(self.ckpt_sq, other.ckpt_sq, strict=True)]

    def summary(self) -> dict[str, float]:
        mean_norm = sum(math.sqrt(s) for s in self.ckpt_sq) / max(len(self.ckpt_sq), 1)
        return {
            "sign_conflict_fraction": self.conflicts / self.voted if self.voted else 0.0,
            "kept_density": self.kept / self.entries if self.entries else 0.0,
            # ||tau_merged|| / mean_i ||tau_i||, Frobenius norms over all merged modules.
            "norm_ratio": math.sqrt(self.merged_sq) / mean_norm if mean_norm > 0 else 0.0,
            "merged_norm": math.sqrt(self.merged_sq),
            "mean_checkpoint_norm": mean_norm,
            "entries": self.entries,
        }


def trim_(flat_K_N: torch.Tensor, density: float) -> torch.Tensor:
    """In place: keep each row's top-`density` fraction by magnitude (k = int(density * N),
    as peft's `magnitude_based_pruning`), zero the rest.

    Entries tied with the k-th largest magnitude are all kept, so the result does not depend
    on the order of entries (a top-k sort keeps an arbitrary subset of such ties). Row by row,
    so the temporaries are one row, not the K x N stack.
    """
    import numpy as np
    import torch.nn.functional as F

    n = flat_K_N.shape[1]
    k = int(density * n)
    if k >= n:
        return flat_K_N
    if k <= 0:
        return flat_K_N.zero_()
    for row in flat_K_N:
        t = kth_largest(row.abs().unsqueeze(0), k).item()
        # keep |x| >= t, i.e. |x| > the next float below t: hardshrink is one fused pass
        # (a boolean mask costs several times more on CPU).
        below = np.nextafter(np.float32(t), np.float32(0)) if row.dtype == torch.float32 else np.nextafter(t, 0.0)
        row.copy_(F.hardshrink(row, max(float(below), 0.0)))
    return flat_K_N


def kth_largest(mag_K_N: torch.Tensor, k: int) -> torch.Tensor:
    """[K, 1]: the k-th largest value of each row (an exact selection, no sort).

    On CPU numpy's introselect (`np.partition`) is ~35x faster than `torch.kthvalue` (measured:
    0.06 s vs 2 s for a 2048x11008 row on 2 cores); on GPUs torch's own is fast.
    """
    n = mag_K_N.shape[1]
    if mag_K_N.device.type == "cpu":
        import numpy as np

        rows = [np.partition(r.numpy(), n - k)[n - k] for r in mag_K_N]
        return torch.from_numpy(np.array(rows)).to(mag_K_N.dtype).reshape(-1, 1)
    return mag_K_N.kthvalue(n - k + 1, dim=1, keepdim=True).values


def ties_merge(deltas_K: torch.Tensor, weights_K: torch.Tensor, density: float, scale: float = 1.0,
               stats: bool = True) -> tuple[torch.Tensor, ModuleStats]:
    """TIES-merge K deltas of one module. deltas_K [K, ...] (consumed: trimmed in place).

    Written for few passes over the K x N stack: the weighted sums over checkpoints are
    matrix-vector products (w @ stack), never K x N temporaries.
    """
    K = deltas_K.shape[0]
    shape = deltas_K.shape[1:]
    flat = deltas_K.reshape(K, -1)
    st = ModuleStats(entries=flat.shape[1])
    if stats:
        st.ckpt_sq = [float(x) ** 2 for x in torch.linalg.vector_norm(flat, dim=1)]
    trimmed = trim_(flat, density)
    w = weights_K.to(device=flat.device, dtype=flat.dtype)
    mass = w @ trimmed  # sum_i w_i trimmed_i
    elected = mass.sign()  # 0 where the weighted mass cancels exactly: nothing elected
    if stats:
        voted = torch.zeros_like(mass, dtype=torch.bool)
        for row in trimmed:
            voted |= row != 0
    # Float arithmetic only (boolean K x N masks are slow on CPU): side_i = trimmed_i * elected
    # is > 0 where checkpoint i agrees with the elected sign, < 0 where it disagrees.
    side = trimmed.mul_(elected)
    if stats:
        # Both signs among the kept values: one against the elected sign, or an exact cancel.
        conflict = (side.amin(0) < 0) | (voted & (elected == 0))
        st.voted, st.conflicts = int(voted.sum()), int(conflict.sum())
    den = torch.zeros_like(mass)  # sum_i w_i [agrees], row by row: no K x N temporary
    for wi, row in zip(w.tolist(), side, strict=True):
        den.add_(row.sign().clamp_(min=0), alpha=wi)
    num = (w @ side.clamp_(min=0)).mul_(elected)  # sum_i w_i trimmed_i [agrees]
    merged = torch.where(den > 0, num / den.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(num))
    merged = merged.mul_(scale).reshape(shape)
    if stats:
        st.kept = int(torch.count_nonzero(merged))
        st.merged_sq = float(torch.linalg.vector_norm(merged)) ** 2
    return merged, st


def linear_merge(deltas_K: torch.Tensor, weights_K: torch.Tensor, scale: float = 1.0,
                 stats: bool = True) -> tuple[torch.Tensor, ModuleStats]:
    K = deltas_K.shape[0]
    flat = deltas_K.reshape(K, -1)
    w = weights_K.to(device=flat.device, dtype=flat.dtype)
    merged = (w @ flat).mul_(scale).reshape(deltas_K.shape[1:])
    st = ModuleStats(entries=merged.numel())
    if stats:
        st.ckpt_sq = [float(x) ** 2 for x in torch.linalg.vector_norm(flat, dim=1)]
        pos, neg = (flat > 0).any(0), (flat < 0).any(0)
        st.voted, st.conflicts = int((pos | neg).sum()), int((pos & neg).sum())
        st.kept = int(torch.count_nonzero(merged))
        st.merged_sq = float(torch.linalg.vector_norm(merged)) ** 2
    return merged, st


@dataclass
class MergeResult:
    delta: dict[str, torch.Tensor]
    """The merged delta per base parameter name (fp32)."""
    stats: dict[str, float]
    seconds: float


def merge_adapters(adapters: Sequence[Adapter], weights: torch.Tensor, method: str = "ties",
                   density: float = 0.5, scale: float = 1.0, device: torch.device | str = "cpu",
                   out_device: torch.device | str = "cpu") -> MergeResult:
    """Merge the deltas of `adapters` (oldest -> newest, `weights` aligned) module by module.

    A module that some checkpoint does not train counts as a zero delta for it (no vote, no
    share of the mean).
    """
    t0 = time.perf_counter()
    if method not in ("ties", "linear"):
        raise ValueError(f"merge_adapters: method must be ties or linear, got {method!r}")
    if len(adapters) != len(weights):
        raise ValueError("one weight per adapter")
    names = sorted({n for a in adapters for n in a.factors})
    total = ModuleStats()
    out: dict[str, torch.Tensor] = {}
    for name in names:
        present = [a.factors.get(name) for a in adapters]
        shape = next(f for f in present if f is not None).delta_shape()
        deltas = torch.zeros((len(adapters),) + shape, dtype=torch.float32, device=device)
        for i, f in enumerate(present):
            if f is not None:
                f.delta_into(deltas[i])
        if method == "ties":
            merged, st = ties_merge(deltas, weights, density, scale)
        else:
            merged, st = linear_merge(deltas, weights, scale)
        del deltas
        out[name] = merged.to(out_device)
        total.add(st)
    stats = total.summary()
    stats.update({"modules": len(names), "checkpoints": len(adapters), "method": method})
    seconds = time.perf_counter() - t0
    stats["seconds"] = seconds
    return MergeResult(out, stats, seconds)
