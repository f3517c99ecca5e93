"""libvirt end to end: the README's domain XML started by libvirt 9.0 with its defaults (QEMU as
`libvirt-qemu:kvm`, libvirtd and virtlogd started by hand: no systemd here), TCG guests
(`<domain type='qemu'>`, direct kernel boot of the test guest; vhost/testing/libvirt.py lists
every change it makes to the README's XML), attached to `pyvhost serve` in a network
namespace the test creates (sockets group kvm, 0660; the control API on):

- ``test_readme_domain``: 1 vCPU without `queues`, 2 vCPUs with `queues='2'`, 2 vCPUs without
  (QEMU asks for one queue per vCPU): the guest sees that many blk-mq queues, writes and reads
  back random data from every vCPU at once (O_DIRECT), and pings the switch's uplink tap
  through `net0`, a port of the service's switch; the service's control API shows both
  frontends as libvirt's QEMU user and, with 2 queues, requests on both. Once more on the
  single-device programs (`pyvhost-blk` and `pyvhost-net --tap` with `--socket-group kvm`).
- ``test_suspend_resume_during_io``: `virsh suspend` in the middle of a write+verify loop: the
  queues stop (queue-stopped events), nothing moves while paused, `virsh resume` restarts
  every queue at the avail index it stopped at, and every round verifies.
- ``test_destroy_and_start``: a defined domain; `virsh destroy` while the guest writes, then
  `virsh start` against the same service: what the first boot wrote and synced is there.
- ``test_hotplug_disk_over_the_control_api``: `device-add` of a disk on the running service,
  `virsh attach-device` (the README's vdb.xml) to the running domain, I/O on it in the guest,
  `virsh detach-device`, `device-del` without force (the frontend let go); the other disk keeps
  serving throughout.
"""
from __future__ import annotations

import hashlib
import pwd
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vhost.ctl import Client
from vhost.testing import guest as g
from vhost.testing import libvirt as lv
from vhost.testing import netns as nsh
from vhost.testing.backends import REPO_ROOT
from vhost.testing.serve import TIMEOUT, Serve

pytestmark = [pytest.mark.e2e]

_ok, _why = g.have_guest_tools()
if not _ok:
    pytestmark.append(pytest.mark.skip(reason=f"e2e guest tools missing: {_why}"))
_lv, _lv_why = lv.available()
if not _lv:
    pytestmark.append(pytest.mark.skip(reason=_lv_why))

HOST_ADDR, GUEST_ADDR = "192.0.2.1", "192.0.2.2"
UPLINK = "pvhup0"
BOOT_TIMEOUT = 240          # s: the first start also has libvirtd probe QEMU
STEP_TIMEOUT = 180


