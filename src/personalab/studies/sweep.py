"""Steering sweeps: layers x coefficients, judged for trait expression and coherence.

Every configuration answers the trait's evaluation questions ``eval_samples`` times, with the
vector added at the layer on ``positions``. All coefficients of one layer share batches
with a per-row alpha, so a sweep costs about one batched generation per layer. Answers
at ``alpha = 0`` are the unsteered model's and are shared by every layer. Beside the judge's
scores every answer gets its fluency, the mean NLL per token under the unsteered model
(``personalab.judging.fluency``), which sees the word salad a keyword judge cannot. Each steered
configuration is compared with ``alpha = 0`` question by question (the mean trait score
of a question's samples): a sign-flip permutation test and a sign test, both
Bonferroni-corrected over the steered configurations, and the sign-flip test of the fluency
(``p_nll``). Standard deviations are over all answers (``ddof = 1``). Coefficients follow
``personalab.engine.scale`` (``raw`` or ``normalised`` against the typical residual norm on the calibration prompts).

With ``controls``, every steered configuration is also run with control directions at the same added norm
(``personalab.studies.controls``: random Gaussian directions and, where the vector's pairs are at hand,
label-shuffled mean differences), each compared with ``alpha = 0`` in the same way (``controls.csv``).
"""

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file

from personalab.console import say
from personalab.engine.generation import GenerationRequest, SamplingParams, generate_cached
from personalab.engine.handle import ModelHandle
from personalab.engine.interventions import Steer
from personalab.engine.layers import check_layers
from personalab.engine.positions import PositionName
from personalab.engine.scale import DEFAULT_SCALE, Scale, ScaledVector, scale_vectors
from personalab.errors import InvalidInputError
from personalab.figures.plots import plot_heatmap, plot_sweep_curves, short_name
from personalab.figures.tables import markdown_table, write_csv
from personalab.hashes import vector_sha256
from personalab.judging.fluency import FLUENCY, fluency_cached
from personalab.judging.judges import Judge, judge_record
from personalab.judging.scoring import Plan, plan_judged, score_cached
from personalab.runfolder import claim, model_settings
from personalab.store import Store
from personalab.studies.controls import CONTROL_SEEDS, control_directions
from personalab.studies.stats import paired_test
from personalab.traits import RUN_TRAIT, Trait, calibration_prompts, coherence_rubric
from personalab.traits.elicitation import continues, evaluation_format, evaluation_prompt
from personalab.vectors import save_vector_file

DEFAULT_ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
"""Coefficients of a sweep given none, in normalised units (fractions of the typical, median token, residual norm)."""


class SweepConfig(BaseModel):
    """Settings of one sweep."""

    model_config = ConfigDict(extra="forbid")
    layers: list[int] = Field(min_length=1)
    alphas: list[float] = Field(list(DEFAULT_ALPHAS), min_length=1)
    eval_samples: int = Field(10, ge=1)
    sampling: SamplingParams = SamplingParams()
    scale: Scale = DEFAULT_SCALE
    positions: PositionName = "generating"
    batch_size: int = Field(16, ge=1)
    n_resamples: int = Field(10_000, ge=100)
    controls: bool = False
    control_seeds: list[int] = Field(list(CONTROL_SEEDS), min_length=1)

    @model_validator(mode="after")
    def _scale(self) -> "SweepConfig":
        if self.scale == "raw" and "alphas" not in self.model_fields_set:
            raise InvalidInputError("the default alphas are in normalised units; give `alphas` for `scale` raw")
        if self.controls and 0 not in self.alphas:
            raise InvalidInputError("`controls` are compared with the unsteered answers; add 0 to `alphas`")
        return self


VECTOR = "vector"
"""The condition of the swept vector's answers (and of the unsteered ones at ``alpha = 0``)."""


