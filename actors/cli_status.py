"""``actors status``: workers, shard owners, epochs and the work left in the namespace."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable

from . import top
from .cli_run import with_client
from .client import Client


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: Callable[[argparse.ArgumentParser], None],
) -> None:
    ss = sub.add_parser("status", help="workers, shard leases, lag and pending")
    ss.add_argument("--json", action="store_true")
    common(ss)
    ss.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    async def run(client: Client) -> None:
        store = client.store
        workers = await store.live_workers()
        infos = [await store.shard_info(s) for s in range(client.shards)]
        limiters = await top.limiter_status(store, await store.worker_infos(workers))
        if args.json:
            shards = [dataclasses.asdict(i) for i in infos]
            print(json.dumps({"workers": workers, "shards": shards, "limiters": limiters}, indent=2))
            return
        print(f"namespace {store.keys.namespace}: {client.shards} shards, {len(workers)} live workers")
        for w in workers:
            held = [i.shard for i in infos if i.owner == w]
            print(f"  worker {w}: shards {held}")
        print(f"{'shard':>5} {'owner':<36} {'epoch':>6} {'length':>8} {'lag':>6} {'pending':>8} {'dlq':>5}")
        for i in infos:
            print(f"{i.shard:>5} {i.owner or '-':<36} {i.epoch:>6} {i.length:>8} "
                  f"{'-' if i.lag is None else i.lag:>6} {i.pending:>8} {i.dead_letters:>5}")  # fmt: skip
        if limiters:
            print(f"{'limiter':<20} {'rate':<16} {'slots':>9} {'waiting':>8} {'queued':>7}  by partition")
            for lim in limiters:
                parts = ", ".join(
                    f"{p or '(none)'}={n}" for p, n in sorted(lim["queued_by_partition"].items())
                )
                print(f"{lim['name']:<20} {lim['rate']:<16} {lim['slots']:>9} {lim['waiting']:>8} "
                      f"{lim['queued']:>7}  {parts or '-'}")  # fmt: skip

    return with_client(args, run)
