"""What the ``actors`` command prints: tables, times, JSON forms of open turns and dead letters,
and the small parsers of its arguments."""

from __future__ import annotations

import argparse
import dataclasses
from datetime import datetime
from typing import Any

from .client import DEAD_LETTER_SCAN, DeadLetterView, TurnView
from .codec import decode_envelope
from .errors import DecodeError

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
    return f"{env.type} -> {env.actor_id}"


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
