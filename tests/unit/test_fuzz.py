"""The fuzz targets of tests/fuzz (atheris / libFuzzer), each run for a few seconds from its seed
corpus, as CI runs them: a crash (an exception that is not the target's documented one, a failed
check, a fault in guard-paged guest memory, a hang) fails the test with the input that caused
it.  And the wiring itself: a crash must fail the run and leave its input behind, for a Python
exception and for a native fault alike.  On the fuzz build (PYVHOST_FUZZ_BUILD=1, which .ci/run
tests as its debug build and marks with PYVHOST_EXPECT_FUZZ=1) libFuzzer must also see the
coverage inside the Cython extensions."""
from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vhost.testing.backends import REPO_ROOT

# seconds per target: about a minute and a half in all
SECONDS = {"protocol": 30, "ring": 20, "net": 20, "config": 15}
NATIVE = {"protocol", "ring", "net"}          # the targets that load Cython extensions


def fuzz(target: str, *args, artifacts: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.fuzz", target, "--artifacts",
                           str(artifacts), *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def found(artifacts: Path) -> list[Path]:
    return sorted(p for p in artifacts.glob("*") if p.name.split("-")[0] in
                  ("crash", "timeout", "oom", "leak"))


@pytest.mark.parametrize("target", sorted(SECONDS))
def test_fuzz_target_finds_no_crash(target, tmp_path):
    art = tmp_path / "artifacts"
    r = fuzz(target, "--seconds", str(SECONDS[target]), artifacts=art,
             timeout=SECONDS[target] + 240)
    inputs = found(art)
    report = "".join(f"\n{p.name}: base64 {base64.b64encode(p.read_bytes()).decode()}"
                     for p in inputs)
    assert r.returncode == 0 and not inputs, (
        f"python -m tests.fuzz {target} found a crash (exit {r.returncode}); reproduce with "
        f"python -m tests.fuzz {target} --reproduce FILE{report}\n{r.stderr[-6000:]}")
    runs = re.search(r"stat::number_of_executed_units: (\d+)", r.stderr)
    assert runs and int(runs.group(1)) >= 200, r.stderr[-3000:]
    if os.environ.get("PYVHOST_EXPECT_FUZZ") and target in NATIVE:
        assert "native coverage (SanitizerCoverage)" in r.stderr, r.stderr[:3000]


CRASHES = Path(REPO_ROOT) / "tests" / "fuzz" / "crashes"
CRASH_INPUTS = sorted(p for p in CRASHES.glob("*/*") if p.is_file() and p.name != "README.md")


@pytest.mark.parametrize("path", CRASH_INPUTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_input_fuzzing_crashed_on_runs_clean_now(path, tmp_path):
    """The inputs long fuzz runs crashed on (tests/fuzz/crashes/TARGET/, see its README):
    each one replayed through its target must not fail any more."""
    r = fuzz(path.parent.name, "--reproduce", str(path), artifacts=tmp_path, timeout=240)
    assert r.returncode == 0, r.stderr[-6000:]
    assert "Running: " in r.stderr, r.stderr[-3000:]


def test_there_are_recorded_crash_inputs():
    assert CRASH_INPUTS, f"no inputs under {CRASHES}"


@pytest.mark.parametrize("how", ["raise", "segv"])
def test_a_crash_fails_the_run_and_keeps_its_input(how, tmp_path):
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    (seeds / "boring").write_bytes(b"nothing to see")
    (seeds / "bad").write_bytes(b"canary-" + how.encode())
    art = tmp_path / "artifacts"
    r = fuzz("canary", "--runs", "1000", "--", str(seeds), artifacts=art, timeout=120)
    assert r.returncode != 0, r.stderr[-3000:]
    assert [p.read_bytes() for p in found(art)] == [b"canary-" + how.encode()], r.stderr[-3000:]
    # and the input reproduces alone
    r = fuzz("canary", "--reproduce", str(seeds / "bad"), artifacts=art, timeout=120)
    assert r.returncode != 0
    r = fuzz("canary", "--reproduce", str(seeds / "boring"), artifacts=art, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]


def test_workers_is_one_run_counted_over_its_worker_processes(tmp_path):
    """--workers N (libFuzzer's fork mode, how the long runs are done on two cores): the workers
    come back through the shell shim as --fork-job children, and --runs bounds the run's total
    executions, not each worker's."""
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    (seeds / "boring").write_bytes(b"nothing to see")
    art = tmp_path / "artifacts"
    r = fuzz("canary", "--runs", "3000", "--workers", "2", "--", str(seeds), artifacts=art,
             timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "-fork=2: fuzzing in separate process(s)" in r.stderr, r.stderr[-3000:]
    done = re.search(r"fuzzed for (\d+) iterations", r.stderr)
    assert done and int(done.group(1)) >= 3000, r.stderr[-3000:]
    jobs = {int(j) for j in re.findall(r" job: (\d+)", r.stderr)}
    assert jobs, r.stderr[-3000:]
    assert not found(art), r.stderr[-3000:]
