"""`gtr teacher serve` and `gtr teacher query` (the debugging client)."""

from __future__ import annotations

import argparse
from pathlib import Path


# Flag names are a contract (DESIGN §2): the fields' own names except where these rename them.
_MERGE_FLAGS = {"method": "merge-method"}
_VLLM_FLAGS = {"gpu_memory_utilization": "vllm-gpu-memory", "tensor_parallel_size": "vllm-tp"}
_VLLM_NO_FLAG = ("max_images_per_prompt", "seed", "scratch_dir", "engine_kwargs", "lora")
_FLAGS: dict[str, dict[str, str]] = {}
"""Filled by `register`: {section: {argparse dest: field}} for `settings_from_args`."""


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from shared.config import ConfigError
    from shared.server import serve
    from services.teacher.app import create_app

    try:
        settings = settings_from_args(args)
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


def settings_from_args(args: argparse.Namespace):
    """TeacherSettings from the parsed flags; raises pydantic's ValidationError on bad values."""
    from shared.config import arguments_to_data
    from services.teacher.settings import TeacherSettings

    data = arguments_to_data(args, _FLAGS["top"])
    data["merge"] = arguments_to_data(args, _FLAGS["merge"])
    data["vllm"] = arguments_to_data(args, _FLAGS["vllm"])
    return TeacherSettings.model_validate(data)


def add_serve_arguments(s: argparse.ArgumentParser) -> None:
    """Every TeacherSettings field as a flag (the settings are the one declaration)."""
    from shared.config import add_model_arguments
    from shared.schemas import MergeSettings
    from services.teacher.settings import TeacherSettings, VllmSettings

    _FLAGS["top"] = add_model_arguments(s, TeacherSettings, skip=("merge", "vllm"))
    g = s.add_argument_group("merge (DESIGN §4)")
    _FLAGS["merge"] = add_model_arguments(g, MergeSettings, dest_prefix="merge_", rename=_MERGE_FLAGS)
    g = s.add_argument_group("vllm backend (--backend vllm; see the README's vLLM section)")
    _FLAGS["vllm"] = add_model_arguments(g, VllmSettings, dest_prefix="vllm_", flag_prefix="vllm-",
                                         rename=_VLLM_FLAGS, skip=_VLLM_NO_FLAG)


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
    add_serve_arguments(s)
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
