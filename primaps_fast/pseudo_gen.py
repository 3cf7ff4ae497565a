"""PriMaPs pseudo labels for a whole dataset, stored like the official ``cached_datasets/<name>``.

Output folder::

    manifest.json     the settings (threshold, CRF, features: backbone/weights/resolution, dataset)
    imgs/<name>.png   the resized, centre-cropped RGB image the labels belong to
    gts/<name>.png    its ground truth (uint8, 255 = unlabelled)
    pseudos/<name>.png  the pseudo label: mask ids 1..M, 255 = background (``primaps_fast.pseudo_labels``)

This is the folder the official ``PrecomputedDataset`` (``--precomp-primaps-root``) reads. Each file is
written atomically, ``pseudos/`` last, so an image is complete when its three files exist and decode to
the expected size and mode; an interrupted run resumes by skipping those and recomputing the others
(also damaged ones). A folder made with other settings raises
:class:`~primaps_fast.data.cache.CacheMismatchError` instead of being reused.

Under ``torchrun`` (``primaps_fast.distributed``) rank 0 alone creates the folder and the manifest; the
resume scan is shared by the ranks, and the images still to do are cut into the batches of a
single-process run, dealt round-robin to the ranks, so the files are byte-identical to one process's.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from primaps_fast import distributed, fileio
from primaps_fast.data.cache import (FORMAT, CorruptCacheError, claim_folder, not_writable, read_manifest,
                                     remove_temporaries)
from primaps_fast.data.transforms import to_normalized_tensor, unnormalize

SUBDIRS = ("imgs", "gts", "pseudos")


def valid_png(path, size, mode: str = "L") -> bool:
    """True when ``path`` is a complete PNG of ``size x size`` pixels in ``mode`` (grey by default)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.size != (size, size) or im.mode != mode:
                return False
            im.load()  # decodes everything: a truncated file raises
        return True
    except Exception:
        return False


def complete(root, name: str, size: int) -> bool:
    """True when the image ``name`` has its three files in ``root``, complete and of the right size."""
    return (valid_png(os.path.join(root, "pseudos", name + ".png"), size)
            and valid_png(os.path.join(root, "gts", name + ".png"), size)
            and valid_png(os.path.join(root, "imgs", name + ".png"), size, "RGB"))


def _fix(root) -> str:
    return f"delete the folder {root} and rerun `primaps-fast pseudo` with the same settings to recompute it"


def _open_folder(root, manifest) -> None:
    """Rank 0: claim or check the folder, write the manifest, create the subfolders and delete the
    temporary files that killed writers left."""
    try:
        if claim_folder(root, manifest, "pseudo-label folder", "out", _fix(root)):
            fileio.write_json(os.path.join(root, "manifest.json"), manifest)
        for sub in SUBDIRS:
            os.makedirs(os.path.join(root, sub), exist_ok=True)
            remove_temporaries(os.path.join(root, sub))
        remove_temporaries(root)
    except OSError as exc:
        raise not_writable(exc, root, "out") from exc


def pseudo_manifest(dataset, features_info: dict, *, threshold, crf, crf_iterations) -> dict:
    return {"kind": "primaps-pseudo-labels", "format": FORMAT, "threshold": float(threshold), "crf": bool(crf),
            "crf_iterations": int(crf_iterations) if crf else None, "stop_fraction": 0.95,
            "ignore_index": 255, "features": features_info, "dataset": dataset.identity()}


