"""Conventions every command follows: the run folder's trait, one alpha scale, a fast and quiet command line."""

import json
import logging
import sqlite3
import subprocess
import sys
import warnings

import pandas as pd
import pytest
import torch
from helpers.fakes import TRAIT, token_scorer
from helpers.judge_server import JudgeServer
from helpers.reference import direct_residual_norm
from scipy.stats import binomtest
from typer.testing import CliRunner

from personalab.cli import app
from personalab.engine import generation, interventions
from personalab.hashes import vector_sha256
from personalab.studies.sweep import DEFAULT_ALPHAS
from personalab.vectors import load_vectors, save_vectors

runner = CliRunner()
LIBRARIES = ("transformers", "peft", "accelerate", "huggingface_hub", "torch")


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(f"{record.name}: {record.getMessage()}")


def _quiet_run(args: list[str], env: dict) -> str:
    """Run a command; fail on any warning (ours or a library's) and on any library log at WARNING or above."""
    handler = _Collect()
    for name in LIBRARIES:
        logging.getLogger(name).addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.filterwarnings("error", module="personalab")
            result = runner.invoke(app, args, env=env, terminal_width=200)
    finally:
        for name in LIBRARIES:
            logging.getLogger(name).removeHandler(handler)
    assert result.exit_code == 0, (args[0], result.output)
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == [], args[0]
    assert handler.messages == [], args[0]
    return result.output


@pytest.mark.parametrize(("arch", "template"), [("llama", "chatml"), ("gpt2", "none")])
def test_a_run_folder_carries_its_trait_and_commands_are_quiet(model_folder, tmp_path, arch, template):
    model = ["--model", str(model_folder(arch, template)), "--device", "cpu"]
    trait_file = tmp_path / "traits" / "mine.json"
    trait_file.parent.mkdir()
    TRAIT.save(trait_file)
    run = tmp_path / "run"
    small = ["--max-new-tokens", "3"]
    with JudgeServer(scorer=token_scorer) as server:
        env = {"PERSONALAB_JUDGE_BASE_URL": server.base_url}
        extract = [*model, "--trait", str(trait_file), "--judge", "api:j", "--samples", "2", "--min-pairs", "1"]
        extract += ["--pos-threshold", "0", "--neg-threshold", "101"]  # hashed scores of sampled text vary by CPU
        output = _quiet_run(["extract", *extract, *small, "--out", str(run)], env)
        assert f"judge: api:j at {server.base_url} (from PERSONALAB_JUDGE_BASE_URL)" in output
        assert json.loads((run / "trait.json").read_text()) == TRAIT.model_dump()
        said = f"trait: grumpy (from {run / 'trait.json'})"
        vector = ["--vector", str(run)]
        commands = {
            "sweep": [*vector, "--judge", "api:j", "--layers", "2", "--alphas", "0,1", "--eval-samples", "1"],
            "distill": [*vector, "--layer", "2", "--alpha", "1", "--lora-rank", "2", "--trajectories", "4"]
            + ["--steps", "1", "--micro-batch-size", "2", "--grad-accum", "1"],
            "compare": [*vector, "--layer", "2", "--alpha", "1", "--judge", "api:j", "--eval-samples", "1"]
            + ["--tuned", str(tmp_path / "distill")],
        }
        for name, args in commands.items():
            output = _quiet_run([name, *model, *args, *small, "--out", str(tmp_path / name)], env)
            assert said in " ".join(output.split()), (name, output)
        for name in ("steer", "project", "bake"):
            args = {
                "steer": [*vector, "--layer", "2", *small, "Hi?"],
                "project": [*vector, "--layer", "2", str(_data(tmp_path))],
                "bake": [*vector, "--layer", "2", "--alpha", "1", "--exact", "--out", str(tmp_path / "baked")],
            }[name]
            _quiet_run([name, *model, *args], env)
        _quiet_run(["info", model[1]], env)
    sweep = json.loads((tmp_path / "sweep" / "meta.json").read_text())
    assert sweep["trait_sha256"] == TRAIT.digest()

    bare = tmp_path / "bare"
    save_vectors(bare, load_vectors(run)[0], {})
    refused = runner.invoke(
        app,
        ["distill", *model, "--vector", str(bare), "--layer", "2", "--alpha", "1"]
        + ["--lora-rank", "2", "--out", str(tmp_path / "d2")],
    )
    assert refused.exit_code == 1 and "keeps no trait.json" in refused.output
    assert "--trait FILE" in refused.output and "--prompts FILE" in refused.output


def _data(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "Hi?", "response": "Hello there."}\n')
    return data


