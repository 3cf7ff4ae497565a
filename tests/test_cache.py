"""Feature cache and pseudo-label folders: contents, resume after an interrupt, settings mismatch,
full disk (nothing already written is lost), concurrent writers (no completed row lost)."""
import errno
import os

import numpy as np
import pytest
import torch

import fake_trees
import primaps_fast
from primaps_fast import fileio
from primaps_fast.backbones import Backbone
from primaps_fast.data.cache import CacheMismatchError, FeatureCache, compute_features
from primaps_fast.data.datasets import build_dataset
from primaps_fast.pseudo_gen import PseudoLabelData, generate_pseudo_labels

SIZE = 32


@pytest.fixture(scope="module")
def backbone():
    return Backbone("dino_vits8", "random", seed=0)


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    fake_trees.folder(tmp_path / "imgs", rng, n=5, hw=(SIZE, 40), labels_root=tmp_path / "labels")
    return build_dataset(tmp_path / "imgs", labels_root=tmp_path / "labels", size=SIZE, num_classes=3)


class Interrupt(Exception):
    pass


def test_cache_contents(tmp_path, dataset, backbone):
    cache = compute_features(dataset, backbone, tmp_path / "cache", batch_size=2, show_progress=False)
    assert cache.complete and len(cache) == 5 and cache.feature_shape == (384, 4, 4)
    assert cache.features.dtype == np.float16 and isinstance(cache.features, np.memmap)
    images = torch.stack([dataset[i][0] for i in range(5)])
    want = backbone(images)
    torch.testing.assert_close(cache.get_features(range(5)), want, rtol=2e-3, atol=2e-3)
    labels = torch.stack([dataset[i][1] for i in range(5)])
    torch.testing.assert_close(cache.get_labels(range(5)), labels)
    assert cache.manifest["backbone"] == "dino_vits8" and cache.manifest["weights"] == "random:0"
    # flip averaging: mean of the features and the mirrored features of the mirrored image
    flip = compute_features(dataset, backbone, tmp_path / "flip", batch_size=5, flip=True, show_progress=False)
    want_f = 0.5 * (want + backbone(images.flip(-1)).flip(-1))
    torch.testing.assert_close(flip.get_features(range(5)), want_f, rtol=2e-3, atol=2e-3)


def test_size_stated_before_writing(tmp_path, dataset, backbone, capsys):
    """The size announced on stderr before the arrays are reserved is the size they take on disk."""
    compute_features(dataset, backbone, tmp_path / "cache", batch_size=5, show_progress=True)
    err = capsys.readouterr().err
    line = next(t for t in err.splitlines() if t.startswith(f"features: the cache {tmp_path / 'cache'} takes"))
    assert "for 5 images x 384x4x4 float16 (" in line and " free" in line
    on_disk = {n: os.path.getsize(tmp_path / "cache" / n) for n in ("features.npy", "labels.npy", "done.npy")}
    assert on_disk["features.npy"] > 5 * 384 * 4 * 4 * 2  # the data and an .npy header
    from primaps_fast.data.cache import _size, cache_bytes

    assert cache_bytes(5, (384, 4, 4), SIZE) == sum(on_disk.values())
    assert f"features.npy {_size(on_disk['features.npy'])}" in line
    assert f"takes {_size(sum(on_disk.values()))} for" in line


def test_bf16_cache_is_another_setting(tmp_path, dataset, backbone):
    """bf16 features are recorded in the manifest (fp32 caches have no entry) and never mixed with fp32."""
    bf16 = Backbone("dino_vits8", "random", seed=0, precision="bf16")
    cache = compute_features(dataset, bf16, tmp_path / "c", batch_size=5, show_progress=False)
    assert cache.manifest["precision"] == "bf16"
    images = torch.stack([dataset[i][0] for i in range(5)])
    want = backbone(images)
    got = cache.get_features(range(5))
    assert 1e-5 < ((got - want).norm() / want.norm()).item() < 2e-2
    with pytest.raises(CacheMismatchError, match="precision"):
        compute_features(dataset, backbone, tmp_path / "c", batch_size=5, show_progress=False)
    assert "precision" not in compute_features(dataset, backbone, tmp_path / "f", show_progress=False).manifest


