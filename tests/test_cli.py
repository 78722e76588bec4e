from typer.testing import CliRunner

from personalab.cli import app

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
