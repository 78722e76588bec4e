"""Persona x task composition ("As X, do Y"): ``study`` runs it, ``run`` says what is computed at which layers and
sites, ``tables`` writes the files, ``grids`` and ``markers`` hold the data."""

from personalab.studies.compose.study import (
    ComposeConfig,
    load_grid,
    load_markers,
    run_compose,
)

__all__ = [
    "ComposeConfig",
    "load_grid",
    "load_markers",
    "run_compose",
]
