"""Dataset layouts (tiny fake trees), label mappings, transforms and bad input."""
import os

import numpy as np
import pytest
import torch

import fake_trees
from primaps_fast.data import datasets as D
from primaps_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, unnormalize


@pytest.fixture
def nrng():
    return np.random.default_rng(0)


def _expected_norm(rgb):
    x = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def test_cityscapes_layout_and_27_class_mapping(tmp_path, nrng):
    labels = fake_trees.cityscapes(tmp_path, nrng, hw=(16, 16))
    ds = D.build_dataset(tmp_path, split="train", size=16)
    assert isinstance(ds, D.CityscapesDataset) and len(ds) == 4 and ds.num_classes == 27
    assert ds.names == sorted(labels)
    for i in range(len(ds)):
        img, lab, name = ds[i]
        raw = labels[name].astype(np.int64)
        want = np.where((raw >= 7) & (raw <= 33), raw - 7, 255)
        assert img.shape == (3, 16, 16) and img.dtype == torch.float32
        np.testing.assert_array_equal(lab.numpy(), want)


def test_cityscapes_resize_center_crop_shapes(tmp_path, nrng):
    fake_trees.cityscapes(tmp_path, nrng, hw=(24, 40), per_city=1)
    img, lab, _ = D.build_dataset(tmp_path, "cityscapes", size=12)[0]
    assert img.shape == (3, 12, 12) and lab.shape == (12, 12) and lab.dtype == torch.int64
    assert set(lab.unique().tolist()) <= set(range(27)) | {255}


def test_cocostuff_coarse_mapping(tmp_path, nrng):
    labels = fake_trees.cocostuff(tmp_path, nrng)
    ds = D.build_dataset(tmp_path, size=20)
    assert isinstance(ds, D.CocoStuffDataset) and len(ds) == 3 and ds.num_classes == 27
    for i in range(3):
        _, lab, name = ds[i]
        raw = labels[name]
        lut = np.array(D._COCO_COARSE + [255] * (256 - 182))
        np.testing.assert_array_equal(lab.numpy(), lut[raw])
        assert (lab.numpy()[0, :3] == 255).all()
    # spot checks of the official table
    assert D.COCOSTUFF_LUT[0] == 9 and D.COCOSTUFF_LUT[181] == 24 and D.COCOSTUFF_LUT[91] == 17


def test_potsdam_mat_layout(tmp_path, nrng):
    labels, images = fake_trees.potsdam(tmp_path, nrng)
    ds = D.build_dataset(tmp_path, size=16)
    assert isinstance(ds, D.PotsdamDataset) and ds.num_classes == 3
    img, lab, name = ds[1]
    want = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2}
    np.testing.assert_array_equal(lab.numpy(), np.vectorize(lambda v: want.get(v, 255))(labels[name]))
    torch.testing.assert_close(img, _expected_norm(images[name][..., :3]))
    with pytest.raises(D.DataError, match="labelled_test.txt"):
        D.PotsdamDataset(tmp_path, "val")


def test_folder_with_and_without_labels(tmp_path, nrng):
    labels = fake_trees.folder(tmp_path / "imgs", nrng, labels_root=tmp_path / "labels")
    ds = D.build_dataset(tmp_path / "imgs", labels_root=tmp_path / "labels", size=32, num_classes=3)
    assert isinstance(ds, D.FolderDataset) and len(ds) == 4 and ds.num_classes == 3
    img, lab, name = ds[2]
    np.testing.assert_array_equal(lab.numpy(), labels[name])
    unl = D.build_dataset(tmp_path / "imgs", size=32)
    assert (unl[0][1] == 255).all()
    # un-normalising the image returns the stored pixels
    from PIL import Image

    raw = np.array(Image.open(tmp_path / "imgs" / f"{name}.png"))
    np.testing.assert_array_equal(unnormalize(img).permute(1, 2, 0).numpy(), raw)
    torch.testing.assert_close(normalize(torch.from_numpy(raw).permute(2, 0, 1)), img)


def test_bad_input(tmp_path, nrng):
    fake_trees.folder(tmp_path / "imgs", nrng, n=2, labels_root=tmp_path / "labels")
    # corrupt image
    (tmp_path / "imgs" / "img0.png").write_bytes(b"\x89PNG not really")
    ds = D.build_dataset(tmp_path / "imgs", labels_root=tmp_path / "labels", size=8)
    with pytest.raises(D.DataError, match="img0.png"):
        ds[0]
    # label of the wrong size
    from PIL import Image

    Image.fromarray(np.zeros((5, 7), np.uint8)).save(tmp_path / "labels" / "img1.png")
    with pytest.raises(D.DataError, match="size 7x5"):
        ds[1]
    # missing label file
    os.remove(tmp_path / "labels" / "img1.png")
    with pytest.raises(D.DataError, match="label file missing"):
        ds[1]
    # unknown layout
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(D.DataError, match="unknown dataset layout"):
        D.build_dataset(tmp_path / "empty")
    with pytest.raises(D.DataError, match="not found"):
        D.build_dataset(tmp_path / "nope")
    with pytest.raises(ValueError, match="split"):
        D.CityscapesDataset(tmp_path, "bogus")


def test_missing_cityscapes_image(tmp_path, nrng):
    fake_trees.cityscapes(tmp_path, nrng, per_city=1, cities=("aachen",))
    ds = D.build_dataset(tmp_path, size=8)
    os.remove(ds.samples[0].image)
    with pytest.raises(D.DataError, match="image file missing"):
        ds[0]


def test_student_augment_keeps_shape_and_changes_pixels(rng):
    import random

    from primaps_fast.data.transforms import student_augment

    img = normalize(torch.randint(0, 256, (3, 24, 24), generator=rng, dtype=torch.uint8))
    out = student_augment(img, random.Random(0))
    assert out.shape == img.shape and torch.isfinite(out).all()
    assert not torch.equal(out, img)  # the Gaussian blur is always applied