def _requests(
    handle: ModelHandle,
    scales: dict[int, ScaledVector],
    trait: Trait,
    config: SweepConfig,
    controls: dict[int, dict[str, torch.Tensor]] | None = None,
) -> tuple[list[tuple[int, float, str, int, int]], list[GenerationRequest]]:
    """``(rows, requests)``: one ``(layer, alpha, condition, question, sample)`` and its request per answer of the
    sweep; ``controls`` maps a layer to its control directions (``[hidden]``, added at the vector's norm there)."""
    prompts = [evaluation_prompt(handle, trait, q) for q in trait.evaluation_questions]
    rows, requests = [], []
    for layer in config.layers:
        v = scales[layer].vector
        directions = {VECTOR: v} | {
            name: d.float() / d.float().norm() * v.norm() for name, d in (controls or {}).get(layer, {}).items()
        }
        for condition, direction in directions.items():
            digest = vector_sha256(direction)
            for alpha in config.alphas:
                if alpha == 0 and condition != VECTOR:
                    continue
                steer = {"layer": layer, "alpha": alpha, "vector": digest, "positions": config.positions}
                named = {} if condition == VECTOR else {"condition": condition}
                for qi in range(len(prompts)):
                    for sample in range(config.eval_samples):
                        rows.append((layer, alpha, condition, qi, sample))
                        requests.append(
                            GenerationRequest(
                                prompts[qi],
                                {"question": trait.evaluation_questions[qi], "sample": sample,
                                 "steer": None if alpha == 0 else steer, **named},
                                () if alpha == 0 else (Steer(layer, direction, alpha, config.positions),),
                            )
                        )  # fmt: skip
    return rows, requests


CONTROLS_FILE = "controls.safetensors"
"""A sweep's control directions (``LAYER/NAME``, float32 ``[hidden]``), kept so that a rerun adds the same ones."""

Pairs = Callable[[], torch.Tensor | None]
"""The activations of the vector's pairs in its variant (``pair_activations``), captured when first needed; ``None``
where the vector keeps no pairs."""


def control_vectors(
    handle: ModelHandle, config: SweepConfig, pairs: Pairs, folder: Path | None, keep: bool = False
) -> dict[int, dict[str, torch.Tensor]] | None:
    """Per swept layer, the control directions of ``config`` (``None`` without ``controls``): those ``folder`` keeps
    (``CONTROLS_FILE``) read back, the rest computed (``pairs`` captured once, for the label-shuffled ones) and, with
    ``keep``, added to the file. A shuffled direction is a mean of captured floats, which batching may change in the
    last bits; kept, it is added bit for bit the same on a rerun, so its stored answers are found again."""
    if not config.controls:
        return None
    path = folder / CONTROLS_FILE if folder is not None else None
    kept = load_file(path) if path is not None and path.is_file() else {}
    todo = [
        (layer, seed)
        for layer in config.layers
        for seed in config.control_seeds
        if f"{layer}/random-{seed}" not in kept
    ]
    if todo:
        means = pairs()
        n = 0 if means is None else len(means) // 2
        for layer in dict.fromkeys(layer for layer, _ in todo):
            seeds = [seed for at, seed in todo if at == layer]
            new = control_directions(means, n, layer, seeds, handle.hidden_size)
            kept |= {f"{layer}/{name}": direction.contiguous() for name, direction in new.items()}
        if keep and path is not None:
            save_vector_file(path, kept)
    names = [f"{kind}-{seed}" for seed in config.control_seeds for kind in ("random", "shuffled")]
    return {layer: {n: kept[f"{layer}/{n}"] for n in names if f"{layer}/{n}" in kept} for layer in config.layers}


def _judged(handle: ModelHandle, trait: Trait):
    """``items(request, answer)``: the judge's ``(question, answer, rubric)`` items of one sweep answer."""
    rubrics = (trait.rubric, coherence_rubric(continues(handle, trait)))
    return lambda request, answer: [(request.request["question"], answer, rubric) for rubric in rubrics]


