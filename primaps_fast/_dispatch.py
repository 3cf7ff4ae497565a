"""Input validation and backend choice, shared by every op.

Every public op takes ``backend=None`` (auto: C++ for CPU tensors; for CUDA tensors the CUDA C++ module
when it was built, else Triton) or one of ``BACKENDS``. Validation errors are ``ValueError``/``TypeError``
whose message starts with the argument's name.
"""
from __future__ import annotations

import functools
import glob
import importlib
import math
import os
import sys

import torch

BACKENDS = ("cpu", "cuda", "triton", "reference")

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _missing_build(module: str, what: str, how: str, *, here: str = _PACKAGE_DIR) -> str:
    """The message for a compiled ``module`` that does not import from the package folder ``here``.

    When ``here`` has no build at all (not even ``_C``) but another ``primaps_fast`` on ``sys.path`` has
    ``module``, a source tree is shadowing the installed package (``python -m pytest`` from the repository
    root puts the source tree first on ``sys.path``): say that, since "not built" would be wrong. A tree
    built without its CUDA module is just that, whatever another copy has.
    """
    stem = module.rsplit(".", 1)[-1]
    if not glob.glob(os.path.join(here, "_C.*.so")):  # a tree built without CUDA is not shadowing anything
        for entry in sys.path:
            other = os.path.join(os.path.abspath(entry or os.curdir), "primaps_fast")
            if os.path.realpath(other) != os.path.realpath(here) and glob.glob(os.path.join(other, stem + ".*.so")):
                return (f"{module} is missing in {here}: this source tree, which has no build, shadows the "
                        f"installed package at {other} (it comes first on sys.path, e.g. because Python was "
                        "started from the repository root). Run from another folder, or build the source tree "
                        "in place with `pip install -e .` or `python setup.py build_ext --inplace`")
    return f"primaps_fast was not built with {what} ({module} is missing): {how}"


@functools.lru_cache(maxsize=None)
def cpp():
    """The compiled module ``primaps_fast._C``; a clear error when the package was not built."""
    try:
        from primaps_fast import _C
    except ImportError as exc:  # pragma: no cover - only on a broken install
        raise RuntimeError(_missing_build(
            "primaps_fast._C", "its C++ extension",
            "reinstall with `pip install .`, or build a source tree in place with "
            "`python setup.py build_ext --inplace`")) from exc
    return _C


@functools.lru_cache(maxsize=None)
def cuda_available() -> bool:
    """True when the CUDA C++ module ``primaps_fast._C_cuda`` imports (built when nvcc was found at
    install time)."""
    try:
        from primaps_fast import _C_cuda  # noqa: F401
    except ImportError:
        return False
    return True


def cuda_module():
    """The compiled CUDA module ``primaps_fast._C_cuda``; a clear error when it was not built."""
    if not cuda_available():
        raise RuntimeError(_missing_build(
            "primaps_fast._C_cuda", "its CUDA module",
            "backend='cuda' needs nvcc (the CUDA toolkit) at install time; reinstall with it on the PATH "
            "or use backend='triton'"))
    from primaps_fast import _C_cuda

    return _C_cuda


