"""A limiter's definition: a rate, a concurrency cap, a per-process cap (see ``limits``)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import DefinitionError


class Limiter(BaseModel):
    """A named limit: a rate (``rate`` per ``per``, ``burst`` at once), a global
    concurrency cap, a per-process cap, or any of them together."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    rate: float | None = Field(default=None, gt=0)
    per: timedelta = timedelta(seconds=1)
    burst: int = Field(default=1, ge=1)
    concurrency: int | None = Field(default=None, ge=1)
    per_worker: int | None = Field(default=None, ge=1)

    def __init__(self, name: str | None = None, /, **kwargs: object) -> None:
        if name is not None:
            kwargs["name"] = name
        super().__init__(**kwargs)

    @model_validator(mode="after")
    def _limits_something(self) -> Limiter:
        if self.rate is None and self.concurrency is None and self.per_worker is None:
            raise ValueError(f"limiter {self.name!r} needs rate, concurrency or per_worker")
        if self.per.total_seconds() <= 0:
            raise ValueError(f"limiter {self.name!r}: per must be positive")
        return self

    @property
    def interval_ms(self) -> float:
        """Time between two tokens at the steady rate (0: no rate)."""
        return 0.0 if self.rate is None else self.per.total_seconds() * 1000 / self.rate

    @property
    def tolerance_ms(self) -> float:
        return self.interval_ms * (self.burst - 1)

    @property
    def global_(self) -> bool:
        return self.rate is not None or self.concurrency is not None


def check_limiters(limiters: Iterable[Limiter]) -> dict[str, Limiter]:
    found: dict[str, Limiter] = {}
    for limiter in limiters:
        if not isinstance(limiter, Limiter):
            raise DefinitionError(f"limiters must be actors.Limiter instances, not {limiter!r}")
        if limiter.name in found:
            raise DefinitionError(f"two limiters are named {limiter.name!r}")
        found[limiter.name] = limiter
    return found
