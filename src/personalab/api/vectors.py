"""Study functions that make and read persona vectors: ``extract``, ``project``, ``features`` and
``feature_diff``."""

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personalab.api.common import (
    StudyResult,
    as_judge,
    as_model,
    as_trait,
    configured,
    finished,
    in_run_folder,
    run_folder,
    vector_of,
    write_run_report,
)
from personalab.engine.handle import ModelHandle
from personalab.errors import InvalidInputError
from personalab.judging.judges import Judge
from personalab.judging.scoring import Plan
from personalab.persona import DEFAULT_VARIANT, PersonaVector, as_vector
from personalab.records import Record, load_records
from personalab.traits import Trait

if TYPE_CHECKING:
    import pandas as pd

    from personalab.methods.extraction import ContrastPair
    from personalab.sae import SAE


def extract(
    model: ModelHandle | str,
    trait: Trait | str | None = None,
    judge: Judge | str | None = None,
    *,
    pairs: "str | Path | Sequence[ContrastPair | dict] | None" = None,
    out: str | Path | None = None,
    report: bool = True,
    trait_dir: str | Path | None = None,
    trait_threshold: float | None = None,
    progress: bool = True,
    dry_run: bool = False,
    **options: Any,
) -> "PersonaVector | Plan":
    """``personalab extract``: generate with each instruction pair, judge, filter, and take per-layer mean
    differences; the ``PersonaVector`` of the kept pairs. ``options`` are ``ExtractionConfig``'s (``samples``,
    ``min_pairs``, thresholds, ``batch_size``) and the sampling options; ``trait_threshold`` is the reference's
    ``--threshold T`` (positive >= T, negative < 100 - T); answers are at most ``max_new_tokens`` (256) tokens, where
    the reference generates up to 1000. With ``out`` the run folder is kept (``report.html``
    included) and resumes. ``dry_run`` returns the ``Plan`` (answers to sample, tokens, judge calls; what the store
    holds excluded) and does nothing else.

    ``pairs`` (a JSONL file or ``ContrastPair``-shaped records: ``positive`` and ``negative`` texts, each with an
    optional ``prompt`` and ``system``) makes the vector from those texts instead, generating and judging nothing
    (``run_pair_extraction``; only ``batch_size`` and ``aggregation`` of the options apply, the trait is optional and
    kept)."""
    from personalab.methods.extraction import (
        ExtractionConfig,
        FilterError,
        plan_extraction,
        run_extraction,
        with_reference_thresholds,
    )

    if pairs is not None:
        return _from_pairs(model, trait, judge, pairs, out, report, trait_dir, trait_threshold, progress, dry_run,
                           options)  # fmt: skip
    if trait is None or judge is None:
        raise InvalidInputError("give a trait and a judge to generate and judge contrastive answers, or `pairs`")
    config = configured(ExtractionConfig, with_reference_thresholds(options, trait_threshold))
    handle, chosen, scorer = as_model(model), as_trait(trait, None, trait_dir), as_judge(judge)
    if dry_run:
        return plan_extraction(handle, chosen, scorer, out, config)
    with run_folder(out) as (folder, kept):
        try:
            result = run_extraction(handle, chosen, scorer, folder, config, progress)
        except FilterError:
            write_run_report(folder, report and kept)
            raise
        write_run_report(folder, report and kept)
    return PersonaVector(
        result.vectors,
        trait=chosen,
        model=handle.name,
        revision=handle.revision,
        meta=result.meta,
        source=folder if kept else None,
    )


def _from_pairs(model, trait, judge, pairs, out, report, trait_dir, trait_threshold, progress, dry_run, options):
    """``extract`` from given contrastive texts; options that only a judged extraction has are refused."""
    from personalab.methods.aggregation import check_aggregation
    from personalab.methods.extraction import (
        ContrastPair,
        check_pair_options,
        load_contrast_pairs,
        run_pair_extraction,
    )

    check_pair_options({"judge": judge, "trait_threshold": trait_threshold, "dry_run": dry_run, **options}
                       | {"batch_size": None, "aggregation": None})  # fmt: skip
    aggregation = options.get("aggregation", "mean_diff")
    check_aggregation(aggregation)
    source = Path(pairs) if isinstance(pairs, str | Path) else None
    rows = load_contrast_pairs(source) if source is not None else [ContrastPair.model_validate(p) for p in pairs]
    handle = as_model(model)
    chosen = as_trait(trait, None, trait_dir) if trait is not None else None
    with run_folder(out) as (folder, kept):
        result = run_pair_extraction(
            handle, rows, folder, chosen, source, options.get("batch_size", 16), progress, aggregation
        )
        write_run_report(folder, report and kept)
    return PersonaVector(
        result.vectors, trait=chosen, model=handle.name, revision=handle.revision, meta=result.meta,
        source=folder if kept else None,
    )  # fmt: skip


