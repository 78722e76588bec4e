"""SAEs in the SAELens format (personalab.sae) and persona vectors in their feature space
(personalab.studies.features), against direct formulas and planted features."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import personalab as pl
from personalab.errors import InvalidInputError
from personalab.sae import hook_layer, load_sae
from personalab.studies.features import activation_differences, decompose

from conftest import STORIES

D_IN, D_SAE = 64, 256


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
@pytest.mark.parametrize(
    "options", [{}, {"apply_b_dec_to_input": False}, {"normalize_activations": "constant_norm_rescale"}]
)
def test_encoding_is_each_architectures_formula(tmp_path, architecture, options):
    t = _random_sae()
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
        if options.get("apply_b_dec_to_input", True):
            token = token - t["b_dec"].double()
        pre = [float(token @ t["W_enc"][:, f].double() + t["b_enc"][f]) for f in range(D_SAE)]
        if architecture == "standard":
            values = [max(p, 0.0) for p in pre]
        elif architecture == "jumprelu":
            values = [p if p > t["threshold"][f] and p > 0 else 0.0 for f, p in enumerate(pre)]
        else:
            largest = sorted(range(D_SAE), key=lambda f: -pre[f])[:5]
            values = [max(pre[f], 0.0) if f in largest else 0.0 for f in range(D_SAE)]
        expected[row] = torch.tensor(values)
    torch.testing.assert_close(sae.encode(x), expected, atol=1e-4, rtol=1e-4)


def test_sae_lens_encodes_the_same_where_it_is_installed(tmp_path):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed: pip install -e '.[sae]'")
    t = _random_sae()
    _save(tmp_path / "sae", t, architecture="jumprelu", hook_name="blocks.2.hook_resid_post")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"), device="cpu")
    x = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(load_sae(tmp_path / "sae").encode(x), theirs.encode(x), atol=1e-5, rtol=1e-5)


def test_bad_folders_and_misfits_are_one_line(tmp_path):
    with pytest.raises(InvalidInputError, match="is not a SAELens folder"):
        load_sae(tmp_path)
    t = _random_sae()
    _save(tmp_path / "gated", t, architecture="gated", hook_name="blocks.1.hook_resid_post")
    with pytest.raises(InvalidInputError, match="architecture 'gated'; supported"):
        load_sae(tmp_path / "gated")
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


def test_steering_along_a_feature_is_steering_along_its_decoder_row(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from personalab.cli import app
    from personalab.engine import generation
    from personalab.engine.generation import SamplingParams, sample_texts
    from personalab.engine.interventions import steer

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
    with steer(handle, t["W_dec"][17], 3, alpha=8.0, positions="generating"):
        expected = sample_texts(handle, [seq], params, 0)
    assert produced[1][0].text == expected[0] != produced[0][0].text
    vector = pl.feature_vector(spec, handle.n_blocks)
    assert vector.tensor().shape == (6, D_IN) and torch.equal(vector.at(3), t["W_dec"][17])
    assert not vector.tensor()[[0, 1, 2, 4, 5]].any(), "the direction lives at the SAE's layer only"
    raw = [*args[:5], "--layer", "2", "--alpha", "8", "--scale", "raw", "--device", "cpu", "Hi"]
    elsewhere = CliRunner().invoke(app, raw)
    assert elsewhere.exit_code == 1 and "vector at layer 2 is all zeros, so steering there adds nothing" in " ".join(
        elsewhere.output.split()
    )
    with pytest.raises(InvalidInputError, match="the SAE has features 0..255"):
        pl.feature_vector(f"sae:{tmp_path / 'sae'}#999", handle.n_blocks)
