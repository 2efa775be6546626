"""Message types the runtime itself knows: the human-in-the-loop ``Approval``, a schedule's
``Tick``, and the control message types.

Every actor accepts ``Approval`` for ``wait_for`` without declaring it, and
``actors approve`` sends one from the command line.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class Approval(BaseModel):
    """A person's decision on a request an actor waits for.

    ``msg = await self.wait_for(Approval, where=lambda m: m.request_id == rid)``
    """

    request_id: str = Field(min_length=1)
    approved: bool
    by: str = ""
    comment: str = ""


CANCEL = "actors.Cancel"
"""The type of the control message that ends an actor's open turn (``actors cancel``)."""


class Tick(BaseModel):
    """What a scheduled method receives: which schedule, and the slot it runs for."""

    schedule: str
    slot: datetime


TICK = "actors.Tick"
"""The envelope type of a schedule's tick (routed to the scheduled method, not by type)."""
