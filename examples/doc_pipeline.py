"""An indexing pipeline: a Pipeline actor per batch fans out one Document actor per document;
each calls a flaky fake LLM limited to 20 calls/s and a fake embedding service limited to 3 calls
at once, keeps the results in its state and reports back to its Pipeline.

Run it with ``python -m examples.doc_pipeline`` (the embedded server starts by itself). Workers
may join: ``actors worker examples.doc_pipeline:app --namespace doc-pipeline``; the limits hold
across all of them (the call statistics printed at the end count this process's calls only).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel

import actors

LLM_RATE, EMBED_SLOTS = 20, 3  # LLM calls per second, embeddings at once: across all workers
WORDS = "actor batch durable embedding index lease message queue redis shard token vector".split()


class Batch(BaseModel):
    tenant: str
    documents: dict[str, str]  # id -> text


class Index(BaseModel):
    batch: str
    doc_id: str
    text: str


class Done(BaseModel):
    doc_id: str


@dataclass
class Meter:
    """What the fake services saw in this process (times are time.monotonic())."""

    llm_starts: list[float] = field(default_factory=list)  # every attempt, failed ones too
    llm_failures: int = 0
    embedding_now: int = 0
    embedding_max: int = 0
    summaries: Counter[str] = field(default_factory=Counter)  # successful calls per document
    embeddings: Counter[str] = field(default_factory=Counter)


meter = Meter()


async def summarize(doc_id: str, text: str) -> str:
    """A fake LLM: 50 ms a call, and 15% of calls fail (a 503) to show the step's retries."""
    meter.llm_starts.append(time.monotonic())
    await asyncio.sleep(0.05)
    if random.random() < 0.15:
        meter.llm_failures += 1
        raise ConnectionError("LLM API: 503 overloaded")
    meter.summaries[doc_id] += 1
    return " ".join(text.split()[:6]) + " ..."


async def embed(doc_id: str, text: str) -> list[float]:
    """A fake embedding service: 150 ms a call, so 3 at once just keep pace with the LLM."""
    meter.embedding_now += 1
    meter.embedding_max = max(meter.embedding_max, meter.embedding_now)
    try:
        await asyncio.sleep(0.15)
    finally:
        meter.embedding_now -= 1
    meter.embeddings[doc_id] += 1
    return [round(text.split().count(word) / 80, 3) for word in WORDS[:4]]  # a tiny bag of words


class Document(actors.Actor):
    class State(BaseModel):
        summary: str = ""
        embedding: list[float] = []

    async def on_index(self, msg: Index) -> None:
        if not self.state.summary:  # else it was indexed already (a batch sent again): just report
            # Each attempt, retries included, first waits for a token of "llm" (shared by every
            # worker process). Journaled: once it succeeded, a re-run of the turn never calls it again.
            self.state.summary = await self.step(
                summarize, msg.doc_id, msg.text, limiter="llm", retries=6, backoff=0.05
            )
            # Holds one of the 3 "embed" slots while it runs; other documents wait for a free one.
            self.state.embedding = await self.step(embed, msg.doc_id, msg.text, limiter="embed")
        # Sent when the turn commits, by the script that saves the state: never one without the other.
        await self.send(Pipeline.ref(msg.batch), Done(doc_id=msg.doc_id))


class Pipeline(actors.Actor):
    class State(BaseModel):
        total: int = 0
        done: list[str] = []
        finished_at: datetime | None = None

    async def on_batch(self, msg: Batch) -> None:
        self.state.total = len(msg.documents)
        for doc_id, text in msg.documents.items():
            # A queue rather than a send: at most 10 documents are in flight (their turns hold
            # "docs" slots), tenants' partitions take turns so a big batch does not starve other
            # tenants, and a document already queued or running is not queued again.
            with contextlib.suppress(actors.DuplicateItem):
                index = Index(batch=self.key, doc_id=doc_id, text=text)
                await self.enqueue("docs", Document.ref(doc_id), index, partition=msg.tenant, dedup_id=doc_id)

    async def on_done(self, msg: Done) -> None:
        if msg.doc_id not in self.state.done:  # a document reporting twice counts once
            self.state.done.append(msg.doc_id)
        if len(self.state.done) == self.state.total and self.state.finished_at is None:
            self.state.finished_at = datetime.now(UTC)


limiters = [
    actors.Limiter("llm", rate=LLM_RATE, per=timedelta(seconds=1)),
    actors.Limiter("embed", concurrency=EMBED_SLOTS),
    actors.Limiter("docs", concurrency=10),
]
app = actors.App(Pipeline, Document, limiters=limiters)


def busiest_second(times: list[float]) -> int:
    """The most calls that started within any 1-second window. At 20 tokens/s that can be 21:
    tokens are 50 ms apart, but a call starts a little after its token, some later than others."""
    times = sorted(times)
    return max((bisect.bisect_left(times, t + 1.0) - i for i, t in enumerate(times)), default=0)


async def main(
    url: str | None = None, namespace: str = "doc-pipeline", *, documents: int = 40, tenant: str = "acme"
) -> dict[str, Any]:
    """Index a batch of fake documents, printing progress, then the limits as observed; returns
    the batch id, the Pipeline's and the Documents' states, and the Meter."""
    global meter
    meter = Meter()  # this run's calls only
    worker = actors.Worker(app, actors.RedisSettings.from_env(url, namespace))
    running = asyncio.create_task(worker.run())
    await worker.ready.wait()
    batch = f"batch-{uuid.uuid4().hex[:6]}"  # fresh: the embedded server keeps earlier runs' actors
    texts = {f"{batch}-{n:03d}": " ".join(random.choices(WORDS, k=80)) for n in range(documents)}
    try:
        async with actors.connect(url, namespace=namespace, app=app) as client:
            started = next_report = time.monotonic()
            await client.send(
                Pipeline.ref(batch), Batch(tenant=tenant, documents=texts), idempotency_key=batch
            )
            print(f"submitted {batch}: {documents} documents of tenant {tenant}")
            while (state := await client.state(Pipeline.ref(batch))) is None or state.finished_at is None:
                if time.monotonic() >= next_report:
                    queued, _ = await client.store.queue_depths("docs")  # as `actors status` shows
                    done, elapsed = len(state.done) if state else 0, time.monotonic() - started
                    print(
                        f"  {elapsed:4.1f}s {done:>4}/{documents} indexed, {sum(queued.values())} queued,"
                        f" {len(meter.llm_starts)} LLM calls, {meter.embedding_now} embeddings running"
                    )
                    next_report += 1.0
                await asyncio.sleep(0.1)
            seconds = time.monotonic() - started
            states = {doc_id: await client.state(Document.ref(doc_id)) for doc_id in texts}
    finally:
        worker.stop()
        await running
    calls, span = len(meter.llm_starts), max(meter.llm_starts) - min(meter.llm_starts)
    rate = (calls - 1) / span if span else 0.0  # from the first call to the last
    print(f"indexed {len(state.done)}/{state.total} in {seconds:.1f}s, at {state.finished_at:%H:%M:%S} UTC")
    busiest = busiest_second(meter.llm_starts)
    print(
        f"LLM: {calls} calls ({meter.llm_failures} failed and were retried), {rate:.1f}/s on average,"
        f" at most {busiest} in one second (limit {LLM_RATE}/s)"
    )
    print(f"embeddings: at most {meter.embedding_max} at once (limit {EMBED_SLOTS})")
    first = next(iter(texts))
    print(f"{first}: {states[first]!r}")
    return {"batch": batch, "pipeline": state, "documents": states, "meter": meter}


if __name__ == "__main__":
    asyncio.run(main())
