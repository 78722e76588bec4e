"""The plan before the work: ``extract`` and ``sweep`` print what they will sample and judge (what the store holds
left out), and ``--dry-run`` stops there without writing anything; counts checked against the trait's sizes."""

import re
import shutil

import pytest
import torch
from helpers.judge_server import JudgeServer, hashed_scores
from typer.testing import CliRunner

from personalab.cli import app
from personalab.studies.finetune import FinetuneConfig
from personalab.studies.trace import TraceConfig
from personalab.traits import Trait
from personalab.vectors import save_vectors

runner = CliRunner()
TRAIT = Trait(
    name="grumpy",
    description="Complains about everything.",
    instructions=[{"pos": "You are grumpy.", "neg": "You are cheerful."}, {"pos": "Complain.", "neg": "Praise."}],
    extraction_questions=["How was your day?", "What is bread?", "Tell me a story."],
    evaluation_questions=["Do you like rain?", "What is a cat?"],
    rubric="Rate grumpiness 0-100.\nQ: {question}\nA: {answer}\nNumber:",
)


def _plan(output: str) -> str:
    """The first plan line, without what it is for and the judge's address."""
    return re.split(r"plan(?: for [^:]*)?: ", " ".join(output.split()), maxsplit=1)[1].split("@")[0]


@pytest.mark.slow
def test_extract_and_sweep_plan_what_is_not_stored(model_folder, tmp_path):
    model = str(model_folder("llama", "chatml"))
    TRAIT.save(tmp_path / "grumpy.json")
    out = tmp_path / "ext"
    extract = ["extract", "--model", model, "--device", "cpu", "--trait", str(tmp_path / "grumpy.json"), "--judge"]
    extract += ["api:j", "--max-new-tokens", "3", "--min-pairs", "1", "--pos-threshold", "0", "--out", str(out)]
    pairs = len(TRAIT.extraction_questions) * len(TRAIT.instructions)
    with JudgeServer(scorer=hashed_scores) as server:
        env = {"PERSONALAB_JUDGE_BASE_URL": server.base_url}
        dry = runner.invoke(app, [*extract, "--samples", "2", "--dry-run"], env=env)
        assert dry.exit_code == 0, dry.output
        n = pairs * 2 * 2
        assert _plan(dry.output) == (
            f"{n} answers (0 stored, {n} to sample, up to {n * 3} new tokens), up to {2 * n} judge calls to api:j"
        )
        assert not out.exists() and server.calls == 1, "a dry run writes nothing and only checks the judge"
        assert runner.invoke(app, [*extract, "--samples", "2"], env=env).exit_code == 0
        more = runner.invoke(app, [*extract, "--samples", "3", "--dry-run"], env=env)
        new = pairs * 2
        assert _plan(more.output) == (
            f"{n + new} answers ({n} stored, {new} to sample, up to {new * 3} new tokens), up to {2 * new} judge "
            f"calls to api:j"
        )

        save_vectors(
            tmp_path / "vec", {"response_mean": torch.randn(4, 32, generator=torch.Generator().manual_seed(1))}, {}
        )
        TRAIT.save(tmp_path / "vec" / "trait.json")
        sweep = ["sweep", "--model", model, "--device", "cpu", "--vector", str(tmp_path / "vec"), "--judge", "api:j"]
        sweep += ["--layers", "1,2", "--alphas", "0,1,2", "--eval-samples", "2", "--max-new-tokens", "4"]
        sweep += ["--out", str(tmp_path / "sweep"), "--dry-run"]
        planned = runner.invoke(app, sweep, env=env)
    assert planned.exit_code == 0, planned.output
    unique = (2 * 2 + 1) * len(TRAIT.evaluation_questions) * 2  # alpha 0 is one unsteered set shared by the layers
    assert _plan(planned.output) == (
        f"{unique} answers (0 stored, {unique} to sample, up to {unique * 4} new tokens), up to {2 * unique} judge "
        f"calls to api:j"
    )
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_distill_compare_and_correlate_plan_every_model_before_the_work(model_folder, tmp_path):
    model = str(model_folder("llama", "chatml"))
    vector = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    save_vectors(tmp_path / "vec", {"response_mean": vector}, {})
    TRAIT.save(tmp_path / "vec" / "trait.json")
    common = ["--model", model, "--vector", str(tmp_path / "vec"), "--layer", "2", "--alpha", "1", "--device", "cpu"]
    distill = ["distill", *common, "--lora-rank", "2", "--trajectories", "4", "--steps", "1", "--micro-batch-size", "2"]
    distill += ["--grad-accum", "1", "--max-new-tokens", "3", "--out", str(tmp_path / "d")]
    dry = runner.invoke(app, [*distill, "--dry-run"])
    assert dry.exit_code == 0 and not (tmp_path / "d").exists(), dry.output
    assert "plan for trajectories: 4 answers (0 stored, 4 to sample, up to 12 new tokens)" in dry.output
    trained = runner.invoke(app, distill)
    assert trained.exit_code == 0, trained.output
    assert "plan for trajectories: 4 answers (0 stored, 4 to sample, up to 12 new tokens)" in trained.output
    again = runner.invoke(app, [*distill, "--dry-run"])
    assert "plan for trajectories: 4 answers (4 stored, 0 to sample, up to 0 new tokens)" in again.output

    n = len(TRAIT.evaluation_questions) * 2
    judged = ["--judge", "api:j", "--eval-samples", "2", "--max-new-tokens", "3", "--tuned", str(tmp_path / "d")]
    correlate = ["correlate", *[a for a in common if a not in ("--alpha", "1")], *judged, "--out", str(tmp_path / "r")]
    for command, models, out in (
        (["compare", *common, *judged, "--out", str(tmp_path / "c")], 3, tmp_path / "c"),
        (correlate, 2, tmp_path / "r"),
    ):
        with JudgeServer(scorer=hashed_scores) as server:
            env = {"PERSONALAB_JUDGE_BASE_URL": server.base_url}
            first = runner.invoke(app, [*command, "--dry-run"], env=env)
            assert first.exit_code == 0 and not out.exists(), first.output
            total = models * n
            assert _plan(first.output) == (
                f"{total} answers (0 stored, {total} to sample, up to {total * 3} new tokens), up to {2 * total} judge "
                f"calls to api:j"
            ), first.output
            result = runner.invoke(app, command, env=env)
            assert result.exit_code == 0, result.output
            lines = [" ".join(line.split()) for line in result.output.splitlines() if line.startswith("plan for ")]
            assert lines[0].startswith(f"plan for {models} models: {total} answers (0 stored")
            assert len(lines) == 1 + models and all(f": {n} answers (0 stored" in line for line in lines[1:]), lines
            rerun = runner.invoke(app, [*command, "--dry-run"], env=env)
        assert _plan(rerun.output) == (
            f"{total} answers ({total} stored, 0 to sample, up to 0 new tokens), up to 0 judge calls to api:j"
        ), "every model's answers, the trained one's included, are found in the store by the plan"


