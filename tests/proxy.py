"""A loopback TCP proxy in front of the real test server that can lose a reply: it
forwards everything, except that once armed it closes a connection instead of passing
on a reply that contains a given marker. Redis has applied the command by then, so the
client sees exactly what a network failure after a script ran looks like."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class ReplyDropper:
    def __init__(self, target_port: int, password: str = "") -> None:
        self.target_port = target_port
        self.password = password
        """The upstream's (the proxy passes AUTH through; its URL carries it)."""
        self.port = 0
        self.marker: bytes | None = None
        """Drop (once) the first reply chunk that contains this."""
        self.dropped = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return (
            f"redis://:{self.password}@127.0.0.1:{self.port}"
            if self.password
            else f"redis://127.0.0.1:{self.port}"
        )

    async def start(self) -> ReplyDropper:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer, replies=False)),
            asyncio.create_task(self._pump(up_reader, writer, replies=True)),
        ]
        self._tasks.update(pumps)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pumps:
            task.cancel()
        for w in (writer, up_writer):
            w.close()
        self._tasks.difference_update(pumps)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, replies: bool) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if replies and self.marker is not None and self.marker in data:
                    self.marker = None
                    self.dropped.set()
                    return  # the connection closes with the reply unsent
                writer.write(data)
                await writer.drain()


@contextlib.asynccontextmanager
async def reply_dropper(target_port: int, password: str = "") -> AsyncIterator[ReplyDropper]:
    proxy = await ReplyDropper(target_port, password).start()
    try:
        yield proxy
    finally:
        await proxy.stop()
