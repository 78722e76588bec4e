"""The run report: every command's folder as one page whose content equals the folder's files,
bad folders reported and skipped, and the page's filters checked in headless Chromium."""

import base64
import json
import shutil
import sqlite3
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from helpers.checks import chromium as find_chromium
from helpers.fakes import TRAIT, token_scorer
from helpers.judge_server import JudgeServer
from typer.testing import CliRunner

from personalab.cli import app
from personalab.judging.fluency import FLUENCY
from personalab.traits import COHERENCE_CONTINUATION, COHERENCE_RUBRIC

runner = CliRunner()
HOSTILE = "</script><script>alert(1)</script><!-- & \u2028"
KINDS = ("extract", "sweep", "distill", "compare", "bake", "finetune", "correlate")
KINDS += ("localize", "deepscan", "compose", "trace")


def _run(*args, env=None) -> str:
    result = runner.invoke(app, [str(a) for a in args], env=env, terminal_width=200)
    assert result.exit_code == 0, (args[0], result.output)
    return result.output


@pytest.fixture(scope="module")
def runs(model_folder, tmp_path_factory) -> Path:
    """One finished run folder per command, on tiny random models, each named after its command."""
    root = tmp_path_factory.mktemp("runs")
    llama = model_folder("llama", "chatml")
    m, small = ["--model", llama, "--device", "cpu"], ["--max-new-tokens", "4"]
    TRAIT.save(root / "grumpy.json")
    data = root / "data.jsonl"
    chats = [
        [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"Answer {i}."}] for i in range(8)
    ]
    data.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in chats))
    for step in (1, 2):
        shutil.copytree(llama, root / "ckpt" / f"step-{step}")
    personas = ["--persona", "politically-liberal", "--persona", "subscribes-to-utilitarianism"]
    v, judge = ["--vector", root / "extract"], ["--judge", "api:j"]
    ckpts = f"{root / 'ckpt' / 'step-1'},{root / 'ckpt' / 'step-2'}"
    commands = {
        "extract": [*m, "--trait", root / "grumpy.json", *judge, "--samples", "2", "--min-pairs", "1", *small]
        + ["--pos-threshold", "30", "--neg-threshold", "70"],
        "sweep": [*m, *v, *judge, "--layers", "1,2", "--alphas", "-1,0,1", "--eval-samples", "4", *small],
        "distill": [*m, *v, "--layer", "2", "--alpha", "1", "--lora-rank", "2", "--trajectories", "4", *small]
        + ["--steps", "2", "--micro-batch-size", "2", "--grad-accum", "1"],
        "compare": [*m, *v, "--layer", "2", "--alpha", "1", *judge, "--eval-samples", "2", *small]
        + ["--tuned", root / "distill"],
        "bake": [*m, *v, "--layer", "2", "--alpha", "1", "--exact"],
        "finetune": [*m, "--data", data, "--lora-rank", "2", "--lr", "0.01", "--steps", "4", "--micro-batch-size", "2"]
        + ["--warmup-steps", "1", "--checkpoint-every", "2", "--monitor", root / "extract", "--monitor-layer", "2"]
        + ["--monitor-tokens", "4", "--monitor-judge", "api:j"],
        "correlate": ["--model", llama, "--tuned", root / "finetune", *v, "--layer", "2", *judge, "--eval-samples", "1"]
        + [*small, "--device", "cpu"],
        "localize": [*m, *personas, "--activations", root / "acts", "--figure-layers", "2"],
        "deepscan": [*m, *personas, "--activations", root / "acts", "--layer", "2", "--background", "40"]
        + ["--test-clean", "20", "--clean", "10", "--anomalous", "10", "--runs", "2"],
        "compose": ["--model", model_folder("qwen2", "chatml"), "--device", "cpu", "--grid", "short"]
        + ["--layers", "0,1,2"],
        "trace": ["--checkpoints", ckpts, "--trait", "evil", *judge, "--samples", "1", "--eval-samples", "1"]
        + [*small, "--layer", "1", "--device", "cpu", "--pos-threshold", "0", "--neg-threshold", "101"],
    }
    with JudgeServer(scorer=token_scorer) as server:
        for kind, args in commands.items():
            _run(kind, *args, "--out", root / kind, env={"PERSONALAB_JUDGE_BASE_URL": server.base_url})
    return root


