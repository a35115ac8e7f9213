"""The data version: the md5 DVC records for the tracked data directory in ``data.dvc``.

Each key version carries it as a tag; the retrain flow compares the current one with the
one on the latest key version to decide whether there is anything new to train on. Before a
flow trains, :func:`checkout_data` makes the files on disk that version: it asks DVC whether
the workspace matches the recorded md5, runs ``dvc pull`` (from the configured remote) when
files are missing, and refuses to train when they still differ. DVC does the hashing: no
home-made md5 of a directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from adaloc.errors import ConfigError, DatasetError

UNTRACKED = "untracked"


class DataVersionMismatch(DatasetError):
    """The files on disk are not the data version a flow was asked to train on."""


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
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}  # no usage-report daemon per call
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"`dvc {' '.join(args)}` failed: {proc.stderr.strip() or proc.stdout}")
    return proc.stdout


def track(data_dir: str | Path, *, cwd: str | Path = ".") -> str:
    """``dvc add DATA_DIR`` (a new data version when the files changed); return it."""
    dvc("add", str(data_dir), cwd=cwd)
    return data_version(Path(cwd) / f"{Path(data_dir).name}.dvc")


def _tracked_path(dvc_file: Path) -> str:
    import yaml

    return yaml.safe_load(dvc_file.read_text())["outs"][0]["path"]


def workspace_state(dvc_file: str | Path) -> str:
    """What DVC says of the tracked files vs the md5 in ``dvc_file``: ``unchanged``,
    ``modified``, ``deleted``, ... or ``not in cache`` (a project without git whose cache
    lacks the version, where DVC cannot compare)."""
    path = Path(dvc_file)
    cwd, target = path.parent, _tracked_path(path)
    try:  # git projects: `dvc data status` compares the workspace even with an empty cache
        doc = json.loads(dvc("data", "status", "--json", "--unchanged", target, cwd=cwd))
    except RuntimeError as err:
        if "not a git repository" not in str(err):
            raise
        # --no-scm projects: `dvc status`; {} = matches the recorded md5
        doc = json.loads(dvc("status", "--json", path.name, cwd=cwd) or "{}")
        changes = [c for entry in doc.get(path.name, []) for c in entry.get("changed outs", {})]
        states = [entry["changed outs"][c] for entry in doc.get(path.name, []) for c in changes]
        return states[0] if states else "unchanged"
    # "uncommitted" = workspace vs the .dvc file (what matters here; "committed" is git's)
    for kind, paths in (doc.get("uncommitted") or {}).items():
        if any(p.rstrip("/") == target for p in paths):
            return kind
    return "unchanged"


def checkout_data(
    dvc_file: str | Path,
    *,
    expected: str | None = None,
    remote: str | None = None,
    missing_ok: bool = False,
) -> str:
    """Make the files tracked by ``dvc_file`` the recorded data version; return it.

    ``expected`` (a data version) must be the one ``dvc_file`` records. Missing files are
    pulled from ``remote`` (default: the project's configured remote); files that differ
    are never overwritten: :class:`DataVersionMismatch` says what to do instead.
    ``missing_ok``: when nothing is on disk and the remote lacks it too, return without
    raising (a dataset loader may still fill it, e.g. from the Debian package; the flows
    call this again after loading, without ``missing_ok``).
    """
    path = Path(dvc_file)
    version = data_version(path)
    if version == UNTRACKED:
        return version
    if expected is not None and expected != version:
        raise DataVersionMismatch(
            f"{path} records data version {version}, not the {expected} asked for; check out "
            f"the commit whose {path.name} names it (git checkout REV -- {path.name})"
        )
    state = workspace_state(path)
    if state == "unchanged":
        return version
    target = _tracked_path(path)
    try:  # no --force: DVC restores missing files and leaves changed ones alone
        dvc("pull", *(["-r", remote] if remote else []), path.name, cwd=path.parent)
    except RuntimeError as err:
        if missing_ok and state == "deleted":
            return version
        detail = str(err).splitlines()[-1][:300]
        raise DataVersionMismatch(
            f"{path.parent / target} is {state!r}, not data version {version}, and "
            f"`dvc pull` could not restore it ({detail}); refusing to train"
        ) from err
    state = workspace_state(path)
    if state != "unchanged":
        raise DataVersionMismatch(
            f"{path.parent / target} is {state!r} vs data version {version} recorded in "
            f"{path.name}; refusing to train. Restore it with `dvc checkout --force` or record "
            f"the new files as a new version with `dvc add {target}`"
        )
    return version
