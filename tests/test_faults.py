"""Faults of the feature cache and the pseudo-label folder: kill -9 at several points then a rerun equal byte
for byte to an uninterrupted run; a full disk (a small tmpfs where this test may mount one, else a
simulated ENOSPC) then resume; a read-only output; truncated and corrupt files of every kind these folders
hold; rows of features that are not finite."""
import contextlib
import errno
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

from primaps_fast import fileio
from primaps_fast.cli import main
from primaps_fast.data import cache as cache_mod
from primaps_fast.data.cache import CorruptCacheError, FeatureCache
from primaps_fast.data.synthetic import make_scenes
from child_process import CWD, child_env

N, SIZE = 10, 32

# Runs one primaps-fast command; PF_KILL "<module>.<function>:<n>:<kill|half>" SIGKILLs the process at the
# n-th call of that function ("half": after passing it the first half of its data argument).
KILLER = """
import importlib, json, os, signal, sys
target, n, how = os.environ["PF_KILL"].split(":")
module_name, attr = target.rsplit(".", 1)
module = importlib.import_module(module_name)
real, calls = getattr(module, attr), [0]
def wrapped(*args, **kwargs):
    calls[0] += 1
    if calls[0] == int(n):
        if how == "half":
            args = list(args)
            args[1] = args[1][: len(args[1]) // 2]
            real(*args, **kwargs)
            if hasattr(args[0], "flush"):
                args[0].flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(module, attr, wrapped)
from primaps_fast.cli import main

sys.exit(main(json.loads(sys.argv[1])))
"""


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """10 synthetic 32x32 scenes as a folder dataset; the cache and pseudo labels of uninterrupted runs."""
    root = tmp_path_factory.mktemp("faults")
    scenes = make_scenes(N, num_classes=3, image_size=SIZE, seed=4)
    for i, (im, lab) in enumerate(zip(scenes.images, scenes.labels)):
        fileio.write_png(root / "imgs" / f"s{i}.png", im.permute(1, 2, 0).numpy())
        fileio.write_png(root / "labels" / f"s{i}.png", lab.numpy().astype(np.uint8))
    assert main(features(root, root / "cache")) == 0
    assert main(pseudo(root, root / "pseudo")) == 0
    return root


def data_args(root):
    return ["--dataset-root", str(root / "imgs"), "--labels", str(root / "labels"), "--resolution", str(SIZE)]


def features(root, out):
    return ["features", *data_args(root), "--weights", "random", "--batch-size", "3", "--cache", str(out)]


def pseudo(root, out, cache=None):
    return ["pseudo", *data_args(root), "--cache", str(cache or root / "cache"), "--out", str(out),
            "--batch-size", "3"]


def files(root) -> dict:
    out = {}
    for folder, _, names in os.walk(root):
        for n in names:
            path = os.path.join(folder, n)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def assert_same_files(a, b):
    fa, fb = files(a), files(b)
    assert sorted(fa) == sorted(fb)
    assert [k for k in fa if fa[k] != fb[k]] == []


