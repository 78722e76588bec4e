"""personalab: persona vectors in language models — extract, steer, monitor, distill.

Layer indices everywhere follow ``personalab.engine.layers``: layer ``l`` is
``hidden_states[l]`` of transformers, per-layer vectors are ``[n_blocks + 1, hidden]``.
The names below are imported on first use, so ``import personalab`` loads no model library.
"""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "Ablate": "personalab.engine.interventions",
    "ChatFormat": "personalab.engine.chat",
    "Clamp": "personalab.engine.interventions",
    "GeneratedToken": "personalab.engine.positions",
    "Indices": "personalab.engine.positions",
    "ModelHandle": "personalab.engine.model",
    "PersonalabError": "personalab.errors",
    "Steer": "personalab.engine.interventions",
    "Substitute": "personalab.engine.interventions",
    "TokenSequence": "personalab.engine.chat",
    "capture": "personalab.engine.capture",
    "intervene": "personalab.engine.interventions",
    "load_model": "personalab.engine.model",
    "steer": "personalab.engine.interventions",
}

__all__ = [
    "Ablate",
    "ChatFormat",
    "Clamp",
    "GeneratedToken",
    "Indices",
    "ModelHandle",
    "PersonalabError",
    "Steer",
    "Substitute",
    "TokenSequence",
    "capture",
    "intervene",
    "load_model",
    "steer",
]

if TYPE_CHECKING:
    from personalab.engine.capture import capture
    from personalab.engine.chat import ChatFormat, TokenSequence
    from personalab.engine.interventions import Ablate, Clamp, Steer, Substitute, intervene, steer
    from personalab.engine.model import ModelHandle, load_model
    from personalab.engine.positions import GeneratedToken, Indices
    from personalab.errors import PersonalabError


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'personalab' has no attribute {name!r}")
