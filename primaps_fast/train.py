"""A PriMaPs-EM training run: configuration, the official initialisation (PCA + cosine k-means, the
k-means baseline), resume, epochs over a feature cache and a pseudo-label folder, checkpoints and history.

The model itself (head, EMA, step, the epoch loop) is :class:`primaps_fast.em.PriMaPsEM`.

Run folder::

    init.pt        the head after PCA + k-means (the k-means baseline)
    last.pt        written after every epoch; ``resume=True`` continues from it exactly
    history.json   ``[{"epoch": n, "mean_loss": mean of the epoch's step losses}, ...]``

Under ``torchrun`` (``primaps_fast.distributed``) the run is data parallel: every global batch is the
single-process run's (same seed, same order) and each rank takes a contiguous part of it; the model's
reductions (``PriMaPsEM.sync``) make every rank hold the same head, EMA copy and Adam state as one process
would. Rank 0 alone reads and writes the run folder (the others get the checkpoint from it), so a run
resumes with any number of ranks.
"""
from __future__ import annotations

import os
import random
import sys
import time

import torch

from primaps_fast import distributed, fileio

CKPT_FORMAT = 1


# ----------------------------------------------------------------------------- model and checkpoints
def build_em(config: dict, *, backend: str | None = None, device=None):
    """A :class:`~primaps_fast.em.PriMaPsEM` from a run's ``config`` (``num_classes``, ``dim``, ``lr``,
    ``ema_decay``, ``ema_every``, ``focal_gamma``, ``seed``), data parallel inside a process group."""
    from primaps_fast.em import PriMaPsEM

    em = PriMaPsEM(config["num_classes"], config["dim"], lr=config["lr"], ema_decay=config["ema_decay"],
                   ema_every=config["ema_every"], focal_gamma=config["focal_gamma"], seed=config["seed"],
                   device=device, backend=backend)
    em.sync = distributed.data_parallel()
    return em


def save_checkpoint(path, em, *, epoch: int, config: dict, history: list, extra: dict | None = None) -> None:
    """Atomically write a PriMaPs-EM checkpoint (the head, its EMA copy, Adam state, progress) with the
    checksum of its contents (``fileio.digest``)."""
    ckpt = {"format": CKPT_FORMAT, "kind": "primaps-em", "num_classes": config["num_classes"],
            "dim": config["dim"], "epoch": int(epoch), "config": config, "history": history,
            "em": em.state_dict(), "torch_rng": torch.get_rng_state(), **(extra or {})}
    fileio.torch_save(path, {**ckpt, "digest": fileio.digest(ckpt)})


