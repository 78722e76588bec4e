"""The Python API: ``PersonaVector`` against direct formulas, steering against a plain hooked greedy loop, the
study functions against the command line (same files, same defaults), and ``import personalab`` staying light."""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.fakes import ScriptedJudge
from helpers.judge_server import JudgeServer, hashed_scores
from typer.main import get_command
from typer.testing import CliRunner

import personalab as pl
from personalab.api.common import option_defaults
from personalab.cli import app
from personalab.engine.interventions import Steer, intervene
from personalab.engine.scale import DEFAULT_SCALE
from personalab.traits import Trait

runner = CliRunner()

TRAIT = Trait(
    name="grumpy",
    description="Complains about everything.",
    instructions=[
        {"pos": "You are grumpy and rude.", "neg": "You are cheerful and kind."},
        {"pos": "Complain about everything.", "neg": "Praise everything."},
    ],
    extraction_questions=["How was your day?", "What is bread?"],
    evaluation_questions=["Do you like rain?", "What is a cat?"],
    rubric="Rate grumpiness 0-100.\nQ: {question}\nA: {answer}\nNumber:",
)


def _vector(handle, seed: int = 0) -> pl.PersonaVector:
    g = torch.Generator().manual_seed(seed)
    variants = {
        k: torch.randn(handle.n_layers, handle.hidden_size, generator=g) for k in ("response_mean", "last_prompt")
    }
    return pl.PersonaVector(variants, trait=TRAIT, model=handle.name, meta={"note": "planted"})


def test_persona_vector_geometry_matches_direct_formulas(tiny):
    handle = tiny("llama", "chatml")
    a, b = _vector(handle, 0), _vector(handle, 1)
    raw_a, raw_b = a.tensor().numpy(), b.tensor().numpy()
    layer = 2
    assert torch.equal(a.at(layer), torch.from_numpy(raw_a[layer]))
    torch.testing.assert_close(a.unit(layer), torch.from_numpy(raw_a[layer] / (raw_a[layer] ** 2).sum() ** 0.5))
    expected_norms = [sum(x * x for x in row) ** 0.5 for row in raw_a.tolist()]
    np.testing.assert_allclose(a.norms().to_numpy(), expected_norms, rtol=1e-5)
    dots = (raw_a * raw_b).sum(-1)
    expected_cos = dots / ((raw_a**2).sum(-1) ** 0.5 * (raw_b**2).sum(-1) ** 0.5)
    cosines = a.cosine(b)
    assert cosines.index.name == "layer" and cosines.index.tolist() == list(range(handle.n_layers))
    torch.testing.assert_close(torch.tensor(cosines.to_numpy()), torch.from_numpy(expected_cos).double())
    torch.testing.assert_close(torch.tensor(a.cosine(a).to_numpy()), torch.ones(a.n_layers).double())
    assert a.cosine(b, variant="last_prompt").shape == (handle.n_layers,)
    with pytest.raises(pl.PersonalabError, match="no variant 'prompt_mean'"):
        a.at(layer, variant="prompt_mean")


