"""Feature cache: backbone features computed once per image, stored as memory-mapped float16 ``.npy``.

Folder layout::

    manifest.json     settings (backbone, weights id, resolution, flip averaging, dataset identity,
                      shapes, image names); a cache is only reused when every setting matches
    features.npy      float16 (N, C, h, w), space reserved up front (the free space is checked first)
    labels.npy        uint8 (N, S, S) ground-truth ids (255 = unlabelled), so evaluation needs no images
    done.npy          bool (N,): the completion record of finished runs
    done.part-*.npy   bool (N,): the record of one writer of a running (or interrupted) run, one per rank,
                      rewritten atomically by that writer alone after each of its batches was written
                      and synced. An image is complete when any record marks it (merged on read: the
                      parts first, then ``done.npy``); rank 0 folds the parts into ``done.npy`` when a run
                      starts and when it ends, while no other writer runs
    creating.json     present only while the folder is created: such a folder without ``manifest.json``
                      is an interrupted creation, which the same command deletes and creates again

Each batch's rows are written, synced and recorded by a writer thread while the next batch is computed.
Interrupting the computation loses at most the batch being computed and, when the process is killed,
the one being written, on each rank: rerunning (with any number of ranks, ``primaps_fast.distributed``)
skips every image a record marks, after checking that its stored features are finite (rows that are not
are computed again). PriMaPs-EM trains from ``features.npy``
without loading the backbone. Caches written before the per-writer records (``done.npy`` alone) are read
as they are.
"""
from __future__ import annotations

import errno
import io
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
import torch

from primaps_fast import distributed, fileio

FORMAT = 1
MANIFEST = "manifest.json"
CREATING = "creating.json"
RECORD = "done.npy"
_PART = re.compile(r"done\.part-[0-9a-z-]+\.npy$")
_ARRAYS = ("features.npy", "labels.npy")
_FIX_CACHE = "delete the folder {root} and rerun `primaps-fast features` with the same settings to recompute it"


class CacheMismatchError(ValueError):
    """An existing cache (features or pseudo labels) was made with other settings."""


class CorruptCacheError(ValueError):
    """A file of a feature cache or pseudo-label folder is truncated, corrupt or holds values that are not
    finite; the message names the file, what is wrong and what to run."""


