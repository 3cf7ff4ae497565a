"""pytest setup shared by tests/ and benchmarks/: which primaps_fast they import.

A checkout whose package was installed (`pip install .`) has no compiled module in its own
``primaps_fast/`` folder, and both `python -m pytest` (the current folder) and pytest itself (the folder
of this file) put the checkout first on ``sys.path``: the source tree would shadow the installed package
and every op would fail. When this checkout has no build but an installed copy has one, the checkout is
taken off ``sys.path``, so the tests and benchmarks run against the installed package. A checkout built in
place (`pip install -e .`, `python setup.py build_ext --inplace`) is used as it is.
"""
import glob
import os
import sys

_CHECKOUT = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))


def _built(folder: str) -> bool:
    return bool(glob.glob(os.path.join(folder, "primaps_fast", "_C.*.so")))


def _is_checkout(entry: str) -> bool:
    return os.path.realpath(entry or os.curdir) == _CHECKOUT


if not _built(_CHECKOUT) and any(_built(e or os.curdir) for e in sys.path if not _is_checkout(e)):
    sys.path[:] = [e for e in sys.path if not _is_checkout(e)]
