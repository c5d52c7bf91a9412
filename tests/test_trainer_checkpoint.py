"""Trainer checkpoints survive a kill at any moment of a save (issue 11 §5): a real process with the
tiny model's policy is SIGKILLed inside `save_checkpoint`, and the resume picks up the newest
complete checkpoint; a resume never starts over when checkpoint directories exist."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.trainer.checkpoint import MANIFEST, CheckpointError, find_checkpoint, load_checkpoint
from services.trainer.config import ModelSettings, TrainConfig

ROOT = Path(__file__).resolve().parents[1]

# Saves update 1, changes the weights, then saves update 2 and is SIGKILLed at KILL_AT:
# "manifest" (files written, manifest not yet) or "second-rename" (the previous checkpoint already
# moved to checkpoint.old, the new one not yet renamed into place).
SAVER = r"""
import os, signal, sys
from pathlib import Path
import torch
from services.trainer.checkpoint import Counters, MANIFEST, save_checkpoint
from services.trainer.config import ModelSettings, TrainConfig
from services.trainer.policy import Policy
from services.trainer.ppo import make_optimizer

model, run, kill_at = sys.argv[1:4]
pol = Policy(model, ModelSettings(device="cpu", lora={"dropout": 0.0, "r": 4}), seed=0)
opt, sched = make_optimizer(pol, TrainConfig())
save_checkpoint(run, pol, opt, sched, Counters(update=1, env_steps=10))
with torch.no_grad():
    for p in pol.value_head.parameters():
        p.add_(1.0)
real_rename, real_write = Path.rename, Path.write_text

def rename(self, target):
    if kill_at == "second-rename" and self.name == "checkpoint.tmp":
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rename(self, target)

def write_text(self, *a, **k):
    if kill_at == "manifest" and self.name == MANIFEST:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_write(self, *a, **k)

Path.rename, Path.write_text = rename, write_text
save_checkpoint(run, pol, opt, sched, Counters(update=2, env_steps=20))
"""


def fresh(model_dir):
    from services.trainer.policy import Policy
    from services.trainer.ppo import make_optimizer

    pol = Policy(model_dir, ModelSettings(device="cpu", lora={"dropout": 0.0, "r": 4}), seed=0)
    return (pol, *make_optimizer(pol, TrainConfig()))


@pytest.mark.parametrize("kill_at, expected", [("second-rename", 2), ("manifest", 1)])
def test_a_save_killed_midway_resumes_from_the_newest_complete_checkpoint(tmp_path, tiny_model_dir, kill_at, expected):
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-c", SAVER, str(tiny_model_dir), str(run), kill_at], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    if kill_at == "second-rename":  # the moment the issue describes: no `checkpoint` directory at all
        assert not (run / "checkpoint").exists()
        assert (run / "checkpoint.old").is_dir() and (run / "checkpoint.tmp").is_dir()

    pol, opt, sched = fresh(tiny_model_dir)
    initial = {k: v.clone() for k, v in pol.value_head.state_dict().items()}
    counters = load_checkpoint(run, pol, opt, sched)
    assert (counters.update, counters.env_steps) == (expected, 10 * expected)
    shift = 1.0 if expected == 2 else 0.0
    for k, v in pol.value_head.state_dict().items():
        torch.testing.assert_close(v, initial[k] + shift)
    # the interrupted save is finished: one `checkpoint` directory, with its manifest
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint"]
    assert json.loads((run / "checkpoint" / MANIFEST).read_text())["update"] == expected
    assert load_file(str(run / "checkpoint" / "adapter_model.safetensors"))  # peft's files still in place


def test_resume_refuses_to_start_over_when_no_checkpoint_is_complete(tmp_path, tiny_model_dir):
    """Through the real `train()`: only an unfinished save on disk is an error, not a fresh start."""
    from services.trainer.train import train

    run = tmp_path / "run"
    (run / "checkpoint.tmp").mkdir(parents=True)
    (run / "checkpoint.tmp" / "trainer_state.pt").write_bytes(b"half")
    cfg = TrainConfig(model={"path": str(tiny_model_dir), "device": "cpu"}, run_dir=str(run), resume=True,
                      env={"url": "http://127.0.0.1:9"}, logging={"tensorboard": False})
    with pytest.raises(CheckpointError, match="refusing to start over"):
        train(cfg)
    assert (run / "checkpoint.tmp" / "trainer_state.pt").read_bytes() == b"half"  # left for the user
    assert find_checkpoint(tmp_path / "empty") is None  # no directory at all: a fresh start is fine
