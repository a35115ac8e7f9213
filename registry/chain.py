"""The owner's writes to the signed version list: targets lookups, the hash-chained
snapshot shards (append-only: a publish rewrites only the newest) and the timestamp's heads
(each with its signed targets record embedded). :mod:`registry.release` signs the timestamp
that points at them; :mod:`registry.trust_io` reads and verifies them on a site.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from registry import records as R
from registry import trust as T
from registry import trust_io as IO
from registry.errors import IntegrityError, NotFoundError, RegistryError

log = logging.getLogger(__name__)


def upload(reg, run_id: str, folder: str, name: str, data: bytes) -> None:
    """Log ``data`` as ``folder/name`` in the MLflow run ``run_id``."""
    with tempfile.TemporaryDirectory(prefix="adaloc-rec-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        reg.client.log_artifact(run_id, str(path), folder)


def sha256_of(data: bytes) -> str:
    from adaloc.formats import sha256_bytes

    return sha256_bytes(data)


GAP_SCAN = 64  # a publish asks for at most this many skipped numbers one by one


def signed_targets(reg, root: T.RootSigned, version: int, run_id: str):
    """(entry, envelope) of a stored targets record the owner signed for ``version``, or None."""
    try:
        data = IO.read_artifact(reg, run_id, f"{R.KEY_DIR}/{IO.TARGETS_FILE}", max_bytes=1 << 20)
        what = f"targets record of key version {version}"
        env = T.parse(data, "targets", what)
        tg = T.verify(env, "targets", T.root_keys(root), 1, what)
    except (RegistryError, Exception):  # noqa: BLE001 - unsigned/forged versions are skipped
        return None
    if tg.model != reg.model_name or tg.key_version != version:
        return None
    return {"run_id": run_id, "length": len(data), "sha256": sha256_of(data)}, env


def ready_targets(reg, root: T.RootSigned, known, *, after: int | None = None, upto=None):
    """Targets entries of ready key versions not in ``known`` (a predicate) that the owner
    signed. ``after``/``upto`` bound the search to the numbers in between, asked one by one
    (a publish: the gap a crashed publication left, usually empty); else every version is
    listed (``adaloc registry sign-timestamp``: a recovery, O(versions))."""
    found = {}
    if after is not None and upto is not None and upto - after <= GAP_SCAN:
        mvs = []
        for v in range(after + 1, upto):
            try:
                mvs.append(reg.client.get_model_version(reg.key_name, str(v)))
            except Exception:  # noqa: BLE001 - a missing number is simply not ready
                continue
        ready = [mv for mv in mvs if mv.tags.get(R.STATUS) == R.READY]
        candidates = [(int(mv.version), mv.run_id) for mv in ready]
    else:
        candidates = [(kv.version, kv.run_id) for kv in reg.history(with_aliases=False)]
    for version, run_id in candidates:
        if known(version) or str(version) in found:
            continue
        got = signed_targets(reg, root, version, run_id)
        if got is not None:
            found[str(version)] = {**got[0], "record": got[1]}
    return found


def upload_shard(reg, run_id: str, shard: dict) -> dict:
    """Store a snapshot shard under its sha256 in the trust run; return its pointer."""
    data = T.canonical(shard)
    sha = sha256_of(data)
    path = f"{IO.SNAPSHOT_DIR}/{sha}.json"
    upload(reg, run_id, IO.SNAPSHOT_DIR, f"{sha}.json", data)
    pointer = T.ShardPointer(run_id=run_id, path=path, length=len(data), sha256=sha)
    IO._shards(reg)[sha] = T.parse_shard(data, pointer, reg.model_name, "snapshot shard")
    return pointer.model_dump()


def append(reg, run_id: str, prev, new: dict) -> tuple[dict | None, int]:
    """(pointer, count) of the snapshot chain of ``prev`` plus the ``new`` entries.

    Only the newest shard is rewritten (<= SHARD_SIZE entries); a full one starts a new shard
    that names it. A spec-1 ``prev`` is migrated: its whole list becomes the first shards."""
    if isinstance(prev, T.TimestampV1):
        pointer, count, head = None, 0, None
        new = {**{k: v.model_dump() for k, v in prev.versions.items()}, **new}
    else:
        pointer = prev.snapshot.model_dump() if prev and prev.snapshot else None
        count = prev.count if prev else 0
        head = IO.read_shard(reg, prev.snapshot, reg.model_name) if pointer else None
    todo = sorted(new.items(), key=lambda kv: int(kv[0]))
    while todo:
        if head is not None and len(head.versions) < T.SHARD_SIZE:
            room = T.SHARD_SIZE - len(head.versions)
            chunk, todo = todo[:room], todo[room:]
            versions = {k: v.model_dump() for k, v in head.versions.items()} | dict(chunk)
            base_prev = head.prev.model_dump() if head.prev else None
            shard_no = head.shard
        else:
            chunk, todo = todo[: T.SHARD_SIZE], todo[T.SHARD_SIZE :]
            versions, base_prev = dict(chunk), pointer
            shard_no = head.shard + 1 if head is not None else 0
        count += len(chunk)
        signed = {
            "_type": "snapshot",
            "spec": T.SPEC_VERSION,
            "model": reg.model_name,
            "shard": shard_no,
            "count": count,
            "versions": {k: entry_only(v) for k, v in versions.items()},
            "prev": base_prev,
        }
        pointer = upload_shard(reg, run_id, signed)
        head = IO._shards(reg)[pointer["sha256"]]
    return pointer, count


def entry_only(entry: dict) -> dict:
    return {k: entry[k] for k in ("run_id", "length", "sha256")}


def head_entry(reg, root: T.RootSigned, version: int, prev, fresh: dict) -> dict:
    """The timestamp's head entry of ``version``: targets pointer + the record itself."""
    e = fresh.get(str(version))
    if e is not None and "record" in e:
        return e
    if prev is not None and not isinstance(prev, T.TimestampV1) and str(version) in prev.heads:
        return prev.heads[str(version)].model_dump()
    if e is None:
        e = lookup(reg, prev, version)
    if e is None:
        raise NotFoundError(
            f"key version {version} of {reg.model_name!r} has no owner-signed targets record"
        )
    e = entry_only(e)
    what = f"targets record of key version {version}"
    data = IO.read_artifact(
        reg, e["run_id"], f"{R.KEY_DIR}/{IO.TARGETS_FILE}", max_bytes=e["length"],
        sha256=e["sha256"], length=e["length"], label=what,
    )  # fmt: skip
    env = T.parse(data, "targets", what)
    T.verify(env, "targets", T.root_keys(root), 1, what)
    return {**e, "record": env}


