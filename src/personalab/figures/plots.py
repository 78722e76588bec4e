"""Figures written next to results (matplotlib, headless).

Every figure has a title that names its run, labelled axes and readable ticks. Figures are
built on ``matplotlib.figure.Figure`` (no pyplot state), so they are safe in any thread.
"""

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from personalab.figures.layout import MIN_FONT_PT, save_figure

LAYER_AXIS = "layer (0 = embeddings, l = output of block l-1)"


def short_name(name: str) -> str:
    """A model or run name for a title: the last part of a local path, a hub name as it is."""
    return Path(name).name if name.startswith(("/", ".", "~")) or name.count("/") > 1 else name


TITLE_PT = 11.0


def _title(fig: Figure, text: str, ax=None) -> None:
    """The figure's title, each line wrapped to the figure's width (about 0.6 em per character at ``TITLE_PT``):
    above ``ax`` when given, else above all panels."""
    width = max(30, int(fig.get_figwidth() * (1 if ax is None else 0.85) * 72 / (0.6 * TITLE_PT)))
    wrapped = "\n".join(textwrap.fill(line, width) for line in text.splitlines())
    if ax is None:
        fig.suptitle(wrapped, fontsize=TITLE_PT)
    else:
        ax.set_title(wrapped, fontsize=TITLE_PT)


