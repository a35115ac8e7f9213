"""Reading signed records from MLflow: where they live and how a reader finds the newest.

Layout in the model's MLflow experiment (all plain artifacts; MLflow itself is untrusted):
  run tagged ``adaloc.kind = trust``:  trust/root-<N>.json   trust/timestamp.json
  each key version's run:              key/targets.json (next to key/key.sealed)
A reader looks at every run tagged as a trust run (an attacker may add more) and keeps the
timestamp with the highest counter whose signatures hold; nothing it reads is used unverified.
"""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from registry import records as R
from registry import run_io
from registry import trust as T
from registry.errors import NotFoundError, RegistryError, TrustError
from registry.fetch import ATTEMPTS

TRUST_KIND = "trust"
TRUST_DIR = "trust"
TIMESTAMP_FILE = "timestamp.json"
TARGETS_FILE = "targets.json"
MAX_TRUST_RUNS = 8  # a reader tries at most this many candidate trust runs


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
) -> bytes:
    """Bytes of ``path`` in run ``run_id``, capped at ``max_bytes`` (and hash-checked if given)."""
    with tempfile.TemporaryDirectory(prefix="adaloc-rec-") as tmp:
        got = run_io.fetch_file(
            store, run_id, path, Path(tmp) / Path(path).name, max_bytes=max_bytes,
            expect_sha256=sha256, expect_length=length, label=label or path, attempts=attempts,
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


def _probe_timestamp(store, run_id: str) -> bytes | None:
    """The run's timestamp bytes in one try, or None (absent, or a transient error)."""
    try:
        return read_artifact(
            store, run_id, f"{TRUST_DIR}/{TIMESTAMP_FILE}", max_bytes=T.MAX_TIMESTAMP_BYTES,
            attempts=1,
        )  # fmt: skip
    except RegistryError:
        return None


def _candidate(store, run_id: str, trusted: T.RootSigned, listed: set[str], data: bytes | None):
    """(env, ts, root, run_id) of one trust run's timestamp; None when it holds none."""
    if f"{TRUST_DIR}/{TIMESTAMP_FILE}" not in listed:
        return None
    if data is None:  # listed, but the one-try probe failed: read it with the usual retries
        data = read_artifact(
            store, run_id, f"{TRUST_DIR}/{TIMESTAMP_FILE}", max_bytes=T.MAX_TIMESTAMP_BYTES
        )
    env = T.parse(data, "timestamp", "timestamp record")
    root = walk_roots(store, run_id, trusted, listed=listed)  # always to the newest root listed
    ts = T.verify(env, "timestamp", T.root_keys(root), root.threshold, "timestamp record")
    T.check_model(ts, trusted.model, "timestamp record")
    if ts.root_version != root.version:
        raise TrustError(
            f"timestamp record names root v{ts.root_version}, the chain reaches v{root.version}"
        )
    return env, ts, root, run_id


def newest_timestamp(store, trusted: T.RootSigned, *, at=None, hint: tuple[str, ...] = ()):
    """(envelope, record, root, run_id) of the highest valid timestamp across trust runs.

    Every run the trust-run search returns is a candidate (and only those); each one's listing
    and timestamp are read together, and the runs in ``hint`` (where the last pull found it,
    their artifact roots known) are read while the search runs: one round trip instead of
    three. Roots are walked per candidate run to the newest one listed there. Raises the most
    telling error when no candidate verifies (TrustError / ExpiredError / NotFound).
    """
    best, errors = None, []
    with ThreadPoolExecutor(max_workers=2 * MAX_TRUST_RUNS + 1) as pool:

        def start(run_id: str):
            return pool.submit(_listed, store, run_id), pool.submit(_probe_timestamp, store, run_id)

        known = run_io._uris(store)
        early = {r: start(r) for r in hint[:MAX_TRUST_RUNS] if r in known}
        runs = trust_runs(store)
        started = {r.info.run_id: early.get(r.info.run_id) or start(r.info.run_id) for r in runs}
        for run_id, (listed, data) in started.items():
            try:
                got = _candidate(store, run_id, trusted, listed.result(), data.result())
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


def read_targets(store, ts: T.TimestampSigned, root: T.RootSigned, version: int, *, cache=None):
    """The verified targets record of ``version`` as listed (length + sha256) by ``ts``.

    ``cache`` (a :class:`registry.record_cache.RecordCache`) holds records by their signed
    sha256: a hit is re-hashed and re-verified like a download, a miss is fetched and kept.
    """
    entry = ts.versions.get(str(version))
    if entry is None:
        have = sorted(int(v) for v in ts.versions)
        raise NotFoundError(
            f"key version {version} is not in the owner's signed list of {ts.model!r} "
            f"(signed versions: {have}); tags or listings in MLflow do not count"
        )
    what = f"targets record of key version {version}"
    data = cache.get(entry.sha256, entry.length) if cache is not None else None
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
    if cache is not None:
        cache.put(entry.sha256, data)
    return tg


def resolve_ref(ts: T.TimestampSigned, root: T.RootSigned, ref: int | str) -> int:
    """A key version number from a ref, using only the signed timestamp (never MLflow)."""
    text = str(ref).strip()
    number = text[1:] if text[:1] in "vV" and text[1:].isdigit() else text
    versions = sorted(int(v) for v in ts.versions)
    if number.isdigit():
        return int(number)
    if text == "latest":
        if not versions:
            raise NotFoundError(f"the owner's signed list of {ts.model!r} has no key version yet")
        return versions[-1]
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
    if str(promo.key_version) not in ts.versions:
        raise TrustError(
            f"production promotion names key version {promo.key_version}, "
            "which the signed list does not hold"
        )
    return promo
