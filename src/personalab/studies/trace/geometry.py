"""Geometry of one trait's vectors across checkpoints (numpy, from the saved vectors).

``stack`` is ``[n_checkpoints, n_blocks + 1, hidden]`` in training order (layers as in
``personalab.engine.layers``); the final vector is the last checkpoint's. A zero vector
has no direction: its cosines are NaN.
"""

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, x / norms, np.nan)


def cosine_to_final(stack: np.ndarray) -> np.ndarray:
    """``[n_checkpoints, n_layers]``: cosine of each checkpoint's vector to the last one's, per layer."""
    unit = _unit(stack)
    return np.einsum("clh,lh->cl", unit, unit[-1])


def consecutive_cosines(stack: np.ndarray) -> np.ndarray:
    """``[n_checkpoints, n_layers]``: cosine to the previous checkpoint's vector (NaN for the first)."""
    unit = _unit(stack)
    out = np.full(stack.shape[:2], np.nan)
    out[1:] = np.einsum("clh,clh->cl", unit[1:], unit[:-1])
    return out


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    """``[n, n]`` cosines between the rows of ``vectors`` ``[n, hidden]``."""
    unit = _unit(vectors)
    return unit @ unit.T


def relative_norms(stack: np.ndarray, residual_norms: np.ndarray) -> np.ndarray:
    """``[n_checkpoints, n_layers]``: vector norm over that checkpoint's mean residual norm at the layer."""
    return np.linalg.norm(stack, axis=-1) / residual_norms


def mds_2d(vectors: np.ndarray, seed: int = 42) -> np.ndarray:
    """``[n, 2]``: metric MDS (scikit-learn, seeded, 10 initialisations) of the unit vectors' Euclidean distances."""
    from sklearn.manifold import MDS

    unit = _unit(vectors)
    distances = np.linalg.norm(unit[:, None, :] - unit[None, :, :], axis=-1)
    mds = MDS(n_components=2, metric_mds=True, metric="precomputed", init="random", n_init=10, random_state=seed)
    return mds.fit_transform(distances)