def _answers(handle: ModelHandle, store: Store, rows, requests, config: SweepConfig, progress: bool) -> pd.DataFrame:
    """Every answer (generated through the store) with its fluency under the unsteered model."""
    texts = generate_cached(handle, store, requests, config.sampling, config.batch_size, progress=progress)
    prompts, questions = [r.prompt for r in requests], [r.request["question"] for r in requests]
    nll = fluency_cached(handle, store, prompts, texts, questions, config.batch_size, progress)
    columns = ["layer", "alpha", "condition", "question", "sample"]
    return pd.DataFrame(
        [
            dict(zip(columns, row, strict=True)) | {"answer": t, "nll": v}
            for row, t, v in zip(rows, texts, nll, strict=True)
        ]
    )


def plan_sweep(
    handle: ModelHandle,
    vector: torch.Tensor,
    trait: Trait,
    judge: Judge,
    out: str | Path | None,
    config: SweepConfig,
    pairs: Pairs = lambda: None,
) -> Plan:
    """What ``run_sweep`` into ``out`` would sample and judge, what its store holds excluded; writes nothing (the
    scale's calibration forward pass runs, as the requests hold the scaled vectors)."""
    check_layers(config.layers, handle.n_blocks)
    scales = scale_vectors(handle, vector, config.layers, config.scale, calibration_prompts(handle))
    controls = control_vectors(handle, config, pairs, Path(out) if out is not None else None)
    _, requests = _requests(handle, scales, trait, config, controls)
    store = None if out is None else Path(out) / "generations.sqlite"
    return plan_judged(handle, store, requests, config.sampling, judge, _judged(handle, trait))


def _paired_tests(answers: pd.DataFrame, n_resamples: int) -> pd.DataFrame:
    columns = ["layer", "alpha", "n_questions", "p_signflip", "p_sign"] + (["p_nll"] if "nll" in answers else [])
    metrics = [m for m in ("trait", "nll") if m in answers]
    per_question = answers.groupby(["layer", "alpha", "question"])[metrics].mean().reset_index()
    baseline = per_question[per_question["alpha"] == 0].groupby("question")[metrics].mean()
    configs = per_question[per_question["alpha"] != 0].groupby(["layer", "alpha"])
    out = []
    for (layer, alpha), rows in configs:
        steered = rows.set_index("question")
        test = paired_test(steered["trait"], baseline["trait"], configs.ngroups, n_resamples)
        row = {"layer": layer, "alpha": alpha, **{k: test[k] for k in ("n_questions", "p_signflip", "p_sign")}}
        if "nll" in metrics:
            row["p_nll"] = paired_test(steered["nll"], baseline["nll"], configs.ngroups, n_resamples)["p_signflip"]
        out.append(row)
    return pd.DataFrame(out, columns=columns)


def summarise(answers: pd.DataFrame, n_resamples: int = 10_000) -> pd.DataFrame:
    """One row per (layer, alpha): trait, coherence and (where ``answers`` has it) fluency mean and std, n (answers
    the judge scored for the trait), Bonferroni-corrected p-values.

    ``answers`` has columns layer, alpha, question, sample, trait, coherence and optionally nll; p-values need
    ``alpha = 0``.
    """
    grouped = answers.groupby(["layer", "alpha"])
    columns = {}
    for metric in [m for m in ("trait", "coherence", "nll") if m in answers]:
        columns |= {f"{metric}_mean": grouped[metric].mean(), f"{metric}_std": grouped[metric].std()}
    table = pd.DataFrame({**columns, "n": grouped["trait"].count()}).reset_index()
    if (answers["alpha"] == 0).any():
        table = table.merge(_paired_tests(answers, n_resamples), on=["layer", "alpha"], how="left")
    return table


