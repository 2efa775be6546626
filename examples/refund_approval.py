"""A refund agent: flaky risk scoring, a human approval for risky refunds, a payment made
exactly once (the step runs at least once; the payment provider deduplicates by the step's
idempotency key and refuses a fenced owner's epoch), a durable sleep, then a survey sent
to a Mailer actor.

Run it with ``python -m examples.refund_approval`` (the embedded server starts by itself);
with ``--wait-for-human`` it leaves the approval to you (``actors approve`` in another
terminal). Workers may join from elsewhere:
``actors worker examples.refund_approval:app --namespace refund-demo``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
import uuid
from pathlib import Path

from pydantic import BaseModel

import actors

LEDGER = Path(os.environ.get("REFUND_LEDGER", ".actors/refund-ledger.txt"))
"""The fake payment provider's ledger: one line per refund paid."""
HIGH_RISK = 0.5
# Its own namespace: a worker dead-letters messages for actor types its app does not define,
# so it must not share one with another app's pending messages (the counter demo's, say).
NAMESPACE = "refund-demo"


class RefundRequest(BaseModel):
    order_id: str
    amount: float
    email: str
    approval_timeout: float = 2 * 24 * 3600.0  # seconds a person has to decide
    survey_delay: float = 24 * 3600.0  # seconds between the refund and the survey


class Survey(BaseModel):
    order_id: str


def score_risk(order_id: str, amount: float) -> float:
    """A fake risk service that fails ~30% of the time (a sync function: runs in a thread)."""
    time.sleep(0.05)
    if random.random() < float(os.environ.get("REFUND_RISK_FAILURES", "0.3")):
        print(f"  [risk service] {order_id}: 503, the step will retry it")
        raise ConnectionError("risk service unavailable")
    return min(1.0, amount / 1000)


def issue_refund(order_id: str, amount: float) -> str:
    """A fake payments call, made as real providers allow: with an idempotency key (the step's,
    the same for every run of this step of this turn, on any worker) and a fencing token (the
    lease epoch). The step runs at least once (a crash after the call and before its journal
    write runs it again); the provider pays once per key, and refuses an epoch lower than the
    highest it saw for the key (a former owner that has not noticed it lost its shard)."""
    step = actors.step_info()
    return _provider_pay(step.idempotency_key, step.epoch, order_id, amount)


def _provider_pay(key: str, epoch: int, order_id: str, amount: float) -> str:
    """The provider's side: its ledger has one line per payment, with the key and epoch, and
    its request log one line per call."""
    LEDGER.parent.mkdir(parents=True, exist_ok=True)
    with open(LEDGER.with_suffix(".requests"), "a") as requests:
        requests.write(f"{order_id} {key} {epoch}\n")
    paid = [line.split() for line in LEDGER.read_text().splitlines()] if LEDGER.exists() else []
    for _, _, payment_id, seen_key, seen_epoch in paid:
        if seen_key == key:
            if epoch < int(seen_epoch):
                raise PermissionError(f"stale epoch {epoch} for {key} (saw {seen_epoch})")
            return payment_id  # the same request again: the first payment's id
    payment_id = f"pay-{uuid.uuid4().hex[:8]}"
    with open(LEDGER, "a") as ledger:
        ledger.write(f"{order_id} {amount:.2f} {payment_id} {key} {epoch}\n")
        ledger.flush()
        os.fsync(ledger.fileno())
    time.sleep(float(os.environ.get("REFUND_PROVIDER_DELAY", "0")))  # a slow reply (tests crash here)
    return payment_id


class Refund(actors.Actor):
    class State(BaseModel):
        status: str = "new"
        risk: float = 0.0
        decided_by: str = ""
        payment_id: str = ""

    async def on_request(self, msg: RefundRequest) -> None:
        # After the wait and the sleep, this handler runs again from the top and each
        # step returns its journaled result: code outside steps must be cheap and have
        # no side effects, and every side effect (scoring, paying) lives in a step.
        try:
            self.state.risk = await self.step(score_risk, msg.order_id, msg.amount, retries=5, backoff=0.1)
        except actors.StepFailed:
            self.state.risk = 1.0  # the risk service stayed down: let a person decide
        if self.state.risk < HIGH_RISK:
            self.state.decided_by = "auto"
        else:
            # Suspended in Redis, not in memory: the wait may last days and survive restarts.
            approval = await self.wait_for(
                actors.Approval, timeout=msg.approval_timeout, where=lambda a: a.request_id == msg.order_id
            )
            self.state.decided_by = approval.by if approval else "nobody (timed out)"
            if approval is None or not approval.approved:
                self.state.status = "rejected"
                return
        # Retried safely: the provider deduplicates by the step's idempotency key.
        self.state.payment_id = await self.step(issue_refund, msg.order_id, msg.amount, retries=3)
        self.state.status = "refunded"  # committed when the turn ends, after the survey is sent
        await self.sleep(msg.survey_delay)
        await self.send(Mailer.ref(msg.email), Survey(order_id=msg.order_id))


