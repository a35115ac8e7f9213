"""Markdown tables from lifecycle.json files (the figures of bench/README.md, issue 12).

    python bench/adapt_report.py runs/final/digits runs/final/digits_10pct
    python bench/adapt_report.py --ablation runs/final/digits runs/final/abl_digits_*

The first form prints one table per run (authorized, full fine-tune, gap, unauthorized,
random key per version; key share of parameters and bytes); ``--ablation`` prints the gap
to full fine-tuning per stage, one row per run, with the rules each run compared.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _load(path: str) -> dict:
    p = Path(path)
    return json.loads((p / "lifecycle.json" if p.is_dir() else p).read_text())


def run_table(r: dict) -> str:
    """One run: a row per version, and the key's share of parameters and of base bytes."""
    k = r["key"]
    v0 = r["versions"][0]
    lines = [
        f"{r['dataset']}, update fraction {r.get('update_fraction', 1.0)}, key "
        f"{100 * k['params_in_key'] / k['params_total']:.2f}% of parameters, "
        f"{100 * v0['key_bytes'] / v0['base_bytes']:.2f}% of base bytes, "
        f"{r['seconds_total']:.0f} s",
        "",
        "| version | stage | train images | authorized | full FT | gap | unauthorized "
        "| random key (mean / max of 5) | key-only steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in r["versions"]:
        gap = 100 * (v["authorized_acc"] - v["full_finetune_acc"])
        steps = v["update"]["steps"] if v.get("update") else 0
        lines.append(
            f"| v{v['version']} | {v['stage']} | {v['train_images']} "
            f"| {100 * v['authorized_acc']:.2f} | {100 * v['full_finetune_acc']:.2f} "
            f"| {gap:+.2f} | {100 * v['unauthorized_acc']:.2f} "
            f"| {100 * v['random_key_acc']:.2f} / {100 * v.get('random_key_max', 0):.2f} "
            f"| {steps} |"
        )
    if "speed" in r:
        s = r["speed"]
        lines += [
            "",
            f"samples/s key-only {s['key_only_samples_per_s']} vs full fine-tuning "
            f"{s['full_samples_per_s']} on {s['images']} images: ratio {s['ratio']}",
        ]
    return "\n".join(lines)


def ablation_table(runs: list[tuple[str, dict]]) -> str:
    """Authorized accuracy per update stage (gap to that run's own full fine-tuning), one row
    per run and per compared rule; a last row per run gives its full fine-tuning figures."""
    stages = [v["stage"] for v in runs[0][1]["versions"][1:]]
    lines = ["| run | " + " | ".join(stages) + " |", "|---" * (len(stages) + 1) + "|"]

    def cells(accs, full):
        return " | ".join(
            f"{100 * a:.2f} ({100 * (a - f):+.2f})" for a, f in zip(accs, full, strict=True)
        )

    for name, r in runs:
        full = [v["full_finetune_acc"] for v in r["versions"][1:]]
        lines.append(
            f"| {name} | " + cells([v["authorized_acc"] for v in r["versions"][1:]], full) + " |"
        )
        for rule, row in r.get("rules", {}).items():
            accs = [v["authorized_acc"] for v in row["versions"][1:]]
            lines.append(f"| {name}, rule {rule} | " + cells(accs, full) + " |")
        lines.append(f"| {name}: full FT | " + " | ".join(f"{100 * f:.2f}" for f in full) + " |")
    return "\n".join(lines)


def main() -> None:
    """Print the tables for the given run folders."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders (or lifecycle.json files)")
    p.add_argument("--ablation", action="store_true")
    args = p.parse_args()
    runs = [(Path(r).name if Path(r).is_dir() else r, _load(r)) for r in args.runs]
    if args.ablation:
        print(ablation_table(runs))
    else:
        print("\n\n".join(run_table(r) for _, r in runs))


if __name__ == "__main__":
    main()
