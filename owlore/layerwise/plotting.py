"""Pictures and tables of per-layer statistics: outlier ratios, sampling probabilities, training counts."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def layer_table(ratios: Sequence[float] | None, inclusion: Sequence[float] | None,
                counts: Sequence[int] | None = None) -> str:
    """Markdown table, one row per layer; columns that are None (e.g. no outlier ratios for LISA) are left out."""
    cols = [(name, vals, fmt) for name, vals, fmt in (("outlier ratio (%)", ratios, "{:.3f}"),
                                                      ("P(in a draw)", inclusion, "{:.3f}"),
                                                      ("times trained", counts, "{}")) if vals is not None]
    n = len(cols[0][1]) if cols else 0
    rows = ["| layer | " + " | ".join(c[0] for c in cols) + " |", "|---:|" + "---:|" * len(cols)]
    for i in range(n):
        cells = [fmt.format(int(v[i]) if fmt == "{}" else float(v[i])) for _, v, fmt in cols]
        rows.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_layer_statistics(
    path: str | Path,
    ratios: Sequence[float] | torch.Tensor | None,
    inclusion: Sequence[float] | torch.Tensor | None,
    counts: Sequence[int] | torch.Tensor | None = None,
    *,
    title: str = "",
) -> Path:
    """Bar charts of per-layer outlier ratio, inclusion probability and times trained (those given), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(label, [float(v) for v in vals], color) for label, vals, color in (
        ("outlier ratio (%)", ratios, "tab:red"), ("P(layer in a draw)", inclusion, "tab:blue")) if vals is not None]
    if counts is not None:
        panels.append(("times trained", [int(c) for c in counts], "tab:green"))
    if not panels:
        raise ValueError("plot_layer_statistics: nothing to plot (ratios, inclusion and counts are all None)")
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 0.28 * len(panels[0][1]) + 2), 2.3 * len(panels)),
                             sharex=True, squeeze=False)
    axes = axes[:, 0]
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
    return save_figure(fig, path)


def save_figure(fig, path: str | Path, *, title: str | None = None) -> Path:
    """Lay out, write (PNG, 110 dpi; parent directories made) and close a matplotlib figure; returns the path."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    logger.debug("wrote %s", path)
    return path