# ----------------------------------------------------------------------------- managed folders
def read_manifest(path, what: str, fix: str) -> dict:
    """``manifest.json`` of a managed folder; a truncated or corrupt one raises :class:`CorruptCacheError`."""
    try:
        found = fileio.read_json(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptCacheError(f"{what}: {path} is not valid JSON ({exc}): the file is truncated or corrupt, so "
                                f"the settings of this folder cannot be checked; {fix}") from exc
    if not isinstance(found, dict):
        raise CorruptCacheError(f"{what}: {path} holds {type(found).__name__}, not a manifest; {fix}")
    return found


def check_manifest(path, expected: dict, what: str, fix: str = "") -> None:
    """Raise :class:`CacheMismatchError` listing every setting in which ``path`` differs from ``expected``."""
    root = os.path.dirname(os.path.abspath(path))
    found = read_manifest(path, what, fix or f"delete {root} to recompute it")
    diffs = [f"  {k}: cache has {json.dumps(found.get(k))}, requested {json.dumps(expected.get(k))}"
             for k in sorted(set(found) | set(expected)) if found.get(k) != expected.get(k)]
    if diffs:
        raise CacheMismatchError(
            f"{what} at {root} was made with other settings:\n"
            + "\n".join(diffs) + "\nUse another output folder, or delete this one to recompute.")


def _own_temporary(name: str) -> bool:
    """A temporary file of ``fileio``'s atomic writers (``.<name>.<random>.tmp``), left by a killed writer."""
    return name.startswith(".") and name.endswith(".tmp")


def remove_temporaries(folder) -> None:
    """Delete the temporary files that killed atomic writers left in ``folder`` (only while no writer runs)."""
    with os.scandir(folder) as entries:
        for e in entries:
            if _own_temporary(e.name) and e.is_file(follow_symlinks=False):
                _unlink(e.path)


def _unlink(path) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def not_writable(exc: OSError, root, arg: str) -> OSError:
    """``exc`` (from writing in ``root``); for a read-only folder, an error that says so and what to do."""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionError(exc.errno, f"{arg}: cannot write in {root} ({os.strerror(exc.errno)}): the folder "
                                          f"is read-only for this user; choose a writable --{arg} folder or fix its "
                                          "permissions, then rerun the same command")
    return exc


def claim_folder(root: str, manifest: dict, what: str, arg: str, fix: str = "") -> bool:
    """Open the managed output folder ``root`` (feature cache or pseudo-label folder).

    With a ``manifest.json``, its settings must equal ``manifest`` (:func:`check_manifest`) and ``False`` is
    returned (resume). Otherwise the folder must be new, empty, or an interrupted creation (``creating.json``
    and files of this module only, which are deleted), so no unrelated file is ever touched; it is created
    and ``True`` is returned: the caller fills it and writes the manifest.
    """
    mpath = os.path.join(root, MANIFEST)
    if os.path.exists(mpath):
        check_manifest(mpath, manifest, what, fix)
        return False
    if os.path.isdir(root):
        names = [f for f in os.listdir(root) if not f.startswith(".")]
        if CREATING in names:
            others = [f for f in names if f not in (CREATING, RECORD, *_ARRAYS) and not _PART.match(f)]
            if others:
                raise FileExistsError(f"{arg}: {root} holds an interrupted {what} creation and other files "
                                      f"({', '.join(sorted(others)[:3])}); choose an empty or new folder")
            for f in names:
                if f != CREATING:
                    _unlink(os.path.join(root, f))
            remove_temporaries(root)
            _unlink(os.path.join(root, CREATING))  # last: until here, a rerun knows the folder is ours
        elif names and set(names) <= {RECORD, *_ARRAYS}:
            raise FileExistsError(f"{arg}: {root} holds {', '.join(sorted(names))} but no manifest.json: not a "
                                  f"complete {what} (a failed creation by an older primaps_fast?); delete it and "
                                  "rerun the same command")
        elif names:
            raise FileExistsError(f"{arg}: {root} exists and is not a {what}; choose an empty or new folder")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as exc:
        raise not_writable(exc, root, arg) from exc
    return True


# ----------------------------------------------------------------------------- reading
def _npy_header_size(shape, dtype) -> int:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": tuple(shape)})
    return buf.tell()


def _npy_size(shape, dtype) -> int:
    return _npy_header_size(shape, dtype) + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _load_npy(path, fix: str, *, mmap: bool):
    """``np.load`` with :class:`CorruptCacheError` naming the file and saying whether it is missing,
    truncated (its size against the size its header announces) or corrupt."""
    if not os.path.isfile(path):
        raise CorruptCacheError(f"cache: {path} is missing; {fix}")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as exc:
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(f)
                want = f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            size = os.path.getsize(path)
            problem = (f"is truncated ({size} bytes, its header announces {want})" if size < want
                       else f"is corrupt ({exc})")
        except Exception as header_exc:
            problem = f"has no valid .npy header ({header_exc})"
        raise CorruptCacheError(f"cache: {path} {problem}; {fix}") from exc


def _read_record(path, n: int) -> np.ndarray:
    fix = (f"delete {path} and rerun `primaps-fast features` with the same settings (the images it marked "
           "complete are computed again)")
    arr = _load_npy(path, fix, mmap=False)
    if arr.dtype != np.bool_ or arr.shape != (n,):
        raise CorruptCacheError(f"cache: the completion record {path} holds {arr.dtype} {arr.shape}, expected "
                                f"bool ({n},); {fix}")
    return arr


def _parts(root) -> list:
    return sorted(f for f in os.listdir(root) if _PART.match(f))


def read_done(root, n: int) -> tuple:
    """The merged completion record of the cache ``root``: ``(done bool (n,), part file names read)``.
    The parts are read before ``done.npy``: a part deleted meanwhile was folded into ``done.npy`` first."""
    done = np.zeros(n, dtype=bool)
    read = []
    for name in _parts(root):
        try:
            done |= _read_record(os.path.join(root, name), n)
            read.append(name)
        except CorruptCacheError:
            if os.path.exists(os.path.join(root, name)):
                raise
    if os.path.exists(os.path.join(root, RECORD)):
        done |= _read_record(os.path.join(root, RECORD), n)
    return done, read


class FeatureCache:
    """An opened feature cache (see the module docstring). Index ``i`` is the dataset's i-th image."""

    def __init__(self, root):
        self.root = os.fspath(root)
        manifest = os.path.join(self.root, MANIFEST)
        if not os.path.exists(manifest):
            raise FileNotFoundError(f"cache: no feature cache at {self.root} (manifest.json missing); "
                                    "create it with `primaps-fast features`")
        fix = _FIX_CACHE.format(root=self.root)
        self.manifest = read_manifest(manifest, "cache", fix)
        if self.manifest.get("kind") != "primaps-features" or self.manifest.get("format") != FORMAT:
            raise CacheMismatchError(f"cache: {self.root} is not a primaps_fast feature cache (format {FORMAT})")
        try:
            self.names = list(self.manifest["names"])
            n, size = len(self.names), int(self.manifest["resolution"])
            shapes = {"features.npy": ((n, *self.manifest["feature_shape"]), np.float16),
                      "labels.npy": ((n, size, size), np.uint8)}
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCacheError(f"cache: {manifest} lacks a valid {exc} entry; {fix}") from exc
        arrays = {}
        for name, (shape, dtype) in shapes.items():
            path = os.path.join(self.root, name)
            arr = arrays[name] = _load_npy(path, fix, mmap=True)
            if arr.shape != tuple(shape) or arr.dtype != dtype:
                raise CorruptCacheError(f"cache: {path} holds {arr.dtype} {arr.shape}, but the manifest says "
                                        f"{np.dtype(dtype)} {tuple(shape)}; {fix}")
        self.features, self.labels = arrays["features.npy"], arrays["labels.npy"]
        self.done, _ = read_done(self.root, n)

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
        """float32 ``(len(indices), C, h, w)``. Rows that are not finite (a corrupt file) raise
        :class:`CorruptCacheError` naming their images."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = torch.from_numpy(np.asarray(self.features[idx], dtype=np.float32))
        # float16 values summed in float32 cannot overflow: the sum is finite iff every value is
        bad = idx[~torch.isfinite(out.reshape(len(idx), -1).sum(1)).numpy()]
        if len(bad):
            raise CorruptCacheError(
                f"cache: features.npy in {self.root} holds values that are not finite for {len(bad)} image(s) "
                f"({', '.join(self.names[i] for i in bad[:3])}{', ...' if len(bad) > 3 else ''}): the file is "
                "corrupt; rerun `primaps-fast features` with the same settings to recompute them")
        return out

    def get_labels(self, indices) -> torch.Tensor:
        """int64 ``(len(indices), S, S)``, 255 = unlabelled."""
        return torch.from_numpy(np.asarray(self.labels[np.asarray(indices, dtype=np.int64)]).astype(np.int64))

    def batches(self, batch_size: int, indices=None):
        """Yield ``(indices, features float32)`` in order (for PCA init, k-means, prediction)."""
        indices = np.arange(len(self)) if indices is None else np.asarray(indices)
        for s in range(0, len(indices), batch_size):
            idx = indices[s:s + batch_size]
            yield idx, self.get_features(idx)

    def nonfinite_rows(self, rows, chunk: int = 64) -> list:
        """The rows among ``rows`` whose stored features are not all finite."""
        bad = []
        for s in range(0, len(rows), chunk):
            idx = np.asarray(rows[s:s + chunk], dtype=np.int64)
            sums = np.asarray(self.features[idx], dtype=np.float32).reshape(len(idx), -1).sum(1)
            bad.extend(int(i) for i in idx[~np.isfinite(sums)])
        return bad


# ----------------------------------------------------------------------------- creating and filling
def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} bytes"


def _sizes(sizes: dict) -> str:
    """``{file name: bytes}`` as ``"features.npy 1.17 MiB, ..."``."""
    return ", ".join(f"{k} {_size(v)}" for k, v in sizes.items())


def _space_error(root, sizes: dict, free: int) -> OSError:
    need = sum(sizes.values())
    return OSError(errno.ENOSPC, f"no space left on device for the feature cache {root}: it needs {_size(need)} "
                                 f"({_sizes(sizes)}) and {_size(free)} are free; free some space or choose another "
                                 "--cache, then rerun the same command (the folder was left empty)")


def _free_bytes(root) -> int:
    st = os.statvfs(root)
    return st.f_bavail * st.f_frsize


def _reserve(path, shape, dtype) -> None:
    """Create a .npy file of ``shape``/``dtype`` with its space reserved (ENOSPC when the disk is full)."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))
    nbytes = arr.offset + arr.nbytes
    del arr
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, nbytes)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without fallocate
                raise


