"""`pyvhost serve --config FILE` as systemd runs it (vhost/service.py), through the real program:

  * the shipped example config (paths moved into a temp dir, run inside a network namespace the
    test creates for its taps) serves all five devices: block I/O on two queues, a read-only
    device refusing writes, a tap device, two switch ports exchanging frames, sockets with the
    configured group and mode, STATUS updates on connect, metrics scraped with exact counts;
  * the sd_notify protocol seen by a real datagram listener: READY=1 only once every socket
    listens, STATUS=, RELOADING=1 then READY=1 on SIGHUP, STOPPING=1 on SIGTERM;
  * SIGHUP: added devices start, removed ones stop, a changed one restarts, and frontends of the
    unchanged devices keep their connection and keep doing I/O; a broken file keeps the old set;
  * SIGTERM with I/O in flight: every request the backend took completes (status and data),
    the rest stays untouched in the ring, exit 0, sockets removed;
  * socket activation: systemd-socket-activate hands the sockets over by name
    (LISTEN_FDNAMES); sockets held by the "service manager" (the test) survive a restart of the
    service, and a frontend that connects while it is down is served by the next instance.
"""
from __future__ import annotations

import grp
import os
import shutil
import signal
import socket
import stat
import sys
import time
from pathlib import Path

import pytest

from protocols import virtio_blk as vb
from vhost.testing import netns as nsh
from vhost.testing.backends import REPO_ROOT, short_tmpdir
from vhost.testing.blk import Frontend, blk_write
from vhost.testing.net import NetFrontend, make_frame
from vhost.testing.serve import LAUNCH, TIMEOUT, Serve
from vhost.testing.serve import blk_dev as _blk_dev, metric as _metric
from vhost.testing.serve import metrics_url as _metrics_url, scrape as _scrape

EXAMPLE = REPO_ROOT / "vhost" / "data" / "pyvhost.toml"
MAC_A, MAC_B = bytes.fromhex("02aa00000001"), bytes.fromhex("02bb00000002")


@pytest.fixture
def tmp():
    d = short_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _sw_dev(tmp, name, switch="sw0", **extra) -> str:
    lines = [f'name = "{name}"', 'type = "net"', f'socket = "{tmp}/{name}.sock"',
             f'switch = "{switch}"'] + [f"{k} = {v}" for k, v in extra.items()]
    return "[[device]]\n" + "\n".join(lines) + "\n"


# -- the example config ----------------------------------------------------------------------------

