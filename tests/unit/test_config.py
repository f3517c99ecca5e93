"""The `pyvhost serve` configuration file (vhost/config.py) and the logfmt log lines
(vhost/logfmt.py): the shipped example parses and mirrors the CLI options, and every kind of bad
file is refused before anything starts, with one line naming the file, the device and the
problem (checked in memory and through the real `pyvhost check` / `pyvhost serve` programs)."""
from __future__ import annotations

import io
import logging
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from vhost.testing.backends import REPO_ROOT, short_tmpdir
import devices
from vhost import cli, config as cfg, logfmt

EXAMPLE = REPO_ROOT / "vhost" / "data" / "pyvhost.toml"
SERVE = [sys.executable, "-m", "vhost.service"]


@pytest.fixture
def tmp():
    d = short_tmpdir()
    yield d
    import shutil
    shutil.rmtree(d, ignore_errors=True)


def test_example_config_parses_and_mirrors_the_cli():
    conf = cfg.load(str(EXAMPLE), check_files=False)
    kinds = {d.name: d.type for d in conf.devices}
    assert kinds == {"vda": "block", "iso": "block", "net0": "net", "sw0-a": "net",
                     "sw0-b": "net"}
    assert conf.device("vda").num_queues == 2 and conf.device("vda").size == 8 << 30
    assert conf.device("iso").read_only
    assert conf.device("net0").tap == "pyvtap0"
    assert conf.tables["switch"]["sw0"].tap == "pyvsw0"
    assert conf.service.metrics_address == "127.0.0.1:9560"
    assert conf.service.socket_mode == 0o660
    # every device key of the example is an option of the matching program
    raw = tomllib.loads(EXAMPLE.read_text())
    opts = {t: {a.dest.replace("_", "-") for a in cli.device_parser(devices.get(t))._actions}
            for t in ("block", "net")}
    for dev in raw["device"]:
        for key in dev:
            if key in ("name", "type"):
                continue
            want = "socket-path" if key == "socket" else key
            assert want in opts[dev["type"]], f"{key} of {dev['name']} is not a CLI option"


def _write(tmp: Path, text: str) -> str:
    p = tmp / "c.toml"
    p.write_text(text)
    return str(p)


def _blk(tmp, name="vda", **kw):
    lines = [f'name = "{name}"', 'type = "block"', f'socket = "{tmp}/{name}.sock"']
    if "blk_file" not in kw and not kw.get("null"):
        img = tmp / f"{name}.img"
        img.write_bytes(bytes(4096))
        lines.append(f'blk-file = "{img}"')
    for k, v in kw.items():
        lines.append(f"{k.replace('_', '-')} = {v!r}".replace("'", '"').replace("True", "true")
                     .replace("False", "false"))
    return "[[device]]\n" + "\n".join(lines) + "\n"


def _rbd(tmp, name="vda", image="rbd/vm1", **extra):
    lines = [f'name = "{name}"', 'type = "block"', f'socket = "{tmp}/{name}.sock"',
             f'rbd = "{image}"'] + [f'{k} = "{v}"' for k, v in extra.items()]
    return "[[device]]\n" + "\n".join(lines) + "\n"


