import numpy as np
import pandas as pd
import pytest
import torch
from helpers.fakes import TRAIT, ScriptedJudge, hashed_score
from helpers.reference import hidden_states
from scipy import stats

from personalab.engine.generation import SamplingParams, sample_texts
from personalab.engine.interventions import add_vector
from personalab.engine.scale import mean_residual_norm, scaled_vector, typical_residual_norm
from personalab.errors import PersonalabError
from personalab.judging.judges import JudgeError
from personalab.store import Store
from personalab.studies.sweep import SweepConfig, _markdown, run_sweep, summarise
from personalab.traits import COHERENCE_RUBRIC

GREEDY = SamplingParams(temperature=0, max_new_tokens=5)


def _vector(handle, seed=0):
    return torch.randn(handle.n_layers, handle.hidden_size, generator=torch.Generator().manual_seed(seed)) * 2


def test_per_row_sweep_equals_separate_runs_and_table_matches(tiny, tmp_path):
    handle = tiny("llama", "chatml")
    trait = TRAIT.model_copy(update={"evaluation_questions": ["Do you like rain?", "Is it cold?", "Why?", "How?"]})
    vector = _vector(handle)
    config = SweepConfig(
        layers=[1, 3], alphas=[0, 2.0, -4.0], eval_samples=1, sampling=GREEDY, batch_size=12, scale="raw"
    )
    table = run_sweep(handle, vector, trait, ScriptedJudge(), tmp_path, config, progress=False)
    answers = pd.read_json(tmp_path / "answers.jsonl", lines=True)
    for row in answers.itertuples():
        prompt = handle.encode(None, trait.evaluation_questions[row.question])
        with add_vector(handle, vector, row.layer, alpha=row.alpha, positions="generating"):
            (alone,) = sample_texts(handle, [prompt], GREEDY, seed=0)
        assert row.answer == alone
        assert row.trait == hashed_score(alone) and row.coherence == 80.0

    assert len(table) == 6 and set(table["scale"]) == {"raw"}
    for row in table.itertuples():
        scores = [hashed_score(a) for a in answers[(answers.layer == row.layer) & (answers.alpha == row.alpha)].answer]
        assert row.trait_mean == pytest.approx(np.mean(scores)) and row.trait_std == pytest.approx(
            np.std(scores, ddof=1)
        )
        assert row.n == 4
        if row.alpha == 0:
            assert pd.isna(row.p_signflip)
            continue
        base = answers[answers.alpha == 0].groupby("question").first().answer.map(hashed_score)
        mine = answers[(answers.layer == row.layer) & (answers.alpha == row.alpha)].set_index("question").answer
        diffs = (mine.map(hashed_score) - base).to_numpy()
        flip = stats.permutation_test((diffs,), np.mean, permutation_type="samples", n_resamples=np.inf).pvalue
        nonzero = diffs[diffs != 0]
        sign = stats.binomtest(int((nonzero > 0).sum()), len(nonzero), 0.5).pvalue if len(nonzero) else 1.0
        assert row.p_signflip == pytest.approx(min(1.0, 4 * flip))
        assert row.p_sign == pytest.approx(min(1.0, 4 * sign))
    for name in ("sweep.csv", "sweep.md", "heatmap_trait.png", "heatmap_coherence.png", "curves.png", "meta.json"):
        assert (tmp_path / name).is_file()
    assert "| 3 | -4 |" in (tmp_path / "sweep.md").read_text()


def test_rerun_with_more_alphas_computes_only_the_new_ones(tiny, tmp_path, monkeypatch):
    handle = tiny("gpt2", "none")
    vector = _vector(handle, 1)
    config = SweepConfig(
        layers=[2], alphas=[0, 1.0], eval_samples=2, sampling=SamplingParams(max_new_tokens=4), batch_size=5
    )
    first = run_sweep(handle, vector, TRAIT, ScriptedJudge(), tmp_path, config, progress=False)
    sampled, real = [], handle.model.generate
    monkeypatch.setattr(handle.model, "generate", lambda **kw: sampled.append(len(kw["input_ids"])) or real(**kw))
    judge = ScriptedJudge()
    wider = config.model_copy(update={"alphas": [0, 1.0, 3.0]})
    second = run_sweep(handle, vector, TRAIT, judge, tmp_path, wider, progress=False)
    n_new = len(TRAIT.evaluation_questions) * 2
    assert sum(sampled) == n_new and judge.calls <= 2 * n_new
    pd.testing.assert_frame_equal(
        second[second.alpha != 3.0].drop(columns=["p_signflip", "p_sign"]).reset_index(drop=True),
        first.drop(columns=["p_signflip", "p_sign"]),
    )


