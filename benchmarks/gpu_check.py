"""GPU checks at the real size (issue 15): random-weight Qwen2.5-VL-3B / -7B in bf16, built offline.

    bash scripts/gpu_check.sh            # on the lent GPU machine (installs carried wheels first)
    python -m benchmarks.gpu_check --cpu-smoke   # the same code path on CPU with a shrunken config

Per size, in order, each stage skipped when the time budget cannot fit it (results are written
after every stage, so a timeout still leaves what was measured):
1. build: the real config (shared.real_configs), the real Qwen vocabulary (shared.qwen_tokenizer),
   random bf16 weights made on the device, saved as a model directory;
2. teacher: the `hf` backend's /v1/logits scoring against a plain forward of the same weights, at
   version 0 and after a TIES merge of 2 random r128 checkpoints; the merged weights against
   W0 + tau; peak GPU memory while scoring and merging;
3. merge: seconds to merge K = 2, 4, 8, 16 random LoRA r128 checkpoints on all linear layers of
   the language model (TIES, density 0.5), computed on the GPU, the merged delta returned to the
   host as the teacher service does (`--merge-device cuda`);
4. trainer: seconds per update and per phase with guidance none and kl on points24 at the
   preset's settings (configs/points24-kl.yaml) with fewer steps per update, env service and
   teacher as their own processes (teacher on the same GPU); the trainer's peak GPU memory per
   phase (its memory/* metrics) and the teacher process's GPU memory (nvidia-smi).
Writes bench-results/gpu.json (and $OUT/gpu.json when $OUT is set).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("gpu_check")

# The CPU smoke test's shrunken model: real vocabulary and image settings, tiny body.
SMOKE_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
SMOKE_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2)


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, need_s: float, what: str, res: dict) -> bool:
        if self.left() >= need_s:
            return True
        res.setdefault("skipped", []).append(f"{what} (needs ~{need_s:.0f}s, {self.left():.0f}s left)")
        log.warning("skipping %s: ~%.0fs needed, %.0fs left", what, need_s, self.left())
        return False


def write(res: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    extra = os.environ.get("OUT")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        (Path(extra) / out.name).write_text(json.dumps(res, indent=2) + "\n")


def gpu_mb(torch, device) -> dict:
    if device.type != "cuda":
        return {}
    return {"allocated_mb": round(torch.cuda.memory_allocated(device) / 2**20), "peak_mb":
            round(torch.cuda.max_memory_allocated(device) / 2**20)}


# ----------------------------------------------------------------------------------- 1. build


class _ConfigOnly:
    """Stands in for the model in save_model_dir: config files, no weights (nothing reloads them)."""

    def __init__(self, model):
        self.model = model

    def save_pretrained(self, out, **_):
        self.model.config.save_pretrained(out)
        self.model.generation_config.save_pretrained(out)


def build(size: str, out: Path, device, dtype, smoke: bool, ranks: str | None, save_weights: bool):
    """(figures, model): the model lives on `device`; its directory holds the tokenizer, processor
    and config, and the weights only when a later stage reloads them (the trainer)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from shared.qwen_tokenizer import build_qwen2_tokenizer
    from shared.real_configs import qwen25_vl_config
    from shared.tiny_model import save_model_dir

    t0 = time.perf_counter()
    cfg = qwen25_vl_config(size, vision_overrides=SMOKE_VISION if smoke else None, **(SMOKE_TEXT if smoke else {}))
    tok = build_qwen2_tokenizer(ranks)
    t_tok = time.perf_counter() - t0
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.eval()
    t_init = time.perf_counter() - t0 - t_tok
    save_model_dir(out, model if save_weights else _ConfigOnly(model), tok, max_pixels=12845056, min_pixels=3136,
                   chat_template=tok.chat_template)
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "tokenizer_s": round(t_tok, 1), "init_s": round(t_init, 1), "weights_saved": save_weights,
            "save_s": round(time.perf_counter() - t0 - t_tok - t_init, 1)}, model


# ------------------------------------------------------------------------------ 2. the teacher


