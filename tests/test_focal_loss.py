"""focal_loss: C++, Triton and CUDA value and gradient against autograd of the reference (official FocalLoss)."""
import pytest
import torch
import torch.nn.functional as F

import primaps_fast
from primaps_fast import reference
from primaps_fast._dispatch import triton_available

from cuda_backend import GPU_BACKENDS, requires_cuda_backend

IGNORE = 255


def make_target(B, K, H, W, rng, ignore=IGNORE):
    t = torch.randint(0, K, (B, H, W), generator=rng)
    t[torch.rand(B, H, W, generator=rng) < 0.2] = ignore
    if B > 1:
        t[1] = ignore  # an image with no labelled pixel
    return t


def value_and_grad(fn, logits, target, **kw):
    x = logits.clone().requires_grad_(True)
    loss = fn(x, target, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def assert_matches(got, want, rtol=1e-5):
    (v, g), (v0, g0) = got, want
    torch.testing.assert_close(v, v0, rtol=rtol, atol=0)
    torch.testing.assert_close(g, g0, rtol=rtol, atol=rtol * float(g0.abs().max()))


CASES = [  # B, K, h, w, H, W
    (1, 2, 5, 5, 40, 40),
    (3, 5, 7, 6, 33, 25),
    (3, 27, 5, 4, 40, 32),
    (1, 27, 6, 7, 19, 23),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("gamma", [2.0, 0.0, 3.5])
def test_cpu_matches_reference_autograd(case, gamma, rng):
    B, K, h, w, H, W = case
    logits = 2 * torch.randn(B, K, h, w, generator=rng)
    target = make_target(B, K, H, W, rng)
    want = value_and_grad(reference.focal_loss, logits, target, gamma=gamma)
    got = value_and_grad(primaps_fast.focal_loss, logits, target, gamma=gamma, backend="cpu")
    assert got[0].shape == () and got[0].dtype == torch.float32
    assert_matches(got, want)


@pytest.mark.parametrize("case", [(2, 40, 3, 4, 64, 50), (1, 9, 2, 3, 96, 7), (2, 3, 6, 5, 61, 29)])
def test_cpu_exact_and_geometric_segments(case, rng):
    """The C++ kernel's two ways to a segment's exponentials (bilinear upsampling is affine along a run of
    columns with the same taps: a geometric product, or one exp per pixel where the classes spread more than
    80 at an end of the run) against the reference: K > 32 (the chunks on the heap), runs of up to 48
    columns (the product restarted every 16), and logits that mix small and very large spreads."""
    B, K, h, w, H, W = case
    logits = torch.randn(B, K, h, w, generator=rng)
    logits[:, :, :, w // 2:] *= 60  # spreads of a few hundred: the per-pixel exp
    target = make_target(B, K, H, W, rng)
    want = value_and_grad(reference.focal_loss, logits, target)
    assert_matches(value_and_grad(primaps_fast.focal_loss, logits, target, backend="cpu"), want)


@pytest.mark.parametrize("case,scale", [((2, 7, 3, 4, 48, 64), 3.0), ((1, 27, 4, 3, 67, 50), 12.0),
                                        ((2, 6, 8, 8, 16, 16), 25.0), ((2, 5, 9, 7, 1, 40), 8.0)])
def test_cpu_block_recurrences(case, scale, rng):
    """The C++ kernel's exponentials by blocks of the column and row segments (bilinear in x and y: geometric
    along a row and from row to row) against the reference: blocks of 16 x 16 pixels (the longest
    recurrences) and more (restarted), blocks of 2 x 2 where the ratio's factor from row to row can pass
    exp(80) (an exp per pixel there), and a single output row."""
    B, K, h, w, H, W = case
    logits = scale * torch.randn(B, K, h, w, generator=rng)
    target = make_target(B, K, H, W, rng)
    want = value_and_grad(reference.focal_loss, logits, target)
    assert_matches(value_and_grad(primaps_fast.focal_loss, logits, target, backend="cpu"), want)


def test_official_formula_and_grad_output(rng):
    """The reference against the official FocalLoss written out on materialised upsampled logits."""
    logits = torch.randn(2, 4, 5, 5, generator=rng, dtype=torch.float64)
    target = make_target(2, 4, 13, 11, rng)
    up = F.interpolate(logits, (13, 11), mode="bilinear", align_corners=False)
    conf = up.softmax(1).permute(1, 0, 2, 3).reshape(4, -1).mean(1)
    official = F.cross_entropy(up, target, weight=(1 - conf) ** 2, ignore_index=IGNORE, reduction="none").mean()
    torch.testing.assert_close(reference.focal_loss(logits, target), official, rtol=1e-12, atol=0)
    # float64 in: the C++ path computes in float32 and returns float64; grad_output scales the gradient
    x = logits.clone().requires_grad_(True)
    (3 * primaps_fast.focal_loss(x, target, backend="cpu")).backward()
    y = logits.clone().requires_grad_(True)
    (3 * reference.focal_loss(y, target)).backward()
    assert x.grad.dtype == torch.float64
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-5 * float(y.grad.abs().max()))


def test_reference_gradcheck(rng):
    """gamma=0 (weights 1, so the detached weights do not matter): the upsampled CE path is correct in float64."""
    logits = torch.randn(2, 3, 3, 4, generator=rng, dtype=torch.float64, requires_grad=True)
    target = make_target(2, 3, 7, 9, rng)
    assert torch.autograd.gradcheck(lambda x: reference.focal_loss(x, target, gamma=0.0), (logits,))


def test_deterministic_and_no_grad(rng):
    logits = torch.randn(3, 6, 8, 8, generator=rng)
    target = make_target(3, 6, 30, 30, rng)
    a = value_and_grad(primaps_fast.focal_loss, logits, target)
    b = value_and_grad(primaps_fast.focal_loss, logits, target)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with torch.no_grad():
        assert torch.equal(primaps_fast.focal_loss(logits, target), a[0])
    all_ignored = torch.full_like(target, IGNORE)
    v, g = value_and_grad(primaps_fast.focal_loss, logits, all_ignored)
    assert v == 0 and not g.any()


def test_bad_inputs():
    logits = torch.randn(2, 3, 4, 4)
    target = torch.zeros(2, 8, 8, dtype=torch.int64)
    f = primaps_fast.focal_loss
    with pytest.raises(ValueError, match="logits"):
        f(logits[:, :1], target)
    with pytest.raises(ValueError, match="logits"):
        f(logits.flatten(2), target)
    with pytest.raises(ValueError, match="logits"):
        f(torch.full_like(logits, float("inf")), target)
    with pytest.raises(TypeError, match="target"):
        f(logits, target.float())
    with pytest.raises(ValueError, match="target"):
        f(logits, target[:1])
    with pytest.raises(ValueError, match="target"):
        f(logits, target + 3)
    with pytest.raises(ValueError, match="target"):
        f(logits, target - 1)
    with pytest.raises(TypeError, match="gamma"):
        f(logits, target, gamma="2")
    # a negative gamma turned the weights of confident classes into infinities (a NaN/inf loss)
    for gamma in (-1.0, -0.5, float("nan"), float("inf"), 10 ** 400):
        with pytest.raises(ValueError, match="^gamma: expected a finite number in \\[0, inf\\)"):
            f(logits, target, gamma=gamma)
    for ignore_index, err in ((2 ** 63, ValueError), (-(2 ** 63) - 1, ValueError), (255.0, TypeError)):
        with pytest.raises(err, match="^ignore_index: expected an int"):
            f(logits, target, ignore_index=ignore_index)


def _blocky_target(B, K, H, W, rng):
    """Pseudo-label-like targets: 8 x 8 blocks of one class, a fifth ignored."""
    coarse = torch.randint(0, K, (B, 1, (H + 7) // 8, (W + 7) // 8), generator=rng).float()
    t = F.interpolate(coarse, scale_factor=8, mode="nearest")[:, 0, :H, :W].long()
    t[torch.rand(B, H, W, generator=rng) < 0.2] = IGNORE
    return t


@pytest.mark.parametrize("case", CASES + [(2, 9, 12, 10, 7, 5), (2, 27, 40, 40, 320, 320)])
@pytest.mark.parametrize("kind", ["noise", "blocks"])
def test_one_pass_matches_two_passes(case, kind, rng, monkeypatch):
    """The one-pass kernel (gradient moments per target class, combined with the weights afterwards)
    against the two-pass one (weights first) that runs when the moments would be too large: the same loss
    and gradient to float32 rounding, and both the reference's (shapes include a downsampling one)."""
    from primaps_fast.ops import focal_loss as op

    B, K, h, w, H, W = case
    logits = 3 * torch.randn(B, K, h, w, generator=rng)
    target = make_target(B, K, H, W, rng) if kind == "noise" else _blocky_target(B, K, H, W, rng)
    one = value_and_grad(primaps_fast.focal_loss, logits, target, backend="cpu")
    monkeypatch.setattr(op, "MAX_MOMENT_BYTES", 0)
    two = value_and_grad(primaps_fast.focal_loss, logits, target, backend="cpu")
    assert_matches(one, two, rtol=2e-6)
    assert_matches(one, value_and_grad(reference.focal_loss, logits, target))


@pytest.mark.parametrize("two_passes", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_target_values_checked_by_the_kernel(two_passes, grad, rng, monkeypatch):
    """The C++ path reads the target's values once, in its kernel; a bad one gets the message of the other
    backends' checks, wherever it is, on either kernel."""
    from primaps_fast.ops import focal_loss as op

    if two_passes:
        monkeypatch.setattr(op, "MAX_MOMENT_BYTES", 0)
    logits = torch.randn(3, 4, 5, 5, generator=rng, requires_grad=grad)
    for value, message in ((4, r"^target: class ids must be in \[0, 4\) or ignore_index=255$"),
                           (-1, r"^target: negative ids \(other than ignore_index=255\) are not allowed$"),
                           (254, r"^target: class ids must be in \[0, 4\)")):
        for b, y, x in ((0, 0, 0), (2, 19, 18), (1, 7, 3)):
            target = make_target(3, 4, 20, 19, rng)
            target[b, y, x] = value
            with pytest.raises(ValueError, match=message):
                primaps_fast.focal_loss(logits, target, backend="cpu")


@pytest.mark.interpreter
@pytest.mark.parametrize("case", [(2, 3, 3, 3, 12, 12), (3, 5, 3, 4, 10, 7), (2, 4, 5, 4, 5, 4), (2, 3, 7, 6, 4, 3),
                                  (1, 3, 2, 3, 28, 42)])
def test_triton_matches_reference(case, rng):
    """Upsampling by 4, non-integer ratios, equal sizes, downsampling, 14x (DINOv2's patch): the gradient
    gathered per source cell (no atomics) is the reference's, and the same bits on a second run."""
    if not triton_available():
        pytest.skip("triton not available")
    B, K, h, w, H, W = case
    logits = torch.randn(B, K, h, w, generator=rng)
    target = make_target(B, K, H, W, rng)
    want = value_and_grad(reference.focal_loss, logits, target)
    got = value_and_grad(primaps_fast.focal_loss, logits, target, backend="triton")
    assert_matches(got, want)
    again = value_and_grad(primaps_fast.focal_loss, logits, target, backend="triton")
    assert torch.equal(got[0], again[0]) and torch.equal(got[1], again[1])


def test_non_contiguous_and_empty(rng):
    logits = torch.randn(2, 4, 6, 5, generator=rng).transpose(2, 3)
    target = make_target(2, 4, 23, 17, rng).transpose(1, 2)
    want = value_and_grad(reference.focal_loss, logits.contiguous(), target.contiguous())
    assert_matches(value_and_grad(primaps_fast.focal_loss, logits, target, backend="cpu"), want)
    with pytest.raises(ValueError, match="target"):
        primaps_fast.focal_loss(logits, target[:, :0])


@pytest.mark.parametrize("backend", ["cpu", "cpu-two-passes", "reference",
                                     pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("split", [1, 2])
def test_class_stats_splits_a_batch(backend, split, rng, monkeypatch):
    """``class_stats``: a batch split into two calls (two data-parallel ranks) whose hook supplies the
    statistics of the whole batch gives losses and gradients that add up to those of one call (on the C++
    backend with the one-pass kernel and with the two-pass one)."""
    if backend == "triton" and not triton_available():
        pytest.skip("triton not available")
    if backend == "cpu-two-passes":
        from primaps_fast.ops import focal_loss as op

        monkeypatch.setattr(op, "MAX_MOMENT_BYTES", 0)
        backend = "cpu"
    B, K, h, w, H, W = 3, 5, 4, 5, 13, 11
    logits = 2 * torch.randn(B, K, h, w, generator=rng)
    target = make_target(B, K, H, W, rng)
    want = value_and_grad(primaps_fast.focal_loss, logits, target, gamma=1.5, backend=backend)
    parts = [slice(0, split), slice(split, B)]
    seen = {}

    def record(i):
        def hook(sums, n):
            assert sums.dtype == torch.float64 and sums.shape == (parts[i].stop - parts[i].start, K)
            seen[i] = (sums, n)
            return sums, n
        return hook

    for i, p in enumerate(parts):  # phase 1: each part's own statistics
        primaps_fast.focal_loss(logits[p], target[p], backend=backend, class_stats=record(i))
    total = (torch.cat([seen[0][0], seen[1][0]]), seen[0][1] + seen[1][1])
    got = [value_and_grad(primaps_fast.focal_loss, logits[p], target[p], gamma=1.5, backend=backend,
                          class_stats=lambda s, n: total) for p in parts]
    assert_matches((got[0][0] + got[1][0], torch.cat([got[0][1], got[1][1]])), want)
    # identity statistics: the same as no hook
    alone = value_and_grad(primaps_fast.focal_loss, logits, target, gamma=1.5, backend=backend,
                           class_stats=lambda s, n: (s, n))
    assert_matches(alone, want, rtol=1e-6)


@pytest.mark.parametrize("two_passes", [False, True])
def test_class_stats_hook_between_pass_and_gradient(two_passes, rng, monkeypatch):
    """On the C++ backend a ``class_stats`` hook costs no pass of its own: it is called once, with the sums of
    the one pass over the pixels (the two-pass kernel: of its first pass, as without a hook), and what it
    returns weighs the loss and the gradient of that pass. The custom op given those statistics gives the
    same bits."""
    from primaps_fast.ops import focal_loss as op

    if two_passes:
        monkeypatch.setattr(op, "MAX_MOMENT_BYTES", 0)
    first_passes = []
    real = op.confidence_sums_cpu
    monkeypatch.setattr(op, "confidence_sums_cpu", lambda *a: first_passes.append(1) or real(*a))
    B, K, h, w, H, W = 2, 6, 5, 4, 19, 14
    logits = 3 * torch.randn(B, K, h, w, generator=rng)
    target = make_target(B, K, H, W, rng)
    other = torch.rand(3, K, generator=rng, dtype=torch.float64) * H * W  # statistics of a larger batch
    calls = []

    def hook(sums, n):
        calls.append((sums.clone(), n))
        return other, 5 * B * H * W

    got = value_and_grad(primaps_fast.focal_loss, logits, target, gamma=2.5, backend="cpu", class_stats=hook)
    assert len(calls) == 1 and calls[0][1] == B * H * W
    assert len(first_passes) == (1 if two_passes else 0)
    up = F.interpolate(logits, (H, W), mode="bilinear", align_corners=False)
    torch.testing.assert_close(calls[0][0], up.softmax(1).double().sum((2, 3)), rtol=1e-5, atol=1e-6)
    want = value_and_grad(primaps_fast.focal_loss, logits, target, gamma=2.5, backend="reference",
                          class_stats=lambda s, n: (other, 5 * B * H * W))
    assert_matches(got, want)
    # the custom op with the statistics known before the call: no first pass of its own either
    before = len(first_passes)
    loss, grad = torch.ops.primaps_fast.focal_loss(logits, target, 2.5, IGNORE, True, other, 5 * B * H * W)
    assert len(first_passes) == before
    assert torch.equal(loss, got[0]) and torch.equal(grad, got[1])


def test_class_stats_bad_hooks():
    logits, target = torch.randn(2, 3, 4, 4), torch.zeros(2, 8, 8, dtype=torch.int64)
    f = primaps_fast.focal_loss
    with pytest.raises(TypeError, match="class_stats"):
        f(logits, target, class_stats=3)
    with pytest.raises(TypeError, match="class_stats"):
        f(logits, target, class_stats=lambda s, n: s)
    with pytest.raises(ValueError, match="class_stats"):
        f(logits, target, class_stats=lambda s, n: (s[:, :2], n))
    with pytest.raises(ValueError, match="class_stats"):
        f(logits, target, class_stats=lambda s, n: (s, 0))


def test_shared_class_weight_rule_matches_python(rng):
    """csrc/focal_weights.h (the CUDA kernel's rule too), through the C++ binding, against class_weights:
    bit for bit at gamma 0, 1 and 2 (torch's pow is exact there), to float32 rounding elsewhere."""
    from primaps_fast._dispatch import cpp
    from primaps_fast.ops.focal_loss import class_weights

    n = 7 * 13 * 3
    sums = torch.rand(3, 6, generator=rng, dtype=torch.float64) * n / 3
    sums[:, 0] = n / 3  # confidence 1: weight 0
    sums[:, 1] = 0.0  # confidence 0: weight 1
    for gamma in (2.0, 0.0, 1.0, 3.5, 0.5):
        got = torch.empty(6)
        cpp().focal_class_weights(sums.numpy(), n, gamma, got.numpy())
        want = class_weights(sums, n, gamma)
        if gamma in (0.0, 1.0, 2.0):
            assert torch.equal(got, want), gamma
        else:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


# ---- GPU: the CUDA and Triton backends on CUDA tensors; skipped, with the reason, without a GPU ----

def gpu_focal(backend):
    """``focal_loss(logits, target, gamma=...)`` of the backend (CUDA tensors in, differentiable)."""
    return lambda x, t, gamma=2.0: primaps_fast.focal_loss(x, t, gamma=gamma, backend=backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", CASES + [(2, 4, 9, 8, 5, 3), (2, 3, 6, 6, 6, 6), (1, 3, 4, 8, 3, 4100)])
@pytest.mark.parametrize("gamma", [2.0, 3.5])
def test_gpu_matches_reference_autograd(case, gamma, backend, rng):
    B, K, h, w, H, W = case  # also downsampling, equal sizes, and rows too wide for 48 KiB of shared memory
    logits = 2 * torch.randn(B, K, h, w, generator=rng)
    target = make_target(B, K, H, W, rng)
    want = value_and_grad(reference.focal_loss, logits, target, gamma=gamma)
    v, g = value_and_grad(gpu_focal(backend), logits.cuda(), target.cuda(), gamma=gamma)
    assert v.is_cuda and g.is_cuda and v.shape == () and v.dtype == torch.float32
    assert_matches((v.cpu(), g.cpu()), want)


@requires_cuda_backend
def test_cuda_deterministic_matches_cpu_and_scales(rng):
    logits = torch.randn(3, 6, 8, 8, generator=rng)
    target = make_target(3, 6, 30, 30, rng)
    f = gpu_focal("cuda")
    a = value_and_grad(f, logits.cuda(), target.cuda())
    b = value_and_grad(f, logits.cuda(), target.cuda())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # no float atomics: bit-identical runs
    assert_matches((a[0].cpu(), a[1].cpu()), value_and_grad(primaps_fast.focal_loss, logits, target, backend="cpu"))
    with torch.no_grad():
        assert torch.equal(f(logits.cuda(), target.cuda()), a[0])
    x = logits.double().cuda().requires_grad_(True)  # float64 in: computed in float32, returned as float64
    (3 * f(x, target.cuda())).backward()
    assert x.grad.dtype == torch.float64
    torch.testing.assert_close(x.grad.float().cpu(), 3 * a[1].cpu(), rtol=1e-6, atol=0)
    v, g = value_and_grad(f, logits.cuda(), torch.full_like(target, IGNORE).cuda())
    assert v == 0 and not g.any()


@requires_cuda_backend
@pytest.mark.parametrize("with_grad", [True, False])
def test_cuda_custom_op(rng, with_grad):
    import primaps_fast.ops.focal_loss  # noqa: F401  (defines the op, registers its CUDA kernel)

    logits = torch.randn(2, 4, 5, 6, generator=rng).cuda().requires_grad_(with_grad)
    target = torch.randint(0, 4, (2, 20, 24), generator=rng)
    target[0, :2] = IGNORE
    torch.library.opcheck(torch.ops.primaps_fast.focal_loss.default, (logits, target.cuda(), 2.0, IGNORE, with_grad))


def test_one_pass_bindings_refuse_inconsistent_buffers(rng):
    """The C++ entry points of the one-pass kernel check every buffer they index (shapes, slots below the
    moments' R): a ValueError, never a read or write past a buffer."""
    from primaps_fast._dispatch import cpp

    B, K, h, w, H, W = 2, 5, 3, 4, 9, 11
    x, t = torch.randn(B, K, h, w, generator=rng), make_target(B, K, H, W, rng)
    slot, bad = torch.empty(B, K, dtype=torch.int32), torch.empty(B, dtype=torch.int64)
    cpp().focal_target_classes(t.numpy(), IGNORE, slot.numpy(), bad.numpy(), 1)
    R = int((slot >= 0).sum(1).max())
    sums, cl = torch.empty(B, K, dtype=torch.float64), torch.empty(B, K, dtype=torch.float64)
    grad, weight = torch.empty(B, K, h, w), torch.ones(K)
    ones = weight  # the kernel's per-class factors
    with pytest.raises(ValueError, match="^slot: a slot beyond"):
        cpp().focal_moments(x.numpy(), t.numpy(), slot.numpy(), ones.numpy(), IGNORE, sums.numpy(), cl.numpy(),
                            torch.empty(B, h, w, R - 1, 8).numpy(), True, 1)
    with pytest.raises(ValueError, match="^moments: expected"):
        cpp().focal_moments(x.numpy(), t.numpy(), slot.numpy(), ones.numpy(), IGNORE, sums.numpy(), cl.numpy(),
                            torch.empty(B, h, w, R, 5).numpy(), True, 1)
    with pytest.raises(ValueError, match="shapes do not match"):
        cpp().focal_moments(x.numpy(), t[:1].numpy(), slot.numpy(), ones.numpy(), IGNORE, sums.numpy(), cl.numpy(),
                            torch.empty(0, 0, 0, 0, 0).numpy(), False, 1)
    with pytest.raises(ValueError, match="shapes do not match"):
        cpp().focal_moments(x.numpy(), t.numpy(), slot.numpy(), torch.ones(K - 1).numpy(), IGNORE, sums.numpy(),
                            cl.numpy(), torch.empty(0, 0, 0, 0, 0).numpy(), False, 1)
    with pytest.raises(ValueError, match="^slot: a slot beyond"):
        cpp().focal_combine(torch.zeros(B, h, w, R - 1, 8).numpy(), slot.numpy(), weight.numpy(), 1.0,
                            grad.numpy(), 1)
    with pytest.raises(ValueError, match="^moments/slot/weight/grad"):
        cpp().focal_combine(torch.zeros(B, h, w, R, 8).numpy(), slot.numpy(), torch.ones(K + 1).numpy(), 1.0,
                            grad.numpy(), 1)
    with pytest.raises(ValueError, match="^slot/bad"):
        cpp().focal_target_classes(t.numpy(), IGNORE, slot[:1].numpy(), bad.numpy(), 1)
