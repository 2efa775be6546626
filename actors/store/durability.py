"""A namespace's durability level: recorded once in its ``meta`` hash, checked against the
server, then waited for after every write that tells someone it happened (``acks``)."""

from __future__ import annotations

import logging

from redis.exceptions import ResponseError

from ..errors import ConfigurationError
from .acks import EVERYSEC, FSYNC, Acknowledgment
from .cluster import each_primary
from .connection import StoreBase, honours_cancel

log = logging.getLogger("actors.store")

LEVEL_FIELD = "durability"
"""The ``meta`` field that records the level (a namespace without it is ``everysec``)."""


@honours_cancel
class DurabilityStore(StoreBase):
    async def durability(self, wanted: str | None, default: str | None, timeout: float) -> str:
        """The namespace's durability level, recording ``wanted`` (or ``default``) if none is
        yet; from now on this store's acknowledged writes wait for it (``timeout`` seconds at
        most). Raises ConfigurationError if ``wanted`` differs from the record, or if the
        server cannot give the level (``fsync``: no WAITAOF, no AOF, or an fsync policy other
        than ``always``)."""
        meta = self.keys.meta()
        proposal = wanted or default
        if proposal == FSYNC:  # before it is recorded: a server that cannot give it records nothing
            await self._check_fsync()
        if proposal is not None:
            await self.redis.hsetnx(meta, LEVEL_FIELD, proposal)
        raw = await self.redis.hget(meta, LEVEL_FIELD)
        recorded = raw.decode() if isinstance(raw, bytes) else EVERYSEC
        if wanted is not None and recorded != wanted:
            raise ConfigurationError(
                f"Redis records durability {recorded!r} for namespace {self.keys.namespace!r}, but this "
                f"process is configured with {wanted!r}; use --durability {recorded} (the durability "
                "of a namespace cannot change)"
            )
        if recorded == FSYNC and proposal != FSYNC:
            await self._check_fsync()
        self.ack = Acknowledgment(recorded, max(1, int(timeout * 1000)))
        return recorded

    async def _check_fsync(self) -> None:
        """Refuse ``fsync`` on a server that cannot honour it: one without WAITAOF (before Redis
        7.2), without AOF, or with an fsync policy other than ``always``. With ``everysec``,
        Valkey 8.1 (and Redis 7.2.4 to 7.4.2, redis/redis#13793) answers WAITAOF once the write
        reached the operating system, at the next pass of its event loop, without an fsync:
        measured here at one server cron period (100 ms at ``hz 10``, 10 ms at ``hz 100``), when
        its AOF is fsynced once a second. Where CONFIG is refused (a managed service) the
        policy cannot be read: the level is then trusted to WAITAOF, with a warning."""
        try:
            await each_primary(self.redis, "WAITAOF", "1", "0", "1")
        except ResponseError as exc:
            version = await self._server_version()
            if "unknown command" in str(exc).lower():
                raise ConfigurationError(
                    f"durability 'fsync' needs WAITAOF (Redis or Valkey 7.2 or newer); this is {version}"
                ) from None
            raise ConfigurationError(
                f"durability 'fsync' needs the server's AOF; WAITAOF says: {exc}"
            ) from None
        try:
            policies = await each_primary(self.redis, "CONFIG GET", "appendfsync")
        except ResponseError as exc:
            log.warning("cannot read the server's appendfsync (%s); durability 'fsync' trusts WAITAOF", exc)
            return
        for policy in policies:  # one per primary of a cluster
            self._check_policy(next((_text(v) for k, v in policy.items() if _text(k) == "appendfsync"), ""))

    @staticmethod
    def _check_policy(fsync: str) -> None:
        if fsync != "always":
            raise ConfigurationError(
                f"durability 'fsync' needs the server's `appendfsync always` (it is {fsync!r}): with "
                "everysec this server may answer WAITAOF before its AOF is on disk (redis/redis#13793). "
                "Set `appendfsync always` in the server's configuration (CONFIG SET appendfsync always "
                "and CONFIG REWRITE, or its config file)"
            )

    async def _server_version(self) -> str:
        info = await self.redis.info("server")
        if "valkey_version" in info:
            return f"Valkey {info['valkey_version']}"
        return f"Redis {info.get('redis_version', 'of unknown version')}"


def _text(value: object) -> str:
    """A reply's key or value as text (redis-py decodes CONFIG GET's keys, not its values)."""
    return value.decode() if isinstance(value, bytes) else str(value)
