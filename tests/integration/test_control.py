"""The control API of `pyvhost serve` (vhost/control.py, vhost/service_control.py) through the real
program and the real client (`pyvhostctl`, vhost/ctl.py):

  * device-add / device-list / device-show / device-del of block and net devices on a running
    service while another device's frontend does I/O the whole time, undisturbed; device-del
    refused while a frontend is connected unless forced (which disconnects it);
  * malformed requests (not JSON, a batch, no method, an unknown method, bad params, a line over
    the cap) each get their JSON-RPC error, and another client is served meanwhile;
  * events (subscribe): device-added, frontend-connected, queue-started, queue-broken (a corrupt
    ring; device-show says "broken" for that queue while the other runs on), queue-stopped,
    frontend-disconnected, device-removed, on both event loops;
  * runtime devices across SIGHUP (kept) and restarts (kept with control-persist, through the
    pyvhost.d drop-in; gone without it);
  * pyvhostctl's table, --json and error exit.
"""
from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from protocols import virtio_blk as vb
from vhost.ctl import Client, CtlError
from vhost.testing.backends import short_tmpdir
from vhost.testing.blk import Frontend
from vhost.testing.serve import TIMEOUT, Serve, blk_dev

PYVHOSTCTL = str(Path(sys.executable).parent / "pyvhostctl")


@pytest.fixture
def tmp():
    d = short_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def config(tmp, persist=False, devices=("vda",)) -> Path:
    conf = tmp / "c.toml"
    conf.write_text(f'[service]\ncontrol-socket = "{tmp}/control.sock"\n'
                    + ("control-persist = true\n" if persist else "")
                    + "".join(blk_dev(tmp, d) for d in devices))
    return conf


def blk_table(tmp, name, **extra) -> dict:
    return dict(name=name, type="block", socket=f"{tmp}/{name}.sock",
                **{"blk-file": f"{tmp}/{name}.img", "size": "8M"}, **extra)


class Steady:
    """A frontend of another device writing and reading back, in a thread, the whole time:
    its I/O must never fail or stall while the control API changes the service."""

    def __init__(self, sock: Path):
        self.fe = Frontend(str(sock), timeout=TIMEOUT).__enter__()
        self.ops = 0
        self.error = None
        self.max_gap = 0.0
        self._stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        last = time.monotonic()
        try:
            while not self._stop.is_set() and self.ops < 200000:
                data = bytes([self.ops & 0xFF]) * 4096
                sector = (self.ops % 64) * 8
                assert self.fe.write(sector, data) == vb.S_OK
                assert self.fe.read(sector, 4096) == (vb.S_OK, data)
                self.ops += 1
                now = time.monotonic()
                self.max_gap = max(self.max_gap, now - last)
                last = now
        except Exception as e:            # reported by check()
            self.error = e

    def check(self, after: int) -> int:
        deadline = time.monotonic() + TIMEOUT
        while self.ops <= after and self.error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.error is None, f"the other device's I/O failed: {self.error!r}"
        assert self.ops > after, "the other device's I/O stalled"
        return self.ops

    def close(self):
        self._stop.set()
        self.t.join(TIMEOUT)
        self.fe.__exit__(None, None, None)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_add_list_show_del_while_another_frontend_does_io(tmp, loop):
    sv = Serve(tmp, config(tmp), loop=loop)
    steady = None
    try:
        sv.ready()
        steady = Steady(tmp / "vda.sock")
        n = steady.check(0)
        with Client(str(tmp / "control.sock")) as c:
            assert [d["name"] for d in c.call("device-list")] == ["vda"]
            added = c.call("device-add", blk_table(tmp, "vdb", **{"num-queues": 2}))
            assert added["name"] == "vdb" and added["origin"] == "control"
            assert added["persisted"] is None
            n = steady.check(n)
            rows = {d["name"]: d for d in c.call("device-list")}
            assert set(rows) == {"vda", "vdb"} and rows["vda"]["connected"] is True
            assert rows["vda"]["frontend"].startswith("pid ")
            fb = Frontend(str(tmp / "vdb.sock"), timeout=TIMEOUT).__enter__()
            try:
                assert fb.write(0, b"b" * 4096) == vb.S_OK
                assert fb.read(0, 4096) == (vb.S_OK, b"b" * 4096)
                show = c.call("device-show", {"name": "vdb"})
                assert show["connected"] and int(show["features"], 16) & (1 << 32)  # VERSION_1
                assert show["options"]["num-queues"] == 2 and show["options"]["size"] == 8 << 20
                assert sum(q["requests"] for q in show["queues"].values()) >= 2
                with pytest.raises(CtlError, match="a frontend is connected"):
                    c.call("device-del", {"name": "vdb"})
                assert fb.read(0, 4096) == (vb.S_OK, b"b" * 4096)      # still served
                assert c.call("device-del", {"name": "vdb", "force": True})["removed"] == "vdb"
                with pytest.raises(Exception):
                    fb.get_config()            # the forced stop disconnected the frontend
            finally:
                try:
                    fb.close()
                except Exception:              # its socket is gone: expected
                    pass
            assert not (tmp / "vdb.sock").exists()
            # a net device on a new switch, then gone again
            c.call("device-add", dict(name="p0", type="net", socket=f"{tmp}/p0.sock",
                                      switch="sw9"))
            assert c.call("device-show", {"name": "p0"})["type"] == "net"
            assert c.call("device-del", {"name": "p0"}) == {"removed": "p0",
                                                              "dropin_removed": None}
            assert [d["name"] for d in c.call("device-list")] == ["vda"]
            n = steady.check(n)
            # refusals: a duplicate name, a socket in use, a bad table, an unknown device
            with pytest.raises(CtlError, match="exists"):
                c.call("device-add", blk_table(tmp, "vda"))
            with pytest.raises(CtlError, match="already used"):
                c.call("device-add", dict(blk_table(tmp, "vdz"), socket=f"{tmp}/vda.sock"))
            with pytest.raises(CtlError, match="-32602"):
                c.call("device-add", dict(blk_table(tmp, "vdz"), **{"queue-size": 100}))
            with pytest.raises(CtlError, match="no device"):
                c.call("device-del", {"name": "nope"})
            assert c.call("set-log-level", {"level": "debug"}) == {"level": "debug"}
        steady.check(n)
        assert steady.max_gap < 5.0, f"the other device stalled {steady.max_gap:.1f} s"
    finally:
        if steady is not None:
            steady.close()
        rc = sv.stop()
    assert rc == 0, sv.log_text()
    calls = sv.events("control call device-add")
    assert calls and all(f["uid"] == "0" for f in calls), calls