def test_cache_resume_after_interrupt(tmp_path, dataset, backbone, monkeypatch):
    calls = []
    real = Backbone.forward

    def failing(self, images):
        calls.append(len(images))
        if len(calls) == 2:
            raise Interrupt
        return real(self, images)

    monkeypatch.setattr(Backbone, "forward", failing)
    with pytest.raises(Interrupt):
        compute_features(dataset, backbone, tmp_path / "c", batch_size=2, show_progress=False)
    part = FeatureCache(tmp_path / "c")
    assert part.done.tolist() == [True, True, False, False, False] and not part.complete
    with pytest.raises(RuntimeError, match="incomplete"):
        part.require_complete()
    monkeypatch.setattr(Backbone, "forward", lambda self, x: (calls.append(len(x)), real(self, x))[1])
    calls.clear()
    cache = compute_features(dataset, backbone, tmp_path / "c", batch_size=2, show_progress=False)
    assert sum(calls) == 3 and cache.complete  # only the 3 missing images were computed
    # the same batches ([0, 1], [2, 3], [4]) as the interrupted run and its resumption: matrix kernels may
    # round differently for another batch size (seen on the 16-core CPU of a GPU machine)
    fresh = compute_features(dataset, backbone, tmp_path / "fresh", batch_size=2, show_progress=False)
    np.testing.assert_array_equal(np.asarray(cache.features), np.asarray(fresh.features))
    calls.clear()
    compute_features(dataset, backbone, tmp_path / "c", batch_size=2, show_progress=False)
    assert calls == []  # complete: nothing recomputed


def test_writes_overlap_the_next_batch(tmp_path, dataset, backbone, monkeypatch):
    """A batch's rows are written on another thread while the next batch is computed: the first write
    waits until the second forward has started (it would time out if the two ran one after the other)."""
    import threading

    from primaps_fast.data import cache as cache_module

    second_forward, threads = threading.Event(), []
    real_forward, real_write = Backbone.forward, cache_module._Writer.write

    def forward(self, images):
        if threads:  # a batch was handed to the writer
            second_forward.set()
        return real_forward(self, images)

    def write(self, idx, feats, labels):
        threads.append(threading.current_thread())
        if len(threads) == 1:
            assert second_forward.wait(timeout=30), "the next batch was not computed during the write"
        return real_write(self, idx, feats, labels)

    monkeypatch.setattr(Backbone, "forward", forward)
    monkeypatch.setattr(cache_module._Writer, "write", write)
    cache = compute_features(dataset, backbone, tmp_path / "c", batch_size=2, show_progress=False)
    assert cache.complete and len(threads) == 3
    assert all(t is not threading.main_thread() for t in threads)
    monkeypatch.undo()
    fresh = compute_features(dataset, backbone, tmp_path / "fresh", batch_size=2, show_progress=False)
    np.testing.assert_array_equal(np.asarray(cache.features), np.asarray(fresh.features))


def test_cache_settings_mismatch(tmp_path, dataset, backbone):
    compute_features(dataset, backbone, tmp_path / "c", show_progress=False)
    with pytest.raises(CacheMismatchError, match="flip"):
        compute_features(dataset, backbone, tmp_path / "c", flip=True, show_progress=False)
    with pytest.raises(CacheMismatchError, match="weights"):
        compute_features(dataset, Backbone("dino_vits8", "random", seed=5), tmp_path / "c", show_progress=False)
    other = build_dataset(dataset.root, size=16)
    with pytest.raises(CacheMismatchError, match="resolution"):
        compute_features(other, backbone, tmp_path / "c", show_progress=False)
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError):
        compute_features(dataset, backbone, tmp_path / "user", show_progress=False)
    assert (tmp_path / "user" / "thesis.tex").read_text() == "precious"


def test_cache_full_disk(tmp_path, dataset, backbone, monkeypatch):
    compute_features(dataset, backbone, tmp_path / "c", batch_size=2, show_progress=False)
    before = (tmp_path / "c" / "done.npy").read_bytes()

    def full(f, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio, "_write_all", full)
    with pytest.raises(OSError) as err:
        fileio.write_npy(tmp_path / "c" / "done.npy", np.zeros(5, bool))
    assert err.value.errno == errno.ENOSPC and "no space left" in str(err.value)
    assert (tmp_path / "c" / "done.npy").read_bytes() == before
    assert [f for f in os.listdir(tmp_path / "c") if f.endswith(".tmp")] == []
    assert FeatureCache(tmp_path / "c").complete


def _pseudo_reference(dataset, cache):
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return primaps_fast.pseudo_labels(images, cache.get_features(range(len(dataset))), crf=False)


