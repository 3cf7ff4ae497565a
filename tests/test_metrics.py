"""UnsupervisedMetrics vs an independent computation (brute-force matching), and the linear probe."""
import itertools
import json

import numpy as np
import pytest
import torch

from primaps_fast import UnsupervisedMetrics, fileio
from primaps_fast.cli import main
from primaps_fast.data.cache import store_features
from primaps_fast.data.datasets import FolderDataset
from primaps_fast.data.synthetic import make_scenes
from primaps_fast.metrics import linear_probe


def _brute_force(preds, target, k):
    """Best cluster->class permutation by enumeration (maximising matched pixels), then IoU/accuracy."""
    p, t = preds.reshape(-1).numpy(), target.reshape(-1).numpy()
    keep = (t >= 0) & (t < k)
    p, t = p[keep], t[keep]
    conf = np.zeros((k, k), dtype=np.int64)  # conf[class, cluster]
    np.add.at(conf, (t, p), 1)
    best = max(itertools.permutations(range(k)), key=lambda perm: sum(conf[perm[c], c] for c in range(k)))
    mapped = np.array(best)[p]  # cluster c -> class best[c]
    ious = []
    for c in range(k):
        inter = np.sum((mapped == c) & (t == c))
        union = np.sum((mapped == c) | (t == c))
        ious.append(np.nan if union == 0 else inter / union)
    ious = np.array(ious)
    return 100 * np.nanmean(ious), 100 * np.mean(mapped == t), 100 * ious


@pytest.mark.parametrize("k", [2, 4, 5])
def test_matches_brute_force(rng, k):
    target = torch.randint(-1, k + 1, (3, 17, 19), generator=rng)
    noise = torch.randint(0, k, target.shape, generator=rng)
    perm = torch.randperm(k, generator=rng)
    preds = torch.where(torch.rand(target.shape, generator=rng) < 0.6, perm[target.clamp(0, k - 1)], noise)
    m = UnsupervisedMetrics(k)
    m.update(preds[:2], target[:2])
    m.update(preds[2:], target[2:])
    got = m.compute()
    miou, acc, ious = _brute_force(preds, target, k)
    assert got["mIoU"] == pytest.approx(miou, rel=1e-6)
    assert got["Accuracy"] == pytest.approx(acc, rel=1e-6)
    np.testing.assert_allclose(got["class_iou"], ious, rtol=1e-6)


def test_permuted_labels_give_100(rng):
    target = torch.randint(0, 6, (2, 20, 20), generator=rng)
    preds = torch.randperm(6, generator=rng)[target]
    target[0, :3] = 255
    m = UnsupervisedMetrics(6)
    m.update(preds, target)
    out = m.compute()
    assert out["mIoU"] == pytest.approx(100) and out["Accuracy"] == pytest.approx(100)
    m = UnsupervisedMetrics(6, hungarian=False)
    m.update((target + 1) % 6, target)  # a derangement: no pixel right without the matching
    assert m.compute()["Accuracy"] == 0
    m = UnsupervisedMetrics(6)
    m.update((target + 1) % 6, target)
    assert m.compute()["Accuracy"] == pytest.approx(100)


def test_no_hungarian_is_identity_matching(rng):
    target = torch.randint(0, 3, (50,), generator=rng)
    preds = torch.randint(0, 3, (50,), generator=rng)
    m = UnsupervisedMetrics(3, hungarian=False)
    m.update(preds, target)
    out = m.compute()
    assert out["Accuracy"] == pytest.approx(100 * (preds == target).float().mean().item())
    ious = [((preds == c) & (target == c)).sum().item() / ((preds == c) | (target == c)).sum().item()
            for c in range(3)]
    assert out["class_iou"] == pytest.approx([100 * x for x in ious])


def test_extra_clusters_merge_into_their_class(rng):
    target = torch.randint(0, 3, (400,), generator=rng)
    preds = target.clone()
    preds[(target == 1) & (torch.rand(400, generator=rng) < 0.5)] = 3  # class 1 split over clusters 1 and 3
    m = UnsupervisedMetrics(3, extra_clusters=1)
    m.update(preds, target)
    assert m.compute()["mIoU"] == pytest.approx(100)


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_classes"):
        UnsupervisedMetrics(1)
    m = UnsupervisedMetrics(3)
    with pytest.raises(ValueError, match="preds"):
        m.update(torch.zeros(4, dtype=torch.long), torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="preds"):
        m.update(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="preds"):
        m.update(torch.full((4,), 3), torch.zeros(4, dtype=torch.long))


