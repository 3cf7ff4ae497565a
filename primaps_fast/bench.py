"""``primaps-fast bench``: reference (official semantics, plain PyTorch) vs fast backend, same inputs.

Each stage runs on one synthetic batch (``make_scenes``) with both backends; the table shows the
median time per image over ``repeats`` timed runs (after one warm-up run) and the speed-up. The
outputs are compared before timing.
A dataset-level row times :func:`primaps_fast.pseudo_gen.generate_pseudo_labels` (loading images,
pseudo labels, PNG writing) over a small folder dataset with cached synthetic features.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch


def _time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def dataset_throughput(scenes, *, crf: bool, backend: str, root) -> float:
    """images/s of ``generate_pseudo_labels`` over a folder of the scenes with their features cached."""
    from primaps_fast import fileio
    from primaps_fast.data.cache import store_features
    from primaps_fast.data.datasets import FolderDataset
    from primaps_fast.pseudo_gen import generate_pseudo_labels

    img_dir = os.path.join(root, "images")
    if not os.path.isdir(img_dir):
        for i, im in enumerate(scenes.images):
            fileio.write_png(os.path.join(img_dir, f"scene{i:04d}.png"), im.permute(1, 2, 0).numpy())
    ds = FolderDataset(img_dir, size=scenes.images.shape[-1])
    cache = store_features(ds, scenes.features, os.path.join(root, "cache"), backbone="synthetic", weights="synthetic")
    out = os.path.join(root, f"pseudo_{backend}_{crf}")
    stats = generate_pseudo_labels(ds, out, cache=cache, crf=crf, backend=backend, batch_size=8, show_progress=False)
    return stats["images_per_s"]


def run_bench(*, images: int = 4, image_size: int = 320, crf: bool = True, repeats: int = 1, log=print) -> list:
    import primaps_fast
    from primaps_fast import reference
    from primaps_fast.data.synthetic import make_scenes
    from primaps_fast.demo import format_table

    scenes = make_scenes(images, image_size=image_size, num_classes=6, dim=384)
    imgs, feats = scenes.images, scenes.features
    rows = []

    def stage(name, ref_fn, fast_fn, check):
        check(ref_fn(), fast_fn())
        r, f = _time(ref_fn, repeats), _time(fast_fn, repeats)
        rows.append([name, f"{1e3 * r / images:.1f}", f"{1e3 * f / images:.1f}", f"{r / f:.1f}x"])

    def same_labels(a, b):
        agree = (a == b).float().mean().item()
        if agree < 0.99:
            raise AssertionError(f"fast and reference disagree on {100 * (1 - agree):.1f}% of the pixels")

    def close(a, b):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)

    def same_masks(a, b):
        if not torch.equal(a.counts, b.counts):
            raise AssertionError(f"mask counts differ: reference {a.counts.tolist()}, fast {b.counts.tolist()}")
        close(a.masks, b.masks)

    stage("principal_masks", lambda: reference.principal_masks(feats),
          lambda: primaps_fast.principal_masks(feats, backend="cpu"), same_masks)
    stage("pseudo_labels (no CRF)", lambda: reference.pseudo_labels(imgs, feats, crf=False),
          lambda: primaps_fast.pseudo_labels(imgs, feats, crf=False, backend="cpu"), same_labels)
    if crf:
        stage("pseudo_labels (CRF)", lambda: reference.pseudo_labels(imgs, feats, crf=True),
              lambda: primaps_fast.pseudo_labels(imgs, feats, crf=True, backend="cpu"), same_labels)
    K = 6
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(images, K, *feats.shape[-2:], generator=g)
    masks = primaps_fast.pseudo_labels(imgs, feats, crf=False)
    stage("E-step assign_pseudo_labels", lambda: reference.assign_pseudo_labels(logits, masks),
          lambda: primaps_fast.assign_pseudo_labels(logits, masks, backend="cpu"), same_labels)
    target = torch.where(masks == 255, 255, masks % K)

    def focal(fn, backend=None):
        x = logits.clone().requires_grad_(True)
        loss = fn(x, target) if backend is None else fn(x, target, backend=backend)
        loss.backward()
        return x.grad

    stage("M-step focal_loss fwd+bwd", lambda: focal(reference.focal_loss),
          lambda: focal(primaps_fast.focal_loss, "cpu"), close)

    log(f"reference vs fast (C++ CPU backend), {images} synthetic {image_size}x{image_size} images, "
        f"384x{image_size // 8}x{image_size // 8} features, {torch.get_num_threads()} threads, median of {repeats}")
    log(format_table(rows, ["stage", "reference ms/img", "fast ms/img", "speed-up"]))
    with tempfile.TemporaryDirectory() as tmp:
        ref = dataset_throughput(scenes, crf=crf, backend="reference", root=tmp)
        fast = dataset_throughput(scenes, crf=crf, backend="cpu", root=tmp)
    rows.append(["dataset pseudo-label generation (images/s)", f"{ref:.2f}", f"{fast:.2f}", f"{fast / ref:.1f}x"])
    log(f"dataset pseudo-label generation (load, pseudo labels{' + CRF' if crf else ''}, write PNGs): "
        f"reference {ref:.2f} images/s, fast {fast:.2f} images/s ({fast / ref:.1f}x)")
    return rows
