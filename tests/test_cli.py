"""The `primaps-fast` command on tiny data: features, pseudo, train (+ resume), eval, bench; bad input."""
import json
import os

import numpy as np
import pytest
import torch

import fake_trees
from primaps_fast.cli import main
from primaps_fast.data.cache import FeatureCache, store_features
from primaps_fast.data.datasets import FolderDataset
from primaps_fast.data.synthetic import make_scenes
from synthetic_run import make_run_folder


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("features", "pseudo", "train", "eval", "demo", "bench"):
        assert cmd in out
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "--" in capsys.readouterr().out


def test_features_bf16_and_size(tmp_path, capsys):
    """--precision bf16 is recorded in the cache; the cache's size is stated before it is written."""
    fake_trees.cityscapes(tmp_path / "cityscapes", np.random.default_rng(0), hw=(32, 48), per_city=2)
    args = ["features", "--dataset-root", str(tmp_path / "cityscapes"), "--resolution", "32",
            "--weights", "random", "--precision", "bf16", "--cache", str(tmp_path / "c")]
    assert main(args) == 0
    assert FeatureCache(tmp_path / "c").manifest["precision"] == "bf16"
    assert f"features: the cache {tmp_path / 'c'} takes " in capsys.readouterr().err
    # pseudo labels from that cache, and straight from a bf16 backbone, record the precision of their features
    common = ["--dataset-root", str(tmp_path / "cityscapes"), "--resolution", "32", "--no-crf"]
    assert main(["pseudo", *common, "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "p")]) == 0
    assert main(["pseudo", *common, "--weights", "random", "--precision", "bf16", "--out", str(tmp_path / "q")]) == 0
    for out in ("p", "q"):
        assert json.load(open(tmp_path / out / "manifest.json"))["features"]["precision"] == "bf16"
    with pytest.raises(SystemExit):
        main(args[:-4] + ["--precision", "fp16", "--cache", str(tmp_path / "d")])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


def test_features_dino_resnet50(tmp_path):
    """The ResNet backbone through the whole features command: layer4's 2048 channels at stride 32."""
    fake_trees.cityscapes(tmp_path / "cityscapes", np.random.default_rng(0), hw=(64, 96), per_city=1)
    assert main(["features", "--dataset-root", str(tmp_path / "cityscapes"), "--resolution", "64",
                 "--backbone", "dino_resnet50", "--weights", "random", "--cache", str(tmp_path / "c")]) == 0
    cache = FeatureCache(tmp_path / "c")
    assert cache.complete and cache.feature_shape == (2048, 2, 2) and cache.manifest["backbone"] == "dino_resnet50"


def test_features_and_pseudo(tmp_path, capsys):
    fake_trees.cityscapes(tmp_path / "cityscapes", np.random.default_rng(0), hw=(32, 48), per_city=2)
    common = ["--dataset-root", str(tmp_path / "cityscapes"), "--resolution", "32"]
    rc = main(["features", *common, "--weights", "random", "--batch-size", "3", "--cache", str(tmp_path / "c")])
    assert rc == 0, capsys.readouterr().err
    cache = FeatureCache(tmp_path / "c")
    assert cache.complete and cache.feature_shape == (384, 4, 4) and len(cache) == 4
    assert "feature cache" in capsys.readouterr().out
    args = ["pseudo", *common, "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "p"), "--no-crf"]
    assert main(args) == 0
    assert "4 computed" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "p" / "pseudos")) == sorted(n + ".png" for n in cache.names)
    assert main(args) == 0
    assert "0 computed, 4 already complete" in capsys.readouterr().out
    # settings mismatch: a clear error, nothing deleted
    assert main(args[:-1] + ["--no-crf", "--threshold", "0.3"]) == 1
    err = capsys.readouterr().err
    assert "other settings" in err and "threshold" in err
    assert len(os.listdir(tmp_path / "p" / "pseudos")) == 4
    # pseudo labels straight from the backbone (no cache)
    assert main(["pseudo", *common, "--weights", "random", "--out", str(tmp_path / "p2"), "--no-crf"]) == 0


def test_bad_input_messages(tmp_path, capsys):
    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "readme.txt").write_text("hi")
    assert main(["features", "--dataset-root", str(tmp_path / "weird"), "--weights", "random",
                 "--cache", str(tmp_path / "c")]) == 1
    assert "unknown dataset layout" in capsys.readouterr().err
    assert main(["train", "--cache", str(tmp_path / "nope"), "--pseudo", str(tmp_path), "--out",
                 str(tmp_path / "r")]) == 1
    assert "no feature cache" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "missing.pt"), "--cache", str(tmp_path / "nope")]) == 1
    assert "error" in capsys.readouterr().err


