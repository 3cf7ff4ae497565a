"""Triton backend of focal_loss: two kernels that recompute the bilinearly upsampled scores of all classes
from the 4 source taps (no (B, K, H, W) tensor): per-block sums of the softmax over blocks of output pixels
(the class weights), then one program per source cell that gathers the weighted cross-entropy gradient of
the output pixels whose taps include it, in a fixed order: no atomics, the same bits on every run (each
output pixel is visited by the up to 4 cells it taps; its loss is added by the first of them). CUDA; runs
on the CPU with TRITON_INTERPRET=1."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from primaps_fast.common import class_weights
from primaps_fast.triton.bilinear import bilinear_sample, bilinear_taps, source_scale


@triton.jit
def _upsampled_tile(x_ptr, b, K, h, w, H, W, scale_y, scale_x, offs, BLOCK_K: tl.constexpr):
    """Upsampled scores ``(BLOCK, BLOCK_K)`` (-inf outside), the taps and the masks of one pixel block."""
    inside = offs < H * W
    y = offs // W
    x = offs % W
    y0, y1, hy0, hy1 = bilinear_taps(y, scale_y, h, H)
    x0, x1, wx0, wx1 = bilinear_taps(x, scale_x, w, W)
    k = tl.arange(0, BLOCK_K)
    kin = k < K
    m = inside[:, None] & kin[None, :]
    plane = x_ptr + b * K * h * w + k[None, :] * h * w
    up = bilinear_sample(plane, y0[:, None], y1[:, None], x0[:, None], x1[:, None], hy0[:, None], hy1[:, None],
                         wx0[:, None], wx1[:, None], w, m)
    up = tl.where(kin[None, :], up, float("-inf"))
    return up, inside, m, k, y0, y1, x0, x1, hy0, hy1, wx0, wx1


@triton.jit
def _softmax(up):
    e = tl.exp(up - tl.max(up, axis=1)[:, None])
    z = tl.sum(e, axis=1)
    return e / z[:, None], z


@triton.jit
def _confidence_kernel(x_ptr, part_ptr, K, h, w, H, W, scale_y, scale_x,
                       BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    up, inside, m, k, _, _, _, _, _, _, _, _ = _upsampled_tile(x_ptr, b, K, h, w, H, W, scale_y, scale_x,
                                                               offs, BLOCK_K)
    p, _ = _softmax(up)
    p = tl.where(m, p, 0.0)
    tl.store(part_ptr + (b * tl.num_programs(1) + blk) * BLOCK_K + k, tl.sum(p, axis=0))


@triton.jit
def _loss_grad_kernel(x_ptr, t_ptr, wt_ptr, loss_ptr, grad_ptr, K, h, w, H, W, scale_y, scale_x, inv_sy, inv_sx,
                      ignore_index, inv_n, WITH_GRAD: tl.constexpr, BLOCK_X: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """Program (b, cell): the gradient of the mean weighted CE w.r.t. x[b, :, iy, ix], and the CE of the output
    pixels whose first taps are (iy, ix), summed into loss[b, cell]."""
    b = tl.program_id(0)
    cell = tl.program_id(1)
    iy = cell // w
    ix = cell % w
    # output rows and columns that may tap this cell (a superset: each pixel is checked with its exact taps)
    ylo = tl.maximum(tl.floor((iy.to(tl.float32) - 0.5) * inv_sy - 0.5).to(tl.int32) - 1, 0)
    yhi = tl.minimum(tl.ceil((iy.to(tl.float32) + 1.5) * inv_sy - 0.5).to(tl.int32) + 1, H)
    xlo = tl.maximum(tl.floor((ix.to(tl.float32) - 0.5) * inv_sx - 0.5).to(tl.int32) - 1, 0)
    xhi = tl.minimum(tl.ceil((ix.to(tl.float32) + 1.5) * inv_sx - 0.5).to(tl.int32) + 1, W)
    xc = xlo + tl.arange(0, BLOCK_X)
    grad = tl.zeros((BLOCK_K,), dtype=tl.float32)
    loss = tl.zeros((BLOCK_X,), dtype=tl.float32)
    for yy in range(ylo, yhi):
        offs = tl.where(xc < xhi, yy * W + xc, H * W)  # H * W: outside the image, masked
        up, inside, m, k, y0, y1, x0, x1, hy0, hy1, wx0, wx1 = _upsampled_tile(
            x_ptr, b, K, h, w, H, W, scale_y, scale_x, offs, BLOCK_K)
        t = tl.load(t_ptr + b * H * W + offs, mask=inside, other=ignore_index)
        valid = inside & (t != ignore_index)
        tc = tl.where(valid, t, 0)
        wt = tl.load(wt_ptr + tc, mask=valid, other=0.0)
        p, z = _softmax(up)
        mx = tl.max(up, axis=1)
        up_t = tl.sum(tl.where(k[None, :] == tc[:, None], up, 0.0), axis=1)
        loss += tl.where(valid & (y0 == iy) & (x0 == ix), wt * (mx + tl.log(z) - up_t), 0.0)
        if WITH_GRAD:
            tap = (tl.where(y0 == iy, hy0, 0.0) + tl.where(y1 == iy, hy1, 0.0)) * \
                (tl.where(x0 == ix, wx0, 0.0) + tl.where(x1 == ix, wx1, 0.0))
            onehot = (k[None, :] == tc[:, None]).to(tl.float32)
            g = (wt * tap)[:, None] * (p - onehot)
            grad += tl.sum(tl.where(m & valid[:, None], g, 0.0), axis=0)
    tl.store(loss_ptr + b * h * w + cell, tl.sum(loss, axis=0))
    if WITH_GRAD:
        k = tl.arange(0, BLOCK_K)
        tl.store(grad_ptr + (b * K + k) * h * w + cell, grad * inv_n, mask=k < K)


_BLOCK = 64


class _FocalLossTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, gamma, ignore_index, class_stats):
        x = logits.detach().to(torch.float32).contiguous()
        t = target.to(torch.int64).contiguous()
        B, K, h, w = x.shape
        H, W = t.shape[-2:]
        n = B * H * W
        block_k = triton.next_power_of_2(K)
        grid = (B, triton.cdiv(H * W, _BLOCK))
        sy, sx = source_scale(h, H), source_scale(w, W)
        part = torch.empty(B, grid[1], block_k, dtype=torch.float32, device=x.device)
        _confidence_kernel[grid](x, part, K, h, w, H, W, sy, sx, BLOCK=_BLOCK, BLOCK_K=block_k)
        sums = part[..., :K].double().sum(1)
        if class_stats is not None:  # a batch split across calls: its statistics and pixel count
            sums, n = class_stats(sums, n)
        weight = class_weights(sums, n, gamma).contiguous()
        loss = torch.empty(B, h * w, dtype=torch.float32, device=x.device)
        with_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(x) if with_grad else x  # never written without WITH_GRAD
        # the widest window of output columns a cell's program visits (see _loss_grad_kernel)
        block_x = triton.next_power_of_2(int(math.ceil(2 * W / w)) + 4)
        _loss_grad_kernel[(B, h * w)](x, t, weight, loss, grad, K, h, w, H, W, sy, sx, H / h, W / w, ignore_index,
                                      1.0 / n, WITH_GRAD=with_grad, BLOCK_X=block_x, BLOCK_K=block_k)
        if with_grad:
            ctx.save_for_backward(grad)
        return (loss.double().sum() / n).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output).to(grad_output.dtype), None, None, None, None


def focal_loss_triton(logits: torch.Tensor, target: torch.Tensor, gamma: float, ignore_index: int,
                      class_stats=None) -> torch.Tensor:
    """focal_loss on validated inputs (``target`` ids in ``[0, K)`` or ``ignore_index``); differentiable.
    ``class_stats``: as ``focal_loss``'s (checked by it)."""
    return _FocalLossTriton.apply(logits, target, gamma, ignore_index, class_stats)