def test_vector_arithmetic_is_per_variant_and_keeps_what_both_share(tiny, tmp_path):
    """``a - b``, ``a + b``, ``2 * a``, ``-a``: per variant both have, equal to the tensors' own arithmetic; the result
    keeps the model and the provenance both record, names its expression, saves and loads; vectors of other models
    or shapes, and of no common variant, are refused in one line."""
    handle = tiny("llama", "chatml")
    a, b = _vector(handle, 0), _vector(handle, 1)
    b = pl.PersonaVector(
        {"response_mean": b.variants["response_mean"], "prompt_mean": b.variants["last_prompt"]},
        trait=TRAIT, model=handle.name, meta={"note": "planted", "tokenizer_sha256": "x"},
    )  # fmt: skip
    a.meta = {**a.meta, "tokenizer_sha256": "x", "kept_pairs": 3}
    diff = a - b
    assert list(diff.variants) == ["response_mean"] and diff.model == handle.name and diff.trait is None
    assert torch.equal(diff.tensor(), a.tensor() - b.tensor())
    assert torch.equal((a + b).tensor(), a.tensor() + b.tensor())
    assert torch.equal((2 * a).tensor("last_prompt"), 2 * a.tensor("last_prompt")) and torch.equal(
        (a * 2).tensor(), 2 * a.tensor()
    )
    assert torch.equal((-a).tensor(), -a.tensor())
    assert diff.meta == {"note": "planted", "tokenizer_sha256": "x", "expression": "(grumpy) - (grumpy)"}
    assert (0.5 * diff).name == "0.5 * ((grumpy) - (grumpy))"
    back = pl.PersonaVector.load(diff.save(tmp_path / "diff"))
    assert torch.equal(back.tensor(), diff.tensor()) and back.meta["expression"] == diff.meta["expression"]
    other = pl.PersonaVector(dict(a.variants), model="another-model")
    for bad, message in [
        (lambda: a - other, "combine vectors of one model"),
        (lambda: a + pl.PersonaVector({"response_mean": torch.zeros(2, 3)}, model=handle.name), "shapes"),
        (lambda: a + pl.PersonaVector({"prompt_mean": a.tensor()}, model=handle.name), "share no variant"),
    ]:
        with pytest.raises(pl.PersonalabError, match=message):
            bad()
    with pytest.raises(TypeError):
        a + 1.0


def test_save_load_and_export_round_trip(tiny, tmp_path):
    handle = tiny("llama", "chatml")
    vec = _vector(handle)
    vec.save(tmp_path / "run")
    back = pl.PersonaVector.load(tmp_path / "run")
    assert set(back.variants) == set(vec.variants) and back.name == "grumpy" and back.model == handle.name
    for name, tensor in vec.variants.items():
        assert torch.equal(back.variants[name], tensor)
    assert back.trait == TRAIT and back.meta["note"] == "planted"
    written = back.export_public(tmp_path / "public")
    assert sorted(p.name for p in written) == ["grumpy_prompt_last_diff.pt", "grumpy_response_avg_diff.pt"]
    assert torch.equal(torch.load(tmp_path / "public" / "grumpy_response_avg_diff.pt"), vec.tensor())
    public = pl.PersonaVector.load(tmp_path / "public" / "grumpy_response_avg_diff.pt")
    assert torch.equal(public.tensor(), vec.tensor())
    result = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert torch.equal(torch.load(tmp_path / "cli" / "grumpy_prompt_last_diff.pt"), vec.tensor("last_prompt"))


def _hooked_greedy(handle, prompt_ids: list[int], layer: int, add: torch.Tensor, steps: int) -> list[int]:
    """Greedy decoding without a cache, adding ``add`` to the output of block ``layer - 1`` at every position
    from the last prompt token on (``"generating"``), with a plain forward hook."""
    block = handle.model.model.layers[layer - 1]
    start = len(prompt_ids) - 1

    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[:, start:] += add
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    ids = list(prompt_ids)
    remove = block.register_forward_hook(hook)
    try:
        for _ in range(steps):
            with torch.no_grad():
                logits = handle.model(input_ids=torch.tensor([ids])).logits
            token = int(logits[0, -1].argmax())
            if token in handle.stop_ids:
                break
            ids.append(token)
    finally:
        remove.remove()
    return ids[len(prompt_ids) :]


def test_steer_block_generates_what_a_hooked_greedy_loop_generates(tiny):
    handle = tiny("llama", "chatml")
    vec, layer, alpha = _vector(handle), 2, 1.0
    plain = pl.generate_text(handle, "How do I make friends?", max_new_tokens=8)
    with vec.steer(handle, layer=layer, alpha=alpha) as scaled:
        steered = pl.generate_text(handle, "How do I make friends?", max_new_tokens=8)
    assert scaled.scale == "normalised"
    torch.testing.assert_close(scaled.vector, vec.unit(layer) * scaled.residual_norm)
    prompt = handle.encode(None, "How do I make friends?").ids
    expected = _hooked_greedy(handle, list(prompt), layer, alpha * scaled.vector, 8)
    assert steered == handle.tokenizer.decode(expected, skip_special_tokens=True)
    assert plain == handle.tokenizer.decode(_hooked_greedy(handle, list(prompt), layer, 0 * vec.at(layer), 8),
                                            skip_special_tokens=True)  # fmt: skip
    assert steered != plain, "the planted vector must change the greedy answer"
    assert pl.generate_text(handle, "How do I make friends?", max_new_tokens=8) == plain, "the block must unhook"