def plot_layer_norms(norms: dict[str, list[float]], title: str, path: str | Path) -> None:
    """Per-layer vector norms, one line per variant; x is the layer index of ``personalab.engine.layers``."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for variant, values in norms.items():
        ax.plot(range(len(values)), values, marker="o", markersize=3, label=variant)
    ax.set_xlabel(LAYER_AXIS)
    ax.set_ylabel("vector norm")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _title(fig, title, ax)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    save_figure(fig, path)


def plot_layer_cosine(layers: Sequence[int], cosines: Sequence[float], title: str, path: str | Path) -> None:
    """Cosine similarity at each of ``layers`` (the layer index of ``personalab.engine.layers``), on [-1, 1]."""
    fig = Figure(figsize=(6.5, 3.8))
    ax = fig.subplots()
    ax.plot(list(layers), list(cosines), marker="o", markersize=3)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel(LAYER_AXIS)
    ax.set_ylabel("cosine similarity")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _title(fig, title, ax)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_heatmap(
    values,
    rows: Sequence,
    columns: Sequence,
    title: str,
    label: str,
    path: str | Path,
    row_label: str = "layer",
    column_label: str = "alpha",
    limits: tuple[float, float] = (0.0, 100.0),
    cell_format: str = ".0f",
    cell_text=None,
) -> None:
    """A heatmap of ``values`` (``[len(rows), len(columns)]``, NaN shown blank), each cell annotated
    with its value or with ``cell_text[i][j]`` when given."""
    label_width = 0.08 * max((len(str(r)) for r in rows), default=0)
    fig = Figure(figsize=(max(6.0, 1.5 + 0.7 * len(columns)) + label_width, max(3.0, 1.5 + 0.45 * len(rows))))
    ax = fig.subplots()
    image = ax.imshow(values, cmap="viridis", aspect="auto", vmin=limits[0], vmax=limits[1])
    ax.set_xticks(range(len(columns)), [f"{c:g}" if isinstance(c, float) else str(c) for c in columns])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    if max((len(str(c)) for c in columns), default=0) > 4:
        ax.tick_params(axis="x", labelrotation=45)
    ax.set_xlabel(column_label)
    ax.set_ylabel(row_label)
    _title(fig, title)
    middle = (limits[0] + limits[1]) / 2
    for i in range(len(rows)):
        for j in range(len(columns)):
            value = float(values[i][j])
            if not math.isnan(value):
                colour = "white" if value < middle else "black"
                text = format(value, cell_format) if cell_text is None else cell_text[i][j]
                ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=MIN_FONT_PT)
    fig.colorbar(image, ax=ax, label=label)
    save_figure(fig, path)


def plot_sweep_curves(table, title: str, path: str | Path, controls=None) -> None:
    """Trait, coherence and fluency (mean NLL per answer token, where the table has it) against alpha, one line per
    layer (mean with a band of one std); ``controls`` (``summarise_controls``), where given, as grey markers (random
    directions: x, label-shuffled: +), one per seed, in each panel."""
    metrics = [("trait", "trait score (0-100)"), ("coherence", "coherence score (0-100)")]
    if "nll_mean" in table:
        metrics.append(("nll", "NLL per answer token (nats)"))
    fig = Figure(figsize=(1.0 + 3.3 * len(metrics), 4.2), layout="constrained")
    axes = fig.subplots(1, len(metrics), sharex=True)
    for ax, (metric, label) in zip(axes, metrics, strict=True):
        for layer, rows in table.groupby("layer"):
            rows = rows.sort_values("alpha")
            mean, std = rows[f"{metric}_mean"], rows[f"{metric}_std"].fillna(0)
            ax.plot(rows["alpha"], mean, marker="o", markersize=3, label=f"layer {layer}")
            ax.fill_between(rows["alpha"], mean - std, mean + std, alpha=0.15)
        if controls is not None and len(controls):
            for kind, marker in (("random", "x"), ("shuffled", "+")):
                mine = controls[controls["condition"].str.startswith(kind)]
                if len(mine):
                    ax.scatter(mine["alpha"], mine[f"{metric}_mean"], marker=marker, color="grey", s=18, zorder=3,
                               label=f"{kind} control (each seed)")  # fmt: skip
        ax.set_xlabel("alpha")
        ax.set_ylabel(label)
        if metric != "nll":
            ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 5), frameon=False)
    counts = sorted({int(n) for n in table["n"]})
    n = f"n = {counts[0]}" if len(counts) == 1 else f"n = {counts[0]}-{counts[-1]}"
    _title(fig, f"{title}\nmean and one std over {n} answers per point; NLL under the unsteered model")
    save_figure(fig, path)


def plot_histogram(values: Sequence[float], xlabel: str, title: str, path: str | Path) -> None:
    """Histogram of ``values`` written to ``path``; the title gives their number."""
    title = f"{title} (n = {len(values)})"
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.hist(list(values), bins=min(50, max(10, len(values) // 5)))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    _title(fig, title, ax)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_features(labels: Sequence[str], cosines: Sequence[float] | None, differences: Sequence[float], title: str,
                  path: str | Path,
                  difference_label: str = "activation difference (positive - negative answers)") -> None:  # fmt: skip
    """Bars over the same features: cosine with the vector (left; left out when ``cosines`` is None) and
    activation difference."""
    fig = Figure(figsize=(10 if cosines is not None else 6, max(3.0, 0.3 * len(labels) + 1.5)))
    axes = fig.subplots(1, 2, sharey=True) if cosines is not None else [fig.subplots()]
    rows = list(range(len(labels)))[::-1]
    if cosines is not None:
        axes[0].barh(rows, list(cosines), color=["tab:red" if c > 0 else "tab:blue" for c in cosines])
        axes[0].set_xlabel("cosine with the vector")
    axes[0].set_yticks(rows, [textwrap.shorten(label, 40) for label in labels])
    axes[-1].barh(rows, [0.0 if d != d else d for d in differences], color="tab:gray")
    axes[-1].set_xlabel(difference_label)
    for ax in axes:
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.grid(alpha=0.3, axis="x")
    _title(fig, title, axes[0])
    save_figure(fig, path)


def plot_model_shift(shift: torch.Tensor, title: str, path: str | Path) -> None:
    """Per-layer shift of ``model_shift``; x is the layer index of ``personalab.engine.layers``."""
    values = torch.as_tensor(shift).tolist()
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(range(len(values)), values, marker="o", markersize=3)
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set_xlabel(LAYER_AXIS)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("mean projection shift (tuned - base)")
    _title(fig, title, ax)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def _plain(value: float, _position=None) -> str:
    return f"{value:g}"


def _two_and_five(value: float, _position=None) -> str:
    """A minor tick's label on a log axis: only at 2 and 5 times a power of ten, so labels never crowd."""
    leading = value / 10 ** math.floor(math.log10(value)) if value > 0 else 0
    return _plain(value) if round(leading, 6) in (2.0, 5.0) else ""


