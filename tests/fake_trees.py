"""Tiny fake dataset trees in the official layouts (shared by the data, cache and CLI tests)."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image


def _rgb(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def cityscapes(root, rng, *, split="train", cities=("aachen", "bonn"), per_city=2, hw=(24, 40)):
    """Returns {stem: raw label-id array}."""
    labels = {}
    for city in cities:
        os.makedirs(os.path.join(root, "leftImg8bit", split, city), exist_ok=True)
        os.makedirs(os.path.join(root, "gtFine", split, city), exist_ok=True)
        for k in range(per_city):
            stem = f"{city}_{k:06d}_000019"
            Image.fromarray(_rgb(rng, *hw)).save(os.path.join(root, "leftImg8bit", split, city,
                                                              stem + "_leftImg8bit.png"))
            lab = rng.integers(0, 36, hw).astype(np.uint8)
            Image.fromarray(lab).save(os.path.join(root, "gtFine", split, city, stem + "_gtFine_labelIds.png"))
            labels[stem] = lab
    return labels


def cocostuff(root, rng, *, split_dir="train2017", n=3, hw=(20, 20)):
    os.makedirs(os.path.join(root, "curated", split_dir), exist_ok=True)
    os.makedirs(os.path.join(root, "images", split_dir), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations", split_dir), exist_ok=True)
    ids, labels = [f"0000000{i:05d}" for i in range(n)], {}
    with open(os.path.join(root, "curated", split_dir, "Coco164kFull_Stuff_Coarse_7.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")
    for i in ids:
        Image.fromarray(_rgb(rng, *hw)).save(os.path.join(root, "images", split_dir, i + ".jpg"))
        lab = rng.integers(0, 182, hw).astype(np.uint8)
        lab[0, :3] = 255
        Image.fromarray(lab).save(os.path.join(root, "annotations", split_dir, i + ".png"))
        labels[i] = lab
    return labels


def potsdam(root, rng, *, n=3, hw=(16, 16), list_name="labelled_train.txt"):
    from scipy.io import savemat

    os.makedirs(os.path.join(root, "imgs"), exist_ok=True)
    os.makedirs(os.path.join(root, "gt"), exist_ok=True)
    ids, labels, images = [f"{i}_{i}_{i}" for i in range(n)], {}, {}
    with open(os.path.join(root, list_name), "w") as f:
        f.write("\n".join(ids) + "\n")
    for i in ids:
        img = rng.integers(0, 256, hw + (4,), dtype=np.uint8)
        savemat(os.path.join(root, "imgs", i + ".mat"), {"img": img})
        lab = rng.integers(0, 7, hw).astype(np.uint8)
        savemat(os.path.join(root, "gt", i + ".mat"), {"gt": lab})
        labels[i], images[i] = lab, img
    return labels, images


def folder(root, rng, *, n=4, hw=(32, 32), labels_root=None, num_classes=3):
    os.makedirs(root, exist_ok=True)
    labels = {}
    for i in range(n):
        Image.fromarray(_rgb(rng, *hw)).save(os.path.join(root, f"img{i}.png"))
        if labels_root is not None:
            os.makedirs(labels_root, exist_ok=True)
            lab = rng.integers(0, num_classes, hw).astype(np.uint8)
            Image.fromarray(lab).save(os.path.join(labels_root, f"img{i}.png"))
            labels[f"img{i}"] = lab
    return labels