def _records(records: "Sequence[Record] | str | Path") -> list[Record]:
    return load_records(records) if isinstance(records, str | Path) else list(records)


def project(
    model: ModelHandle | str,
    vector: PersonaVector | str | Path,
    records: "Sequence[Record] | str | Path | None" = None,
    *,
    layer: int | None = None,
    variant: str = DEFAULT_VARIANT,
    shift: bool = False,
    top_k: int | None = None,
    tuned: ModelHandle | str | None = None,
    trait: Trait | str | None = None,
    out: str | Path | None = None,
    report: bool = True,
    batch_size: int = 16,
    progress: bool = True,
) -> StudyResult:
    """``personalab project``: records projected onto the vector at ``layer`` (table ``project``: ``last_prompt`` and
    ``response_mean`` per record); with ``shift``, each dataset response against the model's own answer (``shift``
    per record); with ``tuned``, how far the fine-tune ``tuned`` of ``model`` moved the last prompt token along the
    vector at every layer (``shift`` per layer), on ``records``' prompts or the trait's evaluation questions. With
    ``out`` a run folder (``personalab.studies.project``); without it, records given as a JSONL file get their
    results beside it (``STEM.projections.jsonl``; ``STEM.shift.jsonl``, ``.shift.png``, ``.topK.jsonl`` and the own
    answers in ``STEM.own.sqlite``)."""
    from personalab.studies.monitor import beside
    from personalab.studies.project import record_projections, run_project

    persona, direction = vector_of(vector, variant, model)
    if tuned is None and (records is None or layer is None):
        raise InvalidInputError("give records and a layer (or a tuned model to compare with its base)")
    if top_k is not None and not shift:
        raise InvalidInputError("top_k selects by projection shift; add shift=True")
    path = Path(records) if isinstance(records, str | Path) else None
    rows = _records(records) if records is not None else []
    handle = as_model(model)
    if out is None and path is not None and tuned is None:
        own = path.with_name(f"{path.stem}.own.sqlite")
        title = f"{path.name}: projection shift"
        table = record_projections(
            handle, rows, direction, layer, beside(path), own, shift, top_k, title, batch_size, progress
        )
        return StudyResult({"project": table}, {"shift": Path(f"{beside(path)}shift.png")} if shift else {})
    changed = as_model(tuned) if tuned is not None else None
    prompts = rows or (
        [Record(None, q, None) for q in as_trait(trait, persona).evaluation_questions] if changed is not None else []
    )
    with run_folder(out) as (folder, kept):
        run_project(
            handle, direction, folder, variant=variant, records=rows, prompts=prompts if changed else (), layer=layer,
            shift=shift, top_k=top_k, tuned=changed, data=path, batch_size=batch_size, progress=progress,
        )  # fmt: skip
        return finished(folder, kept, report, ["project"])


def features(
    vector: PersonaVector | str | Path,
    sae: "SAE | str | Path",
    *,
    model: ModelHandle | str | None = None,
    layer: int | None = None,
    top_k: int = 10,
    labels: "dict[int, str] | str | Path | None" = None,
    out: str | Path | None = None,
    report: bool = True,
    progress: bool = True,
) -> StudyResult:
    """``personalab features``: the vector's variants in the SAE's feature space (``personalab.studies.features``):
    top features by cosine with least-squares weights, and, with ``model`` and a vector run folder holding its
    extraction pairs, each feature's activation difference between positive and negative answers with its
    sign-flip p-value. ``sae`` is a SAELens folder or ``sae-lens:RELEASE/ID``; ``layer``, when given, must be the
    one it reads. ``labels`` maps feature index to description (``personalab.sae.load_labels``, or a dict).
    Tables: ``features``."""
    import json

    from personalab.sae import as_sae, load_labels
    from personalab.studies.features import run_features
    from personalab.traits import run_trait

    chosen = as_sae(sae, layer)
    persona = as_vector(vector)
    chosen.check_fits(persona.held[-1] if persona.n_layers is None else persona.n_layers - 1, persona.hidden_size)
    if chosen.layer not in persona.held:
        held = ", ".join(map(str, persona.held))
        raise InvalidInputError(f"the SAE reads layer {chosen.layer} but the vector has layer(s) {held} only")
    labels = load_labels(labels) if isinstance(labels, str | Path) else labels
    handle = as_model(model) if model is not None else None
    if handle is not None:
        chosen.check_fits(handle.n_blocks, handle.hidden_size)
    source = Path(persona.source) if persona.source is not None else None
    folder = source if source is None or source.is_dir() else source.parent
    pairs, style = [], "system_prompt"
    if folder is not None and handle is not None and (folder / "pairs.jsonl").is_file():
        pairs = [p for p in map(json.loads, (folder / "pairs.jsonl").read_text().splitlines()) if p["kept"]]
        found = run_trait(folder)
        style = found[0].elicitation if found else style
    depth = handle.n_layers if handle is not None else persona.n_layers or persona.held[-1] + 1
    vectors = {name: persona.tensor(name, depth) for name in persona.layers}
    trait = persona.trait.name if persona.trait is not None else ""
    return in_run_folder(
        out,
        report,
        ["features"],
        lambda target: run_features(handle, vectors, chosen, target, pairs, style, labels, top_k, trait, progress),
    )