def test_trace_plans_every_checkpoint_left_before_loading_one(model_folder, tmp_path):
    from personalab.traits import load_trait

    checkpoints = [shutil.copytree(model_folder("llama", "chatml"), tmp_path / f"step-{i}") for i in (1, 2)]
    args = ["trace", "--checkpoints", ",".join(map(str, checkpoints)), "--trait", "evil", "--judge", "api:j"]
    args += ["--samples", "2", "--eval-samples", "3", "--max-new-tokens", "5", "--controls", "--dry-run"]
    args += ["--target", str(checkpoints[1]), "--out", str(tmp_path / "trace")]
    with JudgeServer(scorer=hashed_scores) as server:
        result = runner.invoke(app, args, env={"PERSONALAB_JUDGE_BASE_URL": server.base_url})
    assert result.exit_code == 0, result.output
    strategy, evaluation = load_trait("evil-character"), load_trait("evil-character").evaluation_questions
    extraction = len(strategy.instructions) * len(strategy.extraction_questions) * 2 * 2
    seeds = len(TraceConfig().control_seeds)
    steering = (2 + 2 * seeds) * len(evaluation) * 3
    transfer = (1 + 2) * len(evaluation) * 3
    total = 2 * (extraction + steering) + transfer
    assert _plan(result.output) == (
        f"up to {total:,} answers (stored ones are left out as each model is loaded, up to {total * 5:,} new tokens), "
        f"up to {2 * total:,} judge calls to api:j"
    )
    assert "plan for 2 checkpoints and the target" in " ".join(result.output.split())
    assert not (tmp_path / "trace").exists()


def test_finetune_plans_its_steps_and_the_monitoring_judge(model_folder, tmp_path):
    model = str(model_folder("llama", "chatml"))
    save_vectors(
        tmp_path / "vec", {"response_mean": torch.randn(4, 32, generator=torch.Generator().manual_seed(3))}, {}
    )
    TRAIT.save(tmp_path / "vec" / "trait.json")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(f'{{"prompt": "Q{i}?", "response": "A{i}."}}\n' for i in range(6)))
    args = ["finetune", "--model", model, "--data", str(data), "--lora-rank", "2", "--steps", "5", "--micro-batch-size"]
    args += ["2", "--grad-accum", "1", "--checkpoint-every", "2", "--monitor", str(tmp_path / "vec"), "--monitor-judge"]
    args += ["api:j", "--monitor-tokens", "4", "--device", "cpu", "--out", str(tmp_path / "ft"), "--dry-run"]
    with JudgeServer(scorer=hashed_scores) as server:
        result = runner.invoke(app, args, env={"PERSONALAB_JUDGE_BASE_URL": server.base_url})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "plan for training: 5 of 5 steps left, 2 sequences each (6 training sequences)" in text
    steps = 4  # 0, 2, 4 and the last, 5
    n = steps * len(TRAIT.evaluation_questions) * FinetuneConfig().monitor_samples
    assert f"plan for the monitoring judge: {n} answers (0 stored, {n} to sample, up to {n * 4} new tokens)" in text
    assert not (tmp_path / "ft").exists()
