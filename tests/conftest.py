"""Test setup. TRITON_INTERPRET must be set before triton.jit runs (docs/adding_an_op.md), i.e. here, before
any primaps_fast Triton module is imported: the Triton kernels then run on the CPU.

``PRIMAPS_FAST_TEST_DEVICE=cuda`` (benchmarks/gpu_check.sh) runs the suite on a GPU instead: Triton is
compiled for the GPU, not interpreted, so the tests marked ``interpreter`` (Triton on CPU tensors) are
skipped, and the GPU sections of the op tests check the Triton and CUDA backends on CUDA tensors."""
import os

GPU_RUN = os.environ.get("PRIMAPS_FAST_TEST_DEVICE", "cpu") == "cuda"
if GPU_RUN:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if not GPU_RUN:
        return
    skip = pytest.mark.skip(reason="Triton interpreter test (CPU tensors); PRIMAPS_FAST_TEST_DEVICE=cuda runs "
                                   "Triton on the GPU instead")
    for item in items:
        if "interpreter" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    """A seeded torch.Generator, fresh per test."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def triton_launches(monkeypatch):
    """The names of the Triton kernels launched while the test runs (interpreter or GPU), in order."""
    pytest.importorskip("triton")
    from primaps_fast.triton import dense_crf as triton_crf

    cls = type(triton_crf._splat_kernel)
    launches, run = [], cls.run

    def counted(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(cls, "run", counted)
    return launches
