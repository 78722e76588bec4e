"""Persona-specific behavioural markers in generated text.

Matching, on the lowercased text: a marker with a space or a hyphen is a plain substring; a
single word must stand on word boundaries (``\\bword\\b``); a trailing ``*`` matches any
ending (``indemnif*`` finds "indemnify" and "indemnification"). Curly apostrophes count as
straight ones. Two deviations from the authors' code, which follows the paper's list
otherwise: there ``indemnif*`` is the literal ``indemnif`` on word boundaries (it never
matches), and the engineer list adds "single-point-of-failure".
"""

import re


def _normal(text: str) -> str:
    return text.lower().replace("\u2019", "'")


def marker_found(marker: str, text: str) -> bool:
    """Whether ``marker`` occurs in ``text`` under the rules above."""
    marker, text = _normal(marker), _normal(text)
    if marker.endswith("*"):
        return re.search(r"\b" + re.escape(marker[:-1]) + r"\w*", text) is not None
    if " " in marker or "-" in marker:
        return marker in text
    return re.search(r"\b" + re.escape(marker) + r"\b", text) is not None


def markers_found(markers: list[str], text: str) -> list[str]:
    """The markers of the list that occur in ``text`` (overlapping ones each count: "source", "sources")."""
    return [m for m in markers if marker_found(m, text)]
