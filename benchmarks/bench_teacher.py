"""Teacher benchmarks (issue 4), written as JSON by `make bench` / `python -m benchmarks.run_all teacher`.

1. Merge: seconds and peak extra memory of our exact module-by-module TIES for K = 2, 4, 8, 16
   LoRA checkpoints over real model module shapes, against peft's
   `add_weighted_adapter(combination_type="ties_svd")` at full rank (the only peft mode that can
   be exact, DESIGN §5.2), checking both give the same merge. Also reported: the relative
   error of peft's plain `ties` (TIES on A and B separately) against the exact merge.
   Each measurement runs in its own process; memory is the peak RSS above the RSS just before
   the merge (sampled every 2 ms), or CUDA's peak allocation on a GPU.
2. `/v1/logits` through HTTP (a `python -m services.teacher` process) vs the same scoring in
   process (`HFBackend.logprobs`), batch 8, the `small` model; medians over interleaved rounds.

Environment knobs: GTR_BENCH_SHAPES=qwen2.5-0.5b|qwen2.5-vl-3b (default: 0.5b on CPU, 3b on
CUDA), GTR_BENCH_KS=2,4,8,16, GTR_BENCH_ROUNDS=20.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# One decoder layer's LoRA targets (q, k, v, o, gate, up, down) with each model's real shapes,
# plus, for the VL model, one vision block (qkv, proj, gate, up, down).
SHAPES = {
    "qwen2.5-0.5b": {"q_proj": (896, 896), "k_proj": (128, 896), "v_proj": (128, 896), "o_proj": (896, 896),
                     "gate_proj": (4864, 896), "up_proj": (4864, 896), "down_proj": (896, 4864)},
    "qwen2.5-vl-3b": {"q_proj": (2048, 2048), "k_proj": (256, 2048), "v_proj": (256, 2048),
                      "o_proj": (2048, 2048), "gate_proj": (11008, 2048), "up_proj": (11008, 2048),
                      "down_proj": (2048, 11008), "v_qkv": (3840, 1280), "v_proj_out": (1280, 1280),
                      "v_gate": (3420, 1280), "v_up": (3420, 1280), "v_down": (1280, 3420)},
}
RANK, ALPHA, DENSITY = 16, 32.0, 0.5


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory above the level at entry: CUDA's allocator stats, or sampled RSS on CPU."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = _rss_bytes()
            self._stop = threading.Event()

            def sample():
                while not self._stop.is_set():
                    self.peak = max(self.peak, _rss_bytes())
                    time.sleep(0.002)

            self._t = threading.Thread(target=sample, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._t.join()
            self.peak = max(self.peak, _rss_bytes())
            self.extra = self.peak - self.base


def _factors(preset: str, k: int, device: str):
    """K checkpoints' LoRA factors, identical for the same (preset, k) in every process."""
    import torch

    g = torch.Generator().manual_seed(1234 + k)
    out = []
    for _ in range(k):
        ck = {}
        for name, (o, i) in SHAPES[preset].items():
            A = (torch.randn(RANK, i, generator=g) / i**0.5).to(device)
            B = (torch.randn(o, RANK, generator=g) * 0.02).to(device)
            ck[name] = (A, B)
        out.append(ck)
    return out


