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