def test_linear_probe_learns_separable_features(rng):
    k, c = 4, 8
    labels = torch.randint(0, k, (6, 8, 8), generator=rng)
    centres = torch.randn(k, c, generator=rng) * 3
    feats = centres[labels].permute(0, 3, 1, 2) + 0.1 * torch.randn(6, c, 8, 8, generator=rng)
    target = labels.repeat_interleave(2, 1).repeat_interleave(2, 2)  # label resolution 16x16
    target[:, 0, 0] = 255
    out = linear_probe(feats, target, k, epochs=30, lr=5e-2, batch_size=3)
    assert out["Accuracy"] > 90
    with pytest.raises(ValueError, match="labels"):
        linear_probe(feats, target[:3], k)


def test_class_count_is_bounded_before_allocating():
    """20000 classes aborted the process inside scipy and 100000 asked for 80 GB at creation."""
    for k in (20000, 100000, 2 ** 40):
        with pytest.raises(ValueError, match=r"^num_classes: expected an int in \[2, 4096\]"):
            UnsupervisedMetrics(k)
    with pytest.raises(ValueError, match="^extra_clusters: "):
        UnsupervisedMetrics(4000, extra_clusters=100)
    with pytest.raises(TypeError, match="^num_classes: "):
        UnsupervisedMetrics(3.0)
    UnsupervisedMetrics(4000, extra_clusters=96)


def test_no_labelled_pixels_is_an_error_not_nan():
    m = UnsupervisedMetrics(3)
    m.update(torch.zeros(10, dtype=torch.long), torch.full((10,), 255))
    m.update(torch.zeros(4, dtype=torch.long), torch.tensor([3, 4, -1, 7]))  # outside [0, 3): ignored too
    with pytest.raises(ValueError, match="^target: no labelled pixels"):
        m.compute()
    m.update(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    assert m.compute()["Accuracy"] == 100


def test_json_written_by_the_package_is_valid(tmp_path):
    fileio.write_json(tmp_path / "ok.json", {"a": [1.5, None]})
    for bad in (float("nan"), float("inf"), [1.0, float("-inf")]):
        with pytest.raises(ValueError, match="^obj: cannot write .*bad.json as JSON: it contains NaN or an infinity"):
            fileio.write_json(tmp_path / "bad.json", {"x": bad})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.json"]  # nothing written, no temporary left


def _unlabelled_run(tmp_path):
    """A folder dataset without labels: its cache has only unlabelled pixels (255)."""
    scenes = make_scenes(4, num_classes=3, image_size=32, seed=5)
    for i, (im, lab) in enumerate(zip(scenes.images, scenes.labels)):
        fileio.write_png(tmp_path / "imgs" / f"s{i}.png", im.permute(1, 2, 0).numpy())
        fileio.write_png(tmp_path / "labels" / f"s{i}.png", lab.numpy().astype(np.uint8))
    store_features(FolderDataset(tmp_path / "imgs", size=32), scenes.features, tmp_path / "nolabels",
                   backbone="synthetic", weights="synthetic")
    ds = FolderDataset(tmp_path / "imgs", labels_root=tmp_path / "labels", size=32, num_classes=3)
    store_features(ds, scenes.features, tmp_path / "cache", backbone="synthetic", weights="synthetic")
    assert main(["pseudo", "--dataset-root", str(tmp_path / "imgs"), "--labels", str(tmp_path / "labels"),
                 "--resolution", "32", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "pseudo"),
                 "--no-crf"]) == 0
    assert main(["train", "--cache", str(tmp_path / "cache"), "--pseudo", str(tmp_path / "pseudo"), "--out",
                 str(tmp_path / "run"), "--num-classes", "3", "--batch-size", "2", "--epochs", "1"]) == 0


def test_eval_without_labels_fails_before_loading_anything(tmp_path, capsys):
    """`eval` on a cache without ground truth used to exit 0 printing nan and write a results.json that is not
    JSON; it now stops before the checkpoint is read (a missing checkpoint is not even noticed)."""
    _unlabelled_run(tmp_path)
    for ckpt in (tmp_path / "run" / "last.pt", tmp_path / "missing.pt"):
        assert main(["eval", "--checkpoint", str(ckpt), "--cache", str(tmp_path / "nolabels"), "--out",
                     str(tmp_path / "eval")]) == 1
        assert "has no labelled pixels" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()
    # with labels, a class that is neither present nor predicted has an undefined IoU: null in valid JSON
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--cache", str(tmp_path / "cache"),
                 "--num-classes", "3", "--out", str(tmp_path / "eval")]) == 0
    text = (tmp_path / "eval" / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text)
