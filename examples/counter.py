"""The counter demo: 100 counter actors, 2,000 increments, an ask and a state read.

Run it with ``python -m examples.counter`` (the embedded server starts by itself),
or run a worker with ``actors worker examples.counter:app`` and send from elsewhere.
"""

from __future__ import annotations

import asyncio
import time

from pydantic import BaseModel

import actors


class Add(BaseModel):
    by: int = 1


class Get(BaseModel):
    pass


class Total(BaseModel):
    total: int


class Counter(actors.Actor):
    class State(BaseModel):
        total: int = 0

    async def on_add(self, msg: Add) -> None:
        self.state.total += msg.by

    async def on_get(self, msg: Get) -> Total:
        return Total(total=self.state.total)


app = actors.App(Counter)


async def main() -> None:
    worker = actors.Worker(app)
    running = asyncio.create_task(worker.run())
    await worker.ready.wait()
    async with actors.connect(app=app) as client:
        before = await client.ask(Counter.ref("c-0"), Get())
        started = time.perf_counter()
        await client.send_many((Counter.ref(f"c-{i % 100}"), Add(by=1)) for i in range(2_000))
        # ask is queued behind the adds sent before it, so it sees all of them
        totals = [await client.ask(Counter.ref(f"c-{i}"), Get()) for i in range(100)]
        elapsed = time.perf_counter() - started
        print(f"c-0 went from {before.total} to {totals[0].total}")
        print(f"2,000 increments over 100 actors handled in {elapsed * 1000:.0f} ms")
        print(f"state of c-7 from Redis: {await client.state(Counter.ref('c-7'))}")
    worker.stop()
    await running


if __name__ == "__main__":
    asyncio.run(main())
