"""The timing half of the GPU check (``benchmarks/gpu_check.sh`` runs it after the build and the tests).

Every stage of the pseudo-label and PriMaPs-EM pipelines, timed side by side on one GPU at batch 8 and 32
(320x320 images, 384 x 40 x 40 features, K = 27): the reference (``primaps_fast.reference``: the official
semantics in plain PyTorch, on CUDA tensors where it runs there), the Triton kernels and the CUDA C++
kernels, each after an agreement check. Times are medians of CUDA-event timings after a warm-up call;
the slow per-image references are timed on a few images and scaled to the batch (they loop over images).
Then the dense CRF alone and the whole pipeline on textured scenes and photographs at 320 and 640 px
(batch 8, 32, and 128 at 320 px; the pipeline's stages by CUDA events, images/s, peak GPU memory), and
the proposals on pure-noise features (ms per image, 254 cap); each row that the issue gives a target
(pipeline, CRF, proposals and EM step at batch 32, noise) says whether each GPU backend meets it.
The feature stage (``dino_vits8``, random weights, at fp32 and bf16 autocast, batch 32 and 128): images/s
of ``compute_features`` from JPEG files (decoding and resizing in DataLoader workers, float16 cache rows
written), images/s of the backbone alone on images already on the GPU, and the difference bf16 makes to the
features and to the pseudo labels (ids equal to those of the fp32 features).
Writes ``OUT_DIR/gpu_report.md`` and ``OUT_DIR/gpu_report.json``; exits 1 when an agreement check fails
or a stage raises.

``--dry-run`` checks the script itself on a machine without a GPU: CPU tensors, Triton interpreted
(TRITON_INTERPRET=1), tiny shapes, the CUDA column skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field

BACKENDS = ("reference", "cpu", "triton", "cuda")
RETIME_REFERENCE_S = 10.0  # a reference whose first call took less is timed again (its first call warmed up)
TITLES = {"reference": "reference", "cpu": "C++ (CPU)", "triton": "Triton", "cuda": "CUDA"}


@dataclass
class Row:
    stage: str
    batch: int
    ms: dict = field(default_factory=dict)  # backend -> milliseconds per call (whole batch)
    agree: dict = field(default_factory=dict)  # backend -> "ok: ..." or "FAIL: ..."
    notes: list = field(default_factory=list)
    target: str = ""  # the issue's goal for this row and, per GPU backend, met or missed


class Check:
    """Inputs, timer and results of one run."""

    def __init__(self, args):
        import torch

        self.torch = torch
        self.dry = args.dry_run
        self.device = torch.device("cpu" if self.dry else "cuda")
        # a dry run (tiny shapes) runs every row: it checks the script
        self.deadline = time.monotonic() + (float("inf") if self.dry else args.budget_s)
        self.round_s = 0.02 if self.dry else 0.4  # time budget of one backend's timed rounds
        self.rows: list[Row] = []
        self.feature_rows: list[dict] = []
        self.failed = False
        from primaps_fast._dispatch import cuda_available

        cuda = not self.dry and cuda_available()
        self.backends = ["reference", "triton"] + (["cuda"] if cuda else [])
        # the dry run's CRF takes one iteration: the interpreted Triton CRF takes minutes for ten
        # scenes: (image size, batch) of the CRF and pipeline rows on textured scenes and photographs, the
        # targets' batch first (rows past the time budget are skipped); noise: (B, C, h, w) of the noise row
        shape = (dict(batches=(2,), image=32, dim=16, patch=8, K=5, crf_iterations=1, feature_batches=(2,),
                      feature_images=4, target_batch=2, scenes=((32, 2),), noise=(1, 16, 8, 8))
                 if self.dry
                 else dict(batches=(8, 32), image=320, dim=384, patch=8, K=27, crf_iterations=10,
                           feature_batches=(32, 128), feature_images=256, target_batch=32,
                           scenes=((320, 32), (640, 32), (320, 8), (320, 128), (640, 8)), noise=(8, 384, 40, 40)))
        self.__dict__.update(shape)

    # ------------------------------------------------------------------ timing
    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def elapsed_s(self, fn):
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - t0

    def time_ms(self, fn, first_s, jit) -> tuple[float, int]:
        """(median ms, rounds) of fn, whose first call took first_s. A call slower than the round budget is
        measured once: by that first call, or by a second one when the first may have paid one-time costs
        (jit)."""
        if first_s >= self.round_s and jit:
            first_s = self.elapsed_s(fn)[1]
        if first_s >= self.round_s:
            return first_s * 1e3, 1
        rounds = int(min(20, max(3, self.round_s / max(first_s, 1e-6))))
        times = []
        for _ in range(rounds):
            if self.device.type == "cuda":
                start, end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                times.append(self.elapsed_s(fn)[1] * 1e3)
        return statistics.median(times), rounds

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    # ------------------------------------------------------------------ one stage, all backends
    def run(self, stage, batch, runners, agree, *, scale=None):
        """Time ``runners[backend]()`` for each backend, after ``agree(backend, output of its first call)`` ->
        (ok, detail), or None for a baseline not checked; the reference runs first, so agree can keep its
        output for the others.

        ``scale``: {backend: (images timed, batch)} for references timed on a subset of the images.
        A runner raising NotImplementedError, or a backend the public API does not know yet, is skipped
        with a note; any other exception fails the check.
        """
        row = Row(stage, batch)
        self.rows.append(row)
        for backend, fn in runners.items():
            if backend not in self.backends and backend != "cpu":
                continue
            if backend == "reference" and self.left_s() < 0:
                row.notes.append("reference skipped: time budget spent")
                continue
            try:
                out, first_s = self.elapsed_s(fn)
                verdict = agree(backend, out)
                if verdict is not None:
                    ok, detail = verdict
                    row.agree[backend] = ("ok" if ok else "FAIL") + (f": {detail}" if detail else "")
                    self.failed |= not ok
                # a first call pays one-time costs (kernel compiles, CUDA handles): timed again unless it
                # is a slow reference (the per-image loops), whose one call is then the measurement
                again = backend != "reference" or first_s < RETIME_REFERENCE_S
                ms, rounds = self.time_ms(fn, first_s, jit=again and not self.dry)
            except NotImplementedError as exc:
                row.notes.append(f"{TITLES[backend]}: not implemented ({exc})")
                continue
            except ValueError as exc:
                if str(exc).startswith("backend"):
                    row.notes.append(f"{TITLES[backend]}: not available through the public API ({exc})")
                    continue
                self.fail(row, backend, exc)
                continue
            except Exception as exc:  # noqa: BLE001 - reported, and the check fails
                self.fail(row, backend, exc)
                continue
            if scale and backend in scale:
                n, total = scale[backend]
                ms *= total / n
                row.notes.append(f"{TITLES[backend]}: timed on {n} of {total} images, scaled")
            row.ms[backend] = ms
            if rounds == 1:
                row.notes.append(f"{TITLES[backend]}: one call")
        print(f"{stage} (B={batch}): " + ", ".join(f"{TITLES[b]} {ms:.2f} ms" for b, ms in row.ms.items())
              + ("" if not row.agree else "  [" + "; ".join(f"{TITLES[b]} {a}" for b, a in row.agree.items()) + "]"),
              flush=True)
        return row

    def fail(self, row, backend, exc):
        self.failed = True
        row.agree[backend] = f"FAIL: {type(exc).__name__}: {exc}"
        traceback.print_exc()

    def judge(self, row, goal, value, met):
        """row.target: the issue's ``goal`` and, for each GPU backend timed, ``value(ms)`` (text) and
        whether ``met(backend, ms)``; a dry run's rows are not judged (tiny shapes on the CPU)."""
        if self.dry:
            row.target = f"{goal} (dry run: not judged)"
        else:
            row.target = f"{goal}: " + (", ".join(
                f"{TITLES[b]} {value(ms)} {'met' if met(b, ms) else 'MISSED'}"
                for b, ms in row.ms.items() if b in ("triton", "cuda")) or "no GPU backend timed")
        print(f"  target {row.target}", flush=True)

    def stage_times(self, row, images, feats, its):
        """Notes on the pipeline's stages, per GPU backend of the row: proposals, median filter +
        upsampling + softmax (one fused kernel), CRF + arg-max, in ms (medians of three CUDA-event
        timings; one by the CPU's clock in a dry run), and the peak GPU memory of a call; the staged labels
        must equal ``pseudo_labels``'."""
        import torch

        import primaps_fast
        from primaps_fast._dispatch import kernel
        from primaps_fast.ops.pseudo_labels import _crf_argmax

        cuda = self.device.type == "cuda"
        size = tuple(images.shape[-2:])
        for backend in [b for b in ("triton", "cuda") if b in row.ms]:
            marks = []

            def mark():
                if cuda:
                    marks.append(torch.cuda.Event(enable_timing=True))
                    marks[-1].record()
                else:
                    marks.append(time.perf_counter())

            def staged():
                marks.clear()
                mark()
                masks, counts = primaps_fast.principal_masks(feats, backend=backend)
                mark()
                probs = kernel("mask_probs", backend)(masks, counts, size)
                mark()
                labels = _crf_argmax(images, probs, counts, its, backend)
                mark()
                self.sync()
                ms = ([a.elapsed_time(b) for a, b in zip(marks, marks[1:])] if cuda
                      else [(b - a) * 1e3 for a, b in zip(marks, marks[1:])])
                return torch.where(labels == 0, 255, labels), ms

            try:
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                labels, ms = staged()
                peak = f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else "peak memory: GPU only"
                want = primaps_fast.pseudo_labels(images, feats, crf_iterations=its, backend=backend)
                if not torch.equal(labels, want):
                    raise AssertionError("the staged labels differ from pseudo_labels'")
                times = [ms] + [staged()[1] for _ in range(0 if self.dry else 2)]
                proposals, median, crf = (statistics.median(t[i] for t in times) for i in range(3))
            except Exception as exc:  # noqa: BLE001 - reported, and the check fails
                self.fail(row, backend, exc)
                continue
            row.notes.append(f"{TITLES[backend]} stages: proposals {proposals:.2f} ms, median filter + upsampling "
                             f"{median:.2f} ms, CRF {crf:.2f} ms ({'CUDA events' if cuda else 'CPU clock'}), {peak}")


