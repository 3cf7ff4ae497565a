"""PriMaPsEM vs the reference port of the official training step (primaps_fast.reference.em)."""
import pytest
import torch
import torch.nn.functional as F

import primaps_fast
from primaps_fast import PriMaPsEM, UnsupervisedMetrics, reference

B, C, h, K, H = 2, 16, 8, 5, 32


def _batch(gen, student=True):
    f = torch.randn(B, C, h, h, generator=gen)
    s = torch.randn(B, C, h, h, generator=gen) if student else None
    m = torch.randint(0, 7, (B, H, H), generator=gen)
    m[m == 6] = 255
    return f, m, s


def _pair(gen, **kw):
    protos = torch.randn(K, C, generator=gen)
    fast, ref = PriMaPsEM(K, C, **kw), reference.PriMaPsEM(K, C, **kw)
    fast.init_prototypes(protos)
    ref.init_prototypes(protos)
    return fast, ref


def test_steps_match_reference(rng):
    fast, ref = _pair(rng, ema_every=3)
    ema_changes = 0
    for i in range(20):
        f, m, s = _batch(rng, student=i % 2 == 0)
        before = fast.weight(ema=True).clone()
        a, b = fast.step(f, m, s), ref.step(f, m, s)
        ema_changes += int(not torch.equal(before, fast.weight(ema=True)))
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
        assert (a["labels"] != b["labels"]).float().mean() < 1e-3
        torch.testing.assert_close(fast.weight(), ref.weight(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fast.weight(ema=True), ref.weight(ema=True), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fast.g.detach(), ref.g.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fast.ema_v, ref.ema_v, rtol=1e-4, atol=1e-5)
    assert fast.ema_calls == ref.ema_calls == 6  # steps 3, 6, ..., 18: two copies then decays 2/3 .. 5/6
    assert ema_changes == 6


def test_ema_warmup_schedule(rng):
    em = PriMaPsEM(K, C, ema_every=1, ema_decay=0.7)
    f, m, _ = _batch(rng, student=False)
    em.step(f, m)  # step 0: no EMA
    assert em.ema_calls == 0
    # the official ema.py's n-th update: copy, copy (decay 1/2 after a copy), then 2/3, then 3/4 -> 0.7
    for decay in (0.0, 0.0, 2 / 3, 0.7):
        prev_ema = em.ema_v.clone()
        em.step(f, m)
        torch.testing.assert_close(em.ema_v, prev_ema * decay + em.v.detach() * (1 - decay), rtol=1e-5, atol=1e-6)


def test_state_dict_resume_is_exact(rng, tmp_path):
    fast, _ = _pair(rng, ema_every=2)
    batches = [_batch(rng) for _ in range(10)]
    for f, m, s in batches[:5]:
        fast.step(f, m, s)
    path = tmp_path / "em.pt"
    torch.save(fast.state_dict(), path)
    resumed = PriMaPsEM(K, C, ema_every=2, seed=7)
    resumed.load_state_dict(torch.load(path, weights_only=True))
    for f, m, s in batches[5:]:
        a, b = fast.step(f, m, s), resumed.step(f, m, s)
        assert a["loss"] == b["loss"]
    assert torch.equal(fast.weight(), resumed.weight())
    assert torch.equal(fast.weight(ema=True), resumed.weight(ema=True))
    assert (fast.global_step, fast.ema_calls) == (resumed.global_step, resumed.ema_calls)
    with pytest.raises(ValueError, match="num_classes"):
        PriMaPsEM(K + 1, C).load_state_dict(fast.state_dict())


def _clustered(gen, n=6):
    centres = torch.randn(K, C, generator=gen) * 4
    cls = torch.randint(0, K, (n, h, h), generator=gen)
    feats = centres[cls].permute(0, 3, 1, 2) + torch.randn(n, C, h, h, generator=gen)
    scale = torch.linspace(3, 1, C)[None, :, None, None]  # distinct principal variances
    return feats * scale


def test_init_pca_matches_reference_and_sets_head(rng):
    feats = _clustered(rng)
    em = PriMaPsEM(K, C)
    protos = em.init_pca([feats[:3], feats[3:]])
    want = reference.pca_prototypes(feats, K)
    torch.testing.assert_close(protos, want, rtol=0, atol=1e-4)
    other = PriMaPsEM(K, C)
    other.init_prototypes(protos)
    assert torch.equal(em.weight(), other.weight()) and torch.equal(em.weight(ema=True), other.weight(ema=True))
    torch.testing.assert_close(em.weight(), F.normalize(protos, dim=1))


def test_init_kmeans_matches_reference_and_sets_head(rng):
    feats = _clustered(rng)
    em = PriMaPsEM(K, C)
    protos = em.init_pca(feats)
    centres = em.init_kmeans([feats[:3], feats[3:]], epochs=2)
    torch.testing.assert_close(centres, reference.kmeans_prototypes([feats[:3], feats[3:]], protos, epochs=2),
                               rtol=1e-5, atol=1e-6)
    other = PriMaPsEM(K, C)
    other.init_prototypes(centres)
    assert torch.equal(em.weight(), other.weight()) and torch.equal(em.weight(ema=True), other.weight(ema=True))
    assert em.global_step == 0 and em.ema_calls == 0
    # the tensor form (shuffled batches) converges to the same clustering on separated clusters
    em2 = PriMaPsEM(K, C)
    em2.init_pca(feats)
    em2.init_kmeans(feats, epochs=2, batch_size=2)
    m = UnsupervisedMetrics(K)
    m.update(em2.predict(feats), em.predict(feats))
    assert m.compute()["Accuracy"] > 95


def test_predict_upsamples_scores(rng):
    em, _ = _pair(rng)
    f = torch.randn(B, C, h, h, generator=rng)
    got = em.predict(f, size=(H, H), use_ema=False)
    up = F.interpolate(f, (H, H), mode="bilinear", align_corners=False)
    want = torch.einsum("kc,bchw->bkhw", em.weight(), up).argmax(1)
    assert got.shape == (B, H, H) and got.dtype == torch.int64
    assert (got != want).float().mean() < 1e-3
    assert torch.equal(em.predict(f), torch.einsum("kc,bchw->bkhw", em.weight(ema=True), f).argmax(1))


def test_fit_equals_steps(rng):
    a, _ = _pair(rng, ema_every=2)
    b = PriMaPsEM(K, C, ema_every=2)
    b.load_state_dict(a.state_dict())
    loader = [_batch(rng, student=False)[:2] for _ in range(3)] + [_batch(rng)]
    hist = a.fit(loader, epochs=2, show_progress=False)
    losses = [b.step(*batch)["loss"] for _ in range(2) for batch in loader]
    assert hist == pytest.approx([sum(losses[:4]) / 4, sum(losses[4:]) / 4], rel=1e-6)
    assert torch.equal(a.weight(ema=True), b.weight(ema=True))
    with pytest.raises(ValueError, match="loader"):
        a.fit([], epochs=1, show_progress=False)


def test_bad_inputs(rng):
    em = PriMaPsEM(K, C)
    f, m, s = _batch(rng)
    with pytest.raises(ValueError, match="num_classes"):
        PriMaPsEM(1, C)
    with pytest.raises(TypeError, match="mask_ids"):
        em.step(f, m.float())
    with pytest.raises(ValueError, match="features"):
        em.step(f[:1], m)
    with pytest.raises(ValueError, match="student_features"):
        em.step(f, m, s[:, :, :4])
    with pytest.raises(ValueError, match="features"):
        em.step(f[:, :4], m)
    bad = f.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="features"):
        em.step(bad, m)
    with pytest.raises(ValueError, match="prototypes"):
        em.init_prototypes(torch.randn(K + 1, C))
    with pytest.raises(ValueError, match="features"):
        em.init_pca([])


