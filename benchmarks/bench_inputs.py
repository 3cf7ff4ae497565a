"""Inputs shared by several benchmark files, built once per session."""
import functools

import torch
import torch.nn.functional as F

from primaps_fast import reference

# PriMaPs-EM kernels: a batch of 8 with 27 classes, 40x40 scores -> 320x320 labels (the official
# Cityscapes setting).
EM_B, EM_K, EM_h, EM_H = 8, 27, 40, 320


@functools.lru_cache(maxsize=None)
def em_inputs():
    """``(logits (B, K, h, h), mask_ids (B, H, H) with ~12 masks per image and 10 % unassigned, target)``,
    ``target`` the reference E-step labels of the masks."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(EM_B, EM_K, EM_h, EM_h, generator=g)
    coarse = torch.randint(0, 12, (EM_B, 1, 8, 8), generator=g).float()
    mask_ids = F.interpolate(coarse, (EM_H, EM_H), mode="nearest").long().squeeze(1)
    mask_ids[torch.rand(EM_B, EM_H, EM_H, generator=g) < 0.1] = 255
    target = reference.assign_pseudo_labels(logits, mask_ids)
    return logits, mask_ids, target


def on_device(provider, *tensors):
    """The tensors on the provider's device (CUDA for the GPU backends)."""
    return [t.cuda() for t in tensors] if provider in ("triton", "cuda") else list(tensors)
