"""Apps sharing a namespace: a worker refuses a namespace whose live workers serve another app.

Every worker of a namespace takes shards, whatever actor types its app defines, and a
message for a type its app lacks is dead-lettered ('unknown actor type'). So two apps in one
namespace dead-letter each other's messages. A worker therefore records, as it starts, the
app it serves (``Store.claim_app``) and refuses to start if a live worker of the namespace

- serves a type this worker's app lacks (this worker would dead-letter its messages), or
- runs another app (by name) with types this one has and it lacks (it would dead-letter
  this app's).

A new version of the same app that adds types passes (the rolling upgrade of the README);
``WorkerSettings.rolling_upgrade`` (``--rolling-upgrade``) lets any worker pass, with a
warning. An app's name is the module(s) its actor types are defined in, so the same app has
the same name whether it runs under ``actors worker module:app`` or from code.
"""

from __future__ import annotations

import logging
import sys
from importlib import metadata
from pathlib import Path

from .actor import App
from .errors import ConfigurationError
from .store import AppRecord, Store

log = logging.getLogger("actors.worker")

SHOWN_TYPES = 8
"""A message lists at most this many type names."""


def app_name(app: App) -> str:
    """The modules the app's actor types are defined in (``__main__`` by the script's name)."""
    modules = sorted({_module_name(cls.__module__) for cls in app.actor_types})
    return "+".join(modules) or "(an app with no actor types)"


def _module_name(module: str) -> str:
    if module != "__main__":
        return module
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:  # python -m package.module
        return str(spec.name).removesuffix(".__main__")
    path = getattr(main, "__file__", None)
    return Path(path).stem if path else module


def runtime_version() -> str:
    try:
        return metadata.version("durable-actors")
    except metadata.PackageNotFoundError:
        return "unknown"


def record_of(app: App) -> AppRecord:
    return AppRecord(
        app_name(app), tuple(sorted(cls.type_name for cls in app.actor_types)), runtime_version()
    )


def conflict(mine: AppRecord, other: AppRecord) -> str:
    """Why ``mine`` must not share a namespace with a live worker of ``other`` ('' if it may)."""
    lacking = sorted(set(other.types) - set(mine.types))
    if lacking:
        return f"lacks {_names(lacking)}, whose messages it would dead-letter as 'unknown actor type'"
    extra = sorted(set(mine.types) - set(other.types))
    if extra and other.app != mine.app:
        return f"is another app, with types they lack ({_names(extra)}), whose messages they dead-letter"
    return ""


def refusal(namespace: str, mine: AppRecord, other: AppRecord, why: str) -> str:
    """The one line a refused worker says: both apps, and how to fix it."""
    return (
        f"namespace {namespace!r} is served by live workers of app {other.app} (types "
        f"{_names(other.types)}); this worker's app {mine.app} (types {_names(mine.types)}) {why}. "
        "Run each app in its own namespace (--namespace NAME, ACTORS_NAMESPACE or "
        "RedisSettings(namespace=...)); if this worker is a new version replacing those workers, "
        "pass --rolling-upgrade (WorkerSettings(rolling_upgrade=True))"
    )


async def claim_namespace(store: Store, worker_id: str, app: App, rolling_upgrade: bool) -> None:
    """Record the app this worker serves; raise ConfigurationError (after withdrawing the
    record) if a live worker of the namespace serves an app it must not share with."""
    mine = record_of(app)
    others = await store.claim_app(worker_id, mine)
    for other in others.values():
        why = conflict(mine, other)
        if not why:
            continue
        message = refusal(store.keys.namespace, mine, other, why)
        if rolling_upgrade:
            log.warning("--rolling-upgrade: starting although %s", message.split(". Run each app")[0])
            return
        await store.release_app(worker_id)
        raise ConfigurationError(message)


def _names(types: tuple[str, ...] | list[str]) -> str:
    shown = ", ".join(types[:SHOWN_TYPES])
    more = len(types) - SHOWN_TYPES
    return f"{shown} and {more} more" if more > 0 else shown or "none"
