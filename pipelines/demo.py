"""`adaloc demo`: the whole story on the embedded default store, in one command.

lock (base published once + key v1) -> K key-only updates -> a site pulls each version ->
evaluation of every version (metrics + plots on its MLflow run) -> a table, the command to
open the MLflow UI on the demo's store, and ``DIR/summary.json``.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from pathlib import Path

from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipelines.config import PipelineConfig

SITE_ID = "site-1"


def prepare(out: Path, cfg: PipelineConfig, *, force: bool):
    """Fresh DIR with the embedded store, the owner's keyring and one authorized site."""
    from registry import OwnerKeyring, Site
    from registry.mlflow_io import embedded_uris

    if out.exists() and any(out.iterdir()):
        if not force:
            from adaloc.errors import ConfigError

            raise ConfigError(f"{out} is not empty; pass --force to replace it or pick a new --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri, artifact_location = embedded_uris(out / "mlflow")
    cfg = cfg.replace(
        tracking_uri=tracking_uri, artifact_location=artifact_location, owner_dir=str(out / "owner")
    )
    owner = OwnerKeyring.init(cfg.owner_dir)
    site = Site.init(
        out / "site",
        site_id=SITE_ID,
        tracking_uri=tracking_uri,
        model_name=cfg.name,
        owner_public_pem=owner.owner_public_pem,
    )
    owner.add_site(SITE_ID, site.public_key_pem)
    return cfg, site


def run_demo(
    out: str | Path, cfg: PipelineConfig, *, force: bool = False, console: Console | None = None
) -> dict:
    """Run the demo into ``out``; returns (and writes) the summary dict."""
    from pipelines.flows.evaluate import evaluate_flow
    from pipelines.flows.lock import lock_flow
    from pipelines.flows.update import update_flow

    console = console or Console()
    out = Path(out).resolve()
    t0 = time.perf_counter()
    cfg, site = prepare(out, cfg, force=force)
    (out / "config.json").write_text(cfg.to_json())  # the whole config, kept, not printed
    console.print(
        f"[bold]adaloc demo[/] -> {out}: {cfg.dataset}, {cfg.model}, {cfg.updates} updates, "
        f"key {100 * cfg.key_spec().budget:g}% ({cfg.key_spec().selection})"
        + (f", token {cfg.token}" if cfg.token else "")
        + f"; config in {out / 'config.json'}",
        highlight=False,
    )
    overrides = cfg.to_dict()
    steps = ["lock (base + key v1)"] + [f"update v{i + 2}" for i in range(cfg.updates)]
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    results, pulls, exports = [], [], []
    with Progress(*columns, console=console, transient=False) as bar:
        story = bar.add_task("demo", total=2 * len(steps) + len(steps))
        for i, step in enumerate(steps):
            bar.update(story, description=step)
            flow = lock_flow if i == 0 else update_flow
            results.append(flow(overrides=overrides, progress=True))
            bar.advance(story)
            version = results[-1]["version"]
            bar.update(story, description=f"site pulls v{version}")
            pulls.append(site.pull(version))
            # The site installs only the key; the demo also writes the full authorized model
            # (checked against the owner's signed sha256) to show it is the owner's.
            exports.append(site.export())
            bar.advance(story)
        for res in results:
            bar.update(story, description=f"evaluate v{res['version']}")
            res["evaluation"] = evaluate_flow(overrides=overrides, ref=str(res["version"]))
            bar.advance(story)
    summary = summarize(out, cfg, site, results, pulls, exports)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_table(console, summary)
    return summary


def summarize(
    out: Path, cfg: PipelineConfig, site, results: list, pulls: list, exports: list
) -> dict:
    """The summary.json layout of issue 5 (plus a few extra fields)."""
    from pipelines.flows.common import open_registry

    registry = open_registry(cfg)
    base_bytes = results[0]["base_bytes"]
    versions = []
    for res, pull, exported in zip(results, pulls, exports, strict=True):
        rec, m = res["record"], res["metrics"]
        versions.append(
            {
                "version": res["version"],
                "authorized_acc": m["authorized_acc"],
                "unauthorized_acc": m["unauthorized_acc"],
                "key_bytes": rec["sealed_bytes"],
                "base_bytes": base_bytes,
                "data_version": res["data_version"],
                "registered_model_version": rec["mlflow_version"],
                "random_key_acc": m["random_key_acc"],
                "plain_key_bytes": rec["key_bytes"],
                "key_fraction_of_base": rec["sealed_bytes"] / base_bytes,
                "gate_passed": res["passed"],
                "site_model_matches_owner": exported["model_sha256"] == res["model_sha256"],
                "site_key_version": pull.version,
                **two_factor_block(m),
            }
        )
    last = exports[-1]
    site_dir = Path(site.directory).resolve()
    return {
        "tracking_uri": cfg.tracking_uri,
        "artifact_location": cfg.artifact_location,
        "model_name": cfg.name,
        "chance": results[0]["metrics"]["chance"],
        "versions": versions,
        "site": {
            "dir": str(site_dir),
            "model_path": str(Path(last["path"]).resolve()),
            "installed_version": (site.installed() or {}).get("version"),
            "model_sha256": last["model_sha256"],
            "owner_model_sha256": results[-1]["model_sha256"],
            "bytes_downloaded": {
                "base": sum(p.bytes_base for p in pulls),
                "per_update": [p.bytes_key for p in pulls[1:]],
            },
            "pull_command": f"adaloc site pull latest --dir {shlex.quote(str(site_dir))}",
        },
        "base_versions": len(registry.bases()),
        "key_versions": len(registry.history()),
        "production": registry.resolve("production").version if _has_production(registry) else None,
        "mlflow_ui_command": ui_command(cfg),
        "dataset": cfg.dataset,
        "model": cfg.model,
    }


def _has_production(registry) -> bool:
    return any("production" in kv.aliases for kv in registry.history())


def ui_command(cfg: PipelineConfig) -> str:
    """The command that opens the MLflow UI on the demo's store."""
    return (
        f"mlflow ui --backend-store-uri {shlex.quote(cfg.tracking_uri)} "
        f"--default-artifact-root {shlex.quote(cfg.artifact_location)} --port 5000"
    )


def two_factor_block(metrics: dict) -> dict:
    """The 2x2 key x token matrix of a token-locked version ({} without a token)."""
    cells = ("key_and_token", "key_only", "token_only", "neither")
    if f"two_factor_{cells[0]}" not in metrics:
        return {}
    return {"two_factor": {c: metrics[f"two_factor_{c}"] for c in cells}}


def print_table(console: Console, summary: dict) -> None:
    """Version table (fits 80 columns): accuracies (the whole 2x2 matrix with a token), key
    bytes against the full model's, site model matches owner."""
    chance, versions = summary["chance"], summary["versions"]
    full = versions[0]["base_bytes"]
    two = all("two_factor" in v for v in versions)
    table = Table(
        title=f"{summary['model_name']}: key versions (chance {100 * chance:.1f}%)",
        caption=f"full model {full:,} B; accuracy in %"
        + ("; two-factor: with key and token, key only, token only, neither" if two else ""),
        box=box.SIMPLE_HEAD,
    )
    if two:
        heads = ["ver", "key+token", "key only", "token", "neither"]
    else:
        heads = ["ver", "authorized", "unauthorized"]
    for col in [*heads, "key B (of full)", "site=owner"]:
        table.add_column(col, justify="right", no_wrap=True)
    for v in versions:
        if two:
            accs = [v["two_factor"][c] for c in ("key_and_token", "key_only", "token_only")]
            accs.append(v["two_factor"]["neither"])
        else:
            accs = [v["authorized_acc"], v["unauthorized_acc"]]
        table.add_row(
            f"v{v['version']}",
            *(f"{100 * a:.2f}" for a in accs),
            f"{v['key_bytes']:,} ({100 * v['key_fraction_of_base']:.1f}%)",
            "yes" if v["site_model_matches_owner"] else "NO",
        )
    console.print(table)
    site = summary["site"]
    console.print(
        f"base published {summary['base_versions']}x; site downloaded the base once "
        f"({site['bytes_downloaded']['base']:,} B) and then only keys "
        f"({', '.join(f'{b:,}' for b in site['bytes_downloaded']['per_update'])} B); "
        f"installed v{site['installed_version']}, sha256 matches owner: "
        f"{site['model_sha256'] == site['owner_model_sha256']}"
    )
    console.print(f"re-pull the latest version:  {site['pull_command']}")
    console.print(f"browse the registry:         {summary['mlflow_ui_command']}")
    console.print(
        f"summary: {Path(site['dir']).parent / 'summary.json'}  ({summary.get('seconds', '?')} s)"
    )
