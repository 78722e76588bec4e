"""SAEs in the SAELens format (personalab.sae) and persona vectors in their feature space
(personalab.studies.features), against direct formulas and planted features."""

import json
import math
from pathlib import Path

import pytest
import torch
from helpers.models import STORIES
from safetensors.torch import save_file

import personalab as pl
from personalab.errors import InvalidInputError
from personalab.sae import hook_layer, load_sae
from personalab.studies.features import activation_differences, decompose

D_IN, D_SAE = 64, 256
OPTIONS = [
    {},
    {"apply_b_dec_to_input": False},
    {"normalize_activations": "constant_norm_rescale"},
    {"normalize_activations": "layer_norm"},
    {"rescale_acts_by_decoder_norm": True},
]
"""The encoding options of a SAELens cfg.json (``rescale_acts_by_decoder_norm`` is read by TopK only)."""


def _save(folder, tensors: dict, **cfg) -> None:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": D_IN, "d_sae": D_SAE, **cfg}))


def _random_sae(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    decoder = torch.randn(D_SAE, D_IN, generator=g)
    return {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g) / 8,
        "b_enc": torch.randn(D_SAE, generator=g) / 4,
        "W_dec": decoder / decoder.norm(dim=1, keepdim=True),
        "b_dec": torch.randn(D_IN, generator=g) / 4,
        "threshold": torch.rand(D_SAE, generator=g) / 2,
    }


@pytest.mark.parametrize(
    ("hook", "layer"),
    [("blocks.3.hook_resid_post", 4), ("blocks.0.hook_resid_pre", 0), ("model.layers.2", 3), ("layers.4", 5)],
)
def test_hook_points_map_to_the_layer_convention(hook, layer):
    assert hook_layer(hook) == layer


