"""python -m tests.fuzz TARGET [--runs N | --seconds S] [--workers N] [--corpus DIR]
                      [--artifacts DIR] [--reproduce FILE ...] [-- LIBFUZZER_ARGS ...]

Runs one fuzz target of tests/fuzz under atheris (libFuzzer).  Exit status 0: no crash; non-zero:
libFuzzer found one and wrote the input to the artifacts directory (crash-<sha1>), or a
--reproduce input still fails.  New coverage-increasing inputs go to --corpus (default: a
temporary directory, removed afterwards); the committed seeds in tests/fuzz/corpus/TARGET and
the inputs that once crashed in tests/fuzz/crashes/TARGET are always read, never written.  libFuzzer ends the process with exit(), so it runs in a child
process and this one cleans up after it.

Order matters for native coverage: libFuzzer (atheris's core module) is loaded into the global
symbol namespace first, then the target (and with it the Cython extensions) is imported under
atheris's Python instrumentation.  On a fuzz build (PYVHOST_FUZZ_BUILD=1) the extensions'
SanitizerCoverage counters then go to libFuzzer; on any other build the fuzzer sees Python
coverage only (said on stderr).

--workers N is libFuzzer's fork mode (-fork=N): one run, one corpus, N worker processes, and
the executions counted over all of them (so --runs is the run's total).  libFuzzer starts each
worker as its own argv[0] with its flags, so argv[0] is a small shell script that comes back
here as a --fork-job child.
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import importlib
import importlib.util
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading

from tests.fuzz import INSTRUMENT, TARGETS

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
CRASHES = os.path.join(HERE, "crashes")      # inputs that once crashed: always read as seeds
ROOT = os.path.dirname(os.path.dirname(HERE))


def load_libfuzzer_globally() -> bool:
    """dlopen atheris's core_with_libfuzzer RTLD_GLOBAL, before atheris imports it itself (it
    then reuses this handle), so that instrumented extensions find libFuzzer's
    __sanitizer_cov_* symbols."""
    spec = importlib.util.find_spec("atheris")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("fuzz: atheris is not installed (pip install -e '.[test]')")
    found = []
    for d in spec.submodule_search_locations:
        found += glob.glob(os.path.join(d, "core_with_libfuzzer*.so"))
    if not found:
        return False
    ctypes.CDLL(found[0], mode=ctypes.RTLD_GLOBAL)
    return True


def native_coverage_report() -> str:
    """How the loaded cython_ext modules report their coverage counters."""
    mods = [m for name, m in sorted(sys.modules.items())
            if name.startswith("cython_ext.") and getattr(m, "__file__", "").endswith(".so")]
    if not mods:
        return "no Cython extension loaded"
    stubbed, plain = [], []
    for m in mods:
        lib = ctypes.CDLL(m.__file__)
        try:
            if ctypes.c_int.in_dll(lib, "pyvhost_sancov_stubbed").value:
                stubbed.append(m.__name__)
        except ValueError:
            plain.append(m.__name__)
    if plain:
        return ("not a fuzz build (PYVHOST_FUZZ_BUILD=1): Python coverage only for "
                + ", ".join(plain))
    if stubbed:
        raise SystemExit("fuzz: " + ", ".join(stubbed) + " were loaded before libFuzzer: their "
                         "native coverage went to the stubs")
    return "native coverage (SanitizerCoverage) from " + ", ".join(m.__name__ for m in mods)


class ThreadErrors:
    """An exception in any thread during an input fails that input."""

    def __init__(self):
        self.errors: list[BaseException] = []
        threading.excepthook = self._hook

    def _hook(self, args):
        self.errors.append(args.exc_value)

    def check(self):
        if self.errors:
            e, self.errors = self.errors[0], []
            raise RuntimeError(f"exception in a thread: {type(e).__name__}: {e}") from e


def _fork_shim(target: str, artifacts: str) -> str:
    """The executable libFuzzer's fork mode runs as each worker: this module, as a --fork-job
    child of `target`, given the flags libFuzzer passes.  Lives beside the artifacts."""
    path = os.path.join(os.path.abspath(artifacts), f".fuzz-{target}-worker")
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m tests.fuzz --child "
                f"{shlex.quote(target)} --fork-job -- \"$@\"\n")
    os.chmod(path, 0o755)
    return path


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", choices=TARGETS)
    p.add_argument("--runs", type=int, help="stop after N executions (libFuzzer -runs)")
    p.add_argument("--seconds", type=int, help="stop after S seconds (-max_total_time)")
    p.add_argument("--corpus", help="working corpus directory, kept (default: a temporary one)")
    p.add_argument("--artifacts", default=".",
                   help="where crash/timeout inputs are written (default: .)")
    p.add_argument("--timeout", type=int, default=60, help="one input's time limit, seconds")
    p.add_argument("--no-seeds", action="store_true", help="do not read corpus/TARGET")
    p.add_argument("--reproduce", nargs="+", metavar="FILE",
                   help="run these inputs once each instead of fuzzing")
    p.add_argument("--workers", type=int, help="libFuzzer fork mode: N worker processes")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--fork-job", action="store_true", help=argparse.SUPPRESS)
    extra = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    args = p.parse_args(argv)
    args.libfuzzer = extra          # passed to libFuzzer as they are (flags, corpus dirs)
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.child:
        return child(args)
    tmp = None
    if args.corpus is None and not args.reproduce:
        tmp = tempfile.mkdtemp(prefix=f"fuzz-{args.target}-")
        argv = ["--corpus", tmp] + argv
    try:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in
                                                      env.get("PYTHONPATH", "").split(os.pathsep)
                                                      if p])
        return subprocess.call([sys.executable, "-m", "tests.fuzz", "--child"] + argv, env=env)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def child(args) -> int:
    have_libfuzzer = load_libfuzzer_globally()
    import atheris

    logging.disable(logging.CRITICAL)   # the backend logs every refused request
    with atheris.instrument_imports(include=INSTRUMENT[args.target] or None,
                                    exclude=["vhost.testing", "tests"]):
        target = importlib.import_module(f"tests.fuzz.{args.target}")
    print(f"fuzz: {args.target}: "
          + (native_coverage_report() if have_libfuzzer else "libFuzzer not found in atheris"),
          file=sys.stderr, flush=True)
    threads = ThreadErrors()

    def one_input(data: bytes) -> None:
        target.TestOneInput(data)
        threads.check()

    if args.fork_job:       # a worker of a --workers run: libFuzzer's own flags and dirs only
        atheris.Setup([sys.argv[0]] + list(args.libfuzzer), one_input, internal_libfuzzer=True)
        atheris.Fuzz()
        return 0
    os.makedirs(args.artifacts, exist_ok=True)
    argv0 = sys.argv[0]
    if args.workers:
        argv0 = _fork_shim(args.target, args.artifacts)
    flags = [f"-artifact_prefix={os.path.join(os.path.abspath(args.artifacts), '')}",
             f"-timeout={args.timeout}", f"-max_len={target.MAX_LEN}", "-print_final_stats=1"]
    if args.runs is not None:
        flags.append(f"-runs={args.runs}")
    if args.seconds is not None:
        flags.append(f"-max_total_time={args.seconds}")
    if args.workers:
        flags.append(f"-fork={args.workers}")
    if args.reproduce:
        dirs = list(args.reproduce)
    else:
        os.makedirs(args.corpus, exist_ok=True)
        dirs = [args.corpus]
        for seeds in (os.path.join(CORPUS, args.target), os.path.join(CRASHES, args.target)):
            if not args.no_seeds and os.path.isdir(seeds):
                dirs.append(seeds)
    atheris.Setup([argv0] + flags + list(args.libfuzzer) + dirs, one_input,
                  internal_libfuzzer=True)
    atheris.Fuzz()          # ends the process itself (0, or non-zero on a crash)
    return 0


if __name__ == "__main__":
    sys.exit(main())
