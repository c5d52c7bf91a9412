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

from services.trainer.checkpoint import (Counters, ResumeError, checkpoint_dir, find_checkpoint, load_checkpoint,
                                        save_checkpoint)
from services.trainer.config import TrainConfig
from services.trainer.distributed import Dist, init_from_env, launched_by_torchrun, rank_device, reduce_metrics
from services.trainer.envpool import EnvPool
from services.trainer.guidance import Guidance, ReplayBuffer, TeacherLink, make_guidance, push_adapter
from services.trainer.metrics import MetricsWriter, with_contract_aliases, write_samples
from services.trainer.policy import Policy
from services.trainer.ppo import build_batch, make_optimizer, ppo_update
from services.trainer.rollout import Rollout, collect, derive_seed, merge, rollout_metrics, slim
from services.trainer.sampler import LocalSampler, Sampler, make_sampler
from services.trainer.status import StatusBoard
from services.trainer.teacher_eval import TeacherEvaluator
from shared.client import ServiceError
from shared.config import dump_config
from shared.memory import PeakMemory
from shared.models import resolve_device, tokenizer_fingerprint

log = logging.getLogger(__name__)


def train(cfg: TrainConfig, board: StatusBoard | None = None, dist: Dist | None = None) -> dict[str, Any]:
    """Run (or resume) a training job; returns a summary. Metrics go to <run_dir>/metrics.jsonl.
    The HTTP service that reads `board` is the caller's (`gtr train` starts it, on rank 0).

    Under torchrun every rank runs this: each drives its share of env.num_envs; rank 0 alone
    pushes, logs and writes the checkpoint (services/trainer/distributed.py)."""
    if not cfg.model.path:
        raise ValueError("model.path is not set (the base model directory)")
    own_group = dist is None and launched_by_torchrun()
    dist = dist or (init_from_env(cfg.model.device, cfg.distributed.timeout_s) if own_group else Dist())
    try:
        return _train(cfg, board, dist)
    finally:
        if own_group:
            dist.close()


