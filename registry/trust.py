"""Signed release records (TUF roles mapped onto adaloc): root, targets, timestamp, promotion.

Every record is an envelope ``{"signed": {...}, "signatures": [{"keyid", "sig"}]}``; the
signatures are Ed25519 over the canonical JSON of ``signed`` (sorted keys, no spaces,
UTF-8), so a byte-identical record is re-derivable by anyone and verifiable by a site.

- root: the owner signing keys (fingerprint -> PEM), the record threshold, the promotion
  threshold, retired keys (their old sealed blobs stay readable) and a version; root N+1 is
  accepted only when signed by ``threshold`` keys of root N *and* of itself.
- targets (one per key version): every file a site installs with length + sha256, the base
  it needs and the quality gate's verdict.
- timestamp (spec 2, small: its size does not grow with the number of versions): a counter
  that only grows, an expiry, the root version, the aliases, the embedded promotion record,
  the *heads* (the versions ``latest``, ``production`` and the aliases name, each with the
  length + sha256 of its targets record **and** of the sealed key that record names, so a
  site fetches both in one round), and a pointer (run, path, length, sha256) to the newest
  snapshot shard.
- snapshot shards (TUF's snapshot role, split): the full list of key versions with the
  length + sha256 of each targets record, in append-only shards of at most ``SHARD_SIZE``
  versions. Each shard names the previous one by length + sha256, and the timestamp names
  the newest: a hash chain rooted in the signed timestamp, so shards need no signature of
  their own, are immutable once full (content-addressed, cached by sha256) and a publish
  rewrites one shard of <= ``SHARD_SIZE`` entries: O(1) in the number of versions.
- promotion: "key version N is production", signed by ``promote_threshold`` root keys.

Spec 1 timestamps (one record listing every version) are refused by sites with a one-line
error; the owner's next publish or ``adaloc registry sign-timestamp`` migrates them (the
version list is read from the old, verified record into shards).

Pure functions over dicts and bytes: no MLflow, no files. The pydantic models check shape.
"""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from registry.errors import ExpiredError, TrustError
from registry.sealing import key_fingerprint, public_pem_of

SPEC_VERSION = 2  # timestamp + snapshot shards; root/targets/promotion unchanged since 1
TIMESTAMP_SPEC = 2
SHARD_SIZE = 128  # versions per snapshot shard (the newest is rewritten per publish)
MAX_SHARD_BYTES = 1 << 20
DEFAULT_TIMESTAMP_EXPIRY = timedelta(days=7)
DEFAULT_ROOT_EXPIRY = timedelta(days=365)
# Ceilings before a signed length is known (a timestamp or root names no length for itself).
# A spec-2 timestamp is small (heads <= 64); spec-1 ones read for migration may be larger.
MAX_ROOT_BYTES = 256 * 1024
MAX_TIMESTAMP_BYTES = 512 * 1024  # spec 2: < fetch.DIRECT_MIN_BYTES, one request
MAX_TIMESTAMP_V1_BYTES = 4 * 1024 * 1024  # spec 1 (read by the owner to migrate it)
MAX_ROOT_ROTATIONS = 64

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Fingerprint = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]
RunId = Annotated[str, StringConstraints(pattern=r"^[0-9A-Za-z_-]{1,64}$")]
# Artifact paths a record may name: fixed folders, plain file names (no "..", no "/" games).
ArtifactPath = Annotated[str, StringConstraints(pattern=r"^(base|key)/[A-Za-z0-9_.-]{1,64}$")]
ShardPath = Annotated[str, StringConstraints(pattern=r"^trust/snapshots/[0-9a-f]{64}\.json$")]
VersionKey = Annotated[str, StringConstraints(pattern=r"^[1-9][0-9]{0,8}$")]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Strict):
    """One file a site installs: where it is (run + path) and what it must be."""

    run_id: RunId
    path: ArtifactPath
    length: int = Field(ge=0, le=1 << 40)
    sha256: Sha256