def test_normalised_scale_gives_the_median_token_residual_norm(tiny):
    handle = tiny("qwen3", "chatml")
    prompts = [handle.encode(None, q) for q in TRAIT.extraction_questions]
    tokens = torch.cat([hidden_states(handle, p)[2] for p in prompts]).norm(dim=-1).double().numpy()
    reference = float(np.median(tokens))
    assert mean_residual_norm(handle, prompts, [2]) == pytest.approx([tokens.mean()], rel=1e-5)
    assert typical_residual_norm(handle, prompts, [2]) == pytest.approx([reference], rel=1e-5)
    scaled = scaled_vector(handle, _vector(handle), 2, "normalised", prompts)
    assert scaled.residual_norm == pytest.approx(reference, rel=1e-5)
    assert scaled.vector.norm().item() == pytest.approx(reference, rel=1e-5)
    assert scaled.ratio(0.5) == pytest.approx(0.5, rel=1e-6)
    raw = scaled_vector(handle, _vector(handle), 2, "raw", prompts)
    assert torch.equal(raw.vector, _vector(handle)[2]) and raw.residual_norm == scaled.residual_norm
    assert raw.added_norm(-2.0) == pytest.approx(2 * _vector(handle)[2].norm().item())


def test_resuming_a_half_done_sweep_computes_only_what_is_missing(tiny, tmp_path, monkeypatch):
    handle = tiny("llama", "chatml")
    vector = _vector(handle, 2)
    config = SweepConfig(layers=[1, 2], alphas=[0, 3.0], eval_samples=1, sampling=SamplingParams(max_new_tokens=3))
    with pytest.raises(PersonalabError, match="judge server is down"):
        run_sweep(handle, vector, TRAIT, ScriptedJudge(fail_after=3), tmp_path / "half", config, progress=False)
    sampled, real = [], handle.model.generate
    monkeypatch.setattr(handle.model, "generate", lambda **kw: sampled.append(1) or real(**kw))
    judge = ScriptedJudge()
    resumed = run_sweep(handle, vector, TRAIT, judge, tmp_path / "half", config, progress=False)
    assert sampled == [] and judge.calls > 0
    monkeypatch.setattr(handle.model, "generate", real)
    straight = run_sweep(handle, vector, TRAIT, ScriptedJudge(), tmp_path / "straight", config, progress=False)
    pd.testing.assert_frame_equal(resumed, straight)


def test_a_command_line_rerun_with_one_more_alpha_keeps_the_scale(model_folder, tmp_path):
    """The default grid and an explicit grid are the same normalised scale: adding one alpha to a sweep computes
    that alpha only; another scale is refused before any work."""
    import json
    import sqlite3

    from helpers.judge_server import JudgeServer, hashed_scores
    from typer.testing import CliRunner

    from personalab.cli import app
    from personalab.studies.sweep import DEFAULT_ALPHAS
    from personalab.vectors import save_vectors

    runner = CliRunner()
    save_vectors(
        tmp_path / "vec", {"response_mean": torch.randn(4, 32, generator=torch.Generator().manual_seed(3))}, {}
    )
    TRAIT.save(tmp_path / "vec" / "trait.json")
    out = tmp_path / "sweep"
    args = ["sweep", "--model", str(model_folder("llama", "chatml")), "--vector", str(tmp_path / "vec"), "--device"]
    args += [
        "cpu",
        "--layers",
        "2",
        "--judge",
        "api:j",
        "--eval-samples",
        "1",
        "--max-new-tokens",
        "2",
        "--out",
        str(out),
    ]

    def answers() -> list[dict]:
        with sqlite3.connect(out / "generations.sqlite") as db:
            return [json.loads(r) for (r,) in db.execute("SELECT request FROM generations")]

    with JudgeServer(scorer=hashed_scores) as server:
        env = {"PERSONALAB_JUDGE_BASE_URL": server.base_url}
        assert runner.invoke(app, args, env=env).exit_code == 0
        before = answers()
        more = ",".join(f"{a:g}" for a in (*DEFAULT_ALPHAS, 1.5))
        result = runner.invoke(app, [*args, "--alphas", more, "--scale", "normalized"], env=env)
        assert result.exit_code == 0, result.output
        after = answers()
        refused = runner.invoke(app, [*args, "--alphas", more, "--scale", "raw"], env=env)
    n_questions = len(TRAIT.evaluation_questions)
    assert len(after) - len(before) == n_questions and all(r in after for r in before)
    assert refused.exit_code == 1 and 'config.scale: "normalised" -> "raw"' in refused.output, refused.output
    assert set(pd.read_csv(out / "sweep.csv")["scale"]) == {"normalised"}


