"""Comparing base, steered and trained models on a trait's evaluation questions.

Every model answers the same evaluation questions ``samples`` times; the judge scores
trait expression and coherence. The steered reference is the base model with ``alpha * v``
added at ``layer`` (convention in ``personalab.engine.layers``) on response positions.
"""

import json
from collections.abc import Callable, Iterable
from contextlib import closing
from functools import partial
from pathlib import Path

import pandas as pd
import torch

from personalab.engine.generation import SamplingParams
from personalab.engine.interventions import steer
from personalab.engine.layers import check_vector
from personalab.engine.model import ModelHandle
from personalab.judging.judges import Judge
from personalab.judging.scorecard import scorecard
from personalab.store import Store
from personalab.traits import Trait


def trainable_parameters(folder: Path) -> int:
    """``trainable_parameters`` recorded in a run folder's ``meta.json`` (0 when there is none)."""
    meta = Path(folder) / "meta.json"
    return json.loads(meta.read_text()).get("trainable_parameters", 0) if meta.is_file() else 0


def run_compare(
    base: ModelHandle,
    vector: torch.Tensor,
    layer: int,
    alpha: float,
    trait: Trait,
    judge: Judge,
    trained: Iterable[tuple[Path, Callable[[], ModelHandle]]],
    out: str | Path,
    samples: int,
    params: SamplingParams,
) -> pd.DataFrame:
    """Score base, steered and each trained model (loaded one at a time from ``(folder, load)``).

    Writes ``compare.csv`` and ``compare.md`` into ``out`` (resumable through its store);
    returns the table: model, trait and coherence mean and std, n, trainable parameters.
    """
    check_vector(vector, layer, base.n_blocks, base.hidden_size)
    out = Path(out)
    rows = []
    with closing(Store(out / "generations.sqlite")) as store:

        def card(handle, label, steering=None):
            return scorecard(handle, trait, judge, store, label, samples, params, steering)

        rows.append({"model": "base", **card(base, "base"), "trainable": 0})
        steered = f"steered layer {layer} alpha {alpha:g}"
        hook = partial(steer, base, vector, layer, alpha=alpha, positions="response")
        rows.append({"model": steered, **card(base, steered, hook), "trainable": 0})
        for folder, load in trained:
            handle = load()
            rows.append(
                {"model": str(folder), **card(handle, f"distilled {folder}"), "trainable": trainable_parameters(folder)}
            )
    table = pd.DataFrame(rows)
    table.to_csv(out / "compare.csv", index=False)
    lines = ["| model | trait | coherence | trainable parameters |", "|---|---|---|---|"]
    lines += [
        f"| {r.model} | {r.trait_mean:.1f} +- {r.trait_std:.1f} | {r.coherence_mean:.1f} +- {r.coherence_std:.1f} "
        f"| {r.trainable} |"
        for r in table.itertuples()
    ]
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    return table
