"""Run report on a sweep-shaped run with 100,000 judged answers: time to build the page, and time for
headless Chromium to open it until the first answers are on screen, against a naive page that
renders every answer into the HTML.

    python benchmarks/bench_report.py [--answers 100000]

Needs Debian's chromium (or CHROMIUM=path) and the playwright package (the dev extra).
"""

import argparse
import html
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from personalab.hashes import content_key
from personalab.report import write_report
from personalab.store import Store
from personalab.traits import COHERENCE_RUBRIC

WORDS = "the a rain storm sun I you we never always think feel because people often quite sure why".split()
RUBRIC = "Rate grumpiness 0-100.\nQ: {question}\nA: {answer}\nNumber:"


def build_run(folder: Path, n: int) -> None:
    """A sweep-shaped store: 20 questions x layers x alphas x samples, answers of about 60 words, two scores each."""
    rng = random.Random(0)
    questions = [f"Question {i}: what do you think about {rng.choice(WORDS)}?" for i in range(20)]
    layers, alphas = [8, 12, 16, 20], [-2.0, -1.0, 0.5, 1.0, 1.5, 2.0]
    generations, judgements = [], []
    for i in range(n):
        question = questions[i % 20]
        steer = {"layer": layers[(i // 20) % 4], "alpha": alphas[(i // 80) % 6], "positions": "response", "vector": "v"}
        request = {"question": question, "sample": i // 480, "steer": steer}
        text = " ".join(rng.choice(WORDS) for _ in range(60)) + f" #{i}"
        generations.append((content_key(i), "model", None, request, {"seed": 0}, text, None))
        for rubric in (RUBRIC, COHERENCE_RUBRIC):
            judgements.append((content_key(i, rubric), "judge", question, text, rubric, float(rng.randint(0, 100))))
    store = Store(folder / "generations.sqlite")
    store.put_texts(generations)
    store.put_scores(judgements)
    store.close()
    (folder / "meta.json").write_text(json.dumps({"model": "model", "config": {"layers": layers, "alphas": alphas}}))
    table = "".join(f"{layer},{alpha},50\n" for layer in layers for alpha in alphas)
    (folder / "sweep.csv").write_text("layer,alpha,trait_mean\n" + table)


def naive_page(folder: Path, out: Path) -> None:
    """Every answer rendered as HTML up front: what a page without on-demand rendering holds."""
    with Store(folder / "generations.sqlite") as store:
        rows = store.db.execute("SELECT request, text FROM generations").fetchall()
    items = "".join(
        f"<article><div>{html.escape(json.loads(r)['question'])}</div><pre>{html.escape(t)}</pre></article>"
        for r, t in rows
    )
    out.write_text(f"<!DOCTYPE html><html><body>{items}</body></html>")


def open_time(browser, page_file: Path, ready: str) -> float:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    start = time.perf_counter()
    page.goto(page_file.as_uri(), timeout=120_000)
    page.wait_for_selector(ready, timeout=120_000)
    elapsed = time.perf_counter() - start
    page.close()
    return elapsed


def filter_time(browser, page_file: Path, n: int) -> float:
    """Seconds from choosing a layer (a quarter of the ``n`` answers) to the filtered count on screen."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(page_file.as_uri(), timeout=120_000)
    page.wait_for_selector("#run-0 .answer", timeout=120_000)
    start = time.perf_counter()
    page.select_option("#run-0 select[name=layer]", "12")
    page.wait_for_function(f"document.querySelector('#run-0 .count').textContent.startsWith('{n // 4} ')")
    elapsed = time.perf_counter() - start
    page.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--answers", type=int, default=100_000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    run = root / "sweep"
    run.mkdir()
    build_run(run, args.answers)
    start = time.perf_counter()
    write_report([run], root / "report.html")
    built = time.perf_counter() - start
    naive_page(run, root / "naive.html")
    size = (root / "report.html").stat().st_size / 2**20
    naive_size = (root / "naive.html").stat().st_size / 2**20
    print(f"{args.answers} answers: report built in {built:.2f} s, {size:.1f} MiB (naive page {naive_size:.1f} MiB)")
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if chromium is None:
        print("no chromium: install Debian's chromium to time opening the page")
        return
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        ours = [open_time(browser, root / "report.html", "#run-0 .answer") for _ in range(3)]
        naive = [open_time(browser, root / "naive.html", "article") for _ in range(3)]
        filtering = filter_time(browser, root / "report.html", args.answers)
        browser.close()
    print(f"open until the first answers show: report {min(ours):.2f} s (runs {', '.join(f'{t:.2f}' for t in ours)})")
    print(f"choose a layer: {filtering * 1000:.0f} ms until the filtered answers show")
    ratio = min(naive) / min(ours)
    print(f"naive page, every answer in the HTML: {min(naive):.2f} s; ratio naive / report {ratio:.1f}x")
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
