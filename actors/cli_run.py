"""How an ``actors`` command runs: the app it loads, the client it connects, and what it says
when something goes wrong. A routine error (Redis unreachable, a refused password, a typo in
the app path, bad input) is one line on stderr saying what is wrong and what to do, and a
non-zero exit; ``--debug`` (or ``ACTORS_DEBUG=1``) shows the traceback instead."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from .actor import App
from .client import Client, connect
from .errors import ActorsError, ConfigurationError
from .server import BIN_ENV, resolve_url
from .settings import RedisSettings, redact_url
from .store import describe_error

Body = Callable[[Client], Awaitable[None]]

INTERRUPTED = 130
"""The exit status of a command stopped by Ctrl-C (128 + SIGINT), as shells report it."""


def load_app(spec: str) -> App:
    """Import ``module:attribute`` and check it is an App (ConfigurationError otherwise)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(f"APP must look like 'package.module:app', got {spec!r}")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = ""
        if isinstance(exc, ModuleNotFoundError) and exc.name and module_name.startswith(exc.name):
            hint = "; is the APP right? run the command from your project's folder, or add it to PYTHONPATH"
        raise ConfigurationError(f"cannot import {module_name!r} (APP {spec!r}): {exc}{hint}") from exc
    app = getattr(module, attr, None)
    if app is None:
        raise ConfigurationError(
            f"cannot load APP {spec!r}: module {module_name!r} has no attribute {attr!r}"
        )
    if not isinstance(app, App):
        raise ConfigurationError(f"APP {spec!r} is a {type(app).__name__}, not an actors.App")
    return app


def redis_settings(args: argparse.Namespace) -> RedisSettings:
    return RedisSettings.from_env(args.redis, args.namespace, getattr(args, "durability", None))


def with_client(
    args: argparse.Namespace, body: Body, app_required: bool = False, writes: bool = False
) -> int:
    """Run ``body`` with a client of the command's namespace (and app, if ``--app`` names one)."""
    app = load_app(args.app) if getattr(args, "app", None) else None
    if app_required and app is None:
        raise ConfigurationError("this command needs --app module:app to validate the message")
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


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command; errors become one line and an exit status (see the module)."""
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # here, so that a closed pipe is found while we can still say nothing
        return code
    except KeyboardInterrupt:
        return INTERRUPTED
    except BrokenPipeError:
        # The reader of our output is gone (``actors ... | head``): nothing to say to anyone.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except SystemExit as exc:
        if not isinstance(exc.code, str):
            raise
        return _report(exc.code, 1)
    except Exception as exc:
        if debugging(args):
            raise
        return _report(*explain(exc, args))


def explain(exc: BaseException, args: argparse.Namespace) -> tuple[str, int]:
    """The line to print for ``exc``, and the exit status."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]  # a task group's one failure: say what it was
    if isinstance(exc, ValidationError):  # a message that does not fit its model: pydantic says where
        return f"invalid message: {exc}", 2
    if isinstance(exc, ValueError):  # bad input, e.g. a malformed Type/key reference
        return _first_line(exc), 2
    if isinstance(exc, ActorsError):
        return _first_line(exc), 1
    where = redact_url(getattr(args, "redis", None) or os.environ.get("ACTORS_REDIS_URL"))
    described = describe_error(exc, where)
    if described is not None:
        return described, 1
    if isinstance(exc, OSError) and exc.filename is not None:
        configured = os.environ.get(BIN_ENV)
        named = f"${BIN_ENV} names {exc.filename!r}: " if configured == exc.filename else ""
        return f"{named}{exc.strerror or exc}: {exc.filename}", 1
    return f"unexpected {type(exc).__name__}: {_first_line(exc)} (--debug for the traceback)", 1


def debugging(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("ACTORS_DEBUG", "") not in ("", "0")


def add_debug(parser: argparse.ArgumentParser, default: Any = argparse.SUPPRESS) -> None:
    """``--debug``: on the main parser (default False) and on each command (``actors status
    --debug`` works too: SUPPRESS keeps a command from overwriting the main parser's value)."""
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show the traceback of an error instead of one line")  # fmt: skip


def _report(line: str, code: int) -> int:
    print(line if line.startswith("invalid message: ") else f"error: {line}", file=sys.stderr)
    return code


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    more = " (more with --debug)" if len(lines) > 1 else ""
    return lines[0] + more
