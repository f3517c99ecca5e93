"""tests/fuzz: coverage-guided fuzz targets (atheris / libFuzzer) for what parses untrusted
input: the vhost-user protocol (`protocol`), the ring engine and the blk/rng workers (`ring`),
the virtio-net tx/rx paths through the switch and a tap (`net`), and the config file (`config`).

Run one with `python -m tests.fuzz TARGET --seconds S` or `--runs N` (see __main__.py); the seed
corpora are in corpus/<target>/ (rebuilt by `python -m tests.fuzz.seeds`).  On a fuzz build
(PYVHOST_FUZZ_BUILD=1, setup.py) libFuzzer also sees the coverage inside the Cython extensions.
tests/unit/test_fuzz.py runs every target briefly in CI.

Each target module has TestOneInput(data) and MAX_LEN; the modules it fuzzes are imported by the
runner under atheris's import instrumentation (INSTRUMENT below).  This package imports nothing
itself: importing a target must happen after the runner has loaded libFuzzer.
"""

TARGETS = ("protocol", "ring", "net", "config", "canary")

# Module prefixes whose Python code is instrumented for coverage, per target.
INSTRUMENT = {
    "protocol": ["protocols", "vhost", "devices"],
    "ring": ["vhost", "devices"],
    "net": ["vhost", "devices"],
    "config": ["vhost", "devices", "tomllib"],
    "canary": [],
}