# The kernel of every op for every fast backend, as "module:function" under primaps_fast, imported on first
# use (Triton only when its backend runs). All backends of an op take the same validated arguments, which
# the op prepares once; the reference backend (the oracle, on the raw inputs) is reached through
# reference() instead. A new backend of an op is its module and one line here.
KERNELS = {
    # (features (B, C, h, w) float, threshold, stop_fraction, max_masks) -> owner, value, counts
    "principal_masks": {"cpu": "ops.principal_masks:principal_masks_cpu",
                        "cuda": "cuda.principal_masks:principal_masks_cuda",
                        "triton": "triton.principal_masks:principal_masks_triton"},
    # (masks (..., h, w) float) -> float32 medians
    "median_filter": {"cpu": "ops.median_filter:median_filter_op", "cuda": "ops.median_filter:median_filter_op",
                      "triton": "triton.median_filter:median_filter_triton"},
    # proposals (B, M, h, w) and counts -> (B, H, W) ids (median filter, background, upsampling, arg-max) ...
    "mask_labels": {"cpu": "ops.pseudo_labels:mask_labels_cpu", "cuda": "cuda.pseudo_labels:mask_labels_cuda",
                    "triton": "triton.pseudo_labels:mask_labels_triton"},
    # ... or (B, M + 1, H, W) probabilities for the CRF
    "mask_probs": {"cpu": "ops.pseudo_labels:mask_probs_cpu", "cuda": "cuda.pseudo_labels:mask_probs_cuda",
                   "triton": "triton.pseudo_labels:mask_probs_triton"},
    # (images, probs, **CRF parameters) -> marginals; the CUDA backend has no CRF of its own: Triton's runs
    "dense_crf_list": {"cpu": "ops.dense_crf:dense_crf_cpu", "cuda": "triton.dense_crf:dense_crf_triton",
                       "triton": "triton.dense_crf:dense_crf_triton"},
    # (float32 logits, int64 ids, num_ids, ignore) -> majority classes
    "assign_pseudo_labels": {"cpu": "ops.assign_pseudo_labels:_assign_pseudo_labels_op",
                             "cuda": "ops.assign_pseudo_labels:_assign_pseudo_labels_op",
                             "triton": "triton.assign_pseudo_labels:assign_pseudo_labels_triton"},
    # (logits, target, gamma, ignore_index, class_stats) -> loss
    "focal_loss": {"cpu": "ops.focal_loss:focal_loss_kernel", "cuda": "ops.focal_loss:focal_loss_kernel",
                   "triton": "triton.focal_loss:focal_loss_triton"},
    # (float32 logits, H, W) -> float64 (B, K) sums of the upsampled softmax (focal_loss's class_stats)
    "focal_confidence": {"cpu": "ops.focal_loss:confidence_sums_cpu", "cuda": "cuda.focal_loss:confidence_sums_cuda"},
}


@functools.lru_cache(maxsize=None)
def kernel(op: str, backend: str):
    """The kernel of ``op`` for the fast ``backend`` (``KERNELS``), imported on first use."""
    module, name = KERNELS[op][backend].split(":")
    return getattr(importlib.import_module("primaps_fast." + module), name)


def reference(name: str):
    """``primaps_fast.reference.<name>``, resolved by name at call time.

    The reference is the oracle of the tests and the baseline of the benchmarks: it imports nothing from
    the fast paths so that it checks them independently, and no production module imports it. The
    public API still offers ``backend="reference"``; this is the one place that reaches it.
    """
    return getattr(importlib.import_module("primaps_fast.reference"), name)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when Triton imports and can launch: a CUDA device, or ``TRITON_INTERPRET=1`` (CPU)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def choose_backend(backend: str | None, *tensors: torch.Tensor) -> str:
    """Resolve ``backend`` for inputs on the device of ``tensors`` (all on one device)."""
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    if len(devices) > 1:
        raise ValueError(f"inputs are on different devices: {sorted(map(str, devices))}")
    device = devices.pop() if devices else torch.device("cpu")
    if backend is None:
        if device.type != "cuda":
            return "cpu"
        return "cuda" if cuda_available() else "triton"
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
        cuda_module()
    if backend == "triton" and not triton_available():
        raise RuntimeError(
            "backend='triton' needs the triton package and a CUDA device "
            "(or TRITON_INTERPRET=1 to run the kernels on the CPU for testing)"
        )
    return backend


def skip_dynamo_import(op) -> None:
    """Let eager calls of the torch custom op ``op`` skip the import of ``torch._dynamo`` (~2 s).

    ``torch.library.custom_op`` wraps each kernel in ``torch._disable_dynamo``, whose first call imports
    ``torch._dynamo`` to build a wrapper that keeps Dynamo from tracing into the kernel, even in a program
    that compiles nothing. While ``torch._dynamo`` is not imported nothing can be tracing, so the kernel
    itself is called; from the first call after something imported it (``torch.compile``), torch's own
    wrapper takes over. The wrapper caches its result on the kernel under ``__dynamo_disable``: this
    pre-fills that cache, only when the wrapper's code is the one expected (else nothing changes and
    the import is paid, as before).
    """
    for wrapper in getattr(op, "_backend_fns", {}).values():
        kernel = getattr(wrapper, "__wrapped__", None)
        code = getattr(wrapper, "__code__", None)
        if kernel is None or code is None or "__dynamo_disable" not in code.co_consts:
            continue

        def eager(*args, _kernel=kernel, _wrapper=wrapper, **kwargs):
            if "torch._dynamo" not in sys.modules:
                return _kernel(*args, **kwargs)
            _kernel.__dict__.pop("__dynamo_disable", None)  # torch's wrapper builds the real one
            return _wrapper(*args, **kwargs)

        setattr(kernel, "__dynamo_disable", eager)


