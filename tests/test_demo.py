"""`gtr demo --quick` end to end (the demo's pipeline and its output contract) and a full
`gtr up` run with the trainer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


# Runs `gtr demo` with every env session the process opens recorded: its options and which of
# the pipeline's modules opened it (the vision warm-up, SFT-init, the trainer, the evaluation).
SPY = """
import json, sys, traceback
from shared import env_client
from shared.cli import main

log, argv = sys.argv[1], sys.argv[2:]
create = env_client.EnvClient.create

def spied(self, env_id, seed=None, options=None, **kw):
    stack = sorted({f.filename.rsplit('/', 1)[-1] for f in traceback.extract_stack() if '/services/' in f.filename})
    with open(log, 'a') as f:
        f.write(json.dumps({'env_id': env_id, 'options': options or {}, 'stack': stack}) + '\\n')
    return create(self, env_id, seed=seed, options=options, **kw)

env_client.EnvClient.create = spied
sys.exit(main(argv))
"""


def run_demo_spied(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, Path, list[dict]]:
    run, log = tmp_path / "demo", tmp_path / "sessions.jsonl"
    out = subprocess.run(
        [sys.executable, "-c", SPY, str(log), "demo", "--quick", "--run-dir", str(run),
         "--env-port", str(free_port()), "--teacher-port", str(free_port()), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out, run, [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # its subprocess bounds it; pytest's 600 s default killed it on a loaded 2-core box
def test_demo_quick_writes_the_contracted_outputs(tmp_path):
    """The default demo plays from pixels: warm-up -> SFT-init on the warmed-up base -> RL ->
    evaluation, with text_state off in every session but the warm-up's (its labels)."""
    out, run, sessions = run_demo_spied(tmp_path)
    s = json.loads((run / "summary.json").read_text())
    for key in ("success_before", "success_after", "episodes_before", "episodes_after", "env_id", "updates", "seconds"):
        assert key in s, key
    assert s["env_id"] == "numberline" and s["updates"] == 2
    assert s["env_options"]["text_state"] is False
    assert s["episodes_before"] == s["episodes_after"] == 4
    assert 0.0 <= s["success_before"] <= 1.0 and 0.0 <= s["success_after"] <= 1.0
    assert (run / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["update"] for r in rows] == [1, 2]
    # The adapter pushed after update 1 was merged: update 2 is guided by a newer teacher.
    assert rows[1]["teacher_version"] > rows[0]["teacher_version"]
    assert all(r["kl_mean"] is None or r["kl_mean"] >= 0 for r in rows)
    assert any((run / "samples").glob("*.jsonl"))
    assert "success rate" in out.stdout and "before RL" in out.stdout  # the printed table

    # The vision warm-up ran, and SFT-init started from its base (not from the random model).
    warm = s["vision_warmup"]
    assert warm is not None and warm["frames"] > 0 and 0.0 <= warm["heldout_field_accuracy"] <= 1.0
    assert warm["out"] == str(run / "models" / "warm-base")
    sft_cfg = yaml.safe_load((run / "models" / "sft-base" / "sft_config.yaml").read_text())
    assert sft_cfg["model"]["path"] == warm["out"]
    assert "vision_warmup" in s["seconds_by_phase"]

    # No label leaks into what the policy sees: the warm-up's sessions (its labels) are the only
    # ones with text_state on; SFT-init, the trainer and both evaluations open theirs with it off.
    by = {name: [x for x in sessions if name in x["stack"]]
          for name in ("warmup.py", "sft_init.py", "train.py", "evaluate.py")}
    assert all(by.values()), {k: len(v) for k, v in by.items()}
    assert all(x["options"].get("text_state") is True for x in by["warmup.py"])
    others = [x for x in sessions if "warmup.py" not in x["stack"]]
    assert others and all(x["options"].get("text_state") is False for x in others), others
    # ... and the prompts the trainer logged carry no state in their text.
    for f in (run / "samples").glob("*.jsonl"):
        for line in f.read_text().splitlines():
            prompt = json.loads(line)["prompt"]
            assert "The image shows the target" in prompt and "Target:" not in prompt, prompt


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_demo_text_state_keeps_the_older_demo(tmp_path):
    """`--text-state`: the state also in the text, no warm-up, SFT-init from the random model."""
    _, run, sessions = run_demo_spied(tmp_path, "--text-state", "--updates", "1", "--eval-episodes", "2")
    s = json.loads((run / "summary.json").read_text())
    assert s["env_options"]["text_state"] is True and s["vision_warmup"] is None
    assert not (run / "models" / "warm-base").exists()
    assert sessions and all(x["options"].get("text_state") is True for x in sessions)


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


@pytest.mark.parametrize("preset", ["demo.yaml", "experiment.yaml"])
def test_preset_token_budget_fits_every_expert_answer(tmp_path, preset):
    """Every NumberLine expert answer (what SFT-init teaches), with its end-of-turn token, fits
    the preset's generation and evaluation budgets on the small model's tokenizer: at 40 tokens
    every "... so I subtract one." answer (43) was cut off and scored as a format error."""
    from services.envs.numberline import NumberLineEnv
    from shared.models import load_processor
    from shared.tiny_model import build_tiny_model

    tok = load_processor(str(build_tiny_model(tmp_path / "small", seed=0, size="small"))).tokenizer
    env = NumberLineEnv()
    lengths = []
    for goal in range(6):
        for position in range(6):
            if goal != position:
                env.goal, env.position = goal, position
                lengths.append(len(tok(env.expert_info()["expert_answer"] + "<|im_end|>")["input_ids"]))
    raw = yaml.safe_load((ROOT / "configs" / preset).read_text())
    section = raw.get("demo") or raw.get("experiment")
    assert max(lengths) <= min(section["max_new_tokens"], raw["generation"]["max_new_tokens"]), max(lengths)