def readme_blocks() -> tuple[str, str]:
    """The README's libvirt domain XML and its hotplug disk XML."""
    blocks = re.findall(r"```xml\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.S)
    domain = [b for b in blocks if "<qemu:override>" in b]
    disk = [b for b in blocks if b.lstrip().startswith("<disk") and "vdb.sock" in b]
    assert len(domain) == 1 and len(disk) == 1, "README: the libvirt domain and vdb.xml"
    return domain[0], disk[0]


@pytest.fixture(scope="module")
def daemons():
    d = lv.Daemons()
    yield d
    d.close()


@pytest.fixture
def tmp():
    d = g.short_tmpdir("pvl")
    d.chmod(0o755)          # libvirt's QEMU (libvirt-qemu) reaches the sockets and the initrd
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def ns():
    ok, why = g.have_netns()
    if not ok:
        pytest.skip(why)
    with g.netns("pvl-") as name:
        yield name


SERVICE = """[service]
socket-group = "kvm"
socket-mode = "0660"
control-socket = "{d}/control.sock"

[[switch]]
name = "sw0"
tap = "{uplink}"

[[device]]
name = "vda"
type = "block"
socket = "{d}/vda.sock"
blk-file = "{d}/vda.img"
size = "32M"
num-queues = 2

[[device]]
name = "net0"
type = "net"
socket = "{d}/net0.sock"
switch = "sw0"
"""


def serve(tmp: Path, ns: str) -> Serve:
    conf = tmp / "pyvhost.toml"
    conf.write_text(SERVICE.format(d=tmp, uplink=UPLINK))
    sv = Serve(tmp, conf, ns=ns)
    sv.ready()
    g.host_tap(ns, UPLINK, f"{HOST_ADDR}/24", create=False)
    return sv


# guest side: busybox ash; every loop bounded
WRITE_VERIFY = r"""
cat > /bin/wv <<'WVEOF'
#!/bin/sh
# wv TAG OFFSET_MIB MIB: random data to vda at OFFSET (O_DIRECT, fsync), read back, compare
head -c $(($3 * 1048576)) /dev/urandom > /tmp/w$1
dd if=/tmp/w$1 of=/dev/vda bs=65536 seek=$(($2 * 16)) oflag=direct conv=fsync 2>/dev/null
dd if=/dev/vda of=/tmp/r$1 bs=65536 skip=$(($2 * 16)) count=$(($3 * 16)) iflag=direct 2>/dev/null
if cmp -s /tmp/w$1 /tmp/r$1; then echo "WV_$1=ok"; else echo "WV_$1=bad"; fi
rm -f /tmp/w$1 /tmp/r$1
WVEOF
chmod +x /bin/wv
"""

DOMAIN_SCRIPT = WRITE_VERIFY + g.NET_SCRIPT_HELPERS + r"""
CPUS=$(grep -c ^processor /proc/cpuinfo)
echo CPUS=$CPUS
echo QUEUES=$(ls /sys/block/vda/mq | wc -l)
c=0
while [ $c -lt $CPUS ]; do            # one job pinned to every vCPU, all at once
    taskset -c $c wv cpu$c $((c * 4)) 4 > /tmp/job$c &
    c=$((c + 1))
done
wait
cat /tmp/job*
net_up @GUEST@/24
wait_ping @HOST@ 30
ping_check PING @HOST@ 20
"""


def boot(daemons, tmp: Path, script: str, name: str, **kw) -> lv.Domain:
    """The README's domain, with `script` as the guest's /test.sh, defined or created."""
    xml, _ = readme_blocks()
    base = g.base_initramfs()
    initrd = tmp / "initrd.cpio"
    initrd.write_bytes(base.path.read_bytes() + g.script_archive(script))
    console = tmp / "console.log"
    domain_xml = lv.readme_domain(xml, name=name, sock_dir=tmp, kernel=base.kernel.image,
                                  initrd=initrd, console=console,
                                  cmdline="console=ttyS0 quiet panic=-1 pyvhost_wait=vda", **kw)
    path = tmp / "domain.xml"
    path.write_text(domain_xml)
    return lv.Domain(name, path, console)


def values(text: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Z][A-Za-z0-9_]*)=(\S*)\s*$", text, re.M))


def finished(dom: lv.Domain, timeout: float = BOOT_TIMEOUT, start: int = 0) -> dict[str, str]:
    m = dom.wait_for(r"@@PYVHOST-GUEST-END rc=(\d+)@@", timeout, start)
    text = dom.text()[start:m.end()]
    assert m.group(1) == "0", f"guest script failed:\n{text[-3000:]}"
    return values(text)


def qemu_uid() -> int:
    return pwd.getpwnam("libvirt-qemu").pw_uid


@pytest.mark.parametrize("vcpus,queues", [(1, False), (2, True), (2, False)],
                         ids=["1cpu", "2cpu-queues", "2cpu-no-queues"])