def _shapes(num_images: int, feature_shape, size: int) -> dict:
    """File name -> (shape, dtype) of the arrays of a cache of ``num_images`` ``size`` x ``size`` images."""
    return {"features.npy": ((num_images,) + tuple(feature_shape), np.float16),
            "labels.npy": ((num_images, size, size), np.uint8), RECORD: ((num_images,), np.bool_)}


def cache_bytes(num_images: int, feature_shape, size: int) -> int:
    """The size on disk of a feature cache's arrays (``features.npy``, ``labels.npy``, ``done.npy``)."""
    return sum(_npy_size(*v) for v in _shapes(num_images, feature_shape, size).values())


def _create(root, manifest: dict, num_images: int, feature_shape, size: int, say: bool = False) -> None:
    """Fill the claimed (empty) folder ``root``: state its size (``say``: on stderr) and check the space,
    reserve the arrays, write the record and the manifest (last). On any failure the folder is emptied
    again; a kill leaves ``creating.json``, so the rerun deletes and re-creates it (:func:`claim_folder`)."""
    shapes = _shapes(num_images, feature_shape, size)
    sizes = {k: _npy_size(*v) for k, v in shapes.items()}
    free = _free_bytes(root)
    if say:
        print(f"features: the cache {root} takes {_size(sum(sizes.values()))} for {num_images} images x "
              f"{'x'.join(map(str, feature_shape))} float16 ({_sizes(sizes)}); {_size(free)} free",
              file=sys.stderr, flush=True)
    if sum(sizes.values()) > free:
        raise _space_error(root, sizes, free)
    try:
        fileio.write_json(os.path.join(root, CREATING), manifest)
        for name in _ARRAYS:
            _reserve(os.path.join(root, name), *shapes[name])
        fileio.write_npy(os.path.join(root, RECORD), np.zeros(num_images, dtype=bool))
        fileio.write_json(os.path.join(root, MANIFEST), manifest)
    except BaseException as exc:
        for name in (*shapes, MANIFEST, CREATING):
            _unlink(os.path.join(root, name))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _space_error(root, sizes, _free_bytes(root)) from exc
        if isinstance(exc, OSError):
            raise not_writable(exc, root, "cache") from exc
        raise
    _unlink(os.path.join(root, CREATING))


