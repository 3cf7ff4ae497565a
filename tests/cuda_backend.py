"""Marks of the GPU sections of the op tests: the CUDA C++ backend (``primaps_fast.cuda`` launchers over
``primaps_fast._C_cuda``) and the Triton backend, both on CUDA tensors; each skip says what is missing."""
import os

import pytest
import torch

from primaps_fast._dispatch import cuda_available

HAS_GPU = torch.cuda.is_available()

if not cuda_available():
    _cuda_reason = "CUDA backend: primaps_fast._C_cuda was not built (no nvcc at build time, or PRIMAPS_FAST_CUDA=0)"
elif not HAS_GPU:
    _cuda_reason = "CUDA backend: needs an NVIDIA GPU (none here)"
else:
    _cuda_reason = ""
if not HAS_GPU:
    _triton_reason = "Triton on CUDA tensors: needs an NVIDIA GPU (none here)"
elif os.environ.get("TRITON_INTERPRET") == "1":
    _triton_reason = "Triton on CUDA tensors: TRITON_INTERPRET=1 (run with PRIMAPS_FAST_TEST_DEVICE=cuda)"
else:
    _triton_reason = ""

requires_cuda_backend = pytest.mark.skipif(bool(_cuda_reason), reason=_cuda_reason)
requires_triton_gpu = pytest.mark.skipif(bool(_triton_reason), reason=_triton_reason)
# parametrize("backend", GPU_BACKENDS): each GPU test once per GPU backend
GPU_BACKENDS = [pytest.param("cuda", marks=requires_cuda_backend), pytest.param("triton", marks=requires_triton_gpu)]
