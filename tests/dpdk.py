"""dpdk.py: the DPDK ``dpdk-testpmd`` harness for the net tests.  It lives in bench/dpdk.py (the
benchmarks drive the same processes); this module re-exports it so that tests keep importing
``tests.dpdk``.  See bench/dpdk.py for the API and the notes on topologies and CPUs."""
from bench.dpdk import *  # noqa: F401,F403
from bench.dpdk import (  # noqa: F401  (module-level names outside __all__)
    HUGEPAGE_MOUNT, HUGEPAGES_2M, PROMPT, _is_socket, _kill_all, _live, _mac_plus,
    _runtime_dir, _tail, __all__)
