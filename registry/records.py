"""What a reader gets back from the registry: base and key version records, tag names."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

# MLflow tag names, one place. Values are hashes, sizes and ids: never key or token material.
STATUS, READY, PENDING = "status", "ready", "pending"
IDEMPOTENCY = "idempotency"
KIND = "adaloc.kind"
KEY_VERSION = "key_version"
PARENT = "parent"
BASE_SHA256 = "base_sha256"
BASE_VERSION = "base_version"
BASE_FILE_SHA256 = "base_file_sha256"
BASE_BYTES = "base_bytes"
ARTIFACT_SHA256 = "artifact_sha256"
MODEL_SHA256 = "model_sha256"
SEALED_BYTES = "sealed_bytes"
KEY_BYTES = "key_bytes"
TOKEN = "token"
DATA_VERSION = "data_version"
CODE_VERSION = "code_version"
KEY_SPEC = "key_spec"
RECIPIENTS = "recipients"
OWNER_COPY = "owner_copy"  # "sealed": the owner's recipient key opens it (any worker can)
OWNER_KEY = "owner_key"

# Artifact paths inside a run.
KEY_DIR, SEALED_FILE, HEADER_FILE = "key", "key.sealed", "header.json"
BASE_DIR, BASE_SHA_FILE = "base", "sha256.json"


def _int_or_none(value: str | None) -> int | None:
    return None if value in (None, "", "None", "none") else int(value)


@dataclass
class BaseVersion:
    """One published base (`<name>-base` version)."""

    mlflow_version: int
    base_sha256: str
    file_sha256: str
    bytes: int
    run_id: str
    source: str
    status: str = READY

    @classmethod
    def from_model_version(cls, mv) -> BaseVersion:
        """Build from an MLflow ModelVersion of `<name>-base`."""
        t = mv.tags
        return cls(
            mlflow_version=int(mv.version),
            base_sha256=t.get(BASE_SHA256, ""),
            file_sha256=t.get(BASE_FILE_SHA256, ""),
            bytes=int(t.get(BASE_BYTES, 0)),
            run_id=mv.run_id,
            source=mv.source,
            status=t.get(STATUS, PENDING),
        )

    def to_dict(self) -> dict:
        """JSON-friendly dict."""
        return asdict(self)


@dataclass
class KeyVersion:
    """One published key version (`<name>-key` version): metadata only, never key material."""

    version: int
    parent: int | None
    base_sha256: str
    artifact_sha256: str
    sealed_bytes: int
    mlflow_version: int
    run_id: str
    source: str
    model_sha256: str | None = None
    key_bytes: int | None = None
    base_version: int | None = None
    data_version: str | None = None
    code_version: str | None = None
    key_spec: dict | None = None
    token: bool = False
    recipients: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    status: str = READY
    created_at: int | None = None

    @classmethod
    def from_model_version(
        cls, mv, *, aliases: list[str] | None = None, metrics: dict | None = None
    ) -> KeyVersion:
        """Build from an MLflow ModelVersion of `<name>-key`."""
        t = mv.tags
        spec = t.get(KEY_SPEC)
        try:
            spec = json.loads(spec) if spec else None
        except ValueError:
            spec = {"raw": spec}
        return cls(
            version=int(t.get(KEY_VERSION, 0)),
            parent=_int_or_none(t.get(PARENT)),
            base_sha256=t.get(BASE_SHA256, ""),
            artifact_sha256=t.get(ARTIFACT_SHA256, ""),
            sealed_bytes=int(t.get(SEALED_BYTES, 0)),
            mlflow_version=int(mv.version),
            run_id=mv.run_id,
            source=mv.source,
            model_sha256=t.get(MODEL_SHA256) or None,
            key_bytes=_int_or_none(t.get(KEY_BYTES)),
            base_version=_int_or_none(t.get(BASE_VERSION)),
            data_version=t.get(DATA_VERSION),
            code_version=t.get(CODE_VERSION),
            key_spec=spec,
            token=t.get(TOKEN) == "sealed",
            recipients=[r for r in t.get(RECIPIENTS, "").split(",") if r],
            aliases=sorted(aliases if aliases is not None else (mv.aliases or [])),
            metrics=dict(metrics or {}),
            status=t.get(STATUS, PENDING),
            created_at=mv.creation_timestamp,
        )

    def to_dict(self) -> dict:
        """JSON-friendly dict."""
        return asdict(self)


@dataclass(frozen=True)
class Verified:
    """What a pull has just verified and installed, kept in memory for a loader in the same
    process (``registry.loader.swap_key(..., pulled=)``): it swaps this in rather than
    reading back and re-checking the files the pull wrote a moment ago."""

    key: object  # adaloc.lock.Key, decoded from the decrypted, signature-checked blob
    card: bytes
    token: bytes | None


@dataclass
class PullResult:
    """What one pull did: versions, hashes, bytes downloaded and seconds per phase
    (``verified``: the installed key in memory when this pull installed one; not in
    :meth:`to_dict`)."""

    version: int
    previous: int | None
    changed: bool
    base_sha256: str
    model_sha256: str
    model_path: str
    bytes_base: int = 0
    bytes_key: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    verified: Verified | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """JSON-friendly dict (no key material)."""
        return {k: v for k, v in vars(self).items() if k != "verified"} | {
            "seconds": dict(self.seconds)
        }