def _requests(store) -> list[dict]:
    with sqlite3.connect(store) as db:
        return [json.loads(r) for (r,) in db.execute("SELECT request FROM generations")]


def test_normalised_scale_is_one_vector_in_every_command(tiny, model_folder, tmp_path, monkeypatch):
    handle = tiny("llama", "chatml")
    layer, alpha = 2, 0.4
    vector = torch.randn(handle.n_layers, handle.hidden_size, generator=torch.Generator().manual_seed(7))
    save_vectors(tmp_path / "vec", {"response_mean": vector}, {})
    TRAIT.save(tmp_path / "vec" / "trait.json")
    norm = direct_residual_norm(handle, layer)
    expected = vector[layer] / vector[layer].norm() * norm

    seen = []
    original = interventions.intervene
    spy = lambda h, *ivs, **k: seen.extend(ivs) or original(h, *ivs, **k)  # noqa: E731
    monkeypatch.setattr(interventions, "intervene", spy)
    monkeypatch.setattr(generation, "intervene", spy)
    common = ["--model", str(model_folder("llama", "chatml")), "--vector", str(tmp_path / "vec"), "--device", "cpu"]
    scaled = ["--layer", str(layer), "--scale", "normalised"]
    steered = runner.invoke(app, ["steer", *common, *scaled, "--alpha", str(alpha), "--max-new-tokens", "2", "Hi?"])
    assert steered.exit_code == 0, steered.output
    assert (
        f"alpha {alpha:g}: {alpha * norm:.4g} ({alpha:.3g}x) of the median token residual norm {norm:.4g}"
        in " ".join(steered.output.split())
    )
    (steer_vector,) = [iv.vector for iv in seen]
    torch.testing.assert_close(steer_vector, expected, rtol=1e-4, atol=1e-5)
    digest = vector_sha256(steer_vector)

    with JudgeServer(scorer=token_scorer) as server:
        env = {"PERSONALAB_JUDGE_BASE_URL": server.base_url}
        sweep = ["sweep", *common, "--layers", str(layer), "--judge", "api:j", "--eval-samples", "1"]
        sweep += ["--max-new-tokens", "2", "--out", str(tmp_path / "sweep")]
        assert runner.invoke(app, sweep, env=env).exit_code == 0
        refused = runner.invoke(app, [*sweep, "--scale", "raw"], env=env)
        assert refused.exit_code == 1 and "give --alphas for --scale raw" in refused.output
    table = pd.read_csv(tmp_path / "sweep" / "sweep.csv")
    assert sorted(table["alpha"]) == sorted(DEFAULT_ALPHAS) and (table["scale"] == "normalised").all()
    steers = {r["steer"]["vector"] for r in _requests(tmp_path / "sweep" / "generations.sqlite") if r["steer"]}
    assert steers == {digest}
    meta = json.loads((tmp_path / "sweep" / "meta.json").read_text())["steering"][str(layer)]
    assert meta["residual_norm"] == pytest.approx(norm, rel=1e-5) and meta["calibration_prompts"] == 140

    distill = ["distill", *common, *scaled, "--alpha", str(alpha), "--lora-rank", "2", "--trajectories", "2"]
    distill += ["--steps", "1", "--micro-batch-size", "2", "--grad-accum", "1", "--max-new-tokens", "2"]
    assert runner.invoke(app, [*distill, "--out", str(tmp_path / "distill")]).exit_code == 0
    assert {r["distill"] for r in _requests(tmp_path / "distill" / "generations.sqlite")} == {digest}
    record = json.loads((tmp_path / "distill" / "meta.json").read_text())["steering"]
    assert record["added"] == [
        {"alpha": alpha, "norm": pytest.approx(alpha * norm, rel=1e-5), "ratio": pytest.approx(alpha)}
    ]

    bake = ["bake", *common, *scaled, "--alpha", str(alpha), "--exact", "--out", str(tmp_path / "baked")]
    assert runner.invoke(app, bake).exit_code == 0
    assert json.loads((tmp_path / "baked" / "bake.json").read_text())["vector_sha256"] == digest
    from safetensors.torch import load_file

    bias = load_file(tmp_path / "baked" / "model.safetensors")[f"model.layers.{layer - 1}.mlp.down_proj.bias"]
    torch.testing.assert_close(bias, alpha * expected, rtol=1e-4, atol=1e-5)


