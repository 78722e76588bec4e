"""A run of ``personalab extract`` killed mid-way resumes to exactly the uninterrupted result."""

import signal
import sqlite3
import time

import pytest
import torch
from helpers.fakes import TRAIT, extract_process, split_token_scorer
from helpers.judge_server import JudgeServer
from helpers.reference import stored_rows

from personalab.judging.judges import CHECK_PROMPT
from personalab.vectors import load_vectors


def _kill_when(proc, db_path, table: str, at_least: int, limit: float = 120.0, how=signal.SIGKILL) -> int:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        n = stored_rows(db_path, table)
        if n >= at_least:
            assert proc.poll() is None, f"the run ended before it was signalled at {n} rows of {table}; slow it down"
            proc.send_signal(how)
            proc.wait()
            return n
        time.sleep(0.005)
    raise AssertionError(f"run ended before {at_least} rows of {table}: {proc.communicate()[0].decode()[-2000:]}")


@pytest.mark.slow
def test_killed_runs_resume_to_the_same_vectors(model_folder, tmp_path):
    folder = model_folder("llama", "chatml")
    trait_file = tmp_path / "grumpy.json"
    TRAIT.save(trait_file)
    total = len(TRAIT.extraction_questions) * len(TRAIT.instructions) * 4 * 2
    with JudgeServer(scorer=split_token_scorer) as server:
        straight = extract_process(folder, trait_file, tmp_path / "straight", server.base_url)
        assert straight.wait(timeout=300) == 0, straight.stdout.read().decode()[-2000:]

        run, db = tmp_path / "resumed", tmp_path / "resumed" / "generations.sqlite"
        killed_at = _kill_when(extract_process(folder, trait_file, run, server.base_url), db, "generations", 3)
        assert killed_at < total
        judged_at = _kill_when(extract_process(folder, trait_file, run, server.base_url), db, "judgements", 5)
        assert stored_rows(db, "generations") == total and judged_at < 2 * total
        calls_before = server.calls
        last = extract_process(folder, trait_file, run, server.base_url)
        assert last.wait(timeout=300) == 0, last.stdout.read().decode()[-2000:]
        prompts = [r["messages"][-1]["content"] for r in server.requests[calls_before:]]
        assert prompts.count(CHECK_PROMPT) == 1
        assert len(prompts) - 1 <= 2 * total - judged_at

    a, _ = load_vectors(tmp_path / "straight")
    b, meta = load_vectors(run)
    assert meta["counts"]["pairs"] == total // 2
    for variant in a:
        assert torch.equal(a[variant], b[variant])
    with sqlite3.connect(tmp_path / "straight" / "generations.sqlite") as x, sqlite3.connect(db) as y:
        query = "SELECT key, text FROM generations ORDER BY key"
        assert x.execute(query).fetchall() == y.execute(query).fetchall()
        query = "SELECT key, score FROM judgements ORDER BY key"
        assert x.execute(query).fetchall() == y.execute(query).fetchall()


@pytest.mark.slow
def test_ctrl_c_is_one_line_exit_130_and_the_rerun_resumes(model_folder, tmp_path):
    folder, trait_file = model_folder("llama", "chatml"), tmp_path / "grumpy.json"
    TRAIT.save(trait_file)
    run, db = tmp_path / "run", tmp_path / "run" / "generations.sqlite"
    with JudgeServer(scorer=split_token_scorer) as server:
        interrupted = extract_process(folder, trait_file, run, server.base_url)
        stored = _kill_when(interrupted, db, "generations", 3, how=signal.SIGINT)
        output = interrupted.stdout.read().decode()
        assert interrupted.returncode == 130 and "Traceback" not in output, output[-2000:]
        assert (
            output.strip().splitlines()[-1]
            == f"interrupted; rerun the same command to resume {run} from what it stored"
        )
        assert stored_rows(db, "generations") >= stored
        last = extract_process(folder, trait_file, run, server.base_url)
        assert last.wait(timeout=300) == 0, last.stdout.read().decode()[-2000:]
    assert load_vectors(run)[1]["counts"]["pairs"] == len(TRAIT.extraction_questions) * len(TRAIT.instructions) * 4


def test_store_computes_only_what_is_missing_and_keeps_each_finished_chunk(tmp_path):
    from personalab.store import Store

    calls: list[list[int]] = []

    def compute(indices: list[int]) -> list[dict]:
        calls.append(indices)
        if len(calls) == 2 and crash:
            raise RuntimeError("killed")
        return [{"square": i * i} for i in indices]

    keys = [f"k{i}" for i in range(5)]
    crash = True
    with Store(tmp_path / "s.sqlite") as store, pytest.raises(RuntimeError):
        store.computed("test", keys, compute, chunk=2)
    assert calls == [[0, 1], [2, 3]]
    crash, calls[:] = False, []
    with Store(tmp_path / "s.sqlite") as store:
        assert store.computed("test", keys, compute, chunk=2) == [{"square": i * i} for i in range(5)]
        assert calls == [[2, 3], [4]]
        assert store.computed("test", keys[::-1], compute, chunk=2) == [{"square": i * i} for i in range(5)][::-1]
    assert calls == [[2, 3], [4]]


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
    from personalab.files import replacing, write_text

    target = write_text(tmp_path / "meta.json", '{"old": 1}\n')
    with pytest.raises(RuntimeError), replacing(target) as partial:
        partial.write_text('{"ne')
        assert target.read_text() == '{"old": 1}\n', "readers see the old file while the new one is written"
        raise RuntimeError("killed")
    assert target.read_text() == '{"old": 1}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]
    write_text(target, '{"new": 2}\n')
    assert target.read_text() == '{"new": 2}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]
