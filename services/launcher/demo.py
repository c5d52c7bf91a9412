"""`gtr demo` (= `make demo`): the whole method, end to end, on a CPU in about 15 minutes.

1. build the `small` offline model;
2. start the env service; SFT-init the model from expert demonstrations (a light SFT, so that
   RL has something left to learn) and fold it into a new base;
3. evaluate that base ("before") on fixed seeds;
4. start the teacher on the new base; train with GTR-Turbo-KL (PPO + reverse KL to the merged
   teacher, the adapter pushed and merged after every update);
5. evaluate the trained adapter ("after") on the same seeds;
6. write RUN_DIR/summary.json, metrics, a PNG plot, sample trajectories; print a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path

import yaml

log = logging.getLogger(__name__)


def _demo_settings(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """The demo section of the config file (not a trainer key) and the trainer overrides."""
    raw = yaml.safe_load(Path(args.config).read_text()) or {}
    demo = raw.pop("demo", {}) or {}
    quick = dict(demo.pop("quick", None) or {})
    quick_set = list(quick.pop("set", None) or [])  # trainer overrides of the quick run
    if args.quick:
        demo.update(quick)
    if args.env_id:
        demo["env_id"] = args.env_id
    if args.updates:
        demo["updates"] = args.updates
    if args.eval_episodes:
        demo["eval_episodes"] = args.eval_episodes
    if getattr(args, "pixels", False):  # the state only in the image: the vision warm-up runs first
        demo["env_options"] = {**(demo.get("env_options") or {}), "text_state": False}
    if getattr(args, "text_state", False):  # the state also in the text: no warm-up (unless the preset forces it)
        demo["env_options"] = {**(demo.get("env_options") or {}), "text_state": True}
    return {"trainer": raw, **demo}, (quick_set if args.quick else []) + list(args.set or [])


def run_demo(args: argparse.Namespace) -> int:
    from services.launcher.pipeline import prepare_base
    from services.launcher.plot import plot_metrics
    from services.launcher.procs import PortInUse, ProcessGroup, ServiceDied, check_ports, gtr_argv, stop_on_signals
    from services.trainer.config import TrainConfig
    from services.trainer.evaluate import evaluate
    from services.trainer.train import train
    from shared.config import build_config

    t_start = time.perf_counter()
    load_start = _load()
    try:
        check_ports({"envs": args.env_port, "teacher": args.teacher_port})
    except PortInUse as e:
        print(f"gtr demo: {e}", file=__import__("sys").stderr)
        return 1
    stop_on_signals()  # SIGTERM and SIGHUP as Ctrl-C: the `finally` below stops the services
    settings, overrides = _demo_settings(args)
    # One torch thread for this process (warm-up, SFT-init, rollouts, PPO, evals) and one for the
    # teacher: on 2 cores, two processes with two OpenMP threads each thrash (measured: a 16 x 40
    # token generate took 4.3 s with one thread and 55 s with two, beside a busy teacher/other job).
    import torch

    torch.set_num_threads(int(settings.get("torch_threads", 1)))
    run_dir = Path(args.run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a demo run starts from scratch; the model build is cheap
    run_dir.mkdir(parents=True)
    env_id = settings["env_id"]
    env_options = settings.get("env_options", {})
    env_url = f"http://127.0.0.1:{args.env_port}"
    teacher_url = f"http://127.0.0.1:{args.teacher_port}"
    episodes = int(settings["eval_episodes"])
    eval_seed = int(settings.get("eval_seed", 100_000))
    eval_kw = dict(env_url=env_url, env_id=env_id, episodes=episodes, greedy=False,
                   temperature=float(settings.get("eval_temperature", 1.0)),
                   max_new_tokens=int(settings.get("max_new_tokens", 48)), seed=eval_seed,
                   num_envs=int(settings.get("eval_num_envs", 16)), options=env_options, device="cpu")
    timings: dict[str, float] = {}

    def phase(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"[demo] {name}: {timings[name]:.0f}s", flush=True)

    group = ProcessGroup(run_dir / "logs")
    try:
        group.start("envs", gtr_argv("env", "serve", "--port", str(args.env_port)), url=env_url,
                    env={"OMP_NUM_THREADS": "1"})
        group.wait_ready("envs", timeout=120)

        base = prepare_base(settings, env_url, run_dir / "models", phase=phase)
        sft_base = base["path"]
        sft = base["info"]["sft"]

        t0 = time.perf_counter()
        before = evaluate(sft_base, **eval_kw)
        phase("eval_before", t0)
        print(f"[demo] before RL: success {before['success_rate']:.3f} over {before['episodes']} episodes", flush=True)

        group.start("teacher", gtr_argv("teacher", "serve", "--backend", "hf", "--model", sft_base,
                                        "--store", str(run_dir / "teacher-store"), "--device", "cpu",
                                        "--port", str(args.teacher_port)), url=teacher_url,
                    # One core for the teacher's forwards and merges: on a 2-core CPU, two processes
                    # each spinning two OpenMP threads slow each other down tenfold.
                    env={"OMP_NUM_THREADS": "1"})
        group.wait_ready("teacher", timeout=180)

        t0 = time.perf_counter()
        trainer = dict(settings["trainer"])
        cfg = build_config(TrainConfig, trainer, [
            f"model.path={sft_base}", f"env.url={env_url}", f"env.env_id={env_id}", f"teacher.url={teacher_url}",
            f"run_dir={run_dir / 'train'}", "guidance.mode=kl", "trainer.port=0",
            f"updates={int(settings['updates'])}", *overrides,
        ], source=str(args.config))
        if env_options:
            cfg.env.options = env_options
        summary = train(cfg)
        phase("train", t0)

        t0 = time.perf_counter()
        adapter = Path(cfg.run_dir) / "checkpoint"
        after = evaluate(sft_base, adapter=str(adapter) if adapter.exists() else None, **eval_kw)
        phase("eval_after", t0)
    except ServiceDied as e:
        print(f"gtr demo: {e}", file=__import__("sys").stderr)
        return 1
    finally:
        group.stop()

    metrics = Path(cfg.run_dir) / "metrics.jsonl"
    shutil.copy2(metrics, run_dir / "metrics.jsonl")
    samples = Path(cfg.run_dir) / "samples"
    if samples.exists():
        shutil.copytree(samples, run_dir / "samples", dirs_exist_ok=True)
    teacher_eval = Path(cfg.run_dir) / "teacher_eval.jsonl"
    if teacher_eval.exists():
        shutil.copy2(teacher_eval, run_dir / "teacher_eval.jsonl")
    plot = plot_metrics(metrics, run_dir / "training.png", teacher_eval=teacher_eval if teacher_eval.exists() else None,
                        title=f"GTR-Turbo-KL on {env_id} ({'state in the text' if env_options.get('text_state') else 'from pixels'}, small model, CPU)",
                        before=before["success_rate"], after=after["success_rate"])
    out = {
        "env_id": env_id,
        "env_options": env_options,
        "updates": cfg.updates,
        "success_before": before["success_rate"],
        "success_after": after["success_rate"],
        "episodes_before": before["episodes"],
        "episodes_after": after["episodes"],
        "return_before": before.get("mean_return"),
        "return_after": after.get("mean_return"),
        "format_ok_before": before.get("format_ok_rate"),
        "format_ok_after": after.get("format_ok_rate"),
        "eval": {"seeds": [eval_seed, eval_seed + episodes - 1], "sampled_temperature": eval_kw["temperature"]},
        "sft": {k: sft.get(k) for k in ("demonstrations", "episodes", "expert_success_rate", "losses")},
        "vision_warmup": base["info"]["warmup"],
        "final_teacher_version": summary.get("last", {}).get("teacher_version"),
        "seconds": round(time.perf_counter() - t_start, 1),
        "seconds_by_phase": timings,
        # The machine's 1-minute load average when the demo started and ended (other jobs on the
        # cores make its wall time longer: the figures are comparable only at a similar load).
        "load_average": {"start": load_start, "end": _load(), "cpus": os.cpu_count()},
        "plot": str(plot),
        "metrics": str(run_dir / "metrics.jsonl"),
    }
    (run_dir / "summary.json").write_text(json.dumps(out, indent=2))
    (run_dir / "eval_before.json").write_text(json.dumps(before, indent=2))
    (run_dir / "eval_after.json").write_text(json.dumps(after, indent=2))
    print_table(out)
    return 0


def print_table(s: dict) -> None:
    rows = [("", "before RL (SFT-init)", "after GTR-Turbo-KL"),
            ("success rate", f"{s['success_before']:.3f}", f"{s['success_after']:.3f}"),
            ("mean return", _f(s.get("return_before")), _f(s.get("return_after"))),
            ("format-valid rate", _f(s.get("format_ok_before")), _f(s.get("format_ok_after"))),
            ("episodes", str(s["episodes_before"]), str(s["episodes_after"]))]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    line = "+-" + "-+-".join("-" * x for x in w) + "-+"
    print(f"\nGTR-Turbo demo: {s['env_id']}, {s['updates']} updates, {s['seconds']:.0f}s in all")
    print(line)
    for i, r in enumerate(rows):
        print("| " + " | ".join(c.ljust(x) for c, x in zip(r, w, strict=True)) + " |")
        if i == 0:
            print(line)
    print(line)
    print(f"final teacher version: {s.get('final_teacher_version')}; plot: {s['plot']}\n", flush=True)


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"
