"""Shared by the benchmarks: each case times reference (or pydensecrf) and fast backends on the same
inputs, after checking that they agree, and records the ratio of medians measured in the same run.

Run ``pytest benchmarks --benchmark-only`` for timings, ``pytest benchmarks --benchmark-disable`` to run
every case once as a test (CI). Triton cases are skipped without a CUDA device.
"""
import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton timings need a CUDA device")
PROVIDERS = ["reference", "cpu", pytest.param("triton", marks=requires_cuda)]
SLOW = ("reference", "official")  # seconds per call: no warm-up round by default

_medians = {}


def time_side_by_side(benchmark, fn, *, case, provider, rounds, per=1, unit="image", baseline="reference",
                      warmup_rounds=None):
    """Time ``fn`` with ``benchmark.pedantic`` and record its median per ``unit`` (``per`` units a call).

    ``extra_info`` gets ``ms_per_<unit>`` and, when ``baseline`` ran earlier in this session for the same
    ``case``, ``speedup_vs_<baseline>``. Returns that speed-up, or None (no baseline yet, or
    ``--benchmark-disable``).
    """
    if warmup_rounds is None:
        warmup_rounds = 0 if provider in SLOW else 1
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
    if benchmark.stats is None:  # --benchmark-disable
        return None
    per_unit = benchmark.stats.stats.median / per
    _medians[(case, provider)] = per_unit
    benchmark.extra_info[f"ms_per_{unit}"] = per_unit * 1e3
    base = _medians.get((case, baseline))
    if base is None or provider == baseline:
        return None
    benchmark.extra_info[f"speedup_vs_{baseline}"] = base / per_unit
    return base / per_unit
