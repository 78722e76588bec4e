"""Projection shift against judged trait expression across fine-tuned models.

For each fine-tuned model, on the trait's evaluation questions: the mean projection onto the
unit vector at ``layer`` (``hidden_states[l]``) of the residual at the last prompt token, and
of the mean residual over the model's judged answers, minus the same for the base model; and
the judged trait and coherence of those answers (``eval_samples`` per question). The base is the
reference every shift is measured from (its shift is 0 by definition), not a point: the
correlation of the last-prompt shift with the trait score is Pearson's r over the n fine-tunes
(``correlation``: from n = 3), with a two-sided p-value (exact over all n! pairings up to
n = 8, else the t-test) and, from n = 10, a 95% percentile bootstrap interval (10,000
resamples, seeded); below that a bootstrap over so few models takes only a handful of values,
so no interval is given, and the outputs say so.
"""

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from personalab.console import say
from personalab.engine.capture import capture
from personalab.engine.chat import TokenSequence
from personalab.engine.generation import SamplingParams, release
from personalab.engine.handle import ModelHandle
from personalab.engine.layers import CONVENTION, check_vector
from personalab.engine.loading import free_memory, loaded_name
from personalab.figures.plots import plot_correlation, short_name
from personalab.figures.tables import markdown_table, write_csv
from personalab.hashes import vector_sha256
from personalab.judging.judges import Judge, judge_record
from personalab.judging.scorecard import evaluation_plan, scored_answers, summary
from personalab.judging.scoring import Plan
from personalab.runfolder import claim, model_settings
from personalab.store import Store
from personalab.traits import Trait
from personalab.traits.elicitation import evaluation_format

RESAMPLES = 10_000
MIN_POINTS = 3
"""Fewest fine-tunes (points) for a correlation."""
MIN_INTERVAL = 10
"""Fewest fine-tunes for a bootstrap interval."""
EXACT_UP_TO = 8
"""Up to this many fine-tunes the p-value is exact over every pairing (8! = 40,320)."""


def pearson_interval(x: Sequence[float], y: Sequence[float], seed: int = 0) -> tuple[float, float, float]:
    """``(r, low, high)``: Pearson's r and its 95% percentile bootstrap interval (resampling pairs;
    resamples with a constant side are left out)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    r = float(np.corrcoef(x, y)[0, 1])
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(x), size=(RESAMPLES, len(x)))
    xs, ys = x[picks], y[picks]
    xs, ys = xs - xs.mean(1, keepdims=True), ys - ys.mean(1, keepdims=True)
    denominator = np.sqrt((xs**2).sum(1) * (ys**2).sum(1))
    valid = denominator > 0
    rs = (xs * ys).sum(1)[valid] / denominator[valid]
    low, high = np.percentile(rs, [2.5, 97.5]) if len(rs) else (np.nan, np.nan)
    return r, float(low), float(high)


def correlation(x: Sequence[float], y: Sequence[float], seed: int = 0) -> dict:
    """Pearson's r of the points ``(x[i], y[i])`` with ``n``, a two-sided ``p`` (``p_method``: ``exact permutation``
    over every pairing up to ``EXACT_UP_TO`` points, else ``t-test``), and from ``MIN_INTERVAL`` points a 95%
    bootstrap interval (``low``, ``high``; ``None`` below); ``{"n": n}`` alone below ``MIN_POINTS``, and with
    ``undefined`` (why) where r is (a constant or missing value)."""
    from scipy.stats import PermutationMethod, pearsonr

    n = len(x)
    if n < MIN_POINTS:
        return {"n": n}
    if not (np.isfinite(x).all() and np.isfinite(y).all()) or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"n": n, "undefined": "a shift or trait score is missing, or all of one are equal"}
    exact = n <= EXACT_UP_TO
    result = pearsonr(x, y, method=PermutationMethod(n_resamples=np.inf) if exact else None)
    low, high = pearson_interval(x, y, seed)[1:] if n >= MIN_INTERVAL else (None, None)
    return {
        "n": n,
        "r": float(result.statistic),
        "p": float(result.pvalue),
        "p_method": "exact permutation" if exact else "t-test",
        "low": low,
        "high": high,
    }


def describe_correlation(stats: dict) -> str:
    """One line: r with n, p and the interval, or why there is none."""
    n = stats["n"]
    if "undefined" in stats:
        return f"undefined over n = {n} fine-tunes: {stats['undefined']}"
    if "r" not in stats:
        return f"needs {MIN_POINTS} fine-tuned models; got n = {n}"
    text = f"r = {stats['r']:.3f} over n = {n} fine-tunes, p = {stats['p']:.3g} ({stats['p_method']})"
    if stats["low"] is None:
        return text + f"; no interval below n = {MIN_INTERVAL} (a bootstrap over {n} models takes a handful of values)"
    return text + f", 95% bootstrap interval [{stats['low']:.3f}, {stats['high']:.3f}]"


def _measure(handle: ModelHandle, trait: Trait, vector, layer: int, judge, store, samples, params, label) -> dict:
    unit = check_vector(vector, layer, handle.n_blocks, handle.hidden_size).float()
    unit = unit / unit.norm()
    answers = scored_answers(handle, trait, judge, store, label, samples, params)
    prompts = [handle.encode(None, q) for q in trait.evaluation_questions]
    last = capture(handle, prompts, [layer], "last_prompt")[:, 0] @ unit
    full = [
        TokenSequence(
            prompts[q].ids + tuple(handle.tokenizer.encode(a, add_special_tokens=False)), prompts[q].prompt_len
        )
        for q, a in zip(answers["question"], answers["answer"], strict=True)
    ]
    full = [s for s in full if s.response_len > 0]
    response = capture(handle, full, [layer], "response")[:, 0] @ unit if full else torch.full((1,), float("nan"))
    return {"last_prompt": float(last.mean()), "response_mean": float(response.mean()), **summary(answers)}


class CorrelateConfig(BaseModel):
    """Settings of ``correlate``: the layer of the projections and how each model's answers are sampled."""

    model_config = ConfigDict(extra="forbid")
    layer: int
    eval_samples: int = Field(5, ge=1)
    sampling: SamplingParams = SamplingParams()
    seed: int = 0
    """Seed of the bootstrap interval."""


