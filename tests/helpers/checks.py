"""Checks two test modules share: the composition tables' shape, and a Chromium to drive the report page."""

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest


def check_compose_tables(out: Path, personas_with_markers: bool = True):
    text = (out / "kl.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| model | site |"))
    assert header == "| model | site | early | mid | later |"
    rows = [
        line
        for line in text.splitlines()
        if line.split("|")[2:3] and line.split("|")[2].strip() in ("p_last", "g1", "g2")
    ]
    assert [r.split("|")[2].strip() for r in rows[:3]] == ["p_last", "g1", "g2"]
    host = (out / "host.md").read_text()
    assert "| condition | median KL [25th, 75th] |" in host and "| host |" in host and "| oracle |" in host
    if personas_with_markers:
        markers = (out / "markers.md").read_text()
        assert "| condition | any-marker | distinct markers (mean) |" in markers
        assert all(f"| {c} |" in markers for c in ("clean", "additive", "remove_x", "bare"))


def additive_beats_bb(out) -> float:
    """The share of (layer, site) where the additive prediction disturbs less (median KL) than substituting h_BB."""
    kl = pd.read_csv(out / "kl_summary.csv")
    additive, bb = (kl[kl["condition"] == c].set_index(["layer", "site"])["median"] for c in ("additive", "bb"))
    return float((additive < bb).mean())


def chromium() -> str:
    """Debian's Chromium (or $CHROMIUM) with playwright to drive it; skips, saying why, where there is none."""
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no Chromium here: install Debian's chromium package (.ci/run does) to run the browser test")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[browser]'")
    return path
