"""The chaos suite's workflow run: many workflow actors whose journaled steps (async and
sync, with plain code between them and a durable sleep) append to an outside log, against
real worker processes that are SIGKILLed inside steps, SIGSTOPped past the lease TTL and
joined by a new worker while the workflows run.

What must hold, read from the log (tests/chaos_workflow_apps.py) and the states:

- every workflow completed exactly once, with one journaled result per step;
- no two runs of one step of one actor overlapped in time (a stopped process runs nothing
  while it is stopped; a run that never logged its end lasted until its process was dead);
- no step started under a lease that had been taken over: after SIGCONT, the stopped
  process starts no step under the epochs it held, and on each shard no start of a lower
  epoch comes after the first start of a higher one;
- a step whose result was journaled never started again after that run ended, and every
  other run of it was cut short by the death or the stop of its process (at least once);
- a handler that went on from a step it ran (its ``between`` line) went on with the result
  that the completed workflow kept: it was journaled before the handler went on.

One thing no check of a lease can close is excepted, and counted: a process stopped
between its last check of the lease and its step function's first line starts the step
when it wakes. Such a start is recognised by the handler's call of ``self.step`` having
come before the stop and the function's first line after the SIGCONT.

Kills land just after the victim logged a step's start; the stop just after it logged a
``between`` line (its handler then sits in plain code, before a step), and lasts until
others lease all its shards and have re-run every step it was inside.

ACTORS_CHAOS_WORKFLOWS (default 60) is the least number of workflows sent; more are sent
while the chaos lasts, so a larger number runs it longer (with more kills and stops).
ACTORS_CHAOS_SEED picks the workflows and the victims.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import actors
from actors.routing import shard_of

from .chaos_workflow_apps import LOG_NAME, ChaosFlow, Flow, Run, app
from .conftest import WorkerProcess, eventually

pytestmark = pytest.mark.chaos

APP = "tests.chaos_workflow_apps:app"
SHARDS = 12
WORKERS = 3
WORKFLOWS = int(os.environ.get("ACTORS_CHAOS_WORKFLOWS", "60"))
SEND_EVERY = 0.15
"""Seconds between two workflows sent (pacing: the workflows run all through the chaos)."""
PLAN = ["kill", "kill", "stop", "join", "kill"]
"""Then, while workflows are still to be sent, kills and stops alternate."""


@dataclass(frozen=True, slots=True)
class Kill:
    pid: int
    sent: float
    dead: float
    """Monotonic times: before the SIGKILL, and once the process was reaped."""


@dataclass(frozen=True, slots=True)
class Stop:
    pid: int
    sent: float
    stopped: float
    """Before the SIGSTOP, and once /proc showed the process stopped."""
    resumed: float
    """Just before the SIGCONT."""
    epochs: dict[int, int]
    """The epoch of every shard once the stopped process's shards were all taken over."""


@dataclass(slots=True)
class StepRun:
    key: str
    step: str
    pid: int
    epoch: int
    start: float
    called: float
    token: str
    end: float | None = None
    how: str = ""
    """``end``, ``cancel`` or ``""`` (no line: its process died inside it)."""


@dataclass(slots=True)
class Chaos:
    kills: list[Kill] = field(default_factory=list)
    stops: list[Stop] = field(default_factory=list)
    joined: list[int] = field(default_factory=list)


