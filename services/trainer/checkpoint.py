"""Resumable trainer checkpoints: adapter, value head, optimizer, scheduler, RNG states, counters.

Layout of `<run_dir>/checkpoint/`:
  adapter_model.safetensors, adapter_config.json   peft's files (also what the teacher takes)
  value_head.safetensors
  trainer_state.pt        optimizer + scheduler state, RNG states, counters (torch.load weights_only)
  sft_buffer.pt           the SFT replay buffer (sft guidance only)
Written to a temporary directory and renamed into place, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import logging
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

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


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoint"


def save_checkpoint(run_dir: str | Path, policy, optimizer, scheduler, counters: Counters,
                    sft_buffer=None) -> Path:
    final = checkpoint_dir(run_dir)
    tmp = final.with_name("checkpoint.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_adapter(tmp)
    save_file({k: v.detach().cpu().contiguous() for k, v in policy.value_head.state_dict().items()},
              str(tmp / "value_head.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
                "counters": asdict(counters)}, tmp / "trainer_state.pt")
    if sft_buffer is not None:
        torch.save(sft_buffer.state(), tmp / "sft_buffer.pt")
    old = final.with_name("checkpoint.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint saved at update %d: %s", counters.update, final)
    return final


def load_checkpoint(run_dir: str | Path, policy, optimizer, scheduler, sft_buffer=None) -> Counters:
    d = checkpoint_dir(run_dir)
    if not (d / "trainer_state.pt").exists():
        raise FileNotFoundError(f"nothing to resume: no checkpoint in {d}")
    policy.load_adapter_state(load_file(str(d / "adapter_model.safetensors"), device=str(policy.device)))
    policy.value_head.load_state_dict(load_file(str(d / "value_head.safetensors"), device=str(policy.device)))
    state = torch.load(d / "trainer_state.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    if sft_buffer is not None and (d / "sft_buffer.pt").exists():
        sft_buffer.load_state(torch.load(d / "sft_buffer.pt", weights_only=True))
    counters = Counters(**state["counters"])
    log.info("resumed from %s after update %d (%d env steps)", d, counters.update, counters.env_steps)
    return counters