class _Mute(ScriptedJudge):
    """Scores coherence, but gives no trait score to the answers where ``silent(answer)``."""

    def __init__(self, silent=None):
        super().__init__()
        self.silent = silent

    def score_many(self, items):
        return [None if rubric != COHERENCE_RUBRIC and self.silent(answer) else s
                for (_, answer, rubric), s in zip(items, super().score_many(items), strict=True)]  # fmt: skip


def test_a_judge_that_scores_nothing_fails_loudly_and_keeps_the_answers(tiny, tmp_path):
    handle = tiny("llama", "chatml")
    config = SweepConfig(layers=[1], alphas=[0, 2.0], eval_samples=2, sampling=GREEDY, scale="raw")
    with pytest.raises(JudgeError, match=r"gave no score for 4 of 4 judge trait items \(a score needs") as err:
        run_sweep(handle, _vector(handle), TRAIT, _Mute(lambda answer: True), tmp_path, config, progress=False)
    assert "\n" not in str(err.value)
    with Store(tmp_path / "generations.sqlite") as store:
        assert store.count("generations") == 4, "every answer is kept for a rerun with another judge"


def test_a_cell_without_scores_has_n_0_and_no_p_value():
    rows = [
        {"layer": layer, "alpha": alpha, "question": q, "sample": 0, "coherence": 80.0,
         "trait": float("nan") if layer == 2 and alpha == 1.0 else 10.0 * q + alpha}
        for layer in (1, 2) for alpha in (0.0, 1.0) for q in range(4)
    ]  # fmt: skip
    table = summarise(pd.DataFrame(rows)).set_index(["layer", "alpha"])
    assert table.loc[(2, 1.0), "n"] == 0 and table.loc[(2, 1.0), "n_questions"] == 0
    assert pd.isna(table.loc[(2, 1.0), "p_signflip"]) and pd.isna(table.loc[(2, 1.0), "p_sign"])
    assert table.loc[(1, 1.0), "n"] == 4 and table.loc[(1, 1.0), "p_sign"] == pytest.approx(min(1.0, 2 * 2 / 2**4))
    cell = next(line for line in _markdown(table.reset_index(), "raw").splitlines() if line.startswith("| 2 | 1 |"))
    assert cell.split("|")[-3:-1] == [" - ", " - "]


