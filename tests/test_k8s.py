"""The Kubernetes manifests in deploy/k8s: valid against the Kubernetes JSON schemas (those the
``kubernetes-validate`` package ships, strict: an unknown field is an error), and saying what
the runtime needs: the worker's arguments parse with the real CLI, its probes ask its health
port, its grace period is above its drain grace, Valkey keeps an AOF behind a password, and
the Valkey startup command runs a real server here as it would in its container."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import actors
from actors import cli, health
from actors.server_files import find_binary

from .conftest import ROOT

K8S = ROOT / "deploy" / "k8s"
VERSIONS = ("1.29", "1.37")
"""The oldest Kubernetes the manifests promise (PodDisruptionBudget's unhealthyPodEvictionPolicy
is GA from 1.31, served from 1.27), and the newest the validator knows."""

yaml = pytest.importorskip("yaml", reason="PyYAML comes with the dev extra (pip install -e '.[dev]')")


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def documents() -> list[dict[str, Any]]:
    return [doc for path in manifest_files() for doc in yaml.safe_load_all(path.read_text()) if doc]


def one(kind: str, name: str) -> dict[str, Any]:
    [found] = [d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def container(workload: dict[str, Any]) -> dict[str, Any]:
    [only] = workload["spec"]["template"]["spec"]["containers"]
    return only


def kustomization() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return loaded


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(version: str) -> None:
    validator = pytest.importorskip("kubernetes_validate", reason="comes with the dev extra")
    docs = documents()
    assert {d["kind"] for d in docs} >= {"Deployment", "PodDisruptionBudget", "StatefulSet", "Service"}
    for doc in docs:
        validator.validate(doc, version, strict=True)


def test_the_kustomization_takes_every_manifest_and_generates_the_password_secret() -> None:
    k = kustomization()
    assert sorted(k["resources"]) == [p.name for p in manifest_files()]
    [secret] = k["secretGenerator"]
    assert secret["name"] == "valkey" and secret["envs"] == ["valkey.env"]
    assert "deploy/k8s/valkey.env" in (ROOT / ".gitignore").read_text().split(), "never committed"
    assert "deploy" in (ROOT / ".dockerignore").read_text().split(), "never in an image's build context"
    refs = [
        e["valueFrom"]["secretKeyRef"]
        for d in documents()
        if d["kind"] in ("Deployment", "StatefulSet")
        for e in container(d).get("env", [])
        if "valueFrom" in e
    ]
    assert refs and all(r == {"name": "valkey", "key": "password"} for r in refs), refs


def worker_args() -> Any:
    worker = container(one("Deployment", "worker"))
    return cli.parser().parse_args(worker["args"])


def test_the_worker_arguments_parse_and_keep_the_url_off_the_command_line() -> None:
    worker = container(one("Deployment", "worker"))
    args = worker_args()
    assert args.command == "worker" and args.redis is None
    assert not any("redis" in arg for arg in worker["args"]), worker["args"]
    env = {e["name"]: e for e in worker["env"]}
    url = env["ACTORS_REDIS_URL"]["value"]
    # $(VAR) is expanded by the kubelet from a variable defined before it (here: the Secret's).
    names = [e["name"] for e in worker["env"]]
    for ref in re.findall(r"\$\((\w+)\)", url):
        assert names.index(ref) < names.index("ACTORS_REDIS_URL") and "valueFrom" in env[ref]
    service = one("Service", "valkey")
    [port] = service["spec"]["ports"]
    assert url.endswith(f"@{service['metadata']['name']}:{port['port']}/0"), url
    # The image the Dockerfile builds (compose builds it too), tagged by the kustomization.
    assert worker["image"] == "durable-actors", worker["image"]
    assert {"name": "durable-actors", "newTag": "latest"} in kustomization()["images"]


def test_the_worker_drains_within_its_grace_period_and_is_probed_on_its_health_port() -> None:
    deployment = one("Deployment", "worker")
    pod, worker, args = deployment["spec"]["template"]["spec"], container(deployment), worker_args()
    assert pod["terminationGracePeriodSeconds"] > args.grace, "the drain must fit in the grace period"
    where = health.endpoint(args)
    assert where is not None and where.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    probes = {kind: worker[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert all(ports[probe["port"]] == where.port for probe in probes.values()), probes
    assert probes["livenessProbe"]["path"] == "/livez" and probes["readinessProbe"]["path"] == "/readyz"
    assert worker["livenessProbe"]["timeoutSeconds"] >= 2, "the answer comes from a thread, but give it time"


def test_the_shard_count_leaves_four_shards_per_process_at_the_planned_scale() -> None:
    args = worker_args()
    replicas = one("Deployment", "worker")["spec"]["replicas"]
    assert args.shards is not None, "fixed per namespace: set it on purpose"
    assert args.shards >= 4 * replicas * args.processes, (args.shards, replicas, args.processes)


def test_the_disruption_budget_covers_the_worker_pods() -> None:
    budget, deployment = one("PodDisruptionBudget", "worker"), one("Deployment", "worker")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["selector"] == budget["spec"]["selector"]
    assert budget["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]


def test_pods_run_as_a_user_on_a_read_only_root_with_resources() -> None:
    uid = re.search(r"useradd .*--uid (\d+)", (ROOT / "Dockerfile").read_text())
    assert uid is not None
    for kind, name in (("Deployment", "worker"), ("StatefulSet", "valkey")):
        workload = one(kind, name)
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
        c = container(workload)
        security = c["securityContext"]
        assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    worker_pod = one("Deployment", "worker")["spec"]["template"]["spec"]
    assert worker_pod["securityContext"]["runAsUser"] == int(uid.group(1)), "the image's own user"


def test_valkey_keeps_an_aof_on_a_claimed_volume() -> None:
    valkey = one("StatefulSet", "valkey")
    c = container(valkey)
    script = c["args"][0]
    assert "--appendonly yes" in script and "--appendfsync everysec" in script and "--dir /data" in script
    assert "requirepass" in script and "$VALKEY_PASSWORD" in script
    [claim] = valkey["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in c["volumeMounts"]
    assert valkey["spec"]["serviceName"] == "valkey"
    pod_labels = valkey["spec"]["template"]["metadata"]["labels"]
    assert one("Service", "valkey")["spec"]["selector"].items() <= pod_labels.items()


def test_the_valkey_startup_command_runs_a_server_with_the_password_and_the_aof(tmp_path: Path) -> None:
    """The container's command and its readiness probe, run here with the same binaries: the
    password reaches the server on stdin, and the probe says ready only with it."""
    c = container(one("StatefulSet", "valkey"))
    server_bin = Path(find_binary())
    if not (server_bin.parent / "valkey-cli").exists():
        pytest.skip("no valkey-cli beside the server binary")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = c["args"][0]
    assert "--port 6379" in script and "--dir /data" in script
    script = script.replace("--port 6379", f"--port {port} --bind 127.0.0.1").replace(
        "--dir /data", f"--dir {shlex.quote(str(tmp_path))}"
    )
    bin_dir = tmp_path / "bin"  # `valkey-server` and `valkey-cli` by those names, as in the image
    bin_dir.mkdir()
    for name in ("valkey-server", "valkey-cli"):
        (bin_dir / name).symlink_to(server_bin.parent / name)
    password = "0123abcd" * 8
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "VALKEY_PASSWORD": password}
    server = subprocess.Popen([*c["command"], script], env=env, stdout=subprocess.DEVNULL, cwd=tmp_path)
    try:
        [probe] = c["readinessProbe"]["exec"]["command"][2:]
        probe = probe.replace("valkey-cli", f"valkey-cli -p {port}")

        def ready(auth: str) -> bool:
            result = subprocess.run(["sh", "-c", probe], env={**env, "REDISCLI_AUTH": auth}, timeout=10)
            return result.returncode == 0

        deadline = time.monotonic() + 20
        while not ready(password):
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
        assert not ready("wrong"), "the probe must not pass on NOAUTH"

        def config(name: str) -> str:
            out = subprocess.run(
                ["valkey-cli", "-p", str(port), "config", "get", name],
                env={**env, "REDISCLI_AUTH": password}, capture_output=True, text=True, timeout=10,
            )  # fmt: skip
            return out.stdout.split()[-1]

        assert config("appendonly") == "yes" and config("appendfsync") == "everysec"
        assert config("maxmemory-policy") == "noeviction" and config("requirepass") == password
        server.send_signal(signal.SIGTERM)
        assert server.wait(20) == 0, "valkey-server is exec'd: it gets SIGTERM itself and exits cleanly"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


READ_ONLY_ROOT = "mount --rbind / /mnt && mount -o remount,bind,ro /mnt"
"""In a private user and mount namespace (``unshare -rm``): /mnt, a read-only copy of the root."""


def start_on_a_read_only_root(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``argv`` run from the repository, chrooted into a read-only copy of this root."""
    check = subprocess.run(["unshare", "-rm", "sh", "-c", READ_ONLY_ROOT], capture_output=True, timeout=30)
    if check.returncode != 0 or not Path("/mnt").is_dir():
        pytest.skip(f"no private read-only root here: {check.stderr.decode().strip()}")
    command = shlex.join(["env", "-C", str(ROOT), *argv])
    with open(log, "wb") as out:
        return subprocess.Popen(
            ["unshare", "-rm", "sh", "-c", f"{READ_ONLY_ROOT} && exec chroot /mnt {command}"],
            env=env, stdout=out, stderr=out,
        )  # fmt: skip


async def test_a_worker_runs_on_a_read_only_root_file_system(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    """As the manifest runs it (readOnlyRootFilesystem): --processes 2 and the health port, a
    message handled, a clean drain. The image sets PYTHONDONTWRITEBYTECODE, as here."""
    from .apps import Counter, Get, Total
    from .apps import app as counter_app
    from .conftest import eventually
    from .test_health import answers, free_port

    assert "PYTHONDONTWRITEBYTECODE=1" in (ROOT / "Dockerfile").read_text()
    port, log = free_port(), tmp_path / "worker.log"
    argv = [sys.executable, "-m", "actors.cli", "--log-level", "WARNING", "worker", "tests.apps:app",
            "--namespace", namespace, "--processes", "2", "--health-port", str(port),
            "--health-host", "127.0.0.1"]  # fmt: skip
    env = {**os.environ, "ACTORS_REDIS_URL": redis_url, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = start_on_a_read_only_root(argv, env, log)
    try:
        await eventually(lambda: answers(port, "/readyz", 200), timeout=30)
        async with actors.connect(redis_url, namespace=namespace, app=counter_app) as client:
            assert await client.ask(Counter.ref("ro"), Get(), timeout=20) == Total(total=0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Read-only file system" not in log.read_text()
