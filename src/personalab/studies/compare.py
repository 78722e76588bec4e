"""Comparing base, steered and trained models on a trait's evaluation questions.

Every model answers the same evaluation questions ``eval_samples`` times; the judge scores
trait expression and coherence. The steered reference is the base model with ``alpha * v``
added at ``layer`` (convention in ``personalab.engine.layers``; ``v`` raw or normalised,
``personalab.engine.scale``) on response positions. Each model is compared question by
question (the mean trait score of a question's samples) with the base model, and each
trained model also with the steered reference: the sweep's sign-flip and sign tests,
Bonferroni-corrected over all the comparisons of the table. Every answer's fluency is its mean NLL per token
under the base model (``personalab.judging.fluency``), compared the same way (sign-flip test).
"""

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from personalab.console import say
from personalab.engine.checkpoints import trained_parameters
from personalab.engine.generation import SamplingParams
from personalab.engine.handle import ModelHandle
from personalab.engine.interventions import Steer
from personalab.engine.loading import loaded_name
from personalab.engine.scale import DEFAULT_SCALE, Scale, scaled_vector
from personalab.figures.plots import plot_score_bars, short_name
from personalab.figures.tables import markdown_table, write_csv
from personalab.hashes import vector_sha256
from personalab.judging.fluency import FLUENCY
from personalab.judging.judges import Judge, judge_record
from personalab.judging.scorecard import evaluation_plan, scored_answers, summary
from personalab.judging.scoring import Plan
from personalab.runfolder import claim, model_settings
from personalab.store import Store
from personalab.studies.stats import paired_test
from personalab.traits import RUN_TRAIT, Trait, calibration_prompts
from personalab.traits.elicitation import evaluation_format


def _tests(answers: dict[str, pd.DataFrame], steered: str, trained: list[str], n_resamples: int) -> dict[str, dict]:
    """Per model, its paired tests against ``base`` and (trained models) against ``steered``: trait (sign-flip and
    sign tests) and fluency (sign-flip test of the NLL per token)."""
    means = {label: frame.groupby("question")[["trait", "nll"]].mean() for label, frame in answers.items()}
    comparisons = (len(answers) - 1) + len(trained)
    out: dict[str, dict] = {label: {} for label in answers}
    for label in answers:
        against = (["base"] if label != "base" else []) + ([steered] if label in trained else [])
        for other in against:
            suffix = "base" if other == "base" else "steered"
            test = paired_test(means[label]["trait"], means[other]["trait"], comparisons, n_resamples)
            nll = paired_test(means[label]["nll"], means[other]["nll"], comparisons, n_resamples)
            out[label].update(
                {
                    f"delta_trait_vs_{suffix}": test["mean_diff"],
                    f"p_signflip_vs_{suffix}": test["p_signflip"],
                    f"p_sign_vs_{suffix}": test["p_sign"],
                    f"delta_nll_vs_{suffix}": nll["mean_diff"],
                    f"p_nll_vs_{suffix}": nll["p_signflip"],
                }
            )
    return out


def _markdown(table: pd.DataFrame, header: str) -> str:
    def cell(value, fmt: str) -> str:
        return "-" if pd.isna(value) else format(value, fmt)

    def versus(r: dict, suffix: str) -> str:
        if pd.isna(r.get(f"delta_trait_vs_{suffix}")):
            return "-"
        p_flip, p_sign = cell(r[f"p_signflip_vs_{suffix}"], ".3g"), cell(r[f"p_sign_vs_{suffix}"], ".3g")
        return f"{r[f'delta_trait_vs_{suffix}']:+.1f} ({p_flip}, {p_sign})"

    def fluency(r: dict) -> str:
        if pd.isna(r.get("delta_nll_vs_base")):
            return "-"
        return f"{r['delta_nll_vs_base']:+.2f} ({cell(r['p_nll_vs_base'], '.3g')})"

    rows = [
        {
            "model": r["model"],
            "trait": f"{r['trait_mean']:.1f} +- {cell(r['trait_std'], '.1f')}",
            "coherence": f"{r['coherence_mean']:.1f} +- {cell(r['coherence_std'], '.1f')}",
            "NLL/token": f"{r['nll_mean']:.2f} +- {cell(r['nll_std'], '.2f')}",
            "n": str(r["n"]),
            "trainable parameters": cell(r["trainable"], ",.0f"),
            "trait - base (p sign-flip, p sign)": versus(r, "base"),
            "trait - steered (p sign-flip, p sign)": versus(r, "steered"),
            "NLL - base (p sign-flip)": fluency(r),
        }
        for r in table.to_dict("records")
    ]
    return f"{header}\n\n" + markdown_table(pd.DataFrame(rows))


class CompareConfig(BaseModel):
    """Settings of ``compare``: the steered reference and how each model is sampled and tested."""

    model_config = ConfigDict(extra="forbid")
    layer: int
    alpha: float
    scale: Scale = DEFAULT_SCALE
    eval_samples: int = Field(5, ge=1)
    sampling: SamplingParams = SamplingParams()
    n_resamples: int = Field(10_000, ge=100)


def _steered_label(config: CompareConfig) -> str:
    scale = "" if config.scale == DEFAULT_SCALE else f" ({config.scale})"
    return f"steered layer {config.layer} alpha {config.alpha:g}{scale}"


