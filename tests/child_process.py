"""How tests start Python child processes: on the primaps_fast this process imported.

A child's ``sys.path`` starts with its working folder (``python -c`` and ``python -m``), so a child started
in the repository root of a checkout whose package was installed would import the source tree, which has
no compiled module. Children therefore start in ``CWD`` (this folder, which holds no package) with
``PYTHONPATH`` led by the folder of the ``primaps_fast`` this process imported (the installed package, or
a source tree built in place).
"""
import os

import primaps_fast

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(primaps_fast.__file__)))
CWD = os.path.dirname(os.path.abspath(__file__))


def child_env(**extra) -> dict:
    """``os.environ`` with ``PYTHONPATH`` led by ``PACKAGE_ROOT``, updated with ``extra``."""
    path = os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}
