"""Business rejections (``raise actors.Reject``): not retried, the state and buffered sends of
the attempt dropped, the message consumed with no dead letter, the asker told with
``actors.Rejected`` (a journaled ask from a turn too, on every replay); counted as ``rejected``."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

import actors
from actors import telemetry

from .conftest import eventually


class Withdraw(BaseModel):
    amount: int


class Freeze(BaseModel):
    pass


class GetBalance(BaseModel):
    pass


class Balance(BaseModel):
    balance: int


class Note(BaseModel):
    text: str


class Transfer(BaseModel):
    account: str
    amount: int


class Outcome(BaseModel):
    text: str


class Ledger(actors.Actor):
    class State(BaseModel):
        notes: list[str] = []

    async def on_note(self, msg: Note) -> None:
        self.state.notes.append(msg.text)


class Account(actors.Actor):
    """Refuses a withdrawal past its balance, after changing its state and buffering a send
    (both must be dropped)."""

    class State(BaseModel):
        balance: int = 100

    calls = 0
    step_calls = 0

    async def on_withdraw(self, msg: Withdraw) -> Balance:
        type(self).calls += 1
        before = self.state.balance
        self.state.balance -= msg.amount
        await self.send(Ledger.ref(self.key), Note(text=f"withdrew {msg.amount}"))
        if self.state.balance < 0:
            raise actors.Reject("insufficient funds", {"balance": before, "asked": msg.amount})
        return Balance(balance=self.state.balance)

    async def on_freeze(self, msg: Freeze) -> None:
        self.state.balance = 0
        await self.step(self._check_fraud)  # user code: its Reject is the turn's rejection

    def _check_fraud(self) -> None:
        type(self).step_calls += 1
        raise actors.Reject("account under review")

    async def on_get_balance(self, msg: GetBalance) -> Balance:
        return Balance(balance=self.state.balance)


class Teller(actors.Actor):
    """Asks an Account from its turn; catches one rejection, and sleeps after the ask so that
    the turn resumes and replays the journaled (rejected) ask. An uncaught Rejected rejects
    the teller's own turn with the same reason."""

    class State(BaseModel):
        seen: list[str] = []

    async def on_transfer(self, msg: Transfer) -> Outcome:
        if msg.amount < 0:  # left alone: the account's rejection becomes this turn's
            await self.ask(Account.ref(msg.account), Withdraw(amount=-msg.amount))
            return Outcome(text="unreachable")
        try:
            await self.ask(Account.ref(msg.account), Withdraw(amount=msg.amount))
        except actors.Rejected as exc:
            self.state.seen.append(exc.reason)
            await self.sleep(0.05)  # the resumed turn replays the ask: Rejected again
            return Outcome(text=f"refused: {exc.reason} {exc.detail}")
        return Outcome(text="paid")


app = actors.App(Account, Ledger, Teller)


@pytest.fixture(autouse=True)
def _fresh_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Account, "calls", 0)
    monkeypatch.setattr(Account, "step_calls", 0)


async def _dead_letters(client: Any) -> int:
    return sum([len(await client.store.dead_letters(s, 100)) for s in range(client.shards)])


async def _pending(client: Any) -> int:
    return sum([(await client.store.shard_info(s)).pending for s in range(client.shards)])


async def test_an_ask_that_is_rejected_raises_rejected_and_changes_nothing(start_worker, connect) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        with pytest.raises(actors.Rejected) as caught:
            await client.ask(Account.ref("a"), Withdraw(amount=150), timeout=10)
        assert caught.value.reason == "insufficient funds"
        assert caught.value.detail == {"balance": 100, "asked": 150}
        assert Account.calls == 1, "a rejection is not retried"
        # The next message is handled, on the unchanged state.
        assert await client.ask(Account.ref("a"), Withdraw(amount=30), timeout=10) == Balance(balance=70)
        assert await client.state(Account.ref("a")) == Account.State(balance=70)
        # The rejected turn's buffered send was dropped: the ledger got only the second one.
        await eventually(lambda: client.state(Ledger.ref("a")), timeout=10)
        assert await client.state(Ledger.ref("a")) == Ledger.State(notes=["withdrew 30"])
        assert await _dead_letters(client) == 0
        assert await _pending(client) == 0


async def test_a_rejected_send_is_consumed_once_without_a_dead_letter(start_worker, connect) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        await client.send(Account.ref("s"), Withdraw(amount=500))
        await client.send(Account.ref("s"), Withdraw(amount=10))

        async def second_handled() -> bool:
            return await client.state(Account.ref("s")) == Account.State(balance=90)

        await eventually(second_handled, timeout=10)
        assert Account.calls == 2, "the rejected message ran once, the next one once"
        assert await _dead_letters(client) == 0
        assert await _pending(client) == 0


async def test_a_reject_in_a_step_function_rejects_the_turn_and_is_not_retried(start_worker, connect) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        with pytest.raises(actors.Rejected, match="account under review"):
            await client.ask(Account.ref("f"), Freeze(), timeout=10)
        assert Account.step_calls == 1, "neither the step nor the turn is retried"
        assert await client.state(Account.ref("f")) is None, "the turn's state change was dropped"
        assert await client.ask(Account.ref("f"), GetBalance(), timeout=10) == Balance(balance=100)
        assert await _dead_letters(client) == 0


async def test_a_turn_that_asks_gets_rejected_on_the_first_run_and_on_replay(start_worker, connect) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        reply = await client.ask(Teller.ref("t"), Transfer(account="b", amount=150), timeout=10)
        assert reply == Outcome(text="refused: insufficient funds {'balance': 100, 'asked': 150}")
        assert Account.calls == 1, "the resumed turn replayed the rejection without asking again"
        assert await client.state(Teller.ref("t")) == Teller.State(seen=["insufficient funds"])
        # Uncaught, the account's rejection is the teller's own: passed on to its asker.
        with pytest.raises(actors.Rejected) as caught:
            await client.ask(Teller.ref("t"), Transfer(account="b", amount=-200), timeout=10)
        assert caught.value.reason == "insufficient funds"
        assert caught.value.detail == {"balance": 100, "asked": 200}
        assert Account.calls == 2
        assert await _dead_letters(client) == 0


async def test_rejections_are_counted_and_traced_as_rejected(start_worker, connect) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    reader = InMemoryMetricReader()
    exporter = InMemorySpanExporter()
    tracer = TracerProvider()
    tracer.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.use(tracer, MeterProvider(metric_readers=[reader]))
    try:
        await start_worker(app)
        async with connect(app=app) as client:
            with pytest.raises(actors.Rejected):
                await client.ask(Account.ref("m"), Withdraw(amount=150), timeout=10)
            await client.ask(Account.ref("m"), Withdraw(amount=1), timeout=10)
            data = reader.get_metrics_data()
    finally:
        telemetry.use(None)
    found = {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    turns = {
        p.attributes["outcome"]: p.value
        for p in found["actors.turns"].data.data_points
        if p.attributes["actor.type"] == "Account"
    }
    assert turns == {"rejected": 1, "done": 1}
    spans = exporter.get_finished_spans()
    outcomes = [s.attributes["turn.outcome"] for s in spans if s.name.startswith("turn Account.")]
    assert sorted(outcomes) == ["done", "rejected"]
