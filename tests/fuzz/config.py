"""config: the `pyvhost serve` configuration file parser (vhost/config.py).

An input is either TOML text loaded from a file (`load`), or a document built field by field from
the keys the parser knows (`parse`), with or without the file checks.  Either a Config comes back
or a ConfigError whose text is one non-empty line; any other exception, or a multi-line message,
is a crash.

Layout: u8 mode (bit 0: check_files; bit 1: structured), then the TOML bytes (text mode) or the
fields the structured builder reads.
"""
from __future__ import annotations

import datetime
import math
import os
import tempfile

import devices
from vhost import config as cfg
from vhost.devtype import BASE_KEYS

from tests.fuzz.data import Input

MAX_LEN = 4096

_DIR = tempfile.mkdtemp(prefix="fuzz-config-")
_PATH = os.path.join(_DIR, "pyvhost.toml")
_IMG = os.path.join(_DIR, "vda.img")
with open(_IMG, "wb") as _f:
    _f.write(bytes(4096))

SERVICE_KEYS = sorted(cfg._SERVICE_KEYS)
TYPES = sorted(devices.TYPES)
DEVICE_KEYS = {t: sorted(set(BASE_KEYS) | {o.name for o in devices.TYPES[t].toml_options()})
               for t in TYPES}
TABLES = {table: (dtype, sorted({"name"} | {o.name for o in dtype.tables[table]}))
          for dtype in devices.TYPES.values() for table in dtype.tables}
ALL_KEYS = sorted({k for keys in DEVICE_KEYS.values() for k in keys}
                  | set(SERVICE_KEYS) | {k for _, keys in TABLES.values() for k in keys})

STRINGS = ["", "vda", "net0", "sw0", "block", "net", "rng", "scsi", "a b", "x" * 70,
           f"{_DIR}/vda.sock", f"{_DIR}/x/y.sock", "/nonexistent/x.sock", "vda.sock",
           "/" + "s" * 120 + ".sock", _IMG, f"{_DIR}/none.img", "/dev/null", "/", "rel.img",
           "0660", "0600", "0066", "999", "0o660", "127.0.0.1:9560", "[::1]:0", ":80", "nowhere",
           "debug", "info", "loud", "uvloop", "asyncio", "root", "kvm", "nogroup-here",
           "52:54:00:00:00:01", "01:00:5e:00:00:01", "zz", "pyvtap0", "t/0", "tap with space",
           "1G", "512M", "0", "-1", "1.5K", "infG", "nan", "1e400", "0x10", "serial-1234567890123",
           "a\nb", "tab\there", "\x00", "é", "\u2028", "/tmp/new\nline/x.sock", f"{_DIR}/a\nb.img",
           "t\n0", "sw\r0"]
INTS = [0, 1, -1, 2, 7, 16, 100, 256, 257, 1024, 4096, 9000, 32768, 65536, 65537,
        3600, 3601, 1 << 31, 1 << 62, (1 << 63) - 1, -(1 << 63)]
FLOATS = [0.0, -0.0, 0.5, 1.0, -1.0, 3600.0, 3600.5, 1e6, 1e300, math.inf, -math.inf, math.nan]


def _value(inp: Input, depth: int = 0):
    kind = inp.u8() % (10 if depth < 2 else 7)
    if kind in (0, 1):
        return inp.pick(STRINGS)
    if kind == 2:
        return inp.pick(INTS)
    if kind == 3:
        return inp.pick(FLOATS)
    if kind == 4:
        return inp.flag()
    if kind == 5:
        return inp.bytes(inp.u8() % 24).decode("utf-8", "replace")
    if kind == 6:
        return inp.pick([datetime.date(2024, 1, 1), datetime.time(1, 2, 3),
                         datetime.datetime(2024, 1, 1, 1, 2, 3)])
    if kind in (7, 8):
        return [_value(inp, depth + 1) for _ in range(inp.u8() % 4)]
    return {inp.pick(ALL_KEYS): _value(inp, depth + 1) for _ in range(inp.u8() % 4)}


def _table(inp: Input, keys: list, fixed: dict) -> dict:
    t = dict(fixed)
    for _ in range(inp.u8() % 8):
        t[inp.pick(keys)] = _value(inp)
    return t


def _array(doc: dict, key: str) -> list:
    if not isinstance(doc.get(key), list):
        doc[key] = []
    return doc[key]


def _document(inp: Input) -> dict:
    doc: dict = {}
    for _ in range(inp.u8() % 6 + 1):
        what = inp.u8() % 8
        if what == 0:
            doc["service"] = _table(inp, SERVICE_KEYS, {})
        elif what in (1, 2, 3, 4):
            t = inp.pick(TYPES)
            fixed = {"name": inp.pick(STRINGS[:4] + ["vdb", "r"]), "type": t,
                     "socket": inp.pick(STRINGS[10:14] + ["/tmp/new\nline/x.sock"])}
            if t == "block" and inp.flag():
                fixed["blk-file"] = _IMG
            _array(doc, "device").append(_table(inp, DEVICE_KEYS[t], fixed))
        elif what == 5 and TABLES:
            table = inp.pick(sorted(TABLES))
            _array(doc, table).append(
                _table(inp, TABLES[table][1], {"name": inp.pick(STRINGS[:4])}))
        else:
            doc[inp.pick(["service", "device", "devices", "switch", "x"])] = _value(inp)
    return doc


def TestOneInput(data: bytes) -> None:
    inp = Input(data)
    mode = inp.u8()
    check_files = bool(mode & 1)
    try:
        if mode & 2:
            result = cfg.parse(_document(inp), _PATH, check_files)
        else:
            with open(_PATH, "wb") as f:
                f.write(inp.bytes(MAX_LEN))
            result = cfg.load(_PATH, check_files)
    except cfg.ConfigError as e:
        text = str(e)
        if not text or "\n" in text or "\r" in text:
            raise AssertionError(f"ConfigError is not one line: {text!r}") from e
        return
    if not isinstance(result, cfg.Config):
        raise AssertionError(f"returned {type(result).__name__}, not a Config")
