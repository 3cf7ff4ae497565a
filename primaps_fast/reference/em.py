"""Reference PriMaPs-EM training: a plain-PyTorch port of the official ``train.py`` flow.

- ``pca_prototypes``: the official ``pcainit`` (``torch.pca_lowrank(q=2K, niter=200)`` on the raw,
  centred pixel features, first K right singular vectors), with the sign of every direction fixed so
  that its largest-magnitude entry is positive (``pca_lowrank``'s sign is arbitrary).
- ``kmeans_prototypes``: the official baseline stage (``ConvClusterProbe`` + ``ClusterLoss``): cosine
  scores of L2-normalised features with ``v / |v|``, loss ``-mean(max_k score)``, Adam on ``v``.
- ``PriMaPsEM``: the official ``training_step`` of the ``method`` state: a weight-normalised 1x1 conv
  head (``g (K,)``, ``v (K, C)``, weight ``g * v / |v|`` per row), its EMA copy for the E-step on
  features upsampled to the label size, the focal loss on the head's scores of the upsampled (student)
  features, Adam, and the EMA update with the official warm-up schedule. Slow (it materialises the
  upsampled features) on purpose: it is the baseline of the benchmark and the oracle of the tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from primaps_fast.reference.assign_pseudo_labels import assign_pseudo_labels
from primaps_fast.reference.focal_loss import focal_loss


def _fix_signs(directions: torch.Tensor) -> torch.Tensor:
    """Flip each row so that its entry of largest magnitude (first on ties) is positive."""
    idx = directions.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(directions.gather(1, idx))
    sign[sign == 0] = 1
    return directions * sign


def pca_prototypes(features: torch.Tensor, num_classes: int, *, seed: int = 0) -> torch.Tensor:
    """``(K, C)`` official PCA init of ``(N, C, h, w)`` features (rows: principal directions)."""
    x = features.permute(1, 0, 2, 3).reshape(features.shape[1], -1).t().float()
    gen_state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        _, _, v = torch.pca_lowrank(x, q=2 * num_classes, niter=200)
    finally:
        torch.set_rng_state(gen_state)
    return _fix_signs(v[:, :num_classes].t().contiguous())


def weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Effective weight of ``nn.utils.weight_norm(dim=0)`` on a ``(K, C)`` 1x1 conv: ``g * v / |v|``."""
    return g[:, None] * v / v.norm(dim=1, keepdim=True)


def kmeans_prototypes(batches, init: torch.Tensor, *, epochs: int = 2, lr: float = 5e-3) -> torch.Tensor:
    """Official cosine k-means (``ClusterLoss`` + Adam) over ``batches`` of ``(B, C, h, w)`` features,
    ``epochs`` passes, from the prototypes ``init``; returns the final ``v`` ``(K, C)``."""
    v = init.detach().clone().float().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    for _ in range(epochs):
        for feats in batches:
            opt.zero_grad()
            x = F.normalize(feats.float(), dim=1)
            scores = F.conv2d(x, (v / v.norm(dim=1, keepdim=True))[:, :, None, None])
            hard = F.one_hot(scores.argmax(1), scores.shape[1]).permute(0, 3, 1, 2).to(torch.float64)
            loss = -(hard * scores).sum(1).mean()
            loss.backward()
            opt.step()
    return v.detach()


class PriMaPsEM:
    """The official PriMaPs-EM head, EMA copy and ``training_step`` (method state)."""

    def __init__(self, num_classes: int, dim: int, *, lr: float = 5e-3, ema_decay: float = 0.98,
                 ema_every: int = 10, focal_gamma: float = 2.0, ignore_index: int = 255):
        self.num_classes, self.dim = num_classes, dim
        self.lr, self.ema_decay, self.ema_every = lr, ema_decay, ema_every
        self.focal_gamma, self.ignore_index = focal_gamma, ignore_index
        self.init_prototypes(torch.randn(num_classes, dim))

    def init_prototypes(self, prototypes: torch.Tensor) -> None:
        self.v = prototypes.detach().clone().float().requires_grad_(True)
        self.g = torch.ones(self.num_classes, requires_grad=True)
        self.ema_g, self.ema_v = self.g.detach().clone(), self.v.detach().clone()
        self.opt = torch.optim.Adam([self.v, self.g], lr=self.lr)
        self.global_step = 0
        self.ema_calls = 0

    def weight(self, ema: bool = False) -> torch.Tensor:
        if ema:
            return weight_norm(self.ema_g, self.ema_v)
        return weight_norm(self.g, self.v).detach()

    def _ema_update(self) -> None:
        n = self.ema_calls
        self.ema_calls += 1
        if n <= 1:
            self.ema_g.copy_(self.g.detach())
            self.ema_v.copy_(self.v.detach())
            return
        # official ema.py (update_after_step=0): the n-th call increments its step to n + 1 first, then
        # uses decay 1 - (1 + (step - 1)) ** -1 = 1 - 1 / (n + 1), capped at beta
        decay = min(self.ema_decay, 1 - 1 / (n + 1))
        self.ema_g.lerp_(self.g.detach(), 1 - decay)
        self.ema_v.lerp_(self.v.detach(), 1 - decay)

    def step(self, features: torch.Tensor, mask_ids: torch.Tensor, student_features=None) -> dict:
        size = tuple(mask_ids.shape[-2:])
        self.opt.zero_grad()
        with torch.no_grad():
            up = F.interpolate(features.float(), size, mode="bilinear", align_corners=False)
            ema_scores = F.conv2d(up, self.weight(ema=True)[:, :, None, None])
            labels = assign_pseudo_labels(ema_scores, mask_ids, ignore_index=self.ignore_index)
            if student_features is not None:
                up = F.interpolate(student_features.float(), size, mode="bilinear", align_corners=False)
        scores = F.conv2d(up, weight_norm(self.g, self.v)[:, :, None, None])
        loss = focal_loss(scores, labels, gamma=self.focal_gamma, ignore_index=self.ignore_index)
        loss.backward()
        self.opt.step()
        k = self.global_step
        if k > 0 and k % self.ema_every == 0:
            self._ema_update()
        self.global_step += 1
        return {"loss": float(loss.detach()), "labels": labels}
