"""Two ``personalab extract`` processes started at once on one new run folder both finish, and the
store holds exactly what a single run stores."""

import sqlite3

import torch
from helpers.fakes import TRAIT, extract_process, split_token_scorer
from helpers.judge_server import JudgeServer

from personalab.vectors import load_vectors

TRIALS = 2
SMALL = dict(samples=2, batch_size=4, max_new_tokens=8)


def _rows(db_path) -> dict[str, list]:
    with sqlite3.connect(db_path) as db:
        return {
            table: db.execute(f"SELECT * FROM {table} ORDER BY key").fetchall()
            for table in ("generations", "judgements")
        }


def test_two_processes_on_one_new_store(model_folder, tmp_path):
    folder = model_folder("llama", "chatml")
    trait_file = tmp_path / "grumpy.json"
    TRAIT.save(trait_file)
    with JudgeServer(scorer=split_token_scorer) as server:
        single = extract_process(folder, trait_file, tmp_path / "single", server.base_url, **SMALL)
        assert single.wait(timeout=300) == 0, single.stdout.read().decode()[-2000:]
        expected = _rows(tmp_path / "single" / "generations.sqlite")
        vectors, _ = load_vectors(tmp_path / "single")
        pairs = len(TRAIT.extraction_questions) * len(TRAIT.instructions) * SMALL["samples"]
        assert len(expected["generations"]) == 2 * pairs
        for trial in range(TRIALS):
            out = tmp_path / f"trial-{trial}"
            procs = [extract_process(folder, trait_file, out, server.base_url, **SMALL) for _ in range(2)]
            for proc in procs:
                assert proc.wait(timeout=300) == 0, f"trial {trial}: " + proc.stdout.read().decode()[-2000:]
            assert _rows(out / "generations.sqlite") == expected, f"trial {trial}"
            got, _ = load_vectors(out)
            assert all(torch.equal(got[k], vectors[k]) for k in vectors), f"trial {trial}"
