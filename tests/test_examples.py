"""The examples, run against the test server with short durations."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import actors
from examples import doc_pipeline, refund_approval
from examples.refund_approval import Mailer, Refund, RefundRequest
from tests.conftest import eventually
from tests.test_limits import rate_excess


@pytest.fixture(autouse=True)
def ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake payment provider writes here (steps run in this process's worker)."""
    path = tmp_path / "ledger.txt"
    monkeypatch.setattr(refund_approval, "LEDGER", path)
    return path


def ledger_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_the_refund_demo_pays_each_refund_once_and_sends_each_survey(
    redis_url: str,
    namespace: str,
    connect: Callable[..., Any],
    ledger: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    states = await refund_approval.main(redis_url, namespace, survey_delay=0.5, approve_after=0.1)
    [small_id] = [order for order in states if order.endswith("-small")]
    [large_id] = [order for order in states if order.endswith("-large")]
    small, large = states[small_id], states[large_id]
    assert small.status == large.status == "refunded"
    assert large.risk >= refund_approval.HIGH_RISK and large.decided_by == "demo-reviewer"
    # Low risk is approved automatically, unless the flaky scorer failed all 6 attempts
    # (p ~ 0.0007), in which case the refund went to the reviewer too.
    assert small.decided_by == "auto" or (small.risk == 1.0 and small.decided_by == "demo-reviewer")

    # Exactly one payment per refund, although each handler ran again after its sleep
    # (and the risky one after its wait too): the journal returned the payment id.
    lines = sorted(line.split()[:3] for line in ledger_lines(ledger))
    assert lines == [
        [large_id, "900.00", large.payment_id],
        [small_id, "40.00", small.payment_id],
    ]
    async with connect(app=refund_approval.app) as client:
        assert (await client.state(Mailer.ref("ann@example.com"))).surveys == [small_id]
        assert (await client.state(Mailer.ref("bob@example.com"))).surveys == [large_id]
        assert await client.waits() == []

    out = capsys.readouterr().out
    command = f"actors approve Refund/{large_id} --request-id {large_id} --approve"
    assert command in out and f"--redis {redis_url} --namespace {namespace}" in out
    assert f"{large_id}: waiting for Approval" in out
    assert f"{small_id}: refund paid; sleeping durably" in out


async def test_a_risky_refund_waits_for_a_person_and_a_rejection_pays_nothing(
    connect: Callable[..., Any], start_worker: Callable[..., Any], ledger: Path
) -> None:
    await start_worker(refund_approval.app)
    async with connect(app=refund_approval.app) as client:
        for order_id, email in [("yes", "ann@example.com"), ("no", "bob@example.com")]:
            request = RefundRequest(order_id=order_id, amount=900, email=email, survey_delay=0.2)
            await client.send(Refund.ref(order_id), request)

        views = await eventually(lambda: _waiting_for_approval(client, 2))
        assert sorted(view.actor for view in views) == ["Refund/no", "Refund/yes"]
        for view in views:  # the default timeout: two days
            assert view.due is not None
            assert abs(view.due - (datetime.now(UTC) + timedelta(days=2))) < timedelta(minutes=1)
        assert ledger_lines(ledger) == [], "nothing is paid before a person decides"

        await client.approve(Refund.ref("yes"), "yes", by="alice", comment="fine")
        await client.approve(Refund.ref("no"), "no", approved=False, by="bob", comment="fraud")
        yes = await eventually(lambda: _status(client, "yes", "refunded"))
        no = await eventually(lambda: _status(client, "no", "rejected"))
        assert yes.decided_by == "alice" and no.decided_by == "bob" and no.payment_id == ""
        await eventually(lambda: _surveys(client, "ann@example.com", ["yes"]))
        assert [line.split()[0] for line in ledger_lines(ledger)] == ["yes"]
        assert (await client.state(Mailer.ref("bob@example.com"))) is None, "no survey after a rejection"
        assert await client.waits() == []


async def _waiting_for_approval(client: actors.Client, n: int):  # type: ignore[no-untyped-def]
    views = [v for v in await client.waits() if v.status == "waiting" and v.waiting_for == "Approval"]
    return views if len(views) == n else None


async def _status(client: actors.Client, order_id: str, status: str):  # type: ignore[no-untyped-def]
    state = await client.state(Refund.ref(order_id))
    return state if state is not None and state.status == status else None


async def _surveys(client: actors.Client, email: str, expected: list[str]) -> bool:
    state = await client.state(Mailer.ref(email))
    return state is not None and state.surveys == expected


async def test_the_pipeline_indexes_each_document_once_within_its_limits(
    redis_url: str, namespace: str, connect: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    # ~2 s when all is well: the timeout turns a stalled pipeline into a failure, not a hang
    report = await asyncio.wait_for(doc_pipeline.main(redis_url, namespace, documents=30), timeout=30)
    pipeline, documents, meter = report["pipeline"], report["documents"], report["meter"]
    assert len(documents) == pipeline.total == 30 and sorted(pipeline.done) == sorted(documents)
    assert pipeline.finished_at is not None
    for doc_id, state in documents.items():
        assert state is not None and state.summary and len(state.embedding) == 4, doc_id
    # One successful LLM call and one embedding per document: failed attempts were retried,
    # and no journaled step ran again.
    assert meter.summaries == meter.embeddings == Counter(dict.fromkeys(documents, 1))
    assert len(meter.llm_starts) == 30 + meter.llm_failures
    # 20 tokens/s, burst 1, in every window of local start times (with room for a call that
    # started late, see rate_excess); the embedding slots are taken to the cap.
    excess = rate_excess(meter.llm_starts, rate=doc_pipeline.LLM_RATE, per=1.0, burst=1)
    assert excess is None, excess
    assert meter.embedding_max == doc_pipeline.EMBED_SLOTS
    async with connect(app=doc_pipeline.app) as client:
        assert await client.store.queue_depths("docs") == ({}, 0), "the queue is empty"
        assert await client.waits() == []
    assert "indexed 30/30" in capsys.readouterr().out


@pytest.mark.chaos
async def test_the_refund_is_paid_once_though_its_step_runs_again_after_a_crash(
    spawn_worker: Callable[..., Any], connect: Callable[..., Any], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The worker is SIGKILLed after the provider paid and before the step's result was
    journaled: the next worker runs the step again (at least once), with the same
    idempotency key, and the provider pays nothing more."""
    import signal

    from .conftest import eventually

    path = tmp_path / "ledger.txt"
    monkeypatch.setenv("REFUND_LEDGER", str(path))
    monkeypatch.setenv("REFUND_PROVIDER_DELAY", "30")  # the reply never comes back in time
    monkeypatch.setenv("REFUND_RISK_FAILURES", "0")  # low risk, decided at once
    worker = spawn_worker("examples.refund_approval:app")
    async with connect(app=refund_approval.app) as client:
        ref = refund_approval.Refund.ref("crash-1")
        request = refund_approval.RefundRequest(
            order_id="crash-1", amount=10.0, email="c@x.org", survey_delay=0.1
        )
        await client.send(ref, request)
        await eventually(lambda: ledger_lines(path), timeout=30)  # paid, the reply still on its way
        worker.signal(signal.SIGKILL)
        worker.proc.wait()  # type: ignore[union-attr]
        monkeypatch.setenv("REFUND_PROVIDER_DELAY", "0")
        spawn_worker("examples.refund_approval:app")
        state = await eventually(lambda: _refunded(client, ref), timeout=60)
    [line] = ledger_lines(path)
    assert line.split()[2] == state.payment_id, "one payment, and the step's result is its id"
    requests = [r.split() for r in path.with_suffix(".requests").read_text().splitlines()]
    assert len(requests) == 2 and requests[0][1] == requests[1][1], "called twice, with one key"
    assert int(requests[1][2]) > int(requests[0][2]), "the second owner's epoch is higher"


async def _refunded(client: Any, ref: Any) -> Any:
    state = await client.state(ref)
    return state if state is not None and state.status == "refunded" else None
