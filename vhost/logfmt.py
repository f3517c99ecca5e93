"""logfmt.py: how every pyvhost program logs: one line per event, `key=value` fields (logfmt).

    ts=2026-11-26T09:30:00.123Z level=info logger=pyvhost.service msg="frontend connected" device=vda peer="pid 4242, uid 0"

Fields come from `event(logger, level, msg, **fields)` or `extra={"fields": {...}}`; plain
`log.info("...")` calls work too (just `msg=`).  When stderr is the journal (systemd sets
JOURNAL_STREAM to stderr's `device:inode`, systemd.exec(5)) the timestamp is left out, since
journald stamps every line itself, and each line starts with a `<N>` syslog priority prefix,
which journald turns into the entry's PRIORITY (SyslogLevelPrefix= defaults to yes).

Owns the format and its parser (tests read the logs back with `parse_line`); no I/O besides the
handler it installs on stderr, no knowledge of devices.
"""
from __future__ import annotations

import logging
import os
import sys
import time

LEVELS = ("debug", "info", "warning", "error")
# syslog priorities (sd-daemon(3)): what journald stores for each level
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


def _quote(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if text and not any(c in text for c in ' "=\\\n\t') and text.isprintable():
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") \
        .replace("\t", "\\t") + '"'


def format_fields(fields) -> str:
    """`{"a": 1, "b": "x y"}` -> `a=1 b="x y"` (keys are kept as given, in order)."""
    return " ".join(f"{k}={_quote(v)}" for k, v in fields.items())


def parse_line(line: str) -> dict[str, str]:
    """The inverse of the formatter for one line: `a=1 b="x y"` -> {"a": "1", "b": "x y"}.
    A leading `<N>` journald priority prefix is returned as key `priority`."""
    out: dict[str, str] = {}
    i, n = 0, len(line)
    if line.startswith("<") and ">" in line[:4] and line[1:line.index(">")].isdigit():
        out["priority"] = line[1:line.index(">")]
        i = line.index(">") + 1
    while i < n:
        while i < n and line[i] == " ":
            i += 1
        eq = line.find("=", i)
        if eq < 0:
            break
        key = line[i:eq]
        i = eq + 1
        if i < n and line[i] == '"':
            i += 1
            buf = []
            while i < n and line[i] != '"':
                if line[i] == "\\" and i + 1 < n:
                    i += 1
                    buf.append({"n": "\n", "t": "\t"}.get(line[i], line[i]))
                else:
                    buf.append(line[i])
                i += 1
            i += 1
            out[key] = "".join(buf)
        else:
            end = line.find(" ", i)
            end = n if end < 0 else end
            out[key] = line[i:end]
            i = end
    return out


def stderr_is_journal(environ=None) -> bool:
    """JOURNAL_STREAM=<dev>:<ino> names the journal stream systemd connected stdout/stderr to;
    it only counts if stderr is still that stream (a child may have redirected it)."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class Formatter(logging.Formatter):
    def __init__(self, journal: bool = False):
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        fields = {}
        if not self.journal:
            fields["ts"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + \
                f".{int(record.msecs):03d}Z"
        fields["level"] = record.levelname.lower()
        fields["logger"] = record.name
        fields["msg"] = record.getMessage()
        extra = getattr(record, "fields", None)
        if extra:
            for k, v in extra.items():
                fields[k if k not in fields else f"field_{k}"] = v
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        line = format_fields(fields)
        if self.journal:
            line = f"<{_PRIORITY.get(record.levelno, 6)}>{line}"
        return line


def setup(level: str = "info", stream=None, environ=None) -> None:
    """Send every pyvhost log line to stderr in logfmt at `level` (replaces earlier handlers)."""
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    handler.setFormatter(Formatter(journal=stream is sys.stderr and stderr_is_journal(environ)))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())


def event(logger: logging.Logger, level: int, msg: str, **fields) -> None:
    """Log one event with fields: event(log, logging.INFO, "frontend connected", device="vda")."""
    if logger.isEnabledFor(level):
        logger.log(level, msg, extra={"fields": fields})
