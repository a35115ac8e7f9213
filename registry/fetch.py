"""Length-capped artifact downloads: the registry is untrusted transport.

MLflow's ``download_artifacts`` reads a file to its end, whatever its size, so a bucket
writer could feed a site endless data. Here each file is streamed through the same
artifact repository MLflow would use, and the stream is cut one byte after ``max_bytes``:
  - ``mlflow-artifacts:`` / http(s) (proxied by ``mlflow server``): a streamed GET, or for
    files >= 1 MiB a ranged GET of a presigned URL when the server offers them. A reader of a
    file at a fixed path (the timestamp, a head's key copy) passes a ``urls`` cache: its
    presigned URL is kept and reused, small files included, so a long-lived site reads them
    straight from the bucket in one request; past half its life a new one is asked for in
    the background, and one in its last seconds is not used
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

from registry.errors import (
    IntegrityError,
    LimitError,
    NotModifiedError,
    RegistryError,
    UnavailableError,
)
from registry.progress import Progress
from registry.workers import worker

CHUNK = 1 << 20
# Bounded retries for transient transport errors (no retry library is in the dependency
# set; three attempts with a short backoff are all a pull should spend on a flaky link).
ATTEMPTS, BACKOFF_S = 3, (0.5, 2.0)
DIRECT_MIN_BYTES = 1 << 20  # smaller files come through the server's proxy (one request)
URL_MARGIN_S = 30.0  # a cached presigned URL is not used in its last seconds (clock skew)
# A kept URL past half its life is still used, and a new one is asked for in the background:
# a site that polls more often than every half-TTL never waits on a presign round trip.
RENEW_AT = 0.5
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


def _expiry(url: str) -> float | None:
    """Epoch seconds when a SigV4 (S3, MinIO) or GCS V4 presigned URL expires, else None."""
    from datetime import UTC, datetime
    from urllib.parse import parse_qs, urlsplit

    q = parse_qs(urlsplit(url).query)
    for date, ttl in (("X-Amz-Date", "X-Amz-Expires"), ("X-Goog-Date", "X-Goog-Expires")):
        if date in q and ttl in q:
            try:
                at = datetime.strptime(q[date][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
                return at.timestamp() + int(q[ttl][0])
            except ValueError:
                return None
    return None


def _presign(repo, name: str, urls: dict | None, key: str):
    signed = repo._get_presigned_download_url(name)
    if urls is not None and (expires := _expiry(signed.url)) is not None:
        now, old = time.time(), urls.get(key) or {}
        urls[key] = {
            "url": signed.url,
            "headers": dict(signed.headers or {}),
            "expires": expires,
            "renew_at": now + RENEW_AT * max(expires - now, 0.0),
            "etag": old.get("etag"),  # (the file's, not the URL's: a renewal keeps it)
        }
    return signed


def _offers_direct(repo) -> bool:
    host = repo._host_creds.host
    if host not in _DIRECT_OK:  # one /server-info request per server and process
        try:
            _DIRECT_OK[host] = bool(repo._is_multipart_download_enabled())
        except Exception:  # noqa: BLE001 - an older or odd server: the proxy serves it
            _DIRECT_OK[host] = False
    return _DIRECT_OK[host]


def _get(url: str, headers: dict, max_bytes: int, etag: str | None = None):
    headers = {**headers, "Range": f"bytes=0-{max_bytes}"}
    if etag:
        headers["If-None-Match"] = etag
    return _session().get(url, headers=headers, stream=True, timeout=60)


def _cached(urls: dict | None, key: str, max_bytes: int, conditional: bool):
    """The response of a GET of the cached presigned URL of ``key``, or None (no usable URL,
    or the bucket refused it: dropped). NotModifiedError when ``conditional`` and the file
    still has the ETag this process last read."""
    hit = urls.get(key) if urls is not None else None
    if hit is None or hit["expires"] - time.time() < URL_MARGIN_S:
        if hit and hit["url"]:  # (not the placeholder of a first ask, still running)
            urls.pop(key, None)  # spent: the next read asks for a new one, small files too
        return None
    try:
        resp = _get(hit["url"], hit["headers"], max_bytes, hit.get("etag") if conditional else None)
    except Exception:  # noqa: BLE001 - the bucket is unreachable: the server may still serve
        urls.pop(key, None)
        return None
    if resp.status_code == 304:
        resp.close()
        raise NotModifiedError(f"{key} is unchanged since it was last read")
    if resp.status_code not in (200, 206):
        resp.close()
        urls.pop(key, None)  # expired early, revoked credentials, moved: ask the server again
        return None
    hit["etag"] = resp.headers.get("ETag")
    return resp


def _renew_ahead(repo, name: str, urls: dict | None, key: str) -> None:
    """Ask for a new URL of ``key`` in the background once the kept one is past half its
    life (once at a time; the kept one serves until then)."""
    hit = urls.get(key) if urls is not None else None
    if hit and not hit.get("renewing") and time.time() >= hit.get("renew_at", float("inf")):
        hit["renewing"] = True
        worker("presign").submit(_refresh, repo, name, urls, key)


def _direct(repo, name: str, max_bytes: int, urls: dict | None = None, conditional=False):
    """A presigned GET straight from the bucket (capped by a Range header), or None when the
    server offers none. Large files only, unless ``urls`` holds a valid presigned URL of
    the file: through the proxy they cross the network twice (bucket -> server, whole,
    then server -> client); MLflow's own download of large files takes this route too
    (``MlflowArtifactsRepository._download_file``), whose private helpers are reused
    because MLflow has no public streamed variant. With ``urls`` (a fixed-path file) the
    URL is kept; for a small file it is asked for in the background for the next read."""
    from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository

    if not isinstance(repo, MlflowArtifactsRepository):
        return None
    key = f"{repo.artifact_uri.rstrip('/')}/{name}"
    try:
        resp = _cached(urls, key, max_bytes, conditional)
    finally:  # (a 304 too: the URL was used)
        _renew_ahead(repo, name, urls, key)
    if resp is not None:
        return resp
    if max_bytes < DIRECT_MIN_BYTES:
        if urls is not None and key not in urls:
            urls[key] = {"url": "", "headers": {}, "expires": 0.0}  # asked for once at a time
            worker("presign").submit(_refresh, repo, name, urls, key)
        return None
    if not _offers_direct(repo):
        return None
    try:
        signed = _presign(repo, name, urls, key)
        resp = _get(signed.url, signed.headers or {}, max_bytes)
        resp.raise_for_status()
    except Exception:  # noqa: BLE001 - no presigned URL for this file: the proxy serves it
        return None
    if urls is not None and key in urls:
        urls[key]["etag"] = resp.headers.get("ETag")
    return resp


def _refresh(repo, name: str, urls: dict, key: str) -> None:
    try:
        if _offers_direct(repo):
            _presign(repo, name, urls, key)
            return
    except Exception:  # noqa: BLE001 - a cache fill: the proxy keeps serving the file
        pass
    hit = urls.get(key, {})
    if not hit.get("url"):
        urls.pop(key, None)
    else:
        hit.pop("renewing", None)  # (a failed renewal is tried again on a later read)


def _http_chunks(
    repo, name: str, max_bytes: int, probe: bool = False, urls=None, conditional=False
):
    from mlflow.utils.rest_utils import augmented_raise_for_status, http_request

    direct = _direct(repo, name, max_bytes, urls, conditional)
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


def _s3_chunks(repo, name: str, max_bytes: int, probe: bool = False, **_):
    bucket, prefix = repo.parse_s3_compliant_uri(repo.artifact_uri)
    body = repo._get_s3_client().get_object(
        Bucket=bucket, Key=posixpath.join(prefix, name), Range=f"bytes=0-{max_bytes}"
    )["Body"]
    try:
        while chunk := body.read(CHUNK):
            yield chunk
    finally:
        body.close()


def _local_chunks(repo, name: str, max_bytes: int, probe: bool = False, **_):
    with open(Path(repo.artifact_dir) / name, "rb") as f:
        while chunk := f.read(min(CHUNK, max_bytes + 1)):
            yield chunk


def _fallback_chunks(repo, name: str, max_bytes: int, probe: bool = False, **_):
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
    urls: dict | None = None,
    conditional: bool = False,
    observe: Callable[[bytes], None] | None = None,
) -> Path:
    """Stream ``artifact_uri`` to ``dst`` (0600), at most ``max_bytes``; check length/sha256.

    LimitError past the cap, IntegrityError on a wrong length or hash (``dst`` removed),
    UnavailableError after ``attempts`` tries on transport errors (1: a probe that may miss).
    ``durable=False`` skips the fsync: for temp files and caches whose every read re-checks
    the signed hash (a torn file after a crash is refused and fetched again).
    ``urls``: a per-reader cache of presigned URLs for files at fixed paths (see the module
    docstring); ``conditional``: with a cached URL, NotModifiedError when the file has the
    ETag last read through it (a poll that finds nothing new moves no bytes).
    ``observe``: called with each chunk as it arrives (a hash or a copy kept while the
    download waits on the network); single-attempt downloads only, so it sees one stream.
    """
    if observe is not None and attempts != 1:
        raise ValueError("fetch(observe=...) needs attempts=1: a retry would feed it twice")
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
                urls,
                conditional,
                observe,
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
    repo, name, dst, max_bytes, expect_sha256, expect_length, what, progress, probe, durable,
    urls=None, conditional=False, observe=None,
):  # fmt: skip
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    digest, done = hashlib.sha256(), 0
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            chunks = _chunks_for(repo)(repo, name, max_bytes, probe, urls=urls,
                                       conditional=conditional)  # fmt: skip
            for chunk in chunks:
                done += len(chunk)
                if done > max_bytes:
                    raise LimitError(
                        f"{what} is longer than its limit of {max_bytes} bytes: tampered in "
                        "the registry or an endless-data attack; download stopped"
                    )
                f.write(chunk)
                digest.update(chunk)
                if observe:
                    observe(chunk)
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
