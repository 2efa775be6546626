"""``actors dlq list|show|replay|drop``: the dead letters of a namespace, shard by shard."""

from __future__ import annotations

import argparse
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


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: Callable[[argparse.ArgumentParser], None],
) -> None:
    d = sub.add_parser("dlq", help="dead letters: list, show, replay, drop")
    d.add_argument("action", choices=["list", "show", "replay", "drop"])
    d.add_argument("id", nargs="?", help="SHARD/ID for show, replay, drop")
    d.add_argument("--shard", type=int)
    d.add_argument(
        "--count",
        type=cli_text.positive,
        default=LIST_COUNT,
        help=f"list: at most this many per shard, oldest first (default {LIST_COUNT})",
    )
    common(d)
    d.set_defaults(func=cmd_dlq)


def cmd_dlq(args: argparse.Namespace) -> int:
    async def run(client: Client) -> None:
        if args.action == "list":
            await _list(client, args)
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
