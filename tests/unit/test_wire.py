"""Wire formats: every vhost-user payload round-trips, sizes match the spec, wrong sizes are
rejected with an error naming the message."""
import pytest
from hypothesis import given, strategies as st

from protocols import vhost_user as vu
from protocols import virtio_blk as vb

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
u16 = st.integers(0, 2**16 - 1)
u8 = st.integers(0, 255)

region = st.fixed_dictionaries(dict(guest_addr=u64, size=u64, user_addr=u64, mmap_offset=u64))

PAYLOADS = {
    "U64": (vu.U64, st.fixed_dictionaries(dict(value=u64)), 8),
    "VringState": (vu.VringState, st.fixed_dictionaries(dict(index=u32, num=u32)), 8),
    "VringAddr": (vu.VringAddr, st.fixed_dictionaries(dict(
        index=u32, flags=u32, descriptor=u64, used=u64, available=u64, log=u64)), 40),
    "MemoryRegion": (vu.MemoryRegion, region, 32),
    "SingleMemoryRegion": (vu.SingleMemoryRegion,
                           st.fixed_dictionaries(dict(padding=u64, region=region)), 40),
    "Log": (vu.Log, st.fixed_dictionaries(dict(mmap_size=u64, mmap_offset=u64)), 16),
    "Inflight": (vu.Inflight, st.fixed_dictionaries(dict(
        # 24: C's struct VhostUserInflight is padded to 8 (QEMU checks the reply's size)
        mmap_size=u64, mmap_offset=u64, num_queues=u16, queue_size=u16,
        padding=st.just(bytes(4)))), 24),
    "DeviceState": (vu.DeviceState, st.fixed_dictionaries(dict(
        transfer_direction=u32, migration_phase=u32)), 8),
    "Iotlb": (vu.Iotlb, st.fixed_dictionaries(dict(
        iova=u64, size=u64, user_addr=u64, permission=u8, type=u8,
        padding=st.just(bytes(6)))), 32),
    "VringArea": (vu.VringArea, st.fixed_dictionaries(dict(index=u64, size=u64, offset=u64)), 24),
    "SharedObject": (vu.SharedObject, st.fixed_dictionaries(dict(uuid=st.binary(min_size=16, max_size=16))), 16),
    "Header": (vu.Header, st.fixed_dictionaries(dict(request=u32, flags=u32, size=u32)), 12),
}


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_fixed_payload_sizes(name):
    schema, _, size = PAYLOADS[name]
    assert schema.sizeof() == size


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_payload_round_trip(name):
    schema, strategy, size = PAYLOADS[name]

    @given(strategy)
    def check(value):
        raw = schema.build(value)
        assert len(raw) == size
        parsed = schema.parse(raw)
        assert {k: parsed[k] for k in value} == value
        assert schema.build(parsed) == raw

    check()


@given(st.lists(region, min_size=0, max_size=vu.MAX_MEM_TABLE_REGIONS))
def test_memory_table_round_trip(regions):
    raw = vu.MemoryTable.build(dict(num_regions=len(regions), padding=0, regions=regions))
    assert len(raw) == 8 + 32 * len(regions)
    parsed = vu.parse_payload(vu.FrontendReq.SET_MEM_TABLE, raw)
    assert [dict((k, r[k]) for k in region_keys) for r in parsed.regions] == regions


region_keys = ("guest_addr", "size", "user_addr", "mmap_offset")


@given(u32, st.binary(max_size=vu.MAX_CONFIG_SIZE), u32)
def test_config_round_trip(offset, payload, flags):
    raw = vu.Config.build(dict(offset=offset, size=len(payload), flags=flags, payload=payload))
    assert len(raw) == 12 + len(payload)
    parsed = vu.parse_payload(vu.FrontendReq.GET_CONFIG, raw)
    assert (parsed.offset, parsed.size, parsed.flags, parsed.payload) == (
        offset, len(payload), flags, payload)


