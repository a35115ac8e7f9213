"""The data version: the md5 DVC records for the tracked data directory in ``data.dvc``.

Each key version carries it as a tag; the retrain flow compares the current one with the
one on the latest key version to decide whether there is anything new to train on.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from adaloc.errors import ConfigError

UNTRACKED = "untracked"


def data_version(dvc_file: str | Path = "data.dvc") -> str:
    """The md5 of the tracked output in ``dvc_file`` (e.g. ``ec03...66.dir``).

    Returns ``"untracked"`` when the file does not exist (a dataset with no DVC file, such
    as scikit-learn's digits), and raises :class:`ConfigError` when it cannot be read.
    """
    path = Path(dvc_file)
    if not path.exists():
        return UNTRACKED
    import yaml

    try:
        doc = yaml.safe_load(path.read_text()) or {}
        outs = doc["outs"]
        md5s = [out["md5"] for out in outs]
    except (yaml.YAMLError, KeyError, TypeError) as err:
        raise ConfigError(
            f"DVC file {str(path)!r} has no 'outs[*].md5'; re-create it with `dvc add`"
        ) from err
    if not md5s:
        raise ConfigError(f"DVC file {str(path)!r} tracks no outputs; run `dvc add DIR`")
    return md5s[0] if len(md5s) == 1 else "+".join(md5s)


def data_changed(current: str, recorded: str | None) -> bool:
    """True when there is a data version to train on that no key version has seen."""
    return current != UNTRACKED and current != (recorded or "")


def dvc(*args: str, cwd: str | Path = ".", timeout: float = 300) -> str:
    """Run ``dvc ARGS`` in ``cwd`` with this interpreter's DVC; return stdout, raise on
    failure with DVC's own message."""
    cmd = [sys.executable, "-m", "dvc", *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"`dvc {' '.join(args)}` failed: {proc.stderr.strip() or proc.stdout}")
    return proc.stdout


def track(data_dir: str | Path, *, cwd: str | Path = ".") -> str:
    """``dvc add DATA_DIR`` (a new data version when the files changed); return it."""
    dvc("add", str(data_dir), cwd=cwd)
    return data_version(Path(cwd) / f"{Path(data_dir).name}.dvc")
