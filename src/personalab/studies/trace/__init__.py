"""Tracing persona vectors through training checkpoints (the pretraining-tracing study).

``run_trace`` checks the series, processes every checkpoint with work left (one model in
memory at a time), steers a target with every checkpoint's vector when given one, and
rebuilds every table and figure. See ``run`` for what is computed per checkpoint and at
which layer and positions, ``outputs`` for the files, ``series`` for checkpoint series.
"""

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from personalab.engine.model import ModelHandle
from personalab.errors import InvalidInputError
from personalab.judging.judges import Judge
from personalab.report.progress import say
from personalab.studies.trace.outputs import write_outputs
from personalab.studies.trace.run import (
    TraceConfig,
    Unit,
    build_units,
    check_layer,
    check_series,
    meta,
    run_checkpoints,
    run_transfer,
)
from personalab.studies.trace.series import SERIES, Checkpoint, from_folders, from_revisions, phase_bins, read_revisions

_SETTINGS = ("layer", "coef", "extraction", "eval_samples", "control_seeds")
"""What a run folder's results depend on: a rerun must use the same values (``meta.json``)."""


def _settings(config: TraceConfig) -> dict:
    """The settings as ``meta.json`` holds them (JSON values: tuples become lists)."""
    return {k: v for k, v in json.loads(config.model_dump_json()).items() if k in _SETTINGS}


def _check_settings(out: Path, config: TraceConfig) -> None:
    path = out / "meta.json"
    if not path.is_file():
        return
    before = {k: v for k, v in json.loads(path.read_text())["config"].items() if k in _SETTINGS}
    changed = [k for k in _SETTINGS if before.get(k) != _settings(config)[k]]
    if changed:
        raise InvalidInputError(
            f"{out} was traced with other settings ({', '.join(changed)}: {before[changed[0]]!r}); "
            f"rerun with the same settings to resume or extend it, or use another --out"
        )


def run_trace(
    checkpoints: Sequence[Checkpoint],
    units: Sequence[Unit],
    config: TraceConfig,
    judge: Judge,
    out: str | Path,
    load: Callable[[Checkpoint], ModelHandle],
    series: str | None = None,
    target: str | None = None,
    load_target: Callable[[], ModelHandle] | None = None,
    progress: bool = True,
) -> TraceConfig:
    """Trace ``units`` over ``checkpoints`` into ``out``; returns the config with its layer resolved."""
    out = Path(out)
    kept, n_blocks = check_series(checkpoints, target, progress)
    config = config.model_copy(update={"layer": check_layer(config.layer, n_blocks)})
    _check_settings(out, config)
    out.mkdir(parents=True, exist_ok=True)
    model = kept[0].source
    (out / "meta.json").write_text(json.dumps(meta(config, kept, units, model, judge, target), indent=2) + "\n")
    skipped = [f"{c.label} (its config could not be read)" for c in checkpoints if c not in kept]
    failed = run_checkpoints(kept, load, units, config, judge, out, progress)
    skipped += [f"{c.label} (its weights could not be loaded)" for c in failed]
    if target is not None and load_target is not None:
        run_transfer(load_target, target, kept, units, config, judge, out, progress)
    write_outputs(out, list(kept), list(units), config, phase_bins(series, kept), skipped)
    say(f"wrote {out}/emergence.md, emergence.png, summary.md and per-unit geometry", progress)
    return config


__all__ = [
    "SERIES",
    "Checkpoint",
    "TraceConfig",
    "Unit",
    "build_units",
    "from_folders",
    "from_revisions",
    "read_revisions",
    "run_trace",
]
