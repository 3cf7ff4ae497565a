"""Benchmark setup: each case times reference vs fast on the same inputs after checking they agree.

Run ``pytest benchmarks --benchmark-only`` for timings, ``pytest benchmarks --benchmark-disable`` to
run every case once as a test (CI). Triton cases are skipped without a CUDA device.
"""
import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton timings need a CUDA device")