def to(device, *tensors):
    return [t.to(device) for t in tensors]


def labels_agree(got, want, min_fraction):
    frac = float((got.cpu() == want.cpu()).float().mean())
    return frac >= min_fraction, f"{100 * frac:.3f}% labels equal"


def triton_syncs(ck, feats):
    """A note: the host synchronisations of one call of the Triton proposals (torch's sync debug mode:
    a warning each; not counted on the CPU) and its rounds (launches of the selection kernel)."""
    import warnings

    import torch

    from primaps_fast.common import DEFAULT_MAX_MASKS
    from primaps_fast.triton import principal_masks as pm

    rounds, cls = [], type(pm._select_kernel)
    run = cls.run

    def counted(self, *args, **kwargs):
        rounds.append(self.fn.__name__ == "_select_kernel")
        return run(self, *args, **kwargs)

    cls.run = counted
    cuda = ck.device.type == "cuda"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            pm.principal_masks_triton(feats, 0.4, 0.95, DEFAULT_MAX_MASKS)
    finally:
        cls.run = run
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    if not cuda:
        return f"Triton: {sum(rounds)} rounds (host synchronisations: counted on a GPU only)"
    return f"Triton: {syncs} host synchronisations in {sum(rounds)} rounds (torch's sync debug mode)"


