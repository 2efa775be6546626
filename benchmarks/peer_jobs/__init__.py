"""Worker-side modules for ``benchmarks.peers``: one per peer system, importable by its own CLI.

Each reads its settings from the environment (``common.URL_ENV`` and friends) when imported, so
the producer in ``benchmarks.peers`` and the worker subprocess build the same broker. Nothing here
is imported unless that peer's package is installed (``pip install -e '.[bench-peers]'``).
"""
