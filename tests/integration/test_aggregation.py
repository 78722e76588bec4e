"""How kept pairs become a vector (``personalab.methods.aggregation``): each method against scikit-learn and a direct
formula on planted data."""

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression

from personalab.errors import InvalidInputError
from personalab.methods.aggregation import aggregate, logistic_directions, pca_directions

PAIRS, LAYERS, HIDDEN = 40, 3, 16


def planted(seed: int = 0, spread: float = 1.0):
    """Pairs sharing a random base per pair (``spread`` its standard deviation), the positive answer ``+t_i u / 2``
    and the negative ``-t_i u / 2`` from it along a planted unit ``u`` per layer (``t_i`` about 3, varying), plus
    small noise: ``(acts, u)``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(LAYERS, HIDDEN, generator=g)
    u = u / u.norm(dim=-1, keepdim=True)
    base = spread * torch.randn(PAIRS, LAYERS, HIDDEN, generator=g)
    t = 3 + torch.randn(PAIRS, 1, 1, generator=g)
    noise = 0.05 * torch.randn(2, PAIRS, LAYERS, HIDDEN, generator=g)
    return torch.cat([base + t * u / 2 + noise[0], base - t * u / 2 + noise[1]]), u


def test_mean_diff_is_the_mean_difference():
    acts, _ = planted()
    assert torch.equal(aggregate(acts, PAIRS), acts[:PAIRS].mean(0) - acts[PAIRS:].mean(0))


def test_pca_is_scikit_learns_first_component_of_the_paired_differences():
    acts, u = planted()
    differences = acts[:PAIRS] - acts[PAIRS:]
    units = pca_directions(differences)
    for layer in range(LAYERS):
        theirs = PCA(n_components=1).fit(differences[:, layer].double().numpy()).components_[0]
        assert abs(float(units[layer].double() @ torch.from_numpy(theirs))) == pytest.approx(1, abs=1e-6)
    vector = aggregate(acts, PAIRS, "pca")
    mean = acts[:PAIRS].mean(0) - acts[PAIRS:].mean(0)
    torch.testing.assert_close(vector, (mean * units).sum(-1, keepdim=True) * units)
    assert (torch.nn.functional.cosine_similarity(vector, u, dim=-1) > 0.99).all(), "it points to the positives"


def test_logistic_is_scikit_learns_regression_direction():
    acts, u = planted(1, spread=0.2)
    units = logistic_directions(acts, PAIRS)
    labels = np.r_[np.ones(PAIRS), np.zeros(PAIRS)]
    for layer in range(LAYERS):
        x = acts[:, layer].double().numpy()
        w = LogisticRegression(C=1.0, max_iter=5000).fit(x / x.std(), labels).coef_[0]
        torch.testing.assert_close(units[layer], torch.from_numpy(w / np.linalg.norm(w)).float(), atol=1e-5, rtol=0)
    vector = aggregate(acts, PAIRS, "logistic")
    assert (torch.nn.functional.cosine_similarity(vector, u, dim=-1) > 0.95).all(), "it points to the positives"


def test_what_cannot_be_aggregated_is_refused_in_one_line():
    acts, _ = planted()
    with pytest.raises(InvalidInputError, match="pca needs at least 2 kept pairs"):
        aggregate(torch.cat([acts[:1], acts[PAIRS : PAIRS + 1]]), 1, "pca")
    with pytest.raises(InvalidInputError, match="unknown `aggregation` 'median'; use one of mean_diff, pca, logistic"):
        aggregate(acts, PAIRS, "median")


def test_a_trace_fingerprints_its_aggregation_only_when_one_is_chosen():
    """Traces begun before ``aggregation`` existed keep resuming: the default is not in the fingerprint; another is."""
    from types import SimpleNamespace

    from personalab.studies.trace import settings
    from personalab.studies.trace.run import TraceConfig

    judge = SimpleNamespace(name="judge")
    plain = TraceConfig()
    assert "aggregation" not in settings(plain, judge)["extraction"]
    chosen = plain.model_copy(update={"extraction": plain.extraction.model_copy(update={"aggregation": "pca"})})
    assert settings(chosen, judge)["extraction"]["aggregation"] == "pca"
