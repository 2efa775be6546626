"""Actors the tracing tests follow: a message that goes through an ask, a sleep and a wait."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel

import actors


class Start(BaseModel):
    request_id: str
    pause: float = 0.0


class Note(BaseModel):
    text: str


class Traced(actors.Actor):
    class State(BaseModel):
        answer: str = ""
        approved: bool = False

    async def on_start(self, msg: Start) -> None:
        answer = await self.ask(Helper.ref(self.key), Note(text="hi"))
        await self.step(asyncio.sleep, msg.pause, name="slow")
        await self.sleep(0.2)
        approval = await self.wait_for(actors.Approval, where=lambda a: a.request_id == msg.request_id)
        self.state.answer = answer.text
        self.state.approved = approval is not None and approval.approved


class Helper(actors.Actor):
    async def on_note(self, msg: Note) -> Note:
        return Note(text=f"{msg.text} back")


app = actors.App(Traced, Helper)
