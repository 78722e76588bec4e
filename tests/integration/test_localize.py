"""Localization: DeepScan against brute force and planted signals, divergence measures, the two commands."""

import itertools
import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers.models import STORIES
from sklearn.decomposition import PCA
from sklearn.metrics import silhouette_score
from typer.testing import CliRunner

from personalab.cli import app
from personalab.engine import loading as model_module
from personalab.errors import InvalidInputError
from personalab.studies.localize import scan as scanning
from personalab.studies.localize.deepscan import (
    SCORES,
    alpha_grid,
    berk_jones,
    higher_criticism,
    kolmogorov_smirnov,
    ltss,
    pvalue_ranges,
    scan,
    scan_individual,
)
from personalab.studies.localize.divergence import Measure, persona_labels, polarity, probe_chance
from personalab.studies.localize.statements import builtin_personas, load_statements

runner = CliRunner()


def test_scores_equal_the_formulas_by_hand():
    assert berk_jones(3, 10, 0.1)[()] == pytest.approx(3 * math.log(3 / 1) + 7 * math.log(7 / 9))
    assert berk_jones(10, 10, 0.2)[()] == pytest.approx(10 * math.log(5))
    assert berk_jones(1, 10, 0.1)[()] == 0.0 and berk_jones(0, 10, 0.3)[()] == 0.0
    assert higher_criticism(6, 20, 0.1)[()] == pytest.approx(4 / math.sqrt(2 * 0.9))
    assert higher_criticism(2, 20, 0.1)[()] == 0.0
    assert kolmogorov_smirnov(6, 16, 0.25)[()] == pytest.approx(2 / 4)
    np.testing.assert_allclose(alpha_grid(), np.arange(1, 51) / 100)


def test_pvalue_ranges_against_their_definitions():
    rng = np.random.default_rng(0)
    background = rng.integers(0, 6, size=(9, 4)).astype(float)
    records = rng.integers(-1, 7, size=(5, 4)).astype(float)
    n = len(background)
    upper, lower, two = (pvalue_ranges(background, records, tail) for tail in ("upper", "lower", "two"))
    for i, j in itertools.product(range(5), range(4)):
        b, x = background[:, j], records[i, j]
        p0, p1 = (b > x).sum() / (n + 1), ((b >= x).sum() + 1) / (n + 1)
        assert tuple(upper[i, j]) == pytest.approx((p0, p1))
        assert lower[i, j, 1] == pytest.approx((b < x).sum() / (n + 1))
        expected = (
            (2 * p0, 2 * p1) if p1 < 0.5 else (2 * (1 - p1), 2 * (1 - p0)) if p0 > 0.5 else (2 * min(p0, 1 - p1), 1)
        )
        assert tuple(two[i, j]) == pytest.approx(expected)
    assert lower[:, :, 1].min() >= 0 and pvalue_ranges(background, background.min(0, keepdims=True) - 1)[0, 0, 1] == 0


@pytest.mark.parametrize("score", list(SCORES))
@pytest.mark.parametrize("free_axis", [0, 1])
def test_ltss_finds_the_brute_force_optimum(score, free_axis):
    rng = np.random.default_rng(7)
    alphas = alpha_grid(0.5, 10)
    for _ in range(5):
        pvalues = rng.choice(np.arange(1, 11) / 11, size=(6, 5)) * rng.choice([0.2, 1.0], size=(6, 5))
        value, subset, alpha = ltss(pvalues, free_axis, alphas, SCORES[score])
        fixed = pvalues.shape[1 - free_axis]
        best = -np.inf
        for size in range(1, pvalues.shape[free_axis] + 1):
            for chosen in itertools.combinations(range(pvalues.shape[free_axis]), size):
                block = pvalues[list(chosen)] if free_axis == 0 else pvalues[:, list(chosen)]
                for a in alphas:
                    best = max(
                        best, SCORES[score](np.array([(block <= a).sum()]), np.array([size * fixed]), np.array([a]))[0]
                    )
        assert value == pytest.approx(best)
        block = pvalues[subset] if free_axis == 0 else pvalues[:, subset]
        recomputed = SCORES[score](np.array([(block <= alpha).sum()]), np.array([block.size]), np.array([alpha]))[0]
        assert recomputed == pytest.approx(value)


def _planted(shift: float, seed: int = 0):
    """Background 250, clean pool 50, anomalous 50 records over 200 nodes; nodes 0-19 lowered by ``shift``."""
    rng = np.random.default_rng(seed)
    background, clean, anomalous = (rng.normal(size=(k, 200)) for k in (250, 50, 50))
    anomalous[:, :20] -= shift
    return pvalue_ranges(background, np.concatenate([clean, anomalous]), "lower")


