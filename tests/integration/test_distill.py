import json
import os
import sqlite3
import subprocess
import sys
from contextlib import closing

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from helpers.judge_server import JudgeServer
from helpers.reference import hidden_states
from safetensors.torch import load_file
from typer.testing import CliRunner

from personalab import add_vector, load_model
from personalab.cli import app
from personalab.engine.batching import pad_batch
from personalab.engine.chat import encode_text
from personalab.engine.forward import final_hidden, logits_fn, response_mask
from personalab.engine.generation import SamplingParams
from personalab.engine.losses import chunked_kl
from personalab.errors import InvalidInputError
from personalab.methods.bake import bake_exact
from personalab.methods.distill import DistillConfig, check_inputs, distill, trajectories
from personalab.store import Store
from personalab.vectors import load_vectors, save_vectors

pytestmark = pytest.mark.slow  # training runs


def test_chunked_kl_equals_kl_div():
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hs = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    ht = torch.randn(3, 7, 16, generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.4
    got = chunked_kl(hs, ht, mask, head, head, chunk=4)
    ref = (
        F.kl_div(F.log_softmax(head(hs), -1), F.log_softmax(head(ht), -1), log_target=True, reduction="none")
        .sum(-1)[mask]
        .mean()
    )
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    (grad,) = torch.autograd.grad(got, hs)
    (ref_grad,) = torch.autograd.grad(ref, hs)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)


def test_final_hidden_and_response_mask(tiny, conversations):
    handle = tiny("gemma2", "gemma")
    seqs = [handle.encode(s, u, a) for s, u, a in conversations[:3]]
    batch = pad_batch([s.ids for s in seqs], handle.tokenizer.pad_token_id, "right")
    with torch.no_grad():
        got = final_hidden(handle, batch)
        full = handle.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    for b, seq in enumerate(seqs):
        torch.testing.assert_close(got[b, : len(seq.ids)], hidden_states(handle, seq)[-1], atol=1e-5, rtol=1e-5)

    real = batch.attention_mask.bool()
    torch.testing.assert_close(logits_fn(handle)(got)[real], full[real], atol=1e-4, rtol=1e-4)
    mask = response_mask(seqs, batch)
    assert [int(m.sum()) for m in mask] == [s.response_len for s in seqs]
    assert all(mask[b, s.prompt_len - 1] and not mask[b, s.prompt_len - 2] for b, s in enumerate(seqs))


CONFIG = DistillConfig(
    layer=2,
    alpha=6.0,
    lora_rank=4,
    trajectories=24,
    steps=30,
    micro_batch_size=4,
    grad_accum=1,
    lr=2e-2,
    warmup_steps=2,
    sampling=SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=12),
    held_out=0.25,
)


@pytest.mark.parametrize("lora", [True, False])
def test_student_learns_the_steered_teacher(model_folder, tmp_path, lora):
    handle = load_model(str(model_folder("llama", "chatml")), device="cpu", dtype="float32")
    handle.name = "tiny-llama-distill"
    vector = torch.randn(handle.hidden_size, generator=torch.Generator().manual_seed(3))
    prompts = [handle.encode(None, q) for q in ("Hi?", "What is bread?", "Tell me a story.", "How are you?")]
    config = CONFIG if lora else CONFIG.model_copy(update={"lora_rank": None, "lr": 1e-3})
    result = distill(handle, vector, prompts, config, tmp_path, progress=False)
    held = result.held_out
    assert held["kl_end"] <= 0.5 * held["kl_start"]
    assert held["kl_end"] < held["kl_to_base_end"]
    assert (tmp_path / ("adapter" if lora else "model")).is_dir() and (tmp_path / "training_curve.png").is_file()
    assert len((tmp_path / "training_curve.csv").read_text().splitlines()) == config.steps + 1
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["mixed_precision"] == "no" and meta["processes"] == 1


def test_bf16_autocast_on_a_bf16_base_trains_a_float32_adapter(model_folder, tmp_path):
    handle = load_model(str(model_folder("llama", "chatml")), device="cpu", dtype="bfloat16")
    handle.name = "tiny-llama-distill"
    vector = torch.randn(handle.hidden_size, generator=torch.Generator().manual_seed(3))
    prompts = [handle.encode(None, q) for q in ("Hi?", "What is bread?", "Tell me a story.", "How are you?")]
    dtypes = set()
    handle.blocks[0].self_attn.q_proj.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    result = distill(handle, vector, prompts, CONFIG.model_copy(update={"mixed_precision": "bf16"}), tmp_path, False)
    assert torch.bfloat16 in dtypes
    assert {p.dtype for p in result.student.parameters() if p.requires_grad} == {torch.float32}
    assert result.held_out["kl_end"] <= 0.5 * result.held_out["kl_start"]
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert (meta["mixed_precision"], meta["weights_dtype"]) == ("bf16", "bfloat16")


