import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.fakes import FakeClient
from helpers.judge_server import JudgeServer
from helpers.reference import hidden_states
from typer.testing import CliRunner

from personalab.cli import app
from personalab.engine import generation
from personalab.engine.generation import SamplingParams, sample_texts
from personalab.engine.interventions import add_vector
from personalab.errors import InvalidInputError
from personalab.judging import judges
from personalab.traits import load_trait
from personalab.vectors import save_vectors

runner = CliRunner()


def test_info_describes_the_model(model_folder):
    result = runner.invoke(app, ["info", str(model_folder("gemma2", "gemma")), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Gemma2ForCausalLM" in out
    assert "3 (at model.layers)" in out
    assert "4 (0 = embeddings" in out
    assert "32" in out and "float32" in out
    assert "no (folded into the first user turn)" in out


def test_info_on_a_base_model_reports_the_plain_format(model_folder):
    result = runner.invoke(app, ["info", str(model_folder("gpt2", "none")), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "GPT2LMHeadModel" in result.output and "transformer.h" in result.output
    assert "plain instruction + question format" in result.output


def test_info_errors_are_one_line(tmp_path, model_folder):
    result = runner.invoke(app, ["info", str(tmp_path / "missing"), "--device", "cpu"])
    assert result.exit_code == 1
    assert result.output.strip().startswith("error:") and "missing" in result.output
    result = runner.invoke(app, ["info", str(model_folder("llama")), "--device", "cpu", "--dtype", "float16"])
    assert result.exit_code == 1 and "float16 is not supported on CPU" in result.output
    folder = str(model_folder("llama"))
    as_argument = runner.invoke(app, ["info", folder, "--device", "cpu"])
    as_option = runner.invoke(app, ["info", "--model", folder, "--device", "cpu"])
    assert as_argument.exit_code == as_option.exit_code == 0 and as_option.output == as_argument.output
    both = runner.invoke(app, ["info", folder, "--model", folder])
    assert both.exit_code == 1 and "give the model once" in both.output


def test_trait_list_and_show():
    from personalab.traits import builtin_strategies

    listed = runner.invoke(app, ["trait", "list"], terminal_width=300)
    assert listed.exit_code == 0 and "sycophantic" in listed.output and "hallucinating" in listed.output
    strategies = builtin_strategies()
    assert len(strategies) >= 12 and all(name in listed.output for name in strategies)
    shown = runner.invoke(app, ["trait", "show", "evil"])
    assert shown.exit_code == 0
    assert json.loads(shown.output) == load_trait("evil").model_dump()


def test_trait_new_writes_only_a_valid_trait(tmp_path, monkeypatch):
    valid = load_trait("evil").model_dump() | {"name": "curious"}
    replies = ["{broken", json.dumps(valid)]
    monkeypatch.setattr(judges, "openai_client", lambda *a: FakeClient(replies))
    target = tmp_path / "curious.json"
    args = ["trait", "new", "curious", "--description", "Asks questions.", "--generator", "w", "--out", str(target)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert load_trait(str(target)).name == "curious"

    target.unlink()
    monkeypatch.setattr(judges, "openai_client", lambda *a: FakeClient(["{broken"] * 2))
    result = runner.invoke(app, args + ["--attempts", "2"])
    assert result.exit_code == 1 and "no valid trait in 2 attempts" in result.output
    assert not target.exists()


def test_extract_rejects_bad_input_before_any_work(model_folder, tmp_path):
    base = ["extract", "--model", str(model_folder("llama")), "--device", "cpu", "--out", str(tmp_path / "run")]
    cases = [
        (["--trait", "evil", "--judge", "oracle"], "unknown judge 'oracle'"),
        (["--trait", "nosuch", "--judge", "api:x"], "unknown trait 'nosuch'"),
        (
            ["--trait", "evil", "--judge", "api:x", "--samples", "0"],
            "invalid --samples: Input should be greater than or equal to 1",
        ),
        (["--trait", "evil", "--judge", "api:x", "--top-p", "2"], "invalid --top-p"),
        (["--trait", "evil", "--judge", "api:x", "--engine", "tgi"], "unknown --engine 'tgi'; use hf or vllm"),
        (["--trait", "evil", "--judge", "api:x", "--tensor-parallel-size", "2"], "add --engine vllm"),
        (
            ["--trait", "evil", "--judge", "api:x", "--trait-threshold", "60", "--pos-threshold", "70"],
            "--trait-threshold sets both trait cut-offs; give either it or --pos-threshold, not both",
        ),
        (["--trait", "evil", "--judge", "api:x", "--pos-threshold", "150"], "invalid --pos-threshold"),
        (["--trait", "evil", "--judge", "api:x", "--coherence-threshold", "-5"], "invalid --coherence-threshold"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--trait", "evil", "--judge", "api:x", "--device", "cuda"], "--device cuda is not on this"))
    try:
        import vllm  # noqa: F401
    except ImportError:
        cases.append((["--trait", "evil", "--judge", "api:x", "--engine", "vllm"], "pip install 'personalab[vllm]'"))
    for extra, message in cases:
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 1 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def _vector_folder(tmp_path, handle):
    folder = tmp_path / "vec"
    vectors = {
        "response_mean": torch.randn(handle.n_layers, handle.hidden_size, generator=torch.Generator().manual_seed(0))
    }
    save_vectors(folder, vectors, {})
    return folder, vectors["response_mean"]


def test_steer_prints_both_answers(tiny, model_folder, tmp_path, monkeypatch):
    handle = tiny("llama", "chatml")
    folder, vector = _vector_folder(tmp_path, handle)
    produced, real = [], generation.sample
    monkeypatch.setattr(generation, "sample", lambda *a: produced.append(real(*a)) or produced[-1])
    args = ["steer", "--model", str(model_folder("llama", "chatml")), "--vector", str(folder), "--layer", "2"]
    args += ["--alpha", "6", "--scale", "raw", "--max-new-tokens", "4", "--device", "cpu"]
    result = runner.invoke(app, args + ["Hi?"], terminal_width=400)
    assert result.exit_code == 0, result.output
    assert (
        "unsteered" in result.output
        and "steered at layer 2, generating positions, alpha 6 (raw scale)" in result.output
    )
    texts = [answers[0].text for answers in produced]
    seq = handle.encode(None, "Hi?")
    params = SamplingParams(temperature=0, max_new_tokens=4)
    with add_vector(handle, vector, 2, alpha=6.0, positions="generating"):
        steered = sample_texts(handle, [seq], params, 0)
    assert texts == [sample_texts(handle, [seq], params, 0)[0], steered[0]] and texts[1] != texts[0]

    plain = [a for a in args if a not in ("--alpha", "6")]
    chat = runner.invoke(app, plain + ["--chat", "--ablate"], input="Hi?\nWhat is bread?\n", terminal_width=400)
    assert chat.exit_code == 0 and chat.output.count("ablated") == 2
    ignored = runner.invoke(app, args + ["--ablate", "Hi?"])
    assert ignored.exit_code == 1 and "--ablate and --clamp add nothing: drop --alpha" in ignored.output

    clamped = runner.invoke(app, plain + ["--clamp", "3", "Hi?"], terminal_width=400)
    assert clamped.exit_code == 0, clamped.output
    from personalab.traits import library_questions

    unit = vector[2] / vector[2].norm()
    values = torch.cat([hidden_states(handle, handle.encode(None, q))[2] for q in library_questions()]) @ unit
    expected = f"the projection onto the unit direction is {values.mean():.4g} +- {values.std():.4g}"
    assert expected in " ".join(clamped.output.split()) and "clamped to 3" in clamped.output
    bad = runner.invoke(app, args[:-2] + ["--layer", "7", "Hi?"])
    assert bad.exit_code == 1 and "layer 7 is out of range" in bad.output


@pytest.mark.parametrize("template,fmt,text", [
    ("chatml", "continuation", "Be kind. Once upon a time"),
    ("chatml", "plain", "Be kind.\n\nQuestion: Once upon a time\nAnswer:"),
    ("none", "continuation", "Be kind. Once upon a time"),
])  # fmt: skip
def test_steer_writes_the_prompt_in_the_chosen_format(tiny, model_folder, tmp_path, monkeypatch, template, fmt, text):
    handle = tiny("llama", template)
    folder, _ = _vector_folder(tmp_path, handle)
    given = []
    real = generation.sample
    monkeypatch.setattr(generation, "sample", lambda h, seqs, *a: given.append(seqs[0]) or real(h, seqs, *a))
    args = ["steer", "--model", str(model_folder("llama", template)), "--vector", str(folder), "--layer", "2"]
    args += ["--max-new-tokens", "2", "--device", "cpu", "--system", "Be kind.", "--format", fmt, "Once upon a time"]
    result = runner.invoke(app, args, terminal_width=400)
    assert result.exit_code == 0, result.output
    expected = tuple(handle.tokenizer(text)["input_ids"])
    assert [s.ids for s in given] == [expected, expected]
    assert f"prompt format: {fmt} text" in result.output
    if template == "none":
        refused = runner.invoke(app, args[:-3] + ["--format", "chat", "Hi?"])
        assert refused.exit_code == 1 and "no chat template: use --format plain or continuation" in refused.output
        default = runner.invoke(app, args[:-3] + ["Hi?"], terminal_width=400)
        assert "prompt format: plain text" in default.output
    bad = runner.invoke(app, args[:-3] + ["--format", "story", "Hi?"])
    assert bad.exit_code == 1 and "--format must be one of chat, plain, continuation" in bad.output


def test_sweep_command_writes_its_tables(model_folder, tiny, tmp_path):
    handle = tiny("gpt2", "none")
    folder, _ = _vector_folder(tmp_path, handle)
    out = tmp_path / "sweep"
    with JudgeServer(scorer=lambda prompt: {"70": 1.0}) as server:
        args = ["sweep", "--model", str(model_folder("gpt2", "none")), "--vector", str(folder), "--trait", "evil"]
        args += [
            "--judge",
            "api:j",
            "--layers",
            "1,3",
            "--alphas",
            "0,2",
            "--eval-samples",
            "1",
            "--max-new-tokens",
            "3",
        ]
        args += ["--out", str(out), "--device", "cpu"]
        result = runner.invoke(app, args, env={"PERSONALAB_JUDGE_BASE_URL": server.base_url})
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "sweep.csv")
    assert len(table) == 4 and (table["trait_mean"] == 70).all() and (table["n"] == 20).all()
    assert (out / "heatmap_trait.png").is_file() and "| 3 | 2 | 70.0 +- 0.0 |" in result.output


def test_project_command_modes(tiny, model_folder, tmp_path, monkeypatch):
    handle = tiny("llama", "chatml")
    folder, vector = _vector_folder(tmp_path, handle)
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": "Hi?", "response": "Hello there."}, {"messages": [{"role": "user", "content": "Bread?"}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = str(model_folder("llama", "chatml"))
    base = ["project", "--vector", str(folder), "--model", model, "--layer", "2", "--device", "cpu", str(data)]
    result = runner.invoke(app, base)
    assert result.exit_code == 0, result.output
    written = [json.loads(line) for line in (tmp_path / "data.projections.jsonl").read_text().splitlines()]
    assert [w["prompt"] if "prompt" in w else w["messages"][0]["content"] for w in written] == ["Hi?", "Bread?"]
    seq = handle.encode(None, "Hi?", "Hello there.")
    unit = vector[2] / vector[2].norm()
    expected = hidden_states(handle, seq)[2, seq.prompt_len :].mean(0) @ unit
    assert written[0]["projection"]["response_mean"] == pytest.approx(expected.item(), abs=1e-5)
    assert written[1]["projection"]["response_mean"] is None

    shifted = runner.invoke(app, base + ["--shift", "--top-k", "1"])
    assert shifted.exit_code == 0, shifted.output
    assert (tmp_path / "data.shift.png").is_file() and len((tmp_path / "data.top1.jsonl").read_text().splitlines()) == 1

    def lines(path):
        return [json.loads(line) for line in path.read_text().splitlines()]

    into = tmp_path / "proj"
    for extra, name in ((["--shift", "--top-k", "1"], "shift"), ([], "projections")):
        run = runner.invoke(app, base + extra + ["--out", str(into / name)])
        assert run.exit_code == 0, run.output
        assert lines(into / name / f"{name}.jsonl") == lines(tmp_path / f"data.{name}.jsonl")
        assert (into / name / "report.html").is_file() and (into / name / "summary.md").is_file()
    shifts = {r["index"]: r["shift"] for r in lines(tmp_path / "data.shift.jsonl")}
    table = pd.read_csv(into / "shift" / "project.csv")
    assert table["shift"].tolist() == pytest.approx([shifts[i] for i in table["index"]])
    assert (into / "shift" / "top1.jsonl").is_file() and (into / "shift" / "generations.sqlite").is_file()
    again = runner.invoke(app, [a if a != "2" else "3" for a in base] + ["--out", str(into / "projections")])
    assert again.exit_code == 1 and "config" not in again.output and "layer: 2 -> 3" in again.output

    out = tmp_path / "shift"
    diff = runner.invoke(
        app,
        ["project", "--vector", str(folder), "--model", model, "--tuned", model, "--trait", "evil", "--out", str(out)],
    )
    assert diff.exit_code == 0, diff.output
    assert pd.read_csv(out / "project.csv")["shift"].abs().max() == 0.0 and (out / "model_shift.png").is_file()
    assert (out / "report.html").is_file() and json.loads((out / "meta.json").read_text())["kind"] == "project"
    monkeypatch.chdir(tmp_path)
    on_data = runner.invoke(app, ["project", "--vector", str(folder), "--model", model, "--tuned", model, str(data)])
    assert on_data.exit_code == 0, on_data.output
    table = pd.read_csv(tmp_path / "runs" / f"project-data-{Path(model).name}" / "project.csv")
    assert len(table) == handle.n_layers and table["shift"].abs().max() == 0.0
    bad = runner.invoke(app, ["project", "--vector", str(folder), "--model", model, str(data)])
    assert bad.exit_code == 1 and "pass a JSONL data file and --layer" in bad.output


@pytest.mark.parametrize(
    ("command", "option"),
    [
        (["sweep", "--judge", "api:m", "--vector", "v", "--layers", "2.7"], "--layers"),
        (["localize", "--out", "o", "--persona", "p", "--layers", "1,2.5"], "--layers"),
        (["compose", "--out", "o", "--layers", "x"], "--layers"),
    ],
)
def test_layer_lists_take_whole_numbers_only(model_folder, monkeypatch, command, option):
    from personalab.engine import loading as model_module

    monkeypatch.setattr(model_module, "load_weights", lambda *a, **k: pytest.fail("the model was loaded"))
    result = runner.invoke(app, [*command, "--model", str(model_folder("llama"))])
    assert result.exit_code == 1, result.output
    assert f"{option} takes comma-separated whole numbers" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_no_network_fails_in_seconds_in_one_line(monkeypatch):
    import time

    from huggingface_hub import constants

    from personalab.engine import loading as model_module

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    model_module.hub_reachable.cache_clear()
    try:
        start = time.monotonic()
        assert model_module.hub_reachable() is False
        result = runner.invoke(app, ["info", "personalab-test/no-such-model", "--device", "cpu"])
        assert time.monotonic() - start < 15
    finally:
        model_module.hub_reachable.cache_clear()
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "cannot reach the Hugging Face hub (http://127.0.0.1:9)" in result.output
    assert "give a local folder" in result.output and "--tokenizer" not in result.output


def test_trait_writer_that_cannot_be_reached_is_one_line_with_its_url():
    args = ["trait", "new", "curious", "--description", "Asks.", "--generator", "m"]
    result = runner.invoke(app, args + ["--base-url", "http://127.0.0.1:9/v1", "--api-key", "x"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "http://127.0.0.1:9/v1" in result.output and "APIConnectionError" in result.output


def test_broken_files_and_an_unwritable_out_are_one_line_naming_the_fix(model_folder, tiny, tmp_path):
    """Corrupt or foreign vector files, a corrupt store and an ``--out`` that cannot be written each end in one line
    (exit status 1) that names the fix, and nothing is created."""
    handle = tiny("llama", "chatml")
    folder, _ = _vector_folder(tmp_path, handle)
    safetensors = (folder / "vectors.safetensors").read_bytes()
    broken = {
        "garbage.safetensors": b"this is not a tensor file at all",
        "truncated.safetensors": safetensors[: len(safetensors) // 2],
        "garbage.pt": b"\x80\x04not a pickle",
    }
    for name, data in broken.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "badmeta").mkdir()
    (tmp_path / "badmeta" / "vectors.safetensors").write_bytes(safetensors)
    (tmp_path / "badmeta" / "meta.json").write_text("{broken")
    steer = ["steer", "--model", str(model_folder("llama", "chatml")), "--layer", "1", "--alpha", "1"]
    steer += ["--device", "cpu", "--max-new-tokens", "2", "Hi?"]
    for name in [*broken, "badmeta"]:
        result = runner.invoke(app, steer + ["--vector", str(tmp_path / name)])
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        assert "cannot be read as" in result.output and "give another vector" in result.output, result.output

    (tmp_path / "a-file").write_text("x")
    extract = ["extract", "--model", str(model_folder("llama")), "--trait", "evil", "--judge", "lexicon:"]
    for out, says in [
        ("/proc/personalab-run", "cannot be written"),
        (str(tmp_path / "a-file" / "run"), "which is a file"),
    ]:
        result = runner.invoke(app, extract + ["--out", out, "--device", "cpu"])
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        assert says in result.output and "choose another --out" in result.output
    assert not Path("/proc/personalab-run").exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*broken, "badmeta", "vec", "a-file"]
    )

    run = tmp_path / "sweep"
    run.mkdir()
    (run / "generations.sqlite").write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 64)
    sweep = ["sweep", "--model", str(model_folder("llama", "chatml")), "--vector", str(folder), "--trait", "evil"]
    sweep += ["--judge", "lexicon:", "--layers", "1", "--alphas", "0,1", "--eval-samples", "1", "--device", "cpu"]
    result = runner.invoke(app, sweep + ["--max-new-tokens", "2", "--out", str(run)])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) >= 1
    (line,) = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert "generations.sqlite is not a readable store" in line and "generations.sqlite.broken) and rerun" in line


def test_a_vector_of_another_model_is_a_warning_and_of_another_tokenizer_an_error(model_folder, tiny, tmp_path):
    import warnings

    from personalab.api.common import vector_of
    from personalab.errors import PersonalabWarning
    from personalab.persona import PersonaVector

    folder, handle = model_folder("llama", "chatml"), tiny("llama", "chatml")
    tensor = torch.randn(handle.n_layers, handle.hidden_size, generator=torch.Generator().manual_seed(0))
    own = {"model": str(folder), "revision": None, "tokenizer_sha256": handle.tokenizer_sha256()}
    cases = {
        "own": (own, None),
        "other": ({**own, "model": "someone/else", "revision": "v2"}, "warning: the vector was extracted from "
                  f"someone/else@v2 but is applied to {folder}; its shape fits"),
        "other-tokenizer": ({**own, "model": "someone/else", "tokenizer_sha256": "0" * 64}, "error: the vector was "
                            f"extracted from someone/else, whose tokenizer differs from that of {folder}"),
    }  # fmt: skip
    args = ["steer", "--model", str(folder), "--layer", "1", "--alpha", "1", "--device", "cpu", "--max-new-tokens", "2"]
    for name, (meta, says) in cases.items():
        save_vectors(tmp_path / name, {"response_mean": tensor}, meta)
        result = runner.invoke(app, args + ["--vector", str(tmp_path / name), "Hi?"])
        flagged = [line for line in result.output.splitlines() if line.startswith(("warning:", "error:"))]
        assert result.exit_code == (1 if name == "other-tokenizer" else 0), result.output
        assert flagged == ([] if says is None else [line for line in flagged if line.startswith(says)]), result.output
        assert len(flagged) == (says is not None)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            persona = PersonaVector.load(tmp_path / name)
            if name == "own":  # the fixture's handle is named apart from its folder
                persona.model = handle.name
            try:
                vector_of(persona, "response_mean", handle)
            except InvalidInputError as exc:
                assert name == "other-tokenizer" and "tokenizer differs" in str(exc)
        assert [w.category for w in seen] == ([PersonalabWarning] if name == "other" else [])


def test_version_and_vectors_cosine(tmp_path):
    from importlib.metadata import version

    shown = runner.invoke(app, ["--version"])
    assert shown.exit_code == 0 and shown.output.strip() == f"personalab {version('personalab')}"
    generator = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 16, generator=generator), torch.randn(5, 16, generator=generator)
    b[2] = -3 * a[2]
    save_vectors(tmp_path / "a", {"response_mean": a}, {"trait": "evil"})
    save_vectors(tmp_path / "b", {"response_mean": b}, {"trait": "sycophantic"})
    result = runner.invoke(
        app, ["vectors", "cosine", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c")]
    )
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "c" / "cosine.csv")
    x, y = a.double().numpy(), b.double().numpy()
    expected = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    np.testing.assert_allclose(table["cosine"], expected, atol=1e-6)
    np.testing.assert_allclose(table["norm_a"], np.linalg.norm(x, axis=1), rtol=1e-6)
    assert table["layer"].tolist() == [0, 1, 2, 3, 4] and table.loc[2, "cosine"] == pytest.approx(-1, abs=1e-6)
    assert "| 2 | -1.000 |" in result.output
    assert (tmp_path / "c" / "cosine.png").is_file() and (tmp_path / "c" / "cosine.svg").is_file()
    save_vectors(tmp_path / "d", {"response_mean": torch.randn(4, 16)}, {})
    other = runner.invoke(app, ["vectors", "cosine", str(tmp_path / "a"), str(tmp_path / "d")])
    assert other.exit_code == 1 and "compare vectors of one model" in other.output


def test_the_command_line_shows_the_librarys_lines_with_parameters_as_flags(tmp_path):
    """``as_trait`` logs the option it used as `` `trait` ``; the command line's handler writes it as ``--trait``."""
    import torch
    from typer.testing import CliRunner

    from personalab.cli import app
    from personalab.vectors import save_vectors

    save_vectors(tmp_path / "vec", {"response_mean": torch.ones(6, 64)}, {"model": "stories260k"})
    args = ["sweep", "--model", "builtin:stories260k", "--vector", str(tmp_path / "vec"), "--trait", "evil",
            "--judge", "lexicon:", "--layers", "2", "--dry-run", "--out", str(tmp_path / "sweep")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "trait: evil (--trait evil)" in result.output.splitlines()