def feature_diff(
    model: ModelHandle | str,
    tuned: ModelHandle | str | Path,
    sae: "SAE | str | Path",
    *,
    prompts: "Sequence[Record] | str | Path | None" = None,
    trait: Trait | str | None = None,
    vector: PersonaVector | str | Path | None = None,
    variant: str = DEFAULT_VARIANT,
    layer: int | None = None,
    positions: str = "response",
    top_k: int = 10,
    labels: "dict[int, str] | str | Path | None" = None,
    max_new_tokens: int = 128,
    out: str | Path | None = None,
    report: bool = True,
    batch_size: int = 16,
    progress: bool = True,
) -> StudyResult:
    """``personalab features --diff``: the SAE features whose mean activation the fine-tune ``tuned`` of ``model``
    (a run folder, checkpoint, bake folder, model or handle) changed most, on the same texts read by both models
    (``personalab.studies.features.run_feature_diff``): ``prompts``' records (their responses, or the base
    model's greedy answers), else the evaluation questions of ``trait`` (default: ``vector``'s); ``positions`` of
    each text (``response``, ``prompt`` or ``all``); each feature's cosine with ``vector``'s ``variant``. Tables:
    ``features``."""
    from personalab.api.weights import trained_loader
    from personalab.engine.positions import check_name
    from personalab.sae import as_sae, load_labels
    from personalab.studies.features import run_feature_diff

    check_name(positions)
    if positions in ("last_prompt", "generating"):
        raise InvalidInputError(f"positions {positions!r}: choose response, prompt or all")
    chosen = as_sae(sae, layer)
    persona = as_vector(vector) if vector is not None else None
    path = Path(prompts) if isinstance(prompts, str | Path) else None
    rows = _records(prompts) if prompts is not None else None
    if rows is None:
        rows = [Record(None, q, None) for q in as_trait(trait, persona).evaluation_questions]
    if not rows:
        raise InvalidInputError("no prompts to compare the models on; give a JSONL of records or a trait")
    labels = load_labels(labels) if isinstance(labels, str | Path) else labels
    base = as_model(model)
    chosen.check_fits(base.n_blocks, base.hidden_size)
    direction = persona.tensor(variant, base.n_layers) if persona is not None else None
    changed = tuned if isinstance(tuned, ModelHandle) else trained_loader(base, tuned)()
    with run_folder(out) as (folder, kept):
        run_feature_diff(
            base, changed, chosen, folder, rows, direction, variant, positions, labels, top_k, max_new_tokens, path,
            batch_size, progress,
        )  # fmt: skip
        return finished(folder, kept, report, ["features"])


def cosine(
    a: "PersonaVector | str | Path", b: "PersonaVector | str | Path", *, variant: str = DEFAULT_VARIANT,
    out: str | Path | None = None,
) -> "pd.DataFrame":  # fmt: skip
    """``personalab vectors cosine``: the cosine similarity of two persona vectors (``PersonaVector``, run folders or
    vector files, of one model's shape) at every layer, for their ``variant``: a table of ``layer``, ``cosine`` and
    each vector's norm (``norm_a``, ``norm_b``); with ``out`` a folder also gets ``cosine.csv`` and ``cosine.png``."""
    import pandas as pd

    from personalab.figures.plots import plot_layer_cosine
    from personalab.figures.tables import write_csv

    first, second = as_vector(a), as_vector(b)
    values = first.cosine(second, variant)
    layers = list(values.index)
    table = pd.DataFrame(
        {
            "layer": layers,
            "cosine": values.tolist(),
            "norm_a": first.norms(variant)[layers].tolist(),
            "norm_b": second.norms(variant)[layers].tolist(),
        }
    )
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        write_csv(table, folder / "cosine.csv")
        names = [v.name or str(v.source or "?") for v in (first, second)]
        plot_layer_cosine(table["layer"], table["cosine"], f"cosine of {names[0]} and {names[1]} per layer ({variant})",
                          folder / "cosine.png")  # fmt: skip
    return table