def num_threads() -> int:
    """Threads for the C++ kernels: torch's intra-op setting, so one knob controls both."""
    return max(1, torch.get_num_threads())


DEVICE_TYPES = ("cpu", "cuda")

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def check_device(device, name: str) -> torch.device:
    """``device`` (a ``torch.device`` or its name) as a ``torch.device``, if its type is supported.

    Every op runs on CPU and CUDA tensors only: ``meta`` tensors (no data), ``mps``, ``xpu``, ... get this
    message instead of an error from deep inside a kernel or a data-dependent check.
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{name}: not a device: {device!r} ({exc})") from None
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"{name}: {device.type} tensors are not supported; primaps_fast runs on "
                         f"{' and '.join(t.upper() for t in DEVICE_TYPES)} tensors")
    return device


def check_int(value, name: str, *, lo: int = INT64_MIN, hi: int = INT64_MAX) -> int:
    """``value`` as an int in ``[lo, hi]`` (default: what an int64 kernel argument holds); ``TypeError``
    for a non-int (bool and float included: ``inf`` and ``1.5`` are not ints), ``ValueError`` outside."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name}: expected an int in [{lo}, {hi}], got {value}")
    return int(value)


def check_number(value, name: str, *, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False) -> float:
    """``value`` (an int or a float, not a bool) as a finite float in ``[lo, hi]`` (``(lo, hi]`` when
    ``lo_open``); ``TypeError`` for another type, ``ValueError`` otherwise (ints too large for a float
    included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    try:
        x = float(value)
    except OverflowError:
        x = math.inf
    if not (math.isfinite(x) and (x > lo if lo_open else x >= lo) and x <= hi):
        # an infinite bound is never included (only finite numbers are accepted)
        interval = f"{'(' if lo_open or lo == -math.inf else '['}{lo:g}, {hi:g}{']' if hi < math.inf else ')'}"
        raise ValueError(f"{name}: expected a finite number in {interval}, got {value!r}")
    return x


def device_memory(device: torch.device) -> int:
    """Bytes of memory of ``device``: the machine's RAM for the CPU, the GPU's memory for CUDA."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 1 << 40


def check_memory(nbytes: int, name: str, what: str, device=torch.device("cpu")) -> None:
    """Refuse (``ValueError`` naming ``name``) a computation whose ``what`` needs ``nbytes`` bytes, more
    than the memory of ``device``: a clear message before the allocation, not a MemoryError or an abort."""
    total = device_memory(torch.device(device))
    if nbytes > total:
        raise ValueError(f"{name}: {what} needs {nbytes / 2 ** 30:.1f} GiB, more than the "
                         f"{total / 2 ** 30:.1f} GiB of memory of this {torch.device(device).type.upper()} "
                         "device")


def check_tensor(x, name: str, *, ndim=None, floating=False, integer=False, finite=False,
                 nonempty=True) -> torch.Tensor:
    """Validate one input tensor; every message starts with ``name``.

    The device must be CPU or CUDA (``check_device``). ``ndim`` may be an int or a tuple of accepted
    ranks. ``floating``/``integer`` require a dtype kind (``TypeError`` otherwise). ``finite`` rejects
    NaN/Inf. ``nonempty`` rejects zero-size tensors.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    check_device(x.device, name)
    if ndim is not None:
        ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in ranks:
            want = " or ".join(str(r) for r in ranks)
            raise ValueError(f"{name}: expected {want} dimensions, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    if integer and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise TypeError(f"{name}: expected an integer tensor, got {x.dtype}")
    if nonempty and x.numel() == 0:
        raise ValueError(f"{name}: empty tensor of shape {tuple(x.shape)}")
    if finite and x.is_floating_point() and not all_finite(x):
        raise ValueError(f"{name}: contains NaN or Inf")
    return x


def all_finite(x: torch.Tensor) -> bool:
    """No element of the floating-point tensor ``x`` is NaN or +-inf: one min/max pass (a NaN propagates to
    both), a fraction of the cost of ``torch.isfinite(x).all()``."""
    if x.numel() == 0:
        return True
    return bool(torch.isfinite(torch.stack(torch.aminmax(x.detach()))).all())


def as_buffer(x: torch.Tensor, dtype=torch.float32):
    """A C-contiguous numpy view (no copy when already contiguous ``dtype`` on the CPU)."""
    return x.detach().to(device="cpu", dtype=dtype).contiguous().numpy()
