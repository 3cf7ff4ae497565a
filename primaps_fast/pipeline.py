"""The user-facing pipeline around the kernels: PriMaPs-EM training with checkpoints, evaluation,
confusion matrices and colour overlays (shared by the CLI and the demo)."""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from primaps_fast import fileio
from primaps_fast.progress import progress

CKPT_FORMAT = 1


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, em, *, epoch: int, config: dict, history: list, extra: dict | None = None) -> None:
    """Atomically write a PriMaPs-EM checkpoint (the head, its EMA copy, Adam state, progress)."""
    fileio.torch_save(path, {"format": CKPT_FORMAT, "kind": "primaps-em", "num_classes": config["num_classes"],
                             "dim": config["dim"], "epoch": int(epoch), "config": config, "history": history,
                             "em": em.state_dict(), "torch_rng": torch.get_rng_state(), **(extra or {})})


def load_checkpoint(path, *, num_classes: int | None = None, dim: int | None = None) -> dict:
    """Read a checkpoint; a checkpoint of another shape raises a ``ValueError`` saying which."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: file not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"checkpoint: cannot read {path}: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "primaps-em":
        raise ValueError(f"checkpoint: {path} is not a primaps_fast PriMaPs-EM checkpoint")
    for key, want in (("num_classes", num_classes), ("dim", dim)):
        if want is not None and ckpt[key] != want:
            raise ValueError(f"checkpoint: {path} has {key}={ckpt[key]}, but this run needs {key}={want} "
                             f"(a checkpoint of another shape)")
    return ckpt


def build_em(config: dict):
    from primaps_fast import PriMaPsEM

    return PriMaPsEM(config["num_classes"], config["dim"], lr=config["lr"], ema_decay=config["ema_decay"],
                     ema_every=config["ema_every"], focal_gamma=config["focal_gamma"], seed=config["seed"])


def em_from_checkpoint(ckpt: dict):
    em = build_em(ckpt["config"])
    em.load_state_dict(ckpt["em"])
    return em


# ----------------------------------------------------------------------------- training
def initialise(em, feature_batches, *, kmeans_epochs: int = 2):
    """Official initialisation: PCA directions, then cosine k-means (the k-means baseline)."""
    batches = [f for f in feature_batches]
    em.init_pca(batches)
    em.init_kmeans(torch.cat(batches), epochs=kmeans_epochs)
    return em


def train_epochs(em, data, *, start_epoch: int, epochs: int, batch_size: int, seed: int, on_epoch_end=None,
                 student_fn=None, show_progress: bool = True) -> list:
    """Run PriMaPs-EM epochs ``start_epoch..epochs-1`` over ``data`` (items ``(features, mask_ids, index)``,
    plus the image when ``student_fn(images, epoch, step)`` maps a batch of images to student features).

    Batches are shuffled with a generator seeded by ``seed + epoch`` (a resumed run sees the same
    batches as an uninterrupted one); the last incomplete batch is dropped as in the official loader
    when there is at least one full batch. ``on_epoch_end(epoch, history)`` saves the checkpoint.
    """
    history = []
    drop_last = len(data) >= batch_size
    for epoch in range(start_epoch, epochs):
        g = torch.Generator().manual_seed(seed + epoch)
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, generator=g,
                                             drop_last=drop_last)
        if hasattr(data, "set_epoch"):
            data.set_epoch(epoch)
        losses = []
        with progress(desc=f"EM epoch {epoch + 1}/{epochs}", total=len(loader), unit="step",
                      enabled=show_progress) as bar:
            for step, (feats, masks, _, *rest) in enumerate(loader):
                student = student_fn(rest[0], epoch, step) if student_fn is not None else None
                out = em.step(feats, masks, student_features=student)
                losses.append(float(out["loss"]))
                bar.set_postfix(f"loss {losses[-1]:.4f}")
                bar.update(1)
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else float("nan")})
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, history)
    return history


# ----------------------------------------------------------------------------- evaluation
def class_logits(em, features: torch.Tensor, use_ema: bool = True) -> torch.Tensor:
    """``(B, K, h, w)`` class scores of the head at feature resolution (the 1x1 conv without bias)."""
    w = em.weight(ema=use_ema).to(features.dtype)
    return torch.einsum("kc,bchw->bkhw", w, features)


def predict(em, features, size, *, use_ema: bool = True, crf_images=None, crf_iterations: int = 10,
            backend=None):
    """Class ids ``(B, S, S)``; with ``crf_images`` (uint8 BGR, as the official CRF sees them) refined by
    the dense CRF on the upsampled class scores (official ``test.py``)."""
    if crf_images is None:
        return em.predict(features, size=size, use_ema=use_ema)
    import primaps_fast

    q = primaps_fast.dense_crf(crf_images, class_logits(em, features, use_ema), iterations=crf_iterations,
                               backend=backend)
    return q.argmax(1)


def evaluate_batches(batches, num_classes: int) -> dict:
    """``batches`` yields ``(preds, target)``; returns ``UnsupervisedMetrics(num_classes).compute()``: the
    official ``mIoU``, ``Accuracy`` and ``class_iou`` (percent), the matched ``confusion`` matrix
    (rows = classes) and ``mapping[cluster] = class``."""
    from primaps_fast import UnsupervisedMetrics

    metrics = UnsupervisedMetrics(num_classes)
    for preds, target in batches:
        metrics.update(preds, target)
    return metrics.compute()


# ----------------------------------------------------------------------------- pictures
def palette(n: int) -> np.ndarray:
    """``(n + 1, 3)`` uint8 distinct colours; the last entry (ignored pixels) is black."""
    rng = np.random.default_rng(7)
    base = np.array([[128, 64, 128], [70, 130, 180], [107, 142, 35], [220, 20, 60], [250, 170, 30],
                     [0, 0, 142], [244, 35, 232], [70, 70, 70], [152, 251, 152], [255, 0, 0]], dtype=np.uint8)
    extra = rng.integers(40, 256, (max(0, n - len(base)), 3)).astype(np.uint8)
    return np.concatenate([np.concatenate([base, extra])[:n], np.zeros((1, 3), np.uint8)])


def colorize(ids: np.ndarray, n: int) -> np.ndarray:
    """``(H, W)`` ids in ``[0, n)`` (anything else is drawn black) -> ``(H, W, 3)`` uint8."""
    ids = np.asarray(ids)
    pal = palette(n)
    safe = np.where((ids >= 0) & (ids < n), ids, n)
    return pal[safe]


def blend(image: np.ndarray, color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    return (alpha * color.astype(np.float32) + (1 - alpha) * image.astype(np.float32)).round().astype(np.uint8)


def confusion_png(path, conf: np.ndarray, *, cell: int = 16) -> None:
    """Row-normalised confusion matrix as a grey PNG (white = all pixels of the class), with a border."""
    rows = conf.sum(1, keepdims=True)
    norm = np.divide(conf, rows, out=np.zeros(conf.shape, np.float64), where=rows > 0)
    img = (255 - norm * 255).round().astype(np.uint8)
    img = np.kron(img, np.ones((cell, cell), np.uint8))
    img[::cell, :] = 200
    img[:, ::cell] = 200
    fileio.write_png(path, np.stack([img] * 3, -1))


def strip(panels, gap: int = 4) -> np.ndarray:
    """Concatenate ``(H, W, 3)`` panels horizontally with white gaps."""
    H = panels[0].shape[0]
    out = []
    for i, p in enumerate(panels):
        if i:
            out.append(np.full((H, gap, 3), 255, np.uint8))
        out.append(p)
    return np.concatenate(out, 1)


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t
