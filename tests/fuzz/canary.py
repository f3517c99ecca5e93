"""canary: a target that crashes on purpose, so that tests/unit/test_fuzz.py can check that a crash
fails the run (a Python exception and a native fault) and leaves its input behind."""
import ctypes

MAX_LEN = 64


def TestOneInput(data: bytes) -> None:
    if data.startswith(b"canary-raise"):
        raise RuntimeError("the canary raised")
    if data.startswith(b"canary-segv"):
        ctypes.string_at(8, 1)          # a read of unmapped memory: SIGSEGV
