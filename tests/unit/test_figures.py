"""Figures read at the size they are saved: ``layout_problems`` finds what would not, measured with matplotlib's own
text extents, and every plot of ``personalab.figures.plots`` passes it on demanding inputs."""

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from personalab.figures import plots
from personalab.figures.layout import MIN_FONT_PT, layout_problems


def _figure() -> tuple[Figure, object]:
    fig = Figure(figsize=(4, 3))
    ax = fig.subplots()
    ax.plot(range(10), range(10), marker="o", label="data")
    return fig, ax


def test_the_check_sees_small_overlapping_clipped_text_and_a_legend_over_data():
    fig, ax = _figure()
    ax.set_xlabel("x")
    fig.tight_layout()
    assert layout_problems(fig) == []

    fig, ax = _figure()
    ax.text(2, 5, "tiny", fontsize=MIN_FONT_PT - 1)
    assert layout_problems(fig) == [f"'tiny' is {MIN_FONT_PT - 1:g} pt"]

    fig, ax = _figure()
    ax.text(2, 5, "one label", fontsize=9)
    ax.text(2.2, 5.1, "another label", fontsize=9)
    assert layout_problems(fig) == ["'one label' overlaps 'another label'"]

    fig, ax = _figure()
    ax.set_title("a title far too long to fit a figure four inches wide at eleven points", fontsize=11)
    assert any("runs past the figure's edge" in p for p in layout_problems(fig))

    fig, ax = _figure()
    ax.legend(loc="center")
    assert layout_problems(fig) == ["the legend of 'a panel' covers 2 data points"]

    fig, ax = _figure()
    ax.set_xticks(range(10), [f"label number {i}" for i in range(10)])
    assert any("overlaps" in p for p in layout_problems(fig))


def test_every_plot_reads_at_its_saved_size_and_has_a_vector_copy(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    layers, alphas = [4, 8, 12, 16, 20], [0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0]
    long = "Qwen/Qwen2.5-7B-Instruct"
    table = pd.DataFrame(
        [
            {"layer": layer, "alpha": a, "n": 100, **{f"{m}_{s}": rng.uniform(0, 90) for m in ("trait", "coherence")
             for s in ("mean", "std")}, "nll_mean": rng.uniform(1, 3), "nll_std": 0.2}
            for layer in layers for a in alphas
        ]
    )  # fmt: skip
    controls = table[table["alpha"] > 0].assign(condition="random-0")
    panel = plots.Panel(
        "delta trait", lines={f"unit {i}": (list(range(8)), rng.normal(size=8).tolist(), None) for i in range(3)}
    )
    written = {
        "norms": lambda p: plots.plot_layer_norms(
            {v: rng.uniform(0, 5, 29).tolist() for v in ("response_mean", "prompt_mean", "last_prompt")},
            f"evil on {long}: per-layer vector norms (60 of 100 pairs kept)", p,
        ),
        "cosine": lambda p: plots.plot_layer_cosine(
            range(29), rng.uniform(-1, 1, 29).tolist(), "cosine of two vectors", p
        ),
        "heatmap": lambda p: plots.plot_heatmap(
            rng.uniform(0, 100, (len(layers), len(alphas))), layers, alphas,
            f"evil on {long}: mean trait (normalised scale), n = 100 answers per cell", "trait score (0-100)", p,
        ),
        "curves": lambda p: plots.plot_sweep_curves(table, f"evil on {long} (normalised scale)", p, controls),
        "histogram": lambda p: plots.plot_histogram(rng.normal(size=500), "projection", "500 projections", p),
        "features": lambda p: plots.plot_features(
            [f"{i} a feature with a long label about apologies" for i in range(20)], rng.uniform(-1, 1, 20).tolist(),
            rng.normal(size=20).tolist(), "ckpt/final - stories260k in 2048 features", p,
        ),
        "bars": lambda p: plots.plot_score_bars(
            pd.DataFrame({"model": ["base", "runs/ft", "runs/ft-steered", "runs/ft-ablated"], "n": [40] * 4, **{
                f"{m}_{s}": rng.uniform(0, 50, 4) for m in ("trait", "coherence") for s in ("mean", "std")}}),
            f"evil on {long} and its fine-tunes: judged scores", p,
        ),
        "over_training": lambda p: plots.plot_over_training([panel, panel], "training tokens", "emergence", p, False),
        "correlation": lambda p: plots.plot_correlation(
            [0.1, 0.5, 0.2], [10.0, 40.0, 30.0], ["ft", "ft-steered", "ft-ablated"], "projection shift",
            "judged evil (0-100)", "evil: projection shift against trait expression",
            {"n": 3, "r": 0.89, "p": 0.33, "low": None, "high": None}, p,
        ),
        "model_shift": lambda p: plots.plot_model_shift(torch.randn(29), f"ft - {long} along response_mean", p),
        "training": lambda p: plots.plot_training_curve(rng.uniform(0.1, 5, 50).tolist(), "distilling", p),
    }  # fmt: skip
    checked = {}
    original = Figure.savefig

    def measured(fig, path, *args, **kwargs):
        if str(path).endswith(".png"):
            checked[path.stem] = layout_problems(fig)
        return original(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", measured)
    for name, draw in written.items():
        draw(tmp_path / f"{name}.png")
    assert set(checked) == set(written)
    assert {name: found for name, found in checked.items() if found} == {}
    assert all((tmp_path / f"{name}.svg").stat().st_size > 1000 for name in written)


def test_score_bars_list_the_models_top_down_in_table_order(tmp_path, monkeypatch):
    table = pd.DataFrame({"model": ["base", "ft"], "n": [4, 4], "trait_mean": [10.0, 90.0], "trait_std": [1.0, 1.0],
                          "coherence_mean": [50.0, 50.0], "coherence_std": [1.0, 1.0]})  # fmt: skip
    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))
    plots.plot_score_bars(table, "scores", tmp_path / "bars.png")
    for ax in drawn[0].axes:
        top = max(ax.patches, key=lambda bar: bar.get_window_extent().y0)
        assert top.get_width() == table.loc[0, f"{ax.get_title()}_mean"], "the base, the first row, is on top"