def killed(argv, point):
    env = child_env(PF_KILL=point, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run([sys.executable, "-c", KILLER, json.dumps(argv)], env=env, cwd=CWD, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -9, f"{point}: not killed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"


# ----------------------------------------------------------------------------- kill -9
def test_features_killed_at_several_points_then_rerun_equals_uninterrupted(ref, tmp_path):
    out = tmp_path / "cache"
    for point in ("os.posix_fallocate:2:kill",              # creating: features.npy made, labels.npy not
                  "os.pwrite:8:half",                       # 2nd batch: a row half written
                  "primaps_fast.fileio._write_all:2:half"):  # a completion record half written (a .tmp)
        killed(features(ref, out), point)
        if (out / "manifest.json").exists():  # nothing marked complete differs from the uninterrupted run
            part = FeatureCache(out)
            rows = np.flatnonzero(part.done)
            np.testing.assert_array_equal(part.features[rows], FeatureCache(ref / "cache").features[rows])
    assert main(features(ref, out)) == 0
    assert_same_files(ref / "cache", out)


def test_pseudo_killed_at_several_points_then_rerun_equals_uninterrupted(ref, tmp_path):
    from primaps_fast.pseudo_gen import complete

    out = tmp_path / "pseudo"
    for point in ("primaps_fast.fileio._write_all:2:half",  # image 0: gts/ half written (a .tmp)
                  "os.replace:4:kill",                      # written, not yet renamed
                  "primaps_fast.fileio._write_all:5:kill"):
        killed(pseudo(ref, out), point)
        for name in (f"s{i}" for i in range(N)):  # nothing counted complete differs
            if complete(out, name, SIZE):
                for sub in ("imgs", "gts", "pseudos"):
                    path = os.path.join(sub, name + ".png")
                    assert (out / path).read_bytes() == (ref / "pseudo" / path).read_bytes()
    assert main(pseudo(ref, out)) == 0
    assert_same_files(ref / "pseudo", out)


# ----------------------------------------------------------------------------- full disk
@contextlib.contextmanager
def tmpfs(size: str):
    """A tmpfs of ``size`` mounted on a new folder (root with mount rights only), unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the simulated full-disk tests cover the logic")
    where = tempfile.mkdtemp()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", where], capture_output=True).returncode:
        os.rmdir(where)
        pytest.skip("cannot mount a tmpfs here (no mount rights); the simulated full-disk tests cover the logic")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", where], check=False)
        os.rmdir(where)


def fill(folder):
    """Write a file into ``folder`` until its file system is full."""
    with open(os.path.join(folder, "filler"), "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)


def test_full_tmpfs_features_then_resume(ref, monkeypatch, capsys):
    with tmpfs("64k") as where:  # the cache needs ~130 KiB
        out = os.path.join(where, "cache")
        assert main(features(ref, out)) == 1
        assert "needs 130." in capsys.readouterr().err
        assert os.listdir(out) == []  # left empty: the same command creates it later
        subprocess.run(["mount", "-o", "remount,size=1m", where], check=True)
        # full in the middle of the run: the disk fills up after the first batch's rows are written
        real = cache_mod._pwrite_rows
        monkeypatch.setattr(cache_mod, "_pwrite_rows", lambda *a: (real(*a), fill(where)))
        assert main(features(ref, out)) == 1
        assert "no space left on device" in capsys.readouterr().err
        monkeypatch.undo()
        assert not FeatureCache(out).done.any()
        os.remove(os.path.join(where, "filler"))
        assert main(features(ref, out)) == 0
        assert_same_files(ref / "cache", out)


def test_full_tmpfs_pseudo_then_resume(ref):
    with tmpfs("24k") as where:
        out = os.path.join(where, "pseudo")
        assert main(pseudo(ref, out)) == 1
        subprocess.run(["mount", "-o", "remount,size=1m", where], check=True)
        assert main(pseudo(ref, out)) == 0
        assert_same_files(ref / "pseudo", out)


def test_full_disk_message_gives_real_sizes_and_folder_is_reusable(ref, tmp_path, monkeypatch, capsys):
    """Simulated ENOSPC: before creating (too little free space) and while reserving (free space was
    taken meanwhile): both say how much the cache needs and how much is free, and leave a folder that
    the same command fills once there is room."""
    out = tmp_path / "cache"
    monkeypatch.setattr(cache_mod, "_free_bytes", lambda root: 50_000)
    assert main(features(ref, out)) == 1
    err = capsys.readouterr().err
    assert ("needs 130.38 KiB (features.npy 120.12 KiB, labels.npy 10.12 KiB, done.npy 138 bytes) and 48.83 KiB "
            "are free" in err), err
    assert os.listdir(out) == []
    monkeypatch.undo()
    real = os.posix_fallocate

    def full(fd, offset, length):
        if length > 100_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", full)
    assert main(features(ref, out)) == 1
    err = capsys.readouterr().err
    assert "no space left on device for the feature cache" in err and "needs 130.38 KiB" in err and "free" in err
    assert os.listdir(out) == []
    monkeypatch.undo()
    assert main(features(ref, out)) == 0
    assert_same_files(ref / "cache", out)


def test_full_disk_while_writing_records_then_resume(ref, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cache"
    real, calls = fileio._write_all, [0]

    def full_later(f, data):
        calls[0] += 1
        if calls[0] == 5:  # creating.json, done.npy, manifest.json, the first batch's record, then the second's
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, data)

    monkeypatch.setattr(fileio, "_write_all", full_later)
    assert main(features(ref, out)) == 1
    assert "no space left on device" in capsys.readouterr().err
    monkeypatch.undo()
    assert 0 < FeatureCache(out).done.sum() < N
    assert main(features(ref, out)) == 0
    assert_same_files(ref / "cache", out)


# ----------------------------------------------------------------------------- read-only output
@contextlib.contextmanager
def read_only(path):
    """``path`` read-only for this process: permissions for a normal user; a read-only bind mount for root
    (root ignores permissions)."""
    if os.geteuid() != 0:
        modes = {}
        for folder, dirs, names in os.walk(path):
            for p in [folder] + [os.path.join(folder, n) for n in names]:
                modes[p] = os.stat(p).st_mode
                os.chmod(p, modes[p] & ~0o222)
        try:
            yield
        finally:
            for p, m in modes.items():
                os.chmod(p, m)
        return
    if subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode:
        pytest.skip("root cannot be denied writes here (no bind mount): permissions do not apply to root")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_read_only_outputs(ref, tmp_path, capsys):
    import shutil

    # a new cache or pseudo-label folder in a read-only folder: a clear error, nothing half made
    (tmp_path / "ro").mkdir()
    with read_only(tmp_path / "ro"):
        assert main(features(ref, tmp_path / "ro" / "cache")) == 1
        err = capsys.readouterr().err
        assert "read-only" in err and "writable --cache" in err, err
        assert main(pseudo(ref, tmp_path / "ro" / "p")) == 1
        err = capsys.readouterr().err
        assert "read-only" in err and "writable --out" in err, err
    # a complete cache and pseudo-label folder on a read-only disk: checked by a rerun, read by train
    shutil.copytree(ref / "cache", tmp_path / "c")
    shutil.copytree(ref / "pseudo", tmp_path / "p")
    with read_only(tmp_path / "c"), read_only(tmp_path / "p"):
        assert main(features(ref, tmp_path / "c")) == 0
        assert main(pseudo(ref, tmp_path / "p", cache=tmp_path / "c")) == 0
        assert "0 computed, 10 already complete" in capsys.readouterr().out
        assert main(["train", "--cache", str(tmp_path / "c"), "--pseudo", str(tmp_path / "p"), "--out",
                     str(tmp_path / "run"), "--num-classes", "3", "--epochs", "1", "--batch-size", "5",
                     "--kmeans-epochs", "0"]) == 0
    # an unfinished one: the rerun says it cannot write
    shutil.copytree(ref / "cache", tmp_path / "u")
    fileio.write_npy(tmp_path / "u" / "done.npy", np.arange(N) < 4)
    with read_only(tmp_path / "u"):
        assert main(features(ref, tmp_path / "u")) == 1
        assert "read-only" in capsys.readouterr().err


# ----------------------------------------------------------------------------- corrupt and truncated files
def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _garble(path):
    data = bytearray(path.read_bytes())
    data[: min(64, len(data))] = b"\x93NUMPY garbage }{" + b"\x00" * (min(64, len(data)) - 17)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name,damage,what", [
    ("features.npy", _truncate, "is truncated"), ("features.npy", _garble, "no valid .npy header"),
    ("labels.npy", _truncate, "is truncated"), ("labels.npy", _garble, "no valid .npy header"),
    ("done.npy", _truncate, "done.npy"), ("done.npy", _garble, "done.npy"),
    ("manifest.json", _truncate, "is not valid JSON"), ("manifest.json", _garble, "is not valid JSON")])
def test_damaged_cache_files_are_named_with_the_fix(ref, tmp_path, capsys, name, damage, what):
    import shutil

    shutil.copytree(ref / "cache", tmp_path / "c")
    damage(tmp_path / "c" / name)
    with pytest.raises(CorruptCacheError) as info:
        FeatureCache(tmp_path / "c")
    msg = str(info.value)
    assert str(tmp_path / "c" / name) in msg and what in msg and "primaps-fast features" in msg, msg
    assert main(pseudo(ref, tmp_path / "p", cache=tmp_path / "c")) == 1  # what a user sees
    assert f"error: cache: {tmp_path / 'c' / name}" in capsys.readouterr().err


def test_damaged_record_part_is_named(ref, tmp_path):
    import shutil

    shutil.copytree(ref / "cache", tmp_path / "c")
    part = tmp_path / "c" / "done.part-r0-0123456789ab.npy"
    fileio.write_npy(part, np.ones(N + 1, dtype=bool))  # another length
    with pytest.raises(CorruptCacheError, match=r"done\.part-r0-0123456789ab\.npy holds bool \(11,\), expected "
                                                r"bool \(10,\); delete .*part.* and rerun `primaps-fast features`"):
        FeatureCache(tmp_path / "c")


def test_nonfinite_rows_are_found_before_use_and_recomputed(ref, tmp_path, capsys):
    import shutil

    shutil.copytree(ref / "cache", tmp_path / "c")
    c = FeatureCache(tmp_path / "c")
    row = np.array(c.features[6])
    row[0, 1, 2] = np.nan
    cache_mod._pwrite_rows(str(tmp_path / "c" / "features.npy"), c.features.offset, row.nbytes, [6], row[None])
    c = FeatureCache(tmp_path / "c")
    assert c.complete
    with pytest.raises(CorruptCacheError, match=r"not finite for 1 image\(s\) \(s6\).*rerun `primaps-fast features`"):
        c.get_features([5, 6])
    assert main(pseudo(ref, tmp_path / "p", cache=tmp_path / "c")) == 1  # used: refused, with the image
    assert "s6" in capsys.readouterr().err
    assert main(features(ref, tmp_path / "c")) == 0  # the rerun recomputes the row
    assert "1 stored row(s) hold values that are not finite" in capsys.readouterr().err
    assert_same_files(ref / "cache", tmp_path / "c")


@pytest.mark.parametrize("sub", ["imgs", "gts", "pseudos"])
def test_damaged_pseudo_folder_files_are_recomputed_or_named(ref, tmp_path, capsys, sub):
    import shutil

    from primaps_fast.pseudo_gen import PseudoLabelData

    shutil.copytree(ref / "pseudo", tmp_path / "p")
    _truncate(tmp_path / "p" / sub / "s3.png")
    _garble(tmp_path / "p" / sub / "s7.png")
    if sub != "gts":  # the training data reads pseudos/ (and imgs/ for the student view)
        data = PseudoLabelData(FeatureCache(ref / "cache"), tmp_path / "p", images=True)
        with pytest.raises(CorruptCacheError,
                           match=f"{sub}/s3.png .*truncated or corrupt.*rerun `primaps-fast pseudo`"):
            data[3]
    assert main(pseudo(ref, tmp_path / "p")) == 0
    assert "2 computed, 8 already complete" in capsys.readouterr().out
    assert_same_files(ref / "pseudo", tmp_path / "p")


def test_damaged_pseudo_manifest_is_named(ref, tmp_path, capsys):
    import shutil

    from primaps_fast.pseudo_gen import PseudoLabelData

    shutil.copytree(ref / "pseudo", tmp_path / "p")
    _truncate(tmp_path / "p" / "manifest.json")
    with pytest.raises(CorruptCacheError, match="manifest.json is not valid JSON.*rerun `primaps-fast pseudo`"):
        PseudoLabelData(FeatureCache(ref / "cache"), tmp_path / "p")
    assert main(pseudo(ref, tmp_path / "p")) == 1
    assert "manifest.json is not valid JSON" in capsys.readouterr().err


def test_interrupted_creation_next_to_other_files_is_refused(ref, tmp_path, capsys):
    out = tmp_path / "c"
    out.mkdir()
    (out / "creating.json").write_text("{}")
    (out / "features.npy").write_bytes(b"x")
    (out / "thesis.tex").write_text("precious")
    assert main(features(ref, out)) == 1
    assert "interrupted feature cache creation and other files (thesis.tex)" in capsys.readouterr().err
    assert (out / "thesis.tex").read_text() == "precious" and (out / "features.npy").exists()
