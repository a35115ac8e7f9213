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
import tempfile
from pathlib import Path

from mlflow.exceptions import MlflowException

from adaloc.formats import BASE_FILE, MODEL_CARD_FILE, sha256_bytes, sha256_file
from registry import records as R
from registry import release, trust_io
from registry.errors import (
    BaseMismatchError,
    IntegrityError,
    NotFoundError,
    RegistryError,
    TrustError,
)
from registry.mlflow_io import MlflowStore, git_sha
from registry.publish import KeyPublishing, _base_file_entries
from registry.records import BaseVersion, KeyVersion
from registry.sealing import read_header, verify_sealed
from registry.trust import DEFAULT_TIMESTAMP_EXPIRY

_MISSING_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


class KeyRegistry(KeyPublishing, MlflowStore):
    """Registered models `<name>-base` and `<name>-key` in one MLflow experiment `<name>`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.timestamp_expiry = DEFAULT_TIMESTAMP_EXPIRY  # re-signed by the retrain flow
        # base sha256 -> targets entries computed from the owner's own files (publish_base)
        self._local_bases: dict[str, dict] = {}

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
                self._remember_base(bv, base_file, card_file)
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
        bv = self.base(base_sha256)
        self._remember_base(bv, base_file, card_file)
        return bv

    def _remember_base(self, bv: BaseVersion, base_file: Path, card_file: Path) -> None:
        """Keep the owner's own file hashes of this base for the targets records it signs."""
        if sha256_file(base_file) == bv.file_sha256 and base_file.stat().st_size == bv.bytes:
            card = card_file.read_bytes()
            stored = trust_io.read_artifact(
                self, bv.run_id, f"{R.BASE_DIR}/{MODEL_CARD_FILE}", max_bytes=len(card),
                sha256=sha256_bytes(card), length=len(card),
            )  # fmt: skip
            if stored == card:
                self._local_bases[bv.base_sha256] = _base_file_entries(bv, card)

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
            try:
                kv = KeyVersion.from_model_version(
                    mv, aliases=by_version.get(int(mv.version), []), metrics=metrics
                )
            except (TypeError, ValueError):
                continue  # tags are not numbers: not a version this registry wrote (a hint only)
            out.append(kv)
        return sorted(out, key=lambda kv: kv.version)

    def resolve(self, ref: int | str = "production", *, with_metrics: bool = True) -> KeyVersion:
        """A ready key version by number (``3``, ``"3"``, ``"v3"``), ``"latest"`` or alias."""
        text = str(ref).strip()
        number = text[1:] if text[:1] in "vV" and text[1:].isdigit() else text
        if number.isdigit():
            kv = self._by_number(int(number))
        elif text == "latest":
            versions = self.history(with_aliases=with_metrics)  # a site needs neither
            kv = self._pick("latest", versions)
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

    def _by_number(self, version: int, *, explain: bool = True) -> KeyVersion:
        """One request: model version ``version``, refused unless it is ready (``explain``:
        the error lists the ready versions, one listing on that path only)."""

        def missing():
            if explain:
                return self._pick(version, self.history(with_aliases=False))  # raises
            raise NotFoundError(f"key version {version} not found in {self.key_name!r}")

        try:
            mv = self.client.get_model_version(self.key_name, str(version))
        except MlflowException as err:
            if err.error_code not in _MISSING_CODES:
                raise
            return missing()
        if mv.tags.get(R.STATUS) != R.READY:
            return missing()
        try:
            return KeyVersion.from_model_version(mv, aliases=list(getattr(mv, "aliases", []) or []))
        except (TypeError, ValueError) as err:
            raise NotFoundError(f"key version {version} of {self.key_name!r} is not one "
                                "this registry wrote") from err  # fmt: skip

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

    def set_alias(self, alias: str, ref: int | str, *, owner=None, **promote_kw) -> KeyVersion:
        """Point ``alias`` at a ready key version: an owner-signed act (timestamp record).

        The MLflow alias is moved too, as a hint for people and the UI; sites read only the
        signed record. ``production`` is a signed promotion (see :meth:`promote`).
        """
        if alias.isdigit() or alias in ("latest",) or alias[:1] in "vV" and alias[1:].isdigit():
            raise RegistryError(f"alias {alias!r} would shadow a version reference; pick a name")
        if owner is None:
            raise TrustError(
                f"moving alias {alias!r} is an owner-signed act: pass the owner's keyring "
                "(`--owner-dir DIR` holding owner.key)"
            )
        kv = self.resolve(ref)
        if alias == "production":
            release.promote(self, owner, kv.version, expires=self.timestamp_expiry, **promote_kw)
        else:
            release.sign_timestamp(
                self, owner, aliases={alias: kv.version}, expires=self.timestamp_expiry
            )
        self._move_aliases(kv.mlflow_version, [alias])
        return self.resolve(kv.version)

    def promote(self, ref: int | str, alias: str = "production", *, owner=None, **kw) -> KeyVersion:
        """Sign "``alias`` (default production) = key version ``ref``" with the owner key."""
        return self.set_alias(alias, ref, owner=owner, **kw)

    def sign_timestamp(self, owner) -> int:
        """Re-sign the timestamp (new expiry, counter + 1); returns the new counter."""
        return release.sign_timestamp(self, owner, expires=self.timestamp_expiry).counter

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
        """Re-check a key version as a site would: signed timestamp and targets, stored
        sealed key (length, sha256, owner signature), header vs targets, base."""
        if not owner_public_pem:
            raise TrustError(
                "verify needs a trusted owner public key (--owner-pub owner.pub): without it "
                "nothing can be checked"
            )
        from registry.trust import anchor_root, seal_keys

        anchor = anchor_root(self.model_name, owner_public_pem)
        _, ts, root, _ = trust_io.newest_timestamp(self, anchor)
        trust_io.check_fresh(ts)
        version = trust_io.resolve_ref(ts, root, ref)
        tg = trust_io.read_targets(self, ts, root, version)
        entry = tg.files["key.sealed"]
        blob = trust_io.read_artifact(
            self, entry.run_id, entry.path, max_bytes=entry.length, sha256=entry.sha256,
            length=entry.length, label=f"sealed key v{version}",
        )  # fmt: skip
        owner = read_header(blob).owner
        pem = seal_keys(root).get(owner)
        if pem is None:
            raise TrustError(f"key version {version} is sealed by key {owner}, not a root key")
        header = verify_sealed(blob, pem.encode())
        if header.key_version != version or header.base_sha256 != tg.base_sha256:
            raise BaseMismatchError(
                f"key version {version}: sealed header says version {header.key_version} base "
                f"{header.base_sha256[:12]}, the signed targets say {tg.base_sha256[:12]}"
            )
        checks = {
            "root_version": root.version,
            "timestamp_counter": ts.counter,
            "timestamp_expires": ts.expires.isoformat(),
            "artifact_sha256": entry.sha256,
            "signature": owner,
            "base_sha256": tg.base_sha256,
            "base_version": tg.base_version,
            "gate_passed": tg.gate.passed,
        }
        return {"version": version, "ok": True, "checks": checks}
