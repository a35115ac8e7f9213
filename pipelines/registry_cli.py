"""`adaloc registry|site ...`: thin typer layer over ``registry`` (mounted by cli.py).

Every command takes ``--json`` for machine-readable output. A user mistake or a refused
pull prints one line on stderr and exits with 1, never a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from pipelines.settings import DEFAULTS, ENV

registry_app = typer.Typer(help="Inspect and promote key versions in the MLflow registry.")
site_app = typer.Typer(help="Deployment site: init, pull key versions, status.")

out = Console()
err = Console(stderr=True)

TrackingUri = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        envvar=list(ENV["tracking_uri"]),
        help="MLflow tracking URI; default: embedded sqlite under --root.",
    ),
]
RegistryUri = Annotated[
    str | None,
    typer.Option("--registry-uri", envvar=list(ENV["registry_uri"]), help="Defaults to tracking."),
]
Root = Annotated[
    Path, typer.Option("--root", envvar=list(ENV["home"]), help="Embedded registry folder.")
]
ModelName = Annotated[
    str, typer.Option("--model", "-m", envvar=list(ENV["model_name"]), help="Locked model name.")
]
OwnerDir = Annotated[
    Path, typer.Option("--owner-dir", envvar=list(ENV["owner_dir"]), help="Owner keyring folder.")
]
SiteDir = Annotated[
    Path, typer.Option("--dir", "-d", envvar=list(ENV["site_dir"]), help="Site folder.")
]
AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]


def _quiet_mlflow() -> None:
    # Our own progress bars replace MLflow's; fail fast instead of minutes of retries.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


# Exceptions raised by these packages are remote (tracking server, S3): one line, exit 1.
_REMOTE_ERROR_MODULES = ("mlflow", "requests", "botocore", "boto3", "s3transfer", "urllib3")


def _is_remote(e: BaseException) -> bool:
    """A transport error (or one caused by it): a network fault, a server, S3."""
    while e is not None:
        if isinstance(e, ConnectionError | TimeoutError):
            return True
        if type(e).__module__.split(".")[0] in _REMOTE_ERROR_MODULES:
            return True
        e = e.__cause__
    return False


def error_line(e: BaseException) -> tuple[str, int]:
    """The one line (and exit code) the CLI prints for an exception instead of a traceback.

    Our typed errors and OS errors on a user's file are the user's to fix (exit 1); MLflow /
    S3 transport errors say the registry is unavailable (exit 1); anything else is a bug in
    adaloc (exit 2, still one line; ``ADALOC_DEBUG=1`` shows the traceback).
    """
    from adaloc.errors import AdalocError

    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    if isinstance(e, AdalocError | OSError):
        return f"error: {first}", 1
    if _is_remote(e):
        return f"error: registry unavailable: {first}", 1
    return f"error: unexpected {type(e).__name__}: {first} (ADALOC_DEBUG=1 shows where)", 2


def cli_errors(fn):
    """Turn every exception into one line on stderr and a non-zero exit (see error_line)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import click

        _quiet_mlflow()
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as e:  # noqa: BLE001 - the CLI's one place that maps errors
            if os.environ.get("ADALOC_DEBUG"):
                raise
            line, code = error_line(e)
            err.print(line, markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(code) from None

    return wrapper


def _emit(obj, as_json: bool, render) -> None:
    if as_json:
        sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    else:
        render(obj)


def _registry(tracking_uri: str | None, registry_uri: str | None, root: Path, model: str):
    from registry.errors import NotFoundError
    from registry.mlflow_io import embedded_uris
    from registry.store import KeyRegistry

    location = None
    if tracking_uri is None:
        if not (root / "mlflow.db").is_file():
            raise NotFoundError(
                f"no registry at {root} ({root / 'mlflow.db'} does not exist); pass --root or "
                "--tracking-uri of an existing registry"
            )
        tracking_uri, location = embedded_uris(root)
    elif tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[10:]).is_file():
        raise NotFoundError(
            f"registry database {tracking_uri[10:]} does not exist; check --tracking-uri"
        )
    return KeyRegistry(tracking_uri, model, artifact_location=location, registry_uri=registry_uri)


