"""Data parallelism on torch.distributed (DESIGN §4 "Data parallel"), launched by torchrun.

    torchrun --nproc-per-node N -m services.trainer --config FILE     (or: gtr train --nproc N)

The process group comes from the environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, ...):
NCCL on CUDA, gloo on CPU, and nothing else differs between the two. Without torchrun (or with
one process) there is no process group and every collective here is the identity, so the same
code runs at world size 1.

Every collective is named: when another rank dies or hangs, the survivors fail with a message
that says which collective, which rank and what to look at, instead of hanging (the process
group's timeout, `distributed.timeout_s`, bounds the wait).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as tdist

log = logging.getLogger(__name__)


class DistributedError(RuntimeError):
    """A collective failed or timed out: another rank died or hung."""


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    """None: no process group (one process)."""
    timeout_s: float = 600.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def comm_device(self) -> torch.device:
        """Where collective tensors live: NCCL only moves CUDA tensors."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def shard(self, total: int, what: str) -> tuple[int, int]:
        """(first, count) of this rank's contiguous share of `total` items; they must divide."""
        if total % self.world_size:
            raise ValueError(f"{what}={total} does not divide over {self.world_size} ranks: set it to a multiple of "
                             f"{self.world_size} (each rank drives {what} / world size)")
        n = total // self.world_size
        return self.rank * n, n

    # ------------------------------------------------------------------ collectives

    def _fail(self, what: str, e: BaseException) -> DistributedError:
        return DistributedError(
            f"rank {self.rank}/{self.world_size}: the collective '{what}' failed ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Another rank died or hung longer than "
            f"distributed.timeout_s={self.timeout_s:g}s; its log says why. Stopping this rank too "
            f"(resume from the last checkpoint with --resume and the same number of ranks).")

    def all_reduce(self, t: torch.Tensor, what: str, op: str = "sum") -> torch.Tensor:
        """In place over ranks (sum or max); returns `t`. The identity at world size 1."""
        if not self.active:
            return t
        red = {"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX}[op]
        dev = self.comm_device
        buf = t if t.device == dev else t.to(dev)
        try:
            tdist.all_reduce(buf, op=red)
        except Exception as e:  # noqa: BLE001 - gloo and NCCL raise several types; all mean the same here
            raise self._fail(what, e) from e
        if buf is not t:
            t.copy_(buf)
        return t

    def all_gather_object(self, obj: Any, what: str) -> list[Any]:
        """Every rank's `obj` (picklable, small: metrics, RNG states), in rank order. Only between
        our own processes; never for anything from the network."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        try:
            tdist.all_gather_object(out, obj)
        except Exception as e:  # noqa: BLE001
            raise self._fail(what, e) from e
        return out

    def any(self, flags: Sequence[bool], what: str) -> list[bool]:
        """Each flag OR-ed over ranks (a stop or checkpoint request that reached one rank)."""
        t = torch.tensor([float(f) for f in flags], dtype=torch.float32)
        return [bool(v) for v in self.all_reduce(t, what, op="max").tolist()]

    def sum(self, values: Sequence[float], what: str) -> list[float]:
        t = torch.tensor(list(values), dtype=torch.float64)
        return self.all_reduce(t, what).tolist()

    def barrier(self, what: str) -> None:
        self.all_reduce(torch.zeros(1), what)

    def data_parallel(self, module: torch.nn.Module) -> torch.nn.Module:
        """`module` wrapped in PyTorch's DistributedDataParallel over its trainable parameters
        (LoRA and value head); `module` itself at world size 1.

        Frozen parameters and buffers are left out of DDP (no start-up broadcast of the base, no
        buffer sync: every rank loaded the same base). `find_unused_parameters`: a forward need not
        reach every adapter (the vision tower's LoRA only sees items with an image, the value head
        not the SFT loss). The caller runs the same number of forward + backward passes per
        optimizer step on every rank (`ppo_update` pads with zero-weight ones) and scales each
        rank's loss so that DDP's mean over ranks is the global minibatch's mean."""
        if not self.active:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
        DDP._set_params_and_buffers_to_ignore_for_model(module, frozen + [n for n, _ in module.named_buffers()])
        try:
            return DDP(module, device_ids=[self.local_rank] if self.backend == "nccl" else None,
                       broadcast_buffers=False, find_unused_parameters=True)
        except Exception as e:  # noqa: BLE001 - its start-up collectives (shape check, broadcast)
            raise self._fail("DDP set-up", e) from e

    def backward(self, loss: torch.Tensor, what: str) -> None:
        """`loss.backward()`; under DDP outside `no_sync` its gradient reduction runs in there, so
        a dead peer surfaces here and is named like any collective."""
        if not self.active:
            loss.backward()
            return
        try:
            loss.backward()
        except DistributedError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._fail(what, e) from e

    def close(self) -> None:
        if self.active and tdist.is_initialized():
            tdist.destroy_process_group()


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def init_from_env(device: str = "auto", timeout_s: float = 600.0) -> Dist:
    """The process group torchrun describes in the environment; Dist() without torchrun or at
    world size 1. `device` (model.device) picks the backend: NCCL for CUDA, gloo for CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(timeout_s=timeout_s)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local_rank)
    if not tdist.is_initialized():
        kw: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
        if cuda:
            kw["device_id"] = torch.device("cuda", local_rank)
        tdist.init_process_group(**kw)
    d = Dist(rank=rank, world_size=world, local_rank=local_rank, backend=backend, timeout_s=timeout_s)
    log.info("rank %d/%d (local %d) joined the %s process group", rank, world, local_rank, backend)
    return d


def rank_device(device: str, d: Dist) -> str:
    """model.device for this rank: each rank takes its own GPU (cuda:LOCAL_RANK)."""
    if d.backend == "nccl" and device in ("auto", "cuda"):
        return f"cuda:{d.local_rank}"
    return device


def global_moments(x: torch.Tensor, d: Dist, what: str = "advantage moments") -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased std) of `x` over all ranks' samples: explicit sums in fp64, two passes
    (sum and count, then the squared deviations), so the result does not depend on how the
    samples are split over ranks beyond float rounding. Std is 0 for fewer than 2 samples."""
    s = d.all_reduce(torch.tensor([float(x.double().sum()), float(x.numel())], dtype=torch.float64), what)
    n = s[1]
    mean = s[0] / n
    ss = d.all_reduce(torch.tensor([float(((x.double() - mean) ** 2).sum())], dtype=torch.float64), what)[0]
    std = torch.sqrt(ss / (n - 1)) if n > 1 else torch.zeros((), dtype=torch.float64)
    return mean.to(x.dtype), std.to(x.dtype)


def reduce_metrics(per_rank: list[dict[str, Any]], sums: Sequence[str] = (), maxes: Sequence[str] = ()) -> dict[str, Any]:
    """One metrics dict from every rank's: keys in `sums` summed, in `maxes` the maximum, other
    numbers the mean over the ranks that have them; anything else (strings, None) rank 0's."""
    out: dict[str, Any] = {}
    for k in dict.fromkeys(k for m in per_rank for k in m):
        vals = [m[k] for m in per_rank if k in m]
        nums = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if not nums or len(nums) != len(vals):
            out[k] = per_rank[0].get(k, vals[0])
        elif k in sums:
            out[k] = sum(nums)
        elif k in maxes:
            out[k] = max(nums)
        else:
            out[k] = float(sum(nums) / len(nums))
    return out
