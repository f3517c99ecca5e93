"""The libvirt domain XML we tell admins to use (vhost/data/libvirt/domain-snippet.xml, and every
```xml block of the README) is valid for libvirt's own domain schema (virt-xml-validate, Debian
package libvirt-clients) and points at sockets the example service config really serves, with
matching queue counts and read-only flags."""
from __future__ import annotations

import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest

from vhost.testing.backends import REPO_ROOT
from vhost import config as cfg

SNIPPET = REPO_ROOT / "vhost" / "data" / "libvirt" / "domain-snippet.xml"
EXAMPLE = REPO_ROOT / "vhost" / "data" / "pyvhost.toml"

needs_validator = pytest.mark.skipif(
    shutil.which("virt-xml-validate") is None or shutil.which("xmllint") is None,
    reason="virt-xml-validate/xmllint missing (Debian packages libvirt-clients, libxml2-utils; "
           ".ci/install --test installs them)")


def _validate(path) -> subprocess.CompletedProcess:
    return subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True,
                          text=True, timeout=60)


def _readme_xml_blocks() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    return re.findall(r"```xml\n(.*?)```", text, re.S)


@needs_validator
def test_snippet_validates_and_a_broken_one_does_not(tmp_path):
    r = _validate(SNIPPET)
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "bad.xml"
    bad.write_text(SNIPPET.read_text().replace("type='vhostuser' device='disk'",
                                               "type='vhostuser' device='floppy-tape'"))
    assert _validate(bad).returncode != 0      # the validator really checks


@needs_validator
def test_readme_xml_blocks_validate(tmp_path):
    blocks = _readme_xml_blocks()
    assert blocks, "the README shows the libvirt domain XML"
    assert any(b.lstrip().startswith("<domain") for b in blocks)
    for k, block in enumerate(blocks):
        if not block.lstrip().startswith("<domain"):
            # a device for `virsh attach-device`: checked inside the smallest domain
            block = ("<domain type='kvm'><name>g</name><memory>1</memory><os><type>hvm</type>"
                     f"</os><devices>{block}</devices></domain>")
        p = tmp_path / f"readme{k}.xml"
        p.write_text(block)
        r = _validate(p)
        assert r.returncode == 0, f"README xml block {k}: {r.stdout}{r.stderr}"


def test_snippet_matches_the_example_config():
    conf = cfg.load(str(EXAMPLE), check_files=False)
    by_socket = {d.socket: d for d in conf.devices}
    root = ET.parse(SNIPPET).getroot()
    mem = root.find("memoryBacking")
    assert mem.find("access").get("mode") == "shared"      # vhost-user needs shared guest RAM
    seen = set()
    for disk in root.iter("disk"):
        assert disk.get("type") == "vhostuser"
        src = disk.find("source")
        spec = by_socket[src.get("path")]
        assert spec.type == "block"
        queues = disk.find("driver").get("queues")
        # QEMU 7.2 asks for one queue per vCPU when the XML gives none, and refuses a backend
        # that offers fewer queues than it asks for
        asked = int(queues) if queues else int(root.find("vcpu").text)
        assert asked <= spec.num_queues
        assert (disk.find("readonly") is not None) == spec.read_only
        seen.add(spec.name)
    for nic in root.iter("interface"):
        assert nic.get("type") == "vhostuser"
        src = nic.find("source")
        spec = by_socket[src.get("path")]
        assert spec.type == "net" and src.get("mode") == "client"
        drv = nic.find("driver")
        assert int(drv.get("queues") if drv is not None else 1) == spec.queues
        seen.add(spec.name)
    assert {"vda", "iso", "net0"} <= seen
