"""`gtr experiment`: the paper's claims in miniature, with error bars.

Every variant starts from the same base (built once: the small model, the vision warm-up when
the game is played from pixels, SFT-init), trains with the same seeds, and is evaluated on the
same held-out eval seeds:

| variant | what it is | teacher |
|---|---|---|
| none | RL4VLM: PPO without guidance | none |
| kl | GTR-Turbo-KL | TIES merge of the pushed checkpoints |
| sft | GTR-Turbo-SFT | TIES merge |
| kl-static | KL to the unmerged base (the paper's "no merge" ablation) | `--merge-method none` |
| kl-linear | KL to a linear merge instead of TIES | `--merge-method linear` |

Runs go seed by seed (all variants of seed 0, then seed 1, ...), and summary.json, table.md and
curves.png are rewritten after every run from every finished run on disk (runs/*/run.json), so a
long experiment cut short still reports whole seeds, a re-run skips finished runs, and processes
given disjoint seeds (`--first-seed`) can share one RUN_DIR.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

log = logging.getLogger(__name__)

VARIANTS: dict[str, dict[str, Any]] = {
    "none": {"mode": "none", "merge": None, "label": "RL4VLM (PPO, no guidance)"},
    "kl": {"mode": "kl", "merge": "ties", "label": "GTR-Turbo-KL (TIES)"},
    "sft": {"mode": "sft", "merge": "ties", "label": "GTR-Turbo-SFT (TIES)"},
    "kl-static": {"mode": "kl", "merge": "none", "label": "KL to the static base"},
    "kl-linear": {"mode": "kl", "merge": "linear", "label": "KL, linear merge"},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The `experiment` section of the config file plus the trainer config (the rest of it)."""
    raw = yaml.safe_load(Path(args.config).read_text()) or {}
    exp = raw.pop("experiment", None) or raw.pop("demo", {}) or {}
    if args.quick:
        exp.update(exp.get("quick", {}))
    exp.pop("quick", None)
    for key in ("env_id", "updates", "eval_episodes"):
        if getattr(args, key, None):
            exp[key] = getattr(args, key)
    return {"trainer": raw, **exp}


def parse_variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise SystemExit(f"gtr experiment: unknown variant(s) {unknown or text!r}; choose from {', '.join(VARIANTS)}")
    return names


def run_experiment(args: argparse.Namespace) -> int:
    from services.launcher.pipeline import prepare_base
    from services.launcher.procs import ProcessGroup, ServiceDied, gtr_argv, stop_on_signals

    variants = parse_variants(args.variants)
    settings = load_settings(args)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    env_url = f"http://127.0.0.1:{args.env_port or free_port()}"
    stop_on_signals()  # SIGTERM and SIGHUP as Ctrl-C: the finally blocks stop the env service and teachers
    # One torch thread in this process (SFT-init, rollouts, PPO, evaluations), as in the demo:
    # beside a teacher on 2 cores, two OpenMP threads per process thrash (docs/demo.md).
    import torch

    torch.set_num_threads(int(settings.get("torch_threads", 1)))
    t_start = time.perf_counter()
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    group = ProcessGroup(run_dir / "logs" / f"seeds-{seeds[0]}-{seeds[-1]}")
    state: dict[str, Any] = {"runs": finished_runs(run_dir)}
    try:
        group.start("envs", gtr_argv("env", "serve", "--port", env_url.rsplit(":", 1)[1]), url=env_url,
                    env={"OMP_NUM_THREADS": "1"})
        group.wait_ready("envs", timeout=300)
        base = prepare_base(settings, env_url, run_dir / "models", reuse=True)
        if base["info"].get("success_before_rl") is None:
            from services.trainer.evaluate import evaluate

            before = evaluate(base["path"], **eval_kwargs(settings, env_url))
            base["info"].update(success_before_rl=before["success_rate"], episodes_before_rl=before["episodes"])
            _write_json(run_dir / "models" / "base.json", base)
        state["base"] = base["info"]
        for seed in seeds:
            for variant in variants:
                if (run_dir / "runs" / f"{variant}-seed{seed}" / "run.json").exists():
                    continue  # finished earlier (a resumed experiment)
                run = run_one(variant, seed, settings, base["path"], env_url, run_dir, args)
                _write_json(run_dir / "runs" / f"{variant}-seed{seed}" / "run.json", run)
                state["runs"] = finished_runs(run_dir)
                write_outputs(run_dir, state, variants, settings, time.perf_counter() - t_start)
    except ServiceDied as e:
        print(f"gtr experiment: {e}", file=__import__("sys").stderr)
        return 1
    finally:
        group.stop()
    state["runs"] = finished_runs(run_dir)
    summary = write_outputs(run_dir, state, variants, settings, time.perf_counter() - t_start)
    print((run_dir / "table.md").read_text(), flush=True)
    print(f"summary: {run_dir / 'summary.json'}; curves: {summary['curves_png']}", flush=True)
    return 0


