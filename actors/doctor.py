"""``actors doctor``: check a deployment and say what is wrong in plain words.

One line per check, ``ok``, ``warn`` or ``fail``, with what to do; the exit code is 1 if a
check failed. It only reads: it never starts the embedded server (with no URL it checks the
one that runs, if any), records no shard count, and checks rights with ``ACL DRYRUN`` or,
when the user may not run it, with commands that change nothing (``Store.missing_rights``).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from . import doctor_text as text
from .preflight import redis_user
from .server import EmbeddedServer, default_dir
from .settings import RedisSettings
from .store import NO_USER, Store

Level = Literal["ok", "warn", "fail"]

BYTES_PER_ACTOR = 286
"""Redis memory per sleeping actor, measured (README, Performance: 277 to 286 bytes)."""
IDLE_BYTES_PER_ACTOR = 57
"""Redis memory per idle actor with a state of one int, measured."""
MEMORY_WARN, MEMORY_FAIL = 0.80, 0.95
CLOCK_SKEW_WARN = 1.0
"""Seconds between the server's clock and this machine's past which the check warns."""
LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    level: Level
    text: str

    def line(self) -> str:
        return f"{self.level:<5} {self.name:<12} {self.text}"


@dataclass(slots=True)
class Context:
    store: Store
    url: str
    acl_user: str | None


def add_parser(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """The ``doctor`` subcommand (``sub``: the parser's subparsers; ``common``: --redis, --namespace)."""
    d = sub.add_parser(
        "doctor",
        help="check a deployment: server, persistence, eviction, ACL, TLS, clock, namespace, workers, memory",
        description="Check the server and namespace the runtime uses, one line per check (ok, warn or "
        "fail, with what to do); exit 1 if a check fails. Reads only; never starts a server.",
    )
    d.add_argument("--acl-user", metavar="USER",
                   help="check this user's rights (needs an admin URL; default: the URL's user)")  # fmt: skip
    common(d)
    d.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    settings = RedisSettings.from_env(args.redis, args.namespace)
    url = settings.url or running_embedded_url()
    if url is None:
        checks = [Check("server", "fail", text.NO_SERVER)]
    else:
        checks = asyncio.run(run(url, settings.namespace, args.acl_user))
    for check in checks:
        print(check.line())
    return 1 if any(c.level == "fail" for c in checks) else 0


def running_embedded_url() -> str | None:
    """The project's embedded server's URL if it runs; it is never started (nor its folder made)."""
    directory = default_dir()
    if not (directory / "server.json").exists():
        return None
    status = EmbeddedServer(directory).status()
    return str(status["url"]) if status["running"] else None


async def run(url: str, namespace: str, acl_user: str | None) -> list[Check]:
    store = Store.from_url(url, namespace)
    try:
        try:
            await store.ping()
        except Exception as exc:
            return [Check("connection", "fail", text.unreachable(url, exc))]
        ctx = Context(store, url, acl_user)
        return [await _guarded(name, check, ctx) for name, check in CHECKS]
    finally:
        await store.close()


async def _guarded(name: str, check: Callable[[Context], Awaitable[Check]], ctx: Context) -> Check:
    """A check that could not run is a warning, not a crash of the whole report."""
    try:
        return await check(ctx)
    except Exception as exc:
        return Check(name, "warn", f"could not check: {exc}")


async def check_server(ctx: Context) -> Check:
    server = await ctx.store.info("server")
    if server is None:
        return Check("server", "warn", "could not read the server's version (INFO refused)")
    name, version = text.server_name(server)
    where = text.address(ctx.url)
    major = int(str(version).split(".")[0]) if str(version)[:1].isdigit() else 0
    if major < 7:
        return Check("server", "fail", f"{name} {version} at {where}: the runtime needs Redis 7+ or Valkey")
    if server.get("redis_mode") == "cluster":
        return Check("server", "warn", f"{name} {version} at {where} in cluster mode: {text.CLUSTER}")
    replication = await ctx.store.info("replication") or {}
    if replication.get("role") == "slave":
        return Check("server", "fail", f"{name} {version} at {where} is a replica: {text.REPLICA}")
    return Check("server", "ok", f"{name} {version} at {where}")


async def check_persistence(ctx: Context) -> Check:
    persistence = await ctx.store.info("persistence")
    if persistence is None:
        return Check("persistence", "warn", "could not read it (INFO refused): " + text.AOF_ADVICE)
    if not int(persistence.get("aof_enabled", 0)):
        return Check("persistence", "warn", text.AOF_OFF)
    fsync = await ctx.store.config_value("appendfsync")
    if fsync is None:
        return Check("persistence", "warn", "AOF on; its fsync policy is unknown (CONFIG GET refused): "
                     + text.AOF_ADVICE)  # fmt: skip
    level: Level = "warn" if fsync == "no" else "ok"
    meaning = text.FSYNC.get(fsync, text.AOF_ADVICE)
    return Check("persistence", level, f"AOF on, appendfsync {fsync}: {meaning}")


async def check_eviction(ctx: Context) -> Check:
    policy = await ctx.store.eviction_policy()
    if policy is None:
        return Check("eviction", "warn", text.POLICY_UNKNOWN)
    if policy != "noeviction":
        return Check("eviction", "fail", text.evicting(policy))
    return Check("eviction", "ok", "maxmemory-policy noeviction: Redis never deletes the runtime's keys")


async def check_acl(ctx: Context) -> Check:
    ns = ctx.store.keys.namespace
    me = await ctx.store.acl_user() or redis_user(ctx.url)
    user = ctx.acl_user or me
    refused = await ctx.store.dry_run(user)
    if refused is None and ctx.acl_user and ctx.acl_user != me:
        return Check("acl", "warn", f"cannot check user {user!r}: {text.NO_DRYRUN} (connect as an admin)")
    if refused is None:
        probes = await ctx.store.missing_rights()
        if probes:
            missing = "; ".join(f"{r.right} ({r.error})" for r in probes)
            return Check("acl", "fail", f"user {user!r} lacks: {missing}. {text.acl_fix(user, ns, [])}")
        return Check("acl", "warn", f"user {user!r} may use the keys, scripts, channels and clock of "
                     f"{ns!r}, but {text.NO_DRYRUN}: {text.ALL_COMMANDS}")  # fmt: skip
    if refused and refused[0].right == NO_USER:
        return Check("acl", "fail", f"there is no user {user!r} ({refused[0].error}): {text.NEW_USER}")
    if refused:
        rules = text.missing_rules(refused, ns)
        return Check("acl", "fail", f"user {user!r} lacks {' '.join(rules)}. {text.acl_fix(user, ns, rules)}")
    return Check("acl", "ok", f"user {user!r} has every command, key and channel the runtime needs in {ns!r}")


async def check_tls(ctx: Context) -> Check:
    parts = urlsplit(ctx.url)
    options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if parts.scheme == "rediss":
        if options.get("ssl_cert_reqs", "").lower() in ("none", "optional"):
            return Check("tls", "warn", text.TLS_UNVERIFIED)
        ca = options.get("ssl_ca_certs", "the system's CAs")
        client = f", client certificate {options['ssl_certfile']}" if "ssl_certfile" in options else ""
        return Check("tls", "ok", f"on (rediss://): the server's certificate is checked against {ca}{client}")
    if parts.scheme == "unix":
        return Check("tls", "ok", "off: a Unix socket on this machine")
    if (parts.hostname or "") in LOOPBACK:
        return Check("tls", "ok", "off: the server is on this machine (loopback)")
    return Check("tls", "warn", text.TLS_OFF)


async def check_clock(ctx: Context) -> Check:
    before = time.time()
    server_ms = await ctx.store.server_time_ms()
    skew = server_ms / 1000 - (before + time.time()) / 2
    shown = f"the server's clock is {abs(skew):.3f} s {'ahead of' if skew >= 0 else 'behind'} this machine's"
    if abs(skew) > CLOCK_SKEW_WARN:
        return Check("clock", "warn", f"{shown}: {text.CLOCK}")
    return Check("clock", "ok", shown)


async def check_namespace(ctx: Context) -> Check:
    ns = ctx.store.keys.namespace
    shards = await ctx.store.recorded_shards()
    if shards is not None:
        return Check("namespace", "ok", f"{ns!r}: {shards} shards")
    others = await ctx.store.namespaces()
    listed = f"; namespaces on this server: {', '.join(others)}" if others else ""
    return Check("namespace", "warn", f"{ns!r} has no shard count: no worker or client has used it yet"
                 f"{listed}. Check --namespace / ACTORS_NAMESPACE")  # fmt: skip


async def check_workers(ctx: Context) -> Check:
    ns = ctx.store.keys.namespace
    live, records = await ctx.store.live_apps()
    if not live:
        return Check("workers", "warn", text.no_workers(ns))
    kinds = sorted({(r.app, r.types, r.version) for r in records.values()})
    unrecorded = len(live) - len(records)
    older = f"; {unrecorded} started by a version before app records" if unrecorded else ""
    shown = "; ".join(text.app_line(app, types, version) for app, types, version in kinds)
    if len(kinds) <= 1:
        return Check("workers", "ok", f"{len(live)} live: {shown or 'no app records'}{older}")
    return Check("workers", "warn", f"{len(live)} live, of {len(kinds)} apps or versions: {shown}{older}. "
                 + text.MIXED_APPS)  # fmt: skip


async def check_memory(ctx: Context) -> Check:
    memory = await ctx.store.info("memory")
    if memory is None:
        return Check("memory", "warn", "could not read it (INFO refused)")
    used, maxmemory = int(memory.get("used_memory", 0)), int(memory.get("maxmemory", 0))
    limit = maxmemory or int(memory.get("total_system_memory", 0))
    if not limit:
        return Check(
            "memory", "ok", f"{text.size(used)} used; no maxmemory, and the machine's memory is unknown"
        )
    room = max(0, limit - used)
    of = "maxmemory" if maxmemory else "the machine's memory; no maxmemory is set"
    shown = (f"{text.size(used)} used of {text.size(limit)} ({of}): room for about "
             f"{text.about(room // BYTES_PER_ACTOR)} more actors at {BYTES_PER_ACTOR} bytes each (a sleeping "
             f"actor, measured; an idle one takes {IDLE_BYTES_PER_ACTOR})")  # fmt: skip
    share = used / limit
    if share >= MEMORY_FAIL:
        return Check("memory", "fail", f"{shown}. {text.MEMORY_FULL}")
    if share >= MEMORY_WARN:
        return Check("memory", "warn", f"{shown}. {text.MEMORY_FULL}")
    return Check("memory", "ok", shown)


CHECKS: list[tuple[str, Callable[[Context], Awaitable[Check]]]] = [
    ("server", check_server), ("persistence", check_persistence), ("eviction", check_eviction),
    ("acl", check_acl), ("tls", check_tls), ("clock", check_clock), ("namespace", check_namespace),
    ("workers", check_workers), ("memory", check_memory),
]  # fmt: skip