def test_the_fluency_column_is_the_unsteered_nll_computed_by_hand(tiny, tmp_path):
    handle = tiny("llama", "chatml")
    trait = TRAIT.model_copy(update={"evaluation_questions": ["Do you like rain?", "Is it cold?", "Why?", "How?"]})
    config = SweepConfig(layers=[2], alphas=[0, 3.0], eval_samples=2, sampling=SamplingParams(max_new_tokens=6),
                         scale="raw")  # fmt: skip
    table = run_sweep(handle, _vector(handle), trait, ScriptedJudge(), tmp_path, config, progress=False)
    answers = pd.read_json(tmp_path / "answers.jsonl", lines=True)
    for row in answers.itertuples():
        prompt = list(handle.encode(None, trait.evaluation_questions[row.question]).ids)
        ids = prompt + handle.tokenizer.encode(row.answer, add_special_tokens=False)
        with torch.no_grad():
            logp = torch.log_softmax(handle.model(torch.tensor([ids])).logits[0].double(), dim=-1)
        by_hand = -np.mean([logp[t - 1, ids[t]].item() for t in range(len(prompt), len(ids))])
        assert row.nll == pytest.approx(by_hand, rel=1e-4)
    steered = table[table.alpha == 3.0].iloc[0]
    assert steered.nll_mean == pytest.approx(answers[answers.alpha == 3.0].nll.mean())
    per_question = answers.groupby(["alpha", "question"]).nll.mean().unstack(0)
    diffs = (per_question[3.0] - per_question[0.0]).to_numpy()
    flip = stats.permutation_test((diffs,), np.mean, permutation_type="samples", n_resamples=np.inf).pvalue
    assert steered.p_nll == pytest.approx(flip)
    assert "NLL/token" in (tmp_path / "sweep.md").read_text()


def test_fluency_rises_with_alpha_where_smollm2_turns_to_word_salad(smollm2, tmp_path):
    """On the real SmolLM2-135M-Instruct a large normalised alpha at a middle layer breaks the answers: their NLL under
    the unsteered model rises, significantly, where the lexicon's word-count coherence cannot tell."""
    from personalab.judging.lexicon import LexiconJudge
    from personalab.traits import load_trait

    trait = load_trait("optimistic")
    trait = trait.model_copy(update={"evaluation_questions": trait.evaluation_questions[:8]})
    vector = torch.randn(smollm2.n_layers, smollm2.hidden_size, generator=torch.Generator().manual_seed(0))
    config = SweepConfig(layers=[15], alphas=[0, 0.1, 2.0], eval_samples=1, sampling=GREEDY.model_copy(
        update={"max_new_tokens": 24}))  # fmt: skip
    table = run_sweep(smollm2, vector, trait, LexiconJudge(), tmp_path, config, progress=False).set_index("alpha")
    assert table.loc[2.0, "nll_mean"] > table.loc[0.0, "nll_mean"] + 1.0 and table.loc[2.0, "p_nll"] < 0.05
    assert abs(table.loc[0.1, "nll_mean"] - table.loc[0.0, "nll_mean"]) < table.loc[2.0, "nll_mean"] - table.loc[
        0.0, "nll_mean"]  # fmt: skip
    answers = pd.read_json(tmp_path / "answers.jsonl", lines=True)
    for row in answers[answers.alpha == 2.0].head(2).itertuples():
        prompt = list(smollm2.encode(None, trait.evaluation_questions[row.question]).ids)
        ids = prompt + smollm2.tokenizer.encode(row.answer, add_special_tokens=False)
        with torch.no_grad():
            logp = torch.log_softmax(smollm2.model(torch.tensor([ids])).logits[0].double(), dim=-1)
        assert row.nll == pytest.approx(-np.mean([logp[t - 1, ids[t]].item() for t in range(len(prompt), len(ids))]),
                                        rel=1e-4)  # fmt: skip


