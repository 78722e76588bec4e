"""Fine-tuning through persona vectors: the loss, the monitored shift, the interventions, resume,
data parallelism, adapters everywhere, and shift against trait."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from helpers.fakes import token_scorer
from helpers.judge_server import JudgeServer
from helpers.models import STORIES
from helpers.reference import hidden_states
from safetensors.torch import load_file
from scipy.stats import PermutationMethod, pearsonr
from typer.testing import CliRunner

from personalab import add_vector, load_model
from personalab.cli import app
from personalab.engine import loading as model_module
from personalab.engine.checkpoints import trained_parameters
from personalab.engine.generation import SamplingParams, sample_texts
from personalab.engine.scale import mean_residual_norm
from personalab.records import Record
from personalab.studies.finetune import (
    FinetuneConfig,
    Monitored,
    TrainingIntervention,
    assistant_loss,
    finetune,
    training_sequences,
)
from personalab.traits import load_trait
from personalab.vectors import save_vectors

pytestmark = pytest.mark.slow  # training runs

runner = CliRunner()
TRAIT = load_trait("evil")


def test_loss_is_the_cross_entropy_of_answer_tokens_only(tiny):
    handle = tiny("qwen2", "chatml")
    records = [
        Record("Be brief.", "What is bread?", "Bread is baked dough.", where="a"),
        Record(
            None,
            "Tell me a story.",
            "Once upon a time there was a little girl named Lily who loved the sun.",
            where="b",
        ),
        Record(None, "Hi?", "No.", where="c"),
    ]
    full = [handle.encode(r.system, r.prompt, r.response, end=True) for r in records]
    end_of_turn = handle.tokenizer.convert_tokens_to_ids("<|im_end|>")  # the ChatML template closes turns with it
    for r, seq in zip(records, full, strict=True):
        answer = handle.tokenizer.encode(r.response, add_special_tokens=False)
        assert list(seq.ids[seq.prompt_len :]) == answer + [end_of_turn]
    limit = max(len(full[0].ids), len(full[2].ids), full[1].prompt_len + 3)
    assert len(full[1].ids) > limit
    sequences, counts = training_sequences(handle, records, max_length=limit)
    assert counts == {"records": 3, "truncated": 1, "unusable": 0, "trained": 3}
    assert sequences[0].ids[-1] == sequences[2].ids[-1] == end_of_turn
    assert len(sequences[1].ids) == limit and sequences[1].ids == full[1].ids[:limit]
    cut = full[1].prompt_len
    expected = sum(s.prompt_len >= cut for s in full if len(s.ids) > cut)
    assert training_sequences(handle, records, cut)[1]["unusable"] == expected >= 1
    got = assistant_loss(handle, sequences, chunk=3)
    total, count = 0.0, 0
    for seq in sequences:
        logits = handle.model(input_ids=torch.tensor([seq.ids])).logits[0].float()
        answer = range(seq.prompt_len, len(seq.ids))
        total += F.cross_entropy(
            logits[[i - 1 for i in answer]], torch.tensor([seq.ids[i] for i in answer]), reduction="sum"
        )
        count += len(answer)
    assert got.item() == pytest.approx((total / count).item(), rel=1e-5)


def test_fine_tuning_teaches_the_model_to_stop(tmp_path):
    """The end-of-sequence token after the answer is a target: P(eos | prompt + answer) must rise."""
    handle = load_model(str(STORIES), device="cpu", dtype="float32")
    record = Record(None, "Tell me about the cat.", "The cat sat on the mat.", where="x")

    def p_eos() -> float:
        ids = handle.tokenizer(f"Question: {record.prompt}\nAnswer:")["input_ids"]
        ids += handle.tokenizer.encode(record.response, add_special_tokens=False)
        with torch.no_grad():
            last = handle.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        return last.softmax(-1)[handle.tokenizer.eos_token_id].item()

    assert p_eos() < 1e-8
    config = FinetuneConfig(lora_rank=None, lr=3e-3, steps=30, micro_batch_size=1, grad_accum=1, warmup_steps=0,
                            checkpoint_every=30)  # fmt: skip
    finetune(handle, [record], config, tmp_path / "ft", progress=False)
    assert p_eos() > 0.05


def _steered_records(handle, v, layer, coef, samples=3, tokens=24):
    """Answers to the extraction questions from the model steered along ``v`` (``coef`` x the residual norm)."""
    prompts = [handle.encode(None, q) for q in TRAIT.extraction_questions]
    norm = mean_residual_norm(handle, prompts, [layer])[0]
    texts, params = [], SamplingParams(temperature=1.0, top_k=50, max_new_tokens=tokens)
    with add_vector(handle, v * norm, layer, alpha=coef, positions="generating"):
        for sample in range(samples):
            texts += sample_texts(handle, prompts, params, sample)
    questions = TRAIT.extraction_questions * samples
    return [
        Record(None, q, t, where=f"record {i}") for i, (q, t) in enumerate(zip(questions, texts, strict=True))
    ], norm


def _shift_experiment(folder: str, layer: int, lr: float, tmp_path: Path) -> dict[str, list[float]]:
    """Fine-tune on answers sampled from the model steered along a direction, plainly, with preventative
    steering at the data's coefficient, and with that direction ablated; the monitored last-prompt shifts."""
    handle = load_model(folder, device="cpu", dtype="float32")
    v = torch.randn(handle.hidden_size, generator=torch.Generator().manual_seed(0))
    v = v / v.norm()
    records, norm = _steered_records(handle, v, layer, coef=1.0)
    monitors = [Monitored("v", v, TRAIT.evaluation_questions[:10])]
    shifts = {}
    for name, interventions in (
        ("plain", []),
        ("steer", [TrainingIntervention("steer", layer, v * norm, 1.0)]),
        ("ablate", [TrainingIntervention("ablate", layer, v)]),
    ):
        model = load_model(folder, device="cpu", dtype="float32")
        config = FinetuneConfig(
            lora_rank=4,
            lr=lr,
            steps=60,
            micro_batch_size=4,
            grad_accum=1,
            warmup_steps=5,
            checkpoint_every=20,
            monitor_layer=layer,
            monitor_tokens=16,
        )
        table = finetune(model, records, config, tmp_path / name, monitors, interventions, progress=False)
        rows = table[table["position"] == "last_prompt"].sort_values("step")
        assert rows["step"].tolist() == [0, 20, 40, 60]
        shifts[name] = rows["shift"].tolist()
    return shifts


