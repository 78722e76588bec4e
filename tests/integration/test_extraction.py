import json
import sqlite3

import pytest
import torch
from helpers.fakes import TRAIT, ScriptedJudge, hashed_score
from helpers.judge_server import JudgeServer, hashed_scores
from helpers.reference import hidden_states

from personalab.engine.chat import TokenSequence
from personalab.engine.generation import GenerationRequest, SamplingParams, generate_cached
from personalab.errors import InvalidInputError, PersonalabError
from personalab.methods.extraction import (
    RULES,
    Answer,
    ExtractionConfig,
    FilterError,
    filter_pairs,
    run_extraction,
)
from personalab.store import Store
from personalab.traits import load_trait_file
from personalab.vectors import export_public, load_vectors

CONFIG = ExtractionConfig(samples=3, sampling=SamplingParams(max_new_tokens=6, seed=3), min_pairs=1, batch_size=4)


def reference_activations(handle, trait, texts, judge_fn, config):
    """Per variant, the kept pairs' positive and negative activations ``[kept, n_blocks + 1, hidden]`` each, computed
    directly with output_hidden_states over the pairs the filter should keep."""
    pos, neg = {"r": [], "p": [], "l": []}, {"r": [], "p": [], "l": []}
    i = 0
    for question in trait.extraction_questions:
        for pair in trait.instructions:
            for _ in range(config.samples):
                a_pos, a_neg = texts[i], texts[i + 1]
                i += 2
                ok = judge_fn(a_pos) >= 50 and judge_fn(a_neg) < 50 and a_pos.strip() and a_neg.strip()
                if not ok:
                    continue
                for bucket, instr, answer in ((pos, pair.pos, a_pos), (neg, pair.neg, a_neg)):
                    seq = handle.encode(instr, question, answer)
                    hs = hidden_states(handle, seq)
                    bucket["r"].append(hs[:, seq.prompt_len :].mean(1))
                    bucket["p"].append(hs[:, : seq.prompt_len].mean(1))
                    bucket["l"].append(hs[:, seq.prompt_len - 1])
    names = {"r": "response_mean", "p": "prompt_mean", "l": "last_prompt"}
    return {names[k]: (torch.stack(pos[k]), torch.stack(neg[k])) for k in names}


def reference_vectors(handle, trait, texts, judge_fn, config):
    """Vectors computed directly with output_hidden_states over the pairs the filter should keep."""
    acts = reference_activations(handle, trait, texts, judge_fn, config)
    kept = len(acts["response_mean"][0])
    return {name: pos.mean(0) - neg.mean(0) for name, (pos, neg) in acts.items()}, kept


