"""setup.py: only the Cython extension list; metadata lives in pyproject.toml.

PYVHOST_DEBUG_BUILD=1 builds with bounds/wraparound checks, line tracing (CYTHON_TRACE_NOGIL) and
-O0 -g, the way the test suite runs it at least once in CI.
"""
import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("PYVHOST_DEBUG_BUILD", "") not in ("", "0")

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


def ext(name, package="cython_ext"):
    return Extension(f"{package}.{name}", [f"{package}/{name}.pyx"], include_dirs=["cython_ext"],
                     define_macros=macros, extra_compile_args=cflags + ["-Wno-unused-function"])


# QEMU's vhost-user backend descriptors (docs/interop/vhost-user.json) go to
# <prefix>/share/qemu/vhost-user/NN-name.json, the directory libvirt searches when the prefix is
# /usr (else copy or link them to /etc/qemu/vhost-user/).  They also ship as vhost package data.
HERE = os.path.dirname(os.path.abspath(__file__))
VHOST_USER_JSON = sorted(os.path.relpath(p, HERE) for p in
                         glob.glob(os.path.join(HERE, "vhost/data/qemu/vhost-user/*.json")))

# bench.loadgen: the benchmarks' compiled driver loop (not part of the product; it includes
# cython_ext/vhost_compat.h for the barriers).
setup(ext_modules=cythonize([ext("ring"), ext("worker"), ext("blk"), ext("net"), ext("rng"),
                             ext("loadgen", "bench")],
                            compiler_directives=directives, include_path=["cython_ext"]),
      data_files=[("share/qemu/vhost-user", VHOST_USER_JSON)])
