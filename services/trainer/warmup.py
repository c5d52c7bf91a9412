"""Vision warm-up: teach a randomly initialised small VLM's vision tower to read the env's frames.

A real VLM (Qwen2.5-VL) arrives with a pretrained vision encoder that can read digits, cards and
positions, aligned with its language model; the offline `small` model's vision tower is random,
so from pixels alone it passes noise to the language model, and RL from pixels has nothing to
start from. This stage stands in for that pretraining. Its labels are the env's own text
rendering of the state (the observation text it gives with `text_state: true`, e.g. "Target: 3.
Current: 5."); they never enter a prompt. Trained: the whole vision tower and merger; the
language model is untouched (SFT-init then teaches it to use the image tokens), and the base
this stage writes is what SFT-init starts from.

Objectives (`objective`): `tokens` (the default) trains the image tokens to be the language
model's embeddings of the caption's tokens, so the frame reaches the language model as its
caption would in text; `probe` trains linear probes per caption field ("Target: 3",
"Current: 5") on the merger's tokens. Both are measured in docs/demo.md: the probes read the
state sooner, but only the `tokens` objective gives a language model that learns to read it.

Frames are held out by caption (whole states never trained on), so the held-out accuracy
measures reading the fields, not memorising frames.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn
from tqdm import tqdm

from services.trainer.config import EnvSettings
from services.trainer.envpool import EnvPool
from services.trainer.losses import cosine_lr_factor
from shared.codecs import b64_to_image
from shared.config import StrictModel, dump_config

log = logging.getLogger(__name__)

WEIGHT_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")


class WarmupConfig(StrictModel):
    model: str = ""
    """The model directory to warm up (a Qwen2.5-VL-family model)."""
    env: EnvSettings = EnvSettings(num_envs=1)
    out: str = "runs/warmup-model"
    """The new base model directory."""
    frames: int = Field(default=400, ge=2)
    """Env resets sampled for frames (distinct seeds; repeated states are kept)."""
    heldout_frac: float = Field(default=0.2, gt=0, lt=1)
    """Fraction of the distinct captions (states) never trained on, for the held-out accuracy."""
    epochs: int = Field(default=10, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    batch_size: int = Field(default=32, ge=1)
    max_grad_norm: float = 1.0
    lr_ramp: float = Field(default=0.1, ge=0, lt=1)
    """Fraction of the steps over which the LR rises linearly before the cosine decay. Without it
    the first full-LR steps blew the loss up (33 -> 258) and the small model's tower settled
    in a plateau that read neither held-out nor most training frames (docs/demo.md)."""
    objective: Literal["tokens", "probe"] = "tokens"
    """`tokens`: each image token is trained to be the language model's own input embedding of one
    token of the caption ("T", "arge", "t", ":", " 3", ...), in order, so the language model reads
    the frame as it would read the caption in text (LLaVA's alignment stage in miniature, aimed at
    the embeddings). Needs frames with at least as many image tokens as the caption has tokens.
    `probe`: linear probes read the fields from the merger's tokens (flattened, standardised); the
    tower learns the state in a few steps, but the language model does not learn to read it
    (docs/demo.md has both measured)."""
    seed: int = 0
    progress: bool = True


def _fields(caption: str) -> list[str]:
    return [f.strip() for f in caption.replace(";", ".").split(".") if f.strip()]


def _heldout(caption: str, frac: float) -> bool:
    """A stable split by caption: the same state is always on the same side."""
    h = int(hashlib.sha256(caption.encode()).hexdigest()[:8], 16)
    return (h % 10_000) / 10_000 < frac


def collect_frames(cfg: WarmupConfig) -> list[tuple[Any, str]]:
    """(PIL frame, caption) for `frames` reset seeds."""
    options = {**cfg.env.options, "text_state": True}  # the caption; the image is the same either way
    pool = EnvPool(cfg.env.url, cfg.env.env_id, 1, options, cfg.env.timeout_s, cfg.env.retries)
    frames = []
    try:
        for i in range(cfg.frames):
            seed = cfg.seed * 1_000_003 + i
            r = pool.open([seed])[0] if i == 0 else pool.reset(0, seed)
            obs = r.observation
            if not obs.image:
                raise ValueError(f"{cfg.env.env_id} gives no image: nothing to read")
            if not (obs.text or "").strip():
                raise ValueError(f"{cfg.env.env_id} gives no observation text with text_state: true: frames have no labels")
            frames.append((b64_to_image(obs.image).convert("RGB"), obs.text.strip()))
    finally:
        pool.close()
    return frames


class FieldProbes(nn.Module):
    """One linear classifier per caption field over the flattened merger tokens of a frame."""

    def __init__(self, n_tokens: int, hidden: int, classes: list[int]):
        super().__init__()
        # Frames share almost every pixel: a random tower's features differ by little between
        # states. Standardising each feature over the batch lets the probes see those differences.
        self.norm = nn.BatchNorm1d(n_tokens * hidden, affine=False)
        self.heads = nn.ModuleList(nn.Linear(n_tokens * hidden, c) for c in classes)

    def forward(self, feats: torch.Tensor) -> list[torch.Tensor]:
        flat = self.norm(feats.reshape(feats.shape[0], -1))
        return [h(flat) for h in self.heads]


class CaptionTokens(nn.Module):
    """Targets for the `tokens` objective: the caption's token embeddings, one per image token.

    Image token k of a frame is pulled towards E[caption_k], the language model's own (frozen)
    input embedding of the caption's k-th token, and pushed away from the other rows of E
    (cross-entropy over minus the squared distances to the rows of E) plus a relative squared
    error that keeps its scale at the embeddings'. Image tokens after the
    caption's last one are pulled towards E[pad]. Reading a frame back = the nearest row of E for
    each image token, decoded: the caption the language model sees in place of the image."""

    def __init__(self, tokenizer, embeddings: torch.Tensor, n_tokens: int, captions: list[str]):
        super().__init__()
        self.tokenizer = tokenizer
        self.register_buffer("E", embeddings.detach().clone(), persistent=False)
        self.n_tokens = n_tokens
        self.tau = float(0.1 * (embeddings.detach() ** 2).sum(-1).mean())
        longest = max(captions, key=lambda c: len(self.ids(c)))
        if len(self.ids(longest)) > n_tokens:
            raise ValueError(f"captions take up to {len(self.ids(longest))} tokens ({longest!r}) but a frame gives "
                             f"{n_tokens} image tokens: raise the frame size (image_max_pixels) or use objective: probe")
        # Filler after the caption: the image placeholder's own token (the pad token's row can be
        # all zeros: padding_idx), whose embedding the language model never sees otherwise.
        filler = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.pad = int(filler if isinstance(filler, int) and filler != tokenizer.unk_token_id else tokenizer.eos_token_id)

    def ids(self, caption: str) -> list[int]:
        return self.tokenizer(caption, add_special_tokens=False)["input_ids"]

    def targets(self, captions: list[str]) -> torch.Tensor:
        rows = [self.ids(c) for c in captions]
        return torch.tensor([r + [self.pad] * (self.n_tokens - len(r)) for r in rows], dtype=torch.long)

    def loss(self, feats: torch.Tensor, captions: list[str]) -> torch.Tensor:
        t = self.targets(captions)
        # Logits: minus the squared distance to every row of E, on the scale of the rows' norms
        # (a dot product with rows of norm ~0.3 gives logits too flat to learn from).
        d2 = torch.cdist(feats, self.E.unsqueeze(0).expand(feats.shape[0], -1, -1)) ** 2
        ce = nn.functional.cross_entropy((-d2 / self.tau).flatten(0, 1), t.flatten())
        e = self.E[t]
        rel = ((feats - e) ** 2).sum(-1) / (e ** 2).sum(-1).clamp_min(1e-6)
        return ce + rel.mean()

    def read(self, feats: torch.Tensor) -> list[str]:
        """The caption each frame's image tokens spell (nearest embedding by L2; padding dropped)."""
        d = torch.cdist(feats, self.E.unsqueeze(0).expand(feats.shape[0], -1, -1))
        return [self.tokenizer.decode([i for i in row.tolist() if i != self.pad]) for row in d.argmin(-1)]

    def accuracy(self, features, frames) -> dict[str, float]:
        if not frames:
            return {"field": float("nan"), "exact": float("nan"), "token": float("nan")}
        field_hits, exact, tok_hits = [], [], []
        with torch.no_grad():
            for i in range(0, len(frames), 32):
                chunk = frames[i:i + 32]
                feats = features([f for f, _ in chunk])
                d = torch.cdist(feats, self.E.unsqueeze(0).expand(feats.shape[0], -1, -1))
                t = self.targets([c for _, c in chunk])
                tok_hits.append((d.argmin(-1) == t).float().mean(-1))
                for (_, cap), read in zip(chunk, self.read(feats), strict=True):
                    want, got = _fields(cap), _fields(read)
                    got += [""] * (len(want) - len(got))
                    field_hits.append(np.mean([w == g for w, g in zip(want, got)]))
                    exact.append(float(read.strip() == cap.strip()))
        return {"field": float(np.mean(field_hits)), "exact": float(np.mean(exact)),
                "token": float(torch.cat(tok_hits).mean())}