BAD = [
    ("rbd and a file", lambda t: _blk(t, rbd="rbd/vm1"),
     'device "vda": rbd takes no blk-file, null or size'),
    ("bad rbd spec", lambda t: _rbd(t, image="vm1"),
     "rbd is POOL/IMAGE or POOL/NAMESPACE/IMAGE, not 'vm1'"),
    ("missing ceph conf", lambda t: _rbd(t, **{"ceph-conf": f"{t}/ceph.conf"}),
     "ceph-conf {t}/ceph.conf does not exist"),
    ("nbd and a file", lambda t: _blk(t, nbd="nbd://h/e"),
     'device "vda": nbd takes no blk-file, rbd, null or size'),
    ("nbd not a uri", lambda t: _rbd(t).replace('rbd = "rbd/vm1"', 'nbd = "/dev/nbd0"'),
     "nbd is an NBD URI"),
    ("keyring without rbd", lambda t: _blk(t, keyring="/etc/ceph/k"),
     "ceph-conf, ceph-id and keyring go with rbd"),
    ("shared writable rbd image", lambda t: _rbd(t) + _rbd(t, "vdb"),
     'device "vda": rbd rbd/vm1 is also used by device "vdb"'),
    ("unknown key", lambda t: _blk(t, bogus=1), 'device "vda": unknown key \'bogus\''),
    ("missing image", lambda t: _blk(t, blk_file=f"{t}/none.img"),
     'device "vda": blk-file ' + "{t}/none.img does not exist"),
    ("duplicate socket", lambda t: _blk(t) + _blk(t, "vdb").replace("vdb.sock", "vda.sock"),
     'device "vdb": socket {t}/vda.sock is already used by device "vda"'),
    ("duplicate name", lambda t: _blk(t) + _blk(t), 'device "vda": duplicate device name'),
    ("bad type", lambda t: _blk(t).replace('"block"', '"scsi"'), 'type must be "block" or'),
    ("wrong value type", lambda t: _blk(t, num_queues="2"), "num-queues must be an integer"),
    ("queue size", lambda t: _blk(t, queue_size=100), "queue-size must be a power of two"),
    ("relative socket", lambda t: _blk(t).replace(f'"{t}/vda.sock"', '"vda.sock"'),
     "socket must be an absolute path"),
    ("socket dir", lambda t: _blk(t).replace(f'"{t}/vda.sock"', '"/nonexistent/x.sock"'),
     "socket directory /nonexistent does not exist"),
    ("tap and switch", lambda t: '[[device]]\nname = "n"\ntype = "net"\nsocket = "'
     f'{t}/n.sock"\ntap = "t0"\nswitch = "s"\n', 'device "n": exactly one of tap and switch'),
    ("bad mac", lambda t: f'[[device]]\nname = "n"\ntype = "net"\nsocket = "{t}/n.sock"\n'
     'tap = "t0"\nmac = "zz"\n', "bad MAC"),
    ("shared tap", lambda t: f'[[device]]\nname = "n"\ntype = "net"\nsocket = "{t}/n.sock"\n'
     f'tap = "t0"\n[[device]]\nname = "m"\ntype = "net"\nsocket = "{t}/m.sock"\ntap = "t0"\n',
     'device "m": tap t0 is already used'),
    ("shared writable image", lambda t: _blk(t) + _blk(t, "vdb", blk_file=f"{t}/vda.img"),
     "is also used by device"),
    ("bad service key", lambda t: '[service]\nmetrics = "x"\n', "[service]: unknown key"),
    ("bad metrics address", lambda t: '[service]\nmetrics-address = "nowhere"\n',
     "[service]"),
    ("bad mode", lambda t: '[service]\nsocket-mode = "0066"\n', "socket-mode"),
    ("control socket not absolute",
     lambda t: '[service]\ncontrol-socket = "ctl.sock"\n', "absolute path"),
    ("control-persist alone",
     lambda t: '[service]\ncontrol-persist = true\n', "control-persist needs control-socket"),
    ("bad name", lambda t: _blk(t, "a b"), "name must be a string matching"),
    ("guest memory limit", lambda t: '[service]\nmax-guest-memory = "lots"\n',
     "[service]: max-guest-memory: bad size"),
    ("tiny guest memory limit", lambda t: '[service]\nmax-guest-memory = 4096\n',
     "max-guest-memory must be at least 1M"),
    ("message fds limit", lambda t: '[service]\nmax-message-fds = 4\n',
     "max-message-fds must be 8..1024, not 4"),
    ("rng period", lambda t: f'[[device]]\nname = "r"\ntype = "rng"\nsocket = "{t}/r.sock"\n'
     'period = 0\n', 'device "r": period must be positive, not 0'),
    ("bad device mode", lambda t: _blk(t, mode="listen"),
     'device "vda": mode must be "server" or "client", not \'listen\''),
    ("not toml", lambda t: "[[device]\n", "not valid TOML"),
    ("bad section", lambda t: "[devices]\n", "unknown key 'devices'"),
    # found by tests/fuzz/config.py: each raised something other than ConfigError, or a
    # message of several lines
    ("type not a string", lambda t: _blk(t).replace('"block"', '{ kind = "block" }'),
     'device "vda": type must be "block" or'),
    ("infinite size", lambda t: _blk(t, null=True, size="infG"), "bad size 'infG'"),
    ("huge size", lambda t: _blk(t, null=True, size="1e400"), "bad size '1e400'"),
    ("NUL in a path", lambda t: _blk(t).replace("vda.sock", "vda\\u0000.sock"),
     'device "vda": socket must not contain a NUL character'),
    ("NUL in a group", lambda t: '[service]\nsocket-group = "kvm\\u0000"\n',
     "socket-group must not contain a NUL character"),
    ("NUL in an option", lambda t: _blk(t, serial="ab").replace('"ab"', '"a\\u0000b"'),
     "serial must not contain a NUL character"),
    ("newline in a path", lambda t: _blk(t).replace(f'"{t}/vda.sock"', '"/no\\nne/x.sock"'),
     "socket directory /no\\nne does not exist"),
]


