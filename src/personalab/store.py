"""The embedded SQLite store of generations, judgements and study results (one file per run folder).

Rows are keyed by the sha256 of everything that determines them, so a rerun or a
resumed run reads what is stored instead of recomputing it. A stored row never changes:
a second write of the same key is ignored, so every reader sees the first text stored.
Writes are transactions: a run killed mid-write leaves the store as it was before that
write. Several processes may create and write one store at once (write-ahead log; a
writer waits up to two minutes for another's lock, and the switch to the write-ahead log,
which SQLite may refuse at once while another connection holds a lock, is retried).
"""

import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from personalab.errors import PersonalabError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS generations (
    key TEXT PRIMARY KEY, model TEXT NOT NULL, revision TEXT, request TEXT NOT NULL,
    params TEXT NOT NULL, text TEXT NOT NULL, stop INTEGER
);
CREATE TABLE IF NOT EXISTS judgements (
    key TEXT PRIMARY KEY, judge TEXT NOT NULL, question TEXT NOT NULL, answer TEXT NOT NULL,
    rubric TEXT NOT NULL, score REAL
);
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY, study TEXT NOT NULL, value TEXT NOT NULL
);
"""


BUSY_SECONDS = 120.0
"""How long a writer waits for another process's lock before giving up."""

T = TypeVar("T")


def _retry_locked(fn: Callable[[], T], path: Path) -> T:
    """Run ``fn``, retrying with backoff while SQLite reports the database locked or busy."""
    deadline, delay = time.monotonic() + BUSY_SECONDS, 0.01
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            message = str(exc)
            if "locked" not in message and "busy" not in message:
                raise
            if time.monotonic() > deadline:
                raise PersonalabError(
                    f"{path} stayed locked for {BUSY_SECONDS:g} s ({message}); is another process stuck on it?"
                ) from exc
            time.sleep(delay)
            delay = min(2 * delay, 0.5)


class Store:
    """Generations and judgements of a run, in ``path`` (created if absent)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=BUSY_SECONDS, isolation_level="IMMEDIATE")
        try:
            self.db.execute(f"PRAGMA busy_timeout = {int(BUSY_SECONDS * 1000)}")
            _retry_locked(self._create, self.path)
        except sqlite3.OperationalError as exc:  # read-only, a disk error...: the file itself may be sound
            self.db.close()
            raise PersonalabError(f"{self.path} cannot be opened ({exc}); check the disk and its permissions") from None
        except sqlite3.DatabaseError as exc:  # not a database, or a malformed one
            self.db.close()
            aside = self.path.with_name(self.path.name + ".broken")
            raise PersonalabError(
                f"{self.path} is not a readable store ({exc}); move it aside (mv {self.path} {aside}) and rerun: "
                f"what it held is computed again, the rest of the folder is kept"
            ) from None

    def _create(self) -> None:
        mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise sqlite3.OperationalError(f"database is busy: journal mode is {mode}, not wal")
        damage = self.db.execute("PRAGMA quick_check(1)").fetchone()[0]  # reads the file once, at opening
        if damage != "ok":
            raise sqlite3.DatabaseError(f"database disk image is malformed: {damage}")
        self.db.executescript(_SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(generations)")}
        if "stop" not in columns:  # a store written before answers recorded their stop token
            with self.db:
                self.db.execute("ALTER TABLE generations ADD COLUMN stop INTEGER")

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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

    def stops(self, keys: Sequence[str]) -> dict[str, int | None]:
        """The stop token that ended each stored generation among ``keys`` (``None``: it ran out of tokens)."""
        return self._lookup("generations", "stop", keys)

    def scores(self, keys: Sequence[str]) -> dict[str, float | None]:
        """Stored judgements among ``keys`` (a stored ``None`` means the judge gave no number)."""
        return self._lookup("judgements", "score", keys)

    def results(self, keys: Sequence[str]) -> dict[str, dict]:
        """Stored study results among ``keys`` (one JSON object each)."""
        return {k: json.loads(v) for k, v in self._lookup("results", "value", keys).items()}

    def put_results(self, study: str, rows: Iterable[tuple[str, dict]]) -> None:
        """Store ``(key, value)`` results of ``study`` in one transaction; stored keys are kept."""
        values = [(k, study, json.dumps(v, sort_keys=True)) for k, v in rows]
        self._write("INSERT OR IGNORE INTO results VALUES (?, ?, ?)", values)

    def computed(
        self,
        study: str,
        keys: Sequence[str],
        compute: Callable[[list[int]], list[dict]],
        chunk: int,
        advance: Callable[[int], None] | None = None,
    ) -> list[dict]:
        """The result of each key: stored ones read, missing ones computed (``compute(indices)`` -> one result per
        index) ``chunk`` at a time and stored after each chunk, so a crash loses at most one chunk."""
        found = self.results(keys)
        todo = [i for i, key in enumerate(keys) if key not in found]
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            rows = list(zip([keys[i] for i in part], compute(part), strict=True))
            self.put_results(study, rows)
            found.update(rows)
            if advance is not None:
                advance(len(part))
        return [found[key] for key in keys]

    def put_texts(self, rows: Iterable[tuple[str, str, str | None, dict, dict, str, int | None]]) -> None:
        """Store ``(key, model, revision, request, params, text, stop)`` rows in one transaction (``stop``: the
        token that ended the answer, ``None`` when it ran out of tokens); stored keys are kept."""
        values = [
            (k, m, r, json.dumps(req, sort_keys=True), json.dumps(p, sort_keys=True), t, stop)
            for k, m, r, req, p, t, stop in rows
        ]
        self._write(
            "INSERT OR IGNORE INTO generations (key, model, revision, request, params, text, stop) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            values,
        )

    def put_scores(self, rows: Iterable[tuple[str, str, str, str, str, float | None]]) -> None:
        """Store ``(key, judge, question, answer, rubric, score)`` rows in one transaction; stored keys are kept."""
        self._write("INSERT OR IGNORE INTO judgements VALUES (?, ?, ?, ?, ?, ?)", list(rows))

    def _write(self, statement: str, values: list[tuple]) -> None:
        def write() -> None:
            with self.db:
                self.db.executemany(statement, values)

        _retry_locked(write, self.path)

    def count(self, table: str) -> int:
        return self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
