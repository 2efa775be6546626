"""What ships around the package: the ``dev`` script, the Dockerfile and the compose file.

There is no Docker engine where these tests run: the image is not built here. The compose
file is parsed and its structure checked; the Dockerfile's key lines are checked."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT


def fake_venv(tmp_path: Path) -> Path:
    """A venv that ``./dev`` takes as installed (its stamp matches pyproject.toml), whose
    python does nothing, so ``./dev`` neither creates nor installs anything."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name in ("python", "actors"):
        tool = venv / "bin" / name
        tool.write_text("#!/bin/sh\nexit 0\n")
        tool.chmod(0o755)
    digest = hashlib.sha1((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:12]
    (venv / f".installed-{digest}").touch()
    return venv


def dev(*args: str, venv: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ACTORS_VENV": str(venv), "SHELL": "/bin/sh"}
    return subprocess.run(
        [str(ROOT / "dev"), *args], input=stdin, env=env, capture_output=True, text=True, timeout=60
    )


def test_dev_shell_puts_the_actors_command_on_path(tmp_path: Path) -> None:
    venv = fake_venv(tmp_path)
    result = dev("shell", venv=venv, stdin="command -v actors\necho $VIRTUAL_ENV\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == [str(venv / "bin" / "actors"), str(venv)], result.stdout


def test_dev_demo_says_how_to_get_the_actors_command(tmp_path: Path) -> None:
    result = dev("demo", venv=fake_venv(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "./dev shell" in result.stdout and "bin/activate" in result.stdout, result.stdout


# ---- the container image and the compose file --------------------------------------------------


def dockerfile_lines() -> list[str]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_dockerfile_installs_at_build_time_and_runs_as_a_user() -> None:
    lines = dockerfile_lines()
    instructions = [line.split()[0].upper() for line in lines]
    assert instructions[0] == "FROM"
    installs = [n for n, line in enumerate(lines) if line.startswith("RUN") and "pip install" in line]
    assert installs, "the project is installed when the image is built"
    assert all(" -e " not in lines[n] and "--editable" not in lines[n] for n in installs)
    users = [n for n, line in enumerate(lines) if line.startswith("USER")]
    assert users and users[-1] > installs[-1], "the last USER comes after the installs"
    user = lines[users[-1]].split()[1]
    assert user.split(":")[0] not in {"root", "0"}, user
    assert any(line.startswith("RUN") and "useradd" in line for line in lines), "a user of its own"
    assert any(line.startswith("ENTRYPOINT") and "actors" in line for line in lines)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", ".actors"} <= set(ignored), ignored


def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML comes with the dev extra (pip install -e '.[dev]')")
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def test_compose_builds_the_image_restarts_workers_and_keeps_the_port_private() -> None:
    services = compose()["services"]
    assert set(services) == {"valkey", "worker"}
    valkey, worker = services["valkey"], services["worker"]

    assert "ports" not in valkey, "the server's port is not published unless asked"
    assert valkey["restart"] == "unless-stopped"
    assert "--appendonly" in valkey["command"] and "valkey-data:/data" in valkey["volumes"]

    assert worker["build"] in (".", {"context": "."}), worker.get("build")
    assert worker["restart"] == "on-failure"
    assert "volumes" not in worker, "the image holds the code: no clone mounted, nothing installed at start"
    command = worker["command"]
    assert isinstance(command, list) and command[0] == "worker", command
    assert "pip" not in " ".join(command)
    assert worker["depends_on"]["valkey"]["condition"] == "service_healthy"
    assert "user" not in worker or worker["user"] not in ("root", "0")

    published = compose_override()["services"]["valkey"]["ports"]
    assert all(str(port).startswith("127.0.0.1:") for port in published), published


def compose_override() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.ports.yml").read_text())
    return loaded