def images_per_s(B):
    return lambda ms: f"{B / ms * 1e3:.0f} images/s"


def crf_agreement(marginals, want):
    """Mean fraction of the labels (arg-max of the marginals) equal to ``want``, over want's images."""
    return statistics.mean(float((q.argmax(0).cpu() == w).float().mean()) for q, w in zip(marginals, want))


def judge_crf(ck, row, B, frac):
    """The CRF's target at ck.target_batch; ``frac``: {backend: label agreement with the C++ CRF}."""
    if B == ck.target_batch:
        ck.judge(row, f"dense CRF at batch {B} >= 2000 images/s, 100 % labels equal the C++ CRF's",
                 images_per_s(B), lambda b, ms: B / ms * 1e3 >= 2000 and frac.get(b) == 1.0)


def stages(ck: Check, B: int):
    """All stages at batch B."""
    import torch
    import torch.nn.functional as F

    import primaps_fast
    from primaps_fast import reference
    from primaps_fast.data.synthetic import make_scenes
    from primaps_fast.reference.pseudo_labels import mask_logits

    dev, H, K = ck.device, ck.image, ck.K
    sc = make_scenes(B, image_size=H, dim=ck.dim, patch=ck.patch, seed=B)
    feats, images = to(dev, sc.features, sc.images)
    sub = min(B, 2 if ck.dry else 4)  # images the slow per-image references are timed on

    # ---- principal masks (the C++ kernel's proposals are the oracle: it reproduces the reference exactly)
    want = primaps_fast.principal_masks(sc.features, backend="cpu")

    def pm_agree(backend, out):
        if backend == "reference":
            return None  # randomized (pca_lowrank): timed only; the C++ proposals reproduce it
        same = 0.0
        if out.masks.shape == want.masks.shape:
            same = float(((out.masks.cpu() > 0) == (want.masks > 0)).float().mean())
        counts = bool(torch.equal(out.counts.cpu(), want.counts))
        return counts and same >= 0.99, f"counts {'equal' if counts else 'DIFFER'}, supports {100 * same:.3f}% equal"

    row = ck.run("principal_masks", B, {
        "reference": lambda: reference.principal_masks(feats[:sub]),
        "triton": lambda: primaps_fast.principal_masks(feats, backend="triton"),
        "cuda": lambda: primaps_fast.principal_masks(feats, backend="cuda"),
    }, pm_agree, scale={"reference": (sub, B)})
    if B == ck.target_batch:
        ck.judge(row, f"proposals at batch {B} >= 4000 images/s", images_per_s(B),
                 lambda b, ms: B / ms * 1e3 >= 4000)
    if "triton" in row.ms:
        row.notes.append(triton_syncs(ck, feats))
    masks, counts = to(dev, want.masks, want.counts)
    M = masks.shape[1]

    # ---- median filter of the proposals
    med = primaps_fast.median_filter(want.masks, backend="cpu")

    def exact(want_cpu):
        def check(backend, out):
            same = bool(torch.equal(out.cpu(), want_cpu))
            return same, "bit-exact" if same else "differs"
        return check

    ck.run(f"median_filter ({M} proposals of 40x40)" if not ck.dry else "median_filter", B, {
        "reference": lambda: reference.median_filter(masks),
        "triton": lambda: primaps_fast.median_filter(masks, backend="triton"),
        "cuda": lambda: primaps_fast.median_filter(masks, backend="cuda"),
    }, exact(med))

    # ---- post-processing to labels (crf=False) and to the CRF's probabilities (crf=True)
    def ref_post(probs):
        outs = []
        for b in range(B):
            n = int(counts[b])
            lg = mask_logits(masks[b, :n]) if n else torch.zeros(1, *masks.shape[-2:], device=dev)
            up = F.interpolate(lg[None], size=(H, H), mode="bilinear", align_corners=False)[0]
            outs.append(up.softmax(0) if probs else up)
        if probs:
            return torch.stack([F.pad(p, (0, 0, 0, 0, 0, M + 1 - p.shape[0])) for p in outs])
        return torch.stack([torch.where(u.argmax(0) == 0, 255, u.argmax(0)) for u in outs])

    ref_up = ref_post(False)
    margin = None

    def labels_vs_ref(backend, out):
        nonlocal margin
        if backend == "reference":
            return None
        differ = out.cpu() != ref_up.cpu()
        if not differ.any():
            return True, "equal"
        if margin is None:  # gap between the two best upsampled log-probabilities of the reference
            gaps = []
            for b in range(B):
                n = int(counts[b])
                lg = mask_logits(masks[b, :n]) if n else torch.zeros(1, *masks.shape[-2:], device=dev)
                up = F.interpolate(lg[None], size=(H, H), mode="bilinear", align_corners=False)[0]
                top = up.topk(min(2, up.shape[0]), 0).values
                gaps.append(top[0] - top[1] if up.shape[0] > 1 else torch.full((H, H), float("inf"), device=dev))
            margin = torch.stack(gaps).cpu()
        ties = bool((margin[differ] < 1e-5).all())
        return ties, f"{int(differ.sum())} labels differ, {'all' if ties else 'NOT all'} at reference ties"

    from primaps_fast._dispatch import kernel

    ck.run("median + background + log-softmax + upsample + arg-max (crf=False)", B, {
        "reference": lambda: ref_post(False),
        "triton": lambda: kernel("mask_labels", "triton")(masks, counts, (H, H), 255),
        "cuda": lambda: kernel("mask_labels", "cuda")(masks, counts, (H, H), 255),
    }, labels_vs_ref)
    ref_probs = ref_post(True).cpu()

    def probs_agree(backend, out):
        if backend == "reference":
            return None
        err = float((out.cpu() - ref_probs).abs().max())
        return err <= 1e-5, f"max abs. diff {err:.1e}"

    ck.run("median + background + log-softmax + upsample + softmax (crf=True)", B, {
        "reference": lambda: ref_post(True),
        "triton": lambda: kernel("mask_probs", "triton")(masks, counts, (H, H)),
        "cuda": lambda: kernel("mask_probs", "cuda")(masks, counts, (H, H)),
    }, probs_agree)

    # ---- dense CRF on those probabilities (the CUDA backend uses the Triton CRF)
    from primaps_fast.ops.dense_crf import dense_crf_list
    from primaps_fast.ops.pseudo_labels import crf_images

    bgr = crf_images(images)
    plist = [p[: int(counts[b]) + 1].contiguous() for b, p in enumerate(ref_probs.to(dev))]
    its = ck.crf_iterations
    crf_want = [q.argmax(0) for q in dense_crf_list(bgr.cpu()[:sub], [p.cpu() for p in plist[:sub]], iterations=its,
                                                     backend="cpu")]

    crf_frac = {}

    def crf_agree(backend, out):  # the reference too: it is a port, checked against the C++ CRF
        frac = crf_frac[backend] = crf_agreement(out, crf_want)
        return frac >= 0.99, f"{100 * frac:.2f}% of the first {sub} images' labels equal the C++ CRF's"

    row = ck.run(f"dense CRF ({its} iterations)", B, {
        "reference": lambda: dense_crf_list(bgr[:sub], plist[:sub], iterations=its, backend="reference"),
        "triton": lambda: dense_crf_list(bgr, plist, iterations=its, backend="triton"),
    }, crf_agree, scale={"reference": (sub, B)})
    judge_crf(ck, row, B, crf_frac)
    try:
        import numpy as np
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax

        def pydensecrf_run():
            for img, p in zip(bgr.cpu()[:sub], plist[:sub]):
                p = p.cpu().numpy()
                d = dcrf.DenseCRF2D(H, H, p.shape[0])
                d.setUnaryEnergy(unary_from_softmax(p))
                d.addPairwiseGaussian(sxy=1, compat=3)
                rgb = np.ascontiguousarray(img.permute(1, 2, 0).numpy())
                d.addPairwiseBilateral(sxy=67, srgb=3, rgbim=rgb, compat=4)
                d.inference(its)

        ms = ck.elapsed_s(pydensecrf_run)[1] * 1e3
        row.notes.append(f"pydensecrf2 (CPU, one image at a time, as the official code): {ms * B / sub:.1f} ms "
                         f"(timed on {sub} images, scaled)")
    except ImportError:
        row.notes.append("pydensecrf2 not installed: no pydensecrf row")

    # ---- the whole pseudo-label pipeline (proposals + post-processing + CRF), images/s
    pipe_want = {}

    def pipe_agree(backend, out):
        if backend == "reference":
            pipe_want["labels"] = out
            return None
        if not pipe_want:
            return True, "no reference (time budget)"
        return labels_agree(out[:sub], pipe_want["labels"], 0.98)

    row = ck.run("pseudo-label pipeline (proposals + median + CRF)", B, {
        "reference": lambda: reference.pseudo_labels(sc.images[:sub], sc.features[:sub], crf_iterations=its),
        "triton": lambda: primaps_fast.pseudo_labels(images, feats, crf_iterations=its, backend="triton"),
        "cuda": lambda: primaps_fast.pseudo_labels(images, feats, crf_iterations=its, backend="cuda"),
    }, pipe_agree, scale={"reference": (sub, B)})
    row.notes.append("reference: the per-image official loop (its proposals and CRF run on the CPU); "
                     + ", ".join(f"{TITLES[b]} {B / ms * 1e3:.1f} images/s" for b, ms in row.ms.items()))
    ck.stage_times(row, images, feats, its)
    if B == ck.target_batch:
        ck.judge(row, f"pipeline at batch {B} >= 1000 images/s on synthetic scenes", images_per_s(B),
                 lambda b, ms: B / ms * 1e3 >= 1000)

    # ---- EM kernels: E-step (assign_pseudo_labels) and M-step loss (focal_loss forward + backward)
    g = torch.Generator().manual_seed(B)
    h = H // ck.patch
    logits = torch.randn(B, K, h, h, generator=g)
    coarse = torch.randint(0, 12, (B, 1, 8, 8), generator=g).float()
    ids = F.interpolate(coarse, (H, H), mode="nearest").long().squeeze(1)
    ids[torch.rand(B, H, H, generator=g) < 0.1] = 255
    assign_want = primaps_fast.assign_pseudo_labels(logits, ids, backend="cpu")
    x, ids_d = to(dev, logits, ids)

    def assign_agree(backend, out):
        if backend == "reference":
            return None
        if backend == "cuda":  # the C++ kernel's upsampled scores, bit for bit
            return exact(assign_want)(backend, out)
        return labels_agree(out, assign_want, 0.999)

    ck.run(f"E-step: assign_pseudo_labels ({K}x{h}x{h} -> {H}x{H})", B, {
        "reference": lambda: reference.assign_pseudo_labels(x, ids_d),
        "triton": lambda: primaps_fast.assign_pseudo_labels(x, ids_d, backend="triton"),
        "cuda": lambda: primaps_fast.assign_pseudo_labels(x, ids_d, backend="cuda"),
    }, assign_agree)

    target = assign_want.to(dev)

    def focal(backend):
        def fn():
            leaf = x.clone().requires_grad_(True)
            if backend == "reference":
                loss = reference.focal_loss(leaf, target)
            else:
                loss = primaps_fast.focal_loss(leaf, target, backend=backend)
            loss.backward()
            return loss.detach(), leaf.grad
        return fn

    v0, g0 = focal("reference")()

    def focal_agree(backend, out):
        if backend == "reference":
            return None
        v, gr = out
        dv = abs(float(v) - float(v0)) / abs(float(v0))
        dg = float((gr - g0).abs().max()) / float(g0.abs().max())
        return dv <= 1e-4 and dg <= 1e-4, f"loss rel. diff {dv:.1e}, grad max diff {dg:.1e} of max |grad|"

    ck.run(f"M-step: focal_loss forward + backward ({K}x{h}x{h} -> {H}x{H})", B,
           {b: focal(b) for b in ("reference", "triton", "cuda")}, focal_agree)

    # ---- one PriMaPs-EM step (E-step + focal M-step + Adam + EMA), the public model on its auto backend
    from primaps_fast import PriMaPsEM
    from primaps_fast._dispatch import choose_backend

    auto = choose_backend(None, feats)
    protos = torch.randn(K, ck.dim, generator=g)
    labels_in = primaps_fast.pseudo_labels(sc.images, sc.features, crf=False, backend="cpu").to(dev)
    student = feats + 0.1 * torch.randn(feats.shape, generator=g).to(dev)

    def ref_model():
        em = reference.PriMaPsEM(K, ck.dim, ema_every=1)
        em.init_prototypes(protos.to(dev))
        # the reference keeps g on the CPU: put its parameters and optimiser on the device
        em.g = torch.ones(K, device=dev, requires_grad=True)
        em.ema_g = em.g.detach().clone()
        em.opt = torch.optim.Adam([em.v, em.g], lr=em.lr)
        return em

    def fast_model():
        em = PriMaPsEM(K, ck.dim, ema_every=1, device=dev)
        em.init_prototypes(protos)
        return em

    models = {}
    first = {}

    def em_step(backend):
        def fn():
            if backend not in models:
                models[backend] = ref_model() if backend == "reference" else fast_model()
            return models[backend].step(feats, labels_in, student)
        return fn

    def em_agree(backend, out):
        first[backend] = out
        if backend == "reference":
            return None
        if "reference" not in first:
            return True, "no reference (time budget)"
        want_ = first["reference"]
        dl = abs(out["loss"] - want_["loss"]) / abs(want_["loss"])
        mis = float((out["labels"].cpu() != want_["labels"].cpu()).float().mean())
        return dl <= 1e-4 and mis < 1e-3, f"loss rel. diff {dl:.1e}, {100 * mis:.3f}% labels differ"

    row = ck.run(f"PriMaPs-EM step ({ck.dim}x{h}x{h} features, {H}x{H} masks, K={K})", B,
                 {"reference": em_step("reference"), auto: em_step(auto)}, em_agree)
    row.notes.append(f"the model runs its ops on the auto backend for {dev.type} tensors: {TITLES[auto]}")
    if B == ck.target_batch:
        ck.judge(row, f"EM step at batch {B}, K={K} <= 1 ms", lambda ms: f"{ms:.3f} ms", lambda b, ms: ms <= 1.0)


