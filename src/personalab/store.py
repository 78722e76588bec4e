"""The embedded SQLite store of generations and judgements (one file per run folder).

Rows are keyed by the sha256 of everything that determines them, so a rerun or a
resumed run reads what is stored instead of recomputing it. Writes are transactions: a
run killed mid-write leaves the store as it was before that write. Several processes may
share one store once it exists (write-ahead log; a writer waits up to two minutes for
another's lock); create it in one process first.
"""

import hashlib
import json
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS generations (
    key TEXT PRIMARY KEY, model TEXT NOT NULL, revision TEXT, request TEXT NOT NULL,
    params TEXT NOT NULL, text TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS judgements (
    key TEXT PRIMARY KEY, judge TEXT NOT NULL, question TEXT NOT NULL, answer TEXT NOT NULL,
    rubric TEXT NOT NULL, score REAL
);
"""


def content_key(*parts: object) -> str:
    """sha256 of the canonical JSON of ``parts``."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class Store:
    """Generations and judgements of a run, in ``path`` (created if absent)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=120)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    def _lookup(self, table: str, column: str, keys: Sequence[str]) -> dict[str, object]:
        found: dict[str, object] = {}
        for start in range(0, len(keys), 500):
            chunk = list(keys[start : start + 500])
            marks = ",".join("?" * len(chunk))
            rows = self.db.execute(f"SELECT key, {column} FROM {table} WHERE key IN ({marks})", chunk)
            found.update(dict(rows.fetchall()))
        return found

    def texts(self, keys: Sequence[str]) -> dict[str, str]:
        """Stored generations among ``keys``."""
        return self._lookup("generations", "text", keys)

    def scores(self, keys: Sequence[str]) -> dict[str, float | None]:
        """Stored judgements among ``keys`` (a stored ``None`` means the judge gave no number)."""
        return self._lookup("judgements", "score", keys)

    def put_texts(self, rows: Iterable[tuple[str, str, str | None, dict, dict, str]]) -> None:
        """Store ``(key, model, revision, request, params, text)`` rows in one transaction."""
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO generations VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (k, m, r, json.dumps(req, sort_keys=True), json.dumps(p, sort_keys=True), t)
                    for k, m, r, req, p, t in rows
                ],
            )

    def put_scores(self, rows: Iterable[tuple[str, str, str, str, str, float | None]]) -> None:
        """Store ``(key, judge, question, answer, rubric, score)`` rows in one transaction."""
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO judgements VALUES (?, ?, ?, ?, ?, ?)", list(rows))

    def count(self, table: str) -> int:
        return self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
