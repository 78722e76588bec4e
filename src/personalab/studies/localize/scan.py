"""The ``deepscan`` study: subset scanning of persona statements at one layer, and node overlap.

For each persona at ``layer`` (``hidden_states[layer]``, the last prompt token of the
statement as system message): the first ``test_clean`` negative statements are the clean test
pool, the next ``background`` negatives the background, and the positives the anomalous pool
(file order). Every run draws ``clean`` records from the clean pool and ``anomalous`` from the
anomalous pool (without replacement, seeded per run; clean rows first) and scans their p-value
ranges against the background (``personalab.studies.localize.deepscan``). Each run's score,
alpha, record and node subsets, and the precision and recall of the anomalous records are
stored with its persona in ``scans.sqlite``; a killed scan resumes with the runs it has.
``scan_runs.csv`` has one row per run with its ``records`` (indices into the persona's test records: the
clean test pool first, then the anomalous pool, each in file order) and ``nodes`` (hidden units at the
layer) as JSON lists. A persona's node set is
the union of its runs' nodes, or the nodes found in at least ``min_run_fraction`` of the runs.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from personalab.console import progress_bar, say
from personalab.engine.handle import ModelHandle
from personalab.engine.layers import check_layers
from personalab.errors import InvalidInputError
from personalab.figures.plots import plot_heatmap, plot_upset, short_name
from personalab.figures.tables import markdown_table, write_csv
from personalab.hashes import content_key
from personalab.runfolder import claim, model_settings
from personalab.store import Store
from personalab.studies.localize.activations import ActivationCache, statement_format
from personalab.studies.localize.deepscan import SCORES, TAILS, pvalue_ranges, scan, scan_individual
from personalab.studies.localize.statements import Statement


class ScanConfig(BaseModel):
    """Settings of ``deepscan`` (defaults: the reference notebook's group runs)."""

    model_config = ConfigDict(extra="forbid")
    layer: int
    background: int | None = Field(None, ge=1)
    test_clean: int | None = Field(None, ge=1)
    clean: int | None = Field(None, ge=0)
    anomalous: int | None = Field(None, ge=0)
    """The pools; ``None``: the reference's 250 / 50 / 50 / 50, scaled down to the statements there are
    (``sized``)."""
    runs: int = Field(100, ge=1)
    score: str = "hc"
    tail: str = "lower"
    restarts: int = Field(1, ge=1)
    a_max: float = Field(0.5, gt=0, le=1)
    seed: int = 0
    min_run_fraction: float = Field(0.0, ge=0, le=1)
    batch_size: int = Field(16, ge=1)


REFERENCE_POOLS = {"background": 250, "test_clean": 50, "clean": 50, "anomalous": 50}
"""The reference notebook's group-run pools: background and clean test negatives, clean and anomalous draws."""
TAIL_NOTES = {
    "lower": "lower tail: finds units whose activation on the anomalous statements falls below the background "
    "(the reference default; blind to an upward shift, use --tail upper or two)",
    "upper": "upper tail: finds units whose activation rises above the background",
    "two": "both tails: finds units whose activation moves either way from the background",
}


def sized(statements: dict[str, list[Statement]], config: ScanConfig) -> tuple[ScanConfig, str | None]:
    """``config`` with each pool not given sized from the statements of the persona with the fewest: the
    reference's pools when they fit, else scaled down by one factor (at least 1 record each); and a one-line
    note of what was chosen (``None`` when every pool was given)."""
    missing = [k for k in REFERENCE_POOLS if getattr(config, k) is None]
    if not missing:
        return config, None
    counts = [(sum(not s.positive for s in rows), sum(s.positive for s in rows)) for rows in statements.values()]
    negatives, positives = min(n for n, _ in counts), min(p for _, p in counts)
    ref = REFERENCE_POOLS
    factor = min(1.0, negatives / (ref["background"] + ref["test_clean"]), positives / ref["anomalous"])
    chosen = {k: getattr(config, k) for k in ref}
    chosen |= {k: max(1, int(ref[k] * factor)) for k in missing}
    chosen["clean"] = min(chosen["clean"], chosen["test_clean"])
    done = config.model_copy(update={k: chosen[k] for k in missing})
    pools_text = ", ".join(f"{k.replace('_', '-')} {getattr(done, k)}" for k in REFERENCE_POOLS)
    return done, f"pools: {pools_text} (from {negatives} negative and {positives} positive statements per persona)"


def check(statements: dict[str, list[Statement]], config: ScanConfig, n_blocks: int) -> None:
    """One-line errors before any model work: layer, settings and statement counts (pools sized)."""
    check_layers(config.layer, n_blocks)
    if config.score not in SCORES or config.tail not in TAILS:
        raise InvalidInputError(f"`score` must be one of {', '.join(SCORES)} and `tail` one of {', '.join(TAILS)}")
    if config.clean > config.test_clean:
        raise InvalidInputError(
            f"`clean` {config.clean} is more than the clean test pool (`test_clean` {config.test_clean})"
        )
    if config.clean + config.anomalous == 0:
        raise InvalidInputError("a run needs records; give `clean` or `anomalous` above 0")
    for persona, rows in statements.items():
        neg = sum(not s.positive for s in rows)
        pos = len(rows) - neg
        if neg < config.background + config.test_clean or pos < config.anomalous:
            raise InvalidInputError(
                f"persona {persona!r} has {neg} negative and {pos} positive statements; a scan needs "
                f"{config.background} background + {config.test_clean} clean test negatives and {config.anomalous} "
                f"positives (lower `background`, `test_clean` or `anomalous`)"
            )


def pools(rows: list[Statement], config: ScanConfig) -> tuple[list[str], list[str], list[str]]:
    """``(background, clean test pool, anomalous pool)`` statement texts, in file order."""
    negatives = [s.text for s in rows if not s.positive]
    positives = [s.text for s in rows if s.positive]
    clean = negatives[: config.test_clean]
    return negatives[config.test_clean : config.test_clean + config.background], clean, positives


def _settings(config: ScanConfig) -> dict:
    return config.model_dump(exclude={"runs", "min_run_fraction", "batch_size"})


def scan_persona(
    cache: ActivationCache, rows: list[Statement], persona: str, config: ScanConfig, store: Store, progress: bool
) -> list[dict]:
    """Every run of one persona, computing only those not stored."""
    handle = cache.handle
    pooled = content_key(pools(rows, config))
    keys = [
        content_key("deepscan", handle.name, handle.revision, persona, _settings(config), pooled, r)
        for r in range(config.runs)
    ]
    pooled: dict = {}

    def compute(runs: list[int]) -> list[dict]:
        if not pooled:  # the pools' p-value ranges, read only when some run is missing
            background, clean, anomalous = (
                cache.layer(cache.ensure(t, config.batch_size, False), config.layer) for t in pools(rows, config)
            )
            ranges = pvalue_ranges(background, np.concatenate([clean, anomalous]), config.tail)
            pooled.update(ranges=ranges, n_clean=len(clean), n_anomalous=len(anomalous))
        return [_run(**pooled, run=run, config=config, persona=persona) for run in runs]

    missing = len(keys) - len(store.results(keys))
    with progress_bar(f"scan {persona}", missing, progress and missing > 0) as advance:
        return store.computed("deepscan", keys, compute, 1, advance)


def _run(ranges: np.ndarray, n_clean: int, n_anomalous: int, run: int, config: ScanConfig, persona: str) -> dict:
    """Run ``run`` of one persona: its seeded draw of clean and anomalous records, scanned."""
    rng = np.random.default_rng([config.seed, run])
    picked = np.concatenate(
        [
            rng.choice(n_clean, config.clean, replace=False),
            n_clean + rng.choice(n_anomalous, config.anomalous, replace=False),
        ]
    )
    result = scan(ranges[picked], config.score, config.restarts, config.a_max, seed=config.seed + run)
    flagged = picked[result.records] >= n_clean
    return {
        "persona": persona,
        "run": run,
        "score": result.score,
        "alpha": result.alpha,
        "precision": float(flagged.mean()) if len(flagged) else 0.0,
        "recall": float(flagged.sum() / config.anomalous) if config.anomalous else float("nan"),
        "records": picked[result.records].tolist(),
        "nodes": result.nodes.tolist(),
    }


def node_set(runs: list[dict], min_run_fraction: float = 0.0) -> set[int]:
    """Nodes found in any run (``min_run_fraction = 0``) or in at least that fraction of the runs."""
    counts: dict[int, int] = {}
    for run in runs:
        for node in run["nodes"]:
            counts[node] = counts.get(node, 0) + 1
    return {n for n, c in counts.items() if c >= max(1, min_run_fraction * len(runs))}


def overlap(sets: dict[str, set[int]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(jaccard matrix, per persona: nodes, exclusive nodes, nodes shared by all)``."""
    names = list(sets)
    jaccard = pd.DataFrame(
        [
            [len(sets[a] & sets[b]) / len(sets[a] | sets[b]) if sets[a] | sets[b] else float("nan") for b in names]
            for a in names
        ],
        index=names,
        columns=names,
    )
    shared = set.intersection(*sets.values()) if sets else set()
    rows = [
        {
            "persona": name,
            "nodes": len(nodes),
            "exclusive": len(nodes - set().union(*(sets[o] for o in names if o != name))),
            "shared_by_all": len(shared),
        }
        for name, nodes in sets.items()
    ]
    return jaccard, pd.DataFrame(rows)


def individual(cache: ActivationCache, rows: list[Statement], config: ScanConfig) -> pd.DataFrame:
    """Each test record scanned alone: its score, alpha and number of nodes, clean or anomalous."""
    background, clean, anomalous = (
        cache.layer(cache.ensure(t, config.batch_size, False), config.layer) for t in pools(rows, config)
    )
    ranges = pvalue_ranges(background, np.concatenate([clean, anomalous]), config.tail)
    out = []
    for i in range(len(ranges)):
        result = scan_individual(ranges[i], config.score, config.a_max)
        out.append(
            {
                "record": i,
                "anomalous": i >= len(clean),
                "score": result.score,
                "alpha": result.alpha,
                "nodes": len(result.nodes),
            }
        )
    return pd.DataFrame(out)


def run_deepscan(
    handle: ModelHandle,
    statements: dict[str, list[Statement]],
    out: str | Path,
    config: ScanConfig,
    activations: str | Path | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Scan every persona into ``out`` (pools not given ``sized``); returns the summary table (one row per persona)."""
    config = sized(statements, config)[0]
    check(statements, config, handle.n_blocks)
    out = Path(out)
    settings = {**model_settings(handle), "config": _settings(config)}
    extends = {"runs": config.runs, "personas": list(statements)}
    prompts = statement_format(handle)
    run = claim(out, "deepscan", settings, extends, prompt_format=prompts)
    say(f"prompt format: {prompts}", progress)
    cache = ActivationCache(activations or out / "activations", handle)
    cache.ensure([s.text for rows in statements.values() for s in rows], config.batch_size, progress)
    runs = {}
    with Store(out / "scans.sqlite") as store:
        for persona, rows in statements.items():
            runs[persona] = scan_persona(cache, rows, persona, config, store, progress)
    summary = _summary(runs)
    write_csv(summary, out / "scan_summary.csv")
    columns = ["run", "score", "alpha", "precision", "recall"]
    table = [
        {
            "persona": p,
            **{c: r[c] for c in columns},
            "n_records": len(r["records"]),
            "n_nodes": len(r["nodes"]),
            "records": json.dumps(r["records"]),
            "nodes": json.dumps(r["nodes"]),
        }
        for p, rs in runs.items()
        for r in rs
    ]
    write_csv(pd.DataFrame(table), out / "scan_runs.csv")
    sets = {p: node_set(r, config.min_run_fraction) for p, r in runs.items()}
    (out / "node_sets.json").write_text(json.dumps({p: sorted(s) for p, s in sets.items()}) + "\n")
    lines = [
        f"# DeepScan on {handle.name}, layer {config.layer}",
        "",
        f"- {config.runs} runs of {config.clean} clean + {config.anomalous} anomalous records, background "
        f"{config.background} negatives; score {config.score}, {config.tail} tail, {config.restarts} restart(s)",
        "",
        markdown_table(summary, {c: ".3g" for c in summary.columns if c != "persona"}),
    ]
    if len(sets) > 1:
        jaccard, counts = overlap(sets)
        write_csv(jaccard, out / "jaccard.csv", index=True)
        write_csv(counts, out / "overlap.csv")
        names = list(sets)
        plot_heatmap(
            jaccard.to_numpy(),
            names,
            names,
            f"Jaccard overlap of node sets ({short_name(handle.name)}, layer {config.layer})",
            "Jaccard",
            out / "jaccard.png",
            row_label="persona",
            column_label="persona",
            limits=(0.0, 1.0),
            cell_format=".2f",
        )
        plot_upset(sets, f"Node sets of personas ({short_name(handle.name)}, layer {config.layer})", out / "upset.png")
        lines += [
            "",
            "Node sets "
            + ("(union over runs)" if config.min_run_fraction == 0 else f"(in >= {config.min_run_fraction:g} of runs)")
            + ":",
            "",
            markdown_table(counts),
        ]
        lines += ["", "Jaccard:", "", markdown_table(jaccard.reset_index(names="persona"), dict.fromkeys(names, ".2f"))]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    run.write(
        model=handle.name,
        revision=handle.revision,
        config=config.model_dump(),
        positions="last token of the statement as system message with the generation prompt",
    )
    say(
        f"wrote {out}/scan_summary.csv, scan_runs.csv, summary.md"
        + (", jaccard.png, upset.png" if len(sets) > 1 else ""),
        progress,
    )
    return summary


def _summary(runs: dict[str, list[dict]]) -> pd.DataFrame:
    rows = []
    for persona, rs in runs.items():
        frame = pd.DataFrame(
            [
                {
                    "score": r["score"],
                    "precision": r["precision"],
                    "recall": r["recall"],
                    "records": len(r["records"]),
                    "nodes": len(r["nodes"]),
                    "alpha": r["alpha"],
                }
                for r in rs
            ]
        )
        row = {"persona": persona, "runs": len(rs)}
        for column in frame.columns:
            row[f"{column}_mean"] = float(frame[column].mean())
            row[f"{column}_std"] = float(frame[column].std(ddof=1)) if len(frame) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)
