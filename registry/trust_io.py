"""Reading signed records from MLflow: where they live and how a reader finds the newest.

Layout in the model's MLflow experiment (all plain artifacts; MLflow itself is untrusted):
  run tagged ``adaloc.kind = trust``:  trust/root-<N>.json   trust/timestamp.json
                                       trust/snapshots/<sha256>.json (content-addressed)
  each key version's run:              key/targets.json (next to key/key.sealed)
A reader looks at every run tagged as a trust run (an attacker may add more) and keeps the
timestamp with the highest counter whose signatures hold; nothing it reads is used unverified.
A version's targets pointer comes from the timestamp's heads, else from the snapshot shards
(a hash chain from the timestamp; each shard is read once and cached by its sha256).
"""

from __future__ import annotations

import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from adaloc.formats import sha256_bytes
from registry import records as R
from registry import run_io
from registry import trust as T
from registry.errors import NotFoundError, RegistryError, TrustError
from registry.fetch import ATTEMPTS

TRUST_KIND = "trust"
TRUST_DIR = "trust"
TIMESTAMP_FILE = "timestamp.json"
SNAPSHOT_DIR = f"{TRUST_DIR}/snapshots"
TARGETS_FILE = "targets.json"
HEADS_DIR = f"{TRUST_DIR}/heads"  # <ref>.sealed: a copy of the sealed key each head names
MAX_TRUST_RUNS = 8  # a reader tries at most this many candidate trust runs


HEAD_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


def head_key_path(ref) -> str | None:
    """Where the owner keeps a copy of the sealed key that head ``ref`` (latest, production,
    an alias) names, in its trust run; None for a version number. A copy is transport only:
    a site uses it when its bytes have the signed length and sha256 of the key the verified
    timestamp's head names, else it fetches the key from the version's run."""
    ref = str(ref).strip()
    if not HEAD_NAME.fullmatch(ref) or re.fullmatch(r"[vV]\d+", ref):
        return None
    return f"{HEADS_DIR}/{ref}.sealed"


def head_refs(ts) -> dict[str, int]:
    """Head name -> version of a timestamp (latest, production, aliases) with a copy path."""
    refs = dict(getattr(ts, "aliases", None) or {})
    if getattr(ts, "latest", None):
        refs["latest"] = ts.latest
    if getattr(ts, "promotion", None):
        refs["production"] = int(ts.promotion["signed"]["key_version"])
    return {r: int(v) for r, v in refs.items() if head_key_path(r) is not None}


def root_file(version: int) -> str:
    """Artifact path of root record ``version``."""
    return f"{TRUST_DIR}/root-{version}.json"


def read_artifact(
    store,
    run_id: str,
    path: str,
    *,
    max_bytes: int,
    sha256: str | None = None,
    length: int | None = None,
    label: str | None = None,
    attempts: int = ATTEMPTS,
    fixed: bool = False,
) -> bytes:
    """Bytes of ``path`` in run ``run_id``, capped at ``max_bytes`` (and hash-checked if given).
    ``fixed``: a file the owner rewrites in place (its presigned URL is kept per store)."""
    with tempfile.TemporaryDirectory(prefix="adaloc-rec-") as tmp:
        got = run_io.fetch_file(
            store, run_id, path, Path(tmp) / Path(path).name, max_bytes=max_bytes,
            expect_sha256=sha256, expect_length=length, label=label or path, attempts=attempts,
            durable=False, urls=run_io.url_cache(store) if fixed else None,
        )  # fmt: skip
        return got.read_bytes()


artifact_uri = run_io.artifact_uri  # a run's artifact root (cached per store)


def trust_runs(store) -> list:
    """Runs tagged as trust runs in the model's experiment, oldest first (may be empty)."""
    exp = run_io.experiment(store)
    if exp is None:
        return []
    runs = store.client.search_runs(
        [exp[0]],
        filter_string=f"tags.`{R.KIND}` = '{TRUST_KIND}'",
        max_results=MAX_TRUST_RUNS,
        order_by=["attributes.start_time ASC"],
    )
    for run in runs:  # the search already says where each run's files are
        run_io.remember(store, run.info.run_id, run.info.artifact_uri)
    return list(runs)


