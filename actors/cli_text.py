"""What the ``actors`` command prints: tables, times, JSON forms of open turns and dead letters,
and the small parsers of its arguments."""

from __future__ import annotations

import argparse
import dataclasses
import math
from datetime import datetime
from typing import Any

from .client import DEAD_LETTER_SCAN, DeadLetterView, TurnView
from .codec import decode_envelope
from .errors import DecodeError
from .settings import MAX_SHARDS

NAME_WIDTH = 120
"""Characters of a message type or an actor id printed in a list (an entry may be megabytes)."""
INSPECT_DEAD_LETTERS = 10
"""``inspect`` lists this many of an actor's newest dead letters (``--json`` lists them all)."""


def print_dead_letters(dead: list[DeadLetterView]) -> None:
    """The count (among the shard's newest ``DEAD_LETTER_SCAN``), then the newest few with reasons."""
    print(f"dead letters  {len(dead)} (among its shard's newest {DEAD_LETTER_SCAN})")
    for d in dead[-INSPECT_DEAD_LETTERS:]:
        print(f"  {when(d.at)}  {d.message_type} {d.message_id}  {clip(d.reason, 100)}")


def dead_letter_json(dead: DeadLetterView) -> dict[str, Any]:
    shown = dataclasses.asdict(dead)
    shown["at"] = dead.at.isoformat(timespec="milliseconds")
    return shown


def turn_json(view: TurnView) -> dict[str, Any]:
    shown = dataclasses.asdict(view)
    shown["since"] = None if view.since is None else view.since.isoformat(timespec="milliseconds")
    shown["due"] = None if view.due is None else view.due.isoformat(timespec="milliseconds")
    return shown


def when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%SZ")


def due(view: TurnView) -> str:
    """When the turn's timer fires; a running turn has none ("-"), a suspended one may never fire."""
    if view.due is not None:
        return when(view.due)
    return "-" if view.status == "running" else "never"


def count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [headers, *rows]
    )


def dlq_address(text: str | None) -> tuple[int, str]:
    shard, sep, dlq_id = (text or "").partition("/")
    if not sep or not shard.isdigit():
        raise SystemExit("give the dead letter as SHARD/ID, as 'actors dlq list' prints it")
    return int(shard), dlq_id


def describe(raw: bytes) -> str:
    try:
        env = decode_envelope(raw)
    except DecodeError:
        return "(undecodable entry)"
    return f"{clip(env.type, NAME_WIDTH)} -> {clip(env.actor_id, NAME_WIDTH)}"


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value: must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value: must be at least 1, got {value}")
    return value


def shard_count(text: str) -> int:
    value = positive(text)
    if value > MAX_SHARDS:
        raise argparse.ArgumentTypeError(f"invalid value: must be at most {MAX_SHARDS}, got {value}")
    return value


def seconds(text: str) -> float:
    """A duration in seconds: a finite number above 0."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid value: must be more than 0 seconds, got {text!r}")
    return value


def seconds_or_none(text: str) -> float:
    """A duration in seconds that may be 0 (none at all)."""
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid value: must be 0 or more seconds, got {text!r}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid value: must be a number of seconds, got {text!r}"
        ) from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"invalid value: must be a finite number of seconds, got {text!r}")
    return value
