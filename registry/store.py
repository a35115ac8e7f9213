"""KeyRegistry: bases and sealed key versions as MLflow runs + registered model versions.

Publication protocol (atomic for readers, safe to re-run after a crash at any step):
  1. find the run tagged with the publication's idempotency id, or create it (status=pending)
  2. store the artifacts unless the run already holds valid ones (a retry reuses them)
  3. download what was stored and verify sha256 (and the owner signature for keys)
  4. find or create the registered model version (tagged status=pending)
  5. tag version and run status=ready, then move aliases
Readers (resolve/history/lineage/base) only ever return status=ready versions.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

from mlflow.exceptions import MlflowException

from adaloc.formats import BASE_FILE, MODEL_CARD_FILE, sha256_bytes, sha256_file
from registry import records as R
from registry.errors import (
    BaseMismatchError,
    IntegrityError,
    NotFoundError,
    RegistryError,
    VersionConflictError,
)
from registry.mlflow_io import MlflowStore, git_sha
from registry.records import BaseVersion, KeyVersion
from registry.sealing import key_fingerprint, read_header, verify_sealed
from registry.sites import OwnerKeyring

_MISSING_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def _canonical(data: bytes) -> bytes:
    """Byte-stable form of a safetensors blob: its header JSON re-serialized with sorted keys.

    adaloc's encode_key is byte-deterministic already; this keeps the idempotency id stable
    for raw key bytes from other writers, whose safetensors metadata order may vary.
    """
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


class KeyRegistry(MlflowStore):
    """Registered models `<name>-base` and `<name>-key` in one MLflow experiment `<name>`."""

    # -- base ------------------------------------------------------------------------------

    def publish_base(
        self,
        directory: str | Path,
        *,
        base_sha256: str | None = None,
        params: dict | None = None,
        metrics: dict | None = None,
        run_id: str | None = None,
    ) -> BaseVersion:
        """Publish base.safetensors + model.json (+ sha256.json) once; idempotent per base."""
        directory = Path(directory)
        base_file, card_file = directory / BASE_FILE, directory / MODEL_CARD_FILE
        for f in (base_file, card_file):
            if not f.is_file():
                raise NotFoundError(f"{f} not found; save the base with adaloc.artifact.save_base")
        if base_sha256 is None:
            from adaloc.artifact import load_base
            from adaloc.lock import state_sha256

            base_sha256 = state_sha256(load_base(directory)[0])
        file_sha, size = sha256_file(base_file), base_file.stat().st_size
        for bv in self.bases():
            if bv.base_sha256 == base_sha256:
                return bv
        # Keyed on the state sha only: re-saving the same base gives other file bytes.
        idem = sha256_bytes(f"base|{self.model_name}|{base_sha256}".encode())[:32]
        run = self._find_or_create_run(
            idem, run_id, f"base-{base_sha256[:8]}", {R.KIND: "base", R.BASE_SHA256: base_sha256}
        )
        run_id, source = run.info.run_id, f"{run.info.artifact_uri}/{R.BASE_DIR}"
        self._log_once(run, params, {**(metrics or {}), "base_bytes": size})
        with tempfile.TemporaryDirectory() as tmp:
            stored = {f.path for f in self.client.list_artifacts(run_id, R.BASE_DIR)}
            if f"{R.BASE_DIR}/{BASE_FILE}" not in stored:
                sha_file = Path(tmp) / R.BASE_SHA_FILE
                sha = {"base_sha256": base_sha256, "file_sha256": file_sha, "bytes": size}
                sha_file.write_text(json.dumps(sha, indent=2))
                for f in (card_file, sha_file, base_file):  # base last: it marks completion
                    self.client.log_artifact(run_id, str(f), R.BASE_DIR)
            got = self._download(f"{source}/{BASE_FILE}", tmp)
            if sha256_file(got) != file_sha:
                file_sha, size = self._adopt_stored_base(got, base_sha256, run_id)
        self._ensure_registered_model(self.base_name, f"Locked base of {self.model_name}")
        tags = {
            R.BASE_SHA256: base_sha256,
            R.BASE_FILE_SHA256: file_sha,
            R.BASE_BYTES: str(size),
            R.CODE_VERSION: git_sha(),
        }
        mv = self._register(self.base_name, run_id, source, tags)
        self._mark_ready(self.base_name, mv, run_id)
        return self.base(base_sha256)

    @staticmethod
    def _adopt_stored_base(path: Path, base_sha256: str, run_id: str) -> tuple[str, int]:
        """A crashed earlier attempt stored the same base with other file bytes: keep it."""
        from adaloc.artifact import decode_base_state
        from adaloc.errors import KeyFormatError
        from adaloc.lock import state_sha256

        try:
            same = state_sha256(decode_base_state(path.read_bytes())) == base_sha256
        except KeyFormatError:
            same = False
        if not same:
            raise IntegrityError(
                f"stored {BASE_FILE} of run {run_id} is not base {base_sha256[:12]}; "
                "delete that run and publish again"
            )
        return sha256_file(path), path.stat().st_size

    def bases(self) -> list[BaseVersion]:
        """Ready bases, oldest first."""
        out = [BaseVersion.from_model_version(mv) for mv in self._versions(self.base_name)]
        return sorted((b for b in out if b.status == R.READY), key=lambda b: b.mlflow_version)

    def base(self, base_sha256: str | None = None) -> BaseVersion:
        """The ready base with this sha256 (default: the latest one)."""
        bases = self.bases()
        if base_sha256 is not None:
            bases = [b for b in bases if b.base_sha256 == base_sha256]
        if not bases:
            which = f"with sha256 {base_sha256[:12]}" if base_sha256 else "at all"
            raise NotFoundError(
                f"no published base {which} in {self.base_name!r}; publish the base first"
            )
        return bases[-1]

    def download_base(self, bv: BaseVersion, dst_dir: str | Path) -> Path:
        """Download the base folder (base.safetensors, model.json, sha256.json) to dst_dir."""
        return self._download(bv.source, dst_dir)

    # -- key versions ----------------------------------------------------------------------

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
    ) -> KeyVersion:
        """Seal ``key`` (+ token) for the authorised sites and publish it as a key version."""
        if isinstance(key, bytes):
            key_bytes = key
        else:
            from adaloc.artifact import encode_key

            key_bytes = encode_key(key)
            version = key.version if version is None else version
            parent = key.parent if parent is None else parent
            base_sha256 = key.base_sha256 if base_sha256 is None else base_sha256
        if version is None or base_sha256 is None:
            raise RegistryError("publish_key needs version and base_sha256 for raw key bytes")
        if parent is not None and parent >= version:
            raise RegistryError(f"parent {parent} must be older than key version {version}")
        token_bytes = _as_bytes(token)
        base = self.base(base_sha256)
        parts = {"key": key_bytes} | ({"token": token_bytes} if token_bytes else {})
        idem = owner.idempotency_key(
            "key", self.model_name, str(version), base_sha256, *map(_canonical, parts.values())
        )
        existing = {kv.version: kv for kv in self.history(with_aliases=False)}
        if version in existing:
            kv = existing[version]
            if self.client.get_run(kv.run_id).data.tags.get(R.IDEMPOTENCY) != idem:
                raise VersionConflictError(
                    f"key version {version} of {self.key_name!r} is already published with other "
                    f"content; versions are immutable, publish version {max(existing) + 1}"
                )
            self._move_aliases(kv.mlflow_version, aliases)
            return self.resolve(version)
        if parent is not None and parent not in existing:
            raise NotFoundError(
                f"parent key version {parent} is not published in {self.key_name!r}"
            )
        if isinstance(key_spec, dict):
            key_spec = json.dumps(key_spec, sort_keys=True)
        run = self._find_or_create_run(
            idem, run_id, f"key-v{version}", {R.KIND: "key", R.KEY_VERSION: str(version)}
        )
        run_id, source = run.info.run_id, f"{run.info.artifact_uri}/{R.KEY_DIR}"
        self._log_once(run, params, {**(metrics or {}), "key_bytes": len(key_bytes)})
        header = {
            "model": self.model_name,
            "key_version": version,
            "parent": parent,
            "base_sha256": base_sha256,
            "model_sha256": model_sha256,
        }
        blob = self._store_sealed(run_id, source, owner, parts, header)
        self._ensure_registered_model(self.key_name, f"Sealed key versions of {self.model_name}")
        sealed = read_header(blob)
        tags = {
            R.KEY_VERSION: str(version),
            R.PARENT: "" if parent is None else str(parent),
            R.BASE_SHA256: base_sha256,
            R.BASE_VERSION: str(base.mlflow_version),
            R.ARTIFACT_SHA256: sha256_bytes(blob),
            R.MODEL_SHA256: model_sha256 or "",
            R.SEALED_BYTES: str(len(blob)),
            R.KEY_BYTES: str(len(key_bytes)),
            R.TOKEN: "sealed" if token_bytes else "none",
            R.DATA_VERSION: data_version or "unknown",
            R.CODE_VERSION: code_version or git_sha(),
            R.KEY_SPEC: key_spec or "",
            R.RECIPIENTS: ",".join(sealed.site_ids()),
            R.OWNER_KEY: sealed.owner,
        }
        mv = self._register(self.key_name, run_id, source, tags)
        self._mark_ready(self.key_name, mv, run_id)
        self._move_aliases(int(mv.version), aliases)
        return self.resolve(version)

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
                        and set(h.site_ids()) == set(owner.recipients())
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

    def _move_aliases(self, mlflow_version: int, aliases) -> None:
        for alias in aliases:
            self.client.set_registered_model_alias(self.key_name, alias, str(mlflow_version))

    def history(self, *, with_metrics: bool = False, with_aliases: bool = True) -> list[KeyVersion]:
        """Ready key versions, oldest first (pending/aborted publications are hidden)."""
        by_version: dict[int, list[str]] = {}
        for alias, v in (self._aliases(self.key_name) if with_aliases else {}).items():
            by_version.setdefault(v, []).append(alias)
        out = []
        for mv in self._versions(self.key_name):
            if mv.tags.get(R.STATUS) != R.READY:
                continue
            metrics = self.client.get_run(mv.run_id).data.metrics if with_metrics else None
            out.append(
                KeyVersion.from_model_version(
                    mv, aliases=by_version.get(int(mv.version), []), metrics=metrics
                )
            )
        return sorted(out, key=lambda kv: kv.version)

    def resolve(self, ref: int | str = "production", *, with_metrics: bool = True) -> KeyVersion:
        """A ready key version by number (``3``, ``"3"``, ``"v3"``), ``"latest"`` or alias."""
        text = str(ref).strip()
        number = text[1:] if text[:1] in "vV" and text[1:].isdigit() else text
        if number.isdigit() or text == "latest":
            versions = self.history(with_aliases=with_metrics)  # a site needs neither
            kv = self._pick(text if text == "latest" else int(number), versions)
        else:
            kv = self._by_alias(text)
        if with_metrics:
            kv.metrics = dict(self.client.get_run(kv.run_id).data.metrics)
        return kv

    def _pick(self, ref: int | str, versions: list[KeyVersion]) -> KeyVersion:
        if not versions:
            raise NotFoundError(f"no key version is published in {self.key_name!r} yet")
        if ref == "latest":
            return versions[-1]
        for kv in versions:
            if kv.version == ref:
                return kv
        raise NotFoundError(
            f"key version {ref} not found in {self.key_name!r} "
            f"(have {[kv.version for kv in versions]})"
        )

    def _by_alias(self, alias: str) -> KeyVersion:
        """One request: the alias's model version, refused unless it is ready."""
        try:
            mv = self.client.get_model_version_by_alias(self.key_name, alias)
        except MlflowException as err:
            if err.error_code not in _MISSING_CODES:
                raise  # unreachable server etc.: not the user's alias
            raise NotFoundError(
                f"alias {alias!r} is not set on {self.key_name!r}; "
                "set it with `adaloc registry promote VERSION --alias NAME`"
            ) from err
        if mv.tags.get(R.STATUS) != R.READY:
            raise NotFoundError(f"alias {alias!r} points to an unfinished publication; re-publish")
        return KeyVersion.from_model_version(mv)

    def lineage(self, ref: int | str) -> list[KeyVersion]:
        """``ref`` followed by its parent, grandparent, ... up to the first version."""
        by_version = {kv.version: kv for kv in self.history(with_metrics=True)}
        chain, kv = [], self.resolve(ref)
        while kv is not None and len(chain) <= len(by_version):
            chain.append(kv)
            kv = by_version.get(kv.parent) if kv.parent is not None else None
        return chain

    def set_alias(self, alias: str, ref: int | str) -> KeyVersion:
        """Point ``alias`` at a ready key version (aliases move; versions never change)."""
        if alias.isdigit() or alias in ("latest",) or alias[:1] in "vV" and alias[1:].isdigit():
            raise RegistryError(f"alias {alias!r} would shadow a version reference; pick a name")
        kv = self.resolve(ref)
        self._move_aliases(kv.mlflow_version, [alias])
        return self.resolve(kv.version)

    def promote(self, ref: int | str, alias: str = "production") -> KeyVersion:
        """Move ``alias`` (default ``production``) to key version ``ref``."""
        return self.set_alias(alias, ref)

    def download_key(self, kv: KeyVersion, dst_dir: str | Path) -> Path:
        """Download the sealed blob of ``kv``; check its size and sha256 against the tags."""
        path = self._download(f"{kv.source}/{R.SEALED_FILE}", dst_dir)
        data = path.read_bytes()
        if len(data) != kv.sealed_bytes or sha256_bytes(data) != kv.artifact_sha256:
            raise IntegrityError(
                f"stored key version {kv.version} does not match its published sha256 "
                f"{kv.artifact_sha256[:12]} ({len(data)} bytes, expected {kv.sealed_bytes}): "
                "tampered or corrupted in the artifact store"
            )
        return path

    def verify(self, ref: int | str, *, owner_public_pem: bytes | None = None) -> dict:
        """Re-check a key version: stored sha256/size, header vs tags, base, signature."""
        kv = self.resolve(ref)
        checks = {}
        with tempfile.TemporaryDirectory() as tmp:
            blob = self.download_key(kv, tmp).read_bytes()
        checks["artifact_sha256"] = kv.artifact_sha256
        header = verify_sealed(blob, owner_public_pem) if owner_public_pem else read_header(blob)
        checks["signature"] = key_fingerprint(owner_public_pem) if owner_public_pem else "skipped"
        if header.key_version != kv.version or header.parent != kv.parent:
            raise IntegrityError(
                f"key version {kv.version}: sealed header says version {header.key_version} "
                f"parent {header.parent}, tags say parent {kv.parent}"
            )
        if header.base_sha256 != kv.base_sha256:
            raise BaseMismatchError(
                f"key version {kv.version}: sealed for base {header.base_sha256[:12]} but tagged "
                f"with base {kv.base_sha256[:12]}"
            )
        checks["base_version"] = self.base(kv.base_sha256).mlflow_version
        return {"version": kv.version, "ok": True, "checks": checks}


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
