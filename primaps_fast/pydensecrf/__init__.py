"""``primaps_fast.pydensecrf``: pydensecrf's API (``densecrf``, ``utils``) on primaps_fast's kernels.

Replace ``import pydensecrf.densecrf as dcrf`` by ``import primaps_fast.pydensecrf.densecrf as dcrf``
(and ``pydensecrf.utils`` likewise), or call :func:`install` once so that ``import pydensecrf`` itself
resolves to this package in this process. README, "Replacing pydensecrf", lists what is covered.
"""
from __future__ import annotations

import sys

from primaps_fast.pydensecrf import densecrf, utils

_NAMES = ("pydensecrf", "pydensecrf.densecrf", "pydensecrf.utils")
_saved: dict = {}  # module name -> the sys.modules entry install() replaced (None: there was none)


def install() -> None:
    """Make ``import pydensecrf``, ``pydensecrf.densecrf`` and ``pydensecrf.utils`` resolve to this
    package in this process, whether or not pydensecrf is installed (modules that already imported the
    real one keep it). Idempotent; :func:`uninstall` restores."""
    ours = (sys.modules[__name__], densecrf, utils)
    for name, module in zip(_NAMES, ours):
        if name not in _saved:
            _saved[name] = sys.modules.get(name)
        sys.modules[name] = module


def uninstall() -> None:
    """Undo :func:`install`: the previous ``sys.modules`` entries come back (or none)."""
    for name, previous in _saved.items():
        if previous is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous
    _saved.clear()


def installed() -> bool:
    """Whether :func:`install` is in effect."""
    return bool(_saved)
