"""What every study function of the Python API shares: its inputs, its options, its run folder and its result.

A study function takes the study's options as keyword arguments; ``configured`` builds them into the study's
pydantic config, so the config's fields hold the one set of defaults (the command line's options take the
same values, checked by the tests). Sampling options (``temperature``, ``top_p``, ``max_new_tokens``,
``repetition_penalty``, ``seed``...) go into the config's ``sampling``. ``out=None`` runs in a temporary
folder that is removed afterwards: the result keeps its tables, figures (PNG bytes), answers and metadata in memory.
"""

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from personalab.console import say
from personalab.engine.generation import SamplingParams
from personalab.engine.handle import ModelHandle
from personalab.engine.loading import load_model
from personalab.errors import InvalidInputError, invalid_option
from personalab.judging.judges import Judge, judge_from_spec
from personalab.persona import PersonaVector, as_vector, check_origin
from personalab.traits import RUN_TRAIT, Trait, load_trait, run_trait

if TYPE_CHECKING:
    import pandas as pd

Config = TypeVar("Config", bound=BaseModel)
SAMPLING = tuple(SamplingParams.model_fields)


def as_model(
    model: "ModelHandle | str | Path",
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    tokenizer: str | None = None,
    thinking: bool = False,
    defer_weights: bool = False,
) -> ModelHandle:
    """A loaded model, or ``load_model`` of a hub name, local folder, run folder or GGUF file with these options;
    logs the first dequantisation of a GGUF file, what a run folder resolved to, and what personalab does with the
    model's chat template."""
    if isinstance(model, ModelHandle):
        return model
    from personalab.engine.checkpoints import weights
    from personalab.engine.loading import local_folder

    name = str(model)
    say_dequantising(name)
    folder = local_folder(name)
    if folder is not None and weights(folder).folder != folder:
        say(f"model: {weights(folder).describe()}")
    handle = load_model(name, revision, dtype, device, tokenizer=tokenizer, thinking=thinking,
                        defer_weights=defer_weights)  # fmt: skip
    for note in handle.chat.notes():
        say(f"chat format: {note}")
    return handle


def say_dequantising(model: str) -> None:
    """Say so before a GGUF file (``FILE.gguf``, a built-in GGUF model) is dequantised into the cache, the first time
    it is loaded (``personalab.engine.gguf``); checks the file (one line naming the fix when it is bad)."""
    from personalab.engine.gguf import cache_root, cached, gguf_file

    path = gguf_file(model)
    if path is not None and not cached(path):
        say(f"model: dequantising {path.name} to float32 once, into {cache_root() / 'gguf'} (about half a minute "
            f"for 135M parameters on 2 cores); later loads read it")  # fmt: skip


def judge(spec: "Judge | str", timeout: float = 120.0) -> Judge:
    """A judge: ``"api:MODEL"`` (an OpenAI-compatible server, ``timeout`` seconds per request), ``"local:MODEL"``,
    ``"lexicon:[FILE]"``, or any object with the ``Judge`` protocol (``name`` and ``score(question, answer,
    rubric)``), checked with one request before any work; a spec's judge and where it answers are logged."""
    from personalab.judging.judges import judge_record
    from personalab.judging.lexicon import NOTICE, LexiconJudge

    chosen = judge_from_spec(spec, timeout=timeout) if isinstance(spec, str) else spec
    if not callable(getattr(chosen, "score", None)) or not isinstance(getattr(chosen, "name", None), str):
        raise InvalidInputError(f"{chosen!r} is not a judge: it needs a name and score(question, answer, rubric)")
    if isinstance(spec, str):
        where = judge_record(chosen).get("judge_url")
        say(f"judge: {chosen.name}" + (f" at {where} ({chosen.url_source})" if where else ""))
        if isinstance(chosen, LexiconJudge):
            say(NOTICE)
    check = getattr(chosen, "check", None)
    if callable(check):
        check()
    return chosen


def as_judge(value: "Judge | str") -> Judge:
    """``judge(value)`` for a spec, ``value`` itself for a judge object (the caller checked it)."""
    return judge(value) if isinstance(value, str) else value


