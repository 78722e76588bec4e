import pytest
import torch
from helpers.models import ARCHS, BLOCKS, HIDDEN
from torch import nn
from transformers import PretrainedConfig

from personalab import PersonalabError, load_model
from personalab.engine.architectures import KNOWN_BLOCK_PATHS, find_blocks
from personalab.engine.handle import ModelHandle
from personalab.errors import InvalidInputError, UnsupportedArchitectureError


@pytest.mark.parametrize("arch", ARCHS)
def test_load_model_finds_blocks_for_every_architecture(tiny, arch):
    handle = tiny(arch)
    assert handle.model.config.model_type == arch
    assert handle.blocks_path == KNOWN_BLOCK_PATHS[arch]
    assert handle.n_blocks == BLOCKS == handle.model.config.num_hidden_layers
    assert handle.n_layers == BLOCKS + 1
    assert handle.hidden_size == HIDDEN
    assert handle.blocks is handle.model.get_submodule(handle.blocks_path)
    assert handle.dtype == torch.float32


class _Opaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = PretrainedConfig(num_hidden_layers=2)
        self.stuff = nn.Linear(4, 4)


def test_unknown_architecture_names_the_paths_it_tried():
    with pytest.raises(UnsupportedArchitectureError) as err:
        find_blocks(_Opaque())
    message = str(err.value)
    assert "\n" not in message
    for path in ("model.layers", "transformer.h", "gpt_neox.layers"):
        assert path in message
    assert "blocks_path=" in message


def test_generic_fallback_finds_a_modulelist_of_num_hidden_layers():
    model = _Opaque()
    model.trunk = nn.Module()
    model.trunk.stages = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
    path, blocks = find_blocks(model)
    assert path == "trunk.stages" and blocks is model.trunk.stages


def test_blocks_path_override(tiny):
    handle = tiny("llama")
    path, blocks = find_blocks(handle.model, blocks_path="model.layers")
    assert blocks is handle.blocks


def test_from_model_wraps_a_peft_model(tiny):
    peft = pytest.importorskip("peft")
    handle = tiny("llama")
    wrapped = peft.get_peft_model(handle.model, peft.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="t")
    try:
        inner = ModelHandle.from_model(wrapped, handle.tokenizer)
        assert inner.n_blocks == handle.n_blocks
        assert inner.blocks[0] is wrapped.get_base_model().model.layers[0]
    finally:
        wrapped.unload()


def test_float16_on_cpu_is_refused(model_folder):
    with pytest.raises(InvalidInputError, match="float16 is not supported on CPU"):
        load_model(str(model_folder("llama")), device="cpu", dtype="float16")


def test_bfloat16_loads_on_cpu(model_folder):
    handle = load_model(str(model_folder("llama")), device="cpu", dtype="bfloat16")
    assert handle.dtype == torch.bfloat16


def test_missing_model_is_a_one_line_error(tmp_path):
    with pytest.raises(PersonalabError) as err:
        load_model(str(tmp_path / "nope"), device="cpu")
    assert "\n" not in str(err.value) and "nope" in str(err.value)


def test_a_device_the_machine_lacks_is_an_error_naming_the_ones_it_has(model_folder, monkeypatch):
    from personalab.engine import loading as engine_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(engine_model, "load_weights", lambda *a, **k: pytest.fail("loaded before the check"))
    for device in ("cuda", "cuda:1", "tpu"):
        with pytest.raises(InvalidInputError, match=rf"`device` {device} is not on this machine.*one of cpu"):
            load_model(str(model_folder("llama")), device=device)
    for device in ("auto", "cpu", "cpu:0"):  # accelerate gives each process of a CPU launch "cpu:N"
        assert engine_model.resolve_device(device) == ("cpu" if device == "auto" else device)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_deferred_weights_load_once_when_a_forward_needs_them(model_folder, monkeypatch, arch):
    """``defer_weights``: the handle knows its shape, dtype, architecture, blocks path and stop tokens from an empty
    copy (no weights read), and loads the weights once, the first time the model is used; then it is the model an
    eager load gives."""
    from personalab.engine import loading as model_module

    folder = str(model_folder(arch, "chatml"))
    eager = load_model(folder, device="cpu", dtype="float32")
    loads = []
    real = model_module.load_weights
    monkeypatch.setattr(model_module, "load_weights", lambda *a, **k: loads.append(a) or real(*a, **k))
    lazy = load_model(folder, device="cpu", dtype="float32", defer_weights=True)
    shape = ("n_blocks", "hidden_size", "blocks_path", "dtype", "architecture", "stop_ids", "origin")
    assert [getattr(lazy, f) for f in shape] == [getattr(eager, f) for f in shape]
    assert not loads and not lazy.weights_loaded and lazy.module.device.type == "meta"
    ids = torch.tensor([lazy.encode(None, "Hi?").ids])
    torch.testing.assert_close(lazy.model(input_ids=ids).logits, eager.model(input_ids=ids).logits, rtol=0, atol=0)
    assert len(lazy.blocks) == eager.n_blocks and lazy.weights_loaded and len(loads) == 1
