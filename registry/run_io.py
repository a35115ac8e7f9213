"""Where a run's files are, for readers: artifact URIs with fewer lookups, one-request listings.

MLflow gives every run the artifact root ``<experiment artifact location>/<run id>/artifacts``
(``SqlAlchemyStore.create_run``). When the runs a search returned follow that pattern, the
root of another run of the experiment is derived instead of asked for (``get_run``: one round
trip less per run), and a fetch from a derived root that fails asks once and tries again.
URIs are transport only: every byte read through them is checked against signed hashes or
signatures, so a wrong URI can cost a request, never trust.
"""

from __future__ import annotations

from pathlib import Path

from registry.errors import UnavailableError
from registry.fetch import ATTEMPTS, fetch

ARTIFACTS = "artifacts"


def _uris(store) -> dict[str, str]:
    return store.__dict__.setdefault("_artifact_uris", {})


def url_cache(store) -> dict:
    """This store's presigned URLs of fixed-path files (see :mod:`registry.fetch`): a long-lived
    site keeps them, a new process asks again."""
    return store.__dict__.setdefault("_presigned_urls", {})


def experiment(store) -> tuple[str, str] | None:
    """(id, artifact location) of the model's experiment, or None; asked once per store."""
    got = store.__dict__.get("_read_experiment")
    if got is None:
        exp = store.client.get_experiment_by_name(store.model_name)
        if exp is None:
            return None
        got = store.__dict__["_read_experiment"] = (exp.experiment_id, exp.artifact_location)
    return got


def _derived(store, run_id: str) -> str | None:
    exp = store.__dict__.get("_read_experiment")
    if exp is None or not store.__dict__.get("_derive_uris"):
        return None
    return f"{exp[1].rstrip('/')}/{run_id}/{ARTIFACTS}"


def remember(store, run_id: str, uri: str) -> None:
    """Keep a run's artifact root as MLflow reported it; learn whether roots can be derived
    (every root seen so far follows the pattern)."""
    _uris(store)[run_id] = uri
    exp = store.__dict__.get("_read_experiment")
    if exp is not None:
        follows = uri == f"{exp[1].rstrip('/')}/{run_id}/{ARTIFACTS}"
        store.__dict__["_derive_uris"] = store.__dict__.get("_derive_uris", True) and follows


def artifact_uri(store, run_id: str) -> str:
    """A run's artifact root as MLflow reports it (cached per store: MLflow never changes it)."""
    uris = _uris(store)
    if run_id not in uris:
        remember(store, run_id, store.client.get_run(run_id).info.artifact_uri)
    return uris[run_id]


def list_dir(store, run_id: str, folder: str) -> set[str]:
    """Paths under ``folder`` of run ``run_id``: one request to the artifact store."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(
        artifact_uri(store, run_id), tracking_uri=store.tracking_uri,
        registry_uri=store.registry_uri,
    )  # fmt: skip
    return {f.path for f in repo.list_artifacts(folder)}


def fetch_file(store, run_id: str, path: str, dst: Path, *, attempts: int = ATTEMPTS, **kw):
    """:func:`registry.fetch.fetch` of ``path`` in run ``run_id`` (a derived root that fails
    is asked for, then fetched again with the usual retries)."""
    known = _uris(store).get(run_id)
    uri = known or _derived(store, run_id)
    common = {"tracking_uri": store.tracking_uri, "registry_uri": store.registry_uri, **kw}
    if uri is None:
        return fetch(f"{artifact_uri(store, run_id)}/{path}", dst, attempts=attempts, **common)
    try:
        got = fetch(f"{uri}/{path}", dst, attempts=attempts if known else 1, **common)
    except UnavailableError:
        if known:
            raise
        return fetch(f"{artifact_uri(store, run_id)}/{path}", dst, attempts=attempts, **common)
    _uris(store).setdefault(run_id, uri)
    return got