def test_end_to_end_synthetic_scenes():
    from primaps_fast.data.synthetic import make_scenes

    n, classes, size = 16, 6, 128  # 16x16 feature maps: ~5 PriMaPs masks per image
    scenes = make_scenes(n, num_classes=classes, image_size=size, patch=8, dim=64, seed=3)
    pseudo = primaps_fast.pseudo_labels(scenes.images, scenes.features, crf=False)
    em = PriMaPsEM(classes, 64, ema_every=2, seed=3)
    em.init_pca(scenes.features)
    em.init_kmeans(scenes.features, epochs=2, batch_size=4)

    def miou(pred):
        m = UnsupervisedMetrics(classes)
        m.update(pred, scenes.labels)
        return m.compute()["mIoU"]

    kmeans = miou(em.predict(scenes.features, size=(size, size)))
    loader = [(scenes.features[i:i + 4], pseudo[i:i + 4]) for i in range(0, n, 4)]
    hist = em.fit(loader, epochs=4, show_progress=False)
    em_miou = miou(em.predict(scenes.features, size=(size, size)))
    print(f"synthetic scenes: k-means mIoU {kmeans:.2f}, PriMaPs-EM mIoU {em_miou:.2f}, losses {hist}")
    assert all(map(lambda x: x == x, hist))
    assert hist[-1] < hist[0]
    assert em_miou > 2 * 100 / classes  # far above a constant prediction (~100 / classes at best)


