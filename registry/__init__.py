"""Versioned key registry on MLflow (+ S3), sealed key versions and deployment sites.

Public API (import from ``registry``; names resolve lazily so ``import registry`` is cheap).

Errors (``registry.errors``; all subclass ``adaloc.errors.AdalocError`` via ``RegistryError``)::

    RegistryError            base class; the CLI prints ``str(err)`` as one line, exit 1
    NotFoundError            unknown version, alias, base, site or missing site/owner files
    IntegrityError           a stored artifact's sha256/size does not match what was published
    SignatureError           (IntegrityError) owner signature invalid: tampered or foreign bytes
    NotAuthorizedError       site is not a recipient (revoked / never added) or wrong site key
    BaseMismatchError        key version is for another base than the site's / the registry's
    RollbackError            version older than the installed one (pass allow_rollback=True)
    VersionConflictError     key version N already published with different content
    UnavailableError         tracking server / artifact store unreachable

Owner and site keys (``registry.sealing``, ``registry.keyring``)::

    generate_owner_keys(directory, *, overwrite=False) -> Path   # Ed25519 owner.key(0600)/.pub
                                                 #   + X25519 owner-recipient.key(0600)/.pub
    generate_site_keys(directory, *, overwrite=False) -> Path    # X25519 site.key(0600)/.pub
    key_fingerprint(public_key_pem: bytes) -> str                # short sha256 id of a public key
    class OwnerKeyring(directory)                # owner.key, owner.pub, sites.json in one folder
        .init(directory, *, overwrite=False) -> OwnerKeyring     # classmethod: new owner keys
        .add_site(site_id, public_key_pem | path) -> SiteEntry  # authorise a site
        .revoke_site(site_id) -> SiteEntry       # later versions are no longer sealed for it
        .sites(*, include_revoked=True) -> list[SiteEntry]   # SiteEntry(site_id, fingerprint,
                                                             #   added_at, revoked_at, public_key)
        .owner_public_pem -> bytes
        .seal(parts: dict[str, bytes], header: dict) -> bytes   # every non-revoked site + owner
        .recipient_key() -> X25519PrivateKey     # opens the owner's copy ("@owner") of a version
    open_owner_copy(reg, owner, version) -> (Key, token bytes | None)   # registry.owner_copy
    seal(parts, *, header, recipients: dict[site_id, pem], signing_key) -> bytes
    open_sealed(blob, *, site_id, site_private_key, owner_public_pem) -> (SealedHeader, parts)
    verify_sealed(blob, owner_public_pem) -> SealedHeader        # signature only, no decryption
    read_header(blob) -> SealedHeader                            # unverified, for inspection
    SealedHeader: format, key_version, parent, base_sha256, model_sha256, recipients, ...
      Sealed layout: MAGIC | u32 header len | header JSON (AEAD associated data) |
      AES-256-GCM ciphertext of the parts under a fresh data key | Ed25519 signature (64 B)
      over SIG_CONTEXT + sha256(body) (format 2; format 1: over the body, still read).
      The data key is wrapped per site with X25519 + HKDF-SHA256 + AES-256-GCM.

Registry (``registry.store``, ``registry.mlflow_io``)::

    embedded_uris(root) -> (tracking_uri, artifact_location)  # root/mlflow.db, root/artifacts
    class KeyRegistry(tracking_uri, model_name, *, artifact_location=None, registry_uri=None)
        .publish_base(directory, *, base_sha256=None, params=None, metrics=None, run_id=None)
            -> BaseVersion      # base.safetensors + model.json + sha256; `<name>-base`; idempotent
        .publish_key(key: adaloc.lock.Key | bytes, *, owner: OwnerKeyring, token=None,
                     version=None, parent=None, base_sha256=None, model_sha256=None,
                     metrics=None, params=None, data_version=None, code_version=None,
                     key_spec=None, aliases=(), run_id=None) -> KeyVersion
            # seals key (+ token.to_bytes()) for the authorised sites, stores it, verifies the
            # stored bytes, registers `<name>-key` version N as status=ready; idempotent and
            # safe to re-run after a crash (run tag `idempotency`, pending -> ready)
        .resolve(ref="production", *, with_metrics=True) -> KeyVersion  # number, "v3", alias,
                                                                        # or "latest"
        .base(base_sha256: str | None = None) -> BaseVersion       # latest ready base by default
        .history(*, with_metrics=False) -> list[KeyVersion]        # ready versions, oldest first
        .lineage(ref) -> list[KeyVersion]                          # ref, its parent, ..., root
        .set_alias(alias, ref) / .promote(ref, alias="production") -> KeyVersion
        .verify(ref, *, owner_public_pem=None) -> dict             # sha256 (+ signature) checks
        .download_key(kv, dst_dir) -> Path / .download_base(bv, dst_dir) -> Path   # folders
    KeyVersion: version, parent, base_sha256, artifact_sha256, model_sha256, sealed_bytes,
                key_bytes, data_version, code_version, key_spec, aliases, run_id,
                mlflow_version, metrics, tags; to_dict()
    BaseVersion: mlflow_version, base_sha256, file_sha256, bytes, run_id, source; to_dict()

Deployment site (``registry.site``)::

    class Site(directory)
        .init(directory, *, site_id, tracking_uri, model_name, owner_public_pem,
              registry_uri=None, overwrite=False) -> Site      # classmethod; makes site keys
        .public_key_pem -> bytes                              # hand to the owner (keys site-add)
        .pull(ref="production", *, allow_rollback=False, progress=None) -> PullResult
            # resolve -> base once (cached, sha256) -> sealed key (sha256 vs tag) -> verify
            # signature, base match, monotonic version -> decrypt -> adaloc.lock.apply_key
            # (= unlock without building a module; the cached base is not re-hashed: the
            # signed model sha256 covers it) -> check the owner's model sha256 ->
            # atomic model/model.safetensors + state.json. Any failure: previous model untouched.
        .status(*, online=True) -> dict     # installed + available (cached when offline)
        .set_tracking_uri(uri, registry_uri=None)  # registry moved / proxy; keys unchanged
        .model_path -> Path ; .installed() -> dict | None
    PullResult: version, previous, base_sha256, model_sha256, bytes_base, bytes_key,
                seconds (per phase), changed; to_dict()
    progress: optional callable (label: str, done_bytes: int, total_bytes: int | None) -> None

Loader (``registry.loader``)::

    load_model(site_dir | Site, *, device=None, verify=True) -> LoadedModel   # also Site.load_model
    LoadedModel: model (nn.Module, eval, on device), version, base_sha256, model_sha256, card,
                 token, device; preprocess(x) (checks [N,C,H,W] in [0,1], stamps the token),
                 answer(x) -> (logits, version), logits(x), predict(x) -> list[int],
                 keyed_bytes, lock (read side: a request; write side: a swap)
    swap_key(current, site_dir, *, pulled=None) -> LoadedModel  # writes the next installed
                                                  # key's positions in place (adaloc serve's
                                                  # swap); pulled=PullResult: its key in memory

Loopback servers (``registry.local_servers``; tests, bench, demos)::

    moto_s3(bucket) -> ctx[S3Endpoint(url, bucket)]     # sets MLFLOW_S3_ENDPOINT_URL + dummy creds
    mlflow_server(root, *, s3=None, s3_url=None)
        -> ctx[MlflowServer(tracking_uri, artifacts_destination, log)]
    shaped_link(target_url, *, mbit=None, rtt_ms=0) -> ctx[ShapedLink(url, stats, .shape())]
        # pacing TCP proxy on 127.0.0.1: a link of given rate / RTT without root (benchmarks)

CLI (``pipelines/registry_cli.py``, typer sub-apps to mount in ``pipelines/cli.py``)::

    registry_app: adaloc registry ls | show REF | lineage REF | promote REF [--alias] | verify REF
    site_app:     adaloc site init DIR ... | pull [REF] [--allow-rollback] | status [--offline]
    keys_app:     adaloc keys owner-init DIR | site-add ID PUB | site-ls | site-revoke ID
    every command: --json for machine-readable output; user errors -> one line on stderr, exit 1
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "RegistryError": "registry.errors",
    "NotFoundError": "registry.errors",
    "IntegrityError": "registry.errors",
    "SignatureError": "registry.errors",
    "NotAuthorizedError": "registry.errors",
    "BaseMismatchError": "registry.errors",
    "RollbackError": "registry.errors",
    "VersionConflictError": "registry.errors",
    "UnavailableError": "registry.errors",
    "generate_owner_keys": "registry.sealing",
    "generate_site_keys": "registry.sealing",
    "key_fingerprint": "registry.sealing",
    "seal": "registry.sealing",
    "open_sealed": "registry.sealing",
    "verify_sealed": "registry.sealing",
    "read_header": "registry.sealing",
    "SealedHeader": "registry.sealing",
    "OwnerKeyring": "registry.keyring",
    "SiteEntry": "registry.keyring",
    "KeyRegistry": "registry.store",
    "KeyVersion": "registry.store",
    "BaseVersion": "registry.store",
    "embedded_uris": "registry.mlflow_io",
    "Site": "registry.site",
    "load_model": "registry.loader",
    "LoadedModel": "registry.loader",
    "PullResult": "registry.site",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Import the submodule that defines ``name`` on first use (keeps import cheap)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'registry' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
