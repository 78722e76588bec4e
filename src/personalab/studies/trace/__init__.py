"""Tracing persona vectors through training checkpoints (the pretraining-tracing study): ``study`` runs it, ``run``
says what is computed per checkpoint, ``outputs`` writes the files, ``series`` holds checkpoint series."""

from personalab.studies.trace.study import (
    SERIES,
    Checkpoint,
    TraceConfig,
    build_units,
    from_folders,
    from_revisions,
    read_revisions,
    run_trace,
    settings,
)

__all__ = [
    "SERIES",
    "Checkpoint",
    "TraceConfig",
    "build_units",
    "from_folders",
    "from_revisions",
    "read_revisions",
    "run_trace",
    "settings",
]
