"""install.py: `pyvhost install-host` -- the host files that name the installed programs: the
systemd units, QEMU's vhost-user descriptors (docs/interop/vhost-user.json) and an example
configuration, written with the path of the binaries this installation really has.  The
templates shipped in vhost/data say /usr/local/bin; a virtual environment (the README's install)
puts the console scripts elsewhere, and a unit or descriptor naming a missing binary fails only
when systemd or libvirt first starts it.

Owns: rendering those templates and writing them under a prefix (default /), reporting each file.
Must not: start, enable or reload units (systemctl is the administrator's step, printed at the
end), create users, or overwrite an existing configuration file.
"""
from __future__ import annotations

import json
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).with_name("data")
SHIPPED_BINDIR = "/usr/local/bin"
_SHIPPED_BIN_RE = re.compile(re.escape(SHIPPED_BINDIR) + r"/([A-Za-z0-9_.-]+)")


@dataclass(frozen=True)
class HostFile:
    dest: Path                  # where it goes, the prefix included
    text: str
    replace: bool               # False: an existing file is the administrator's; keep it
    programs: tuple[str, ...]   # the binaries it names (checked to exist in bindir)


def default_bindir() -> Path:
    """Where pip put this installation's console scripts (a venv's bin/)."""
    return Path(sysconfig.get_path("scripts"))


def _unit(src: Path, bindir: Path) -> tuple[str, tuple[str, ...]]:
    text = src.read_text()
    names = tuple(dict.fromkeys(_SHIPPED_BIN_RE.findall(text)))
    text = _SHIPPED_BIN_RE.sub(lambda m: str(bindir / m.group(1)), text)
    return text, names


def _descriptor(src: Path, bindir: Path) -> tuple[str, tuple[str, ...]]:
    d = json.loads(src.read_text())
    name = Path(d["binary"]).name
    d["binary"] = str(bindir / name)
    return json.dumps(d, indent=2) + "\n", (name,)


def plan(prefix: Path, bindir: Path) -> list[HostFile]:
    """The files install-host writes, in order: units, descriptors, the example config."""
    files = []
    for src in sorted((DATA / "systemd").iterdir()):
        text, names = _unit(src, bindir)
        files.append(HostFile(prefix / "etc/systemd/system" / src.name, text, True, names))
    for src in sorted((DATA / "qemu" / "vhost-user").glob("*.json")):
        text, names = _descriptor(src, bindir)
        files.append(HostFile(prefix / "etc/qemu/vhost-user" / src.name, text, True, names))
    text, names = _unit(DATA / "pyvhost.toml", bindir)
    files.append(HostFile(prefix / "etc/pyvhost/pyvhost.toml", text, False, names))
    return files


def missing_programs(files: list[HostFile], bindir: Path) -> list[str]:
    names = dict.fromkeys(n for f in files for n in f.programs)
    return [n for n in names if not (bindir / n).is_file()]


def install_host(prefix: str | Path = "/", bindir: str | Path | None = None,
                 dry_run: bool = False, out=sys.stdout) -> int:
    """Write (or with dry_run, list) the host files; 0 on success, 1 with a one-line error on
    stderr when a program the files name is not in bindir."""
    prefix = Path(prefix)
    bindir = Path(bindir) if bindir is not None else default_bindir()
    bindir = bindir.resolve() if bindir.exists() else bindir
    files = plan(prefix, bindir)
    missing = missing_programs(files, bindir)
    if missing:
        sys.stderr.write(f"pyvhost: error: {', '.join(missing)} not found in {bindir} (install "
                         f"the project there first, or give --bindir)\n")
        return 1
    if any(str(bindir).startswith(p) for p in ("/root/", "/home/", "/run/user/")):
        out.write(f"warning: {bindir} is under a home directory: the units' ProtectHome=yes "
                  f"hides it from the service (install into /opt, as the README does)\n")
    verb = "would write" if dry_run else "wrote"
    for f in files:
        if f.dest.exists() and not f.replace:
            out.write(f"kept {f.dest} (exists; the shipped example is {DATA / 'pyvhost.toml'})\n")
            continue
        if not dry_run:
            f.dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.dest.with_name(f.dest.name + ".pyvhost-new")
            tmp.write_text(f.text)
            tmp.chmod(0o644)
            tmp.replace(f.dest)
        out.write(f"{verb} {f.dest}\n")
    if not dry_run:
        out.write(f"next: systemctl daemon-reload; {bindir / 'pyvhost'} check --config "
                  f"{prefix / 'etc/pyvhost/pyvhost.toml'}; systemctl enable --now "
                  "pyvhost.service\n")
    return 0