@pytest.mark.parametrize("score", ["hc", "bj"])
def test_a_planted_shift_is_recovered(score):
    result = scan(_planted(2.5), score, restarts=1)
    nodes, records = set(result.nodes.tolist()), set(result.records.tolist())
    planted = set(range(20))
    assert len(nodes & planted) / len(nodes) >= 0.9 and len(nodes & planted) / 20 >= 0.9
    anomalous = set(range(50, 100))
    assert len(records & anomalous) / len(records) >= 0.9 and len(records & anomalous) / 50 >= 0.9
    null = [scan(_planted(0.0, seed), score, restarts=1) for seed in range(5)]
    assert max(r.score for r in null) < result.score / 3
    precision = np.mean([np.mean(r.records >= 50) for r in null])
    assert 0.3 <= precision <= 0.7


def test_more_restarts_never_score_lower_and_individual_mode():
    ranges = _planted(1.0, seed=3)
    scores = [scan(ranges, "hc", restarts=r, seed=1).score for r in (1, 2, 6)]
    assert scores[0] <= scores[1] <= scores[2]
    for record in (60, 10):
        one = scan_individual(ranges[record], "bj")
        p = ranges[record, :, 1]
        assert set(one.nodes.tolist()) == set(np.flatnonzero(p <= one.alpha).tolist())
        count = (p <= one.alpha).sum()
        assert one.score == pytest.approx(berk_jones(count, count, one.alpha)[()]) and np.isfinite(one.score)
        thresholds = np.unique(p[(p > 0) & (p <= 0.5)])
        assert all(berk_jones((p <= a).sum(), (p <= a).sum(), a)[()] <= one.score + 1e-9 for a in thresholds)
    assert (ranges[60, :, 1] == 0).any(), "the planted record should have p-values of 0 to exercise that case"


def test_divergence_measures_on_planted_activations():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 16))
    positive = np.arange(80) < 40
    separated = x + np.where(positive[:, None], 5.0, 0.0) * np.eye(16)[0]
    near, far = polarity(x, positive), polarity(separated, positive)
    assert far["probe_accuracy"] >= 0.95 and near["probe_accuracy"] <= 0.75
    means = separated[positive].mean(0), separated[~positive].mean(0)
    spread = np.sqrt(
        np.mean([((separated[m] - means[i]) ** 2).sum(1).mean() for i, m in enumerate((positive, ~positive))])
    )
    assert far["mean_distance"] == pytest.approx(np.linalg.norm(means[0] - means[1]) / spread)
    assert far["silhouette"] > near["silhouette"]
    assert all(math.isnan(v) for v in polarity(np.ones((10, 4)), np.arange(10) < 5).values())
    for measure in ("silhouette", "mean_distance"):
        assert far[measure] > far[f"{measure}_chance_95"] > far[f"{measure}_chance"]
        assert near[measure] < near[f"{measure}_chance_95"]
    components = PCA(n_components=4, random_state=0).fit_transform(separated)
    rng = np.random.default_rng(0)
    null = [silhouette_score(components, rng.permutation(positive.astype(int))) for _ in range(100)]
    assert far["silhouette_chance"] == pytest.approx(np.mean(null)) and far["silhouette_chance_95"] == pytest.approx(
        np.percentile(null, 95)
    )


def _binomial_95(n: int, p: float) -> float:
    """Smallest k / n with P(Binomial(n, p) <= k) >= 0.95, summed by hand."""
    total = 0.0
    for k in range(n + 1):
        total += math.comb(n, k) * p**k * (1 - p) ** (n - k)
        if total >= 0.95:
            return k / n
    return 1.0


def test_rise_above_chance():
    assert probe_chance(2, 120) == (0.5, _binomial_95(120, 0.5)) and probe_chance(4, 480)[1] == _binomial_95(480, 0.25)
    chance, ceiling = probe_chance(2, 120)
    # the paper's probe figures, 0.76 / 0.80 / 0.85 at layers 1 / 4 / 31: above chance the rise peaks at the last
    assert Measure([0.76, 0.80, 0.85], [chance] * 3, [ceiling] * 3).rise() == 2
    # without the chance correction 0.80 is 94% of 0.85 and would name the second layer
    assert Measure([0.76, 0.80, 0.85], [0.0] * 3, [0.0] * 3).rise() == 1
    # probes at chance level name no layer
    assert Measure([0.52, 0.55, 0.57, float("nan")], [chance] * 4, [ceiling] * 4).rise() is None
    # a layer below its permutation ceiling does not count, however large its rise over the null mean
    assert Measure([0.1, 0.3, 0.2], [0.0, 0.0, 0.0], [0.15, 0.5, 0.15]).rise() == 2