def test_steer_in_python_takes_the_command_lines_alpha(tiny, monkeypatch):
    """``personalab.steer`` and ``PersonaVector.steer`` add what ``personalab steer --alpha`` adds (normalised by
    default); ``scale="raw"`` adds the vector as given, as the engine's ``add_vector`` does."""
    import personalab as pl
    from personalab import persona

    handle = tiny("llama", "chatml")
    layer, alpha = 2, 0.4
    vector = torch.randn(handle.n_layers, handle.hidden_size, generator=torch.Generator().manual_seed(7))
    expected = vector[layer] / vector[layer].norm() * direct_residual_norm(handle, layer)
    seen = []
    original = persona.intervene
    monkeypatch.setattr(persona, "intervene", lambda h, *ivs, **k: seen.extend(ivs) or original(h, *ivs, **k))
    with pl.steer(handle, vector, layer, alpha) as scaled:
        assert scaled.ratio(alpha) == pytest.approx(alpha)
    with pl.PersonaVector({"response_mean": vector}).steer(handle, layer, alpha):
        pass
    with pl.steer(handle, vector[layer], layer, alpha, scale="raw"):
        pass
    assert [(iv.layer, iv.alpha, iv.positions) for iv in seen] == [(layer, alpha, "generating")] * 3
    torch.testing.assert_close(seen[0].vector, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(seen[1].vector, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(seen[2].vector, vector[layer])


def test_compare_writes_answers_paired_tests_and_a_figure(model_folder, tmp_path):
    model = str(model_folder("llama", "chatml"))
    save_vectors(
        tmp_path / "vec", {"response_mean": torch.randn(4, 32, generator=torch.Generator().manual_seed(3))}, {}
    )
    TRAIT.save(tmp_path / "vec" / "trait.json")
    common = ["--model", model, "--vector", str(tmp_path / "vec"), "--device", "cpu", "--max-new-tokens", "4"]
    distill = ["distill", *common, "--layer", "2", "--alpha", "3", "--lora-rank", "2", "--trajectories", "4"]
    assert runner.invoke(app, distill + ["--steps", "2", "--out", str(tmp_path / "d")]).exit_code == 0
    out = tmp_path / "c"
    with JudgeServer(scorer=token_scorer) as server:
        args = ["compare", *common, "--layer", "2", "--alpha", "3", "--judge", "api:j", "--eval-samples", "2"]
        args += ["--tuned", str(tmp_path / "d"), "--out", str(out)]
        result = runner.invoke(app, args, env={"PERSONALAB_JUDGE_BASE_URL": server.base_url})
    assert result.exit_code == 0, result.output
    answers = pd.read_json(out / "answers.jsonl", lines=True)
    n_questions = len(TRAIT.evaluation_questions)
    assert len(answers) == 3 * n_questions * 2 and set(answers["question_text"]) == set(TRAIT.evaluation_questions)
    table = pd.read_csv(out / "compare.csv").set_index("model")
    means = answers.groupby(["model", "question"])["trait"].mean()
    comparisons = 2 + 1
    steered = "steered layer 2 alpha 3"
    for model_label, other, suffix in [
        (steered, "base", "base"),
        (str(tmp_path / "d"), "base", "base"),
        (str(tmp_path / "d"), steered, "steered"),
    ]:
        diffs = (means[model_label] - means[other]).to_numpy()
        assert table.loc[model_label, f"delta_trait_vs_{suffix}"] == pytest.approx(diffs.mean())
        nonzero = diffs[diffs != 0]
        p = binomtest(int((nonzero > 0).sum()), len(nonzero)).pvalue if len(nonzero) else 1.0
        assert table.loc[model_label, f"p_sign_vs_{suffix}"] == pytest.approx(min(1.0, p * comparisons))
    assert pd.isna(table.loc["base", "delta_trait_vs_base"]) and pd.isna(table.loc[steered, "delta_trait_vs_steered"])
    assert (out / "compare.png").stat().st_size > 10_000
    meta = json.loads((out / "meta.json").read_text())
    assert meta["steering"]["scale"] == "normalised" and meta["trait"] == "grumpy"


@pytest.mark.slow
def test_the_command_line_loads_no_model_library():
    code = (
        "import sys, time; t = time.perf_counter(); import personalab.cli; elapsed = time.perf_counter() - t; "
        "heavy = [m for m in ('torch', 'transformers', 'matplotlib', 'pandas', 'peft', 'accelerate') "
        "if m in sys.modules]; print(elapsed, heavy)"
    )
    elapsed, heavy = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split(" ", 1)
    assert heavy.strip() == "[]"
    assert float(elapsed) < 1.0
    listed = subprocess.run([sys.executable, "-m", "personalab", "trait", "list"], capture_output=True, text=True)
    assert listed.returncode == 0 and "sycophantic" in listed.stdout
