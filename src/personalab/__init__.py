"""personalab: persona vectors in language models — extract, steer, monitor, distill.

Layer indices everywhere follow ``personalab.layers``: layer ``l`` is
``hidden_states[l]`` of transformers, per-layer vectors are ``[n_blocks + 1, hidden]``.
"""

from personalab.capture import capture
from personalab.chat import ChatFormat, TokenSequence
from personalab.errors import PersonalabError
from personalab.interventions import Ablate, Clamp, Steer, Substitute, intervene, steer
from personalab.model import ModelHandle, load_model
from personalab.positions import GeneratedToken, Indices

__version__ = "0.1.0"

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