def _listed(store, run_id: str) -> set[str]:
    try:
        return run_io.list_dir(store, run_id, TRUST_DIR)
    except Exception:  # noqa: BLE001 - a broken candidate run is skipped, not fatal
        return set()


def walk_roots(store, run_id: str, trusted: T.RootSigned, *, listed: set[str] | None = None):
    """Follow root v(N+1), v(N+2), ... in ``run_id`` from ``trusted``; return the last valid."""
    listed = _listed(store, run_id) if listed is None else listed
    for _ in range(T.MAX_ROOT_ROTATIONS):
        nxt = trusted.version + 1
        if root_file(nxt) not in listed:
            return trusted
        data = read_artifact(store, run_id, root_file(nxt), max_bytes=T.MAX_ROOT_BYTES)
        what = f"root record v{nxt}"
        trusted = T.next_root(trusted, T.parse(data, "root", what), what)
    return trusted


def _cap(legacy: bool) -> int:
    return T.MAX_TIMESTAMP_V1_BYTES if legacy else T.MAX_TIMESTAMP_BYTES


def probe_timestamp(store, run_id: str, legacy: bool = False) -> bytes | None:
    """The run's timestamp bytes in one try, or None (absent, or a transient error)."""
    try:
        return read_artifact(
            store,
            run_id,
            f"{TRUST_DIR}/{TIMESTAMP_FILE}",
            max_bytes=_cap(legacy),
            attempts=1,
            fixed=True,
        )
    except RegistryError:
        return None


def walk_to(store, run_id: str, trusted: T.RootSigned, version) -> T.RootSigned:
    """Follow root v(N+1) .. v``version`` in ``run_id`` (the version a timestamp names, not yet
    trusted: each step is verified, and the timestamp must then verify under the result)."""
    if not isinstance(version, int) or version - trusted.version > T.MAX_ROOT_ROTATIONS:
        return trusted  # nonsense or too far: the timestamp's own check refuses it
    while trusted.version < version:
        nxt = trusted.version + 1
        data = read_artifact(store, run_id, root_file(nxt), max_bytes=T.MAX_ROOT_BYTES)
        what = f"root record v{nxt}"
        trusted = T.next_root(trusted, T.parse(data, "root", what), what)
    return trusted


def _candidate(store, run_id: str, trusted: T.RootSigned, data: bytes | None, legacy=False):
    """(env, ts, root, run_id) of one trust run's timestamp; None when it holds none.

    No listing on the usual path: the one-try probe read the timestamp; only when it failed
    is the folder listed (absent: no candidate; present: read with the usual retries)."""
    if data is None:
        if f"{TRUST_DIR}/{TIMESTAMP_FILE}" not in _listed(store, run_id):
            return None
        data = read_artifact(store, run_id, f"{TRUST_DIR}/{TIMESTAMP_FILE}", max_bytes=_cap(legacy))
    env = T.parse(data, "timestamp", "timestamp record")
    root = walk_to(store, run_id, trusted, env["signed"].get("root_version"))
    role = "timestamp-v1" if legacy and env["signed"].get("spec") == 1 else "timestamp"
    ts = T.verify(env, role, T.root_keys(root), root.threshold, "timestamp record")
    T.check_model(ts, trusted.model, "timestamp record")
    if ts.root_version != root.version:
        raise TrustError(
            f"timestamp record names root v{ts.root_version}, the chain reaches v{root.version}"
        )
    return env, ts, root, run_id


