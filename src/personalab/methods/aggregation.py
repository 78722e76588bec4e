"""How a persona vector is made from the activations of its kept contrastive pairs, at every layer at once.

* ``mean_diff`` (the default, the persona-vectors method): the mean over the positive answers minus the mean over
  the negative ones;
* ``pca``: the first principal component of the paired differences ``pos_i - neg_i``, centred (as scikit-learn's
  ``PCA`` and repeng's ``pca_diff`` take it);
* ``logistic``: the weight direction of an L2-regularised logistic regression (scikit-learn, ``C=1``) that tells the
  positive answers from the negative ones.

``pca`` and ``logistic`` give a direction ``u``; the vector is the mean difference's component along it,
``(m . u) u``, so that every aggregation is in the residual's units (``--scale raw`` keeps its meaning) and points
from the negative answers to the positive ones.
"""

from typing import Literal, get_args

import numpy as np
import torch

from personalab.errors import InvalidInputError

Aggregation = Literal["mean_diff", "pca", "logistic"]
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)


def check_aggregation(method: str) -> None:
    """Refuse an unknown aggregation in one line naming the known ones."""
    if method not in AGGREGATIONS:
        raise InvalidInputError(f"unknown `aggregation` {method!r}; use one of {', '.join(AGGREGATIONS)}")


def aggregate(acts: torch.Tensor, n_pos: int, method: Aggregation = "mean_diff") -> torch.Tensor:
    """The vector of ``acts`` float32 ``[n_pos + n_neg, n_layers, hidden]`` (positive answers first; for ``pca``
    pair ``i`` is rows ``i`` and ``n_pos + i``): float32 ``[n_layers, hidden]``."""
    mean = acts[:n_pos].mean(dim=0) - acts[n_pos:].mean(dim=0)
    if method == "mean_diff":
        return mean
    check_aggregation(method)
    units = pca_directions(acts[:n_pos] - acts[n_pos:]) if method == "pca" else logistic_directions(acts, n_pos)
    return (mean * units).sum(dim=-1, keepdim=True) * units


def pca_directions(differences: torch.Tensor) -> torch.Tensor:
    """Per layer, the unit first principal component of ``differences`` ``[n_pairs, n_layers, hidden]`` after
    centring (the top right singular vector, float64): ``[n_layers, hidden]``."""
    if differences.shape[0] < 2:
        raise InvalidInputError("`aggregation` pca needs at least 2 kept pairs; raise `min_pairs` or use mean_diff")
    x = differences.double().transpose(0, 1)
    x = x - x.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    return vh[:, 0].float()


def logistic_directions(acts: torch.Tensor, n_pos: int) -> torch.Tensor:
    """Per layer, the unit weight vector of a logistic regression of positive (1) against negative (0) on ``acts``
    ``[n, n_layers, hidden]``, each layer's activations divided by their overall standard deviation (a scalar, so
    the direction is the raw residual's): ``[n_layers, hidden]``."""
    from sklearn.linear_model import LogisticRegression

    labels = np.r_[np.ones(n_pos), np.zeros(acts.shape[0] - n_pos)]
    if labels.min() == labels.max():
        raise InvalidInputError("`aggregation` logistic needs positive and negative answers")
    units = []
    for layer in range(acts.shape[1]):
        x = acts[:, layer].double().numpy()
        x = x / (x.std() or 1.0)
        w = LogisticRegression(C=1.0, max_iter=5000).fit(x, labels).coef_[0]
        norm = np.linalg.norm(w)
        units.append(w / norm if norm > 0 else w)
    return torch.from_numpy(np.stack(units)).float()
