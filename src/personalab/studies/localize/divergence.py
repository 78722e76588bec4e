"""Where personas diverge: per-layer probes and separation measures on statement activations.

At each layer (``hidden_states[l]``, last prompt token):

* identity probe: which persona a statement belongs to, over all personas' statements (positive
  and negative), one label per persona; ExtraTrees (20 trees), stratified 10-fold
  cross-validation (fewer folds when a class is smaller), accuracy, weighted F1 and weighted
  precision averaged over folds;
* within each persona, positive against negative statements:
  ``probe_accuracy`` (standardised features, a ridge linear classifier, stratified 10-fold),
  ``silhouette`` of the two classes on the first four principal components, and
  ``mean_distance``: the distance between the two class means over the spread, the root of the
  mean squared distance of a statement to its class mean (averaged over the two classes).

A layer where every statement has the same activation (layer 0 when the last prompt token is
shared by all prompts) has no separation to measure: its three values are NaN.

Chance levels, so that "where personas diverge" is measured above what noise gives: ``1/k`` for
the identity probe over ``k`` personas and ``1/2`` for the polarity probe, with the 95th percentile
of the binomial accuracy of a chance classifier on that many statements as the level a probe must
pass to count as above chance; for silhouette and distance, the mean and the 95th percentile of
the measure under label permutations (``permutations``, seeded). ``rise`` finds the first layer
at ``fraction`` of a measure's largest rise above chance, ``(value - chance) / (max - chance)``,
among the layers above chance.
"""

from dataclasses import dataclass

import numpy as np
from scipy.stats import binom
from sklearn.decomposition import PCA
from sklearn.ensemble import ExtraTreesClassifier
from sklearn.linear_model import RidgeClassifier
from sklearn.metrics import f1_score, make_scorer, precision_score, silhouette_score
from sklearn.model_selection import StratifiedKFold, cross_val_score, cross_validate
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

FOLDS = 10


def _folds(labels: np.ndarray, seed: int) -> StratifiedKFold:
    smallest = int(np.bincount(np.unique(labels, return_inverse=True)[1]).min())
    return StratifiedKFold(n_splits=max(2, min(FOLDS, smallest)), shuffle=True, random_state=seed)


SCORING = {
    "accuracy": "accuracy",
    "f1_weighted": make_scorer(f1_score, average="weighted", zero_division=0),
    "precision_weighted": make_scorer(precision_score, average="weighted", zero_division=0),
}
"""A persona the probe never predicts in a fold counts as precision 0 there (sklearn's convention, stated)."""


def persona_labels(personas: list[str]) -> tuple[np.ndarray, list[str]]:
    """Integer labels of the rows' personas, one label per distinct persona (in order of first appearance)."""
    names = list(dict.fromkeys(personas))
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[p] for p in personas]), names


def identity_probe(x: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Cross-validated persona identity from activations ``x`` ``[n, hidden]`` and integer ``labels``."""
    forest = ExtraTreesClassifier(n_estimators=20, random_state=seed, n_jobs=-1)
    scores = cross_validate(forest, x, labels, cv=_folds(labels, seed), scoring=SCORING)
    return {name: float(scores[f"test_{name}"].mean()) for name in ("accuracy", "f1_weighted", "precision_weighted")}


def _mean_distance(x: np.ndarray, labels: np.ndarray) -> float:
    means = [x[labels == c].mean(axis=0) for c in (0, 1)]
    spread = np.sqrt(np.mean([((x[labels == c] - means[c]) ** 2).sum(axis=1).mean() for c in (0, 1)]))
    return float(np.linalg.norm(means[1] - means[0]) / spread) if spread > 0 else float("nan")


POLARITY = ("probe_accuracy", "silhouette", "mean_distance")
NULLS = tuple(f"{m}_{s}" for m in ("silhouette", "mean_distance") for s in ("chance", "chance_95"))


def polarity(x: np.ndarray, positive: np.ndarray, seed: int = 0, permutations: int = 100) -> dict[str, float]:
    """Separation of positive from negative statements of one persona (see the module docstring), with the
    permutation null of silhouette and distance (``*_chance``: its mean, ``*_chance_95``: its 95th percentile)."""
    labels = positive.astype(int)
    if np.ptp(x, axis=0).max() == 0:
        return dict.fromkeys(POLARITY + NULLS, float("nan"))
    probe = make_pipeline(StandardScaler(), RidgeClassifier(alpha=1.0))
    accuracy = float(cross_val_score(probe, x, labels, cv=_folds(labels, seed), scoring="accuracy").mean())
    components = PCA(n_components=min(4, *x.shape), random_state=seed).fit_transform(x)
    rng = np.random.default_rng(seed)
    shuffled = [rng.permutation(labels) for _ in range(permutations)]
    null = {
        "silhouette": [silhouette_score(components, p) for p in shuffled],
        "mean_distance": [_mean_distance(x, p) for p in shuffled],
    }
    out = {
        "probe_accuracy": accuracy,
        "silhouette": float(silhouette_score(components, labels)),
        "mean_distance": _mean_distance(x, labels),
    }
    for measure, values in null.items():
        out[f"{measure}_chance"] = float(np.mean(values))
        out[f"{measure}_chance_95"] = float(np.percentile(values, 95))
    return out


def probe_chance(classes: int, statements: int) -> tuple[float, float]:
    """``(chance accuracy 1/classes, the 95th percentile of a chance classifier's accuracy on
    ``statements`` statements)``: a probe below the second is not above chance."""
    p = 1.0 / classes
    return p, float(binom.ppf(0.95, statements, p)) / statements


@dataclass(frozen=True)
class Measure:
    """One measure over layers: its ``values``, the ``chance`` level at each layer and the ``ceiling`` a
    value must pass to count as above chance there."""

    values: list[float]
    chance: list[float]
    ceiling: list[float]

    def above(self) -> list[bool]:
        return [bool(v > c) for v, c in zip(self.values, self.ceiling, strict=True)]

    def rise(self, fraction: float = 0.9) -> int | None:
        """Index of the first layer above chance whose rise ``(value - chance) / (max - chance)`` reaches
        ``fraction`` of the largest rise (NaN ignored); ``None`` when no layer is above chance."""
        gain = np.asarray(self.values, dtype=float) - np.asarray(self.chance, dtype=float)
        above = np.asarray(self.above()) & ~np.isnan(gain)
        if not above.any():
            return None
        top = np.nanmax(np.where(above, gain, np.nan))
        return int(np.flatnonzero(above & (gain >= fraction * top))[0])