def _tidy(root, n: int) -> None:
    """Rank 0, while no writer runs: delete the temporary files killed writers left and ``creating.json``
    (once the manifest exists), and fold the per-writer records into ``done.npy``. A read-only cache is
    left as it is (it can still be read and checked; writing rows says that it is read-only)."""
    try:
        _unlink(os.path.join(root, CREATING))
        remove_temporaries(root)
        done, parts = read_done(root, n)
        if parts:
            fileio.write_npy(os.path.join(root, RECORD), done)
            for name in parts:
                _unlink(os.path.join(root, name))
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise


def _open_or_create(root, manifest: dict, num_images: int, feature_shape, size: int, say: bool = False) -> None:
    """Rank 0, before any writer starts: claim and create the folder, or check and tidy it for a resume."""
    if claim_folder(root, manifest, "feature cache", "cache", _FIX_CACHE.format(root=root)):
        _create(root, manifest, num_images, feature_shape, size, say)
        return
    FeatureCache(root)  # every file readable and of the manifest's shape
    _tidy(root, num_images)


def _pwrite_rows(path, offset, row_bytes, index, array) -> None:
    data = np.ascontiguousarray(array)
    try:
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
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(exc.errno, f"no space left on device while writing rows of {path} (its file system does "
                                     "not reserve space); free some space and rerun the same command (finished "
                                     "rows are kept)") from exc
        raise not_writable(exc, os.path.dirname(path), "cache") from exc