def summarise_controls(answers: pd.DataFrame, n_resamples: int = 10_000) -> pd.DataFrame:
    """``summarise`` of each control condition of ``answers`` (column ``condition``) against the unsteered answers
    (``alpha = 0``), one row per (condition, layer, alpha), Bonferroni within each condition; with ``delta_trait``,
    the mean trait minus the unsteered mean."""
    baseline = answers[answers["alpha"] == 0]
    frames = []
    for condition in [c for c in answers["condition"].unique() if c != VECTOR]:
        mine = pd.concat([answers[answers["condition"] == condition], baseline]).drop(columns="condition")
        summary = summarise(mine, n_resamples)
        summary = summary[summary["alpha"] != 0]
        summary.insert(0, "condition", condition)
        frames.append(summary)
    table = pd.concat(frames, ignore_index=True)
    table.insert(table.columns.get_loc("trait_std") + 1, "delta_trait", table["trait_mean"] - baseline["trait"].mean())
    return table


def _controls_markdown(table: pd.DataFrame) -> str:
    """Per control kind, layer and alpha: the mean and range over seeds of the trait change, and how many seeds
    moved the trait significantly."""
    kinds = table.assign(kind=table["condition"].str.split("-").str[0])
    rows = []
    for (kind, layer, alpha), group in kinds.groupby(["kind", "layer", "alpha"]):
        rows.append({
            "control": kind, "layer": layer, "alpha": f"{alpha:g}", "seeds": len(group),
            "delta trait (mean, min..max)": f"{group['delta_trait'].mean():+.1f} ({group['delta_trait'].min():+.1f}.."
                                            f"{group['delta_trait'].max():+.1f})",
            "n per seed": int(group["n"].min()),
            "seeds with p sign-flip < 0.05 (Bonf.)": int((group["p_signflip"] < 0.05).sum()),
        })  # fmt: skip
    return (
        "Controls at the vector's added norm: the trait change from alpha 0 of random directions and of label-shuffled "
        "mean differences (controls.csv has each seed).\n\n" + markdown_table(pd.DataFrame(rows))
    )


def _markdown(table: pd.DataFrame, scale: str) -> str:
    def p(value: float) -> str:
        return "-" if pd.isna(value) else f"{value:.3g}"

    cells = pd.DataFrame(
        {
            "layer": table["layer"].astype(str),
            "alpha": [f"{a:g}" for a in table["alpha"]],
            "trait": [f"{m:.1f} +- {s:.1f}" for m, s in zip(table["trait_mean"], table["trait_std"], strict=True)],
            "coherence": [
                f"{m:.1f} +- {s:.1f}" for m, s in zip(table["coherence_mean"], table["coherence_std"], strict=True)
            ],
            "n": table["n"].astype(str),
        }
    )
    if "nll_mean" in table:
        cells.insert(
            4, "NLL/token", [f"{m:.2f} +- {s:.2f}" for m, s in zip(table["nll_mean"], table["nll_std"], strict=True)]
        )
    if "p_signflip" in table:
        cells["p sign-flip (Bonf.)"] = [p(v) for v in table["p_signflip"]]
        cells["p sign (Bonf.)"] = [p(v) for v in table["p_sign"]]
    if "p_nll" in table:
        cells["p NLL (Bonf.)"] = [p(v) for v in table["p_nll"]]
    return (
        f"Scale: {scale}. Mean +- std over all answers; NLL/token is the fluency, the {FLUENCY}; p-values compare "
        f"each configuration with alpha 0 question by question.\n\n" + markdown_table(cells)
    )


