"""PriMaPs pseudo labels for a whole dataset, stored like the official ``cached_datasets/<name>``.

Output folder::

    manifest.json     the settings (threshold, CRF, features: backbone/weights/resolution, dataset)
    imgs/<name>.png   the resized, centre-cropped RGB image the labels belong to
    gts/<name>.png    its ground truth (uint8, 255 = unlabelled)
    pseudos/<name>.png  the pseudo label: mask ids 1..M, 255 = background (``primaps_fast.pseudo_labels``)

This is the folder the official ``PrecomputedDataset`` (``--precomp-primaps-root``) reads. Each file is
written atomically, ``pseudos/`` last, so an image is complete when its pseudo label exists and decodes
to the expected size; an interrupted run resumes by skipping those. A folder made with other settings
raises :class:`~primaps_fast.data.cache.CacheMismatchError` instead of being reused.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from primaps_fast import fileio
from primaps_fast.data.cache import FORMAT, claim_folder
from primaps_fast.data.transforms import to_normalized_tensor, unnormalize
from primaps_fast.progress import progress

SUBDIRS = ("imgs", "gts", "pseudos")


def valid_png(path, size) -> bool:
    """True when ``path`` is a complete grey PNG of ``size x size`` pixels."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.size != (size, size) or im.mode != "L":
                return False
            im.load()  # decodes everything: a truncated file raises
        return True
    except Exception:
        return False


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
    pseudo labels, writing).
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
        features_info = {"backbone": m["backbone"], "weights": m["weights"], "resolution": m["resolution"]}
    else:
        features_info = {"backbone": backbone.name, "weights": backbone.weights_id, "resolution": dataset.size}
    out_root = os.fspath(out_root)
    manifest = pseudo_manifest(dataset, features_info, threshold=threshold, crf=crf, crf_iterations=crf_iterations)
    if claim_folder(out_root, manifest, "pseudo-label folder", "out"):
        fileio.write_json(os.path.join(out_root, "manifest.json"), manifest)
    for sub in SUBDIRS:
        os.makedirs(os.path.join(out_root, sub), exist_ok=True)

    S = dataset.size
    names = dataset.names
    todo = [i for i, n in enumerate(names)
            if not valid_png(os.path.join(out_root, "pseudos", n + ".png"), S)]
    stats = {"images": len(names), "computed": 0, "skipped": len(names) - len(todo), "seconds": 0.0,
             "images_per_s": 0.0}
    if not todo:
        return stats
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, todo), batch_size=batch_size,
                                         num_workers=num_workers, shuffle=False)
    if backbone is not None and device is not None:
        backbone = backbone.to(device)
    start, pos = time.perf_counter(), 0
    with progress(desc="pseudo labels", total=len(todo), unit="img", enabled=show_progress) as bar:
        for images, labels, batch_names in loader:
            idx = todo[pos:pos + len(images)]
            pos += len(images)
            if cache is not None:
                feats = cache.get_features(idx)
            else:
                feats = backbone(images.to(device) if device is not None else images).float().cpu()
            pseudo = primaps_fast.pseudo_labels(images, feats, threshold=threshold, crf=crf,
                                                crf_iterations=crf_iterations, backend=backend)
            rgb = unnormalize(images).permute(0, 2, 3, 1).numpy()
            for name, im, gt, ps in zip(batch_names, rgb, labels.numpy(), pseudo.numpy()):
                fileio.write_png(os.path.join(out_root, "imgs", name + ".png"), im)
                fileio.write_png(os.path.join(out_root, "gts", name + ".png"), gt.clip(0, 255).astype(np.uint8))
                fileio.write_png(os.path.join(out_root, "pseudos", name + ".png"), ps.astype(np.uint8))
            stats["computed"] += len(images)
            bar.update(len(images))
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
        m = fileio.read_json(mpath)
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
            try:
                with Image.open(path) as im:
                    arr = np.array(im)
            except Exception as exc:
                raise RuntimeError(f"pseudo: cannot read {path}: {exc}") from exc
            if arr.shape != shape:
                raise ValueError(f"pseudo: {path} has shape {arr.shape}, expected {shape}")
            return arr

        mask = torch.from_numpy(read("pseudos", (self.size, self.size)).astype(np.int64))
        out = [self.cache.get_features([i])[0], mask]
        if self.images:
            out.append(to_normalized_tensor(read("imgs", (self.size, self.size, 3))))
        if self.hflip and np.random.default_rng([self.seed, self.epoch, i]).random() < 0.5:
            out = [t.flip(-1) for t in out]
        return (out[0], out[1], i) + tuple(out[2:])