def _ours(preset: str, k: int, device: str, out_file: str) -> dict:
    import torch
    from safetensors.torch import save_file

    from services.teacher.adapters import Adapter, LoraFactor
    from services.teacher.merging import merge_adapters, merge_weights

    torch.set_grad_enabled(False)
    adapters = [Adapter(factors={f"{n}.weight": LoraFactor(A, B, ALPHA / RANK) for n, (A, B) in ck.items()},
                        rank=RANK, alpha=ALPHA, use_rslora=False) for ck in _factors(preset, k, device)]
    weights = merge_weights(k, "sma")
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        res = merge_adapters(adapters, weights, "ties", DENSITY, device=device, out_device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    save_file({n: t.cpu().contiguous() for n, t in res.delta.items()}, out_file)
    return {"seconds": seconds, "peak_extra_mb": mem.extra / 2**20,
            "stats": {k_: v for k_, v in res.stats.items() if k_ in ("sign_conflict_fraction", "kept_density", "norm_ratio")}}


def _peft(preset: str, k: int, device: str, out_file: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    torch.set_grad_enabled(False)
    shapes = SHAPES[preset]

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, (o, i) in shapes.items():
                setattr(self, name, torch.nn.Linear(i, o, bias=False, device=device))

    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(shapes))
    model = get_peft_model(Layer(), cfg, adapter_name="c0")
    for j in range(1, k):
        model.add_adapter(f"c{j}", cfg)
    for j, ck in enumerate(_factors(preset, k, device)):
        for name, (A, B) in ck.items():
            mod = getattr(model.base_model.model, name)
            mod.lora_A[f"c{j}"].weight.copy_(A)
            mod.lora_B[f"c{j}"].weight.copy_(B)
    full_rank = max(min(s) for s in shapes.values())
    names = [f"c{j}" for j in range(k)]
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        # weights 1: peft's disjoint mean divides by the count of agreeing entries, so unit
        # weights give exactly the SMA TIES merge (weights 1/K would shrink it K-fold, §5.2).
        model.add_weighted_adapter(names, [1.0] * k, "merged", combination_type="ties_svd", density=DENSITY,
                                   svd_rank=full_rank, svd_full_matrices=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    deltas = {f"{n}.weight": getattr(model.base_model.model, n).get_delta_weight("merged").float().cpu().contiguous()
              for n in shapes}
    save_file(deltas, out_file)
    # peft's plain "ties" (TIES on A and on B separately): how far it is from the true merge.
    model.add_weighted_adapter(names, [1.0] * k, "ties_ab", combination_type="ties", density=DENSITY)
    ab = {f"{n}.weight": getattr(model.base_model.model, n).get_delta_weight("ties_ab").float().cpu().contiguous()
          for n in shapes}
    save_file(ab, out_file + ".ab")
    return {"seconds": seconds, "peak_extra_mb": mem.extra / 2**20}


def _child(fn_name: str, args: tuple, q) -> None:
    try:
        q.put(("ok", globals()[fn_name](*args)))
    except Exception as e:  # noqa: BLE001 - reported to the parent
        import traceback

        q.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def _in_process(fn_name: str, *args) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn_name, args, q))
    p.start()
    status, value = q.get()
    p.join()
    if status != "ok":
        raise RuntimeError(value)
    return value


def _rel(a, b) -> float:
    num = sum(float((a[n] - b[n]).double().pow(2).sum()) for n in a)
    den = sum(float(a[n].double().pow(2).sum()) for n in a)
    return (num / den) ** 0.5 if den else 0.0


def bench_merge(device: str | None = None) -> dict:
    import torch
    from safetensors.torch import load_file

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = os.environ.get("GTR_BENCH_SHAPES") or ("qwen2.5-vl-3b" if device.startswith("cuda") else "qwen2.5-0.5b")
    ks = [int(x) for x in os.environ.get("GTR_BENCH_KS", "2,4,8,16").split(",")]
    rows = []
    entries = sum(o * i for o, i in SHAPES[preset].values())
    with tempfile.TemporaryDirectory() as tmp:
        for k in ks:
            ours_f, peft_f = f"{tmp}/ours{k}.safetensors", f"{tmp}/peft{k}.safetensors"
            ours = _in_process("_ours", preset, k, device, ours_f)
            theirs = _in_process("_peft", preset, k, device, peft_f)
            a, b, ab = load_file(ours_f), load_file(peft_f), load_file(peft_f + ".ab")
            row = {"K": k, "ours_seconds": round(ours["seconds"], 3), "peft_ties_svd_seconds": round(theirs["seconds"], 3),
                   "speedup": round(theirs["seconds"] / ours["seconds"], 2),
                   "ours_peak_extra_mb": round(ours["peak_extra_mb"], 1),
                   "peft_peak_extra_mb": round(theirs["peak_extra_mb"], 1),
                   "rel_diff_ours_vs_peft_ties_svd": _rel(a, b),
                   "max_abs_diff_ours_vs_peft_ties_svd": max(float((a[n] - b[n]).abs().max()) for n in a),
                   "entries_differing": sum(int(((a[n] - b[n]).abs() > 1e-5).sum()) for n in a),
                   "rel_error_peft_ties_on_A_and_B": round(_rel(a, ab), 3),
                   "stats": ours["stats"]}
            # The same merge up to SVD round-off, except at trim ties: where several entries share
            # the k-th largest magnitude we keep them all (order-independent), peft's top-k keeps an
            # arbitrary subset. Such entries are a few per ~10^7.
            row["same_merge"] = (row["rel_diff_ours_vs_peft_ties_svd"] < 1e-3
                                 and row["entries_differing"] <= 1e-5 * entries)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return {"device": device, "shapes": preset, "modules": len(SHAPES[preset]), "entries_per_checkpoint": entries,
            "rank": RANK, "density": DENSITY, "rows": rows,
            "target": "ours faster than peft ties_svd at full rank, and the same merge",
            "met": all(r["speedup"] > 1 and r["same_merge"] for r in rows)}


