"""`gtr up`, `gtr demo` and `gtr experiment`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def up_commands(args: argparse.Namespace) -> dict[str, list[str]]:
    """The argv of each service, as `gtr up` starts them (also used by the compose tests)."""
    from services.launcher.procs import gtr_argv

    run_dir = Path(args.run_dir)
    env_url = f"http://127.0.0.1:{args.env_port}"
    teacher_url = f"http://127.0.0.1:{args.teacher_port}"
    cmds = {
        "envs": gtr_argv("env", "serve", "--host", "127.0.0.1", "--port", str(args.env_port)),
        "teacher": gtr_argv("teacher", "serve", "--backend", args.teacher_backend, "--model", str(args.model),
                            "--store", str(run_dir / "teacher-store"), "--device", args.device,
                            "--host", "127.0.0.1", "--port", str(args.teacher_port)),
    }
    sets = [f"model.path={args.model}", f"env.url={env_url}", f"teacher.url={teacher_url}",
            f"run_dir={run_dir / 'trainer'}", f"trainer.port={args.trainer_port}"]
    if wants_policy(args):  # rollout.engine: service in the config (or --set): the rollout engine too
        cmds["policy"] = gtr_argv("policy", "serve", "--backend", args.policy_backend, "--model", str(args.model),
                                  "--store", str(run_dir / "policy-store"), "--device", args.device,
                                  "--host", "127.0.0.1", "--port", str(args.policy_port))
        sets.append(f"rollout.url=http://127.0.0.1:{args.policy_port}")
    if not args.no_trainer:
        cmds["trainer"] = gtr_argv("train", "--config", str(args.config), "--set", *sets, *(args.set or []))
    return cmds


def wants_policy(args: argparse.Namespace) -> bool:
    """Whether the trainer config (with its --set overrides) samples through the policy service."""
    from services.trainer.config import load_train_config

    return load_train_config(str(args.config), list(args.set or [])).rollout.engine == "service"


def _up(args: argparse.Namespace) -> int:
    from services.launcher.procs import PortInUse, ProcessGroup, ServiceDied, Stopped, check_ports, stop_on_signals

    ports = {"envs": args.env_port, "teacher": args.teacher_port}
    if not args.no_trainer:
        ports["trainer"] = args.trainer_port
    try:
        check_ports(ports)
    except PortInUse as e:
        print(f"gtr up: {e}", file=sys.stderr)
        return 1
    if args.model is None:
        args.model = Path(args.run_dir) / "models" / "tiny"
        if not (args.model / "config.json").exists():
            from shared.tiny_model import build_tiny_model

            log.info("no --model given: building the tiny model into %s", args.model)
            build_tiny_model(args.model, seed=0, size="tiny")
    cmds = up_commands(args)
    urls = {"envs": f"http://127.0.0.1:{args.env_port}", "teacher": f"http://127.0.0.1:{args.teacher_port}",
            "trainer": f"http://127.0.0.1:{args.trainer_port}", "policy": f"http://127.0.0.1:{args.policy_port}"}
    services = [n for n in ("envs", "teacher", "policy") if n in cmds]
    group = ProcessGroup(Path(args.run_dir) / "logs")
    stop_on_signals()  # SIGTERM and SIGHUP as Ctrl-C: stop the children, then exit
    try:
        for name in services:
            group.start(name, cmds[name], url=urls[name])
        for name in services:
            group.wait_ready(name, timeout=args.ready_timeout)
        print(f"envs:    {urls['envs']}\nteacher: {urls['teacher']}", flush=True)
        if "policy" in cmds:
            print(f"policy:  {urls['policy']} (rollout engine)", flush=True)
        print(f"logs:    {group.log_dir}", flush=True)
        if args.no_trainer:
            print("services up; Ctrl-C stops them", flush=True)
            while True:
                group.check()
                signal.sigtimedwait([], 1.0) if hasattr(signal, "sigtimedwait") else __import__("time").sleep(1.0)
        group.start("trainer", cmds["trainer"], url=urls["trainer"])
        print(f"trainer: {urls['trainer']} (status at /v1/status)", flush=True)
        rc = group.wait("trainer")
        if rc != 0:
            print(f"trainer exited with code {rc}; last lines:\n{group.procs['trainer'].tail()}", file=sys.stderr)
        return rc
    except ServiceDied as e:
        print(f"gtr up: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print("stopping services", file=sys.stderr)
        return 128 + e.signum if isinstance(e, Stopped) else 130
    finally:
        group.stop()


def _demo(args: argparse.Namespace) -> int:
    from services.launcher.demo import run_demo

    return run_demo(args)


def register(sub) -> None:
    p = sub.add_parser(
        "up", help="run envs, teacher (policy) and trainer as local processes (no Docker needed)",
        description="Start the env service, the teacher and the trainer as local processes (and the policy service "
                    "when the trainer config says rollout.engine: service), one log per service "
                    "under RUN_DIR/logs. Waits for each service to be ready, stops everything cleanly on Ctrl-C, "
                    "and exits non-zero if a service dies.",
    )
    p.add_argument("--model", type=Path, default=None,
                   help="base model directory for trainer and teacher (default: build the tiny model)")
    p.add_argument("--config", default="configs/tiny-cpu.yaml", help="trainer config (default configs/tiny-cpu.yaml)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="trainer config overrides")
    p.add_argument("--run-dir", default="runs/up", help="logs, teacher store and trainer outputs (default runs/up)")
    p.add_argument("--teacher-backend", choices=["hf", "vllm", "openai"], default="hf")
    p.add_argument("--device", default="auto", help="teacher device: auto, cpu, cuda, cuda:1 (default auto)")
    p.add_argument("--env-port", type=int, default=8100)
    p.add_argument("--teacher-port", type=int, default=8200)
    p.add_argument("--trainer-port", type=int, default=8300)
    p.add_argument("--policy-port", type=int, default=8400,
                   help="policy service port; it starts when the config has rollout.engine: service")
    p.add_argument("--policy-backend", choices=["hf", "vllm"], default="hf",
                   help="policy service backend (default hf; vllm needs vLLM installed)")
    p.add_argument("--no-trainer", action="store_true", help="start only envs and teacher; stay up until Ctrl-C")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for each service (default 600)")
    p.set_defaults(func=_up)

    d = sub.add_parser(
        "demo", help="the CPU demo: build a small model, SFT-init, train with GTR-Turbo-KL, evaluate before/after",
        description="The main job on a fresh CPU machine (about 15 minutes): builds the `small` model, SFT-inits it "
                    "from expert demonstrations, starts the env and teacher services, trains with GTR-Turbo-KL, "
                    "evaluates before and after on the same seeds, and writes RUN_DIR/summary.json, metrics, a PNG "
                    "plot and sample trajectories.",
    )
    d.add_argument("--run-dir", default="runs/demo", help="output directory (default runs/demo)")
    d.add_argument("--env-id", default=None, help="game to train on (default: the demo preset's)")
    d.add_argument("--updates", type=int, default=None, help="PPO updates (default: the demo preset's)")
    d.add_argument("--eval-episodes", type=int, default=None, help="episodes per evaluation (default: the preset's)")
    d.add_argument("--config", default="configs/demo.yaml", help="trainer config of the demo (default configs/demo.yaml)")
    d.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="trainer config overrides")
    d.add_argument("--env-port", type=int, default=8110)
    d.add_argument("--teacher-port", type=int, default=8210)
    d.add_argument("--quick", action="store_true", help="a much shorter run (a smoke test of the pipeline)")
    state = d.add_mutually_exclusive_group()
    state.add_argument("--pixels", action="store_true",
                       help="play from pixels (text_state off; the default of configs/demo.yaml): a vision warm-up "
                            "stage runs before SFT-init")
    state.add_argument("--text-state", action="store_true",
                       help="the older demo: the state also in the prompt's text (text_state on, no vision warm-up)")
    d.set_defaults(func=_demo)

    from services.launcher.experiment import register as register_experiment

    register_experiment(sub)