class Gate(_Strict):
    """The quality gate's verdict, signed with the version it judges."""

    passed: bool
    metrics: dict[str, float] = Field(default_factory=dict)


class RootSigned(_Strict):
    """Which owner keys are trusted, and how many must sign."""

    type: Literal["root"] = Field(alias="_type")
    spec: int = SPEC_VERSION
    model: str
    version: int = Field(ge=1)
    expires: datetime
    keys: dict[Fingerprint, str]
    threshold: int = Field(ge=1)
    promote_threshold: int = Field(ge=1)
    retired: dict[Fingerprint, str] = Field(default_factory=dict)


class TargetsSigned(_Strict):
    """Everything a site installs for one key version."""

    type: Literal["targets"] = Field(alias="_type")
    spec: int = SPEC_VERSION
    model: str
    key_version: int = Field(ge=1)
    parent: int | None = None
    base_sha256: Sha256
    base_version: int = Field(ge=1)
    model_sha256: Sha256 | Literal[""]  # "" when the publisher gave none (export can't check)
    token: bool
    files: dict[Literal["base.safetensors", "model.json", "key.sealed"], FileEntry]
    gate: Gate
    issued: datetime


class VersionEntry(_Strict):
    """The timestamp's pointer to one version's targets record."""

    run_id: RunId
    length: int = Field(ge=1, le=1 << 20)
    sha256: Sha256


class HeadEntry(VersionEntry):
    """A version the timestamp names directly (latest, production, aliases): its targets
    record's pointer and the record itself (an envelope whose canonical bytes must have that
    length and sha256), so a site reads no targets file for them."""

    record: dict


class ShardPointer(_Strict):
    """Where a snapshot shard is and what it must be (length + sha256)."""

    run_id: RunId
    path: ShardPath
    length: int = Field(ge=1, le=MAX_SHARD_BYTES)
    sha256: Sha256


class SnapshotShard(_Strict):
    """Up to SHARD_SIZE versions' targets pointers; ``prev`` chains to the older shard."""

    type: Literal["snapshot"] = Field(alias="_type")
    spec: int = SPEC_VERSION
    model: str
    shard: int = Field(ge=0)
    count: int = Field(ge=1)  # versions in this shard and all older ones
    versions: dict[VersionKey, VersionEntry] = Field(max_length=SHARD_SIZE)
    prev: ShardPointer | None = None


class PromotionSigned(_Strict):
    """Key version N is what ``production`` means."""

    type: Literal["promotion"] = Field(alias="_type")
    spec: int = SPEC_VERSION
    model: str
    alias: Literal["production"] = "production"
    key_version: int = Field(ge=1)
    gate_override: bool = False
    issued: datetime


class TimestampSigned(_Strict):
    """The current state: counter, expiry, heads, newest snapshot shard (spec 2)."""

    type: Literal["timestamp"] = Field(alias="_type")
    spec: Literal[2] = TIMESTAMP_SPEC
    model: str
    counter: int = Field(ge=1)
    expires: datetime
    root_version: int = Field(ge=1)
    trust_run: RunId  # the run the owner writes its trust records to (a site's fast path)
    count: int = Field(ge=0)  # versions in the snapshot chain
    latest: int | None = Field(default=None, ge=1)
    snapshot: ShardPointer | None = None
    heads: dict[VersionKey, HeadEntry] = Field(default_factory=dict, max_length=64)
    aliases: dict[str, int] = Field(default_factory=dict)
    promotion: dict | None = None  # an envelope of PromotionSigned


class TimestampV1(_Strict):
    """A spec-1 timestamp (every version listed): read only by the owner, to migrate it."""

    type: Literal["timestamp"] = Field(alias="_type")
    spec: Literal[1] = 1
    model: str
    counter: int = Field(ge=1)
    expires: datetime
    root_version: int = Field(ge=1)
    versions: dict[VersionKey, VersionEntry]
    aliases: dict[str, int] = Field(default_factory=dict)
    promotion: dict | None = None