@pytest.fixture
def synthetic_run(tmp_path):
    """A folder dataset of synthetic scenes, its cache (synthetic features) and pseudo labels."""
    return make_run_folder(tmp_path, 6, 64, seed=1)


def _train(root, out, *extra):
    return main(["train", "--cache", str(root / "cache"), "--pseudo", str(root / "pseudo"), "--out", str(out),
                 "--num-classes", "3", "--batch-size", "2", "--kmeans-epochs", "1", *extra])


def test_train_resume_and_eval(synthetic_run, capsys):
    root = synthetic_run
    assert _train(root, root / "full", "--epochs", "3") == 0
    full = torch.load(root / "full" / "last.pt", weights_only=False)
    assert full["epoch"] == 3 and len(full["history"]) == 3 and (root / "full" / "init.pt").exists()
    # interrupted after 2 epochs, resumed to 3: the same parameters as the uninterrupted run
    assert _train(root, root / "part", "--epochs", "2") == 0
    assert _train(root, root / "part", "--epochs", "3") == 1
    assert "--resume" in capsys.readouterr().err
    assert _train(root, root / "part", "--epochs", "3", "--resume") == 0
    part = torch.load(root / "part" / "last.pt", weights_only=False)
    assert part["epoch"] == 3
    for k, v in full["em"].items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(part["em"][k], v, rtol=1e-5, atol=1e-6)
    # a checkpoint of another shape is refused with a clear message
    assert _train(root, root / "part", "--epochs", "4", "--resume", "--num-classes", "5") == 1
    assert "num_classes=3" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(root / "full" / "last.pt"), "--cache", str(root / "cache"),
                 "--out", str(root / "eval")]) == 0
    out = capsys.readouterr().out
    assert "theta_M (EMA head)" in out and "theta_R (head)" in out and "mIoU" in out
    res = json.loads((root / "eval" / "results.json").read_text())
    for r in res.values():
        assert 0 <= r["mIoU"] <= 100 and 0 <= r["Accuracy"] <= 100
    from PIL import Image

    width, height = Image.open(root / "eval" / "confusion.png").size
    assert width > 3 * 36 and height > 3 * 36  # cells of 36 px plus class names and a heading


def test_eval_rejects_other_dim(synthetic_run, capsys, tmp_path):
    root = synthetic_run
    assert _train(root, root / "run", "--epochs", "1") == 0
    scenes = make_scenes(6, num_classes=3, image_size=64, dim=32, seed=1)
    ds = FolderDataset(root / "imgs", labels_root=root / "labels", size=64, num_classes=3)
    store_features(ds, scenes.features, root / "cache32", backbone="synthetic32", weights="synthetic")
    assert main(["eval", "--checkpoint", str(root / "run" / "last.pt"), "--cache", str(root / "cache32")]) == 1
    assert "another shape" in capsys.readouterr().err


