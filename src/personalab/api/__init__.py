"""The Python API: one function per study, named and defaulted as the command line's verbs.

Each takes ``(model, ..., judge, *, options, out)``: the study's options as keyword arguments (the fields of
its config, ``personalab.api.common.configured``), ``out=None`` to keep everything in memory or ``out=PATH``
for the run folder exactly as the command line writes it, ``report.html`` included. ``extract`` returns a
``PersonaVector``, ``report`` the page's path, the others a ``StudyResult`` (tables as DataFrames, figures'
paths, ``meta.json``).
"""

from personalab.api.common import StudyResult, judge
from personalab.api.steering import steer_answers, sweep
from personalab.api.studies import compose, correlate, deepscan, localize, report, trace
from personalab.api.vectors import cosine, extract, feature_diff, features, project
from personalab.api.weights import bake, compare, distill, finetune

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
]
