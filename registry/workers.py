"""Named single-thread workers for the site's background I/O (sweeps, hashes, presigns).

One lazily started ``ThreadPoolExecutor(max_workers=1)`` per name, shared by the process:
work given to one name runs in order, and nothing starts at import time.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor


@functools.cache
def worker(name: str) -> ThreadPoolExecutor:
    """The process's one thread named ``adaloc-<name>``."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"adaloc-{name}")