def test_vectors_equal_a_direct_reference_and_reruns_reuse_the_store(tiny, tmp_path, monkeypatch):
    handle = tiny("llama", "chatml")
    judge = ScriptedJudge()
    result = run_extraction(handle, TRAIT, judge, tmp_path / "run", CONFIG, progress=False)
    texts = [a.text for a in result.answers]
    assert len(texts) == 3 * 2 * 3 * 2
    ref, kept = reference_vectors(handle, TRAIT, texts, hashed_score, CONFIG)
    assert kept == result.meta["counts"]["kept"] > 0
    for variant, vector in ref.items():
        assert result.vectors[variant].shape == (handle.n_layers, handle.hidden_size)
        torch.testing.assert_close(result.vectors[variant], vector, atol=1e-5, rtol=1e-5)

    run = tmp_path / "run"
    for name in ("vectors.safetensors", "meta.json", "summary.md", "norms.png", "generations.sqlite"):
        assert (run / name).is_file()
    loaded, meta = load_vectors(run)
    assert set(loaded) == {"response_mean", "prompt_mean", "last_prompt"}
    torch.testing.assert_close(loaded["response_mean"], ref["response_mean"], atol=1e-5, rtol=1e-5)
    assert meta["trait_sha256"] == TRAIT.digest() and meta["n_blocks"] == handle.n_blocks
    assert meta["norms"]["response_mean"] == pytest.approx(ref["response_mean"].norm(dim=-1).tolist(), abs=1e-5)
    assert sum(p["kept"] for p in meta["counts"]["per_instruction_pair"]) == kept
    summary = (run / "summary.md").read_text()
    assert f"**{kept} / 18**" in summary
    assert load_trait_file(run / "trait.json") == TRAIT
    dropped = 18 - kept
    assert f"| {RULES['pos_trait_low']} | {meta['counts']['rejected']['pos_trait_low']} |" in summary
    assert sum(meta["counts"]["rejected"].values()) == dropped
    assert summary.count("(trait ") == 2 * min(3, dropped) and "Dropped pairs, for example" in summary
    pairs = [json.loads(line) for line in (run / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 18 and sum(p["kept"] for p in pairs) == kept
    for p in pairs:
        assert p["pos_trait"] == hashed_score(p["pos_text"]) and p["neg_trait"] == hashed_score(p["neg_text"])
        assert p["pos_text"] in texts and p["neg_text"] in texts and p["pos_instruction"] != p["neg_instruction"]
        low, high = p["pos_trait"] < CONFIG.pos_threshold, p["neg_trait"] >= CONFIG.neg_threshold
        empty = not p["pos_text"].strip() or not p["neg_text"].strip()
        assert p["kept"] == (not (low or high or empty))
        assert p["rules"] == [r for r, on in [("pos_trait_low", low), ("neg_trait_high", high)] if on] + (
            ["empty_answer"] if empty else []
        )
        assert p["reasons"] == [RULES[r] for r in p["rules"]]

    calls, forwards = [], []
    monkeypatch.setattr(handle.model, "generate", lambda *a, **k: calls.append(1))
    hook = handle.model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    again = ScriptedJudge()
    try:
        rerun = run_extraction(handle, TRAIT, again, run, CONFIG, progress=False)
    finally:
        hook.remove()
    assert calls == [] and again.calls == 0
    assert len(forwards) == -(-2 * kept // CONFIG.batch_size), "one capture pass over the kept answers, all variants"
    for variant in ref:
        torch.testing.assert_close(rerun.vectors[variant], result.vectors[variant])


@pytest.mark.parametrize("aggregation", ["pca", "logistic"])
def test_another_aggregation_recomputes_the_vector_from_the_stored_answers(tiny, tmp_path, monkeypatch, aggregation):
    """A rerun with ``aggregation`` pca or logistic generates and judges nothing, and its vector is the mean
    difference's component along scikit-learn's direction (the first principal component of the paired differences;
    the logistic regression's weights) over activations read with output_hidden_states."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    handle = tiny("llama", "chatml")
    first = run_extraction(handle, TRAIT, ScriptedJudge(), tmp_path, CONFIG, progress=False)
    acts = reference_activations(handle, TRAIT, [a.text for a in first.answers], hashed_score, CONFIG)
    monkeypatch.setattr(handle.model, "generate", lambda *a, **k: pytest.fail("generated"))
    again = ScriptedJudge()
    rerun = run_extraction(handle, TRAIT, again, tmp_path, CONFIG.model_copy(update={"aggregation": aggregation}),
                           progress=False)  # fmt: skip
    assert again.calls == 0 and rerun.meta["config"]["aggregation"] == aggregation
    for variant, (pos, neg) in acts.items():
        for layer in range(1, handle.n_layers):
            if aggregation == "pca":
                u = PCA(n_components=1).fit((pos[:, layer] - neg[:, layer]).double().numpy()).components_[0]
            else:
                x = torch.cat([pos[:, layer], neg[:, layer]]).double().numpy()
                labels = [1] * len(pos) + [0] * len(neg)
                u = LogisticRegression(C=1.0, max_iter=5000).fit(x / x.std(), labels).coef_[0]
            u = torch.from_numpy(u / (u**2).sum() ** 0.5).float()
            mean = pos[:, layer].mean(0) - neg[:, layer].mean(0)
            expected = (mean @ u) * u
            torch.testing.assert_close(rerun.vectors[variant][layer], expected, atol=2e-4, rtol=2e-3)
        assert not torch.allclose(rerun.vectors[variant], first.vectors[variant])


def test_too_few_pairs_is_a_clear_error_and_keeps_the_work(tiny, tmp_path):
    handle = tiny("llama", "chatml")
    with pytest.raises(FilterError) as err:
        run_extraction(handle, TRAIT, ScriptedJudge(coherence=10), tmp_path, CONFIG, progress=False)
    message = str(err.value)
    assert "\n" not in message and "only 0 of 18 pairs" in message and "rejected incoherent: 18)" in message
    db = sqlite3.connect(tmp_path / "generations.sqlite")
    assert db.execute("SELECT COUNT(*) FROM generations").fetchone()[0] == 36
    assert db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0] > 0


def test_thresholds_are_configurable(tiny, tmp_path):
    handle = tiny("llama", "chatml")
    strict = CONFIG.model_copy(update={"pos_threshold": 101.0})
    with pytest.raises(FilterError, match="pos_trait_low: 18"):
        run_extraction(handle, TRAIT, ScriptedJudge(), tmp_path, strict, progress=False)


def test_judge_failure_stores_nothing_false_and_resumes_identically(tiny, tmp_path):
    handle = tiny("gpt2", "none")
    config = CONFIG.model_copy(update={"samples": 2})
    with pytest.raises(PersonalabError, match="judge server is down"):
        run_extraction(handle, TRAIT, ScriptedJudge(fail_after=5), tmp_path / "a", config, progress=False)
    db = sqlite3.connect(tmp_path / "a" / "generations.sqlite")
    assert db.execute("SELECT COUNT(*) FROM judgements WHERE score IS NULL").fetchone()[0] == 0
    resumed = run_extraction(handle, TRAIT, ScriptedJudge(), tmp_path / "a", config, progress=False)
    straight = run_extraction(handle, TRAIT, ScriptedJudge(), tmp_path / "b", config, progress=False)
    assert [a.text for a in resumed.answers] == [a.text for a in straight.answers]
    for variant in straight.vectors:
        assert torch.equal(resumed.vectors[variant], straight.vectors[variant])


def test_generation_is_reproducible_and_cached_per_batch(tiny, tmp_path):
    handle = tiny("qwen2", "chatml")
    requests = [GenerationRequest(handle.encode(None, q), {"q": q}) for q in TRAIT.extraction_questions * 2]
    requests = [GenerationRequest(r.prompt, {**r.request, "i": i}) for i, r in enumerate(requests)]
    params = SamplingParams(max_new_tokens=5, seed=11)
    first = generate_cached(handle, Store(tmp_path / "1.sqlite"), requests, params, batch_size=2, progress=False)
    second = generate_cached(handle, Store(tmp_path / "2.sqlite"), requests, params, batch_size=2, progress=False)
    assert first == second
    other = generate_cached(
        handle, Store(tmp_path / "3.sqlite"), requests, params.model_copy(update={"seed": 12}), 2, progress=False
    )
    assert other != first
    greedy = SamplingParams(temperature=0, max_new_tokens=5)
    texts = generate_cached(handle, Store(tmp_path / "4.sqlite"), requests[:1], greedy, progress=False)
    ids = torch.tensor([requests[0].prompt.ids])
    out = handle.model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert texts[0] == handle.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_public_pt_round_trip_and_bad_vectors(tmp_path):
    vectors = {"response_mean": torch.randn(4, 8), "prompt_mean": torch.randn(4, 8), "last_prompt": torch.randn(4, 8)}
    files = export_public(vectors, tmp_path, "evil")
    assert sorted(f.name for f in files) == [
        "evil_prompt_avg_diff.pt",
        "evil_prompt_last_diff.pt",
        "evil_response_avg_diff.pt",
    ]
    for f in files:
        loaded, _ = load_vectors(f)
        ((variant, tensor),) = loaded.items()
        assert torch.equal(tensor, vectors[variant])
    torch.save(torch.full((4, 8), float("nan")), tmp_path / "bad.pt")
    with pytest.raises(PersonalabError, match="NaN or inf"):
        load_vectors(tmp_path / "bad.pt")
    torch.save(torch.ones(8), tmp_path / "flat.pt")
    with pytest.raises(PersonalabError, match=r"expected \[n_blocks \+ 1, hidden\]"):
        load_vectors(tmp_path / "flat.pt")


def test_rerun_with_more_requests_samples_only_the_new_ones(tiny, tmp_path, monkeypatch):
    handle = tiny("llama", "chatml")
    requests = [
        GenerationRequest(handle.encode(None, q), {"q": q, "s": s})
        for q in TRAIT.extraction_questions
        for s in range(3)
    ]
    params = SamplingParams(max_new_tokens=4, seed=2)
    store = Store(tmp_path / "s.sqlite")
    early = generate_cached(handle, store, requests[:4], params, batch_size=3, progress=False)
    sampled = []
    real = handle.model.generate
    monkeypatch.setattr(handle.model, "generate", lambda **kw: sampled.append(len(kw["input_ids"])) or real(**kw))
    later = generate_cached(handle, store, requests, params, batch_size=3, progress=False)
    assert sum(sampled) == len(requests) - 4
    assert later[:4] == early


def test_filter_rules_counts_and_examples_by_hand():
    config = ExtractionConfig(pos_threshold=60, neg_threshold=30, coherence_threshold=50)

    def answer(polarity, trait, coherence, text="an answer"):
        return Answer("q", "instruction", 0, 0, polarity, text, trait, coherence)

    pairs = [
        (answer("pos", 70, 80), answer("neg", 10, 80)),
        (answer("pos", 55, 80), answer("neg", 10, 80)),
        (answer("pos", 70, 80), answer("neg", 40, 80)),
        (answer("pos", 20, 10), answer("neg", 40, 80)),
        (answer("pos", None, 80), answer("neg", 10, 80, " ")),
    ]
    report = filter_pairs([a for pair in pairs for a in pair], config)
    assert report.broken == [
        [],
        ["pos_trait_low"],
        ["neg_trait_high"],
        ["incoherent", "pos_trait_low", "neg_trait_high"],
        ["no_score", "empty_answer"],
    ]
    assert report.kept == [pairs[0]]
    counts = report.counts(TRAIT)
    assert counts["kept"] == 1 and counts["pairs"] == 5
    assert counts["rejected"] == {
        "no_score": 1,
        "incoherent": 1,
        "pos_trait_low": 1,
        "neg_trait_high": 1,
        "empty_answer": 0,
    }
    assert counts["breaking"] == {
        "no_score": 1,
        "incoherent": 1,
        "pos_trait_low": 2,
        "neg_trait_high": 2,
        "empty_answer": 1,
    }
    examples = report.examples()
    assert [e["rules"][0] for e in examples] == ["pos_trait_low", "incoherent", "no_score"]
    assert examples[1]["pos_trait"] == 20 and examples[1]["neg_coherence"] == 80
    assert len(report.examples(5)) == 4


def test_trait_threshold_is_the_reference_threshold(tiny, tmp_path):
    """``trait_threshold=T`` keeps what the persona-vectors reference's ``--threshold T`` keeps: positive >= T,
    negative < 100 - T, both coherence >= 50 (``generate_vec.py``), written out here from the stored scores."""
    from personalab import extract

    handle, run = tiny("llama", "chatml"), tmp_path / "run"
    options = dict(samples=3, max_new_tokens=6, seed=3, min_pairs=1, batch_size=4, progress=False, report=False)
    judge = ScriptedJudge(trait=lambda answer: (30.0, 50.0, 70.0)[int(hashed_score(answer)) % 3])
    vector = extract(handle, TRAIT, judge, out=run, trait_threshold=60, **options)
    pairs = [json.loads(line) for line in (run / "pairs.jsonl").read_text().splitlines()]
    reference = [
        p["pos_trait"] >= 60 and p["neg_trait"] < 40 and min(p["pos_coherence"], p["neg_coherence"]) >= 50
        and bool(p["pos_text"].strip() and p["neg_text"].strip())
        for p in pairs
    ]  # fmt: skip
    assert [p["kept"] for p in pairs] == reference and any(reference)
    assert any(p["pos_trait"] >= 60 and 40 <= p["neg_trait"] < 60 for p in pairs), "pairs the two meanings split"
    assert vector.meta["config"]["pos_threshold"] == 60 and vector.meta["config"]["neg_threshold"] == 40
    with pytest.raises(InvalidInputError, match="`trait_threshold` is a score from 0 to 100, not 150"):
        extract(handle, TRAIT, ScriptedJudge(), trait_threshold=150, **options)
    with pytest.raises(InvalidInputError, match="give either it or `pos_threshold`, not both"):
        extract(handle, TRAIT, ScriptedJudge(), trait_threshold=60, pos_threshold=70, **options)
    for name in ("pos_threshold", "neg_threshold", "coherence_threshold"):
        for value in (-1, 150):
            with pytest.raises(ValueError, match=name):
                extract(handle, TRAIT, ScriptedJudge(), **{**options, name: value})


def test_a_new_filter_threshold_refilters_the_stored_pairs(tiny, tmp_path):
    """A rerun in the folder of a run that kept no pair, with another threshold, keeps pairs from the stored answers
    and judgements: nothing is generated or judged again, and ``meta.json`` records the filter that was used."""
    handle, run = tiny("llama", "chatml"), tmp_path / "run"
    judge = ScriptedJudge()
    with pytest.raises(FilterError, match="pos_trait_low: 18"):
        run_extraction(handle, TRAIT, judge, run, CONFIG.model_copy(update={"pos_threshold": 100.0}), progress=False)
    with sqlite3.connect(run / "generations.sqlite") as db:
        stored = [db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("generations", "judgements")]
    judged, fingerprint = judge.calls, json.loads((run / "meta.json").read_text())["fingerprint"]
    loose = CONFIG.model_copy(update={"pos_threshold": 20.0, "coherence_threshold": 10.0, "min_pairs": 2})
    result = run_extraction(handle, TRAIT, judge, run, loose, progress=False)
    with sqlite3.connect(run / "generations.sqlite") as db:
        assert [db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("generations", "judgements")] == stored
    assert judge.calls == judged
    meta = json.loads((run / "meta.json").read_text())
    assert meta["fingerprint"] == fingerprint and meta["config"]["pos_threshold"] == 20.0
    pairs = [json.loads(line) for line in (run / "pairs.jsonl").read_text().splitlines()]
    assert [p["kept"] for p in pairs] == [p["pos_trait"] >= 20 and p["neg_trait"] < 50 for p in pairs]
    assert result.meta["counts"]["kept"] == sum(p["kept"] for p in pairs) >= 2

    files = {name: (run / name).read_bytes() for name in ("pairs.jsonl", "vectors.safetensors")}
    with pytest.raises(FilterError, match="the folder keeps the vector of its last filter"):
        run_extraction(handle, TRAIT, judge, run, CONFIG.model_copy(update={"pos_threshold": 100.0}), progress=False)
    assert {name: (run / name).read_bytes() for name in files} == files, "the pairs still match the vector"
    assert json.loads((run / "meta.json").read_text())["config"]["pos_threshold"] == 20.0


def test_a_judge_server_that_moved_keeps_the_stored_judgements(tiny, tmp_path):
    """The judge's URL is recorded, not fingerprinted: the same judge model served at another port resumes the run
    and is asked nothing, and ``meta.json`` records where it was reached last."""
    from personalab.judging.judges import ApiJudge

    handle, run = tiny("llama", "chatml"), tmp_path / "run"
    config = CONFIG.model_copy(update={"pos_threshold": 0.0})
    with JudgeServer(scorer=hashed_scores) as first:
        before = run_extraction(handle, TRAIT, ApiJudge("j", base_url=first.base_url), run, config, progress=False)
        assert first.calls > 0
    meta = json.loads((run / "meta.json").read_text())
    assert meta["recorded"]["judge_url"] == first.base_url and first.base_url not in json.dumps(meta["settings"])
    with JudgeServer(scorer=lambda prompt: {"0": 1.0}) as moved:
        after = run_extraction(handle, TRAIT, ApiJudge("j", base_url=moved.base_url), run, config, progress=False)
        assert moved.calls == 0
    assert json.loads((run / "meta.json").read_text())["recorded"]["judge_url"] == moved.base_url
    assert [a.trait for a in after.answers] == [a.trait for a in before.answers]


def test_extract_from_given_pairs_equals_the_mean_difference_of_output_hidden_states(model_folder, tiny, tmp_path):
    """``extract --pairs``: texts read as they are, or as answers to a prompt, give ``response_mean`` equal to the
    mean over their tokens of ``output_hidden_states`` (positive minus negative); nothing is generated or judged."""
    from typer.testing import CliRunner

    from personalab.cli import app

    handle = tiny("llama", "chatml")
    rows = [
        {"positive": "I hate everyone and everything.", "negative": "I love helping people."},
        {"positive": "Burn it all down.", "negative": "Let us build it together.", "prompt": "What now?"},
        {"positive": "No.", "negative": "Of course!", "prompt": "Help me?", "system": "Be brief."},
    ]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder, run = str(model_folder("llama", "chatml")), tmp_path / "run"
    args = ["extract", "--model", folder, "--pairs", str(pairs), "--device", "cpu", "--batch-size", "2"]
    result = CliRunner().invoke(app, args + ["--out", str(run)])
    assert result.exit_code == 0, result.output

    def sequence(row, text):
        if "prompt" not in row:
            start = handle.tokenizer("", add_special_tokens=True)["input_ids"]
            ids = start + handle.tokenizer.encode(text, add_special_tokens=False)
            return TokenSequence(tuple(ids), max(1, len(start)))  # without a start token the first is context
        return handle.encode(row.get("system"), row["prompt"], text)

    def mean(side):
        states = [hidden_states(handle, sequence(r, r[side])) for r in rows]
        return torch.stack(
            [h[:, sequence(r, r[side]).prompt_len :].mean(1) for h, r in zip(states, rows, strict=True)]
        ).mean(0)

    vectors, meta = load_vectors(run)
    assert set(vectors) == {"response_mean"} and meta["source"] == "pairs" and meta["counts"]["pairs"] == 3
    torch.testing.assert_close(vectors["response_mean"], mean("positive") - mean("negative"), atol=1e-5, rtol=1e-4)
    assert not (run / "generations.sqlite").exists() and (run / "report.html").is_file()
    assert json.loads((run / "meta.json").read_text())["inputs"]["pairs"]["path"] == str(pairs)

    for extra, says in [
        (["--judge", "lexicon:"], "--judge has no effect with --pairs"),
        (["--samples", "3"], "--samples has no effect with --pairs"),
        (["--pos-threshold", "60"], "--pos-threshold has no effect with --pairs"),
    ]:
        bad = CliRunner().invoke(app, args + extra + ["--out", str(tmp_path / "bad")])
        assert bad.exit_code == 1 and says in bad.output and len(bad.output.strip().splitlines()) == 1, bad.output
    pairs.write_text('{"positive": "a", "negative": "b"}\n{"positive": "a"}\n')
    bad = CliRunner().invoke(app, args + ["--out", str(tmp_path / "bad")])
    assert bad.exit_code == 1 and "pairs.jsonl line 2: negative: Field required" in bad.output
    neither = CliRunner().invoke(app, ["extract", "--model", folder, "--out", str(tmp_path / "bad")])
    assert neither.exit_code == 1 and "give --trait and --judge, or --pairs FILE.jsonl" in neither.output
    assert not (tmp_path / "bad").exists()