def _launch_distill(model: str, vector, out, processes: int, grad_accum: int, *extra: str):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    cmd += ["-m", "personalab", "distill", "--model", model, "--vector", str(vector), "--layer", "2", "--alpha", "6"]
    cmd += ["--trait", "evil", "--trajectories", "24", "--steps", "3", "--micro-batch-size", "2", "--lr", "0.01"]
    cmd += ["--warmup-steps", "1", "--max-new-tokens", "8", "--device", "cpu", "--out", str(out)]
    cmd += ["--grad-accum", str(grad_accum), *extra]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((out / "meta.json").read_text())


@pytest.mark.parametrize("mode", [("--lora-rank", "4"), ("--full", "--gradient-checkpointing")], ids=["lora", "full"])
def test_two_processes_train_as_one_with_twice_the_accumulation(model_folder, tmp_path, mode):
    model = str(model_folder("llama", "chatml"))
    vector = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    save_vectors(tmp_path / "vec", {"response_mean": vector}, {})
    one = _launch_distill(model, tmp_path / "vec", tmp_path / "one", 1, 2, *mode)
    two = _launch_distill(model, tmp_path / "vec", tmp_path / "two", 2, 1, *mode)
    assert (one["processes"], two["processes"]) == (1, 2) and two["weights_dtype"] == "float32"
    query = "SELECT key, text FROM generations ORDER BY key"
    texts = []
    for run in ("one", "two"):
        with closing(sqlite3.connect(tmp_path / run / "generations.sqlite")) as db:
            texts.append(db.execute(query).fetchall())
    assert texts[0] == texts[1] and len(texts[0]) == 24
    curves = [pd.read_csv(tmp_path / run / "training_curve.csv")["loss"] for run in ("one", "two")]
    assert curves[0].iloc[-1] < curves[0].iloc[0]
    torch.testing.assert_close(torch.tensor(curves[1].values), torch.tensor(curves[0].values), rtol=1e-5, atol=0)
    for key in ("kl_start", "kl_end", "kl_to_base_end"):
        assert two["held_out_kl"][key] == pytest.approx(one["held_out_kl"][key], rel=1e-5)
    name = "adapter/adapter_model.safetensors" if mode[0] == "--lora-rank" else "model/model.safetensors"
    weights = [load_file(tmp_path / run / name) for run in ("one", "two")]
    base = load_file(model_folder("llama", "chatml") / "model.safetensors")
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-5, atol=1e-6)
    if mode[0] == "--full":
        assert any(not torch.equal(weights[0][k], base[k]) for k in base if k in weights[0])


def test_a_trajectory_that_stopped_keeps_its_end_of_sequence_token(planted_checkpoints, tmp_path):
    """The planted model ends each line with end-of-sequence; trajectories must keep it as the last target."""
    from accelerate import Accelerator

    handle = load_model(str(planted_checkpoints[300]), device="cpu", dtype="float32")
    texts = ("Jordan is kind. If Jordan found a wallet, Jordan would", "If Jordan saw a bird, Jordan would")
    prompts = [encode_text(handle.tokenizer, t) for t in texts]
    config = CONFIG.model_copy(update={"layer": 1, "trajectories": 12, "sampling": SamplingParams(max_new_tokens=32)})
    v = torch.randn(handle.hidden_size, generator=torch.Generator().manual_seed(0))
    with Store(tmp_path / "s.sqlite") as store:
        seqs = trajectories(handle, v * 1e-3, prompts, store, config, False, Accelerator(cpu=True))
    with closing(sqlite3.connect(tmp_path / "s.sqlite")) as db:
        stops = [stop for (stop,) in db.execute("SELECT stop FROM generations")]
    eos = handle.tokenizer.eos_token_id
    assert len(seqs) == len(stops) == 12 and stops.count(eos) >= 6, stops
    assert sum(s.ids[-1] == eos for s in seqs) == stops.count(eos)
    assert all(eos not in s.ids[s.prompt_len : -1] for s in seqs)


def test_bad_input_fails_before_any_work(tiny, tmp_path):
    handle = tiny("llama", "chatml")
    prompts = [handle.encode(None, "Hi?")]
    v = torch.ones(handle.hidden_size)
    with pytest.raises(InvalidInputError, match="hidden size is 32"):
        check_inputs(handle, torch.ones(7), prompts, CONFIG)
    with pytest.raises(InvalidInputError, match="out of range"):
        check_inputs(handle, v, prompts, CONFIG.model_copy(update={"layer": 9}))
    with pytest.raises(InvalidInputError, match="prompt set is empty"):
        check_inputs(handle, v, [], CONFIG)
    with pytest.raises(Exception, match="greater than or equal to 1"):
        DistillConfig(layer=1, alpha=1.0, lora_rank=0)


