"""``python -m primaps_fast ...`` (and ``torchrun -m primaps_fast ...``): the ``primaps-fast`` command."""
import sys

from primaps_fast.cli import main

sys.exit(main())
