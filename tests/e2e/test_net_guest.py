"""End-to-end virtio-net checks: real Linux guests (QEMU, TCG) on a network backend.

All traffic stays inside a network namespace the test creates (``pvh-<random>``, deleted at
the end) and uses TEST-NET-1 addresses (192.0.2.0/24) only.

- ``test_net_qemu_tap``: harness validation with QEMU's own tap backend (no vhost-user); QEMU
  runs inside the namespace that holds the tap.
- ``test_net_pyvhost``: the same checks on our backend (``python -m vhost.programs pyvhost-net --tap``), with 1
  and 2 queue pairs; QEMU talks to it over the Unix socket.
- ``test_net_pyvhost_switch_two_guests``: two concurrent guests on one ``--switch``.

One boot per case: the guest sets its address, sends 100 pings to the host side (0 % loss
required), then moves 16 MiB over TCP each way (busybox ``nc`` in the guest, a small Python peer
in the namespace on the host side) and the SHA-256 sums must match. Throughput is printed, never
asserted.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vhost.testing.netbackends import pyvhost_net

from vhost.testing import guest as g

pytestmark = [pytest.mark.e2e]

MiB = 1 << 20
TCP_MIB = 16
PING_COUNT = 100
HOST_ADDR = "192.0.2.1"
GUEST_ADDR = "192.0.2.2"
SINK_PORT = 5001  # guest -> host
SOURCE_PORT = 5002  # host -> guest
TAP = "pvhtap0"
GUEST_TIMEOUT = 300  # s, per boot
PEER_TIMEOUT = 240  # s, the host peer gives up after this

_ok, _why = g.have_guest_tools()
if not _ok:
    pytestmark.append(pytest.mark.skip(reason=f"e2e guest tools missing: {_why}"))


@pytest.fixture(scope="module")
def netns_ok():
    ok, why = g.have_netns()
    if not ok:
        pytest.skip(f"network namespaces unavailable: {why}")


@pytest.fixture
def ns(netns_ok):
    with g.netns() as name:
        yield name


@pytest.fixture
def sockdir():
    d = g.short_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# host-side TCP peer (runs inside the namespace)

# argv: bind sink_port source_port size out_json deadline_s. Writes out_json + ".ready" once
# listening; serves one connection per port: the sink reads to EOF and hashes, the source sends
# `size` random bytes then closes. Exits when both are done or at the deadline.
PEER_SCRIPT = r"""
import hashlib, json, os, socket, sys, threading, time
bind, sink_port, source_port, size, out, limit = sys.argv[1:7]
sink_port, source_port, size, limit = int(sink_port), int(source_port), int(size), float(limit)
deadline = time.monotonic() + limit
res = {}

def left():
    return max(0.1, deadline - time.monotonic())