def load_checkpoint(path, *, num_classes: int | None = None, dim: int | None = None) -> dict:
    """Read a checkpoint; a checkpoint of another shape raises a ``ValueError`` saying which."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: file not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint: cannot read {path} (truncated, corrupt or not a checkpoint): {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "primaps-em":
        raise ValueError(f"checkpoint: {path} is not a primaps_fast PriMaPs-EM checkpoint")
    if "digest" in ckpt and fileio.digest({k: v for k, v in ckpt.items() if k != "digest"}) != ckpt.pop("digest"):
        raise ValueError(f"checkpoint: {path} is corrupt (its contents do not match the checksum written with "
                         "them); use another checkpoint (init.pt) or train again")
    for key in ("num_classes", "dim", "epoch", "config", "history", "em", "torch_rng"):
        if key not in ckpt:
            raise ValueError(f"checkpoint: {path} has no {key!r} entry (truncated or written by another program)")
    for key in ("num_classes", "dim", "lr", "ema_decay", "ema_every", "focal_gamma", "seed"):  # build_em's
        if not isinstance(ckpt["config"], dict) or key not in ckpt["config"]:
            raise ValueError(f"checkpoint: {path} has no 'config' entry {key!r} (truncated or written by another "
                             "program)")
    for key, want in (("num_classes", num_classes), ("dim", dim)):
        if want is not None and ckpt[key] != want:
            raise ValueError(f"checkpoint: {path} has {key}={ckpt[key]}, but this run needs {key}={want} "
                             f"(a checkpoint of another shape)")
    return ckpt


def em_from_checkpoint(ckpt: dict, *, backend: str | None = None, device=None):
    """The model of a checkpoint read by :func:`load_checkpoint` (on ``device``, default CPU)."""
    em = build_em(ckpt["config"], backend=backend, device=device)
    try:
        em.load_state_dict(ckpt["em"])
    except ValueError as exc:  # every entry is checked before anything is set
        raise ValueError(f"checkpoint: its 'em' entry is refused: {exc}") from None
    return em


# ----------------------------------------------------------------------------- training
def initialise(em, features, *, kmeans_epochs: int = 2, batch_size: int = 32, show_progress: bool = True):
    """Official initialisation: PCA directions, then cosine k-means (the k-means baseline). ``features``:
    an iterable of ``(B, C, h, w)`` batches, or rows (``len()`` and ``get_features(indices)``, read
    ``batch_size`` images at a time for the PCA sums; data parallel ranks read their shares only)."""
    if hasattr(features, "get_features"):
        em.init_pca(features, batch_size=batch_size)
        em.init_kmeans(features, epochs=kmeans_epochs, show_progress=show_progress)
        return em
    batches = list(features)
    em.init_pca(batches)
    em.init_kmeans(torch.cat(batches), epochs=kmeans_epochs, show_progress=show_progress)
    return em


class _FirstRows:
    """The first ``n`` images of a feature cache, as rows for :func:`initialise`."""

    def __init__(self, cache, n: int):
        self.cache, self.n = cache, n

    def __len__(self):
        return self.n

    def get_features(self, indices):
        return self.cache.get_features(indices)


class _RankBatches:
    """The global batches of a single-process epoch (``batches``: a ``BatchSampler``), each cut to this
    rank's contiguous part when ``share`` (data parallel), else whole. Lazy like ``BatchSampler``, so the
    DataLoader draws from the epoch's generator in the same order as with ``shuffle=True``."""

    def __init__(self, batches, share: bool):
        self.batches, self.share = batches, share

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            yield distributed.split(batch) if self.share else batch


def steps_per_epoch(num_items: int, batch_size: int) -> int:
    """Steps of one epoch: the last incomplete batch is dropped when there is at least one full batch."""
    return num_items // batch_size if num_items >= batch_size else int(num_items > 0)


def ema_updates(steps: int, ema_every: int) -> int:
    """EMA updates in ``steps`` steps counted from 0 (after step k when ``k > 0 and k % ema_every == 0``)."""
    return max(0, steps - 1) // ema_every


def check_ema_schedule(steps: int, epochs: int, ema_every: int, log) -> None:
    """Warn through ``log`` when an epoch has fewer steps than ``ema_every``: the EMA head, which gives the
    E-step labels and the predictions, then updates rarely or never (e.g. 12 images with batch 32)."""
    if steps < ema_every:
        n = ema_updates(steps * epochs, ema_every)
        log(f"warning: an epoch has {steps} step(s), fewer than ema_every={ema_every}: the EMA head theta_M is "
            f"updated only {n} time(s) in {epochs} epoch(s){' (it stays at its initialisation)' if n == 0 else ''}; "
            "use a smaller ema_every or batch size")