def read_log(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def step_runs(path: Path) -> dict[str, StepRun]:
    """Every execution of a step function, by token."""
    runs: dict[str, StepRun] = {}
    for words in read_log(path):
        assert len(words) == 8, f"a malformed log line: {words}"
        what, key, step, pid, epoch, at, called, token = words
        if what == "between":
            continue
        if what == "start":
            runs[token] = StepRun(key, step, int(pid), int(epoch), float(at), float(called), token)
        else:
            run = runs[token]
            assert run.end is None and what in ("end", "cancel"), words
            run.end, run.how = float(at), what
    return runs


def went_on(path: Path) -> list[tuple[str, str, int, str]]:
    """(key, step, pid, result) of every ``between`` line: the handler went on from a step
    it ran, whose result was journaled by then."""
    return [(w[1], w[2], int(w[3]), w[7]) for w in read_log(path) if w[0] == "between"]


def pid_of(worker_id: str | None) -> int | None:
    return None if worker_id is None else int(worker_id.split("-")[-2])  # host-pid-suffix


async def shard_owners(client: actors.Client) -> list[tuple[str | None, int]] | None:
    """(owner worker id, epoch) of every shard."""
    try:
        infos = [await client.store.shard_info(s) for s in range(SHARDS)]
    except Exception:
        return None
    return [(i.owner, i.epoch) for i in infos]


async def owning(client: actors.Client, pids: set[int]) -> dict[int, list[int]] | None:
    """Of the processes ``pids``, those that lease shards: pid -> shards."""
    owners = await shard_owners(client)
    found: dict[int, list[int]] = {}
    for shard, (owner, _) in enumerate(owners or []):
        pid = pid_of(owner)
        if pid in pids:
            found.setdefault(pid, []).append(shard)
    return found or None


async def moved(client: actors.Client, pid: int, shards: list[int]) -> dict[int, int] | None:
    """Once every one of ``shards`` is leased by a process other than ``pid``: every shard's epoch."""
    owners = await shard_owners(client)
    if owners is None or any(owners[s][0] is None or pid_of(owners[s][0]) == pid for s in shards):
        return None
    return {shard: epoch for shard, (_, epoch) in enumerate(owners)}


def is_stopped(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0] in ("T", "t")


def workflow(rng: random.Random) -> Run:
    return Run(
        pauses=[round(rng.uniform(0.03, 0.25), 3) for _ in range(4)],
        gap=round(rng.uniform(0.1, 0.3), 3),
        nap=round(rng.uniform(0.2, 0.5), 3) if rng.random() < 0.5 else 0.0,
    )


async def test_workflows_under_kills_a_stop_and_a_join_run_each_step_once_and_never_fenced(
    spawn_worker: Callable[..., WorkerProcess], connect: Callable[..., Any], tmp_path: Path
) -> None:
    rng = random.Random(int(os.environ.get("ACTORS_CHAOS_SEED", "7")))
    log = tmp_path / LOG_NAME
    live: dict[int, WorkerProcess] = {}

    def spawn() -> WorkerProcess:
        proc = spawn_worker(APP, "--shards", str(SHARDS))
        live[proc.pid] = proc
        return proc

    for _ in range(WORKERS):
        spawn()
    chaos = Chaos()
    plans: dict[str, Run] = {}
    chaos_done = asyncio.Event()

    async with connect(app=app, shards=SHARDS) as client:
        await eventually(lambda: _all_leased_by(client, set(live)), timeout=30)

        async def sender() -> None:
            n = 0
            while n < WORKFLOWS or not chaos_done.is_set():
                key = f"w{n}"
                plans[key] = workflow(rng)
                await client.send(ChaosFlow.ref(key), plans[key])
                n += 1
                await asyncio.sleep(SEND_EVERY)

        async def victim(at: Callable[[list[str]], bool]) -> tuple[WorkerProcess, list[int]]:
            """A process that leases shards, once it has logged a new line that ``at`` accepts."""
            owners = await eventually(lambda: owning(client, set(live)), timeout=30)
            pid = rng.choice(sorted(owners))
            mark = len(read_log(log))
            await eventually(
                lambda: any(int(w[3]) == pid and at(w) for w in read_log(log)[mark:]), timeout=20
            )
            return live[pid], owners[pid]

        async def kill() -> None:
            proc, shards = await victim(lambda w: w[0] == "start")  # inside a step
            sent = time.monotonic()
            proc.signal(signal.SIGKILL)
            await asyncio.to_thread(proc.proc.wait)  # type: ignore[union-attr]
            chaos.kills.append(Kill(proc.pid, sent, time.monotonic()))
            del live[proc.pid]
            await eventually(lambda: moved(client, proc.pid, shards), timeout=30)
            new = spawn()  # restarted: it takes a share back from the survivors
            await eventually(lambda: owning(client, {new.pid}), timeout=30)

        async def stop() -> None:
            # In a handler's plain code, which a step follows (a nap follows s1, nothing s3).
            proc, shards = await victim(lambda w: w[0] == "between" and w[2] in ("s0", "s2"))
            sent = time.monotonic()
            proc.signal(signal.SIGSTOP)
            try:
                await eventually(lambda: is_stopped(proc.pid), timeout=10)
                stopped = time.monotonic()
                # Past the TTL: others lease all its shards...
                epochs = await eventually(lambda: moved(client, proc.pid, shards), timeout=30)
                # ...and have run to its end every step it was inside when it stopped, so
                # that what it does once it wakes is what is under test, not the remains
                # of a run it had rightly begun.
                inside = {(r.key, r.step) for r in step_runs(log).values()
                          if r.pid == proc.pid and r.end is None}  # fmt: skip
                await eventually(lambda: _rerun_elsewhere(log, inside, proc.pid, stopped), timeout=30)
            finally:
                resumed = time.monotonic()
                proc.signal(signal.SIGCONT)
            chaos.stops.append(Stop(proc.pid, sent, stopped, resumed, epochs))

        async def join() -> None:
            new = spawn()
            await eventually(lambda: owning(client, {new.pid}), timeout=30)
            chaos.joined.append(new.pid)

        async def run_chaos() -> None:
            try:
                n = 0
                while n < len(PLAN) or len(plans) < WORKFLOWS:
                    event = PLAN[n] if n < len(PLAN) else ("kill", "stop")[n % 2]
                    await {"kill": kill, "stop": stop, "join": join}[event]()
                    n += 1
            finally:
                chaos_done.set()

        await asyncio.gather(sender(), run_chaos())
        assert len(chaos.kills) >= 3 and len(chaos.stops) >= 1 and len(chaos.joined) == 1, chaos

        keys = sorted(plans)

        async def states() -> list[Flow]:
            return list(await asyncio.gather(*(client.state(ChaosFlow.ref(k)) for k in keys)))

        async def all_done() -> bool:
            return all(s is not None and s.done for s in await states())

        try:
            await eventually(all_done, timeout=90, interval=0.5)
        except AssertionError:
            pending = [k for k, s in zip(keys, await states(), strict=True) if s is None or not s.done]
            letters = [
                letter.reason for s in range(SHARDS) for letter in await client.store.dead_letters(s, 10)
            ]
            raise AssertionError(
                f"{len(pending)} workflows never completed: {pending[:10]}; dead letters: {letters}"
            ) from None
        # Every worker ends gracefully: any step function still running would log its end first.
        for proc in live.values():
            assert await asyncio.to_thread(proc.stop) == 0
        final = dict(zip(keys, await states(), strict=True))

    for key, state in final.items():
        assert state.done == 1, f"{key} completed {state.done} times"
        assert len(state.tokens) == len(plans[key].pauses), f"{key}: {state.tokens}"

    runs = step_runs(log)
    excepted = {t for t, r in runs.items() if _stopped_between_fence_and_start(r, chaos.stops)}
    checked = {t: r for t, r in runs.items() if t not in excepted}
    assert_runs_ended(checked, chaos)
    assert_no_start_on_a_taken_over_lease(runs, excepted, chaos)
    assert_no_step_overlapped_itself(checked, chaos)
    journaled = {
        state.tokens[i]: (key, f"s{i}") for key, state in final.items() for i in range(len(state.tokens))
    }
    reruns = assert_each_step_journaled_once(checked, journaled, chaos)
    assert_handlers_went_on_with_the_journaled_result(went_on(log), final)
    cut = sum(1 for r in checked.values() if r.how == "")
    print(
        f"\n{len(final)} workflows, {len(runs)} step runs: {reruns} re-runs, {cut} cut by a SIGKILL, "
        f"{len(excepted)} started by a process stopped between its fence and the step; "
        f"{len(chaos.kills)} kills, {len(chaos.stops)} stops, {len(chaos.joined)} join"
    )
    assert reruns >= 1, "the chaos interrupted no step: it tested nothing"


async def _all_leased_by(client: actors.Client, pids: set[int]) -> bool:
    owners = await shard_owners(client)
    return owners is not None and {pid_of(o) for o, _ in owners} == pids


def _rerun_elsewhere(log: Path, inside: set[tuple[str, str]], pid: int, since: float) -> bool:
    ended = {(r.key, r.step) for r in step_runs(log).values()
             if r.pid != pid and r.how == "end" and r.start > since}  # fmt: skip
    return inside <= ended


def _stopped_between_fence_and_start(run: StepRun, stops: list[Stop]) -> bool:
    """Called before its process was stopped, started after it was resumed: the process
    stopped between the step's check of its lease and the function's first line."""
    return any(s.pid == run.pid and run.called < s.stopped and run.start > s.resumed for s in stops)


def _killed_after(run: StepRun, kills: list[Kill]) -> Kill | None:
    return next((k for k in kills if k.pid == run.pid and k.dead >= run.start), None)


def assert_runs_ended(runs: dict[str, StepRun], chaos: Chaos) -> None:
    """A run with neither an end nor a cancel line was ended by the death of its process."""
    lost = [r for r in runs.values() if r.end is None and _killed_after(r, chaos.kills) is None]
    assert not lost, f"step runs that never ended on a process that was not killed: {lost}"


def active(run: StepRun, chaos: Chaos) -> list[tuple[float, float]]:
    """When ``run`` executed: from its start to its end (or its process's death), less the
    times its process was stopped."""
    if run.end is not None:
        end = run.end
    else:
        kill = _killed_after(run, chaos.kills)
        assert kill is not None
        end = kill.dead
    spans = [(run.start, end)]
    for s in chaos.stops:
        if s.pid != run.pid:
            continue
        pieces = [(a, min(b, s.stopped)) for a, b in spans] + [(max(a, s.resumed), b) for a, b in spans]
        spans = [(a, b) for a, b in pieces if a < b]
    return spans


def by_step(runs: dict[str, StepRun]) -> dict[tuple[str, str], list[StepRun]]:
    grouped: dict[tuple[str, str], list[StepRun]] = defaultdict(list)
    for run in runs.values():
        grouped[run.key, run.step].append(run)
    for group in grouped.values():
        group.sort(key=lambda r: r.start)
    return grouped


def assert_no_step_overlapped_itself(runs: dict[str, StepRun], chaos: Chaos) -> None:
    overlaps = []
    for group in by_step(runs).values():
        spans = sorted(((a, b, run) for run in group for a, b in active(run, chaos)), key=lambda x: x[:2])
        for i, (_, b1, r1) in enumerate(spans):
            for a2, _, r2 in spans[i + 1 :]:
                if a2 >= b1:
                    break
                if r2 is not r1:
                    overlaps.append((r1, r2))
    assert not overlaps, f"two runs of one step overlapped: {overlaps[:5]}"


def assert_no_start_on_a_taken_over_lease(runs: dict[str, StepRun], excepted: set[str], chaos: Chaos) -> None:
    # A process woken from SIGSTOP starts nothing under the epochs it held before.
    for s in chaos.stops:
        stale = [r for t, r in runs.items() if t not in excepted and r.pid == s.pid and r.start > s.resumed
                 and r.epoch < s.epochs[shard_of(f"ChaosFlow/{r.key}", SHARDS)]]  # fmt: skip
        assert not stale, (
            f"process {s.pid} started steps under a lease taken over while it was stopped: {stale}"
        )
    # On each shard, a start under a lower epoch never follows the first start under a
    # higher one (a start's epoch is its shard's current epoch, as far as the log shows).
    # An excepted start passed its lease check before the higher epoch's first start.
    by_shard: dict[int, list[StepRun]] = defaultdict(list)
    for run in runs.values():
        by_shard[shard_of(f"ChaosFlow/{run.key}", SHARDS)].append(run)
    late = []
    for shard, group in by_shard.items():
        first: dict[int, float] = {}
        for run in group:
            first[run.epoch] = min(first.get(run.epoch, run.start), run.start)
        for run in group:
            since = run.called if run.token in excepted else run.start
            newer = [e for e, at in first.items() if e > run.epoch and at < since]
            if newer:
                late.append((shard, run, min(newer)))
    assert not late, f"steps started under an epoch after a newer epoch's first start: {late[:5]}"


def assert_handlers_went_on_with_the_journaled_result(
    went: list[tuple[str, str, int, str]], final: dict[str, Flow]
) -> None:
    """A handler goes on from a step only once its result is journaled: every later run of
    the turn replays that result, so it is the one in the final state."""
    lost = [(key, step, pid, token) for key, step, pid, token in went
            if final[key].tokens[int(step[1:])] != token]  # fmt: skip
    assert not lost, (
        f"handlers went on from a step whose result was then not kept (key, step, pid, result): {lost}"
    )


def assert_each_step_journaled_once(
    runs: dict[str, StepRun], journaled: dict[str, tuple[str, str]], chaos: Chaos
) -> int:
    """The run whose result was journaled ended, and that step never started again after it;
    every other run of the step was cut short by the death or the stop of its process,
    after it started and before the step's next run started. Returns the re-runs."""
    missing = [(token, where) for token, where in journaled.items() if token not in runs]
    assert not missing, f"journaled results that no run in the log produced: {missing[:5]}"
    reruns = 0
    for (key, step), group in by_step(runs).items():
        kept_runs = [r for r in group if r.token in journaled]
        assert len(kept_runs) == 1 and journaled[kept_runs[0].token] == (key, step), (
            f"{key} {step}: its journaled result comes from no run of it in the log: {group}"
        )
        [kept] = kept_runs
        assert kept.how == "end" and kept.end is not None, (
            f"the journaled run of {key} {step} did not end: {kept}"
        )
        after = [r for r in group if r.start > kept.end]
        assert not after, f"{key} {step} started again after its journaled run {kept}: {after}"
        for run, following in itertools.pairwise(group):
            reruns += 1
            cut = any(
                k.pid == run.pid and run.start <= k.dead and k.sent <= following.start for k in chaos.kills
            )
            stopped = any(s.pid == run.pid and run.start <= s.resumed and s.sent <= following.start
                          for s in chaos.stops)  # fmt: skip
            assert cut or stopped, (
                f"{key} {step} ran again though the process of its earlier run was neither killed "
                f"nor stopped in between: {run} then {following}"
            )
        assert group[-1] is kept, f"{key} {step}: the journaled run is not the last one: {group}"
    return reruns
