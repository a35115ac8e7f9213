"""Length-capped artifact downloads: the registry is untrusted transport.

MLflow's ``download_artifacts`` reads a file to its end, whatever its size, so a bucket
writer could feed a site endless data. Here each file is streamed through the same
artifact repository MLflow would use, and the stream is cut one byte after ``max_bytes``:
  - ``mlflow-artifacts:`` / http(s) (proxied by ``mlflow server``): a streamed GET, or for
    files >= 1 MiB a ranged GET of a presigned URL when the server offers them
  - ``s3://``: a ranged GetObject (the endpoint never sends more than the range)
  - local paths / ``file://``: a bounded read
Other schemes fall back to MLflow's download plus a size check afterwards.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import time
from collections.abc import Callable
from pathlib import Path

from registry.errors import IntegrityError, LimitError, RegistryError, UnavailableError
from registry.progress import Progress

CHUNK = 1 << 20
# Bounded retries for transient transport errors (no retry library is in the dependency
# set; three attempts with a short backoff are all a pull should spend on a flaky link).
ATTEMPTS, BACKOFF_S = 3, (0.5, 2.0)
DIRECT_MIN_BYTES = 1 << 20  # smaller files come through the server's proxy (one request)
_DIRECT_OK: dict[str, bool] = {}  # server host -> offers presigned downloads
_SESSION = None  # one keep-alive session for presigned GETs (no TCP set-up per file)


def _session():
    global _SESSION
    if _SESSION is None:
        import requests

        _SESSION = requests.Session()
    return _SESSION


def _repo(artifact_dir: str, tracking_uri: str | None, registry_uri: str | None):
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(
        artifact_dir, tracking_uri=tracking_uri, registry_uri=registry_uri
    )


def _direct(repo, name: str, max_bytes: int):
    """A presigned GET straight from the bucket (capped by a Range header), or None when the
    server offers none. Large files only: through the proxy they cross the network twice
    (bucket -> server, whole, then server -> client); MLflow's own download of large files
    takes this route too (``MlflowArtifactsRepository._download_file``), whose private
    helpers are reused because MLflow has no public streamed variant."""
    from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository

    if max_bytes < DIRECT_MIN_BYTES or not isinstance(repo, MlflowArtifactsRepository):
        return None
    host = repo._host_creds.host
    if host not in _DIRECT_OK:  # one /server-info request per server and process
        try:
            _DIRECT_OK[host] = bool(repo._is_multipart_download_enabled())
        except Exception:  # noqa: BLE001 - an older or odd server: the proxy serves it
            _DIRECT_OK[host] = False
    if not _DIRECT_OK[host]:
        return None
    try:
        signed = repo._get_presigned_download_url(name)
        resp = _session().get(
            signed.url, headers={**(signed.headers or {}), "Range": f"bytes=0-{max_bytes}"},
            stream=True, timeout=60,
        )  # fmt: skip
        resp.raise_for_status()
    except Exception:  # noqa: BLE001 - no presigned URL for this file: the proxy serves it
        return None
    return resp


def _http_chunks(repo, name: str, max_bytes: int, probe: bool = False):
    from mlflow.utils.rest_utils import augmented_raise_for_status, http_request

    direct = _direct(repo, name, max_bytes)
    if direct is not None:
        try:
            yield from direct.iter_content(chunk_size=CHUNK)
        finally:
            direct.close()
        return

    # The proxied download endpoint is what HttpArtifactRepository._download_file calls; the
    # repository exposes no streamed reader, so its host credentials are reused here. A probe
    # turns off MLflow's own retries: the server answers 500 for a missing file, which it
    # would retry with exponential backoff for minutes.
    retries = {"max_retries": 0} if probe else {}
    resp = http_request(repo._host_creds, posixpath.join("/", name), "GET", stream=True, **retries)
    try:
        augmented_raise_for_status(resp)
        yield from resp.iter_content(chunk_size=CHUNK)
    finally:
        resp.close()


def _s3_chunks(repo, name: str, max_bytes: int, probe: bool = False):
    bucket, prefix = repo.parse_s3_compliant_uri(repo.artifact_uri)
    body = repo._get_s3_client().get_object(
        Bucket=bucket, Key=posixpath.join(prefix, name), Range=f"bytes=0-{max_bytes}"
    )["Body"]
    try:
        while chunk := body.read(CHUNK):
            yield chunk
    finally:
        body.close()


def _local_chunks(repo, name: str, max_bytes: int, probe: bool = False):
    with open(Path(repo.artifact_dir) / name, "rb") as f:
        while chunk := f.read(min(CHUNK, max_bytes + 1)):
            yield chunk


def _fallback_chunks(repo, name: str, max_bytes: int, probe: bool = False):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        got = Path(repo.download_artifacts(name, dst_path=tmp))
        yield from _local_file(got, max_bytes)


def _local_file(path: Path, max_bytes: int):
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def _chunks_for(repo) -> Callable:
    from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
    from mlflow.store.artifact.s3_artifact_repo import S3ArtifactRepository

    if isinstance(repo, HttpArtifactRepository):
        return _http_chunks
    if isinstance(repo, S3ArtifactRepository):
        return _s3_chunks
    if isinstance(repo, LocalArtifactRepository):
        return _local_chunks
    return _fallback_chunks


def fetch(
    artifact_uri: str,
    dst: Path,
    *,
    max_bytes: int,
    expect_sha256: str | None = None,
    expect_length: int | None = None,
    tracking_uri: str | None = None,
    registry_uri: str | None = None,
    label: str = "",
    progress: Progress | None = None,
    attempts: int = ATTEMPTS,
    durable: bool = True,
) -> Path:
    """Stream ``artifact_uri`` to ``dst`` (0600), at most ``max_bytes``; check length/sha256.

    LimitError past the cap, IntegrityError on a wrong length or hash (``dst`` removed),
    UnavailableError after ``attempts`` tries on transport errors (1: a probe that may miss).
    ``durable=False`` skips the fsync: for temp files and caches whose every read re-checks
    the signed hash (a torn file after a crash is refused and fetched again).
    """
    directory, name = artifact_uri.rstrip("/").rsplit("/", 1)
    what = label or name
    for attempt in range(attempts):
        try:
            return _fetch_once(
                _repo(directory, tracking_uri, registry_uri),
                name,
                dst,
                max_bytes,
                expect_sha256,
                expect_length,
                what,
                progress,
                attempts == 1,
                durable,
            )
        except RegistryError:
            raise
        except Exception as err:  # noqa: BLE001 - requests/boto/mlflow raise many types
            Path(dst).unlink(missing_ok=True)
            if attempt + 1 >= attempts:
                first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
                raise UnavailableError(
                    f"download of {what} failed after {attempts} attempt(s) ({first}); "
                    "the installed version is unchanged, try again later"
                ) from err
            time.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
    raise AssertionError("unreachable")


def _fetch_once(
    repo, name, dst, max_bytes, expect_sha256, expect_length, what, progress, probe, durable
):
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    digest, done = hashlib.sha256(), 0
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in _chunks_for(repo)(repo, name, max_bytes, probe):
                done += len(chunk)
                if done > max_bytes:
                    raise LimitError(
                        f"{what} is longer than its limit of {max_bytes} bytes: tampered in "
                        "the registry or an endless-data attack; download stopped"
                    )
                f.write(chunk)
                digest.update(chunk)
                if progress:
                    progress(what, done, expect_length)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        if expect_length is not None and done != expect_length:
            raise IntegrityError(
                f"{what} is {done} bytes, the signed length is {expect_length}: tampered or "
                "truncated in the registry"
            )
        if expect_sha256 is not None and digest.hexdigest() != expect_sha256:
            raise IntegrityError(
                f"{what} has sha256 {digest.hexdigest()[:12]}, the signed one is "
                f"{expect_sha256[:12]}: tampered or corrupted in the registry"
            )
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    return dst