class Mailer(actors.Actor):
    class State(BaseModel):
        surveys: list[str] = []

    async def on_survey(self, msg: Survey) -> None:
        self.state.surveys.append(msg.order_id)


app = actors.App(Refund, Mailer)


def ledger_lines(order_id: str) -> list[str]:
    """The ledger's lines for one order: exactly one if it was refunded."""
    lines = LEDGER.read_text().splitlines() if LEDGER.exists() else []
    return [line for line in lines if line.split()[0] == order_id]


def describe(view: actors.client.ActorView) -> str:
    turn, state = view.turn, view.state
    if turn is None:
        return "queued" if state is None else f"{state.status} (risk {state.risk:.2f}, by {state.decided_by})"
    if turn.status == "waiting":
        return f"waiting for {turn.waiting_for} (times out at {turn.due:%H:%M:%S} UTC)"
    if turn.status == "sleeping":
        return f"refund paid; sleeping durably until {turn.due:%H:%M:%S} UTC, then the survey"
    return turn.status


async def main(
    url: str | None = None, namespace: str = NAMESPACE, *, survey_delay: float = 3.0,
    approve_after: float = 1.0, wait_for_human: bool = False,
) -> dict[str, Refund.State]:  # fmt: skip
    """Submit a low-risk and a high-risk refund, follow both to the end, return their states."""
    worker = actors.Worker(app, actors.RedisSettings.from_env(url, namespace))
    running = asyncio.create_task(worker.run())
    await worker.ready.wait()
    run = uuid.uuid4().hex[:6]  # fresh order ids: the embedded server keeps earlier runs' actors
    orders = [
        RefundRequest(order_id=f"{run}-{size}", amount=amount, email=email,
                      survey_delay=survey_delay, approval_timeout=600.0)  # short, for a demo
        for size, amount, email in [("small", 40, "ann@example.com"), ("large", 900, "bob@example.com")]
    ]  # fmt: skip
    where = (f" --redis {url}" if url else "") + f" --namespace {namespace}"

    async def approve(ref: actors.ActorRef[Refund], request_id: str) -> None:
        command = f"actors approve {ref} --request-id {request_id} --approve --by you --comment ok{where}"
        if wait_for_human:
            print(f"  approve it from another terminal in this folder (or --reject it):\n    {command}")
            inspect = f"actors inspect {ref}{where} --app examples.refund_approval:app"
            print(f"  see its wait, journal and state:\n    {inspect}")
            print("  (`actors` is in .venv/bin: `./dev shell` opens a shell that has it on PATH)")
            return
        print(f"  approving it in {approve_after:g}s, as this command would:\n    {command}")
        await asyncio.sleep(approve_after)
        await client.approve(ref, request_id, by="demo-reviewer", comment="amount checked")

    async def follow(order: RefundRequest) -> Refund.State:
        ref, last = Refund.ref(order.order_id), ""
        while True:
            view = await client.inspect(ref)
            if (now := describe(view)) != last:
                print(f"{order.order_id}: {now}")
                last = now
                if view.turn is not None and view.turn.status == "waiting":
                    await approve(ref, order.order_id)
            if view.turn is None and view.state is not None:  # the turn committed: it is over
                mailer = await client.state(Mailer.ref(order.email))
                if view.state.status == "rejected" or (mailer and order.order_id in mailer.surveys):
                    return view.state  # type: ignore[no-any-return]
            await asyncio.sleep(0.2)

    try:
        async with actors.connect(url, namespace=namespace, app=app) as client:
            for order in orders:
                # the idempotency key makes a retried submission (after a network error) harmless
                await client.send(Refund.ref(order.order_id), order, idempotency_key=order.order_id)
                print(f"submitted refund {order.order_id} for ${order.amount:.2f}")
            states = await asyncio.gather(*(follow(order) for order in orders))
    finally:
        worker.stop()
        await running
    print("\nfinal states, and the ledger's lines for them:")
    for order, state in zip(orders, states, strict=True):
        print(f"  {order.order_id}: {state!r}")
        for line in ledger_lines(order.order_id):
            print(f"    ledger: {line}")
    print(f"(ledger file: {LEDGER})")
    return {order.order_id: state for order, state in zip(orders, states, strict=True)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="The refund approval demo.")
    parser.add_argument("--wait-for-human", action="store_true", help="wait for `actors approve`")
    parser.add_argument("--survey-delay", type=float, default=3.0, help="seconds of durable sleep")
    args = parser.parse_args()
    asyncio.run(main(survey_delay=args.survey_delay, wait_for_human=args.wait_for_human))
