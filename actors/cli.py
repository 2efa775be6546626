"""The ``actors`` command.

actors worker APP [--processes N]     run workers for APP ("module:attribute")
actors send|ask REF TYPE JSON --app APP
actors state REF [--app APP]
actors status                         workers, shard owners, epochs, lag, pending
actors top                            a live view of throughput, latency, lag, leases, limiters
actors bench [--messages N ...]       measure throughput and latency with real worker processes
actors approve REF --request-id ID (--approve | --reject) [--by NAME] [--comment TEXT]
actors waits [--limit N]              every open turn: running, sleeping, waiting, parked
actors inspect REF [--app APP]        state, open turn (journal, wait, timer), deferred count, dead letters
actors cancel REF                     end an actor's open turn (dead-lettered as "cancelled")
actors dlq list|show|replay|drop|purge [--older-than AGE] [--shard N]
actors server start|stop|status       the project's embedded server
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
from typing import Any

from pydantic import ValidationError

from . import cli_dlq, cli_text, top
from .actor import ActorRef, App
from .cli_worker import cmd_worker, load_app, redis_settings
from .client import Client, connect
from .errors import ActorsError
from .messages import Approval
from .server import EmbeddedServer, announce, default_dir, resolve_url
from .settings import DURABILITY_LEVELS, LeaseSettings, RedisSettings, WorkerSettings

# ---- worker ---------------------------------------------------------------------


# ---- messages ---------------------------------------------------------------------
def cmd_send(args: argparse.Namespace) -> int:
    async def run(client: Client) -> None:
        ref, msg = _message(client.app, args.ref, args.type, args.json)
        if args.command == "ask":
            reply = await client.ask(ref, msg, timeout=args.timeout, idempotency_key=args.idempotency_key)
            print(json.dumps(reply.model_dump(mode="json") if reply is not None else None))
        else:
            print(await client.send(ref, msg, idempotency_key=args.idempotency_key))

    return _with_client(args, run, app_required=True, writes=True)


def _message(app: App | None, ref_text: str, type_name: str, payload: str) -> tuple[ActorRef[Any], Any]:
    assert app is not None
    ref = ActorRef.parse(ref_text)
    cls = app.actor_type(ref.type)
    return cls.ref(ref.key), cls.message_model(type_name).model_validate_json(payload or "{}")


def cmd_state(args: argparse.Namespace) -> int:
    async def run(client: Client) -> None:
        state = await client.state(ActorRef.parse(args.ref))
        if hasattr(state, "model_dump"):
            state = state.model_dump(mode="json")
        print(json.dumps(state, indent=2))

    return _with_client(args, run)


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

    return _with_client(args, run)


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    if min(args.actors, args.messages, args.processes, args.asks) < 1:
        raise SystemExit("--actors, --messages, --processes and --asks must be at least 1")
    url = resolve_url(RedisSettings.from_env(args.redis).url)
    result = asyncio.run(bench.run(url, args.actors, args.messages, args.processes, args.asks, not args.json))
    print(bench.report(result, args.json))
    return 0 if result.exactly_once else 1


def cmd_top(args: argparse.Namespace) -> int:
    async def run(client: Client) -> None:
        await top.run(client.store, client.shards, args.interval, args.frames)

    try:
        return _with_client(args, run)
    except KeyboardInterrupt:
        return 0


# ---- durable workflows: approvals, open turns, cancel -----------------------------------------
def cmd_approve(args: argparse.Namespace) -> int:
    # Checked before connecting, so a bad reference or request id writes nothing.
    ref = ActorRef.parse(args.ref)
    Approval(request_id=args.request_id, approved=args.approved, by=args.by, comment=args.comment)

    async def run(client: Client) -> None:
        sent = await client.approve(
            ref, args.request_id, approved=args.approved, by=args.by, comment=args.comment
        )
        print(sent)

    return _with_client(args, run, writes=True)


def cmd_cancel(args: argparse.Namespace) -> int:
    ref = ActorRef.parse(args.ref)

    async def run(client: Client) -> None:
        print(await client.cancel(ref))

    return _with_client(args, run, writes=True)


def cmd_waits(args: argparse.Namespace) -> int:
    async def run(client: Client) -> None:
        views = await client.waits(limit=args.limit)
        if len(views) >= args.limit:
            print(f"showing the first {len(views)} open turns (--limit); there may be more", file=sys.stderr)
        if args.json:
            print(json.dumps([cli_text.turn_json(v) for v in views], indent=2))
            return
        if not views:
            print("no open turns")
            return
        rows = [
            [v.actor, v.status, v.waiting_for or "-", cli_text.when(v.since), cli_text.due(v),
             v.message_type or "-", cli_text.clip(v.parked, 60)]
            for v in views
        ]  # fmt: skip
        print(cli_text.table(["actor", "status", "waiting for", "since", "due", "message", "parked"], rows))

    return _with_client(args, run)


def cmd_inspect(args: argparse.Namespace) -> int:
    ref = ActorRef.parse(args.ref)

    async def run(client: Client) -> None:
        view = await client.inspect(ref)
        state = view.state.model_dump(mode="json") if hasattr(view.state, "model_dump") else view.state
        if args.json:
            turn_json = None if view.turn is None else cli_text.turn_json(view.turn)
            shown = {"actor": view.actor, "shard": view.shard, "state": state, "turn": turn_json}
            dead = [cli_text.dead_letter_json(d) for d in view.dead_letters]
            print(json.dumps({**shown, "deferred": view.deferred, "dead_letters": dead}, indent=2))
            return
        print(f"actor     {view.actor}")
        print(f"shard     {view.shard}")
        print("state     " + json.dumps(state, indent=2).replace("\n", "\n          "))
        turn = view.turn
        if turn is None:
            print("turn      none")
        else:
            print(f"turn      {turn.status}")
            print(f"  message      {turn.message_type or '-'} {turn.message_id}".rstrip())
            print(f"  waiting for  {turn.waiting_for or '-'}")
            print(f"  since        {cli_text.when(turn.since)}")
            print(f"  due          {cli_text.due(turn)}")
            if turn.parked:
                print("  parked       " + turn.parked.replace("\n", "\n               "))
            print(f"  journal      {cli_text.count(len(turn.journal), 'entry', 'entries')}")
            for n, entry in enumerate(turn.journal):
                print(f"    {n:>3}  {entry}")
        print(f"deferred  {cli_text.count(view.deferred, 'message', 'messages')}")
        cli_text.print_dead_letters(view.dead_letters)

    return _with_client(args, run)


# ---- embedded server ---------------------------------------------------------------------
def cmd_server(args: argparse.Namespace) -> int:
    server = EmbeddedServer(default_dir(), binary=args.binary)
    if args.action == "start":
        print(server.start(switch_binary=args.binary is not None).url)
        if server.spawned:
            announce(server)
    elif args.action == "stop":
        print("stopped" if server.stop() else "not running")
    else:
        print(json.dumps(server.status(), indent=2))
    return 0


# ---- plumbing ----------------------------------------------------------------------------
def _with_client(
    args: argparse.Namespace, body: Any, app_required: bool = False, writes: bool = False
) -> int:
    app = load_app(args.app) if getattr(args, "app", None) else None
    if app_required and app is None:
        raise SystemExit("this command needs --app module:app to validate the message")
    settings = redis_settings(args)
    # Only commands that write may start the embedded server (starts_server, set per command).
    url = resolve_url(settings.url, may_start=getattr(args, "starts_server", False))

    async def run() -> None:
        async with connect(
            url, namespace=settings.namespace, app=app, record_shards=writes, durability=settings.durability
        ) as client:
            await body(client)

    asyncio.run(run())
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="actors", description="Durable actors on Redis streams.")
    p.add_argument("--log-level", default=os.environ.get("ACTORS_LOG_LEVEL", "INFO"))
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--redis", help="redis:// or rediss:// URL (default: $ACTORS_REDIS_URL, else embedded)"
        )
        sp.add_argument("--namespace", help="key prefix (default: $ACTORS_NAMESPACE, else 'actors')")
        sp.add_argument("--durability", choices=DURABILITY_LEVELS, default=None,
                        help="the namespace's durability level, recorded by its first user "
                             "(default: as recorded, else everysec)")  # fmt: skip

    w = sub.add_parser("worker", help="run worker processes for an app")
    w.add_argument("app", help="module:attribute of an actors.App")
    w.add_argument("--processes", type=int, default=1)
    w.add_argument("--shards", type=int, default=None, help="shard count (default: as recorded in Redis)")
    w.add_argument("--lease-ttl", type=float, default=LeaseSettings().ttl)
    w.add_argument("--renew-interval", type=float, default=LeaseSettings().renew_interval)
    w.add_argument("--stall-limit", type=float, default=LeaseSettings().stall_limit,
                   help="seconds the event loop may be blocked before this worker's shards move")  # fmt: skip
    w.add_argument("--grace", type=float, default=10.0, help="seconds in-flight turns get on shutdown")
    w.add_argument(
        "--max-redeliveries",
        type=int,
        default=WorkerSettings().max_redeliveries,
        help="runs of a turn interrupted by the end of its worker before it is dead-lettered",
    )
    w.add_argument("--dlq-max-len", type=int, default=WorkerSettings().dlq_max_len,
                   help="dead letters kept per shard, the oldest trimmed first (0: no bound)")  # fmt: skip
    w.add_argument("--dlq-max-age", type=float, default=WorkerSettings().dlq_max_age,
                   help="seconds a dead letter is kept (0: no bound; default 30 days)")  # fmt: skip
    w.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    w.add_argument("--otel", choices=["console", "otlp", "none"], default=None,
                   help="export traces (default: as OTEL_TRACES_EXPORTER says; off if unset)")  # fmt: skip
    common(w)
    w.set_defaults(func=cmd_worker)

    for name in ("send", "ask"):
        s = sub.add_parser(name, help=f"{name} a message (JSON) to an actor")
        s.add_argument("ref", help="Type/key")
        s.add_argument("type", help="message type name")
        s.add_argument("json", nargs="?", default="{}")
        s.add_argument("--app", default=os.environ.get("ACTORS_APP"))
        s.add_argument("--idempotency-key")
        s.add_argument("--timeout", type=float, default=30.0)
        common(s)
        s.set_defaults(func=cmd_send, starts_server=True)

    st = sub.add_parser("state", help="print an actor's committed state")
    st.add_argument("ref")
    st.add_argument("--app", default=os.environ.get("ACTORS_APP"))
    common(st)
    st.set_defaults(func=cmd_state)

    ss = sub.add_parser("status", help="workers, shard leases, lag and pending")
    ss.add_argument("--json", action="store_true")
    common(ss)
    ss.set_defaults(func=cmd_status)

    bn = sub.add_parser("bench", help="throughput, ask latency and Redis commands per message, measured")
    bn.add_argument("--actors", type=int, default=1_000)
    bn.add_argument("--messages", type=int, default=200_000)
    bn.add_argument("--processes", type=int, default=2, help="worker processes to start")
    bn.add_argument("--asks", type=int, default=1_000, help="sequential asks for the latency figures")
    bn.add_argument("--json", action="store_true")
    bn.add_argument(
        "--redis", default=None, help="Redis URL (default: ACTORS_REDIS_URL, else the embedded server)"
    )
    bn.set_defaults(func=cmd_bench)

    tp = sub.add_parser("top", help="a live view: throughput, latency, lag, leases, limiters, open turns")
    tp.add_argument("--interval", type=float, default=1.0, help="seconds between frames")
    tp.add_argument("--frames", type=int, default=None, help="stop after this many frames (default: never)")
    common(tp)
    tp.set_defaults(func=cmd_top)

    a = sub.add_parser(
        "approve",
        help="approve or reject a request an actor waits for (wait_for(Approval))",
        description="Send an actors.Approval to the actor, for the wait_for(Approval, ...) of its open "
        "turn; an approval no wait takes is dead-lettered. Prints the message id.",
    )
    a.add_argument("ref", help="Type/key")
    a.add_argument("--request-id", required=True, metavar="ID", help="the request the actor waits for")
    decision = a.add_mutually_exclusive_group(required=True)
    decision.add_argument("--approve", dest="approved", action="store_true", help="approve the request")
    decision.add_argument("--reject", dest="approved", action="store_false", help="reject the request")
    a.add_argument("--by", default="", metavar="NAME", help="who decided")
    a.add_argument("--comment", default="", metavar="TEXT")
    common(a)
    a.set_defaults(func=cmd_approve, approved=None, starts_server=True)

    wt = sub.add_parser("waits", help="every open turn: running, sleeping, waiting or parked")
    wt.add_argument("--json", action="store_true")
    wt.add_argument(
        "--limit", type=cli_text.positive, default=1000, help="at most this many turns (default 1000)"
    )
    common(wt)
    wt.set_defaults(func=cmd_waits)

    i = sub.add_parser("inspect", help="an actor's state, open turn, deferred messages and dead letters")
    i.add_argument("ref", help="Type/key")
    i.add_argument("--app", default=os.environ.get("ACTORS_APP"), help="to show the state as its model")
    i.add_argument("--json", action="store_true")
    common(i)
    i.set_defaults(func=cmd_inspect)

    c = sub.add_parser(
        "cancel",
        help="end an actor's open turn (does nothing if it has none when the cancel arrives)",
        description="End the actor's open turn (running, sleeping, waiting or parked): its message is "
        "dead-lettered with reason 'cancelled' and its changes are never committed; the messages "
        "deferred behind it run next. Does nothing if the actor has no open turn when the cancel "
        "arrives. Prints the cancel message's id.",
    )
    c.add_argument("ref", help="Type/key")
    common(c)
    c.set_defaults(func=cmd_cancel, starts_server=True)

    cli_dlq.add_parser(sub, common, _with_client)

    sv = sub.add_parser("server", help="the project's embedded Redis/Valkey server")
    sv.add_argument("action", choices=["start", "stop", "status"])
    sv.add_argument(
        "--binary", metavar="PATH", help="start: open the data with this binary, not the one that wrote it"
    )
    sv.set_defaults(func=cmd_server)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except ActorsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValidationError as exc:
        print(f"invalid message: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # e.g. a malformed Type/key reference
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
