"""PNG pictures: titled panels, legend, the labelled confusion matrix; the text tables."""
import numpy as np
import pytest

from primaps_fast import pictures


def _dark_cells(img, conf_fraction_one):
    """Centroids (y, x) of the pixels painted with the colour of a full cell, split into two blobs by row."""
    ys, xs = np.nonzero((img == np.array(pictures.cell_color(conf_fraction_one))).all(-1))
    mid = (ys.min() + ys.max()) / 2
    top, bottom = ys < mid, ys >= mid
    return xs[top].mean(), xs[bottom].mean(), xs.min()


def test_confusion_picture_shades_cells_by_row_fraction_and_labels_them():
    names = ["road", "sky"]
    diag = pictures.confusion_picture(np.array([[7, 0], [0, 3]]), names)
    anti = pictures.confusion_picture(np.array([[0, 7], [3, 0]]), names, title="theta_M")
    x_top, x_bottom, x_min = _dark_cells(diag, 1.0)
    assert x_top < x_bottom  # (0, 0) and (1, 1) are full
    x_top, x_bottom, _ = _dark_cells(anti, 1.0)
    assert x_top > x_bottom  # (0, 1) and (1, 0) are full
    # class names to the left of the grid, the heading above it: dark text pixels there
    assert (diag[:, : x_min - 4] < 100).all(-1).sum() > 20
    # a row without ground-truth pixels is grey, not a fraction
    empty = pictures.confusion_picture(np.array([[5, 1], [0, 0]]), names)
    assert (empty == np.array([230, 230, 230])).all(-1).sum() > 2 * 30 * 30
    with pytest.raises(ValueError, match="conf"):
        pictures.confusion_picture(np.zeros((2, 3)), names)


def test_cell_color_runs_from_white_to_dark():
    assert pictures.cell_color(0) == (255, 255, 255)
    assert sum(pictures.cell_color(1)) < sum(pictures.cell_color(0.5)) < sum(pictures.cell_color(0.1))


def test_titled_panels_and_legend():
    rng = np.random.default_rng(0)
    panels = [rng.integers(0, 256, (20, w, 3), dtype=np.uint8) for w in (30, 50)]
    strip = pictures.titled_panels(panels, ["image", "a very long title for a narrow panel"])
    assert strip.shape == (pictures.TITLE_HEIGHT + 20, 30 + pictures.GAP + 50, 3)
    np.testing.assert_array_equal(strip[pictures.TITLE_HEIGHT:, :30], panels[0])
    np.testing.assert_array_equal(strip[pictures.TITLE_HEIGHT:, 30 + pictures.GAP:], panels[1])
    assert (strip[: pictures.TITLE_HEIGHT] < 128).any()
    with pytest.raises(ValueError, match="titles"):
        pictures.titled_panels(panels, ["one"])
    key = pictures.legend(["class 0", "class 1", "class 2"], pictures.palette(3), 60)
    assert key.shape[1] == 60 and key.shape[0] > 2 * 12  # wrapped onto several rows
    for color in pictures.palette(3)[:3]:
        assert (key == color).all(-1).sum() >= 10 * 10  # each swatch
    both = pictures.stack(strip, key)
    assert both.shape == (strip.shape[0] + key.shape[0], strip.shape[1], 3)


def test_format_table():
    text = pictures.format_table([["k-means", "1.5"], ["PriMaPs-EM", "22.25"]], ["method", "mIoU"])
    lines = text.splitlines()
    assert lines[0] == "| method     | mIoU  |" and lines[1] == "|------------|-------|"
    assert lines[3] == "| PriMaPs-EM | 22.25 |"