def test_one_label_per_persona():
    names = [
        "subscribes-to-virtue-ethics", "subscribes-to-cultural-relativism", "subscribes-to-deontology",
        "subscribes-to-utilitarianism", "subscribes-to-moral-nihilism", "politically-conservative",
        "politically-liberal", "anti-LGBTQ-rights", "anti-immigration",
    ]  # fmt: skip
    labels, order = persona_labels([n for n in names for _ in range(3)])
    assert order == names and len(set(labels.tolist())) == 9
    assert all(len(set(labels[i * 3 : i * 3 + 3])) == 1 for i in range(9))


def test_statement_layouts(tmp_path):
    builtin = load_statements(builtin_personas())
    assert {len(v) for v in builtin.values()} == {120} and all(
        sum(s.positive for s in v) == 60 for v in builtin.values()
    )
    csv = tmp_path / "ibm.csv"
    csv.write_text(
        "id,statement,direction,label_confidence,persona_dim\n1,I like it.,positive,0.9,fan\n"
        "2,I hate it.,negative,0.7,fan\n3,It is fine.,negative,0.95,fan\n"
    )
    rows = load_statements(["fan"], statements_file=csv, min_confidence=0.8)["fan"]
    assert [(s.text, s.positive) for s in rows] == [("I like it.", True), ("It is fine.", False)]
    folder = tmp_path / "persona"
    folder.mkdir()
    (folder / "calm.jsonl").write_text(json.dumps({"statement": "Be calm.", "answer_matching_behavior": " No"}) + "\n")
    assert load_statements(["calm"], persona_dir=folder)["calm"][0].positive is False
    bad = tmp_path / "odd.csv"
    bad.write_text("text,label\nhi,1\n")
    with pytest.raises(InvalidInputError, match="unknown statement layout \\(no column 'direction'\\)"):
        load_statements(["x"], statements_file=bad)
    (folder / "odd.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(InvalidInputError, match="odd.jsonl line 1: unknown statement layout"):
        load_statements(["odd"], persona_dir=folder)
    with pytest.raises(InvalidInputError, match="persona 'nope' is not in the built-in set"):
        load_statements(["nope"])


PERSONAS = ["--persona", "politically-liberal", "--persona", "subscribes-to-utilitarianism"]
SMALL_SCAN = ["--background", "40", "--test-clean", "20", "--clean", "10", "--anomalous", "10"]


def test_localize_and_deepscan_on_a_tiny_model(model_folder, tmp_path):
    model = ["--model", str(model_folder("llama", "chatml")), "--device", "cpu"]
    acts = ["--activations", str(tmp_path / "acts")]
    result = runner.invoke(
        app, ["localize", *model, *PERSONAS, *acts, "--figure-layers", "2", "--out", str(tmp_path / "loc")]
    )
    assert result.exit_code == 0, result.output
    loc = tmp_path / "loc"
    table = pd.read_csv(loc / "divergence.csv")
    assert set(table["layer"]) == {0, 1, 2, 3} and set(table["persona"]) == {
        "politically-liberal",
        "subscribes-to-utilitarianism",
    }
    probe = pd.read_csv(loc / "identity_probe.csv")
    assert len(probe) == 4 and probe["accuracy"].between(0, 1).all()
    for name in ("divergence.png", "pca_layer2.png", "tsne_layer2.png", "umap_layer2.png"):
        assert (loc / name).stat().st_size > 10_000
    assert "first layer at 90% of its rise above chance" in (loc / "summary.md").read_text()

    scan_args = ["deepscan", *model, *PERSONAS, *acts, "--layer", "2", *SMALL_SCAN, "--out", str(tmp_path / "scan")]
    loaded = []
    original = model_module.load_weights
    result = runner.invoke(app, scan_args + ["--runs", "3"])
    assert result.exit_code == 0, result.output
    first = pd.read_csv(tmp_path / "scan" / "scan_runs.csv")
    model_module.load_weights = lambda *a, **k: loaded.append(1) or original(*a, **k)
    try:
        result = runner.invoke(app, scan_args + ["--runs", "5", "--individual"])
    finally:
        model_module.load_weights = original
    assert result.exit_code == 0, result.output
    runs = pd.read_csv(tmp_path / "scan" / "scan_runs.csv")
    assert len(runs) == 10 and runs.groupby("persona").head(3).reset_index(drop=True).equals(first)
    union = {p: set().union(*(json.loads(n) for n in rows["nodes"])) for p, rows in runs.groupby("persona")}
    assert runs["precision"].between(0, 1).all() and (runs["n_records"] <= 20).all()
    with sqlite3.connect(tmp_path / "scan" / "scans.sqlite") as db:
        stored = [json.loads(v) for (v,) in db.execute("SELECT value FROM results")]
    assert len(stored) == 10 and {(v["persona"], v["run"]) for v in stored} == {
        (p, r) for p in ("politically-liberal", "subscribes-to-utilitarianism") for r in range(5)
    }
    for row in runs.itertuples():
        value = next(v for v in stored if (v["persona"], v["run"]) == (row.persona, row.run))
        assert json.loads(row.nodes) == value["nodes"] and json.loads(row.records) == value["records"]
        assert len(json.loads(row.nodes)) == row.n_nodes and len(json.loads(row.records)) == row.n_records
    jaccard = pd.read_csv(tmp_path / "scan" / "jaccard.csv", index_col=0)
    sets = {k: set(v) for k, v in json.loads((tmp_path / "scan" / "node_sets.json").read_text()).items()}
    assert sets == union
    a, b = sets["politically-liberal"], sets["subscribes-to-utilitarianism"]
    assert jaccard.loc["politically-liberal", "subscribes-to-utilitarianism"] == pytest.approx(len(a & b) / len(a | b))
    assert (tmp_path / "scan" / "upset.png").is_file() and (
        tmp_path / "scan" / "individual_politically-liberal.csv"
    ).is_file()


def test_resumed_scan_equals_an_uninterrupted_one(tiny, tmp_path, monkeypatch):
    handle = tiny("llama", "chatml")
    statements = load_statements(["politically-liberal"])
    config = scanning.ScanConfig(layer=2, background=40, test_clean=20, clean=10, anomalous=10, runs=4)
    straight = scanning.run_deepscan(handle, statements, tmp_path / "a", config, tmp_path / "acts", progress=False)
    calls = []
    real = scanning.scan

    def dies_after_two(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(scanning, "scan", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        scanning.run_deepscan(handle, statements, tmp_path / "b", config, tmp_path / "acts", progress=False)
    monkeypatch.setattr(scanning, "scan", real)
    resumed = scanning.run_deepscan(handle, statements, tmp_path / "b", config, tmp_path / "acts", progress=False)
    pd.testing.assert_frame_equal(straight, resumed)
    assert (tmp_path / "a" / "scan_runs.csv").read_text() == (tmp_path / "b" / "scan_runs.csv").read_text()


def test_bad_input_fails_before_model_work(model_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(model_module, "load_weights", lambda *a, **k: pytest.fail("the model was loaded"))
    model = ["--model", str(model_folder("llama", "chatml")), "--device", "cpu", "--out", str(tmp_path / "o")]
    cases = [
        (["deepscan", *model, *PERSONAS, "--layer", "2", "--background", "250"], "has 60 negative and 60 positive"),
        (["deepscan", *model, *PERSONAS, "--layer", "9", *SMALL_SCAN], "layer 9 is out of range"),
        (["localize", *model, *PERSONAS, "--layers", "0,7"], "layer 7 is out of range"),
        (["localize", *model, "--persona", "x", "--statements", str(Path(__file__))], "unknown statement layout"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and message in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_localize_on_the_real_checkpoint(tmp_path):
    args = ["localize", "--model", str(STORIES), "--device", "cpu", *PERSONAS, "--persona", "politically-conservative"]
    result = runner.invoke(app, args + ["--layers", "1,3,5", "--figure-layers", "5", "--out", str(tmp_path / "loc")])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "loc" / "divergence.csv")
    assert len(table) == 9 and table["probe_accuracy"].between(0, 1).all()
    assert pd.read_csv(tmp_path / "loc" / "identity_probe.csv")["accuracy"].gt(1 / 3 - 0.15).all()


def test_deepscan_pools_not_given_are_sized_from_the_statements():
    from personalab.studies.localize.scan import REFERENCE_POOLS, ScanConfig, sized

    statements = load_statements(["politically-liberal", "subscribes-to-utilitarianism"])
    counts = {p: (sum(not s.positive for s in rows), sum(s.positive for s in rows)) for p, rows in statements.items()}
    assert set(counts.values()) == {(60, 60)}
    config, note = sized(statements, ScanConfig(layer=2))
    factor = min(1, 60 / (250 + 50), 60 / 50)  # 0.2: the negatives bind
    assert (config.background, config.test_clean, config.clean, config.anomalous) == (50, 10, 10, 10)
    assert [int(v * factor) for v in REFERENCE_POOLS.values()] == [50, 10, 10, 10]
    assert note == "pools: background 50, test-clean 10, clean 10, anomalous 10 (from 60 negative and 60 positive " \
        "statements per persona)"  # fmt: skip
    given, _ = sized(statements, ScanConfig(layer=2, background=40, anomalous=5))
    assert (given.background, given.test_clean, given.clean, given.anomalous) == (40, 10, 10, 5)
    assert sized(statements, ScanConfig(layer=2, background=1, test_clean=1, clean=1, anomalous=1))[1] is None
    assert set(load_statements([])) == set(builtin_personas())