class _Page(HTMLParser):
    """The parts of a report a reader sees: data blocks, configuration, images, problems, run links."""

    def __init__(self, text: str):
        super().__init__()
        self.data: dict[str, str] = {}
        self.configs: list[str] = []
        self.images: list[str] = []
        self.problems: list[str] = []
        self._into: tuple[str, str] | None = None
        self._problems = 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script" and attrs.get("type") == "application/json":
            self._into = ("data", attrs["id"])
        elif tag == "pre" and attrs.get("class") == "config":
            self._into = ("config", "")
        elif tag == "img" and "src" in attrs:  # the zoom dialog's image gets its source on a click
            self.images.append(attrs["src"])
        elif tag == "div" and attrs.get("class") == "problems":
            self._problems = 1
        elif tag == "li" and self._problems:
            self._into = ("problem", "")

    def handle_endtag(self, tag):
        if tag in ("script", "pre", "li"):
            self._into = None
        if tag == "div" and self._problems:
            self._problems = 0

    def handle_data(self, data):
        if self._into is None:
            return
        kind, name = self._into
        if kind == "data":
            self.data[name] = self.data.get(name, "") + data
        elif kind == "config":
            self.configs[-1:] = [self.configs[-1] + data] if name else [*self.configs[-1:], data]
            self._into = ("config", "more")
        else:
            self.problems.append(data)


def _read(path: Path) -> tuple[_Page, list[dict]]:
    page = _Page(path.read_text())
    blocks = [json.loads(page.data[f"data-{i}"]) for i in range(len(page.data))]
    return page, blocks


def _model_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in ("config.json", "adapter_config.json"))


def _files(run: Path, suffix: str) -> list[Path]:
    return [
        p
        for p in sorted(run.rglob(f"*{suffix}"))
        if not any(_model_dir(parent) for parent in p.relative_to(run).parents if parent != Path("."))
    ]


def _answers(block: dict) -> list[dict]:
    """The embedded answer rows as dicts (interned fields resolved)."""
    data, fields = block["answers"], block["answers"]["fields"]
    rows = []
    for row in data["rows"]:
        answer = {f: data["values"][f][row[i]] if f in data["values"] else row[i] for i, f in enumerate(fields)}
        answer.update(zip(data["scores"], row[len(fields) :], strict=True))
        rows.append(answer)
    return rows


def _stored(store: Path) -> list[tuple[dict, str, dict[str, float]]]:
    """Every generation of a store with its scores by rubric, read with plain SQL."""
    with sqlite3.connect(store) as db:
        generations = db.execute("SELECT request, text FROM generations ORDER BY rowid").fetchall()
        out = []
        for request, text in generations:
            question = json.loads(request).get("question", "")
            scores = db.execute(
                "SELECT rubric, score FROM judgements WHERE question = ? AND answer = ?", (question, text)
            )
            out.append((json.loads(request), text, dict(scores.fetchall())))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_each_command_writes_a_report_equal_to_its_folder(runs, kind):
    run = runs / kind
    page, (block,) = _read(run / "report.html")
    assert page.problems == [], page.problems
    assert json.loads(page.configs[0]) == json.loads((run / "meta.json").read_text())

    tables = {t["path"]: t for t in block["tables"]}
    csvs = _files(run, ".csv")
    assert sorted(tables) == sorted(str(p.relative_to(run)) for p in csvs) and (kind in ("bake", "extract") or csvs)
    for path in csvs:
        frame = pd.read_csv(path)
        table = tables[str(path.relative_to(run))]
        assert table["columns"] == list(frame.columns)
        expected = [[None if pd.isna(v) else v for v in row] for row in frame.itertuples(index=False)]
        assert table["rows"] == expected, path.name

    images = {base64.b64decode(src.split(",", 1)[1]) for src in page.images}
    pngs = _files(run, ".png")
    assert {p.read_bytes() for p in pngs} == images and len(page.images) == len(pngs)

    store = run / "generations.sqlite"
    assert ("answers" in block) == store.is_file()
    if store.is_file():
        stored, shown = _stored(store), _answers(block)
        assert len(shown) == len(stored) > 0
        for answer, (request, text, scores) in zip(shown, stored, strict=True):
            assert answer["text"] == text and answer["question"] == request.get("question", "")
            assert answer["sample"] == request.get("sample")
            assert answer.get("coherence") == scores.get(COHERENCE_RUBRIC, scores.get(COHERENCE_CONTINUATION))
            assert answer.get("fluency") == scores.get(FLUENCY)
            trait_scores = [
                s for r, s in scores.items() if r not in (COHERENCE_RUBRIC, COHERENCE_CONTINUATION, FLUENCY)
            ]
            assert answer.get("trait") == (trait_scores[0] if trait_scores else None)
            steer = request.get("steer") or {}
            assert answer["layer"] == steer.get("layer", request.get("layer"))
    if kind == "sweep":
        alphas = {(a["layer"], a["alpha"]) for a in _answers(block)}
        assert alphas == {(None, 0.0)} | {(layer, alpha) for layer in (1, 2) for alpha in (-1.0, 1.0)}
    if kind == "extract":
        pairs = [json.loads(line) for line in (run / "pairs.jsonl").read_text().splitlines()]
        assert block["pairs"] == pairs and len(pairs) == json.loads((run / "meta.json").read_text())["counts"]["pairs"]
        polarity = {a["condition"] for a in _answers(block)}
        assert polarity == {"pos", "neg"}


