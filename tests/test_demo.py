"""`gtr demo --quick` end to end (the demo's pipeline and its output contract) and a full
`gtr up` run with the trainer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_quick_writes_the_contracted_outputs(tmp_path):
    run = tmp_path / "demo"
    out = subprocess.run(
        [sys.executable, "-m", "shared.cli", "demo", "--quick", "--run-dir", str(run),
         "--env-port", str(free_port()), "--teacher-port", str(free_port())],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    s = json.loads((run / "summary.json").read_text())
    for key in ("success_before", "success_after", "episodes_before", "episodes_after", "env_id", "updates", "seconds"):
        assert key in s, key
    assert s["env_id"] == "numberline" and s["updates"] == 2
    assert s["episodes_before"] == s["episodes_after"] == 8
    assert 0.0 <= s["success_before"] <= 1.0 and 0.0 <= s["success_after"] <= 1.0
    assert (run / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["update"] for r in rows] == [1, 2]
    # The adapter pushed after update 1 was merged: update 2 is guided by a newer teacher.
    assert rows[1]["teacher_version"] > rows[0]["teacher_version"]
    assert all(r["kl_mean"] is None or r["kl_mean"] >= 0 for r in rows)
    assert any((run / "samples").glob("*.jsonl"))
    assert "success rate" in out.stdout and "before RL" in out.stdout  # the printed table


@pytest.mark.slow
def test_gtr_up_runs_a_training_job_to_the_end(tmp_path, tiny_model_dir):
    """The three services as local processes; the trainer runs one update and exits 0."""
    out = subprocess.run(
        [sys.executable, "-m", "shared.cli", "up", "--model", str(tiny_model_dir), "--device", "cpu",
         "--run-dir", str(tmp_path), "--env-port", str(free_port()), "--teacher-port", str(free_port()),
         "--trainer-port", str(free_port()), "--ready-timeout", "120",
         "--set", "updates=1", "env.num_envs=2", "env.num_steps=2", "logging.progress=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = (tmp_path / "trainer" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["update"] == 1
    assert {p.name for p in (tmp_path / "logs").iterdir()} == {"envs.log", "teacher.log", "trainer.log"}