def test_readme_domain(daemons, tmp, ns, vcpus, queues):
    sv = serve(tmp, ns)
    dom = None
    try:
        script = DOMAIN_SCRIPT.replace("@GUEST@", GUEST_ADDR).replace("@HOST@", HOST_ADDR)
        dom = boot(daemons, tmp, script, f"pvh-readme-{vcpus}{'q' if queues else ''}",
                   vcpus=vcpus, queues=queues)
        with Client(str(tmp / "control.sock")) as ev:
            ev.call("subscribe")
            t0 = time.monotonic()
            dom.create()
            t1 = time.monotonic()
            dom.wait_for("@@PYVHOST-GUEST-START@@", BOOT_TIMEOUT)
            t2 = time.monotonic()
            v = finished(dom)
            print(f"create {t1 - t0:.1f} s, boot {t2 - t1:.1f} s, script {time.monotonic() - t2:.1f} s")
            frontends = {}
            while len(frontends) < 2:
                e = ev.read()["params"]
                if e["event"] == "frontend-connected":
                    frontends[e["device"]] = e["frontend"]
        assert int(v["CPUS"]) == vcpus
        # with queues='2', two; without, QEMU asks one per vCPU
        assert int(v["QUEUES"]) == (2 if queues else vcpus)
        assert all(v.get(f"WV_cpu{c}") == "ok" for c in range(vcpus)), dom.text()[-3000:]
        assert v["PING_RX"] == "20" and v["PING_RC"] == "0", v
        with Client(str(tmp / "control.sock")) as c:
            show = c.call("device-show", {"name": "vda"})
        uid = f"uid {qemu_uid()}"
        assert frontends["vda"].endswith(uid) and frontends["net0"].endswith(uid), frontends
        used = [q for q, s in show["queues"].items() if s["requests"] > 0]
        assert len(used) == int(v["QUEUES"]), show["queues"]
        dom.wait_state("gone", 30)          # on_poweroff: destroy
    finally:
        if dom is not None:
            dom.close()
        rc = sv.stop()
    assert rc == 0, sv.log_text()


def test_readme_domain_on_the_single_device_programs(daemons, tmp, ns):
    """pyvhost-blk and pyvhost-net with --socket-group kvm: reachable by libvirt's QEMU."""
    progs = []
    dom = None
    try:
        progs.append(subprocess.Popen(
            [sys.executable, "-m", "vhost.programs", "pyvhost-blk", "--socket-path",
             str(tmp / "vda.sock"), "--blk-file", str(tmp / "vda.img"), "--size", "32M",
             "--num-queues", "2", "--socket-group", "kvm"],
            stdout=subprocess.DEVNULL, stderr=open(tmp / "blk.log", "wb")))
        progs.append(subprocess.Popen(
            nsh.prefix(ns) + [sys.executable, "-m", "vhost.programs", "pyvhost-net",
                              "--socket-path", str(tmp / "net0.sock"), "--tap", UPLINK,
                              "--socket-group", "kvm"],
            stdout=subprocess.DEVNULL, stderr=open(tmp / "net.log", "wb")))
        kvm = pwd.getpwnam("libvirt-qemu").pw_gid

        def reachable(name: str) -> bool:       # bound 0600 first, then group kvm, then 0660
            try:
                st = (tmp / name).stat()
            except FileNotFoundError:
                return False
            return st.st_mode & 0o777 == 0o660 and st.st_gid == kvm

        deadline = time.monotonic() + TIMEOUT
        while not (reachable("vda.sock") and reachable("net0.sock")
                   and g.wait_link(ns, UPLINK, 0.1)):
            assert all(p.poll() is None for p in progs) and time.monotonic() < deadline, \
                (tmp / "blk.log").read_text() + (tmp / "net.log").read_text()
            time.sleep(0.05)
        g.host_tap(ns, UPLINK, f"{HOST_ADDR}/24", create=False)
        script = DOMAIN_SCRIPT.replace("@GUEST@", GUEST_ADDR).replace("@HOST@", HOST_ADDR)
        dom = boot(daemons, tmp, script, "pvh-programs")
        dom.create()
        v = finished(dom)
        assert int(v["QUEUES"]) == 2 and v["WV_cpu0"] == v["WV_cpu1"] == "ok", v
        assert v["PING_RX"] == "20", v
        assert f"uid {qemu_uid()}" in (tmp / "blk.log").read_text()
    finally:
        if dom is not None:
            dom.close()
        for p in progs:
            p.terminate()
        for p in progs:
            try:
                assert p.wait(timeout=TIMEOUT) == 0
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                raise