@pytest.mark.parametrize("name", ["all", "prompt", "response", "last_prompt", "generating"])
def test_each_position_name_is_the_same_tokens_in_capture_and_steer(tiny, name):
    handle = tiny("llama", "chatml")
    seq = handle.encode(None, "What is bread?", "Bread is food.")
    n, p, layer = len(seq.ids), seq.prompt_len, 2
    by_hand = {
        "all": list(range(n)),
        "prompt": list(range(p)),
        "response": list(range(p, n)),
        "last_prompt": [p - 1],
        "generating": list(range(p - 1, n)),
    }[name]
    ids = torch.tensor([list(seq.ids)])
    with torch.no_grad():
        before = handle.model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0]
        with intervene(handle, Steer(layer, torch.ones(handle.hidden_size), 1.0, name), prompt_lengths=[p]):
            after = handle.model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0]
    moved = [i for i in range(n) if not torch.allclose(after[i], before[i])]
    assert moved == by_hand
    (gathered,) = pl.capture(handle, [seq], [layer], name, reduce="gather")
    torch.testing.assert_close(gathered[0], before[by_hand], rtol=1e-4, atol=1e-5)


def test_in_memory_extraction_leaves_nothing_on_disk(tiny, tmp_path, monkeypatch):
    handle = tiny("llama", "chatml")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.chdir(tmp_path)
    with JudgeServer(scorer=hashed_scores) as server:
        monkeypatch.setenv("PERSONALAB_JUDGE_BASE_URL", server.base_url)
        vec = pl.extract(handle, TRAIT, pl.judge("api:j"), samples=2, max_new_tokens=3, min_pairs=1, progress=False)
    assert isinstance(vec, pl.PersonaVector) and vec.source is None and vec.name == "grumpy"
    assert vec.tensor().shape == (handle.n_layers, handle.hidden_size) and vec.meta["counts"]["kept"] >= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"] and list(scratch.iterdir()) == []


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _same_run(cli: Path, python: Path) -> None:
    """The two run folders hold the same files with the same bytes, the report page's timestamp and the
    ``command`` that made each run aside."""
    mine, theirs = _files(cli), _files(python)
    assert len(mine) >= 2 and sorted(mine) == sorted(theirs)
    for name in mine:
        if name.endswith("report.html"):
            continue
        if name.endswith(".json") and name.split("/")[-1] in ("meta.json", "bake.json", "settings.json"):
            a, b = json.loads(mine[name]), json.loads(theirs[name])
            a.pop("command", None), b.pop("command", None)
            assert a == b, name
        else:
            assert mine[name] == theirs[name], name