def train_epochs(em, data, *, start_epoch: int, epochs: int, batch_size: int, seed: int, on_epoch_end=None,
                 student_fn=None, show_progress: bool = True) -> list:
    """Run PriMaPs-EM epochs ``start_epoch..epochs-1`` over ``data`` (items ``(features, mask_ids, index)``,
    plus the image when ``student_fn(images, epoch, indices)`` maps a batch of images to student features).

    Batches are shuffled with a generator seeded by ``seed + epoch`` (a resumed run sees the same
    batches as an uninterrupted one); the last incomplete batch is dropped as in the official loader
    when there is at least one full batch. Data parallel (``em.sync``): each rank runs its contiguous
    part of every batch. ``on_epoch_end(epoch, history)`` saves the checkpoint.
    Returns ``[{"epoch": n, "mean_loss": float}, ...]`` for the epochs run.
    """
    history = []
    drop_last = len(data) >= batch_size
    share = em.sync is not None
    smallest = batch_size if drop_last else len(data)
    if share and smallest < distributed.world_size():
        raise ValueError(f"batch_size: {distributed.world_size()} ranks need at least as many images in every "
                         f"batch, but batches have {smallest}; use a larger --batch-size or fewer ranks")
    for epoch in range(start_epoch, epochs):
        g = torch.Generator().manual_seed(seed + epoch)
        sampler = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(data, generator=g), batch_size,
                                                drop_last)
        loader = torch.utils.data.DataLoader(data, batch_sampler=_RankBatches(sampler, share), generator=g)
        if hasattr(data, "set_epoch"):
            data.set_epoch(epoch)

        def batches():
            for feats, masks, index, *rest in loader:
                if student_fn is None:
                    yield feats, masks
                else:
                    yield feats, masks, student_fn(rest[0], epoch, index)

        mean_loss = em.run_epoch(batches(), desc=f"EM epoch {epoch + 1}/{epochs}", total=len(loader),
                                 show_progress=show_progress)
        history.append({"epoch": epoch + 1, "mean_loss": mean_loss})
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, history)
    return history


def _student_fn(cache, weights, device, seed):
    """Student features of a batch of normalised images: the official photometric augmentations, then the
    backbone of the cache (which must have the cache's weights); each image's view depends on (seed, epoch,
    its index) only, so it is the same after a resume and on any number of ranks."""
    from primaps_fast.backbones import load_backbone
    from primaps_fast.data.transforms import student_augment

    bb = load_backbone(cache.manifest["backbone"], weights, device=device,
                       precision=cache.manifest.get("precision", "fp32"))
    if bb.weights_id != cache.manifest["weights"]:
        raise ValueError(f"weights: {bb.weights_id} differs from the weights of the cache "
                         f"({cache.manifest['weights']})")

    def student(images, epoch, indices):
        views = torch.stack([student_augment(im, random.Random(f"{seed}-{epoch}-{int(i)}"))
                             for im, i in zip(images, indices)])
        return bb(views.to(device)).float().cpu()

    return student


def _stderr(msg):
    print(msg, file=sys.stderr)


def _quiet(msg):
    """The log of ranks other than 0."""


