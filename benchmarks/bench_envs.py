"""Points24 steps per second: in process vs through the env service with 32 sessions batched.

Both sides play the same seeded action stream (random tokens in the JSON answer format, so
many are penalised, as early in training) over 32 envs, restarting finished episodes. In
process: `env.step` (parse, rules, expert plan) and the drawn PIL image of every observation. Service:
`EnvClient.step_batch(..., auto_reset=True)` over HTTP to `gtr env serve` in its own process with
its default env worker processes (min(4, CPUs)): the same steps, PNG + base64 instead of the
drawn image, JSON both ways and response parsing on the client. Reference lines: the in-process
loop also encoding every frame as PNG, and the service with `--procs 0` (envs in the service
process).

The sides alternate in short rounds so that load from other processes hits them alike
(measured in one run, reported as ratios). Target: the service keeps >= 50% of in-process.
CPU seconds are reported beside wall time (service: client + server process + its worker
processes), as steps per CPU-second, which a busy machine disturbs less than throughput.

Under "png_encoders": the plain PNG encoder the service uses against the hand-written chunk
splicing it used before (benchmarks/png_splice.py), on the same Points24 frames, per step and per
32-step batch, beside what a rollout step of the CPU demo costs (from bench-results/trainer.json
when the trainer benchmark has run; issue 16.4 decided on these figures).

A further figure, under "alfworld": 8 ALFWorld sessions (bundled games, expert actions) batched
through the service with its worker processes vs `--procs 0`, alternating likewise.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

N_SESSIONS = 32
SECONDS = float(os.environ.get("GTR_BENCH_SECONDS", 6.0))  # per side, split into rounds
ROUNDS = 12
ALFWORLD_SECONDS = float(os.environ.get("GTR_BENCH_ALFWORLD_SECONDS", 8.0))  # per side
TARGET_RATIO = 0.5


def _actions(seed: int):
    from services.envs.cardgames import Points24Env

    vocab = Points24Env().actions()
    rng = random.Random(seed)
    while True:
        yield json.dumps({"thoughts": "benchmark", "action": rng.choice(vocab)})


class InProcess:
    def __init__(self, encode: bool):
        from services.envs.cardgames import Points24Env

        self.encode = encode
        self.envs = [Points24Env() for _ in range(N_SESSIONS)]
        for i, e in enumerate(self.envs):
            e.reset(seed=i)
        self.actions = _actions(0)
        self.steps, self.seconds, self.cpu = 0, 0.0, 0.0

    def run(self, seconds: float) -> None:
        from services.envs.render import to_png_b64

        c0 = time.process_time()
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for e in self.envs:
                r = e.step(next(self.actions))
                r.observation.image  # what an in-process consumer uses: the drawn frame (drawn on access)
                if self.encode:  # the encoder the service uses (without its per-frame cache)
                    to_png_b64(r.observation.image)
                self.steps += 1
                if r.terminated or r.truncated:
                    e.reset()[0].image
        self.seconds += time.perf_counter() - t0
        self.cpu += time.process_time() - c0

    def figures(self) -> dict:
        return {"steps": self.steps, "seconds": round(self.seconds, 3), "steps_per_s": round(self.steps / self.seconds, 1),
                "cpu_seconds": round(self.cpu, 3), "steps_per_cpu_s": round(self.steps / max(self.cpu, 1e-9), 1)}


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of another process and its children (the env worker
    processes), from Linux /proc; 0 where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except (OSError, ValueError, IndexError):
        return 0.0
    return own + sum(_proc_cpu(int(c)) for c in children)


class ThroughService:
    """Batched steps against a served env: Points24 with the random stream, or (`env_id=
    "alfworld"`) each session playing its expert's action."""

    def __init__(self, procs: int | None = None, env_id: str = "points24", sessions: int = N_SESSIONS):
        from shared.env_client import EnvClient

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        root = Path(__file__).resolve().parents[1]
        flags = [] if procs is None else ["--procs", str(procs)]  # default: min(4, CPUs) worker processes
        self.proc = subprocess.Popen([sys.executable, "-m", "services.envs", "--port", str(port), *flags], cwd=root,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = EnvClient(f"http://127.0.0.1:{port}", retries=0, timeout=300)
        self.client.wait_ready(60)
        created = [self.client.create(env_id, seed=i) for i in range(sessions)]
        self.sids = [c.session_id for c in created]
        self.expert = {c.session_id: c.info["expert_action"] for c in created} if env_id == "alfworld" else None
        self.actions = _actions(0)
        self.steps, self.batches, self.resets, self.seconds, self.cpu = 0, 0, 0, 0.0, 0.0

    def run(self, seconds: float) -> None:
        c0 = time.process_time() + _proc_cpu(self.proc.pid)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            if self.expert is None:
                batch = [(sid, next(self.actions)) for sid in self.sids]
            else:
                batch = [(sid, json.dumps({"thoughts": "", "action": self.expert[sid] or "look"})) for sid in self.sids]
            out = self.client.step_batch(batch, auto_reset=True)
            for sid, res in zip(self.sids, out):
                if res.error is not None:
                    raise RuntimeError(f"step failed: {res.error}")
                self.resets += res.reset is not None
                if self.expert is not None:
                    self.expert[sid] = (res.reset.info if res.reset is not None else res.info)["expert_action"]
            self.steps += len(out)
            self.batches += 1
        self.seconds += time.perf_counter() - t0
        self.cpu += time.process_time() + _proc_cpu(self.proc.pid) - c0

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(10)

    def figures(self) -> dict:
        return {"steps": self.steps, "batches": self.batches, "resets": self.resets, "seconds": round(self.seconds, 3),
                "steps_per_s": round(self.steps / self.seconds, 1), "cpu_seconds": round(self.cpu, 3),
                "steps_per_cpu_s": round(self.steps / max(self.cpu, 1e-9), 1)}


def run(out_dir: Path) -> dict:
    from services.envs.formula import solutions

    solutions.cache_clear()  # the service process starts cold too
    service, service0 = ThroughService(), ThroughService(procs=0)
    local, local_png = InProcess(encode=False), InProcess(encode=True)
    try:
        for _ in range(ROUNDS):
            for side in (service, local, local_png, service0):
                side.run(SECONDS / ROUNDS)
    finally:
        service.close()
        service0.close()
    s, l, lp, s0 = service.figures(), local.figures(), local_png.figures(), service0.figures()
    ratio = s["steps_per_s"] / l["steps_per_s"]
    return {**_points24(s, l, lp, s0, ratio), "png_encoders": png_encoders(out_dir), "alfworld": _alfworld()}


DEMO_SESSIONS, DEMO_STEPS = 8, 10
"""tiny-cpu's rollout (the CPU demo): 8 sessions x 10 steps per update."""


def _demo_rollout_ms_per_step(out_dir: Path) -> float | None:
    """The CPU demo's rollout milliseconds per env step, from the trainer benchmark's figures
    (bench-results/trainer.json, guidance none) when a run left them; else None."""
    try:
        figures = json.loads((out_dir / "trainer.json").read_text())
        return 1e3 * figures["seconds_per_update"]["none"]["rollout"] / DEMO_STEPS
    except (OSError, ValueError, KeyError, TypeError):
        return None


def png_encoders(out_dir: Path, seconds: float = 3.0) -> dict:
    """Plain encoder (`render.to_png_b64`, what `wire` does on a cache miss) vs the splicing
    reference, alternating on one seeded stream of Points24 frames (32 envs, random actions)."""
    from benchmarks.png_splice import split_png_b64
    from services.envs.cardgames import Points24Env
    from services.envs.render import bare_table, to_png_b64
    from shared.codecs import b64_to_image

    envs = [Points24Env() for _ in range(N_SESSIONS)]
    for i, e in enumerate(envs):
        e.reset(seed=i)
    actions = _actions(1)
    first = envs[0].step(next(actions)).observation  # the reference still makes the same pixels
    e0 = envs[0]
    spliced = split_png_b64((tuple(e0.cards), e0.target), bare_table(tuple(e0.cards), e0.target), tuple(e0.formula),
                            first._draw)
    if b64_to_image(spliced).tobytes() != b64_to_image(to_png_b64(first.image)).tobytes():
        raise AssertionError("benchmarks/png_splice.py no longer gives the rendered pixels")
    timing = {"plain": [0.0, 0], "splice": [0.0, 0]}
    t_end = time.perf_counter() + seconds * 2
    while time.perf_counter() < t_end:
        for e in envs:
            r = e.step(next(actions))
            draw, table, formula = r.observation._draw, (tuple(e.cards), e.target), tuple(e.formula)
            for name in ("plain", "splice") if timing["plain"][1] % 2 else ("splice", "plain"):
                t0 = time.perf_counter()  # each draws the frame itself: the splice only on a strip miss
                if name == "plain":
                    to_png_b64(draw())
                else:
                    split_png_b64(table, bare_table(*table), formula, draw)
                timing[name][0] += time.perf_counter() - t0
                timing[name][1] += 1
            if r.terminated or r.truncated:
                e.reset()
    ms = {k: 1e3 * t / max(n, 1) for k, (t, n) in timing.items()}
    saved_batch_ms = (ms["plain"] - ms["splice"]) * N_SESSIONS
    saved_demo_ms = (ms["plain"] - ms["splice"]) * DEMO_SESSIONS
    demo = _demo_rollout_ms_per_step(out_dir)
    return {"benchmark": "PNG per Points24 frame: plain encoder vs chunk splicing (same frames, alternating)",
            "frames": timing["plain"][1], "plain_ms_per_frame": round(ms["plain"], 4),
            "splice_ms_per_frame": round(ms["splice"], 4), "splice_over_plain": round(ms["splice"] / ms["plain"], 3),
            "splice_saves_ms_per_32_step_batch": round(saved_batch_ms, 2),
            "splice_saves_ms_per_demo_step": round(saved_demo_ms, 2),
            "demo_rollout_ms_per_step": demo and round(demo, 1),
            "splice_saves_share_of_demo_rollout_step": demo and round(saved_demo_ms / demo, 4)}


def _alfworld() -> dict:
    """ALFWorld (bundled games, expert actions), 8 sessions batched: worker processes vs `--procs
    0`. Within a process the engine takes one call at a time (its parser keeps module state)."""
    from services.envs.alfworld_env import alfworld_status

    if not alfworld_status()[0]:
        return {"skipped": "alfworld is not installed"}
    sides = {"default_procs": ThroughService(env_id="alfworld", sessions=8),
             "procs0": ThroughService(procs=0, env_id="alfworld", sessions=8)}
    try:
        for _ in range(4):
            for side in sides.values():
                side.run(ALFWORLD_SECONDS / 4)
    finally:
        for side in sides.values():
            side.close()
    f = {name: side.figures() for name, side in sides.items()}
    return {"benchmark": "alfworld steps/s, 8 sessions, batched, expert actions", **f,
            "default_over_procs0": round(f["default_procs"]["steps_per_s"] / f["procs0"]["steps_per_s"], 3)}


def _points24(s: dict, l: dict, lp: dict, s0: dict, ratio: float) -> dict:
    return {
        "benchmark": "points24 steps/s, in process vs env service (32 sessions, batched step, auto_reset)",
        "in_process": l,
        "in_process_with_png": lp,
        "service_batched": s,
        "service_batched_procs0": s0,
        "service_over_in_process": round(ratio, 3),
        "service_over_in_process_with_png": round(s["steps_per_s"] / lp["steps_per_s"], 3),
        "service_over_in_process_per_cpu_s": round(s["steps_per_cpu_s"] / l["steps_per_cpu_s"], 3),
        "service_procs0_over_in_process": round(s0["steps_per_s"] / l["steps_per_s"], 3),
        "target": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        "sessions": N_SESSIONS,
        "service_procs": min(4, os.cpu_count() or 1),
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


if __name__ == "__main__":
    print(json.dumps(run(Path("bench-results")), indent=2))