def plan_correlate(
    base: ModelHandle,
    trait: Trait,
    judge: Judge,
    tuned: Sequence[str],
    out: str | Path | None,
    config: CorrelateConfig,
) -> Plan:
    """What ``run_correlate`` into ``out`` would sample and judge for the base and each fine-tune of ``tuned``, what
    its store holds excluded; writes nothing. A fine-tune is counted under the name it will be loaded with and with
    the base's tokenizer, before it is loaded."""
    store = Path(out) / "generations.sqlite" if out is not None else None
    models = [(base, "base")] + [(replace(base, name=loaded_name(name), revision=None), name) for name in tuned]
    return Plan.total(
        [evaluation_plan(h, trait, judge, store, label, config.eval_samples, config.sampling) for h, label in models]
    )


def run_correlate(
    base: Callable[[], ModelHandle],
    tuned: Sequence[tuple[str, Callable[[], ModelHandle]]],
    vector: torch.Tensor,
    trait: Trait,
    judge: Judge,
    out: str | Path,
    config: CorrelateConfig,
) -> pd.DataFrame:
    """Tabulate and plot shift against trait for each ``(name, load)`` of ``tuned`` (one model in memory at a time)."""
    out = Path(out)
    layer, samples, params, seed = config.layer, config.eval_samples, config.sampling, config.seed
    rows, run = [], None
    with Store(out / "generations.sqlite") as store:
        for name, load in [("base", base), *tuned]:
            handle = load()
            if run is None:
                settings = {
                    **model_settings(handle),
                    "vector_sha256": vector_sha256(vector),
                    "layer": layer,
                    "trait_sha256": trait.digest(),
                    "judge": judge.name,
                    "sampling": params.model_dump(mode="json"),
                    "seed": seed,
                }
                prompts = evaluation_format(handle, trait)
                extends = {"eval_samples": samples, "tuned": [n for n, _ in tuned]}
                plan = plan_correlate(handle, trait, judge, [n for n, _ in tuned], out, config)
                say(plan.describe(f"{1 + len(tuned)} models"), True)
                run = claim(out, "correlate", settings, extends, prompt_format=prompts, recorded=judge_record(judge))
                say(f"prompt format: {prompts}", True)
            say(f"measuring {name}", True)
            rows.append({"model": name, **_measure(handle, trait, vector, layer, judge, store, samples, params, name)})
            release(handle)
            del handle
            free_memory()
    table = pd.DataFrame(rows)
    for position in ("last_prompt", "response_mean"):
        table[f"shift_{position}"] = table[position] - table.loc[0, position]
    table.insert(1, "role", ["reference"] + ["point"] * (len(table) - 1))
    write_csv(table, out / "correlate.csv")
    models = table.iloc[1:]
    x, y = models["shift_last_prompt"].tolist(), models["trait_mean"].tolist()
    stats = correlation(x, y, seed)
    plot_correlation(
        x, y, [short_name(str(m)) for m in models["model"]],
        f"projection shift at the last prompt token (layer {layer}), fine-tune - base", f"judged {trait.name} (0-100)",
        f"{trait.name}: projection shift against trait expression", stats, out / "correlate.png",
    )  # fmt: skip
    shown = table[["model", "role", "shift_last_prompt", "shift_response_mean", "trait_mean", "coherence_mean", "n"]]
    lines = [
        f"# Projection shift against {trait.name} expression",
        "",
        f"- layer {layer} ({CONVENTION}); shifts are fine-tune minus base, on the trait's evaluation questions",
        f"- points: the {len(models)} fine-tunes (role `point`); the base is the reference each shift is measured "
        "from (shift 0 by definition), not a point",
        f"- Pearson r (last-prompt shift, trait): {describe_correlation(stats)}",
        "- the persona-vectors paper reports r between 0.76 and 0.97 across traits",
        "- `n`: judged answers behind each model's trait and coherence means",
        "",
        markdown_table(
            shown,
            {"shift_last_prompt": "+.4g", "shift_response_mean": "+.4g", "trait_mean": ".1f", "coherence_mean": ".1f"},
        ),
    ]
    (out / "correlate.md").write_text("\n".join(lines) + "\n")
    run.write(trait=trait.name, layer=layer, judge=judge.name, models=list(table["model"]), correlation=stats)
    return table
