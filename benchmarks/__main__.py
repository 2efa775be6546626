"""``python -m benchmarks``: run every benchmark at its default size."""

import asyncio

from . import failover

asyncio.run(failover.main())
