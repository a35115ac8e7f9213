"""Markdown table and figure of ``bench/pull_vs_full.py``'s JSON (also runnable on a file).

python bench/pull_vs_full_report.py runs/bench/pull_vs_full.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def write_markdown(result: dict, path: Path) -> None:
    """One row per model and link, then the in-server swap figures."""
    lines = [
        f"Setup: {result['setup']}; median of {result['repeats']}; key budget "
        f"{result['budget']:.0%}; load average at the end {result['load_avg'][0]:.1f} "
        f"on {result['cpu_count']} cores.",
        "",
        "| model | link | update B | full B | pull+swap (warm) s | pull+load (cold) s | "
        "full download+load s | x warm | x cold | x bytes (bound) | requests / update "
        "(warm, cold) | requests / full |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        req = r.get("requests_per_update", {})
        lines.append(
            f"| {r['model']} | {r['link']['name']} | {r['update_bytes']:,} | "
            f"{r['full_bytes']:,} | {r['pull_warm_s']:.3f} | {r['pull_cold_s']:.3f} | "
            f"{r['full_download_load_s']:.3f} | **{r['speedup_warm']:.1f}** | "
            f"{r['speedup_cold']:.1f} | {r['byte_ratio_bound']:.1f} | "
            f"{req.get('warm', '-')}, {req.get('cold', '-')} | "
            f"{r.get('requests_per_full_download', '-')} |"
        )
    rtt = [r["server_rest_call_s"] for r in result["rows"] if "server_rest_call_s" in r]
    if rtt:
        lines += ["", f"One small REST call to the server (median): {rtt[0] * 1e3:.0f} ms."]
    for r in result["rows"]:
        sw = r.get("server_swap")
        if not sw:
            continue
        lines += [
            "",
            f"Inside a running `adaloc serve` ({r['model']}, {len(sw['swaps'])} swaps, "
            "POST /admin/pull on loopback): swap (key positions written under the lock) "
            f"median {sw['swap_s_median'] * 1e3:.1f} ms, pull before it "
            f"{sw['pull_s_median'] * 1e3:.0f} ms, bytes written {sw['keyed_bytes']:,}, "
            f"peak extra RSS during the pull + swap {sw['rss_peak_extra_median']:,} B.",
        ]
    path.write_text("\n".join(lines) + "\n")


def plot(result: dict, path: Path) -> None:
    """Speed-up (warm, cold) per link beside the byte-ratio bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows)), 3.8))
    xs = range(len(rows))
    w = 0.27
    ax.bar([x - w for x in xs], [r["speedup_warm"] for r in rows], w, label="update, warm")
    ax.bar(list(xs), [r["speedup_cold"] for r in rows], w, label="update, cold")
    ax.bar([x + w for x in xs], [r["byte_ratio_bound"] for r in rows], w, label="byte ratio")
    ax.set_xticks(list(xs), [f"{r['model']}\n{r['link']['name']}" for r in rows], fontsize=8)
    ax.set_ylabel("full download+load / update (x)")
    ax.axhline(10, color="grey", ls="--", lw=0.8)
    ax.legend(fontsize=8)
    ax.set_title("key update vs full model download")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    src = Path(sys.argv[1])
    res = json.loads(src.read_text())
    write_markdown(res, src.with_suffix(".md"))
    plot(res, src.with_suffix(".png"))
    print(src.with_suffix(".md").read_text())