def generate_pseudo_labels(dataset, out_root, *, cache=None, backbone=None, threshold: float = 0.4,
                           crf: bool = True, crf_iterations: int = 10, batch_size: int = 8,
                           backend: str | None = None, device=None, num_workers: int = 0,
                           show_progress: bool = True) -> dict:
    """Compute the PriMaPs pseudo label of every image of ``dataset`` into ``out_root``.

    Features come from ``cache`` (a :class:`~primaps_fast.data.cache.FeatureCache` of this dataset,
    made without flip averaging) or from ``backbone``. Returns ``{"images", "computed", "skipped",
    "seconds", "images_per_s"}`` (the rate counts the computed images, end to end: loading, features,
    pseudo labels, writing; under ``torchrun``, of all ranks together). Under ``torchrun`` every rank
    computes its share (module docstring).
    """
    import primaps_fast

    if (cache is None) == (backbone is None):
        raise ValueError("generate_pseudo_labels: pass exactly one of cache= or backbone=")
    if cache is not None:
        cache.require_complete()
        m = cache.manifest
        if m["dataset"] != dataset.identity() or cache.names != dataset.names:
            raise ValueError(f"cache: {cache.root} belongs to another dataset ({m['dataset']}), "
                             f"not {dataset.identity()}")
        if m["flip"]:
            raise ValueError(f"cache: {cache.root} holds flip-averaged (evaluation) features; pseudo labels "
                             "use plain features (create a cache without --flip)")
        features_info = {"backbone": m["backbone"], "weights": m["weights"], "resolution": m["resolution"],
                         **({"precision": m["precision"]} if "precision" in m else {})}
    else:
        features_info = {"backbone": backbone.name, "weights": backbone.weights_id, "resolution": dataset.size,
                         **({"precision": backbone.precision} if backbone.precision != "fp32" else {})}
    out_root = os.fspath(out_root)
    manifest = pseudo_manifest(dataset, features_info, threshold=threshold, crf=crf, crf_iterations=crf_iterations)
    distributed.check_same({**manifest, "batch_size": batch_size, "backend": backend,
                            "source": "cache" if cache is not None else "backbone"}, "pseudo")
    distributed.on_main(lambda: _open_folder(out_root, manifest), "pseudo: opening the output folder on rank 0")

    S = dataset.size
    names = dataset.names
    scanned = distributed.split(range(len(names)))
    todo = sorted(sum(distributed.all_gather_object([i for i in scanned if not complete(out_root, names[i], S)],
                                                    "pseudo: resume scan"), []))
    stats = {"images": len(names), "computed": 0, "skipped": len(names) - len(todo), "seconds": 0.0,
             "images_per_s": 0.0}
    if not todo:
        return stats
    start = time.perf_counter()
    mine = distributed.round_robin([todo[s:s + batch_size] for s in range(0, len(todo), batch_size)])
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, [i for b in mine for i in b]),
                                         batch_size=batch_size, num_workers=num_workers, shuffle=False)
    device = distributed.device(device)
    if backbone is not None and device is not None:
        backbone = backbone.to(device)
    with distributed.SharedProgress("pseudo", desc="pseudo labels", total=len(todo), unit="img",
                                    enabled=show_progress) as bar:
        for idx, (images, labels, batch_names) in zip(mine, loader):
            if cache is not None:
                feats = cache.get_features(idx)
            else:
                feats = backbone(images.to(device) if device is not None else images).float().cpu()
            pseudo = primaps_fast.pseudo_labels(images, feats, threshold=threshold, crf=crf,
                                                crf_iterations=crf_iterations, backend=backend)
            rgb = unnormalize(images).permute(0, 2, 3, 1).numpy()
            try:
                for name, im, gt, ps in zip(batch_names, rgb, labels.numpy(), pseudo.numpy()):
                    fileio.write_png(os.path.join(out_root, "imgs", name + ".png"), im)
                    fileio.write_png(os.path.join(out_root, "gts", name + ".png"), gt.clip(0, 255).astype(np.uint8))
                    fileio.write_png(os.path.join(out_root, "pseudos", name + ".png"), ps.astype(np.uint8))
            except OSError as exc:
                raise not_writable(exc, out_root, "out") from exc
            bar.add(len(images))
    stats["computed"] = len(todo)
    stats["seconds"] = time.perf_counter() - start
    stats["images_per_s"] = stats["computed"] / max(stats["seconds"], 1e-9)
    return stats


class PseudoLabelData(torch.utils.data.Dataset):
    """``(features float32 (C, h, w), mask ids int64 (S, S), index)`` from a feature cache and a
    pseudo-label folder of the same dataset: what PriMaPs-EM trains on, without the backbone.
    ``hflip=True`` mirrors features and mask ids together with probability 1/2 (official RandomHFlip).
    ``images=True`` appends the normalised image ``(3, S, S)`` from ``imgs/`` (mirrored with the rest)
    for the student view (photometric augmentations + backbone)."""

    def __init__(self, cache, pseudo_root, *, hflip: bool = False, images: bool = False, seed: int = 0):
        cache.require_complete()
        self.cache, self.root, self.hflip, self.images = cache, os.fspath(pseudo_root), hflip, images
        mpath = os.path.join(self.root, "manifest.json")
        if not os.path.exists(mpath):
            raise FileNotFoundError(f"pseudo: no pseudo-label folder at {self.root} (manifest.json missing); "
                                    "create it with `primaps-fast pseudo`")
        m = read_manifest(mpath, "pseudo", _fix(self.root))
        if m.get("dataset") != cache.manifest["dataset"]:
            raise ValueError(f"pseudo: {self.root} was made for dataset {m.get('dataset')}, but the cache "
                             f"{cache.root} holds {cache.manifest['dataset']}")
        self.size = cache.manifest["resolution"]
        missing = [n for n in cache.names if not os.path.exists(self._path(n))]
        if missing:
            raise FileNotFoundError(f"pseudo: {len(missing)} pseudo labels missing in {self.root} "
                                    f"(e.g. {missing[0]}.png); rerun `primaps-fast pseudo` to finish")
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Flips depend on (seed, epoch, index) only, so a resumed run sees the same flips."""
        self.epoch = epoch

    def _path(self, name, sub="pseudos"):
        return os.path.join(self.root, sub, name + ".png")

    def __len__(self):
        return len(self.cache)

    def __getitem__(self, i):
        from PIL import Image

        def read(sub, shape):
            path = self._path(self.cache.names[i], sub)
            fix = "rerun `primaps-fast pseudo` with the same settings: it recomputes damaged files"
            try:
                with Image.open(path) as im:
                    arr = np.array(im)
            except Exception as exc:
                raise CorruptCacheError(f"pseudo: cannot read {path} ({type(exc).__name__}: {exc}): the file is "
                                        f"missing, truncated or corrupt; {fix}") from exc
            if arr.shape != shape:
                raise CorruptCacheError(f"pseudo: {path} has shape {arr.shape}, expected {shape}; {fix}")
            return arr

        mask = torch.from_numpy(read("pseudos", (self.size, self.size)).astype(np.int64))
        out = [self.cache.get_features([i])[0], mask]
        if self.images:
            out.append(to_normalized_tensor(read("imgs", (self.size, self.size, 3))))
        if self.hflip and np.random.default_rng([self.seed, self.epoch, i]).random() < 0.5:
            out = [t.flip(-1) for t in out]
        return (out[0], out[1], i) + tuple(out[2:])