@pytest.mark.skipif(not nsh.available()[0], reason=nsh.available()[1])
def test_example_config_serves_everything(tmp):
    group = grp.getgrgid(os.getgid()).gr_name
    text = EXAMPLE.read_text()
    text = text.replace("/run/pyvhost", str(tmp)).replace("/var/lib/pyvhost", str(tmp))
    text = text.replace('"127.0.0.1:9560"', '"127.0.0.1:0"').replace('"kvm"', f'"{group}"')
    text = text.replace('size = "8G"', 'size = "64M"').replace('size = "1G"', 'size = "8M"')
    conf = tmp / "pyvhost.toml"
    conf.write_text(text)
    with nsh.namespace(no_ipv6=True) as ns:
        sv = Serve(tmp, conf, ns=ns)
        try:
            msg = sv.ready()
            assert msg["STATUS"] == "serving 5 devices; 0 frontends connected"
            for name in ("vda", "iso", "net0", "sw0-a", "sw0-b"):
                st = os.stat(tmp / f"{name}.sock")      # all listening before READY=1
                assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
                assert st.st_gid == os.getgid()
            assert nsh.link_state(ns, "pyvtap0").exists and nsh.link_state(ns, "pyvsw0").exists
            url = _metrics_url(sv)
            data = os.urandom(64 << 10)
            with Frontend(str(tmp / "vda.sock"), num_queues=2, timeout=TIMEOUT) as fe:
                assert "vda" in sv.notify.wait_for("STATUS")["STATUS"]
                assert fe.get_config().capacity == (64 << 20) // 512
                assert fe.write(128, data, queue=0) == vb.S_OK
                assert fe.read(128, len(data), queue=1) == (vb.S_OK, data)
                assert fe.read((64 << 20) // 512, 512, queue=1)[0] == vb.S_IOERR
                text = _scrape(url, ns)
                assert _metric(text, "pyvhost_frontend_connected", device="vda") == 1
                assert _metric(text, "pyvhost_frontend_connected", device="iso") == 0
                assert _metric(text, "pyvhost_requests_total", device="vda", queue=0) == 1
                assert _metric(text, "pyvhost_written_bytes_total", device="vda",
                               queue=0) == len(data)
                assert _metric(text, "pyvhost_read_bytes_total", device="vda",
                               queue=1) == len(data)
                assert _metric(text, "pyvhost_errors_total", device="vda", queue=1) == 1
            with Frontend(str(tmp / "iso.sock"), timeout=TIMEOUT) as fe:
                assert fe.write(0, b"x" * 512) == vb.S_IOERR            # read-only
                assert fe.read(0, 512) == (vb.S_OK, bytes(512))
            with NetFrontend(tmp / "net0.sock", timeout=TIMEOUT) as nf:
                assert nf.get_config().max_virtqueue_pairs == 1
            with NetFrontend(tmp / "sw0-a.sock", mac=MAC_A, timeout=TIMEOUT) as a, \
                    NetFrontend(tmp / "sw0-b.sock", mac=MAC_B, timeout=TIMEOUT) as b:
                frames = [make_frame(60 + k, dst=MAC_B, src=MAC_A, seq=k) for k in range(10)]
                b.post_rx()
                a.send_many(frames)
                got = [p.frame for p in b.recv_packets(10, TIMEOUT)]
                assert got == frames                    # flooded (B unknown) but in order
                text = _scrape(url, ns)
                sent = sum(len(f) for f in frames)
                assert _metric(text, "pyvhost_requests_total", device="sw0-a", queue=1) == 10
                assert _metric(text, "pyvhost_read_bytes_total", device="sw0-a",
                               queue=1) == sent          # frame bytes, no virtio_net_hdr
                assert _metric(text, "pyvhost_requests_total", device="sw0-b", queue=0) == 10
                # the flood reached the uplink tap too (a port like the others)
                up = _metric(text, "pyvhost_requests_total", device="sw0:uplink", queue=0) + \
                    _metric(text, "pyvhost_dropped_packets_total", device="sw0:uplink", queue=0)
                assert up == 10
        finally:
            rc = sv.stop()
        assert rc == 0, sv.log_text()
    log = sv.log_text()
    stopping = [f for f in sv.events() if f.get("msg") == "stats"]
    assert {f["device"] for f in stopping} >= {"vda", "iso", "net0", "sw0-a", "sw0-b"}
    for name in ("vda", "iso", "net0", "sw0-a", "sw0-b"):
        assert not (tmp / f"{name}.sock").exists(), log


# -- notify + SIGHUP -------------------------------------------------------------------------------

@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_notify_and_sighup_reload(tmp, loop):
    conf = tmp / "c.toml"
    conf.write_text(_blk_dev(tmp, "vda") + _blk_dev(tmp, "vdb") + _sw_dev(tmp, "sa")
                    + _sw_dev(tmp, "sb"))
    sv = Serve(tmp, conf, loop=loop)
    try:
        assert sv.ready()["STATUS"] == "serving 4 devices; 0 frontends connected"
        assert sv.events("ready: 4 devices")[0]["loop"] == loop
        ino_vda = os.stat(tmp / "vda.sock").st_ino
        with Frontend(str(tmp / "vda.sock"), timeout=TIMEOUT) as fe, \
                NetFrontend(tmp / "sa.sock", mac=MAC_A, timeout=TIMEOUT) as a:
            assert fe.write(0, b"1" * 4096) == vb.S_OK
            # edit: vdb removed, vdc added, sb changed (mtu), vda and sa untouched
            conf.write_text(_blk_dev(tmp, "vda") + _blk_dev(tmp, "vdc") + _sw_dev(tmp, "sa")
                            + _sw_dev(tmp, "sb", mtu=9000))
            sv.signal(signal.SIGHUP)
            m = sv.notify.wait_for("RELOADING", "1")
            assert int(m["MONOTONIC_USEC"]) > 0
            st = sv.ready()["STATUS"]
            assert st.startswith("serving 4 devices; 2 frontends connected"), st
            reload_ev = sv.events("reloaded")[-1]
            assert (set(reload_ev["started"].split(",")), set(reload_ev["stopped"].split(",")),
                    reload_ev["failed"]) == ({"sb", "vdc"}, {"vdb", "sb"}, "-"), reload_ev
            assert not (tmp / "vdb.sock").exists()
            assert os.stat(tmp / "vda.sock").st_ino == ino_vda        # not re-created
            # the unchanged devices' frontends kept their connections
            assert fe.read(0, 4096) == (vb.S_OK, b"1" * 4096)
            assert fe.write(8, b"2" * 4096) == vb.S_OK
            with Frontend(str(tmp / "vdc.sock"), timeout=TIMEOUT) as fc:
                assert fc.write(0, b"c" * 512) == vb.S_OK
            with NetFrontend(tmp / "sb.sock", mac=MAC_B, timeout=TIMEOUT) as b:
                assert b.get_config().mtu == 9000
                b.post_rx()
                f = make_frame(100, dst=MAC_B, src=MAC_A, seq=1)
                a.send(f)
                assert [p.frame for p in b.recv_packets(1, TIMEOUT)] == [f]
            # a broken file: the running set stays, an error is logged, READY=1 again
            conf.write_text(_blk_dev(tmp, "vda") + "[[device]]\nname = 3\n")
            sv.signal(signal.SIGHUP)
            sv.ready()
            errs = sv.events("reload failed")
            assert errs and f"{conf}: device 2: name must be" in errs[-1]["msg"], sv.log_text()
            assert fe.read(8, 4096) == (vb.S_OK, b"2" * 4096)
            assert (tmp / "vdc.sock").exists() and (tmp / "sb.sock").exists()
        assert sv.proc.poll() is None
        sv.signal(signal.SIGTERM)
        assert sv.notify.wait_for("STOPPING", "1")
    finally:
        rc = sv.stop()
    assert rc == 0, sv.log_text()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_watchdog_stopping_and_exit(tmp, loop):
    conf = tmp / "c.toml"
    conf.write_text(_blk_dev(tmp, "vda"))
    sv = Serve(tmp, conf, env={"WATCHDOG_USEC": "200000"}, loop=loop)
    try:
        sv.ready()
        # WATCHDOG_USEC=0.2 s: pings every 0.1 s from the event loop, so three separate pings
        # arrive well within each wait (at the default interval none would)
        for _ in range(3):
            sv.notify.wait_for("WATCHDOG", "1", timeout=5)
        sv.proc.send_signal(signal.SIGTERM)
        assert sv.notify.wait_for("STOPPING", "1")["STOPPING"] == "1"
        assert sv.proc.wait(timeout=TIMEOUT) == 0
    finally:
        sv.stop()
    assert not (tmp / "vda.sock").exists()


# -- SIGTERM with I/O in flight --------------------------------------------------------------------

def test_sigterm_completes_inflight_io(tmp):
    """128 x 1 MiB O_DIRECT writes are put on the ring in one go and SIGTERM follows at once.
    Every request the backend took is completed with its data in the image; none is half done;
    the process exits 0 and removes its socket."""
    img_dir = Path(os.environ.get("PYVHOST_TEST_DISK_DIR", "/var/tmp"))
    work = Path(short_tmpdir(str(img_dir / "pvh")))
    try:
        conf = tmp / "c.toml"
        conf.write_text(_blk_dev(tmp, "vda").replace(f'"{tmp}/vda.img"', f'"{work}/vda.img"')
                        .replace('"16M"', '"128M"'))
        sv = Serve(tmp, conf)
        n, size = 128, 1 << 20
        payloads = [os.urandom(16) * (size // 16) for _ in range(n)]
        try:
            sv.ready()
            fe = Frontend(str(tmp / "vda.sock"), queue_size=256, mem_size=160 << 20,
                          timeout=TIMEOUT)
            fe.connect()
            vq = fe.queues[0]
            ctxs = [fe._prepare(vq, blk_write(k * size // 512, payloads[k]), k)
                    for k in range(n)]
            vq.publish([c.head for c in ctxs])
            vq.kick(force=True)
            # the worker takes the whole batch within microseconds of the kick; 128 MiB of
            # O_DIRECT writes take ~250 ms on this VM's disk (and >= 40 ms on a fast NVMe)
            time.sleep(0.01)
            sv.proc.send_signal(signal.SIGTERM)
            rc = sv.proc.wait(timeout=TIMEOUT)
        finally:
            sv.stop()
        assert rc == 0, sv.log_text()
        assert not (tmp / "vda.sock").exists()
        order = [f["msg"].split(" ")[0] for f in sv.events()
                 if f.get("msg", "").startswith(("stopped listening", "frontend disconnected"))]
        assert order == ["stopped", "frontend"], "stop accepting first, then drain"
        done = {head: ln for head, ln in vq.reap()}
        stats = [f for f in sv.events() if f.get("msg") == "stats"][-1]
        assert int(stats["requests"]) == len(done) and stats["inflight"] == "0", stats
        with open(work / "vda.img", "rb") as f:
            image = f.read()
        for k, c in enumerate(ctxs):
            status = fe.mem.read(c.status_gpa, 1)[0]
            on_disk = image[k * size:(k + 1) * size]
            if c.head in done:
                assert status == vb.S_OK and on_disk == payloads[k], k
            else:
                assert status != vb.S_OK, f"request {k} has a status but no used entry"
        fe._release()                   # the backend is gone: no GET_VRING_BASE to ask
        at_stop = sv.events("stopping")[-1]["inflight"]
        print(f"\n{at_stop} requests in flight at SIGTERM; {len(done)} of {n} writes taken and "
              f"completed before exit")
        assert int(at_stop) > 0, "nothing was in flight: the test proved nothing"
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- socket activation -----------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate (Debian package systemd) is not installed")
def test_systemd_socket_activate_maps_names_to_devices(tmp):
    """systemd-socket-activate listens on two sockets named by --fdname; the config names the
    devices the same way, with different socket paths: the inherited sockets are served (a
    warning notes the path difference) and nothing is bound at the configured paths."""
    conf = tmp / "c.toml"
    conf.write_text(_blk_dev(tmp, "vda").replace("vda.sock", "cfg-vda.sock")
                    + _sw_dev(tmp, "sa").replace("sa.sock", "cfg-sa.sock"))
    sv = Serve(tmp, conf, argv_prefix=[
        "systemd-socket-activate", "-l", str(tmp / "vda.sock"), "-l", str(tmp / "sa.sock"),
        "--fdname=vda:sa", "-E", "NOTIFY_SOCKET", "-E", "PYTHONPATH"])
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (tmp / "sa.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        # systemd-socket-activate starts the program on the first connection
        with Frontend(str(tmp / "vda.sock"), timeout=TIMEOUT) as fe:
            sv.ready()
            assert fe.write(0, b"s" * 4096) == vb.S_OK
            assert fe.read(0, 4096) == (vb.S_OK, b"s" * 4096)
        with NetFrontend(tmp / "sa.sock", timeout=TIMEOUT) as nf:
            assert nf.get_config().max_virtqueue_pairs == 1
        assert not (tmp / "cfg-vda.sock").exists() and not (tmp / "cfg-sa.sock").exists()
        assert any("socket-activated" in f.get("msg", "") for f in sv.events()), sv.log_text()
    finally:
        rc = sv.stop()
    assert rc == 0, sv.log_text()


def test_activated_sockets_survive_a_restart(tmp):
    """The test plays systemd: it owns the listening sockets and starts the service twice with
    them (LISTEN_FDS/LISTEN_FDNAMES, fds 3.., LISTEN_PID = the service's pid).  The socket file
    is never removed or re-created by the service, data written through the first instance is
    read back through the second, and a frontend that connects while no instance runs is served
    by the next one."""
    conf = tmp / "c.toml"
    conf.write_text(_blk_dev(tmp, "vda"))
    path = tmp / "vda.sock"
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(str(path))
    ls.listen(8)
    ino = os.stat(path).st_ino

    def start(log_dir: Path) -> Serve:
        log_dir.mkdir()
        return Serve(log_dir, conf, pass_fds=(ls.fileno(),),
                     argv_prefix=[sys.executable, "-c", LAUNCH, str(ls.fileno()), "vda"])

    try:
        s1 = start(tmp / "run1")
        try:
            s1.ready()
            with Frontend(str(path), timeout=TIMEOUT) as fe:
                assert fe.write(16, b"r" * 4096) == vb.S_OK
        finally:
            assert s1.stop() == 0, s1.log_text()
        assert os.stat(path).st_ino == ino, "the service must not remove an inherited socket"
        # a frontend connecting while the service is down waits in the listen backlog ...
        import threading
        result = {}

        def early():
            with Frontend(str(path), timeout=TIMEOUT) as fe2:
                result["read"] = fe2.read(16, 4096)

        t = threading.Thread(target=early)
        t.start()
        time.sleep(0.5)
        assert "read" not in result
        s2 = start(tmp / "run2")          # ... and is served by the next instance
        try:
            s2.ready()
            t.join(TIMEOUT)
            assert result.get("read") == (vb.S_OK, b"r" * 4096)
        finally:
            assert s2.stop() == 0, s2.log_text()
        assert os.stat(path).st_ino == ino
    finally:
        ls.close()
