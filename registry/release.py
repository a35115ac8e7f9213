"""The owner's side of the signed records: root, targets per version, timestamp, promotion.

Every write here needs the owner's Ed25519 signing key; a registry writer without it can
only produce records that sites refuse. The owner re-derives the timestamp from what it
signed before (the newest verified timestamp in the registry, and a local copy in its
keyring folder, whichever has the higher counter) plus the new versions: they are appended
to the newest snapshot shard (see registry.trust), so a publish costs the same at 1 or 10,000
versions. Versions never drop out of the signed chain, so hiding them in MLflow is useless;
ready versions a crashed publish left unlisted are picked up by the next publish (the numbers
it skipped) or by ``adaloc registry sign-timestamp`` (all of them).
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

from registry import chain as C
from registry import records as R
from registry import trust as T
from registry import trust_io as IO
from registry.errors import NotFoundError, RegistryError, TrustError
from registry.fsutil import atomic_write_bytes, read_json
from registry.sealing import OWNER_PRIVATE_FILE, key_fingerprint, load_private_key

LOCAL_TIMESTAMP = "timestamp.json"  # owner's own copy, beside owner.key
PUBLISH_ROUNDS = 5  # re-sign rounds when concurrent publishers race on the timestamp


def signing_key(owner):
    """The owner's Ed25519 private key (the keyring's own loader when it has one)."""
    getter = getattr(owner, "signing_key", None)
    if callable(getter):
        return getter()
    return load_private_key(Path(owner.directory) / OWNER_PRIVATE_FILE)


def trust_run(reg, owner=None) -> str:
    """The owner's trust run: the one its last signed timestamp names (it never moves), else
    the oldest one holding root v1, created if none."""
    local = read_json(Path(owner.directory) / LOCAL_TIMESTAMP) if owner is not None else None
    signed = local.get("signed") if isinstance(local, dict) else None
    named = signed.get("trust_run") if isinstance(signed, dict) else None
    if isinstance(named, str) and signed.get("model") == reg.model_name:
        try:
            if IO.root_file(1) in IO._listed(reg, named):
                IO.artifact_uri(reg, named)
                return named
        except Exception:  # noqa: BLE001 - gone or not ours: look for it as below
            pass
    for run in IO.trust_runs(reg):
        if IO.root_file(1) in IO._listed(reg, run.info.run_id):
            return run.info.run_id
    run = reg.client.create_run(
        reg._experiment(), run_name="trust", tags={R.KIND: IO.TRUST_KIND, R.STATUS: R.READY}
    )
    return run.info.run_id


def current_root(reg, owner) -> tuple[T.RootSigned, str]:
    """The newest root the owner's key chain accepts; root v1 is created on first use.

    Cached on the registry object per owner key (only :func:`rotate_root` changes it).
    """
    cache = reg.__dict__.setdefault("_roots", {})
    fp = key_fingerprint(owner.owner_public_pem)
    if fp not in cache:
        cache[fp] = _current_root(reg, owner)
    return cache[fp]


def _current_root(reg, owner) -> tuple[T.RootSigned, str]:
    key = signing_key(owner)
    anchor = T.anchor_root(reg.model_name, owner.owner_public_pem)
    run_id = trust_run(reg, owner)
    if IO.root_file(1) not in IO._listed(reg, run_id):
        env = T.sign(T.make_root(reg.model_name, [key]), [key])
        C.upload(reg, run_id, IO.TRUST_DIR, "root-1.json", T.canonical(env))
    root = IO.walk_roots(reg, run_id, anchor) if _anchor_is_v1_signer(reg, run_id, key) else None
    if root is None:
        # owner.pub is not root v1's signer: the keyring was rotated; walk from any key we hold.
        root = _walk_from_rotated(reg, run_id, key)
    if key_fingerprint(owner.owner_public_pem) not in root.keys:
        raise TrustError(
            f"owner key {key_fingerprint(owner.owner_public_pem)} is not in root "
            f"v{root.version} of {reg.model_name!r} (keys {sorted(root.keys)}); it was rotated out"
        )
    return root, run_id


def _anchor_is_v1_signer(reg, run_id: str, key) -> bool:
    data = IO.read_artifact(reg, run_id, IO.root_file(1), max_bytes=T.MAX_ROOT_BYTES)
    env = T.parse(data, "root", "root record v1")
    return any(s.get("keyid") == key_fingerprint(_pem(key)) for s in env["signatures"])


def _walk_from_rotated(reg, run_id: str, key):
    # The chain is public and self-verifying from v1; the owner checks that v1 verifies under
    # its own signature set, then that its current key is named at the end.
    data = IO.read_artifact(reg, run_id, IO.root_file(1), max_bytes=T.MAX_ROOT_BYTES)
    env = T.parse(data, "root", "root record v1")
    v1 = T.verify(env, "root", env["signed"].get("keys", {}), 1, "root record v1")
    return IO.walk_roots(reg, run_id, v1)


def _pem(key) -> bytes:
    from registry.sealing import public_pem_of

    return public_pem_of(key)


def _previous(reg, owner, root: T.RootSigned, run_id: str | None = None):
    """The newest timestamp the owner signed: registry's or its local copy (higher counter).

    A spec-1 timestamp (every version listed) is read too, as a ``T.TimestampV1``: the
    owner migrates it into snapshot shards on the next signing."""
    best = None
    try:  # the owner's trust run first: one request when its timestamp is the newest
        hint = (run_id,) if run_id else ()
        env, ts, _, _ = IO.newest_timestamp(reg, root, legacy=True, hint=hint)
        best = (env, ts)
    except (NotFoundError, TrustError):
        best = None  # absent, expired or forged in the registry: fall back to the local copy
    local = read_json(Path(owner.directory) / LOCAL_TIMESTAMP)
    if isinstance(local, dict) and isinstance(local.get("signed"), dict):
        role = "timestamp" if local["signed"].get("spec") == T.TIMESTAMP_SPEC else "timestamp-v1"
        try:
            ts = T.verify(local, role, T.root_keys(root), 1, "owner's local timestamp")
            if ts.model == reg.model_name and (best is None or ts.counter > best[1].counter):
                best = (local, ts)
        except TrustError:
            pass  # from another model or an older root: ignore
    return best


def publish_targets(reg, owner, *, run_id: str, signed: dict) -> dict:
    """Sign a targets record, store it as ``key/targets.json`` of ``run_id``; return its
    entry (run, length, sha256) with the envelope as ``record`` (a timestamp head)."""
    env = T.sign(signed, [signing_key(owner)])
    data = T.canonical(env)
    C.upload(reg, run_id, R.KEY_DIR, IO.TARGETS_FILE, data)
    got = IO.read_artifact(reg, run_id, f"{R.KEY_DIR}/{IO.TARGETS_FILE}", max_bytes=len(data))
    if got != data:
        raise RegistryError(f"stored targets record of run {run_id} differs from what was sent")
    return {"run_id": run_id, "length": len(data), "sha256": C.sha256_of(data), "record": env}


def sign_timestamp(
    reg,
    owner,
    *,
    promotion: dict | None = None,
    aliases: dict[str, int] | None = None,
    expires: timedelta = T.DEFAULT_TIMESTAMP_EXPIRY,
    extra_versions: dict | None = None,
    carry=None,
    scan: bool = True,
    rebuild: bool = False,
) -> T.TimestampSigned:
    """Sign and store a new timestamp: previous versions + new ones, counter + 1.

    ``extra_versions`` (number -> targets entry, optionally with its ``record`` envelope) are
    appended to the snapshot chain unless already listed. ``scan``: also add ready versions
    the owner signed but no timestamp lists (a crashed publish): all of them when no new
    version is given (the CLI's re-sign), else only the numbers skipped since ``latest``.
    Cost per call is independent of the number of versions except for a full scan.
    ``carry`` (after a root rotation) is the last timestamp signed under the old root: its
    counter, aliases and promotion carry over; ``rebuild`` lists only ``extra_versions``
    (rotation re-signs every targets record, so the chain is rebuilt from them).
    """
    root, run_id = current_root(reg, owner)
    extra = dict(extra_versions or {})
    for _ in range(PUBLISH_ROUNDS):
        prev = _previous(reg, owner, root, run_id)
        prev_ts = prev[1] if prev else carry
        chain_of = None if rebuild else prev_ts
        new = {v: e for v, e in extra.items() if rebuild or C.lookup(reg, chain_of, int(v)) is None}
        if scan and not rebuild:
            latest = _latest(chain_of)
            numbers = [int(v) for v in extra]
            bound = {"after": latest or 0, "upto": max(numbers)} if numbers else {}

            def listed(v, chain_of=chain_of, new=new):
                return str(v) in new or C.lookup(reg, chain_of, v) is not None

            new.update(C.ready_targets(reg, root, listed, **bound))
        pointer, count = C.append(reg, run_id, chain_of, new)
        latest = max([int(v) for v in new] + ([_latest(chain_of)] if _latest(chain_of) else []),
                     default=None)  # fmt: skip
        all_aliases = {**(prev_ts.aliases if prev_ts else {}), **(aliases or {})}
        promo = promotion if promotion is not None else (prev_ts.promotion if prev_ts else None)
        wanted = set(all_aliases.values()) | ({latest} if latest else set())
        if promo is not None:
            wanted.add(int(promo["signed"]["key_version"]))
        head_src = None if rebuild else chain_of
        fresh = {**extra, **new}
        heads = {str(v): C.head_entry(reg, root, v, head_src, fresh) for v in sorted(wanted)}
        refs = IO.head_refs(SimpleNamespace(aliases=all_aliases, latest=latest, promotion=promo))
        C.upload_head_keys(reg, run_id, refs, IO.head_refs(prev_ts) if prev_ts else {}, heads)
        counter = max((prev_ts.counter + 1) if prev_ts else 1, int(time.time()))
        signed = {
            "_type": "timestamp",
            "spec": T.TIMESTAMP_SPEC,
            "model": reg.model_name,
            "counter": counter,
            "expires": T.iso(T.now() + expires),
            "root_version": root.version,
            "trust_run": run_id,
            "count": count,
            "latest": latest,
            "snapshot": pointer,
            "heads": heads,
            "aliases": all_aliases,
            "promotion": promo,
        }
        env = T.sign(signed, [signing_key(owner)])
        data = T.canonical(env)
        C.upload(reg, run_id, IO.TRUST_DIR, IO.TIMESTAMP_FILE, data)
        atomic_write_bytes(Path(owner.directory) / LOCAL_TIMESTAMP, data)
        # A concurrent publisher may have overwritten ours with a list lacking our versions:
        # read back, and sign again until the stored record holds everything we know of.
        back = IO.read_artifact(
            reg, run_id, f"{IO.TRUST_DIR}/{IO.TIMESTAMP_FILE}", max_bytes=T.MAX_TIMESTAMP_BYTES
        )  # (this is also the next publish's read of it: kept in the local copy below)
        stored = T.verify(
            T.parse(back, "timestamp", "timestamp record"),
            "timestamp",
            T.root_keys(root),
            root.threshold,
            "timestamp record",
        )
        if all(IO.version_entry(reg, stored, int(v)) is not None for v in new):
            return stored
        rebuild = False  # a concurrent writer's chain is the base of the next round
    raise RegistryError(
        f"timestamp of {reg.model_name!r} kept losing versions to concurrent writers after "
        f"{PUBLISH_ROUNDS} rounds; run `adaloc registry sign-timestamp` again"
    )


def _latest(ts) -> int | None:
    if ts is None:
        return None
    if isinstance(ts, T.TimestampV1):
        return max((int(v) for v in ts.versions), default=None)
    return ts.latest


def promote(
    reg,
    owner,
    version: int,
    *,
    co_signers=(),
    gate_override: bool = False,
    expires: timedelta = T.DEFAULT_TIMESTAMP_EXPIRY,
    aliases: dict | None = None,
    extra_versions: dict | None = None,
) -> T.TimestampSigned:
    """Sign "production = key version ``version``" (with co-signers when the root asks for 2).

    The promotion goes into the next timestamp together with ``extra_versions`` and
    ``aliases`` (publish + promote is one signed step).
    """
    root, run_id = current_root(reg, owner)
    entry = (extra_versions or {}).get(str(version))
    if entry is None:
        prev = _previous(reg, owner, root, run_id)
        entry = C.lookup(reg, prev[1] if prev else None, version)
        if entry is None:
            kv = reg.resolve(version, with_metrics=False)
            got = C.signed_targets(reg, root, version, kv.run_id)
            entry = got[0] if got else None
    if entry is None:
        raise NotFoundError(
            f"key version {version} of {reg.model_name!r} has no owner-signed targets record; "
            "only published versions can be promoted"
        )
    what = f"targets record of key version {version}"
    data = IO.read_artifact(
        reg,
        entry["run_id"],
        f"{R.KEY_DIR}/{IO.TARGETS_FILE}",
        max_bytes=entry["length"],
        sha256=entry["sha256"],
        length=entry["length"],
        label=what,
    )
    tg_env = T.parse(data, "targets", what)
    tg = T.verify(tg_env, "targets", T.root_keys(root), 1, what)
    entry = {**C.entry_only(entry), "record": tg_env}
    if not tg.gate.passed and not gate_override:
        raise TrustError(
            f"key version {version} failed the quality gate (signed verdict); pass "
            "--override-gate to promote it anyway (recorded in the signed promotion)"
        )
    signed = {
        "_type": "promotion",
        "spec": T.SPEC_VERSION,
        "model": reg.model_name,
        "alias": "production",
        "key_version": version,
        "gate_override": bool(gate_override and not tg.gate.passed),
        "issued": T.iso(T.now()),
    }
    keys = [signing_key(owner), *(signing_key(c) for c in co_signers)]
    env = T.sign(signed, keys)
    T.verify(env, "promotion", T.root_keys(root), root.promote_threshold, "promotion")
    return sign_timestamp(
        reg,
        owner,
        promotion=env,
        expires=expires,
        aliases=aliases,
        extra_versions={**(extra_versions or {}), str(version): entry},
    )


def rotate_root(
    reg,
    old_owner,
    new_owner,
    *,
    add_public: list[bytes] = (),
    promote_threshold: int = 1,
    revoke_old: bool = False,
) -> T.RootSigned:
    """Root v(N+1) naming ``new_owner``'s key (+ extras), signed by the old and the new key.

    ``revoke_old`` drops the old key entirely (sealed blobs it signed are refused from then
    on); otherwise it is retired: it signs no record, its old sealed blobs stay readable,
    and the old keyring's recipient key moves into ``new_owner`` for opening the owner
    copies sealed before (``OwnerKeyring.retire_recipients_from``).
    Targets and the timestamp are re-signed with the new key.
    """
    root, run_id = current_root(reg, old_owner)
    old_key, new_key = signing_key(old_owner), signing_key(new_owner)
    if not revoke_old:  # the new keyring must still open the owner copies sealed so far
        new_owner.retire_recipients_from(old_owner)
    retired = dict(root.retired)
    if not revoke_old:
        retired.update(root.keys)
    signed = T.make_root(
        reg.model_name,
        [new_key],
        version=root.version + 1,
        extra_public=list(add_public),
        promote_threshold=promote_threshold,
        retired=retired,
    )
    env = T.sign(signed, [old_key, new_key])
    new_root = T.next_root(root, env, f"root record v{root.version + 1}")
    reg.__dict__.pop("_roots", None)  # the cached chain ends one root too early now
    prev = _previous(reg, old_owner, root, run_id)
    C.upload(reg, run_id, IO.TRUST_DIR, f"root-{new_root.version}.json", T.canonical(env))
    versions, carry, promotion = {}, None, None
    if prev:
        carry = prev[1]
        listed = (
            prev[1].versions if isinstance(prev[1], T.TimestampV1) else IO.all_entries(reg, prev[1])
        )
        for v, entry in listed.items():
            tg_env = _targets_env(reg, entry, root, int(v))
            versions[v] = publish_targets(
                reg, new_owner, run_id=entry.run_id, signed=tg_env["signed"]
            )
        if prev[1].promotion is not None:
            # Re-issued under the new key; a 2-key promotion must be co-signed again (promote).
            promotion = T.sign(prev[1].promotion["signed"], [new_key])
    sign_timestamp(
        reg, new_owner, extra_versions=versions, carry=carry, promotion=promotion, rebuild=True
    )
    return new_root


def _targets_env(reg, entry, root, version: int) -> dict:
    """The envelope of a listed targets record, hash-checked and verified before re-signing."""
    what = f"targets record of key version {version}"
    data = IO.read_artifact(
        reg, entry.run_id, f"{R.KEY_DIR}/{IO.TARGETS_FILE}", max_bytes=entry.length,
        sha256=entry.sha256, length=entry.length, label=what,
    )  # fmt: skip
    env = T.parse(data, "targets", what)
    tg = T.verify(env, "targets", T.root_keys(root), root.threshold, what)
    if tg.key_version != version:
        raise TrustError(f"{what} is signed for key version {tg.key_version}")
    return env
