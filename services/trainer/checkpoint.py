"""Resumable trainer checkpoints: adapter, value head, optimizer, scheduler, RNG states, counters.

Layout of `<run_dir>/checkpoint/`:
  adapter_model.safetensors, adapter_config.json   peft's files (also what the teacher takes)
  value_head.safetensors
  trainer_state.pt        optimizer + scheduler state, RNG states (every rank's), world size, counters
                          (torch.load weights_only)
  sft_buffer.pt           the SFT replay buffer (sft guidance only); rank r > 0's in sft_buffer.rank{r}.pt
  checkpoint.json         the manifest, written last: the update and the files
Written to `checkpoint.tmp`, fsynced, given its manifest, then renamed into place (the previous one
moved to `checkpoint.old` first). A kill at any moment leaves at least one directory with a
manifest; `find_checkpoint` picks the newest and finishes the interrupted renames, so a resume
never retrains from update 1 because it was killed between the two renames.
Under data parallelism rank 0 writes it (weights and optimizer are the same on every rank); each
rank reads it back on resume (run_dir on a filesystem every node sees).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from services.trainer.distributed import Dist

log = logging.getLogger(__name__)


@dataclass
class Counters:
    update: int = 0
    """Updates completed."""
    env_steps: int = 0
    teacher_version: int | None = None


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                       *np_state[2:]],
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


MANIFEST = "checkpoint.json"


class CheckpointError(RuntimeError):
    """A checkpoint directory exists but holds no complete checkpoint: resuming would start over."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoint"


def _siblings(run_dir: str | Path) -> tuple[Path, Path, Path]:
    final = checkpoint_dir(run_dir)
    return final, final.with_name("checkpoint.tmp"), final.with_name("checkpoint.old")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _manifest_update(d: Path) -> int | None:
    """The update a complete checkpoint directory holds; None when it is incomplete. A directory
    named `checkpoint` from before manifests existed was only ever renamed there whole: -1."""
    try:
        return int(json.loads((d / MANIFEST).read_text())["update"])
    except FileNotFoundError:
        return -1 if d.name == "checkpoint" and (d / "trainer_state.pt").is_file() else None
    except (ValueError, KeyError, TypeError):
        return None


def find_checkpoint(run_dir: str | Path) -> Path | None:
    """The run's checkpoint directory, after finishing a save that was killed between its renames;
    None when the run has none. Raises CheckpointError when checkpoint directories exist but none
    is complete (a resume must not silently start over)."""
    final, tmp, old = _siblings(run_dir)
    present = [d for d in (final, tmp, old) if d.is_dir()]
    if not present:
        return None
    complete = {d: u for d in present if (u := _manifest_update(d)) is not None}
    if not complete:
        raise CheckpointError(f"{', '.join(map(str, present))} hold no complete checkpoint (no {MANIFEST}); "
                              "refusing to start over: move them away to train from scratch")
    best = max(complete, key=lambda d: (complete[d], d == final))
    if best != final:
        log.warning("finishing an interrupted checkpoint save: %s (update %d) becomes %s", best, complete[best], final)
        if final.is_dir():
            shutil.rmtree(old if best != old else final, ignore_errors=True)
            if best != old:
                final.rename(old)
        best.rename(final)
    for d in (tmp, old):
        shutil.rmtree(d, ignore_errors=True)
    return final


def save_checkpoint(run_dir: str | Path, policy, optimizer, scheduler, counters: Counters,
                    sft_buffer=None, dist: Dist | None = None) -> Path:
    """Collective under data parallelism: every rank calls it; rank 0 writes."""
    dist = dist or Dist()
    rngs = dist.all_gather_object(rng_state(), "checkpoint RNG states")
    buffers = dist.all_gather_object(sft_buffer.state() if sft_buffer is not None else None, "checkpoint SFT buffers")
    final, tmp, old = _siblings(run_dir)
    if not dist.is_main:
        return final
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_adapter(tmp)
    save_file({k: v.detach().cpu().contiguous() for k, v in policy.value_head.state_dict().items()},
              str(tmp / "value_head.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rngs[0],
                "rng_ranks": rngs, "world_size": dist.world_size, "counters": asdict(counters)},
               tmp / "trainer_state.pt")
    for r, buf in enumerate(buffers):
        if buf is not None:
            torch.save(buf, tmp / ("sft_buffer.pt" if r == 0 else f"sft_buffer.rank{r}.pt"))
    files = sorted(p.name for p in tmp.iterdir())
    for name in files:
        _fsync(tmp / name)
    # The manifest last: a directory without one is a save that did not finish.
    (tmp / MANIFEST).write_text(json.dumps({"update": counters.update, "files": files}))
    _fsync(tmp / MANIFEST)
    _fsync(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint saved at update %d: %s", counters.update, final)
    return final


class ResumeError(ValueError):
    """The checkpoint cannot continue this run (another world size)."""


def load_checkpoint(run_dir: str | Path, policy, optimizer, scheduler, sft_buffer=None,
                    dist: Dist | None = None) -> Counters:
    dist = dist or Dist()
    d = find_checkpoint(run_dir) if dist.is_main else checkpoint_dir(run_dir)
    if d is None or not (d / "trainer_state.pt").exists():
        raise FileNotFoundError(f"nothing to resume: no checkpoint in {checkpoint_dir(run_dir)}")
    state = torch.load(d / "trainer_state.pt", weights_only=True, map_location="cpu")
    saved_world = int(state.get("world_size", 1))
    if saved_world != dist.world_size:
        # Each rank drives its share of the envs and holds its own RNG and replay buffer: another
        # world size would not continue the same run.
        raise ResumeError(f"{d} was written by {saved_world} rank(s) but this run has {dist.world_size}: resume "
                          f"with the same number of processes (torchrun --nproc-per-node / gtr train --nproc "
                          f"{saved_world}), or start a new run_dir")
    policy.load_adapter_state(load_file(str(d / "adapter_model.safetensors"), device=str(policy.device)))
    policy.value_head.load_state_dict(load_file(str(d / "value_head.safetensors"), device=str(policy.device)))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng_ranks"][dist.rank] if "rng_ranks" in state else state["rng"])
    buf = d / ("sft_buffer.pt" if dist.rank == 0 else f"sft_buffer.rank{dist.rank}.pt")
    if sft_buffer is not None and buf.exists():
        sft_buffer.load_state(torch.load(buf, weights_only=True))
    counters = Counters(**state["counters"])
    log.info("resumed from %s after update %d (%d env steps)", d, counters.update, counters.env_steps)
    return counters
