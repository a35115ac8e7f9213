"""Scratch folders of the flows are removed when the flow run ends, also when it fails."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect import flow

from pipelines.scratch import HOOKS, scratch_dir


@flow(name="scratch-ok", **HOOKS)
def _ok_flow() -> str:
    path = Path(scratch_dir())
    (path / "ddp-base.safetensors").write_bytes(b"trained weights")
    return str(path)


_MADE: list[str] = []  # module-level: Prefect validates (copies) list parameters


@flow(name="scratch-fails", **HOOKS)
def _failing_flow() -> None:
    _MADE.append(scratch_dir())
    raise RuntimeError("training diverged")


def test_scratch_removed_after_success_and_failure(prefect_api):
    path = Path(_ok_flow())
    assert path.name.startswith("adaloc-") and not path.exists()
    _MADE.clear()
    with pytest.raises(RuntimeError, match="diverged"):
        _failing_flow()
    assert _MADE and not Path(_MADE[0]).exists()
