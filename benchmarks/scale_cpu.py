"""The whole pipeline at real vocabulary and image size on CPU: `gtr tiny-model --size wide`.

    python -m benchmarks.scale_cpu [--out bench-results] [--work runs/scale]

Starts the env service and the `hf` teacher as their own processes (`gtr env serve`,
`gtr teacher serve`), runs `gtr train` on points24 (images) for 2 updates with KL guidance, then
2 with SFT guidance (the points24-kl / -sft presets, shrunk to fit 2 cores), and records:
- peak RSS of each service process (VmHWM; env worker processes listed beside the main one),
  of each trainer run (wait4's ru_maxrss) and of each trainer phase (the trainer's own
  `memory/*` metrics);
- `/v1/logits` and `/v1/generate` body sizes from the run, plus a probe at the presets' teacher
  batch (8 items, real observations, 256-token completions);
- image tokens per points24 observation under the real processor settings.
Writes bench-results/scale-cpu.json. Not part of `make bench` (it takes ~15-25 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kb(pid: int, field: str = "VmHWM") -> int | None:
    from shared.memory import status_kb as read

    return read(field, pid)


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def service_memory(pid: int) -> dict:
    kids = children(pid)
    return {"pid_rss_peak_mb": round((status_kb(pid) or 0) / 1024, 1),
            "workers_rss_peak_mb": [round((status_kb(c) or 0) / 1024, 1) for c in kids]}


def run_trainer(group, name: str, argv: list[str]) -> dict:
    """Run `gtr train` to its end; its exit code, wall seconds and peak RSS (wait4's ru_maxrss)."""
    t0 = time.time()
    p = group.start(name, argv)
    while True:
        pid, status, ru = os.wait4(p.popen.pid, os.WNOHANG)
        if pid:
            break
        for other in ("envs", "teacher"):
            if group.procs[other].popen.poll() is not None:
                raise RuntimeError(f"{other} died while {name} ran; see {group.procs[other].log_path}")
        time.sleep(0.5)
    p.popen.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": p.popen.returncode, "seconds": round(time.time() - t0, 1),
            "rss_peak_mb": round(ru.ru_maxrss / 1024, 1)}