@pytest.mark.slow
def test_cli_verbs_write_what_the_python_functions_write(model_folder, tmp_path, monkeypatch):
    model = str(model_folder("llama", "chatml"))
    trait = tmp_path / "grumpy.json"
    TRAIT.save(trait)
    base = ["--model", model, "--device", "cpu"]
    with JudgeServer(scorer=hashed_scores) as server:
        monkeypatch.setenv("PERSONALAB_JUDGE_BASE_URL", server.base_url)
        env = {"PERSONALAB_JUDGE_BASE_URL": server.base_url}
        extract = ["extract", *base, "--trait", str(trait), "--judge", "api:j", "--samples", "2"]
        extract += ["--max-new-tokens", "3", "--min-pairs", "1"]
        assert runner.invoke(app, [*extract, "--out", str(tmp_path / "cli" / "ext")], env=env).exit_code == 0
        vec = pl.extract(
            model, str(trait), "api:j", samples=2, max_new_tokens=3, min_pairs=1, out=tmp_path / "py" / "ext"
        )
        _same_run(tmp_path / "cli" / "ext", tmp_path / "py" / "ext")

        sweep = ["sweep", *base, "--vector", str(tmp_path / "cli" / "ext"), "--judge", "api:j", "--layers", "1,2"]
        sweep += ["--alphas", "0,2", "--eval-samples", "1", "--max-new-tokens", "3"]
        assert runner.invoke(app, [*sweep, "--out", str(tmp_path / "cli" / "sweep")], env=env).exit_code == 0
        result = pl.sweep(
            model,
            vec,
            "api:j",
            layers=[1, 2],
            alphas=[0, 2],
            eval_samples=1,
            max_new_tokens=3,
            out=tmp_path / "py" / "sweep",
        )
        _same_run(tmp_path / "cli" / "sweep", tmp_path / "py" / "sweep")
        assert list(result.table["layer"]) == list(result.tables["sweep"]["layer"]) and len(result.table) == 4
        kept = tmp_path / "py" / "sweep"
        memory = pl.sweep(model, vec, "api:j", layers=[1, 2], alphas=[0, 2], eval_samples=1, max_new_tokens=3)
        assert memory.folder is None and memory.figures == {}
        assert memory.images == {p.stem: p.read_bytes() for p in kept.glob("*.png")} and len(memory.images) >= 3
        with sqlite3.connect(kept / "generations.sqlite") as db:
            texts = [t for (t,) in db.execute("SELECT text FROM generations ORDER BY rowid")]
        assert memory.answers["text"].tolist() == texts and len(texts) >= 4
        judged = memory.answers.dropna(subset=["trait", "coherence"])
        assert (
            len(judged) == len(texts) and set(judged["alpha"]) == {0.0, 2.0} and set(judged["layer"].dropna()) == {1, 2}
        )

    bake = ["bake", *base, "--vector", str(tmp_path / "cli" / "ext"), "--layer", "2", "--alpha", "3", "--exact"]
    assert runner.invoke(app, [*bake, "--out", str(tmp_path / "cli" / "bake")]).exit_code == 0
    pl.bake(model, tmp_path / "py" / "ext", layer=2, alpha=3, out=tmp_path / "py" / "bake")
    _same_run(tmp_path / "cli" / "bake", tmp_path / "py" / "bake")


VERBS = {
    "extract": "personalab.methods.extraction:ExtractionConfig",
    "sweep": "personalab.studies.sweep:SweepConfig",
    "distill": "personalab.methods.distill:DistillConfig",
    "compare": "personalab.studies.compare:CompareConfig",
    "correlate": "personalab.studies.correlate:CorrelateConfig",
    "finetune": "personalab.studies.finetune:FinetuneConfig",
    "localize": "personalab.studies.localize.run:LocalizeConfig",
    "deepscan": "personalab.studies.localize.scan:ScanConfig",
    "compose": "personalab.studies.compose:ComposeConfig",
}
CLI_ONLY = {("sweep", "alphas"), ("distill", "lora_rank"), ("finetune", "lora_rank")}
CLI_ONLY |= {("finetune", "steps"), ("extract", "pos_threshold"), ("extract", "neg_threshold")}
"""Options whose command-line default is ``None`` on purpose: a sweep's default grid is the config's; training
asks for ``--lora-rank R`` or ``--full`` explicitly; a fine-tune runs one epoch unless given steps; extract's trait
cut-offs are the config's unless given, so that beside ``--trait-threshold`` a given one is an error."""


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_command_line_defaults_are_the_configs_defaults(verb):
    from importlib import import_module

    module, name = VERBS[verb].split(":")
    defaults = option_defaults(getattr(import_module(module), name))
    command = get_command(app).commands[verb]
    shared = {p.name: p.default for p in command.params if p.name in defaults and (verb, p.name) not in CLI_ONLY}
    assert len(shared) >= 3, (verb, sorted(shared))
    for option, value in shared.items():
        expected = defaults[option]
        if isinstance(value, str) and not isinstance(expected, str):  # a comma-separated list option
            expected = ",".join(f"{x:g}" for x in (expected if isinstance(expected, list) else [expected]))
        assert value == expected, (verb, option, value, defaults[option])


def test_every_scale_option_defaults_to_the_engines_default():
    commands = get_command(app).commands
    found = {verb: p.default for verb, c in commands.items() for p in getattr(c, "params", []) if p.name == "scale"}
    assert {"steer", "bake", "distill", "compare"} <= set(found)
    assert set(found.values()) == {DEFAULT_SCALE} == {"normalised"}