def wait_disconnected(c: Client, name: str) -> None:
    """The frontend closed its socket; the service notices a moment later."""
    deadline = time.monotonic() + TIMEOUT
    while c.call("device-show", {"name": name})["connected"]:
        assert time.monotonic() < deadline, f"{name}: the frontend's disconnect was not seen"
        time.sleep(0.02)


def _raw(sock: socket.socket, data: bytes, replies: int | None = None) -> list[dict]:
    """Send lines, read `replies` answers (default: one per line)."""
    sock.sendall(data)
    out, buf = [], b""
    want = data.count(b"\n") if replies is None else replies
    deadline = time.monotonic() + TIMEOUT
    while want > len(out) and time.monotonic() < deadline:
        buf += sock.recv(65536)
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            out.append(json.loads(line))
    return out


def test_malformed_requests_get_errors_and_others_are_served(tmp):
    sv = Serve(tmp, config(tmp))
    try:
        sv.ready()
        a = socket.socket(socket.AF_UNIX)
        a.settimeout(TIMEOUT)
        a.connect(str(tmp / "control.sock"))
        with Client(str(tmp / "control.sock")) as b:
            replies = _raw(a, b"{nope\n[1,2]\n"
                              b'{"jsonrpc":"2.0","id":1}\n'
                              b'{"jsonrpc":"2.0","method":"frobnicate","id":2}\n'
                              b'{"jsonrpc":"2.0","method":"device-show","params":[1],"id":3}\n'
                              b'{"jsonrpc":"2.0","method":"device-show","params":{},"id":4}\n'
                              b'{"jsonrpc":"2.0","method":"device-list","id":5}\n')
            assert [r.get("error", {}).get("code") for r in replies] == \
                [-32700, -32600, -32600, -32601, -32602, -32602, None]
            assert [d["name"] for d in replies[-1]["result"]] == ["vda"]
            assert [d["name"] for d in b.call("device-list")] == ["vda"]     # the other client
            # a notification (no id) gets no answer; the call after it does
            r = _raw(a, b'{"jsonrpc":"2.0","method":"device-list"}\n'
                        b'{"jsonrpc":"2.0","method":"device-list","id":"x"}\n', replies=1)
            assert len(r) == 1 and r[0]["id"] == "x" and "result" in r[0]
            # a line over the cap (3 MiB): one error, the line skipped, the client still served
            r = _raw(a, b"[" * (3 << 20) + b"\n" + b'{"jsonrpc":"2.0","method":"device-list",'
                        b'"id":7}\n', replies=2)
            assert r[0]["error"]["code"] == -32600 and r[1]["id"] == 7 and "result" in r[1]
            assert [d["name"] for d in b.call("device-list")] == ["vda"]
        a.close()
    finally:
        rc = sv.stop()
    assert rc == 0, sv.log_text()


