"""The PPO update (DESIGN §4), top-down in the paper's order: advantages (GAE, then the KL
shaping, then normalisation), epochs x minibatches with gradient accumulation over
micro-batches, a grad-norm clip that applies, one scheduler step per optimizer step."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from services.trainer.config import TrainConfig
from services.trainer.distributed import Dist, global_moments
from services.trainer.guidance import Guidance, ReplayBuffer, make_guidance
from services.trainer.losses import cosine_lr_factor, explained_variance, gae, normalize, ppo_clip_loss, value_loss
from services.trainer.policy import Policy
from services.trainer.rollout import Rollout
from services.trainer.sampler import nan_if_none, tis_weights
from services.trainer.stored_prompt import StoredPrompt

log = logging.getLogger(__name__)


@dataclass
class PPOBatch:
    """One update's samples, flattened from [T, N] (b_* in CleanRL)."""

    prompts: list[StoredPrompt]
    completions: list[list[int]]
    n_thought: list[int]
    old_logp: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    """Normalised, KL-shaped advantages: what the surrogate uses."""
    returns: torch.Tensor
    """Value targets: GAE returns, without the KL term (with guidance.kl_apply=return, minus beta * KL_t)."""
    is_weights: torch.Tensor | None = None
    """Truncated importance weights min(pi_trainer / pi_sampler, rollout.tis_cap), or None (off)."""
    global_index: list[int] | None = None
    """Each sample's index in the global batch (t * env.num_envs + env) under data parallelism;
    None: this batch is the whole batch."""
    global_size: int | None = None

    def __len__(self) -> int:
        return len(self.prompts)


def build_batch(rollout: Rollout, cfg: TrainConfig, guidance: Guidance | None = None,
                dist: Dist | None = None) -> tuple[PPOBatch, dict[str, Any]]:
    """This rank's samples; the advantage moments are the global batch's (all-reduced)."""
    dist = dist or Dist()
    rows = rollout.steps

    def grid(f):
        return torch.tensor([[f(s) for s in row] for row in rows], dtype=torch.float32)

    rewards, values, next_values = grid(lambda s: s.reward), grid(lambda s: s.value), grid(lambda s: s.next_value)
    terminated, truncated = grid(lambda s: float(s.terminated)), grid(lambda s: float(s.truncated))
    adv, returns = gae(rewards, values, next_values, terminated, truncated, cfg.ppo.gamma, cfg.ppo.gae_lambda)
    kl = grid(lambda s: s.kl if s.kl is not None else 0.0)
    beta = (guidance or make_guidance(cfg)).kl_beta
    adv_raw = adv
    adv, returns = apply_kl(adv, returns, kl, beta, cfg.guidance.kl_apply, cfg.guidance.kl_before_norm)
    b_adv = adv.reshape(-1)
    if cfg.ppo.norm_adv:
        b_adv = normalize(b_adv, 1e-8, *global_moments(b_adv, dist))  # over all ranks' samples
    if not cfg.guidance.kl_before_norm and cfg.guidance.kl_apply == "advantage":
        b_adv = b_adv - beta * kl.reshape(-1)
    flat = rollout.flat()
    batch = PPOBatch(prompts=[s.prompt for s in flat], completions=[s.tokens for s in flat],
                     n_thought=[s.n_thought for s in flat], old_logp=torch.tensor([s.logprob for s in flat]),
                     old_values=values.reshape(-1), advantages=b_adv, returns=returns.reshape(-1),
                     global_index=[t * cfg.env.num_envs + s.env_index
                                   for t, row in enumerate(rows) for s in row],
                     global_size=len(rows) * cfg.env.num_envs)
    m = {"ppo/adv_raw_mean": float(adv_raw.mean()), "ppo/return_mean": float(returns.mean()),
         "ppo/kl_penalty_mean": float(beta * kl.mean())}
    if cfg.rollout.tis_cap is not None and any(s.sampler_logprob is not None for s in flat):
        sampler_logp = torch.tensor([nan_if_none(s.sampler_logprob) for s in flat], dtype=torch.float64)
        batch.is_weights, tis_m = tis_weights(batch.old_logp.double(), sampler_logp, cfg.rollout.tis_cap)
        m.update(tis_m)
    return batch, m


