"""Report of the M-LOCK recipe (bench/tokenlock.py): the summary table and the figure.

Re-draw the figure and re-print the table of a finished run without training again:

    .venv/bin/python bench/tokenlock_report.py runs/tokenlock/tokenlock.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _pct(v) -> str:
    return "   -  " if v is None else f"{100 * v:5.1f}%"


def print_table(result: dict) -> None:
    """The recipe's summary on stdout: one line per model x strategy x recipe."""
    cols = (
        "unlocked_acc",
        "with_token_acc",
        "without_token_acc",
        "forged_token_acc_mean",
        "forged_token_acc_max",
        "near_token_acc_mean",
        "wrong_place_acc",
        "without_token_probe_acc",
    )
    print(f"chance {_pct(result['chance'])}   columns: {', '.join(cols)}")
    rows = [(result["model"], result["strategies"])]
    if result["comparison"]:
        rows.append(("mlp", result["comparison"]["strategies"]))
    for model, res in rows:
        for name, row in res.items():
            for variant, r in (("hardened", row), ("plain", row["plain"])):
                print(f"{model:4s} {name:21s} {variant:9s}", *(_pct(r[c]) for c in cols))
    for r in result["two_factor"]:
        print(
            f"two-factor v{r['version']} ({r['stage']}): key+token {_pct(r['key_and_token'])} "
            f"key only {_pct(r['key_only'])} token only {_pct(r['token_only'])} "
            f"neither {_pct(r['neither'])}"
            + (f"; full update {_pct(r['full_update_with_token'])}" if r["stage"] != "base" else "")
        )
    print(f"total {result['seconds']:.0f} s")


def plot(result: dict, path: Path) -> None:
    """Bars per strategy (plain vs hardened), pruning curves, and the two-factor matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["strategies"])
    fields = (
        "with_token_acc",
        "without_token_acc",
        "forged_token_acc_mean",
        "near_token_acc_mean",
        "wrong_place_acc",
    )
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax, width = axes[0], 0.8 / (2 * len(fields))
    for j, (variant, hatch) in enumerate((("plain", "//"), ("hardened", ""))):
        for i, f in enumerate(fields):
            vals = [
                (
                    result["strategies"][n]
                    if variant == "hardened"
                    else result["strategies"][n]["plain"]
                )[f]
                or 0
                for n in names
            ]
            xs = [k + (j * len(fields) + i - len(fields) + 0.5) * width for k in range(len(names))]
            ax.bar(
                xs,
                vals,
                width,
                color=f"C{i}",
                hatch=hatch,
                edgecolor="k",
                linewidth=0.3,
                label=f.removesuffix("_acc") if j else None,
            )
    ax.axhline(result["chance"], color="k", ls=":", label="chance")
    ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=8)
    ax.set_title(f"{result['model']} on {result['dataset']}: plain (hatched) vs hardened")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.2)  # room for the legend above the bars
    ax.legend(fontsize=7, ncol=3, loc="upper center")
    for i, n in enumerate(names):
        rows = result["strategies"][n]["pruning"]
        sp = [r["sparsity"] for r in rows]
        axes[1].plot(sp, [r["with_token_acc"] for r in rows], f"C{i}-", label=f"{n} with")
        axes[1].plot(sp, [r["without_token_acc"] for r in rows], f"C{i}--")
    axes[1].set_title("global magnitude pruning (hardened; dashed = without token)")
    axes[1].set_xlabel("sparsity")
    axes[1].legend(fontsize=7)
    cells = ("key_and_token", "key_only", "token_only", "neither")
    for i, c in enumerate(cells):
        vals = [r[c] for r in result["two_factor"]]
        xs = [k + (i - 1.5) * 0.2 for k in range(len(vals))]
        axes[2].bar(xs, vals, 0.2, label=c.replace("_", " "))
    # over the key-and-token bar of each update
    refs = [(k - 0.3, r["full_update_with_token"]) for k, r in enumerate(result["two_factor"])]
    refs = [(k, v) for k, v in refs if v is not None]
    if refs:
        xs, ys = zip(*refs, strict=True)
        axes[2].scatter(xs, ys, marker="_", s=600, color="k", label="full update (token)")
    axes[2].axhline(result["chance"], color="k", ls=":")
    axes[2].set_xticks(
        range(len(result["two_factor"])),
        [f"v{r['version']}\n{r['stage']}" for r in result["two_factor"]],
    )
    axes[2].set_title("two-factor lock: key x token")
    axes[2].legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: tokenlock_report.py DIR/tokenlock.json")
    src = Path(sys.argv[1])
    try:
        res = json.loads(src.read_text())
    except (OSError, ValueError) as exc:
        sys.exit(f"error: cannot read {src}: {exc}")
    plot(res, src.with_suffix(".png"))
    print_table(res)
