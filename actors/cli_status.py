"""``actors status``: workers, shard owners and epochs, and the work left in the namespace
(``--wait-idle`` first waits until there is none; see ``actors.progress``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from typing import Any

from . import cli_text, top
from .cli_run import with_client
from .client import Client
from .errors import IdleTimeout
from .progress import NamespaceWork
from .store import ShardInfo

WORK_FIELDS = ("unread", "outbox", "deferred", "due", "suspended")
"""What ``--json`` adds to each shard's row from its work (``ShardWork``)."""


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: Callable[[argparse.ArgumentParser], None],
) -> None:
    ss = sub.add_parser(
        "status",
        help="workers, shard leases, and the work left: unread, pending, outbox, deferred, due",
        description="Workers, shard owners and epochs, and each shard's work: inbox entries unread "
        "(lag) and pending, committed sends not yet forwarded (outbox), deferred messages, turns "
        "due now and suspended (sleeping, waiting or parked: not work to do now), dead letters; "
        "limiters and their queues. Idle: no work but suspended turns.",
    )
    ss.add_argument("--json", action="store_true")
    ss.add_argument("--wait-idle", action="store_true",
                    help="first wait until the namespace is idle (exit 1 if --timeout passes)")  # fmt: skip
    ss.add_argument("--timeout", type=cli_text.seconds, default=None, metavar="SECONDS",
                    help="with --wait-idle: give up after this long (default: never)")  # fmt: skip
    common(ss)
    ss.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    async def run(client: Client) -> None:
        late: IdleTimeout | None = None
        if args.wait_idle:
            if not await client.store.live_workers():
                print(f"warning: no live worker in namespace {client.store.keys.namespace!r}: nothing "
                      "is done until one starts", file=sys.stderr)  # fmt: skip
            try:
                await client.wait_idle(args.timeout)
            except IdleTimeout as exc:
                late = exc
        await _show(client, args.json)
        if late is not None:
            raise late

    return with_client(args, run)


async def _show(client: Client, as_json: bool) -> None:
    store = client.store
    workers = await store.live_workers()
    infos = [await store.shard_info(s) for s in range(client.shards)]
    work = await client.work()
    limiters = await top.limiter_status(store, await store.worker_infos(workers))
    if as_json:
        shards = [_shard_json(i, work) for i in infos]
        shown = {"workers": workers, "idle": work.idle, "shards": shards, "queued": work.queued}
        print(json.dumps({**shown, "limiters": limiters}, indent=2))
        return
    print(f"namespace {store.keys.namespace}: {client.shards} shards, {len(workers)} live workers")
    for w in workers:
        held = [i.shard for i in infos if i.owner == w]
        print(f"  worker {w}: shards {held}")
    print(f"work: {work.describe()}")
    if not workers and not work.idle:
        print("  (no live worker: nothing will be done until one starts)", file=sys.stderr)
    print(f"{'shard':>5} {'owner':<36} {'epoch':>6} {'length':>8} {'lag':>6} {'pending':>8} "
          f"{'outbox':>7} {'deferred':>8} {'due':>5} {'suspended':>9} {'dlq':>5}")  # fmt: skip
    for i, left in zip(infos, work.shards, strict=True):
        print(f"{i.shard:>5} {i.owner or '-':<36} {i.epoch:>6} {i.length:>8} "
              f"{'-' if i.lag is None else i.lag:>6} {i.pending:>8} {left.outbox:>7} {left.deferred:>8} "
              f"{left.due:>5} {left.suspended:>9} {i.dead_letters:>5}")  # fmt: skip
    if limiters:
        print(f"{'limiter':<20} {'rate':<16} {'slots':>9} {'waiting':>8} {'queued':>7}  by partition")
        for lim in limiters:
            parts = ", ".join(f"{p or '(none)'}={n}" for p, n in sorted(lim["queued_by_partition"].items()))
            print(f"{lim['name']:<20} {lim['rate']:<16} {lim['slots']:>9} {lim['waiting']:>8} "
                  f"{lim['queued']:>7}  {parts or '-'}")  # fmt: skip


def _shard_json(info: ShardInfo, work: NamespaceWork) -> dict[str, Any]:
    shard = work.shards[info.shard]
    return {**dataclasses.asdict(info), **{f: getattr(shard, f) for f in WORK_FIELDS}}
