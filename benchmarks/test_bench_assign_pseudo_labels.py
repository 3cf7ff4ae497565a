"""PriMaPs-EM E-step (assign_pseudo_labels) on a batch of 8 with 27 classes, 40x40 scores -> 320x320 labels:
reference = the official per-mask loop on the upsampled argmax."""
import pytest
import torch

import primaps_fast
from bench_inputs import EM_B, em_inputs, on_device
from side_by_side import PROVIDERS, time_side_by_side


@pytest.mark.benchmark(group="assign_pseudo_labels 8x27x40x40 -> 320x320")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_assign_pseudo_labels(benchmark, provider):
    logits, mask_ids, want = em_inputs()
    x, ids = on_device(provider, logits, mask_ids)
    if provider != "reference":
        assert torch.equal(primaps_fast.assign_pseudo_labels(x, ids, backend=provider).cpu(), want)
    fn = lambda: primaps_fast.assign_pseudo_labels(x, ids, backend=provider)  # noqa: E731
    time_side_by_side(benchmark, fn, case="assign", provider=provider, per=EM_B,
                      rounds=2 if provider == "reference" else 5)


@pytest.mark.benchmark(group="assign_pseudo_labels 8x27x40x40 -> 320x320, smooth scores")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_assign_pseudo_labels_smooth(benchmark, provider):
    """The same masks with class scores that vary smoothly (bilinear from 5x5, as a trained head's maps
    rather than noise): the C++ kernel skips the source cells one class wins outright."""
    import torch.nn.functional as F

    logits, mask_ids, _ = em_inputs()
    g = torch.Generator().manual_seed(1)
    smooth = F.interpolate(torch.randn(logits.shape[0], logits.shape[1], 5, 5, generator=g) * 3,
                           logits.shape[-2:], mode="bilinear", align_corners=False)
    x, ids = on_device(provider, smooth, mask_ids)
    if provider != "reference":
        want = primaps_fast.assign_pseudo_labels(smooth, mask_ids, backend="reference")
        assert torch.equal(primaps_fast.assign_pseudo_labels(x, ids, backend=provider).cpu(), want)
    fn = lambda: primaps_fast.assign_pseudo_labels(x, ids, backend=provider)  # noqa: E731
    time_side_by_side(benchmark, fn, case="assign_smooth", provider=provider, per=EM_B,
                      rounds=2 if provider == "reference" else 5)
