"""A trace's tables and figures, rebuilt from its records and vector files after every run.

Per unit folder ``TRAIT-STRATEGY/``: ``vectors/LABEL.safetensors``, ``status.csv``, and the
geometry of the ``response_mean`` vectors (at the chosen layer and at every layer):
``cos_to_final.csv`` / ``.png`` (checkpoint x layer, heatmap layer x checkpoint),
``cos_consecutive.csv``, ``trajectory.png`` (cosine to the final vector and to the previous
checkpoint at the layer), ``cos_matrix.csv`` / ``.png``, ``mds.csv`` / ``.png`` and
``norms.csv`` / ``.png`` (vector norm over the checkpoint's mean residual norm). At the top:
``emergence.csv`` / ``.md`` / ``.png``, ``transfer.csv`` / ``.md`` / ``.png`` (with a target),
``strategies.csv`` / ``.png`` (cosines between strategies of a trait) and ``summary.md``.
The final vector is the last extractable checkpoint's.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from personalab.figures.plots import Panel, plot_heatmap, plot_labelled_points, plot_over_training, short_name
from personalab.figures.tables import markdown_table, write_csv
from personalab.methods.extraction import RULES
from personalab.studies.trace.geometry import (
    consecutive_cosines,
    cosine_matrix,
    cosine_to_final,
    mds_2d,
    relative_norms,
)
from personalab.studies.trace.run import TraceConfig, Unit, load_record, transfer_path
from personalab.studies.trace.series import Bins, Checkpoint
from personalab.studies.trace.tables import (
    binned,
    condition_rows,
    finish,
    first_significant,
    format_tokens,
    not_extractable_row,
    wide_markdown,
)


def series_name(checkpoints: list[Checkpoint]) -> str:
    """What the series is of: the model's hub name, or the folder that holds the checkpoint folders."""
    first = checkpoints[0]
    return Path(first.source).parent.name if first.revision is None else short_name(first.source)


def _axis(checkpoints: list[Checkpoint]) -> tuple[str, bool]:
    tokens = checkpoints[0].tokens is not None
    return ("training tokens" if tokens else "training step"), all(c.position > 0 for c in checkpoints)


