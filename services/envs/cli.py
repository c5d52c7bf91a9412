"""`gtr env serve`: run the env service."""

from __future__ import annotations

import argparse


def _serve(args: argparse.Namespace) -> int:
    from services.envs.app import create_app
    from services.envs.settings import EnvServiceSettings
    from shared.server import serve

    given = {k: v for k, v in {"host": args.host, "port": args.port, "max_sessions": args.max_sessions,
                               "ttl_s": args.ttl, "procs": args.procs, "workers": args.workers, "alfworld_data": args.alfworld_data}.items()
             if v is not None}
    settings = EnvServiceSettings(**given)
    serve(create_app(settings), settings.host, settings.port, log_level=args.uvicorn_log_level)
    return 0


def register(subparsers) -> None:
    env = subparsers.add_parser("env", help="the env service (Points24, EZPoints, NumberLine, ALFWorld)")
    sub = env.add_subparsers(dest="env_command", metavar="SUBCOMMAND")
    p = sub.add_parser("serve", help="serve the envs over HTTP",
                       description="Serve Points24, EZPoints, NumberLine and ALFWorld over HTTP (DESIGN §3.1).")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8100, help="port (default 8100)")
    p.add_argument("--max-sessions", type=int, default=None, help="open sessions at most (env GTR_ENV_MAX_SESSIONS, default 256)")
    p.add_argument("--ttl", type=float, default=None, help="idle seconds before a session expires (env GTR_ENV_TTL_S, default 1800)")
    p.add_argument("--procs", type=int, default=None,
                   help="env worker processes: sessions are spread over them so that a batched step uses that many "
                        "cores; 0 runs the envs in the service process (env GTR_ENV_PROCS, default min(4, CPUs))")
    p.add_argument("--workers", type=int, default=None,
                   help="threads per env worker process, so that a slow step never blocks other sessions "
                        "(env GTR_ENV_WORKERS, default 4)")
    p.add_argument("--alfworld-data", default=None, help="alfworld-download tree (env ALFWORLD_DATA; default: bundled games)")
    p.add_argument("--uvicorn-log-level", default="warning", help="uvicorn's log level (default warning)")
    p.set_defaults(func=_serve)
    env.set_defaults(func=lambda args: (env.print_help(), 2)[1])
