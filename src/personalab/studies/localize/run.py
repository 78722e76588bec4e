"""The ``localize`` study: per-layer divergence of persona statements and dimension reduction figures.

Activations are last-prompt-token residuals of each statement as the system message
(``personalab.studies.localize.activations``), at layer ``l = hidden_states[l]``. Writes
``identity_probe.csv``, ``divergence.csv`` (``personalab.studies.localize.divergence``),
``divergence.png`` (measures x layers, each as its rise above chance), ``summary.md`` (per
measure its chance level, the layers above chance and the first layer at 90% of its largest rise
above chance, as a fraction of the depth, to set beside the paper's "final third"; see
``personalab.studies.localize.divergence`` for the chance levels), and at each figure layer
``pca_layerL.png`` (PC0 against PC0-3, positive against negative, per persona),
``tsne_layerL.png`` (perplexity 30, PCA initialisation) and ``umap_layerL.png`` (15 neighbours,
minimum distance 0.1), all seeded.
"""

from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from personalab.console import progress_bar, say
from personalab.engine.handle import ModelHandle
from personalab.engine.layers import CONVENTION, check_layers
from personalab.figures.plots import plot_embedding, plot_heatmap, plot_pca_pairs, short_name
from personalab.figures.tables import markdown_table, write_csv
from personalab.hashes import content_key
from personalab.runfolder import claim, model_settings
from personalab.studies.localize.activations import ActivationCache, statement_format
from personalab.studies.localize.divergence import (
    NULLS,
    POLARITY,
    Measure,
    identity_probe,
    persona_labels,
    polarity,
    probe_chance,
)
from personalab.studies.localize.statements import Statement


class LocalizeConfig(BaseModel):
    """Settings of ``localize``; ``layers = None`` is every layer, ``figure_layers = None`` the default four."""

    model_config = ConfigDict(extra="forbid")
    layers: list[int] | None = None
    figure_layers: list[int] | None = None
    seed: int = 0
    perplexity: float = Field(30.0, gt=0)
    neighbours: int = Field(15, ge=2)
    min_distance: float = Field(0.1, ge=0)
    permutations: int = Field(100, ge=20)
    batch_size: int = Field(16, ge=1)


def default_figure_layers(n_blocks: int) -> list[int]:
    """Four layers as in the paper's overview figure (1, 7, 10 and 31 of a 32-block model)."""
    return sorted({1, max(1, round(0.22 * n_blocks)), max(1, round(0.31 * n_blocks)), max(1, n_blocks - 1)})


def check_statements(statements: dict[str, list[Statement]], minimum: int = 2) -> None:
    """Every persona needs ``minimum`` positive and negative statements for the probes."""
    from personalab.errors import InvalidInputError

    for persona, rows in statements.items():
        pos = sum(s.positive for s in rows)
        if min(pos, len(rows) - pos) < minimum:
            raise InvalidInputError(
                f"persona {persona!r} has {pos} positive and {len(rows) - pos} negative statements; "
                f"need at least {minimum} of each (lower `min_confidence`?)"
            )


