"""ctl.py: `pyvhostctl`, the control API's command-line client (vhost/control.py is the server).

    pyvhostctl [--socket PATH] [--json] METHOD [KEY=VALUE ...] [--params JSON]

Sends one JSON-RPC 2.0 request (KEY=VALUE pairs become its params; a VALUE that parses as JSON --
a number, true/false, a list -- is sent as that, anything else as a string) and prints the
result: a table for a list of objects, `key value` lines for an object, or the raw JSON with
--json.  `subscribe` prints each event as it comes (one line each; --json: the JSON object),
until interrupted or --count events.  Exit status 0; 1 with `pyvhostctl: error: ...` on stderr
when the service refuses the call or cannot be reached; 2 for a bad command line.
Owns only the client side; must not import the service.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys

DEFAULT_SOCKET = "/run/pyvhost/control.sock"


class CtlError(Exception):
    pass


class Client:
    def __init__(self, path: str, timeout: float | None = 60.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise CtlError(f"cannot connect to {path}: {e.strerror or e}") from None
        self.file = self.sock.makefile("rb")
        self.next_id = 1

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def read(self) -> dict:
        line = self.file.readline()
        if not line:
            raise CtlError("the service closed the connection")
        return json.loads(line)

    def call(self, method: str, params: dict | None = None):
        rid = self.next_id
        self.next_id += 1
        self.sock.sendall(json.dumps({"jsonrpc": "2.0", "method": method,
                                      "params": params or {}, "id": rid}).encode() + b"\n")
        while True:
            msg = self.read()
            if msg.get("id") == rid:
                break                       # events may arrive before the answer
        if "error" in msg:
            e = msg["error"]
            raise CtlError(f"{e.get('message')} (code {e.get('code')})"
                           + (f": {json.dumps(e['data'])}" if e.get("data") is not None else ""))
        return msg.get("result")


def parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _cell(v) -> str:
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"))
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def format_result(result) -> str:
    if isinstance(result, list) and result and all(isinstance(r, dict) for r in result):
        cols = list(dict.fromkeys(k for r in result for k in r))
        rows = [[_cell(r.get(c)) for c in cols] for r in result]
        widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
        lines = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, widths)).rstrip()]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
        return "\n".join(lines)
    if isinstance(result, list) and not result:
        return "(none)"
    if isinstance(result, dict):
        w = max((len(k) for k in result), default=0)
        lines = []
        for k, v in result.items():
            if isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
                lines.append(f"{k}:")           # e.g. queues: one line per queue
                lines += [f"  {kk}: {_cell(x)}" for kk, x in v.items()]
            else:
                lines.append(f"{k.ljust(w)}  {_cell(v)}")
        return "\n".join(lines)
    return _cell(result)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="pyvhostctl", description="the pyvhost control API")
    p.add_argument("--socket", default=os.environ.get("PYVHOST_CONTROL_SOCKET", DEFAULT_SOCKET),
                   help=f"the service's control-socket (default {DEFAULT_SOCKET}, env "
                        "PYVHOST_CONTROL_SOCKET)")
    p.add_argument("--json", action="store_true", help="print the JSON result")
    p.add_argument("--params", metavar="JSON", help="the params object as JSON (merged with "
                                                     "KEY=VALUE pairs)")
    p.add_argument("--count", type=int, default=None, help="subscribe: stop after N events")
    p.add_argument("method", help="device-list, device-show, device-add, device-del, "
                                  "switch-show, set-log-level, subscribe")
    p.add_argument("pairs", nargs="*", metavar="KEY=VALUE")
    a = p.parse_args(argv)
    params = {}
    if a.params:
        try:
            params = json.loads(a.params)
        except ValueError as e:
            p.error(f"--params: {e}")
        if not isinstance(params, dict):
            p.error("--params must be a JSON object")
    for pair in a.pairs:
        k, eq, v = pair.partition("=")
        if not eq or not k:
            p.error(f"{pair!r} is not KEY=VALUE")
        params[k] = parse_value(v)
    try:
        with Client(a.socket, timeout=None if a.method == "subscribe" else 60.0) as c:
            result = c.call(a.method, params)
            if a.method != "subscribe":
                print(json.dumps(result, indent=2) if a.json else format_result(result))
                return 0
            seen = 0
            while a.count is None or seen < a.count:
                ev = c.read().get("params", {})
                seen += 1
                print(json.dumps(ev) if a.json else
                      " ".join(f"{k}={_cell(v)}" for k, v in ev.items()), flush=True)
    except CtlError as e:
        sys.stderr.write(f"pyvhostctl: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
