"""``python -m benchmarks``: run every benchmark at its default size."""

import asyncio

from . import failover, latency, limits, peers, throughput, workflows

asyncio.run(failover.main())
asyncio.run(throughput.main())
asyncio.run(workflows.main())
asyncio.run(limits.main())
asyncio.run(latency.main())
asyncio.run(peers.main())