def newest_timestamp(
    store,
    trusted: T.RootSigned,
    *,
    at=None,
    hint: tuple[str, ...] = (),
    legacy: bool = False,
    first=None,
):
    """(envelope, record, root, run_id) of the highest valid timestamp across trust runs.

    Every run the trust-run search returns is a candidate (and only those); each one's
    timestamp is read, and the runs in ``hint`` (where the last pull found it, their artifact
    roots known) are read while the search runs: one round trip. When the first hinted run
    holds a valid timestamp that names that run as the owner's trust run, it is taken without
    the search (the owner writes only there; see docs/SECURITY.md). Roots are walked per
    candidate run to the root version its timestamp names (each step verified). Raises the
    most telling error when no candidate verifies (TrustError / ExpiredError / NotFound).
    ``first``: a future of ``probe_timestamp(store, hint[0])`` the caller already started.
    """
    best, errors = None, []
    known = run_io._uris(store)
    if hint[:1] and hint[0] in known:
        # Fast path: the hinted run's timestamp, when it verifies and is signed as the owner's
        # trust run, is the one the owner writes (it never writes another run), so the
        # search can only find replays or forgeries: one request instead of two rounds.
        try:
            data = first.result() if first is not None else probe_timestamp(store, hint[0], legacy)
            got = _candidate(store, hint[0], trusted, data, legacy)
        except RegistryError:
            got = None
        if got is not None and getattr(got[1], "trust_run", None) == hint[0]:
            return got
    with ThreadPoolExecutor(max_workers=MAX_TRUST_RUNS + 1) as pool:

        def start(run_id: str):
            return pool.submit(probe_timestamp, store, run_id, legacy)

        early = {r: start(r) for r in hint[:MAX_TRUST_RUNS] if r in known}
        runs = trust_runs(store)
        started = {r.info.run_id: early.get(r.info.run_id) or start(r.info.run_id) for r in runs}
        for run_id, data in started.items():
            try:
                got = _candidate(store, run_id, trusted, data.result(), legacy)
            except RegistryError as err:
                errors.append(err)
                continue
            if got is not None and (best is None or got[1].counter > best[1].counter):
                best = got
    if best is None:
        if errors:
            raise errors[0]
        raise NotFoundError(
            f"no signed timestamp record for {store.model_name!r} in the registry; the owner "
            "publishes one with every key version (`adaloc registry sign-timestamp`)"
        )
    return best


def _shards(store) -> dict:
    return store.__dict__.setdefault("_shards", {})


def read_shard(store, pointer: T.ShardPointer, model: str, *, cache=None) -> T.SnapshotShard:
    """A snapshot shard by its pointer: length + sha256 checked, then its shape and model.

    Kept per store object, and in ``cache`` (a RecordCache, re-hashed on every hit)."""
    memo = _shards(store)
    if pointer.sha256 in memo:
        return memo[pointer.sha256]
    what = f"snapshot shard {pointer.sha256[:12]}"
    data = cache.get(pointer.sha256, pointer.length) if cache is not None else None
    if data is None:
        data = read_artifact(
            store, pointer.run_id, pointer.path, max_bytes=pointer.length,
            sha256=pointer.sha256, length=pointer.length, label=what,
        )  # fmt: skip
    shard = T.parse_shard(data, pointer, model, what)
    if cache is not None:
        cache.put(pointer.sha256, data)
    memo[pointer.sha256] = shard
    return shard


def iter_shards(store, ts: T.TimestampSigned, *, cache=None):
    """The snapshot shards of ``ts``, newest first (each hash-checked; chain length-checked)."""
    pointer, count, seen = ts.snapshot, ts.count, 0
    while pointer is not None:
        shard = read_shard(store, pointer, ts.model, cache=cache)
        if shard.count != count:
            raise TrustError(
                f"snapshot shard {pointer.sha256[:12]} counts {shard.count} versions, "
                f"expected {count}"
            )
        yield shard
        count -= len(shard.versions)
        seen += 1
        if seen > ts.count + 1:
            raise TrustError("snapshot shards form a loop")
        pointer = shard.prev
    if count != 0:
        raise TrustError(f"snapshot shards end {count} versions short of the signed count")


def version_entry(store, ts: T.TimestampSigned, version: int, *, cache=None):
    """The signed targets pointer of ``version`` (a HeadEntry when the timestamp names it
    directly, else from the snapshot shards), or None when it is not signed."""
    head = ts.heads.get(str(version))
    if head is not None:
        return head
    if ts.latest is None or version > ts.latest:
        return None  # the signed latest is the highest version listed: no shard to read
    for shard in iter_shards(store, ts, cache=cache):
        if str(version) in shard.versions:
            return shard.versions[str(version)]
    return None


