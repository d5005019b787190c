"""Pictures and tables of per-layer statistics: outlier ratios, sampling probabilities, training counts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def layer_table(ratios: Sequence[float], inclusion: Sequence[float], counts: Sequence[int] | None = None) -> str:
    """Markdown table, one row per layer."""
    head = "| layer | outlier ratio (%) | P(in a draw) |" + (" times trained |" if counts is not None else "")
    sep = "|---:|---:|---:|" + ("---:|" if counts is not None else "")
    rows = [head, sep]
    for i, (r, p) in enumerate(zip(ratios, inclusion, strict=True)):
        row = f"| {i} | {float(r):.3f} | {float(p):.3f} |"
        if counts is not None:
            row += f" {int(counts[i])} |"
        rows.append(row)
    return "\n".join(rows)


def plot_layer_statistics(
    path: str | Path,
    ratios: Sequence[float] | torch.Tensor,
    inclusion: Sequence[float] | torch.Tensor,
    counts: Sequence[int] | torch.Tensor | None = None,
    *,
    title: str = "",
) -> Path:
    """Bar charts of per-layer outlier ratio, inclusion probability and (optionally) times trained, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("outlier ratio (%)", list(map(float, ratios)), "tab:red"),
              ("P(layer in a draw)", list(map(float, inclusion)), "tab:blue")]
    if counts is not None:
        panels.append(("times trained", [int(c) for c in counts], "tab:green"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 0.28 * len(panels[0][1]) + 2), 2.3 * len(panels)),
                             sharex=True)
    for ax, (label, values, color) in zip(axes, panels, strict=True):
        ax.bar(range(len(values)), values, color=color)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    if counts is not None:
        from matplotlib.ticker import MaxNLocator

        axes[-1].yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("decoder layer")
    if title:
        axes[0].set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
