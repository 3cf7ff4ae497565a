"""Test setup. TRITON_INTERPRET must be set before triton.jit runs (docs/adding_an_op.md), i.e. here, before
any primaps_fast Triton module is imported: the Triton kernels then run on the CPU."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def rng():
    """A seeded torch.Generator, fresh per test."""
    return torch.Generator().manual_seed(1234)
