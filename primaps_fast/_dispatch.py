"""Input validation and backend choice, shared by every op.

Every public op takes ``backend=None`` (auto: C++ for CPU tensors, Triton for CUDA tensors) or one of
``"cpu"``, ``"triton"``, ``"reference"``. Validation errors are ``ValueError``/``TypeError`` whose
message starts with the argument's name.
"""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("cpu", "triton", "reference")


@functools.lru_cache(maxsize=None)
def cpp():
    """The compiled module ``primaps_fast._C``; a clear error when the package was not built."""
    try:
        from primaps_fast import _C
    except ImportError as exc:  # pragma: no cover - only on a broken install
        raise RuntimeError(
            "primaps_fast was not built with its C++ extension (primaps_fast._C is missing): "
            "reinstall with `pip install .` from the source tree"
        ) from exc
    return _C


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
        return "triton" if device.type == "cuda" else "cpu"
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if backend == "triton" and not triton_available():
        raise RuntimeError(
            "backend='triton' needs the triton package and a CUDA device "
            "(or TRITON_INTERPRET=1 to run the kernels on the CPU for testing)"
        )
    return backend


def num_threads() -> int:
    """Threads for the C++ kernels: torch's intra-op setting, so one knob controls both."""
    return max(1, torch.get_num_threads())


def check_tensor(x, name: str, *, ndim=None, floating=False, integer=False, finite=False,
                 nonempty=True) -> torch.Tensor:
    """Validate one input tensor; every message starts with ``name``.

    ``ndim`` may be an int or a tuple of accepted ranks. ``floating``/``integer`` require a dtype
    kind (``TypeError`` otherwise). ``finite`` rejects NaN/Inf. ``nonempty`` rejects zero-size
    tensors.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
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
    if finite and x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN or Inf")
    return x


def as_buffer(x: torch.Tensor, dtype=torch.float32):
    """A C-contiguous numpy view (no copy when already contiguous ``dtype`` on the CPU)."""
    return x.detach().to(device="cpu", dtype=dtype).contiguous().numpy()
