"""Tracing persona vectors through training checkpoints (the pretraining-tracing study).

``run_trace`` checks the series, processes every checkpoint with work left (one model in
memory at a time), steers a target with every checkpoint's vector when given one, and
rebuilds every table and figure. See ``run`` for what is computed per checkpoint and at
which layer and positions, ``outputs`` for the files, ``series`` for checkpoint series.
"""

from collections.abc import Callable, Sequence
from pathlib import Path

from personalab.console import say
from personalab.engine.handle import ModelHandle
from personalab.judging.judges import Judge, judge_record
from personalab.judging.scoring import Plan
from personalab.runfolder import claim
from personalab.studies.trace.outputs import write_outputs
from personalab.studies.trace.run import (
    TraceConfig,
    Unit,
    build_units,
    check_layer,
    check_series,
    meta,
    plan_trace,
    run_checkpoints,
    run_transfer,
)
from personalab.studies.trace.series import SERIES, Checkpoint, from_folders, from_revisions, phase_bins, read_revisions
from personalab.traits.elicitation import elicitation_format

_SETTINGS = (
    "layer",
    "alpha",
    "target_alpha",
    "scale",
    "extraction",
    "eval_samples",
    "control_seeds",
    "n_resamples",
    "mds_seed",
)
"""What a trace's results depend on: a rerun must use the same values (``personalab.runfolder``)."""


def settings(config: TraceConfig, judge: Judge) -> dict:
    """The settings of a trace (its checkpoints, units and controls only extend it; the extraction's ``aggregation``
    is one of them only when it is not the default, so that traces begun before it was an option still resume)."""
    excluded = {"batch_size"} | ({"aggregation"} if config.extraction.aggregation == "mean_diff" else set())
    return {
        **{k: v for k, v in config.model_dump(mode="json", exclude={"extraction"}).items() if k in _SETTINGS},
        "extraction": config.extraction.model_dump(mode="json", exclude=excluded),
        "judge": judge.name,
    }


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
    tokenizer: str | None = None,
    dry_run: bool = False,
) -> "TraceConfig | Plan":
    """Trace ``units`` over ``checkpoints`` into ``out``; returns the config with its layer resolved.
    ``tokenizer`` names the tokenizer ``load`` gives every checkpoint (``None``: each its own). Prints the plan
    first (``plan_trace``); ``dry_run`` returns it there, before any checkpoint is loaded."""
    out = Path(out)
    kept, n_blocks = check_series(checkpoints, target, progress, tokenizer)
    config = config.model_copy(update={"layer": check_layer(config.layer, n_blocks)})
    plan = plan_trace(kept, units, config, judge, out, target is not None)
    say(plan.describe(f"{len(kept)} checkpoints" + (" and the target" if target else "")), progress)
    if dry_run:
        return plan
    extends = {"checkpoints": [c.label for c in kept], "units": [u.name for u in units], "controls": config.controls}
    styles = sorted({member.elicitation for unit in units for member in unit.members})
    prompts = "; ".join(elicitation_format(style) for style in styles)
    run = claim(out, "trace", settings(config, judge), extends, prompt_format=prompts, recorded=judge_record(judge))
    say(f"prompt format: {prompts}", progress)
    model = kept[0].source
    run.write(**meta(config, kept, units, model, judge, target))
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
