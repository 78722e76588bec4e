"""Persona x task composition ("As X, do Y"): see ``run`` for what is computed, at which layers and
sites, ``tables`` for the files, ``grids`` and ``markers`` for the data."""

import json
from contextlib import closing
from pathlib import Path

import pandas as pd

from personalab.engine.layers import CONVENTION
from personalab.engine.model import ModelHandle
from personalab.report.plots import short_name
from personalab.report.progress import say
from personalab.store import Store
from personalab.studies.compose import tables
from personalab.studies.compose.grids import Grid, load_grid, load_markers
from personalab.studies.compose.run import ComposeConfig, Study, paper_layers


def run_compose(
    handle: ModelHandle,
    grid: Grid,
    out: str | Path,
    config: ComposeConfig,
    markers: dict[str, list[str]] | None = None,
    progress: bool = True,
) -> dict[str, pd.DataFrame]:
    """Run the study into ``out`` (resumable through ``out/compose.sqlite``); returns its summary tables."""
    out = Path(out)
    config.check(handle.n_blocks)
    out.mkdir(parents=True, exist_ok=True)
    model = short_name(handle.name)
    results: dict[str, pd.DataFrame] = {}
    with closing(Store(out / "compose.sqlite")) as store:
        study = Study(handle, grid, config, store, progress)
        prepared, skipped = study.prepare(grid.cells)
        say(
            f"{len(prepared)} of {len(grid.cells)} cells usable; {len(skipped)} skipped (reference ended early)",
            progress,
        )
        if prepared:
            results["geometry"] = tables.geometry(pd.DataFrame(study.geometry(prepared)), out, model)
            layers = config.kl_layers(handle.n_blocks)
            results["kl"] = tables.kl(pd.DataFrame(study.causal_kl(prepared, layers)), out, model, grid.name)
            edit = config.edit(handle.n_blocks)
            if config.markers:
                rows = study.markers(prepared, markers or load_markers())
                if rows:
                    results["markers"] = tables.markers(pd.DataFrame(rows), out, model, edit)
                else:
                    say("no persona of the grid has markers; markers.md not written", progress)
            if config.host:
                results["host"] = tables.host(pd.DataFrame(study.host(prepared)), out, model)
    lines = [
        f"# Composition on {handle.name}, {grid.name} grid",
        "",
        f"- cells: {len(grid.cells)}; usable {len(prepared)}; skipped {len(skipped)} (the 12-token reference "
        f"ended early: {', '.join(c.name for c in skipped) or 'none'})",
        f"- layers: {CONVENTION}; substitution at layer l replaces the input of block l",
        f"- KL layers: {config.kl_layers(handle.n_blocks)} (the paper's grid for this depth: "
        f"{paper_layers(handle.n_blocks)}); chat format: {handle.chat.name}",
        "",
        "Tables: " + ", ".join(f"{name}.md" for name in ("kl", "markers", "host") if name in results),
    ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    meta = {
        "model": handle.name,
        "revision": handle.revision,
        "dtype": str(handle.dtype).removeprefix("torch."),
        "grid": grid.name,
        "cells": [c.name for c in grid.cells],
        "skipped": [c.name for c in skipped],
        "layer_convention": CONVENTION,
        "config": config.model_dump(),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    say(
        f"wrote {out}/summary.md, " + ", ".join(f"{name}.md" for name in ("kl", "markers", "host") if name in results),
        progress,
    )
    return results


__all__ = ["ComposeConfig", "load_grid", "load_markers", "run_compose"]