def all_entries(store, ts: T.TimestampSigned, *, cache=None) -> dict[str, T.VersionEntry]:
    """Every signed version's targets pointer (reads all shards: for listings, not pulls)."""
    out: dict[str, T.VersionEntry] = {}
    for shard in iter_shards(store, ts, cache=cache):
        for v, e in shard.versions.items():
            out.setdefault(v, e)
    return out


def read_targets(
    store, ts: T.TimestampSigned, root: T.RootSigned, version: int, *, cache=None, entry=None
):
    """The verified targets record of ``version`` as pinned (length + sha256) by ``ts``.

    ``cache`` (a :class:`registry.record_cache.RecordCache`) holds records by their signed
    sha256: a hit is re-hashed and re-verified like a download, a miss is fetched and kept.
    When the timestamp names the version as a head, the record must name the same sealed key.
    """
    entry = entry or version_entry(store, ts, version, cache=cache)
    if entry is None:
        raise NotFoundError(
            f"key version {version} is not in the owner's signed list of {ts.model!r} "
            f"({ts.count} signed versions, latest {ts.latest}); tags or listings in MLflow do "
            "not count"
        )
    what = f"targets record of key version {version}"
    data = cache.get(entry.sha256, entry.length) if cache is not None else None
    if data is None and isinstance(entry, T.HeadEntry):
        data = T.canonical(entry.record)  # embedded in the signed timestamp; pinned below
        if len(data) != entry.length or sha256_bytes(data) != entry.sha256:
            raise TrustError(f"{what} embedded in the timestamp does not match its sha256")
    if data is None:
        data = read_artifact(
            store,
            entry.run_id,
            f"{R.KEY_DIR}/{TARGETS_FILE}",
            max_bytes=entry.length,
            sha256=entry.sha256,
            length=entry.length,
            label=what,
        )
    tg = T.verify(
        T.parse(data, "targets", what), "targets", T.root_keys(root), root.threshold, what
    )
    T.check_model(tg, ts.model, what)
    if tg.key_version != version:
        raise TrustError(f"{what} is signed for key version {tg.key_version}")
    if cache is not None:  # (a head's record too: it outlives the timestamp naming it)
        cache.put(entry.sha256, data)
    return tg


def resolve_ref(ts: T.TimestampSigned, root: T.RootSigned, ref: int | str) -> int:
    """A key version number from a ref, using only the signed timestamp (never MLflow)."""
    text = str(ref).strip()
    number = text[1:] if text[:1] in "vV" and text[1:].isdigit() else text
    if number.isdigit():
        return int(number)
    if text == "latest":
        if ts.latest is None:
            raise NotFoundError(f"the owner's signed list of {ts.model!r} has no key version yet")
        return ts.latest
    if text == "production":
        return production(ts, root).key_version
    if text in ts.aliases:
        return ts.aliases[text]
    raise NotFoundError(
        f"alias {text!r} is not in the owner's signed record of {ts.model!r} "
        f"(signed aliases: {sorted(ts.aliases) + (['production'] if ts.promotion else [])})"
    )


def check_fresh(ts: T.TimestampSigned, at=None) -> None:
    """ExpiredError when the timestamp is past its expiry (frozen registry)."""
    T.check_expiry(ts, f"timestamp record (counter {ts.counter})", at)


def production(ts: T.TimestampSigned, root: T.RootSigned) -> T.PromotionSigned:
    """The signed promotion embedded in ``ts`` (promote_threshold signatures of root keys)."""
    if ts.promotion is None:
        raise NotFoundError(
            f"no key version of {ts.model!r} is promoted to production (signed); "
            "the owner promotes with `adaloc registry promote VERSION --owner-dir DIR`"
        )
    promo = T.verify(
        ts.promotion,
        "promotion",
        T.root_keys(root),
        root.promote_threshold,
        "production promotion",
    )
    T.check_model(promo, ts.model, "production promotion")
    if str(promo.key_version) not in ts.heads:
        raise TrustError(
            f"production promotion names key version {promo.key_version}, "
            "which the signed list does not hold"
        )
    return promo