@pytest.mark.parametrize("why,text,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_one_line_naming_file_device_problem(tmp, why, text, needle):
    path = _write(tmp, text(tmp))
    with pytest.raises(cfg.ConfigError) as ei:
        cfg.load(path)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: "), msg
    assert needle.format(t=tmp) in msg, msg


@pytest.mark.parametrize("group,mode,want", [
    (None, None, 0o600), ("root", None, 0o660), ("root", "0600", 0o600), (None, "0666", 0o666)])
def test_socket_mode_defaults_to_group_rw_only_with_a_group(group, mode, want):
    """A socket-group without a socket-mode lets the group in (what --socket-group says)."""
    assert cfg.socket_access(group, mode) == (group, want)
    text = "[service]\n" + (f'socket-group = "{group}"\n' if group else "") + \
        (f'socket-mode = "{mode}"\n' if mode else "")
    conf = cfg.parse(tomllib.loads(text), "t.toml")
    assert (conf.service.socket_group, conf.service.socket_mode) == (group, want)


def test_config_that_is_not_utf8_is_one_line(tmp):
    """tomllib decodes the file before parsing it: a UnicodeDecodeError escaped load()
    (found by tests/fuzz/config.py)."""
    path = tmp / "c.toml"
    path.write_bytes(b'[service]\nlog-level = "\xff"\n')
    with pytest.raises(cfg.ConfigError) as ei:
        cfg.load(str(path))
    assert str(ei.value) == f"{path}: not valid TOML: not UTF-8 (byte 23: invalid start byte)"


def test_rbd_device_keys_and_cli_options(tmp):
    conf = tmp / "ceph.conf"
    conf.write_text("[global]\n")
    c = cfg.load(_write(tmp, _rbd(tmp, image="pool/ns/vm1", **{"ceph-conf": str(conf),
                                                                "ceph-id": "pyvhost"})
                        + _rbd(tmp, "ro1", image="pool/base", **{"read-only": "x"})
                        .replace('read-only = "x"', "read-only = true")
                        + _rbd(tmp, "ro2", image="pool/base").replace(
                            'rbd = "pool/base"', 'rbd = "pool/base"\nread-only = true')))
    d = c.devices[0]
    assert (d.rbd, d.ceph_conf, d.ceph_id, d.keyring, d.ceph_timeout, d.blk_file) == \
        ("pool/ns/vm1", str(conf), "pyvhost", None, 30.0, None)
    assert [x.read_only for x in c.devices[1:]] == [True, True]    # read-only may share
    _, conf2 = cli.parse_device(devices.get("block"), [
        "--socket-path", str(tmp / "s.sock"), "--rbd", "pool/vm2", "--ceph-id", "x",
        "--ceph-timeout", "5"])
    d = conf2.devices[0]
    assert (d.rbd, d.ceph_id, d.ceph_timeout, d.name) == ("pool/vm2", "x", 5.0, "vm2")


def test_good_config_round_trip(tmp):
    path = _write(tmp, _blk(tmp, num_queues=4, read_only=True, serial="abc")
                  + _blk(tmp, "nul", null=True, size="1G")
                  + f'[[device]]\nname = "p"\ntype = "net"\nsocket = "{tmp}/p.sock"\n'
                    'switch = "swx"\nqueues = 2\nmtu = 9000\n'
                  + f'[[device]]\nname = "r"\ntype = "rng"\nsocket = "{tmp}/r.sock"\n'
                    'max-bytes = 4096\nperiod = 500\n')
    conf = cfg.load(path)
    assert (conf.device("r").max_bytes, conf.device("r").period) == (4096, 500)
    vda = conf.device("vda")
    assert (vda.num_queues, vda.read_only, vda.serial) == (4, True, "abc")
    assert conf.device("nul").size == 1 << 30 and conf.device("nul").null
    switch_spec = devices.get("net").table_class("switch")
    assert conf.tables["switch"]["swx"] == switch_spec(name="swx")   # implicit, defaults
    assert conf.device("p").queues == 2 and conf.device("p").mtu == 9000
    # specs compare by value: this is what a SIGHUP reload diffs
    assert cfg.load(path) == conf
    # per-connection limits: defaults, and the keys
    assert (conf.service.max_guest_memory, conf.service.max_message_fds) == (0, 32)
    path2 = _write(tmp, '[service]\nmax-guest-memory = "64G"\nmax-message-fds = 16\n'
                   + _blk(tmp))
    svc = cfg.load(path2).service
    assert (svc.max_guest_memory, svc.max_message_fds) == (64 << 30, 16)



def test_device_mode_key_and_client_flag(tmp):
    """mode = "client" (QEMU listens, we connect); server by default; --client on the command
    line means the same, and takes no --fd."""
    from vhost import cli
    conf = cfg.load(_write(tmp, _blk(tmp, mode="client") + _blk(tmp, "vdb")))
    assert conf.device("vda").mode == "client" and conf.device("vdb").mode == "server"
    assert conf.device("vda") != cfg.load(_write(tmp, _blk(tmp) + _blk(tmp, "vdb"))).device(
        "vda")                                  # a mode change is a change (SIGHUP restarts it)
    img = tmp / "x.img"
    img.write_bytes(bytes(4096))
    _, c = cli.parse_device(devices.get("block"), ["--socket-path", f"{tmp}/q.sock",
                                                   "--blk-file", str(img), "--client"])
    assert c.devices[0].mode == "client"
    _, c = cli.parse_device(devices.get("block"), ["--socket-path", f"{tmp}/q.sock",
                                                   "--blk-file", str(img)])
    assert c.devices[0].mode == "server"
    with pytest.raises(SystemExit):
        cli.parse_device(devices.get("block"), ["--fd", "3", "--blk-file", str(img),
                                                "--client"])


def test_check_and_serve_refuse_bad_files_with_one_line(tmp):
    path = _write(tmp, _blk(tmp) + _blk(tmp, "vdb").replace("vdb.sock", "vda.sock"))
    for command in ("check", "serve"):
        r = subprocess.run(SERVE + [command, "--config", path], capture_output=True, text=True,
                           timeout=30, cwd=REPO_ROOT)
        assert r.returncode == 1, r
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert lines[0] == (f'pyvhost: error: {path}: device "vdb": socket {tmp}/vda.sock is '
                            f'already used by device "vda"')
    assert not (tmp / "vda.sock").exists(), "nothing may start from a bad file"
    r = subprocess.run(SERVE + ["check", "--config", _write(tmp, _blk(tmp))],
                       capture_output=True, text=True, timeout=30, cwd=REPO_ROOT)
    assert r.returncode == 0 and "1 device OK" in r.stdout


def test_serve_fails_whole_when_a_socket_cannot_listen(tmp):
    """Validation passes but vdb's socket path is a regular file: nothing keeps running, one
    line names the file and the device, and vda's socket is not left behind."""
    path = _write(tmp, _blk(tmp) + _blk(tmp, "vdb"))
    (tmp / "vdb.sock").write_text("precious")
    r = subprocess.run(SERVE + ["serve", "--config", path], capture_output=True, text=True,
                       timeout=30, cwd=REPO_ROOT)
    assert r.returncode == 1
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("pyvhost: error:")]
    assert len(errors) == 1 and f'{path}: device "vdb": ' in errors[0] \
        and "not a socket" in errors[0], r.stderr
    assert not (tmp / "vda.sock").exists()
    assert (tmp / "vdb.sock").read_text() == "precious"


