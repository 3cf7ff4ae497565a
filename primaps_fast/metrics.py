"""Evaluation (docs/api.md, "Evaluation"): the official unsupervised metrics (``primaps_modules/metrics.py``:
confusion matrix, Hungarian matching of clusters to classes, mIoU and pixel accuracy in percent) and a
supervised linear probe (the official upper bound: a 1x1 conv with bias trained with cross-entropy).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from primaps_fast._dispatch import check_tensor
from primaps_fast.progress import progress


class UnsupervisedMetrics:
    """Accumulates a confusion matrix and computes the official metrics.

    Args:
        num_classes: ground-truth classes ``K`` (>= 2).
        extra_clusters: predicted clusters beyond ``K`` (cluster ids in ``[0, K + extra_clusters)``).
        hungarian: match clusters to classes with ``scipy.optimize.linear_sum_assignment`` (maximise);
            ``False``: cluster ``k`` is class ``k`` (linear probe).
    """

    def __init__(self, num_classes: int, extra_clusters: int = 0, hungarian: bool = True):
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes: must be an int >= 2, got {num_classes!r}")
        if not isinstance(extra_clusters, int) or extra_clusters < 0:
            raise ValueError(f"extra_clusters: must be an int >= 0, got {extra_clusters!r}")
        self.num_classes, self.extra_clusters, self.hungarian = num_classes, extra_clusters, bool(hungarian)
        self.reset()

    def reset(self) -> None:
        # rows: predicted cluster, columns: ground-truth class (the official ``stats``)
        self.stats = torch.zeros(self.num_classes + self.extra_clusters, self.num_classes, dtype=torch.int64)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """``preds``, ``target``: integer tensors of equal shape; targets outside ``[0, num_classes)`` are
        ignored; predictions must lie in ``[0, num_classes + extra_clusters)``."""
        check_tensor(preds, "preds", integer=True, nonempty=False)
        check_tensor(target, "target", integer=True, nonempty=False)
        if preds.shape != target.shape:
            raise ValueError(f"preds: shape {tuple(preds.shape)} differs from target's {tuple(target.shape)}")
        t = target.reshape(-1).long().cpu()
        p = preds.reshape(-1).long().cpu()
        keep = (t >= 0) & (t < self.num_classes)
        t, p = t[keep], p[keep]
        n_clusters = self.num_classes + self.extra_clusters
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= n_clusters):
            raise ValueError(f"preds: cluster ids must be in [0, {n_clusters}), got [{int(p.min())}, {int(p.max())}]")
        counts = torch.bincount(t * n_clusters + p, minlength=self.num_classes * n_clusters)
        self.stats += counts.reshape(self.num_classes, n_clusters).t()

    def compute(self) -> dict:
        """``{"mIoU", "Accuracy", "class_iou"}`` in percent (mIoU averages the classes with a defined IoU),
        plus ``"mapping"`` (int64 numpy ``(clusters,)``: the class each predicted cluster is matched to) and
        ``"confusion"`` (int64 numpy ``(K, K)``: rows = ground-truth class, columns = matched prediction)."""
        from scipy.optimize import linear_sum_assignment

        stats = self.stats
        if self.hungarian:
            rows, cols = linear_sum_assignment(stats.numpy(), maximize=True)
            mapping = np.zeros(stats.shape[0], dtype=np.int64)
            if self.extra_clusters == 0:
                histogram = stats[np.argsort(cols), :]
                mapping[rows] = cols
            else:
                _, cols_t = linear_sum_assignment(stats.t().numpy(), maximize=True)
                histogram = stats[torch.as_tensor(cols_t), :].clone()
                mapping[cols_t] = np.arange(self.num_classes)
                for i in sorted(set(range(stats.shape[0])) - set(cols_t.tolist())):
                    best = int(stats[i, :].argmax())
                    histogram[best] += stats[i, :]
                    mapping[i] = best
        else:
            histogram = stats[:self.num_classes]
            mapping = np.arange(stats.shape[0], dtype=np.int64)
        tp = torch.diag(histogram)
        fp = histogram.sum(0) - tp
        fn = histogram.sum(1) - tp
        iou = tp / (tp + fp + fn)
        acc = tp.sum() / histogram.sum()
        return {"mIoU": 100 * iou[~torch.isnan(iou)].mean().item(), "Accuracy": 100 * acc.item(),
                "class_iou": (100 * iou).tolist(), "mapping": mapping, "confusion": histogram.t().numpy()}


def linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, eval_features=None,
                 eval_labels=None, epochs: int = 50, lr: float = 5e-3, batch_size: int = 8,
                 ignore_index: int = 255, seed: int = 0, show_progress: bool = False) -> dict:
    """Supervised linear probe (the official upper bound): a 1x1 conv with bias on ``features``
    ``(N, C, h, w)``, its scores bilinearly upsampled to the label size, trained by Adam with
    cross-entropy against ``labels`` ``(N, H, W)`` (``ignore_index`` / ids outside ``[0, K)`` ignored),
    then evaluated on ``eval_features``/``eval_labels`` (default: the training data) with
    ``UnsupervisedMetrics(hungarian=False)`` (official ``--linear-lr`` 5e-3). Returns the metrics dict plus
    ``"loss"`` (mean training loss of the last epoch)."""
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes: must be an int >= 2, got {num_classes!r}")
    f = check_tensor(features, "features", ndim=4, floating=True, finite=True).float()
    y = check_tensor(labels, "labels", ndim=3, integer=True).long()
    if f.shape[0] != y.shape[0]:
        raise ValueError(f"labels: batch size {y.shape[0]} differs from features' {f.shape[0]}")
    ef = f if eval_features is None else check_tensor(eval_features, "eval_features", ndim=4, floating=True,
                                                      finite=True).float()
    ey = y if eval_labels is None else check_tensor(eval_labels, "eval_labels", ndim=3, integer=True).long()
    if ef.shape[0] != ey.shape[0] or ef.shape[1] != f.shape[1]:
        raise ValueError("eval_features: batch or channel size does not match eval_labels / features")
    y = torch.where((y >= 0) & (y < num_classes), y, torch.full_like(y, ignore_index))
    gen = torch.Generator().manual_seed(seed)
    probe = torch.nn.Conv2d(f.shape[1], num_classes, 1)
    with torch.no_grad():
        bound = 1 / f.shape[1] ** 0.5
        probe.weight.uniform_(-bound, bound, generator=gen)
        probe.bias.uniform_(-bound, bound, generator=gen)
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    n = f.shape[0]
    last = float("nan")
    for _ in progress(range(epochs), "linear probe", unit="epoch", enabled=show_progress):
        order = torch.randperm(n, generator=gen)
        losses = []
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            opt.zero_grad()
            up = F.interpolate(probe(f[idx]), tuple(y.shape[-2:]), mode="bilinear", align_corners=False)
            loss = F.cross_entropy(up, y[idx], ignore_index=ignore_index, reduction="none").mean()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        last = sum(losses) / len(losses)
    metrics = UnsupervisedMetrics(num_classes, hungarian=False)
    with torch.no_grad():
        for i in range(0, ef.shape[0], batch_size):
            up = F.interpolate(probe(ef[i:i + batch_size]), tuple(ey.shape[-2:]), mode="bilinear",
                               align_corners=False)
            metrics.update(up.argmax(1), ey[i:i + batch_size])
    return {**metrics.compute(), "loss": last}