def read_events(ev: Client, until: str) -> list[dict]:
    """Events up to and including the first `until` (bounded by the client's timeout)."""
    seen = []
    while not seen or seen[-1]["event"] != until:
        assert len(seen) < 64, seen
        seen.append(ev.read()["params"])
    return seen


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_subscribe_sees_devices_frontends_and_queues(tmp, loop):
    sv = Serve(tmp, config(tmp), loop=loop)
    try:
        sv.ready()
        with Client(str(tmp / "control.sock")) as ev, Client(str(tmp / "control.sock")) as c:
            assert ev.call("subscribe") == {"subscribed": True}
            c.call("device-add", blk_table(tmp, "vdb", **{"num-queues": 2}))
            with Frontend(str(tmp / "vdb.sock"), num_queues=2, timeout=TIMEOUT) as fb:
                assert fb.write(0, b"x" * 512) == vb.S_OK
                assert fb.write(8, b"y" * 512, queue=1) == vb.S_OK
                show = c.call("device-show", {"name": "vdb"})
                assert [show["queues"][q]["state"] for q in ("0", "1")] == ["running"] * 2
                # a corrupt avail ring on queue 1 (more than a ring ahead): queue-broken for
                # it, queue 0 serves on
                vq = fb.queues[1]
                vq.set_avail_idx(vq.avail_idx + vq.size + 1)
                vq.kick(force=True)
                seen = read_events(ev, "queue-broken")
                assert fb.write(16, b"z" * 512) == vb.S_OK
                show = c.call("device-show", {"name": "vdb"})
                assert [show["queues"][q]["state"] for q in ("0", "1")] == \
                    ["running", "broken"]
            wait_disconnected(c, "vdb")
            seen += read_events(ev, "frontend-disconnected")
            c.call("device-del", {"name": "vdb"})
            seen += read_events(ev, "device-removed")
        kinds = [(e["event"], e["device"], e.get("queue")) for e in seen]
        started = {(e["queue"], e["avail"]) for e in seen if e["event"] == "queue-started"}
        stopped = {e["queue"]: e["avail"] for e in seen if e["event"] == "queue-stopped"}
        assert kinds[:2] == [("device-added", "vdb", None), ("frontend-connected", "vdb", None)]
        assert started == {(0, 0), (1, 0)}, kinds
        assert ("queue-broken", "vdb", 1) in kinds and ("queue-broken", "vdb", 0) not in kinds
        # every started queue stopped again, before the disconnect; queue 0 after its 2 requests
        assert set(stopped) == {0, 1} and stopped[0] == 2, kinds
        assert kinds.index(("frontend-disconnected", "vdb", None)) > max(
            i for i, k in enumerate(kinds) if k[0] == "queue-stopped")
        assert kinds[-1] == ("device-removed", "vdb", None)
        assert seen[1]["frontend"].startswith("pid ")
    finally:
        rc = sv.stop()
    assert rc == 0, sv.log_text()


@pytest.mark.parametrize("persist", [False, True])
def test_runtime_devices_across_sighup_and_restart(tmp, persist):
    conf = config(tmp, persist=persist)
    sv = Serve(tmp, conf)
    try:
        sv.ready()
        with Client(str(tmp / "control.sock")) as c:
            r = c.call("device-add", blk_table(tmp, "vdb"))
            assert (r["persisted"] is not None) == persist
        with Frontend(str(tmp / "vdb.sock"), timeout=TIMEOUT) as fb:
            assert fb.write(0, b"p" * 4096) == vb.S_OK
        sv.signal(signal.SIGHUP)                     # the file does not have vdb: kept
        sv.ready()
        with Client(str(tmp / "control.sock")) as c:
            assert [d["name"] for d in c.call("device-list")] == ["vda", "vdb"]
    finally:
        assert sv.stop() == 0, sv.log_text()
    (tmp / "serve2").mkdir()
    sv = Serve(tmp / "serve2", conf)
    try:
        sv.ready()
        with Client(str(tmp / "control.sock")) as c:
            names = [d["name"] for d in c.call("device-list")]
            assert names == (["vda", "vdb"] if persist else ["vda"])
            if persist:
                with Frontend(str(tmp / "vdb.sock"), timeout=TIMEOUT) as fb:
                    assert fb.read(0, 4096) == (vb.S_OK, b"p" * 4096)
                wait_disconnected(c, "vdb")
                r = c.call("device-del", {"name": "vdb"})
                assert r["dropin_removed"] == str(tmp / "pyvhost.d" / "vdb.toml")
                assert not (tmp / "pyvhost.d" / "vdb.toml").exists()
    finally:
        assert sv.stop() == 0, sv.log_text()


