"""workload.py: a random virtio-blk workload checked against an in-memory model of the disk.

Backend-agnostic: it only needs a connected `vhost.testing.blk.Frontend` (and, optionally, the path
of the backing image to cross-check at the end), so the same workload runs against
qemu-storage-daemon and against our own backend.

Requests are generated in batches handed to `Frontend.submit_many`; inside a batch no request
that changes data overlaps any other request, because requests in flight together may complete in
any order.  Every read is compared with the model as it was before its batch; writes,
write-zeroes and (optionally) discards are applied to the model after the batch.
Must not: start or stop a backend (the caller's fixture owns it); import tests, devices,
vhost.server, vhost.service or vhost.config.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Sequence

from protocols import virtio_blk as vblk
from vhost.testing.blk import (BlkRequest, Frontend, blk_discard, blk_flush, blk_read, blk_write,
                               blk_write_zeroes)

SECTOR = vblk.SECTOR_SIZE
KiB = 1024

_OP_NAMES = {vblk.T_IN: "read", vblk.T_OUT: "write", vblk.T_FLUSH: "flush",
             vblk.T_DISCARD: "discard", vblk.T_WRITE_ZEROES: "write_zeroes"}


class WorkloadError(AssertionError):
    pass


def _first_diff(a: bytes, b: bytes) -> int:
    """Index of the first differing byte (a and b are of equal length and differ)."""
    lo, hi = 0, len(a)
    while hi - lo > 4096:             # bisect on slices: C-speed comparisons
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    for i in range(lo, hi):
        if a[i] != b[i]:
            return i
    return -1


def _history(log: list[tuple[int, str, int, int]], byte: int, n: int = 6) -> str:
    touched = [f"#{no} {kind} [{s // SECTOR}+{(e - s) // SECTOR}]"
               for no, kind, s, e in log if s <= byte < e]
    return ", ".join(touched[-n:]) or "never written by this workload"


def read_device(frontend: Frontend, nbytes: int, chunk: int = 256 * KiB, depth: int = 16,
                queue=0) -> bytes:
    """Read the first `nbytes` of the device through the frontend."""
    reqs = [blk_read(off // SECTOR, min(chunk, nbytes - off)) for off in range(0, nbytes, chunk)]
    out = bytearray()
    for k, r in enumerate(frontend.submit_many(reqs, queue=queue, depth=depth)):
        if r.status != vblk.S_OK:
            raise WorkloadError(f"read-back of chunk {k} failed with status {r.status}")
        out += r.data
    return bytes(out)


def run_random_workload(frontend: Frontend, image_path: str | os.PathLike | None, seed: int,
                        n_ops: int, depth: int = 1, *, queues: Sequence[int] | int | None = None,
                        max_bytes: int = 256 * KiB, write_zeroes: bool = True,
                        discard_zeroes: bool = False, flushes: bool = True,
                        readback: bool = False) -> bytes:
    """Run `n_ops` random requests (reads and writes of 512 B .. `max_bytes`, plus flushes and
    write-zeroes when the device offers them, and discards when `discard_zeroes` says the
    backend reads discarded sectors back as zeroes) with up to `depth` in flight per queue,
    spread over `queues` (default: all of the frontend's queues).

    Each read is checked against the model; at the end the device is flushed and the model is
    compared with the image file (when `image_path` is given) and, with `readback`, with the
    whole device read through the frontend.  Raises WorkloadError naming the request, sector and
    the history of that byte on any mismatch or non-OK status.  Returns the model's bytes.
    """
    rng = random.Random(seed)
    cfg = frontend.config
    if cfg is None:
        raise WorkloadError("the frontend has no virtio-blk config (protocol feature CONFIG)")
    capacity = cfg.capacity * SECTOR
    if queues is None:
        queues = list(range(len(frontend.queues)))
    features = frontend.features
    can_flush = flushes and bool(features & vblk.F_FLUSH)
    can_wz = write_zeroes and bool(features & vblk.F_WRITE_ZEROES)
    can_discard = discard_zeroes and bool(features & vblk.F_DISCARD)
    wz_max = (cfg.max_write_zeroes_sectors or 1) if can_wz else 0
    discard_max = (cfg.max_discard_sectors or 1) if can_discard else 0
    discard_align = max(1, cfg.discard_sector_alignment or 1) if can_discard else 1
    max_sectors = max(1, max_bytes // SECTOR)
    cap_sectors = capacity // SECTOR

    if image_path is not None:
        model = bytearray(Path(image_path).read_bytes())
        if len(model) != capacity:
            raise WorkloadError(f"image {image_path} holds {len(model)} bytes, the device "
                                f"reports {capacity}")
    else:
        model = bytearray(read_device(frontend, capacity, queue=queues))

    kinds = [("read", 45), ("write", 45)]
    if can_flush:
        kinds.append(("flush", 3))
    if can_wz:
        kinds.append(("write_zeroes", 4))
    if can_discard:
        kinds.append(("discard", 3))
    names, weights = zip(*kinds)

    log: list[tuple[int, str, int, int]] = []     # (op number, kind, start byte, end byte)
    done = 0
    while done < n_ops:
        batch_size = min(n_ops - done, rng.randint(1, 2 * max(1, depth) * len(queues)))
        reqs: list[BlkRequest] = []
        meta: list[tuple[int, str, int, int, bytes | None]] = []
        ranges: list[tuple[int, int, bool]] = []
        for _ in range(batch_size):
            kind = rng.choices(names, weights)[0]
            if kind == "flush":
                reqs.append(blk_flush())
                meta.append((done + len(meta), kind, 0, 0, None))
                continue
            limit = {"write_zeroes": wz_max, "discard": discard_max}.get(kind, max_sectors)
            limit = min(limit, cap_sectors)
            changes = kind != "read"
            for _try in range(8):
                nsec = rng.randint(1, min(16, limit)) if rng.random() < 0.5 else \
                    rng.randint(1, limit)
                if kind == "discard":
                    nsec = max(discard_align, nsec - nsec % discard_align)
                r = rng.random()
                if r < 0.03:
                    sector = cap_sectors - nsec            # the last sectors of the disk
                elif r < 0.06:
                    sector = 0
                else:
                    sector = rng.randint(0, cap_sectors - nsec)
                if kind == "discard":
                    sector -= sector % discard_align
                s, e = sector * SECTOR, (sector + nsec) * SECTOR
                if not any(s < re and rs < e and (changes or rw) for rs, re, rw in ranges):
                    break
            else:
                continue                                   # no free spot: drop this op
            ranges.append((s, e, changes))
            data = None
            if kind == "read":
                reqs.append(blk_read(sector, e - s))
            elif kind == "write":
                data = rng.randbytes(e - s)
                reqs.append(blk_write(sector, data))
            elif kind == "write_zeroes":
                reqs.append(blk_write_zeroes(sector, nsec, unmap=rng.random() < 0.5))
            else:
                reqs.append(blk_discard(sector, nsec))
            meta.append((done + len(meta), kind, s, e, data))
        if not reqs:
            continue

        results = frontend.submit_many(reqs, queue=queues, depth=depth)

        for (no, kind, s, e, data), res in zip(meta, results):
            where = f"op #{no} {kind} sector {s // SECTOR} (+{(e - s) // SECTOR})"
            if res.status != vblk.S_OK:
                raise WorkloadError(f"{where}: status {res.status} (seed {seed})")
            if kind == "read" and res.data != model[s:e]:
                i = _first_diff(res.data, bytes(model[s:e]))
                raise WorkloadError(
                    f"{where}: data differs from the model at byte {s + i} (sector "
                    f"{(s + i) // SECTOR}): got {res.data[i:i + 8].hex()}, expected "
                    f"{bytes(model[s + i:s + i + 8]).hex()}; history of that byte: "
                    f"{_history(log, s + i)} (seed {seed})")
        for no, kind, s, e, data in meta:
            if kind == "write":
                model[s:e] = data
            elif kind in ("write_zeroes", "discard"):
                model[s:e] = bytes(e - s)
            if kind != "read" and kind != "flush":
                log.append((no, kind, s, e))
        done += len(meta)

    if can_flush or features & vblk.F_FLUSH:
        status = frontend.flush(queue=queues[0] if not isinstance(queues, int) else queues)
        if status != vblk.S_OK:
            raise WorkloadError(f"final flush: status {status}")
    if image_path is not None:
        on_disk = Path(image_path).read_bytes()
        if on_disk != model:
            i = _first_diff(on_disk, bytes(model))
            raise WorkloadError(f"image file differs from the model at byte {i} (sector "
                                f"{i // SECTOR}): file {on_disk[i:i + 8].hex()}, model "
                                f"{bytes(model[i:i + 8]).hex()}; history: {_history(log, i)} "
                                f"(seed {seed})")
    if readback:
        dev = read_device(frontend, capacity, queue=queues)
        if dev != model:
            i = _first_diff(dev, bytes(model))
            raise WorkloadError(f"device read-back differs from the model at byte {i}; "
                                f"history: {_history(log, i)} (seed {seed})")
    return bytes(model)
