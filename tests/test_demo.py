"""`primaps-fast demo` at a reduced size: outputs exist, are consistent, and unrelated files are safe."""
import json

import numpy as np
import pytest

from primaps_fast.cli import main
from primaps_fast.demo import prepare_out
from primaps_fast.pictures import GAP, TITLE_HEIGHT


def test_demo_reduced(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--images", "6", "--epochs", "2", "--image-size", "96",
            "--batch-size", "3", "--classes", "4"]
    assert main(args) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    printed = captured.out
    res = json.loads((out / "results.json").read_text())
    methods = ["k-means baseline", "PriMaPs-EM"]
    assert sorted(res["metrics"]) == sorted(methods)
    for name in methods:
        m = res["metrics"][name]
        assert name in printed and 0 <= m["mIoU"] <= 100 and 0 <= m["Accuracy"] <= 100
    losses = res["em_epoch_mean_loss"]
    assert len(losses) == 2 and all(np.isfinite(losses))
    # the progress bar shows the same quantity, named the same way
    last_bar = [line for line in captured.err.splitlines() if line.startswith("EM epoch 2/2")][-1]
    assert f"mean loss {losses[1]:.4f}" in last_bar
    # 6 images in batches of 3: 2 steps per epoch, fewer than ema_every=10: warned, and no EMA update
    assert "warning: an epoch has 2 step(s), fewer than ema_every=10" in printed
    assert res["em_steps"] == 4 and res["ema_updates"] == 0 and "0 EMA updates" in printed
    assert res["pseudo_images_per_s"] > 0 and 0 < res["pseudo_label_coverage"] <= 1
    assert "masks per image" in (out / "results.md").read_text()
    from PIL import Image

    pngs = sorted((out / "overlays").iterdir())
    assert len(pngs) == 4
    im = np.array(Image.open(pngs[0]))
    panels = 4 + len(methods)
    assert im.shape[1:] == (panels * 96 + (panels - 1) * GAP, 3)
    assert im.shape[0] > TITLE_HEIGHT + 96  # titles above the panels, a legend below
    # the first panel is the scene itself, under its title
    from primaps_fast.data.synthetic import make_scenes

    scene = make_scenes(6, num_classes=4, image_size=96, seed=0).images[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(im[TITLE_HEIGHT:TITLE_HEIGHT + 96, :96], scene)
    assert (im[:TITLE_HEIGHT, :96] < 128).any()  # the title's text
    # rerunning into the demo's own folder is allowed
    assert main(args) == 0


def test_demo_never_overwrites_unrelated_files(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "results.md").write_text("my notes")
    assert main(["demo", "--out", str(tmp_path / "mine"), "--images", "2"]) == 1
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "mine" / "results.md").read_text() == "my notes"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError):
        prepare_out(tmp_path / "afile")
    assert (prepare_out(tmp_path / "new" / "deep")) and (tmp_path / "new" / "deep" / "overlays").is_dir()
