"""Download progress for opaque downloads: poll the bytes landing in the target folder."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

Progress = Callable[[str, int, int | None], None]
"""progress(label, done_bytes, total_bytes_or_None), called from a helper thread."""


@contextmanager
def watch_downloads(
    directory: Path, label: str, total: int | None, progress: Progress | None
) -> Iterator:
    """Report bytes landing in ``directory`` (every 0.1 s) while a download runs."""
    if progress is None:
        yield
        return
    stop = threading.Event()

    def size() -> int:
        return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())

    def poll() -> None:
        while not stop.wait(0.1):
            progress(label, size(), total)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=2)
        progress(label, size(), total)
