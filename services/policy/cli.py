"""`gtr policy serve`: the teacher's service in its `latest` role, on port 8400 by default.

The flags are the teacher's (one declaration: `services.teacher.settings`), with the merge
method fixed to `latest`: a policy serves one adapter, unmerged, so the other merge flags do not
apply.
"""

from __future__ import annotations

import argparse

DEFAULT_PORT = 8400


def register(sub) -> None:
    from services.teacher.cli import add_serve_arguments

    p = sub.add_parser("policy", help="the policy service (rollout engine): serve the trainer's newest adapter",
                       description="The rollout engine (DESIGN §3.4).")
    psub = p.add_subparsers(dest="policy_command", metavar="{serve}")
    psub.required = True
    s = psub.add_parser(
        "serve", help="serve /v1/generate from W0 + the newest uploaded adapter",
        description="Serve W0 + the newest adapter uploaded to POST /v1/checkpoints, exactly (no merge, no "
                    "window), for the trainer's rollouts (rollout.engine: service). Same routes, errors and auth "
                    "as the teacher; every reply names the version that sampled it. With --backend vllm the "
                    "adapter is loaded through vLLM's LoRA support (--vllm-max-lora-rank); modules it ignores "
                    "(the vision tower) are reloaded densely. The merge flags do not apply.")
    add_serve_arguments(s)
    s.set_defaults(func=_serve_policy, merge_method="latest", port=DEFAULT_PORT)


def _serve_policy(args: argparse.Namespace) -> int:
    from shared.config import ConfigError
    from services.teacher.cli import _serve

    if args.merge_method != "latest":
        raise ConfigError("gtr policy serve serves the newest adapter unmerged (--merge-method latest); "
                          "for merges run gtr teacher serve")
    if args.backend == "openai":
        raise ConfigError("gtr policy serve needs the student's weights: --backend hf or vllm")
    return _serve(args)