def _train(cfg: TrainConfig, board: StatusBoard | None, dist: Dist) -> dict[str, Any]:
    if cfg.model.fsdp and dist.active and cfg.eval.teacher_every:
        # A sharded base runs every forward on all ranks together; the teacher-vs-student
        # evaluation plays episodes on rank 0 alone.
        raise ValueError("model.fsdp=true with eval.teacher_every>0 is not supported: the evaluation runs the "
                         "student on rank 0 alone, and a sharded base needs every rank in each forward "
                         "(set eval.teacher_every=0, or model.fsdp=false)")
    first_env, n_envs = dist.shard(cfg.env.num_envs, "env.num_envs")
    if dist.active:
        cfg = cfg.model_copy(deep=True)
        cfg.model.device = rank_device(cfg.model.device, dist)
    run_dir = Path(cfg.run_dir)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
    board = board or StatusBoard(cfg.updates, str(run_dir), cfg.guidance.mode)
    guidance = make_guidance(cfg)
    if cfg.deterministic:
        # cuBLAS needs CUBLAS_WORKSPACE_CONFIG set before CUDA starts, or deterministic ops raise.
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    board.loop_alive.set()
    policy = pool = link = writer = sampler = None
    try:
        # model.fsdp on CUDA: load the base on the host, so no GPU ever holds all of it.
        host_first = cfg.model.fsdp and dist.active and resolve_device(cfg.model.device).type == "cuda"
        policy = Policy(cfg.model.path, cfg.model, seed=cfg.seed, load_device="cpu" if host_first else None)
        if cfg.model.fsdp:
            n = policy.shard_base(dist)
            log.info("model.fsdp: %s", f"{n} decoder layers sharded over {dist.world_size} ranks (FSDP2)" if n
                     else "one process, nothing to shard")
        optimizer, scheduler = make_optimizer(policy, cfg)
        sft_buffer = guidance.new_buffer()
        counters = Counters()
        writer = MetricsWriter(run_dir, cfg.logging.tensorboard) if dist.is_main else None
        # Rank 0 first finishes a save that was killed between its renames (find_checkpoint raises
        # rather than start over when checkpoint directories exist but none is complete); the
        # collective below is the barrier after which every rank reads the same directory.
        found = cfg.resume and dist.is_main and find_checkpoint(run_dir) is not None
        resuming = dist.any([found], "resume check")[0]
        if resuming and not (checkpoint_dir(run_dir) / "trainer_state.pt").exists():
            raise ResumeError(f"rank {dist.rank} does not see the checkpoint rank 0 resumes from in "
                              f"{checkpoint_dir(run_dir)}: run_dir must be on a filesystem every node shares")
        if resuming:
            counters = load_checkpoint(run_dir, policy, optimizer, scheduler, sft_buffer, dist)
            if writer is not None:
                writer.truncate_after(counters.update)
        elif cfg.resume and dist.is_main:
            log.warning("resume requested but %s has no checkpoint: starting fresh", checkpoint_dir(run_dir))
        sampler = make_sampler(cfg, policy, tokenizer_fingerprint(policy.tokenizer), rank=dist.rank)
        pool = EnvPool(cfg.env.url, cfg.env.env_id, n_envs, cfg.env.options, cfg.env.timeout_s, cfg.env.retries)
        if guidance.uses_teacher or cfg.pushes():
            link = TeacherLink(cfg, fingerprint=tokenizer_fingerprint(policy.tokenizer), rank=dist.rank)
            check_teacher(link, cfg)
        # The teacher-vs-student evaluation (eval.teacher_every) runs on rank 0; its gate decision
        # reaches every rank in run_update.
        evaluator = TeacherEvaluator(cfg, link, run_dir) if dist.is_main else None
        if evaluator is not None and evaluator.enabled and counters.update == 0:
            evaluator.run(policy, 0)  # the starting point of the teacher-vs-student curve

        def save() -> None:
            save_checkpoint(run_dir, policy, optimizer, scheduler, counters, sft_buffer, dist)
            board.checkpoint_saved()

        def checkpoint_if_requested() -> None:
            # POST /v1/checkpoint between phases: weights and optimizer are those after the last
            # completed update, which is exactly what the counters say. The request reaches rank 0;
            # saving gathers every rank's RNG, so all ranks learn of it here.
            if dist.any([board.checkpoint_requested.is_set()], "checkpoint request")[0]:
                save()

        metrics: dict[str, Any] = {}
        stopped = False
        for update in range(counters.update + 1, cfg.updates + 1):
            metrics = run_update(cfg, update, policy, optimizer, scheduler, pool, link, sft_buffer, counters, board, writer,
                                 between_phases=checkpoint_if_requested, guidance=guidance, sampler=sampler, dist=dist,
                                 first_env=first_env, evaluator=evaluator)
            # A stop (signal, POST /v1/stop) may reach one rank only: every rank stops after the same update.
            stop, requested = dist.any([board.stop_requested.is_set(), board.checkpoint_requested.is_set()],
                                       "stop and checkpoint requests")
            if update % cfg.save_every == 0 or update == cfg.updates or stop or requested:
                board.set_phase("checkpoint")
                save()
            if stop:
                log.info("stop requested: stopped after update %d (checkpoint saved)", update)
                stopped = True
                break
        board.set_phase("done")
        return {"run_dir": str(run_dir), "updates": counters.update, "env_steps": counters.env_steps,
                "stopped": stopped, "world_size": dist.world_size, "rank": dist.rank, "last": metrics}
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
               writer: MetricsWriter | None, between_phases=lambda: None, guidance: Guidance | None = None,
               sampler: Sampler | None = None, dist: Dist | None = None, first_env: int = 0,
               evaluator: TeacherEvaluator | None = None) -> dict[str, Any]:
    guidance = guidance or make_guidance(cfg)
    dist = dist or Dist()
    guided, gate_reason = evaluator.gate() if evaluator is not None else (True, "no gate")
    if dist.active:  # rank 0 holds the teacher evaluation: its decision is every rank's
        guided, gate_reason = dist.all_gather_object((guided, gate_reason), "guidance gate")[0]
    # Sampling differs per rank (rank 0 keeps the one-process seed); the PPO permutation `rng`
    # must be the same on every rank: it draws the global minibatches.
    torch.manual_seed(derive_seed(cfg.seed, update, 1, *([dist.rank] if dist.rank else [])))
    rng = np.random.default_rng(derive_seed(cfg.seed, update, 2))
    opt_steps = cfg.ppo.epochs * cfg.minibatches_per_epoch
    bar = tqdm(total=cfg.env.num_steps + opt_steps, desc=f"update {update}/{cfg.updates}", unit="step",
               disable=not cfg.logging.progress or not dist.is_main, leave=False)
    # Peak host RSS (and CUDA memory) of each phase: what sizes a deployment (docs/scale.md).
    mem, mem_m = PeakMemory(policy.device), {}
    try:
        board.set_phase("rollout")
        bar.set_postfix_str("rollout")
        t0 = time.perf_counter()
        mem.reset()
        sampler = sampler or LocalSampler(policy)
        # rollout.engine=service: the policy service must serve the weights after update-1 first.
        sync_m = _sync_sampler(sampler, update - 1, dist)
        rollout = collect(policy, pool, cfg, update, on_step=lambda _t: bar.update(1), guidance=guidance,
                          sampler=sampler, first_env=first_env)
        seconds_rollout = time.perf_counter() - t0
        mem_m.update({f"memory/rollout_{k}": v for k, v in mem.read().items()})
        steps = rollout.flat()
        between_phases()

        board.set_phase("teacher")
        bar.set_postfix_str("teacher")
        t0 = time.perf_counter()
        mem.reset()
        if link is not None and guidance.uses_teacher and guided:
            if dist.active:  # rank 0 pushed: every rank waits for that merge, on every replica
                link.merge_above = dist.all_gather_object(link.merge_above, "pushed merge version")[0]
            link.await_pushed_merge()  # merged during the rollout: the same teacher version in every run
        if guided:
            guide = guidance.guide(link, steps, policy.tokenizer, sft_buffer,
                                   derive_seed(cfg.seed, update, 3, *([dist.rank] if dist.rank else [])))
        else:  # guidance.gate: the latest teacher eval scored below the student
            log.info("update %d: guidance skipped by the gate (%s)", update, gate_reason)
            guide = {"teacher/kl_mean": None, "teacher/unavailable": 0}
        if link is not None:
            guide["teacher/version_skew"] = link.take_version_skew()
        seconds_teacher = time.perf_counter() - t0
        mem_m.update({f"memory/teacher_{k}": v for k, v in mem.read().items()})
        between_phases()

        board.set_phase("ppo")
        bar.set_postfix_str("ppo")
        t0 = time.perf_counter()
        mem.reset()
        batch, adv_m = build_batch(rollout, cfg, guidance, dist)
        push_m: dict[str, Any] = {}
        pushes = link is not None and cfg.pushes() and dist.is_main  # rank 0 pushes, to every teacher replica
        per_epoch = pushes and cfg.teacher.checkpoints_per_update == "epochs"

        def push_epoch(epoch: int) -> None:  # the official code's one checkpoint per PPO epoch
            t1 = time.perf_counter()
            step = (update - 1) * cfg.ppo.epochs + epoch + 1
            push_m.update(push_adapter(link, policy, step, cfg, guide.get("teacher/version")))
            push_m["teacher/pushes"] = push_m.get("teacher/pushes", 0) + 1
            push_m["time/push_s"] = push_m.get("time/push_s", 0.0) + time.perf_counter() - t1

        ppo_m = ppo_update(policy, optimizer, scheduler, batch, cfg, rng, sft_buffer if guided else None,
                           on_step=lambda: bar.update(1), dist=dist, on_epoch=push_epoch if per_epoch else None)
        seconds_ppo = time.perf_counter() - t0 - push_m.get("time/push_s", 0.0)
        seconds_teacher += push_m.get("time/push_s", 0.0)
        mem_m.update({f"memory/ppo_{k}": v for k, v in mem.read().items()})

        if pushes and not per_epoch:  # one push per update
            board.set_phase("teacher")
            t0 = time.perf_counter()
            push_m = push_adapter(link, policy, update, cfg, guide.get("teacher/version"))
            push_m["teacher/pushes"] = 1
            push_m["time/push_s"] = time.perf_counter() - t0
            seconds_teacher += push_m["time/push_s"]
        eval_m: dict[str, Any] = {}
        if evaluator is not None and evaluator.due(update):
            board.set_phase("eval")
            t0 = time.perf_counter()
            eval_m = evaluator.run(policy, update)
            eval_m["time/eval_s"] = time.perf_counter() - t0
    finally:
        bar.close()

    dist_m: dict[str, Any] = {}
    if dist.active:
        # Rank 0 logs the whole batch: every rank's episodes and steps (small: no prompts or images).
        rollout, guide, ppo_m, dist_m = _gather_metrics(dist, rollout, guide, ppo_m)
    counters.update = update
    counters.env_steps += len(steps) * dist.world_size
    if guide.get("teacher/version") is not None:
        counters.teacher_version = guide["teacher/version"]
    if guide.get("teacher/unavailable"):
        log.warning("update %d ran WITHOUT teacher guidance: the teacher was unavailable", update)
    seconds_update = seconds_rollout + seconds_teacher + seconds_ppo
    metrics: dict[str, Any] = {
        "update": update, "env_steps": counters.env_steps, "guidance/mode": guidance.mode,
        **rollout_metrics(rollout), **guide, **adv_m, **ppo_m, **push_m, **mem_m, **sync_m, **dist_m, **eval_m,
        "guidance/gate_open": int(guided), "rollout/engine": sampler.name,
        "time/rollout_s": seconds_rollout, "time/teacher_s": seconds_teacher, "time/ppo_s": seconds_ppo,
        "time/update_s": seconds_update, "time/sps": len(steps) * dist.world_size / max(1e-9, seconds_update),
    }
    if dist.active:
        metrics["dist/world_size"] = dist.world_size
    board.record(with_contract_aliases(metrics))  # the board's gauges read the contract keys
    if writer is None:  # not rank 0
        return with_contract_aliases(metrics)
    writer.log(metrics)
    write_samples(writer.run_dir, update, steps, cfg.logging.samples_per_update, policy.tokenizer)
    log.info("update %d/%d: success %.2f return %.2f format_ok %.2f kl %s teacher v%s | rollout %.1fs teacher %.1fs "
             "ppo %.1fs", update, cfg.updates, metrics["rollout/success_rate"], metrics["rollout/mean_return"],
             metrics["rollout/format_ok_rate"], _fmt(metrics.get("teacher/kl_mean")), metrics.get("teacher/version"),
             seconds_rollout, seconds_teacher, seconds_ppo)
    return with_contract_aliases(metrics)