def as_trait(
    trait: "Trait | str | None",
    vector: "PersonaVector | str | Path | None" = None,
    trait_dir: "str | Path | None" = None,
    also: str = "",
) -> Trait:
    """``trait`` (a ``Trait``, a built-in name, a trait file or a name in ``trait_dir``), else the trait ``vector``
    keeps (a ``PersonaVector``'s, or the ``trait.json`` of a vector's run folder); logs which it used. ``also`` names
    another way to give what the trait is needed for (e.g. `` `prompts` FILE``)."""
    if isinstance(trait, Trait):
        return trait
    if trait is not None:
        chosen = load_trait(trait, trait_dir)
        say(f"trait: {chosen.name} (`trait` {trait})")
        return chosen
    if isinstance(vector, PersonaVector):
        if vector.trait is not None:
            return vector.trait
        found, where = None, "the vector keeps no trait; "
    else:
        found = run_trait(vector) if vector is not None else None
        where = f"{vector} keeps no trait.json; " if vector is not None else ""
    if found is None:
        raise InvalidInputError(f"{where}pass `trait` NAME or `trait` FILE" + (f", or {also}" if also else ""))
    chosen, source = found
    say(f"trait: {chosen.name} (from {source})")
    return chosen


def vector_of(value: "PersonaVector | str | Path | Any", variant: str, model: Any = None) -> tuple[PersonaVector, Any]:
    """The ``PersonaVector`` of ``value`` (``as_vector``) and its ``variant`` tensor ``[n_blocks + 1, hidden]`` over
    the layers of ``model`` (a handle, name or folder; the vector's own depth without one); a vector extracted from
    another model than ``model`` is a warning, or an error for another tokenizer (``check_origin``)."""
    vector = as_vector(value)
    if isinstance(model, ModelHandle | str | Path):
        check_origin(vector, model if isinstance(model, ModelHandle) else str(model))
        return vector, vector.tensor(variant, block_count(model) + 1)
    return vector, vector.tensor(variant)


def configured(kind: type[Config], options: Mapping[str, Any], **fixed: Any) -> Config:
    """``kind`` from keyword ``options`` and ``fixed`` values; sampling options go into ``kind``'s ``sampling`` (from
    its default). An unknown option is a one-line error naming the valid ones, an invalid value one naming the
    option (``invalid `temperature`: ...``)."""
    fields = kind.model_fields
    values = {**options, **fixed}
    sampling = {k: values.pop(k) for k in list(values) if k in SAMPLING and k not in fields}
    unknown = sorted(set(values) - set(fields))
    if unknown or (sampling and "sampling" not in fields):
        wrong = unknown[0] if unknown else next(iter(sampling))
        valid = sorted((set(fields) - {"sampling"}) | (set(SAMPLING) if "sampling" in fields else set()))
        raise InvalidInputError(f"unknown option {wrong!r}; the options are {', '.join(valid)}")
    try:
        if sampling:
            base = values.get("sampling") or fields["sampling"].get_default(call_default_factory=True)
            values["sampling"] = type(base).model_validate(base.model_dump() | sampling)
        return kind(**values)
    except ValidationError as exc:
        raise InvalidInputError(invalid_option(exc.errors())) from None


def option_defaults(kind: type[BaseModel]) -> dict[str, Any]:
    """Every option of ``kind`` with its default, sampling options flattened (required ones left out)."""
    out: dict[str, Any] = {}
    for name, info in kind.model_fields.items():
        if info.is_required():
            continue
        default = info.get_default(call_default_factory=True)
        if isinstance(default, SamplingParams):
            out.update(default.model_dump())
        else:
            out[name] = default
    return out


def block_count(model: "ModelHandle | str") -> int:
    """``n_blocks`` of a loaded model, or read from a name's or folder's config without loading its weights."""
    from personalab.engine.loading import model_shape

    return model.n_blocks if isinstance(model, ModelHandle) else model_shape(str(model))[0]


def default_out(prefix: str, trait: str, model: str) -> Path:
    """The command line's run folder when ``--out`` is not given: ``runs/{prefix}{trait}-{model's last part}``."""
    return Path("runs") / f"{prefix}{trait}-{Path(model.rstrip('/')).name}"