# -- logfmt ----------------------------------------------------------------------------------------

def _capture(journal: bool, **fields) -> str:
    buf = io.StringIO()
    h = logging.StreamHandler(buf)
    h.setFormatter(logfmt.Formatter(journal=journal))
    lg = logging.getLogger("pyvhost.test.logfmt")
    lg.addHandler(h)
    lg.setLevel(logging.INFO)
    lg.propagate = False
    try:
        logfmt.event(lg, logging.WARNING, 'queue 1: bad "chain"\nnext', **fields)
    finally:
        lg.removeHandler(h)
    return buf.getvalue()


def test_logfmt_one_line_round_trip():
    out = _capture(False, device="vda", queue=1, peer="pid 7, uid 0", ok=True)
    assert out.count("\n") == 1 and out.startswith("ts=")
    f = logfmt.parse_line(out.rstrip("\n"))
    assert f["level"] == "warning" and f["logger"] == "pyvhost.test.logfmt"
    assert f["msg"] == 'queue 1: bad "chain"\nnext'
    assert (f["device"], f["queue"], f["peer"], f["ok"]) == ("vda", "1", "pid 7, uid 0", "true")


def test_logfmt_journal_has_priority_and_no_timestamp():
    out = _capture(True, device="vda")
    assert out.startswith("<4>level=warning ")        # syslog priority 4 = warning
    assert "ts=" not in out
    assert logfmt.parse_line(out.strip())["priority"] == "4"


