"""Tracing a trait through a real series of trained checkpoints (tests/helpers/trained.py)."""

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import trained
from helpers.judge_server import JudgeServer
from helpers.reference import direct_residual_norm
from safetensors.torch import load_file
from typer.testing import CliRunner

from personalab.cli import app
from personalab.engine import loading as model_module
from personalab.errors import InvalidInputError
from personalab.studies.trace.geometry import consecutive_cosines, cosine_matrix, cosine_to_final, relative_norms
from personalab.studies.trace.series import SERIES, apertus_tokens, from_folders, from_revisions, olmo3_tokens


def test_olmo3_tokens_and_order_across_stages():
    assert olmo3_tokens("stage1-step3000") == 3000 * 4_194_304 == pytest.approx(12.58e9, rel=1e-3)
    stage1_end = 1_413_814 * 4_194_304
    assert olmo3_tokens("stage2-step47684") == stage1_end + 47_684 * 2_097_152
    assert olmo3_tokens("main") == olmo3_tokens("stage3-step11921") == pytest.approx(6.08e12, rel=1e-3)
    shuffled = [
        "main",
        "stage2-step47684",
        "stage1-step99000",
        "stage3-step11921",
        "stage1-step3000",
        "stage1-step1413814",
    ]
    ordered = [c.label for c in from_revisions("allenai/OLMo-3-1025-7B", shuffled, "olmo3")]
    assert ordered == ["stage1-step3000", "stage1-step99000", "stage1-step1413814", "stage2-step47684"] + [
        "main",
        "stage3-step11921",
    ]
    series = from_revisions(SERIES["olmo3"].model, SERIES["olmo3"].revisions, "olmo3")
    assert len(series) == 16 and all(a.tokens <= b.tokens for a, b in itertools.pairwise(series))
    assert apertus_tokens("step50000-tokens210B") == 210e9 and apertus_tokens("step2627139-tokens15T") == 15e12
    assert [c.label for c in from_revisions("m", ["step2-x", "step10-x", "step1-x"], tokens_per_step=4.0)] == [
        "step1-x",
        "step2-x",
        "step10-x",
    ]


def test_series_errors(tmp_path):
    for name in ("step-10", "step-9", "notes"):
        (tmp_path / name).mkdir()
    assert [c.label for c in from_folders(str(tmp_path / "step-*"))] == ["step-9", "step-10"]
    with pytest.raises(InvalidInputError, match="'notes'.*no step number"):
        from_folders(str(tmp_path / "*"))
    with pytest.raises(InvalidInputError, match="no checkpoint folders match"):
        from_folders(str(tmp_path / "none-*"))
    with pytest.raises(InvalidInputError, match="unknown series 'olmo4'"):
        from_revisions("m", ["main"], "olmo4")
    with pytest.raises(InvalidInputError, match="'custom-step5' has no training-token count"):
        from_revisions("m", ["main", "custom-step5"], "olmo3")


def test_geometry_against_direct_loops():
    rng = np.random.default_rng(0)
    stack = rng.normal(size=(5, 4, 16))
    residual = rng.uniform(1, 2, size=(5, 4))

    def cos(a, b):
        return float(a @ b / np.sqrt((a @ a) * (b @ b)))

    for c in range(5):
        for layer in range(4):
            assert cosine_to_final(stack)[c, layer] == pytest.approx(cos(stack[c, layer], stack[-1, layer]))
            if c:
                assert consecutive_cosines(stack)[c, layer] == pytest.approx(cos(stack[c, layer], stack[c - 1, layer]))
            assert relative_norms(stack, residual)[c, layer] == pytest.approx(
                np.sqrt(stack[c, layer] @ stack[c, layer]) / residual[c, layer]
            )
    assert np.isnan(consecutive_cosines(stack)[0]).all()
    matrix = cosine_matrix(stack[:, 2])
    assert matrix[1, 3] == pytest.approx(cos(stack[1, 2], stack[3, 2])) and np.allclose(np.diag(matrix), 1)


@pytest.fixture(scope="module")
def series(tmp_path_factory, planted_checkpoints):
    """Four checkpoints of the planted-persona model; step-60 is saved without tokenizer files."""
    root = tmp_path_factory.mktemp("trace")
    folders = {step: shutil.copytree(path, root / "ckpt" / path.name) for step, path in planted_checkpoints.items()}
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folders[60] / name).unlink(missing_ok=True)
    return root, folders, trained.trait_file(root / "planted.json")


