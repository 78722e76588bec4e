"""``PersonaVector``: the three variants of a persona vector with their trait, model and provenance.

Each variant holds the layers it has, ``{layer: [hidden]}`` float32, layer ``l`` the direction at
``hidden_states[l]`` (``personalab.engine.layers``, 0 = embeddings): every layer ``0..n_blocks`` for an extracted
vector, its SAE's layer alone for an SAE feature (which is made without knowing the model's depth). ``steer`` and
``ablate`` are context managers over ``personalab.engine.interventions.intervene``, with the alpha
convention of ``personalab.engine.scale`` and the command line's default scale; ``project``
gives the projections of ``personalab project``.
"""

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from personalab.engine.capture import capture
from personalab.engine.chat import TokenSequence
from personalab.engine.handle import ModelHandle
from personalab.engine.interventions import Ablate, Steer, intervene
from personalab.engine.layers import check_layers, check_vector
from personalab.engine.loading import loaded_name
from personalab.engine.positions import PositionName
from personalab.engine.scale import DEFAULT_SCALE, Scale, ScaledVector, scaled_vector
from personalab.errors import InvalidInputError, PersonalabWarning
from personalab.records import Record, load_records
from personalab.traits import RUN_TRAIT, Trait, calibration_prompts, run_trait
from personalab.vectors import VARIANTS, export_public, load_vectors, save_vectors

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_VARIANT = "response_mean"


def unit_direction(vector: torch.Tensor, layer: int, handle: ModelHandle) -> torch.Tensor:
    """The float32 unit direction ``[hidden]`` at ``layer`` of a ``[hidden]`` or ``[n_blocks + 1, hidden]`` vector."""
    check_layers(layer, handle.n_blocks)
    direction = check_vector(vector, layer, handle.n_blocks, handle.hidden_size).detach().float().cpu()
    norm = direction.norm()
    if norm == 0:
        raise InvalidInputError(f"the vector is zero at layer {layer}; choose another layer or re-extract it")
    return direction / norm


def response_projections(
    handle: ModelHandle,
    seqs: Sequence[TokenSequence],
    unit: torch.Tensor,
    layer: int,
    batch_size: int = 16,
    progress: bool = False,
    label: str = "responses",
) -> list[float | None]:
    """Projection of each sequence's mean response residual (``ids[prompt_len:]``) at ``layer`` onto ``unit``;
    ``None`` where the response has no tokens."""
    rows = [i for i, seq in enumerate(seqs) if seq.response_len > 0]
    out: list[float | None] = [None] * len(seqs)
    if rows:
        acts = capture(
            handle, [seqs[i] for i in rows], [layer], "response", batch_size=batch_size, progress=progress, label=label
        )
        for i, value in zip(rows, (acts[:, 0] @ unit).tolist(), strict=True):
            out[i] = value
    return out


def project_records(
    handle: ModelHandle,
    records: Sequence[Record],
    vector: torch.Tensor,
    layer: int,
    batch_size: int = 16,
    progress: bool = False,
) -> list[dict]:
    """Per record ``{"layer", "last_prompt", "response_mean"}``: the projections onto the unit direction at
    ``layer`` of the residual at the last prompt token and of the mean residual over the response tokens.

    ``response_mean`` is ``None`` when the record has no response or it encodes to no tokens.
    """
    unit = unit_direction(vector, layer, handle)
    if not records:
        return []
    prompts = [r.encode(handle, response=False) for r in records]
    last = capture(handle, prompts, [layer], "last_prompt", batch_size=batch_size, progress=progress, label="prompts")
    full = [r.encode(handle) for r in records]
    means = response_projections(handle, full, unit, layer, batch_size, progress, "responses")
    return [
        {"layer": layer, "last_prompt": p, "response_mean": m}
        for p, m in zip((last[:, 0] @ unit).tolist(), means, strict=True)
    ]


Rows = dict[int, torch.Tensor]
"""One variant: ``{layer: [hidden]}``."""