class _Writer:
    """Writes rows of features/labels, syncs them, then marks them in this writer's own record (atomically)."""

    def __init__(self, cache: FeatureCache):
        self.cache = cache
        self.done = np.zeros(len(cache), dtype=bool)
        self.record = os.path.join(cache.root, f"done.part-r{distributed.rank()}-{os.urandom(6).hex()}.npy")
        self.frow = int(np.prod(cache.feature_shape)) * 2
        self.lrow = int(np.prod(cache.labels.shape[1:]))

    def write(self, idx, feats: torch.Tensor, labels: torch.Tensor) -> int:
        """Write, sync and record the rows ``idx``; returns their count."""
        f16 = feats.detach().to(torch.float16).cpu().numpy()
        if not np.isfinite(f16).all():
            raise ValueError("features: NaN/Inf (or beyond the float16 range) in the backbone output")
        root = self.cache.root
        _pwrite_rows(os.path.join(root, "features.npy"), self.cache.features.offset, self.frow, idx, f16)
        _pwrite_rows(os.path.join(root, "labels.npy"), self.cache.labels.offset, self.lrow, idx,
                     labels.clamp(0, 255).to(torch.uint8).numpy())
        self.done[idx] = True
        try:
            fileio.write_npy(self.record, self.done)
        except OSError as exc:
            raise not_writable(exc, root, "cache") from exc
        return len(idx)


def _manifest(dataset, backbone_name, weights_id, flip, feature_shape, precision="fp32") -> dict:
    """The cache's settings; ``precision`` is recorded only for bf16 features (fp32 caches, also those made
    before the setting existed, have no entry)."""
    return {"kind": "primaps-features", "format": FORMAT, "backbone": backbone_name, "weights": weights_id,
            "resolution": dataset.size, "flip": bool(flip), "dataset": dataset.identity(), "names": dataset.names,
            "dtype": "float16", "feature_shape": list(feature_shape),
            **({"precision": precision} if precision != "fp32" else {})}