def test_pyvhostctl_table_json_and_errors(tmp):
    sv = Serve(tmp, config(tmp))
    try:
        sv.ready()
        ctl = [PYVHOSTCTL, "--socket", str(tmp / "control.sock")]
        r = subprocess.run(ctl + ["device-add", "name=vdb", "type=block",
                                  f"socket={tmp}/vdb.sock", f"blk-file={tmp}/vdb.img",
                                  "size=8M", "num-queues=2"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        r = subprocess.run(ctl + ["device-list"], capture_output=True, text=True, timeout=60)
        lines = r.stdout.splitlines()
        assert r.returncode == 0 and lines[0].split()[:2] == ["NAME", "TYPE"], r.stdout
        assert [ln.split()[0] for ln in lines[1:]] == ["vda", "vdb"]
        r = subprocess.run(ctl + ["--json", "device-show", "name=vdb"], capture_output=True,
                           text=True, timeout=60)
        assert json.loads(r.stdout)["options"]["num-queues"] == 2
        r = subprocess.run(ctl + ["device-del", "name=nope"], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 1 and r.stderr.startswith("pyvhostctl: error: no device 'nope'")
        r = subprocess.run([PYVHOSTCTL, "--socket", str(tmp / "none.sock"), "device-list"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "cannot connect" in r.stderr
    finally:
        rc = sv.stop()
    assert rc == 0, sv.log_text()


def test_switch_show_lists_ports_and_learned_macs(tmp):
    from vhost.testing.net import NetFrontend, make_frame
    mac_a, mac_b = bytes.fromhex("02aa00000001"), bytes.fromhex("02bb00000002")
    conf = tmp / "c.toml"
    conf.write_text(f'[service]\ncontrol-socket = "{tmp}/control.sock"\n'
                    + "".join(f'[[device]]\nname = "{n}"\ntype = "net"\n'
                              f'socket = "{tmp}/{n}.sock"\nswitch = "sw0"\n'
                              for n in ("p0", "p1")))
    sv = Serve(tmp, conf)
    try:
        sv.ready()
        with Client(str(tmp / "control.sock")) as c, \
                NetFrontend(tmp / "p0.sock", mac=mac_a, timeout=TIMEOUT) as a, \
                NetFrontend(tmp / "p1.sock", mac=mac_b, timeout=TIMEOUT) as b:
            b.post_rx()
            f = make_frame(100, dst=mac_b, src=mac_a, seq=1)
            a.send(f)
            assert [p.frame for p in b.recv_packets(1, TIMEOUT)] == [f]
            c.call("device-add", dict(name="p2", type="net", socket=f"{tmp}/p2.sock",
                                      switch="sw0", mac="02:cc:00:00:00:03"))
            sw = c.call("switch-show", {"name": "sw0"})["sw0"]
            assert set(sw["ports"]) == {"p0", "p1", "p2"} and sw["uplink"] is None
            macs = {m["mac"]: m for m in sw["macs"]}
            assert macs["02:aa:00:00:00:01"]["port"] == "p0"
            assert macs["02:aa:00:00:00:01"]["locked"] is False
            assert macs["02:cc:00:00:00:03"] == dict(mac="02:cc:00:00:00:03", port="p2",
                                                     locked=True, age_s=macs[
                                                         "02:cc:00:00:00:03"]["age_s"])
            assert sw["stats"]["flooded"] >= 1          # B was not learned yet: flooded
            with pytest.raises(CtlError, match="no running switch"):
                c.call("switch-show", {"name": "sw9"})
    finally:
        rc = sv.stop()
    assert rc == 0, sv.log_text()
