"""The composition study: "As X, do Y" decomposed at the prompt-to-answer transition.

Per cell of a grid (``personalab.studies.compose.grids``): a 12-token greedy reference
continuation ``ref`` of the clean ``XY`` prompt is teacher-forced onto all four prompts, so the
sites line up: ``p_last`` (each prompt's last token), ``g1`` and ``g2`` (the first and second
reference tokens), each prompt at its own indices. Residuals are ``hidden_states[l]`` (the
input of block ``l``, ``personalab.engine.layers``), captured at every layer in one pass per
prompt. Substituting at layer ``l`` replaces that residual at one position
(``personalab.engine.interventions.Substitute``).

* geometry at every layer and site (``personalab.studies.compose.geometry``);
* causal KL: one teacher-forced pass over ``XY + ref`` with the residual at the site replaced;
  ``KL(clean || intervened)`` over the full vocabulary in float32, **summed** over the
  10-token window that follows the site (``ref[0:10]``, ``ref[1:11]``, ``ref[2:12]``).
  Conditions: ``additive`` (``h_BB + dX + dY``, the paper's), and controls the paper lacks:
  ``bb`` (``h_BB``), ``random`` (``h_BB + r``, ``|r| = |dX + dY|``, seeded), ``remove_x``
  (``h_XY - dX``) and ``oracle`` (``h_XY`` itself: KL 0, a built-in check);
* behavioural markers: 80 greedy tokens with the edit at ``p_last`` applied at prefill only
  (later tokens read it through the KV cache): ``clean``, ``additive``, ``remove_x``, ``bare``;
* host injection: the ``BY`` prompt (the persona text removed) teacher-forced with 10 greedy
  tokens of the clean ``XY`` prompt; ``KL(p_XY || p_host)`` summed over them, with nothing,
  ``oracle`` (``h_XY``) or ``cached`` (``h_BB + dX + dY``) at the host's ``p_last`` and one
  layer, or the additive prediction clamped at every layer of a set.

A cell whose reference ends (end-of-sequence) within 12 tokens is skipped and counted. Every
per-cell number is stored in the run's SQLite store under a content key; a killed run resumes.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

from personalab.engine.capture import capture
from personalab.engine.chat import TokenSequence
from personalab.engine.forward import logprobs_at
from personalab.engine.generation import greedy_ids
from personalab.engine.handle import ModelHandle
from personalab.engine.interventions import Substitute, intervene
from personalab.engine.layers import check_layers
from personalab.engine.positions import Indices
from personalab.hashes import content_key
from personalab.store import Store
from personalab.studies.compose.geometry import decompose
from personalab.studies.compose.grids import Cell, Grid
from personalab.studies.compose.markers import markers_found

SITES = ("p_last", "g1", "g2")
"""Sites, as offsets 0, 1, 2 from each prompt's last index."""
REF_TOKENS, WINDOW, MARKER_TOKENS = 12, 10, 80
CONDITIONS = ("additive", "bb", "random", "remove_x", "oracle")
MARKER_CONDITIONS = ("clean", "additive", "remove_x", "bare")
FRACTIONS = (0.25, 0.40, 0.55, 0.70, 0.85)
REFERENCE_BLOCKS = 26
"""Gemma-2-2B's depth: the paper's marker and host layers (14; sets from 6 to 22) are scaled from it."""
REFERENCE_HOST_SETS = ((14,), (10, 12, 14), (10, 12, 14, 16, 18), (10, 12, 14, 16, 18, 20, 22), tuple(range(6, 23, 2)))

Edit = tuple[int, int, torch.Tensor]
"""A substitution: ``(layer, position in the unpadded sequence, value [hidden])``."""


def paper_layers(n_blocks: int) -> list[int]:
    """``round(f * n)`` for f in .25 .40 .55 .70 .85, clipped to ``1..n - 1`` (Python's rounding, as the paper)."""
    return sorted({min(max(round(f * n_blocks), 1), n_blocks - 1) for f in FRACTIONS})


def scaled(layer: int, n_blocks: int) -> int:
    """A layer of the 26-block reference model at the same relative depth of an ``n_blocks`` model."""
    return min(max(round(layer * n_blocks / REFERENCE_BLOCKS), 1), n_blocks - 1)


