"""``actors dlq list | show | replay | drop | purge``: the dead letters of a namespace, shard by
shard."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable

from . import cli_text
from .cli_run import with_client
from .client import Client
from .store import DeadLetter

LIST_COUNT = 100
"""``dlq list`` shows at most this many dead letters per shard unless ``--count`` says otherwise."""
REASON_WIDTH = 200
"""Characters of a reason ``dlq list`` prints (``dlq show`` prints it whole)."""
UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 24 * 3600}


def duration(text: str) -> float:
    """A positive duration: seconds, or a number with the unit s, m, h or d (``30d``)."""
    found = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    seconds = float(found.group(1)) * UNITS[found.group(2)] if found else 0.0
    if not seconds > 0:
        raise argparse.ArgumentTypeError(
            f"a positive duration such as 30d, 12h, 15m, 90s or 90 (seconds), not {text!r}"
        )
    return seconds


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: Callable[[argparse.ArgumentParser], None],
) -> None:
    d = sub.add_parser(
        "dlq",
        help="dead letters: list, show, replay, drop, purge",
        description="purge deletes every dead letter (of --shard, if given), or those older than "
        "--older-than, and prints how many went from each shard.",
    )
    d.add_argument("action", choices=["list", "show", "replay", "drop", "purge"])
    d.add_argument("id", nargs="?", help="SHARD/ID for show, replay, drop")
    d.add_argument("--shard", type=int)
    d.add_argument(
        "--count",
        type=cli_text.positive,
        default=LIST_COUNT,
        help=f"list: at most this many per shard, oldest first (default {LIST_COUNT})",
    )
    d.add_argument("--older-than", type=duration, metavar="AGE",
                   help="purge: only dead letters older than this (30d, 12h, 15m, 90s)")  # fmt: skip
    common(d)
    d.set_defaults(func=cmd_dlq)


def cmd_dlq(args: argparse.Namespace) -> int:
    # Only replay and drop write; list and show read, and purge has nothing to delete on a
    # server that is not running: neither starts the embedded server.
    args.starts_server = args.action in ("replay", "drop")

    async def run(client: Client) -> None:
        if args.action == "list":
            await _list(client, args)
            return
        if args.action == "purge":
            shards = [args.shard] if args.shard is not None else list(range(client.shards))
            await purge(client, shards, args.older_than)
            return
        shard, dlq_id = cli_text.dlq_address(args.id)
        store = client.store
        if args.action == "show":
            for dl in await store.dead_letters(shard, 1, start=dlq_id):
                if dl.id == dlq_id:
                    print(
                        f"{shard}/{dl.id}: {cli_text.describe(dl.envelope)}\nreason: {dl.reason}\n{dl.detail}"
                    )
                    return
            raise SystemExit(f"no dead letter {args.id}")
        if args.action == "replay":
            new_id = await store.replay_dead_letter(shard, dlq_id)
            if new_id is None:
                raise SystemExit(f"no dead letter {args.id}")
            print(f"replayed as inbox entry {new_id}")
        elif args.action == "drop":
            if not await store.drop_dead_letter(shard, dlq_id):
                raise SystemExit(f"no dead letter {args.id}")
            print("dropped")

    return with_client(args, run)


async def _list(client: Client, args: argparse.Namespace) -> None:
    """One line per dead letter on stdout (clipped: an entry may be megabytes); on stderr, how
    many each shard holds beyond what was shown."""
    shards = [args.shard] if args.shard is not None else range(client.shards)
    shown = total = 0
    cut: list[str] = []
    for shard in shards:
        found = await client.store.dead_letters(shard, args.count)
        for dl in found:
            print(_line(shard, dl))
        held = await client.store.dead_letter_count(shard)
        shown, total = shown + len(found), total + max(held, len(found))
        if held > len(found):
            cut.append(f"{shard} ({held:,})")
    if cut:
        print(
            f"showing {shown:,} of {total:,} dead letters, at most {args.count:,} per shard (--count); "
            f"more in shard {', '.join(cut)}",
            file=sys.stderr,
        )


def _line(shard: int, dl: DeadLetter) -> str:
    return f"{shard}/{dl.id}  {cli_text.describe(dl.envelope)}  {cli_text.clip(dl.reason, REASON_WIDTH)}"


async def purge(client: Client, shards: list[int], older_than: float | None) -> None:
    """Delete the dead letters of ``shards`` (those older than ``older_than`` seconds, by
    Redis's clock, if given) and print how many went from each shard and in all."""
    store = client.store
    before = None if older_than is None else await store.server_time_ms() - int(older_than * 1000)
    total = 0
    for shard in shards:
        removed = await store.trim_dead_letters(shard, before)
        total += removed
        if removed:
            print(f"shard {shard}: removed {_letters(removed)}")
    print(f"removed {_letters(total)}" + ("" if older_than is None else f" older than {_age(older_than)}"))


def _letters(n: int) -> str:
    return cli_text.count(n, "dead letter", "dead letters")


def _age(seconds: float) -> str:
    for unit in ("d", "h", "m"):
        if seconds >= UNITS[unit] and seconds % UNITS[unit] == 0:
            return f"{int(seconds // UNITS[unit])}{unit}"
    return f"{seconds:g}s"
