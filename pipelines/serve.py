"""`adaloc serve`: an HTTP inference server for a site's authorized model, with hot-swapped keys.

Routes (FastAPI): ``GET /healthz`` (200 once a model is loaded; the last refused pull's reason
in the body), ``GET /version``, ``POST /predict`` (``{"inputs": N x C x H x W floats in
[0, 1]}`` -> ``{"predictions": [...], "key_version": N}``; the installed token is stamped),
``GET /metrics`` (Prometheus), ``POST /admin/pull`` (from 127.0.0.1 / ::1 only).

Hot swap: the site pulls the new key version (verified by ``registry.site``), then
:func:`registry.loader.swap_key` writes only its key positions into the module in memory,
under the write side of the model's read-write lock. Each request holds the read side for
its whole forward pass and reads the version under it, so the swap waits for in-flight
requests to finish on the old values, and no request runs on a mix or is tagged with the
wrong version. A refused pull leaves the served version as it was.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel

log = logging.getLogger("adaloc.serve")
LOCALHOST = ("127.0.0.1", "::1", "localhost")
# What a pull imports that loading an installed model does not: MLflow's client and artifact
# repositories take seconds to import, which the first hot swap after a start used to pay.
PULL_MODULES = (
    "registry.store",
    "registry.fetch",
    "registry.run_io",
    "mlflow.store.artifact.artifact_repository_registry",
    "mlflow.store.artifact.mlflow_artifacts_repo",
    "mlflow.store.artifact.s3_artifact_repo",
    "mlflow.utils.rest_utils",
)


class PredictRequest(BaseModel):
    """``inputs``: nested lists shaped N x C x H x W (MLflow's scoring convention)."""

    inputs: list[Any]
    return_logits: bool = False  # also return the raw outputs (clients checking versions)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Metrics:
    """Prometheus metrics of one server (own registry: several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "adaloc_predict_requests", "predict requests", ["outcome"], registry=r
        )
        self.latency = Histogram("adaloc_predict_seconds", "predict latency", registry=r)
        self.version = Gauge("adaloc_key_version", "served key version", registry=r)
        self.swaps = Counter("adaloc_key_swaps", "hot swaps of the key version", registry=r)
        self.refused = Counter("adaloc_pull_refusals", "pulls refused by the site", registry=r)
        self.swap_seconds = Histogram(
            "adaloc_swap_seconds", "build + switch a new key version", registry=r
        )


class ModelServer:
    """The served key version of one site, and the pull + swap that replaces it."""

    def __init__(self, site_dir: str | Path, *, ref: str = "production", device: str | None = None):
        from registry.site import Site

        self.site = Site(Path(site_dir))
        self.ref, self.device = ref, device
        self.current = None  # registry.loader.LoadedModel; swapped in place under its lock
        self.swap_lock = threading.Lock()  # one pull + swap at a time
        self.last_refusal: dict | None = None
        self.last_swap: dict | None = None
        self.pull_path_ready = threading.Event()  # set once warm_pull_path has imported it
        self.metrics = Metrics()

    def load(self) -> None:
        """Load what the site has installed (pulling first if nothing is)."""
        from registry.loader import load_model

        with self.swap_lock:
            if self.site.installed() is None:
                self.site.pull(self.ref)
            self.current = load_model(self.site, device=self.device)
            self.metrics.version.set(self.current.version)
            log.info("serving key version %d", self.current.version)

    def pull(self) -> dict:
        """Pull ``ref``; hot-swap when a new verified version was installed. A refusal is
        logged and kept for /healthz; the served version does not change."""
        from adaloc.errors import AdalocError
        from registry.loader import swap_key

        with self.swap_lock:
            before = self.current.version if self.current else None
            t_pull = time.perf_counter()
            try:
                result = self.site.pull(self.ref)
                t0 = time.perf_counter()
                if self.current is None:
                    from registry.loader import load_model

                    new = load_model(self.site, device=self.device)
                elif result.version != self.current.version:
                    new = swap_key(self.current, self.site, pulled=result)  # in place, locked
                else:
                    new = self.current
            except AdalocError as err:
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                self.last_refusal = {"at": _now(), "reason": reason, "served": before}
                self.metrics.refused.inc()
                log.warning("pull refused, still serving key version %s: %s", before, reason)
                return {"changed": False, "key_version": before, "refused": reason}
            changed = new is not self.current or new.version != before
            self.current = new
            seconds = time.perf_counter() - t0
            if changed:
                self.last_refusal = None
                self.last_swap = {
                    "at": _now(), "from": before, "to": new.version, "seconds": seconds,
                    "pull_seconds": t0 - t_pull, "keyed_bytes": new.keyed_bytes,
                }  # fmt: skip
                self.metrics.swaps.inc()
                self.metrics.swap_seconds.observe(seconds)
                self.metrics.version.set(new.version)
                log.info("swapped key version %s -> %d in %.3f s", before, new.version, seconds)
            return {"changed": changed, "key_version": new.version, "previous": before}

    def warm_pull_path(self) -> None:
        """Import the pull path while requests are served, so the first swap is not slower."""
        import importlib

        for name in PULL_MODULES:
            try:
                importlib.import_module(name)
            except ImportError as err:  # the pull itself will say what is missing
                log.warning("pull path not warmed: %s", err)
                return
        self.pull_path_ready.set()

    def poll_forever(self, interval_s: float, stop: threading.Event) -> None:
        """Pull every ``interval_s`` seconds until ``stop`` is set."""
        while not stop.wait(interval_s):
            try:
                self.pull()
            except Exception as err:  # noqa: BLE001 - the poller must outlive any one failure
                log.warning("poll failed: %s", str(err).splitlines()[0] if str(err) else err)


def create_app(server: ModelServer, *, poll_s: float = 0.0) -> FastAPI:
    """The FastAPI app over ``server``; ``poll_s`` > 0 pulls on that interval."""
    stop = threading.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            server.load()
        except Exception as err:  # noqa: BLE001 - /healthz says why; the poller retries
            server.last_refusal = {"at": _now(), "reason": str(err).splitlines()[0], "served": None}
            log.warning("no model loaded yet: %s", server.last_refusal["reason"])
        threading.Thread(target=server.warm_pull_path, name="warm-pull", daemon=True).start()
        poller = None
        if poll_s > 0:
            poller = threading.Thread(target=server.poll_forever, args=(poll_s, stop), daemon=True)
            poller.start()
        yield
        stop.set()

    app = FastAPI(title="adaloc serve", lifespan=lifespan)

    @app.get("/healthz")
    def healthz():
        cur = server.current
        body = {
            "status": "ok" if cur else "no model",
            "key_version": cur.version if cur else None,
            "last_refused_pull": server.last_refusal,
        }
        return JSONResponse(body, status_code=200 if cur else 503)

    @app.get("/version")
    def version():
        cur = _loaded(server)
        cfg = server.site.config
        return {
            "key_version": cur.version,
            "base_sha256": cur.base_sha256,
            "model_sha256": cur.model_sha256,
            "model_name": cfg["model_name"],
            "site_id": cfg["site_id"],
            "token": cur.token is not None,
            "input_shape": list(cur.card.input_shape),
            "last_swap": server.last_swap,
            "pull_path_ready": server.pull_path_ready.is_set(),
        }

    @app.post("/predict")
    def predict(req: PredictRequest):
        from registry.loader import InputError

        cur = _loaded(server)
        t0 = time.perf_counter()
        try:  # under the model's read lock: one version computes and is named
            out, key_version = cur.answer(_tensor(req.inputs))
        except InputError as err:
            server.metrics.requests.labels("bad_input").inc()
            raise HTTPException(422, str(err)) from None
        body = {"predictions": out.argmax(1).tolist(), "key_version": key_version}
        if req.return_logits:
            body["logits"] = out.tolist()
        server.metrics.latency.observe(time.perf_counter() - t0)
        server.metrics.requests.labels("ok").inc()
        return body

    @app.get("/metrics")
    def metrics():
        return PlainTextResponse(
            generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST
        )

    @app.post("/admin/pull")
    def admin_pull(request: Request):
        if request.client is None or request.client.host not in LOCALHOST:
            raise HTTPException(403, "POST /admin/pull is accepted from localhost only")
        result = server.pull()
        return JSONResponse(result, status_code=409 if "refused" in result else 200)

    return app


def _loaded(server: ModelServer):
    cur = server.current
    if cur is None:
        reason = (server.last_refusal or {}).get("reason", "nothing installed")
        raise HTTPException(503, f"no model loaded: {reason}")
    return cur


def _tensor(inputs: list):
    import numpy as np
    import torch

    from registry.loader import InputError

    try:
        return torch.from_numpy(np.asarray(inputs, dtype=np.float32))
    except (ValueError, TypeError) as err:
        msg = f"inputs should be a rectangular N x C x H x W list of numbers ({err})"
        raise InputError(msg) from None


def serve(
    site_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    poll_s: float = 30.0,
    ref: str = "production",
    device: str | None = None,
) -> None:
    """Run the server until interrupted (uvicorn, one process)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    server = ModelServer(site_dir, ref=ref, device=device)
    server.site.config  # noqa: B018 - a missing site fails here, as one line, before binding
    uvicorn.run(create_app(server, poll_s=poll_s), host=host, port=port, log_level="warning")