def random_adapters(base_shapes: dict, k: int, r: int, device, seed: int, targets: str) -> list:
    """K random LoRA checkpoints (A, B ~ N(0, 1/r)) on every language-model linear layer."""
    import re

    import torch

    from services.teacher.adapters import Adapter, LoraFactor

    pat = re.compile(targets)
    names = [n for n, s in base_shapes.items() if len(s) == 2 and n.endswith(".weight") and pat.match(n[:-7])]
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _ in range(k):
        factors = {}
        for n in names:
            o, i = base_shapes[n]
            A = torch.randn(r, i, generator=g, device=device) / r ** 0.5
            B = torch.randn(o, r, generator=g, device=device) * 1e-3
            factors[n] = LoraFactor(A=A, B=B, scaling=2.0)
        out.append(Adapter(factors=factors, rank=r, alpha=2.0 * r, use_rslora=False))
    return out


LM_LINEAR = (r".*language_model\.layers\.\d+\.(?:self_attn|mlp)\."
             r"(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$")


def teacher_items(n: int, completion_len: int, tokenizer):
    """n /v1/logits items: real Points24 observations (image + prompt), completions of about
    `completion_len` tokens (lengths differ, so scoring pads)."""
    from services.envs.registry import Registry
    from shared.prompting import observation_messages
    from shared.schemas import LogitsItem

    filler = tokenizer(' "thoughts": "8 / (3 - 8 / 3) = 24, so I start with 8", "action": "8"',
                       add_special_tokens=False)["input_ids"]
    items = []
    for i in range(n):
        obs, _ = Registry().make("points24").reset(seed=100 + i)
        msgs = observation_messages(obs_dict(obs))
        ids = (filler * (completion_len // len(filler) + 1))[: completion_len - 7 * i]
        items.append(LogitsItem(messages=msgs, completion_ids=ids))
    return items


def plain_logprobs(model, processor, item):
    """log softmax of a plain single-item forward (no padding, no chunking), fp32."""
    import torch

    from shared.chat import encode, encode_prompt, token_logprobs

    p = encode_prompt(processor, [m.model_dump() for m in item.messages])
    single = encode(processor, [p], [list(item.completion_ids)], device=next(model.parameters()).device)
    n = len(item.completion_ids)
    with torch.inference_mode():
        logits = model(**single.inputs).logits[0]
    return token_logprobs(logits[-n - 1:-1], single.inputs["input_ids"][0, -n:])


def teacher_check(model_dir: Path, model, device, smoke: bool, res: dict) -> None:
    import torch

    from services.teacher.backends.hf import HFBackend
    from services.teacher.merging import merge_adapters, merge_weights
    from shared.models import load_processor

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    backend = HFBackend(model_dir, loaded=(model, load_processor(model_dir)))
    res["loaded"] = gpu_mb(torch, device)
    items = teacher_items(2 if smoke else 8, 32 if smoke else 256, backend.tokenizer)

    def compare(tag: str) -> None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        version, results = backend.logprobs(items)
        seconds = time.perf_counter() - t0
        mem = gpu_mb(torch, device)
        errs = []
        for it, r in zip(items, results, strict=True):
            ref = plain_logprobs(backend.model, backend.processor, it)
            errs.append(float((torch.tensor(r.logprobs) - ref.cpu()).abs().max()))
        res[tag] = {"version": version, "items": len(items), "tokens": sum(len(i.completion_ids) for i in items),
                    "max_abs_err": max(errs), "mean_item_max_abs_err": sum(errs) / len(errs),
                    "logits_seconds": round(seconds, 3), **{f"scoring_{k}": v for k, v in mem.items()}}

    compare("version0")
    adapters = random_adapters(backend.base_parameters(), 2, 8 if smoke else 128, device, seed=1, targets=LM_LINEAR)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    merged = merge_adapters(adapters, merge_weights(2), "ties", 0.5, 1.0, device=device, out_device="cpu")
    backend.apply_delta(merged.delta, version=1)
    res["merge_apply"] = {"seconds": float(f"{time.perf_counter() - t0:.3g}"), "modules": len(merged.delta),
                          **gpu_mb(torch, device)}
    # The served weights are exactly W0 + tau (up to the model dtype's rounding).
    name = sorted(merged.delta)[0]
    w = dict(backend.model.named_parameters())[name].detach().float()
    w0 = backend._w0[name]
    expect = (w0.float() + merged.delta[name].to(w0.device).float()).to(w0.dtype).float().to(w.device)
    res["merge_apply"]["weight_max_abs_err"] = float((w - expect).abs().max())
    res["merge_apply"]["delta_rms"] = float(merged.delta[name].float().pow(2).mean().sqrt())
    del adapters, merged
    compare("after_ties_merge")
    backend.close()
    backend = model = None  # free the weights before the next stage
    if device.type == "cuda":
        torch.cuda.empty_cache()


def merge_bench(model_dir: Path, device, ks: list[int], rank: int, budget: Budget, res: dict) -> None:
    import torch
    from transformers import AutoConfig

    from services.teacher.merging import merge_adapters, merge_weights

    # Shapes from the config alone (on the meta device): no second copy of the weights.
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in Qwen2_5_VLForConditionalGeneration(cfg).named_parameters()}
    per_k = res.setdefault("by_k", {})
    last, prev_k = None, 1
    for k in ks:
        if last is not None and not budget.allows(last * k / prev_k * 1.5 + 10, f"merge K={k}", res):
            break
        adapters = random_adapters(shapes, k, rank, device, seed=k, targets=LM_LINEAR)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        result = merge_adapters(adapters, merge_weights(k), "ties", 0.5, 1.0, device=device, out_device="cpu")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        last, prev_k = time.perf_counter() - t0, k
        # Significant digits, not decimals: a K=2 merge on a tiny body takes milliseconds on an idle CPU.
        per_k[str(k)] = {"seconds": float(f"{last:.3g}"), "modules": len(result.delta), **gpu_mb(torch, device)}
        log.info("merge K=%d: %.2fs", k, last)
        del adapters, result
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------- 4. the trainer


def nvidia_smi_mb(pid: int) -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            return float(parts[1])
    return None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_bench(model_dir: Path, work: Path, device, smoke: bool, modes: list[str], updates: int, num_steps: int,
                  budget: Budget, res: dict) -> None:
    from services.launcher.procs import ProcessGroup, gtr_argv
    from services.trainer.config import load_train_config
    from services.trainer.train import train

    env_port, teacher_port = free_port(), free_port()
    env_url, teacher_url = f"http://127.0.0.1:{env_port}", f"http://127.0.0.1:{teacher_port}"
    group = ProcessGroup(work / "logs")
    try:
        group.start("envs", gtr_argv("env", "serve", "--port", str(env_port), "--procs", "0"), url=env_url)
        group.start("teacher", gtr_argv("teacher", "serve", "--backend", "hf", "--model", str(model_dir),
                                        "--store", str(work / "teacher-store"), "--device", device.type,
                                        "--merge-device", device.type, "--port", str(teacher_port)), url=teacher_url)
        group.wait_ready("envs", 120)
        group.wait_ready("teacher", 600)
        for i, mode in enumerate(modes):
            if not budget.allows(res.get("last_mode_s", 60) * 1.2, f"trainer {mode}", res):
                continue
            # The first mode's first update carries the warm-up; later modes run in a warm process.
            n_updates = updates if i == 0 else max(1, updates - 1)
            t0 = time.perf_counter()
            sets = [f"model.path={model_dir}", f"model.device={device.type}", f"env.url={env_url}",
                    f"teacher.url={teacher_url}", f"env.num_steps={num_steps}", f"guidance.mode={mode}",
                    f"ppo.minibatch_size={4 * num_steps}", f"updates={n_updates}", f"run_dir={work / f'train-{mode}'}",
                    "trainer.port=0", "logging.progress=false", "logging.tensorboard=false",
                    "logging.samples_per_update=0"]
            if smoke:
                sets += ["model.dtype=float32", "generation.max_new_tokens=16", "model.lora.r=8",
                         "model.value_head_hidden=16", "ppo.micro_batch_size=2"]
            cfg = load_train_config(str(ROOT / "configs/points24-kl.yaml"), sets)
            train(cfg)
            rows = [json.loads(x) for x in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
            keep = ("time/", "memory/", "teacher/", "rollout/format_ok_rate", "rollout/mean_completion_len")
            res[mode] = {"settings": {"num_envs": cfg.env.num_envs, "num_steps": cfg.env.num_steps,
                                      "max_new_tokens": cfg.generation.max_new_tokens, "lora_r": cfg.model.lora.r,
                                      "micro_batch_size": cfg.ppo.micro_batch_size, "epochs": cfg.ppo.epochs,
                                      "minibatch_size": cfg.ppo.minibatch_size},
                         "updates": [{k: v for k, v in r.items() if k.startswith(keep)} for r in rows],
                         "seconds": round(time.perf_counter() - t0, 1)}
            res["last_mode_s"] = time.perf_counter() - t0
            res["teacher_process_gpu_mb"] = nvidia_smi_mb(group.procs["teacher"].popen.pid)
    finally:
        group.stop()


# ---------------------------------------------------------------------------------------- main


def obs_dict(obs) -> dict:
    """An env's observation as the service sends it (image as base64 PNG), from its public fields."""
    from shared.codecs import image_to_b64

    return {"image": None if obs.image is None else image_to_b64(obs.image), "text": obs.text,
            "instruction": obs.instruction, "admissible_actions": obs.admissible_actions}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="7B,3B", help="in order (default 7B,3B: teacher and merge at 7B first)")
    ap.add_argument("--cpu-smoke", action="store_true", help="shrunken configs on CPU: the code path, not figures")
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="start no stage that would end after this (default 300)")
    ap.add_argument("--out", default=str(ROOT / "bench-results" / "gpu.json"))
    ap.add_argument("--work", default=None, help="model directories and runs (default: a temp dir)")
    ap.add_argument("--ks", default="2,4,8,16")
    ap.add_argument("--trainer-sizes", default="3B", help="sizes the trainer stage runs on (default 3B)")
    ap.add_argument("--modes", default="none,kl")
    ap.add_argument("--updates", type=int, default=2, help="of the first mode (its first is the warm-up); later "
                                                           "modes run one fewer (default 2)")
    ap.add_argument("--num-steps", type=int, default=2, help="steps per env per update (preset: 128; default 2)")
    ap.add_argument("--ranks", default=None, help="qwen.tiktoken (default: dashscope's, or $GTR_QWEN_RANKS)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("httpx", "urllib3", "services.envs"):
        logging.getLogger(name).setLevel(logging.WARNING)
    sys.path.insert(0, str(ROOT))
    import tempfile

    import torch

    budget = Budget(args.budget_s)
    out = Path(args.out)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --cpu-smoke to test the code path on CPU)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if smoke else "cuda")
    dtype, dtype_name = (torch.float32, "float32") if smoke else (torch.bfloat16, "bfloat16")
    if not smoke:
        res_gpu = {"total_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}
    ranks = args.ranks or os.environ.get("GTR_QWEN_RANKS")
    res: dict = {"meta": {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "smoke": smoke, "dtype": dtype_name,
                          "torch": torch.__version__, "device": torch.cuda.get_device_name(0) if not smoke else "cpu",
                          "budget_s": args.budget_s, **({} if smoke else res_gpu)}}
    import transformers

    res["meta"]["transformers"] = transformers.__version__
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gtr-gpu-check-"))
    rank = 8 if smoke else 128
    ks = [int(k) for k in args.ks.split(",")]
    status = 0
    for size in args.sizes.split(","):
        r = res.setdefault(size, {})
        model_dir = work / f"qwen25-vl-{size}"
        trains = size in args.trainer_sizes.split(",")
        stages = [("build", (60 if size == "3B" else 120) if trains else 40), ("teacher", 60), ("merge", 60)]
        if trains:
            stages.append(("trainer", 200))
        model = None
        for stage, need in stages:
            if not budget.allows(need if not smoke else 0, f"{size} {stage}", res):
                continue
            t0 = time.perf_counter()
            try:
                if stage == "build":
                    r["build"], model = build(size, model_dir, device, dtype, smoke, ranks, save_weights=trains)
                elif stage == "teacher":
                    teacher_check(model_dir, model, device, smoke, r.setdefault("teacher", {}))
                    model = None
                elif stage == "merge":
                    merge_bench(model_dir, device, ks, rank, budget, r.setdefault("merge", {"rank": rank}))
                else:
                    trainer_bench(model_dir, work / f"runs-{size}", device, smoke, args.modes.split(","), args.updates,
                                  args.num_steps, budget, r.setdefault("trainer", {}))
            except Exception as e:  # noqa: BLE001 - one failed stage must not lose the others' figures
                log.exception("%s %s failed", size, stage)
                r.setdefault("errors", {})[stage] = f"{type(e).__name__}: {e}"
                status = 1
                if stage == "build":
                    break
            finally:
                r.setdefault("stage_seconds", {})[stage] = round(time.perf_counter() - t0, 1)
                write(res, out)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        model = None
    write(res, out)
    print(json.dumps(res, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