@pytest.mark.slow
def test_import_personalab_is_light():
    code = (
        "import sys, time; t = time.perf_counter(); import personalab; t = time.perf_counter() - t; "
        "heavy = sorted(m for m in ('torch', 'transformers', 'pandas', 'matplotlib') if m in sys.modules); "
        "print(t, heavy)"
    )
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env) for _ in range(3)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    times = [float(r.stdout.split()[0]) for r in runs]
    assert all(r.stdout.split(maxsplit=1)[1].strip() == "[]" for r in runs), runs[0].stdout
    assert min(times) < 0.3, times


PERSONAS = ["politically-liberal", "subscribes-to-utilitarianism"]


@pytest.mark.slow
def test_study_verbs_write_what_the_python_functions_write(model_folder, tmp_path, monkeypatch):
    """compose, localize, deepscan, trace, distill and compare: the command and the function give the same run
    folder."""
    chat = str(model_folder("qwen2", "chatml"))
    model = str(model_folder("llama", "chatml"))
    cpu = ["--device", "cpu"]

    def both(args: list[str], function, name: str, **options) -> None:
        result = runner.invoke(app, [*args, *cpu, "--out", str(tmp_path / "cli" / name)])
        assert result.exit_code == 0, result.output
        function(**options, out=tmp_path / "py" / name, progress=False)
        _same_run(tmp_path / "cli" / name, tmp_path / "py" / name)

    both(["compose", "--model", chat, "--grid", "short", "--layers", "0,2"], pl.compose, "compose", model=chat,
         grid="short", layers=[0, 2])  # fmt: skip
    personas = [a for p in PERSONAS for a in ("--persona", p)]
    both(["localize", "--model", model, *personas, "--figure-layers", "2"], pl.localize, "localize", model=model,
         personas=PERSONAS, figure_layers=[2])  # fmt: skip
    pools = dict(background=40, test_clean=20, clean=10, anomalous=10, runs=2)
    flags = [f for k, v in pools.items() for f in (f"--{k.replace('_', '-')}", str(v))]
    both(["deepscan", "--model", model, *personas, "--layer", "2", *flags], pl.deepscan, "deepscan", model=model,
         personas=PERSONAS, layer=2, **pools)  # fmt: skip

    checkpoint = str(shutil.copytree(model, tmp_path / "step-0"))  # trace orders checkpoints by their step
    small = dict(layer=2, samples=1, eval_samples=1, max_new_tokens=2, min_pairs=1, pos_threshold=0, neg_threshold=101)
    flags = [f for k, v in small.items() for f in (f"--{k.replace('_', '-')}", str(v))]
    with JudgeServer(scorer=hashed_scores) as server:
        monkeypatch.setenv("PERSONALAB_JUDGE_BASE_URL", server.base_url)
        both(["trace", "--checkpoints", checkpoint, "--trait", "evil", "--judge", "api:j", *flags], pl.trace, "trace",
             model=None, judge="api:j", checkpoints=checkpoint, traits=["evil"], **small)  # fmt: skip

    vec = _vector(pl.load_model(model, device="cpu"))
    vec.save(tmp_path / "vec")
    train = dict(lora_rank=2, trajectories=4, steps=1, micro_batch_size=2, grad_accum=1, max_new_tokens=4)
    flags = [f for k, v in train.items() for f in (f"--{k.replace('_', '-')}", str(v))]
    both(["distill", "--model", model, "--vector", str(tmp_path / "vec"), "--layer", "2", "--alpha", "4", *flags],
         pl.distill, "distill", model=model, vector=tmp_path / "vec", layer=2, alpha=4, **train)  # fmt: skip
    with JudgeServer(scorer=hashed_scores) as server:
        monkeypatch.setenv("PERSONALAB_JUDGE_BASE_URL", server.base_url)
        args = ["compare", "--model", model, "--vector", str(tmp_path / "vec"), "--layer", "2", "--alpha", "4"]
        args += ["--judge", "api:j", "--eval-samples", "1", "--max-new-tokens", "3", "--tuned"]
        student = tmp_path / "cli" / "distill"
        both([*args, str(student)], pl.compare, "compare", model=model, vector=tmp_path / "vec", judge="api:j",
             layer=2, alpha=4, tuned=[student], eval_samples=1, max_new_tokens=3)  # fmt: skip