def test_a_hook_point_off_the_residual_stream_is_refused():
    with pytest.raises(InvalidInputError, match="not the residual stream"):
        hook_layer("blocks.3.hook_mlp_out")


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
@pytest.mark.parametrize("options", OPTIONS)
def test_encoding_is_each_architectures_formula(tmp_path, architecture, options):
    t = _random_sae()
    if options.get("rescale_acts_by_decoder_norm"):
        t["W_dec"] = t["W_dec"] * torch.linspace(0.5, 2.0, D_SAE).unsqueeze(1)
    extra = {"k": 5} if architecture == "topk" else {}
    _save(tmp_path / "sae", t, architecture=architecture, hook_name="blocks.2.hook_resid_post", **extra, **options)
    sae = load_sae(tmp_path / "sae")
    assert sae.layer == 3 and (sae.d_in, sae.d_sae) == (D_IN, D_SAE)
    x = torch.randn(7, D_IN, generator=torch.Generator().manual_seed(1)) * 3
    expected = torch.zeros(7, D_SAE)
    for row in range(7):  # one token and one feature at a time, from the formulas written out
        token = x[row].double()
        if options.get("normalize_activations") == "constant_norm_rescale":
            token = token * math.sqrt(D_IN) / token.norm()
        if options.get("normalize_activations") == "layer_norm":
            mean = sum(token.tolist()) / D_IN
            std = math.sqrt(sum((v - mean) ** 2 for v in token.tolist()) / (D_IN - 1))
            token = (token - mean) / (std + 1e-5)
        if options.get("apply_b_dec_to_input", True):
            token = token - t["b_dec"].double()
        pre = [float(token @ t["W_enc"][:, f].double() + t["b_enc"][f]) for f in range(D_SAE)]
        if options.get("rescale_acts_by_decoder_norm") and architecture == "topk":  # SAELens reads it for topk only
            pre = [p * float(t["W_dec"][f].norm()) for f, p in enumerate(pre)]
        if architecture == "standard":
            values = [max(p, 0.0) for p in pre]
        elif architecture == "jumprelu":
            values = [p if p > t["threshold"][f] and p > 0 else 0.0 for f, p in enumerate(pre)]
        else:
            largest = sorted(range(D_SAE), key=lambda f: -pre[f])[:5]
            values = [max(pre[f], 0.0) if f in largest else 0.0 for f in range(D_SAE)]
        expected[row] = torch.tensor(values)
    torch.testing.assert_close(sae.encode(x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
@pytest.mark.parametrize("options", OPTIONS)
def test_sae_lens_encodes_the_same_where_it_is_installed(tmp_path, architecture, options):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed: pip install -e '.[sae]'")
    t = _random_sae()
    if options.get("rescale_acts_by_decoder_norm"):
        t["W_dec"] = t["W_dec"] * torch.linspace(0.5, 2.0, D_SAE).unsqueeze(1)
    if architecture != "jumprelu":
        del t["threshold"]
    extra = {"k": 5} if architecture == "topk" else {}
    cfg = {"architecture": architecture, "hook_name": "blocks.2.hook_resid_post", "dtype": "float32", **extra}
    _save(tmp_path / "sae", t, **cfg, **options)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"), device="cpu")
    x = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(2)) * 3
    with torch.no_grad():
        expected = theirs.encode(x)
    torch.testing.assert_close(load_sae(tmp_path / "sae").encode(x), expected, atol=1e-5, rtol=1e-5)
    theirs.save_model(tmp_path / "saved")  # the folder SAELens itself writes, as a release is read
    resaved = load_sae(tmp_path / "saved")
    assert resaved.layer == 3
    torch.testing.assert_close(resaved.encode(x), expected, atol=1e-5, rtol=1e-5)


def test_sae_lens_releases_load_through_its_loader(tmp_path, monkeypatch):
    """The glue to SAELens's loader: what ``SAE.from_pretrained`` returns is saved in its folder format and read
    back (a stand-in for the package, which downloads; the real one is compared above where installed)."""
    import sys
    import types

    with pytest.raises(InvalidInputError, match="name a pretrained SAE as sae-lens:RELEASE/ID"):
        load_sae("sae-lens:gpt2-small-res-jb")
    t = _random_sae(7)
    calls = []

    class Loaded:
        def save_model(self, path):
            _save(Path(path) / "saved", t, architecture="standard", hook_name="blocks.8.hook_resid_pre")
            for name in ("cfg.json", "sae_weights.safetensors"):
                (Path(path) / "saved" / name).rename(Path(path) / name)

    class Loader:
        @staticmethod
        def from_pretrained(release, sae_id, device):
            calls.append((release, sae_id, device))
            return Loaded()

    monkeypatch.setitem(sys.modules, "sae_lens", types.SimpleNamespace(SAE=Loader))
    sae = load_sae("sae-lens:gpt2-small-res-jb/blocks.8.hook_resid_pre")
    assert calls == [("gpt2-small-res-jb", "blocks.8.hook_resid_pre", "cpu")]
    assert sae.layer == 8 and sae.source == "sae-lens:gpt2-small-res-jb/blocks.8.hook_resid_pre"
    assert torch.equal(sae.W_dec, t["W_dec"])
    monkeypatch.setitem(sys.modules, "sae_lens", None)
    with pytest.raises(InvalidInputError, match=r"needs sae-lens: pip install 'personalab\[sae\]'"):
        load_sae("sae-lens:gpt2-small-res-jb/blocks.8.hook_resid_pre")


def test_labels_stated_layers_and_feature_vectors_in_python(tmp_path):
    from personalab.api.common import vector_of
    from personalab.sae import as_sae, load_labels

    (tmp_path / "object.json").write_text(json.dumps({"3": "joy", "17": "panic"}))
    (tmp_path / "export.json").write_text(json.dumps([{"index": "3", "description": "joy", "modelId": "x"}]))
    (tmp_path / "bad.json").write_text(json.dumps([{"feature": 3}]))
    assert load_labels(tmp_path / "object.json") == {3: "joy", 17: "panic"}
    assert load_labels(tmp_path / "export.json") == {3: "joy"}
    with pytest.raises(InvalidInputError, match="feature labels are"):
        load_labels(tmp_path / "bad.json")
    t = _random_sae(8)
    _save(tmp_path / "sae", t, architecture="standard", hook_name="blocks.2.hook_resid_post")
    assert as_sae(tmp_path / "sae", 3).layer == 3
    with pytest.raises(InvalidInputError, match=r"reads blocks.2.hook_resid_post = layer 3 \(hidden_states\[3\]\)"):
        as_sae(tmp_path / "sae", 2)
    spec = f"sae:{tmp_path / 'sae'}#4"
    persona, direction = vector_of(spec, "response_mean", str(STORIES))
    assert direction.shape == (6, D_IN) and torch.equal(direction[3], t["W_dec"][4])
    decomposed = pl.features(spec, tmp_path / "sae").table  # a feature needs no model: it holds its layer
    assert decomposed.loc[0, "feature"] == 4 and decomposed.loc[0, "cosine"] == pytest.approx(1.0, abs=1e-5)


def test_bad_folders_and_misfits_are_one_line(tmp_path):
    with pytest.raises(InvalidInputError, match="is not a SAELens folder"):
        load_sae(tmp_path)
    t = _random_sae()
    _save(tmp_path / "gated", t, architecture="gated", hook_name="blocks.1.hook_resid_post")
    with pytest.raises(InvalidInputError, match="architecture 'gated'; supported"):
        load_sae(tmp_path / "gated")
    _save(
        tmp_path / "average", t, hook_name="blocks.1.hook_resid_post", normalize_activations="expected_average_only_in"
    )
    with pytest.raises(InvalidInputError, match="needs its dataset's scaling factor; fold it"):
        load_sae(tmp_path / "average")
    _save(tmp_path / "topk", t, architecture="topk", hook_name="blocks.1.hook_resid_post")
    with pytest.raises(InvalidInputError, match="a topk SAE needs k"):
        load_sae(tmp_path / "topk")
    _save(tmp_path / "ok", t, architecture="standard", hook_name="blocks.6.hook_resid_post")
    sae = load_sae(tmp_path / "ok")
    with pytest.raises(InvalidInputError, match="reads layer 7 but the model has layers 0..5"):
        sae.check_fits(5, D_IN)
    with pytest.raises(InvalidInputError, match="reads 64 dimensions but the model's residual has 32"):
        sae.check_fits(5, 32)


@pytest.fixture(scope="module")
def cheerful(tmp_path_factory):
    """A cheerful vector extracted from stories260k with the lexicon judge, and its kept pairs."""
    handle = pl.load_model(str(STORIES), device="cpu")
    out = tmp_path_factory.mktemp("cheerful") / "run"
    vector = pl.extract(handle, "cheerful", "lexicon:", samples=1, max_new_tokens=24, min_pairs=4, out=out,
                        report=False, progress=False)  # fmt: skip
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    return handle, vector, [p for p in pairs if p["kept"]]


def _planted(direction: torch.Tensor, feature: int, seed: int = 3) -> dict[str, torch.Tensor]:
    """Unit decoder rows, ``feature`` the unit ``direction``; encoder tied to the decoder, no biases."""
    t = _random_sae(seed)
    t["W_dec"][feature] = direction / direction.norm()
    return {**t, "W_enc": t["W_dec"].T.clone(), "b_enc": torch.zeros(D_SAE), "b_dec": torch.zeros(D_IN)}


def test_a_planted_feature_ranks_first_by_cosine_and_by_activation_difference(cheerful, tmp_path):
    handle, vector, pairs = cheerful
    layer = 3
    direction = vector.at(layer)
    _save(
        tmp_path / "sae",
        _planted(direction, 17),
        architecture="standard",
        hook_name=f"blocks.{layer - 1}.hook_resid_post",
    )
    sae = load_sae(tmp_path / "sae")
    table, share = decompose(direction, sae, k=5)
    assert table.loc[0, "feature"] == 17 and table.loc[0, "cosine"] == pytest.approx(1.0, abs=1e-6)
    assert share == pytest.approx(1.0, abs=1e-6) and table.loc[0, "weight"] == pytest.approx(
        float(direction.norm()), rel=1e-4
    )

    diffs = activation_differences(handle, sae, pairs, "continuation", progress=False)
    assert diffs.loc[0, "feature"] == 17 and diffs.loc[0, "difference"] > 0


def test_a_planted_pair_is_recovered_with_its_weights(tmp_path):
    t = _random_sae(4)
    a, b = t["W_dec"][5], t["W_dec"][9]
    _save(tmp_path / "sae", t, architecture="standard", hook_name="blocks.1.hook_resid_post")
    table, share = decompose(2 * a + 3 * b, load_sae(tmp_path / "sae"), k=2)
    weights = dict(zip(table["feature"], table["weight"], strict=True))
    assert weights[5] == pytest.approx(2.0, abs=1e-5) and weights[9] == pytest.approx(3.0, abs=1e-5)
    assert all(abs(w) < 1e-5 for f, w in weights.items() if f not in (5, 9)) and share == pytest.approx(1.0, abs=1e-9)


def test_the_features_command_writes_the_papers_table(cheerful, tmp_path):
    from typer.testing import CliRunner

    from personalab.cli import app

    handle, vector, pairs = cheerful
    run = vector.source if vector.source.is_dir() else vector.source.parent
    _save(tmp_path / "sae", _planted(vector.at(3), 17), architecture="standard", hook_name="blocks.2.hook_resid_post")
    (tmp_path / "labels.json").write_text(json.dumps({"17": "cheerful stories"}))
    args = ["features", "--vector", str(run), "--sae", str(tmp_path / "sae"), "--labels", str(tmp_path / "labels.json")]
    result = CliRunner().invoke(app, [*args, "--per-sign", "3", "--device", "cpu", "--out", str(tmp_path / "f")])
    assert result.exit_code == 0, result.output
    import pandas as pd

    table = pd.read_csv(tmp_path / "f" / "features.csv")
    assert set(table["variant"]) == set(vector.variants) and len(table) == 6 * len(vector.variants)
    top = table[table["variant"] == "response_mean"].iloc[0]
    assert top["feature"] == 17 and top["label"] == "cheerful stories" and top["difference"] > 0
    diffs = activation_differences(handle, load_sae(tmp_path / "sae"), pairs, "continuation", progress=False)
    assert top["difference"] == pytest.approx(float(diffs.set_index("feature").loc[17, "difference"]), rel=1e-6)
    text = (tmp_path / "f" / "features.md").read_text()
    assert "| feature | cosine | weight | label | difference | p |" in text and "cheerful stories" in text
    assert (tmp_path / "f" / "features.png").stat().st_size > 5_000 and (tmp_path / "f" / "report.html").is_file()
    stray = CliRunner().invoke(app, [*args, "--positions", "all", "--out", str(tmp_path / "g")])
    assert stray.exit_code == 1 and "--positions: only with --diff BASE TUNED" in stray.output


def test_steering_along_a_feature_is_steering_along_its_decoder_row(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from personalab.cli import app
    from personalab.engine import generation
    from personalab.engine.generation import SamplingParams, sample_texts
    from personalab.engine.interventions import add_vector

    t = _random_sae(5)
    _save(tmp_path / "sae", t, architecture="standard", hook_name="blocks.2.hook_resid_post")
    produced, real = [], generation.sample
    monkeypatch.setattr(generation, "sample", lambda *a: produced.append(real(*a)) or produced[-1])
    spec = f"sae:{tmp_path / 'sae'}#17"
    args = ["steer", "--model", str(STORIES), "--vector", spec, "--layer", "3", "--alpha", "8", "--scale", "raw"]
    result = CliRunner().invoke(app, [*args, "--max-new-tokens", "8", "--device", "cpu", "Once upon a time"])
    assert result.exit_code == 0, result.output
    handle = pl.load_model(str(STORIES), device="cpu")
    seq = handle.encode(None, "Once upon a time")
    params = SamplingParams(temperature=0, max_new_tokens=8)
    with add_vector(handle, t["W_dec"][17], 3, alpha=8.0, positions="generating"):
        expected = sample_texts(handle, [seq], params, 0)
    assert produced[1][0].text == expected[0] != produced[0][0].text
    vector = pl.feature_vector(spec)  # made without the model: the SAE's layer alone
    assert vector.held == [3] and vector.n_layers is None and torch.equal(vector.at(3), t["W_dec"][17])
    dense = vector.tensor(n_layers=handle.n_layers)
    assert dense.shape == (6, D_IN) and not dense[[0, 1, 2, 4, 5]].any(), "the direction lives at the SAE's layer only"
    raw = [*args[:5], "--layer", "2", "--alpha", "8", "--scale", "raw", "--device", "cpu", "Hi"]
    elsewhere = CliRunner().invoke(app, raw)
    assert elsewhere.exit_code == 1 and "vector at layer 2 is all zeros, so steering there adds nothing" in " ".join(
        elsewhere.output.split()
    )
    with pytest.raises(InvalidInputError, match="the SAE has features 0..255"):
        pl.feature_vector(f"sae:{tmp_path / 'sae'}#999")


STARTS = ["Once upon a time", "One day", "Tim was", "Lily had a", "The cat", "There was a", "The sun", "Sam and Mia",
          "A little dog", "The big tree", "Mom said", "In the park"]  # fmt: skip


def test_a_fine_tune_on_data_steered_along_a_feature_puts_it_first_in_the_diff(cheerful, tmp_path):
    from typer.testing import CliRunner

    from personalab.cli import app
    from personalab.engine.generation import SamplingParams, sample_texts
    from personalab.engine.interventions import add_vector
    from personalab.records import Record

    _, vector, _ = cheerful
    feature, layer = 17, 3
    _save(tmp_path / "sae", _planted(vector.at(layer), feature), architecture="standard",
          hook_name=f"blocks.{layer - 1}.hook_resid_post")  # fmt: skip
    handle = pl.load_model(str(STORIES), device="cpu")
    seqs = [handle.encode(None, s) for s in STARTS]
    direction = pl.feature_vector(f"sae:{tmp_path / 'sae'}#{feature}").at(layer)
    with add_vector(handle, direction, layer, alpha=8.0, positions="all"):
        texts = [sample_texts(handle, seqs, SamplingParams(temperature=1.0, max_new_tokens=32), s) for s in range(4)]
    records = [Record(None, s, text) for answers in texts for s, text in zip(STARTS, answers, strict=True)]
    pl.finetune(str(STORIES), records, lora_rank=None, steps=40, lr=1e-3, micro_batch_size=8, grad_accum=1,
                warmup_steps=0, out=tmp_path / "ft", report=False)  # fmt: skip
    held_out = ["Once upon a time there was", "Ben liked", "The bird", "Anna went to", "It was a sunny day", "The boy"]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in held_out))
    run = vector.source if vector.source.is_dir() else vector.source.parent
    args = ["features", "--diff", str(STORIES), str(tmp_path / "ft"), "--sae", str(tmp_path / "sae"), "--vector",
            str(run), "--prompts", str(tmp_path / "prompts.jsonl"), "--max-new-tokens", "32", "--per-sign", "3",
            "--device", "cpu", "--out", str(tmp_path / "d")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    import pandas as pd

    table = pd.read_csv(tmp_path / "d" / "features.csv")
    assert len(table) == D_SAE and table.loc[0, "feature"] == feature and table.loc[0, "difference"] > 0
    assert table.loc[0, "cosine"] == pytest.approx(1.0, abs=1e-5)
    assert table.loc[0, "difference"] == pytest.approx(table.loc[0, "tuned"] - table.loc[0, "base"], rel=1e-9)
    text = (tmp_path / "d" / "features.md").read_text()
    assert "| feature | base | tuned | difference | p | cosine | label |" in text and "6 records" in text
    assert (tmp_path / "d" / "generations.sqlite").is_file() and (tmp_path / "d" / "features.png").is_file()

    import sqlite3

    with sqlite3.connect(tmp_path / "d" / "generations.sqlite") as db:  # the base model's greedy answers
        answers = {
            json.loads(request)["prompt"]: text for request, text in db.execute("SELECT request, text FROM generations")
        }
    assert sorted(answers) == sorted(held_out)
    tuned = pl.load_model(str(tmp_path / "ft" / "checkpoints" / "step-40"), device="cpu")
    means = []
    for model in (handle, tuned):  # plain output_hidden_states on the same texts, the feature's formula by hand
        per_record = []
        for prompt in held_out:
            seq = handle.encode(None, prompt, answers[prompt])
            with torch.no_grad():
                out = model.model(torch.tensor([seq.ids]), output_hidden_states=True)
            tokens = out.hidden_states[layer][0, seq.prompt_len :]
            per_record.append(torch.relu(tokens.double() @ direction.double() / direction.norm()).mean())
        means.append(torch.stack(per_record).mean())
    assert table.loc[0, "difference"] == pytest.approx(float(means[1] - means[0]), rel=1e-4)
    rerun = CliRunner().invoke(app, [*args[:-2], "--positions", "all", "--out", str(tmp_path / "d")])
    assert rerun.exit_code == 1 and "positions" in rerun.output
    both = CliRunner().invoke(app, [*args, "--model", str(STORIES)])
    assert both.exit_code == 1 and "--diff names the base model; leave out --model" in both.output


def test_the_diff_refuses_bad_input_in_one_line(tmp_path):
    from personalab.records import Record

    _save(tmp_path / "sae", _random_sae(9), architecture="standard", hook_name="blocks.2.hook_resid_post")
    prompts = [Record(None, "Once upon a time", None)]
    common = {"prompts": prompts, "out": tmp_path / "d", "report": False, "progress": False}
    with pytest.raises(InvalidInputError, match="positions 'last_prompt': choose response, prompt or all"):
        pl.feature_diff(str(STORIES), str(STORIES), tmp_path / "sae", positions="last_prompt", **common)
    with pytest.raises(InvalidInputError, match="the vector keeps no trait"):
        pl.feature_diff(str(STORIES), str(STORIES), tmp_path / "sae", vector=torch.ones(6, D_IN), out=tmp_path / "e")
    with pytest.raises(InvalidInputError, match="per-layer vector has 4 rows but this model has 6 layers"):
        pl.feature_diff(str(STORIES), str(STORIES), tmp_path / "sae", vector=torch.ones(4, D_IN), **common)
    zero = torch.ones(6, D_IN)
    zero[3] = 0
    with pytest.raises(InvalidInputError, match="the vector is zero at layer 3, the SAE's"):
        pl.feature_diff(str(STORIES), str(STORIES), tmp_path / "sae", vector=zero, **common)
    assert not (tmp_path / "d").exists(), "refused before the run folder is claimed"
