"""vhost.testing: the vhost-user *frontend* side -- the role QEMU (and a guest driver) plays --
and the helpers the tests and the benchmarks share.  Not part of the backend: protocols/,
vhost/ (outside this package), devices/ and cython_ext/ never import it.

The frontend driver (like DPDK's virtio_user, it drives a backend over a real Unix socket
without a VM):

* `errors`      -- FrontendError and its subclasses.
* `ram`         -- guest RAM in posix_ipc shared memory, region layouts (one region, QEMU's PC
                   layout with a hole), a first-fit allocator.
* `virtqueue`   -- the driver side of a split virtqueue (descriptor table, avail/used rings,
                   kicks, reaping), including the low-level entry points for hostile layouts.
* `connection`  -- VhostUserFrontend: the vhost-user conversation (features, memory table,
                   vring setup, REPLY_ACK, GET_VRING_BASE on close).
* `blk`         -- virtio-blk request builders and `Frontend`, the blk driver.
* `net`         -- `NetFrontend`, the net driver, virtio_net_hdr helpers, frame builders and
                   checksums.
* `hostile`     -- builders of chains no well-behaved driver lays out (loops, bad INDIRECT).
* `raw`         -- RawFrontend, a frontend that negotiates and then sends any message with any
                   fds (acks read back, bytes trickled with fds on each), and the fds and
                   payloads hostile tests hand a backend (sparse memfds, saturated eventfds,
                   fds of the wrong kind, memory tables).

Shared test and benchmark harnesses:

* `backends`    -- pyvhost-blk and qemu-storage-daemon as subprocesses; `short_tmpdir`.
* `netbackends` -- pyvhost-net as a subprocess.
* `ceph`        -- a throwaway one-node Ceph cluster (a mon and a memstore OSD on loopback,
                   cephx) for the RBD tests and benchmarks.
* `nbdserver`   -- qemu-nbd and nbdkit (memory plugin) on Unix sockets, killable and
                   restartable, for the NBD tests and benchmarks.
* `netns`       -- network namespaces (ip netns / nsenter).
* `ringrig`     -- an in-memory ring rig (VirtQueue + a BlkQueueWorker on the same memory).
* `guarded`     -- guest memory with guard pages around every region (the fuzz targets).
* `workload`    -- a random virtio-blk workload checked against a model of the disk.
* `guest`       -- a Linux guest under QEMU TCG with a busybox initramfs.
* `dpdk`        -- DPDK testpmd (net_vhost backend, net_virtio_user frontend).
* `serve`       -- `pyvhost serve` as systemd runs it (notify listener, socket activation).
* `healthy`     -- `pyvhost serve` with healthy blk and net tenants next to the devices a
                   hostile frontend attacks, the bounded healthy loads (stall and op counts),
                   probes and /proc readings of the service.

Rules (checked by tests/unit/test_layers.py): nothing here imports `tests`, `devices`,
`vhost.server`, `vhost.service` or `vhost.config` -- this is a frontend: it speaks the wire
protocol, starts backends as programs, and may import `protocols`, `vhost.memory`,
`vhost.logfmt`, and `cython_ext` / `bench.loadgen` only where a helper truly needs them
(`ringrig` runs a BlkQueueWorker).  This file imports nothing, so importing one helper does
not pull in the others.
"""