def test_distill_ablation_and_compare_commands(model_folder, tmp_path):
    runner = CliRunner()
    model = str(model_folder("llama", "chatml"))
    save_vectors(
        tmp_path / "vec", {"response_mean": torch.randn(4, 32, generator=torch.Generator().manual_seed(1))}, {}
    )
    args = ["distill", "--model", model, "--vector", str(tmp_path / "vec"), "--layer", "2", "--alpha", "4"]
    args += ["--trait", "evil", "--steps", "3", "--micro-batch-size", "2", "--grad-accum", "1", "--max-new-tokens", "6"]
    args += ["--device", "cpu", "--out", str(tmp_path / "d")]
    assert "choose one of --lora-rank R or --full" in runner.invoke(app, args).output
    bad = runner.invoke(app, args + ["--lora-rank", "2", "--mixed-precision", "fp8"])
    assert bad.output == "error: invalid --mixed-precision: Input should be 'auto', 'bf16' or 'no'\n"
    assert not (tmp_path / "d").exists()
    result = runner.invoke(app, args + ["--lora-rank", "2", "--trajectories", "8,16", "--merge"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "d" / "ablation.csv")
    assert table["trajectories"].tolist() == [8, 16] and (table["trainable"] > 0).all()
    for n in (8, 16):
        assert (tmp_path / "d" / f"trajectories-{n}" / "adapter").is_dir()
        assert (tmp_path / "d" / f"trajectories-{n}" / "model" / "config.json").is_file()

    handle = load_model(model, device="cpu", dtype="float32")
    bake_exact(handle, load_vectors(tmp_path / "vec")[0]["response_mean"], 2, 4.0, tmp_path / "baked")
    with JudgeServer(scorer=lambda prompt: {"60": 0.5, "80": 0.5}) as server:
        compare = ["compare", "--model", model, "--vector", str(tmp_path / "vec"), "--layer", "2", "--alpha", "4"]
        compare += [
            "--trait",
            "evil",
            "--judge",
            "api:j",
            "--eval-samples",
            "1",
            "--max-new-tokens",
            "4",
            "--device",
            "cpu",
        ]
        compare += ["--tuned", str(tmp_path / "d" / "trajectories-8"), "--out", str(tmp_path / "c")]
        compare += ["--tuned", str(tmp_path / "baked")]
        result = runner.invoke(app, compare, env={"PERSONALAB_JUDGE_BASE_URL": server.base_url})
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(tmp_path / "c" / "compare.csv")
    assert rows["model"].tolist()[:2] == ["base", "steered layer 2 alpha 4"] and len(rows) == 4
    assert (rows["trait_mean"] == 70.0).all() and rows["trainable"].tolist()[2] == table["trainable"][0]
    assert "| base | 70.0 +- 0.0 |" in (tmp_path / "c" / "compare.md").read_text()
    answers = pd.read_json(tmp_path / "c" / "answers.jsonl", lines=True)
    for row in answers.itertuples():  # every model's fluency is its answers' NLL under the base model, by hand
        prompt = list(handle.encode(None, row.question_text).ids)
        ids = prompt + handle.tokenizer.encode(row.answer, add_special_tokens=False)
        if len(ids) == len(prompt):  # an answer of no tokens has no NLL
            assert np.isnan(row.nll)
            continue
        with torch.no_grad():
            logp = torch.log_softmax(handle.model(torch.tensor([ids])).logits[0].double(), dim=-1)
        assert row.nll == pytest.approx(-np.mean([logp[t - 1, ids[t]].item() for t in range(len(prompt), len(ids))]))
    for row in rows.itertuples():
        assert row.nll_mean == pytest.approx(answers[answers.model == row.model].nll.mean())
    assert np.isnan(rows["delta_nll_vs_base"][0]) and rows["delta_nll_vs_base"][1:].notna().all()


def test_bake_command_and_compare_with_the_exact_bake(model_folder, tiny, tmp_path):
    runner = CliRunner()
    handle = tiny("gpt2", "none")
    model = str(model_folder("gpt2", "none"))
    vector = torch.randn(handle.n_layers, handle.hidden_size, generator=torch.Generator().manual_seed(4))
    save_vectors(tmp_path / "vec", {"response_mean": vector}, {})
    args = [
        "bake",
        "--model",
        model,
        "--vector",
        str(tmp_path / "vec"),
        "--layer",
        "2",
        "--alpha",
        "3",
        "--scale",
        "raw",
    ]
    args += ["--out", str(tmp_path / "baked"), "--device", "cpu"]
    assert "pass --exact" in runner.invoke(app, args).output
    result = runner.invoke(app, args + ["--exact"])
    assert result.exit_code == 0, result.output
    baked = load_model(str(tmp_path / "baked"), device="cpu", dtype="float32")
    batch = pad_batch([handle.encode(None, "Tell me a story.", "Once upon a time").ids], 0, "right")
    with torch.no_grad(), add_vector(handle, vector, 2, alpha=3.0):
        steered = handle.model(input_ids=batch.input_ids).logits
    with torch.no_grad():
        torch.testing.assert_close(baked.model(input_ids=batch.input_ids).logits, steered, atol=1e-5, rtol=1e-5)
