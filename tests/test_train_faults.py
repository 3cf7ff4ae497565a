"""Faults during ``primaps-fast train``: kill -9 at several points, then ``--resume`` gives exactly the
checkpoints of an uninterrupted run; truncated or corrupt checkpoints and pseudo-label PNGs get clear errors.

The interrupted runs are separate processes killed with SIGKILL (no cleanup code runs), with other thread
counts than the uninterrupted run (training is identical at any thread count, ``em.deterministic_blas``).
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from primaps_fast import fileio
from primaps_fast.cli import main
from synthetic_run import make_run_folder

from child_process import CWD, child_env

EPOCHS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A folder dataset of synthetic scenes with its feature cache and pseudo labels."""
    root = tmp_path_factory.mktemp("faults")
    return make_run_folder(root, 12, 64, seed=3)


def _args(root, out, *extra):
    return ["train", "--cache", str(root / "cache"), "--pseudo", str(root / "pseudo"), "--out", str(out),
            "--num-classes", "3", "--batch-size", "2", "--kmeans-epochs", "1", "--ema-every", "2",
            "--epochs", str(EPOCHS), *extra]


def _epoch(path):
    """The epoch of a complete checkpoint file, or -1 (absent or being replaced)."""
    try:
        return int(torch.load(path, weights_only=True)["epoch"])
    except Exception:
        return -1


def _run_and_kill(root, out, until, threads):
    """Start a training process and SIGKILL it once ``until(out)`` holds (or when it ends by itself)."""
    env = child_env(OMP_NUM_THREADS=str(threads), PRIMAPS_FAST_DEBUG="1")
    proc = subprocess.Popen([sys.executable, "-m", "primaps_fast.cli", *_args(root, out, "--resume")], env=env,
                            cwd=CWD, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while proc.poll() is None and not until(out) and time.monotonic() < deadline:
        time.sleep(0.005)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    err = proc.communicate()[1].decode()
    assert killed or proc.returncode == 0, err
    return killed


def _assert_same(a, b, where=""):
    """Equal nests of dicts, lists, tensors (dtype, shape and every bit) and plain values."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.bool else a, b), where
    else:
        assert a == b, where


def test_kill9_then_resume_equals_an_uninterrupted_run(data, tmp_path):
    assert main(_args(data, tmp_path / "full")) == 0
    part = tmp_path / "part"
    kill_points = [
        (lambda out: (out / "init.pt").exists(), 1),                # after the init, before the first epoch
        (lambda out: _epoch(out / "last.pt") >= 1, 3),             # during epoch 2
        (lambda out: _epoch(out / "last.pt") >= 3, 2),             # during epoch 4
        (lambda out: any(f.startswith(".last.pt") for f in os.listdir(out)), 1),  # while a checkpoint is written
    ]
    killed = [_run_and_kill(data, part, until, threads) for until, threads in kill_points]
    assert sum(killed) >= 2  # a kill can come too late on a fast machine, but not all of them
    assert main(_args(data, part, "--resume")) == 0
    for name in ("init.pt", "last.pt"):
        _assert_same(torch.load(part / name, weights_only=True), torch.load(tmp_path / "full" / name,
                                                                            weights_only=True), name)
    assert json.loads((part / "history.json").read_text()) == json.loads((tmp_path / "full" / "history.json")
                                                                         .read_text())
    assert not [f for f in os.listdir(part) if f.startswith(".")]  # no temporary file left behind for good


def test_truncated_and_corrupt_checkpoints_are_clear_errors(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(data, out, "--epochs", "1")) == 0
    good = (out / "last.pt").read_bytes()
    # truncated (half the file), a flipped byte in the tensor data (torch.load reads it without noticing),
    # garbage, an empty file
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    for name, content, why in (("truncated", good[: len(good) // 2], "cannot read"),
                               ("flipped", bytes(flipped), "corrupt"),
                               ("garbage", b"not a checkpoint" * 10, "cannot read"),
                               ("empty", b"", "cannot read")):
        (out / "last.pt").write_bytes(content)
        assert main(_args(data, out, "--epochs", "2", "--resume")) == 1, name
        err = capsys.readouterr().err
        assert f"checkpoint: {out / 'last.pt'}" in err.replace("cannot read ", "") and why in err, (name, err)
        assert main(["eval", "--checkpoint", str(out / "last.pt"), "--cache", str(data / "cache")]) == 1
        assert why in capsys.readouterr().err
    (out / "last.pt").write_bytes(good)
    assert main(_args(data, out, "--epochs", "2", "--resume")) == 0


def test_truncated_and_corrupt_pseudo_labels_are_clear_errors(data, tmp_path, capsys):
    import shutil

    pseudo = tmp_path / "pseudo"
    shutil.copytree(data / "pseudo", pseudo)
    victim = sorted((pseudo / "pseudos").iterdir())[3]
    good = victim.read_bytes()
    args = ["train", "--cache", str(data / "cache"), "--pseudo", str(pseudo), "--out", str(tmp_path / "run"),
            "--num-classes", "3", "--batch-size", "2", "--kmeans-epochs", "1", "--epochs", "1"]
    for content in (good[: len(good) // 2], b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b""):
        victim.write_bytes(content)
        assert main(args) == 1
        err = capsys.readouterr().err
        assert f"pseudo: cannot read {victim}" in err, err
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
    fileio.write_png(victim, np.zeros((32, 64), np.uint8))  # a PNG of another size
    assert main(args) == 1
    assert f"pseudo: {victim} has shape (32, 64), expected (64, 64)" in capsys.readouterr().err