def _command(folders, checkpoints, out, strategy, extra=()):
    pattern = ",".join(str(folders[s]) for s in checkpoints)
    args = ["trace", "--checkpoints", pattern, "--trait", "cruel", "--strategy", str(strategy), "--judge", "api:j"]
    args += ["--samples", "2", "--eval-samples", "3", "--max-new-tokens", "12", "--alpha", "0.3", "--layer", "1"]
    args += ["--controls", "--tokenizer", str(folders[300]), "--device", "cpu", "--out", str(out), *extra]
    return [sys.executable, "-m", "personalab", *args]


def _run(command, base_url, **kwargs):
    env = {**os.environ, "PERSONALAB_JUDGE_BASE_URL": base_url, "PERSONALAB_JUDGE_API_KEY": "none", **kwargs}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc) -> str:
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    return output


def _outputs(out):
    """Every result file of a run (figures and the store aside), by relative path; ``meta.json`` without the
    command line that made it (which names the run folder)."""
    files = {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.suffix in {".csv", ".md", ".json", ".safetensors"}
    }
    meta = json.loads(files.pop("meta.json"))
    assert meta.pop("command").startswith("personalab trace --checkpoints")
    return files | {"meta.json": meta}


@pytest.mark.slow
def test_trace_runs_resumes_and_extends(series, tmp_path):
    root, folders, strategy = series
    first = (0, 60, 300)
    with JudgeServer(scorer=trained.judge_scores) as server:
        straight = tmp_path / "straight"
        output = _finish(_run(_command(folders, first, straight, strategy), server.base_url))
        assert "step-0 cruel-planted: kept 0 of 32 pairs: not extractable" in output

        resumed = tmp_path / "resumed"
        proc = _run(_command(folders, first, resumed, strategy), server.base_url)
        deadline = time.monotonic() + 200
        while not (resumed / "checkpoints" / "step-60.json").is_file() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (resumed / "emergence.csv").exists()
        _finish(_run(_command(folders, first, resumed, strategy), server.base_url))
        assert _outputs(resumed) == _outputs(straight)

        before = {p.name: p.read_bytes() for p in (straight / "checkpoints").iterdir()}
        extended = _finish(_run(_command(folders, (0, 60, 150, 300), straight, strategy), server.base_url))
        assert "3 of 4 checkpoints already done" in extended and "[1/1] step-150" in extended
    after = {p.name: p.read_bytes() for p in (straight / "checkpoints").iterdir()}
    assert set(after) == set(before) | {"step-150.json"} and all(after[k] == v for k, v in before.items())

    status = pd.read_csv(straight / "cruel-planted" / "status.csv")
    assert status["revision"].tolist() == ["step-0", "step-60", "step-150", "step-300"]
    assert status["extractable"].tolist() == [False, True, True, True]
    table = pd.read_csv(straight / "emergence.csv")
    vectors = table[table["condition"] == "vector"]
    assert vectors["revision"].tolist() == ["step-0", "step-60", "step-150", "step-300"]
    assert not vectors.iloc[0]["extractable"] and vectors.iloc[1:]["p_raw"].notna().all()
    assert vectors.iloc[0][["delta_trait", "p_raw"]].isna().all()
    assert "| step-0 | - | not extractable |" in (straight / "emergence.md").read_text()
    assert set(table["condition"]) == {
        "vector",
        "random-0",
        "random-1",
        "random-2",
        "shuffled-0",
        "shuffled-1",
        "shuffled-2",
    }

    record = json.loads((straight / "checkpoints" / "step-300.json").read_text())["units"]["cruel-planted"]
    base = np.array(record["emergence"]["baseline"]["trait"], dtype=float)
    steered = np.array(record["emergence"]["vector"]["trait"], dtype=float)
    diffs = steered - base
    row = vectors[vectors["revision"] == "step-300"].iloc[0]
    assert row["delta_trait"] == pytest.approx(diffs.mean())
    signs = np.array(list(itertools.product((1, -1), repeat=len(diffs))))
    brute = np.mean(np.abs(signs @ diffs) >= abs(diffs.sum()) - 1e-9)
    assert row["p_raw"] == pytest.approx(brute) and row["p_bonferroni"] == pytest.approx(min(1, 3 * brute))
    nll = np.array(record["emergence"]["vector"]["nll"]) - np.array(record["emergence"]["baseline"]["nll"])
    assert row["delta_nll"] == pytest.approx(nll.mean())
    assert row["p_nll"] == pytest.approx(np.mean(np.abs(signs @ nll) >= abs(nll.sum()) - 1e-9))

    stack = np.stack(
        [
            load_file(straight / "cruel-planted" / "vectors" / f"step-{s}.safetensors")["response_mean"]
            .double()
            .numpy()
            for s in (60, 150, 300)
        ]
    )
    unit = stack / np.linalg.norm(stack, axis=-1, keepdims=True)
    direct = (unit * unit[-1]).sum(-1)
    written = pd.read_csv(straight / "cruel-planted" / "cos_to_final.csv")
    np.testing.assert_allclose(written[[f"layer_{i}" for i in range(3)]].to_numpy(), direct, atol=1e-12)
    mds = pd.read_csv(straight / "cruel-planted" / "mds.csv")
    assert mds["revision"].tolist() == ["step-60", "step-150", "step-300"]
    for name in (
        "emergence.png",
        "cruel-planted/trajectory.png",
        "cruel-planted/cos_matrix.png",
        "cruel-planted/mds.png",
    ):
        assert (straight / name).stat().st_size > 10_000