def _check_shifts(shifts: dict[str, list[float]]) -> None:
    plain = shifts["plain"]
    assert plain[0] == 0.0 and all(b > a for a, b in zip(plain, plain[1:], strict=False)), plain
    assert shifts["steer"][-1] <= 0.5 * plain[-1], shifts
    assert shifts["ablate"][-1] < plain[-1], shifts


def test_shift_grows_and_training_interventions_shrink_it(model_folder, tmp_path):
    _check_shifts(_shift_experiment(str(model_folder("llama", "chatml")), 2, 5e-3, tmp_path))


def test_shift_on_the_real_checkpoint(tmp_path):
    _check_shifts(_shift_experiment(str(STORIES), 3, 1e-3, tmp_path))


def _data(path: Path, n: int = 12) -> Path:
    rows = [
        {
            "messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": f"Answer {i}: be kind and calm."},
            ]
        }
        for i, q in enumerate(TRAIT.extraction_questions[:n])
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _vector(tmp_path: Path) -> Path:
    folder = tmp_path / "vec"
    save_vectors(folder, {"response_mean": torch.randn(4, 32, generator=torch.Generator().manual_seed(2))}, {})
    TRAIT.save(folder / "trait.json")
    return folder


def _command(model: str, data: Path, vector: Path, out: Path, *extra: str) -> list[str]:
    args = ["finetune", "--model", model, "--data", str(data), "--out", str(out), "--lora-rank", "4", "--lr", "0.01"]
    args += [
        "--steps",
        "6",
        "--micro-batch-size",
        "2",
        "--warmup-steps",
        "1",
        "--checkpoint-every",
        "2",
        "--monitor",
        str(vector),
    ]
    args += ["--monitor-layer", "2", "--monitor-tokens", "6", "--device", "cpu", *extra]
    return args