@pytest.mark.slow
def test_training_and_projection_verbs_write_what_the_python_functions_write(model_folder, tmp_path, monkeypatch):
    """finetune, correlate and project: the command and the function give the same files."""
    model = str(model_folder("llama", "chatml"))
    vec = _vector(pl.load_model(model, device="cpu"))
    vec.save(tmp_path / "vec")
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": q, "response": "I do not like it at all."} for q in TRAIT.extraction_questions * 2]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = dict(lora_rank=2, steps=2, micro_batch_size=2, grad_accum=1, warmup_steps=0, checkpoint_every=1, lr=0.01)
    flags = [f for k, v in train.items() for f in (f"--{k.replace('_', '-')}", str(v))]
    args = ["finetune", "--model", model, "--data", str(data), "--monitor", str(tmp_path / "vec"), *flags]
    assert runner.invoke(app, [*args, "--device", "cpu", "--out", str(tmp_path / "cli" / "ft")]).exit_code == 0
    pl.finetune(model, data, monitor=[tmp_path / "vec"], out=tmp_path / "py" / "ft", **train)
    _same_run(tmp_path / "cli" / "ft", tmp_path / "py" / "ft")

    tuned = [tmp_path / "cli" / "ft" / "checkpoints" / f"step-{s}" for s in (1, 2)]
    with JudgeServer(scorer=hashed_scores) as server:
        monkeypatch.setenv("PERSONALAB_JUDGE_BASE_URL", server.base_url)
        args = ["correlate", "--model", model, "--vector", str(tmp_path / "vec"), "--layer", "2", "--judge", "api:j"]
        args += [x for t in tuned for x in ("--tuned", str(t))] + ["--eval-samples", "1", "--max-new-tokens", "3"]
        assert runner.invoke(app, [*args, "--device", "cpu", "--out", str(tmp_path / "cli" / "cor")]).exit_code == 0
        pl.correlate(model, tuned, tmp_path / "vec", "api:j", layer=2, eval_samples=1, max_new_tokens=3,
                     out=tmp_path / "py" / "cor")  # fmt: skip
    _same_run(tmp_path / "cli" / "cor", tmp_path / "py" / "cor")

    for side in ("cli", "py"):
        (tmp_path / side / "data").mkdir()
        (tmp_path / side / "data" / "d.jsonl").write_text(data.read_text())
    args = ["project", "--vector", str(tmp_path / "vec"), "--model", model, "--layer", "2", "--device", "cpu"]
    assert runner.invoke(app, [*args, str(tmp_path / "cli" / "data" / "d.jsonl")]).exit_code == 0
    result = pl.project(model, tmp_path / "vec", tmp_path / "py" / "data" / "d.jsonl", layer=2, progress=False)
    _same_run(tmp_path / "cli" / "data", tmp_path / "py" / "data")
    assert len(result.table) == len(rows) and set(result.table.columns) == {"layer", "last_prompt", "response_mean"}


