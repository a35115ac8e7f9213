"""Publishing a key version: seal, store, sign the targets record and the timestamp.

The key version number is MLflow's model version number of ``<name>-key`` (reserved by the
server when the publication registers, so two concurrent publishers never share one).
Steps (each safe to re-run after a crash; the run's idempotency tag finds the earlier try):
  1. find or create the run; register (reserve) the model version as status=pending
  2. seal the key (+ token) under that number for the authorised sites; store and verify it
  3. tag the version; sign and store ``key/targets.json``; tag ready
  4. sign a new timestamp listing the version (and its aliases; production is a promotion)
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from adaloc.formats import BASE_FILE, MODEL_CARD_FILE, sha256_bytes
from registry import records as R
from registry import release, trust_io
from registry.errors import (
    IntegrityError,
    NotFoundError,
    RegistryError,
    VersionConflictError,
)
from registry.fetch import fetch
from registry.keyring import OWNER_RECIPIENT_ID, OwnerKeyring
from registry.mlflow_io import git_sha
from registry.records import BaseVersion, KeyVersion
from registry.sealing import read_header, verify_sealed


def canonical_safetensors(data: bytes) -> bytes:
    """Byte-stable form of a safetensors blob: its header JSON re-serialized with sorted keys.

    adaloc's encode_key is byte-deterministic already; this keeps the idempotency id stable
    for raw key bytes from other writers, whose safetensors metadata order may vary.
    """
    import struct

    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
    except (struct.error, ValueError):
        return data
    return json.dumps(header, sort_keys=True).encode() + data[8 + n :]


def _as_bytes(obj) -> bytes | None:
    if obj is None or isinstance(obj, bytes):
        return obj
    return obj.to_bytes()


class KeyPublishing:
    """Mixin of KeyRegistry: the key publication protocol."""

    def publish_key(
        self,
        key,
        *,
        owner: OwnerKeyring,
        token=None,
        version: int | None = None,
        parent: int | None = None,
        base_sha256: str | None = None,
        model_sha256: str | None = None,
        metrics: dict | None = None,
        params: dict | None = None,
        data_version: str | None = None,
        code_version: str | None = None,
        key_spec: dict | str | None = None,
        aliases: tuple[str, ...] | list[str] = (),
        run_id: str | None = None,
        gate: bool | None = None,
        auto_version: bool = False,
    ) -> KeyVersion:
        """Seal ``key`` (+ token) for the authorised sites and publish it as a key version.

        The key version number is MLflow's model version number of ``<name>-key`` (one
        source, assigned atomically by the server): ``version`` (default: the key's own) is
        what the caller expects and is checked; ``auto_version=True`` takes whatever number
        the server hands out (concurrent publishers each get their own). Then the
        owner-signed targets record and timestamp are written.
        """
        from dataclasses import replace

        from adaloc.artifact import encode_key
        from adaloc.lock import Key

        if isinstance(key, bytes):
            if version is None or base_sha256 is None:
                raise RegistryError("publish_key needs version and base_sha256 for raw key bytes")
            from adaloc.artifact import decode_key

            key = decode_key(key)
        parent = key.parent if parent is None else parent
        base_sha256 = key.base_sha256 if base_sha256 is None else base_sha256
        version = None if auto_version else (key.version if version is None else version)
        if not isinstance(key, Key):
            raise RegistryError(f"publish_key needs an adaloc Key, got {type(key).__name__}")
        token_bytes = _as_bytes(token)
        base = self.base(base_sha256)
        idem = owner.idempotency_key(
            "key",
            self.model_name,
            str(version),
            str(parent),
            base_sha256,
            canonical_safetensors(encode_key(key)),
            *([canonical_safetensors(token_bytes)] if token_bytes else []),
        )
        # One lookup per number (not a listing of every version: publish stays O(1)).
        kv = self._ready_key_version(version) if version is not None else None
        if kv is not None:
            if self.client.get_run(kv.run_id).data.tags.get(R.IDEMPOTENCY) != idem:
                raise VersionConflictError(
                    f"key version {version} of {self.key_name!r} is already published with other "
                    "content; versions are immutable, publish without a fixed version (or the "
                    "next free number)"
                )
            self._signed_aliases(owner, kv.version, aliases)
            return self.resolve(version)
        if parent is not None and self._ready_key_version(parent) is None:
            raise NotFoundError(
                f"parent key version {parent} is not published in {self.key_name!r}"
            )
        if isinstance(key_spec, dict):
            key_spec = json.dumps(key_spec, sort_keys=True)
        run = self._find_or_create_run(
            idem, run_id, "key", {R.KIND: "key", R.BASE_SHA256: base_sha256}
        )
        run_id, source = run.info.run_id, f"{run.info.artifact_uri}/{R.KEY_DIR}"
        self._ensure_registered_model(self.key_name, f"Sealed key versions of {self.model_name}")
        fixed = {  # known before the number: set at creation (one request, not eight)
            R.PARENT: "" if parent is None else str(parent),
            R.BASE_SHA256: base_sha256,
            R.BASE_VERSION: str(base.mlflow_version),
            R.MODEL_SHA256: model_sha256 or "",
            R.TOKEN: "sealed" if token_bytes else "none",
            R.DATA_VERSION: data_version or "unknown",
            R.CODE_VERSION: code_version or git_sha(),
            R.KEY_SPEC: key_spec or "",
        }
        mv = self._register(self.key_name, run_id, source, fixed)
        number = int(mv.version)  # reserved: the server hands each publication its own number
        if version is not None and version != number:
            self.client.set_model_version_tag(self.key_name, str(number), R.STATUS, "aborted")
            raise VersionConflictError(
                f"key version {version} was asked for, but the registry's next number for "
                f"{self.key_name!r} is {number}; publish without a fixed version"
            )
        if parent is not None and parent >= number:
            raise RegistryError(f"parent {parent} must be older than key version {number}")
        key = replace(key, version=number, parent=parent)
        key_bytes = encode_key(key)
        self.client.set_tag(run_id, R.KEY_VERSION, str(number))
        self._log_once(run, params, {**(metrics or {}), "key_bytes": len(key_bytes)})
        parts = {"key": key_bytes} | ({"token": token_bytes} if token_bytes else {})
        header = {
            "model": self.model_name,
            "key_version": number,
            "parent": parent,
            "base_sha256": base_sha256,
            "model_sha256": model_sha256,
        }
        blob = self._store_sealed(run_id, source, owner, parts, header)
        sealed = read_header(blob)
        tags = {
            **fixed,
            R.KEY_VERSION: str(number),
            R.ARTIFACT_SHA256: sha256_bytes(blob),
            R.SEALED_BYTES: str(len(blob)),
            R.KEY_BYTES: str(len(key_bytes)),
            R.RECIPIENTS: ",".join(i for i in sealed.site_ids() if i != OWNER_RECIPIENT_ID),
            R.OWNER_COPY: "sealed" if OWNER_RECIPIENT_ID in sealed.site_ids() else "none",
            R.OWNER_KEY: sealed.owner,
        }
        changed = {k: v for k, v in tags.items() if mv.tags.get(k) != v}
        self._set_version_tags(self.key_name, str(number), changed)
        passed = gate if gate is not None else (metrics or {}).get("gate_passed", 1.0) != 0.0
        targets = {
            "_type": "targets",
            "spec": 1,  # the targets format is unchanged since spec 1
            "model": self.model_name,
            "key_version": number,
            "parent": parent,
            "base_sha256": base_sha256,
            "base_version": base.mlflow_version,
            "model_sha256": model_sha256 or "",
            "token": bool(token_bytes),
            "files": {
                **self._base_entries(owner, base),
                "key.sealed": {
                    "run_id": run_id,
                    "path": f"{R.KEY_DIR}/{R.SEALED_FILE}",
                    "length": len(blob),
                    "sha256": sha256_bytes(blob),
                },
            },
            "gate": {
                "passed": bool(passed),
                "metrics": {
                    k: float(v)
                    for k, v in (metrics or {}).items()
                    if isinstance(v, int | float) and k.endswith("_acc")
                },
            },
            "issued": _now_iso(),
        }
        entry = release.publish_targets(self, owner, run_id=run_id, signed=targets)
        self._mark_ready(self.key_name, mv, run_id)
        self._signed_aliases(owner, number, aliases, entry={str(number): entry})
        return self.resolve(number)

    def _ready_key_version(self, version: int):
        """The ready KeyVersion numbered ``version``, or None (one request)."""
        try:
            return self._by_number(int(version), explain=False)
        except NotFoundError:
            return None

    def _base_entries(self, owner, base: BaseVersion) -> dict:
        """Signed-file entries of the base: from this process's publish_base, an earlier
        owner-signed targets record, or (last resort) the stored base checked by its sha."""
        local = self._local_bases.get(base.base_sha256)
        if local is not None:
            return local
        try:
            root, _ = release.current_root(self, owner)
            _, ts, _, _ = trust_io.newest_timestamp(self, root)
            for v in sorted(ts.heads, key=int, reverse=True):  # any signed version will do
                tg = trust_io.read_targets(self, ts, root, int(v))
                if tg.base_sha256 == base.base_sha256:
                    return {n: tg.files[n].model_dump() for n in (BASE_FILE, MODEL_CARD_FILE)}
        except RegistryError:
            pass  # nothing signed yet for this base: check the stored copy below
        return self._checked_base_entries(base)

    def _checked_base_entries(self, base: BaseVersion) -> dict:
        from adaloc.artifact import decode_base_state
        from adaloc.errors import KeyFormatError
        from adaloc.lock import state_sha256

        with tempfile.TemporaryDirectory(prefix="adaloc-base-") as tmp:
            path = fetch(
                f"{base.source}/{BASE_FILE}", Path(tmp) / BASE_FILE, max_bytes=base.bytes,
                expect_sha256=base.file_sha256, tracking_uri=self.tracking_uri,
                registry_uri=self.registry_uri, label="base (owner check)",
            )  # fmt: skip
            try:
                ok = state_sha256(decode_base_state(path.read_bytes())) == base.base_sha256
            except KeyFormatError:
                ok = False
            if not ok:
                raise IntegrityError(
                    f"stored base of {self.base_name!r} is not base {base.base_sha256[:12]}"
                )
            card = fetch(
                f"{base.source}/{MODEL_CARD_FILE}", Path(tmp) / MODEL_CARD_FILE,
                max_bytes=1 << 20, tracking_uri=self.tracking_uri,
                registry_uri=self.registry_uri, label="model.json (owner check)",
            ).read_bytes()  # fmt: skip
        return _base_file_entries(base, card)

    def _signed_aliases(self, owner, version: int, aliases, entry: dict | None = None) -> None:
        """Sign the timestamp (new version + aliases); production is a signed promotion."""
        plain = {a: version for a in aliases if a != "production"}
        if "production" in aliases:  # one signed step: the new version and its promotion
            release.promote(
                self,
                owner,
                version,
                expires=self.timestamp_expiry,
                aliases=plain,
                extra_versions=entry,
            )
        else:
            release.sign_timestamp(
                self, owner, aliases=plain, expires=self.timestamp_expiry, extra_versions=entry
            )
        self._move_aliases(version, aliases)  # hints for the UI; sites ignore them

    def _store_sealed(
        self, run_id: str, source: str, owner: OwnerKeyring, parts: dict, header: dict
    ) -> bytes:
        """Seal and upload unless the run already holds a valid sealed blob; verify; return it."""
        owner_pem = owner.owner_public_pem
        path, uri = f"{R.KEY_DIR}/{R.SEALED_FILE}", f"{source}/{R.SEALED_FILE}"
        with tempfile.TemporaryDirectory() as tmp:
            stored = {f.path for f in self.client.list_artifacts(run_id, R.KEY_DIR)}
            blob = None
            if path in stored:
                # A crashed earlier attempt uploaded it: keep those bytes if they are sound.
                try:
                    old = self._download(uri, Path(tmp) / "old").read_bytes()
                    h = verify_sealed(old, owner_pem)
                    if (
                        h.key_version == header["key_version"]
                        and h.base_sha256 == header["base_sha256"]
                        and set(h.site_ids()) == set(owner.seal_recipients())
                    ):
                        blob = old
                except RegistryError:
                    blob = None
            if blob is None:
                blob = owner.seal(parts, header)
                local = Path(tmp) / "new" / R.SEALED_FILE
                local.parent.mkdir()
                local.write_bytes(blob)
                public = read_header(blob)
                (local.parent / R.HEADER_FILE).write_text(
                    json.dumps(_public_header(public), indent=2, sort_keys=True)
                )
                self.client.log_artifacts(run_id, str(local.parent), R.KEY_DIR)
            got = self._download(uri, Path(tmp) / "check").read_bytes()
            if got != blob:
                raise IntegrityError(f"stored {path} of run {run_id} differs from what was sent")
            verify_sealed(got, owner_pem)
        return blob


def _now_iso() -> str:
    from registry.trust import iso, now

    return iso(now())


def _base_file_entries(base: BaseVersion, card: bytes) -> dict:
    """Targets entries of a base whose file sha256 (``base.file_sha256``) has been checked."""
    return {
        BASE_FILE: {
            "run_id": base.run_id,
            "path": f"{R.BASE_DIR}/{BASE_FILE}",
            "length": base.bytes,
            "sha256": base.file_sha256,
        },
        MODEL_CARD_FILE: {
            "run_id": base.run_id,
            "path": f"{R.BASE_DIR}/{MODEL_CARD_FILE}",
            "length": len(card),
            "sha256": sha256_bytes(card),
        },
    }


def _public_header(header) -> dict:
    """Header fields worth showing in the UI; the wrapped data keys are left out for brevity."""
    return {
        "key_version": header.key_version,
        "parent": header.parent,
        "base_sha256": header.base_sha256,
        "model_sha256": header.model_sha256,
        "owner": header.owner,
        "recipients": [
            {"site_id": r["site_id"], "fingerprint": r["fingerprint"]} for r in header.recipients
        ],
        "parts": header.parts,
    }