@pytest.mark.parametrize("b,hw,size", [(1, (5, 7), (19, 23)), (3, (4, 4), (16, 16))])
def test_odd_shapes_and_empty_masks_match_reference(rng, b, hw, size):
    protos = torch.randn(K, C, generator=rng)
    fast, ref = PriMaPsEM(K, C, ema_every=1), reference.PriMaPsEM(K, C, ema_every=1)
    fast.init_prototypes(protos)
    ref.init_prototypes(protos)
    for i in range(4):
        f = torch.randn(b, C, *hw, generator=rng)
        m = torch.randint(0, 4, (b, *size), generator=rng).to(torch.int32)
        if i % 2:
            m[0] = 255  # an image without any mask: no labels, zero loss contribution
        a, r = fast.step(f, m), ref.step(f, m)
        assert a["loss"] == pytest.approx(r["loss"], rel=1e-4, abs=1e-6)
        torch.testing.assert_close(fast.weight(ema=True), ref.weight(ema=True), rtol=1e-4, atol=1e-5)


def test_backend_reaches_the_e_and_m_steps(rng, monkeypatch):
    """PriMaPsEM(backend=...) runs its E-step and loss with that backend."""
    seen = []
    for name in ("assign_pseudo_labels", "focal_loss"):
        op = getattr(primaps_fast, name)
        monkeypatch.setattr(primaps_fast, name, lambda *a, _op=op, _n=name, **kw: seen.append((_n, kw["backend"]))
                            or _op(*a, **kw))
    a, _ = _pair(rng)
    b = PriMaPsEM(K, C, backend="reference")
    b.load_state_dict(a.state_dict())
    f, m, s = _batch(rng)
    ra, rb = a.step(f, m, s), b.step(f, m, s)
    assert seen == [("assign_pseudo_labels", None), ("focal_loss", None),
                    ("assign_pseudo_labels", "reference"), ("focal_loss", "reference")]
    assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4)
    with pytest.raises(ValueError, match="backend"):
        PriMaPsEM(K, C, backend="gpu")
    with pytest.raises(ValueError, match="backend='cuda'"):
        PriMaPsEM(K, C, backend="cuda").step(f, m)


def test_scores_are_the_heads_1x1_conv(rng):
    em = PriMaPsEM(K, C, seed=3)
    f = torch.randn(B, C, h, h, generator=rng)
    for ema in (True, False):
        torch.testing.assert_close(em.scores(f, use_ema=ema), torch.einsum("kc,bchw->bkhw", em.weight(ema=ema), f))