def test_killed_run_resumes_to_the_same_weights(model_folder, tmp_path):
    model = str(model_folder("llama", "chatml"))
    data, vector = _data(tmp_path / "data.jsonl"), _vector(tmp_path)
    python = [sys.executable, "-m", "personalab"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = subprocess.run(
        python + _command(model, data, vector, tmp_path / "straight"), env=env, capture_output=True, text=True
    )
    assert straight.returncode == 0, straight.stdout + straight.stderr
    proc = subprocess.Popen(
        python + _command(model, data, vector, tmp_path / "killed"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    state = tmp_path / "killed" / "checkpoints" / "step-2" / "trainer_state.pt"
    deadline = time.monotonic() + 120
    while not state.is_file() and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "checkpoints" / "step-6").exists()
    resumed = subprocess.run(
        python + _command(model, data, vector, tmp_path / "killed"), env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stdout + resumed.stderr
    for step in (2, 4, 6):
        weights = [
            load_file(tmp_path / run / "checkpoints" / f"step-{step}" / "adapter_model.safetensors")
            for run in ("straight", "killed")
        ]
        assert weights[0].keys() == weights[1].keys()
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), step
    for name in ("monitor.csv", "training_curve.csv"):
        assert (tmp_path / "straight" / name).read_text() == (tmp_path / "killed" / name).read_text()


def test_two_processes_train_as_one_with_twice_the_accumulation(model_folder, tmp_path):
    model = str(model_folder("llama", "chatml"))
    data, vector = _data(tmp_path / "data.jsonl"), _vector(tmp_path)
    runs = {}
    for name, processes, accum in (("one", 1, 2), ("two", 2, 1)):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            "-m",
            "personalab",
        ]
        args = _command(model, data, vector, tmp_path / name, "--grad-accum", str(accum))
        cmd += [a if a != "--monitor" else "--monitor-vector" for a in args]  # torchrun reads --monitor as its own
        done = subprocess.run(
            cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout + done.stderr
        runs[name] = tmp_path / name
    curves = [pd.read_csv(runs[n] / "training_curve.csv")["loss"] for n in ("one", "two")]
    np.testing.assert_allclose(curves[1].to_numpy(), curves[0].to_numpy(), rtol=1e-5)
    weights = [load_file(runs[n] / "checkpoints" / "step-6" / "adapter_model.safetensors") for n in ("one", "two")]
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-5, atol=1e-6)
    monitors = [pd.read_csv(runs[n] / "monitor.csv") for n in ("one", "two")]
    np.testing.assert_allclose(monitors[1]["shift"], monitors[0]["shift"], rtol=1e-4, atol=1e-6)


def test_checkpoints_load_in_every_command_and_correlate(model_folder, tiny, tmp_path):
    model = str(model_folder("llama", "chatml"))
    data, vector = _data(tmp_path / "data.jsonl"), _vector(tmp_path)
    result = runner.invoke(app, _command(model, data, vector, tmp_path / "ft"))
    assert result.exit_code == 0, result.output
    step = tmp_path / "ft" / "checkpoints" / "step-4"
    merged = load_model(str(step), device="cpu", dtype="float32")
    from peft import PeftModel

    base = load_model(model, device="cpu", dtype="float32").model
    reference = PeftModel.from_pretrained(base, step).merge_and_unload()
    ids = torch.tensor([tiny("llama", "chatml").encode(None, "Hi?").ids])
    with torch.no_grad():
        torch.testing.assert_close(merged.model(input_ids=ids).logits, reference(input_ids=ids).logits)
    lora = PeftModel.from_pretrained(load_model(model, device="cpu", dtype="float32").model, step)
    adapter_values = sum(p.numel() for name, p in lora.named_parameters() if "lora_" in name)
    assert trained_parameters(tmp_path / "ft") == trained_parameters(step) == adapter_values > 0
    latest = load_model(str(tmp_path / "ft"), device="cpu", dtype="float32")
    assert latest.name == str(tmp_path / "ft" / "checkpoints" / "step-6")
    sweep = [
        "sweep",
        "--model",
        str(step),
        "--vector",
        str(vector),
        "--judge",
        "api:j",
        "--layers",
        "2",
        "--alphas",
        "0,1",
    ]
    with JudgeServer(scorer=token_scorer) as server:
        env = {"PERSONALAB_JUDGE_BASE_URL": server.base_url}
        result = runner.invoke(
            app,
            sweep + ["--eval-samples", "1", "--max-new-tokens", "3", "--out", str(tmp_path / "s"), "--device", "cpu"],
            env=env,
        )
        assert result.exit_code == 0, result.output
        tuned = [str(tmp_path / "ft" / "checkpoints" / f"step-{s}") for s in (2, 4, 6)]
        args = ["correlate", "--model", model, "--vector", str(vector), "--layer", "2", "--judge", "api:j"]
        args += [x for t in tuned for x in ("--tuned", t)] + ["--eval-samples", "1", "--max-new-tokens", "4"]
        result = runner.invoke(app, args + ["--out", str(tmp_path / "c"), "--device", "cpu"], env=env)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "c" / "correlate.csv")
    assert table["model"].tolist() == ["base", *tuned]
    from personalab.vectors import load_vectors

    v = load_vectors(vector)[0]["response_mean"][2]
    unit = v / v.norm()
    handles = [load_model(model, device="cpu", dtype="float32"), load_model(tuned[0], device="cpu", dtype="float32")]
    last = [
        np.mean([float(hidden_states(h, h.encode(None, q))[2, -1] @ unit) for q in TRAIT.evaluation_questions])
        for h in handles
    ]
    assert table.loc[1, "shift_last_prompt"] == pytest.approx(last[1] - last[0], abs=1e-4)
    assert table["role"].tolist() == ["reference", "point", "point", "point"]
    found = json.loads((tmp_path / "c" / "meta.json").read_text())["correlation"]
    exact = pearsonr(table["shift_last_prompt"][1:], table["trait_mean"][1:], method=PermutationMethod(np.inf))
    assert found["n"] == 3 and found["low"] is None and found["high"] is None
    if not np.isnan(exact.statistic):
        assert found["r"] == pytest.approx(exact.statistic) and found["p"] == pytest.approx(exact.pvalue)
    text = (tmp_path / "c" / "correlate.md").read_text()
    assert "over n = 3 fine-tunes" in text and "no interval below n = 10" in text and "not a point" in text
    assert "over n = 3 fine-tunes" in " ".join(result.output.split())
    assert (tmp_path / "c" / "correlate.png").is_file()


