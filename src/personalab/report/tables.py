"""Markdown tables of data frames (no extra dependency), for the ``.md`` files beside each ``.csv``."""

import math

import pandas as pd


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
