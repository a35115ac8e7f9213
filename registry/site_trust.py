"""A site's trust state: the newest verified timestamp from the root chain of its owner.pub,
its expiry, and the rollback guard (the highest timestamp counter seen). A mixin of
:class:`registry.site.Site`, which provides ``directory``, ``config`` and ``registry()``.
"""

from __future__ import annotations

from collections.abc import Callable

from registry import record_cache as RC
from registry import run_io
from registry import site_files as F
from registry import trust as T
from registry import trust_io as IO
from registry.errors import (
    RegistryError,
    RollbackError,
    SiteFileError,
    TrustError,
    UnavailableError,
)
from registry.fsutil import atomic_write_bytes, atomic_write_json
from registry.sealing import OWNER_PUBLIC_FILE
from registry.site_set import _now
from registry.workers import worker


class SiteTrust:
    """Mixin: the signed state a pull or a status report starts from."""

    _root_seen: tuple | None = None  # ((trusted-root bytes, owner pem), its verified root)

    def _timestamp_probe(self):
        """The hinted trust run's timestamp, asked for now on a worker thread (a future for
        ``_signed_state(first=)``), or None without a usable hint. A pull starts it before its
        head key copy, so the small answer is not queued behind the key's bytes."""
        try:
            reg = self.registry()
        except RegistryError:
            return None  # the same error is raised, in its order, by the pull itself
        hint = self._hint or ()
        if not hint or hint[0] not in run_io._uris(reg):
            return None
        return worker("probe").submit(IO.probe_timestamp, reg, hint[0])

    def _newest_timestamp(self, trusted: T.RootSigned, first=None):
        """IO.newest_timestamp, started from the last pull's hints; stale hints (a failure
        while using them) are dropped and the lookup done again without them."""
        reg = self.registry()
        try:
            got = IO.newest_timestamp(reg, trusted, hint=self._hint, first=first)
        except Exception:
            if not self._hint:
                raise
            (self.directory / RC.HINTS_FILE).unlink(missing_ok=True)
            self._registry = None
            reg = self.registry()
            got = IO.newest_timestamp(reg, trusted)
        RC.save_hints(self.directory, reg, got[3])
        self._hint = (got[3],)  # a long-lived site takes the fast path from its next pull on
        return got

    def _online(self, what: str, call: Callable):
        try:
            return call()
        except RegistryError:
            raise
        except Exception as err:  # noqa: BLE001 - MLflow/requests/boto raise many types
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise UnavailableError(
                f"{what}: registry at {self.config['tracking_uri']} unavailable ({first}); "
                "the installed version is unchanged"
            ) from err

    # -- trust -----------------------------------------------------------------------------

    def _trusted_root(self) -> T.RootSigned:
        owner = F.load_owner_pem(self.directory / OWNER_PUBLIC_FILE)
        anchor = T.anchor_root(self.config["model_name"], owner)
        path = self.directory / F.TRUSTED_ROOT
        if not path.exists():
            return anchor
        raw = path.read_bytes()
        if self._root_seen is not None and self._root_seen[0] == (raw, owner):
            return self._root_seen[1]  # the bytes this Site verified before: same result
        try:
            env = T.parse(raw, "root", f"trusted root {path}")
            root = T.verify(
                env,
                "root",
                T.root_keys(T._shape(env["signed"], "root", str(path))),
                1,
                f"trusted root {path}",
            )
        except TrustError as err:
            raise SiteFileError(str(err)) from err
        self._root_seen = ((raw, owner), root)
        return root

    def _signed_state(
        self, allow_rollback: bool, *, persist: bool = True, defer=None, first=None
    ):  # fmt: skip
        """(timestamp, root): the newest verified timestamp, fresh and not rolled back.
        ``defer``: the seen-counter write is handed to it (a pull's writer thread) rather than
        done here; the pull waits for it before it returns. ``first``: see _timestamp_probe."""
        trusted = self._trusted_root()  # local files first: a bad one fails before any write
        reg = self.registry()
        env, ts, root, run_id = self._online(
            "read signed records", lambda: self._newest_timestamp(trusted, first)
        )
        reg = self.registry()  # (re-made when stale hints were dropped)
        IO.check_fresh(ts)
        seen = F.read_model(
            self.directory / F.SEEN_FILE, F.Seen, "rollback guard", missing=F.Seen(counter=0)
        )
        if ts.counter < seen.counter and not allow_rollback:
            raise RollbackError(
                f"the registry's signed timestamp has counter {ts.counter}, below {seen.counter} "
                "that this site has already seen: a replayed or rolled-back registry; pass "
                "--allow-rollback to accept it anyway"
            )
        if persist:
            if root.version > trusted.version:
                atomic_write_bytes(
                    self.directory / F.TRUSTED_ROOT, self._root_bytes(reg, run_id, root)
                )
            if ts.counter > seen.counter:
                path = self.directory / F.SEEN_FILE
                seen_now = {"counter": ts.counter, "seen_at": _now()}
                if defer is None:
                    atomic_write_json(path, seen_now)
                else:
                    defer(worker("sweep").submit(atomic_write_json, path, seen_now))
        return ts, root

    @staticmethod
    def _root_bytes(reg, run_id: str, root: T.RootSigned) -> bytes:
        return IO.read_artifact(reg, run_id, IO.root_file(root.version), max_bytes=T.MAX_ROOT_BYTES)