def test_report_of_several_runs_links_them_and_reports_bad_folders(runs, tmp_path):
    broken = tmp_path / "broken-sweep"
    shutil.copytree(runs / "sweep", broken)
    (broken / "sweep.csv").write_bytes(b"layer,alpha\n1,2,3,4\n\x00\xff")
    (broken / "meta.json").unlink()
    (broken / "heatmap_trait.png").write_text("not an image")
    with sqlite3.connect(broken / "generations.sqlite") as db:
        row = ("k", "m", None, json.dumps({"question": "q", "sample": 0}), "{}", HOSTILE, None)
        db.execute("INSERT INTO generations VALUES (?, ?, ?, ?, ?, ?, ?)", row)
    bad_store = tmp_path / "bad-store"
    shutil.copytree(runs / "compare", bad_store)
    (bad_store / "generations.sqlite").write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        (bad_store / f"generations.sqlite{suffix}").unlink(missing_ok=True)
    (tmp_path / "empty").mkdir()
    folders = [runs / "compare", runs / "distill", broken, bad_store, tmp_path / "empty", tmp_path / "missing"]
    output = _run("report", *folders, "--out", tmp_path / "all.html")
    assert f"wrote {tmp_path / 'all.html'}" in " ".join(output.split())
    page, blocks = _read(tmp_path / "all.html")
    assert len(blocks) == len(folders)
    problems = " ".join(page.problems)
    for expected in (
        "sweep.csv cannot be read",
        "meta.json is missing",
        "heatmap_trait.png is not a PNG image",
        "generations.sqlite cannot be read",
        "not a run folder (no meta.json, bake.json or generations.sqlite)",
        "no such folder",
    ):
        assert expected in problems and expected in " ".join(output.split()), expected
    sweep = _answers(blocks[2])
    assert len(sweep) == len(_stored(runs / "sweep" / "generations.sqlite")) + 1
    assert sweep[-1]["text"] == HOSTILE and all("<" not in text for text in page.data.values())
    assert "sweep.csv" not in {t["path"] for t in blocks[2]["tables"]} and "answers" not in blocks[3]
    html = (tmp_path / "all.html").read_text()
    assert 'compares the distilled model of <a href="#run-1" data-run="1">distill</a>' in html
    assert 'compared with the steered and base models in <a href="#run-0" data-run="0">compare</a>' in html
    with sqlite3.connect(runs / "compare" / "generations.sqlite") as db:
        evals = {json.loads(r)["eval"] for (r,) in db.execute("SELECT request FROM generations")}
    assert {a["condition"] for a in _answers(blocks[0])} == evals and len(evals) == 3


def test_no_report_leaves_the_folder_without_one(model_folder, tmp_path):
    args = ["bake", "--model", model_folder("llama", "chatml"), "--vector", tmp_path / "v", "--layer", "1"]
    import torch

    from personalab.vectors import save_vectors

    save_vectors(tmp_path / "v", {"response_mean": torch.ones(4, 32)}, {})
    _run(*args, "--alpha", "1", "--exact", "--device", "cpu", "--no-report", "--out", tmp_path / "b")
    assert not (tmp_path / "b" / "report.html").exists() and (tmp_path / "b" / "bake.json").is_file()