def lookup(reg, prev, version: int) -> dict | None:
    """The entry ``prev`` signed for ``version`` (heads, then shards), as a dict, or None."""
    if prev is None:
        return None
    if isinstance(prev, T.TimestampV1):
        got = prev.versions.get(str(version))
    else:
        got = IO.version_entry(reg, prev, version)  # > latest: no shard is read
    return None if got is None else entry_only(got.model_dump())


def upload_head_keys(reg, run_id: str, refs: dict[str, int], prev_refs: dict[str, int],
                     heads: dict) -> None:  # fmt: skip
    """Copy the sealed key of each head whose version moved to its fixed path in the trust
    run (``IO.head_key_path``), before the timestamp that names it is signed, so that a site
    can ask for the key in the same round as the timestamp. Transport only: a site checks a
    copy against the signed head and falls back to the version's own key when it differs.
    A version whose stored key no longer matches its signed hash gets no copy (a warning):
    the promotion stands, and every site refuses that version from its own path."""
    for ref, version in sorted(refs.items()):
        head = heads.get(str(version))
        if prev_refs.get(ref) == version or head is None:
            continue
        k = head["record"]["signed"]["files"][R.SEALED_FILE]
        try:
            data = IO.read_artifact(
                reg, k["run_id"], k["path"], max_bytes=k["length"], sha256=k["sha256"],
                length=k["length"], label=f"sealed key of v{version}",
            )  # fmt: skip
        except IntegrityError as e:
            log.warning("no fixed-path copy of the %s key: %s", ref, e)
            continue
        folder, name = IO.head_key_path(ref).rsplit("/", 1)
        upload(reg, run_id, folder, name, data)
