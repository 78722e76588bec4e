"""The composition study's tables and figures, in the shapes of the paper's Tables 1-4.

* ``geometry.csv`` (per layer, site and statistic: median, 25th and 75th percentiles, min,
  max over cells), ``geometry_cells.csv`` and one figure per statistic against layer;
* ``kl.csv`` (every cell, layer, site, condition), ``kl_summary.csv`` (median [IQR] per layer,
  site, condition), ``kl_by_persona.csv`` and ``kl_by_task.csv``, ``kl.md`` (Table 1: rows
  model x site, columns early / mid / later = the first three KL layers, then every layer and
  the controls the paper lacks, labelled so) and ``kl.png`` (median KL against layer, IQR bands,
  a line at 0.1);
* ``markers.csv``, ``markers.md`` (Table 3: condition x any-marker count and rate, distinct
  markers per cell; per persona) and ``markers_answers.jsonl``;
* ``host.csv``, ``host.md`` (Table 4: condition x median KL [IQR], gap closure on medians,
  cells where the intervention beats the host).
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd

from personalab.figures.plots import Panel, plot_over_training
from personalab.figures.tables import markdown_table, write_csv
from personalab.studies.compose.geometry import summary
from personalab.studies.compose.run import CONDITIONS, MARKER_CONDITIONS, SITES

PLOTTED = {
    "cos_additive": "cos(dXY, dX + dY)",
    "cos_x_y": "cos(dX, dY)",
    "interaction_fraction": "|Inter| / |dXY|",
}


def _aggregate(frame: pd.DataFrame, by: list[str], value: str) -> pd.DataFrame:
    rows = [
        {
            **dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True)),
            **summary(group[value]),
            "cells": len(group),
        }
        for key, group in frame.groupby(by, sort=False)
    ]
    return pd.DataFrame(rows)


def geometry(frame: pd.DataFrame, out: Path, model: str) -> pd.DataFrame:
    """Aggregate the per-cell decomposition; write the CSVs and one figure per statistic."""
    write_csv(frame, out / "geometry_cells.csv")
    long = frame.melt(id_vars=["cell", "persona", "task", "layer", "site"], var_name="statistic", value_name="value")
    table = _aggregate(long, ["layer", "site", "statistic"], "value")
    write_csv(table, out / "geometry.csv")
    for statistic, label in PLOTTED.items():
        rows = table[table["statistic"] == statistic]
        panel = Panel(label)
        for site in SITES:
            mine = rows[rows["site"] == site]
            panel.lines[site] = (mine["layer"], mine["median"], None)
            panel.bands[f"{site} IQR"] = (mine["layer"], mine["p25"], mine["p75"])
        title = f"{label} on {model}: median over cells with interquartile range"
        plot_over_training([panel], "layer (hidden_states[l])", title, out / f"{statistic}.png", False)
    return table


def _cell(row: pd.Series) -> str:
    return f"L{row['layer']}: {row['median']:.3g} [{row['p25']:.3g}, {row['p75']:.3g}]"


def kl(frame: pd.DataFrame, out: Path, model: str, grid: str) -> pd.DataFrame:
    """Write the KL tables and figure; returns the summary (median [IQR] per layer, site, condition)."""
    write_csv(frame, out / "kl.csv")
    table = _aggregate(frame, ["layer", "site", "condition"], "kl")
    write_csv(table, out / "kl_summary.csv")
    additive = frame[frame["condition"] == "additive"]
    by_persona = _aggregate(additive, ["persona", "layer", "site"], "kl")
    by_task = _aggregate(additive, ["task", "layer", "site"], "kl")
    write_csv(by_persona, out / "kl_by_persona.csv")
    write_csv(by_task, out / "kl_by_task.csv")
    layers = sorted(table["layer"].unique())
    early = layers[:3]
    lines = [
        f"# Local additive substitution on {model} ({grid} grid)",
        "",
        "KL(clean || h_BB + dX + dY substituted), summed over the 10 tokens after the site, nats: "
        "median [25th, 75th percentile] over cells. Table 1 of the paper: early / mid / later = the first "
        "three layers.",
        "",
        "| model | site | " + " | ".join(("early", "mid", "later")[: len(early)]) + " |",
        "|---|---|" + "---|" * len(early),
    ]
    for site in SITES:
        cells = [
            _cell(
                table[(table["layer"] == layer) & (table["site"] == site) & (table["condition"] == "additive")].iloc[0]
            )
            for layer in early
        ]
        lines.append(f"| {model} | {site} | " + " | ".join(cells) + " |")
    wide = table.assign(value=table.apply(lambda r: f"{r['median']:.3g} [{r['p25']:.3g}, {r['p75']:.3g}]", axis=1))
    wide = wide.pivot_table(index=["layer", "site"], columns="condition", values="value", aggfunc="first").reset_index()
    wide = wide[["layer", "site", *[c for c in CONDITIONS if c in wide.columns]]]
    wide.columns = [f"{c} (not in paper)" if c in CONDITIONS[1:] else c for c in wide.columns]
    oracle = frame[frame["condition"] == "oracle"]["kl"]
    lines += [
        "",
        "Every layer and condition (controls not in the paper; oracle substitutes h_XY itself and must "
        f"give 0: largest oracle KL here {oracle.abs().max():.2g}):",
        "",
        markdown_table(wide),
    ]
    p_last = by_persona[by_persona["site"] == "p_last"]
    if p_last["persona"].nunique() > 1:
        lines += [
            "Per persona (additive, p_last, median over tasks):",
            "",
            markdown_table(
                p_last.pivot(index="persona", columns="layer", values="median").reset_index(),
                dict.fromkeys(layers, ".3g"),
            ),
        ]
        per_task = by_task[by_task["site"] == "p_last"]
        lines += [
            "Per task (additive, p_last, median over personas):",
            "",
            markdown_table(
                per_task.pivot(index="task", columns="layer", values="median").reset_index(),
                dict.fromkeys(layers, ".3g"),
            ),
        ]
    (out / "kl.md").write_text("\n".join(lines) + "\n")
    panels = []
    for site in SITES:
        mine = table[table["site"] == site]
        panel = Panel(f"{site}: summed KL (nats)", hline=0.1, log_y=True)
        for condition in CONDITIONS[:-1]:
            rows = mine[mine["condition"] == condition]
            label = condition if condition == "additive" else f"{condition} (control)"
            panel.lines[label] = (rows["layer"], rows["median"].clip(lower=1e-6), None)
        rows = mine[mine["condition"] == "additive"]
        panel.bands["additive IQR"] = (rows["layer"], rows["p25"].clip(lower=1e-6), rows["p75"].clip(lower=1e-6))
        panels.append(panel)
    title = f"Causal KL of substitution on {model} ({grid} grid): median over cells, line at 0.1"
    plot_over_training(panels, "layer (hidden_states[l])", title, out / "kl.png", False)
    return table


def markers(frame: pd.DataFrame, out: Path, model: str, layer: int) -> pd.DataFrame:
    """Write Table 3 (condition x any-marker, distinct) with the per-persona counts."""
    write_csv(frame.drop(columns=["text"]).assign(found=frame["found"].map(json.dumps)), out / "markers.csv")
    with (out / "markers_answers.jsonl").open("w") as handle:
        for row in frame.to_dict("records"):
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    cells = frame["cell"].nunique()
    table = pd.DataFrame(
        [
            {
                "condition": c,
                "any_marker": int(rows["any"].sum()),
                "cells": cells,
                "rate": rows["any"].mean(),
                "distinct_mean": rows["distinct"].mean(),
            }
            for c in MARKER_CONDITIONS
            for rows in [frame[frame["condition"] == c]]
        ]
    )
    per_persona = frame.pivot_table(index="persona", columns="condition", values="any", aggfunc="sum").reset_index()
    per_persona = per_persona[["persona", *MARKER_CONDITIONS]]
    lines = [
        f"# Behavioural markers on {model} (edit at layer {layer}, p_last; 80 greedy tokens)",
        "",
        "| condition | any-marker | distinct markers (mean) |",
        "|---|---|---|",
    ]
    lines += [
        f"| {r.condition} | {r.any_marker}/{r.cells} ({100 * r.rate:.1f}%) | {r.distinct_mean:.2f} |"
        for r in table.itertuples()
    ]
    tasks = frame.groupby("persona")["task"].nunique().max()
    lines += ["", f"Cells with any marker, per persona (out of {tasks}):", "", markdown_table(per_persona)]
    (out / "markers.md").write_text("\n".join(lines) + "\n")
    return table


def host(frame: pd.DataFrame, out: Path, model: str) -> pd.DataFrame:
    """Write Table 4 (condition x median KL to the clean long-persona target) with gap closure."""
    write_csv(frame.assign(layers=frame["layers"].map(json.dumps)), out / "host.csv")
    base = frame[frame["condition"] == "host"].set_index("cell")["kl"]
    rows = []
    for condition, group in frame.groupby("condition", sort=False):
        stats = summary(group["kl"])
        beats = int((group.set_index("cell")["kl"] < base).sum())
        rows.append({"condition": condition, **stats, "cells": len(group), "beats_host": beats})
    table = pd.DataFrame(rows)
    host_median = float(table.loc[table["condition"] == "host", "median"].iloc[0])
    table["gap_closure"] = (host_median - table["median"]) / host_median if host_median else np.nan
    write_csv(table, out / "host_summary.csv")
    lines = [
        f"# Host injection on {model}",
        "",
        "KL(p_XY || p_host), summed over 10 greedy target tokens of the clean XY prompt; host = BY (persona "
        "text removed); interventions at the host's p_last.",
        "",
        "| condition | median KL [25th, 75th] | gap closure | cells beating host |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r.condition} | {r.median:.3g} [{r.p25:.3g}, {r.p75:.3g}] | {100 * r.gap_closure:.1f}% | "
        f"{r.beats_host}/{r.cells} |"
        for r in table.itertuples()
    ]
    (out / "host.md").write_text("\n".join(lines) + "\n")
    return table