def _sync_sampler(sampler: Sampler, step: int, dist: Dist) -> dict[str, Any]:
    """Under data parallelism rank 0 alone uploads to the policy service (one checkpoint per
    update, as for the teacher); the other ranks then sample from the version it synced."""
    if not dist.active or sampler.name != "service":
        return sampler.sync(step)
    m = sampler.sync(step) if dist.is_main else {}
    sampler.adopt(dist.all_gather_object(sampler.sync_state(), "policy service sync")[0])
    return m


def check_teacher(link: TeacherLink, cfg: TrainConfig) -> None:
    """Fail at start-up, not mid-run, when a teacher replica scores with another tokenizer."""
    versions = set()
    for url, info in zip([c.base_url for c in link.replicas.clients], link.infos(), strict=True):
        if isinstance(info, ServiceError):
            log.warning("teacher at %s is not reachable now (%s); updates run unguided until a replica is", url, info)
            continue
        if link.fingerprint and info.tokenizer_fingerprint and info.tokenizer_fingerprint != link.fingerprint:
            raise ValueError(f"the teacher at {url} ({info.base_model}) uses another tokenizer "
                             f"({info.tokenizer_fingerprint} != {link.fingerprint}); serve it on model.path={cfg.model.path}")
        versions.add(info.version)
        log.info("teacher %s: %s backend, base %s, version %d, %d checkpoints", url, info.backend, info.base_model,
                 info.version, info.checkpoints)
    if len(versions) > 1:
        log.warning("teacher replicas start at different versions %s: give them the same checkpoint store contents",
                    sorted(versions))