def test_train_student_augs_and_hflip(tmp_path, capsys):
    fake_trees.cityscapes(tmp_path / "cs", np.random.default_rng(1), hw=(32, 32), per_city=2)
    common = ["--dataset-root", str(tmp_path / "cs"), "--resolution", "32"]
    assert main(["features", *common, "--weights", "random", "--cache", str(tmp_path / "c")]) == 0
    assert main(["pseudo", *common, "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "p"), "--no-crf"]) == 0
    args = ["train", "--cache", str(tmp_path / "c"), "--pseudo", str(tmp_path / "p"), "--out", str(tmp_path / "r"),
            "--epochs", "1", "--batch-size", "2", "--kmeans-epochs", "1", "--hflip", "--student-augs"]
    assert main(args + ["--weights", "random"]) == 0, capsys.readouterr().err
    ckpt = torch.load(tmp_path / "r" / "last.pt", weights_only=False)
    assert ckpt["config"]["student_augs"] and ckpt["num_classes"] == 27 and ckpt["epoch"] == 1
    # the student backbone must be the cache's
    from primaps_fast.backbones import Backbone

    torch.save(Backbone("dino_vits8", "random", seed=9).model.state_dict(), tmp_path / "other.pth")
    args[args.index("--out") + 1] = str(tmp_path / "r2")
    assert main(args + ["--weights", str(tmp_path / "other.pth")]) == 1
    assert "differs from the weights of the cache" in capsys.readouterr().err


def test_corrupt_or_foreign_checkpoint(synthetic_run, capsys):
    root = synthetic_run
    (root / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["eval", "--checkpoint", str(root / "junk.pt"), "--cache", str(root / "cache")]) == 1
    assert "cannot read" in capsys.readouterr().err
    torch.save({"state_dict": {}}, root / "other.pt")
    assert main(["eval", "--checkpoint", str(root / "other.pt"), "--cache", str(root / "cache")]) == 1
    assert "not a primaps_fast PriMaPs-EM checkpoint" in capsys.readouterr().err


def test_metrics_match_hand_computation_and_api(rng):
    from primaps_fast.evaluate import evaluate_batches

    K = 4
    target = torch.randint(0, K + 1, (3, 20, 20), generator=rng)  # K = ignored
    perm = torch.tensor([2, 0, 3, 1])
    preds = torch.where(torch.rand(3, 20, 20, generator=rng) < 0.7, perm[target.clamp(max=K - 1)],
                        torch.randint(0, K, (3, 20, 20), generator=rng))
    r = evaluate_batches([(preds[:2], target[:2]), (preds[2:], target[2:])], K)
    assert r["mapping"][perm].tolist() == list(range(K))  # cluster perm[c] is class c
    valid = target < K
    mapped = torch.from_numpy(r["mapping"])[preds]
    acc = 100 * (mapped[valid] == target[valid]).float().mean().item()
    ious = [((mapped == c) & (target == c) & valid).sum().item() / (((mapped == c) | (target == c)) & valid).sum().item()
            for c in range(K)]
    assert abs(r["Accuracy"] - acc) < 1e-4 and abs(r["mIoU"] - 100 * np.mean(ious)) < 1e-4
    conf = r["confusion"]  # rows = classes, columns = matched predictions
    for c in range(K):
        assert conf[c].tolist() == [int(((target == c) & (mapped == k)).sum()) for k in range(K)]


def test_eval_with_crf(synthetic_run, capsys):
    root = synthetic_run
    assert _train(root, root / "run", "--epochs", "1") == 0
    args = ["eval", "--checkpoint", str(root / "run" / "last.pt"), "--cache", str(root / "cache"), "--head", "ema",
            "--crf", "--out", str(root / "ev")]
    assert main(args) == 1
    assert "--crf needs --dataset-root" in capsys.readouterr().err
    # an argument error is reported before anything is read (here: a checkpoint that does not exist)
    assert main(["eval", "--checkpoint", str(root / "missing.pt"), "--cache", str(root / "nope"), "--crf"]) == 1
    assert "--crf needs --dataset-root" in capsys.readouterr().err
    assert main(args + ["--dataset-root", str(root / "imgs"), "--labels", str(root / "labels")]) == 0
    res = json.loads((root / "ev" / "results.json").read_text())
    assert set(res) == {"theta_M (EMA head)", "theta_M (EMA head) + CRF"}
    # the CRF prediction equals dense_crf on the head's scores, evaluated the same way
    import primaps_fast
    from primaps_fast.evaluate import evaluate_batches
    from primaps_fast.ops.pseudo_labels import crf_images
    from primaps_fast.train import em_from_checkpoint, load_checkpoint

    em = em_from_checkpoint(load_checkpoint(root / "run" / "last.pt"))
    ds = FolderDataset(root / "imgs", labels_root=root / "labels", size=64, num_classes=3)
    cache = FeatureCache(root / "cache")
    feats = cache.get_features(range(len(cache)))
    q = primaps_fast.dense_crf(crf_images(torch.stack([ds[i][0] for i in range(len(ds))])),
                               torch.einsum("kc,bchw->bkhw", em.weight(ema=True), feats))
    want = evaluate_batches([(q.argmax(1), cache.get_labels(range(len(cache))))], 3)
    assert abs(want["mIoU"] - res["theta_M (EMA head) + CRF"]["mIoU"]) < 1e-6


def test_bench_runs_the_benchmarks_of_the_checkout(capfd):
    import primaps_fast.cli as cli

    if cli.find_benchmarks() is None:
        pytest.skip("no benchmarks folder: the package is installed and the tests run outside a checkout")
    assert main(["bench", "--backend", "cpu", "--", "-k", "test_median_filter", "-p", "no:cacheprovider"]) == 0
    out = capfd.readouterr().out
    # one -k (pytest keeps only its last): the backend's cases and the user's; no Triton case, GPU or not
    assert "--benchmark-only" in out and "-k (reference or official or cpu) and (test_median_filter) " in out
    assert "2 passed" in out and "median_filter" in out  # the reference and the C++ case


def test_bench_outside_a_checkout_says_where_benchmarks_run(monkeypatch, capsys):
    import primaps_fast.cli as cli

    monkeypatch.setattr(cli, "find_benchmarks", lambda: None)
    assert main(["bench"]) == 1
    assert "source checkout" in capsys.readouterr().err


def test_train_warns_when_the_ema_head_would_not_update(synthetic_run, capsys):
    root = synthetic_run
    # 6 images in batches of 2: 3 steps per epoch, fewer than ema_every=10
    assert _train(root, root / "few", "--epochs", "2") == 0
    captured = capsys.readouterr()
    assert "warning: an epoch has 3 step(s), fewer than ema_every=10" in captured.err
    assert "6 steps, 0 EMA updates" in captured.out
    assert _train(root, root / "some", "--epochs", "2", "--ema-every", "2") == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err and "6 steps, 2 EMA updates" in captured.out  # after steps 2 and 4
    history = json.loads((root / "some" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and all(np.isfinite(h["mean_loss"]) for h in history)


def test_backend_option_of_every_kernel_command(capsys):
    from primaps_fast._dispatch import BACKENDS
    from primaps_fast.cli import build_parser

    parser = build_parser()
    required = {"pseudo": ["--dataset-root", "d", "--out", "o"], "eval": ["--checkpoint", "k", "--cache", "c"],
                "train": ["--cache", "c", "--pseudo", "p", "--out", "o"], "demo": [], "bench": []}
    for command, args in required.items():
        for backend in BACKENDS:
            assert parser.parse_args([command, *args, "--backend", backend]).backend == backend
        with pytest.raises(SystemExit):
            parser.parse_args([command, *args, "--backend", "gpu"])
    capsys.readouterr()


@pytest.mark.parametrize("args", [["train", "--cache", "c", "--pseudo", "p", "--out", "o", "--epochs", "0"],
                                  ["pseudo", "--dataset-root", "d", "--out", "o", "--threshold", "1.5"],
                                  ["demo", "--batch-size", "0"], ["eval", "--checkpoint", "k", "--cache", "c",
                                                                  "--batch-size", "-1"]])
def test_bad_numbers_are_argument_errors(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and "expected" in capsys.readouterr().err