def _rows(value: "torch.Tensor | Mapping[int, torch.Tensor]") -> Rows:
    """A variant as ``{layer: float32 [hidden]}``: a ``[n_layers, hidden]`` tensor gives every layer."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 2:
            raise InvalidInputError(
                f"a variant is [n_blocks + 1, hidden] or {{layer: [hidden]}}; got {tuple(value.shape)}"
            )
        return {layer: row for layer, row in enumerate(value.detach().float().cpu())}
    rows = {int(layer): torch.as_tensor(row).detach().float().cpu() for layer, row in sorted(value.items())}
    if any(layer < 0 or row.dim() != 1 for layer, row in rows.items()):
        raise InvalidInputError("a variant's layers are whole numbers >= 0, each with a [hidden] row")
    return rows


class PersonaVector:
    """A persona vector: per variant (``response_mean``, ``prompt_mean``, ``last_prompt``, or the subset a file holds)
    the rows of the layers it has (``layers``); ``trait`` is the trait it was extracted for (``None`` when unknown),
    ``model``/``revision`` the model, ``meta`` the extraction's ``meta.json`` and ``source`` where it was loaded from.

    ``variants`` may be given as ``[n_blocks + 1, hidden]`` tensors (every layer: the vector knows its model's depth,
    ``n_layers``) or as ``{layer: [hidden]}`` mappings of some layers (``n_layers`` is then ``None`` and a dense
    ``tensor`` takes the depth of the model it is applied to)."""

    def __init__(
        self,
        variants: "Mapping[str, torch.Tensor | Mapping[int, torch.Tensor]]",
        trait: Trait | None = None,
        model: str | None = None,
        revision: str | None = None,
        meta: dict | None = None,
        source: Path | None = None,
    ):
        if not variants:
            raise InvalidInputError("a persona vector needs at least one variant")
        dense = {isinstance(v, torch.Tensor) for v in variants.values()}
        self.layers: dict[str, Rows] = {name: _rows(value) for name, value in variants.items()}
        self.trait, self.model, self.revision, self.source = trait, model, revision, source
        self.meta = dict(meta or {})
        shapes = {(tuple(rows), rows[next(iter(rows))].shape[0]) if rows else ((), 0) for rows in self.layers.values()}
        if len(shapes) != 1 or not next(iter(shapes))[0]:
            raise InvalidInputError(f"variants must hold the same layers of one width; got {sorted(shapes)}")
        held, hidden = next(iter(shapes))
        if any(row.shape != (hidden,) for rows in self.layers.values() for row in rows.values()):
            raise InvalidInputError("every row of a vector has the same width")
        self.n_layers: int | None = len(held) if dense == {True} else None
        """``n_blocks + 1`` of the model it was made for, when it holds every layer; ``None`` otherwise."""

    @property
    def held(self) -> list[int]:
        """The layers this vector has, ascending."""
        return list(next(iter(self.layers.values())))

    @property
    def variants(self) -> dict[str, torch.Tensor]:
        """Every variant as ``[n_blocks + 1, hidden]`` (a vector that holds every layer of its model)."""
        return {name: self.tensor(name) for name in self.layers}

    @property
    def name(self) -> str:
        """The trait's name, else the source's name, else the expression that made it (``a - b``)."""
        if self.trait:
            return self.trait.name
        return self.meta.get("trait") or (self.source.name if self.source else "") or self.meta.get("expression", "")

    @property
    def hidden_size(self) -> int:
        rows = next(iter(self.layers.values()))
        return next(iter(rows.values())).shape[0]

    def tensor(self, variant: str = DEFAULT_VARIANT, n_layers: int | None = None) -> torch.Tensor:
        """``variant`` as ``[n_layers, hidden]``, zero at the layers it does not have; ``n_layers`` defaults to the
        vector's own depth (needed for a vector of some layers: the depth of the model it is applied to)."""
        rows = self._variant(variant)
        depth = n_layers if n_layers is not None else self.n_layers
        if depth is None:
            raise InvalidInputError(
                f"this vector has layer(s) {', '.join(map(str, rows))} only; give `n_layers` (the model's "
                f"n_blocks + 1), or make it `dense(n_layers)` first"
            )
        if self.n_layers is not None and depth != self.n_layers:
            raise InvalidInputError(
                f"per-layer vector has {self.n_layers} rows but this model has {depth} layers (n_blocks + 1); use a "
                f"vector extracted from this model"
            )
        past = [layer for layer in rows if layer >= depth]
        if past:
            raise InvalidInputError(f"the vector has layer {past[0]} but the model has layers 0..{depth - 1}")
        out = torch.zeros(depth, self.hidden_size)
        for layer, row in rows.items():
            out[layer] = row
        return out

    def _variant(self, variant: str) -> Rows:
        if variant not in self.layers:
            raise InvalidInputError(f"this vector has no variant {variant!r}; it has {', '.join(self.layers)}")
        return self.layers[variant]

    def at(self, layer: int, variant: str = DEFAULT_VARIANT) -> torch.Tensor:
        """The ``[hidden]`` direction at ``layer``."""
        rows = self._variant(variant)
        if self.n_layers is not None:
            check_layers(layer, self.n_layers - 1)
        if layer not in rows:
            raise InvalidInputError(f"the vector has no layer {layer}; it has {', '.join(map(str, rows))}")
        return rows[layer]

    def unit(self, layer: int, variant: str = DEFAULT_VARIANT) -> torch.Tensor:
        """The unit ``[hidden]`` direction at ``layer``."""
        row = self.at(layer, variant)
        if row.norm() == 0:
            raise InvalidInputError(f"the vector is zero at layer {layer}; choose another layer")
        return row / row.norm()

    def norms(self, variant: str = DEFAULT_VARIANT) -> "pd.Series":
        """L2 norm per layer it has (a Series indexed by layer)."""
        import pandas as pd

        rows = self._variant(variant)
        norms = torch.stack(list(rows.values())).norm(dim=-1)
        return pd.Series(norms.tolist(), index=pd.Index(list(rows), name="layer"), name="norm")

    def cosine(self, other: "PersonaVector | torch.Tensor", variant: str = DEFAULT_VARIANT) -> "pd.Series":
        """Cosine similarity with ``other`` (its same variant, or a ``[n_layers, hidden]`` tensor) at every layer both
        have: a Series indexed by layer (0 where either is zero)."""
        import pandas as pd

        theirs = other if isinstance(other, PersonaVector) else PersonaVector({variant: torch.as_tensor(other)})
        mine, rows = self._variant(variant), theirs._variant(variant)
        depths = {d for d in (self.n_layers, theirs.n_layers) if d is not None}
        common = [layer for layer in mine if layer in rows]
        if len(depths) > 1 or self.hidden_size != theirs.hidden_size:
            raise InvalidInputError(
                f"vectors of shapes {self._shape()} and {theirs._shape()}; compare vectors of one model"
            )
        if not common:
            raise InvalidInputError(f"the vectors share no layer ({self._shape()} and {theirs._shape()})")
        a = torch.stack([mine[layer] for layer in common])
        b = torch.stack([rows[layer] for layer in common])
        values = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=torch.finfo(torch.float32).tiny)
        return pd.Series(values.tolist(), index=pd.Index(common, name="layer"), name="cosine")

    def _shape(self) -> str:
        depth = self.n_layers if self.n_layers is not None else f"layers {','.join(map(str, self.held))}"
        return f"[{depth}, {self.hidden_size}]"

    def _check_model(self, model: ModelHandle, hooks: bool = True) -> None:
        fits = self.n_layers in (None, model.n_layers) and self.held[-1] < model.n_layers
        if not fits or self.hidden_size != model.hidden_size:
            raise InvalidInputError(
                f"the vector is {self._shape()} but {model.name} has [{model.n_layers}, {model.hidden_size}]; use a "
                f"vector extracted from this model"
            )
        if hooks:
            _check_hooks(model)

    def scaled(self, model: ModelHandle, layer: int, scale: Scale = DEFAULT_SCALE, variant: str = DEFAULT_VARIANT):
        """What ``alpha = 1`` adds at ``layer`` under ``scale`` (``personalab.engine.scale.ScaledVector``)."""
        return scaled_vector(model, self.tensor(variant, model.n_layers), layer, scale, calibration_prompts(model))

    @contextmanager
    def steer(
        self,
        model: ModelHandle,
        layer: int,
        alpha: float = 1.0,
        *,
        scale: Scale = DEFAULT_SCALE,
        variant: str = DEFAULT_VARIANT,
        positions: PositionName = "generating",
    ) -> Iterator[ScaledVector]:
        """``personalab.steer`` with this vector's ``variant``: inside the block every forward pass of ``model`` adds
        ``alpha`` times the scaled vector at ``layer``; yields the ``ScaledVector``."""
        with steer(model, self, layer, alpha, scale=scale, variant=variant, positions=positions) as scaled:
            yield scaled

    @contextmanager
    def ablate(
        self,
        model: ModelHandle,
        layer: int,
        *,
        variant: str = DEFAULT_VARIANT,
        positions: PositionName = "generating",
    ) -> Iterator[None]:
        """Inside the block the direction at ``layer`` is projected out of the residual at ``positions``."""
        self._check_model(model)
        with intervene(model, Ablate(layer, self.tensor(variant, model.n_layers), positions)):
            yield

    def project(
        self,
        model: ModelHandle,
        records: "Sequence[Record] | str | Path",
        layer: int | None = None,
        *,
        variant: str = DEFAULT_VARIANT,
        batch_size: int = 16,
    ) -> "pd.DataFrame":
        """One row per record: ``layer``, ``last_prompt`` and ``response_mean`` projections (``project_records``);
        ``records`` are ``Record`` objects or a JSONL file; ``layer`` defaults to ``n_blocks // 2``."""
        import pandas as pd

        self._check_model(model, hooks=False)
        rows = load_records(records) if isinstance(records, str | Path) else list(records)
        chosen = model.n_blocks // 2 if layer is None else layer
        return pd.DataFrame(project_records(model, rows, self.tensor(variant, model.n_layers), chosen, batch_size))

    def save(self, folder: str | Path) -> Path:
        """Write ``vectors.safetensors``, ``meta.json`` and (with a trait) ``trait.json`` into ``folder``; a folder
        that ``PersonaVector.load`` and every ``--vector`` option read. A vector of some layers is saved after
        ``dense(n_layers)``."""
        folder = Path(folder)
        meta = {**self.meta, "model": self.model, "revision": self.revision}
        if self.trait is not None:
            meta["trait"] = self.trait.name
        save_vectors(folder, self.variants, meta)
        if self.trait is not None:
            self.trait.save(folder / RUN_TRAIT)
        return folder

    @classmethod
    def load(cls, path: str | Path) -> "PersonaVector":
        """A run folder, a ``.safetensors`` file or a public persona-vectors ``.pt`` file, with the trait kept
        beside it when there is one."""
        variants, meta = load_vectors(path)
        found = run_trait(path)
        return cls(
            variants,
            trait=found[0] if found else None,
            model=meta.get("model"),
            revision=meta.get("revision"),
            meta=meta,
            source=Path(path),
        )

    def export_public(self, folder: str | Path) -> list[Path]:
        """Each variant as ``{trait}_{suffix}.pt`` (the public persona-vectors format) in ``folder``."""
        if not self.name:
            raise InvalidInputError("the vector has no trait name to name its files; set its trait first")
        return export_public({k: v for k, v in self.variants.items() if k in VARIANTS}, folder, self.name)

    def dense(self, n_layers: int) -> "PersonaVector":
        """This vector over every layer of a model with ``n_layers`` (``n_blocks + 1``), zero where it has none."""
        variants = {name: self.tensor(name, n_layers) for name in self.layers}
        return PersonaVector(variants, self.trait, self.model, self.revision, self.meta, self.source)

    def __add__(self, other: "PersonaVector") -> "PersonaVector":
        """Per variant both have, the sum at every layer (vectors of one model)."""
        return self._combined(other, 1.0, "+")

    def __sub__(self, other: "PersonaVector") -> "PersonaVector":
        """Per variant both have, the difference at every layer (vectors of one model)."""
        return self._combined(other, -1.0, "-")

    def __mul__(self, factor: float) -> "PersonaVector":
        """Every variant times the number ``factor``."""
        if isinstance(factor, bool) or not isinstance(factor, int | float):
            return NotImplemented
        meta = {k: v for k, v in self.meta.items() if k != "trait"}
        variants = {k: {layer: row * factor for layer, row in rows.items()} for k, rows in self.layers.items()}
        variants = self._as_held(variants, self.n_layers)
        return self._derived(variants, meta, f"{factor:g} * ({self.name or '?'})")

    __rmul__ = __mul__

    def __neg__(self) -> "PersonaVector":
        return self * -1.0

    def _combined(self, other: "PersonaVector", sign: float, symbol: str) -> "PersonaVector":
        """``self + sign * other`` over their common variants; the result keeps the provenance both share."""
        if not isinstance(other, PersonaVector):
            return NotImplemented
        depths = {d for d in (self.n_layers, other.n_layers) if d is not None}
        if len(depths) > 1 or self.hidden_size != other.hidden_size:
            raise InvalidInputError(
                f"vectors of shapes {self._shape()} and {other._shape()}; combine vectors of one model"
            )
        if None not in (self.model, other.model) and (self.model, self.revision) != (other.model, other.revision):
            raise InvalidInputError(
                f"vectors of {_named(str(self.model), self.revision)} and {_named(str(other.model), other.revision)}; "
                "combine vectors of one model"
            )
        common = [k for k in self.layers if k in other.layers]
        if not common:
            raise InvalidInputError(
                f"the vectors share no variant ({', '.join(self.layers)} vs {', '.join(other.layers)})"
            )
        shared = {k: v for k, v in self.meta.items() if k != "trait" and other.meta.get(k) == v}
        depth = next(iter(depths), None)
        variants = {}
        for k in common:
            mine, theirs = self.layers[k], other.layers[k]
            zero = torch.zeros(self.hidden_size)
            held = sorted(set(mine) | set(theirs))
            variants[k] = {layer: mine.get(layer, zero) + sign * theirs.get(layer, zero) for layer in held}
        variants = self._as_held(variants, depth)
        known = self if self.model is not None else other  # a feature vector records no model
        return known._derived(variants, shared, f"({self.name or '?'}) {symbol} ({other.name or '?'})")

    @staticmethod
    def _as_held(variants: dict[str, Rows], depth: int | None) -> "dict[str, torch.Tensor | Rows]":
        """Rows of every layer of a model of ``depth`` as dense tensors (the result then knows its depth)."""
        if depth is None:
            return variants
        out = {}
        for name, rows in variants.items():
            dense = torch.zeros(depth, next(iter(rows.values())).shape[0])
            for layer, row in rows.items():
                if layer >= depth:
                    raise InvalidInputError(f"a vector has layer {layer} but the other has layers 0..{depth - 1}")
                dense[layer] = row
            out[name] = dense
        return out

    def _derived(self, variants: "dict[str, torch.Tensor | Rows]", meta: dict, expression: str) -> "PersonaVector":
        """A vector computed from this one: same model, no trait, its ``expression`` in ``meta``."""
        return PersonaVector(
            variants, model=self.model, revision=self.revision, meta={**meta, "expression": expression}
        )

    def __repr__(self) -> str:
        return (
            f"PersonaVector({self.name or '?'}, model={self.model!r}, variants={list(self.layers)}, "
            f"shape={self._shape()})"
        )


