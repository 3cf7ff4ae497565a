"""assign_pseudo_labels: C++, Triton and CUDA against the reference (official E-step loop) and F.interpolate."""
import pytest
import torch
import torch.nn.functional as F

import primaps_fast
from primaps_fast import reference
from primaps_fast._dispatch import triton_available

from cuda_backend import GPU_BACKENDS, requires_cuda_backend

IGNORE = 255


def make_masks(B, H, W, rng, num_ids=6, ignore=IGNORE):
    """Blocky mask ids with an ignored band; image 1 entirely ignored, image 2 one mask everywhere."""
    coarse = torch.randint(0, num_ids, (B, 1, 4, 3), generator=rng).float()
    ids = F.interpolate(coarse, (H, W), mode="nearest").long().squeeze(1)
    ids[0, : max(1, H // 5)] = ignore
    if B > 1:
        ids[1] = ignore
    if B > 2:
        ids[2] = 3
    return ids


CASES = [  # B, K, h, w, H, W
    (1, 2, 5, 5, 40, 40),  # H/h = 8
    (3, 5, 7, 6, 33, 25),  # non-integer ratios
    (3, 27, 5, 4, 40, 32),
    (1, 27, 6, 7, 19, 23),
]


@pytest.mark.parametrize("case", CASES)
def test_cpu_matches_reference(case, rng):
    B, K, h, w, H, W = case
    logits = torch.randn(B, K, h, w, generator=rng)  # continuous: no exact argmax ties
    ids = make_masks(B, H, W, rng)
    want = reference.assign_pseudo_labels(logits, ids)
    got = primaps_fast.assign_pseudo_labels(logits, ids, backend="cpu")
    assert got.dtype == torch.int64 and got.shape == (B, H, W)
    assert torch.equal(got, want)
    assert torch.equal(got == IGNORE, ids == IGNORE)
    if B > 2:
        assert (got[1] == IGNORE).all() and (got[2] == got[2, 0, 0]).all()


@pytest.mark.parametrize("case", CASES)
def test_one_mask_per_pixel_is_the_upsampled_argmax(case, rng):
    """Per-pixel masks expose the per-pixel argmax of F.interpolate(...): equal wherever the top two
    upsampled scores differ by more than float32 rounding (PyTorch's kernel may contract into FMAs)."""
    B, K, h, w, H, W = case
    logits = torch.randn(B, K, h, w, generator=rng)
    ids = torch.arange(H * W).view(1, H, W).repeat(B, 1, 1)
    got = primaps_fast.assign_pseudo_labels(logits, ids, ignore_index=-1, backend="cpu")
    assert_upsampled_argmax(got, logits)


def assert_upsampled_argmax(got, logits, first_row=0):
    """got: (B, H - first_row, W) labels, rows first_row.. of the H x W upsampling of logits."""
    size = (got.shape[-2] + first_row, got.shape[-1])
    up = F.interpolate(logits.double(), size, mode="bilinear", align_corners=False)[:, :, first_row:]
    top2 = up.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-5
    assert clear.float().mean() > 0.99
    assert torch.equal(got[clear], up.argmax(1)[clear])


def test_ties_go_to_the_smallest_class():
    # h = H: the upsampling is the identity. Pixel classes [[2, 2], [1, 1]] in one mask: 1 wins.
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 2, 0] = 1.0
    logits[0, 1, 1] = 1.0
    ids = torch.zeros(1, 2, 2, dtype=torch.int64)
    for backend in ["cpu", "reference"]:
        assert (primaps_fast.assign_pseudo_labels(logits, ids, backend=backend) == 1).all()
    logits[0, 0, 1, 1] = 2.0  # classes [[2, 2], [1, 0]]: 2 wins outright
    assert (primaps_fast.assign_pseudo_labels(logits, ids, backend="cpu") == 2).all()


def test_reference_equals_torch_mode_loop(rng):
    """The official loop votes with ``torch.mode``; on CPU it returns the smallest of tied values, which
    is the API's tie rule. Small masks with few classes make ties frequent."""
    logits = torch.randn(4, 3, 3, 3, generator=rng)
    ids = torch.randint(0, 12, (4, 6, 6), generator=rng)
    ids[0, 0] = IGNORE
    cls = F.interpolate(logits, (6, 6), mode="bilinear", align_corners=False).argmax(1)
    want = torch.full_like(ids, IGNORE)
    for b in range(4):
        for m in ids[b].unique():
            if int(m) != IGNORE:
                want[b][ids[b] == m] = cls[b][ids[b] == m].mode()[0]
    assert torch.equal(reference.assign_pseudo_labels(logits, ids), want)
    assert torch.equal(primaps_fast.assign_pseudo_labels(logits, ids, backend="cpu"), want)


def test_large_ids_dtypes_and_ignore_index(rng):
    logits = torch.randn(2, 4, 5, 6, generator=rng)
    ids = make_masks(2, 17, 21, rng, ignore=-1)
    want = reference.assign_pseudo_labels(logits, ids, ignore_index=-1)
    assert (want == -1).any()
    assert torch.equal(primaps_fast.assign_pseudo_labels(logits, ids, ignore_index=-1, backend="cpu"), want)
    big = torch.where(ids >= 0, ids * 1_000_003 + 7, ids)  # renumbered internally
    assert torch.equal(primaps_fast.assign_pseudo_labels(logits, big, ignore_index=-1), want)
    small = torch.where(ids >= 0, ids, 255).to(torch.uint8)
    want255 = torch.where(want >= 0, want, 255)
    assert torch.equal(primaps_fast.assign_pseudo_labels(logits.double(), small, backend="cpu"), want255)


def test_bad_inputs():
    logits = torch.randn(2, 3, 4, 4)
    ids = torch.zeros(2, 8, 8, dtype=torch.int64)
    f = primaps_fast.assign_pseudo_labels
    with pytest.raises(ValueError, match="logits"):
        f(logits[0], ids)
    with pytest.raises(TypeError, match="logits"):
        f(logits.long(), ids)
    with pytest.raises(ValueError, match="logits"):
        f(torch.full_like(logits, float("nan")), ids)
    with pytest.raises(ValueError, match="logits"):
        f(logits[:, :1], ids)
    with pytest.raises(TypeError, match="mask_ids"):
        f(logits, ids.float())
    with pytest.raises(ValueError, match="mask_ids"):
        f(logits, ids[:1])
    with pytest.raises(ValueError, match="mask_ids"):
        f(logits, ids[0])
    with pytest.raises(ValueError, match="mask_ids"):
        f(logits, ids - 1)
    with pytest.raises(ValueError, match="backend"):
        f(logits, ids, backend="gpu")


@pytest.mark.interpreter
@pytest.mark.parametrize("case", [(2, 3, 3, 3, 12, 12), (3, 4, 3, 4, 10, 7)])
def test_triton_matches_reference(case, rng):
    if not triton_available():
        pytest.skip("triton not available")
    B, K, h, w, H, W = case
    logits = torch.randn(B, K, h, w, generator=rng)
    ids = make_masks(B, H, W, rng)
    want = reference.assign_pseudo_labels(logits, ids)
    assert torch.equal(primaps_fast.assign_pseudo_labels(logits, ids, backend="triton"), want)
    per_pixel = torch.arange(H * W).view(1, H, W).repeat(B, 1, 1)
    got = primaps_fast.assign_pseudo_labels(logits, per_pixel, ignore_index=-1, backend="triton")
    assert_upsampled_argmax(got, logits)


def test_non_contiguous_and_empty(rng):
    logits = torch.randn(2, 4, 6, 5, generator=rng).transpose(2, 3)  # (2, 4, 5, 6), non-contiguous
    ids = make_masks(2, 23, 17, rng).transpose(1, 2)
    want = reference.assign_pseudo_labels(logits.contiguous(), ids.contiguous())
    assert torch.equal(primaps_fast.assign_pseudo_labels(logits, ids, backend="cpu"), want)
    with pytest.raises(ValueError, match="mask_ids"):
        primaps_fast.assign_pseudo_labels(logits, ids[:, :0])


def test_ignore_index_must_fit_int64():
    """2**63 reached the kernel as 'incompatible function arguments' or a can't-convert overflow."""
    logits, ids = torch.randn(1, 3, 2, 2), torch.zeros(1, 4, 4, dtype=torch.int64)
    for ignore_index, err in ((2 ** 63, ValueError), (-(2 ** 63) - 1, ValueError), (1.0, TypeError),
                              (True, TypeError)):
        with pytest.raises(err, match="^ignore_index: expected an int"):
            primaps_fast.assign_pseudo_labels(logits, ids, ignore_index=ignore_index)
    ids[0, 0, 0] = 2 ** 63 - 1
    out = primaps_fast.assign_pseudo_labels(logits, ids, ignore_index=2 ** 63 - 1)
    assert out[0, 0, 0] == 2 ** 63 - 1 and bool((out.view(-1)[1:] < 3).all())
    with pytest.raises(ValueError, match="^mask_ids: meta tensors are not supported"):
        primaps_fast.assign_pseudo_labels(logits, ids.to("meta"))


# ---- GPU: the CUDA and Triton backends on CUDA tensors; skipped, with the reason, without a GPU ----

def gpu_assign(logits, ids, backend, ignore_index=IGNORE):
    """The backend on CUDA copies of ``logits`` and ``ids`` (ids small enough to be used directly)."""
    logits, ids = logits.cuda(), ids.cuda()
    return primaps_fast.assign_pseudo_labels(logits, ids, ignore_index=ignore_index, backend=backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", CASES + [(2, 4, 9, 8, 5, 3), (2, 3, 6, 6, 6, 6), (1, 3, 1, 1, 70, 70)])
def test_gpu_matches_cpu_and_reference(case, backend, rng):
    B, K, h, w, H, W = case  # also downsampling, equal sizes, a 1x1 score map
    logits = torch.randn(B, K, h, w, generator=rng)
    ids = make_masks(B, H, W, rng)
    got = gpu_assign(logits, ids, backend)
    assert got.is_cuda and got.dtype == torch.int64 and got.shape == (B, H, W)
    assert torch.equal(got.cpu(), reference.assign_pseudo_labels(logits, ids))
    if backend == "cuda":  # the upsampled scores are the C++ kernel's, bit for bit
        assert torch.equal(got.cpu(), primaps_fast.assign_pseudo_labels(logits, ids, backend="cpu"))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_gpu_one_mask_per_pixel(case, backend, rng):
    """Per-pixel masks: many ids, the CUDA votes go to global memory (num_ids * K above the shared table)."""
    B, K, h, w, H, W = case
    logits = torch.randn(B, K, h, w, generator=rng)
    ids = torch.arange(H * W).view(1, H, W).repeat(B, 1, 1)
    ids[:, 0] = -1
    got = gpu_assign(logits, ids, backend, ignore_index=-1).cpu()
    assert (got[:, 0] == -1).all()
    assert_upsampled_argmax(got[:, 1:], logits, first_row=1)
    if backend == "cuda":
        assert torch.equal(got, primaps_fast.assign_pseudo_labels(logits, ids, ignore_index=-1, backend="cpu"))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_ties_and_all_ignored(backend):
    logits = torch.zeros(2, 3, 2, 2)
    logits[:, 2, 0] = 1.0
    logits[:, 1, 1] = 1.0  # pixel classes [[2, 2], [1, 1]] in one mask: 1 wins
    ids = torch.zeros(2, 2, 2, dtype=torch.int64)
    ids[1] = IGNORE
    got = gpu_assign(logits, ids, backend).cpu()
    assert (got[0] == 1).all() and (got[1] == IGNORE).all()


@requires_cuda_backend
def test_cuda_custom_op(rng):
    import primaps_fast.ops.assign_pseudo_labels  # noqa: F401  (defines the op, registers its CUDA kernel)

    logits = torch.randn(2, 4, 5, 6, generator=rng).cuda()
    ids = torch.randint(0, 7, (2, 20, 24), generator=rng)
    ids[:, :3] = 255
    torch.library.opcheck(torch.ops.primaps_fast.assign_pseudo_labels.default, (logits, ids.cuda(), 7, 255, 255))


def test_kernel_refuses_ids_beyond_its_table(rng):
    """The C++ kernel checks each image's ids before it writes any of its pixels (in the image's worker):
    an id past num_ids is an IndexError, never a read past the table; a negative id other than
    ignore_index the ValueError of check_label_values."""
    from primaps_fast._dispatch import cpp

    logits = torch.randn(3, 4, 5, 5, generator=rng)
    for bad, error, message in ((7, IndexError, r"^mask_ids: id out of range \[0, num_ids\)$"),
                                (-2, ValueError, r"^mask_ids: negative ids \(other than ignore_index=255\) are not "
                                                 r"allowed$")):
        ids = torch.randint(0, 7, (3, 10, 10), generator=rng)
        ids[2, 9, 9] = bad
        out = torch.empty_like(ids)
        with pytest.raises(error, match=message):
            cpp().assign_pseudo_labels(logits.numpy(), ids.numpy(), out.numpy(), 7, 255, 255, 2)
        if bad < 0:  # the same message from the op, without a pass of its own over the ids
            with pytest.raises(ValueError, match=message):
                primaps_fast.assign_pseudo_labels(logits, ids, backend="cpu")


def _smooth_logits_with_near_ties(B, K, h, w, rng):
    """Smooth class maps (most source cells won by one class) with cells where two classes are within
    1e-7..1e-5 of each other or of the kernel's margin, and some equal corners."""
    coarse = torch.randn(B, K, 3, 3, generator=rng) * 4
    logits = F.interpolate(coarse, (h, w), mode="bilinear", align_corners=False)
    top2 = logits.topk(2, dim=1)
    first, second = top2.indices[:, 0], top2.indices[:, 1]
    pick = torch.rand(B, h, w, generator=rng) < 0.3
    gaps = torch.tensor([0.0, 1e-7, 1e-6, 2e-6, 5e-6, 1e-5, -1e-6])
    gap = gaps[torch.randint(0, len(gaps), (B, h, w), generator=rng)]
    lead = logits.gather(1, first[:, None])[:, 0]
    near = lead * (1 - gap) - gap.abs() * 1e-3
    logits.scatter_(1, second[:, None], torch.where(pick, near, logits.gather(1, second[:, None])[:, 0])[:, None])
    return logits.contiguous()


@pytest.mark.parametrize("case", [(2, 27, 20, 20, 160, 160), (3, 5, 9, 7, 40, 33), (2, 7, 12, 12, 12, 12),
                                  (2, 6, 5, 4, 70, 61), (2, 4, 30, 30, 17, 23)])
def test_cells_won_by_one_class_keep_the_upsampled_argmax(case, rng):
    """The kernel upsamples, at the pixels of a source cell, only the classes that can win there: those not
    below another class over the whole cell by more than float32 rounding (cell_candidates). On smooth maps
    with near-ties planted around that margin, the per-pixel labels are still the upsampled argmax
    (per-pixel masks), and the same as the Triton kernel's, which upsamples every class at every pixel.
    Scales of 8, non-integer, 1, 14-15 (runs of columns longer than the row pass's 8 lanes) and below 1."""
    B, K, h, w, H, W = case
    logits = _smooth_logits_with_near_ties(B, K, h, w, rng)
    ids = torch.arange(H * W).view(1, H, W).repeat(B, 1, 1)
    got = primaps_fast.assign_pseudo_labels(logits, ids, ignore_index=-1, backend="cpu")
    up = F.interpolate(logits.double(), (H, W), mode="bilinear", align_corners=False)
    top2 = up.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-5 * top2[:, 0].abs().clamp_min(1)
    assert 0.3 < clear.float().mean() < 0.999  # the planted near-ties are there
    assert torch.equal(got[clear], up.argmax(1)[clear])
    masks = make_masks(B, H, W, rng)
    assert torch.equal(primaps_fast.assign_pseudo_labels(logits, masks, backend="cpu"),
                       reference.assign_pseudo_labels(logits, masks))
    if triton_available():
        assert torch.equal(got, primaps_fast.assign_pseudo_labels(logits, ids, ignore_index=-1, backend="triton"))


@pytest.mark.parametrize("case", [(2, 40, 6, 5, 70, 61), (2, 27, 10, 10, 80, 80), (1, 33, 2, 3, 100, 9),
                                  (2, 5, 1, 1, 7, 5)])
@pytest.mark.parametrize("smooth", [True, False])
def test_blocks_of_one_and_of_several_ids(case, smooth, rng):
    """The C++ kernel votes a block (the pixels of one source cell in up to 16 rows of a band) of one mask
    id (and some ignored pixels) from the pixels each candidate class wins, and a block of several ids
    along each row's runs of ids and classes: masks with large regions, ragged edges, pixel noise and ignored parts in the same image, more than 32
    classes (two words of candidate bits), bands taller than 16 rows, single source rows and columns."""
    B, K, h, w, H, W = case
    logits = torch.randn(B, K, h, w, generator=rng)  # no planted near-ties: single-pixel ids vote here
    if smooth:  # most cells won by one class
        logits = F.interpolate(torch.randn(B, K, 3, 3, generator=rng) * 4, (h, w), mode="bilinear")
    ids = make_masks(B, H, W, rng, num_ids=5)
    noise = torch.rand(B, H, W, generator=rng) < 0.1  # ragged edges and single-pixel ids
    ids[noise] = torch.randint(0, 40, (int(noise.sum()),), generator=rng)
    ids[:, H // 2:, : W // 3] = torch.arange(H * W).view(H, W)[H // 2:, : W // 3] + 100  # a pixel per id
    ids[:, -3:, -W // 4:] = IGNORE
    ids[torch.rand(B, H, W, generator=rng) < 0.05] = IGNORE  # blocks of one id and some ignored pixels
    want = reference.assign_pseudo_labels(logits, ids)
    assert torch.equal(primaps_fast.assign_pseudo_labels(logits, ids, backend="cpu"), want)


@pytest.mark.parametrize("case", [(2, 6, 10, 10, 80, 80), (1, 36, 7, 9, 61, 70)])
def test_exact_ties_in_every_mask(case, rng):
    """Every vote is counted exactly: each mask holds exactly as many pixels of its two leading classes
    (surplus pixels ignored), so the smaller class wins, and one vote too many or too few for either
    changes the label. Masks of 20 x 20 pixels span whole source cells (voted from the argmax's counts) and
    cells shared with other masks or ignored pixels (voted along the rows)."""
    B, K, h, w, H, W = case
    logits = F.interpolate(torch.randn(B, K, 3, 3, generator=rng) * 4, (h, w), mode="bilinear")
    each = torch.arange(H * W).view(1, H, W).repeat(B, 1, 1)
    per_pixel = primaps_fast.assign_pseudo_labels(logits, each, ignore_index=-1, backend="cpu")
    assert torch.equal(per_pixel, reference.assign_pseudo_labels(logits, each, ignore_index=-1))
    ids = (torch.arange(H)[:, None] // 20 * 10 + torch.arange(W)[None] // 20).repeat(B, 1, 1)
    expect = {}
    for b in range(B):
        for m in ids[b].unique().tolist():
            where = (ids[b] == m).flatten().nonzero()[:, 0]
            counts = torch.bincount(per_pixel[b].flatten()[where], minlength=K)
            top = counts.topk(2)
            (p, q), (cp, cq) = top.indices.tolist(), top.values.tolist()
            if cq == 0:
                continue
            surplus = where[per_pixel[b].flatten()[where] == p][cq:]  # the last pixels of class p
            ids[b].view(-1)[surplus] = IGNORE
            expect[(b, m)] = min(p, q)
    got = primaps_fast.assign_pseudo_labels(logits, ids, backend="cpu")
    assert len(expect) > 10
    for (b, m), k in expect.items():
        assert (got[b][ids[b] == m] == k).all(), (b, m)
    assert torch.equal(got, reference.assign_pseudo_labels(logits, ids))


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("ignore", [0, 2, -1])
def test_ignore_index_that_is_a_class(backend, ignore, rng):
    """The official loop drops the votes equal to its ignore label (``cls[fill][cls[fill] != ignore]``): when
    ignore_index is a class id, its pixels do not vote, and a mask won by that class everywhere keeps
    ignore_index. Also through the renumbering of large ids."""
    if backend == "triton" and not triton_available():
        pytest.skip("Triton is not installed")
    logits = torch.randn(2, 5, 6, 6, generator=rng)
    logits[1, :, :3] = torch.tensor([0.0, -1, -1, -1, -1]).view(5, 1, 1) if ignore == 0 else logits[1, :, :3]
    ids = torch.randint(1, 9, (2, 30, 30), generator=rng)
    ids[1, :12] = 9  # class 0 wins all of it (ignore == 0): no votes
    ids[:, -2:] = ignore
    want = reference.assign_pseudo_labels(logits, ids, ignore_index=ignore)
    if ignore == 0:  # mask 9 has no votes
        assert (want[1, :12] == 0).all()
    assert torch.equal(primaps_fast.assign_pseudo_labels(logits, ids, ignore_index=ignore, backend=backend), want)
    big = torch.where(ids != ignore, ids * 1_000_003 + 11, ids)  # renumbered: the ids' ignore becomes -1
    assert torch.equal(primaps_fast.assign_pseudo_labels(logits, big, ignore_index=ignore, backend=backend), want)
