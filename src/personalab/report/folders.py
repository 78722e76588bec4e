"""What a run folder holds, read without a model: its kind, config, tables, documents and figures.

A folder is recognised by the file its command writes last (``KINDS``, checked in order); a
folder with only a store or a ``meta.json`` is an unfinished run. Every file is read on its
own: one that is missing or cannot be parsed becomes a line in ``RunFolder.problems`` and the
rest of the folder is still read.
"""

import base64
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

KINDS: dict[str, tuple[str, ...]] = {
    "trace": ("emergence.csv", "meta.json", "summary.md", "generations.sqlite"),
    "compose": ("kl.csv", "meta.json", "summary.md", "geometry.csv"),
    "deepscan": ("scan_summary.csv", "meta.json", "summary.md", "scan_runs.csv"),
    "localize": ("divergence.csv", "meta.json", "summary.md"),
    "correlate": ("correlate.csv", "meta.json", "correlate.md", "generations.sqlite"),
    "finetune": ("monitor.csv", "meta.json", "summary.md", "training_curve.csv"),
    "compare": ("compare.csv", "meta.json", "compare.md", "generations.sqlite"),
    "sweep": ("sweep.csv", "meta.json", "sweep.md", "generations.sqlite"),
    "project": ("project.csv", "meta.json", "summary.md"),
    "features": ("features.csv", "meta.json", "features.md"),
    "distill": ("training_curve.csv", "meta.json"),
    "bake": ("bake.json",),
    "extract": ("vectors.safetensors", "meta.json", "summary.md", "pairs.jsonl"),
}
"""Run kinds: the file that marks a finished run of the kind first, then the other files it writes."""

STORE = "generations.sqlite"
JSON_SHOWN = ("meta.json", "bake.json", "trait.json", "node_sets.json")
"""JSON files shown as configuration, in this order, when the folder has them."""

MODEL_FILES = ("config.json", "adapter_config.json")
"""A subfolder holding one of these is a model or adapter (a checkpoint), not results."""


@dataclass
class Table:
    """A CSV file: ``columns`` and ``rows`` (JSON values; missing numbers are ``None``)."""

    path: str
    columns: list[str]
    rows: list[list]


@dataclass
class RunFolder:
    """Everything the report shows of one folder; paths are relative to ``path``."""

    path: Path
    kind: str | None
    meta: dict = field(default_factory=dict)
    configs: dict[str, object] = field(default_factory=dict)
    documents: dict[str, str] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    figures: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def store(self) -> Path | None:
        path = self.path / STORE
        return path if path.is_file() else None


def run_kind(path: Path) -> str | None:
    """The kind of run in ``path``: a key of ``KINDS``, ``"unfinished"``, or ``None`` (not a run)."""
    for kind, files in KINDS.items():
        if (path / files[0]).exists():
            return kind
    if (path / STORE).is_file() or (path / "meta.json").is_file():
        return "unfinished"
    return None


def _result_files(path: Path, suffix: str) -> list[Path]:
    """Files with ``suffix`` under ``path``, sorted, leaving out model and adapter subfolders."""
    found = []
    for item in sorted(path.iterdir()):
        if item.is_dir():
            if not any((item / name).is_file() for name in MODEL_FILES):
                found += _result_files(item, suffix)
        elif item.suffix == suffix:
            found.append(item)
    return found


def _json_value(value: object) -> object:
    """A CSV cell as JSON: numpy scalars to Python, NaN to ``None``."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_table(path: Path) -> tuple[list[str], list[list]]:
    """Columns and rows of a CSV file, each cell as pandas reads it."""
    frame = pd.read_csv(path)
    return [str(c) for c in frame.columns], [[_json_value(v) for v in row] for row in frame.itertuples(index=False)]


def read_run(path: str | Path) -> RunFolder:
    """Read ``path``; never raises for what is inside it (see ``RunFolder.problems``)."""
    path = Path(path)
    if not path.is_dir():
        return RunFolder(path, None, problems=["not a folder" if path.exists() else "no such folder"])
    kind = run_kind(path)
    run = RunFolder(path, kind)
    if kind is None:
        run.problems.append(f"not a run folder (no meta.json, bake.json or {STORE})")
        return run
    for name in KINDS.get(kind, ())[1:]:
        if not (path / name).exists():
            run.problems.append(f"{name} is missing")
    for name in JSON_SHOWN:
        file = path / name
        if file.is_file():
            try:
                run.configs[name] = json.loads(file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                run.problems.append(f"{name} cannot be read: {exc}")
    meta = run.configs.get("meta.json")
    run.meta = meta if isinstance(meta, dict) else {}
    for file in _result_files(path, ".md"):
        name = str(file.relative_to(path))
        try:
            run.documents[name] = file.read_text()
        except UnicodeDecodeError as exc:
            run.problems.append(f"{name} cannot be read: {exc}")
    for file in _result_files(path, ".csv"):
        name = str(file.relative_to(path))
        try:
            run.tables.append(Table(name, *read_table(file)))
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            run.problems.append(f"{name} cannot be read: {' '.join(str(exc).split())}")
    for file in _result_files(path, ".png"):
        data = file.read_bytes()
        if data.startswith(b"\x89PNG\r\n\x1a\n"):
            run.figures[str(file.relative_to(path))] = base64.b64encode(data).decode()
        else:
            run.problems.append(f"{file.relative_to(path)} is not a PNG image")
    return run
