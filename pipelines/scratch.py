"""Scratch folders of the flows, removed when the flow run ends - also when it fails.

A flow's scratch folder holds the base weights it downloads and, with ``--nproc > 1``, the
fully trained model (``ddp-base.safetensors``): it must not outlive the run. Folders are
created 0700 by ``mkdtemp`` in the system temp dir and tracked per flow run; the flows'
state hooks (``HOOKS``: completed, failed, crashed, cancelled) remove them, and an ``atexit``
fallback removes whatever a hook missed (a flow called outside Prefect's engine).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading

PREFIX = "adaloc-"
_open: dict[str, list[str]] = {}  # flow run id ("" outside a flow run) -> folders
_guard = threading.Lock()


def _run_id() -> str:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx is not None and ctx.flow_run is not None else ""


def scratch_dir() -> str:
    """A fresh 0700 folder ``adaloc-*`` in the system temp dir, removed when the run ends."""
    path = tempfile.mkdtemp(prefix=PREFIX)
    with _guard:
        _open.setdefault(_run_id(), []).append(path)
    return path


def _remove(paths: list[str]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def remove_scratch(flow=None, flow_run=None, state=None) -> None:
    """Prefect state hook: remove the scratch folders of ``flow_run`` (default: the current)."""
    key = str(flow_run.id) if flow_run is not None else _run_id()
    with _guard:
        paths = _open.pop(key, [])
    _remove(paths)


def remove_all() -> None:
    """Remove every scratch folder this process still tracks (atexit fallback)."""
    with _guard:
        paths = [p for ps in _open.values() for p in ps]
        _open.clear()
    _remove(paths)


atexit.register(remove_all)

# Spread into ``@flow(...)``: every end state of a flow run removes its scratch folders.
HOOKS = {
    "on_completion": [remove_scratch],
    "on_failure": [remove_scratch],
    "on_crashed": [remove_scratch],
    "on_cancellation": [remove_scratch],
}
