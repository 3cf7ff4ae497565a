"""The SIMD variants of the C++ kernels (csrc/common.h: SSE2 baseline, AVX2, AVX-512F, the best the CPU
has chosen at load time) give the same bits: loss, gradient, confidence sums and E-step labels compared
across every variant this CPU runs, on shapes whose rows end in partial vectors."""
import pytest
import torch

import primaps_fast
from primaps_fast._dispatch import cpp


@pytest.fixture
def variants():
    """The variants this CPU runs; the best is restored afterwards."""
    best = cpp().best_simd()
    assert cpp().simd() == best  # the default is the best variant
    yield list(range(best + 1))
    cpp().set_simd(best)


def _outputs(logits, target, ids):
    x = logits.clone().requires_grad_(True)
    loss = primaps_fast.focal_loss(x, target, gamma=2.0, backend="cpu")
    loss.backward()
    stats = []
    primaps_fast.focal_loss(logits, target, backend="cpu",
                            class_stats=lambda s, n: (stats.append(s.clone()) or (s, n)))
    labels = primaps_fast.assign_pseudo_labels(logits, ids, backend="cpu")
    return loss.detach(), x.grad, stats[0], labels


@pytest.mark.parametrize("K,h,w,H,W", [(2, 1, 1, 1, 1), (5, 3, 4, 7, 15), (27, 5, 6, 17, 33), (3, 8, 8, 40, 40),
                                       (27, 40, 40, 320, 320), (7, 9, 13, 9, 13)])
def test_every_variant_gives_the_same_bits(variants, K, h, w, H, W):
    g = torch.Generator().manual_seed(K * 1000 + W)
    logits = torch.randn(2, K, h, w, generator=g) * 4
    target = torch.randint(0, K, (2, H, W), generator=g)
    target[:, ::3] = 255
    ids = torch.randint(0, 9, (2, H, W), generator=g)
    ids[ids == 8] = 255
    results = []
    for level in variants:
        cpp().set_simd(level)
        assert cpp().simd() == level
        results.append(_outputs(logits, target, ids))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_set_simd_refuses_a_variant_the_cpu_lacks(variants):
    for level in (-1, cpp().best_simd() + 1, 3):
        with pytest.raises(ValueError, match=r"^level: expected a SIMD variant in \[0, "):
            cpp().set_simd(level)
    assert cpp().simd() == cpp().best_simd()
