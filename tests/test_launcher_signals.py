"""`gtr up` and `gtr demo` stop their services on every terminating signal, as on Ctrl-C, and
refuse to start on a busy port, naming the process that holds it (issue 11 §5). Real processes:
the CLI, the env service and the teacher on the tiny model."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} not ready")


class Spawned:
    """The gtr processes a test starts; at teardown whatever of them and their services is left
    (a failing test) is killed by pid."""

    def __init__(self):
        self.procs: list[psutil.Process] = []

    def gtr(self, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "shared.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        self.procs.append(psutil.Process(proc.pid))
        return proc

    def children(self, proc: subprocess.Popen) -> list[psutil.Process]:
        kids = psutil.Process(proc.pid).children(recursive=True)
        self.procs.extend(kids)
        return kids

    def kill_all(self) -> None:
        for p in self.procs:
            try:
                for c in p.children(recursive=True):
                    c.kill()
                p.kill()
            except psutil.Error:
                pass


@pytest.fixture
def spawned():
    s = Spawned()
    yield s
    s.kill_all()


def _assert_all_stopped(children: list[psutil.Process], ports: list[int]) -> None:
    assert children, "the command started no services"
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.pid for p in alive]
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))  # free again


def test_gtr_up_stops_its_services_on_sigterm(tmp_path, tiny_model_dir, spawned):
    env_port, teacher_port = free_port(), free_port()
    proc = spawned.gtr("up", "--no-trainer", "--model", str(tiny_model_dir), "--device", "cpu", "--run-dir",
                       str(tmp_path), "--env-port", str(env_port), "--teacher-port", str(teacher_port),
                       "--ready-timeout", "300")
    _wait_ready(f"http://127.0.0.1:{teacher_port}", proc)
    children = spawned.children(proc)
    proc.send_signal(signal.SIGTERM)  # docker stop, `timeout`, a supervisor
    assert proc.wait(60) == 128 + signal.SIGTERM
    _assert_all_stopped(children, [env_port, teacher_port])


def test_gtr_demo_stops_its_services_on_sighup(tmp_path, spawned):
    """A closed terminal: the demo is SIGHUPed while its env service runs (the SFT-init phase)."""
    env_port, teacher_port = free_port(), free_port()
    proc = spawned.gtr("demo", "--quick", "--run-dir", str(tmp_path / "demo"), "--env-port", str(env_port),
                       "--teacher-port", str(teacher_port))
    _wait_ready(f"http://127.0.0.1:{env_port}", proc)
    children = spawned.children(proc)
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(60) == 128 + signal.SIGHUP
    _assert_all_stopped(children, [env_port])


@pytest.mark.parametrize("command", ["up", "demo"])
def test_a_busy_port_is_named_with_its_process_before_anything_starts(tmp_path, tiny_model_dir, command, spawned):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        args = (["up", "--no-trainer", "--model", str(tiny_model_dir), "--run-dir", str(tmp_path)] if command == "up"
                else ["demo", "--run-dir", str(tmp_path / "demo")])
        proc = spawned.gtr(*args, "--env-port", str(free_port()), "--teacher-port", str(port))
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert f"port {port} (teacher) is in use by pid {os.getpid()}" in err
    assert "pytest" in err.split(f"pid {os.getpid()}:", 1)[1]  # the holder's command line
    assert not (tmp_path / "logs").exists() and not (tmp_path / "demo").exists()  # nothing was started


def test_services_die_with_a_launcher_killed_by_sigkill(tmp_path, spawned):
    """SIGKILL cannot be caught, so the launcher cannot stop its children then; the kernel does
    (PR_SET_PDEATHSIG), or a killed `gtr demo` would leave its services holding their ports."""
    code = ("import sys, time\n"
            "from services.launcher.procs import ProcessGroup\n"
            "g = ProcessGroup(sys.argv[1])\n"
            "p = g.start('sleeper', [sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            "print(p.popen.pid, flush=True)\n"
            "time.sleep(120)\n")
    launcher = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(launcher.stdout.readline()))
    spawned.procs += [psutil.Process(launcher.pid), child]
    assert child.is_running()
    launcher.kill()
    launcher.wait(10)
    try:
        child.wait(10)  # raises TimeoutExpired while the child lives on
    except psutil.NoSuchProcess:
        pass
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
