"""Smoke tests: every benchmark runs at a tiny size, as a real process, so none rots.

Each benchmark starts and stops its own private server (``benchmarks.common.private_server``),
so these tests need no fixture server. They check that a run finishes, writes its JSON and
reports its parts (and the checks of correctness it makes itself); no test asserts a speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.__main__ import SUITE
from benchmarks.peers import SYSTEMS, Ours, missing_packages

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.bench

TIMEOUT = 150.0
"""Seconds per run; each takes 5-15 s on 2 busy cores."""


def run_benchmark(name: str, *options: str, json_path: Path | None) -> tuple[str, Any]:
    """Run ``python -m benchmarks.NAME OPTIONS --json PATH``; its output, and the JSON it wrote."""
    module = "benchmarks" if name == "__main__" else f"benchmarks.{name}"
    argv = [sys.executable, "-m", module, *options]
    if json_path is not None:
        argv += ["--json", str(json_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(argv[1:])} exited {proc.returncode}:\n{output[-4000:]}"
    if json_path is None:
        return output, None
    assert json_path.exists(), f"no JSON written:\n{output[-4000:]}"
    return output, json.loads(json_path.read_text())


def test_throughput(tmp_path: Path) -> None:
    out, data = run_benchmark(
        "throughput", "--messages", "300", "--actors", "20", "--awaited-messages", "50", "--rounds", "1",
        json_path=tmp_path / "throughput.json",
    )  # fmt: skip
    floors = ["floor_1a", "floor_1b", "floor_1c", "floor_1d", "floor_1e"]
    ours = ["drain_1p", "drain_2p", "e2e_pipelined", "e2e_awaited"]
    assert set(data["results"]) == {*floors, *ours}
    for key in floors + ours:
        assert "msgs_per_s" in data["results"][key] and len(data["samples"][key]) == 1
    for key in ours:  # the exactly-once check it makes after each run of ours
        assert "== N" in data["results"][key]["note"], data["results"][key]
    assert data["ratios"] and all(" / floor " in name for name in data["ratios"])
    assert "floor 1c" in out and "ours: drain backlog" in out


def test_latency(tmp_path: Path) -> None:
    out, data = run_benchmark(
        "latency", "--rates", "100", "--seconds", "1", "--asks", "50",
        "--drain-messages", "200", "--drain-actors", "20", "--trace-rounds", "1",
        json_path=tmp_path / "latency.json",
    )  # fmt: skip
    loads = data["send_to_handler_start"]
    assert {row["who"] for row in loads} == {"ours", "floor"}
    for row in loads:
        assert row["offered"] == 100 and row["n"] == 100
        assert {"p50", "p99", "min", "max"} <= set(row["from_return_ms"]) <= set(row["from_call_ms"])
    for series in data["send_latency"] + data["floor_latency"]:
        assert "from_return_p50_ms" in series and "from_call_p99_ms" in series
    assert len(data["round_trip"]) == 2 and all(r["n"] == 50 for r in data["round_trip"])
    drains = {row["key"]: row for row in data["tracing_drain"]}
    assert set(drains) == {"off", "console", "console_traces", "noop_batch", "spans_only"}
    assert all("totals sum 200 == N" in row["note"] for row in drains.values())
    assert "send RETURNED -> handler start" in out and "tracing overhead" in out


def test_shards(tmp_path: Path) -> None:
    out, data = run_benchmark(
        "shards", "--shards", "4,64", "--rate", "50", "--seconds", "1", "--idle-seconds", "0.2",
        json_path=tmp_path / "shards.json",
    )  # fmt: skip
    assert [row["shards"] for row in data["rows"]] == [4, 64]
    for row in data["rows"]:
        assert row["load"]["n"] == 50 and row["connections_idle"] > 0
        assert {"p50", "p99", "min", "max"} <= set(row["load"]["from_return_ms"])
    assert data["floor"]["who"] == "floor" and data["floor"]["n"] == 50
    assert "64 shards" in out and "floor" in out


def test_durability(tmp_path: Path) -> None:
    out, data = run_benchmark(
        "durability", "--messages", "300", "--actors", "20", "--sends", "30", "--asks", "10",
        json_path=tmp_path / "durability.json",
    )  # fmt: skip
    results = data["results"]
    assert set(results) == {"everysec", "fsync", "replica"}
    for level, figures in results.items():
        assert {"drain", "send_many", "floor_xadd"} <= set(figures["rates"]), level
        assert {"send", "ask", "floor_xadd"} <= set(figures["latency"]), level
        assert ("floor_xadd_wait" in figures["latency"]) == (level != "everysec"), level
    assert data["everysec_waitaof"]["p50_ms"] > 0 and "WAITAOF 1 0 on the everysec server" in out


def test_failover(tmp_path: Path) -> None:
    out, data = run_benchmark(
        "failover", "--kills", "1", "--terms", "1", "--lease-ttl", "1.0", "--renew-interval", "0.2",
        json_path=tmp_path / "failover.json",
    )  # fmt: skip
    assert data["settings"] == {"lease_ttl": 1.0, "renew_interval": 0.2, "shards": 8}
    assert len(data["sigkill_s"]) == 1 and len(data["sigterm_s"]) == 1
    assert "SIGKILL    n=1" in out and "SIGTERM    n=1" in out


def test_workflows(tmp_path: Path) -> None:
    out, data = run_benchmark(
        "workflows", "--sleepers", "200", "--timers", "50", "--steps", "2", "--step-messages", "50",
        "--step-actors", "10", "--serial", "10", "--idle-actors", "200", "--processes", "1",
        json_path=tmp_path / "workflows.json",
    )  # fmt: skip
    results = data["results"]
    assert set(results) == {"sleepers", "timers", "steps", "idle"}
    assert results["sleepers"]["sleepers"] == 200 and "bytes_per_sleeper" in results["sleepers"]
    assert results["timers"]["timers"] == 50 and "late_ms_p99" in results["timers"]
    assert set(results["steps"]["runs"]) == {"plain", "step", "thread_step"}
    assert results["idle"]["actors"] == 200 and "rss_bytes_per_activation" in results["idle"]
    assert "4. idle actors" in out


def test_limits(tmp_path: Path) -> None:
    out, data = run_benchmark(
        "limits", "--acquires", "200", "--tasks", "5", "--cap", "2", "--hold-ms", "2", "--contended", "50",
        "--rate", "20", "--burst", "1", "--seconds", "1", "--slot-hold-ms", "50", "--processes", "2",
        json_path=tmp_path / "limits.json",
    )  # fmt: skip
    assert [row["key"] for row in data["overhead"]] == [
        "floor_get", "floor_evalsha", "store_rate", "store_cap", "hold_rate", "hold_cap",
    ]  # fmt: skip
    assert all(row["ops"] == 200 for row in data["overhead"])
    assert len(data["contention"]) == 2 and all(row["ops"] >= 50 for row in data["contention"])
    rate, slots = data["accuracy"]["rate"], data["accuracy"]["slots"]
    assert rate["calls"] == rate["sent"] == 21, "each call ran exactly once"
    assert slots["calls"] == slots["sent"] and slots["max_concurrency"] <= 2, "the cap held"
    assert "3. accuracy" in out


def test_peers_runs_ours_and_says_why_each_missing_peer_is_skipped(tmp_path: Path) -> None:
    """Ours, every peer that is not installed (one line each saying so), and at most one peer
    that is (the first, leaving out the Postgres one: starting Postgres is slow)."""
    missing = [c.key for c in SYSTEMS if c is not Ours and missing_packages(c)]
    installed = [c.key for c in SYSTEMS if c is not Ours and not missing_packages(c) and not c.needs_postgres]
    ran = ["ours", *installed[:1]]
    tiny = ["--messages", "200", "--rate", "50", "--seconds", "1", "--actors", "20"]
    if not installed:  # then the command stops at once when only missing peers are asked for
        out, data = run_benchmark(
            "peers", *tiny, "--only", ",".join(missing), json_path=tmp_path / "none.json"
        )
        assert "peers: skipped, no peer system is installed" in out and "skipped" in data
    out, data = run_benchmark(
        "peers", *tiny, "--only", ",".join(ran + (missing if installed else [])),
        json_path=tmp_path / "peers.json",
    )  # fmt: skip
    assert set(data["results"]) == set(ran), out
    for key in ran:
        assert "counts exact" in data["results"][key]["check"], data["results"][key]
        assert "jobs_per_s" in data["results"][key] and "latency_p99_ms" in data["results"][key]
    for key in missing if installed else []:
        assert f"{key}: skipped, not installed: " in out


def test_suite_command_lists_every_benchmark(tmp_path: Path) -> None:
    """``python -m benchmarks`` takes no sizes (it runs each at its full default), so only its
    command line is checked here; each benchmark it runs is checked above at a tiny size."""
    out, _ = run_benchmark("__main__", "--help", json_path=None)
    assert "usage: python -m benchmarks" in out and "throughput, latency" in out
    tested = {"throughput", "latency", "shards", "durability", "failover", "elastic", "workflows",
              "journal", "soak", "limits", "peers"}  # fmt: skip
    assert set(SUITE) == tested, "a benchmark was added or renamed: give it a smoke test here"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "nosuch", "--results", str(tmp_path)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "unknown benchmarks ['nosuch']" in proc.stderr


def test_repeated_runs_report_the_median_run_and_every_figure() -> None:
    from benchmarks.common import median_of

    assert median_of([5.0], float) == (5.0, "")
    assert median_of([3.0, 1.0, 2.0], float) == (2.0, "median of 3 (1 / 2 / 3)")
    assert median_of([4.0, 1.0, 3.0, 2.0], float)[0] == 2.0, "of an even count, a run that happened"


def test_journal(tmp_path: Path) -> None:
    out, data = run_benchmark("journal", "--steps", "50", json_path=tmp_path / "journal.json")
    ours = data["results"]["ours"]
    assert {"bytes_per_step", "first_ms", "last_ms", "ms_per_step"} <= set(ours)
    assert "floor" in data["results"] and "bytes sent to Redis per step" in out


def test_soak(tmp_path: Path) -> None:
    out, data = run_benchmark(
        "soak", "--workflows", "200", "--retention", "1", "--sample-every", "1",
        json_path=tmp_path / "soak.json",
    )  # fmt: skip
    result = data["results"]
    assert result["workflows"] == 200 and result["floor_msgs_per_s"] > 0
    assert "state" in result["keys_left"] and "Redis used_memory" in out
    assert not any(kind in result["keys_left"] for kind in ("turns", "journal", "idem", "reply")), result


def test_elastic(tmp_path: Path) -> None:
    out, data = run_benchmark(
        "elastic", "--rate", "300", "--actors", "20", "--join", "1", "--leave", "2", "--duration", "3",
        json_path=tmp_path / "elastic.json",
    )  # fmt: skip
    result = data["results"]
    assert "== N" in result["verdict"] and result["handovers"] > 0, result["verdict"]
    assert {"p50", "p99", "max"} <= set(result["handover_ms"]) and "floor" in out
