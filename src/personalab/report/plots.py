"""Figures written next to results (matplotlib, headless)."""

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import torch
from matplotlib.figure import Figure

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_layer_norms(norms: dict[str, list[float]], title: str, path: str | Path) -> None:
    """Per-layer vector norms, one line per variant; x is the layer index of ``personalab.engine.layers``."""
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


def plot_heatmap(values, layers: list[int], alphas: list[float], title: str, label: str, path: str | Path) -> None:
    """A layer x alpha heatmap of ``values`` (``[len(layers), len(alphas)]``), annotated with each cell."""
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(alphas), 1.0 + 0.6 * len(layers)))
    image = ax.imshow(values, cmap="viridis", aspect="auto", vmin=0, vmax=100)
    ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("alpha")
    ax.set_ylabel("layer")
    ax.set_title(title)
    for i in range(len(layers)):
        for j in range(len(alphas)):
            ax.text(j, i, f"{values[i][j]:.0f}", ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def plot_sweep_curves(table, title: str, path: str | Path) -> None:
    """Trait and coherence against alpha, one line per layer (mean with a band of one std)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for ax, metric in zip(axes, ("trait", "coherence"), strict=True):
        for layer, rows in table.groupby("layer"):
            rows = rows.sort_values("alpha")
            mean, std = rows[f"{metric}_mean"], rows[f"{metric}_std"].fillna(0)
            ax.plot(rows["alpha"], mean, marker="o", markersize=3, label=f"layer {layer}")
            ax.fill_between(rows["alpha"], mean - std, mean + std, alpha=0.15)
        ax.set_xlabel("alpha")
        ax.set_ylabel(f"{metric} score (0-100)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def plot_histogram(values: Sequence[float], xlabel: str, title: str, path: str | Path) -> None:
    """Histogram of ``values`` written to ``path``."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.hist(list(values), bins=min(50, max(10, len(values) // 5)))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def plot_model_shift(shift: torch.Tensor, title: str, path: str | Path) -> None:
    """Per-layer shift of ``model_shift``; x is the layer index of ``personalab.engine.layers``."""
    values = torch.as_tensor(shift).tolist()
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(range(len(values)), values, marker="o", markersize=3)
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set_xlabel("layer (0 = embeddings, l = output of block l-1)")
    ax.set_ylabel("mean projection shift (tuned - base)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def plot_training_curve(losses: Sequence[float], path: str | Path) -> None:
    """Loss per optimizer step."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("KL(steered teacher || student)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