def _light(checkpoints, out, *extra):
    """A quick trace command (in-process): one sample per pair and question, eight tokens, no controls."""
    args = ["trace", "--checkpoints", ",".join(map(str, checkpoints)), "--judge", "api:j", "--samples", "1"]
    return (
        args
        + ["--eval-samples", "1", "--max-new-tokens", "8", "--layer", "1", "--device", "cpu", "--out", str(out)]
        + [*extra]
    )


def test_unloadable_checkpoints_are_skipped_and_missing_tokenizers_found_first(series, tmp_path, monkeypatch):
    root, folders, strategy = series
    broken = tmp_path / "ckpt" / "step-400"
    shutil.copytree(folders[300], broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)  # its config reads, its weights do not
    tokenizer = ["--tokenizer", str(folders[300]), "--trait", "cruel", "--strategy", str(strategy)]
    with JudgeServer(scorer=trained.judge_scores) as server:
        env = {"PERSONALAB_JUDGE_BASE_URL": server.base_url}
        result = CliRunner().invoke(app, _light([folders[150], broken], tmp_path / "run", *tokenizer), env=env)
        assert result.exit_code == 0, result.output
        skipped = [line for line in result.output.splitlines() if line.startswith("skipped step-400")]
        assert len(skipped) == 1 and "cannot load" in skipped[0] and "SafetensorError" in skipped[0]
        status = pd.read_csv(tmp_path / "run" / "cruel-planted" / "status.csv")
        assert status["revision"].tolist() == ["step-150"]

        loaded = []
        real = model_module.load_weights
        monkeypatch.setattr(model_module, "load_weights", lambda *a, **k: loaded.append(a) or real(*a, **k))
        own = ["--trait", "cruel", "--strategy", str(strategy)]  # no --tokenizer: step-60 has none of its own
        result = CliRunner().invoke(app, _light([folders[0], folders[60]], tmp_path / "none", *own), env=env)
    *_, error = result.output.strip().splitlines()
    assert result.exit_code == 1 and error.startswith("error:"), result.output
    assert f"{folders[60]} has no tokenizer files" in error and "--tokenizer" in error
    assert loaded == [] and not (tmp_path / "none").exists()


