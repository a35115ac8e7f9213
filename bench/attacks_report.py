"""The attacks.json rows of bench/attacks.py (``assemble``), its table and figure; re-draws a
finished run from its JSON.

python bench/attacks_report.py DIR/attacks.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from adaloc.attacks import WEIGHT_ATTACKS


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def write_markdown(result: dict, path: Path) -> None:
    """One table per lock: attacked, scratch and leak per fraction and attack."""
    lines = [
        f"# Attacks: {result['dataset']} / {result['model']} "
        f"(chance {100 * result['chance']:.1f}%, default lock: {result['default_lock']})",
        "",
    ]
    for name, lk in result["locks"].items():
        key = lk["key"]
        desc = ", ".join(f"{k} {v}" for k, v in key.items() if k not in ("lock",))
        lines += [
            f"## {name}: owner {_pct(lk['owner_acc'])}%, unauthorized "
            f"{_pct(lk['unauthorized_acc'])}%",
            "",
            f"key: {desc}",
            "",
            "| attack | fraction | n | attacked % | scratch % | leak (pt) | pos. precision % "
            "| pos. recall % | <= 2 pt |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in lk["rows"]:
            name_ = r["attack"] + (f" ({r['picked']})" if "picked" in r else "")
            ok = "yes" if r["leak_pt"] <= 2 else "**MISS**"
            lines.append(
                f"| {name_} | {r['fraction']:g} | {r['n']} | {_pct(r['attacked_acc'])} | "
                f"{_pct(r['scratch_acc'])} | {r['leak_pt']:+.1f} | "
                f"{_pct(r['positions_precision'])} | {_pct(r['positions_recall'])} | {ok} |"
            )
        pos = lk.get("positions_by_fill")
        if pos:
            lines += ["", "position inference by fill (precision / recall / share, %):", ""]
            for fill, p in pos.items():
                lines.append(
                    f"- {fill}: {_pct(p['precision'])} / {_pct(p['recall'])} / {_pct(p['share'])}"
                )
        lines.append("")
    lines.append(f"total {result.get('seconds_total', '?')} s")
    path.write_text("\n".join(lines) + "\n")


def plot(result: dict, path: Path) -> None:
    """Leak (points) per fraction: one panel per lock, one line per attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    locks = result["locks"]
    fig, axes = plt.subplots(1, len(locks), figsize=(3.6 * len(locks), 3.6), squeeze=False)
    for ax, (name, lk) in zip(axes[0], locks.items(), strict=True):
        attacks = sorted({r["attack"] for r in lk["rows"]})
        for a in attacks:
            rs = [r for r in lk["rows"] if r["attack"] == a]
            ax.plot(
                [100 * r["fraction"] for r in rs],
                [r["leak_pt"] for r in rs],
                "o-" if a == "best" else ".--",
                label=a,
                lw=2 if a == "best" else 1,
            )
        ax.axhline(2, color="red", lw=0.8, ls=":", label="+2 pt target")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("attacker's images (% of train)")
        ax.set_title(f"{name} (owner {_pct(lk['owner_acc'])}%)", fontsize=9)
    axes[0][0].set_ylabel("leak = attacked - scratch (pt)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(
        f"{result['dataset']} / {result['model']}: what a stolen base is worth", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def assemble(result: dict, done: dict, jobs: list[str], lock_names, fractions, repeats, draws):
    """Fill ``result['locks']`` (the attacks.json layout) from bench/attacks.py's finished
    jobs: one row per attack and fraction, averaged over the draws, plus the attacker's own
    pick; rows only for complete fractions."""
    if "owner" not in done:
        return
    figures = done["owner"][0]
    for name in lock_names:
        entry = {**figures[name]["entry"], "rows": []}
        if f"by_fill|{name}" in done:
            entry["positions_by_fill"] = done[f"by_fill|{name}"][0]
        for frac in fractions:
            keys = [(frac, rep) for rep in range(repeats)]
            want = [
                j
                for key in keys
                for j in jobs
                if j.endswith(f"|{name}|{key}") and not j.startswith("positions|")
            ]
            want += [f"scratch|{key}" for key in keys]
            if not all(j in done for j in want):
                continue
            per_attack: dict = {}
            for key in keys:
                scratch_acc = done[f"scratch|{key}"][0]["test"]
                for j in want:
                    if j.endswith(f"|{name}|{key}"):
                        for attack, v in done[j][0].items():
                            per_attack.setdefault(attack, []).append({**v, "scratch": scratch_acc})
            if not per_attack:
                continue
            n = draws[keys[0]].n
            for attack in sorted(per_attack, key=WEIGHT_ATTACKS.index):
                entry["rows"].append(attack_row(attack, frac, n, per_attack[attack]))
            # the attacker's own pick: the attack with the best validation accuracy
            best = max(per_attack, key=lambda a: sum(v["val"] for v in per_attack[a]))
            entry["rows"].append(
                {**attack_row(best, frac, n, per_attack[best]), "attack": "best", "picked": best}
            )
        result["locks"][name] = entry
    if "tokenlock" in done and done["tokenlock"][0]["entry"] is not None:
        entry = {**done["tokenlock"][0]["entry"], "rows": []}
        for frac in fractions:
            if f"token|{frac}" not in done or f"scratch|{(frac, 0)}" not in done:
                continue
            scratch_acc = done[f"scratch|{(frac, 0)}"][0]["test"]
            for row in done[f"token|{frac}"][0]["rows"]:
                leak = 100 * (row["attacked_acc"] - scratch_acc)
                entry["rows"].append({**row, "scratch_acc": scratch_acc, "leak_pt": leak})
        result["locks"]["tokenlock"] = entry


def attack_row(attack: str, frac: float, n: int, vals: list[dict]) -> dict:
    """One attacks.json row: ``vals`` (one per draw) averaged."""
    k = len(vals)
    att = sum(v["test"] for v in vals) / k
    scr = sum(v["scratch"] for v in vals) / k
    pos = [v["pos"] for v in vals if v["pos"] is not None]
    return {
        "attack": attack,
        "fraction": frac,
        "n": n,
        "attacked_acc": att,
        "scratch_acc": scr,
        "leak_pt": 100 * (att - scr),
        "positions_precision": sum(p["precision"] for p in pos) / len(pos) if pos else None,
        "positions_recall": sum(p["recall"] for p in pos) / len(pos) if pos else None,
        "positions_share": pos[0]["share"] if pos else None,
        "val_acc": sum(v["val"] for v in vals) / k,
        "chosen": vals[-1]["chosen"],
    }


if __name__ == "__main__":
    src = Path(sys.argv[1])
    res = json.loads(src.read_text())
    write_markdown(res, src.with_suffix(".md"))
    plot(res, src.with_suffix(".png"))
    print(src.with_suffix(".md").read_text())
