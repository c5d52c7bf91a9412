"""Parse and validate an uploaded peft LoRA adapter against the base model's parameters.

An adapter is what peft's `save_pretrained` writes: `adapter_model.safetensors` (tensors named
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight`) and `adapter_config.json`.
`adapter_config.base_model_name_or_path` says nothing reliable (a path on the trainer's disk),
so the base is checked by what matters: every LoRA module names a base parameter, and the
shapes of A [r, in] and B [out, r] match it.

The full delta of a module is `scaling * B @ A` with `scaling = alpha / r` (or
`alpha / sqrt(r)` with rsLoRA), per module rank and alpha from `rank_pattern` /
`alpha_pattern` where set - exactly what peft's `get_delta_weight` computes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

# `regex`, not `re`: client patterns are matched with a timeout (no catastrophic backtracking).
import regex
import torch

from shared.codecs import CodecError, bytes_to_tensors
from services.teacher.errors import BaseMismatch, InvalidInput

# Prefixes peft (and wrappers around the model) put in front of the module path.
_PEFT_PREFIX = "base_model.model."
# transformers 4.x named Qwen2.5-VL's submodules differently; map them onto the 5.x names.
_LEGACY_PREFIXES = (("model.layers.", "model.language_model.layers."),
                    ("model.embed_tokens.", "model.language_model.embed_tokens."),
                    ("model.norm.", "model.language_model.norm."),
                    ("visual.", "model.visual."))
_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")


@dataclass
class LoraFactor:
    """One LoRA module of one checkpoint: delta = scaling * B @ A (transposed for embeddings)."""

    A: torch.Tensor
    """[r, in] (embeddings: [r, num_embeddings])."""
    B: torch.Tensor
    """[out, r] (embeddings: [embedding_dim, r])."""
    scaling: float
    embedding: bool = False

    def delta_shape(self) -> tuple[int, int]:
        out, inp = int(self.B.shape[0]), int(self.A.shape[1])
        return (inp, out) if self.embedding else (out, inp)

    def delta_into(self, out: torch.Tensor) -> torch.Tensor:
        """Write the delta into `out` (fp32, preallocated): no temporary of the module's size."""
        A = self.A.to(device=out.device, dtype=out.dtype)
        B = self.B.to(device=out.device, dtype=out.dtype)
        if self.embedding:
            torch.matmul(A.T, B.T, out=out)  # (B @ A).T
        else:
            torch.matmul(B, A, out=out)
        return out.mul_(self.scaling)

    def delta(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        A = self.A.to(device=device, dtype=dtype)
        B = self.B.to(device=device, dtype=dtype)
        d = B @ A
        if self.embedding:  # peft's Embedding.get_delta_weight: transpose(B @ A) * scaling
            d = d.T.contiguous()
        return d.mul_(self.scaling)


@dataclass
class Adapter:
    """A validated adapter: its LoRA factors keyed by the base parameter they change."""

    factors: dict[str, LoraFactor]
    rank: int
    alpha: float
    use_rslora: bool
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def parameter_names(self) -> list[str]:
        return sorted(self.factors)


def _bad(detail: str) -> InvalidInput:
    return InvalidInput(detail, "bad_adapter")


def _foreign(detail: str) -> BaseMismatch:
    return BaseMismatch(detail)


MAX_CONFIG_BYTES = 1 << 20
MAX_RANK = 4096
MAX_ALPHA = 1e4
"""|lora_alpha| bound: peft's scaling alpha / r multiplies every delta; 1e300 poisoned the teacher."""
MAX_WEIGHT = 1e4
"""|entry| bound of a LoRA A or B tensor (trained values are ~1e-2..1; 1e30 poisoned the teacher)."""
MAX_PATTERNS = 10_000
PATTERN_TIMEOUT_S = 0.05
"""rank/alpha pattern keys are client regexes matched against module paths: bounded time."""


def _number(value: Any, where: str, lo: float, hi: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise _bad(f"{where} must be a finite number, got {value!r}")
    if not lo < value <= hi:
        raise _bad(f"{where} must be in ({lo:g}, {hi:g}], got {value!r}")
    return float(value)


def _rank(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_RANK:
        raise _bad(f"{where} must be an integer in [1, {MAX_RANK}], got {value!r}")
    return value


def _patterns(cfg: dict[str, Any], key: str, check) -> dict[str, Any]:
    patterns = cfg.get(key) or {}
    if not isinstance(patterns, dict):
        raise _bad(f"adapter_config.{key} must be an object")
    if len(patterns) > MAX_PATTERNS:
        raise _bad(f"adapter_config.{key} has {len(patterns)} entries; the limit is {MAX_PATTERNS}")
    compiled = {}
    for pat, value in patterns.items():
        check(value, f"adapter_config.{key}[{pat!r}]")
        try:
            compiled[regex.compile(rf"(.*\.)?({pat})$")] = value
        except (regex.error, RecursionError, OverflowError) as e:
            raise _bad(f"adapter_config.{key} key {pat!r} is not a valid regular expression: {e}") from None
    return compiled


def parse_config(config_bytes: bytes) -> dict[str, Any]:
    """The adapter config, every numeric checked (finite, in range) and every pattern compiled.

    `rank_pattern` / `alpha_pattern` come back as {compiled regex: value} under the keys
    `_rank_patterns` / `_alpha_patterns`.
    """
    if len(config_bytes) > MAX_CONFIG_BYTES:
        raise _bad(f"adapter_config is {len(config_bytes)} bytes; the limit is {MAX_CONFIG_BYTES}")
    try:
        cfg = json.loads(config_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(f"adapter_config is not valid JSON: {e}") from e
    except RecursionError:
        raise _bad("adapter_config is nested too deeply") from None
    if not isinstance(cfg, dict):
        raise _bad("adapter_config must be a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise _bad(f"peft_type must be LORA, got {cfg.get('peft_type')!r}")
    for flag in ("use_dora", "fan_in_fan_out", "lora_bias"):
        if cfg.get(flag):
            raise _bad(f"adapter_config.{flag}=true is not supported (plain LoRA only)")
    if cfg.get("modules_to_save"):
        raise _bad("adapter_config.modules_to_save is not supported: only LoRA deltas can be merged")
    _rank(cfg.get("r"), "adapter_config.r")
    _number(cfg.get("lora_alpha"), "adapter_config.lora_alpha", 0.0, MAX_ALPHA)
    cfg["_rank_patterns"] = _patterns(cfg, "rank_pattern", _rank)
    cfg["_alpha_patterns"] = _patterns(cfg, "alpha_pattern", lambda v, w: _number(v, w, 0.0, MAX_ALPHA))
    return cfg


def _pattern_value(patterns: dict[Any, Any], module: str, default):
    """peft's rule (`get_pattern_key`): a pattern applies when it matches the module path's end."""
    for pat, value in patterns.items():
        try:
            if pat.match(module, timeout=PATTERN_TIMEOUT_S):
                return value
        except TimeoutError:
            raise _bad(f"adapter pattern {pat.pattern!r} takes too long to match {module!r}") from None
    return default


def module_scaling(cfg: dict[str, Any], module: str) -> tuple[int, float]:
    """(rank, scaling) of one module under the adapter config (rank/alpha patterns, rsLoRA)."""
    r = _pattern_value(cfg["_rank_patterns"], module, cfg["r"])
    alpha = _pattern_value(cfg["_alpha_patterns"], module, cfg["lora_alpha"])
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return r, float(scaling)


def resolve_module(module: str, base_shapes: dict[str, tuple[int, ...]]) -> str | None:
    """The base parameter (`<module>.weight`) a LoRA module path refers to, or None.

    Tries the path as is, then with leading components dropped (a trainer that wraps the VLM
    in its own module adds a prefix), then transformers-4.x names mapped to 5.x.
    """
    if module.startswith(_PEFT_PREFIX):
        module = module[len(_PEFT_PREFIX):]
    parts = module.split(".")
    for i in range(len(parts)):
        cand = ".".join(parts[i:])
        for old, new in ((None, None),) + _LEGACY_PREFIXES:
            name = cand if old is None else (new + cand[len(old):] if cand.startswith(old) else None)
            if name is not None and f"{name}.weight" in base_shapes:
                return f"{name}.weight"
    return None


def parse_adapter(model_bytes: bytes, config_bytes: bytes, base_shapes: dict[str, tuple[int, ...]]) -> Adapter:
    """Validate an upload; raise InvalidInput (malformed) or BaseMismatch (foreign base), or return it."""
    cfg = parse_config(config_bytes)
    try:
        tensors = bytes_to_tensors(model_bytes)
    except CodecError as e:
        raise _bad(f"adapter_model: {e}") from e
    if not tensors:
        raise _bad("adapter_model holds no tensors")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise _bad(f"unexpected tensor {key!r}: only LoRA A/B weights are accepted")
        if not t.is_floating_point():
            raise _bad(f"{key} has dtype {t.dtype}; LoRA weights must be floating point")
        if t.dim() != 2:
            raise _bad(f"{key} has shape {tuple(t.shape)}; only 2-D (linear / embedding) LoRA weights are supported")
        if not torch.isfinite(t).all():
            raise _bad(f"{key} holds NaN or inf")
        if t.numel() and float(t.abs().max()) > MAX_WEIGHT:
            raise _bad(f"{key} has entries of magnitude {float(t.abs().max()):.3g}; LoRA weights must stay "
                       f"within {MAX_WEIGHT:g}")
        kind = m["kind"].replace("embedding_", "")
        slot = modules.setdefault(m["module"], {})
        slot[kind] = t
        slot["embedding"] = "embedding" in m["kind"]  # type: ignore[assignment]
    factors: dict[str, LoraFactor] = {}
    for module, slot in sorted(modules.items()):
        if "lora_A" not in slot or "lora_B" not in slot:
            raise _bad(f"module {module} lacks its {'lora_B' if 'lora_A' in slot else 'lora_A'} weight")
        param = resolve_module(module, base_shapes)
        if param is None:
            raise _foreign(f"adapter module {module} has no counterpart in the base model: wrong base model?")
        if param in factors:
            raise _bad(f"two adapter modules map onto {param}")
        r, scaling = module_scaling(cfg, param[: -len(".weight")])
        A, B, emb = slot["lora_A"], slot["lora_B"], bool(slot["embedding"])
        if A.shape[0] != r or B.shape[1] != r:
            raise _bad(f"{module}: A is {tuple(A.shape)} and B is {tuple(B.shape)}, expected rank {r} "
                       "(adapter_config r / rank_pattern)")
        want = tuple(base_shapes[param])
        got = (A.shape[1], B.shape[0]) if emb else (B.shape[0], A.shape[1])
        if len(want) != 2 or got != want:
            raise _foreign(f"{module}: B @ A has shape {got} but the base parameter {param} has shape {want}")
        factors[param] = LoraFactor(A.contiguous(), B.contiguous(), scaling, emb)
    return Adapter(factors=factors, rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                   use_rslora=bool(cfg.get("use_rslora")), config=cfg)
