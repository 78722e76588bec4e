"""Run folders: the settings that made a run, fingerprinted, and the one writer of its ``meta.json``.

Every study claims its folder (``claim``) before any work. ``meta.json`` then holds the run's
``kind``, the personalab version, the command line, the layer convention, its ``settings``
(everything its results depend on), their ``fingerprint`` (sha256 of the canonical JSON), its
``extends`` (settings that only add work: more alphas, layers, samples, runs, checkpoints...) and
its input files with their sha256, and in words how its prompts are written (``prompt_format``); the
study adds its results with ``RunFolder.write``. What determines neither a stored answer nor a
judgement stays out of the fingerprint: where a judge server was reached is ``recorded`` (a server
that moves keeps the stored judgements), and a study leaves out the settings that only choose among
stored results (extraction's filter: a rerun with another threshold re-filters without generating or
judging again, and its results record the threshold they were made with).

A rerun in a folder that holds a run resumes it and extends it, computing only what is new (the
stores skip what they hold). It is refused, in one line naming every changed field with its old
and new value, when it is another kind of run, when a setting differs, or when an input file
changed since; nothing is mixed or relabelled.
"""

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

from personalab.errors import InvalidInputError
from personalab.files import write_text
from personalab.hashes import file_sha256, fingerprint

if TYPE_CHECKING:
    from personalab.engine.handle import ModelHandle

META = "meta.json"

command: str | None = None
"""The command line of this process, when the command line set it (``personalab.cli``)."""


def input_sha256(path: str | Path) -> str:
    """sha256 of an input file's bytes (a folder: of ``vectors.safetensors`` in it, as vector run folders hold)."""
    path = Path(path)
    return file_sha256(path / "vectors.safetensors" if path.is_dir() else path)


def _flat(value: object, prefix: str = "") -> dict[str, object]:
    """Nested dicts as ``{"a.b": value}``; lists and scalars as they are."""
    if isinstance(value, Mapping) and value:
        out: dict[str, object] = {}
        for key, inner in value.items():
            out.update(_flat(inner, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def _short(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def changes(before: Mapping, after: Mapping) -> list[str]:
    """``"field: old -> new"`` for every field (dotted for nested ones) that differs, sorted."""
    old, new = _flat(dict(before)), _flat(dict(after))
    return [
        f"{key}: {_short(old.get(key))} -> {_short(new.get(key))}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


def model_settings(handle: "ModelHandle") -> dict:
    """What a run's results depend on of its model: the name it was loaded from, its revision and dtype, the
    engine that generates its answers, and the GGUF file (with its sha256) its weights were dequantised from."""
    return {
        "model": handle.name,
        "revision": handle.revision,
        "dtype": str(handle.dtype).removeprefix("torch."),
        "engine": "hf" if handle.engine is None else handle.engine.name,
        **({"gguf": handle.gguf.record()} if handle.gguf is not None else {}),
    }


def _jsonable(value: object) -> object:
    return json.loads(json.dumps(value, default=str))


@dataclass
class RunFolder:
    """A claimed run folder; ``header`` is what every ``meta.json`` of the run starts with."""

    path: Path
    header: dict

    def write(self, **results: object) -> Path:
        """Write ``meta.json``: the header, then ``results`` (JSON values), through a temporary file."""
        meta = self.path / META
        return write_text(meta, json.dumps({**self.header, **_jsonable(results)}, indent=2, ensure_ascii=False) + "\n")


def read_meta(path: str | Path) -> dict:
    """The ``meta.json`` of a run folder (``{}`` when it has none or it does not parse)."""
    meta = Path(path) / META
    try:
        return json.loads(meta.read_text()) if meta.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def claim(
    out: str | Path,
    kind: str,
    settings: Mapping,
    extends: Mapping | None = None,
    inputs: Mapping[str, str | Path | None] | None = None,
    prompt_format: str | None = None,
    recorded: Mapping | None = None,
) -> RunFolder:
    """Claim ``out`` for a run of ``kind`` made with ``settings`` (and extending ``extends``); ``inputs``
    names the input files whose content the results depend on, ``prompt_format`` says in words how the
    run's prompts are written (``meta.json`` field ``prompt_format``, shown in the report), ``recorded`` what this
    run used that may change between reruns (``meta.json`` field ``recorded``, not fingerprinted). Refuses, before
    any work, a folder holding another kind of run, other settings or changed inputs (see the module
    docstring); writes ``meta.json`` with the header otherwise, so a run killed before its end is still
    described."""
    from personalab.engine.layers import CONVENTION

    out = Path(out)
    settings, extends = _jsonable(dict(settings)), _jsonable(dict(extends or {}))
    files = {name: {"path": str(path), "sha256": input_sha256(path)} for name, path in (inputs or {}).items() if path}
    before = read_meta(out)
    if "fingerprint" in before:
        if before.get("kind") != kind:
            raise InvalidInputError(
                f"{out} holds a {before.get('kind')} run, not a {kind} run; use another --out (out= in Python)"
            )
        changed = changes(before.get("settings", {}), settings)
        changed += [
            f"input {name}: {before['inputs'][name]['sha256'][:12]} -> {value['sha256'][:12]} (the file changed)"
            for name, value in files.items()
            if name in before.get("inputs", {}) and before["inputs"][name]["sha256"] != value["sha256"]
        ]
        if changed:
            raise InvalidInputError(
                f"{out} was made with other settings ({'; '.join(changed)}); rerun with the same settings to "
                f"resume or extend it, or use another --out (out= in Python)"
            )
    header = {
        "kind": kind,
        "personalab_version": version("personalab"),
        "command": command,
        "layer_convention": CONVENTION,
        "settings": settings,
        "fingerprint": fingerprint(settings),
        "extends": extends,
        "inputs": files,
        **({"prompt_format": prompt_format} if prompt_format else {}),
        **({"recorded": _jsonable(dict(recorded))} if recorded else {}),
    }
    out.mkdir(parents=True, exist_ok=True)
    folder = RunFolder(out, header)
    folder.write(**{k: v for k, v in before.items() if k not in header})
    return folder


def command_line(argv: list[str] | None = None) -> str:
    """This process's command line, as a shell would read it."""
    import shlex

    args = list(sys.argv if argv is None else argv)
    if args and Path(args[0]).name in ("__main__.py", "personalab"):
        args[0] = "personalab"
    return " ".join(shlex.quote(a) for a in args)