def _gather_metrics(dist: Dist, rollout: Rollout, guide: dict[str, Any], ppo_m: dict[str, Any]):
    """Every rank's rollout (slimmed), guidance and PPO metrics, reduced the same way on every rank:
    rollout metrics over all ranks' steps and episodes; the KL mean over all guided steps; counts
    (unavailable, skew, ...) summed; other scalars the mean over ranks."""
    parts = dist.all_gather_object((slim(rollout), guide, ppo_m), "update metrics")
    merged = merge([p[0] for p in parts])
    kls = [s.kl for s in merged.flat() if s.kl is not None]
    guide = reduce_metrics([p[1] for p in parts], sums=("teacher/unavailable", "teacher/version_skew", "sft/added"),
                           maxes=("teacher/version", "teacher/kl_max"))
    if guide.get("teacher/kl_mean") is not None and kls:
        guide["teacher/kl_mean"] = float(np.mean(kls))
    # Ranks guided by different teacher versions (a merge landed between their requests) count too.
    versions = [p[1].get("teacher/version") for p in parts if p[1].get("teacher/version") is not None]
    if len(set(versions)) > 1:
        log.warning("teacher version skew across ranks: %s", versions)
        guide["teacher/version_skew"] = guide.get("teacher/version_skew", 0) + sum(v != max(versions) for v in versions)
    dist_m = {f"dist/rank{r}/episodes": len(p[0].episodes) for r, p in enumerate(parts)}
    return merged, guide, reduce_metrics([p[2] for p in parts], maxes=("ppo/clipfrac_max",)), dist_m


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"