def test_bad_input_fails_before_training(model_folder, tmp_path, monkeypatch):
    model = str(model_folder("llama", "chatml"))
    data, vector = _data(tmp_path / "data.jsonl"), _vector(tmp_path)
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi?"}]}) + "\n")
    other = tmp_path / "other"
    save_vectors(other, {"response_mean": torch.randn(7, 48)}, {})
    second = tmp_path / "second"
    save_vectors(second, {"response_mean": torch.randn(4, 32)}, {})
    monkeypatch.setattr(model_module, "load_weights", lambda *a, **k: pytest.fail("the model was loaded"))
    cases = [
        (_command(model, no_answer, vector, tmp_path / "o"), "no_answer.jsonl line 1: no assistant answer"),
        (_command(model, data, other, tmp_path / "o"), "monitor vector"),
        (
            _command(model, data, vector, tmp_path / "o", "--steer-vector", str(vector), "--layer", "9"),
            "layer 9 is out of range",
        ),
        (
            _command(
                model,
                data,
                vector,
                tmp_path / "o",
                "--steer-vector",
                str(vector),
                "--ablate-vector",
                str(second),
                "--layer",
                "2",
            ),
            "--steer-vector and --ablate-vector at layer 2 use different vectors",
        ),
        (_command(model, data, vector, tmp_path / "o", "--monitor-layer", "7"), "layer 7 is out of range"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and message in result.output, (args[-4:], result.output)
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
