"""What ``actors doctor`` says: the advice of each check, in plain words."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from .store import Refusal

NO_SERVER = (
    "no Redis URL is configured (--redis, ACTORS_REDIS_URL) and the project's embedded server is not "
    "running: start it with `actors server start`, or pass the URL of your server"
)
CLUSTER = (
    "the runtime's keys and scripts are slot-safe, but it talks to one node (Redis Cluster is not built yet)"
)
REPLICA = "a replica refuses writes; give the URL of the primary"
AOF_ADVICE = (
    "the runtime keeps what it acknowledged only with appendonly yes and appendfsync everysec or always"
)
AOF_OFF = (
    "AOF is off: a crash of the server loses every write since its last snapshot, acknowledged sends "
    "included. Turn it on: CONFIG SET appendonly yes (appendfsync everysec), and in its configuration"
)
FSYNC = {
    "always": "every write is on disk before it is acknowledged",
    "everysec": "a crash of the server loses at most the last second of writes",
    "no": "the system flushes when it likes (about 30 s may be lost in a crash); set appendfsync everysec",
}
POLICY_UNKNOWN = (
    "could not read maxmemory-policy (INFO and CONFIG GET refused): make sure it is noeviction; any "
    "other policy lets Redis delete mailboxes, states and leases when memory is full"
)
NO_DRYRUN = "this connection may not run ACL DRYRUN, so not every command could be checked"
ALL_COMMANDS = (
    "compare the user with the README's 'Redis users (ACL)', or run doctor with an admin URL and "
    "--acl-user USER"
)
NEW_USER = "create it as the README's 'Redis users (ACL)' shows, or check --acl-user and the URL"
TLS_UNVERIFIED = (
    "on, but the server's certificate is not verified (ssl_cert_reqs=none): whoever is in between can "
    "read and change everything. Give the CA in ssl_ca_certs instead"
)
TLS_OFF = (
    "off: commands, data and the password cross the network in clear. Use rediss:// with the server's "
    "CA (README, 'TLS')"
)
CLOCK = (
    "sleeps, timers, leases and schedules run on the server's clock, so the runtime is not affected, "
    "but the times the CLI shows are the server's; synchronise the clocks (NTP)"
)
MIXED_APPS = (
    "Fine during a rolling upgrade; otherwise a worker dead-letters the messages of the types its app "
    "lacks: run one app per namespace (README, 'Apps on one server')"
)
MEMORY_FULL = (
    "When memory is full the server refuses writes (noeviction): sends and turns fail. Raise maxmemory "
    "or free memory"
)


def unreachable(url: str, exc: BaseException) -> str:
    return (
        f"cannot reach {address(url)}: {exc}. Check the URL (--redis, ACTORS_REDIS_URL), that the server "
        "runs, and for rediss:// the certificates"
    )


def address(url: str) -> str:
    """The URL without its user and password."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"


def server_name(server: Mapping[str, Any]) -> tuple[str, str]:
    if "valkey_version" in server:
        return "Valkey", str(server["valkey_version"])
    return "Redis", str(server.get("redis_version", "?"))


def evicting(policy: str) -> str:
    return (
        f"maxmemory-policy is {policy}: when memory is full Redis deletes keys, and with them mailboxes, "
        "states and leases, without a word (workers refuse to start). Set it to noeviction: CONFIG SET "
        "maxmemory-policy noeviction, and in the server's configuration"
    )


def missing_rules(refused: list[Refusal], namespace: str) -> list[str]:
    """The ACL rules that would grant what ``ACL DRYRUN`` refused."""
    rules: list[str] = []
    for refusal in refused:
        if "'" in refusal.error and "command" in refusal.error:
            rules.append(refusal.right)
        elif "channel" in refusal.error:
            rules.append(f"&{namespace}:*")
        elif "key" in refusal.error:
            rules.append(f"~{namespace}:*")
        else:
            rules.append(refusal.right)
    return list(dict.fromkeys(rules))


def acl_fix(user: str, namespace: str, rules: list[str]) -> str:
    grant = " ".join(rules) if rules else f"~{namespace}:* &{namespace}:*"
    return f"Grant it: ACL SETUSER {user} {grant} (README, 'Redis users (ACL)', has the whole user)"


def no_workers(namespace: str) -> str:
    return (
        f"no live worker in {namespace!r}: messages wait in Redis until one runs "
        f"(actors worker module:app --namespace {namespace})"
    )


def app_line(app: str, types: tuple[str, ...], version: str) -> str:
    return f"app {app} (types {', '.join(types) or 'none'}), actors {version}"


def size(n: int) -> str:
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def about(n: int) -> str:
    """``n`` to two significant digits: 88,367,674 -> 88,000,000."""
    digits = len(str(n))
    return f"{round(n, -(digits - 2)) if digits > 2 else n:,}"
