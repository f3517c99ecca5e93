"""The C constants of the Cython extensions that mirror protocols/ (nogil code needs them as C
enums): each extension exposes them as C_CONSTANTS {"module.NAME": value}, NAME spelled as in
protocols/<module>.py; every one must equal the Python value, so a drift on either side fails
here."""
import importlib

import pytest

from cython_ext import blk, net, ring

EXTENSIONS = {"ring": ring, "blk": blk, "net": net}
CASES = [(ext, key, value) for ext, mod in EXTENSIONS.items()
         for key, value in sorted(mod.C_CONSTANTS.items())]


def test_every_extension_mirrors_something():
    for ext, mod in EXTENSIONS.items():
        assert mod.C_CONSTANTS, ext


@pytest.mark.parametrize("ext,key,value", CASES, ids=[f"{e}:{k}" for e, k, _ in CASES])
def test_c_constant_matches_protocols(ext, key, value):
    module, name = key.split(".")
    proto = importlib.import_module(f"protocols.{module}")
    assert hasattr(proto, name), f"protocols/{module}.py has no {name}"
    assert getattr(proto, name) == value, \
        f"cython_ext/{ext}.pyx says {name} = {value}, protocols/{module}.py says " \
        f"{getattr(proto, name)}"