def _versions_table(rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for col in ("version", "parent", "aliases", "base", "sealed B", "sites", "data", "code"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r["version"]), str(r["parent"] or "-"), ",".join(r["aliases"]) or "-",
            r["base_sha256"][:12], str(r["sealed_bytes"]), ",".join(r["recipients"]),
            str(r["data_version"]), str(r["code_version"])[:12],
        )  # fmt: skip
    out.print(table)


def _show(d: dict) -> None:
    for k, v in d.items():
        out.print(f"[bold]{k}[/bold]: {json.dumps(v) if isinstance(v, dict | list) else v}")


# -- adaloc registry ---------------------------------------------------------------------


@registry_app.command("ls")
@cli_errors
def registry_ls(
    model: ModelName = DEFAULTS.model_name,
    tracking_uri: TrackingUri = None,
    registry_uri: RegistryUri = None,
    root: Root = DEFAULTS.home,
    as_json: AsJson = False,
) -> None:
    """List ready key versions with parent, aliases, base and sizes."""
    reg = _registry(tracking_uri, registry_uri, root, model)
    rows = [kv.to_dict() for kv in reg.history()]
    _emit(rows, as_json, lambda r: _versions_table(r, f"{reg.key_name}"))


@registry_app.command("show")
@cli_errors
def registry_show(
    ref: Annotated[str, typer.Argument(help="Key version number or alias.")] = "production",
    model: ModelName = DEFAULTS.model_name,
    tracking_uri: TrackingUri = None,
    registry_uri: RegistryUri = None,
    root: Root = DEFAULTS.home,
    as_json: AsJson = False,
) -> None:
    """Show one key version: tags, aliases and its run's metrics."""
    kv = _registry(tracking_uri, registry_uri, root, model).resolve(ref)
    _emit(kv.to_dict(), as_json, _show)


@registry_app.command("lineage")
@cli_errors
def registry_lineage(
    ref: Annotated[str, typer.Argument(help="Key version number or alias.")] = "production",
    model: ModelName = DEFAULTS.model_name,
    tracking_uri: TrackingUri = None,
    registry_uri: RegistryUri = None,
    root: Root = DEFAULTS.home,
    as_json: AsJson = False,
) -> None:
    """A key version and its ancestors back to version 1."""
    chain = [kv.to_dict() for kv in _registry(tracking_uri, registry_uri, root, model).lineage(ref)]
    _emit(chain, as_json, lambda r: _versions_table(r, f"lineage of {ref}"))


@registry_app.command("promote")
@cli_errors
def registry_promote(
    ref: Annotated[str, typer.Argument(help="Key version number or alias.")],
    alias: Annotated[str, typer.Option("--alias", "-a")] = "production",
    owner_dir: OwnerDir = DEFAULTS.owner,
    co_signer: Annotated[
        list[Path] | None,
        typer.Option("--co-signer", help="Another owner keyring folder (2-key promotion)."),
    ] = None,
    override_gate: Annotated[
        bool, typer.Option("--override-gate", help="Promote a version that failed the gate.")
    ] = False,
    model: ModelName = DEFAULTS.model_name,
    tracking_uri: TrackingUri = None,
    registry_uri: RegistryUri = None,
    root: Root = DEFAULTS.home,
    as_json: AsJson = False,
) -> None:
    """Sign "ALIAS (default production) = key version REF" with the owner key."""
    from registry.keyring import OwnerKeyring

    owner = OwnerKeyring(owner_dir)
    kw = {}
    if alias == "production":
        kw = {"co_signers": [OwnerKeyring(d) for d in co_signer or []],
              "gate_override": override_gate}  # fmt: skip
    reg = _registry(tracking_uri, registry_uri, root, model)
    kv = reg.set_alias(alias, ref, owner=owner, **kw)
    _emit(
        kv.to_dict(),
        as_json,
        lambda d: out.print(f"{alias} -> key version {d['version']} (signed)"),
    )


