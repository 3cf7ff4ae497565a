"""The CUDA extension ``primaps_fast._C_cuda``: built whenever nvcc is available (CI has nvcc but no GPU),
importable without a GPU, and its entry points fail with clear Python errors rather than crashes."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from primaps_fast._dispatch import cuda_available, cuda_module
from primaps_fast.cuda import launch_context

from child_process import CWD, child_env

ENTRY_POINTS = ("median_filter", "assign_pseudo_labels", "focal_weights", "focal_loss_grad", "mask_logits_chunks",
                "mask_logits", "mask_labels", "mask_probs")


def nvcc_found():
    """Where setup.py looks for nvcc: $CUDA_HOME/bin, PATH, /usr/local/cuda/bin."""
    home = os.environ.get("CUDA_HOME")
    candidates = [os.path.join(home, "bin", "nvcc")] if home else []
    return any(p and os.access(p, os.X_OK) for p in candidates + [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"])


requires_extension = pytest.mark.skipif(not cuda_available(), reason="primaps_fast._C_cuda was not built")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error path of a machine without a GPU")


@pytest.mark.skipif(os.environ.get("PRIMAPS_FAST_CUDA") == "0" or not nvcc_found(),
                    reason="no nvcc (or PRIMAPS_FAST_CUDA=0): the package builds without its CUDA backend")
def test_built_when_nvcc_is_present():
    ext = cuda_module()
    assert all(callable(getattr(ext, name)) for name in ENTRY_POINTS)


@requires_extension
def test_import_and_registration_need_no_gpu():
    code = ("import torch, primaps_fast.cuda.pseudo_labels, primaps_fast.cuda.principal_masks; "
            "from primaps_fast.ops import median_filter, assign_pseudo_labels, focal_loss; "
            "assert not torch.cuda.is_available(); "
            "assert all(torch._C._dispatch_has_kernel_for_dispatch_key(f'primaps_fast::{op}', 'CUDA') "
            "for op in ('median_filter', 'assign_pseudo_labels', 'focal_loss'))")
    subprocess.run([sys.executable, "-c", code], check=True, env=child_env(CUDA_VISIBLE_DEVICES=""), cwd=CWD)


@requires_extension
def test_bad_sizes_are_value_errors_before_any_cuda_call():
    ext = cuda_module()
    with pytest.raises(ValueError, match="masks"):
        ext.median_filter(0, 0, 1, 0, 4, 0, 0)
    with pytest.raises(ValueError, match="empty"):
        ext.assign_pseudo_labels(0, 0, 0, 0, 0, 0, 3, 4, 4, 8, 8, 5, 255, 255, 0, 0)
    with pytest.raises(ValueError, match="num_ids"):
        ext.assign_pseudo_labels(0, 0, 0, 0, 0, 1, 3, 4, 4, 8, 8, 0, 255, 255, 0, 0)
    with pytest.raises(ValueError, match="empty"):
        ext.focal_weights(0, 0, 0, 1, 0, 4, 4, 8, 8, 2.0, 0, 0)
    with pytest.raises(ValueError, match="masks"):
        ext.mask_logits(0, 0, 0, 0, 0, 2, 0, 4, 4, 0, 0)
    with pytest.raises(ValueError, match="device"):
        ext.median_filter(0, 0, 1, 4, 4, -1, 0)


@requires_extension
@no_gpu
def test_kernel_without_gpu_is_a_runtime_error():
    with pytest.raises(RuntimeError, match="primaps_fast CUDA median_filter"):
        cuda_module().median_filter(0, 0, 1, 4, 4, 0, 0)


def test_launch_context_wants_one_cuda_device():
    with pytest.raises(ValueError, match="one CUDA device"):
        launch_context(torch.zeros(2), torch.zeros(3))
