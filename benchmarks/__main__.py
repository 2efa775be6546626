"""``python -m benchmarks [all | NAME ...] [--results DIR]``: run the suite, keep the figures.

Each benchmark runs as its own process on a private server it starts and stops itself;
its printed tables go to ``DIR/<name>.txt`` and its figures to ``DIR/<name>.json``.
``DIR/README.md`` gathers the tables; with matplotlib installed (``pip install -e
'.[bench]'``), ``DIR/throughput.png`` plots throughput against worker processes next to
the Redis floor, and ``DIR/latency.png`` the latency from ``send`` returning to the handler
starting (issue #7's definition) at each offered load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SUITE = [
    "throughput", "latency", "shards", "durability", "failover", "cluster", "elastic", "workflows", "journal",
    "soak", "limits", "peers",
]  # fmt: skip
"""In this order; ``peers`` prints why it skips a system whose package is missing."""


def run(name: str, results: Path) -> bool:
    argv = [sys.executable, "-m", f"benchmarks.{name}", "--json", str(results / f"{name}.json")]
    print(f"== {name}: {' '.join(argv[1:])}", flush=True)
    started = time.monotonic()
    with open(results / f"{name}.txt", "w") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            out.write(line)
        code = proc.wait()
    print(f"== {name}: exit {code} after {time.monotonic() - started:.0f} s\n", flush=True)
    return code == 0


def summary(results: Path, names: list[str], outcome: dict[str, bool]) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, `python -m benchmarks {' '.join(names)}`.",
        "Each table was printed by its benchmark; the raw figures are in the JSON files beside it.",
        "",
    ]
    for name in names:
        text = (results / f"{name}.txt").read_text() if (results / f"{name}.txt").exists() else ""
        status = "" if outcome.get(name) else " (did not finish cleanly: see the output)"
        lines += [f"## {name}{status}", "", "```", text.rstrip(), "```", ""]
    return "\n".join(lines)


def plots(results: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["matplotlib is not installed (pip install -e '.[bench]'): no plots"]
    made = []
    throughput = _load(results / "throughput.json")
    if throughput:
        figures = throughput.get("results", {})
        bars = {r["name"]: r["msgs_per_s"] for r in figures.values() if "msgs_per_s" in r}
        fig, ax = plt.subplots(figsize=(9, 4.5))
        ax.barh(list(bars), list(bars.values()))
        ax.set_xlabel("messages per second")
        ax.set_title("Throughput, beside the raw Redis floor measured in the same run")
        fig.tight_layout()
        fig.savefig(results / "throughput.png", dpi=110)
        made.append("throughput.png")
    latency = _load(results / "latency.json")
    if latency:
        rows = _latency_rows(latency)
        if rows:
            fig, ax = plt.subplots(figsize=(8, 4.5))
            for label, points in rows.items():
                ax.plot([p for p, _ in points], [v for _, v in points], marker="o", label=label)
            ax.set_xlabel("percentile")
            ax.set_ylabel("ms from send returned to handler start")
            # symlog, not log: this latency can be negative (the server wakes the
            # consumer and replies to the producer in the same turn)
            ax.set_yscale("symlog", linthresh=0.1)
            ax.legend(fontsize=8)
            ax.set_title("send returned -> handler start, by offered load (ours and the Redis floor)")
            fig.tight_layout()
            fig.savefig(results / "latency.png", dpi=110)
            made.append("latency.png")
    return made


def _latency_rows(data: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """Percentile points per series of the "from send returned" latency (``from_return_*_ms``).

    A file from before that figure existed has only ``p50_ms``, ... (measured from the send being
    called): those series are plotted with "(from send called)" in their label."""
    rows: dict[str, list[tuple[float, float]]] = {}
    for series in data.get("send_latency", []) + data.get("floor_latency", []):
        label = series.get("name") or f"{series.get('offered')}/s"
        prefix = "from_return_" if "from_return_p50_ms" in series else ""
        if not prefix:
            label += " (from send called)"
        keys = ((50, "p50"), (90, "p90"), (99, "p99"), (99.9, "p999"))
        values = [(q, series.get(f"{prefix}{k}_ms")) for q, k in keys]
        points = [(q, v) for q, v in values if isinstance(v, int | float)]
        if points:
            rows[label] = points
    return rows


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=["all"], help=f"all, or some of: {', '.join(SUITE)}")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    names = SUITE if args.names in (["all"], []) else args.names
    unknown = [n for n in names if n not in SUITE]
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; choose from {SUITE}")
    args.results.mkdir(parents=True, exist_ok=True)
    outcome = {name: run(name, args.results) for name in names}
    (args.results / "README.md").write_text(summary(args.results, names, outcome) + "\n")
    for line in plots(args.results):
        print(line)
    print(f"results in {args.results}")
    return 0 if all(outcome.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
