"""Plots written into run directories (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_accuracy(records: Sequence[dict[str, Any]], path: Path, *, title: str) -> Path:
    """Mean global and local accuracy (current and peak models) over rounds."""
    rounds = [r["round"] + 1 for r in records]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    series = [
        ("mean_global_acc", "global (current)", "-"),
        ("mean_local_acc", "local (current)", "-"),
        ("mean_peak_global_acc", "global (peak model)", "--"),
        ("mean_peak_local_acc", "local (peak model)", "--"),
    ]
    for key, label, style in series:
        pts = [(x, r[key]) for x, r in zip(rounds, records) if r.get(key) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (mean over peers)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
