"""CUDA backend of principal_masks (``csrc/cuda/principal_masks.cu``): the whole batch in one launch, one
thread block per image running its whole proposal loop. This launcher prepares what the kernel starts
from with torch on the features' device: the normalised features, the features minus the image mean, and
the first scatter matrix ``y y^T`` (a batched float64 GEMM), plus the workspaces."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from primaps_fast._dispatch import cuda_module
from primaps_fast.common import scaled_float32
from primaps_fast.cuda import launch_context


def principal_masks_cuda(features, threshold, stop_fraction, max_masks):
    """features (B, C, h, w) float on a CUDA device (each image scaled by its power of two here, as in
    every backend) -> owner (B, h, w) int64, value (B, h, w) float32, counts (B,) int64 (the
    disjoint-proposal form that ops.principal_masks stacks; same as ``principal_masks_triton``)."""
    features = scaled_float32(features).contiguous()
    B, C, h, w = features.shape
    N = h * w
    dev = features.device
    x = features.reshape(B, C, N)
    fn = F.normalize(x, dim=1).contiguous()
    x_mean = x.double().mean(-1)
    y = (x.double() - x_mean[:, :, None]).float().contiguous()  # as the C++ kernel: float32 shifted features
    yd = y.double()
    S = torch.bmm(yd, yd.transpose(1, 2))  # the first scatter; the kernel downdates it symmetrically
    S = (0.5 * (S + S.transpose(1, 2))).contiguous()  # exactly symmetric, or the residual test can stall
    sums = yd.sum(-1).contiguous()
    del yd
    ext = cuda_module()
    n_double, n_float = ext.principal_masks_workspace(C, N)
    work = torch.empty(B, n_double, dtype=torch.float64, device=dev)
    fwork = torch.empty(B, n_float, dtype=torch.float32, device=dev)
    idx = torch.empty(B, N, dtype=torch.int32, device=dev)
    remaining = torch.ones(B, N, dtype=torch.uint8, device=dev)
    owner = torch.full((B, N), -1, dtype=torch.int64, device=dev)
    value = torch.zeros(B, N, dtype=torch.float32, device=dev)
    counts = torch.empty(B, dtype=torch.int64, device=dev)
    device, stream = launch_context(features)
    ext.principal_masks(fn.data_ptr(), y.data_ptr(), x_mean.data_ptr(), S.data_ptr(), sums.data_ptr(),
                        work.data_ptr(), fwork.data_ptr(), idx.data_ptr(), remaining.data_ptr(),
                        owner.data_ptr(), value.data_ptr(), counts.data_ptr(), B, C, N, float(threshold),
                        float(stop_fraction), -1 if max_masks is None else int(max_masks), device, stream)
    return owner.view(B, h, w), value.view(B, h, w), counts