LOOP_SCRIPT = WRITE_VERIFY + r"""
echo QUEUES=$(ls /sys/block/vda/mq | wc -l)
r=0
while [ $r -lt @ROUNDS@ ]; do
    taskset -c 0 wv a$r 0 2 > /tmp/a &
    taskset -c 1 wv b$r 8 2 > /tmp/b &
    wait
    echo "ROUND $r $(cat /tmp/a /tmp/b | tr '\n' ' ')"
    r=$((r + 1))
done
"""


def test_suspend_resume_during_io(daemons, tmp, ns):
    sv = serve(tmp, ns)
    dom = None
    try:
        dom = boot(daemons, tmp, LOOP_SCRIPT.replace("@ROUNDS@", "12"), "pvh-suspend")
        dom.create()
        dom.wait_for(r"ROUND 2 ", BOOT_TIMEOUT)
        with Client(str(tmp / "control.sock")) as ev, Client(str(tmp / "control.sock")) as c:
            ev.call("subscribe")            # from here on: the boot's queue events are past
            lv.virsh("suspend", dom.name)
            dom.wait_state("paused")
            stopped = wait_queue_events(ev, "queue-stopped", "vda", 2)
            before = c.call("device-show", {"name": "vda"})["queues"]
            console = len(dom.text())
            time.sleep(2)
            after = c.call("device-show", {"name": "vda"})["queues"]
            assert [q["requests"] for q in before.values()] == \
                [q["requests"] for q in after.values()], "I/O went on while paused"
            assert all(q["state"] == "stopped" for q in after.values()), after
            assert len(dom.text()) == console
            lv.virsh("resume", dom.name)
            started = wait_queue_events(ev, "queue-started", "vda", 2)
            # each queue restarts exactly where it stopped
            assert started == stopped, (stopped, started)
            end = dom.wait_for(r"@@PYVHOST-GUEST-END rc=0@@", STEP_TIMEOUT).end()
            text = dom.text()[:end]
        rounds = re.findall(r"^ROUND (\d+) (.*)$", text, re.M)
        assert len(rounds) == 12, text[-2000:]
        assert all(r[1].split() == [f"WV_a{r[0]}=ok", f"WV_b{r[0]}=ok"] for r in rounds), rounds
        assert values(text)["QUEUES"] == "2"
    finally:
        if dom is not None:
            dom.close()
        rc = sv.stop()
    assert rc == 0, sv.log_text()


def wait_queue_events(ev: Client, event: str, device: str, n: int) -> dict[int, int]:
    """{queue: avail} of the next `n` `event`s of `device` (other events skipped)."""
    got: dict[int, int] = {}
    for _ in range(64):
        e = ev.read()["params"]
        if e["event"] == event and e["device"] == device:
            got[e["queue"]] = e["avail"]
            if len(got) == n:
                return got
    raise AssertionError(f"no {n} {event} events for {device}: {got}")


BOOTS_SCRIPT = WRITE_VERIFY + r"""
if [ "$(head -c 8 /dev/vda)" = PVHBOOT1 ]; then
    # the second boot: the first one's synced data must be there
    want=$(dd if=/dev/vda bs=512 count=1 2>/dev/null | cut -c 10-73)
    got=$(dd if=/dev/vda bs=1048576 skip=1 count=4 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    [ "$want" = "$got" ] && echo BOOT2_DATA=ok || echo "BOOT2_DATA=bad want=$want got=$got"
    wv again 16 2
    exit 0
fi
head -c 4194304 /dev/urandom > /tmp/d
dd if=/tmp/d of=/dev/vda bs=1048576 seek=1 oflag=direct conv=fsync 2>/dev/null
printf 'PVHBOOT1 %s' $(sha256sum < /tmp/d | cut -d' ' -f1) > /tmp/h
dd if=/tmp/h of=/dev/vda bs=512 conv=sync,fsync oflag=direct 2>/dev/null
echo BOOT1_WROTE
r=0
while [ $r -lt 500 ]; do wv loop$r 8 1; r=$((r + 1)); done    # busy until destroyed
"""


