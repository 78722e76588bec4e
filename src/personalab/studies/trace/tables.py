"""Emergence and transfer statistics from per-question mean scores, in the paper's table shapes.

A steered condition is compared with coefficient 0 on the same model question by question:
``delta_trait`` and ``delta_coherence`` are mean differences over questions, ``p_raw`` the
exact two-sided sign-flip p-value (``personalab.studies.stats``; exact up to 20 questions),
``p_greater`` its one-sided version, ``p_sign`` the sign test, ``p_coherence`` the sign-flip
test on coherence; ``delta_nll`` and ``p_nll`` the same for the fluency (mean NLL per answer token under the
unsteered model; NaN for records written before it was measured). ``p_bonferroni`` multiplies ``p_raw`` by the
number of real-vector tests of the same trait in the table ("Bonferroni within trait"). A checkpoint is significant when
its real vector raises the trait (``delta_trait > 0``) with ``p_bonferroni < 0.05``.
Significance marks follow the raw p-value: ``*`` < .05, ``**`` < .01, ``***`` < .001.
"""

import math

import pandas as pd

from personalab.studies.stats import paired_test, sign_flip_test
from personalab.studies.trace.series import Bins, Checkpoint

ALPHA = 0.05
COLUMNS = [
    "unit",
    "trait",
    "revision",
    "step",
    "tokens",
    "share",
    "extractable",
    "condition",
    "n_questions",
    "trait_base",
    "trait_steered",
    "delta_trait",
    "delta_coherence",
    "p_raw",
    "p_greater",
    "p_sign",
    "p_coherence",
    "delta_nll",
    "p_nll",
    "p_bonferroni",
    "significant",
    "mark",
]


def mark(p: float) -> str:
    """``***``, ``**``, ``*`` or ``""`` for a raw p-value."""
    if p is None or math.isnan(p):
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else ""


def _means(scores: dict[str, list[float | None]], key: str) -> pd.Series:
    return pd.Series([float("nan") if v is None else v for v in scores.get(key, [])], dtype=float)


def condition_rows(
    unit: str, trait: str, checkpoint: Checkpoint, final: float, scores: dict[str, dict], n_resamples: int = 10_000
) -> list[dict]:
    """One row per steered condition of ``scores`` (``{"baseline": {...}, condition: {"trait": [...],
    "coherence": [...]}}``, per-question means) against ``baseline``."""
    base = scores["baseline"]
    rows = []
    for condition, steered in scores.items():
        if condition == "baseline":
            continue
        test = paired_test(_means(steered, "trait"), _means(base, "trait"), 1, n_resamples)
        coherence = (_means(steered, "coherence") - _means(base, "coherence")).dropna()
        nll = (_means(steered, "nll") - _means(base, "nll")).dropna()
        rows.append(
            {
                **_where(unit, trait, checkpoint, final, True, condition),
                "n_questions": test["n_questions"],
                "trait_base": float(_means(base, "trait").mean()),
                "trait_steered": float(_means(steered, "trait").mean()),
                "delta_trait": test["mean_diff"],
                "delta_coherence": float(coherence.mean()) if len(coherence) else float("nan"),
                "p_raw": test["p_signflip_raw"],
                "p_greater": test["p_greater"],
                "p_sign": test["p_sign_raw"],
                "p_coherence": sign_flip_test(coherence.tolist(), n_resamples),
                "delta_nll": float(nll.mean()) if len(nll) else float("nan"),
                "p_nll": sign_flip_test(nll.tolist(), n_resamples),
                "mark": mark(test["p_signflip_raw"]),
            }
        )
    return rows


def _where(unit: str, trait: str, checkpoint: Checkpoint, final: float, extractable: bool, condition: str) -> dict:
    return {
        "unit": unit,
        "trait": trait,
        "revision": checkpoint.label,
        "step": checkpoint.step,
        "tokens": checkpoint.tokens,
        "share": checkpoint.position / final if final else float("nan"),
        "extractable": extractable,
        "condition": condition,
    }


def not_extractable_row(unit: str, trait: str, checkpoint: Checkpoint, final: float) -> dict:
    """The row of a checkpoint whose vector could not be extracted."""
    return _where(unit, trait, checkpoint, final, False, "vector")


def finish(rows: list[dict]) -> pd.DataFrame:
    """The table with Bonferroni within trait and the significance column."""
    table = pd.DataFrame(rows, columns=COLUMNS)
    tested = table[(table["condition"] == "vector") & table["p_raw"].notna()]
    tests = tested.groupby("trait").size()
    m = table["trait"].map(tests).fillna(1).clip(lower=1)
    table["p_bonferroni"] = (table["p_raw"] * m).clip(upper=1.0)
    table["significant"] = (
        (table["condition"] == "vector") & (table["delta_trait"] > 0) & (table["p_bonferroni"] < ALPHA)
    )
    table["extractable"] = table["extractable"].astype(bool)
    table["mark"] = table["mark"].fillna("")
    return table


def first_significant(table: pd.DataFrame, unit: str) -> dict | None:
    """The earliest checkpoint whose own vector is extractable and steers significantly, or ``None``."""
    rows = table[(table["unit"] == unit) & table["significant"]]
    return None if rows.empty else rows.iloc[0].to_dict()


def _cell(row: pd.Series) -> str:
    if not row["extractable"]:
        return "not extractable"
    return f"{row['delta_trait']:+.2f} (p = {row['p_raw']:.2g}{row['mark']})"


def wide_markdown(table: pd.DataFrame, checkpoints: list[Checkpoint], title: str) -> str:
    """Rows checkpoint (with tokens), columns one per unit: delta trait (raw p, marks), as in the paper."""
    vectors = table[table["condition"] == "vector"]
    units = list(dict.fromkeys(vectors["unit"]))
    lines = [title, "", "| checkpoint | tokens | " + " | ".join(units) + " |", "|---|---|" + "---|" * len(units)]
    for checkpoint in checkpoints:
        cells = []
        for unit in units:
            found = vectors[(vectors["unit"] == unit) & (vectors["revision"] == checkpoint.label)]
            cells.append(_cell(found.iloc[0]) if len(found) else "-")
        lines.append(f"| {checkpoint.label} | {format_tokens(checkpoint.tokens)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_tokens(tokens: float | None) -> str:
    """``12.58B``, ``6.08T`` or ``-``."""
    if tokens is None or math.isnan(tokens):
        return "-"
    return f"{tokens / 1e12:.2f}T" if tokens >= 1e12 else f"{tokens / 1e9:.2f}B"


def binned(table: pd.DataFrame, bins: Bins, positions: dict[str, float]) -> pd.DataFrame:
    """Per unit and training phase: checkpoints, significant ones, mean, min and max delta trait."""
    vectors = table[(table["condition"] == "vector") & table["extractable"]].copy()
    vectors["phase"] = [bins.of(positions[r]) for r in vectors["revision"]]
    grouped = vectors.groupby(["unit", "phase"], sort=False)
    out = grouped.agg(
        checkpoints=("revision", "count"),
        significant=("significant", "sum"),
        mean_delta_trait=("delta_trait", "mean"),
        min_delta_trait=("delta_trait", "min"),
        max_delta_trait=("delta_trait", "max"),
    ).reset_index()
    order = {label: i for i, label in enumerate(bins.labels)}
    return out.sort_values(["unit", "phase"], key=lambda s: s.map(order) if s.name == "phase" else s)