def test_a_vector_holds_the_layers_it_has(tiny):
    """A vector of some layers (an SAE feature's shape) knows no depth: its dense tensor takes the model's, with zeros
    elsewhere; arithmetic with a full vector is per layer (missing rows count as zero); cosine and norms are per layer
    it has; a layer past the model's depth, or another width, is refused in one line."""
    handle = tiny("llama", "chatml")
    full = _vector(handle, 0)
    row = torch.randn(handle.hidden_size, generator=torch.Generator().manual_seed(5))
    some = pl.PersonaVector({"response_mean": {3: row}}, model=handle.name)
    assert some.held == [3] and some.n_layers is None and torch.equal(some.at(3), row)
    dense = some.tensor(n_layers=handle.n_layers)
    assert dense.shape == (handle.n_layers, handle.hidden_size) and torch.equal(dense[3], row)
    assert not dense[[i for i in range(handle.n_layers) if i != 3]].any()
    with pytest.raises(pl.PersonalabError, match="has layer\\(s\\) 3 only; give `n_layers`"):
        some.tensor()
    with pytest.raises(pl.PersonalabError, match="has layer 3 but the model has layers 0..2"):
        some.tensor(n_layers=3)
    with pytest.raises(pl.PersonalabError, match="no layer 2; it has 3"):
        some.at(2)
    total = full + some
    assert total.n_layers == handle.n_layers
    expected = full.tensor()
    expected[3] += row
    assert torch.equal(total.tensor(), expected)
    assert torch.equal((2 * some).at(3), 2 * row) and (2 * some).n_layers is None
    cosine = full.cosine(some)
    assert cosine.index.tolist() == [3]
    assert cosine.iloc[0] == pytest.approx(float(torch.nn.functional.cosine_similarity(full.at(3), row, dim=0)))
    assert some.norms().to_dict() == {3: pytest.approx(float(row.norm()))}
    with pytest.raises(pl.PersonalabError, match="combine vectors of one model"):
        full + pl.PersonaVector({"response_mean": {3: torch.ones(7)}}, model=handle.name)
    with pytest.raises(pl.PersonalabError, match="has layer 99 but the other has layers"):
        full + pl.PersonaVector({"response_mean": {99: row}}, model=handle.name)
    feature = pl.PersonaVector({"response_mean": {3: row}})  # a feature vector records no model
    assert (full - feature).model == handle.name and torch.equal((full - feature).at(3), full.at(3) - row)
    with pytest.raises(pl.PersonalabError, match="share no layer"):
        some.cosine(pl.PersonaVector({"response_mean": {4: row}}))


def test_bad_options_are_one_line_naming_the_parameter(tiny):
    """An unknown option names the valid ones; an invalid value names its option (a sampling one too), not a pydantic
    error of several lines."""
    from personalab.api.common import configured
    from personalab.methods.extraction import ExtractionConfig

    with pytest.raises(pl.PersonalabError, match=r"unknown option 'sample'; the options are .*samples") as unknown:
        configured(ExtractionConfig, {"sample": 2})
    with pytest.raises(pl.PersonalabError, match=r"^invalid `samples`: Input should be greater than or equal to 1$"):
        configured(ExtractionConfig, {"samples": 0})
    with pytest.raises(pl.PersonalabError, match=r"^invalid `temperature`: ") as bad:
        pl.extract(tiny("llama", "chatml"), TRAIT, ScriptedJudge(), temperature=-1.0)
    assert "\n" not in str(bad.value) and "\n" not in str(unknown.value)


def test_steer_answers_are_sampling_without_and_with_the_vector(tiny):
    """``pl.steer_answers`` (``personalab steer``): each prompt's two answers equal ``sample`` without and under a plain
    ``add_vector`` of the raw vector; a bad combination of options is one line before any generation."""
    from personalab.engine.generation import SamplingParams, sample_texts
    from personalab.engine.interventions import add_vector

    handle = tiny("llama", "chatml")
    vector = _vector(handle, 0)
    prompts = ["Hi?", "What is bread?"]
    answers = list(pl.steer_answers(handle, vector, prompts, layer=2, alpha=4.0, scale="raw", max_new_tokens=6))
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    seqs = [handle.encode_prompt(handle.chat.default_format, None, p) for p in prompts]
    plain = [sample_texts(handle, [s], params, 0)[0] for s in seqs]
    with add_vector(handle, vector.at(2), 2, alpha=4.0, positions="generating"):
        steered = [sample_texts(handle, [s], params, 0)[0] for s in seqs]
    assert [(a.prompt, a.unsteered, a.steered) for a in answers] == list(zip(prompts, plain, steered, strict=True))
    assert plain != steered and {a.label for a in answers} == {"alpha 4 (raw scale)"}
    (one,) = pl.steer_answers(handle, vector, "Hi?", layer=2, alpha=4.0, scale="raw", max_new_tokens=6)
    assert (one.prompt, one.steered) == ("Hi?", steered[0]), "one prompt as a string is one prompt"
    with pytest.raises(pl.PersonalabError, match=r"^`alpha` sets how much is added; `ablate` and `clamp` add nothing"):
        pl.steer_answers(handle, vector, prompts, layer=2, alpha=1.0, ablate=True)