def run_localize(
    handle: ModelHandle,
    statements: dict[str, list[Statement]],
    out: str | Path,
    config: LocalizeConfig,
    activations: str | Path | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Run the study into ``out``; returns ``divergence.csv``'s table."""
    out = Path(out)
    layers = check_layers(config.layers, handle.n_blocks)
    figures = check_layers(config.figure_layers or default_figure_layers(handle.n_blocks), handle.n_blocks)
    check_statements(statements)
    settings = {
        **model_settings(handle),
        "statements_sha256": content_key({p: [(s.text, s.positive) for s in rows] for p, rows in statements.items()}),
        "config": config.model_dump(mode="json", exclude={"layers", "figure_layers", "batch_size"}),
    }
    prompts = statement_format(handle)
    run = claim(out, "localize", settings, {"layers": layers, "figure_layers": figures}, prompt_format=prompts)
    say(f"prompt format: {prompts}", progress)
    cache = ActivationCache(activations or out / "activations", handle)
    rows = [s for persona in statements for s in statements[persona]]
    keys = cache.ensure([s.text for s in rows], config.batch_size, progress)
    labels, personas = persona_labels([s.persona for s in rows])
    positive = np.array([s.positive for s in rows])
    identity, divergence = [], []
    with progress_bar("layers", len(layers), progress) as advance:
        for layer in layers:
            x = cache.layer(keys, layer)
            if len(personas) > 1:
                identity.append({"layer": layer, **identity_probe(x, labels, config.seed)})
            for index, persona in enumerate(personas):
                mine = labels == index
                measured = polarity(x[mine], positive[mine], config.seed, config.permutations)
                divergence.append({"layer": layer, "persona": persona, **measured})
            advance(1)
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(divergence)
    write_csv(table, out / "divergence.csv")
    probe = pd.DataFrame(identity, columns=["layer", "accuracy", "f1_weighted", "precision_weighted"])
    write_csv(probe, out / "identity_probe.csv")
    measures = _measures(table, probe, len(personas), len(rows))
    _write_heatmap(measures, layers, f"Persona divergence on {short_name(handle.name)}", out)
    _write_summary(out, handle, measures, layers, statements)
    with progress_bar("figures (PCA, t-SNE, UMAP per layer)", len(figures), progress) as advance:
        for layer in figures:
            _figures(cache, keys, rows, layer, handle, config, out)
            advance(1)
    run.write(
        model=handle.name,
        revision=handle.revision,
        positions="last token of the statement as system message with the generation prompt",
        config=config.model_dump(),
        statements={
            p: {"positive": sum(s.positive for s in r), "negative": sum(not s.positive for s in r)}
            for p, r in statements.items()
        },
    )
    say(f"wrote {out}/divergence.csv, identity_probe.csv, divergence.png, summary.md and figures", progress)
    return table


def _measures(table: pd.DataFrame, probe: pd.DataFrame, personas: int, statements: int) -> dict[str, Measure]:
    """Each measure over the layers with its chance level (means over personas for the polarity measures)."""
    means = table.groupby("layer", sort=False)[list(POLARITY + NULLS)].mean()
    layers = len(means)
    chance, ceiling = probe_chance(2, statements)
    measures = {
        "polarity probe accuracy (mean over personas)": Measure(
            means["probe_accuracy"].tolist(), [chance] * layers, [ceiling] * layers
        )
    }
    for measure, name in (
        ("silhouette", "silhouette on 4 PCs (mean)"),
        ("mean_distance", "mean distance / spread (mean)"),
    ):
        measures[name] = Measure(
            means[measure].tolist(), means[f"{measure}_chance"].tolist(), means[f"{measure}_chance_95"].tolist()
        )
    if len(probe):
        chance, ceiling = probe_chance(personas, statements)
        identity = {
            f"identity probe {label}": Measure(probe[column].tolist(), [chance] * layers, [ceiling] * layers)
            for column, label in (
                ("accuracy", "accuracy"),
                ("f1_weighted", "F1 (weighted)"),
                ("precision_weighted", "precision (weighted)"),
            )
        }
        measures = identity | measures
    return measures


def _rises(measure: Measure) -> np.ndarray:
    gain = np.asarray(measure.values, dtype=float) - np.asarray(measure.chance, dtype=float)
    top = np.nanmax(gain) if np.isfinite(gain).any() else np.nan
    return gain / top if top > 0 else np.zeros_like(gain)


def _write_heatmap(measures: dict[str, Measure], layers: list[int], title: str, out: Path) -> None:
    relative = np.array([_rises(m) for m in measures.values()])
    text = [[f"{v:.2f}" for v in m.values] for m in measures.values()]
    plot_heatmap(
        relative,
        list(measures),
        layers,
        f"{title}: each measure's rise above chance over its largest rise (cells: values)",
        "(value - chance) / (max - chance)",
        out / "divergence.png",
        row_label="measure",
        column_label="layer",
        limits=(min(0.0, float(np.nanmin(relative))), 1.0),
        cell_text=text,
    )


def _write_summary(out: Path, handle: ModelHandle, measures: dict[str, Measure], layers: list[int], statements) -> None:
    lines = [f"# Persona divergence on {handle.name}", "", f"- layers: {CONVENTION}; {handle.n_blocks} blocks"]
    lines += [
        f"- {p}: {sum(s.positive for s in r)} positive, {sum(not s.positive for s in r)} negative statements"
        for p, r in statements.items()
    ]
    lines += [
        "- chance: 1/k for the identity probe over k personas and 1/2 for the polarity probe (above chance: past "
        "the 95th percentile of a chance classifier's accuracy on these statements); for silhouette and distance "
        "the mean of the measure under label permutations (above chance: past its 95th percentile)",
        "",
        "| measure | chance | layers above chance | first layer at 90% of its rise above chance | fraction of depth "
        "| maximum | at layer |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, measure in measures.items():
        above = [layer for layer, ok in zip(layers, measure.above(), strict=True) if ok]
        rise = measure.rise()
        best = layers[int(np.nanargmax(measure.values))]
        first = "no layer above chance" if rise is None else str(layers[rise])
        fraction = "-" if rise is None else f"{layers[rise] / handle.n_blocks:.2f}"
        lines.append(
            f"| {name} | {np.nanmean(measure.chance):.3f} | {len(above)} of {len(layers)} | {first} | {fraction} "
            f"| {np.nanmax(measure.values):.3f} | {best} |"
        )
    frame = pd.DataFrame({"layer": layers} | {name: m.values for name, m in measures.items()})
    lines += ["", "The paper finds personas diverge only in the final third of the layers (fraction >= 0.67).", ""]
    lines += [markdown_table(frame, {c: ".3f" for c in measures})]
    (out / "summary.md").write_text("\n".join(lines))


def _figures(cache, keys, rows: list[Statement], layer: int, handle, config: LocalizeConfig, out: Path) -> None:
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = cache.layer(keys, layer)
    personas = [s.persona for s in rows]
    positive = np.array([s.positive for s in rows])
    model = short_name(handle.name)
    panels = {}
    for persona in dict.fromkeys(personas):
        mine = np.array([p == persona for p in personas])
        pcs = PCA(n_components=min(4, mine.sum(), x.shape[1]), random_state=config.seed).fit_transform(x[mine])
        panels[persona] = (pcs, positive[mine])
    plot_pca_pairs(panels, f"PCA of statements on {model}, layer {layer}", out / f"pca_layer{layer}.png")
    perplexity = min(config.perplexity, (len(x) - 1) / 3)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=config.seed).fit_transform(x)
    plot_embedding(tsne, personas, positive, f"t-SNE on {model}, layer {layer}", out / f"tsne_layer{layer}.png")
    import umap

    reducer = umap.UMAP(
        n_neighbors=min(config.neighbours, len(x) - 1),
        min_dist=config.min_distance,
        random_state=config.seed,
        n_jobs=1,  # a seeded UMAP runs on one thread; saying so keeps it quiet
    )
    plot_embedding(
        reducer.fit_transform(x), personas, positive, f"UMAP on {model}, layer {layer}", out / f"umap_layer{layer}.png"
    )
