"""A run folder for command-line tests: a folder dataset of synthetic scenes (``imgs/``, ``labels/``), its
feature cache (``cache/``, the scenes' synthetic features) and pseudo labels without the CRF (``pseudo/``)."""
import numpy as np

from primaps_fast import fileio
from primaps_fast.cli import main
from primaps_fast.data.cache import store_features
from primaps_fast.data.datasets import FolderDataset
from primaps_fast.data.synthetic import make_scenes


def make_run_folder(root, images: int, size: int, seed: int):
    """Fill ``root`` (a ``pathlib.Path``) with ``images`` scenes of ``size`` px and 3 classes; returns it."""
    scenes = make_scenes(images, num_classes=3, image_size=size, seed=seed)
    for i, (im, lab) in enumerate(zip(scenes.images, scenes.labels)):
        fileio.write_png(root / "imgs" / f"s{i:02d}.png", im.permute(1, 2, 0).numpy())
        fileio.write_png(root / "labels" / f"s{i:02d}.png", lab.numpy().astype(np.uint8))
    ds = FolderDataset(root / "imgs", labels_root=root / "labels", size=size, num_classes=3)
    store_features(ds, scenes.features, root / "cache", backbone="synthetic", weights="synthetic")
    assert main(["pseudo", "--dataset-root", str(root / "imgs"), "--labels", str(root / "labels"),
                 "--resolution", str(size), "--cache", str(root / "cache"), "--out", str(root / "pseudo"),
                 "--no-crf"]) == 0
    return root