def photographs(size):
    """scikit-image's four colour samples, resized and centre-cropped to uint8 RGB (4, 3, size, size)."""
    import torch
    import torch.nn.functional as F
    from skimage import data

    photos = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        x = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1).float()[None]
        x = F.interpolate(x, scale_factor=size / min(x.shape[-2:]), mode="bilinear", align_corners=False,
                          antialias=True)[0]
        top, left = (x.shape[1] - size) // 2, (x.shape[2] - size) // 2
        photos.append(x[:, top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8))
    return torch.stack(photos)


def colour_features(rgb, dim, patch):
    """Features of photographs without a backbone's weights: each patch's mean colour through a fixed
    random layer (tanh), (B, dim, H / patch, W / patch); smooth where the picture is."""
    import torch
    import torch.nn.functional as F

    x = F.avg_pool2d(rgb.float() / 255, patch)
    x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
    layer = torch.randn(dim, 4, generator=torch.Generator().manual_seed(0)) * 3
    return torch.tanh(torch.einsum("dc,bchw->bdhw", layer, x)).contiguous()


def scene_rows(ck: Check):
    """The dense CRF alone and the whole pipeline (``pseudo_labels(..., crf=True)``) on hard inputs, for
    each (size, batch) of ``ck.scenes``: textured scenes (bilateral lattices of ~3 vertices a pixel; 8
    distinct scenes, repeated) and photographs (scikit-image's samples, when installed; features from
    their colours). The CRF with 7 and 27 labels of smooth logits against the C++ CRF, the pipeline
    against the C++ pipeline (with its stages' times and peak memory), labels compared on the first
    images; the C++ results are computed, and timed, once per input (the first images are the same at
    every batch)."""
    import torch
    import torch.nn.functional as F

    import primaps_fast
    from primaps_fast.data.synthetic import make_scenes
    from primaps_fast.ops.dense_crf import dense_crf_list

    its = ck.crf_iterations
    try:
        import skimage  # noqa: F401
        photos = True
    except ImportError:
        photos = False
        print("scikit-image not installed: no photograph rows", flush=True)
    inputs, oracle = {}, {}

    def cpp(key, fn, n):
        """fn()'s result, computed and timed once per key; a note on its time per image."""
        if key not in oracle:
            out, s = ck.elapsed_s(fn)
            oracle[key] = out, f"C++ (CPU) {s * 1e3 / n:.1f} ms per image (timed once on {n} images)"
        return oracle[key]

    for size, B in ck.scenes:
        if size not in inputs:
            distinct = make_scenes(8, image_size=size, dim=ck.dim, patch=ck.patch, texture=24.0, seed=size)
            inputs[size] = {"textured scenes": (distinct.images, distinct.features)}
            if photos:
                rgb = photographs(size)
                inputs[size]["photographs"] = (rgb, colour_features(rgb, ck.dim, ck.patch))
        sub = 2 if ck.dry or size > 320 else 4
        for kind, (rgb_all, feats_all) in inputs[size].items():
            if ck.left_s() < 0:
                ck.rows.append(Row(f"dense CRF and pipeline, {kind} {size}x{size}", B,
                                   notes=["skipped: time budget spent"]))
                continue
            pick = torch.arange(B) % len(rgb_all)
            rgb, feats = rgb_all[pick], feats_all[pick]
            bgr = rgb.flip(1).contiguous()
            for labels in (7, 27):
                g = torch.Generator().manual_seed(size * 100 + labels)
                logits = F.avg_pool2d(F.pad(torch.randn(B, labels, size // 8, size // 8, generator=g) * 2,
                                            (1, 1, 1, 1), mode="replicate"), 3, 1) * 3
                probs = torch.softmax(F.interpolate(logits, size=(size, size), mode="bilinear",
                                                    align_corners=False), 1)
                want, note = cpp(("crf", kind, size, labels), lambda: [q.argmax(0) for q in dense_crf_list(
                    bgr[:sub], list(probs[:sub]), iterations=its, backend="cpu")], sub)
                images, plist = bgr.to(ck.device), list(probs.to(ck.device))
                frac = {}

                def agree(backend, out, want=want, frac=frac):
                    frac[backend] = crf_agreement(out, want)
                    return frac[backend] >= 0.999, (f"{100 * frac[backend]:.3f}% of the first {sub} images' "
                                                    "labels equal the C++ CRF's")

                row = ck.run(f"dense CRF, {kind} {size}x{size}, {labels} labels ({its} iterations)", B, {
                    "triton": lambda: dense_crf_list(images, plist, iterations=its, backend="triton"),
                }, agree)
                row.notes += [note] + [f"{TITLES[b]} {B / ms * 1e3:.1f} images/s" for b, ms in row.ms.items()]
                judge_crf(ck, row, B, frac)
            want, note = cpp(("pipeline", kind, size), lambda: primaps_fast.pseudo_labels(
                rgb[:sub], feats[:sub], crf_iterations=its, backend="cpu"), sub)
            images, feats_d = rgb.to(ck.device), feats.to(ck.device)
            row = ck.run(f"pseudo-label pipeline, {kind} {size}x{size}", B, {
                "triton": lambda: primaps_fast.pseudo_labels(images, feats_d, crf_iterations=its, backend="triton"),
                "cuda": lambda: primaps_fast.pseudo_labels(images, feats_d, crf_iterations=its, backend="cuda"),
            }, lambda backend, out, want=want: labels_agree(out[:sub], want, 0.98))
            row.notes += [note] + [f"{TITLES[b]} {B / ms * 1e3:.1f} images/s" for b, ms in row.ms.items()]
            ck.stage_times(row, images, feats_d, its)
            if B == ck.target_batch:
                ck.judge(row, f"pipeline at batch {B} >= 300 images/s on {kind}", images_per_s(B),
                         lambda b, ms: B / ms * 1e3 >= 300)


def noise_rows(ck: Check):
    """Proposals on pure-noise features (a flat spectrum: one pixel a proposal, up to the 254 cap) on both
    GPU backends, ms per image. Checked against the C++ proposals: the counts, the invariants (disjoint
    proposals, each with an anchor of value 1) and the supports' agreement (reported: on noise a GPU's
    rounding may pick another anchor where two pixels nearly tie, and the proposals after it differ)."""
    import torch

    import primaps_fast

    B, C, h, w = ck.noise
    f = torch.randn(B, C, h, w, generator=torch.Generator().manual_seed(0))
    want = primaps_fast.principal_masks(f, backend="cpu")
    feats = f.to(ck.device)

    def agree(backend, out):
        if backend == "cpu":
            return None
        masks, counts = out.masks.cpu(), out.counts.cpu()
        support = (masks > 0).sum(1)
        anchors = all(bool((masks[b, :n].flatten(1).max(1).values == 1).all()) for b, n in enumerate(counts.tolist()))
        same = float(((masks > 0) == (want.masks > 0)).float().mean()) if masks.shape == want.masks.shape else 0.0
        ok = torch.equal(counts, want.counts) and int(support.max()) <= 1 and anchors
        return ok, (f"counts {'equal' if torch.equal(counts, want.counts) else 'DIFFER'} "
                    f"({int(want.counts.min())}-{int(want.counts.max())}), "
                    f"{'disjoint, anchors 1' if ok else 'INVARIANTS BROKEN'}, supports {100 * same:.3f}% equal")

    row = ck.run(f"principal_masks on noise ({C}x{h}x{w}, cap 254)", B, {
        "cpu": lambda: primaps_fast.principal_masks(f, backend="cpu"),
        "triton": lambda: primaps_fast.principal_masks(feats, backend="triton"),
        "cuda": lambda: primaps_fast.principal_masks(feats, backend="cuda"),
    }, agree)
    row.notes.append(", ".join(f"{TITLES[b]} {ms / B:.1f} ms per image" for b, ms in row.ms.items()))
    ck.judge(row, "noise < 100 ms per image", lambda ms: f"{ms / B:.1f} ms per image", lambda b, ms: ms / B < 100)


def feature_stage(ck: Check):
    """The feature stage at fp32 and bf16 for each of ``ck.feature_batches`` (module docstring)."""
    import shutil
    import tempfile

    import torch
    from PIL import Image

    import primaps_fast
    from primaps_fast.backbones import Backbone
    from primaps_fast.data.cache import compute_features
    from primaps_fast.data.datasets import build_dataset
    from primaps_fast.data.synthetic import make_scenes

    dev, S, n = ck.device, ck.image, ck.feature_images
    workers = 0 if ck.dry else min(8, os.cpu_count() or 1)
    tmp = tempfile.mkdtemp(prefix="gpu_check_features_")
    # 16 distinct 480x640 photographs-sized scenes as JPEG files, repeated to n files (decoding costs the same)
    scenes = make_scenes(min(n, 16), image_size=(S * 3 // 2, S * 2), seed=1)
    os.makedirs(os.path.join(tmp, "jpegs"))
    for i in range(n):
        Image.fromarray(scenes.images[i % len(scenes.images)].permute(1, 2, 0).numpy()).save(
            os.path.join(tmp, "jpegs", f"{i:04d}.jpg"), quality=90)
    data = build_dataset(os.path.join(tmp, "jpegs"), size=S)
    models = {p: Backbone("dino_vits8", "random", precision=p).to(dev) for p in ("fp32", "bf16")}
    runs = iter(range(10 ** 6))
    # one untimed pass first, so that the first timed row does not pay the one-time costs alone
    compute_features(data, models["fp32"], os.path.join(tmp, "warm-up"), batch_size=ck.feature_batches[0],
                     device=dev, num_workers=workers, show_progress=False)
    feats = {}
    for batch in ck.feature_batches:
        x = torch.stack([data[i][0] for i in range(batch)]).to(dev)
        for precision, bb in models.items():
            row = {"batch": batch, "precision": precision}
            ck.feature_rows.append(row)
            try:
                if ck.left_s() < 0:
                    row["note"] = "skipped: time budget spent"
                    continue
                feats[precision], first_s = ck.elapsed_s(lambda: bb(x))  # also warms the kernels up
                ms, _ = ck.time_ms(lambda: bb(x), first_s, jit=True)
                row["backbone_images_per_s"] = batch / ms * 1e3
                _, s = ck.elapsed_s(lambda: compute_features(
                    data, bb, os.path.join(tmp, f"c{next(runs)}"), batch_size=batch, device=dev,
                    num_workers=workers, show_progress=False))
                row["stage_images_per_s"] = n / s
                if precision == "bf16" and "fp32" in feats:  # what bf16 changes, on the same batch
                    a, b = feats["fp32"], feats["bf16"]
                    same = primaps_fast.pseudo_labels(x, a, crf=False) == primaps_fast.pseudo_labels(x, b, crf=False)
                    row.update(rel_l2=float((a - b).norm() / a.norm()), max_abs=float((a - b).abs().max()),
                               label_agreement=float(same.float().mean()))
            except Exception as exc:  # noqa: BLE001 - reported, and the check fails
                ck.failed = True
                row["note"] = f"FAIL: {type(exc).__name__}: {exc}"
                traceback.print_exc()
        feats.clear()
    shutil.rmtree(tmp, ignore_errors=True)
    for row in ck.feature_rows:
        print("feature stage: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in row.items()), flush=True)


def report(ck: Check, args):
    import torch

    import triton

    gpu = torch.cuda.get_device_name() if ck.device.type == "cuda" else "none (dry run on the CPU)"
    versions = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
                "torch CUDA": torch.version.cuda, "nvcc": os.environ.get("PRIMAPS_FAST_NVCC_VERSION", "?")}
    used = [b for b in BACKENDS if any(b in r.ms or b in r.agree for r in ck.rows)]
    data = {"gpu": gpu, "versions": versions, "dry_run": ck.dry, "passed": not ck.failed,
            "build_seconds": args.build_seconds, "tests": args.tests_summary,
            "rows": [r.__dict__ for r in ck.rows], "feature_stage": ck.feature_rows}
    lines = [f"# GPU check: {gpu}", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
             f"Build (this GPU's architecture only): {args.build_seconds}. Tests: {args.tests_summary}.",
             f"Agreement checks: {'all passed' if not ck.failed else 'FAILED (see the agreement column)'}.",
             "", "Milliseconds per call for the whole batch (median of CUDA-event timings after a warm-up "
             "call); speed-ups against the reference; the issue's targets, met or missed, per GPU backend.", ""]
    for batch in sorted({r.batch for r in ck.rows}):
        head = ["stage"] + [f"{TITLES[b]} ms" for b in used]
        head += [f"{TITLES[b]} speed-up" for b in used if b != "reference"] + ["agreement", "target", "notes"]
        lines += [f"## Batch {batch}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in (r for r in ck.rows if r.batch == batch):
            ref = r.ms.get("reference")
            cells = [r.stage] + [f"{r.ms[b]:.2f}" if b in r.ms else "-" for b in used]
            cells += [f"{ref / r.ms[b]:.1f}x" if ref and b in r.ms else "-" for b in used if b != "reference"]
            cells += ["; ".join(f"{TITLES[b]} {a}" for b, a in r.agree.items()) or "-", r.target or "-",
                      "; ".join(r.notes) or ""]
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        lines.append("")
    lines += ["## Feature stage (dino_vits8, random weights)", "",
              f"images/s of `compute_features` over {ck.feature_images} JPEG files (decoding and resizing in "
              "DataLoader workers, float16 rows written), of the backbone alone (images already on the device), "
              "and bf16 against fp32 on the same batch: relative L2 and max |difference| of the features, "
              "fraction of pseudo-label ids (no CRF) equal.", "",
              "| batch | precision | stage images/s | backbone images/s | bf16 rel. L2 | bf16 max diff | "
              "labels equal | notes |", "|---|---|---|---|---|---|---|---|"]
    for r in ck.feature_rows:
        def cell(key, fmt):
            return format(r[key], fmt) if key in r else "-"
        lines.append(f"| {r['batch']} | {r['precision']} | {cell('stage_images_per_s', '.1f')} | "
                     f"{cell('backbone_images_per_s', '.1f')} | {cell('rel_l2', '.2e')} | {cell('max_abs', '.3f')} | "
                     f"{cell('label_agreement', '.4f')} | {r.get('note', '')} |")
    lines.append("")
    os.makedirs(args.out_dir, exist_ok=True)
    for name, text in (("gpu_report.md", "\n".join(lines)), ("gpu_report.json", json.dumps(data, indent=1))):
        path = os.path.join(args.out_dir, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    print(f"wrote {args.out_dir}/gpu_report.md and gpu_report.json")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreted, tiny shapes, no CUDA column")
    p.add_argument("--budget-s", type=float, default=180.0, help="after this, the slow references are skipped")
    p.add_argument("--build-seconds", default="?", help="the build's time, with its unit, for the report")
    p.add_argument("--tests-summary", default="not run", help="for the report")
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton.jit runs
    elif os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("gpu_check: unset TRITON_INTERPRET (or pass --dry-run)")
    ck = Check(args)
    if not ck.dry and not ck.torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (use --dry-run on a machine without a GPU)")
    if "cuda" not in ck.backends and not ck.dry:
        print("primaps_fast._C_cuda is not built: the CUDA column is empty", flush=True)
        ck.failed = True
    ck.torch.manual_seed(0)
    for batch in ck.batches:
        stages(ck, batch)
    noise_rows(ck)
    scene_rows(ck)
    feature_stage(ck)
    report(ck, args)
    return 1 if ck.failed else 0


if __name__ == "__main__":
    sys.exit(main())
