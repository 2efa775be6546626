"""Message types the runtime itself knows: the human-in-the-loop ``Approval``.

Every actor accepts ``Approval`` for ``wait_for`` without declaring it, and
``actors approve`` sends one from the command line.
"""

from __future__ import annotations

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