def test_destroy_and_start(daemons, tmp, ns):
    sv = serve(tmp, ns)
    dom = None
    try:
        dom = boot(daemons, tmp, BOOTS_SCRIPT, "pvh-boots")
        dom.define()
        dom.start()
        dom.wait_for(r"WV_loop2=ok", BOOT_TIMEOUT)
        with Client(str(tmp / "control.sock")) as c:
            lv.virsh("destroy", dom.name)
            dom.wait_state("shut off")
            deadline = time.monotonic() + TIMEOUT
            while any(d["connected"] for d in c.call("device-list")):
                assert time.monotonic() < deadline, c.call("device-list")
                time.sleep(0.1)
            mark = len(dom.text())
            dom.start()
            v = finished(dom, STEP_TIMEOUT, start=mark)
            assert v["BOOT2_DATA"] == "ok" and v["WV_again"] == "ok", v
    finally:
        if dom is not None:
            dom.close()
        rc = sv.stop()
    assert rc == 0, sv.log_text()


HOTPLUG_SCRIPT = WRITE_VERIFY + r"""
echo WAITING_FOR_VDB
i=0; while [ ! -b /dev/vdb ] && [ $i -lt 1200 ]; do usleep 100000; i=$((i + 1)); done
echo VDB_QUEUES=$(ls /sys/block/vdb/mq | wc -l)
head -c 2097152 /dev/urandom > /tmp/h
dd if=/tmp/h of=/dev/vdb bs=65536 oflag=direct conv=fsync 2>/dev/null
dd if=/dev/vdb of=/tmp/hr bs=65536 count=32 iflag=direct 2>/dev/null
cmp -s /tmp/h /tmp/hr && echo VDB_WV=ok || echo VDB_WV=bad
echo VDB_SHA=$(sha256sum < /tmp/h | cut -d' ' -f1)
wv during 0 2
echo VDB_DONE
i=0; while [ -b /dev/vdb ] && [ $i -lt 1200 ]; do usleep 100000; i=$((i + 1)); done
[ -b /dev/vdb ] && echo VDB_GONE=no || echo VDB_GONE=yes
wv after 4 2
"""


def test_hotplug_disk_over_the_control_api(daemons, tmp, ns):
    sv = serve(tmp, ns)
    dom = None
    try:
        _, disk = readme_blocks()
        vdb_xml = tmp / "vdb.xml"
        vdb_xml.write_text(disk.replace("/run/pyvhost/", f"{tmp}/"))
        dom = boot(daemons, tmp, HOTPLUG_SCRIPT, "pvh-hotplug")
        dom.create()
        with Client(str(tmp / "control.sock")) as c:
            c.call("device-add", {"name": "vdb", "type": "block", "socket": f"{tmp}/vdb.sock",
                                  "blk-file": f"{tmp}/vdb.img", "size": "8M",
                                  "num-queues": 2})
            dom.wait_for("WAITING_FOR_VDB", BOOT_TIMEOUT)
            lv.virsh("attach-device", dom.name, str(vdb_xml), "--live")
            dom.wait_for("VDB_DONE", STEP_TIMEOUT)
            shown = c.call("device-show", {"name": "vdb"})
            assert shown["connected"] and shown["frontend"].endswith(f"uid {qemu_uid()}")
            assert sum(q["bytes_written"] for q in shown["queues"].values()) >= 2 << 20
            lv.virsh("detach-device", dom.name, str(vdb_xml), "--live")
            v = finished(dom, STEP_TIMEOUT)
            deadline = time.monotonic() + TIMEOUT
            while c.call("device-show", {"name": "vdb"})["connected"]:
                assert time.monotonic() < deadline, "QEMU kept the detached disk's socket"
                time.sleep(0.1)
            assert c.call("device-del", {"name": "vdb"})["removed"] == "vdb"
            assert [d["name"] for d in c.call("device-list")] == ["net0", "vda"]
        assert v["VDB_QUEUES"] == "2" and v["VDB_WV"] == "ok" and v["VDB_GONE"] == "yes", v
        assert v["WV_during"] == "ok" and v["WV_after"] == "ok", v
        assert hashlib.sha256((tmp / "vdb.img").read_bytes()[:2 << 20]).hexdigest() == \
            v["VDB_SHA"]
    finally:
        if dom is not None:
            dom.close()
        rc = sv.stop()
    assert rc == 0, sv.log_text()