def _fill(root, manifest: dict, num_images: int, feature_shape, size: int, batch_size: int, rows,
          show_progress: bool) -> FeatureCache:
    """Create or resume the cache ``root`` and compute its missing rows, on every rank of a launch.

    Rank 0 checks every rank's settings, creates or tidies the folder and reads the record; the ranks then
    check the rows marked complete (their shares) for values that are not finite; the rows still to do
    are cut into the batches of a single-process run, dealt round-robin to the ranks. ``rows(batches)``
    yields ``(indices, features, labels)`` for this rank's batches."""
    root = os.fspath(root)
    distributed.check_same({**manifest, "batch_size": batch_size}, "features")
    distributed.on_main(lambda: _open_or_create(root, manifest, num_images, feature_shape, size, show_progress),
                        "features: opening the cache on rank 0")
    cache = FeatureCache(root)
    todo = distributed.on_main(lambda: np.flatnonzero(~cache.done).tolist(), "features: reading the record")
    marked = np.setdiff1d(np.arange(num_images), todo)
    bad = sum(distributed.all_gather_object(cache.nonfinite_rows(distributed.split(marked)),
                                            "features: checking stored rows"), [])
    if bad and distributed.is_main():
        print(f"features: {len(bad)} stored row(s) hold values that are not finite (a corrupt file); "
              "computing them again", file=sys.stderr, flush=True)
    todo = sorted(set(todo) | set(bad))
    if todo:
        batches = [todo[s:s + batch_size] for s in range(0, len(todo), batch_size)]
        mine = distributed.round_robin(batches)
        writer = _Writer(cache)
        with distributed.SharedProgress("features", desc="features", total=len(todo), unit="img",
                                        enabled=show_progress) as bar, ThreadPoolExecutor(1) as pool:
            pending = None  # the previous batch's write, overlapping this batch's computation
            try:
                for idx, feats, labels in rows(mine):
                    # float16 on the device (half the transfer); the copy waits for this batch only
                    feats = feats.detach().to(torch.float16).cpu()
                    if pending is not None:
                        bar.add(pending.result())
                    pending = pool.submit(writer.write, np.asarray(idx), feats, labels)
            except BaseException:
                if pending is not None:  # the finished batch is recorded before the error propagates
                    wait([pending])
                raise
            if pending is not None:
                bar.add(pending.result())
    distributed.on_main(lambda: _tidy(root, num_images), "features: merging the records on rank 0")
    return FeatureCache(root)


def compute_features(dataset, backbone, root, *, batch_size: int = 16, flip: bool = False,
                     device=None, num_workers: int = 0, show_progress: bool = True) -> FeatureCache:
    """Compute (or finish computing) the feature cache of ``dataset`` with ``backbone`` in ``root``.

    ``flip=True`` stores the average of the features of the image and of its horizontal mirror
    (mirrored back), as the official ``test.py`` does for evaluation. Images are decoded and resized by
    ``num_workers`` DataLoader processes (pinned memory on CUDA) while the backbone runs at its
    ``precision``; the cache's size is printed (stderr, with ``show_progress``) before it is created. An
    existing cache with other settings raises :class:`CacheMismatchError`; in a complete one, rows that
    are not finite are computed again. Under ``torchrun`` every rank computes its share (module docstring).
    """
    device = torch.device(distributed.device(device) or "cpu")
    S = dataset.size
    if S % backbone.patch:
        raise ValueError(f"resolution: {S} is not a multiple of the patch size {backbone.patch} of "
                         f"{backbone.name} (use {backbone.spec.resolution})")
    shape = (backbone.dim, S // backbone.patch, S // backbone.patch)

    def rows(batches):
        mine = [i for b in batches for i in b]
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=batch_size,
                                             num_workers=num_workers, shuffle=False,
                                             pin_memory=device.type == "cuda")
        model = backbone.to(device)
        for idx, (images, labels, _) in zip(batches, loader):
            images = images.to(device, non_blocking=True)
            feats = model(images)
            if flip:
                feats = 0.5 * (feats + model(images.flip(-1)).flip(-1))
            yield idx, feats, labels

    return _fill(root, _manifest(dataset, backbone.name, backbone.weights_id, flip, shape, backbone.precision),
                 len(dataset), shape, S, batch_size, rows, show_progress)


def store_features(dataset, features: torch.Tensor, root, *, backbone: str, weights: str,
                   flip: bool = False, batch_size: int = 16) -> FeatureCache:
    """Make a cache from features computed elsewhere (``(N, C, h, w)``, one row per image of
    ``dataset``); ``backbone``/``weights`` name them in the manifest. Labels come from ``dataset``."""
    if features.dim() != 4 or features.shape[0] != len(dataset):
        raise ValueError(f"features: expected ({len(dataset)}, C, h, w), got {tuple(features.shape)}")

    def rows(batches):
        for idx in batches:
            yield idx, features[torch.as_tensor(idx)], torch.stack([dataset[int(i)][1] for i in idx])

    return _fill(root, _manifest(dataset, backbone, weights, flip, features.shape[1:]), len(dataset),
                 features.shape[1:], dataset.size, batch_size, rows, show_progress=False)
