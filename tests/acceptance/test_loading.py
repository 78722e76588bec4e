"""Checkpoint folders without a tokenizer, missing folders, and ``--tokenizer`` on every model command."""

import shutil

import pytest
import torch
from helpers.fakes import token_scorer
from helpers.judge_server import JudgeServer
from helpers.reference import logits
from typer.testing import CliRunner

from personalab import load_model
from personalab.cli import app
from personalab.engine import loading as model_module
from personalab.engine.loading import TOKENIZER_FILES, MissingTokenizerError, local_folder
from personalab.errors import InvalidInputError
from personalab.vectors import load_vectors, save_vectors

runner = CliRunner()


@pytest.fixture(scope="module")
def bare(model_folder, tmp_path_factory):
    """The tiny chat Llama's weights and config, without its tokenizer files: ``(bare, original)``."""
    original = model_folder("llama", "chatml")
    folder = tmp_path_factory.mktemp("checkpoint") / "step-100"
    folder.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(original / name, folder / name)
    assert not any((folder / name).exists() for name in TOKENIZER_FILES)
    return folder, original


def test_a_folder_without_tokenizer_names_the_option(bare, monkeypatch):
    folder, original = bare
    loaded = []
    monkeypatch.setattr(model_module, "load_weights", lambda *a, **k: loaded.append(a))
    with pytest.raises(MissingTokenizerError) as err:
        load_model(str(folder), device="cpu")
    message = str(err.value)
    assert "\n" not in message and "has no tokenizer files" in message and "`tokenizer`" in message
    assert loaded == [], "the weights must not load before the tokenizer is found"


def test_tokenizer_from_elsewhere_gives_the_original_model(bare, tiny):
    folder, original = bare
    handle = load_model(str(folder), device="cpu", dtype="float32", tokenizer=str(original))
    reference = tiny("llama", "chatml")
    seq = handle.encode("You are kind.", "How do I bake bread?", "Mix flour.")
    assert seq == reference.encode("You are kind.", "How do I bake bread?", "Mix flour.")
    ids = torch.tensor([seq.ids])
    torch.testing.assert_close(logits(handle, ids), logits(reference, ids), atol=0, rtol=0)
    assert handle.chat.has_template and handle.name == str(folder)


def test_info_describes_a_checkpoint_without_tokenizer(bare):
    folder, original = bare
    result = runner.invoke(app, ["info", str(folder), "--device", "cpu"], terminal_width=300)
    assert result.exit_code == 0, result.output
    assert "LlamaForCausalLM" in result.output and "3 (at model.layers)" in result.output
    assert "32" in result.output and "float32" in result.output
    assert "none found" in result.output and "--tokenizer" in result.output
    with_tokenizer = runner.invoke(app, ["info", str(folder), "--tokenizer", str(original), "--device", "cpu"])
    assert with_tokenizer.exit_code == 0 and "none found" not in with_tokenizer.output
    assert "chat template" in with_tokenizer.output


def test_paths_that_do_not_exist_are_no_such_folder(tmp_path, bare):
    for name in (str(tmp_path / "missing"), "./missing-model", "runs/a/model", "~/no/such/model/"):
        with pytest.raises(InvalidInputError, match="no such folder"):
            local_folder(name)
    assert local_folder("org/model") is None and local_folder("gpt2") is None
    with pytest.raises(InvalidInputError, match="is a file"):
        local_folder(str(bare[0] / "config.json"))
    result = runner.invoke(app, ["info", str(tmp_path / "missing"), "--device", "cpu"])
    assert result.exit_code == 1 and result.output.startswith("error: no such folder")
    assert len(result.output.strip().splitlines()) == 1 and "Repo id" not in result.output


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_every_model_command_runs_on_the_checkpoint_with_tokenizer(bare, tmp_path, restore_threads):
    folder, original = bare
    vec = tmp_path / "vec"
    save_vectors(vec, {"response_mean": torch.randn(4, 32, generator=torch.Generator().manual_seed(1))}, {})
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "Hi?", "response": "Hello there."}\n')
    m, v, cpu = ["--model", str(folder)], ["--vector", str(vec)], ["--device", "cpu"]
    commands = {
        "steer": ["steer", *m, *v, "--layer", "2", "--max-new-tokens", "3", *cpu, "Hi?"],
        "project": ["project", *v, *m, "--layer", "2", *cpu, str(data)],
        "bake": ["bake", *m, *v, "--layer", "2", "--alpha", "2", "--exact", "--out", str(tmp_path / "baked"), *cpu],
        "extract": ["extract", *m, "--trait", "evil", "--judge", "api:j", "--samples", "1", "--max-new-tokens", "3"]
        + ["--min-pairs", "1", "--out", str(tmp_path / "ext"), *cpu],
        "sweep": ["sweep", *m, *v, "--trait", "evil", "--judge", "api:j", "--layers", "2", "--alphas", "0,1"]
        + ["--eval-samples", "1", "--max-new-tokens", "3", "--out", str(tmp_path / "sweep"), *cpu],
        "distill": ["distill", *m, *v, "--layer", "2", "--alpha", "2", "--lora-rank", "2", "--trait", "evil"]
        + [
            "--trajectories",
            "4",
            "--steps",
            "1",
            "--micro-batch-size",
            "2",
            "--grad-accum",
            "1",
            "--max-new-tokens",
            "3",
        ]
        + ["--out", str(tmp_path / "dist"), *cpu],
        "compare": ["compare", *m, *v, "--layer", "2", "--alpha", "2", "--trait", "evil", "--judge", "api:j"]
        + ["--eval-samples", "1", "--max-new-tokens", "3", "--tuned", str(tmp_path / "dist"), *cpu]
        + ["--out", str(tmp_path / "cmp")],
    }
    with JudgeServer(scorer=token_scorer) as server:
        env = {"PERSONALAB_JUDGE_BASE_URL": server.base_url}
        for name, args in commands.items():
            refused = runner.invoke(app, args, env=env)
            assert refused.exit_code == 1 and "--tokenizer" in refused.output, (name, refused.output)
            result = runner.invoke(app, args + ["--tokenizer", str(original), "--threads", "1"], env=env)
            assert result.exit_code == 0, (name, result.output)
    assert torch.get_num_threads() == 1
    assert (tmp_path / "baked" / "tokenizer.json").is_file() and (tmp_path / "cmp" / "compare.csv").is_file()
    assert load_vectors(tmp_path / "ext")[1]["model"] == str(folder)