FEATURE_PREFIX = "sae:"


def _identity(name: str) -> str:
    """A model's name as compared between a vector and a model: a local folder by its resolved path."""
    return str(Path(name).resolve()) if Path(name).exists() else name


def _named(name: str, revision: str | None) -> str:
    return name if revision is None else f"{name}@{revision}"


def check_origin(vector: PersonaVector, model: ModelHandle | str) -> None:
    """Compare where ``vector`` was extracted (its recorded model and revision) with the model it is applied to: a
    different tokenizer (the vector's recorded ``tokenizer_sha256``, checked against a loaded ``model``) is an error,
    another model or revision a ``PersonalabWarning`` naming both. A vector of unknown origin (a public ``.pt`` file,
    a bare tensor) passes."""
    if vector.model is None:
        return
    handle = model if isinstance(model, ModelHandle) else None
    name, revision = (handle.name, handle.revision) if handle is not None else (loaded_name(str(model)), None)
    recorded = vector.meta.get("tokenizer_sha256")
    if handle is not None and recorded and recorded != handle.tokenizer_sha256():
        raise InvalidInputError(
            f"the vector was extracted from {_named(vector.model, vector.revision)}, whose tokenizer differs from "
            f"that of {name} (the same text is other tokens there); extract a vector from {name}"
        )
    same = _identity(vector.model) == _identity(name)
    if not same or (handle is not None and vector.revision != revision):
        warnings.warn(
            f"the vector was extracted from {_named(vector.model, vector.revision)} but is applied to "
            f"{_named(name, revision)}; its shape fits, its direction may not mean the same there",
            PersonalabWarning,
            stacklevel=2,
        )