def logits_probe(teacher_url: str, env_url: str, model_dir: Path, n_items: int = 8, completion_len: int = 256) -> dict:
    """One /v1/logits request at the presets' teacher batch: real observations, long completions."""
    from shared.env_client import EnvClient
    from shared.prompting import observation_messages
    from shared.schemas import LogitsItem, LogitsRequest
    from shared.teacher_client import TeacherClient
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    filler = tok(' "thoughts": "the cards are 3, 8, 8 and 10; 8 / (3 - 8 / 3) = 24, so I start with 8"',
                 add_special_tokens=False)["input_ids"]
    completion = (filler * (completion_len // len(filler) + 1))[:completion_len]
    items = []
    with EnvClient(env_url) as env:
        for i in range(n_items):
            s = env.create("points24", seed=1000 + i)
            items.append(LogitsItem(messages=observation_messages(s.observation), completion_ids=completion))
            env.delete(s.session_id)
    client = TeacherClient(teacher_url, timeout=1800)
    t0 = time.time()
    client.logits(LogitsRequest(items=items))
    n, sent, recv = client.traffic["/v1/logits"]
    return {"items": n_items, "completion_tokens": completion_len, "request_kb": round(sent / 1024, 1),
            "reply_kb": round(recv / 1024, 1), "seconds": round(time.time() - t0, 1),
            "reply_bytes_per_token": round(recv / (n_items * completion_len), 1)}


def image_tokens(env_url: str, model_dir: Path) -> dict:
    from shared.chat import encode_prompt
    from shared.env_client import EnvClient
    from shared.models import load_processor
    from shared.prompting import observation_messages

    proc = load_processor(model_dir)
    image_id = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    with EnvClient(env_url) as env:
        s = env.create("points24", seed=7)
        enc = encode_prompt(proc, observation_messages(s.observation))
        env.delete(s.session_id)
    grid = enc["image_grid_thw"].tolist()[0]
    return {"image_tokens": int((enc["input_ids"] == image_id).sum()), "grid_thw": grid,
            "prompt_tokens": int(enc["input_ids"].shape[1]), "pixel_values_shape": list(enc["pixel_values"].shape)}


def score_memory(model_dir: Path, micro_batch: int = 4, completion_len: int = 256, chunks=(256, 1 << 30)) -> dict:
    """Peak RSS of one PPO micro-batch (score with grad + backward) at the real vocabulary, with
    the log-prob chunking on (256 positions) and, for comparison, off (one chunk of everything:
    the [B, K, V] tensors of the old code, though checkpointing still frees them before backward)."""
    import torch

    from services.envs.registry import Registry
    from services.trainer.config import ModelSettings
    from services.trainer.policy import Policy
    from shared.chat import encode_prompt
    from shared.memory import PeakMemory
    from shared.prompting import observation_messages

    settings = ModelSettings(path=str(model_dir), device="cpu", lora={"r": 128, "alpha": 256, "dropout": 0.0})
    policy = Policy(model_dir, settings)
    prompts = []
    for i in range(micro_batch):
        obs, _ = Registry().make("points24").reset(seed=i)
        prompts.append(encode_prompt(policy.processor, observation_messages(obs_dict(obs))))
    g = torch.Generator().manual_seed(0)
    comps = [torch.randint(0, 151643, (completion_len,), generator=g).tolist() for _ in range(micro_batch)]
    out = {"micro_batch": micro_batch, "completion_tokens": completion_len,
           "vocab": policy.model.config.text_config.vocab_size}
    mem = PeakMemory()
    policy.train(True)
    for chunk in chunks:
        policy.settings.logprob_chunk = chunk
        import gc

        gc.collect()
        base = status_kb(os.getpid(), "VmRSS") or 0
        mem.reset()
        t0 = time.time()
        sc = policy.score(prompts, comps, [completion_len // 2] * micro_batch, temperature=1.0, thought_coef=0.5)
        (sc.logprob.sum() + 0.01 * sc.entropy.sum()).backward()
        peak = mem.read().get("rss_peak_mb", 0.0)
        policy.model.zero_grad(set_to_none=True)
        out["all" if chunk >= 1 << 30 else str(chunk)] = {"rss_before_mb": round(base / 1024, 1), "rss_peak_mb": peak,
                                                          "peak_minus_before_mb": round(peak - base / 1024, 1),
                                                          "seconds": round(time.time() - t0, 1)}
    one = micro_batch * completion_len * out["vocab"] * 4 / 2**20
    out["one_fp32_B_K_V_mb"] = round(one, 1)
    return out


def obs_dict(obs) -> dict:
    """An env's observation as the service sends it (image as base64 PNG), from its public fields."""
    from shared.codecs import image_to_b64

    return {"image": None if obs.image is None else image_to_b64(obs.image), "text": obs.text,
            "instruction": obs.instruction, "admissible_actions": obs.admissible_actions}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--work", default="runs/scale")
    ap.add_argument("--updates", type=int, default=2)
    ap.add_argument("--num-envs", type=int, default=2)
    ap.add_argument("--num-steps", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--modes", default="kl,sft")
    ap.add_argument("--probe-items", type=int, default=8)
    ap.add_argument("--score-memory", action="store_true",
                    help="only the PPO micro-batch memory with and without log-prob chunking -> scale-cpu-score.json")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from services.launcher.procs import ProcessGroup, gtr_argv
    from shared.tiny_model import build_tiny_model

    work = Path(args.work).resolve()
    model = work / "models" / "wide"
    res: dict = {"settings": vars(args)}
    if not (model / "config.json").exists():
        t0 = time.time()
        build_tiny_model(model, seed=0, size="wide")
        res["build_seconds"] = round(time.time() - t0, 1)
    if args.score_memory:
        r = score_memory(model)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "scale-cpu-score.json").write_text(json.dumps(r, indent=2) + "\n")
        print(json.dumps(r, indent=2))
        return 0
    cfg = json.loads((model / "config.json").read_text())
    import safetensors

    with safetensors.safe_open(str(model / "model.safetensors"), "pt") as f:
        res["model"] = {"params": sum(_numel(f.get_slice(k).get_shape()) for k in f.keys()),
                        "vocab_size": cfg["text_config"]["vocab_size"], "hidden": cfg["text_config"]["hidden_size"],
                        "layers": cfg["text_config"]["num_hidden_layers"]}
    env_port, teacher_port = free_port(), free_port()
    env_url, teacher_url = f"http://127.0.0.1:{env_port}", f"http://127.0.0.1:{teacher_port}"
    group = ProcessGroup(work / "logs")
    try:
        group.start("envs", gtr_argv("env", "serve", "--port", str(env_port)), url=env_url)
        group.start("teacher", gtr_argv("teacher", "serve", "--backend", "hf", "--model", str(model), "--store",
                                        str(work / "teacher-store"), "--device", "cpu", "--port", str(teacher_port)),
                    url=teacher_url)
        group.wait_ready("envs", 300)
        group.wait_ready("teacher", 600)
        res["idle_rss_mb"] = {n: round((status_kb(group.procs[n].popen.pid, "VmRSS") or 0) / 1024, 1)
                              for n in ("envs", "teacher")}
        res["points24_observation"] = image_tokens(env_url, model)
        res["trainer"] = {}
        for mode in args.modes.split(","):
            run_dir = work / f"train-{mode}"
            sets = [f"model.path={model}", "model.device=cpu", "model.dtype=float32", f"env.url={env_url}",
                    f"teacher.url={teacher_url}", f"env.num_envs={args.num_envs}", f"env.num_steps={args.num_steps}",
                    f"generation.max_new_tokens={args.max_new_tokens}", "generation.temperature=1.0",
                    f"ppo.minibatch_size={args.num_envs * args.num_steps}", "ppo.micro_batch_size=4", "ppo.epochs=1",
                    f"updates={args.updates}", f"run_dir={run_dir}", "trainer.port=0", "teacher.batch_size=8",
                    "logging.progress=false", "logging.tensorboard=false"]
            if mode == "sft":
                sets += ["guidance.sft_batch_size=4", f"guidance.teacher_max_new_tokens={args.max_new_tokens}"]
            argv_ = gtr_argv("train", "--config", str(ROOT / f"configs/points24-{mode}.yaml"), "--set", *sets)
            r = run_trainer(group, f"trainer-{mode}", argv_)
            rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()] \
                if (run_dir / "metrics.jsonl").exists() else []
            keep = ("memory/", "teacher/logits", "teacher/generate", "time/", "rollout/format_ok_rate",
                    "teacher/guided_frac", "rollout/mean_completion_len", "teacher/version")
            r["updates"] = [{k: v for k, v in row.items() if k.startswith(keep)} for row in rows]
            res["trainer"][mode] = r
            if r["rc"] != 0:
                print(f"trainer ({mode}) failed; see {group.procs[f'trainer-{mode}'].log_path}", file=sys.stderr)
        res["logits_probe"] = logits_probe(teacher_url, env_url, model, n_items=args.probe_items)
        res["services"] = {n: service_memory(group.procs[n].popen.pid) for n in ("envs", "teacher")}
    finally:
        group.stop()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res["meta"] = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpus": os.cpu_count()}
    (out / "scale-cpu.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0 if all(r["rc"] == 0 for r in res.get("trainer", {}).values()) else 1


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


if __name__ == "__main__":
    sys.exit(main())
