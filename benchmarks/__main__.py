"""``python -m benchmarks``: run every benchmark at its default size."""

import asyncio

from . import failover, throughput

asyncio.run(failover.main())
asyncio.run(throughput.main())