@registry_app.command("sign-timestamp")
@cli_errors
def registry_sign_timestamp(
    owner_dir: OwnerDir = DEFAULTS.owner,
    model: ModelName = DEFAULTS.model_name,
    tracking_uri: TrackingUri = None,
    registry_uri: RegistryUri = None,
    root: Root = DEFAULTS.home,
    as_json: AsJson = False,
) -> None:
    """Re-sign the timestamp record (new expiry); the retrain flow does this on schedule."""
    from registry.keyring import OwnerKeyring

    counter = _registry(tracking_uri, registry_uri, root, model).sign_timestamp(
        OwnerKeyring(owner_dir)
    )
    _emit(
        {"counter": counter},
        as_json,
        lambda d: out.print(f"timestamp signed, counter {d['counter']}"),
    )


@registry_app.command("rotate-key")
@cli_errors
def registry_rotate_key(
    new_owner_dir: Annotated[
        Path, typer.Argument(help="Keyring folder holding the new owner.key.")
    ],
    owner_dir: OwnerDir = DEFAULTS.owner,
    add_key: Annotated[
        list[Path] | None, typer.Option("--add-key", help="Another owner.pub to name in root.")
    ] = None,
    promote_threshold: Annotated[int, typer.Option(help="Signatures a promotion needs.")] = 1,
    revoke: Annotated[
        bool, typer.Option("--revoke", help="Old key compromised: refuse what it sealed.")
    ] = False,
    model: ModelName = DEFAULTS.model_name,
    tracking_uri: TrackingUri = None,
    registry_uri: RegistryUri = None,
    root: Root = DEFAULTS.home,
    as_json: AsJson = False,
) -> None:
    """Rotate the owner signing key: a new root record signed by the old and the new key."""
    from registry.keyring import OwnerKeyring
    from registry.release import rotate_root

    reg = _registry(tracking_uri, registry_uri, root, model)
    new_root = rotate_root(
        reg, OwnerKeyring(owner_dir), OwnerKeyring(new_owner_dir),
        add_public=[p.read_bytes() for p in add_key or []],
        promote_threshold=promote_threshold, revoke_old=revoke,
    )  # fmt: skip
    info = {"root_version": new_root.version, "keys": sorted(new_root.keys)}
    _emit(info, as_json, lambda d: out.print(f"root v{d['root_version']} names keys {d['keys']}"))


@registry_app.command("verify")
@cli_errors
def registry_verify(
    ref: Annotated[str, typer.Argument(help="Key version number or alias.")] = "production",
    owner_pub: Annotated[
        Path | None, typer.Option("--owner-pub", help="The owner's owner.pub (required).")
    ] = None,
    model: ModelName = DEFAULTS.model_name,
    tracking_uri: TrackingUri = None,
    registry_uri: RegistryUri = None,
    root: Root = DEFAULTS.home,
    as_json: AsJson = False,
) -> None:
    """Check a key version as a site would: signed records, stored key, owner signature."""
    from registry.errors import TrustError
    from registry.site_files import load_owner_pem

    if owner_pub is None:
        raise TrustError(
            "verify needs the owner's public key (--owner-pub owner.pub); without a trusted "
            "key nothing can be verified"
        )
    pem = load_owner_pem(owner_pub)
    report = _registry(tracking_uri, registry_uri, root, model).verify(ref, owner_public_pem=pem)
    _emit(report, as_json, lambda r: out.print(f"key version {r['version']} OK: {r['checks']}"))


# -- adaloc site ---------------------------------------------------------------------------


