"""``personalab project`` into a run folder: records, their projection shift, or a fine-tune's per-layer shift,
projected onto a persona vector (``personalab.studies.monitor`` computes, this writes).

Files, besides ``meta.json`` and ``summary.md``: ``project.csv``, the table of the mode, and

* records (``layer``): ``projections.jsonl``, each record with its ``last_prompt`` and ``response_mean``
  projections;
* shift (``layer`` and ``shift``): ``shift.jsonl`` (by shift, descending), ``shift.png``, ``top{K}.jsonl`` with
  ``top_k``, and the model's own answers in ``generations.sqlite``;
* tuned (``tuned``): ``model_shift.png``, the last prompt token's shift along the vector at every layer.
"""

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from personalab.console import say
from personalab.engine.handle import ModelHandle
from personalab.figures.plots import plot_model_shift
from personalab.figures.tables import markdown_table, write_csv
from personalab.files import write_text
from personalab.hashes import content_key, vector_sha256
from personalab.persona import project_records
from personalab.records import Record
from personalab.runfolder import claim, model_settings
from personalab.store import Store
from personalab.studies.monitor import model_shift, projection_shift, write_projections, write_shift_report

TABLE = "project.csv"


def record_projections(
    handle: ModelHandle,
    records: Sequence[Record],
    direction: torch.Tensor,
    layer: int,
    prefix: str,
    store: Path | None,
    shift: bool,
    top_k: int | None,
    title: str,
    batch_size: int = 16,
    progress: bool = True,
) -> pd.DataFrame:
    """Records projected at ``layer`` (``last_prompt`` and ``response_mean`` per record, written to
    ``{prefix}projections.jsonl``), or with ``shift`` against the model's own answers kept in ``store``
    (``{prefix}shift.jsonl``, ``shift.png`` titled ``title``, ``top{K}.jsonl``); ``prefix`` is a run folder and
    ``/``, or ``monitor.beside(data)``. Returns the table."""
    if shift:
        with Store(store) as opened:
            shifts = projection_shift(
                handle, records, direction, layer, opened, batch_size=batch_size, progress=progress
            )
        write_shift_report(prefix, records, shifts, top_k, title)
        return pd.DataFrame(shifts, columns=["index", "shift", "dataset", "own", "own_response"])
    projections = project_records(handle, records, direction, layer, batch_size, progress=progress)
    write_projections(prefix, records, projections)
    return pd.DataFrame(projections, columns=["layer", "last_prompt", "response_mean"])


def run_project(
    handle: ModelHandle,
    direction: torch.Tensor,
    out: str | Path,
    *,
    variant: str,
    records: Sequence[Record] = (),
    prompts: Sequence[Record] = (),
    layer: int | None = None,
    shift: bool = False,
    top_k: int | None = None,
    tuned: ModelHandle | None = None,
    data: Path | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> pd.DataFrame:
    """Project into the run folder ``out`` (modes in the module docstring; ``direction`` is ``[n_blocks + 1,
    hidden]``, layers as in ``personalab.engine.layers``); returns the mode's table. ``data`` is the file the
    records came from, recorded with its sha256."""
    out = Path(out)
    mode = "tuned" if tuned is not None else "shift" if shift else "records"
    settings = {
        **model_settings(handle),
        "mode": mode,
        "tuned": model_settings(tuned) if tuned is not None else None,
        "vector_sha256": vector_sha256(direction),
        "variant": variant,
        "layer": layer,
        "top_k": top_k,
        "inputs_sha256": content_key([r.content() for r in records], [p.content(response=False) for p in prompts]),
    }
    run = claim(out, "project", settings, inputs={"data": data}, prompt_format=handle.chat.describe())
    say(f"prompt format: {handle.chat.describe()}", progress)
    lines = [f"# Projection onto the {variant} vector ({mode})", ""]
    if tuned is not None:
        values = model_shift(handle, tuned, prompts, direction, batch_size, progress=progress)
        table = pd.DataFrame({"layer": range(len(values)), "shift": values.tolist()})
        plot_model_shift(values, f"{tuned.name} - {handle.name} along {variant}", out / "model_shift.png")
        top = int(values.abs().argmax())
        lines += [
            f"- {tuned.name} against {handle.name}, last prompt token of {len(prompts)} prompts",
            f"- largest shift: {values[top].item():.4g} at layer {top} (hidden_states[{top}])",
            "",
            "![shift](model_shift.png)",
        ]
    elif shift:
        table = record_projections(
            handle, records, direction, layer, f"{out}/", out / "generations.sqlite", True, top_k,
            f"{len(records)} records: projection shift", batch_size, progress,
        )  # fmt: skip
        lines += [
            f"- layer {layer}; {len(records)} records, {table['shift'].notna().sum()} with a shift",
            f"- mean shift (dataset response - own answer): {table['shift'].mean():.4g}",
            "",
            "![shift](shift.png)",
        ]
    else:
        table = record_projections(
            handle, records, direction, layer, f"{out}/", None, False, None, "", batch_size, progress
        )
        means = table[["last_prompt", "response_mean"]].mean()
        formats = {"last_prompt": ".4g", "response_mean": ".4g"}
        lines += [
            f"- layer {layer}; {len(records)} records; mean projections:",
            "",
            markdown_table(means.to_frame().T, formats),
        ]
    write_csv(table, out / TABLE)
    write_text(out / "summary.md", "\n".join(lines) + "\n")
    run.write(counts={"rows": len(table)})
    return table
