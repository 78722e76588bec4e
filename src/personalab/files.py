"""Files written whole or not at all: a reader (another process on the same run folder, a crash's restart) sees
the old file or the new one, never a partial one."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (unique to this process) to write to; on success it replaces
    ``path`` in one step, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield partial
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """``path.write_text(text)``, whole or not at all (``replacing``)."""
    with replacing(path) as partial:
        partial.write_text(text)
    return Path(path)
