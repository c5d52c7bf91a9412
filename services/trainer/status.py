"""What the training loop shares with the trainer's HTTP service: status, Prometheus gauges,
and the stop / checkpoint requests. No FastAPI here; the app only reads and signals."""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from shared.schemas import TrainerStatus


class StatusBoard:
    def __init__(self, updates_total: int, run_dir: str, guidance: str):
        self._lock = threading.Lock()
        self._status = TrainerStatus(phase="starting", update=0, updates_total=updates_total, env_steps=0,
                                     run_dir=run_dir, guidance=guidance)
        self.stop_requested = threading.Event()
        self.checkpoint_requested = threading.Event()
        self.checkpoint_done = threading.Condition()
        self.checkpoints_saved = 0
        self.loop_alive = threading.Event()
        self.registry = CollectorRegistry()
        r = self.registry
        self.g_update = Gauge("gtr_trainer_update", "PPO updates completed", registry=r)
        self.g_env_steps = Gauge("gtr_trainer_env_steps", "env steps so far", registry=r)
        self.g_success = Gauge("gtr_trainer_success_rate", "success rate of the last update's episodes", registry=r)
        self.g_return = Gauge("gtr_trainer_mean_return", "mean episode return of the last update", registry=r)
        self.g_format = Gauge("gtr_trainer_format_ok_rate", "share of format-valid outputs in the last update", registry=r)
        self.g_kl = Gauge("gtr_trainer_kl_mean", "mean thought KL to the teacher in the last update", registry=r)
        self.g_teacher = Gauge("gtr_trainer_teacher_version", "teacher version that guided the last update", registry=r)
        self.g_seconds = Gauge("gtr_trainer_phase_seconds", "seconds of the last update per phase", ["phase"], registry=r)
        self.c_unavailable = Counter("gtr_trainer_teacher_unavailable", "updates that ran without teacher guidance",
                                     registry=r)

    def status(self) -> TrainerStatus:
        with self._lock:
            return self._status.model_copy(deep=True)

    def set_phase(self, phase: str) -> None:
        with self._lock:
            self._status.phase = phase

    def record(self, metrics: dict[str, Any]) -> None:
        def num(k):
            v = metrics.get(k)
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

        with self._lock:
            s = self._status
            s.update, s.env_steps = int(metrics["update"]), int(metrics["env_steps"])
            s.success_rate, s.mean_return = num("success_rate"), num("mean_return")
            s.teacher_version = metrics.get("teacher_version")
            s.last_metrics = dict(metrics)
        self.g_update.set(s.update)
        self.g_env_steps.set(s.env_steps)
        for g, k in ((self.g_success, "success_rate"), (self.g_return, "mean_return"), (self.g_format, "format_ok_rate"),
                     (self.g_kl, "kl_mean"), (self.g_teacher, "teacher_version")):
            if num(k) is not None:
                g.set(num(k))
        for phase in ("rollout", "teacher", "ppo"):
            if num(f"seconds_{phase}") is not None:
                self.g_seconds.labels(phase=phase).set(num(f"seconds_{phase}"))
        if metrics.get("teacher/unavailable"):
            self.c_unavailable.inc()

    def request_checkpoint(self, timeout: float) -> bool:
        """Ask the loop to save at its next safe point; wait for it (True when saved)."""
        with self.checkpoint_done:
            before = self.checkpoints_saved
            self.checkpoint_requested.set()
            return self.checkpoint_done.wait_for(lambda: self.checkpoints_saved > before, timeout=timeout)

    def checkpoint_saved(self) -> None:
        with self.checkpoint_done:
            self.checkpoints_saved += 1
            self.checkpoint_requested.clear()
            self.checkpoint_done.notify_all()
