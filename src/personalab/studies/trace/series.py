"""Series of training checkpoints: hub revisions of one model, or local folders, with training tokens.

Built-in series (from the pretraining-tracing study):

* ``olmo3`` (``allenai/OLMo-3-1025-7B``): 16 revisions ``stage1-step3000`` ... ``main``;
  4,194,304 tokens per step in stages 1 and 3 and 2,097,152 in stage 2, counted across the
  stages (stage 1 ends at step 1,413,814 = 5.93T tokens, ``main`` is the end of stage 3, 6.08T);
* ``apertus`` (``swiss-ai/Apertus-8B-2509``): 16 revisions ``step50000-tokens210B`` ...
  ``main``, tokens parsed from the name (``main`` = 15T).

Other series are revisions or folders with ``tokens_per_step`` times the step number in the
name, or the step number alone. Checkpoints are ordered by training tokens (or step).
"""

import glob
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from personalab.errors import InvalidInputError

OLMO3_TOKENS_PER_STEP = {1: 4_194_304, 2: 2_097_152, 3: 4_194_304}
OLMO3_STAGE_STEPS = {1: 1_413_814, 2: 47_684, 3: 11_921}
"""Steps of each OLMo-3 7B stage (stage 3's last checkpoint is ``main``)."""


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint: ``source`` is what ``from_pretrained`` loads (a hub name or a folder), at ``revision``."""

    label: str
    source: str
    revision: str | None
    step: int | None
    tokens: float | None

    @property
    def position(self) -> float:
        """Where the checkpoint sits in training: its tokens, else its step."""
        return self.tokens if self.tokens is not None else float(self.step)


@dataclass(frozen=True)
class Bins:
    """Training-phase bins by tokens: ``edges[i]`` is the lower bound of bin ``i + 1``."""

    labels: tuple[str, str, str]
    edges: tuple[float, float]

    def of(self, tokens: float) -> str:
        return self.labels[sum(tokens >= edge for edge in self.edges)]


PHASES = ("very early", "early", "late")


def olmo3_tokens(revision: str) -> float | None:
    """Training tokens of an OLMo-3 7B revision: ``stageS-stepN`` counted across stages, ``main`` the end."""
    if revision == "main":
        return float(sum(OLMO3_STAGE_STEPS[s] * OLMO3_TOKENS_PER_STEP[s] for s in (1, 2, 3)))
    match = re.fullmatch(r"stage([123])-step(\d+)", revision)
    if match is None:
        return None
    stage, step = int(match.group(1)), int(match.group(2))
    done = sum(OLMO3_STAGE_STEPS[s] * OLMO3_TOKENS_PER_STEP[s] for s in range(1, stage))
    return float(done + step * OLMO3_TOKENS_PER_STEP[stage])


def apertus_tokens(revision: str) -> float | None:
    """Training tokens of an Apertus revision, from its name (``step50000-tokens210B`` -> 210e9; ``main`` = 15T)."""
    if revision == "main":
        return 15e12
    match = re.search(r"-tokens(\d+(?:\.\d+)?)([BT])$", revision)
    if match is None:
        return None
    return float(match.group(1)) * (1e9 if match.group(2) == "B" else 1e12)


@dataclass(frozen=True)
class NamedSeries:
    model: str
    revisions: tuple[str, ...]
    tokens: Callable[[str], float | None]
    bins: Bins


SERIES: dict[str, NamedSeries] = {
    "olmo3": NamedSeries(
        "allenai/OLMo-3-1025-7B",
        tuple(
            [f"stage1-step{s}" for s in (3000, 5000, 7000, 9000, 10000, 15000, 20000, 30000, 50000, 99000)]
            + ["stage1-step297000", "stage1-step707000", "stage1-step1413814", "stage2-step47684"]
            + ["stage3-step11921", "main"]
        ),
        olmo3_tokens,
        Bins(PHASES, (100e9, 5e12)),
    ),
    "apertus": NamedSeries(
        "swiss-ai/Apertus-8B-2509",
        tuple(
            f"step{step}-tokens{tokens}"
            for step, tokens in (
                (50000, "210B"), (100000, "420B"), (150000, "630B"), (200000, "840B"), (250000, "1050B"),
                (300000, "1260B"), (400000, "1680B"), (500000, "2100B"), (700000, "2940B"),
                (1000000, "4200B"), (1432000, "6014B"), (1750000, "7652B"), (2100000, "10592B"),
                (2400000, "13112B"), (2627139, "15T"),
            )
        )
        + ("main",),
        apertus_tokens,
        Bins(PHASES, (1e12, 13e12)),
    ),
}  # fmt: skip


def _step(name: str) -> int | None:
    """The training step in a revision or folder name: the number after ``step``, else the last number."""
    match = re.search(r"step[-_]?(\d+)", name) or re.search(r"(\d+)(?!.*\d)", name)
    return int(match.group(1)) if match else None


def _ordered(checkpoints: list[Checkpoint]) -> list[Checkpoint]:
    known = [c for c in checkpoints if c.tokens is not None or c.step is not None]
    if len(known) < len(checkpoints):
        nameless = next(c.label for c in checkpoints if c.tokens is None and c.step is None)
        raise InvalidInputError(
            f"cannot place {nameless!r} in training order: no step number in its name and no token count; "
            f"name checkpoints with their step (e.g. step-1200)"
        )
    with_tokens = [c for c in checkpoints if c.tokens is not None]
    if 0 < len(with_tokens) < len(checkpoints):
        odd = next(c.label for c in checkpoints if c.tokens is None)
        raise InvalidInputError(
            f"{odd!r} has no training-token count while other checkpoints have one; give `tokens_per_step` "
            f"or leave it out"
        )
    return sorted(checkpoints, key=lambda c: (c.position, c.label))


def from_revisions(
    model: str, revisions: Sequence[str], series: str | None = None, tokens_per_step: float | None = None
) -> list[Checkpoint]:
    """Hub revisions of ``model``, ordered by training tokens (named series) or step (``tokens_per_step``)."""
    if not revisions:
        raise InvalidInputError("no revisions given; pass `series`, `revisions` or `checkpoints`")
    named = SERIES.get(series) if series else None
    if series and named is None:
        raise InvalidInputError(f"unknown series {series!r}; use one of {', '.join(SERIES)}")
    out = []
    for revision in dict.fromkeys(revisions):
        step = _step(revision)
        tokens = named.tokens(revision) if named else None
        if tokens is None and tokens_per_step is not None and step is not None:
            tokens = step * tokens_per_step
        out.append(Checkpoint(revision, model, revision, step, tokens))
    return _ordered(out)


def from_folders(pattern: str, tokens_per_step: float | None = None) -> list[Checkpoint]:
    """Local checkpoint folders: a glob pattern or comma-separated paths, ordered by the step in their names."""
    paths = sorted({p for part in pattern.split(",") if part.strip() for p in glob.glob(part.strip())})
    folders = [Path(p) for p in paths if Path(p).is_dir()]
    if not folders:
        raise InvalidInputError(f"no checkpoint folders match {pattern!r}; quote the pattern, e.g. 'ckpt/step-*'")
    out = []
    for folder in folders:
        step = _step(folder.name)
        tokens = step * tokens_per_step if step is not None and tokens_per_step is not None else None
        out.append(Checkpoint(folder.name, str(folder), None, step, tokens))
    labels = [c.label for c in out]
    if len(set(labels)) < len(labels):
        raise InvalidInputError("two checkpoint folders have the same name; give folders with distinct names")
    return _ordered(out)


def read_revisions(path: str | Path) -> list[str]:
    """Revisions from a file, one per line (blank lines and ``#`` comments skipped)."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise InvalidInputError(f"revisions file {path} does not exist; write one revision per line") from None
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def phase_bins(series: str | None, checkpoints: Sequence[Checkpoint]) -> Bins:
    """The series' bins, else bins at 2% and 80% of the last checkpoint's position (tokens or step)."""
    if series in SERIES:
        return SERIES[series].bins
    final = checkpoints[-1].position
    return Bins(PHASES, (0.02 * final, 0.8 * final))
