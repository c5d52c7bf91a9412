"""`gtr teacher serve` and `gtr teacher query` (the debugging client)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from shared.config import ConfigError
    from shared.server import serve
    from services.teacher.app import create_app
    from services.teacher.settings import TeacherSettings

    try:
        settings = _settings(args, TeacherSettings)
    except ValidationError as e:
        lines = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'settings'}: {x['msg']}" for x in e.errors())
        raise ConfigError(f"teacher serve: {lines}") from e
    if settings.backend != "openai" and not (Path(settings.model) / "config.json").exists():
        raise ConfigError(f"no model at {settings.model} (config.json missing); build one with "
                          f"`gtr tiny-model {settings.model}`")
    if settings.backend == "vllm":  # say what to install before the server starts, not in a traceback
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise ConfigError("--backend vllm needs vLLM: pip install 'gtr-turbo[vllm]' (see the README)") from e
    serve(create_app(settings), settings.host, settings.port)
    return 0


def _settings(args: argparse.Namespace, cls):
    return cls(
        backend=args.backend, model=args.model, store=args.store, device=args.device, dtype=args.dtype,
        merge_method=args.merge_method, density=args.density, weighting=args.weighting, ema_alpha=args.ema_alpha,
        window=args.window, merge_every=args.merge_every, scale=args.scale, merge_device=args.merge_device,
        max_upload_mb=args.max_upload_mb, max_tokens=args.max_tokens, openai_base_url=args.openai_base_url,
        openai_api_key_env=args.openai_api_key_env, host=args.host, port=args.port,
        vllm=_vllm_settings(args))


def _vllm_settings(args: argparse.Namespace) -> dict:
    from services.teacher.backends.vllm_cli import settings_from_args

    return settings_from_args(args)


def _query(args: argparse.Namespace) -> int:
    from services.teacher.query import run_query

    return run_query(args)


def register(sub) -> None:
    p = sub.add_parser("teacher", help="the teacher service: serve it, or query it by hand",
                       description="The merged-checkpoint teacher (DESIGN §3.2).")
    tsub = p.add_subparsers(dest="teacher_command", metavar="{serve,query}")
    tsub.required = True

    s = tsub.add_parser("serve", help="serve the teacher over HTTP",
                        description="Serve /v1/logits and /v1/generate from a base model plus the TIES merge of "
                                    "the uploaded LoRA checkpoints.")
    s.add_argument("--backend", choices=["hf", "vllm", "openai"], default="hf")
    s.add_argument("--model", required=True, help="base model directory (hf, vllm) or remote model name (openai)")
    s.add_argument("--store", required=True, help="checkpoint store directory (survives restarts)")
    s.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    s.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    s.add_argument("--merge-method", choices=["ties", "linear", "none"], default="ties",
                   help="none = the static base model (the paper's ablation)")
    s.add_argument("--density", type=float, default=0.5, help="TIES: fraction of each delta kept (default 0.5)")
    s.add_argument("--weighting", choices=["sma", "ema"], default="sma")
    s.add_argument("--ema-alpha", type=float, default=0.5, help="EMA weight alpha (1 - alpha)^age")
    s.add_argument("--window", type=int, default=None, help="merge only the last N checkpoints (default all)")
    s.add_argument("--merge-every", type=int, default=1, help="merge after every N uploads (default 1)")
    s.add_argument("--scale", type=float, default=1.0, help="multiply the merged delta (default 1)")
    s.add_argument("--merge-device", default="cpu", help="device the merge computes on (default cpu)")
    s.add_argument("--max-upload-mb", type=float, default=1024.0, help="largest accepted upload (default 1024)")
    s.add_argument("--max-tokens", type=int, default=65536,
                   help="most padded tokens (batch x width) per /v1/logits or /v1/generate request")
    s.add_argument("--openai-base-url", default=None, help="openai backend: endpoint (default $OPENAI_BASE_URL)")
    s.add_argument("--openai-api-key-env", default="OPENAI_API_KEY",
                   help="openai backend: the environment variable that holds the API key")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8200)
    from services.teacher.backends.vllm_cli import add_arguments as add_vllm_arguments

    add_vllm_arguments(s)
    s.set_defaults(func=_serve)

    q = tsub.add_parser("query", help="debug client: info, a thought for an image, per-token log-probs",
                        description="Query a running teacher by hand.")
    q.add_argument("--url", default="http://127.0.0.1:8200", help="teacher URL (default http://127.0.0.1:8200)")
    qsub = q.add_subparsers(dest="query_command", metavar="{info,think,score}")
    qsub.required = True
    qsub.add_parser("info", help="show the teacher's version, backend, merge settings, checkpoints")
    t = qsub.add_parser("think", help="send an image + prompt, print the teacher's generated thought")
    t.add_argument("--prompt", required=True)
    t.add_argument("--image", default=None, help="PNG/JPEG file")
    t.add_argument("--max-new-tokens", type=int, default=128)
    t.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    t.add_argument("--top-p", type=float, default=1.0)
    t.add_argument("--seed", type=int, default=None)
    c = qsub.add_parser("score", help="print each completion token's teacher log-prob (and student's, and KL)")
    c.add_argument("--prompt", required=True)
    c.add_argument("--completion", required=True, help="completion text (tokenized by the teacher)")
    c.add_argument("--image", default=None, help="PNG/JPEG file")
    c.add_argument("--student", default=None,
                   help="student model directory: also print its log-prob and the per-token KL")
    c.add_argument("--tokenizer", default=None,
                   help="model directory whose tokenizer shows token text (default: --student)")
    c.add_argument("--top-k", type=int, default=0, help="also show the teacher's top-k at each position")
    c.add_argument("--temperature", type=float, default=1.0)
    for sp in (t, c):
        sp.add_argument("--json", action="store_true", help="print the raw JSON reply")
    q.set_defaults(func=_query)