class ComposeConfig(BaseModel):
    """Settings of a composition run (``None`` layers: the paper's choices, scaled to the depth)."""

    model_config = ConfigDict(extra="forbid")
    layers: list[int] | None = None
    all_layers: bool = False
    markers: bool = False
    host: bool = False
    edit_layer: int | None = None
    host_sets: list[list[int]] | None = None
    batch_size: int = Field(8, ge=1)
    seed: int = 0

    def kl_layers(self, n_blocks: int) -> list[int]:
        if self.all_layers:
            return list(range(n_blocks + 1))
        return check_layers(self.layers or paper_layers(n_blocks), n_blocks)

    def edit(self, n_blocks: int) -> int:
        return self.edit_layer if self.edit_layer is not None else scaled(14, n_blocks)

    def sets(self, n_blocks: int) -> list[list[int]]:
        if self.host_sets is not None:
            return self.host_sets
        return [sorted({scaled(layer, n_blocks) for layer in group}) for group in REFERENCE_HOST_SETS]

    def check(self, n_blocks: int) -> None:
        """One-line errors for layers out of range, before any model work."""
        self.kl_layers(n_blocks)
        check_layers(self.edit(n_blocks), n_blocks)
        for group in self.sets(n_blocks):
            check_layers(group, n_blocks)


@dataclass
class Prepared:
    """A cell's prompts, its reference and its residuals: ``residuals[p]`` is float32
    ``[n_blocks + 1, 3, hidden]`` at the three sites of prompt ``p`` (BB, XB, BY, XY)."""

    cell: Cell
    prompts: dict[str, TokenSequence]
    ref: list[int]
    residuals: dict[str, torch.Tensor]

    @property
    def signature(self) -> list[list[int]]:
        """The token ids of BB, XB, BY and XY, and the reference: what every number of the cell depends on."""
        return [list(self.prompts[name].ids) for name in ("BB", "XB", "BY", "XY")] + [self.ref]

    def position(self, prompt: str, site: int) -> int:
        """Index of ``site`` (0, 1, 2) in ``prompt`` + the reference."""
        return self.prompts[prompt].prompt_len - 1 + site

    def h(self, prompt: str, layer: int, site: int) -> torch.Tensor:
        return self.residuals[prompt][layer, site]

    def dx(self, layer: int, site: int) -> torch.Tensor:
        return self.h("XB", layer, site) - self.h("BB", layer, site)

    def additive(self, layer: int, site: int) -> torch.Tensor:
        """``h_BB + dX + dY``."""
        return self.h("XB", layer, site) + self.h("BY", layer, site) - self.h("BB", layer, site)

    def followed(self, prompt: str, tokens: Sequence[int]) -> TokenSequence:
        """``prompt`` with ``tokens`` appended (its prompt length unchanged)."""
        seq = self.prompts[prompt]
        return TokenSequence(seq.ids + tuple(tokens), seq.prompt_len)


def summed_kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    """``sum_t KL(p_t || q_t)`` over the rows of two float32 log-probability tensors ``[T, vocab]``."""
    return float((p_log.exp() * (p_log - q_log)).sum())


def substitutions(handle: ModelHandle, edits: Sequence[list[Edit]]) -> Callable[[list[int]], object]:
    """``rows -> intervene(...)``: each row ``r`` of a batch replaces the residual at ``edits[r]``."""

    def enter(rows: list[int]):
        layers = sorted({layer for r in rows for layer, _, _ in edits[r]})
        interventions = []
        for layer in layers:
            mine = [[(pos, value) for lay, pos, value in edits[r] if lay == layer] for r in rows]
            positions = [[pos for pos, _ in row] for row in mine]
            values = [torch.stack([v for _, v in row]) if row else torch.empty(0, handle.hidden_size) for row in mine]
            interventions.append(Substitute(layer, positions, values))
        return intervene(handle, *interventions)

    return enter