def plot_training_curve(losses: Sequence[float], title: str, path: str | Path, ylabel: str = "loss") -> None:
    """Loss per optimizer step; a log y axis (labelled in plain numbers) when the loss spans over a decade."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, marker="o" if len(losses) <= 30 else None, markersize=3)
    positive = [x for x in losses if x > 0]
    if positive and len(positive) == len(losses) and max(positive) / min(positive) > 10:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(_plain))
        decades = math.log10(max(positive) / min(positive))
        ax.yaxis.set_minor_formatter(FuncFormatter(_two_and_five) if decades < 2 else NullFormatter())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    _title(fig, title, ax)
    ax.grid(alpha=0.3, which="both")
    save_figure(fig, path)


def plot_score_bars(table, title: str, path: str | Path) -> None:
    """Trait and coherence per model (``table``: model, *_mean, *_std and n, the answers each mean is over):
    horizontal bars with one std, each labelled with its n."""
    counts = table["n"] if "n" in table else [None] * len(table)
    labels = [
        textwrap.fill(short_name(str(m)), 28) + ("" if n is None else f"\nn = {int(n)}")
        for m, n in zip(table["model"], counts, strict=True)
    ]
    fig = Figure(figsize=(10, 1.5 + 0.7 * len(labels)))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, metric in zip(axes, ("trait", "coherence"), strict=True):
        ax.barh(range(len(labels)), table[f"{metric}_mean"], xerr=table[f"{metric}_std"].fillna(0), capsize=4)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel(f"{metric} score (0-100), mean and one std")
        ax.set_xlim(0, 100)
        ax.set_title(metric)
        ax.grid(alpha=0.3, axis="x")
    axes[0].invert_yaxis()  # the axes share y: the first model on top
    _title(fig, title)
    save_figure(fig, path)


@dataclass
class Panel:
    """One panel of ``plot_over_training``: ``lines`` label -> ``(x, y, notes)``, ``points`` label -> ``(x, y)``
    (drawn as grey dots), ``crosses`` x positions marked on the zero line (e.g. checkpoints with no vector),
    ``bands`` label -> ``(x, low, high)`` shaded ranges (e.g. interquartile ranges)."""

    ylabel: str
    lines: dict[str, tuple[Sequence[float], Sequence[float], Sequence[str] | None]] = field(default_factory=dict)
    points: dict[str, tuple[Sequence[float], Sequence[float]]] = field(default_factory=dict)
    crosses: dict[str, Sequence[float]] = field(default_factory=dict)
    bands: dict[str, tuple[Sequence[float], Sequence[float], Sequence[float]]] = field(default_factory=dict)
    hline: float | None = None
    limits: tuple[float, float] | None = None
    log_y: bool = False


def plot_over_training(panels: Sequence[Panel], xlabel: str, title: str, path: str | Path, log_x: bool) -> None:
    """Values against a position (training tokens or step, a layer...), one panel above the other;
    ``notes`` are written above each point (significance marks)."""
    fig = Figure(figsize=(8, 1.5 + 3.0 * len(panels)))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels, strict=True):
        for label, (x, y, notes) in panel.lines.items():
            (line,) = ax.plot(x, y, marker="o", markersize=4, label=label)
            for xi, yi, note in zip(x, y, notes or [], strict=False):
                if note and not math.isnan(yi):
                    ax.annotate(
                        note,
                        (xi, yi),
                        textcoords="offset points",
                        xytext=(0, 5),
                        ha="center",
                        fontsize=MIN_FONT_PT,
                        color=line.get_color(),
                    )
        for label, (x, low, high) in panel.bands.items():
            ax.fill_between(x, low, high, alpha=0.15, label=label)
        for label, (x, y) in panel.points.items():
            ax.scatter(x, y, s=12, color="grey", alpha=0.6, label=label, zorder=1)
        for label, x in panel.crosses.items():
            ax.scatter(x, [0.0] * len(x), marker="x", color="black", label=label, zorder=3)
        if panel.hline is not None:
            ax.axhline(panel.hline, color="grey", linewidth=0.8)
        if panel.limits is not None:
            ax.set_ylim(*panel.limits)
        if panel.log_y:
            ax.set_yscale("log")
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3, which="both")
        if panel.lines or panel.points or panel.crosses:
            ax.legend(fontsize=MIN_FONT_PT, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    if log_x:
        axes[-1].set_xscale("log")
    else:
        axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel(xlabel)
    _title(fig, title)
    save_figure(fig, path)


def plot_labelled_points(xy, labels: Sequence[str], colour: Sequence[float], title: str, path: str | Path) -> None:
    """A 2-D embedding (``[n, 2]``), each point labelled and coloured by ``colour`` (e.g. log tokens)."""
    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.subplots()
    image = ax.scatter([p[0] for p in xy], [p[1] for p in xy], c=colour, cmap="viridis", s=40)
    for (x, y), label in zip(xy, labels, strict=True):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=MIN_FONT_PT)
    ax.set_xlabel("MDS 1")
    ax.set_ylabel("MDS 2")
    fig.colorbar(image, ax=ax, label="log10 training position")
    _title(fig, title, ax)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_pca_pairs(panels: dict[str, tuple], title: str, path: str | Path) -> None:
    """Per persona (a row): histograms of PC0 by class, then PC0 against PC1, PC2 and PC3.

    ``panels`` maps a persona to ``(components [n, 4], positive bool [n])``.
    """
    fig = Figure(figsize=(13, 2.8 * len(panels)))
    axes = fig.subplots(len(panels), 4, squeeze=False)
    for row, (persona, (pcs, positive)) in zip(axes, panels.items(), strict=True):
        for cls, label, colour in ((True, "positive", "tab:red"), (False, "negative", "tab:blue")):
            mask = positive == cls
            row[0].hist(pcs[mask, 0], bins=20, alpha=0.5, color=colour, label=label)
            for k in range(1, min(4, pcs.shape[1])):
                row[k].scatter(pcs[mask, k], pcs[mask, 0], s=6, alpha=0.4, color=colour)
        row[0].set_ylabel(f"{persona}\ncount")
        row[0].set_xlabel("PC0")
        for k in range(1, 4):
            row[k].set_xlabel(f"PC{k}")
            row[k].set_ylabel("PC0")
        row[0].legend(fontsize=MIN_FONT_PT)
    _title(fig, title)
    save_figure(fig, path)


def plot_embedding(xy, groups: Sequence[str], positive: Sequence[bool], title: str, path: str | Path) -> None:
    """A 2-D embedding coloured by group (persona), circles for positive and crosses for negative statements."""
    fig = Figure(figsize=(8, 6.5))
    ax = fig.subplots()
    names = list(dict.fromkeys(groups))
    colours = {name: f"C{i % 10}" for i, name in enumerate(names)}
    groups, positive = list(groups), list(positive)
    for name in names:
        for cls, marker in ((True, "o"), (False, "x")):
            rows = [i for i, (g, p) in enumerate(zip(groups, positive, strict=True)) if g == name and p == cls]
            label = f"{name} ({'positive' if cls else 'negative'})"
            ax.scatter(xy[rows, 0], xy[rows, 1], s=10, marker=marker, color=colours[name], alpha=0.6, label=label)
    ax.legend(fontsize=MIN_FONT_PT, markerscale=1.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_xlabel("dimension 1")
    ax.set_ylabel("dimension 2")
    _title(fig, title, ax)
    save_figure(fig, path)


def exclusive_intersections(sets: dict[str, set]) -> list[tuple[frozenset[str], int]]:
    """Elements by the exact group of sets that holds them: ``(names, count)``, largest first."""
    counts: dict[frozenset[str], int] = {}
    for element in set().union(*sets.values()):
        members = frozenset(name for name, items in sets.items() if element in items)
        counts[members] = counts.get(members, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], sorted(kv[0])))


def plot_upset(sets: dict[str, set], title: str, path: str | Path, max_columns: int = 30) -> None:
    """An UpSet figure: bars of exclusive intersection sizes (largest first) over a membership
    matrix, and each set's size at the left."""
    names = list(sets)
    columns = exclusive_intersections(sets)[:max_columns]
    fig = Figure(figsize=(max(7.0, 0.35 * len(columns) + 3), 2.5 + 0.45 * len(names) + 3))
    grid = fig.add_gridspec(2, 2, width_ratios=(1, 4), height_ratios=(3, max(1, 0.45 * len(names))))
    bars, matrix, totals = fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, 1]), fig.add_subplot(grid[1, 0])
    x = range(len(columns))
    heights = [count for _, count in columns]
    bars.bar(x, heights, color="black")
    for xi, h in zip(x, heights, strict=True):
        bars.annotate(str(h), (xi, h), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=MIN_FONT_PT)
    bars.set_ylabel("exclusive intersection size")
    bars.set_xticks([])
    bars.set_xlim(-0.5, len(columns) - 0.5)
    for xi, (members, _) in zip(x, columns, strict=True):
        rows = [i for i, name in enumerate(names) if name in members]
        matrix.scatter([xi] * len(names), range(len(names)), s=40, color="lightgrey", zorder=1)
        matrix.scatter([xi] * len(rows), rows, s=40, color="black", zorder=2)
        if len(rows) > 1:
            matrix.plot([xi, xi], [min(rows), max(rows)], color="black", linewidth=2, zorder=1)
    matrix.set_yticks(range(len(names)), names)
    matrix.set_xticks([])
    matrix.set_xlim(-0.5, len(columns) - 0.5)
    matrix.set_ylim(len(names) - 0.5, -0.5)
    matrix.set_frame_on(False)
    totals.barh(range(len(names)), [len(sets[n]) for n in names], color="grey")
    totals.set_ylim(len(names) - 0.5, -0.5)
    totals.invert_xaxis()
    totals.set_yticks([])
    totals.set_xlabel("set size")
    _title(fig, title)
    save_figure(fig, path)


