"""`gtr train`: the multi-turn LoRA-PPO loop, guided by the merged teacher (KL or SFT).

One update, in order: roll out num_envs x num_steps steps; ask the teacher (KL log-probs or
SFT thoughts); build advantages (GAE, KL shaping, normalisation); PPO epochs; push the adapter
to the teacher; log; checkpoint. Each update seeds its own RNGs from (seed, update), so a
resumed run is bit-identical to a straight one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from services.trainer.checkpoint import Counters, checkpoint_dir, load_checkpoint, save_checkpoint
from services.trainer.config import TrainConfig
from services.trainer.envpool import EnvPool
from services.trainer.guidance import ReplayBuffer, TeacherLink, kl_guidance, push_adapter, sft_guidance
from services.trainer.metrics import MetricsWriter, write_samples
from services.trainer.policy import Policy
from services.trainer.ppo import build_batch, make_optimizer, ppo_update
from services.trainer.rollout import collect, derive_seed, rollout_metrics
from services.trainer.status import StatusBoard
from shared.config import dump_config
from shared.models import tokenizer_fingerprint

log = logging.getLogger(__name__)


def train(cfg: TrainConfig, board: StatusBoard | None = None) -> dict[str, Any]:
    """Run (or resume) a training job; returns a summary. Metrics go to <run_dir>/metrics.jsonl."""
    if not cfg.model.path:
        raise ValueError("model.path is not set (the base model directory)")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    board = board or StatusBoard(cfg.updates, str(run_dir), cfg.guidance.mode)
    server = None
    if cfg.trainer.port:
        from services.trainer.app import ServerThread, create_app

        server = ServerThread(create_app(board), cfg.trainer.host, cfg.trainer.port).start()
        log.info("trainer service on http://%s:%d (/v1/status, /metrics)", cfg.trainer.host, cfg.trainer.port)
    board.loop_alive.set()
    policy = pool = link = writer = None
    try:
        policy = Policy(cfg.model.path, cfg.model, seed=cfg.seed)
        optimizer, scheduler = make_optimizer(policy, cfg)
        sft_buffer = ReplayBuffer(cfg.guidance.sft_buffer_size) if cfg.guidance.mode == "sft" else None
        counters = Counters()
        writer = MetricsWriter(run_dir, cfg.logging.tensorboard)
        if cfg.resume and (checkpoint_dir(run_dir) / "trainer_state.pt").exists():
            counters = load_checkpoint(run_dir, policy, optimizer, scheduler, sft_buffer)
            writer.truncate_after(counters.update)
        elif cfg.resume:
            log.warning("resume requested but %s has no checkpoint: starting fresh", checkpoint_dir(run_dir))
        pool = EnvPool(cfg.env.url, cfg.env.env_id, cfg.env.num_envs, cfg.env.options, cfg.env.timeout_s, cfg.env.retries)
        if cfg.guidance.mode != "none" or cfg.pushes():
            link = TeacherLink(cfg, fingerprint=tokenizer_fingerprint(policy.tokenizer))
            check_teacher(link, cfg)

        def checkpoint_if_requested() -> None:
            # POST /v1/checkpoint between phases: weights and optimizer are those after the last
            # completed update, which is exactly what the counters say.
            if board.checkpoint_requested.is_set():
                save_checkpoint(run_dir, policy, optimizer, scheduler, counters, sft_buffer)
                board.checkpoint_saved()

        metrics: dict[str, Any] = {}
        stopped = False
        for update in range(counters.update + 1, cfg.updates + 1):
            metrics = run_update(cfg, update, policy, optimizer, scheduler, pool, link, sft_buffer, counters, board, writer,
                                 between_phases=checkpoint_if_requested)
            stop = board.stop_requested.is_set()
            if update % cfg.save_every == 0 or update == cfg.updates or stop or board.checkpoint_requested.is_set():
                board.set_phase("checkpoint")
                save_checkpoint(run_dir, policy, optimizer, scheduler, counters, sft_buffer)
                board.checkpoint_saved()
            if stop:
                log.info("stop requested: stopped after update %d (checkpoint saved)", update)
                stopped = True
                break
        board.set_phase("done")
        return {"run_dir": str(run_dir), "updates": counters.update, "env_steps": counters.env_steps,
                "stopped": stopped, "last": metrics}
    except BaseException:
        board.set_phase("failed")
        raise
    finally:
        board.loop_alive.clear()
        for closable in (pool, link, writer):
            if closable is not None:
                closable.close()
        if server is not None:
            server.stop()


def run_update(cfg: TrainConfig, update: int, policy: Policy, optimizer, scheduler, pool: EnvPool,
               link: TeacherLink | None, sft_buffer: ReplayBuffer | None, counters: Counters, board: StatusBoard,
               writer: MetricsWriter, between_phases=lambda: None) -> dict[str, Any]:
    torch.manual_seed(derive_seed(cfg.seed, update, 1))
    rng = np.random.default_rng(derive_seed(cfg.seed, update, 2))
    opt_steps = cfg.ppo.epochs * cfg.minibatches_per_epoch
    bar = tqdm(total=cfg.env.num_steps + opt_steps, desc=f"update {update}/{cfg.updates}", unit="step",
               disable=not cfg.logging.progress, leave=False)
    try:
        board.set_phase("rollout")
        bar.set_postfix_str("rollout")
        t0 = time.perf_counter()
        rollout = collect(policy, pool, cfg, update, on_step=lambda _t: bar.update(1))
        seconds_rollout = time.perf_counter() - t0
        steps = rollout.flat()
        between_phases()

        board.set_phase("teacher")
        bar.set_postfix_str("teacher")
        t0 = time.perf_counter()
        guide: dict[str, Any] = {"kl_mean": None, "teacher/unavailable": 0}
        if cfg.guidance.mode == "kl":
            guide = kl_guidance(link, steps, cfg)
        elif cfg.guidance.mode == "sft":
            guide = sft_guidance(link, steps, cfg, policy.tokenizer, sft_buffer, derive_seed(cfg.seed, update, 3))
        seconds_teacher = time.perf_counter() - t0
        between_phases()

        board.set_phase("ppo")
        bar.set_postfix_str("ppo")
        t0 = time.perf_counter()
        lr_used = optimizer.param_groups[0]["lr"]
        batch, adv_m = build_batch(rollout, cfg)
        ppo_m = ppo_update(policy, optimizer, scheduler, batch, cfg, rng, sft_buffer, on_step=lambda: bar.update(1))
        seconds_ppo = time.perf_counter() - t0

        push_m: dict[str, Any] = {}
        if link is not None and cfg.pushes():
            board.set_phase("teacher")
            t0 = time.perf_counter()
            push_m = push_adapter(link, policy, update, cfg, guide.get("teacher_version"))
            push_m["seconds_push"] = time.perf_counter() - t0
            seconds_teacher += push_m["seconds_push"]
    finally:
        bar.close()

    counters.update = update
    counters.env_steps += len(steps)
    if guide.get("teacher_version") is not None:
        counters.teacher_version = guide["teacher_version"]
    if guide.get("teacher/unavailable"):
        log.warning("update %d ran WITHOUT teacher guidance: the teacher was unavailable", update)
    metrics: dict[str, Any] = {
        "update": update, "env_steps": counters.env_steps, **rollout_metrics(rollout),
        "kl_mean": guide.get("kl_mean"), "teacher_version": guide.get("teacher_version"),
        "guidance": cfg.guidance.mode, "seconds_rollout": seconds_rollout, "seconds_teacher": seconds_teacher,
        "seconds_ppo": seconds_ppo, "seconds_update": seconds_rollout + seconds_teacher + seconds_ppo,
        "lr": lr_used,
        **{k: v for k, v in guide.items() if k not in ("kl_mean", "teacher_version")}, **adv_m, **ppo_m, **push_m,
    }
    metrics["sps"] = len(steps) / max(1e-9, metrics["seconds_update"])
    writer.log(metrics)
    write_samples(writer.run_dir, update, steps, cfg.logging.samples_per_update, policy.tokenizer)
    board.record(metrics)
    log.info("update %d/%d: success %.2f return %.2f format_ok %.2f kl %s teacher v%s | rollout %.1fs teacher %.1fs "
             "ppo %.1fs", update, cfg.updates, metrics["success_rate"], metrics["mean_return"],
             metrics["format_ok_rate"], _fmt(metrics["kl_mean"]), metrics["teacher_version"], seconds_rollout,
             seconds_teacher, seconds_ppo)
    return metrics


def check_teacher(link: TeacherLink, cfg: TrainConfig) -> None:
    """Fail at start-up, not mid-run, when the teacher scores with another tokenizer."""
    info = link.info()
    if info is None:
        log.warning("teacher at %s is not reachable now; updates run unguided until it is", cfg.teacher.url)
        return
    if link.fingerprint and info.tokenizer_fingerprint and info.tokenizer_fingerprint != link.fingerprint:
        raise ValueError(f"the teacher at {cfg.teacher.url} ({info.base_model}) uses another tokenizer "
                         f"({info.tokenizer_fingerprint} != {link.fingerprint}); serve it on model.path={cfg.model.path}")
    log.info("teacher: %s backend, base %s, version %d, %d checkpoints", info.backend, info.base_model, info.version,
             info.checkpoints)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"
