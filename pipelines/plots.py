"""PNG plots logged with evaluation runs (numbers in, files out; no tensors)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def lock_bars(metrics: dict, path: str | Path, title: str) -> str:
    """Bar chart: authorized, unauthorized, random-key accuracy and the chance line."""
    plt = _pyplot()
    names = ["authorized_acc", "unauthorized_acc", "random_key_acc"]
    labels = ["authorized\n(base + key)", "unauthorized\n(base alone)", "base +\nrandom key"]
    values = [100 * metrics[n] for n in names]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    bars = ax.bar(labels, values, color=["#2a9d8f", "#e76f51", "#f4a261"])
    ax.bar_label(bars, fmt="%.1f")
    ax.axhline(100 * metrics["chance"], color="grey", ls="--", lw=1, label="chance")
    ax.set_ylim(0, 105)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def per_class_bars(values: list[float], classes: list[str], path: str | Path, title: str) -> str:
    """Per-class accuracy of the authorized model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 0.55 * len(values)), 3.4))
    ax.bar(range(len(values)), [100 * v for v in values], color="#264653")
    ax.set_xticks(range(len(values)), classes[: len(values)], rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