@contextmanager
def run_folder(out: "str | Path | None") -> Iterator[tuple[Path, bool]]:
    """``(folder, kept)``: ``out`` itself, or a temporary folder removed when the block ends."""
    if out is not None:
        yield Path(out), True
        return
    with TemporaryDirectory(prefix="personalab-") as tmp:
        yield Path(tmp) / "run", False


def write_run_report(folder: Path, enabled: bool = True) -> Path | None:
    """``folder/report.html`` (``personalab report``) when ``enabled``; ``None`` when not written. The run's results
    are already on disk, so a report that cannot be written is returned as ``None``, not raised."""
    if not enabled:
        return None
    from personalab.report import REPORT, write_report

    try:
        write_report([folder], folder / REPORT)
    except OSError:
        return None
    return folder / REPORT


@dataclass
class StudyResult:
    """What a study function returns: its tables (by file stem, e.g. ``"sweep"`` for ``sweep.csv``), its figures
    (their paths in a kept run folder, and ``images``: every figure's PNG bytes, also for ``out=None``), every answer
    it generated with its scores (``answers``, ``None`` for a study that generates none), its ``meta.json`` and its
    run folder (``None`` for ``out=None``)."""

    tables: "dict[str, pd.DataFrame]" = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    folder: Path | None = None
    report: Path | None = None
    images: dict[str, bytes] = field(default_factory=dict)
    read_answers: "pd.DataFrame | None" = field(default=None, repr=False)
    """The answers read before a temporary folder was removed (a kept folder's are read when first asked for)."""

    @property
    def answers(self) -> "pd.DataFrame | None":
        """Every answer the study generated, with its scores (``None`` for a study that generates none)."""
        if self.read_answers is None and self.folder is not None:
            self.read_answers = stored_answers(self.folder)
        return self.read_answers

    @property
    def table(self) -> "pd.DataFrame":
        """The study's main table (the first in ``tables``)."""
        if not self.tables:
            raise InvalidInputError("this study wrote no table")
        return next(iter(self.tables.values()))

    def _repr_html_(self) -> str:
        return self.table._repr_html_() if self.tables else repr(self)


def in_run_folder(
    out: "str | Path | None", report: bool, tables: "list[str]", work: "Callable[[Path], object]"
) -> StudyResult:
    """A study's run: ``work(folder)`` in the run folder ``out`` (``None``: a temporary folder, removed afterwards),
    then its ``report.html`` and its ``StudyResult``, read before a temporary folder goes."""
    with run_folder(out) as (folder, kept):
        work(folder)
        return finished(folder, kept, report, tables)


def finished(folder: Path, kept: bool, report: bool, tables: "list[str] | None" = None) -> StudyResult:
    """A study's last step: ``report.html`` (when ``report`` and the folder is kept), then its ``StudyResult``."""
    return collect(folder, kept, tables, write_run_report(folder, report and kept))


def collect(folder: Path, kept: bool, tables: "list[str] | None" = None, report: Path | None = None) -> StudyResult:
    """The ``StudyResult`` of a finished run folder: its CSV tables (``tables`` in that order first, else every
    CSV), its PNG figures (paths when the folder is kept, bytes always), its stored answers with their scores, and
    its ``meta.json``."""
    import json

    import pandas as pd

    from personalab.runfolder import META

    names = list(tables or []) + sorted(p.stem for p in folder.glob("*.csv") if p.stem not in (tables or []))
    frames = {name: pd.read_csv(folder / f"{name}.csv") for name in names if (folder / f"{name}.csv").is_file()}
    pngs = sorted(folder.glob("*.png"))
    figures = {p.stem: p for p in pngs} if kept else {}
    meta = json.loads((folder / META).read_text()) if (folder / META).is_file() else {}
    images = {p.stem: p.read_bytes() for p in pngs}
    answers = None if kept else stored_answers(folder)
    return StudyResult(frames, figures, meta, folder if kept else None, report if kept else None, images, answers)


def stored_answers(folder: Path) -> "pd.DataFrame | None":
    """The answers of a run folder's store with their scores (``report.answers.answers_table``); ``None`` without
    a store."""
    from personalab.report.answers import answers_table
    from personalab.report.folders import STORE

    traits = [p for p in [folder / RUN_TRAIT] if p.is_file()]
    return answers_table(folder / STORE, traits) if (folder / STORE).is_file() else None