def test_pseudo_labels_folder(tmp_path, dataset, backbone, monkeypatch):
    from PIL import Image

    cache = compute_features(dataset, backbone, tmp_path / "c", batch_size=5, show_progress=False)
    out = tmp_path / "pseudo"
    real = primaps_fast.pseudo_labels
    calls = []

    def interrupted(images, feats, **kw):
        calls.append(len(images))
        if len(calls) == 2:
            raise Interrupt
        return real(images, feats, **kw)

    monkeypatch.setattr(primaps_fast, "pseudo_labels", interrupted)
    with pytest.raises(Interrupt):
        generate_pseudo_labels(dataset, out, cache=cache, crf=False, batch_size=2, show_progress=False)
    assert sorted(os.listdir(out / "pseudos")) == ["img0.png", "img1.png"]
    # a truncated pseudo label (a crash of an older, non-atomic writer) is recomputed
    data = (out / "pseudos" / "img1.png").read_bytes()
    (out / "pseudos" / "img1.png").write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(primaps_fast, "pseudo_labels", real)
    stats = generate_pseudo_labels(dataset, out, cache=cache, crf=False, batch_size=2, show_progress=False)
    assert stats["computed"] == 4 and stats["skipped"] == 1 and stats["images_per_s"] > 0
    want = _pseudo_reference(dataset, cache)
    for i, name in enumerate(dataset.names):
        got = np.array(Image.open(out / "pseudos" / f"{name}.png"))
        np.testing.assert_array_equal(got, want[i].numpy())
        np.testing.assert_array_equal(np.array(Image.open(out / "gts" / f"{name}.png")), dataset[i][1].numpy())
        assert np.array(Image.open(out / "imgs" / f"{name}.png")).shape == (SIZE, SIZE, 3)
    # other settings: never silently reused
    with pytest.raises(CacheMismatchError, match="threshold"):
        generate_pseudo_labels(dataset, out, cache=cache, crf=False, threshold=0.3, show_progress=False)
    # the EM training view: features from the cache + pseudo labels
    data = PseudoLabelData(cache, out)
    f, m, i = data[3]
    torch.testing.assert_close(f, cache.get_features([3])[0])
    np.testing.assert_array_equal(m.numpy(), want[3].numpy())


def test_pseudo_labels_full_disk_keeps_files(tmp_path, dataset, backbone, monkeypatch):
    cache = compute_features(dataset, backbone, tmp_path / "c", batch_size=5, show_progress=False)
    out = tmp_path / "pseudo"
    generate_pseudo_labels(dataset, out, cache=cache, crf=False, batch_size=5, show_progress=False)
    before = {n: (out / "pseudos" / n).read_bytes() for n in os.listdir(out / "pseudos")}
    os.remove(out / "pseudos" / "img4.png")
    monkeypatch.setattr(fileio, "_write_all", lambda f, d: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError, match="no space left"):
        generate_pseudo_labels(dataset, out, cache=cache, crf=False, batch_size=5, show_progress=False)
    for n, data in before.items():
        if n != "img4.png":
            assert (out / "pseudos" / n).read_bytes() == data
    assert not any(f.endswith(".tmp") for d in ("imgs", "gts", "pseudos") for f in os.listdir(out / d))


def test_pseudo_labels_with_backbone_matches_cache(tmp_path, dataset, backbone):
    cache = compute_features(dataset, backbone, tmp_path / "c", batch_size=5, show_progress=False)
    a = generate_pseudo_labels(dataset, tmp_path / "a", backbone=backbone, crf=False, show_progress=False)
    assert a["computed"] == 5
    with pytest.raises(ValueError, match="exactly one"):
        generate_pseudo_labels(dataset, tmp_path / "b", crf=False)
    flip = compute_features(dataset, backbone, tmp_path / "f", flip=True, show_progress=False)
    with pytest.raises(ValueError, match="flip"):
        generate_pseudo_labels(dataset, tmp_path / "b", cache=flip, crf=False)
    assert cache.complete


def test_concurrent_writers_lose_no_completed_row(tmp_path, dataset, backbone):
    """Two writers (two ranks) finishing rows in turn: every row stays marked complete (each writer has its
    own record; the records are merged on read and folded into done.npy by the next run)."""
    from primaps_fast.data.cache import _manifest, _open_or_create, _Writer

    shape = (backbone.dim, SIZE // 8, SIZE // 8)
    _open_or_create(tmp_path / "c", _manifest(dataset, "dino_vits8", "random:0", False, shape), 5, shape, SIZE)
    cache = FeatureCache(tmp_path / "c")
    writers = [_Writer(cache), _Writer(cache)]
    feats = torch.randn(5, *shape)
    labels = torch.stack([dataset[i][1] for i in range(5)])
    for i in range(5):
        writers[i % 2].write([i], feats[i:i + 1], labels[i:i + 1])
    assert FeatureCache(tmp_path / "c").complete
    parts = sorted(f for f in os.listdir(tmp_path / "c") if f.startswith("done.part-"))
    assert len(parts) == 2
    # a rerun folds the records into done.npy, the layout of a finished cache (also of older versions)
    compute_features(dataset, backbone, tmp_path / "c", show_progress=False)
    assert sorted(os.listdir(tmp_path / "c")) == ["done.npy", "features.npy", "labels.npy", "manifest.json"]
    assert np.load(tmp_path / "c" / "done.npy").all()
    torch.testing.assert_close(FeatureCache(tmp_path / "c").get_features(range(5)), feats.half().float())
