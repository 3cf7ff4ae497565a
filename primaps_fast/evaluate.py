"""Evaluation of a PriMaPs-EM model over a dataset: predictions (optionally refined by the dense CRF, as the
official ``test.py``) and the official metrics (Hungarian-matched mIoU and pixel accuracy), from a feature
cache; ``run`` also writes ``results.json`` and a labelled ``confusion.png``.

Under ``torchrun`` (``primaps_fast.distributed``) each rank predicts its round-robin share of the batches
and the confusion matrices are summed across ranks (integers: the results equal one process's exactly);
rank 0 reads the checkpoint, prints and writes."""
from __future__ import annotations

import os

import numpy as np
import torch

from primaps_fast import distributed, fileio

# --head choices: which head's predictions are evaluated, and their names in tables and results.json
HEADS = {"ema": [("theta_M (EMA head)", True)], "head": [("theta_R (head)", False)],
         "both": [("theta_M (EMA head)", True), ("theta_R (head)", False)]}


def predict(em, features, size, *, use_ema: bool = True, crf_images=None, crf_iterations: int = 10,
            backend=None) -> torch.Tensor:
    """Class ids ``(B, H, W)`` at ``size``; with ``crf_images`` (uint8 BGR ``(B, 3, H, W)``, as the official
    CRF sees them) refined by the dense CRF on the head's scores (upsampled inside ``dense_crf``)."""
    if crf_images is None:
        return em.predict(features, size=size, use_ema=use_ema)
    import primaps_fast

    q = primaps_fast.dense_crf(crf_images, em.scores(features, use_ema), iterations=crf_iterations,
                               backend=backend)
    return q.argmax(1)


def evaluate_batches(batches, num_classes: int) -> dict:
    """``batches`` yields ``(preds, target)``; returns ``UnsupervisedMetrics(num_classes).compute()``: the
    official ``mIoU``, ``Accuracy`` and ``class_iou`` (percent), the matched ``confusion`` matrix
    (rows = classes) and ``mapping[cluster] = class``."""
    from primaps_fast.metrics import UnsupervisedMetrics

    metrics = UnsupervisedMetrics(num_classes)
    for preds, target in batches:
        metrics.update(preds, target)
    return metrics.compute()


def evaluate_cache(em, cache, *, heads: str = "both", crf_dataset=None, batch_size: int = 16, backend=None,
                   show_progress: bool = True) -> dict:
    """``{name: metrics}`` of the heads ``heads`` (a key of ``HEADS``) on a complete feature cache, at the
    cache's resolution; with ``crf_dataset`` (the cache's dataset, for its images) also with the CRF.
    In a process group each rank predicts its share and the confusion matrices are summed."""
    from primaps_fast.metrics import UnsupervisedMetrics
    from primaps_fast.ops.pseudo_labels import crf_images

    S = cache.manifest["resolution"]
    mine = distributed.round_robin(range(0, len(cache), batch_size))
    results = {}
    for crf in ([False, True] if crf_dataset is not None else [False]):
        for name, use_ema in HEADS[heads]:
            label = name + (" + CRF" if crf else "")
            metrics = UnsupervisedMetrics(em.num_classes)
            with distributed.SharedProgress("eval", desc=label, total=len(cache), unit="img",
                                            enabled=show_progress and crf) as bar:
                for start in mine:
                    idx = list(range(start, min(start + batch_size, len(cache))))
                    feats = cache.get_features(idx)
                    images = crf_images(torch.stack([crf_dataset[i][0] for i in idx])) if crf else None
                    metrics.update(predict(em, feats, (S, S), use_ema=use_ema, crf_images=images, backend=backend),
                                   cache.get_labels(idx))
                    bar.add(len(idx))
            distributed.all_reduce_sum([metrics.stats], f"eval: confusion matrix of {label}")
            results[label] = metrics.compute()
    return results


def _require_labels(cache) -> None:
    """Refuse a cache without ground truth (every label 255: e.g. a folder dataset without ``--labels``)
    before the checkpoint is loaded: its metrics are undefined."""
    labels = cache.labels.reshape(len(cache), -1)
    for i in range(0, len(cache), 64):  # a few MB at a time from the memory-mapped file
        if bool((np.asarray(labels[i:i + 64]) != 255).any()):
            return
    raise ValueError(f"cache: {cache.root} has no labelled pixels (every label is 255, unlabelled: its dataset "
                     "had no ground truth); `eval` needs a cache of a dataset with labels")


def run(checkpoint, cache_root, *, heads: str = "both", crf_dataset=None, num_classes: int | None = None,
        batch_size: int = 16, out=None, backend=None, log=print, show_progress: bool = True) -> dict:
    """Evaluate the checkpoint ``checkpoint`` (from ``primaps-fast train``) on the feature cache ``cache_root``
    (ideally made with flip averaging), print the table and, with ``out``, write ``results.json`` and
    ``confusion.png`` (of the first result: rows = classes, row-normalised, with the dataset's class names).
    ``crf_dataset``: the cached dataset, to add CRF-refined predictions. Returns ``{name: metrics}``."""
    from primaps_fast.data.cache import FeatureCache
    from primaps_fast.data.datasets import class_names
    from primaps_fast.pictures import confusion_png, format_table
    from primaps_fast.train import em_from_checkpoint, load_checkpoint

    if heads not in HEADS:
        raise ValueError(f"heads: expected one of {sorted(HEADS)}, got {heads!r}")
    main = distributed.is_main()
    log, show_progress = (log, show_progress) if main else (lambda msg: None, False)
    cache = FeatureCache(cache_root)
    cache.require_complete()
    _require_labels(cache)
    distributed.check_same({"heads": heads, "crf": crf_dataset is not None, "batch_size": batch_size,
                            "num_classes": num_classes, "backend": backend, "cache": cache.manifest}, "eval")
    ckpt = distributed.on_main(lambda: load_checkpoint(checkpoint, dim=cache.feature_shape[0]),
                               "eval: reading the checkpoint on rank 0")
    K = ckpt["num_classes"]
    if num_classes and num_classes != K:
        raise ValueError(f"checkpoint: {checkpoint} has num_classes={K}, not {num_classes}")
    em = em_from_checkpoint(ckpt, backend=backend)
    if crf_dataset is not None:
        crf_dataset.size = cache.manifest["resolution"]
        if crf_dataset.names != cache.names:
            raise ValueError(f"dataset: its images are not those of the cache {cache_root}")
    results = evaluate_cache(em, cache, heads=heads, crf_dataset=crf_dataset, batch_size=batch_size,
                             backend=backend, show_progress=show_progress)
    log(format_table([[k, f"{r['mIoU']:.2f}", f"{r['Accuracy']:.2f}"] for k, r in results.items()],
                     ["prediction", "mIoU (%)", "Accuracy (%)"]))
    if out and main:
        os.makedirs(out, exist_ok=True)
        first = next(iter(results))
        names = class_names(cache.manifest["dataset"]["kind"], K)
        confusion_png(os.path.join(out, "confusion.png"), results[first]["confusion"], names, title=first)
        fileio.write_json(os.path.join(out, "results.json"),
                          {k: {"mIoU": v["mIoU"], "Accuracy": v["Accuracy"],
                               # NaN (a class neither present nor predicted) is not JSON: null
                               "class_iou": [float(x) if x == x else None for x in v["class_iou"]]}
                           for k, v in results.items()})
        log(f"written {out}/results.json and confusion.png ({first}, rows = classes, row-normalised)")
    return results