def plot_correlation(
    x: Sequence[float], y: Sequence[float], labels: Sequence[str], xlabel: str, ylabel: str, title: str, stats: dict,
    path: str | Path,
) -> None:  # fmt: skip
    """The points ``(x[i], y[i])``, each labelled, with the least-squares line where ``stats`` (``correlation``: n, and
    r, p, low, high from three points) has an r; the title gives r, n, p and the interval where there is one."""
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    ax.scatter(x, y, zorder=2)
    for xi, yi, label in zip(x, y, labels, strict=True):
        ax.annotate(label, (xi, yi), fontsize=MIN_FONT_PT, textcoords="offset points", xytext=(4, 4))
    if "r" in stats:
        slope, intercept = np.polyfit(x, y, 1)
        xs = np.linspace(min(x), max(x), 50)
        ax.plot(xs, slope * xs + intercept, color="grey", zorder=1)
        interval = "no interval: too few points" if stats["low"] is None else (
            f"95% interval [{stats['low']:.2f}, {stats['high']:.2f}]"
        )  # fmt: skip
        note = f"Pearson r = {stats['r']:.2f} over n = {stats['n']} fine-tunes, p = {stats['p']:.2g}; {interval}"
    else:
        note = f"n = {stats['n']} fine-tunes: " + ("r is undefined" if "undefined" in stats else "too few for r")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _title(fig, f"{title}\n{note}", ax)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
