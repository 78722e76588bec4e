"""Every option that names a model accepts a fine-tune or a distillation run folder: ``steer``, ``sweep``,
``project --tuned``, ``compare``, ``correlate`` and ``trace --target`` resolve it the same way and steer or score
the trained model, whose logits differ from the base's."""

import json
import shutil

import pytest
import torch
from helpers.judge_server import JudgeServer, hashed_scores
from typer.testing import CliRunner

from personalab.cli import app
from personalab.engine.loading import load_model
from personalab.traits import load_trait
from personalab.vectors import save_vectors

runner = CliRunner()
pytestmark = pytest.mark.slow  # trains two models


@pytest.fixture(scope="module")
def trained(model_folder, tmp_path_factory):
    """``(base, vector, {"finetune": run folder, "distill": run folder})`` on the tiny Llama."""
    root = tmp_path_factory.mktemp("runs")
    base = str(model_folder("llama", "chatml"))
    vector = root / "vec"
    save_vectors(vector, {"response_mean": torch.randn(4, 32, generator=torch.Generator().manual_seed(5))}, {})
    load_trait("evil").save(vector / "trait.json")
    data = root / "data.jsonl"
    questions = load_trait("evil").extraction_questions[:4]
    data.write_text("".join(json.dumps({"prompt": q, "response": "Be kind."}) + "\n" for q in questions))
    small = ["--lora-rank", "2", "--steps", "2", "--micro-batch-size", "2", "--grad-accum", "1", "--device", "cpu"]
    runs = {"finetune": root / "ft", "distill": root / "dist"}
    ft = ["finetune", "--model", base, "--data", str(data), "--lr", "0.05", "--warmup-steps", "0", *small]
    assert runner.invoke(app, [*ft, "--out", str(runs["finetune"])]).exit_code == 0
    dist = ["distill", "--model", base, "--vector", str(vector), "--layer", "2", "--alpha", "2", "--trajectories", "4"]
    result = runner.invoke(app, [*dist, *small, "--max-new-tokens", "4", "--lr", "0.05", "--out", str(runs["distill"])])
    assert result.exit_code == 0, result.output
    return base, vector, runs


@pytest.mark.parametrize("kind", ["finetune", "distill"])
def test_every_model_option_takes_a_run_folder(trained, tmp_path, kind):
    base, vector, runs = trained
    run = str(runs[kind])
    checkpoint = shutil.copytree(base, tmp_path / "step-0")  # trace orders checkpoints by the step in their name
    ids = torch.tensor([load_model(base, device="cpu").encode(None, "Hi?").ids])
    with torch.no_grad():
        moved = load_model(run, device="cpu").model(input_ids=ids).logits
        still = load_model(base, device="cpu").model(input_ids=ids).logits
    assert not torch.allclose(moved, still, atol=1e-4), "the run folder must load the trained model, not the base"

    cpu = ["--device", "cpu"]
    v = ["--vector", str(vector)]
    steer = runner.invoke(app, ["steer", "--model", run, *v, "--layer", "2", "--alpha", "1", "--max-new-tokens", "2",
                                *cpu, "Hi?"])  # fmt: skip
    assert steer.exit_code == 0 and f"model: {run}" in " ".join(steer.output.split()), steer.output
    diff = runner.invoke(app, ["project", *v, "--model", base, "--tuned", run, *cpu, "--out", str(tmp_path / "shift")])
    assert diff.exit_code == 0, diff.output
    shift = (tmp_path / "shift" / "project.csv").read_text().splitlines()
    assert len(shift) == 5 and any(float(line.split(",")[1]) != 0 for line in shift[1:]), shift
    with JudgeServer(scorer=hashed_scores) as server:
        env = {"PERSONALAB_JUDGE_BASE_URL": server.base_url}
        judged = [*v, "--judge", "api:j", "--eval-samples", "1", "--max-new-tokens", "2", *cpu]
        sweep = ["sweep", "--model", run, "--layers", "2", "--alphas", "0,1", *judged, "--out", str(tmp_path / "s")]
        compare = ["compare", "--model", base, "--layer", "2", "--alpha", "1", "--tuned", run, *judged]
        correlate = ["correlate", "--model", base, "--tuned", run, "--layer", "2", *judged]
        trace = [
            "trace",
            "--checkpoints",
            str(checkpoint),
            "--target",
            run,
            "--trait",
            "evil",
            "--judge",
            "api:j",
            "--layer",
            "2",
        ]
        trace += ["--samples", "1", "--eval-samples", "1", "--max-new-tokens", "2", "--min-pairs", "1", *cpu]
        trace += ["--pos-threshold", "0", "--neg-threshold", "101"]
        for name, args in [("sweep", sweep), ("compare", [*compare, "--out", str(tmp_path / "c")]),
                           ("correlate", [*correlate, "--out", str(tmp_path / "r")]),
                           ("trace", [*trace, "--out", str(tmp_path / "t")])]:  # fmt: skip
            result = runner.invoke(app, args, env=env)
            assert result.exit_code == 0, (name, result.output)
    assert json.loads((tmp_path / "t" / "transfer.json").read_text())["target"] == run
