"""What a worker checks about its server before it takes a shard: that its Redis user has the
rights the runtime needs (without the namespace's channels, asks and hand-overs fail in a
loop), and that the server never evicts keys (an evicted mailbox, state or lease is lost
without a word)."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from .errors import ConfigurationError
from .store import Store

log = logging.getLogger("actors.worker")


def redis_user(url: str | None) -> str:
    """The ACL user a URL logs in as (``default`` when it names none)."""
    return (urlsplit(url).username if url else None) or "default"


async def check_rights(store: Store) -> None:
    """Raise ConfigurationError, in one line, naming every right the user lacks."""
    refused = await store.missing_rights()
    if not refused:
        return
    ns = store.keys.namespace
    lacking = "; ".join(f"{r.right} ({r.error})" for r in refused)
    raise ConfigurationError(
        f"the Redis user {redis_user(store.url)!r} lacks rights the runtime needs: {lacking}. "
        f"Give it the namespace's keys and channels (~{ns}:* &{ns}:*) and the commands the README "
        "lists under 'Redis users (ACL)'; `actors doctor` names every missing one"
    )


async def check_eviction(store: Store, allow_eviction: bool) -> None:
    """Refuse a server whose ``maxmemory-policy`` is not ``noeviction`` (unless allowed: then
    warn); warn once if the policy cannot be read (a managed service, an ACL without INFO)."""
    policy = await store.eviction_policy()
    if policy is None:
        log.warning(
            "could not read the server's maxmemory-policy (INFO and CONFIG GET refused); make sure "
            "it is noeviction: any other policy lets Redis delete mailboxes, states and leases"
        )
        return
    if policy == "noeviction":
        return
    message = (
        f"the server's maxmemory-policy is {policy}: when memory runs out it deletes keys, and with "
        "them mailboxes, states and leases, without a word. Set it to noeviction (CONFIG SET "
        "maxmemory-policy noeviction, and in the server's configuration)"
    )
    if not allow_eviction:
        raise ConfigurationError(f"{message}, or pass --allow-eviction to run anyway")
    log.warning("--allow-eviction: starting although %s", message)


async def check_cluster_coverage(store: Store) -> None:
    """Warn where one primary's failure would stop every shard of a cluster, not only its own."""
    if await store.full_coverage_required():
        log.warning(
            "the cluster has cluster-require-full-coverage yes: while a failed primary's slots wait "
            "for a replica, every primary refuses every command, and every worker loses every lease "
            "held longer than that. Set it to no (CONFIG SET cluster-require-full-coverage no on each "
            "node, and in their configuration)"
        )
