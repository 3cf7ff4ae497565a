"""PriMaPs-EM kernels on a batch of 8 with 27 classes, 40x40 scores -> 320x320 labels: the E-step
(assign_pseudo_labels: reference = the official per-mask loop on the upsampled argmax) and the M-step loss
(focal_loss forward + backward: reference = the official FocalLoss with autograd on the upsampled logits)."""
import pytest
import torch
import torch.nn.functional as F

import primaps_fast
from primaps_fast import reference
from side_by_side import PROVIDERS, time_side_by_side

B, K, h, H = 8, 27, 40, 320


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, K, h, h, generator=g)
    coarse = torch.randint(0, 12, (B, 1, 8, 8), generator=g).float()  # ~12 masks per image
    mask_ids = F.interpolate(coarse, (H, H), mode="nearest").long().squeeze(1)
    mask_ids[torch.rand(B, H, H, generator=g) < 0.1] = 255
    target = reference.assign_pseudo_labels(logits, mask_ids)
    return logits, mask_ids, target


def _device(provider, *tensors):
    return [t.cuda() for t in tensors] if provider == "triton" else list(tensors)


@pytest.mark.benchmark(group="assign_pseudo_labels 8x27x40x40 -> 320x320")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_assign_pseudo_labels(benchmark, inputs, provider):
    logits, mask_ids, want = inputs
    x, ids = _device(provider, logits, mask_ids)
    if provider != "reference":
        assert torch.equal(primaps_fast.assign_pseudo_labels(x, ids, backend=provider).cpu(), want)
    fn = lambda: primaps_fast.assign_pseudo_labels(x, ids, backend=provider)  # noqa: E731
    time_side_by_side(benchmark, fn, case="assign", provider=provider, per=B,
                      rounds=2 if provider == "reference" else 5)


@pytest.mark.benchmark(group="focal_loss fwd+bwd 8x27x40x40 -> 320x320")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_focal_loss(benchmark, inputs, provider):
    logits, _, target = inputs
    x, t = _device(provider, logits, target)

    def fn():
        leaf = x.clone().requires_grad_(True)
        loss = primaps_fast.focal_loss(leaf, t, backend=provider)
        loss.backward()
        return loss.detach(), leaf.grad

    if provider != "reference":
        v, g = fn()
        leaf = logits.clone().requires_grad_(True)
        v0 = reference.focal_loss(leaf, target)
        v0.backward()
        torch.testing.assert_close(v.cpu(), v0.detach(), rtol=1e-5, atol=0)
        torch.testing.assert_close(g.cpu(), leaf.grad, rtol=1e-4, atol=1e-5 * float(leaf.grad.abs().max()))
    time_side_by_side(benchmark, fn, case="focal", provider=provider, per=B,
                      rounds=2 if provider == "reference" else 5)
