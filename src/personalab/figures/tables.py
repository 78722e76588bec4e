"""Tables of data frames: the ``.csv`` files of a run, and the Markdown tables (no extra dependency) beside them."""

import math
from pathlib import Path

import pandas as pd

FLOAT_FORMAT = "%.12g"
"""Floats in CSV files: 12 significant digits, so a score of 80 reads 80, not 80.00000000000001."""


def write_csv(frame: pd.DataFrame, path: str | Path, index: bool = False) -> None:
    """Write ``frame`` to ``path``: a float column holding only whole numbers (a layer or step column that
    pandas made float because a row has none) as integers, other floats with ``FLOAT_FORMAT``."""
    out = frame.copy()
    for column in out.columns:
        values = out[column]
        if pd.api.types.is_float_dtype(values):
            known = values.dropna()
            if len(known) and (known == known.round()).all() and (known.abs() < 2**53).all():
                out[column] = values.astype("Int64")
    out.to_csv(path, index=index, float_format=FLOAT_FORMAT)


def _cell(value, fmt: str | None) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    if fmt and isinstance(value, int | float) and not isinstance(value, bool):
        return format(value, fmt)
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame, formats: dict[str, str] | None = None) -> str:
    """``frame`` as a Markdown table; ``formats`` maps columns to format specs (NaN is shown as ``-``)."""
    formats = formats or {}
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    for row in frame.itertuples(index=False):
        lines.append(
            "| " + " | ".join(_cell(v, formats.get(c)) for c, v in zip(frame.columns, row, strict=True)) + " |"
        )
    return "\n".join(lines) + "\n"