@site_app.command("init")
@cli_errors
def site_init(
    site_id: Annotated[str, typer.Option("--site-id", help="Name the owner knows this site by.")],
    owner_pub: Annotated[Path, typer.Option("--owner-pub", help="The owner's owner.pub.")],
    directory: SiteDir = DEFAULTS.site_dir,
    model: ModelName = DEFAULTS.model_name,
    tracking_uri: TrackingUri = None,
    registry_uri: RegistryUri = None,
    root: Root = DEFAULTS.home,
    force: Annotated[bool, typer.Option("--force", help="Re-create keys and config.")] = False,
    as_json: AsJson = False,
) -> None:
    """Create a site: its key pair (site.key 0600) and config; prints site.pub's path."""
    from registry.site import Site
    from registry.site_files import load_owner_pem

    pem = load_owner_pem(owner_pub)  # checked before anything is created
    uri = tracking_uri or f"sqlite:///{(root / 'mlflow.db').resolve()}"
    site = Site.init(
        directory,
        site_id=site_id,
        tracking_uri=uri,
        model_name=model,
        owner_public_pem=pem,
        registry_uri=registry_uri,
        overwrite=force,
    )
    info = {
        "site_id": site_id,
        "directory": str(directory),
        "public_key": str(site.directory / "site.pub"),
        "tracking_uri": uri,
        "model_name": model,
    }
    _emit(
        info,
        as_json,
        lambda d: out.print(
            f"site {site_id!r} ready; give {d['public_key']} to the owner (`adaloc keys site-add`)"
        ),
    )


class _RichProgress:
    """Adapter from the Site's progress callback to rich progress bars (one per download)."""

    def __init__(self, progress: Progress):
        self.progress, self.tasks = progress, {}

    def __call__(self, label: str, done: int, total: int | None) -> None:
        if label not in self.tasks:
            self.tasks[label] = self.progress.add_task(label, total=total)
        self.progress.update(self.tasks[label], completed=done)


@site_app.command("pull")
@cli_errors
def site_pull(
    ref: Annotated[str, typer.Argument(help="Key version number or alias.")] = "production",
    directory: SiteDir = DEFAULTS.site_dir,
    allow_rollback: Annotated[bool, typer.Option("--allow-rollback")] = False,
    as_json: AsJson = False,
) -> None:
    """Pull a key version, verify, decrypt, apply and install the authorized model."""
    from registry.site import Site

    site = Site(directory)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
    )
    quiet = as_json or not err.is_terminal
    with Progress(*columns, console=err, disable=quiet, transient=True) as bars:
        result = site.pull(ref, allow_rollback=allow_rollback, progress=_RichProgress(bars))

    def render(r: dict) -> None:
        if not r["changed"]:
            out.print(f"key version {r['version']} already installed")
            return
        out.print(
            f"installed key version {r['version']} (was {r['previous']}) -> {r['model_path']}; "
            f"downloaded base {r['bytes_base']} B, key {r['bytes_key']} B"
        )

    _emit(result.to_dict(), as_json, render)


@site_app.command("export")
@cli_errors
def site_export(
    directory: SiteDir = DEFAULTS.site_dir,
    output: Annotated[
        Path | None, typer.Option("--out", "-o", help="Default: DIR/model/model.safetensors.")
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Write the full authorized model (base + installed key), checked against the owner's
    signed sha256; 0600 in a 0700 folder."""
    from registry.site import Site

    info = Site(directory).export(output)
    _emit(info, as_json, lambda d: out.print(f"key version {d['version']} -> {d['path']}"))


@site_app.command("status")
@cli_errors
def site_status(
    directory: SiteDir = DEFAULTS.site_dir,
    offline: Annotated[bool, typer.Option("--offline", help="Use the cached list only.")] = False,
    as_json: AsJson = False,
) -> None:
    """Installed key version and the versions the registry offers (cached when offline)."""
    from registry.site import Site

    status = Site(directory).status(online=not offline)

    def render(s: dict) -> None:
        inst = s["installed"]
        out.print(
            f"site {s['site_id']} ({s['model_name']}) "
            + (f"installed key version {inst['version']}" if inst else "nothing installed")
            + ("" if s["model_intact"] or not inst else " [red](model file changed!)[/red]")
        )
        where = "cached " + str(s["available_fetched_at"]) if s["offline"] else "registry"
        out.print(
            f"available ({where}): "
            + ", ".join(
                f"v{v['version']}" + (f" ({','.join(v['aliases'])})" if v["aliases"] else "")
                for v in s["available"]
            )
            + ("  -> update available" if s["update_available"] else "")
        )

    _emit(status, as_json, render)
