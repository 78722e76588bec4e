"""Files written whole or not at all: a reader (another process on the same run folder, a crash's restart) sees
the old file or the new one, never a partial one."""

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from personalab.errors import InvalidInputError


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


def check_writable(path: str | Path, option: str = "out") -> None:
    """Raise a one-line ``InvalidInputError`` unless ``path`` (a file or folder, there or not) can be written: its
    nearest existing ancestor is a folder in which a folder can be made (tried, and removed at once). Creates
    nothing; ``option`` names the parameter in the message."""
    path = Path(path).absolute()
    there = next(p for p in (path, *path.parents) if p.exists())
    if there != path and not there.is_dir():
        raise InvalidInputError(f"`{option}` {path} is under {there}, which is a file; choose another `{option}`")
    folder = there if there.is_dir() else there.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".personalab-", dir=folder))
    except OSError as exc:
        raise InvalidInputError(
            f"`{option}` {path} cannot be written ({folder}: {exc.strerror}); choose another `{option}`"
        ) from None