def test_a_trait_file_is_traced_inside_the_run_folder(series, tmp_path):
    root, folders, strategy = series
    trait_file = tmp_path / "traits" / "cheerful.json"
    trait_file.parent.mkdir()
    shutil.copy(strategy, trait_file)
    before = sorted(trait_file.parent.iterdir())
    with JudgeServer(scorer=trained.judge_scores) as server:
        env = {"PERSONALAB_JUDGE_BASE_URL": server.base_url}
        tokenizer = ["--tokenizer", str(folders[300])]
        for extra in (["--trait", str(trait_file), "--strategy", str(trait_file)], ["--trait", str(trait_file)]):
            out = tmp_path / f"run{len(extra)}"
            result = CliRunner().invoke(app, _light([folders[300]], out, *extra, *tokenizer), env=env)
            assert result.exit_code == 0, result.output
    assert sorted(trait_file.parent.iterdir()) == before
    units = json.loads((tmp_path / "run4" / "meta.json").read_text())["units"]
    assert [u["name"] for u in units] == ["cruel-planted-cheerful"]
    assert (tmp_path / "run4" / "cruel-planted-cheerful" / "status.csv").is_file()
    assert (tmp_path / "run2" / "cruel-planted-continuation" / "status.csv").is_file()


def _fake_hub(root, folders) -> str:
    """An offline Hugging Face cache holding ``local/planted`` at revisions step-60 and step-300."""
    repo = root / "hub" / "models--local--planted"
    for step in (60, 300):
        commit = f"{step:040d}"
        shutil.copytree(folders[step], repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / f"step-{step}").write_text(commit)
    return str(root / "hub")


@pytest.mark.slow
def test_hub_revisions_with_one_missing(series, tmp_path):
    root, folders, strategy = series
    cache = _fake_hub(tmp_path, folders)
    out = tmp_path / "hub-run"
    command = _command(folders, (300,), out, strategy)
    at = command.index("--checkpoints")
    command[at : at + 2] = ["--model", "local/planted", "--revisions", "step-300,step-999,step-60"]
    command += ["--tokens-per-step", "1000"]
    with JudgeServer(scorer=trained.judge_scores) as server:
        output = _finish(_run(command, server.base_url, HF_HUB_OFFLINE="1", HF_HUB_CACHE=cache))
    lines = [line for line in output.splitlines() if line.startswith("skipped step-999")]
    assert len(lines) == 1 and "local/planted" in lines[0]
    status = pd.read_csv(out / "cruel-planted" / "status.csv")
    assert status["revision"].tolist() == ["step-60", "step-300"] and status["tokens"].tolist() == [60_000, 300_000]


def test_mismatched_checkpoints_fail_before_any_work(series, tmp_path, model_folder):
    root, folders, strategy = series
    odd = tmp_path / "step-500"
    shutil.copytree(model_folder("llama", "none"), odd)
    with JudgeServer(scorer=trained.judge_scores) as server:
        args = _command(folders, (60, 300), tmp_path / "out", strategy)[3:]
        args[args.index("--checkpoints") + 1] += f",{odd}"
        result = CliRunner().invoke(app, args, env={"PERSONALAB_JUDGE_BASE_URL": server.base_url})
    assert result.exit_code == 1
    assert "differ in shape" in result.output and "step-500 (3 blocks x 32)" in result.output
    assert "step-300 (2 blocks x 64)" in result.output and not (tmp_path / "out").exists()
    assert torch.get_num_threads() >= 1


