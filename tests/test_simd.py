"""The SIMD variants of the C++ kernels (csrc/common.h: the x86-64 baseline "scalar", AVX2, AVX-512F (with
VL for the focal loss), the best the CPU has chosen when the module loads) give the same bits: loss,
gradient, softmax sums (of the one-pass kernel and of the two-pass kernel's first pass) and E-step labels
compared across every variant this CPU runs, on shapes whose rows end in partial vectors.
(The proposals' variants: tests/test_principal_masks.py.)"""
import pytest
import torch

import primaps_fast
from primaps_fast._dispatch import cpp
from primaps_fast.ops.focal_loss import confidence_sums_cpu

ISAS = ("scalar", "avx2", "avx512")


@pytest.fixture
def isas():
    """The variants this CPU runs, in ISAS order; the best is restored afterwards."""
    best = cpp().set_isa("auto")
    assert cpp().isa() == best
    yield ISAS[:ISAS.index(best) + 1]
    cpp().set_isa("auto")


def _outputs(logits, target, ids):
    x = logits.clone().requires_grad_(True)
    loss = primaps_fast.focal_loss(x, target, gamma=2.0, backend="cpu")
    loss.backward()
    stats = []
    primaps_fast.focal_loss(logits, target, backend="cpu",
                            class_stats=lambda s, n: (stats.append(s.clone()) or (s, n)))
    labels = primaps_fast.assign_pseudo_labels(logits, ids, backend="cpu")
    two_pass_sums = confidence_sums_cpu(logits, *target.shape[-2:])  # the two-pass kernel's first pass
    return loss.detach(), x.grad, stats[0], two_pass_sums, labels


@pytest.mark.parametrize("K,h,w,H,W", [(2, 1, 1, 1, 1), (5, 3, 4, 7, 15), (27, 5, 6, 17, 33), (3, 8, 8, 40, 40),
                                       (27, 40, 40, 320, 320), (7, 9, 13, 9, 13)])
def test_every_variant_gives_the_same_bits(isas, K, h, w, H, W):
    g = torch.Generator().manual_seed(K * 1000 + W)
    logits = torch.randn(2, K, h, w, generator=g) * 4
    target = torch.randint(0, K, (2, H, W), generator=g)
    target[:, ::3] = 255
    ids = torch.randint(0, 9, (2, H, W), generator=g)
    ids[ids == 8] = 255
    results = []
    for isa in isas:
        assert cpp().set_isa(isa) == isa == cpp().isa()
        results.append(_outputs(logits, target, ids))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_set_isa_refuses_a_variant_the_cpu_lacks(isas):
    for isa in ("sse4", "AVX2", "") + ISAS[len(isas):]:
        with pytest.raises(ValueError, match=r"^isa: expected 'auto', 'scalar' or one this CPU supports"):
            cpp().set_isa(isa)
    assert cpp().isa() == isas[-1]
