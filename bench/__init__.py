"""The benchmark suite: load generators and side-by-side comparisons of pyvhost with the C
references (qemu-storage-daemon, DPDK).  Not imported by the product (protocols/, vhost/,
devices/, cython_ext/ never import bench).

* `bench.loadgen` -- the compiled (Cython, GIL released) virtio-blk driver loop: submit/complete
  on one virtqueue set up by `vhost.testing.blk.Frontend`, latency histogram in C.
* `bench.blk` -- pyvhost-blk vs qemu-storage-daemon on null, tmpfs and disk media
  (`python -m bench.blk [--quick]`).
* `bench.micro` -- pytest-benchmark microbenchmarks of the data-path pieces.
"""
