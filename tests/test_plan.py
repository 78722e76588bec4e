"""The plan before the work: ``extract`` and ``sweep`` print what they will sample and judge (what the store holds
left out), and ``--dry-run`` stops there without writing anything; counts checked against the trait's sizes."""

import pytest
import torch
from typer.testing import CliRunner

from personalab.cli import app
from personalab.traits import Trait
from personalab.vectors import save_vectors

from judge_server import JudgeServer, hashed_scores

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
    """The plan line, without the judge's address."""
    return " ".join(output.split()).split("plan: ")[1].split("@")[0]


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
def test_distill_and_compare_say_what_they_will_sample(model_folder, tmp_path):
    model = str(model_folder("llama", "chatml"))
    vector = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    save_vectors(tmp_path / "vec", {"response_mean": vector}, {})
    TRAIT.save(tmp_path / "vec" / "trait.json")
    common = ["--model", model, "--vector", str(tmp_path / "vec"), "--layer", "2", "--alpha", "1", "--device", "cpu"]
    distill = ["distill", *common, "--lora-rank", "2", "--trajectories", "4", "--steps", "1", "--micro-batch-size", "2"]
    distill += ["--grad-accum", "1", "--max-new-tokens", "3", "--out", str(tmp_path / "d")]
    trained = runner.invoke(app, distill)
    assert trained.exit_code == 0, trained.output
    assert "plan for trajectories: 4 answers (0 stored, 4 to sample, up to 12 new tokens)" in trained.output
    with JudgeServer(scorer=hashed_scores) as server:
        compare = ["compare", *common, "--judge", "api:j", "--eval-samples", "2", "--max-new-tokens", "3"]
        compare += ["--tuned", str(tmp_path / "d"), "--out", str(tmp_path / "c")]
        result = runner.invoke(app, compare, env={"PERSONALAB_JUDGE_BASE_URL": server.base_url})
    assert result.exit_code == 0, result.output
    n = len(TRAIT.evaluation_questions) * 2
    plans = [line for line in result.output.splitlines() if line.startswith("plan for ")]
    assert len(plans) == 3 and all(f": {n} answers (0 stored, {n} to sample, up to {n * 3} new tokens), up to {2 * n} "
                                   "judge calls to api:j" in " ".join(p.split()) for p in plans), plans  # fmt: skip