def as_vector(value: "PersonaVector | torch.Tensor | str | Path") -> PersonaVector:
    """A ``PersonaVector`` from itself, a ``[n_blocks + 1, hidden]`` tensor (as ``response_mean``), a path, or
    ``sae:PATH#FEATURE`` (``feature_vector``)."""
    if isinstance(value, PersonaVector):
        return value
    if isinstance(value, torch.Tensor):
        return PersonaVector({DEFAULT_VARIANT: value})
    if str(value).startswith(FEATURE_PREFIX):
        return feature_vector(str(value))
    return PersonaVector.load(value)


def feature_vector(spec: str) -> PersonaVector:
    """``sae:PATH#FEATURE``: feature ``FEATURE``'s decoder direction of the SAE folder ``PATH`` at the SAE's layer,
    ``{layer: W_dec[FEATURE]}`` (variant ``response_mean``; a model's other layers are zero); steering with it follows
    the same alpha convention as any vector."""
    from personalab.sae import load_sae

    path, _, index = spec.removeprefix(FEATURE_PREFIX).rpartition("#")
    if not path or not index.isdigit():
        raise InvalidInputError(f"{spec!r}: give a feature as sae:PATH#FEATURE (a SAELens folder and an index)")
    sae = load_sae(path)
    feature = int(index)
    if feature >= sae.d_sae:
        raise InvalidInputError(f"{spec!r}: the SAE has features 0..{sae.d_sae - 1}")
    meta = {"sae": str(path), "feature": feature, "layer": sae.layer, "hook_name": sae.hook_name}
    return PersonaVector({DEFAULT_VARIANT: {sae.layer: sae.W_dec[feature]}}, meta=meta)


