"""The package's wings depend on each other in one direction only (README, "Architecture")."""

import ast
from pathlib import Path

import personalab

ROOT = Path(personalab.__file__).parent

ALLOWED = {
    "errors": set(),
    "hashes": set(),
    "files": {"errors"},
    "console": set(),
    "store": {"files", "errors", "hashes"},
    "vectors": {"files", "errors"},
    "records": {"files", "errors"},
    "sae": {"files", "errors"},
    "figures": {"files", "errors"},
    "engine": {"files", "errors", "console", "store", "vectors", "hashes"},
    "runfolder": {"files", "errors", "engine", "hashes"},
    "traits": {"files", "errors", "engine", "hashes"},
    "judging": {"files", "errors", "console", "store", "engine", "traits", "hashes"},
    "report": {"files", "errors", "records", "traits", "judging"},
    "persona": {"files", "errors", "vectors", "engine", "records", "traits", "sae"},
    "methods": {
        "files", "errors", "console", "store", "hashes", "vectors", "records", "figures", "engine", "runfolder",
        "traits", "judging", "report", "persona", "sae",
    },
    "studies": {
        "files", "errors", "console", "store", "hashes", "vectors", "records", "figures", "engine", "runfolder",
        "traits", "judging", "report", "persona", "sae", "methods",
    },
    "api": {
        "files", "errors", "console", "store", "hashes", "vectors", "records", "figures", "engine", "runfolder",
        "traits", "judging", "report", "persona", "sae", "methods", "studies",
    },
    "cli": {
        "files", "errors", "console", "store", "hashes", "vectors", "records", "figures", "engine", "runfolder",
        "traits", "judging", "report", "persona", "sae", "methods", "studies", "api",
    },
    "__init__": {"errors", "engine", "persona", "sae", "api"},
    "__main__": {"cli"},
}  # fmt: skip
"""Which wings each wing may import from (besides itself)."""


def _wing(module: str) -> str:
    """The wing of a module: ``personalab.engine.capture`` -> ``engine``, ``personalab`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1] if len(parts) > 2 else parts
    return ".".join(parts) if parts != ["personalab", "__init__"] else "personalab"


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every ``personalab`` import in the file, at any depth (lazy imports too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "personalab":
            names = [alias.name for alias in node.names]
            if node.module == "personalab":
                found += [(f"personalab.{name}", []) for name in names if name[0].islower()]
            else:
                found.append((node.module, names))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] == "personalab"]
    return found


SOURCES = sorted(ROOT.rglob("*.py"))


def test_the_wings_are_there():
    wings = {_wing(_module_name(p)) for p in SOURCES}
    assert {"engine", "judging", "methods", "studies", "report", "figures", "persona", "api", "cli", "traits"} <= wings
    assert wings <= set(ALLOWED), wings - set(ALLOWED)


def test_imports_point_one_way():
    wrong = [
        f"{path.relative_to(ROOT)} ({own}) imports {module}"
        for path in SOURCES
        for own in [_wing(_module_name(path))]
        for module, _ in _imports(path)
        if _wing(module) != own and _wing(module) not in ALLOWED[own]
    ]
    assert not wrong, "\n".join(wrong)


def test_no_engine_module_imports_a_study_a_judge_or_the_cli():
    engine = [p for p in SOURCES if _wing(_module_name(p)) == "engine"]
    assert len(engine) >= 10
    for path in engine:
        for module, _ in _imports(path):
            assert _wing(module) not in {"studies", "judging", "cli"}, f"{path.name} imports {module}"


def test_no_module_imports_another_modules_private_names():
    for path in SOURCES:
        for module, names in _imports(path):
            private = [n for n in names if n.startswith("_")]
            assert not private, f"{path.relative_to(ROOT)} imports {private} from {module}"


def test_the_checker_sees_a_forbidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from personalab.studies.sweep import _paired_tests\n    import personalab.cli\n")
    assert _imports(bad) == [("personalab.studies.sweep", ["_paired_tests"]), ("personalab.cli", [])]
    assert "studies" not in ALLOWED["engine"] and "cli" not in ALLOWED["engine"]


def test_tests_are_by_level_and_no_test_imports_another():
    """Every test module sits in unit/, integration/ or acceptance/; what they share is in helpers/ (benchmarks/
    reuses it), and none imports another test module or the conftest."""
    tests = Path(__file__).resolve().parents[1]
    loose = [p.name for p in tests.glob("test_*.py")]
    assert not loose, f"test modules outside a level folder: {loose}"
    levels = {p.parent.name for p in tests.rglob("test_*.py")}
    assert levels == {"unit", "integration", "acceptance"}, levels
    wrong = []
    for path in [*tests.rglob("*.py"), *(tests.parent / "benchmarks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            wrong += [
                f"{path.relative_to(tests.parent)} imports {n}"
                for n in names
                if n.split(".")[-1].startswith(("test_", "conftest"))
            ]
    assert not wrong, "\n".join(wrong)
