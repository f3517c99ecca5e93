"""setup.py: only the Cython extension list; metadata lives in pyproject.toml.

PYVHOST_DEBUG_BUILD=1 builds with bounds/wraparound checks, line tracing (CYTHON_TRACE_NOGIL) and
-O0 -g, the way the test suite runs it at least once in CI.

PYVHOST_FUZZ_BUILD=1 is the debug build compiled with clang and SanitizerCoverage
(-fsanitize=fuzzer-no-link without stack-depth tracing), so that the fuzzers in tests/fuzz see
coverage inside the compiled data plane (see cython_ext/sancov_stubs.h for how an instrumented
extension still imports without the fuzzer).  CC may name another clang.
"""
import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

FUZZ = os.environ.get("PYVHOST_FUZZ_BUILD", "") not in ("", "0")
DEBUG = FUZZ or os.environ.get("PYVHOST_DEBUG_BUILD", "") not in ("", "0")
if FUZZ:
    os.environ.setdefault("CC", "clang")   # distutils derives LDSHARED from CC

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": not DEBUG,
    "linetrace": DEBUG,
}
macros = ([("CYTHON_TRACE_NOGIL", "1"), ("CYTHON_TRACE", "1"), ("PYVHOST_DEBUG", "1")]
          if DEBUG else [])
cflags = ["-O0", "-g3"] if DEBUG else ["-O2"]
if FUZZ:
    # libFuzzer's stack-depth tracing needs a TLS variable atheris does not export
    macros = macros + [("PYVHOST_FUZZ", "1")]
    cflags = cflags + ["-fsanitize=fuzzer-no-link", "-fno-sanitize-coverage=stack-depth",
                       "-include", "sancov_stubs.h"]
    # Debian's Python links extensions with -Bsymbolic-functions (its sysconfig LDSHARED): that
    # binds the coverage callbacks to the weak stubs inside each .so at link time, so libFuzzer's
    # never get the counters.  Undo it for the fuzz build (found by fresh-ci on Debian's python3).
    ldflags = ["-Wl,-Bno-symbolic"]
else:
    ldflags = []


def ext(name, package="cython_ext", libraries=()):
    return Extension(f"{package}.{name}", [f"{package}/{name}.pyx"], include_dirs=["cython_ext"],
                     define_macros=macros, extra_compile_args=cflags + ["-Wno-unused-function"],
                     extra_link_args=ldflags, libraries=list(libraries))


# cython_ext.rbd (the Ceph RBD engine) links librbd/librados: built when their headers are here
# (Debian librbd-dev, librados-dev: .ci/install installs them); without them pyvhost builds
# everything else and an RBD device fails at start saying so.
HAVE_RBD = os.path.exists("/usr/include/rbd/librbd.h") and \
    os.path.exists("/usr/include/rados/librados.h")
if not HAVE_RBD:
    print("setup.py: WARNING: librbd-dev / librados-dev not installed: building without the "
          "Ceph RBD engine (cython_ext.rbd)")


# QEMU's vhost-user backend descriptors (docs/interop/vhost-user.json) go to
# <prefix>/share/qemu/vhost-user/NN-name.json, the directory libvirt searches when the prefix is
# /usr (else copy or link them to /etc/qemu/vhost-user/).  They also ship as vhost package data.
HERE = os.path.dirname(os.path.abspath(__file__))
VHOST_USER_JSON = sorted(os.path.relpath(p, HERE) for p in
                         glob.glob(os.path.join(HERE, "vhost/data/qemu/vhost-user/*.json")))

# bench.loadgen: the benchmarks' compiled driver loop (not part of the product; it includes
# cython_ext/vhost_compat.h for the barriers).
EXTENSIONS = [ext("ring"), ext("worker"), ext("engine"), ext("blk"), ext("net"), ext("rng"),
              ext("loadgen", "bench")]
if HAVE_RBD:
    EXTENSIONS.append(ext("rbd", libraries=["rbd", "rados"]))
# cython_ext.nbd (the NBD engine) links libnbd (Debian libnbd-dev), likewise optional.
HAVE_NBD = os.path.exists("/usr/include/libnbd.h")
if HAVE_NBD:
    EXTENSIONS.append(ext("nbd", libraries=["nbd"]))
else:
    print("setup.py: WARNING: libnbd-dev not installed: building without the NBD engine "
          "(cython_ext.nbd)")
setup(ext_modules=cythonize(EXTENSIONS,
                            compiler_directives=directives, include_path=["cython_ext"]),
      data_files=[("share/qemu/vhost-user", VHOST_USER_JSON)])
