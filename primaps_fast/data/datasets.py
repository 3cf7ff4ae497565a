"""Datasets in the layouts the official code reads (STEGO's preparation), plus a plain image folder.

Every dataset yields ``(image, label, name)``: ``image`` float32 ``(3, S, S)`` (resized so the shorter
side is ``S``, centre-cropped, ImageNet-normalised: the official validation transforms), ``label``
int64 ``(S, S)`` with class ids in ``[0, num_classes)`` and ``255`` for unlabelled pixels, and ``name``
the file stem used for cached outputs (``<name>.png``, the official ``cached_datasets/.../pseudos``
convention: Cityscapes' ``_leftImg8bit`` suffix removed).

Layouts (``root`` is the dataset folder):

* ``cityscapes`` (torchvision layout): ``leftImg8bit/<split>/<city>/<id>_leftImg8bit.png`` and
  ``gtFine/<split>/<city>/<id>_gtFine_labelIds.png``; the 27 classes are the label ids 7..33
  (``id - 7``), everything else is ignored (official ``IdsToTrainIds``).
* ``cocostuff`` (COCO-Stuff-27, STEGO's curated lists): ``curated/<train2017|val2017>/<list>``,
  ``images/<dir>/<id>.jpg``, ``annotations/<dir>/<id>.png``; the 182 fine ids map to 27 coarse
  classes with the official table; ``255`` stays ignored.
* ``potsdam`` (Potsdam-3): ``<split list>.txt``, ``imgs/<id>.mat`` (key ``img``, first 3 channels),
  ``gt/<id>.mat`` (key ``gt``); fine ids {0, 4} -> 0, {1, 5} -> 1, {2, 3} -> 2, others ignored.
* ``folder``: every image file (``.jpg .jpeg .png .bmp .tif .tiff .webp``) under ``root``
  (recursively, sorted); labels optional, from ``labels_root`` as ``<same relative path>.png`` with
  the class ids as stored.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import torch

from primaps_fast.data.transforms import resize_center_crop, to_normalized_tensor

IGNORE = 255

CITYSCAPES_CLASSES = [
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge",
    "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky",
    "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle"]
COCOSTUFF_CLASSES = [
    "electronic", "appliance", "food-things", "furniture-things", "indoor", "kitchen", "accessory",
    "animal", "outdoor", "person", "sports", "vehicle", "ceiling", "floor", "food-stuff",
    "furniture-stuff", "rawmaterial", "textile", "wall", "window", "building", "ground", "plant", "sky",
    "solid", "structural", "water"]
POTSDAM_CLASSES = ["road", "building", "vegetation"]

# COCO-Stuff fine id (0..181) -> COCO-Stuff-27 coarse class (the official/STEGO table, row by row).
_COCO_COARSE = (
    [9] + [11] * 8 + [8] * 6 + [7] * 10 + [6] * 8 + [10] * 10 + [5] * 8 + [2] * 10 + [3] * 10 + [0] * 6
    + [1] * 6 + [4] * 8
    + [17, 17, 22, 20, 20, 22, 15, 25, 16, 13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21, 15, 25, 13, 13, 13,
       13, 13, 22, 26, 14, 14, 15, 22, 21, 21, 24, 20, 22, 15, 17, 16, 15, 22, 24, 21, 17, 25, 16, 21, 17,
       22, 16, 21, 21, 25, 21, 26, 21, 24, 20, 17, 14, 21, 26, 15, 23, 20, 21, 24, 15, 24, 22, 25, 15, 20,
       17, 17, 22, 14, 18, 18, 18, 18, 18, 18, 18, 26, 26, 19, 19, 24])
assert len(_COCO_COARSE) == 182

COCO_LISTS = {None: "Coco164kFull_Stuff_Coarse.txt", 6: "Coco164kFew_Stuff_6.txt",
              7: "Coco164kFull_Stuff_Coarse_7.txt"}
POTSDAM_SPLITS = {"train": ["labelled_train.txt"], "unlabelled_train": ["unlabelled_train.txt"],
                  "val": ["labelled_test.txt"], "train+val": ["labelled_train.txt", "labelled_test.txt"],
                  "all": ["all.txt"]}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _lut(mapping) -> np.ndarray:
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for fine, coarse in mapping.items():
        lut[fine] = coarse
    return lut


CITYSCAPES_LUT = _lut({i: i - 7 for i in range(7, 34)})
COCOSTUFF_LUT = _lut(dict(enumerate(_COCO_COARSE)))
POTSDAM_LUT = _lut({0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2})


class DataError(RuntimeError):
    """A missing, unreadable or inconsistent dataset file (the message names the file)."""


class Sample(NamedTuple):
    name: str
    image: str
    label: str | None


class SegmentationDataset(torch.utils.data.Dataset):
    """Common loading: read, check, resize + centre crop, map label ids, normalise."""

    kind = "folder"
    classes: list = []

    def __init__(self, root, samples, *, size: int = 320, lut: np.ndarray | None = None,
                 num_classes: int | None = None, split: str = ""):
        if not samples:
            raise DataError(f"{self.kind} dataset at {root} (split {split!r}) has no images")
        names = [s.name for s in samples]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})[:3]
            raise DataError(f"{self.kind} dataset at {root}: image names are not unique (e.g. {dup})")
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size: expected a positive int, got {size!r}")
        self.root = os.fspath(root)
        self.samples = list(samples)
        self.size = size
        self.lut = lut
        self.split = split
        self.num_classes = num_classes if num_classes is not None else len(self.classes)

    def __len__(self):
        return len(self.samples)

    @property
    def names(self):
        return [s.name for s in self.samples]

    def identity(self) -> dict:
        """What the caches record about this dataset (a cache of another dataset is rejected)."""
        return {"kind": self.kind, "root": os.path.abspath(self.root), "split": self.split,
                "num_images": len(self), "size": self.size}

    # -- readers (overridden by Potsdam's .mat files) --
    def read_image(self, path):
        from PIL import Image

        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except FileNotFoundError:
            raise DataError(f"image file missing: {path}") from None
        except Exception as exc:  # PIL raises several types for truncated/corrupt files
            raise DataError(f"cannot read image {path}: {exc}") from exc

    def read_label(self, path) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(path) as im:
                return np.array(im)
        except FileNotFoundError:
            raise DataError(f"label file missing: {path}") from None
        except Exception as exc:
            raise DataError(f"cannot read label {path}: {exc}") from exc

    def __getitem__(self, index):
        from PIL import Image

        sample = self.samples[index]
        image = self.read_image(sample.image)
        if sample.label is None:
            label = np.full((image.height, image.width), IGNORE, dtype=np.uint8)
        else:
            label = self.read_label(sample.label)
            if label.ndim == 3:  # an RGB(A) label PNG: all channels equal in id maps; take the first
                label = label[..., 0]
            if label.shape != (image.height, image.width):
                raise DataError(f"label {sample.label} has size {label.shape[1]}x{label.shape[0]} but its "
                                f"image {sample.image} is {image.width}x{image.height}")
            if label.dtype != np.uint8:
                if label.min() < 0 or label.max() > 255:
                    raise DataError(f"label {sample.label}: ids outside 0..255")
                label = label.astype(np.uint8)
        if self.lut is not None:
            label = self.lut[label]
        image, label_im = resize_center_crop(image, Image.fromarray(label), self.size)
        return to_normalized_tensor(image), torch.from_numpy(np.array(label_im, dtype=np.int64)), sample.name


def _require(path, what, layout_help):
    if not os.path.exists(path):
        raise DataError(f"{what} not found: {path}\n{layout_help}")


class CityscapesDataset(SegmentationDataset):
    kind = "cityscapes"
    classes = CITYSCAPES_CLASSES
    HELP = ("expected the torchvision Cityscapes layout: <root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png "
            "and <root>/gtFine/<split>/<city>/*_gtFine_labelIds.png")

    def __init__(self, root, split: str = "train", *, size: int = 320):
        if split not in ("train", "val", "test"):
            raise ValueError(f"split: expected train, val or test for cityscapes, got {split!r}")
        image_dir = os.path.join(root, "leftImg8bit", split)
        _require(image_dir, "cityscapes image folder", self.HELP)
        samples = []
        for city in sorted(os.listdir(image_dir)):
            city_dir = os.path.join(image_dir, city)
            if not os.path.isdir(city_dir):
                continue
            for fn in sorted(os.listdir(city_dir)):
                if not fn.endswith("_leftImg8bit.png"):
                    continue
                stem = fn[: -len("_leftImg8bit.png")]
                label = os.path.join(root, "gtFine", split, city, stem + "_gtFine_labelIds.png")
                samples.append(Sample(stem, os.path.join(city_dir, fn), label))
        super().__init__(root, samples, size=size, lut=CITYSCAPES_LUT, split=split)


class CocoStuffDataset(SegmentationDataset):
    kind = "cocostuff"
    classes = COCOSTUFF_CLASSES
    HELP = ("expected STEGO's COCO-Stuff layout: <root>/curated/<train2017|val2017>/<list>.txt, "
            "<root>/images/<dir>/<id>.jpg, <root>/annotations/<dir>/<id>.png")

    def __init__(self, root, split: str = "train", *, size: int = 320, subset=7):
        dirs = {"train": ["train2017"], "val": ["val2017"], "train+val": ["train2017", "val2017"]}
        if split not in dirs:
            raise ValueError(f"split: expected one of {sorted(dirs)} for cocostuff, got {split!r}")
        if subset not in COCO_LISTS:
            raise ValueError(f"subset: expected None, 6 or 7, got {subset!r}")
        samples = []
        for d in dirs[split]:
            lst = os.path.join(root, "curated", d, COCO_LISTS[subset])
            _require(lst, "cocostuff image list", self.HELP)
            with open(lst) as f:
                for line in f:
                    img_id = line.strip()
                    if img_id:
                        samples.append(Sample(img_id, os.path.join(root, "images", d, img_id + ".jpg"),
                                              os.path.join(root, "annotations", d, img_id + ".png")))
        super().__init__(root, samples, size=size, lut=COCOSTUFF_LUT, split=split)


class PotsdamDataset(SegmentationDataset):
    kind = "potsdam"
    classes = POTSDAM_CLASSES
    HELP = ("expected STEGO's Potsdam-3 layout: <root>/labelled_train.txt (and labelled_test.txt, "
            "unlabelled_train.txt, all.txt), <root>/imgs/<id>.mat (key 'img'), <root>/gt/<id>.mat (key 'gt')")

    def __init__(self, root, split: str = "train", *, size: int = 320):
        if split not in POTSDAM_SPLITS:
            raise ValueError(f"split: expected one of {sorted(POTSDAM_SPLITS)} for potsdam, got {split!r}")
        samples = []
        for lst in POTSDAM_SPLITS[split]:
            path = os.path.join(root, lst)
            _require(path, "potsdam image list", self.HELP)
            with open(path) as f:
                for line in f:
                    img_id = line.strip()
                    if img_id:
                        gt = os.path.join(root, "gt", img_id + ".mat")
                        samples.append(Sample(img_id, os.path.join(root, "imgs", img_id + ".mat"),
                                              gt if os.path.exists(gt) else None))
        super().__init__(root, samples, size=size, lut=POTSDAM_LUT, split=split)

    @staticmethod
    def _loadmat(path, key, what):
        from scipy.io import loadmat

        try:
            return np.asarray(loadmat(path)[key])
        except FileNotFoundError:
            raise DataError(f"{what} file missing: {path}") from None
        except KeyError:
            raise DataError(f"{what} {path} has no variable {key!r}") from None
        except Exception as exc:
            raise DataError(f"cannot read {what} {path}: {exc}") from exc

    def read_image(self, path):
        from PIL import Image

        img = self._loadmat(path, "img", "image")
        if img.ndim != 3 or img.shape[2] < 3:
            raise DataError(f"image {path}: expected (H, W, >=3) channels, got shape {img.shape}")
        img = img[..., :3]
        if img.dtype != np.uint8:  # STEGO stores uint8; accept floats in [0, 1] too
            img = (np.clip(img, 0, 1) * 255).round() if img.max() <= 1.0 else np.clip(img, 0, 255)
            img = img.astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(img))

    def read_label(self, path):
        gt = self._loadmat(path, "gt", "label")
        return gt.astype(np.int64)


class FolderDataset(SegmentationDataset):
    kind = "folder"

    def __init__(self, root, *, labels_root=None, size: int = 320, num_classes: int | None = None):
        if not os.path.isdir(root):
            raise DataError(f"image folder not found: {root}")
        samples = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in sorted(filenames):
                if fn.lower().endswith(IMAGE_EXTENSIONS) and not fn.startswith("."):
                    rel = os.path.relpath(os.path.join(dirpath, fn), root)
                    stem = os.path.splitext(rel)[0]
                    label = None
                    if labels_root is not None:
                        label = os.path.join(labels_root, stem + ".png")
                    samples.append(Sample(stem.replace(os.sep, "__"), os.path.join(root, rel), label))
        if not samples:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
        if labels_root is not None and not os.path.isdir(labels_root):
            raise DataError(f"label folder not found: {labels_root}")
        self.classes = [f"class {i}" for i in range(num_classes or 0)]
        super().__init__(root, samples, size=size, num_classes=num_classes or 0, split="")

    def identity(self) -> dict:
        return dict(super().identity(), labels=self.samples[0].label is not None)


DATASETS = {"cityscapes": CityscapesDataset, "cocostuff": CocoStuffDataset, "potsdam": PotsdamDataset,
            "folder": FolderDataset}


def class_names(kind: str, num_classes: int) -> list:
    """Names of the ``num_classes`` classes of the dataset layout ``kind`` (``class i`` when it names none)."""
    known = DATASETS[kind].classes if kind in DATASETS else []
    return list(known) if len(known) == num_classes else [f"class {i}" for i in range(num_classes)]


def default_num_classes(kind: str) -> int | None:
    """The class count of the dataset layout ``kind`` (27 Cityscapes / COCO-Stuff, 3 Potsdam), None for a folder."""
    return len(DATASETS[kind].classes) or None if kind in DATASETS else None


def detect_layout(root) -> str:
    """The dataset layout of ``root``: cityscapes, cocostuff, potsdam or folder (loose images)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"dataset root not found: {root}")
    if os.path.isdir(os.path.join(root, "leftImg8bit")):
        return "cityscapes"
    if os.path.isdir(os.path.join(root, "curated")):
        return "cocostuff"
    if os.path.isdir(os.path.join(root, "imgs")) and any(
            os.path.exists(os.path.join(root, f)) for lists in POTSDAM_SPLITS.values() for f in lists):
        return "potsdam"
    for _, _, files in os.walk(root):
        if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files):
            return "folder"
    raise DataError(
        f"unknown dataset layout at {root}: expected Cityscapes (leftImg8bit/, gtFine/), COCO-Stuff "
        "(curated/, images/, annotations/), Potsdam (imgs/, gt/, labelled_train.txt) or a folder of images")


def build_dataset(root, kind: str | None = None, split: str = "train", *, size: int = 320,
                  labels_root=None, num_classes: int | None = None) -> SegmentationDataset:
    """Open the dataset at ``root``; ``kind=None`` detects the layout."""
    kind = kind or detect_layout(root)
    if kind not in DATASETS:
        raise ValueError(f"dataset: expected one of {sorted(DATASETS)}, got {kind!r}")
    if kind == "folder":
        return FolderDataset(root, labels_root=labels_root, size=size, num_classes=num_classes)
    return DATASETS[kind](root, split, size=size)
