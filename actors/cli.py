"""The ``actors`` command.

actors worker APP [--processes N]     run workers for APP ("module:attribute")
actors send|ask REF TYPE JSON --app APP
actors state REF [--app APP]
actors status [--wait-idle]           workers, shard owners, epochs, the work left; wait until idle
actors top                            a live view of throughput, latency, lag, leases, limiters
actors bench [--messages N ...]       measure throughput and latency with real worker processes
actors approve REF --request-id ID (--approve | --reject) [--by NAME] [--comment TEXT]
actors waits [--limit N]              every open turn: running, sleeping, waiting, parked
actors inspect REF [--app APP]        state, open turn (journal, wait, timer), deferred count, dead letters
actors cancel REF                     end an actor's open turn (dead-lettered as "cancelled")
actors dlq list|show|replay|drop|purge [--older-than AGE] [--shard N]
actors server start|stop|status       the project's embedded server
actors doctor [--acl-user USER]       check a deployment: one line per check, exit 1 on a fail

Every command takes --debug: an error then shows its traceback instead of one line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import Any

from . import cli_dlq, cli_status, cli_text, cli_workflows, doctor, health, top
from .actor import ActorRef, App
from .cli_run import add_debug, run_command, with_client
from .cli_worker import cmd_worker, worker_safety_flags
from .client import Client
from .codec import validate_json
from .server import EmbeddedServer, announce, default_dir, resolve_url
from .settings import DURABILITY_LEVELS, LeaseSettings, RedisSettings, WorkerSettings


# ---- messages ---------------------------------------------------------------------
def cmd_send(args: argparse.Namespace) -> int:
    async def run(client: Client) -> None:
        ref, msg = _message(client.app, args.ref, args.type, args.json)
        if args.command == "ask":
            reply = await client.ask(ref, msg, timeout=args.timeout, idempotency_key=args.idempotency_key)
            print(json.dumps(reply.model_dump(mode="json") if reply is not None else None))
        else:
            print(await client.send(ref, msg, idempotency_key=args.idempotency_key))

    return with_client(args, run, app_required=True, writes=True)


def _message(app: App | None, ref_text: str, type_name: str, payload: str) -> tuple[ActorRef[Any], Any]:
    assert app is not None
    ref = ActorRef.parse(ref_text)
    cls = app.actor_type(ref.type)
    # Strict: a misspelt field is an error here, not a default silently used.
    return cls.ref(ref.key), validate_json(cls.message_model(type_name), payload or "{}")


def cmd_state(args: argparse.Namespace) -> int:
    async def run(client: Client) -> None:
        state = await client.state(ActorRef.parse(args.ref))
        if hasattr(state, "model_dump"):
            state = state.model_dump(mode="json")
        print(json.dumps(state, indent=2))

    return with_client(args, run)


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    url = resolve_url(RedisSettings.from_env(args.redis).url)
    result = asyncio.run(bench.run(url, args.actors, args.messages, args.processes, args.asks, not args.json))
    print(bench.report(result, args.json))
    return 0 if result.exactly_once else 1


def cmd_top(args: argparse.Namespace) -> int:
    async def run(client: Client) -> None:
        await top.run(client.store, client.shards, args.interval, args.frames)

    try:
        return with_client(args, run)
    except KeyboardInterrupt:  # the way to leave it
        return 0


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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="actors", description="Durable actors on Redis streams.")
    p.add_argument("--log-level", default=os.environ.get("ACTORS_LOG_LEVEL", "INFO"))
    add_debug(p, default=False)
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
    w.add_argument("--processes", type=cli_text.positive, default=1)
    w.add_argument("--shards", type=cli_text.shard_count, default=None,
                   help="shard count (default: as recorded in Redis)")  # fmt: skip
    w.add_argument("--lease-ttl", type=cli_text.seconds, default=LeaseSettings().ttl)
    w.add_argument("--renew-interval", type=cli_text.seconds, default=LeaseSettings().renew_interval)
    w.add_argument("--stall-limit", type=cli_text.seconds, default=LeaseSettings().stall_limit,
                   help="seconds the event loop may be blocked before this worker's shards move")  # fmt: skip
    w.add_argument("--grace", type=cli_text.seconds_or_none, default=10.0,
                   help="seconds in-flight turns get on shutdown")  # fmt: skip
    w.add_argument("--connect-timeout", type=cli_text.seconds, default=None, metavar="SECONDS",
                   help="give up if Redis is unreachable this long at start (default: never)")  # fmt: skip
    w.add_argument(
        "--max-redeliveries",
        type=cli_text.positive,
        default=WorkerSettings().max_redeliveries,
        help="runs of a turn interrupted by the end of its worker before it is dead-lettered",
    )
    w.add_argument("--dlq-max-len", type=int, default=WorkerSettings().dlq_max_len,
                   help="dead letters kept per shard, the oldest trimmed first (0: no bound)")  # fmt: skip
    w.add_argument("--dlq-max-age", type=float, default=WorkerSettings().dlq_max_age,
                   help="seconds a dead letter is kept (0: no bound; default 30 days)")  # fmt: skip
    worker_safety_flags(w)
    health.add_arguments(w)
    w.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    w.add_argument("--otel", choices=["console", "otlp", "none"], default=None,
                   help="export traces (default: as OTEL_TRACES_EXPORTER says; off if unset)")  # fmt: skip
    common(w)
    w.set_defaults(func=cmd_worker)

    for name in ("send", "ask"):
        s = sub.add_parser(name, help=f"{name} a message (JSON) to an actor")
        s.add_argument("ref", help="Type/key")
        s.add_argument("type", help="message type name")
        s.add_argument("json", nargs="?", default="{}", help="the message's fields; unknown ones are refused")
        s.add_argument("--app", default=os.environ.get("ACTORS_APP"))
        s.add_argument("--idempotency-key")
        s.add_argument(
            "--timeout", type=cli_text.seconds, default=30.0, help="ask: seconds to wait for the reply"
        )
        common(s)
        s.set_defaults(func=cmd_send, starts_server=True)

    st = sub.add_parser("state", help="print an actor's committed state")
    st.add_argument("ref")
    st.add_argument("--app", default=os.environ.get("ACTORS_APP"))
    common(st)
    st.set_defaults(func=cmd_state)

    cli_status.register(sub, common)

    bn = sub.add_parser("bench", help="throughput, ask latency and Redis commands per message, measured")
    bn.add_argument("--actors", type=cli_text.positive, default=1_000)
    bn.add_argument("--messages", type=cli_text.positive, default=200_000)
    bn.add_argument("--processes", type=cli_text.positive, default=2, help="worker processes to start")
    bn.add_argument("--asks", type=cli_text.positive, default=1_000,
                    help="sequential asks for the latency figures")  # fmt: skip
    bn.add_argument("--json", action="store_true")
    bn.add_argument(
        "--redis", default=None, help="Redis URL (default: ACTORS_REDIS_URL, else the embedded server)"
    )
    bn.set_defaults(func=cmd_bench)

    tp = sub.add_parser("top", help="a live view: throughput, latency, lag, leases, limiters, open turns")
    tp.add_argument("--interval", type=cli_text.seconds, default=1.0, help="seconds between frames")
    tp.add_argument("--frames", type=cli_text.positive, default=None,
                    help="stop after this many frames (default: never)")  # fmt: skip
    common(tp)
    tp.set_defaults(func=cmd_top)

    cli_workflows.register(sub, common)
    cli_dlq.register(sub, common)
    doctor.add_parser(sub, common)

    sv = sub.add_parser("server", help="the project's embedded Redis/Valkey server")
    sv.add_argument("action", choices=["start", "stop", "status"])
    sv.add_argument(
        "--binary", metavar="PATH", help="start: open the data with this binary, not the one that wrote it"
    )
    sv.set_defaults(func=cmd_server)
    for command in sub.choices.values():
        add_debug(command)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