def test_controls_steer_at_the_vectors_norm_with_directions_computed_by_hand(tiny, tmp_path):
    """``controls=True``: random Gaussian directions and the kept pairs' label-shuffled mean differences (recomputed
    here from ``output_hidden_states`` of each kept answer), each added at the vector's norm, judged against the
    unsteered answers; ``sweep.csv`` keeps its shape and ``controls.csv`` has each seed."""
    import json

    from personalab import extract, sweep
    from personalab.hashes import vector_sha256
    from personalab.studies.controls import pair_activations
    from personalab.studies.sweep import control_vectors
    from personalab.traits.elicitation import elicit

    handle, judge = tiny("llama", "chatml"), ScriptedJudge()
    vector = extract(handle, TRAIT, judge, out=tmp_path / "vec", samples=2, max_new_tokens=6, min_pairs=1,
                     pos_threshold=0, progress=False, report=False)  # fmt: skip
    pairs = [json.loads(line) for line in (tmp_path / "vec" / "pairs.jsonl").read_text().splitlines()]
    kept = [p for p in pairs if p["kept"]]
    acts = {
        side: torch.stack([
            hidden_states(handle, s)[:, s.prompt_len :].mean(1)
            for s in (elicit(handle, "system_prompt", p[f"{side}_instruction"], p["question"], p[f"{side}_text"])
                      for p in kept)
        ]).double()
        for side in ("pos", "neg")
    }  # fmt: skip
    layer = 2
    config = SweepConfig(layers=[layer], alphas=[0, 4.0], eval_samples=1, sampling=GREEDY, scale="raw", controls=True)
    directions = control_vectors(handle, config, lambda: pair_activations(handle, tmp_path / "vec"), None)[layer]
    assert sorted(directions) == [f"{k}-{s}" for k in ("random", "shuffled") for s in (0, 1, 2)]
    for seed in (0, 1, 2):
        torch.testing.assert_close(directions[f"random-{seed}"], torch.randn(handle.hidden_size,
                                   generator=torch.Generator().manual_seed(seed)))  # fmt: skip
        flip = torch.from_numpy(np.random.default_rng(seed).random(len(kept)) < 0.5)[:, None]
        pos, neg = acts["pos"][:, layer], acts["neg"][:, layer]
        expected = torch.where(flip, neg, pos).mean(0) - torch.where(flip, pos, neg).mean(0)
        torch.testing.assert_close(directions[f"shuffled-{seed}"], expected.float(), atol=1e-4, rtol=1e-4)

    result = sweep(handle, vector, judge, layers=[layer], alphas=[0, 4.0], eval_samples=1, temperature=0,
                   max_new_tokens=5, scale="raw", controls=True, out=tmp_path / "sweep", progress=False,
                   report=False)  # fmt: skip
    assert list(result.tables["sweep"].columns) == list(pd.read_csv(tmp_path / "sweep" / "sweep.csv").columns)
    assert "condition" not in result.tables["sweep"] and len(result.tables["sweep"]) == 2
    controls = result.tables["controls"]
    assert sorted(controls["condition"]) == sorted(directions) and (controls["alpha"] == 4.0).all()
    with Store(tmp_path / "sweep" / "generations.sqlite") as store:
        requests = [json.loads(r) for (r,) in store.db.execute("SELECT request FROM generations")]
    digests = {r["steer"]["vector"] for r in requests if r["steer"]}
    v = vector.tensor("response_mean")[layer]
    for d in directions.values():
        assert vector_sha256(d / d.norm() * v.norm()) in digests, "each control is added at the vector's norm"
    assert vector_sha256(v) in digests and len(digests) == 7
    answers = pd.read_json(tmp_path / "sweep" / "answers.jsonl", lines=True)
    baseline = answers[answers["alpha"] == 0]["trait"].mean()
    for row in controls.itertuples():
        mine = answers[answers["condition"] == row.condition]
        assert row.trait_mean == pytest.approx(mine["trait"].mean()) and row.n == len(mine)
        assert row.delta_trait == pytest.approx(row.trait_mean - baseline)
    assert "Controls at the vector's added norm" in (tmp_path / "sweep" / "sweep.md").read_text()
    assert {r.get("condition") for r in requests} == {None, *directions}, "the report can tell the controls apart"

    generations = len(requests)
    rerun = dict(layers=[layer], alphas=[0, 4.0], eval_samples=1, temperature=0, max_new_tokens=5, scale="raw",
                 out=tmp_path / "sweep", progress=False, report=False)  # fmt: skip
    again = sweep(handle, vector, judge, controls=True, batch_size=3, **rerun)
    with Store(tmp_path / "sweep" / "generations.sqlite") as store:
        assert store.count("generations") == generations, "the kept control directions find their answers again"
    pd.testing.assert_frame_equal(again.tables["controls"], controls)
    sweep(handle, vector, judge, **rerun)
    assert not (tmp_path / "sweep" / "controls.csv").exists(), "a rerun without controls drops their table"
    with pytest.raises(ValueError, match="add 0 to `alphas`"):
        SweepConfig(layers=[layer], alphas=[4.0], scale="raw", controls=True)
