"""Study functions that steer generation: ``steer_answers`` and ``sweep``."""

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personalab.api.common import (
    StudyResult,
    as_judge,
    as_model,
    as_trait,
    block_count,
    configured,
    in_run_folder,
    vector_of,
)
from personalab.engine.handle import ModelHandle
from personalab.judging.judges import Judge
from personalab.judging.scoring import Plan
from personalab.persona import DEFAULT_VARIANT, PersonaVector, as_vector, check_origin
from personalab.traits import Trait

if TYPE_CHECKING:
    from personalab.studies.steer import SteeredAnswer


def steer_answers(
    model: ModelHandle | str,
    vector: PersonaVector | str | Path,
    prompts: str | Iterable[str],
    *,
    layer: int,
    variant: str = DEFAULT_VARIANT,
    alpha: float | None = None,
    positions: str = "generating",
    scale: str = "normalised",
    ablate: bool = False,
    clamp: float | None = None,
    system: str | None = None,
    prompt_format: str | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    max_new_tokens: int = 128,
    seed: int = 0,
) -> "Iterator[SteeredAnswer]":
    """``personalab steer``: each of ``prompts`` answered without and with one intervention at ``layer``: ``alpha``
    times the vector's ``variant`` on ``scale`` (default alpha 1), or the direction projected out (``ablate``), or its
    projection set to ``clamp``; both answers from ``seed``. Checks everything and prepares the intervention first,
    then yields a ``SteeredAnswer`` per prompt as soon as it is done (``prompts`` may be read lazily)."""
    from personalab.studies.steer import SteerConfig, intervention, steered_answers
    from personalab.studies.steer import prompt_format as checked_format

    options = dict(alpha=alpha, positions=positions, scale=scale, ablate=ablate, clamp=clamp, system=system,
                   prompt_format=prompt_format, temperature=temperature, top_p=top_p,
                   repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens, seed=seed)  # fmt: skip
    config = configured(SteerConfig, options, layer=layer)
    persona = as_vector(vector)
    direction = persona.tensor(variant, block_count(model) + 1)  # a missing variant or another depth: before loading
    handle = as_model(model)
    check_origin(persona, handle)
    chosen = checked_format(handle, config)
    applied, label = intervention(handle, direction, config)
    return steered_answers(handle, [prompts] if isinstance(prompts, str) else prompts, config, applied, label, chosen)


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
    return in_run_folder(
        out,
        report,
        ["sweep", "controls"],
        lambda folder: run_sweep(handle, direction, chosen, scorer, folder, config, progress, pairs),
    )
