"""Feature cache: backbone features computed once per image, stored as memory-mapped float16 ``.npy``.

Folder layout::

    manifest.json   settings (backbone, weights id, resolution, flip averaging, dataset identity,
                    shapes, image names); a cache is only reused when every setting matches
    features.npy    float16 (N, C, h, w), space reserved up front (a full disk fails at creation)
    labels.npy      uint8 (N, S, S) ground-truth ids (255 = unlabelled), so evaluation needs no images
    done.npy        bool (N,), rewritten atomically after each batch whose rows were written and synced

Interrupting the computation loses at most the batch in flight: rerunning skips every image whose
``done`` flag is set. PriMaPs-EM trains from ``features.npy`` without loading the backbone.
"""
from __future__ import annotations

import errno
import json
import os

import numpy as np
import torch

from primaps_fast import fileio
from primaps_fast.progress import progress

FORMAT = 1


class CacheMismatchError(ValueError):
    """An existing cache (features or pseudo labels) was made with other settings."""


def check_manifest(path, expected: dict, what: str) -> None:
    """Raise :class:`CacheMismatchError` listing every setting in which ``path`` differs from ``expected``."""
    found = fileio.read_json(path)
    diffs = [f"  {k}: cache has {json.dumps(found.get(k))}, requested {json.dumps(expected.get(k))}"
             for k in sorted(set(found) | set(expected)) if found.get(k) != expected.get(k)]
    if diffs:
        raise CacheMismatchError(
            f"{what} at {os.path.dirname(os.path.abspath(path))} was made with other settings:\n"
            + "\n".join(diffs) + "\nUse another output folder, or delete this one to recompute.")


def claim_folder(root: str, manifest: dict, what: str, arg: str) -> bool:
    """Open the managed output folder ``root`` (feature cache or pseudo-label folder).

    With a ``manifest.json``, its settings must equal ``manifest`` (:func:`check_manifest`) and ``False`` is
    returned (resume). Otherwise the folder must be new or empty, so no unrelated file is ever touched; it
    is created and ``True`` is returned: the caller fills it and writes the manifest.
    """
    mpath = os.path.join(root, "manifest.json")
    if os.path.exists(mpath):
        check_manifest(mpath, manifest, what)
        return False
    if os.path.isdir(root) and any(not f.startswith(".") for f in os.listdir(root)):
        raise FileExistsError(f"{arg}: {root} exists and is not a {what}; choose an empty or new folder")
    os.makedirs(root, exist_ok=True)
    return True


class FeatureCache:
    """An opened feature cache (see the module docstring). Index ``i`` is the dataset's i-th image."""

    def __init__(self, root):
        self.root = os.fspath(root)
        manifest = os.path.join(self.root, "manifest.json")
        if not os.path.exists(manifest):
            raise FileNotFoundError(f"cache: no feature cache at {self.root} (manifest.json missing); "
                                    "create it with `primaps-fast features`")
        self.manifest = fileio.read_json(manifest)
        if self.manifest.get("kind") != "primaps-features" or self.manifest.get("format") != FORMAT:
            raise CacheMismatchError(f"cache: {self.root} is not a primaps_fast feature cache (format {FORMAT})")
        self.names = list(self.manifest["names"])
        self.features = np.load(os.path.join(self.root, "features.npy"), mmap_mode="r")
        self.labels = np.load(os.path.join(self.root, "labels.npy"), mmap_mode="r")
        self.done = np.load(os.path.join(self.root, "done.npy"))
        n = len(self.names)
        if self.features.shape[0] != n or self.labels.shape[0] != n or self.done.shape != (n,):
            raise CacheMismatchError(f"cache: files in {self.root} disagree with its manifest ({n} images)")

    def __len__(self):
        return len(self.names)

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    @property
    def feature_shape(self):
        return tuple(self.features.shape[1:])

    def require_complete(self) -> None:
        if not self.complete:
            raise RuntimeError(f"cache: {self.root} is incomplete ({int(self.done.sum())}/{len(self)} images); "
                               "rerun `primaps-fast features` with the same settings to finish it")

    def get_features(self, indices) -> torch.Tensor:
        """float32 ``(len(indices), C, h, w)``."""
        return torch.from_numpy(np.asarray(self.features[np.asarray(indices)], dtype=np.float32))

    def get_labels(self, indices) -> torch.Tensor:
        """int64 ``(len(indices), S, S)``, 255 = unlabelled."""
        return torch.from_numpy(np.asarray(self.labels[np.asarray(indices)]).astype(np.int64))

    def batches(self, batch_size: int, indices=None):
        """Yield ``(indices, features float32)`` in order (for PCA init, k-means, prediction)."""
        indices = np.arange(len(self)) if indices is None else np.asarray(indices)
        for s in range(0, len(indices), batch_size):
            idx = indices[s:s + batch_size]
            yield idx, self.get_features(idx)


