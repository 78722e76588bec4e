"""Run folders under a directory, one line each, and one run's summary: ``personalab runs`` and ``show``.

Read without a model, from the files each command writes (``personalab.report.folders``): the kind, the model and
trait of ``meta.json``, when the run last wrote its marking file, and one key figure per kind.
"""

import json
import os
from datetime import datetime
from pathlib import Path

import pandas as pd

from personalab.report.folders import KINDS, MODEL_FILES, run_kind

DOCUMENTS = ("summary.md", "sweep.md", "compare.md", "correlate.md", "features.md")
"""What ``show`` prints of a run, the first one it has."""


def find_runs(root: str | Path, depth: int = 3) -> list[Path]:
    """Run folders at or below ``root`` (at most ``depth`` levels down), sorted; model and checkpoint folders
    are not searched."""
    root = Path(root)
    found = []
    for folder, subfolders, _ in os.walk(root):
        path = Path(folder)
        level = len(path.relative_to(root).parts)
        if any((path / name).is_file() for name in MODEL_FILES) and run_kind(path) != "bake":
            subfolders.clear()
            continue
        if run_kind(path) is not None:
            found.append(path)
        if level >= depth:
            subfolders.clear()
    return sorted(found)


def _meta(path: Path) -> dict:
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return {}


def largest_change(table: pd.DataFrame, significant: bool = True) -> dict | None:
    """The steered configuration of a sweep table whose mean trait differs most from alpha 0 at its layer, as
    ``{"layer", "alpha", "change", "p"}``; among those with ``p_signflip < 0.05`` when ``significant`` (``None``
    when there is none)."""
    base = table[table["alpha"] == 0].set_index("layer")["trait_mean"]
    rows = table[(table["alpha"] != 0) & table["layer"].isin(base.index)]
    if significant:
        rows = rows[rows["p_signflip"] < 0.05] if "p_signflip" in rows else rows.iloc[:0]
    if rows.empty:
        return None
    delta = rows["trait_mean"].to_numpy() - base.loc[rows["layer"]].to_numpy()
    best = int(abs(delta).argmax())
    row = rows.iloc[best]
    p = float(row["p_signflip"]) if "p_signflip" in row else float("nan")
    return {"layer": int(row["layer"]), "alpha": float(row["alpha"]), "change": float(delta[best]), "p": p}


def _sweep_figure(path: Path) -> str:
    table = pd.read_csv(path / "sweep.csv")
    if "p_signflip" not in table:
        return f"{len(table)} configurations"
    best = largest_change(table)
    if best is None:
        return f"{len(table)} configurations, no significant trait change"
    return (
        f"largest significant trait change {best['change']:+.1f} at layer {best['layer']}, alpha {best['alpha']:g} "
        f"(p {best['p']:.3g})"
    )


def key_figure(path: Path, kind: str | None, meta: dict) -> str:
    """One number that says what the run found, by kind; ``""`` where the run has none yet."""
    try:
        if kind == "extract":
            counts = meta["counts"]
            return f"kept {counts['kept']} of {counts['pairs']} pairs"
        if kind == "sweep":
            return _sweep_figure(path)
        if kind == "bake":
            bake = json.loads((path / "bake.json").read_text())
            return f"{bake['method']} at layer {bake['layer']}, alpha {bake['alpha']:g}"
        if kind in KINDS and (path / KINDS[kind][0]).suffix == ".csv":
            return f"{len(pd.read_csv(path / KINDS[kind][0]))} rows in {KINDS[kind][0]}"
    except (OSError, KeyError, ValueError):
        return ""
    return ""


def run_row(path: Path) -> dict:
    """``{"run", "kind", "model", "trait", "date", "figure"}`` of one run folder."""
    kind, meta = run_kind(path), _meta(path)
    settings = meta.get("settings", {})
    model = meta.get("model") or settings.get("model") or ""
    marker = path / KINDS[kind][0] if kind in KINDS else path / "meta.json"
    when = datetime.fromtimestamp(marker.stat().st_mtime).strftime("%Y-%m-%d %H:%M") if marker.exists() else ""
    return {
        "run": str(path),
        "kind": kind or "",
        "model": str(model),
        "trait": str(meta.get("trait") or ""),
        "date": when,
        "figure": key_figure(path, kind, meta),
    }


def summary_text(path: str | Path) -> str:
    """What ``show`` prints: the run's kind and key figure, then its summary document (or ``bake.json``)."""
    path = Path(path)
    row = run_row(path)
    head = f"{row['run']}: {row['kind'] or 'not a run folder'}" + (f"; {row['figure']}" if row["figure"] else "")
    for name in DOCUMENTS:
        if (path / name).is_file():
            return f"{head}\n\n{(path / name).read_text()}"
    if (path / "bake.json").is_file():
        return f"{head}\n\n{(path / 'bake.json').read_text()}"
    return head