def finished_runs(run_dir: Path) -> list[dict[str, Any]]:
    """Every finished run on disk (one run.json each): processes running other seeds into the same
    RUN_DIR see each other's results, and a re-run skips them."""
    return [json.loads(p.read_text()) for p in sorted((run_dir / "runs").glob("*/run.json"))]


def _write_json(path: Path, obj: Any) -> None:
    """Atomically (a reader never sees half a file; parallel writers: the last one wins)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def eval_kwargs(settings: dict[str, Any], env_url: str) -> dict[str, Any]:
    """The held-out evaluation, the same for every run: seeds from eval_seed, sampled at eval_temperature."""
    return dict(env_url=env_url, env_id=settings["env_id"], episodes=int(settings["eval_episodes"]), greedy=False,
                temperature=float(settings.get("eval_temperature", 1.0)),
                max_new_tokens=int(settings.get("max_new_tokens", 40)), seed=int(settings.get("eval_seed", 100_000)),
                num_envs=int(settings.get("eval_num_envs", 16)), options=settings.get("env_options", {}), device="cpu")


def run_overrides(spec: dict[str, Any], seed: int, settings: dict[str, Any], base: str, env_url: str, out: Path,
                  teacher_url: str | None, user_sets: list[str]) -> list[str]:
    """One run's trainer overrides: the run's own, then the user's --set, then what makes the
    variant what it is. Those come last: a --set eval.teacher_every=N would otherwise turn a
    teacher evaluation back on for `none`, which has no teacher (student-only evaluations that
    cost time, and a legend entry with no line)."""
    overrides = [f"model.path={base}", f"env.url={env_url}", f"env.env_id={settings['env_id']}",
                 f"run_dir={out / 'train'}", f"guidance.mode={spec['mode']}", "trainer.port=0",
                 f"updates={int(settings['updates'])}", f"seed={seed}", "logging.progress=false"]
    if teacher_url:
        overrides.append(f"teacher.url={teacher_url}")
    overrides += user_sets
    if spec["merge"] == "none":
        overrides.append("teacher.push=never")  # a static teacher: the merge would be a no-op anyway
    if teacher_url is None:
        overrides.append("eval.teacher_every=0")
    return overrides


def run_one(variant: str, seed: int, settings: dict[str, Any], base: str, env_url: str, run_dir: Path,
            args: argparse.Namespace) -> dict[str, Any]:
    """Train one (variant, seed) from the shared base and evaluate it on the held-out seeds."""
    from services.launcher.procs import ProcessGroup, gtr_argv
    from services.trainer.config import TrainConfig
    from services.trainer.evaluate import evaluate
    from services.trainer.train import train
    from shared.config import build_config

    spec = VARIANTS[variant]
    out = run_dir / "runs" / f"{variant}-seed{seed}"
    t0 = time.perf_counter()
    group = ProcessGroup(out / "logs")
    teacher_url = None
    try:
        if spec["merge"] is not None:
            teacher_url = f"http://127.0.0.1:{free_port()}"
            group.start("teacher", gtr_argv("teacher", "serve", "--backend", "hf", "--model", base,
                                            "--store", str(out / "teacher-store"), "--device", "cpu",
                                            "--merge-method", spec["merge"], "--port", teacher_url.rsplit(":", 1)[1]),
                        url=teacher_url, env={"OMP_NUM_THREADS": "1"})
            group.wait_ready("teacher", timeout=300)
        cfg = build_config(TrainConfig, dict(settings["trainer"]),
                           run_overrides(spec, seed, settings, base, env_url, out, teacher_url, args.set or []),
                           source=str(args.config))
        if settings.get("env_options"):
            cfg.env.options = dict(settings["env_options"])
        print(f"[experiment] {variant} seed {seed}: training {cfg.updates} updates", flush=True)
        summary = train(cfg)
    finally:
        group.stop()
    seconds_train = time.perf_counter() - t0
    adapter = Path(cfg.run_dir) / "checkpoint"
    final = evaluate(base, adapter=str(adapter) if adapter.exists() else None, **eval_kwargs(settings, env_url))
    final.pop("per_episode", None)
    (out / "eval_final.json").write_text(json.dumps(final, indent=2))
    rows = [json.loads(ln) for ln in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    teacher_evals = []
    te = Path(cfg.run_dir) / "teacher_eval.jsonl"
    if te.exists():
        teacher_evals = [{k: v for k, v in json.loads(ln).items() if not k.endswith("_episodes")}
                         for ln in te.read_text().splitlines() if ln.strip()]
    run = {"variant": variant, "seed": seed, "final_success": final["success_rate"],
           "final_return": final["mean_return"], "final_format_ok": final["format_ok_rate"],
           "eval_episodes": final["episodes"], "updates": summary["updates"],
           "seconds": round(time.perf_counter() - t0, 1), "seconds_train": round(seconds_train, 1),
           "curve": {"update": [r["update"] for r in rows],
                     "success": [r.get("success_rate_all", r.get("success_rate")) for r in rows],
                     "kl": [r.get("kl_mean") for r in rows], "teacher_version": [r.get("teacher_version") for r in rows]},
           "teacher_eval": teacher_evals}
    print(f"[experiment] {variant} seed {seed}: final success {run['final_success']:.3f} over "
          f"{run['eval_episodes']} episodes ({run['seconds']:.0f}s)", flush=True)
    return run


def aggregate(state: dict[str, Any], variants: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for v in variants:
        runs = sorted((r for r in state["runs"] if r["variant"] == v), key=lambda r: r["seed"])
        if not runs:
            continue
        finals = [r["final_success"] for r in runs]
        out[v] = {
            "label": VARIANTS[v]["label"], "seeds": [r["seed"] for r in runs],
            "final_success": finals, "final_success_mean": float(np.mean(finals)),
            "final_success_std": float(np.std(finals, ddof=1)) if len(finals) > 1 else 0.0,
            "episodes_per_seed": runs[0]["eval_episodes"], "episodes_total": sum(r["eval_episodes"] for r in runs),
            "seconds_per_run_mean": float(np.mean([r["seconds"] for r in runs])),
            "seconds_total": float(sum(r["seconds"] for r in runs)),
            "final_return_mean": float(np.mean([r["final_return"] for r in runs])),
            "final_format_ok_mean": float(np.mean([r["final_format_ok"] for r in runs])),
        }
    return out


def write_outputs(run_dir: Path, state: dict[str, Any], variants: list[str], settings: dict[str, Any],
                  seconds: float) -> dict[str, Any]:
    from services.launcher.plot import plot_experiment

    # Every variant with a finished run in RUN_DIR, not only this process's: processes running
    # other variants into the same directory all write the whole table.
    on_disk = {r["variant"] for r in state["runs"]}
    variants = [v for v in VARIANTS if v in on_disk or v in variants]
    agg = aggregate(state, variants)
    tmp_png = run_dir / f".curves.{os.getpid()}.png"
    plot_experiment(state["runs"], variants, tmp_png,
                    title=f"{settings['env_id']} {_pixels(settings)}: success per update, mean ± std over seeds")
    png = tmp_png.replace(run_dir / "curves.png")
    summary = {"env_id": settings["env_id"], "env_options": settings.get("env_options", {}),
               "updates": int(settings["updates"]), "variants": agg, "base": state.get("base"),
               "eval": {"episodes": int(settings["eval_episodes"]), "seed": int(settings.get("eval_seed", 100_000)),
                        "temperature": float(settings.get("eval_temperature", 1.0))},
               "seconds": round(seconds, 1), "curves_png": str(png), "runs": state["runs"]}
    _write_json(run_dir / "summary.json", summary)
    tmp = run_dir / f".table.md.{os.getpid()}.tmp"
    tmp.write_text(table_md(summary))
    tmp.replace(run_dir / "table.md")
    return summary


def _pixels(settings: dict[str, Any]) -> str:
    return "(state in the text)" if settings.get("env_options", {}).get("text_state") else "(from pixels)"


def table_md(summary: dict[str, Any]) -> str:
    lines = [f"Final success rate on {summary['env_id']} {_pixels(summary)} after {summary['updates']} updates, "
             f"evaluated on the same {summary['eval']['episodes']} held-out episodes per run "
             f"(seeds from {summary['eval']['seed']}, sampled at T={summary['eval']['temperature']}).", "",
             "| variant | what | final success (mean ± std) | per seed | seeds | episodes | wall time per run |",
             "|---|---|---|---|---|---|---|"]
    for v, a in summary["variants"].items():
        per = ", ".join(f"{x:.3f}" for x in a["final_success"])
        lines.append(f"| {v} | {a['label']} | {a['final_success_mean']:.3f} ± {a['final_success_std']:.3f} | {per} | "
                     f"{len(a['seeds'])} | {a['episodes_total']} ({a['episodes_per_seed']} x {len(a['seeds'])}) | "
                     f"{a['seconds_per_run_mean']:.0f} s |")
    base = summary.get("base") or {}
    if base.get("success_before_rl") is not None:
        lines += ["", f"The shared starting point (after SFT-init, before RL): success {base['success_before_rl']:.3f} "
                      f"on the same eval episodes."]
    return "\n".join(lines) + "\n"


def register(sub) -> None:
    p = sub.add_parser(
        "experiment", help="the ablation runner: none, kl, sft, kl-static, kl-linear over seeds, with error bars",
        description="Train every variant from the same SFT-init base with the same seeds, evaluate all on the same "
                    "held-out seeds, and write RUN_DIR/summary.json, table.md (mean ± std over seeds) and curves.png.",
    )
    p.add_argument("--variants", default="none,kl,sft,kl-static,kl-linear",
                   help=f"comma-separated, from {','.join(VARIANTS)} (default: all)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1 per variant (default 3)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="start the seeds here (K..K+N-1): processes with disjoint seeds may share one RUN_DIR")
    p.add_argument("--env-id", default=None, help="game (default: the preset's)")
    p.add_argument("--updates", type=int, default=None, help="PPO updates per run (default: the preset's)")
    p.add_argument("--eval-episodes", type=int, default=None, help="held-out episodes per run (default: the preset's)")
    p.add_argument("--run-dir", default="runs/experiment", help="output directory (default runs/experiment)")
    p.add_argument("--config", default="configs/experiment.yaml", help="preset (default configs/experiment.yaml)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="trainer config overrides (all runs)")
    p.add_argument("--env-port", type=int, default=None, help="env service port (default: a free one)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: two variants (none,kl unless --variants), one seed, two updates")
    p.set_defaults(func=_experiment)


def _experiment(args: argparse.Namespace) -> int:
    if args.quick:
        if args.variants == "none,kl,sft,kl-static,kl-linear":
            args.variants = "none,kl"
        args.seeds = 1
    return run_experiment(args)
