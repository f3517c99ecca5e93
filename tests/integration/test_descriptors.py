"""QEMU vhost-user backend descriptors (vhost/data/qemu/vhost-user/NN-name.json) as libvirt reads
them: the schema of QEMU's docs/interop/vhost-user.json (VhostUserBackend), the file naming rule,
and agreement with what the named program reports with --print-capabilities."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import devices

from vhost.testing.backends import REPO_ROOT

DESCRIPTOR_DIR = REPO_ROOT / "vhost" / "data" / "qemu" / "vhost-user"
BIN_DIR = Path(sys.executable).parent

# VHostUserBackendType in QEMU's docs/interop/vhost-user.json (7.2 and current master agree).
BACKEND_TYPES = {"9p", "balloon", "block", "caif", "console", "crypto", "gpu", "input", "net",
                 "rng", "rpmsg", "rproc-serial", "scsi", "vsock", "fs"}
# struct VhostUserBackend: description, type, binary mandatory; '*tags' optional; nothing else.
MANDATORY = {"description": str, "type": str, "binary": str}
OPTIONAL = {"tags": list}
# "It is recommended to create vhost user backend JSON files ... with a double-digit prefix"
NAME_RE = re.compile(r"^[0-9]{2}-[A-Za-z0-9][A-Za-z0-9._-]*\.json$")

DESCRIPTORS = sorted(DESCRIPTOR_DIR.glob("*.json"))
# one descriptor per registered device type, for its program
EXPECTED = {f"50-{t.program}.json": (t.capabilities["type"], t.program)
            for t in devices.TYPES.values()}


def test_the_expected_descriptors_ship():
    assert sorted(p.name for p in DESCRIPTORS) == sorted(EXPECTED)
    # nothing else in the directory (libvirt would try to parse any file there)
    assert sorted(p.name for p in DESCRIPTOR_DIR.iterdir()) == sorted(EXPECTED)


@pytest.fixture(params=DESCRIPTORS, ids=lambda p: p.name)
def descriptor(request) -> tuple[Path, dict]:
    path = request.param
    with open(path, encoding="utf-8") as f:
        return path, json.load(f)


def test_file_name_convention(descriptor):
    path, _ = descriptor
    assert NAME_RE.match(path.name), f"{path.name} is not NN-name.json"


def test_schema(descriptor):
    assert_valid_descriptor(*descriptor)


def assert_valid_descriptor(path: Path, d) -> None:
    """VhostUserBackend's schema, and the type and program this file name stands for."""
    assert isinstance(d, dict), "the root element must be one VhostUserBackend object"
    allowed = set(MANDATORY) | set(OPTIONAL)
    assert set(d) <= allowed, f"{path.name}: unknown keys {set(d) - allowed}"
    for key, kind in MANDATORY.items():
        assert key in d, f"{path.name}: mandatory key {key!r} missing"
        assert isinstance(d[key], kind) and d[key], f"{path.name}: {key} must be a non-empty str"
    if "tags" in d:
        assert all(isinstance(t, str) for t in d["tags"]), "tags must be strings"
    assert d["type"] in BACKEND_TYPES, f"{d['type']!r} is not a VHostUserBackendType"
    assert os.path.isabs(d["binary"]) and os.path.normpath(d["binary"]) == d["binary"]
    exp_type, exp_prog = EXPECTED[path.name]
    assert d["type"] == exp_type and os.path.basename(d["binary"]) == exp_prog


def test_binary_reports_the_descriptor_type(descriptor):
    """The descriptor's binary, as installed in this environment (same basename, the venv's bin
    directory instead of /usr/local/bin), prints capabilities of the same type and exits 0."""
    path, d = descriptor
    prog = BIN_DIR / os.path.basename(d["binary"])
    assert prog.exists(), f"{prog} is not installed (pip install the project into this venv)"
    r = subprocess.run([str(prog), "--print-capabilities"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    caps = json.loads(r.stdout)
    assert caps["type"] == d["type"]
    # the debugging tag names the same features (kept in step with the program)
    feature_tags = [t for t in d.get("tags", []) if t.startswith("features=")]
    assert feature_tags == ["features=" + ",".join(caps.get("features", []))]


def test_pip_installs_them_under_share_qemu_vhost_user(tmp_path):
    """A (non-editable) install carries the descriptors as data files to
    <prefix>/share/qemu/vhost-user/, byte for byte.  The wheel is built from a copy of the
    checkout (the build writes build/ and compiles the Cython extensions); editable installs
    cannot carry data files (PEP 660), which is why the README copies them to
    /etc/qemu/vhost-user."""
    import shutil
    import zipfile
    src = tmp_path / "src"
    shutil.copytree(REPO_ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.so", "*.c", "__pycache__", "*.egg-info", ".pytest_cache",
        ".hypothesis", "results"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("pyvhost-*.whl")
    with zipfile.ZipFile(wheel) as z:
        data = {Path(n).name: z.read(n) for n in z.namelist()
                if re.match(r"pyvhost-[^/]+\.data/data/share/qemu/vhost-user/[^/]+$", n)}
    assert sorted(data) == sorted(EXPECTED)
    for name, content in data.items():
        assert content == (DESCRIPTOR_DIR / name).read_bytes()


def test_install_host_writes_descriptors_naming_the_installed_programs(tmp_path):
    """`pyvhost install-host`: the same descriptors, "binary" naming this installation's
    programs (the shipped ones say /usr/local/bin), still valid, still agreeing with the program."""
    r = subprocess.run([str(BIN_DIR / "pyvhost"), "install-host", "--prefix", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "etc/qemu/vhost-user"
    assert sorted(p.name for p in out.iterdir()) == sorted(EXPECTED)
    for path in out.iterdir():
        d = json.loads(path.read_text())
        assert_valid_descriptor(path, d)
        assert d["binary"] == str(BIN_DIR.resolve() / EXPECTED[path.name][1])
        caps = subprocess.run([d["binary"], "--print-capabilities"], capture_output=True,
                              text=True, timeout=30)
        assert caps.returncode == 0 and json.loads(caps.stdout)["type"] == d["type"]