def test_the_page_filters_answers_in_chromium(runs, tmp_path):
    from playwright.sync_api import sync_playwright

    chromium = find_chromium()
    out = tmp_path / "report.html"
    _run("report", runs / "extract", runs / "sweep", "--out", out)
    stored = _stored(runs / "sweep" / "generations.sqlite")

    def count(layer=None, alpha=None, low=None, text="", unsteered=False) -> int:
        n = 0
        for request, answer, scores in stored:
            steer = request.get("steer") or {}
            if not (unsteered and not steer):
                if layer is not None and steer.get("layer") != layer:
                    continue
                if alpha is not None and steer.get("alpha", 0.0) != alpha:
                    continue
            if low is not None and not scores.get(TRAIT.rubric, -1) >= low:
                continue
            if text and text not in f"{request['question']}\n\n{answer}\n".lower():
                continue
            n += 1
        return n

    pairs = [json.loads(line) for line in (runs / "extract" / "pairs.jsonl").read_text().splitlines()]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("requestfailed", lambda request: errors.append(request.url))
        page.goto(out.as_uri())
        page.wait_for_selector("body[data-ready='1']")

        dropped = page.locator("#run-0 .pairs tr.pair")
        assert dropped.count() == len(pairs)
        page.select_option("#run-0 select[name=status]", "dropped")
        assert dropped.count() == sum(not p["kept"] for p in pairs) > 0

        page.click("#picker a[data-run='1']")
        answers = page.locator("#run-1 .answers .answer")
        assert answers.count() == len(stored) == count()
        page.select_option("#run-1 select[name=layer]", "2")
        page.select_option("#run-1 select[name=alpha]", "1")
        assert answers.count() == count(layer=2, alpha=1.0) == 4
        page.fill("#run-1 input[name=min]", "50")
        assert answers.count() == count(layer=2, alpha=1.0, low=50)
        page.fill("#run-1 input[name=min]", "")
        page.select_option("#run-1 select[name=alpha]", "")
        word = stored[-1][1].strip()[:2].lower()
        page.fill("#run-1 input[name=text]", word)
        page.wait_for_timeout(400)
        assert answers.count() == count(layer=2, text=word) > 0
        page.fill("#run-1 input[name=text]", "")
        page.select_option("#run-1 select[name=side]", "alpha")
        page.wait_for_timeout(400)
        assert answers.count() == count(layer=2, unsteered=True) == 12
        assert page.locator("#run-1 table.side thead th").all_inner_texts() == [
            "prompt",
            "alpha -1",
            "alpha 0",
            "alpha 1",
        ]
        assert page.locator("#run-1 .count").inner_text() == f"12 of {len(stored)} answers"

        figure, zoom = page.locator("#run-1 .figures img").first, page.locator("dialog#zoom")
        small = figure.evaluate("image => image.getBoundingClientRect().width")
        figure.click()
        assert zoom.evaluate("dialog => dialog.open")
        natural, shown = zoom.locator("img").evaluate("i => [i.naturalWidth, i.getBoundingClientRect().width]")
        assert natural == shown > small, "a clicked figure is shown at its saved size"
        zoom.click()
        assert not zoom.evaluate("dialog => dialog.open")
        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot))
        browser.close()
    assert errors == []
    from PIL import Image

    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 50 and max(n for n, _ in colours) < 0.95 * sum(n for n, _ in colours)


def test_an_extraction_that_keeps_too_few_pairs_still_gets_its_report(model_folder, tmp_path):
    args = ["extract", "--model", model_folder("llama", "chatml"), "--trait", tmp_path / "t.json", "--judge", "api:j"]
    args += ["--samples", "1", "--max-new-tokens", "3", "--min-pairs", "1000", "--device", "cpu"]
    TRAIT.save(tmp_path / "t.json")
    with JudgeServer(scorer=token_scorer) as server:
        env = {"PERSONALAB_JUDGE_BASE_URL": server.base_url}
        result = runner.invoke(app, [str(a) for a in [*args, "--out", tmp_path / "run"]], env=env)
    assert result.exit_code == 1 and "need 1000" in result.output
    page, (block,) = _read(tmp_path / "run" / "report.html")
    assert len(block["pairs"]) == len(TRAIT.instructions) * len(TRAIT.extraction_questions)
    assert len(_answers(block)) == 2 * len(block["pairs"]) and "meta.json is missing" not in page.problems
