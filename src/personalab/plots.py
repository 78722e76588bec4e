"""Figures written next to results (matplotlib, headless)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_layer_norms(norms: dict[str, list[float]], title: str, path: str | Path) -> None:
    """Per-layer vector norms, one line per variant; x is the layer index of ``personalab.layers``."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for variant, values in norms.items():
        ax.plot(range(len(values)), values, marker="o", markersize=3, label=variant)
    ax.set_xlabel("layer (0 = embeddings, l = output of block l-1)")
    ax.set_ylabel("vector norm")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