def apply_kl(adv: torch.Tensor, returns: torch.Tensor, kl: torch.Tensor, beta: float, how: str,
             before_norm: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The KL shaping of GTR-Turbo-KL on [T, N] GAE outputs -> (advantages, value targets).

    advantage (DESIGN §4): A' = A - beta * KL_t; the value targets never include it.
    return (the official code): R' = R - beta * KL_t after GAE, one scalar per step; A = R' - V
    then carries the same -beta * KL_t, and the value head learns to predict the penalty too.
    With before_norm=False the advantage variant shapes after normalisation (build_batch does it).
    """
    if how == "return":
        return adv - beta * kl, returns - beta * kl
    if how != "advantage":
        raise ValueError(f"unknown guidance.kl_apply {how!r}")
    return (adv - beta * kl if before_norm else adv), returns


def make_optimizer(policy: Policy, cfg: TrainConfig):
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.ppo.lr, weight_decay=cfg.ppo.weight_decay)
    total = cfg.total_optimizer_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: cosine_lr_factor(step, total, cfg.ppo.warmup_steps, cfg.ppo.min_lr_ratio))
    return opt, sched


def ppo_update(policy: Policy, optimizer, scheduler, batch: PPOBatch, cfg: TrainConfig, rng: np.random.Generator,
               sft_buffer: ReplayBuffer | None = None, on_step: Callable[[], None] | None = None,
               dist: Dist | None = None, on_epoch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Epochs x global minibatches; `on_epoch(epoch)` runs after each epoch (the official code's
    checkpoint per epoch: teacher.checkpoints_per_update=epochs).

    Data parallel (docs/distributed.md): every rank draws the same permutation of the global
    batch (rng seeded alike) and scores the samples of each minibatch it holds, in micro-batches,
    through PyTorch's DistributedDataParallel. DDP averages the gradients over ranks in the last
    backward of each optimizer step (the others run under `no_sync`), so each rank scales its loss
    by world size x (its samples / the global minibatch) and the mean is the global minibatch's
    mean gradient whatever each rank's share. Shares differ, and DDP needs the same number of
    backwards on every rank: a rank with fewer micro-batches runs zero-weight ones (a real forward
    of one of its samples, loss x 0). The clip then sees the global norm, and every rank takes the
    same step. At world size 1 there is no wrapper and no padding; the path is otherwise the same."""
    p, dev = cfg.ppo, policy.device
    dist = dist or Dist()
    size = batch.global_size or len(batch)
    local_of = {g: i for i, g in enumerate(batch.global_index or range(len(batch)))}
    params = policy.parameters()
    stats: dict[str, list[float]] = {}

    def add(k, v):
        stats.setdefault(k, []).append(float(v))

    # The replay draws come from their own generator: each rank's buffer differs, and drawing from
    # `rng` would let the ranks' permutations drift apart.
    sft_rng = np.random.default_rng([int(rng.integers(2**31 - 1)), dist.rank])
    use_sft = sft_buffer is not None and cfg.guidance.sft_alpha > 0 and len(sft_buffer) > 0
    # Each optimizer step's micro-batches on this rank (its share of the global minibatch) ...
    plan: list[tuple[int, list[list[int]]]] = []  # (global minibatch size, this rank's micro-batches)
    for _ in range(p.epochs):
        perm = rng.permutation(size)
        for start in range(0, size, p.minibatch_size):
            mb_global = perm[start:start + p.minibatch_size]
            mb = [local_of[int(g)] for g in mb_global if int(g) in local_of]  # this rank's share
            plan.append((len(mb_global), [mb[i:i + p.micro_batch_size] for i in range(0, len(mb), p.micro_batch_size)]))
    # ... padded to the most any rank has (one collective per update), and the SFT replay term
    # if any rank has a replay buffer: every rank then runs the same number of backwards.
    counts = dist.all_reduce(torch.tensor([len(micro) for _, micro in plan] + [int(use_sft)], dtype=torch.float64),
                             "PPO micro-batch counts", op="max")
    slots, sft_slot = [int(c) for c in counts[:-1].tolist()], bool(counts[-1])
    per_epoch = len(plan) // p.epochs
    fwd = policy.data_parallel(dist)  # DistributedDataParallel under torchrun; the plain module at world size 1
    no_sync = getattr(fwd, "no_sync", contextlib.nullcontext)

    def ppo_loss(idx: list[int], weight: float):
        sc = policy.score([batch.prompts[i] for i in idx], [batch.completions[i] for i in idx],
                          [batch.n_thought[i] for i in idx], cfg.generation.temperature, p.thought_coef,
                          entropy_grad=p.ent_coef > 0)
        old_logp, adv = batch.old_logp[idx].to(dev), batch.advantages[idx].to(dev)
        is_w = batch.is_weights[idx].to(dev) if batch.is_weights is not None else None
        pg_loss, st = ppo_clip_loss(sc.logprob, old_logp, adv, p.clip_coef, weights=is_w)
        v_loss = value_loss(sc.values, batch.old_values[idx].to(dev), batch.returns[idx].to(dev), p.vf_clip)
        ent = sc.entropy.mean()
        loss = pg_loss + p.vf_coef * v_loss - p.ent_coef * ent
        return loss * weight, {"values": sc.values.detach(), "pg_loss": pg_loss.item(), "value_loss": v_loss.item(),
                               "entropy": ent.item(), **{k: float(v) for k, v in st.items()}}

    def sft_loss(weight: float):
        exs = sft_buffer.sample(cfg.guidance.sft_batch_size, sft_rng)
        ce = policy.masked_ce([e.prompt for e in exs], [e.ids for e in exs], [e.n_thought for e in exs])
        return ce * weight, {"ce": ce.item()}

    policy.train(True)  # dropout stays off (Policy.train): the first minibatch's ratio is exactly 1
    new_values_all = torch.zeros(len(batch))
    padded = 0
    try:
        for step, ((n_global, micro), n_slots) in enumerate(zip(plan, slots, strict=True)):
            optimizer.zero_grad(set_to_none=True)
            # (kind, micro-batch) per backward; the last one reduces the gradients over ranks.
            work: list[tuple[str, list[int]]] = [("ppo", micro[k]) if k < len(micro) else ("pad", [0])
                                                 for k in range(n_slots)]
            if sft_slot:
                work.append(("sft", []) if use_sft else ("pad", [0]))
            padded += sum(kind == "pad" for kind, _ in work)
            for k, (kind, idx) in enumerate(work):
                last = k == len(work) - 1
                with contextlib.nullcontext() if last else no_sync():
                    if kind == "ppo":  # accumulate: DDP's mean over ranks is the global minibatch's mean
                        loss, aux = fwd(ppo_loss, idx, dist.world_size * len(idx) / n_global)
                    elif kind == "sft":
                        # L = L_PPO + alpha * CE(thought tokens); each rank's own replay sample,
                        # averaged over ranks by DDP
                        loss, aux = fwd(sft_loss, cfg.guidance.sft_alpha)
                    else:  # this rank has fewer micro-batches: the same forward and backward, weight 0
                        loss, aux = fwd(ppo_loss, idx, 0.0)
                    if last:
                        dist.backward(loss, "LoRA and value-head gradients (DDP)")
                    else:
                        loss.backward()
                if kind == "ppo":
                    new_values_all[idx] = aux.pop("values").float().cpu()
                    for name, v in aux.items():
                        add(name if name.startswith("ppo/") else f"ppo/{name}", v)
                elif kind == "sft":
                    add("sft/ce", aux["ce"])
            # after DDP's reduction: the global norm
            grad_norm = torch.nn.utils.clip_grad_norm_(params, p.max_grad_norm)
            add("ppo/grad_norm", grad_norm.item())
            add("ppo/lr", optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
            if on_step:
                on_step()
            if on_epoch and (step + 1) % per_epoch == 0:
                policy.train(False)
                on_epoch(step // per_epoch)
                policy.train(True)
    finally:
        policy.train(False)
    m = {k: float(np.mean(v)) for k, v in stats.items()}
    m["ppo/clipfrac_max"] = float(np.max(stats["ppo/clipfrac"]))
    m["ppo/explained_variance"] = explained_variance(batch.old_values, batch.returns)
    m["ppo/value_after_mean"] = float(new_values_all.mean())
    m["ppo/optimizer_steps"] = len(stats["ppo/lr"])
    m["ppo/padded_backwards"] = padded  # zero-weight micro-batches run to match other ranks' counts
    return m
