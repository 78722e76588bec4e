"""Persona x task grids of the composition study, built in or from a JSON/YAML file.

A grid names a baseline persona and a baseline task, its personas and tasks (key -> text), and
optionally the cells to use (``[persona_key, task_key]`` pairs; every combination by
default). Built in, transcribed from the paper: ``short`` (4 famous personas x 3 tasks),
``long`` (8 long personas x 6 tasks) and ``review`` (the 8 long personas x the 3 review tasks,
the cells of the behavioural and host experiments).

Prompts (one user turn through the chat template, no system message): ``BB``, ``XB``, ``BY``
and ``XY`` are ``"As {persona}, {task}"`` with the baseline or the cell's persona and task;
``bare`` is the task alone.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from personalab.errors import InvalidInputError

DATA = Path(__file__).parent / "data"
BUILT_IN = ("short", "long", "review")
FIELDS = ("baseline_persona", "baseline_task", "personas", "tasks")


@dataclass(frozen=True)
class Cell:
    """One persona x task cell."""

    persona: str
    task: str
    persona_text: str
    task_text: str

    @property
    def name(self) -> str:
        return f"{self.persona}/{self.task}"


@dataclass(frozen=True)
class Grid:
    name: str
    baseline_persona: str
    baseline_task: str
    cells: tuple[Cell, ...]

    def prompts(self, cell: Cell) -> dict[str, str]:
        """The user text of each condition: ``BB``, ``XB``, ``BY``, ``XY`` and ``bare``."""
        x, y, b_x, b_y = cell.persona_text, cell.task_text, self.baseline_persona, self.baseline_task
        return {
            "BB": f"As {b_x}, {b_y}",
            "XB": f"As {x}, {b_y}",
            "BY": f"As {b_x}, {y}",
            "XY": f"As {x}, {y}",
            "bare": y,
        }


def _read(path: Path) -> object:
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InvalidInputError(f"{path}: not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None


def load_grid(spec: str) -> Grid:
    """A built-in grid by name, or a grid file (``.json``, ``.yaml``); errors name the file and field."""
    path = DATA / f"{spec}.json" if spec in BUILT_IN else Path(spec)
    if not path.is_file():
        raise InvalidInputError(f"unknown grid {spec!r}; use {', '.join(BUILT_IN)} or a JSON/YAML grid file")
    data = _read(path)
    if not isinstance(data, dict):
        raise InvalidInputError(f"{path}: a grid is an object with {', '.join(FIELDS)}")
    missing = [f for f in FIELDS if f not in data]
    if missing:
        raise InvalidInputError(f"{path}: field {missing[0]!r} is missing; a grid needs {', '.join(FIELDS)}")
    for field in ("personas", "tasks"):
        table = data[field]
        if (
            not isinstance(table, dict)
            or not table
            or not all(isinstance(v, str) and v.strip() for v in table.values())
        ):
            raise InvalidInputError(f"{path}: {field!r} must map keys to non-empty texts")
    personas, tasks = data["personas"], data["tasks"]
    for key, text in personas.items():
        if text.strip() == str(data["baseline_persona"]).strip():
            raise InvalidInputError(f"{path}: persona {key!r} equals the baseline persona; X must differ from B")
    for key, text in tasks.items():
        if text.strip() == str(data["baseline_task"]).strip():
            raise InvalidInputError(f"{path}: task {key!r} equals the baseline task; Y must differ from B")
    pairs = data.get("cells") or [[p, t] for p in personas for t in tasks]
    cells = []
    for pair in pairs:
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and pair[0] in personas and pair[1] in tasks):
            raise InvalidInputError(f"{path}: cell {pair!r} is not [persona key, task key] of this grid")
        cells.append(Cell(pair[0], pair[1], personas[pair[0]], tasks[pair[1]]))
    return Grid(str(data.get("name", path.stem)), data["baseline_persona"], data["baseline_task"], tuple(cells))


def load_markers(path: Path | None = None) -> dict[str, list[str]]:
    """Behavioural markers by persona key (the paper's Appendix B by default)."""
    data = _read(path or DATA / "markers.json")
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise InvalidInputError(f"{path}: markers are an object mapping persona keys to lists of strings")
    return data