_MODELS = {
    "root": RootSigned,
    "targets": TargetsSigned,
    "timestamp": TimestampSigned,
    "promotion": PromotionSigned,
    "timestamp-v1": TimestampV1,
    "snapshot": SnapshotShard,
}


def canonical(obj) -> bytes:
    """Canonical JSON: sorted keys, no insignificant whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def now() -> datetime:
    """Timezone-aware current time (second resolution, as records store it)."""
    return datetime.now(UTC).replace(microsecond=0)


def iso(t: datetime) -> str:
    """ISO-8601 UTC text of ``t`` as stored in records."""
    return t.astimezone(UTC).isoformat(timespec="seconds")


def sign(signed: dict, keys: list[Ed25519PrivateKey]) -> dict:
    """Envelope of ``signed`` with one Ed25519 signature per (distinct) key."""
    body, sigs, seen = canonical(signed), [], set()
    for key in keys:
        keyid = key_fingerprint(public_pem_of(key))
        if keyid not in seen:
            seen.add(keyid)
            sigs.append({"keyid": keyid, "sig": base64.b64encode(key.sign(body)).decode()})
    return {"signed": signed, "signatures": sigs}


def parse(data: bytes, role: str, what: str) -> dict:
    """Decode an envelope from bytes; TrustError (one line) for garbage or a wrong shape."""
    try:
        env = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise TrustError(f"{what} is not a signed {role} record (not JSON: {err})") from err
    if (
        not isinstance(env, dict)
        or not isinstance(env.get("signed"), dict)
        or not isinstance(env.get("signatures"), list)
    ):
        raise TrustError(f"{what} is not a signed {role} record (expected signed + signatures)")
    return env


def _shape(signed: dict, role: str, what: str):
    if signed.get("_type") != role.removesuffix("-v1"):
        raise TrustError(f"{what} is a {signed.get('_type')!r} record, expected {role!r}")
    if role == "timestamp" and signed.get("spec") != TIMESTAMP_SPEC:
        raise TrustError(
            f"{what} has spec {signed.get('spec')!r}, this site reads spec {TIMESTAMP_SPEC} "
            "(a small timestamp + snapshot shards): the registry was published by an older "
            "adaloc; the owner migrates it with `adaloc registry sign-timestamp`"
        )
    try:
        return _MODELS[role].model_validate(signed)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise TrustError(f"{what}: field {loc!r} {first['msg'].lower()}") from err


def verify(env: dict, role: str, keys: dict[str, str], threshold: int, what: str):
    """Check >= ``threshold`` valid signatures by distinct ``keys``; return the typed record."""
    if not isinstance(env, dict) or not isinstance(env.get("signed"), dict):
        raise TrustError(f"{what} is not a signed {role} record")
    record = _shape(env["signed"], role, what)
    body, good = canonical(env["signed"]), set()
    for s in env.get("signatures") or []:
        if not isinstance(s, dict):
            continue
        keyid, pem = s.get("keyid"), keys.get(str(s.get("keyid")))
        if pem is None or keyid in good:
            continue
        try:
            pub = serialization.load_pem_public_key(pem.encode())
            if isinstance(pub, Ed25519PublicKey):
                pub.verify(base64.b64decode(str(s.get("sig")), validate=True), body)
                good.add(keyid)
        except (InvalidSignature, ValueError):
            continue
    if len(good) < threshold:
        raise TrustError(
            f"{what} has {len(good)} valid owner signature(s), needs {threshold}: not signed by "
            f"the owner keys this site trusts ({', '.join(sorted(keys)) or 'none'})"
        )
    return record


def parse_shard(data: bytes, pointer: ShardPointer, model: str, what: str) -> SnapshotShard:
    """A snapshot shard from bytes already checked against ``pointer`` (length + sha256)."""
    env = parse_plain(data, what)
    shard = _shape(env, "snapshot", what)
    check_model(shard, model, what)
    if shard.prev is None and shard.count != len(shard.versions):
        raise TrustError(f"{what} counts {shard.count} versions but holds {len(shard.versions)}")
    return shard


def parse_plain(data: bytes, what: str) -> dict:
    """A JSON object from bytes (hash-pinned records carry no envelope)."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise TrustError(f"{what} is not JSON ({err})") from err
    if not isinstance(obj, dict):
        raise TrustError(f"{what} is not a JSON object")
    return obj