def test_journal_stream_detection(tmp):
    """JOURNAL_STREAM counts only when it names the stream stderr really is."""
    script = ("import os, sys\nfrom vhost import logfmt\n"
              "st = os.fstat(2)\n"
              "print(logfmt.stderr_is_journal({'JOURNAL_STREAM': f'{st.st_dev}:{st.st_ino}'}),"
              " logfmt.stderr_is_journal({'JOURNAL_STREAM': '1:2'}),"
              " logfmt.stderr_is_journal({}))\n")
    with open(tmp / "err", "w") as err:
        r = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=err,
                           text=True, cwd=REPO_ROOT, timeout=30)
    assert r.stdout.split() == ["True", "False", "False"]


def test_checking_a_config_loads_no_extension(tmp):
    """`pyvhost check` validates every device type's options without importing the compiled
    data plane (device modules import their extension only where they run it)."""
    path = _write(tmp, _blk(tmp) + f'[[device]]\nname = "n"\ntype = "net"\n'
                  f'socket = "{tmp}/n.sock"\nswitch = "s"\nmac = "52:54:00:00:00:01"\n'
                  f'[[device]]\nname = "r"\ntype = "rng"\nsocket = "{tmp}/r.sock"\n')
    code = ("import sys, vhost.config as c; conf = c.load(sys.argv[1]); "
            "print(len(conf.devices), sorted(m for m in sys.modules if m.startswith('cython_ext')))")
    r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                       timeout=60, cwd=REPO_ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split(None, 1) == ["3", "[]\n"]


def test_dropins_add_devices_and_hold_only_devices(tmp):
    """pyvhost.d/*.toml beside the file (what device-add with control-persist writes): their
    [[device]] tables join the file's, in name order, validated as one configuration."""
    path = _write(tmp, _blk(tmp, "vda"))
    d = Path(cfg.dropin_dir(path))
    d.mkdir()
    (d / "b.toml").write_text(cfg.device_toml(dict(name="vdc", type="block",
                                                   socket=f"{tmp}/vdc.sock",
                                                   **{"blk-file": f"{tmp}/vdc.img"},
                                                   size="1M")))
    (d / "a.toml").write_text(cfg.device_toml(dict(name="vdb", type="block",
                                                   socket=f"{tmp}/vdb.sock",
                                                   **{"blk-file": f"{tmp}/vdb.img"},
                                                   size="1M")))
    (d / "notes.txt").write_text("not read")
    assert [s.name for s in cfg.load(path).devices] == ["vda", "vdb", "vdc"]
    (d / "c.toml").write_text(cfg.device_toml(dict(name="vda", type="block",
                                                   socket=f"{tmp}/x.sock",
                                                   **{"blk-file": f"{tmp}/x.img"}, size="1M")))
    with pytest.raises(cfg.ConfigError, match="duplicate device name"):
        cfg.load(path)
    (d / "c.toml").write_text('[service]\nlog-level = "debug"\n')
    with pytest.raises(cfg.ConfigError, match="a drop-in holds"):
        cfg.load(path)
