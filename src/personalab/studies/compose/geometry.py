"""The 2 x 2 decomposition of a role prompt's residual.

With ``h_BB``, ``h_XB``, ``h_BY``, ``h_XY`` the residuals of the four prompts at one layer and
site (float arrays ``[..., hidden]``): the persona effect ``dX = h_XB - h_BB``, the task effect
``dY = h_BY - h_BB``, the joint effect ``dXY = h_XY - h_BB`` and the interaction
``Inter = dXY - dX - dY``. ``decompose`` returns ``cos(dXY, dX + dY)``, ``cos(dX, dY)``,
``|Inter| / |dXY|`` and the norms of ``dX``, ``dY``, ``dXY``; a cosine with a zero vector and a
fraction over a zero ``dXY`` use ``EPS`` in the denominator, as the reference does.
"""

import numpy as np

EPS = 1e-9
STATISTICS = ("cos_additive", "cos_x_y", "interaction_fraction", "norm_dx", "norm_dy", "norm_dxy")


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + EPS)


def decompose(h_bb: np.ndarray, h_xb: np.ndarray, h_by: np.ndarray, h_xy: np.ndarray) -> dict[str, np.ndarray]:
    """The statistics of ``STATISTICS`` over the leading dimensions of the four residuals (float64)."""
    h_bb, h_xb, h_by, h_xy = (np.asarray(h, dtype=np.float64) for h in (h_bb, h_xb, h_by, h_xy))
    dx, dy, dxy = h_xb - h_bb, h_by - h_bb, h_xy - h_bb
    inter = dxy - dx - dy
    norm_dxy = np.linalg.norm(dxy, axis=-1)
    return {
        "cos_additive": _cos(dxy, dx + dy),
        "cos_x_y": _cos(dx, dy),
        "interaction_fraction": np.linalg.norm(inter, axis=-1) / (norm_dxy + EPS),
        "norm_dx": np.linalg.norm(dx, axis=-1),
        "norm_dy": np.linalg.norm(dy, axis=-1),
        "norm_dxy": norm_dxy,
    }


def summary(values: np.ndarray) -> dict[str, float]:
    """Median, 25th and 75th percentiles (linear), minimum and maximum."""
    values = np.asarray(values, dtype=np.float64)
    p25, median, p75 = np.percentile(values, [25, 50, 75])
    return {
        "median": float(median),
        "p25": float(p25),
        "p75": float(p75),
        "min": float(values.min()),
        "max": float(values.max()),
    }