def bench_logits_http(rounds: int | None = None, images: str = "env") -> dict:
    """images: 'env' = Points24 frames as the env service renders them (the teacher's real
    traffic, ~5 KB of base64 each); 'noise' = uniform noise, PNG's worst case (~110 KB each)."""
    import numpy as np
    import torch
    from PIL import Image

    from shared.client import ServiceClient
    from shared.codecs import image_to_b64
    from shared.schemas import LogitsItem, LogitsRequest, LogitsResponse
    from shared.tiny_model import build_tiny_model
    from services.teacher.backends.hf import HFBackend

    rounds = rounds or int(os.environ.get("GTR_BENCH_ROUNDS", "20"))
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "small", seed=0, size="small")
        backend = HFBackend(model_dir, device="cpu")
        tok = backend.tokenizer
        items = []
        for b in range(8):
            if images == "env":
                from services.envs.cardgames import Points24Env

                img = Points24Env().reset(seed=b)[0].image
            else:
                img = Image.fromarray(rng.integers(0, 255, (168, 168, 3), dtype=np.uint8))
            prompt = ("You are an expert 24 points card game player. You are observing these four cards in the "
                      "image. Output a formula that evaluates to 24. " * (1 + b % 2))
            completion = '{"cards": [1, 2, 3, 4], "formula": "1*2*3*4", "thoughts": "the product is 24", "action": "="}'
            items.append(LogitsItem(messages=[{"role": "user", "content": [{"type": "image", "image": image_to_b64(img)},
                                                                           {"type": "text", "text": prompt}]}],
                                    completion_ids=tok(completion, add_special_tokens=False)["input_ids"][: 30 + 4 * b]))
        req = LogitsRequest(items=items)
        port = _free_port()
        server = subprocess.Popen([sys.executable, "-m", "services.teacher", "--model", str(model_dir), "--store",
                                   str(Path(tmp) / "store"), "--device", "cpu", "--port", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
        try:
            client = ServiceClient(f"http://127.0.0.1:{port}", service="teacher", retries=0, timeout=120)
            client.wait_ready(timeout=120)
            body = req.model_dump(mode="json", exclude_none=True)
            http_resp = client.post("/v1/logits", json=body, model=LogitsResponse)  # warm-up
            _, local = backend.logprobs(req.items)
            max_diff = max(float(np.abs(np.array(a.logprobs) - np.array(b.logprobs)).max())
                           for a, b in zip(http_resp.items, local, strict=True))
            t_http, t_local = [], []
            for _ in range(rounds):  # interleaved, so drift on a noisy machine hits both alike
                # The pauses let the other process's OpenMP workers stop spin-waiting (they
                # would otherwise steal the cores from whichever side runs next).
                time.sleep(0.3)
                t0 = time.perf_counter()
                client.post("/v1/logits", json=body, model=LogitsResponse)
                t_http.append(time.perf_counter() - t0)
                time.sleep(0.3)
                t0 = time.perf_counter()
                backend.logprobs(req.items)
                t_local.append(time.perf_counter() - t0)
        finally:
            server.terminate()
            server.wait(timeout=30)
        http_s, local_s = statistics.median(t_http), statistics.median(t_local)
        n_tokens = sum(len(i.completion_ids) for i in items)
        return {"model": "small", "images": images, "request_bytes": len(json.dumps(body)), "batch": len(items),
                "completion_tokens": n_tokens, "rounds": rounds,
                "http_median_s": round(http_s, 4), "in_process_median_s": round(local_s, 4),
                "ratio": round(http_s / local_s, 3), "max_abs_logprob_diff_http_vs_in_process": max_diff,
                "target": "ratio <= 1.2", "met": http_s / local_s <= 1.2}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(out_dir: Path) -> dict:
    # The headline uses env-rendered frames (what the trainer sends); noise images show the
    # worst case, where JSON + base64 of ~1 MB per request dominate a small model's forward.
    return {"merge": bench_merge(), "logits_http": bench_logits_http(images="env"),
            "logits_http_noise_images": bench_logits_http(images="noise")}


if __name__ == "__main__":
    out = run(Path("bench-results"))
    print(json.dumps(out, indent=2))
