"""`gtr sft`: SFT-init from the env experts, folded into a new base model directory.

Demonstrations come from the env service: every observation's info carries the expert's next
action (`expert_action`), a thought written from its plan (`expert_thoughts`), and the whole JSON
answer the env's instruction asks for (`expert_answer`), which is the target. We train LoRA with cross-entropy on the target
tokens, then merge the adapter into the weights (`merge_and_unload`) and save a full model +
processor files that the trainer and the teacher both load as their base (DESIGN §4).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from tqdm import tqdm

from services.trainer.config import EnvSettings, ModelSettings
from services.trainer.envpool import EnvPool
from services.trainer.policy import Policy
from shared.chat import encode_prompt
from shared.config import StrictModel, dump_config
from shared.prompting import observation_messages

log = logging.getLogger(__name__)

WEIGHT_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")


class SFTConfig(StrictModel):
    model: ModelSettings = ModelSettings(lora={"dropout": 0.0})
    env: EnvSettings = EnvSettings(num_envs=1)
    out: str = "runs/sft-model"
    """The new base model directory."""
    episodes: int = Field(default=30, ge=1)
    max_steps: int = Field(default=30, ge=1)
    """Per episode (the expert usually finishes sooner)."""
    epochs: int = Field(default=8, ge=1)
    lr: float = Field(default=2e-3, gt=0)
    """For the `small` CPU model (the `tiny` one takes 1e-2); use ~2e-4 for a 7B model."""
    batch_size: int = Field(default=16, ge=1)
    max_grad_norm: float = 1.0
    train_also: list[str] | None = None
    """Base parameters trained fully beside LoRA (substrings of their names), folded into the base
    too. None = auto: the final norm and the (tied) embeddings for models under 100M parameters,
    nothing for larger ones. A tiny random-init model needs them: its logits are bounded by the
    frozen norm gain and embeddings, so LoRA alone cannot sharpen its output distribution."""
    seed: int = 0
    progress: bool = True


def format_target(info: dict[str, Any]) -> str:
    """The expert's answer as the env formats it (`info["expert_answer"]`: the env knows its
    answer format, the trainer does not)."""
    answer = info.get("expert_answer")
    if not isinstance(answer, str):
        raise RuntimeError("the env's info carries no expert_answer beside expert_action; update the env service")
    return answer


def collect_demonstrations(cfg: SFTConfig) -> tuple[list[tuple[list[dict], str]], dict[str, Any]]:
    """Roll the expert through `episodes` episodes: (chat, target answer) pairs, and stats."""
    pool = EnvPool(cfg.env.url, cfg.env.env_id, 1, cfg.env.options, cfg.env.timeout_s, cfg.env.retries)
    pairs: list[tuple[list[dict], str]] = []
    won = 0
    try:
        for ep in range(cfg.episodes):
            cur = pool.open([cfg.seed + ep])[0]
            for _ in range(cfg.max_steps):
                if cur.info.get("expert_action") is None:
                    break  # the expert has nothing to do (unsolvable hand, or already done)
                messages = observation_messages(cur.observation)
                target = format_target(cur.info)
                pairs.append((messages, target))
                cur = pool.step([target])[0]
                if cur.terminated or cur.truncated:
                    won += bool(cur.info.get("won"))
                    break
    finally:
        pool.close()
    if not pairs:
        raise RuntimeError(f"the {cfg.env.env_id} expert produced no demonstrations (does its info carry "
                           "expert_action / expert_thoughts?)")
    return pairs, {"demonstrations": len(pairs), "episodes": cfg.episodes, "expert_success_rate": won / cfg.episodes}


def train_on_pairs(policy: Policy, pairs: list[tuple[list[dict], str]], cfg: SFTConfig) -> list[float]:
    """Cross-entropy on every target token (the answer and its end-of-turn token)."""
    tok = policy.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    prompts = [encode_prompt(policy.processor, m) for m, _ in pairs]
    targets = [tok(t, add_special_tokens=False)["input_ids"] + ([end] if end is not None else []) for _, t in pairs]
    params = policy.parameters()
    opt = torch.optim.AdamW([p for p in params if p is not None], lr=cfg.lr)
    steps_total = cfg.epochs * int(np.ceil(len(pairs) / cfg.batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * min(1.0, s / steps_total))))
    rng = np.random.default_rng(cfg.seed)
    losses = []
    policy.train(True, dropout=True)  # lora.dropout applies to this CE training, never to PPO
    bar = tqdm(total=steps_total, desc="sft", disable=not cfg.progress)
    try:
        for epoch in range(cfg.epochs):
            perm = rng.permutation(len(pairs))
            epoch_loss = []
            for s in range(0, len(perm), cfg.batch_size):
                idx = [int(i) for i in perm[s:s + cfg.batch_size]]
                opt.zero_grad(set_to_none=True)
                loss = policy.masked_ce([prompts[i] for i in idx], [targets[i] for i in idx],
                                        [len(targets[i]) for i in idx])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                sched.step()
                epoch_loss.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            losses.append(float(np.mean(epoch_loss)))
            log.info("sft epoch %d/%d: loss %.4f", epoch + 1, cfg.epochs, losses[-1])
    finally:
        bar.close()
        policy.train(False)
    return losses


def fold_into_base(policy: Policy, src: str | Path, out: str | Path) -> Path:
    """Merge the LoRA delta into the weights and write a complete model directory."""
    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    merged = policy.model.merge_and_unload()
    merged.save_pretrained(str(out), safe_serialization=True)
    for f in src.iterdir():  # tokenizer, image processor, chat template: the same as the source's
        if f.is_file() and f.name not in WEIGHT_FILES and not f.name.endswith((".safetensors", ".bin")):
            shutil.copy2(f, out / f.name)
    return out


def run_sft(cfg: SFTConfig) -> dict[str, Any]:
    """Demonstrations -> LoRA SFT -> merged base at cfg.out. Returns a summary (also in out/sft_summary.json)."""
    if not cfg.model.path:
        raise ValueError("model.path is not set (the model to SFT-init)")
    t0 = time.perf_counter()
    pairs, stats = collect_demonstrations(cfg)
    log.info("sft: %d demonstrations from %d %s expert episodes", len(pairs), cfg.episodes, cfg.env.env_id)
    policy = Policy(cfg.model.path, cfg.model, seed=cfg.seed)
    train_also = cfg.train_also
    if train_also is None:
        n_params = sum(p.numel() for p in policy.model.parameters())
        train_also = ["language_model.norm", "embed_tokens"] if n_params < 100_000_000 else []
    for name, p in policy.model.named_parameters():
        if "lora_" not in name and any(t in name for t in train_also):
            p.requires_grad_(True)
    losses = train_on_pairs(policy, pairs, cfg)
    out = fold_into_base(policy, cfg.model.path, cfg.out)
    dump_config(cfg, out / "sft_config.yaml")
    summary = {"out": str(out), **stats, "losses": losses, "seconds": time.perf_counter() - t0}
    (out / "sft_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