def check_expiry(record, what: str, at: datetime | None = None) -> None:
    """ExpiredError when ``record.expires`` has passed (a frozen registry or a lapsed owner)."""
    at = at or now()
    if record.expires <= at:
        raise ExpiredError(
            f"{what} expired at {iso(record.expires)} (now {iso(at)}): the registry is frozen "
            "or the owner has not re-signed it; ask the owner to run the retrain flow "
            "(or `adaloc registry sign-timestamp`)"
        )


def check_model(record, model: str, what: str) -> None:
    """TrustError when a record is for another model than this site's."""
    if record.model != model:
        raise TrustError(f"{what} is for model {record.model!r}, this site pulls {model!r}")


def root_keys(root: RootSigned) -> dict[str, str]:
    """Keys that may sign records under ``root``."""
    return dict(root.keys)


def seal_keys(root: RootSigned) -> dict[str, str]:
    """Keys whose signature on a sealed key blob is accepted (current + retired, not revoked)."""
    return {**root.retired, **root.keys}


def make_root(
    model: str,
    signers: list[Ed25519PrivateKey],
    *,
    version: int = 1,
    extra_public: list[bytes] = (),
    threshold: int = 1,
    promote_threshold: int = 1,
    retired: dict[str, str] | None = None,
    expires: timedelta = DEFAULT_ROOT_EXPIRY,
) -> dict:
    """The signed part of a root record naming ``signers`` (+ ``extra_public``) as owner keys."""
    if not _NAME.match(model):
        raise TrustError(f"model name {model!r} cannot be named in a record")
    pems = [public_pem_of(k) for k in signers] + list(extra_public)
    keys = {key_fingerprint(p): p.decode() for p in pems}
    if promote_threshold > len(keys) or threshold > len(keys):
        raise TrustError(
            f"threshold {max(threshold, promote_threshold)} needs that many keys, root has "
            f"{len(keys)}; add keys with --add-key"
        )
    return {
        "_type": "root",
        "spec": SPEC_VERSION,
        "model": model,
        "version": version,
        "expires": iso(now() + expires),
        "keys": keys,
        "threshold": threshold,
        "promote_threshold": promote_threshold,
        "retired": {k: v for k, v in (retired or {}).items() if k not in keys},
    }


def anchor_root(model: str, owner_public_pem: bytes) -> RootSigned:
    """The root a fresh site starts from: the owner.pub it was given at init, version 0."""
    fp = key_fingerprint(owner_public_pem)
    return RootSigned.model_construct(
        type="root",
        spec=SPEC_VERSION,
        model=model,
        version=0,
        expires=now() + timedelta(days=36500),
        keys={fp: owner_public_pem.decode()},
        threshold=1,
        promote_threshold=1,
        retired={},
    )


def next_root(trusted: RootSigned, env: dict, what: str) -> RootSigned:
    """Root N+1, accepted only when signed by the threshold of root N and of itself."""
    new = verify(
        env, "root", root_keys(trusted), trusted.threshold, f"{what} (by root v{trusted.version})"
    )
    verify(env, "root", root_keys(new), new.threshold, f"{what} (by its own keys)")
    if new.version != trusted.version + 1:
        raise TrustError(f"{what} has version {new.version}, expected {trusted.version + 1}")
    if new.model != trusted.model:
        raise TrustError(f"{what} is for model {new.model!r}, not {trusted.model!r}")
    return new
