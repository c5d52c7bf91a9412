"""Run the services as local processes: a log file each, readiness waits, clean shutdown.

Used by `gtr up` (machines without Docker) and `gtr demo`. A service that dies while the
others run is an error: everything is stopped and the caller gets a non-zero exit.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

log = logging.getLogger(__name__)


class ServiceDied(RuntimeError):
    pass


class PortInUse(RuntimeError):
    pass


class Stopped(KeyboardInterrupt):
    """A terminating signal, handled like Ctrl-C: `finally` blocks run and stop the children."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_on_signals() -> None:
    """SIGTERM (docker stop, `timeout`, a supervisor) and SIGHUP (a closed terminal) raise `Stopped`
    in the main thread, like SIGINT does: the children run in their own sessions (so that Ctrl-C
    reaches us once), and nothing else would stop them if we were killed by the default action."""
    def raise_stopped(signum, _frame):
        raise Stopped(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_stopped)
    # A command started in the background by a non-interactive shell (`cmd &` in a script, nohup,
    # some CI runners) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt
    # handler: `kill -INT` would be lost and the services would keep running. Restore it.
    signal.signal(signal.SIGINT, signal.default_int_handler)


def port_holder(port: int) -> str | None:
    """Which process listens on `port` ("pid 123: python -m ..."), as far as this user may see."""
    import psutil

    try:
        conns = psutil.net_connections(kind="inet")
    except psutil.Error:
        return None
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port:
            if c.pid is None:
                return "a process of another user"
            try:
                return f"pid {c.pid}: {' '.join(psutil.Process(c.pid).cmdline())}"
            except psutil.Error:
                return f"pid {c.pid}"
    return None


def check_ports(ports: dict[str, int], host: str = "127.0.0.1") -> None:
    """Raise PortInUse naming the process that holds any of `ports` (e.g. services left over by a
    run that was killed), before anything is started."""
    busy = []
    for name, port in ports.items():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
            try:
                s.bind((host, port))
            except OSError:
                busy.append(f"port {port} ({name}) is in use by {port_holder(port) or 'an unknown process'}")
    if busy:
        raise PortInUse("; ".join(busy) + ". Stop it, or choose other ports (--env-port, --teacher-port, ...)")


@dataclass
class Proc:
    name: str
    argv: list[str]
    log_path: Path
    url: str | None = None
    """Base URL whose /readyz says the service is usable (None: no HTTP readiness)."""
    popen: subprocess.Popen | None = None
    _log_file: object = field(default=None, repr=False)

    def tail(self, n: int = 30) -> str:
        try:
            return "".join(self.log_path.read_text(errors="replace").splitlines(keepends=True)[-n:])
        except OSError:
            return ""


def _die_with_parent(parent: int):
    """A preexec function: on Linux the child gets SIGTERM when the launcher dies, even by
    SIGKILL (which the launcher cannot catch to stop its children itself), so no service
    outlives it holding its port."""
    if not sys.platform.startswith("linux"):
        return None

    def preexec() -> None:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os._exit(1)

    return preexec


def gtr_argv(*args: str) -> list[str]:
    """`gtr ARGS` as this interpreter runs it (works without the console script on PATH)."""
    return [sys.executable, "-m", "shared.cli", *args]


class ProcessGroup:
    """Start, watch and stop a set of service processes."""

    def __init__(self, log_dir: str | Path):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, Proc] = {}

    def start(self, name: str, argv: list[str], url: str | None = None, env: dict[str, str] | None = None) -> Proc:
        p = Proc(name, argv, self.log_dir / f"{name}.log", url)
        p._log_file = open(p.log_path, "ab", buffering=0)  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        log.info("starting %s: %s (log: %s)", name, " ".join(argv), p.log_path)
        # Own process group, so Ctrl-C in the terminal reaches us once and we stop children in order.
        p.popen = subprocess.Popen(argv, stdout=p._log_file, stderr=subprocess.STDOUT, env=full_env,
                                   start_new_session=True, preexec_fn=_die_with_parent(os.getpid()))
        self.procs[name] = p
        return p

    def check(self) -> None:
        """Raise ServiceDied if any service exited."""
        for p in self.procs.values():
            rc = p.popen.poll() if p.popen else None
            if rc is not None:
                raise ServiceDied(f"{p.name} exited with code {rc}; last lines of {p.log_path}:\n{p.tail()}")

    def wait_ready(self, name: str, timeout: float = 300.0) -> None:
        p = self.procs[name]
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            self.check()
            try:
                r = httpx.get(f"{p.url}/readyz", timeout=5.0)
                if r.status_code == 200:
                    log.info("%s is ready at %s", name, p.url)
                    return
                last = f"HTTP {r.status_code}"
            except httpx.TransportError as e:
                last = type(e).__name__
            time.sleep(0.5)
        raise ServiceDied(f"{name} not ready after {timeout:.0f}s ({last}); see {p.log_path}:\n{p.tail()}")

    def wait(self, name: str, poll: float = 0.5) -> int:
        """Wait for `name` to exit while checking that the others stay up; its exit code."""
        p = self.procs[name]
        while True:
            rc = p.popen.poll()
            if rc is not None:
                return rc
            for other in self.procs.values():
                if other is not p and other.popen.poll() is not None:
                    raise ServiceDied(f"{other.name} exited with code {other.popen.returncode} while {name} ran; "
                                      f"last lines of {other.log_path}:\n{other.tail()}")
            time.sleep(poll)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM everything (reverse start order), SIGKILL what is still there after `timeout`."""
        for p in reversed(list(self.procs.values())):
            if p.popen and p.popen.poll() is None:
                log.info("stopping %s", p.name)
                try:
                    os.killpg(p.popen.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            if not p.popen:
                continue
            try:
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", p.name, timeout)
                try:
                    os.killpg(p.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.popen.wait()
            if p._log_file:
                p._log_file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
