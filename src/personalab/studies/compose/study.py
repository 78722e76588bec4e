"""Persona x task composition ("As X, do Y"): see ``run`` for what is computed, at which layers and
sites, ``tables`` for the files, ``grids`` and ``markers`` for the data."""

from pathlib import Path

import pandas as pd

from personalab.console import say
from personalab.engine.handle import ModelHandle
from personalab.engine.layers import CONVENTION
from personalab.errors import PersonalabError
from personalab.figures.plots import short_name
from personalab.runfolder import claim, model_settings
from personalab.store import Store
from personalab.studies.compose import tables
from personalab.studies.compose.grids import Grid, load_grid, load_markers
from personalab.studies.compose.run import REF_TOKENS, ComposeConfig, Study, paper_layers


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
    settings = {
        **model_settings(handle),
        "config": config.model_dump(mode="json", include={"edit_layer", "host_sets", "seed"}),
    }
    extends = {
        "grid": [c.name for c in grid.cells],
        "layers": config.kl_layers(handle.n_blocks),
        "markers": config.markers,
        "host": config.host,
    }
    run = claim(out, "compose", settings, extends, prompt_format=handle.chat.describe())
    if not handle.chat.has_template:
        say(
            f"{short_name(handle.name)} has no chat template: the grid's prompts are written as plain text; the "
            f"composition paper uses instruction-tuned models through their templates",
            progress,
        )
    model = short_name(handle.name)
    results: dict[str, pd.DataFrame] = {}
    with Store(out / "compose.sqlite") as store:
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
        f"- layers: {CONVENTION}; substitution at layer l replaces hidden_states[l], the residual read there",
        f"- KL layers: {config.kl_layers(handle.n_blocks)} (the paper's grid for this depth: "
        f"{paper_layers(handle.n_blocks)}); chat format: {handle.chat.name}",
        "",
        "Tables: " + (", ".join(f"{name}.md" for name in ("kl", "markers", "host") if name in results) or "none"),
    ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    run.write(
        model=handle.name,
        revision=handle.revision,
        dtype=str(handle.dtype).removeprefix("torch."),
        grid=grid.name,
        cells=[c.name for c in grid.cells],
        skipped=[c.name for c in skipped],
        config=config.model_dump(),
    )
    if not prepared:
        raise PersonalabError(
            f"none of the {len(grid.cells)} cells is usable: every {REF_TOKENS}-token greedy reference ended with "
            f"end-of-sequence; compose needs a model that answers the grid's prompts at length (an instruction-tuned "
            f"chat model) or another grid (summary in {out / 'summary.md'})"
        )
    written = ["summary.md"] + [f"{name}.md" for name in ("kl", "markers", "host") if name in results]
    say(f"wrote {out}/" + ", ".join(written), progress)
    return results


__all__ = ["ComposeConfig", "load_grid", "load_markers", "run_compose"]
