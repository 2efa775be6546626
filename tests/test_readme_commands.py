"""The README's commands work as written (issue #15 item 3): its quick start runs, and its
refund commands name the demo's namespace and, run against a refund that waits for a person,
show the wait and approve it. ``approve``, ``cancel`` and ``inspect`` warn when the actor is
not there to take them, the usual sign of another namespace."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from examples import refund_approval
from examples.refund_approval import Refund, RefundRequest

from .conftest import ROOT, eventually
from .test_cli import _env, actors_cli, ok

README = (ROOT / "README.md").read_text()
DEMO_ORDER = "3f9a1c-large"
"""The order id the README's refund commands use (the demo prints fresh ones)."""


def readme_commands(verb: str) -> list[str]:
    return [
        line.split("  #")[0].strip()
        for line in README.splitlines()
        if line.startswith(f"actors {verb} Refund/")
    ]


def test_every_refund_command_names_the_demos_namespace() -> None:
    assert refund_approval.NAMESPACE == "refund-demo"
    commands = [c for verb in ("approve", "inspect", "cancel") for c in readme_commands(verb)]
    assert len(commands) >= 6, commands
    for command in commands:
        assert "--namespace refund-demo" in command, command
    assert "actors waits --namespace refund-demo" in README


@pytest.fixture(autouse=True)
def ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "ledger.txt"
    monkeypatch.setattr(refund_approval, "LEDGER", path)
    monkeypatch.setenv("REFUND_RISK_FAILURES", "0")
    return path


async def test_the_readme_refund_commands_show_and_approve_a_waiting_refund(
    start_worker: Callable[..., Any], connect: Callable[..., Any], redis_url: str, namespace: str
) -> None:
    await start_worker(refund_approval.app)
    [inspect] = [c for c in readme_commands("inspect") if DEMO_ORDER in c]
    [approve] = [c for c in readme_commands("approve") if DEMO_ORDER in c]
    [cancel] = [c for c in readme_commands("cancel") if DEMO_ORDER in c]
    async with connect(app=refund_approval.app) as client:
        ref = Refund.ref(DEMO_ORDER)
        request = RefundRequest(order_id=DEMO_ORDER, amount=900, email="r@example.com", survey_delay=0.1)
        await client.send(ref, request)
        await eventually(lambda: _waiting(client, ref))

        shown = await _run(inspect, redis_url, namespace)
        assert "turn      waiting" in ok(shown) and "waiting for  Approval" in shown.stdout
        assert shown.stderr == "", "no warning: the actor is there"

        approved = await _run(approve, redis_url, namespace)
        assert re.fullmatch(r"[0-9a-f]{32}\n", ok(approved)) and approved.stderr == ""
        state = await eventually(lambda: _refunded(client, ref), timeout=30)
        assert state.decided_by == "alice"
        await eventually(lambda: _closed(client, ref), timeout=30)

        # Nothing waits any more: the commands say so, naming the namespace they looked in.
        late = await _run(approve, redis_url, namespace)
        assert f"in namespace {namespace!r}" in ok(late) or f"in namespace {namespace!r}" in late.stderr
        assert "no turn of it waits for an Approval" in late.stderr
        assert "has no open turn now" in ok_stderr(await _run(cancel, redis_url, namespace))

    async with connect(namespace=f"{namespace}-x"):
        pass  # another app's namespace, where no Refund ever ran
    elsewhere = await actors_cli(
        *shlex.split(inspect)[1:], "--redis", redis_url, "--namespace", f"{namespace}-x"
    )
    assert "nothing is known of it" in ok_stderr(elsewhere) and f"{namespace}-x" in elsewhere.stderr


def ok_stderr(result: subprocess.CompletedProcess[str]) -> str:
    ok(result)
    return result.stderr


async def _run(command: str, redis_url: str, namespace: str) -> subprocess.CompletedProcess[str]:
    """A README command as written, on the test's server and namespace instead of the demo's."""
    args = shlex.split(command.replace("--namespace refund-demo", f"--namespace {namespace}"))
    assert args[0] == "actors"
    return await actors_cli(*args[1:], "--redis", redis_url)


async def _waiting(client: Any, ref: Any) -> bool:
    view = await client.inspect(ref)
    return view.turn is not None and view.turn.status == "waiting"


async def _refunded(client: Any, ref: Any) -> Any:
    state = await client.state(ref)
    return state if state is not None and state.status == "refunded" else None


async def _closed(client: Any, ref: Any) -> bool:
    return (await client.inspect(ref)).turn is None


def test_the_quick_start_runs_as_written(redis_url: str, namespace: str, tmp_path: Path) -> None:
    [code] = re.findall(r"## Quick start\n\n```python\n(.*?)```", README, re.S)
    script = tmp_path / "quick_start.py"
    script.write_text(code)
    env = {
        **_env(ACTORS_REDIS_URL=redis_url, ACTORS_NAMESPACE=namespace),
        "PYTHONPATH": os.pathsep.join([str(ROOT)]),
    }
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["total=4", "total=4", "total=1"], result.stdout