def test_bounds_are_checked_before_anything_is_allocated(rng):
    """Python ints that do not fit the kernels, non-finite numbers and sizes whose memory cannot be had are
    refused at the API with the argument's name (not pybind11's or torch's overflow messages)."""
    import math

    for kw, name, err in ((dict(seed=2 ** 64), "seed", ValueError), (dict(seed=math.inf), "seed", TypeError),
                          (dict(seed=1.5), "seed", TypeError), (dict(ignore_index=2 ** 63), "ignore_index", ValueError),
                          (dict(lr=math.inf), "lr", ValueError), (dict(lr="1e-3"), "lr", TypeError),
                          (dict(focal_gamma=-1.0), "focal_gamma", ValueError),
                          (dict(ema_decay=math.nan), "ema_decay", ValueError),
                          (dict(ema_every=2 ** 70), "ema_every", ValueError)):
        with pytest.raises(err, match=f"^{name}: "):
            PriMaPsEM(K, C, **kw)
    for k in (2 ** 63, 2 ** 24):
        with pytest.raises(ValueError, match="^num_classes: "):
            PriMaPsEM(k, C)
    with pytest.raises(ValueError, match=r"^num_classes: a head of 10000000 x 100000 weights needs [0-9.]+ GiB"):
        PriMaPsEM(10 ** 7, 10 ** 5)
    em = PriMaPsEM(K, C, seed=2 ** 63 - 1, ignore_index=-1)
    f, m, _ = _batch(rng, student=False)
    m[m == 255] = -1
    em.step(f, m)
    with pytest.raises(ValueError, match=r"^size: predicting 2 images at 100000x100000 needs [0-9.]+ GiB, more than"):
        em.predict(f, size=(10 ** 5, 10 ** 5))
    for size, err in (((0, 3), ValueError), ((2 ** 70, 1), ValueError), ((1.5, 2), TypeError), ("ab", TypeError),
                      ((1, 2, 3), TypeError)):
        with pytest.raises(err, match="^size: "):
            em.predict(f, size=size)
    with pytest.raises(ValueError, match="^epochs: "):
        em.init_kmeans(f, epochs=-1)


def test_missing_state_entries_are_named(rng):
    em = PriMaPsEM(K, C)
    f, m, _ = _batch(rng, student=False)
    em.step(f, m)
    for key in ("adam", "ema_g", "global_step", "num_classes"):
        sd = em.state_dict()
        del sd[key]
        with pytest.raises(ValueError, match=f"no '{key}' entry"):
            PriMaPsEM(K, C).load_state_dict(sd)
    sd = em.state_dict()
    sd["adam"] = [1, 2]
    with pytest.raises(ValueError, match="'adam' is a list"):
        PriMaPsEM(K, C).load_state_dict(sd)


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_head_tasks_run_in_order_and_raise(threads):
    """The heads' BLAS tasks run on the C++ kernels' threads (primaps_fast.em._run): every result in task
    order at any thread count, and an exception in one task reaches the caller (on several threads after
    every other task ran; on one, the tasks after it do not run)."""
    from primaps_fast.em import _run, deterministic_blas

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(7, 33, 29, generator=torch.Generator().manual_seed(threads))
        got = _run([lambda i=i: torch.mm(x[i], x[i].t()) for i in range(7)])
        with deterministic_blas():  # each task's MKL thread count
            assert all(torch.equal(g, torch.mm(x[i], x[i].t())) for i, g in enumerate(got))
        ran = []

        def task(i):
            ran.append(i)
            if i == 3:
                raise KeyError("task 3")
            return i

        with pytest.raises(KeyError, match="task 3"):
            _run([lambda i=i: task(i) for i in range(6)])
        assert sorted(ran) == list(range(6 if threads > 1 else 4))
    finally:
        torch.set_num_threads(before)


def test_training_is_identical_at_any_thread_count():
    """MKL's GEMMs split their sums differently at 2 threads than at 1, 3 or 4 (the head's (K, C) x (C, h*w)
    products): PriMaPsEM runs them under deterministic_blas, so the initialisation, training and predictions
    are bit-identical at any torch.set_num_threads (without it, 2 threads differ in the last bits)."""
    import hashlib

    gen = torch.Generator().manual_seed(0)
    f = torch.randn(8, 384, 12, 10, generator=gen) + 0.5
    m = torch.randint(0, 6, (8, 96, 80), generator=gen)

    def digest(threads):
        torch.set_num_threads(threads)
        em = PriMaPsEM(5, 384, ema_every=2)
        em.init_pca(f)
        em.init_kmeans(f, epochs=2, batch_size=3)
        for i in range(4):
            em.step(f[i % 2 * 4:(i % 2 + 1) * 4], m[i % 2 * 4:(i % 2 + 1) * 4])
        h = hashlib.sha256()
        for t in (em.g, em.v, em.ema_v, em.predict(f, size=(96, 80))):
            h.update(t.detach().contiguous().numpy().tobytes())
        return h.hexdigest()

    before = torch.get_num_threads()
    try:
        digests = {t: digest(t) for t in (1, 2, 3, 4)}
    finally:
        torch.set_num_threads(before)
    assert len(set(digests.values())) == 1, digests
