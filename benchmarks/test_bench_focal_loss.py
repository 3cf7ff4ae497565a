"""PriMaPs-EM M-step loss (focal_loss forward + backward) on a batch of 8 with 27 classes, 40x40 scores ->
320x320 labels: reference = the official FocalLoss with autograd on the upsampled logits. Two inputs: the
EM benchmark's class scores, and the same scores times 60 ("sharp": classes more than 80 apart, where the
C++ kernel takes an exp per pixel and class instead of its geometric products, its worst case)."""
import pytest
import torch

import primaps_fast
from primaps_fast import reference
from bench_inputs import EM_B, em_inputs, on_device
from side_by_side import PROVIDERS, time_side_by_side


@pytest.mark.benchmark(group="focal_loss fwd+bwd 8x27x40x40 -> 320x320")
@pytest.mark.parametrize("kind", ["scores", "sharp"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_focal_loss(benchmark, provider, kind):
    logits, _, target = em_inputs()
    if kind == "sharp":
        logits = 60 * logits
    x, t = on_device(provider, logits, target)

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
    time_side_by_side(benchmark, fn, case=f"focal_{kind}", provider=provider, per=EM_B,
                      rounds=2 if provider == "reference" else 5)


@pytest.mark.benchmark(group="focal_loss fwd+bwd 8x27x40x40 -> 320x320: with a class_stats hook (data-parallel)")
@pytest.mark.parametrize("hook", ["none", "class_stats"])
def test_focal_loss_class_stats(benchmark, hook):
    """The C++ loss with the hook of a data-parallel rank (here the identity: one rank) against none: the
    hook's statistics come from the same pass over the pixels, so it should cost no more."""
    logits, _, target = em_inputs()
    kw = {} if hook == "none" else {"class_stats": lambda sums, n: (sums, n)}

    def fn():
        leaf = logits.clone().requires_grad_(True)
        primaps_fast.focal_loss(leaf, target, backend="cpu", **kw).backward()
        return leaf.grad

    speedup = time_side_by_side(benchmark, fn, case="focal_class_stats", provider=hook, per=EM_B, rounds=7,
                                baseline="none")
    if speedup is not None:
        print(f"\nfocal loss with a class_stats hook: {1 / speedup:.2f}x the time without")