def run(cache_root, pseudo_root, out, *, num_classes: int | None = None, epochs: int = 50, batch_size: int = 32,
        lr: float = 5e-3, ema_decay: float = 0.98, ema_every: int = 10, focal_gamma: float = 2.0,
        kmeans_epochs: int = 2, pca_images: int | None = 92 * 32, hflip: bool = False,
        student_augs: bool = False, weights=None, device="cpu", seed: int = 0, resume: bool = False,
        backend: str | None = None, log=print, warn=_stderr, show_progress: bool = True) -> dict:
    """Train PriMaPs-EM from the feature cache ``cache_root`` and the pseudo labels ``pseudo_root`` into the
    run folder ``out`` (module docstring). ``num_classes`` defaults to the dataset's (27 Cityscapes and
    COCO-Stuff, 3 Potsdam; required for a folder dataset). ``pca_images``: the first images used for the
    PCA + k-means init (default: the official 92 batches of 32). ``student_augs``: the M-step sees
    features of a photometrically augmented image, computed by the cache's backbone with ``weights``.
    ``device``: where the model (and the student backbone) runs; ``backend``: the kernels of its steps.

    Returns a summary: ``epochs``, ``history``, ``ema_updates`` (EMA updates of the run so far) and the
    checkpoint paths.
    """
    from primaps_fast.data.cache import FeatureCache
    from primaps_fast.data.datasets import default_num_classes
    from primaps_fast.pseudo_gen import PseudoLabelData

    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("ema_every", ema_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be an int >= 1, got {value!r}")
    main = distributed.is_main()
    log, warn, show_progress = (log, warn, show_progress) if main else (_quiet, _quiet, False)
    device = distributed.device(device)
    cache = FeatureCache(cache_root)
    data = PseudoLabelData(cache, pseudo_root, hflip=hflip, images=student_augs, seed=seed)
    K = num_classes or default_num_classes(cache.manifest["dataset"]["kind"])
    if K is None:
        raise ValueError("num_classes: required for a folder dataset (--num-classes)")
    C = cache.feature_shape[0]

    last, init = os.path.join(out, "last.pt"), os.path.join(out, "init.pt")
    source = {k: cache.manifest[k] for k in ("backbone", "weights", "resolution", "dataset")}
    config = {"num_classes": K, "dim": C, "lr": lr, "ema_decay": ema_decay, "ema_every": ema_every,
              "focal_gamma": focal_gamma, "seed": seed, "epochs": epochs, "batch_size": batch_size,
              "kmeans_epochs": kmeans_epochs, "hflip": hflip, "student_augs": student_augs}
    distributed.check_same({**config, "features": source, "images": len(data), "pca_images": pca_images,
                            "resume": resume, "backend": backend, "weights": weights}, "train")
    student_fn = _student_fn(cache, weights, device, seed) if student_augs else None

    def open_run():  # rank 0: the run folder and, when resuming, its checkpoint (sent to every rank)
        os.makedirs(out, exist_ok=True)
        if not os.path.exists(last):
            return None
        if not resume:
            raise FileExistsError(f"out: {last} exists; pass --resume to continue that run, or choose another --out")
        ckpt = load_checkpoint(last, num_classes=K, dim=C)
        if ckpt.get("features") != source:
            raise ValueError(f"checkpoint: {last} was trained on other features ({ckpt.get('features')})")
        return ckpt

    ckpt = distributed.on_main(open_run, "train: opening the run folder on rank 0")
    if ckpt is not None:
        em, start = em_from_checkpoint(ckpt, backend=backend, device=device), ckpt["epoch"]
        # runs written before the key was named "mean_loss" stored the same epoch mean as "loss"
        history = [{"epoch": h["epoch"], "mean_loss": h.get("mean_loss", h.get("loss"))} for h in ckpt["history"]]
        torch.set_rng_state(ckpt["torch_rng"])
        log(f"resuming {last} at epoch {start}/{epochs}")
    else:
        torch.manual_seed(seed)
        em = build_em(config, backend=backend, device=device)
        n = len(cache) if pca_images is None else min(pca_images, len(cache))
        t = time.perf_counter()
        initialise(em, _FirstRows(cache, n), kmeans_epochs=kmeans_epochs, batch_size=batch_size,
                   show_progress=show_progress)
        log(f"PCA + k-means init on {n} images: {time.perf_counter() - t:.1f} s")
        if main:
            save_checkpoint(init, em, epoch=0, config=config, history=[], extra={"features": source})
        start, history = 0, []

    def save(epoch, hist):
        if main:  # every rank holds the same model; rank 0 writes it (atomically)
            save_checkpoint(last, em, epoch=epoch, config=config, history=history + hist,
                            extra={"features": source})

    if start == 0:
        save(0, [])
    check_ema_schedule(steps_per_epoch(len(data), batch_size), epochs, ema_every, warn)
    hist = train_epochs(em, data, start_epoch=start, epochs=epochs, batch_size=batch_size, seed=seed,
                        on_epoch_end=save, student_fn=student_fn, show_progress=show_progress)
    if main:
        fileio.write_json(os.path.join(out, "history.json"), history + hist)
    distributed.barrier("train: waiting for rank 0 to write the checkpoints")
    log(f"trained {epochs} epochs ({em.global_step} steps, {em.ema_calls} EMA updates of theta_M); "
        f"checkpoints {init} (k-means baseline), {last}")
    return {"epochs": epochs, "history": history + hist, "ema_updates": em.ema_calls, "init": init, "last": last}
