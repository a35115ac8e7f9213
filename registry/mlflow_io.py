"""MLflow plumbing shared by the registry: experiment, idempotent runs, versions, downloads.

Every MLflow call sits in a small named method so the publication protocol in
``registry.store`` reads as a sequence of steps.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import mlflow.artifacts
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from registry import records as R
from registry.errors import NotFoundError, RegistryError

# How long a new model version may stay PENDING_REGISTRATION (MLflow's own default wait).
REGISTRATION_TIMEOUT_S = 300


def embedded_uris(root: str | Path) -> tuple[str, str]:
    """Embedded default: (sqlite tracking URI, local artifact location) under ``root``."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()


def git_sha(directory: str | Path | None = None) -> str:
    """Code version: the git commit of ``directory`` (+dirty), or 'unknown' outside git."""
    cwd = Path(directory or Path(__file__).resolve().parent.parent)
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


class MlflowStore:
    """An MLflow experiment ``model_name`` plus its registered models."""

    def __init__(
        self,
        tracking_uri: str,
        model_name: str,
        *,
        artifact_location: str | None = None,
        registry_uri: str | None = None,
    ):
        self.tracking_uri = tracking_uri
        self.model_name = model_name
        self.artifact_location = artifact_location
        self.registry_uri = registry_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
        self.base_name, self.key_name = f"{model_name}-base", f"{model_name}-key"
        self._experiment_id: str | None = None

    def _experiment(self) -> str:
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.model_name)
            if exp is None:
                self._experiment_id = self.client.create_experiment(
                    self.model_name, artifact_location=self.artifact_location
                )
            else:
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    def _set_version_tags(self, name: str, version: str, tags: dict) -> None:
        """Model version tags, sent concurrently through the registry client: MlflowClient's
        own ``set_model_version_tag`` asks for the registered model first on every call (its
        prompt check), which doubled a publish's requests; the tags are hints, never trust."""
        from concurrent.futures import ThreadPoolExecutor

        registry = self.client._get_registry_client()
        if len(tags) <= 1:
            for k, v in tags.items():
                registry.set_model_version_tag(name, version, k, v)
            return
        with ThreadPoolExecutor(max_workers=4) as pool:
            for f in [pool.submit(registry.set_model_version_tag, name, version, k, v)
                      for k, v in tags.items()]:  # fmt: skip
                f.result()

    def _ensure_registered_model(self, name: str, description: str) -> None:
        known = self.__dict__.setdefault("_known_models", set())
        if name in known:
            return
        known.add(name)
        try:
            self.client.get_registered_model(name)
        except MlflowException:
            try:
                self.client.create_registered_model(name, description=description)
            except MlflowException:
                self.client.get_registered_model(name)  # created concurrently: fine

    def _versions(self, name: str) -> list:
        # An unknown name yields []; any other failure (server down) must surface, not
        # masquerade as "nothing published".
        return list(self.client.search_model_versions(f"name='{name}'"))

    def _aliases(self, name: str) -> dict[str, int]:
        try:
            model = self.client.get_registered_model(name)
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                return {}
            raise
        return {a: int(v) for a, v in model.aliases.items()}

    def _find_or_create_run(self, idem: str, run_id: str | None, name: str, tags: dict):
        """The run holding this publication: given, found by idempotency tag, or new."""
        if run_id is not None:
            self.client.log_batch(
                run_id, tags=[RunTag(k, v) for k, v in {**tags, R.IDEMPOTENCY: idem}.items()]
            )
            return self.client.get_run(run_id)
        found = self.client.search_runs(
            [self._experiment()], filter_string=f"tags.{R.IDEMPOTENCY} = '{idem}'"
        )
        if found:
            return found[0]
        tags = {**tags, R.IDEMPOTENCY: idem, R.STATUS: R.PENDING}
        return self.client.create_run(self._experiment(), run_name=name, tags=tags)

    def _log_once(self, run, params: dict | None, metrics: dict | None) -> None:
        """Log params/metrics the run does not have yet (a retry adds no second point)."""
        now = int(time.time() * 1000)
        new_params = [
            Param(k, str(v)) for k, v in (params or {}).items() if k not in run.data.params
        ]
        new_metrics = [
            Metric(k, float(v), now, 0)
            for k, v in (metrics or {}).items()
            if k not in run.data.metrics and v is not None
        ]
        if new_params or new_metrics:
            self.client.log_batch(run.info.run_id, metrics=new_metrics, params=new_params)

    def _download(self, artifact_uri: str, dst: str | Path) -> Path:
        """Download one artifact (file or folder) by URI: one request, no run lookup."""
        try:
            got = mlflow.artifacts.download_artifacts(
                artifact_uri=artifact_uri,
                dst_path=str(dst),
                tracking_uri=self.tracking_uri,
                registry_uri=self.registry_uri,
            )
        except (MlflowException, OSError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise NotFoundError(f"artifact {artifact_uri} cannot be downloaded: {first}") from err
        return Path(got)

    def _register(self, name: str, run_id: str, source: str, tags: dict) -> object:
        for mv in self.client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
            return mv  # registered by an earlier try of this publication
        # MLflow's own wait logs an INFO line per version; wait here instead, quietly.
        mv = self.client.create_model_version(
            name, source, run_id=run_id, tags={**tags, R.STATUS: R.PENDING}, await_creation_for=0
        )
        deadline = time.monotonic() + REGISTRATION_TIMEOUT_S
        while mv.status == "PENDING_REGISTRATION" and time.monotonic() < deadline:
            time.sleep(0.2)
            mv = self.client.get_model_version(name, str(mv.version))
        if mv.status != "READY":
            raise RegistryError(f"{name} version {mv.version} did not register: {mv.status}")
        return mv

    def _mark_ready(self, name: str, mv, run_id: str) -> None:
        self._set_version_tags(name, str(mv.version), {R.STATUS: R.READY})
        self.client.set_tag(run_id, R.STATUS, R.READY)
