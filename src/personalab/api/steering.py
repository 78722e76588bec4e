"""Study functions that steer generation: ``sweep``."""

from pathlib import Path
from typing import Any

from personalab.api.common import (
    StudyResult,
    as_judge,
    as_model,
    as_trait,
    configured,
    finished,
    run_folder,
    vector_of,
)
from personalab.engine.handle import ModelHandle
from personalab.judging.judges import Judge
from personalab.judging.scoring import Plan
from personalab.persona import DEFAULT_VARIANT, PersonaVector
from personalab.traits import Trait


def sweep(
    model: ModelHandle | str,
    vector: PersonaVector | str | Path,
    judge: Judge | str,
    *,
    layers: list[int],
    trait: Trait | str | None = None,
    trait_dir: str | Path | None = None,
    variant: str = DEFAULT_VARIANT,
    out: str | Path | None = None,
    report: bool = True,
    progress: bool = True,
    dry_run: bool = False,
    **options: Any,
) -> "StudyResult | Plan":
    """``personalab sweep``: layers x alphas, judged for trait and coherence, with paired tests against alpha 0.
    ``options`` are ``SweepConfig``'s (``alphas``, ``eval_samples``, ``scale``, ``positions``, ``batch_size``) and the
    sampling options; ``controls=True`` also steers with random and (where the vector's run folder keeps its pairs)
    label-shuffled directions at the same added norm. Tables: ``sweep`` (the CLI's ``sweep.csv``) and, with controls,
    ``controls``. ``dry_run`` returns the ``Plan`` and does nothing else."""
    from personalab.studies.controls import pair_activations
    from personalab.studies.sweep import SweepConfig, plan_sweep, run_sweep

    config = configured(SweepConfig, options, layers=list(layers))
    persona, direction = vector_of(vector, variant, model)
    chosen, scorer, handle = as_trait(trait, persona, trait_dir), as_judge(judge), as_model(model)
    source = persona.source

    def pairs():
        return None if source is None else pair_activations(handle, source, variant, config.batch_size)

    if dry_run:
        return plan_sweep(handle, direction, chosen, scorer, out, config, pairs)
    with run_folder(out) as (folder, kept):
        run_sweep(handle, direction, chosen, scorer, folder, config, progress, pairs)
        return finished(folder, kept, report, ["sweep", "controls"])