def _reserve(path, shape, dtype) -> int:
    """Create a .npy file of ``shape``/``dtype`` with its space reserved; returns the data offset."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))
    offset, nbytes = arr.offset, arr.nbytes
    del arr
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, offset + nbytes)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise OSError(errno.ENOSPC, f"no space left on device for the feature cache {path} "
                                            f"({(offset + nbytes) / 2**30:.2f} GiB needed)") from exc
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without fallocate
                raise
    return offset


def _pwrite_rows(path, offset, row_bytes, index, array) -> None:
    data = np.ascontiguousarray(array)
    fd = os.open(path, os.O_WRONLY)
    try:
        for i, row in zip(index, data):
            buf = row.tobytes()
            pos = offset + int(i) * row_bytes
            while buf:
                n = os.pwrite(fd, buf, pos)
                buf, pos = buf[n:], pos + n
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_or_create(root, manifest: dict, num_images: int, feature_shape, size: int) -> FeatureCache:
    root = os.fspath(root)
    if claim_folder(root, manifest, "feature cache", "cache"):
        _reserve(os.path.join(root, "features.npy"), (num_images,) + tuple(feature_shape), np.float16)
        _reserve(os.path.join(root, "labels.npy"), (num_images, size, size), np.uint8)
        fileio.write_npy(os.path.join(root, "done.npy"), np.zeros(num_images, dtype=bool))
        # last: a cache without manifest is recreated from scratch
        fileio.write_json(os.path.join(root, "manifest.json"), manifest)
    return FeatureCache(root)


class _Writer:
    """Writes rows of features/labels, syncs them, then marks them done (atomically)."""

    def __init__(self, cache: FeatureCache):
        self.cache = cache
        self.done = cache.done.copy()
        self.frow = int(np.prod(cache.feature_shape)) * 2
        self.lrow = int(np.prod(cache.labels.shape[1:]))

    def write(self, idx, feats: torch.Tensor, labels: torch.Tensor) -> None:
        f16 = feats.detach().float().cpu().numpy().astype(np.float16)
        if not np.isfinite(f16).all():
            raise ValueError("features: NaN/Inf (or beyond the float16 range) in the backbone output")
        root = self.cache.root
        _pwrite_rows(os.path.join(root, "features.npy"), self.cache.features.offset, self.frow, idx, f16)
        _pwrite_rows(os.path.join(root, "labels.npy"), self.cache.labels.offset, self.lrow, idx,
                     labels.clamp(0, 255).to(torch.uint8).numpy())
        self.done[idx] = True
        fileio.write_npy(os.path.join(root, "done.npy"), self.done)


def _manifest(dataset, backbone_name, weights_id, flip, feature_shape) -> dict:
    return {"kind": "primaps-features", "format": FORMAT, "backbone": backbone_name, "weights": weights_id,
            "resolution": dataset.size, "flip": bool(flip), "dataset": dataset.identity(), "names": dataset.names,
            "dtype": "float16", "feature_shape": list(feature_shape)}


def compute_features(dataset, backbone, root, *, batch_size: int = 16, flip: bool = False,
                     device=None, num_workers: int = 0, show_progress: bool = True) -> FeatureCache:
    """Compute (or finish computing) the feature cache of ``dataset`` with ``backbone`` in ``root``.

    ``flip=True`` stores the average of the features of the image and of its horizontal mirror
    (mirrored back), as the official ``test.py`` does for evaluation. An existing cache with other
    settings raises :class:`CacheMismatchError`; a complete one is returned as it is.
    """
    device = torch.device(device or "cpu")
    S = dataset.size
    if S % backbone.patch:
        raise ValueError(f"resolution: {S} is not a multiple of the patch size {backbone.patch} of "
                         f"{backbone.name} (use {backbone.spec.resolution})")
    shape = (backbone.dim, S // backbone.patch, S // backbone.patch)
    cache = _open_or_create(root, _manifest(dataset, backbone.name, backbone.weights_id, flip, shape),
                            len(dataset), shape, S)
    todo = np.flatnonzero(~cache.done)
    if len(todo) == 0:
        return cache
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, todo.tolist()), batch_size=batch_size,
                                         num_workers=num_workers, shuffle=False)
    backbone = backbone.to(device)
    writer, start = _Writer(cache), 0
    with progress(desc="features", total=len(todo), unit="img", enabled=show_progress) as bar:
        for images, labels, _ in loader:
            idx = todo[start:start + len(images)]
            start += len(images)
            images = images.to(device)
            feats = backbone(images)
            if flip:
                feats = 0.5 * (feats + backbone(images.flip(-1)).flip(-1))
            writer.write(idx, feats, labels)
            bar.update(len(images))
    return FeatureCache(root)


def store_features(dataset, features: torch.Tensor, root, *, backbone: str, weights: str,
                   flip: bool = False) -> FeatureCache:
    """Make a cache from features computed elsewhere (``(N, C, h, w)``, one row per image of
    ``dataset``); ``backbone``/``weights`` name them in the manifest. Labels come from ``dataset``."""
    if features.dim() != 4 or features.shape[0] != len(dataset):
        raise ValueError(f"features: expected ({len(dataset)}, C, h, w), got {tuple(features.shape)}")
    cache = _open_or_create(root, _manifest(dataset, backbone, weights, flip, features.shape[1:]),
                            len(dataset), features.shape[1:], dataset.size)
    todo = np.flatnonzero(~cache.done)
    if len(todo):
        labels = torch.stack([dataset[int(i)][1] for i in todo])
        _Writer(cache).write(todo, features[torch.from_numpy(todo)], labels)
    return FeatureCache(root)