def _layers_frame(checkpoints: list[Checkpoint], values: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame(values, columns=[f"layer_{layer}" for layer in range(values.shape[1])])
    frame.insert(0, "revision", [c.label for c in checkpoints])
    frame.insert(1, "tokens", [c.tokens for c in checkpoints])
    frame.insert(2, "step", [c.step for c in checkpoints])
    return frame


def _status(out: Path, unit: Unit, checkpoints: list[Checkpoint]) -> pd.DataFrame:
    rows = []
    for checkpoint in checkpoints:
        status = load_record(out, checkpoint)["units"].get(unit.name, {}).get("status")
        if status is None:
            continue
        rows.append(
            {
                "revision": checkpoint.label,
                "step": checkpoint.step,
                "tokens": checkpoint.tokens,
                "pairs": status["pairs"],
                "kept": status["kept"],
                "extractable": status["extractable"],
                **{f"dropped_{rule}": status["rejected"][rule] for rule in RULES},
            }
        )
    return pd.DataFrame(rows)


def geometry(out: Path, unit: Unit, checkpoints: list[Checkpoint], layer: int, seed: int) -> dict:
    """Write the unit's geometry files over its extractable checkpoints; returns headline numbers."""
    folder = out / unit.name
    done = [
        c for c in checkpoints if load_record(out, c)["units"].get(unit.name, {}).get("status", {}).get("extractable")
    ]
    if not done:
        return {}
    stack = np.stack(
        [load_file(folder / "vectors" / f"{c.label}.safetensors")["response_mean"].double().numpy() for c in done]
    )
    residual = np.array([load_record(out, c)["units"][unit.name]["residual_norms"] for c in done])
    xlabel, log_x = _axis(done)
    x = [c.position for c in done]
    labels = [c.label for c in done]
    title = f"{unit.name} on {series_name(done)}"
    to_final, consecutive = cosine_to_final(stack), consecutive_cosines(stack)
    norms = relative_norms(stack, residual)
    write_csv(_layers_frame(done, to_final), folder / "cos_to_final.csv")
    write_csv(_layers_frame(done, consecutive), folder / "cos_consecutive.csv")
    write_csv(_layers_frame(done, norms), folder / "norms.csv")
    plot_heatmap(
        to_final.T,
        list(range(stack.shape[1])),
        labels,
        f"{title}: cosine to the final vector ({done[-1].label})",
        "cosine",
        folder / "cos_to_final.png",
        row_label="layer",
        column_label="checkpoint",
        limits=(-1, 1),
        cell_format=".2f",
    )
    plot_over_training(
        [
            Panel(f"cosine to {done[-1].label}", {f"layer {layer}": (x, to_final[:, layer], None)}, limits=(-1, 1.05)),
            Panel("cosine to previous", {f"layer {layer}": (x, consecutive[:, layer], None)}, limits=(-1, 1.05)),
        ],
        xlabel,
        f"{title}: vector direction over training (layer {layer})",
        folder / "trajectory.png",
        log_x,
    )
    plot_over_training(
        [Panel("vector norm / mean residual norm", {f"layer {layer}": (x, norms[:, layer], None)})],
        xlabel,
        f"{title}: vector norm relative to the residual (layer {layer})",
        folder / "norms.png",
        log_x,
    )
    matrix = cosine_matrix(stack[:, layer])
    write_csv(pd.DataFrame(matrix, index=labels, columns=labels), folder / "cos_matrix.csv", index=True)
    plot_heatmap(
        matrix,
        labels,
        labels,
        f"{title}: cosine between checkpoints (layer {layer})",
        "cosine",
        folder / "cos_matrix.png",
        row_label="checkpoint",
        column_label="checkpoint",
        limits=(-1, 1),
        cell_format=".2f",
    )
    if len(done) >= 3:
        xy = mds_2d(stack[:, layer], seed)
        write_csv(pd.DataFrame({"revision": labels, "mds_1": xy[:, 0], "mds_2": xy[:, 1]}), folder / "mds.csv")
        colour = np.log10(np.maximum(x, 1.0))
        plot_labelled_points(xy, labels, colour, f"{title}: MDS of unit vectors (layer {layer})", folder / "mds.png")
    return {"first": done[0].label, "cos_first": float(to_final[0, layer]), "final": done[-1].label}


def _scores(out: Path, unit: Unit, checkpoint: Checkpoint) -> dict | None:
    return load_record(out, checkpoint)["units"].get(unit.name, {}).get("emergence")


def emergence_table(out: Path, units: list[Unit], checkpoints: list[Checkpoint], n_resamples: int) -> pd.DataFrame:
    """Rows for every steered unit x checkpoint x condition (not-extractable checkpoints included)."""
    final = checkpoints[-1].position
    rows = []
    for unit in units:
        if not unit.steer:
            continue
        for checkpoint in checkpoints:
            status = load_record(out, checkpoint)["units"].get(unit.name, {}).get("status")
            if status is None:
                continue
            if not status["extractable"]:
                rows.append(not_extractable_row(unit.name, unit.trait, checkpoint, final))
                continue
            scores = _scores(out, unit, checkpoint)
            if scores is not None:
                rows += condition_rows(unit.name, unit.trait, checkpoint, final, scores, n_resamples)
    return finish(rows)


def _plot_effects(
    table: pd.DataFrame, units: list[Unit], checkpoints: list[Checkpoint], title: str, path: Path
) -> None:
    xlabel, log_x = _axis(checkpoints)
    position = {c.label: c.position for c in checkpoints}
    panels = []
    for unit in [u for u in units if u.steer]:
        rows = table[table["unit"] == unit.name]
        real = rows[(rows["condition"] == "vector") & rows["extractable"]]
        controls = rows[rows["condition"] != "vector"]
        missing = rows[~rows["extractable"]]
        panel = Panel(f"{unit.name}: delta trait", hline=0.0)
        panel.lines["own vector"] = ([position[r] for r in real["revision"]], real["delta_trait"], list(real["mark"]))
        if len(controls):
            panel.points["controls (random, shuffled)"] = (
                [position[r] for r in controls["revision"]],
                controls["delta_trait"],
            )
        if len(missing):
            panel.crosses["not extractable"] = [position[r] for r in missing["revision"]]
        panels.append(panel)
    if panels:
        counts = sorted({int(n) for n in table["n_questions"].dropna()})
        n = "" if not counts else f"; n = {counts[0]}" + (f"-{counts[-1]}" if len(counts) > 1 else "")
        plot_over_training(panels, xlabel, f"{title}{n} questions per point (mean over their samples)", path, log_x)


def _steered_markdown(table: pd.DataFrame, checkpoints: list[Checkpoint], title: str) -> str:
    lines = [wide_markdown(table, checkpoints, title)]
    for unit in dict.fromkeys(table["unit"]):
        first = first_significant(table, unit)
        if first is None:
            lines.append(f"- {unit}: no checkpoint is extractable and significant (Bonferroni within trait, 0.05).")
        else:
            lines.append(
                f"- {unit}: first extractable and significant checkpoint {first['revision']} "
                f"({format_tokens(first['tokens'])}, {100 * first['share']:.3g}% of training): "
                f"delta trait {first['delta_trait']:+.2f}, p = {first['p_raw']:.2g} "
                f"(Bonferroni {first['p_bonferroni']:.2g})"
            )
    controls = table[table["condition"] != "vector"]
    if len(controls):
        lines.append("")
        lines.append(
            "| unit | control | checkpoints | mean delta trait | max delta trait | significant (raw p < 0.05) |"
        )
        lines.append("|---|---|---|---|---|---|")
        for (unit, kind), rows in controls.groupby(["unit", controls["condition"].str.split("-").str[0]]):
            lines.append(
                f"| {unit} | {kind} | {rows['revision'].nunique()} | {rows['delta_trait'].mean():+.2f} "
                f"| {rows['delta_trait'].max():+.2f} | {(rows['p_raw'] < 0.05).sum()} of {len(rows)} |"
            )
    return "\n".join(lines) + "\n"


def transfer_table(out: Path, units: list[Unit], checkpoints: list[Checkpoint], n_resamples: int) -> pd.DataFrame:
    record = json.loads(transfer_path(out).read_text())
    final = checkpoints[-1].position
    rows = []
    for unit in units:
        scores = record["units"].get(unit.name, {}).get("scores")
        if not scores:
            continue
        for checkpoint in checkpoints:
            if checkpoint.label in scores:
                pair = {"baseline": scores["baseline"], "vector": scores[checkpoint.label]}
                rows += condition_rows(unit.name, unit.trait, checkpoint, final, pair, n_resamples)
    return finish(rows)


def strategies(out: Path, units: list[Unit], checkpoints: list[Checkpoint], layer: int) -> pd.DataFrame:
    """Cosine at ``layer`` between the vectors of two strategies of one trait, per checkpoint."""
    rows = []
    for trait in dict.fromkeys(u.trait for u in units):
        mine = [u for u in units if u.trait == trait]
        for i, a in enumerate(mine):
            for b in mine[i + 1 :]:
                for checkpoint in checkpoints:
                    paths = [out / u.name / "vectors" / f"{checkpoint.label}.safetensors" for u in (a, b)]
                    if all(p.is_file() for p in paths):
                        va, vb = (load_file(p)["response_mean"][layer].double() for p in paths)
                        cos = float(torch.dot(va, vb) / (va.norm() * vb.norm()))
                        pair = f"{a.strategy} / {b.strategy}"
                        rows.append(
                            {"trait": trait, "pair": pair, "revision": checkpoint.label, "tokens": checkpoint.tokens}
                            | {"cosine": cos}
                        )
    return pd.DataFrame(rows, columns=["trait", "pair", "revision", "tokens", "cosine"])


def write_outputs(
    out: Path,
    checkpoints: list[Checkpoint],
    units: list[Unit],
    config: TraceConfig,
    bins: Bins,
    skipped: list[str],
) -> None:
    """Every table and figure of the trace, from what is recorded."""
    done = [c for c in checkpoints if any(load_record(out, c)["units"].get(u.name, {}).get("status") for u in units)]
    if not done:
        return
    layer, model = config.layer, series_name(done)
    headlines = {}
    for unit in units:
        (out / unit.name).mkdir(parents=True, exist_ok=True)
        write_csv(_status(out, unit, done), out / unit.name / "status.csv")
        headlines[unit.name] = geometry(out, unit, done, layer, config.mds_seed)
    table = emergence_table(out, units, done, config.n_resamples)
    write_csv(table, out / "emergence.csv")
    title = (
        f"Emergence on {model}: delta trait of each checkpoint steered with its own vector "
        f"(layer {layer}, alpha {config.alpha:g}, {config.scale})"
    )
    (out / "emergence.md").write_text(_steered_markdown(table, done, title))
    _plot_effects(table, units, done, title, out / "emergence.png")
    lines = [f"# Trace on {model}", "", f"- layer {layer} (hidden_states[{layer}]); checkpoints: {len(done)}"]
    lines += [f"- skipped: {s}" for s in skipped]
    if transfer_path(out).is_file():
        record = json.loads(transfer_path(out).read_text())
        transfer = transfer_table(out, units, done, config.n_resamples)
        write_csv(transfer, out / "transfer.csv")
        heading = f"Transfer to {record['target']}: delta trait when steered with each checkpoint's vector"
        phases = binned(transfer, bins, {c.label: c.position for c in done})
        write_csv(phases, out / "transfer_phases.csv")
        delta = {c: "+.2f" for c in ("mean_delta_trait", "min_delta_trait", "max_delta_trait")}
        text = _steered_markdown(transfer, done, heading) + "\n" + markdown_table(phases, delta)
        (out / "transfer.md").write_text(text)
        _plot_effects(transfer, units, done, heading, out / "transfer.png")
        lines.append(f"- transfer to {record['target']}: transfer.md, transfer.png")
    pairs = strategies(out, units, done, layer)
    if len(pairs):
        write_csv(pairs, out / "strategies.csv")
        xlabel, log_x = _axis(done)
        position = {c.label: c.position for c in done}
        panels = [
            Panel(
                f"{trait}: cosine between strategies",
                {
                    pair: ([position[r] for r in rows["revision"]], rows["cosine"], None)
                    for pair, rows in per_trait.groupby("pair")
                },
                limits=(-1, 1.05),
            )
            for trait, per_trait in pairs.groupby("trait")
        ]
        plot_over_training(panels, xlabel, f"Strategies on {model} (layer {layer})", out / "strategies.png", log_x)
    for unit in units:
        head = headlines[unit.name]
        if head:
            lines.append(
                f"- {unit.name}: cosine to the final vector ({head['final']}) at the first extractable checkpoint "
                f"{head['first']}: {head['cos_first']:.2f}"
            )
    lines += ["", "See emergence.md for the table in the paper's shape.", ""]
    (out / "summary.md").write_text("\n".join(lines))
