"""One self-contained HTML page for one or several run folders.

Figures are embedded as PNG data, style and script inline; each run's tables, answers and
pairs are a JSON block that the page parses when the run is first shown and renders a page of
rows at a time. Opening the file needs no network and no server.
"""

import json
import sqlite3
from datetime import datetime
from pathlib import Path, PurePosixPath

from jinja2 import Environment, PackageLoader, select_autoescape
from markdown_it import MarkdownIt
from markupsafe import Markup

from personalab.errors import InvalidInputError
from personalab.report.answers import extraction_pairs, stored_answers
from personalab.report.folders import RunFolder, read_run

REPORT = "report.html"
"""The report a run command writes into its run folder."""

ASSETS = Path(__file__).parent / "assets"
_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")


def _embedded_json(value: object) -> Markup:
    """JSON safe inside a ``<script>`` element: every ``<`` escaped, so no text can close it."""
    return Markup(json.dumps(value, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c"))


def _documents(run: RunFolder) -> tuple[list[tuple[str, Markup]], set[str]]:
    """Markdown files rendered, ``summary.md`` first, and the figures they show.

    An image a document links by relative path is embedded from the run's figures; one that is
    not there becomes its alt text and a problem.
    """
    names = sorted(run.documents, key=lambda name: (name != "summary.md", name.count("/"), name))
    rendered, shown = [], set()
    for name in names:
        tokens = _MARKDOWN.parse(run.documents[name])
        for token in tokens:
            for child in token.children or []:
                if child.type != "image":
                    continue
                target = str(PurePosixPath(name).parent / str(child.attrGet("src")))
                if target in run.figures:
                    child.attrSet("src", f"data:image/png;base64,{run.figures[target]}")
                    shown.add(target)
                else:
                    run.problems.append(f"{name} shows {target}, which is missing")
                    child.type, child.tag, child.content = "text", "", f"[{child.content}: {target} is missing]"
        rendered.append((name, Markup(_MARKDOWN.renderer.render(tokens, _MARKDOWN.options, {}))))
    return rendered, shown


def _trait_files(run: RunFolder) -> list[Path]:
    """``trait.json`` of the folder and of the vector runs its ``meta.json`` names (finetune monitors)."""
    found = [run.path / "trait.json"]
    monitors = run.meta.get("monitors")
    for monitored in monitors if isinstance(monitors, list) else []:
        if isinstance(monitored, dict) and isinstance(monitored.get("path"), str):
            found.append(Path(monitored["path"]) / "trait.json")
    return [path for path in found if path.is_file()]


def _run_data(run: RunFolder) -> dict:
    """The JSON block of a run; a store or pairs file that cannot be read becomes a problem."""
    data: dict = {"tables": [{"path": t.path, "columns": t.columns, "rows": t.rows} for t in run.tables]}
    if run.store is not None:
        try:
            data["answers"] = stored_answers(run.store, _trait_files(run))
        except (sqlite3.Error, json.JSONDecodeError) as exc:
            run.problems.append(f"{run.store.name} cannot be read: {exc}")
    pairs = run.path / "pairs.jsonl"
    if pairs.is_file():
        try:
            data["pairs"] = extraction_pairs(pairs)
        except (InvalidInputError, UnicodeDecodeError) as exc:
            run.problems.append(f"pairs.jsonl cannot be read: {exc}")
    return data


def _judge_notice(meta: dict) -> str | None:
    """What a run's judge is not, when it is the ``lexicon:`` keyword metric."""
    from personalab.judging.lexicon import NOTICE

    settings = meta.get("settings") if isinstance(meta.get("settings"), dict) else {}
    judge = meta.get("judge") or settings.get("judge")
    return f"{judge}: {NOTICE.removeprefix('lexicon: ')}" if str(judge).startswith("lexicon:") else None


def _related(runs: list[RunFolder]) -> list[list[tuple[str, int, str]]]:
    """Per run, links to the other runs of the report it compares or was compared in."""
    index = {run.path.resolve(): i for i, run in enumerate(runs)}
    links: list[list[tuple[str, int, str]]] = [[] for _ in runs]
    for i, run in enumerate(runs):
        trained = run.meta.get("trained") if run.kind == "compare" else None
        for path in trained if isinstance(trained, list) else []:
            j = index.get(Path(path).resolve())
            if j is not None:
                links[i].append(("compares the distilled model of", j, runs[j].path.name))
                links[j].append(("compared with the steered and base models in", i, run.path.name))
    return links


def build_page(folders: list[str | Path]) -> tuple[str, list[RunFolder]]:
    """The HTML of the report on ``folders`` and what was read of each, with its problems (a folder
    that is not a run is listed with why)."""
    runs = [read_run(folder) for folder in folders]
    data = [_run_data(run) for run in runs]
    env = Environment(loader=PackageLoader("personalab.report"), autoescape=select_autoescape(default=True))
    documents = [_documents(run) for run in runs]
    views = [
        {
            "name": run.path.name or str(run.path),
            "path": str(run.path),
            "kind": run.kind,
            "prompt_format": run.meta.get("prompt_format"),
            "judge_notice": _judge_notice(run.meta),
            "problems": run.problems,
            "related": related,
            "documents": docs,
            "figures": sorted((name, image) for name, image in run.figures.items() if name not in shown),
            "tables": run.tables,
            "configs": [(name, json.dumps(value, indent=2, ensure_ascii=False)) for name, value in run.configs.items()],
            "has_answers": "answers" in block,
            "has_pairs": "pairs" in block,
            "data": _embedded_json(block),
        }
        for run, block, related, (docs, shown) in zip(runs, data, _related(runs), documents, strict=True)
    ]
    title = "personalab report: " + ", ".join(view["name"] for view in views)
    html = env.get_template("report.html.j2").render(
        title=title,
        created=datetime.now().strftime("%Y-%m-%d %H:%M"),
        runs=views,
        css=Markup((ASSETS / "report.css").read_text()),
        js=Markup((ASSETS / "report.js").read_text()),
    )
    return html, runs


def write_report(folders: list[str | Path], out: str | Path) -> list[RunFolder]:
    """Write the report on ``folders`` to ``out``; returns what was read of each folder."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    html, runs = build_page(folders)
    out.write_text(html)
    return runs
