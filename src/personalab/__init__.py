"""personalab: persona vectors in language models — extract, steer, monitor, distill.

Layer indices everywhere follow ``personalab.engine.layers``: layer ``l`` is
``hidden_states[l]`` of transformers, per-layer vectors are ``[n_blocks + 1, hidden]``. ``steer`` takes
``alpha`` on the commands' scale (normalised by default, ``personalab.engine.scale``); the engine's
``Steer`` and ``add_vector`` add ``alpha * vector`` as given.
The names below are imported on first use, so ``import personalab`` loads no model library.
"""

from importlib import import_module
from importlib.metadata import version
from typing import TYPE_CHECKING

__version__ = version("personalab")
"""The installed version (``pyproject.toml``'s), as ``personalab --version`` prints it."""

_EXPORTS = {
    "StudyResult": "personalab.api",
    "bake": "personalab.api",
    "compare": "personalab.api",
    "compose": "personalab.api",
    "correlate": "personalab.api",
    "cosine": "personalab.api",
    "deepscan": "personalab.api",
    "distill": "personalab.api",
    "extract": "personalab.api",
    "feature_diff": "personalab.api",
    "features": "personalab.api",
    "finetune": "personalab.api",
    "judge": "personalab.api",
    "localize": "personalab.api",
    "project": "personalab.api",
    "report": "personalab.api",
    "steer_answers": "personalab.api",
    "sweep": "personalab.api",
    "trace": "personalab.api",
    "PersonaVector": "personalab.persona",
    "feature_vector": "personalab.persona",
    "steer": "personalab.persona",
    "Ablate": "personalab.engine.interventions",
    "ChatFormat": "personalab.engine.chat",
    "Clamp": "personalab.engine.interventions",
    "GeneratedToken": "personalab.engine.positions",
    "Indices": "personalab.engine.positions",
    "ModelHandle": "personalab.engine.handle",
    "PersonalabError": "personalab.errors",
    "PersonalabWarning": "personalab.errors",
    "Steer": "personalab.engine.interventions",
    "Substitute": "personalab.engine.interventions",
    "TokenSequence": "personalab.engine.chat",
    "capture": "personalab.engine.capture",
    "encode_text": "personalab.engine.chat",
    "generate_text": "personalab.engine.generation",
    "intervene": "personalab.engine.interventions",
    "load_model": "personalab.engine.loading",
    "load_sae": "personalab.sae",
    "add_vector": "personalab.engine.interventions",
}

__all__ = [
    "StudyResult",
    "bake",
    "compare",
    "compose",
    "correlate",
    "cosine",
    "deepscan",
    "distill",
    "extract",
    "feature_diff",
    "features",
    "finetune",
    "judge",
    "localize",
    "project",
    "report",
    "steer_answers",
    "sweep",
    "trace",
    "PersonaVector",
    "Ablate",
    "ChatFormat",
    "Clamp",
    "GeneratedToken",
    "Indices",
    "ModelHandle",
    "PersonalabError",
    "PersonalabWarning",
    "Steer",
    "Substitute",
    "TokenSequence",
    "capture",
    "encode_text",
    "generate_text",
    "intervene",
    "load_model",
    "feature_vector",
    "load_sae",
    "steer",
    "add_vector",
]

if TYPE_CHECKING:
    from personalab.api import (
        StudyResult,
        bake,
        compare,
        compose,
        correlate,
        cosine,
        deepscan,
        distill,
        extract,
        feature_diff,
        features,
        finetune,
        judge,
        localize,
        project,
        report,
        steer_answers,
        sweep,
        trace,
    )  # fmt: skip
    from personalab.engine.capture import capture
    from personalab.engine.chat import ChatFormat, TokenSequence, encode_text
    from personalab.engine.generation import generate_text
    from personalab.engine.handle import ModelHandle
    from personalab.engine.interventions import Ablate, Clamp, Steer, Substitute, add_vector, intervene
    from personalab.engine.loading import load_model
    from personalab.engine.positions import GeneratedToken, Indices
    from personalab.errors import PersonalabError, PersonalabWarning
    from personalab.persona import PersonaVector, feature_vector, steer
    from personalab.sae import load_sae


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'personalab' has no attribute {name!r}")