def _check_hooks(model: ModelHandle) -> None:
    if model.engine is not None:
        raise InvalidInputError(
            "steering hooks the transformers model; load the model without an engine to steer in a with-block"
        )


@contextmanager
def steer(
    model: ModelHandle,
    vector: "PersonaVector | torch.Tensor",
    layer: int,
    alpha: float = 1.0,
    *,
    scale: Scale = DEFAULT_SCALE,
    variant: str = DEFAULT_VARIANT,
    positions: PositionName = "generating",
) -> Iterator[ScaledVector]:
    """Inside the block every forward pass of ``model`` adds ``alpha`` times ``vector`` at ``layer`` on ``scale``, the
    convention of ``personalab steer --alpha`` and every command (``personalab.engine.scale``): normalised by default,
    ``alpha`` a fraction of the layer's typical residual norm (on SmolLM2-135M-Instruct 0.3-0.5 moves a trait, 1
    breaks the answers);
    ``scale="raw"`` adds ``alpha * vector`` as given. ``vector`` is a ``PersonaVector`` (its ``variant``) or a tensor
    ``[hidden]`` or ``[n_blocks + 1, hidden]``; positions as in ``personalab.engine.positions``. Yields the
    ``ScaledVector`` (what ``alpha = 1`` adds, and the residual norm it was scaled by)."""
    if isinstance(vector, PersonaVector):
        vector._check_model(model, hooks=False)
        check_origin(vector, model)
        vector = vector.tensor(variant, model.n_layers)
    _check_hooks(model)
    scaled = scaled_vector(model, torch.as_tensor(vector).detach().float(), layer, scale, calibration_prompts(model))
    with intervene(model, Steer(layer, scaled.vector, alpha, positions)):
        yield scaled
