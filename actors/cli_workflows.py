"""``actors approve|cancel|waits|inspect``: durable workflows from the command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from . import cli_text
from .actor import ActorRef
from .cli_run import with_client
from .client import ActorView, Client, TurnView
from .codec import actor_id
from .errors import DecodeError
from .journal import OpenTurn
from .messages import Approval
from .routing import shard_of

Common = Callable[[argparse.ArgumentParser], None]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: Common) -> None:
    a = sub.add_parser(
        "approve",
        help="approve or reject a request an actor waits for (wait_for(Approval))",
        description="Send an actors.Approval to the actor, for the wait_for(Approval, ...) of its open "
        "turn; an approval no wait takes is dead-lettered. Prints the message id, and a warning "
        "if the actor has no turn waiting for an Approval when it is sent.",
    )
    a.add_argument("ref", help="Type/key")
    a.add_argument("--request-id", required=True, metavar="ID", help="the request the actor waits for")
    decision = a.add_mutually_exclusive_group(required=True)
    decision.add_argument("--approve", dest="approved", action="store_true", help="approve the request")
    decision.add_argument("--reject", dest="approved", action="store_false", help="reject the request")
    a.add_argument("--by", default="", metavar="NAME", help="who decided")
    a.add_argument("--comment", default="", metavar="TEXT")
    common(a)
    a.set_defaults(func=cmd_approve, approved=None, starts_server=True)

    wt = sub.add_parser("waits", help="every open turn: running, sleeping, waiting or parked")
    wt.add_argument("--json", action="store_true")
    wt.add_argument(
        "--limit", type=cli_text.positive, default=1000, help="at most this many turns (default 1000)"
    )
    common(wt)
    wt.set_defaults(func=cmd_waits)

    i = sub.add_parser("inspect", help="an actor's state, open turn, deferred messages and dead letters")
    i.add_argument("ref", help="Type/key")
    i.add_argument("--app", default=os.environ.get("ACTORS_APP"), help="to show the state as its model")
    i.add_argument("--json", action="store_true")
    common(i)
    i.set_defaults(func=cmd_inspect)

    c = sub.add_parser(
        "cancel",
        help="end an actor's open turn (does nothing if it has none when the cancel arrives)",
        description="End the actor's open turn (running, sleeping, waiting or parked): its message is "
        "dead-lettered with reason 'cancelled' and its changes are never committed; the messages "
        "deferred behind it run next. Does nothing if the actor has no open turn when the cancel "
        "arrives. Prints the cancel message's id.",
    )
    c.add_argument("ref", help="Type/key")
    common(c)
    c.set_defaults(func=cmd_cancel, starts_server=True)


def cmd_approve(args: argparse.Namespace) -> int:
    # Checked before connecting, so a bad reference or request id writes nothing.
    ref = ActorRef.parse(args.ref)
    Approval(request_id=args.request_id, approved=args.approved, by=args.by, comment=args.comment)

    async def run(client: Client) -> None:
        turn = await _open_turn(client, ref)
        if turn is None or turn.waiting_for != Approval.__name__:
            now = "it has no open turn" if turn is None else f"its open turn is {_turn_state(turn)}"
            _warn(client, ref, f"no turn of it waits for an Approval ({now}); the approval is "
                  "dead-lettered unless one waits for it when it arrives")  # fmt: skip
        sent = await client.approve(
            ref, args.request_id, approved=args.approved, by=args.by, comment=args.comment
        )
        print(sent)

    return with_client(args, run, writes=True)


def cmd_cancel(args: argparse.Namespace) -> int:
    ref = ActorRef.parse(args.ref)

    async def run(client: Client) -> None:
        if await _open_turn(client, ref) is None:
            _warn(
                client,
                ref,
                "it has no open turn now; the cancel does nothing unless one opens before it arrives",
            )
        print(await client.cancel(ref))

    return with_client(args, run, writes=True)


def cmd_waits(args: argparse.Namespace) -> int:
    async def run(client: Client) -> None:
        views = await client.waits(limit=args.limit)
        if len(views) >= args.limit:
            print(f"showing the first {len(views)} open turns (--limit); there may be more", file=sys.stderr)
        if args.json:
            print(json.dumps([cli_text.turn_json(v) for v in views], indent=2))
            return
        if not views:
            print("no open turns")
            return
        rows = [
            [v.actor, v.status, v.waiting_for or "-", cli_text.when(v.since), cli_text.due(v),
             v.message_type or "-", cli_text.clip(v.parked, 60)]
            for v in views
        ]  # fmt: skip
        print(cli_text.table(["actor", "status", "waiting for", "since", "due", "message", "parked"], rows))

    return with_client(args, run)


def cmd_inspect(args: argparse.Namespace) -> int:
    ref = ActorRef.parse(args.ref)

    async def run(client: Client) -> None:
        view = await client.inspect(ref)
        if _unknown(view):
            _warn(client, ref, "nothing is known of it: no state, open turn, deferred message or dead letter")
        if args.json:
            print(json.dumps(_inspect_json(view), indent=2))
        else:
            _print_inspect(view)

    return with_client(args, run)


def _inspect_json(view: ActorView) -> dict[str, object]:
    state = view.state.model_dump(mode="json") if hasattr(view.state, "model_dump") else view.state
    turn_json = None if view.turn is None else cli_text.turn_json(view.turn)
    dead = [cli_text.dead_letter_json(d) for d in view.dead_letters]
    shown = {"actor": view.actor, "shard": view.shard, "state": state, "turn": turn_json}
    return {**shown, "deferred": view.deferred, "dead_letters": dead}


def _print_inspect(view: ActorView) -> None:
    state = view.state.model_dump(mode="json") if hasattr(view.state, "model_dump") else view.state
    print(f"actor     {view.actor}")
    print(f"shard     {view.shard}")
    if state is None:
        print("state     none committed yet")
    else:
        print("state     " + json.dumps(state, indent=2).replace("\n", "\n          "))
    turn = view.turn
    if turn is None:
        print("turn      none")
    else:
        print(f"turn      {turn.status}")
        print(f"  message      {turn.message_type or '-'} {turn.message_id}".rstrip())
        print(f"  waiting for  {turn.waiting_for or '-'}")
        print(f"  since        {cli_text.when(turn.since)}")
        print(f"  due          {cli_text.due(turn)}")
        if turn.parked:
            print("  parked       " + turn.parked.replace("\n", "\n               "))
        print(f"  journal      {cli_text.count(len(turn.journal), 'entry', 'entries')}")
        for n, entry in enumerate(turn.journal):
            print(f"    {n:>3}  {entry}")
    print(f"deferred  {cli_text.count(view.deferred, 'message', 'messages')}")
    cli_text.print_dead_letters(view.dead_letters)


async def _open_turn(client: Client, ref: ActorRef[Any]) -> TurnView | None:
    aid = actor_id(ref.type, ref.key)
    stored, _ = await client.store.open_turn(shard_of(aid, client.shards), aid)
    if stored is None:
        return None
    try:
        return TurnView.of(aid, OpenTurn.decode(stored.header, stored.journal))
    except DecodeError:  # a turn all the same (the worker holds it as parked)
        return TurnView(aid, "", "", "parked", None, None, None, "its open turn cannot be read", [])


def _unknown(view: ActorView) -> bool:
    return view.state is None and view.turn is None and view.deferred == 0 and not view.dead_letters


def _turn_state(turn: TurnView) -> str:
    return f"waiting for {turn.waiting_for}" if turn.status == "waiting" else turn.status


def _warn(client: Client, ref: ActorRef[Any], what: str) -> None:
    """A one-line warning about ``ref`` naming the namespace, the usual mistake."""
    namespace = client.store.keys.namespace
    print(f"warning: {ref} in namespace {namespace!r}: {what} (is the namespace right? --namespace, "
          "ACTORS_NAMESPACE)", file=sys.stderr)  # fmt: skip
