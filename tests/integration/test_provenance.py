"""Run folders record the settings that made them and refuse a rerun that would change them."""

import hashlib
import json

import pytest
import torch
from helpers.fakes import TRAIT, ScriptedJudge

from personalab.engine.generation import SamplingParams
from personalab.engine.loading import load_model
from personalab.errors import InvalidInputError
from personalab.hashes import fingerprint
from personalab.records import load_records
from personalab.runfolder import changes, claim
from personalab.studies.finetune import FinetuneConfig, finetune
from personalab.studies.localize import scan as scanning
from personalab.studies.localize.statements import load_statements
from personalab.studies.sweep import SweepConfig, run_sweep


def test_changes_name_every_field_with_old_and_new_values():
    before = {"lr": 1e-5, "sampling": {"temperature": 1.0, "top_p": 0.9}, "layers": [1, 2]}
    after = {"lr": 1e-4, "sampling": {"temperature": 1.0, "top_p": 0.5}, "layers": [1, 2], "seed": 3}
    assert changes(before, after) == ["lr: 1e-05 -> 0.0001", "sampling.top_p: 0.9 -> 0.5", "seed: null -> 3"]
    assert changes(before, before) == []


def test_a_claim_is_refused_by_another_kind_or_other_settings_and_allowed_to_extend(tmp_path):
    folder = claim(tmp_path / "run", "sweep", {"scale": "raw", "n": 1}, {"alphas": [0, 1]})
    folder.write(result=7)
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["fingerprint"] == fingerprint({"scale": "raw", "n": 1}) and meta["result"] == 7
    assert meta["kind"] == "sweep" and meta["extends"] == {"alphas": [0, 1]} and "personalab_version" in meta
    extended = claim(tmp_path / "run", "sweep", {"scale": "raw", "n": 1}, {"alphas": [0, 1, 2]})
    assert extended.header["extends"] == {"alphas": [0, 1, 2]}
    assert json.loads((tmp_path / "run" / "meta.json").read_text())["result"] == 7, "a claim keeps stored results"
    with pytest.raises(InvalidInputError, match=r'made with other settings \(scale: "raw" -> "normalised"\)'):
        claim(tmp_path / "run", "sweep", {"scale": "normalised", "n": 1})
    with pytest.raises(InvalidInputError, match="holds a sweep run, not a finetune run"):
        claim(tmp_path / "run", "finetune", {"scale": "raw", "n": 1})


def test_sweep_refuses_another_scale_and_sampling(tiny, tmp_path):
    handle = tiny("llama", "chatml")
    vector = torch.randn(handle.n_layers, handle.hidden_size, generator=torch.Generator().manual_seed(0))
    config = SweepConfig(layers=[1], alphas=[0, 1.0], eval_samples=1, sampling=SamplingParams(max_new_tokens=3))
    run_sweep(handle, vector, TRAIT, ScriptedJudge(), tmp_path, config, progress=False)
    before = (tmp_path / "sweep.md").read_text()
    for update, field in (
        ({"scale": "raw"}, 'config.scale: "normalised" -> "raw"'),
        ({"sampling": SamplingParams(max_new_tokens=3, temperature=0.7)}, "config.sampling.temperature: 1.0 -> 0.7"),
    ):
        with pytest.raises(InvalidInputError) as info:
            run_sweep(handle, vector, TRAIT, ScriptedJudge(), tmp_path, config.model_copy(update=update), False)
        assert field in str(info.value) and "\n" not in str(info.value)
    assert (tmp_path / "sweep.md").read_text() == before


def test_finetune_refuses_another_learning_rate_and_records_its_data(model_folder, tmp_path):
    handle = load_model(str(model_folder("llama", "chatml")), device="cpu", dtype="float32")  # training changes it
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": q, "response": "Be kind."} for q in TRAIT.extraction_questions[:4]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = load_records(data)
    config = FinetuneConfig(lora_rank=2, steps=2, micro_batch_size=2, grad_accum=1, warmup_steps=0, checkpoint_every=2)
    finetune(handle, records, config, tmp_path / "ft", progress=False)
    meta = json.loads((tmp_path / "ft" / "meta.json").read_text())
    assert meta["inputs"]["data"] == {"path": str(data), "sha256": hashlib.sha256(data.read_bytes()).hexdigest()}
    with pytest.raises(InvalidInputError, match=r"config\.lr: 1e-05 -> 0\.0001"):
        finetune(handle, records, config.model_copy(update={"lr": 1e-4}), tmp_path / "ft", [], [])
    assert json.loads((tmp_path / "ft" / "meta.json").read_text())["config"]["lr"] == 1e-5
    data.write_text(data.read_text().replace("Be kind.", "Be cruel."))
    with pytest.raises(InvalidInputError, match="data_sha256"):
        finetune(handle, load_records(data), config, tmp_path / "ft", progress=False)


def test_deepscan_refuses_another_score_in_a_scanned_folder(tiny, tmp_path):
    handle = tiny("llama", "chatml")
    statements = load_statements(["politically-liberal"])
    config = scanning.ScanConfig(layer=2, background=40, test_clean=20, clean=10, anomalous=10, runs=2)
    scanning.run_deepscan(handle, statements, tmp_path / "scan", config, tmp_path / "acts", progress=False)
    before = (tmp_path / "scan" / "scan_runs.csv").read_text()
    with pytest.raises(InvalidInputError, match=r'config\.score: "hc" -> "bj"'):
        scanning.run_deepscan(
            handle, statements, tmp_path / "scan", config.model_copy(update={"score": "bj"}), tmp_path / "acts", False
        )
    more = config.model_copy(update={"runs": 3})
    scanning.run_deepscan(handle, statements, tmp_path / "scan", more, tmp_path / "acts", progress=False)
    after = (tmp_path / "scan" / "scan_runs.csv").read_text().splitlines()
    assert after[:3] == before.splitlines()[:3] and len(after) == 4
