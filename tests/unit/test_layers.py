"""The layering rule of ARCHITECTURE.md, enforced: every import of the product and its test
helpers (including imports inside functions, relative imports and Cython cimports) is parsed and
mapped to a layer, and an import along a forbidden arrow fails the test with the file, line and
arrow.  The second half tests the test: the checker must catch each forbidden arrow when one is
added to an otherwise clean source.  Also: test modules never import each other (shared pieces
live in vhost/testing, tests/conftest.py or tests/inprocess.py), and every vhost/testing module
opens with a docstring saying what it owns and what it must not do."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
while not (ROOT / "pyproject.toml").exists():
    ROOT = ROOT.parent

# module (dotted, a prefix match) -> layer; the longest matching prefix wins
LAYERS = {
    "protocols": "protocols",
    "vhost": "core",                    # vhost/__init__.py
    "vhost.protocol": "core",
    "vhost.memory": "core",
    "vhost.device": "core",
    "vhost.devtype": "core",
    "vhost.server": "server",
    "vhost.service": "service",
    "vhost.config": "service",
    "vhost.cli": "service",
    "vhost.programs": "service",
    "vhost.metrics": "service",
    "vhost.sdnotify": "service",
    "vhost.control": "service",         # the control API's socket (JSON-RPC 2.0)
    "vhost.service_control": "service",
    "vhost.ctl": "service",             # pyvhostctl, the client
    "vhost.install": "service",         # pyvhost install-host
    # a leaf (imports nothing of ours): the log line format, written by the service layer and
    # parsed by the harnesses in vhost/testing
    "vhost.logfmt": "core",
    "vhost.testing": "testing",         # the frontend driver and shared test/bench helpers
    "devices": "devices",
    "cython_ext": "cython_ext",
    "bench": "bench",
    "tests": "tests",
}
OURS = {"protocols", "core", "server", "service", "testing", "devices", "cython_ext", "bench",
        "tests"}

# layer -> layers it must never import (ARCHITECTURE.md, "Layers")
FORBIDDEN = {
    # wire formats only
    "protocols": OURS - {"protocols"},
    # the sans-I/O core knows no socket, no service and no device
    "core": {"server", "service", "devices", "cython_ext", "testing", "bench", "tests"},
    # a device knows the core, the wire formats and its compiled loop only
    "devices": {"server", "service", "testing", "bench", "tests"},
    # the server is handed a device; it does not pick one
    "server": {"service", "devices", "cython_ext", "testing", "bench", "tests"},
    # the service reaches the data plane only through devices/
    "service": {"cython_ext", "testing", "bench", "tests"},
    # the compiled loops know nothing of Python-level layers
    "cython_ext": OURS - {"cython_ext", "protocols"},
    # the frontend driver is a frontend: it talks to any backend over the wire
    "testing": {"server", "service", "devices", "tests"},
    "bench": {"tests"},
    "tests": set(),
}

PACKAGES = ("protocols", "vhost", "devices", "cython_ext", "bench", "tests")
CIMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+c?import|c?import\s+([\w.]+))", re.M)


def layer_of(module: str) -> str | None:
    best = None
    for prefix, layer in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    return best[1] if best else None


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(module: str, source: str, is_package: bool, cython: bool = False):
    """(line, imported module) for every import in `source`, anywhere in the file."""
    if cython:
        for m in CIMPORT.finditer(source):
            yield source.count("\n", 0, m.start()) + 1, m.group(1) or m.group(2)
        return
    base = module if is_package else module.rpartition(".")[0]
    seen = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = base.split(".")
                pkg = pkg[:len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                target = ".".join(pkg + ([node.module] if node.module else []))
            else:
                target = node.module
            # `from vhost import service` imports the module vhost.service
            for a in node.names:
                full = f"{target}.{a.name}" if layer_of(f"{target}.{a.name}") \
                    != layer_of(target) else target
                if (node.lineno, full) not in seen:
                    seen.add((node.lineno, full))
                    yield node.lineno, full


def violations(files: dict[str, str]) -> list[str]:
    """files: repo-relative path -> source.  The forbidden arrows found, one line each."""
    out = []
    for rel, source in sorted(files.items()):
        path = ROOT / rel
        module = module_name(path)
        src_layer = layer_of(module)
        if src_layer is None:
            continue
        cython = path.suffix in (".pyx", ".pxd")
        for line, target in imports_of(module, source, path.name == "__init__.py", cython):
            dst_layer = layer_of(target)
            if dst_layer is not None and dst_layer in FORBIDDEN[src_layer]:
                out.append(f"{rel}:{line}: {module} ({src_layer}) imports {target} "
                           f"({dst_layer})")
    return out


def repo_files() -> dict[str, str]:
    files = {}
    for pkg in PACKAGES:
        for ext in ("*.py", "*.pyx", "*.pxd"):
            for p in (ROOT / pkg).rglob(ext):
                if ".venv" in p.parts or "build" in p.parts:
                    continue
                files[str(p.relative_to(ROOT))] = p.read_text()
    return files


def test_no_forbidden_import_in_the_tree():
    files = repo_files()
    assert len([f for f in files if f.startswith("devices/")]) >= 3, "the walk found no devices"
    assert violations(files) == []


def test_every_module_has_a_layer():
    unmapped = [f for f in repo_files() if layer_of(module_name(ROOT / f)) is None]
    assert unmapped == []


# -- the test of the test: each forbidden arrow, added back, is caught -------------------------

ADDED = [
    # the old cycle: a device reaching up into the service layer, inside a function
    ("devices/blk.py", "def main():\n    from vhost import cli, config, service\n",
     "imports vhost.service (service)"),
    ("devices/net.py", "import vhost.server\n", "imports vhost.server (server)"),
    # config checking loaded a Cython extension through devices.net
    ("vhost/service.py", "from cython_ext.net import Switch\n", "imports cython_ext.net"),
    ("vhost/device.py", "def f():\n    from .service import Service\n",
     "imports vhost.service (service)"),
    ("vhost/protocol.py", "import devices.blk\n", "imports devices.blk (devices)"),
    ("protocols/virtio.py", "from vhost.memory import GuestMemory\n", "imports vhost.memory"),
    ("bench/guest.py", "from tests.backends import qsd_blk\n", "imports tests.backends (tests)"),
    ("vhost/server.py", "from . import service\n", "imports vhost.service (service)"),
    ("cython_ext/blk.pyx", "from vhost.device cimport x\n", "imports vhost.device (core)"),
]


@pytest.mark.parametrize("rel,extra,needle", ADDED, ids=[a[0] for a in ADDED])
def test_the_checker_catches_an_added_arrow(rel, extra, needle):
    clean = "import os\n" if not rel.endswith(".pyx") else "from libc.stdint cimport uint8_t\n"
    assert violations({rel: clean}) == []
    found = violations({rel: clean + extra})
    assert found and any(needle in f for f in found), found
    # every finding points into the added lines
    assert all(int(f.split(":")[1]) > clean.count("\n") for f in found), found


def test_allowed_arrows_pass():
    assert violations({
        "devices/rng.py": "from vhost.device import Device\nfrom protocols import virtio\n"
                          "def f():\n    from cython_ext.rng import RngQueueWorker\n",
        "vhost/service.py": "import devices\nfrom .server import Server\n",
        "vhost/cli.py": "from . import config as cfg\n",
        "bench/blk.py": "from vhost.testing.connection import Frontend\n",
    }) == []


# -- tests and the shared helpers ---------------------------------------------------------------

def test_test_modules_do_not_import_each_other():
    files = {f: src for f, src in repo_files().items() if f.startswith("tests/")}
    names = {Path(f).stem for f in files if Path(f).stem.startswith("test_")}
    bad = {}
    for rel, src in files.items():
        mod = module_name(ROOT / rel)
        found = sorted({t for _, t in imports_of(mod, src, rel.endswith("__init__.py"))
                        if any(part in names for part in t.split("."))})
        if found:
            bad[rel] = found
    assert not bad


def test_testing_modules_say_what_they_own_and_must_not_do():
    testing = sorted((ROOT / "vhost" / "testing").glob("*.py"))
    assert len(testing) > 5 and not (ROOT / "vhost" / "frontend.py").exists()
    for path in testing:
        if path.name == "__init__.py":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert doc.startswith(path.name + ":"), f"{path.name}: docstring must open with its name"
        assert "Must not" in doc, f"{path.name}: docstring must say what it must not do"
