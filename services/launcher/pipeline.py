"""The base every CPU run starts from, as `gtr demo` and `gtr experiment` build it:
the `small` offline model -> vision warm-up (when the game is played from pixels) -> SFT-init.

Settings come from the preset's `demo:` / `experiment:` section: `env_id`, `env_options`,
`model_seed`, `image_max_pixels` (smaller frames: fewer image tokens), `warmup` (WarmupConfig keys; `warmup: {enabled: false}` skips it; by default it
runs exactly when `env_options.text_state` is off), `sft` (SFTConfig keys), `sft_lora`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


def warmup_wanted(settings: dict[str, Any]) -> bool:
    w = dict(settings.get("warmup") or {})
    if "enabled" in w:
        return bool(w["enabled"])
    return not (settings.get("env_options") or {}).get("text_state", False)


def set_max_pixels(model_dir: str | Path, max_pixels: int) -> None:
    """Frames resized to at most `max_pixels` by the model's image processor (Qwen's smart resize:
    sides in multiples of 28), i.e. fewer image tokens: 84 x 84 -> 9 tokens where the small
    model's 168 x 168 gives 36. Every later stage copies the processor from this directory."""
    f = Path(model_dir) / "preprocessor_config.json"
    pp = json.loads(f.read_text())
    if max_pixels < pp["size"]["shortest_edge"]:
        raise ValueError(f"image_max_pixels {max_pixels} is below the processor's min_pixels {pp['size']['shortest_edge']}")
    pp["size"]["longest_edge"] = max_pixels
    f.write_text(json.dumps(pp, indent=2, sort_keys=True) + "\n")


def prepare_base(settings: dict[str, Any], env_url: str, models_dir: Path, reuse: bool = False,
                 phase: Callable[[str, float], None] | None = None) -> dict[str, Any]:
    """Build the base; returns {path, info: {warmup, sft}} (info also in models_dir/base.json).
    With reuse, a finished base in models_dir is used as is (an experiment resumed)."""
    from services.trainer.sft_init import SFTConfig, run_sft
    from services.trainer.warmup import WarmupConfig, run_warmup
    from shared.config import build_config
    from shared.tiny_model import build_tiny_model

    phase = phase or (lambda name, t0: log.info("%s: %.0fs", name, time.perf_counter() - t0))
    models_dir = Path(models_dir)
    done = models_dir / "base.json"
    if reuse and done.exists():
        return json.loads(done.read_text())
    env_id, env_options = settings["env_id"], settings.get("env_options", {}) or {}
    lora = settings.get("sft_lora", {"r": 16, "alpha": 32})

    t0 = time.perf_counter()
    model = str(build_tiny_model(models_dir / "small", seed=int(settings.get("model_seed", 0)), size="small"))
    if settings.get("image_max_pixels"):
        set_max_pixels(model, int(settings["image_max_pixels"]))
    phase("build_model", t0)

    info: dict[str, Any] = {"warmup": None}
    if warmup_wanted(settings):
        t0 = time.perf_counter()
        w = {k: v for k, v in (settings.get("warmup") or {}).items() if k != "enabled"}
        wcfg = build_config(WarmupConfig, {
            "model": model, "env": {"url": env_url, "env_id": env_id, "options": env_options},
            "out": str(models_dir / "warm-base"), **w,
        }, source="vision warm-up")
        ws = run_warmup(wcfg)
        ws.pop("losses", None)
        ws.pop("lr_by_epoch", None)
        info["warmup"] = ws
        model = ws["out"]
        phase("vision_warmup", t0)

    t0 = time.perf_counter()
    sft_cfg = build_config(SFTConfig, {
        "model": {"path": model, "device": "cpu", "lora": lora},
        "env": {"url": env_url, "env_id": env_id, "options": env_options},
        "out": str(models_dir / "sft-base"), **(settings.get("sft") or {}),
    }, source="sft-init")
    sft = run_sft(sft_cfg)
    info["sft"] = {k: sft.get(k) for k in ("demonstrations", "episodes", "expert_success_rate", "losses")}
    phase("sft_init", t0)
    out = {"path": sft["out"], "info": info}
    done.write_text(json.dumps(out, indent=2))
    return out
