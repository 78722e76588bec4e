"""Persona x task composition: geometry, causal KL, markers and host injection."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from helpers.checks import additive_beats_bb, check_compose_tables
from helpers.models import STORIES
from typer.testing import CliRunner

from personalab import load_model
from personalab.cli import app
from personalab.engine import loading as model_module
from personalab.errors import PersonalabError
from personalab.store import Store
from personalab.studies.compose import ComposeConfig, load_grid, run_compose
from personalab.studies.compose import run as compose_run
from personalab.studies.compose.geometry import decompose
from personalab.studies.compose.markers import marker_found
from personalab.studies.compose.run import Study, paper_layers, summed_kl

runner = CliRunner()

MARKER_CASES = [
    ("source", "We need a source.", True),
    ("source", "Open-source tools", True),
    ("source", "the sources agree", False),
    ("sources", "The Sources agree.", True),
    ("lean", "a clean design", False),
    ("lean", "Stay lean, ship fast.", True),
    ("MVP", "ship an mvp first", True),
    ("single point of failure", "a Single Point of Failure here", True),
    ("single point of failure", "single point, of failure", False),
    ("fault-tolerant", "a fault-tolerant cluster", True),
    ("fault-tolerant", "fault tolerant", False),
    ("product-market fit", "no product-market fit yet", True),
    ("let’s say", "Let's say you have two", True),
    ("indemnif*", "an indemnification clause", True),
    ("indemnif*", "they will indemnify you", True),
    ("indemnif*", "unindemnified", False),
    ("sauté", "Sauté the onions", True),
    ("French", "french technique", True),
    ("like a", "just like a bridge", True),
    ("like a", "unlike arrays", True),  # multi-word markers are plain substrings, as specified
]


@pytest.mark.parametrize(("marker", "text", "expected"), MARKER_CASES)
def test_marker_matching(marker, text, expected):
    assert marker_found(marker, text) is expected


def test_geometry_of_linear_residuals():
    rng = np.random.default_rng(0)
    base, x, y = rng.normal(size=(3, 7, 64))
    stats = decompose(base, base + x, base + y, base + x + y)
    np.testing.assert_allclose(stats["cos_additive"], 1.0, atol=1e-12)
    np.testing.assert_allclose(stats["interaction_fraction"], 0.0, atol=1e-12)
    cos = (x * y).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1)
    np.testing.assert_allclose(stats["cos_x_y"], cos, atol=1e-8)
    inter = rng.normal(size=(7, 64))
    planted = decompose(base, base + x, base + y, base + x + y + inter)
    expected = np.linalg.norm(inter, axis=-1) / np.linalg.norm(x + y + inter, axis=-1)
    np.testing.assert_allclose(planted["interaction_fraction"], expected, rtol=1e-9)
    np.testing.assert_allclose(planted["norm_dxy"], np.linalg.norm(x + y + inter, axis=-1), rtol=1e-12)


def test_summed_kl_equals_kl_div():
    torch.manual_seed(0)
    p, q = torch.log_softmax(torch.randn(10, 50), -1), torch.log_softmax(torch.randn(10, 50), -1)
    assert summed_kl(p, q) == pytest.approx(F.kl_div(q, p, log_target=True, reduction="sum").item(), rel=1e-6)
    assert summed_kl(p, p) == 0.0


def test_paper_layer_grid():
    assert paper_layers(26) == [6, 10, 14, 18, 22]
    assert paper_layers(28) == [7, 11, 15, 20, 24]
    assert paper_layers(36) == [9, 14, 20, 25, 31]


def _grid(tmp_path):
    grid = {
        "name": "mini",
        "baseline_persona": "a thoughtful person",
        "baseline_task": "Give advice to someone facing a difficult decision.",
        "personas": {"chef": "a head chef", "engineer": "a software engineer who avoids single points of failure"},
        "tasks": {"haiku": "Write a haiku about Monday mornings.", "plan": "Review this plan: launch in a week."},
    }
    path = tmp_path / "mini.json"
    path.write_text(json.dumps(grid))
    return path


def _run(handle, grid, out, batch_size, **config):
    config = ComposeConfig(layers=[1, 2], markers=True, host=True, edit_layer=2, host_sets=[[2], [1, 2]],
                           batch_size=batch_size, **config)  # fmt: skip
    markers = {"chef": ["fresh", "the"], "engineer": ["reliability", "a"]}
    return run_compose(handle, load_grid(str(grid)), out, config, markers, progress=False)


def test_substitution_checks_and_batching(tiny, tmp_path):
    handle = tiny("llama", "chatml")
    grid = _grid(tmp_path)
    one = _run(handle, grid, tmp_path / "one", 1)
    many = _run(handle, grid, tmp_path / "many", 8)
    kl = pd.read_csv(tmp_path / "many" / "kl.csv")
    oracle, bb = (kl[kl["condition"] == c]["kl"] for c in ("oracle", "bb"))
    assert oracle.abs().max() < 1e-6
    assert bb.min() > 10 * max(oracle.abs().max(), 1e-9), "h_BB must move the output far beyond numerical noise"
    for name in ("kl.csv", "geometry_cells.csv", "host.csv"):
        a, b = (pd.read_csv(tmp_path / run / name) for run in ("one", "many"))
        numeric = a.select_dtypes("number").columns
        np.testing.assert_allclose(a[numeric].to_numpy(), b[numeric].to_numpy(), rtol=1e-5, atol=1e-5, err_msg=name)
    answers = [
        [json.loads(line)["text"] for line in (tmp_path / run / "markers_answers.jsonl").open()]
        for run in ("one", "many")
    ]
    assert answers[0] == answers[1]
    pd.testing.assert_frame_equal(one["markers"], many["markers"])

    store = Store(tmp_path / "many" / "compose.sqlite")
    study = Study(handle, load_grid(str(grid)), ComposeConfig(layers=[2], batch_size=4), store, False)
    (p, *_), _ = study.prepare(load_grid(str(grid)).cells[:1])
    store.close()
    clean, edited = (study.logprobs([p.followed("XY", p.ref)], [12], [edits])[0]
                     for edits in ([], [(2, p.position("XY", 1), study.replacement(p, "additive", 2, 1))]))  # fmt: skip
    expected = F.kl_div(edited[1:11], clean[1:11], log_target=True, reduction="sum").item()
    row = kl[(kl["cell"] == p.cell.name) & (kl["layer"] == 2) & (kl["site"] == "g1") & (kl["condition"] == "additive")]
    assert row["kl"].item() == pytest.approx(expected, rel=1e-4, abs=1e-7)
    geometry = pd.read_csv(tmp_path / "many" / "geometry_cells.csv")
    direct = decompose(*(p.residuals[n][2, 0].numpy() for n in ("BB", "XB", "BY", "XY")))
    got = geometry[(geometry["cell"] == p.cell.name) & (geometry["layer"] == 2) & (geometry["site"] == "p_last")]
    assert got["cos_additive"].item() == pytest.approx(float(direct["cos_additive"]), rel=1e-6)


def test_oracle_substitution_is_exact_at_every_layer_with_a_non_unit_final_norm(model_folder, tmp_path):
    """Capture reads hidden_states[n] after the final norm; a substitution there must write the same space."""
    handle = load_model(str(model_folder("llama", "chatml")), device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, weight in handle.model.named_parameters():
            if name.endswith("norm.weight"):
                weight.copy_(0.5 + torch.rand(weight.shape, generator=g))
    config = ComposeConfig(all_layers=True, batch_size=8)
    run_compose(handle, load_grid(str(_grid(tmp_path))), tmp_path / "out", config, progress=False)
    kl = pd.read_csv(tmp_path / "out" / "kl.csv")
    oracle = kl[kl["condition"] == "oracle"]
    assert sorted(oracle["layer"].unique()) == list(range(handle.n_blocks + 1))
    assert oracle["kl"].abs().max() < 1e-6, oracle.groupby("layer")["kl"].max()


def test_a_grid_with_no_usable_cell_is_one_line_and_keeps_its_summary(model_folder, tmp_path):
    handle = load_model(str(model_folder("llama", "chatml")), device="cpu", dtype="float32")
    eos = handle.tokenizer.eos_token_id

    def always_stop(module, args, logits):
        return logits + 1e4 * F.one_hot(torch.tensor(eos), logits.shape[-1])

    hook = handle.model.lm_head.register_forward_hook(always_stop)
    try:
        with pytest.raises(PersonalabError) as info:
            run_compose(handle, load_grid(str(_grid(tmp_path))), tmp_path / "out", ComposeConfig(), progress=False)
    finally:
        hook.remove()
    message = str(info.value)
    assert "\n" not in message and message.startswith("none of the 4 cells is usable")
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "usable 0; skipped 4" in summary and "Tables: none" in summary
    assert not (tmp_path / "out" / "kl.md").exists()


def test_killed_run_resumes_to_the_same_numbers(tiny, tmp_path, monkeypatch):
    handle = tiny("llama", "chatml")
    grid = _grid(tmp_path)
    straight = _run(handle, grid, tmp_path / "a", 4)
    calls, real = [], compose_run.logprobs_at

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(compose_run, "logprobs_at", dies)
    with pytest.raises(KeyboardInterrupt):
        _run(handle, grid, tmp_path / "b", 4)
    monkeypatch.setattr(compose_run, "logprobs_at", real)
    resumed = _run(handle, grid, tmp_path / "b", 4)
    for name in straight:
        pd.testing.assert_frame_equal(straight[name], resumed[name])


@pytest.mark.parametrize("grid", ["short", "review"])
def test_compose_command_on_a_tiny_chat_model(model_folder, tmp_path, grid):
    out = tmp_path / grid
    args = ["compose", "--model", str(model_folder("qwen2", "chatml")), "--device", "cpu", "--grid", grid]
    result = runner.invoke(app, args + ["--layers", "0,1,2", "--markers", "--host", "--out", str(out)])
    assert result.exit_code == 0, result.output
    check_compose_tables(out, personas_with_markers=grid == "review")
    cells = pd.read_csv(out / "geometry_cells.csv")["cell"].nunique()
    skipped = json.loads((out / "meta.json").read_text())["skipped"]
    assert cells + len(skipped) == (12 if grid == "short" else 24)
    for name in ("kl.png", "cos_additive.png", "interaction_fraction.png"):
        assert (out / name).stat().st_size > 10_000


def test_compose_on_the_real_checkpoint(tmp_path):
    """The short grid with the host table here; the README's review (markers, host) and long (all layers) grids run
    on the same checkpoint in tests/acceptance/test_readme.py, with these checks (the first on the long grid)."""
    out = tmp_path / "short"
    args = ["compose", "--model", str(STORIES), "--device", "cpu", "--grid", "short", "--out", str(out), "--host"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    check_compose_tables(out, personas_with_markers=False)
    assert additive_beats_bb(out) >= 0.75, "substituting h_BB should disturb more than the additive prediction"


def test_bad_input_fails_before_model_work(model_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(model_module, "load_weights", lambda *a, **k: pytest.fail("the model was loaded"))
    base = ["compose", "--model", str(model_folder("llama", "chatml")), "--device", "cpu", "--out", str(tmp_path / "o")]
    grid = json.loads(_grid(tmp_path).read_text())
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({k: v for k, v in grid.items() if k != "tasks"}))
    same = tmp_path / "same.yaml"
    same.write_text("baseline_persona: a thoughtful person\nbaseline_task: Do it.\n"
                    "personas: {b: a thoughtful person}\ntasks: {t: Write.}\n")  # fmt: skip
    cases = [
        (["--grid", str(missing)], "field 'tasks' is missing"),
        (["--grid", str(same)], "persona 'b' equals the baseline persona"),
        (["--layers", "1,9"], "layer 9 is out of range"),
        (["--grid", "tiny"], "unknown grid 'tiny'"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 1 and message in result.output, (extra, result.output)
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
