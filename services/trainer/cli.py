"""`gtr train`, `gtr sft`, `gtr eval` (registered into shared.cli)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def torchrun_argv(args: argparse.Namespace) -> list[str]:
    """`gtr train --nproc N ...` as the torchrun command it stands for (one node, standalone
    rendezvous on a free port); the training flags are passed on unchanged."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
            "-m", "services.trainer", "--log-level", args.log_level, "train"]
    if args.config:
        argv += ["--config", args.config]
    for item in args.set or []:
        argv += ["--set", item]
    if args.resume:
        argv.append("--resume")
    if args.port is not None:
        argv += ["--port", str(args.port)]
    return argv


def _nproc(v: str) -> str:
    if v in ("gpu", "auto") or (v.isdigit() and int(v) >= 1):
        return v
    raise argparse.ArgumentTypeError(f"--nproc takes a number of processes (>= 1) or 'gpu', not {v!r}")


def _train(args: argparse.Namespace) -> int:
    from services.trainer.distributed import DistributedError, launched_by_torchrun

    if args.nproc is not None and not launched_by_torchrun():
        argv = torchrun_argv(args)
        log.info("exec: %s", " ".join(argv))
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(argv[0], argv)  # torchrun takes over this process: signals reach it directly
    from services.trainer.config import load_train_config
    from services.trainer.status import StatusBoard
    from services.trainer.train import train

    overrides = list(args.set or [])
    if args.resume:
        overrides.append("resume=true")
    if args.port is not None:
        overrides.append(f"trainer.port={args.port}")
    cfg = load_train_config(args.config, overrides)
    board = StatusBoard(cfg.updates, cfg.run_dir, cfg.guidance.mode)

    def on_signal(signum, _frame):
        if board.stop_requested.is_set():  # a second signal: stop now, without a checkpoint
            raise KeyboardInterrupt
        log.warning("signal %d: finishing the current update, saving, then exiting (again to abort)", signum)
        board.stop_requested.set()

    server = None
    # The status service (DESIGN §3.3) reads the board the loop writes; under torchrun rank 0 serves it.
    if cfg.trainer.port and int(os.environ.get("RANK", "0")) == 0:
        from services.trainer.app import ServerThread, create_app

        server = ServerThread(create_app(board), cfg.trainer.host, cfg.trainer.port).start()
        log.info("trainer service on http://%s:%d (/v1/status, /metrics)", cfg.trainer.host, cfg.trainer.port)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        summary = train(cfg, board=board)
    except DistributedError as e:
        # Said here, while SIGTERM is still ours: when a rank dies, torchrun SIGTERMs the survivors
        # within its 0.1 s monitor interval, and once the default handler is back a survivor would
        # die silently before Python printed the traceback (seen in CI).
        log.error("DistributedError: %s", e)
        log.debug("where the collective failed", exc_info=True)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if server is not None:
            server.stop()
    if summary.get("rank", 0) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "last"} | {"last": _short(summary["last"])}, indent=2))
    return 0


def _short(m: dict) -> dict:
    keys = ("update", "env_steps", "success_rate", "mean_return", "format_ok_rate", "kl_mean", "teacher_version")
    return {k: m.get(k) for k in keys}


def _sft(args: argparse.Namespace) -> int:
    from services.trainer.sft_init import SFTConfig, run_sft
    from shared.config import load_config

    overrides = list(args.set or [])
    for flag, key in (("model", "model.path"), ("out", "out"), ("env_url", "env.url"), ("env_id", "env.env_id"),
                      ("episodes", "episodes"), ("epochs", "epochs"), ("lr", "lr"), ("batch_size", "batch_size"),
                      ("seed", "seed"), ("device", "model.device")):
        v = getattr(args, flag)
        if v is not None:
            overrides.append(f"{key}={v}")
    cfg = load_config(SFTConfig, args.config, overrides)
    summary = run_sft(cfg)
    print(json.dumps(summary, indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import yaml

    from services.trainer.evaluate import evaluate

    options = {}
    for item in args.option or []:
        k, _, v = item.partition("=")
        options[k] = yaml.safe_load(v)
    report = evaluate(args.model, args.env_url, args.env_id, episodes=args.episodes, adapter=args.adapter,
                      greedy=args.temperature is None, temperature=args.temperature or 1.0,
                      max_new_tokens=args.max_new_tokens, max_steps=args.max_steps, seed=args.seed,
                      num_envs=args.num_envs, options=options, device=args.device)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    short = {k: v for k, v in report.items() if k != "per_episode"}
    print(json.dumps(short, indent=2))
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="multi-turn LoRA-PPO guided by the merged teacher",
                       description="Train with PPO on the env service, guided by the teacher (guidance.mode "
                                   "none|kl|sft). Writes <run_dir>/metrics.jsonl, TensorBoard, samples, checkpoint.")
    p.add_argument("--config", help="YAML config (configs/*.yaml)")
    p.add_argument("--set", action="extend", nargs="+", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.path=runs/sft --set guidance.mode=kl (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from <run_dir>/checkpoint")
    p.add_argument("--port", type=int, help="trainer status service port (0: none; default trainer.port)")
    p.add_argument("--nproc", type=_nproc, metavar="N|gpu",
                   help="data parallel on this node: exec `torchrun --standalone --nproc-per-node N -m services.trainer` "
                        "with these flags (NCCL on GPUs, one per rank; gloo on CPU). `gpu`: one rank per visible GPU. "
                        "Several nodes: run torchrun yourself (docs/distributed.md)")
    p.set_defaults(func=_train)

    p = sub.add_parser("sft", help="SFT-init from the env experts, folded into a new base model",
                       description="Collect expert demonstrations from the env service, train LoRA on them, merge "
                                   "the adapter and save a new base model directory.")
    p.add_argument("--config", help="YAML config (keys of services.trainer.sft_init.SFTConfig)")
    p.add_argument("--set", action="extend", nargs="+", metavar="KEY=VALUE")
    p.add_argument("--model", help="source model directory (model.path)")
    p.add_argument("--out", help="output model directory")
    p.add_argument("--env-url", dest="env_url")
    p.add_argument("--env-id", dest="env_id")
    p.add_argument("--episodes", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device")
    p.set_defaults(func=_sft)

    p = sub.add_parser("eval", help="evaluate a base model or an adapter on N episodes",
                       description="Run N episodes (seeds SEED..SEED+N-1); report success rate, mean return, "
                                   "format-valid rate, per task type.")
    p.add_argument("--model", required=True, help="base model directory")
    p.add_argument("--adapter", help="adapter directory (peft save_pretrained; e.g. <run_dir>/checkpoint)")
    p.add_argument("--env-url", dest="env_url", default="http://127.0.0.1:8100")
    p.add_argument("--env-id", dest="env_id", required=True)
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--temperature", type=float, help="sample at this temperature (default: greedy)")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=64)
    p.add_argument("--max-steps", dest="max_steps", type=int, default=50)
    p.add_argument("--num-envs", dest="num_envs", type=int, default=4)
    p.add_argument("--seed", type=int, default=10_000)
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="env option (repeatable)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="write the full JSON report here")
    p.set_defaults(func=_eval)