def test_enums_have_the_spec_numbers():
    assert vu.FrontendReq.SET_VRING_KICK == 12
    assert vu.FrontendReq.GET_MAX_MEM_SLOTS == 36
    assert vu.FrontendReq.CHECK_DEVICE_STATE == 43
    assert [r.value for r in vu.FrontendReq] == list(range(1, 44))
    assert [r.value for r in vu.BackendReq] == list(range(1, 11))
    assert [f.value for f in vu.ProtocolFeature] == [1 << b for b in range(20)]
    assert vu.ProtocolFeature.CONFIGURE_MEM_SLOTS == 1 << 15
    assert vu.VHOST_USER_F_PROTOCOL_FEATURES == 1 << 30


@pytest.mark.parametrize("req,payload", [
    (vu.FrontendReq.SET_VRING_NUM, b"\0" * 7),
    (vu.FrontendReq.SET_VRING_ADDR, b"\0" * 39),
    (vu.FrontendReq.SET_FEATURES, b"\0" * 9),
    (vu.FrontendReq.ADD_MEM_REG, b"\0" * 32),
    (vu.FrontendReq.SET_MEM_TABLE, b"\x02\0\0\0\0\0\0\0" + b"\0" * 32),   # says 2, holds 1
    (vu.FrontendReq.SET_MEM_TABLE, b"\x09\0\0\0\0\0\0\0" + b"\0" * 288),  # 9 > 8 regions
    (vu.FrontendReq.GET_CONFIG, b"\0" * 11),
    (vu.FrontendReq.GET_CONFIG, (0).to_bytes(4, "little") + (4).to_bytes(4, "little")
     + bytes(4) + b"\0\0"),                                             # says 4, holds 2
    (vu.FrontendReq.GET_FEATURES, b"\0" * 3),
])
def test_wrong_sizes_rejected_naming_the_message(req, payload):
    with pytest.raises(vu.MessageError, match=req.name):
        vu.parse_payload(req, payload)


def test_unknown_request_rejected():
    with pytest.raises(vu.MessageError, match="request 99"):
        vu.parse_payload(99, b"")


def test_every_request_has_a_payload_rule():
    for req in vu.FrontendReq:
        if req in (vu.FrontendReq.CREATE_CRYPTO_SESSION, vu.FrontendReq.CLOSE_CRYPTO_SESSION):
            continue
        assert req in vu.REQUEST_PAYLOAD, req


def test_blk_layouts():
    assert vb.ReqHeader.sizeof() == vb.REQ_HEADER_SIZE == 16
    assert vb.DiscardWriteZeroes.sizeof() == 16
    assert vb.Config.sizeof() == vb.CONFIG_SIZE == 60
    raw = vb.Config.build(dict(
        capacity=2048, size_max=1, seg_max=2, cylinders=3, heads=4, sectors=5, blk_size=512,
        physical_block_exp=6, alignment_offset=7, min_io_size=8, opt_io_size=9, writeback=1,
        num_queues=2, max_discard_sectors=10, max_discard_seg=11, discard_sector_alignment=12,
        max_write_zeroes_sectors=13, max_write_zeroes_seg=14, write_zeroes_may_unmap=1))
    # spot-check offsets against the spec's struct virtio_blk_config
    assert raw[0:8] == (2048).to_bytes(8, "little")
    assert raw[20:24] == (512).to_bytes(4, "little")
    assert raw[vb.WRITEBACK_OFFSET] == 1
    assert raw[34:36] == (2).to_bytes(2, "little")
    assert raw[56] == 1


def test_rarp_announcement_is_qemus():
    """protocols.ethernet.rarp_announce builds what QEMU's announce_self_create does."""
    from protocols.ethernet import rarp_announce
    mac = bytes.fromhex("525400123456")
    f = rarp_announce(mac)
    assert len(f) == 60
    assert f[:6] == b"\xff" * 6 and f[6:12] == mac
    assert f[12:22] == bytes.fromhex("8035" "0001" "0800" "06" "04" "0003")
    assert f[22:28] == mac and f[28:32] == bytes(4) and f[32:38] == mac
    assert f[38:] == bytes(22)