def listener(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((bind, port))
    s.listen(1)
    s.settimeout(left())
    return s

def sink(ls):
    try:
        ls.settimeout(left())
        c, peer = ls.accept()
        t0 = time.monotonic()
        h, n = hashlib.sha256(), 0
        while True:
            c.settimeout(left())
            b = c.recv(1 << 20)
            if not b:
                break
            h.update(b)
            n += len(b)
        t1 = time.monotonic()
        c.close()
        res["sink"] = {"bytes": n, "sha": h.hexdigest(), "seconds": t1 - t0, "peer": peer[0]}
    except Exception as e:
        res["sink_error"] = repr(e)

def source(ls, data):
    try:
        ls.settimeout(left())
        c, peer = ls.accept()
        t0 = time.monotonic()
        c.settimeout(left())
        c.sendall(data)
        c.shutdown(socket.SHUT_WR)
        while c.recv(65536):  # until the guest closes (it half-closed at once: no data)
            c.settimeout(left())
        t1 = time.monotonic()
        c.close()
        res["source"] = {"bytes": len(data), "sha": hashlib.sha256(data).hexdigest(),
                         "seconds": t1 - t0, "peer": peer[0]}
    except Exception as e:
        res["source_error"] = repr(e)

data = os.urandom(size)
ls1, ls2 = listener(sink_port), listener(source_port)
open(out + ".ready", "w").close()
ts = [threading.Thread(target=sink, args=(ls1,), daemon=True),
      threading.Thread(target=source, args=(ls2, data), daemon=True)]
for t in ts:
    t.start()
for t in ts:
    t.join(left() + 1)
with open(out + ".tmp", "w") as f:
    json.dump(res, f)
os.rename(out + ".tmp", out)
sys.exit(0 if ("sink" in res and "source" in res) else 1)
"""


class HostPeer:
    def __init__(self, proc: subprocess.Popen, out: Path, log: Path):
        self.proc, self.out, self.log = proc, out, log

    def result(self, timeout: float = 30) -> dict:
        """Wait (bounded) for the peer to finish and return its results."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if not self.out.exists():
            return {"error": f"host peer wrote no result (exit {self.proc.returncode}): "
                             f"{self.log.read_text(errors='replace')[-2000:]}"}
        return json.loads(self.out.read_text())


@contextlib.contextmanager
def host_peer(ns: str, workdir: Path, size: int = TCP_MIB * MiB, bind: str = HOST_ADDR):
    out, log = workdir / "peer.json", workdir / "peer.log"
    cmd = [*g.netns_exec(ns), sys.executable, "-c", PEER_SCRIPT, bind, str(SINK_PORT),
           str(SOURCE_PORT), str(size), str(out), str(PEER_TIMEOUT)]
    with open(log, "wb") as lf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf)
    try:
        deadline = time.monotonic() + 20
        while not Path(str(out) + ".ready").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"host peer did not start (exit {proc.poll()}): "
                                   f"{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.02)
        yield HostPeer(proc, out, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------------
# guest scripts and checks


def single_guest_script(*, ping_mask: str = "1", tx_mask: str = "1", rx_mask: str = "1") -> str:
    """Guest at GUEST_ADDR: 100 pings to the host, TCP_MIB MiB guest->host (SINK_PORT) and
    host->guest (SOURCE_PORT). ``*_mask``: taskset CPU masks (to spread flows over tx queues)."""
    return g.NET_SCRIPT_HELPERS + rf"""
pin() {{ taskset -p $1 $$ >/dev/null 2>&1; }}  # this shell and its children on CPU mask $1
fail=0
net_up {GUEST_ADDR}/24 || {{ echo FAIL=1; exit 1; }}
wait_ping {HOST_ADDR} 30 || {{ echo "host {HOST_ADDR} unreachable"; fail=1; }}
pin {ping_mask}
ping_check PING {HOST_ADDR} {PING_COUNT}

# guest -> host
dd if=/dev/urandom of=/tmp/tx bs=1M count={TCP_MIB} 2>/dev/null
echo TX_SHA=$(sha_of < /tmp/tx)
pin {tx_mask}
t0=$(now_ns)
timeout 120 nc {HOST_ADDR} {SINK_PORT} < /tmp/tx
echo NC_TX_RC=$?
t1=$(now_ns)
echo TX_SECONDS=$(secs $t0 $t1)
echo TX_MIBPS=$(mibps {TCP_MIB} $t0 $t1)
rm -f /tmp/tx

# host -> guest (stdin /dev/null: nc half-closes at once and reads to EOF)
pin {rx_mask}
t0=$(now_ns)
timeout 120 nc {HOST_ADDR} {SOURCE_PORT} < /dev/null > /tmp/rx
echo NC_RX_RC=$?
t1=$(now_ns)
echo RX_SECONDS=$(secs $t0 $t1)
echo RX_MIBPS=$(mibps {TCP_MIB} $t0 $t1)
echo RX_BYTES=$(wc -c < /tmp/rx)
echo RX_SHA=$(sha_of < /tmp/rx)
rm -f /tmp/rx
if_stats IF
echo FAIL=$fail
exit $fail
"""


def check_single(res: g.GuestResult, peer: dict, label: str, record_property,
                 rx_queues: int = 1, notes: str = "") -> None:
    v = res.values()
    tail = res.tail(80)
    ctx = f"{label}: guest exit {res.exit_code}; peer {peer}\nconsole tail:\n{tail}"
    assert res.exit_code == 0, ctx
    assert int(v["NET_RXQ"]) == rx_queues, ctx
    assert int(v["NET_TXQ"]) == rx_queues, ctx
    # 100 pings, 0 % loss
    assert v.get("PING_RC") == "0", ctx
    assert int(v["PING_TX"]) == PING_COUNT and int(v["PING_RX"]) == PING_COUNT, ctx
    assert float(v["PING_LOSS"]) == 0.0, ctx
    # guest -> host
    assert v["NC_TX_RC"] == "0", ctx
    assert "sink" in peer, ctx
    assert peer["sink"]["bytes"] == TCP_MIB * MiB, ctx
    assert peer["sink"]["sha"] == v["TX_SHA"], ctx
    # host -> guest
    assert v["NC_RX_RC"] == "0", ctx
    assert "source" in peer, ctx
    assert int(v["RX_BYTES"]) == TCP_MIB * MiB, ctx
    assert v["RX_SHA"] == peer["source"]["sha"], ctx
    host_sink_mibps = TCP_MIB / max(peer["sink"]["seconds"], 1e-9)
    for key in ("TX_MIBPS", "RX_MIBPS"):
        record_property(f"{label}_{key.lower()}", v[key])
    record_property(f"{label}_host_sink_mibps", f"{host_sink_mibps:.2f}")
    print(f"\n[e2e net] {label}: ping {v['PING_RX']}/{v['PING_TX']} rtt(min/avg/max)="
          f"{v.get('PING_RTT_MS')} ms; TCP {TCP_MIB} MiB guest->host {v['TX_MIBPS']} MiB/s "
          f"({v['TX_SECONDS']} s guest clock, host sink {host_sink_mibps:.2f} MiB/s), "
          f"host->guest {v['RX_MIBPS']} MiB/s ({v['RX_SECONDS']} s); queues "
          f"{v['NET_QUEUES'].strip()}; boot+test {res.duration:.1f} s (TCG) {notes}")


# --------------------------------------------------------------------------------------------
# tests


def test_net_qemu_tap(ns, tmp_path, record_property):
    """Harness validation on QEMU's own tap backend (QEMU runs inside the namespace)."""
    g.host_tap(ns, TAP, f"{HOST_ADDR}/24")
    with host_peer(ns, tmp_path) as peer:
        res = g.run_guest(single_guest_script(), devices=g.tap_net_args(TAP),
                          qemu_prefix=g.netns_exec(ns), timeout=GUEST_TIMEOUT)
        result = peer.result()
    check_single(res, result, "qemu_tap", record_property)


@pytest.mark.parametrize("queues", [1, 2])
def test_net_pyvhost(queues, ns, sockdir, tmp_path, record_property):
    """Our backend on a tap in the namespace; QEMU outside it, over the Unix socket. With 2
    queue pairs the guest has 2 vCPUs and the flows are issued from different CPUs."""
    sock = sockdir / "net.sock"
    with pyvhost_net(sock, tap=TAP, queues=queues, netns=ns) as be:
        assert g.wait_link(ns, TAP), f"backend did not create {TAP}; log:\n{be.log_tail()}"
        g.host_tap(ns, TAP, f"{HOST_ADDR}/24", create=False)
        with host_peer(ns, tmp_path) as peer:
            if queues > 1:
                script = single_guest_script(ping_mask="1", tx_mask="2", rx_mask="1")
            else:
                script = single_guest_script()
            try:
                res = g.run_guest(script, cpus=queues, timeout=GUEST_TIMEOUT,
                                  devices=g.vhost_user_net_args(sock, queues=queues))
            except g.GuestError as e:
                raise AssertionError(f"{e}\nbackend log tail:\n{be.log_tail()}") from None
            result = peer.result()
        info = g.link_info(ns, TAP)
        assert be.alive(), f"backend died; log:\n{be.log_tail()}"
        try:
            check_single(res, result, f"pyvhost_q{queues}", record_property, rx_queues=queues)
        except AssertionError as e:
            raise AssertionError(f"{e}\nhost {info}\nbackend log tail:\n{be.log_tail()}") from None


SWITCH_A, SWITCH_B = "192.0.2.11", "192.0.2.12"
SWITCH_TCP_MIB = 4
SWITCH_PORT = 5003


# the negotiated virtio feature bits of the NIC, bit 0 first (bit 34: VIRTIO_F_RING_PACKED)
FEATURES_LINE = r"""echo FEATURES=$(cat /sys/class/net/$NET_IF/device/features 2>/dev/null || \
    cat /sys/class/net/*/device/features 2>/dev/null | head -1)"""


def switch_scripts() -> tuple[str, str]:
    """Guest A pings B 100 times, then sends SWITCH_TCP_MIB MiB to B over TCP; B listens."""
    script_a = g.NET_SCRIPT_HELPERS + rf"""
fail=0
net_up {SWITCH_A}/24 || {{ echo FAIL=1; exit 1; }}
{FEATURES_LINE}
wait_ping {SWITCH_B} 90 || {{ echo "peer {SWITCH_B} unreachable"; fail=1; }}
ping_check PING {SWITCH_B} {PING_COUNT}
dd if=/dev/urandom of=/tmp/tx bs=1M count={SWITCH_TCP_MIB} 2>/dev/null
echo TX_SHA=$(sha_of < /tmp/tx)
n=0
while [ $n -lt 20 ]; do   # B may still be starting its listener (connect refused: fast)
    n=$((n + 1))
    t0=$(now_ns)
    timeout 60 nc {SWITCH_B} {SWITCH_PORT} < /tmp/tx && break
    sleep 1
done
t1=$(now_ns)
echo NC_TRIES=$n
echo TX_MIBPS=$(mibps {SWITCH_TCP_MIB} $t0 $t1)
if_stats IF
echo FAIL=$fail
exit $fail
"""
    # B's nc reads stdin from a FIFO nobody writes (opened read-write: never EOF): busybox nc
    # half-closes on stdin EOF and exits on socket EOF, which would cut A's transfer short.
    script_b = g.NET_SCRIPT_HELPERS + rf"""
net_up {SWITCH_B}/24 || {{ echo FAIL=1; exit 1; }}
{FEATURES_LINE}
mkfifo /tmp/hold
timeout 150 nc -l -p {SWITCH_PORT} 0<>/tmp/hold > /tmp/rx
echo NC_RX_RC=$?
echo RX_BYTES=$(wc -c < /tmp/rx)
echo RX_SHA=$(sha_of < /tmp/rx)
if_stats IF
exit 0
"""
    return script_a, script_b


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_net_pyvhost_switch_two_guests(sockdir, record_property, ring):
    """Two concurrent guests on one in-process switch (no tap): A pings B 100 times and sends
    SWITCH_TCP_MIB MiB to B over TCP; over split rings, and over packed ones (`packed=on`)."""
    extra = "packed=on" if ring == "packed" else ""
    sa, sb = sockdir / "a.sock", sockdir / "b.sock"
    script_a, script_b = switch_scripts()
    g.base_initramfs()  # build once before the threads
    with pyvhost_net([sa, sb], switch="sw0") as be:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            fb = pool.submit(g.run_guest, script_b, timeout=GUEST_TIMEOUT,
                             devices=g.vhost_user_net_args(sb, idx=0, mac=g.mac_address(12),
                                                           extra=extra))
            fa = pool.submit(g.run_guest, script_a, timeout=GUEST_TIMEOUT,
                             devices=g.vhost_user_net_args(sa, idx=0, mac=g.mac_address(11),
                                                           extra=extra))
            try:
                ra, rb = fa.result(), fb.result()
            except g.GuestError as e:
                raise AssertionError(f"{e}\nbackend log tail:\n{be.log_tail()}") from None
        assert be.alive(), f"backend died; log:\n{be.log_tail()}"
        va, vb = ra.values(), rb.values()
        ctx = (f"A exit {ra.exit_code}, B exit {rb.exit_code}\nA console:\n{ra.tail(50)}\n"
               f"B console:\n{rb.tail(30)}\nbackend log tail:\n{be.log_tail()}")
    assert ra.exit_code == 0 and rb.exit_code == 0, ctx
    want = "1" if ring == "packed" else "0"
    assert va["FEATURES"][34] == want and vb["FEATURES"][34] == want, ctx
    assert va.get("PING_RC") == "0", ctx
    assert int(va["PING_TX"]) == PING_COUNT and int(va["PING_RX"]) == PING_COUNT, ctx
    assert float(va["PING_LOSS"]) == 0.0, ctx
    assert vb["NC_RX_RC"] == "0", ctx
    assert int(vb["RX_BYTES"]) == SWITCH_TCP_MIB * MiB, ctx
    assert vb["RX_SHA"] == va["TX_SHA"], ctx
    record_property(f"switch_{ring}_tx_mibps", va["TX_MIBPS"])
    print(f"\n[e2e net] switch ({ring}): A->B ping {va['PING_RX']}/{va['PING_TX']} "
          f"rtt={va.get('PING_RTT_MS')} ms; TCP {SWITCH_TCP_MIB} MiB A->B {va['TX_MIBPS']} MiB/s; "
          f"boots {ra.duration:.1f} s / {rb.duration:.1f} s (TCG, concurrent)")
