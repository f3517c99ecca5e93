"""The repository's import rules, read from the source (no imports of the modules checked):

* vhost/testing (the frontend driver and the shared test/bench helpers) never imports `tests`,
  `devices`, `vhost.server`, `vhost.service` or `vhost.config`, and each of its modules opens
  with a docstring saying what it owns and what it must not do;
* the product (protocols/, vhost/ outside vhost/testing, devices/, cython_ext/) never imports
  vhost.testing, bench or tests;
* bench/ never imports tests;
* test modules never import each other (shared pieces live in vhost/testing, tests/conftest.py
  or tests/inprocess.py)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TESTING = ROOT / "vhost" / "testing"


def imported_modules(path: Path) -> set[str]:
    """Every module named by an import statement anywhere in `path` (functions included);
    relative imports are resolved against the file's package."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = path.relative_to(ROOT).parent.parts
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(pkg[:len(pkg) - node.level + 1])
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def hits(mods: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(m for m in mods if any(m == f or m.startswith(f + ".") for f in forbidden))


def py_files(*dirs: Path) -> list[Path]:
    return sorted(p for d in dirs for p in d.rglob("*.py") if ".venv" not in p.parts)


def test_testing_package_exists_and_frontend_module_is_gone():
    assert (TESTING / "__init__.py").is_file()
    assert not (ROOT / "vhost" / "frontend.py").exists()


@pytest.mark.parametrize("path", py_files(TESTING), ids=lambda p: p.name)
def test_testing_imports_no_backend_and_no_tests(path):
    bad = hits(imported_modules(path),
               ("tests", "devices", "vhost.server", "vhost.service", "vhost.config"))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("path", [p for p in py_files(TESTING) if p.name != "__init__.py"],
                         ids=lambda p: p.name)
def test_testing_modules_say_what_they_own_and_must_not_do(path):
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert doc.startswith(path.name + ":"), f"{path.name}: docstring must open with its name"
    assert "Must not" in doc, f"{path.name}: docstring must say what it must not do"


def test_product_never_imports_testing_bench_or_tests():
    product = [p for p in py_files(ROOT / "protocols", ROOT / "vhost", ROOT / "devices",
                                   ROOT / "cython_ext") if TESTING not in p.parents]
    assert product
    bad = {str(p.relative_to(ROOT)): hits(imported_modules(p), ("vhost.testing", "bench", "tests"))
           for p in product}
    assert not {k: v for k, v in bad.items() if v}


def test_bench_never_imports_tests():
    bad = {str(p.relative_to(ROOT)): hits(imported_modules(p), ("tests",))
           for p in py_files(ROOT / "bench")}
    assert not {k: v for k, v in bad.items() if v}


def test_test_modules_do_not_import_each_other():
    tests = py_files(ROOT / "tests")
    names = {p.stem for p in tests if p.stem.startswith("test_")}
    bad = {}
    for p in tests:
        mods = imported_modules(p)
        found = sorted(m for m in mods if any(part in names for part in m.split(".")))
        if found:
            bad[str(p.relative_to(ROOT))] = found
    assert not bad