def _encode(image_processor, image) -> tuple[torch.Tensor, torch.Tensor]:
    """A frame's (pixel_values, image_grid_thw), computed once: the warm-up revisits every frame
    each epoch, and the image processor costs about as much as the small tower's forward."""
    enc = image_processor(images=[image], return_tensors="pt")
    return enc["pixel_values"], enc["image_grid_thw"]


def _features(model, encoded) -> torch.Tensor:
    """[B, n_tokens, hidden]: the merger's output for each encoded frame (all share one size)."""
    out = model.model.get_image_features(torch.cat([e[0] for e in encoded]), torch.cat([e[1] for e in encoded]))
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    return torch.stack(list(feats))


def _accuracy(model, probes, frames, labels) -> dict[str, float]:
    if not frames:
        return {"field": float("nan"), "exact": float("nan")}
    hits = []
    with torch.no_grad():
        for i in range(0, len(frames), 32):
            logits = probes(_features(model, [f for f, _ in frames[i:i + 32]]))
            pred = torch.stack([lg.argmax(-1) for lg in logits], dim=1)
            hits.append(pred == labels[i:i + 32])
    h = torch.cat(hits).float()
    return {"field": float(h.mean()), "exact": float(h.all(dim=1).float().mean())}


def run_warmup(cfg: WarmupConfig) -> dict[str, Any]:
    """Frames -> vision tower + probes trained -> held-out accuracy -> new base at cfg.out.
    Returns a summary (also in out/warmup_summary.json)."""
    from shared.models import load_model, load_processor

    if not cfg.model:
        raise ValueError("model is not set (the model directory to warm up)")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    processor = load_processor(cfg.model)
    frames = [(_encode(processor.image_processor, img), c) for img, c in collect_frames(cfg)]
    n_fields = len(_fields(frames[0][1]))
    if any(len(_fields(c)) != n_fields for _, c in frames):
        raise ValueError(f"{cfg.env.env_id}: captions do not split into the same fields on every frame")
    train = [f for f in frames if not _heldout(f[1], cfg.heldout_frac)]
    held = [f for f in frames if _heldout(f[1], cfg.heldout_frac)]
    if not train or not held:
        k = max(1, int(len(frames) * cfg.heldout_frac))
        train, held = frames[:-k], frames[-k:]
    # Classes per field: the values seen in training (a held-out value never seen is a miss).
    vocab = [sorted({_fields(c)[j] for _, c in train}) for j in range(n_fields)]

    def labels_of(fs):
        return torch.tensor([[vocab[j].index(v) if v in vocab[j] else -1 for j, v in enumerate(_fields(c))]
                             for _, c in fs], dtype=torch.long)

    y_train, y_held = labels_of(train), labels_of(held)
    model = load_model(cfg.model, "cpu", "float32")
    for name, p in model.named_parameters():
        p.requires_grad_(".visual." in f".{name}")
    model.train()
    with torch.no_grad():
        sample = _features(model, [train[0][0]])
    chance = [1.0 / len(v) for v in vocab]  # a uniform guess over the values seen in training
    probes = FieldProbes(sample.shape[1], sample.shape[2], [len(v) for v in vocab])
    head: nn.Module = probes
    if cfg.objective == "tokens":
        head = CaptionTokens(processor.tokenizer, model.get_input_embeddings().weight, sample.shape[1],
                             [c for _, c in frames])
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    rng = np.random.default_rng(cfg.seed)
    steps = cfg.epochs * int(np.ceil(len(train) / cfg.batch_size))
    ramp = max(1, int(cfg.lr_ramp * steps)) if cfg.lr_ramp else 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr_factor(s, steps, warmup=ramp))
    losses, lrs = [], []
    bar = tqdm(total=steps, desc=f"vision warm-up ({cfg.objective})", disable=not cfg.progress)
    try:
        for _epoch in range(cfg.epochs):
            perm, epoch_loss = rng.permutation(len(train)), []
            for s in range(0, len(perm), cfg.batch_size):
                idx = [int(i) for i in perm[s:s + cfg.batch_size]]
                feats = _features(model, [train[i][0] for i in idx])
                if cfg.objective == "tokens":
                    loss = head.loss(feats, [train[i][1] for i in idx])
                else:
                    loss = sum(nn.functional.cross_entropy(lg, y_train[idx, j])
                               for j, lg in enumerate(probes(feats))) / n_fields
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                sched.step()
                epoch_loss.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            losses.append(float(np.mean(epoch_loss)))
            lrs.append(sched.get_last_lr()[0])
    finally:
        bar.close()
    model.eval()
    head.eval()
    if cfg.objective == "tokens":
        held_acc = head.accuracy(lambda fs: _features(model, fs), held)
        train_acc = head.accuracy(lambda fs: _features(model, fs), train[:len(held)])
    else:
        held_acc = _accuracy(model, head, held, y_held)
        train_acc = _accuracy(model, head, train[:len(held)], y_train[:len(held)])

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for p in model.parameters():
        p.requires_grad_(False)
    model.save_pretrained(str(out), safe_serialization=True)
    for f in Path(cfg.model).iterdir():  # tokenizer, image processor, chat template: the source's
        if f.is_file() and f.name not in WEIGHT_FILES and not f.name.endswith((".safetensors", ".bin")):
            shutil.copy2(f, out / f.name)
    dump_config(cfg, out / "warmup_config.yaml")
    summary = {
        "out": str(out), "env_id": cfg.env.env_id, "frames": len(frames), "train_frames": len(train),
        "heldout_frames": len(held), "distinct_states": len({c for _, c in frames}),
        "heldout_states": len({c for _, c in held}), "fields": n_fields,
        "heldout_field_accuracy": held_acc["field"], "heldout_exact_accuracy": held_acc["exact"],
        "train_field_accuracy": train_acc["field"], "chance_field_accuracy": float(np.mean(chance)),
        "objective": cfg.objective, "image_tokens": int(sample.shape[1]),
        **({"heldout_token_accuracy": held_acc["token"], "heldout_read": [
            {"caption": c, "read": r} for (_, c), r in zip(held[:4], head.read(_features(
                model, [f for f, _ in held[:4]])), strict=True)]} if cfg.objective == "tokens" else {}),
        "losses": losses, "lr_by_epoch": lrs, "seconds": time.perf_counter() - t0,
    }
    (out / "warmup_summary.json").write_text(json.dumps(summary, indent=2))
    log.info("vision warm-up on %s: held-out field accuracy %.2f (chance %.2f), all fields %.2f, train %.2f, in %.0fs",
             cfg.env.env_id, held_acc["field"], summary["chance_field_accuracy"], held_acc["exact"], train_acc["field"],
             summary["seconds"])
    return summary
