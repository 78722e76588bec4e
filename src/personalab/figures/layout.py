"""Saving figures for a paper, and checking that they read at the size they are saved.

Every figure is saved as a PNG and, beside it, the same figure as SVG (``save_figure``), a vector copy that
stays sharp in a paper; both are byte-identical when the same figure is saved again. ``layout_problems``
measures a drawn figure with matplotlib's own text extents: text smaller than ``MIN_FONT_PT`` at the saved
size, text that overlaps other text, text cut off at the figure's edge, and a legend drawn over data points.
"""

import threading
from itertools import combinations
from pathlib import Path

from matplotlib import rc_context
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.transforms import Bbox

MIN_FONT_PT = 8.0
"""Smallest font size of any text, in points at the saved size."""
DPI = 200
VECTOR_SUFFIX = ".svg"
_SVG_SALT = threading.Lock()
"""Held while the global ``svg.hashsalt`` is set for one figure (figures may be saved from several threads)."""


def save_figure(fig: Figure, path: str | Path) -> None:
    """Lay ``fig`` out (``tight_layout``, unless it has a layout engine of its own) and write it to ``path`` (PNG) and
    to ``path`` with ``VECTOR_SUFFIX``."""
    path = Path(path)
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    with _SVG_SALT, rc_context({"svg.hashsalt": path.name}):  # the SVG's ids from its name, not a random salt
        fig.savefig(path.with_suffix(VECTOR_SUFFIX), metadata={"Date": None})


def _tick_labels(ax: Axes) -> list[Text]:
    """The tick labels ``ax`` draws: those of its major and minor ticks inside the view interval."""
    out = []
    for axis in (ax.xaxis, ax.yaxis):
        low, high = sorted(axis.get_view_interval())
        span = (high - low) * 1e-9
        for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
            if low - span <= tick.get_loc() <= high + span:
                out += [label for label in (tick.label1, tick.label2) if label.get_visible()]
    return out


def drawn_texts(fig: Figure) -> list[Text]:
    """Every visible, non-empty text of ``fig`` that it draws: titles, axis and tick labels, annotations, legends."""
    texts = list(fig.texts)
    if fig._suptitle is not None:
        texts.append(fig._suptitle)
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        texts += _tick_labels(ax)
        texts += [ax.xaxis.get_offset_text(), ax.yaxis.get_offset_text()]
        legend = ax.get_legend()
        if legend is not None and legend.get_visible():
            texts += [*legend.get_texts(), legend.get_title()]
    legends = [legend for legend in fig.legends if legend.get_visible()]
    texts += [t for legend in legends for t in (*legend.get_texts(), legend.get_title())]
    return [t for t in dict.fromkeys(texts) if t.get_visible() and t.get_text().strip()]


def _overlap(a: Bbox, b: Bbox) -> float:
    """Area (square pixels) of the intersection of ``a`` and ``b``."""
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(0.0, width) * max(0.0, height)


def _covered_points(ax: Axes, box: Bbox) -> int:
    """Data points of lines and scatters of ``ax`` that fall inside ``box`` (display coordinates)."""
    points = [line.get_transform().transform(line.get_xydata()) for line in ax.get_lines() if line.get_visible()]
    points += [c.get_offset_transform().transform(c.get_offsets()) for c in ax.collections if len(c.get_offsets())]
    return sum(int(box.contains(x, y)) for block in points for x, y in block)


def layout_problems(fig: Figure, tolerance: float = 1.0) -> list[str]:
    """What would not read in ``fig`` at its saved size, one line each: text below ``MIN_FONT_PT``, two texts whose
    extents overlap by more than ``tolerance`` square pixels, text past the figure's edge, a legend over data."""
    canvas = FigureCanvasAgg(fig)
    fig.draw(canvas.get_renderer())
    renderer = canvas.get_renderer()
    texts = drawn_texts(fig)
    boxes = {t: t.get_window_extent(renderer) for t in texts}
    frame = fig.bbox
    problems = [f"{t.get_text()!r} is {t.get_fontsize():g} pt" for t in texts if t.get_fontsize() < MIN_FONT_PT]
    problems += [
        f"{t.get_text()!r} runs past the figure's edge"
        for t, box in boxes.items()
        if box.x0 < frame.x0 - 1 or box.y0 < frame.y0 - 1 or box.x1 > frame.x1 + 1 or box.y1 > frame.y1 + 1
    ]
    problems += [
        f"{a.get_text()!r} overlaps {b.get_text()!r}"
        for a, b in combinations(texts, 2)
        if _overlap(boxes[a], boxes[b]) > tolerance
    ]
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is not None and legend.get_visible():
            covered = _covered_points(ax, legend.get_window_extent(renderer))
            if covered:
                problems.append(f"the legend of {ax.get_title() or 'a panel'!r} covers {covered} data points")
    for legend in fig.legends:
        covered = sum(_covered_points(ax, legend.get_window_extent(renderer)) for ax in fig.axes)
        if legend.get_visible() and covered:
            problems.append(f"the figure's legend covers {covered} data points")
    return problems