def run_sweep(
    handle: ModelHandle,
    vector: torch.Tensor,
    trait: Trait,
    judge: Judge,
    out: str | Path,
    config: SweepConfig,
    progress: bool = True,
    pairs: Pairs = lambda: None,
) -> pd.DataFrame:
    """Run the sweep into ``out`` (resumable through ``out/generations.sqlite``; a rerun with more layers,
    alphas, samples or controls computes only those); returns the table. ``pairs`` gives the activations of the
    vector's contrastive pairs (``pair_activations``), for the label-shuffled controls (``control_vectors``)."""
    check_layers(config.layers, handle.n_blocks)
    out = Path(out)
    extends = {"layers": config.layers, "alphas": config.alphas, "eval_samples": config.eval_samples}
    extends |= {"controls": config.controls, "control_seeds": config.control_seeds}
    prompts = evaluation_format(handle, trait)
    run = claim(
        out,
        "sweep",
        settings(handle, vector, trait, judge, config),
        extends,
        prompt_format=prompts,
        recorded=judge_record(judge),
    )
    say(f"prompt format: {prompts}", progress)
    scales = scale_vectors(handle, vector, config.layers, config.scale, calibration_prompts(handle))
    for scaled in scales.values():
        say(scaled.describe([a for a in config.alphas if a != 0]), progress)
    controls = control_vectors(handle, config, pairs, out, keep=True)
    if controls is not None:
        kinds = sorted({name.split("-")[0] for name in next(iter(controls.values()))})
        missing = "" if "shuffled" in kinds else " (no label-shuffled ones: the vector's folder keeps no pairs)"
        say(f"controls at the vector's added norm: {', '.join(kinds)}, seeds {config.control_seeds}{missing}",
            progress)  # fmt: skip
    rows, requests = _requests(handle, scales, trait, config, controls)
    judged = _judged(handle, trait)
    say(plan_judged(handle, out / "generations.sqlite", requests, config.sampling, judge, judged).describe(), progress)
    with Store(out / "generations.sqlite") as store:
        answers = _answers(handle, store, rows, requests, config, progress)
        items = [judged(r, a) for r, a in zip(requests, answers["answer"], strict=True)]
        for column, k, label in (("trait", 0, "judge trait"), ("coherence", 1, "judge coherence")):
            answers[column] = score_cached(store, judge, [i[k] for i in items], label, progress=progress)
    answers = answers.astype({"trait": float, "coherence": float})
    table = summarise(answers[answers["condition"] == VECTOR].drop(columns="condition"), config.n_resamples)
    table.insert(2, "scale", config.scale)
    write_csv(table, out / "sweep.csv")
    answers.to_json(out / "answers.jsonl", orient="records", lines=True)
    markdown = _markdown(table, config.scale)
    control_table = summarise_controls(answers, config.n_resamples) if controls is not None else None
    if control_table is not None:
        write_csv(control_table, out / "controls.csv")
        markdown += "\n\n" + _controls_markdown(control_table)
    else:  # a rerun without controls: the table of an earlier run would describe answers this one does not show
        (out / "controls.csv").unlink(missing_ok=True)
    (out / "sweep.md").write_text(markdown)
    for metric in ("trait", "coherence"):
        grid = table.pivot(index="layer", columns="alpha", values=f"{metric}_mean")
        plot_heatmap(
            grid.to_numpy(),
            grid.index.tolist(),
            grid.columns.tolist(),
            f"{trait.name} on {short_name(handle.name)}: mean {metric} ({config.scale} scale), "
            f"n = {int(table['n'].min())} answers per cell",
            f"{metric} score (0-100)",
            out / f"heatmap_{metric}.png",
        )
    plot_sweep_curves(
        table, f"{trait.name} on {short_name(handle.name)} ({config.scale} scale)", out / "curves.png",
        control_table,
    )  # fmt: skip
    run.write(
        model=handle.name,
        revision=handle.revision,
        trait=trait.name,
        trait_sha256=trait.digest(),
        judge=judge.name,
        config=config.model_dump(),
        steering={str(layer): scaled.record(config.alphas) for layer, scaled in scales.items()},
    )
    trait.save(out / RUN_TRAIT)
    return table


def settings(handle: ModelHandle, vector: torch.Tensor, trait: Trait, judge: Judge, config: SweepConfig) -> dict:
    """What a sweep's results depend on (its layers, alphas, samples and controls only extend it)."""
    return {
        **model_settings(handle),
        "vector_sha256": vector_sha256(vector),
        "trait_sha256": trait.digest(),
        "judge": judge.name,
        "config": config.model_dump(
            mode="json", exclude={"layers", "alphas", "eval_samples", "batch_size", "controls", "control_seeds"}
        ),
    }