def test_combined_pools_answers_and_transfer_rescales_to_the_target(series, tmp_path):
    from personalab import load_model
    from personalab.hashes import vector_sha256
    from personalab.methods.extraction import ExtractionConfig, compute_vectors, filter_pairs, judged_answers
    from personalab.store import Store
    from personalab.studies.trace.run import BASE_SAMPLING, build_units

    root, folders, strategy = series
    other = json.loads(strategy.read_text()) | {"instructions": [{"pos": "Jordan is cruel.", "neg": "Jordan is nice."}]}
    (tmp_path / "second.json").write_text(json.dumps(other))
    out = tmp_path / "run"
    args = _command(folders, (60, 300), out, strategy)[3:]
    args[args.index("--strategy") + 2 : args.index("--strategy") + 2] = [
        "--strategy",
        str(tmp_path / "second.json"),
        "--strategy",
        "combined",
        "--target",
        str(folders[300]),
    ]
    with JudgeServer(scorer=trained.judge_scores) as server:
        result = CliRunner().invoke(app, args, env={"PERSONALAB_JUDGE_BASE_URL": server.base_url})
        assert result.exit_code == 0, result.output
        again = CliRunner().invoke(
            app, [*args[:-2], "--alpha", "0.4", *args[-2:]], env={"PERSONALAB_JUDGE_BASE_URL": server.base_url}
        )
    assert again.exit_code == 1 and "made with other settings (alpha: 0.3 -> 0.4)" in again.output

    units = {u.name: u for u in build_units(["cruel"], [str(strategy), str(tmp_path / "second.json"), "combined"])}
    assert [m.name for m in units["cruel-combined"].members] == ["cruel-planted", "cruel-planted"]
    handle = load_model(str(folders[300]), device="cpu", dtype="float32")
    handle.name = str(folders[300])
    config = ExtractionConfig(samples=2, sampling=BASE_SAMPLING.model_copy(update={"max_new_tokens": 12}), min_pairs=1)
    with JudgeServer(scorer=trained.judge_scores) as server:
        from personalab.judging.judges import ApiJudge

        judge = ApiJudge("j", base_url=server.base_url)
        store = Store(out / "generations.sqlite")
        kept = [
            pair
            for member in units["cruel-combined"].members
            for pair in filter_pairs(judged_answers(handle, member, judge, store, config, False), config).kept
        ]
    pooled = compute_vectors(handle, kept)["response_mean"]
    saved = load_file(out / "cruel-combined" / "vectors" / "step-300.safetensors")["response_mean"]
    torch.testing.assert_close(saved, pooled, atol=1e-5, rtol=1e-5)
    singles = [
        load_file(out / u / "vectors" / "step-300.safetensors")["response_mean"]
        for u in ("cruel-planted", "cruel-second")
    ]
    assert not torch.allclose(saved, (singles[0] + singles[1]) / 2, atol=1e-6)

    transfer = json.loads((out / "transfer.json").read_text())
    assert transfer["target"] == str(folders[300])
    norm = direct_residual_norm(load_model(str(folders[300]), device="cpu"), 1)  # the target's, on calibration
    assert transfer["units"]["cruel-combined"]["scale"] == "normalised"
    assert transfer["units"]["cruel-combined"]["added_norm"]["step-300"] == pytest.approx(0.3 * norm, rel=1e-4)
    expected = vector_sha256(saved[1] / saved[1].norm() * transfer["units"]["cruel-combined"]["added_norm"]["step-300"])
    with Store(out / "generations.sqlite").db as db:
        requests = [json.loads(r) for (r,) in db.execute("SELECT request FROM generations")]
    assert expected in {r.get("vector") for r in requests if r.get("trace") == "transfer cruel-combined"}
    table = pd.read_csv(out / "transfer.csv")
    assert set(table["unit"]) == {"cruel-planted", "cruel-second", "cruel-combined"}
    assert set(table["revision"]) <= {"step-60", "step-300"} and (out / "transfer_phases.csv").is_file()
    assert (out / "strategies.csv").is_file() and "early" in (out / "transfer.md").read_text()


def test_the_trait_defaults_to_the_one_the_strategy_files_name(tmp_path):
    from personalab.studies.trace.run import build_units

    strategy = trained.trait_file(tmp_path / "mine.json")
    (unit,) = build_units([], [str(strategy)])
    assert unit.trait == "cruel-planted" and unit.evaluation.name == "cruel-planted"
    assert {u.trait for u in build_units([], ["character"])} == {"evil"}
    assert {u.trait for u in build_units([], [str(strategy), "stories"])} == {"evil"}


def test_a_trait_of_a_persona_vectors_folder_is_traced_as_written(tmp_path):
    from personalab.studies.trace.run import build_units
    from personalab.traits import load_trait

    evil = load_trait("evil")
    for split, questions in (("extract", evil.extraction_questions), ("eval", evil.evaluation_questions)):
        folder = tmp_path / f"trait_data_{split}"
        folder.mkdir()
        pairs = [p.model_dump() for p in evil.instructions]
        data = {"instruction": pairs, "questions": questions, "eval_prompt": evil.rubric}
        (folder / "wicked.json").write_text(json.dumps(data))
    (unit,) = build_units(["wicked"], [], tmp_path)
    assert unit.name == "wicked-system_prompt" and unit.members[0].extraction_questions == evil.extraction_questions
    with pytest.raises(InvalidInputError, match="does not exist; point `trait_dir`"):
        build_units(["kind"], [], tmp_path)
