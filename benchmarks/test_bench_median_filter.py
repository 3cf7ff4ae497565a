"""median_filter: reference (the official MedianPool2d with unfold + median) vs C++ on the proposals of 8
synthetic 320x320 scenes (8 x 6 x 40 x 40 planes)."""
import pytest
import torch

import primaps_fast
from primaps_fast import reference
from primaps_fast.data.synthetic import make_scenes
from side_by_side import PROVIDERS, time_side_by_side


@pytest.fixture(scope="module")
def masks():
    return primaps_fast.principal_masks(make_scenes(8, image_size=320, dim=384).features).masks


@pytest.mark.benchmark(group="median_filter 8x6x40x40")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_median_filter(benchmark, masks, provider):
    x = masks.cuda() if provider == "triton" else masks
    assert torch.equal(primaps_fast.median_filter(x, backend=provider).cpu(), reference.median_filter(masks))
    fn = lambda: primaps_fast.median_filter(x, backend=provider)  # noqa: E731
    time_side_by_side(benchmark, fn, case="median", provider=provider, per=8,
                      rounds=5 if provider == "reference" else 20)