def plan_compare(
    base: ModelHandle,
    vector: torch.Tensor,
    trait: Trait,
    judge: Judge,
    trained: Sequence[str | Path],
    out: str | Path | None,
    config: CompareConfig,
    scaled: torch.Tensor | None = None,
) -> Plan:
    """What ``run_compare`` into ``out`` would sample and judge for every model (base, steered, each of
    ``trained``), what its store holds excluded; writes nothing (the scale's calibration forward pass runs unless
    ``scaled``, the vector under the config's scale, is given). A trained model is counted under the name it will
    be loaded with and with the base's tokenizer, before it is loaded."""
    if scaled is None:
        scaled = scaled_vector(base, vector, config.layer, config.scale, calibration_prompts(base)).vector
    store = Path(out) / "generations.sqlite" if out is not None else None
    samples, params = config.eval_samples, config.sampling
    steering = (Steer(config.layer, scaled, config.alpha, "generating"),)
    conditions = [(base, "base", ()), (base, _steered_label(config), steering)]
    conditions += [(replace(base, name=loaded_name(f), revision=None), f"distilled {f}", ()) for f in trained]
    plans = [evaluation_plan(h, trait, judge, store, label, samples, params, ivs) for h, label, ivs in conditions]
    return Plan.total(plans)


def run_compare(
    base: ModelHandle,
    vector: torch.Tensor,
    trait: Trait,
    judge: Judge,
    trained: Sequence[tuple[Path, Callable[[], ModelHandle]]],
    out: str | Path,
    config: CompareConfig,
    progress: bool = True,
) -> pd.DataFrame:
    """Score base, steered and each trained model (loaded one at a time from ``(folder, load)``).

    Writes into ``out`` (resumable through its store): ``compare.csv`` and ``compare.md`` (per
    model: trait and coherence mean +- std, n, trainable parameters, mean trait difference to
    base and to the steered model with Bonferroni-corrected p-values), ``answers.jsonl`` (every
    judged answer), ``compare.png`` (bars with one std) and ``meta.json``. Returns the table.
    """
    out = Path(out)
    layer, alpha, scale, samples = config.layer, config.alpha, config.scale, config.eval_samples
    params, n_resamples = config.sampling, config.n_resamples
    settings = {
        **model_settings(base),
        "vector_sha256": vector_sha256(vector),
        "layer": layer,
        "alpha": alpha,
        "scale": scale,
        "trait_sha256": trait.digest(),
        "judge": judge.name,
        "sampling": params.model_dump(mode="json"),
        "n_resamples": n_resamples,
    }
    scaled = scaled_vector(base, vector, layer, scale, calibration_prompts(base))
    say(scaled.describe([alpha]), progress)
    steered = _steered_label(config)
    steering = (Steer(layer, scaled.vector, alpha, "generating"),)
    plan = plan_compare(base, vector, trait, judge, [f for f, _ in trained], out, config, scaled.vector)
    say(plan.describe(f"{2 + len(trained)} models"), progress)
    prompts = evaluation_format(base, trait)
    extends = {"eval_samples": samples, "trained": [str(f) for f, _ in trained]}
    run = claim(out, "compare", settings, extends, prompt_format=prompts, recorded=judge_record(judge))
    say(f"prompt format: {prompts}", progress)
    answers: dict[str, pd.DataFrame] = {}
    trainable = {"base": 0, steered: 0}
    with Store(out / "generations.sqlite") as store:

        def card(handle, label, interventions=()):
            return scored_answers(handle, trait, judge, store, label, samples, params, interventions, progress, base)

        answers["base"] = card(base, "base")
        answers[steered] = card(base, steered, steering)
        for folder, load in trained:
            label = str(folder)
            answers[label] = card(load(), f"distilled {folder}")
            trainable[label] = trained_parameters(folder)
    labels = [str(folder) for folder, _ in trained]
    tests = _tests(answers, steered, labels, n_resamples)
    rows = [{"model": m, **summary(a), "trainable": trainable[m], **tests[m]} for m, a in answers.items()]
    table = pd.DataFrame(rows)
    write_csv(table, out / "compare.csv")
    header = (
        f"{trait.name} on {base.name}: steered reference {scaled.describe([alpha])}. Mean +- std over all answers; "
        f"NLL/token is the fluency, the {FLUENCY} ({base.name}); "
        f"p-values question-level, Bonferroni-corrected over {len(answers) - 1 + len(labels)} comparisons."
    )
    (out / "compare.md").write_text(_markdown(table, header))
    frames = [
        frame.assign(model=m, question_text=[trait.evaluation_questions[q] for q in frame["question"]])
        for m, frame in answers.items()
    ]
    pd.concat(frames).to_json(out / "answers.jsonl", orient="records", lines=True, force_ascii=False)
    plot_score_bars(
        table, f"{trait.name} on {short_name(base.name)} and its fine-tunes: judged scores", out / "compare.png"
    )
    run.write(
        model=base.name,
        revision=base.revision,
        trait=trait.name,
        trait_sha256=trait.digest(),
        judge=judge.name,
        samples=samples,
        sampling=params.model_dump(),
        steering={**scaled.record([alpha]), "alpha": alpha},
        trained=labels,
    )
    trait.save(out / RUN_TRAIT)
    return table
