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

from services.trainer.checkpoint import Counters, checkpoint_dir, find_checkpoint, load_checkpoint, save_checkpoint
from services.trainer.config import TrainConfig
from services.trainer.envpool import EnvPool
from services.trainer.guidance import Guidance, ReplayBuffer, TeacherLink, make_guidance, push_adapter
from services.trainer.metrics import MetricsWriter, with_contract_aliases, write_samples
from services.trainer.policy import Policy
from services.trainer.ppo import build_batch, make_optimizer, ppo_update
from services.trainer.rollout import collect, derive_seed, rollout_metrics
from services.trainer.sampler import LocalSampler, Sampler, make_sampler
from services.trainer.status import StatusBoard
from shared.config import dump_config
from shared.memory import PeakMemory
from shared.models import tokenizer_fingerprint

log = logging.getLogger(__name__)


def train(cfg: TrainConfig, board: StatusBoard | None = None) -> dict[str, Any]:
    """Run (or resume) a training job; returns a summary. Metrics go to <run_dir>/metrics.jsonl.
    The HTTP service that reads `board` is the caller's (`gtr train` starts it)."""
    if not cfg.model.path:
        raise ValueError("model.path is not set (the base model directory)")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    board = board or StatusBoard(cfg.updates, str(run_dir), cfg.guidance.mode)
    guidance = make_guidance(cfg)
    board.loop_alive.set()
    policy = pool = link = writer = sampler = None
    try:
        policy = Policy(cfg.model.path, cfg.model, seed=cfg.seed)
        optimizer, scheduler = make_optimizer(policy, cfg)
        sft_buffer = guidance.new_buffer()
        counters = Counters()
        writer = MetricsWriter(run_dir, cfg.logging.tensorboard)
        # find_checkpoint raises rather than start over when checkpoint directories exist but none is complete
        if cfg.resume and find_checkpoint(run_dir) is not None:
            counters = load_checkpoint(run_dir, policy, optimizer, scheduler, sft_buffer)
            writer.truncate_after(counters.update)
        elif cfg.resume:
            log.warning("resume requested but %s has no checkpoint: starting fresh", checkpoint_dir(run_dir))
        sampler = make_sampler(cfg, policy, tokenizer_fingerprint(policy.tokenizer))
        pool = EnvPool(cfg.env.url, cfg.env.env_id, cfg.env.num_envs, cfg.env.options, cfg.env.timeout_s, cfg.env.retries)
        if guidance.uses_teacher or cfg.pushes():
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
                                 between_phases=checkpoint_if_requested, guidance=guidance, sampler=sampler)
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
        for closable in (pool, link, writer, sampler):
            if closable is not None:
                closable.close()


def run_update(cfg: TrainConfig, update: int, policy: Policy, optimizer, scheduler, pool: EnvPool,
               link: TeacherLink | None, sft_buffer: ReplayBuffer | None, counters: Counters, board: StatusBoard,
               writer: MetricsWriter, between_phases=lambda: None, guidance: Guidance | None = None,
               sampler: Sampler | None = None) -> dict[str, Any]:
    guidance = guidance or make_guidance(cfg)
    torch.manual_seed(derive_seed(cfg.seed, update, 1))
    rng = np.random.default_rng(derive_seed(cfg.seed, update, 2))
    opt_steps = cfg.ppo.epochs * cfg.minibatches_per_epoch
    bar = tqdm(total=cfg.env.num_steps + opt_steps, desc=f"update {update}/{cfg.updates}", unit="step",
               disable=not cfg.logging.progress, leave=False)
    # Peak host RSS (and CUDA memory) of each phase: what sizes a deployment (docs/scale.md).
    mem, mem_m = PeakMemory(policy.device), {}
    try:
        board.set_phase("rollout")
        bar.set_postfix_str("rollout")
        t0 = time.perf_counter()
        mem.reset()
        sampler = sampler or LocalSampler(policy)
        # rollout.engine=service: the policy service must serve the weights after update-1 first.
        sync_m = sampler.sync(update - 1)
        rollout = collect(policy, pool, cfg, update, on_step=lambda _t: bar.update(1), guidance=guidance,
                          sampler=sampler)
        seconds_rollout = time.perf_counter() - t0
        mem_m.update({f"memory/rollout_{k}": v for k, v in mem.read().items()})
        steps = rollout.flat()
        between_phases()

        board.set_phase("teacher")
        bar.set_postfix_str("teacher")
        t0 = time.perf_counter()
        mem.reset()
        if link is not None and guidance.uses_teacher:
            link.await_pushed_merge()  # merged during the rollout: the same teacher version in every run
        guide = guidance.guide(link, steps, policy.tokenizer, sft_buffer, derive_seed(cfg.seed, update, 3))
        seconds_teacher = time.perf_counter() - t0
        mem_m.update({f"memory/teacher_{k}": v for k, v in mem.read().items()})
        between_phases()

        board.set_phase("ppo")
        bar.set_postfix_str("ppo")
        t0 = time.perf_counter()
        mem.reset()
        batch, adv_m = build_batch(rollout, cfg, guidance)
        ppo_m = ppo_update(policy, optimizer, scheduler, batch, cfg, rng, sft_buffer, on_step=lambda: bar.update(1))
        seconds_ppo = time.perf_counter() - t0
        mem_m.update({f"memory/ppo_{k}": v for k, v in mem.read().items()})

        push_m: dict[str, Any] = {}
        if link is not None and cfg.pushes():
            board.set_phase("teacher")
            t0 = time.perf_counter()
            push_m = push_adapter(link, policy, update, cfg, guide.get("teacher/version"))
            push_m["time/push_s"] = time.perf_counter() - t0
            seconds_teacher += push_m["time/push_s"]
    finally:
        bar.close()

    counters.update = update
    counters.env_steps += len(steps)
    if guide.get("teacher/version") is not None:
        counters.teacher_version = guide["teacher/version"]
    if guide.get("teacher/unavailable"):
        log.warning("update %d ran WITHOUT teacher guidance: the teacher was unavailable", update)
    seconds_update = seconds_rollout + seconds_teacher + seconds_ppo
    metrics: dict[str, Any] = {
        "update": update, "env_steps": counters.env_steps, "guidance/mode": guidance.mode,
        **rollout_metrics(rollout), **guide, **adv_m, **ppo_m, **push_m, **mem_m, **sync_m,
        "rollout/engine": sampler.name,
        "time/rollout_s": seconds_rollout, "time/teacher_s": seconds_teacher, "time/ppo_s": seconds_ppo,
        "time/update_s": seconds_update, "time/sps": len(steps) / max(1e-9, seconds_update),
    }
    writer.log(metrics)
    write_samples(writer.run_dir, update, steps, cfg.logging.samples_per_update, policy.tokenizer)
    board.record(with_contract_aliases(metrics))  # the board's gauges read the contract keys
    log.info("update %d/%d: success %.2f return %.2f format_ok %.2f kl %s teacher v%s | rollout %.1fs teacher %.1fs "
             "ppo %.1fs", update, cfg.updates, metrics["rollout/success_rate"], metrics["rollout/mean_return"],
             metrics["rollout/format_ok_rate"], _fmt(metrics.get("teacher/kl_mean")), metrics.get("teacher/version"),
             seconds_rollout, seconds_teacher, seconds_ppo)
    return with_contract_aliases(metrics)


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