class Study:
    """One run's model, grid, config and store; every per-cell number is keyed in the store."""

    def __init__(self, handle: ModelHandle, grid: Grid, config: ComposeConfig, store: Store, progress: bool):
        self.handle, self.grid, self.config, self.store, self.progress = handle, grid, config, store, progress

    def key(self, *parts: object) -> str:
        return content_key("compose", self.handle.name, self.handle.revision, *parts)

    def encode(self, cell: Cell) -> dict[str, TokenSequence]:
        return {name: self.handle.encode(None, text) for name, text in self.grid.prompts(cell).items()}

    def _stored(self, keys: list[str], compute: Callable[[list[int]], list[dict]]) -> list[dict]:
        """The stored value of each key; the missing ones are computed (``compute(indices)``) a chunk of
        ``4 x batch_size`` at a time and stored after each chunk."""
        return self.store.computed("compose", keys, compute, 4 * self.config.batch_size)

    def prepare(self, cells: Sequence[Cell]) -> tuple[list[Prepared], list[Cell]]:
        """``(prepared cells, skipped cells)``: references (12 greedy tokens of XY), then the residuals of
        the four prompts of each usable cell at every layer and site, in one batched capture."""
        encoded = [self.encode(cell) for cell in cells]
        xy = [e["XY"] for e in encoded]

        def generate(todo: list[int]) -> list[dict]:
            ids = greedy_ids(
                self.handle,
                [xy[i] for i in todo],
                REF_TOKENS,
                self.config.batch_size,
                progress=self.progress,
                label="reference",
            )
            return [{"ids": i} for i in ids]

        refs = [r["ids"] for r in self._stored([self.key("ref", list(s.ids)) for s in xy], generate)]
        usable = [len(r) == REF_TOKENS and not self.handle.stop_ids & set(r) for r in refs]
        prepared = [Prepared(c, e, r, {}) for c, e, r, ok in zip(cells, encoded, refs, usable, strict=True) if ok]
        owners = [(p, name) for p in prepared for name in ("BB", "XB", "BY", "XY")]
        sequences = [p.followed(name, p.ref[:2]) for p, name in owners]
        if sequences:
            sites = Indices([[s.prompt_len - 1 + k for k in range(3)] for s in sequences])
            gathered = capture(
                self.handle,
                sequences,
                positions=sites,
                reduce="gather",
                batch_size=self.config.batch_size,
                progress=self.progress,
                label="capture prompts",
            )
            for (p, name), residual in zip(owners, gathered, strict=True):
                p.residuals[name] = residual
        return prepared, [c for c, ok in zip(cells, usable, strict=True) if not ok]

    def geometry(self, prepared: Sequence[Prepared]) -> list[dict]:
        """The decomposition statistics of every cell at every layer and site."""
        rows = []
        for p in prepared:
            stats = decompose(*(p.residuals[name].numpy() for name in ("BB", "XB", "BY", "XY")))
            for layer in range(self.handle.n_layers):
                for k, site in enumerate(SITES):
                    values = {name: float(v[layer, k]) for name, v in stats.items()}
                    rows.append(_where(p) | {"layer": layer, "site": site} | values)
        return rows

    def replacement(self, p: Prepared, condition: str, layer: int, site: int) -> torch.Tensor:
        """What replaces ``h_XY`` at ``(layer, site)`` under a KL condition."""
        if condition == "additive":
            return p.additive(layer, site)
        if condition == "bb":
            return p.h("BB", layer, site)
        if condition == "remove_x":
            return p.h("XY", layer, site) - p.dx(layer, site)
        if condition == "oracle":
            return p.h("XY", layer, site)
        seed = int(content_key(self.config.seed, p.cell.name, layer, site)[:8], 16)
        r = torch.randn(self.handle.hidden_size, generator=torch.Generator().manual_seed(seed))
        bb = p.h("BB", layer, site)
        return bb + r / r.norm() * (p.additive(layer, site) - bb).norm()

    def logprobs(self, sequences: Sequence[TokenSequence], tails: Sequence[int], edits: Sequence[list[Edit]]) -> list:
        """Log-probs of the last ``tails[i]`` tokens of each sequence given what precedes them, under ``edits``."""
        positions = [list(range(len(s.ids) - 1 - t, len(s.ids) - 1)) for s, t in zip(sequences, tails, strict=True)]
        return logprobs_at(
            self.handle,
            sequences,
            positions,
            self.config.batch_size,
            substitutions(self.handle, edits),
            self.progress,
            "teacher-forced",
        )

    def causal_kl(self, prepared: Sequence[Prepared], layers: Sequence[int]) -> list[dict]:
        """Summed window KL of every (cell, layer, site, condition); the clean pass of a cell is shared."""
        items = [(p, layer, k, c) for p in prepared for layer in layers for k in range(3) for c in CONDITIONS]
        keys = [self.key("kl", p.signature, layer, k, c) for p, layer, k, c in items]

        def compute(todo: list[int]) -> list[dict]:
            cells = list({id(items[i][0]): items[i][0] for i in todo}.values())
            clean = dict(
                zip(
                    map(id, cells),
                    self.logprobs(
                        [p.followed("XY", p.ref) for p in cells], [REF_TOKENS] * len(cells), [[] for _ in cells]
                    ),
                    strict=True,
                )
            )
            sequences = [items[i][0].followed("XY", items[i][0].ref) for i in todo]
            edits = [
                [(layer, p.position("XY", k), self.replacement(p, c, layer, k))]
                for p, layer, k, c in (items[i] for i in todo)
            ]
            intervened = self.logprobs(sequences, [REF_TOKENS] * len(todo), edits)
            return [
                {
                    "kl": summed_kl(
                        clean[id(items[i][0])][items[i][2] : items[i][2] + WINDOW],
                        q[items[i][2] : items[i][2] + WINDOW],
                    )
                }
                for i, q in zip(todo, intervened, strict=True)
            ]

        values = self._stored(keys, compute)
        return [
            _where(p) | {"layer": layer, "site": SITES[k], "condition": c, "kl": v["kl"]}
            for (p, layer, k, c), v in zip(items, values, strict=True)
        ]

    def markers(self, prepared: Sequence[Prepared], markers: dict[str, list[str]]) -> list[dict]:
        """80 greedy tokens per cell with persona markers and condition; the edit at ``p_last`` is applied
        at prefill only (decoding steps start past it, so the Substitute skips them)."""
        layer = self.config.edit(self.handle.n_blocks)
        items = [(p, c) for p in prepared if p.cell.persona in markers for c in MARKER_CONDITIONS]
        keys = [self.key("markers", p.signature, list(p.prompts["bare"].ids), layer, c) for p, c in items]

        def compute(todo: list[int]) -> list[dict]:
            prompts, edits = [], []
            for p, condition in (items[i] for i in todo):
                prompts.append(p.prompts["bare" if condition == "bare" else "XY"])
                position = p.position("XY", 0)
                edit = {"additive": p.additive(layer, 0), "remove_x": p.h("XY", layer, 0) - p.dx(layer, 0)}.get(
                    condition
                )
                edits.append([] if edit is None else [(layer, position, edit)])
            ids = greedy_ids(
                self.handle,
                prompts,
                MARKER_TOKENS,
                self.config.batch_size,
                hooks=substitutions(self.handle, edits),
                progress=self.progress,
                label="markers",
            )
            return [{"text": self.handle.tokenizer.decode(i, skip_special_tokens=True)} for i in ids]

        values = self._stored(keys, compute)
        rows = []
        for (p, condition), value in zip(items, values, strict=True):
            found = markers_found(markers[p.cell.persona], value["text"])
            rows.append(
                _where(p)
                | {
                    "condition": condition,
                    "layer": layer,
                    "any": bool(found),
                    "distinct": len(found),
                    "found": found,
                    "text": value["text"],
                }
            )
        return rows

    def host(self, prepared: Sequence[Prepared]) -> list[dict]:
        """Summed KL over the 10 target tokens from the clean XY prompt to the host (BY) prompt under each
        intervention at the host's ``p_last``."""
        n_blocks = self.handle.n_blocks
        layer = self.config.edit(n_blocks)
        conditions = {"host": [], "oracle": [layer], "cached": [layer]}
        conditions |= {"clamp " + ",".join(map(str, group)): group for group in self.config.sets(n_blocks)}
        items = [(p, name) for p in prepared for name in conditions]
        keys = [self.key("host", p.signature, name, conditions[name]) for p, name in items]

        def compute(todo: list[int]) -> list[dict]:
            cells = list({id(items[i][0]): items[i][0] for i in todo}.values())
            target = dict(
                zip(
                    map(id, cells),
                    self.logprobs(
                        [p.followed("XY", p.ref[:WINDOW]) for p in cells], [WINDOW] * len(cells), [[] for _ in cells]
                    ),
                    strict=True,
                )
            )
            sequences, edits = [], []
            for p, name in (items[i] for i in todo):
                sequences.append(p.followed("BY", p.ref[:WINDOW]))
                at = p.position("BY", 0)
                if name == "oracle":
                    edits.append([(layer, at, p.h("XY", layer, 0))])
                else:
                    edits.append([(lay, at, p.additive(lay, 0)) for lay in conditions[name]])
            hosted = self.logprobs(sequences, [WINDOW] * len(todo), edits)
            return [{"kl": summed_kl(target[id(items[i][0])], q)} for i, q in zip(todo, hosted, strict=True)]

        values = self._stored(keys, compute)
        return [
            _where(p) | {"condition": name, "layers": conditions[name], "kl": v["kl"]}
            for (p, name), v in zip(items, values, strict=True)
        ]


def _where(p: Prepared) -> dict:
    return {"cell": p.cell.name, "persona": p.cell.persona, "task": p.cell.task}
