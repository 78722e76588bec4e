"""``examples/quickstart.py`` runs as the README shows, against the test judge server, and writes only what it
saves: the in-memory extractions and sweep leave nothing on disk."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.judge_server import JudgeServer, hashed_scores
from helpers.models import STORIES

from personalab.vectors import load_vectors

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"


@pytest.mark.slow
def test_quickstart_runs_in_memory_and_saves_only_the_vector(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    with JudgeServer(scorer=hashed_scores) as server:
        env = {**os.environ, "PERSONALAB_JUDGE_BASE_URL": server.base_url, "TMPDIR": str(scratch)}
        run = subprocess.run(
            [sys.executable, str(QUICKSTART), str(STORIES), "api:j"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    kept, pairs = map(int, re.search(r"kept (\d+) of (\d+) pairs", run.stdout).groups())
    assert 1 <= kept <= pairs == 100
    plain = re.search(r"^plain: +(.*)$", run.stdout, re.M).group(1)
    steered = re.search(r"^steered: +(.*)$", run.stdout, re.M).group(1)
    assert plain != steered
    cosines = [float(x) for x in re.search(r"per layer: (.*)$", run.stdout, re.M).group(1).split()]
    assert len(cosines) == 6 and all(-1 <= c <= 1 for c in cosines)

    saved = tmp_path / "runs" / "quickstart-evil"
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        f"runs/quickstart-evil/{name}" for name in ("meta.json", "trait.json", "vectors.safetensors")
    ]
    assert list(scratch.iterdir()) == []
    variants, meta = load_vectors(saved)
    assert meta["model"] == str(STORIES) and meta["counts"]["kept"] == kept
    assert set(variants) == {"response_mean", "prompt_mean", "last_prompt"}
    assert all(v.shape == (6, 64) and torch.isfinite(v).all() for v in variants.values())


def test_quickstart_without_a_judge_server_is_one_line(tmp_path):
    env = {**os.environ, "PERSONALAB_JUDGE_BASE_URL": "http://127.0.0.1:9/v1"}
    run = subprocess.run([sys.executable, str(QUICKSTART)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("error: judge gpt-4.1-mini at http://127.0.0.1:9/v1") and "usage:" in line
    assert list(tmp_path.iterdir()) == []
