"""No code runs from a file the package reads; incomplete checkpoints and hostile list files get clear errors.

A malicious checkpoint is a pickle whose loading calls ``exec``: it writes a marker file. Every loader of
the package (the checkpoint through the API, ``eval --checkpoint`` and ``train --resume``; backbone weights)
must refuse it without creating the marker; a plain ``torch.load(weights_only=False)`` of the same file
creates it (the control that shows the file is really malicious).
"""
import ast
import builtins
import os
import pickle

import numpy as np
import pytest
import torch

import fake_trees
from primaps_fast import train
from primaps_fast.cli import main
from primaps_fast.data import datasets as D
from synthetic_run import make_run_folder

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "primaps_fast")


class _Payload:
    """Unpickling calls ``exec(code)``, which writes the marker file."""

    def __init__(self, marker):
        self.code = f"open({str(marker)!r}, 'w').write('pwned')"

    def __reduce__(self):
        return builtins.exec, (self.code,)


def _malicious(path, marker, fmt):
    obj = {"kind": "primaps-em", "format": 1, "em": _Payload(marker), "state_dict": {"x": _Payload(marker)}}
    if fmt == "zip":
        torch.save(obj, path)
    elif fmt == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    return path


@pytest.fixture(params=["zip", "legacy", "pickle"])
def malicious(tmp_path, request):
    marker = tmp_path / "marker"
    path = _malicious(tmp_path / "evil.pt", marker, request.param)
    # control: an unsafe load of this file runs its code
    torch.load(path, weights_only=False) if request.param != "pickle" else pickle.load(open(path, "rb"))
    assert marker.exists()
    marker.unlink()
    return path, marker


def test_checkpoint_loader_runs_nothing(malicious):
    path, marker = malicious
    with pytest.raises(ValueError, match="^checkpoint: cannot read"):
        train.load_checkpoint(path)
    assert not marker.exists()


def test_backbone_weights_loader_runs_nothing(malicious):
    pytest.importorskip("timm")
    from primaps_fast.backbones import load_backbone

    path, marker = malicious
    with pytest.raises(ValueError, match="^weights: cannot read"):
        load_backbone("dino_vits8", weights=path)
    assert not marker.exists()


@pytest.fixture
def run_folder(tmp_path):
    """A folder dataset of synthetic scenes with its feature cache and pseudo labels (as test_cli)."""
    return make_run_folder(tmp_path, 4, 32, seed=2)


def _train(root, out, *extra):
    return main(["train", "--cache", str(root / "cache"), "--pseudo", str(root / "pseudo"), "--out", str(out),
                 "--num-classes", "3", "--batch-size", "2", "--kmeans-epochs", "1", *extra])


def test_cli_eval_and_resume_run_nothing(run_folder, tmp_path, capsys):
    marker = tmp_path / "marker"
    evil = _malicious(tmp_path / "evil.pt", marker, "zip")
    assert main(["eval", "--checkpoint", str(evil), "--cache", str(run_folder / "cache")]) == 1
    assert "checkpoint: cannot read" in capsys.readouterr().err
    os.makedirs(tmp_path / "run")
    _malicious(tmp_path / "run" / "last.pt", marker, "legacy")
    assert _train(run_folder, tmp_path / "run", "--epochs", "2", "--resume") == 1
    assert "checkpoint: cannot read" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("key", ["epoch", "config", "history", "em", "torch_rng"])
def test_checkpoint_missing_key_is_named(run_folder, tmp_path, capsys, key):
    assert _train(run_folder, tmp_path / "run", "--epochs", "1") == 0
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    del ckpt[key], ckpt["digest"]  # as another program (or an older version) would write it
    torch.save(ckpt, tmp_path / "run" / "last.pt")
    with pytest.raises(ValueError, match=f"has no '{key}' entry"):
        train.load_checkpoint(tmp_path / "run" / "last.pt")
    assert _train(run_folder, tmp_path / "run", "--epochs", "2", "--resume") == 1
    assert f"'{key}'" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["adam", "ema_v", "global_step", "ema_calls"])
def test_model_state_missing_key_is_named(run_folder, tmp_path, capsys, key):
    """The optimiser state (and every other entry of the model's state) is named when missing, for
    ``eval --checkpoint``, ``train --resume`` and the API."""
    assert _train(run_folder, tmp_path / "run", "--epochs", "1") == 0
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    del ckpt["em"][key], ckpt["digest"]
    torch.save(ckpt, tmp_path / "run" / "last.pt")
    with pytest.raises(ValueError, match=f"no '{key}' entry"):
        train.em_from_checkpoint(train.load_checkpoint(tmp_path / "run" / "last.pt"))
    assert _train(run_folder, tmp_path / "run", "--epochs", "2", "--resume") == 1
    assert f"'{key}'" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--cache",
                 str(run_folder / "cache")]) == 1
    assert f"'{key}'" in capsys.readouterr().err


@pytest.mark.parametrize("key,value", [("global_step", "abc"), ("ema_calls", 1.5), ("global_step", 2 ** 70),
                                       ("v", "nan"), ("ema_g", "float64")])
def test_model_state_bad_entry_is_named(run_folder, tmp_path, capsys, key, value):
    """A checkpoint whose model state holds a value that is not what ``state_dict`` writes (a string step,
    a fraction, an int64 overflow, a NaN weight, another dtype) is refused naming the entry, for
    ``train --resume`` and the API; the checksum is rewritten, as another program would."""
    assert _train(run_folder, tmp_path / "run", "--epochs", "1") == 0
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    del ckpt["digest"]
    if value == "nan":
        ckpt["em"][key][0, 0] = float("nan")
    elif value == "float64":
        ckpt["em"][key] = ckpt["em"][key].double()
    else:
        ckpt["em"][key] = value
    torch.save(ckpt, tmp_path / "run" / "last.pt")
    with pytest.raises(ValueError, match=f"^checkpoint: its 'em' entry is refused: sd: '{key}'"):
        train.em_from_checkpoint(train.load_checkpoint(tmp_path / "run" / "last.pt"))
    assert _train(run_folder, tmp_path / "run", "--epochs", "2", "--resume") == 1
    assert f"'{key}'" in capsys.readouterr().err


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            # the object a method is called on: a name (torch, np), an attribute's last part (torch.jit), or
            # None for a bare function call
            owner = None if isinstance(f, ast.Name) else (
                getattr(f.value, "id", None) or getattr(f.value, "attr", "")) if isinstance(f, ast.Attribute) else ""
            yield owner, name, {k.arg: k.value for k in node.keywords}, node


def test_package_never_unpickles():
    """Every file load of the package is safe: ``torch.load`` with ``weights_only=True`` (a literal),
    ``np.load`` never with ``allow_pickle=True``, no pickle/marshal/shelve/dill/joblib, no eval/exec."""
    problems = []
    for folder, _, files in os.walk(PACKAGE):
        for fn in files:
            if not fn.endswith(".py"):
                continue
            path = os.path.join(folder, fn)
            tree = ast.parse(open(path, encoding="utf-8").read(), path)
            rel = os.path.relpath(path, PACKAGE)
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    for m in mods:
                        if m.split(".")[0] in ("pickle", "cPickle", "marshal", "shelve", "dill", "joblib",
                                               "cloudpickle"):
                            problems.append(f"{rel}:{node.lineno}: imports {m}")
            for owner, name, kw, node in _calls(tree):
                if name == "load" and owner == "torch":
                    wo = kw.get("weights_only")
                    if not (isinstance(wo, ast.Constant) and wo.value is True):
                        problems.append(f"{rel}:{node.lineno}: torch.load without weights_only=True")
                if name == "load" and owner in ("np", "numpy"):
                    ap = kw.get("allow_pickle")
                    if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                        problems.append(f"{rel}:{node.lineno}: np.load with allow_pickle")
                if owner is None and name in ("eval", "exec"):
                    problems.append(f"{rel}:{node.lineno}: {name}()")
                if owner == "jit" and name == "load":
                    problems.append(f"{rel}:{node.lineno}: torch.jit.load")
    assert not problems, problems


# ----------------------------------------------------------------------------- names from list files
HOSTILE = ["../escape", "a/../../escape", "/abs/path", "..\\escape", "\\\\server\\share", "C:escape", "x/.."]


@pytest.mark.parametrize("name", HOSTILE)
def test_list_file_names_must_be_relative(tmp_path, name):
    rng = np.random.default_rng(0)
    fake_trees.cocostuff(tmp_path / "coco", rng)
    lst = tmp_path / "coco" / "curated" / "train2017" / "Coco164kFull_Stuff_Coarse_7.txt"
    lst.write_text(lst.read_text() + name + "\n")
    with pytest.raises(D.DataError, match="line 4: image name .* absolute or contains '..'"):
        D.build_dataset(tmp_path / "coco", split="train")
    fake_trees.potsdam(tmp_path / "potsdam", rng)
    with open(tmp_path / "potsdam" / "labelled_train.txt", "a") as f:
        f.write(name + "\n")
    with pytest.raises(D.DataError, match="labelled_train.txt, line 4"):
        D.build_dataset(tmp_path / "potsdam", split="train")


def test_hostile_list_file_writes_nothing(tmp_path, capsys):
    """``features`` and ``pseudo`` on a dataset whose list names a path outside the output: refused before
    any output folder or file is created."""
    fake_trees.cocostuff(tmp_path / "coco", np.random.default_rng(0), n=2)
    lst = tmp_path / "coco" / "curated" / "train2017" / "Coco164kFull_Stuff_Coarse_7.txt"
    lst.write_text("../../../escaped\n" + lst.read_text())
    common = ["--dataset-root", str(tmp_path / "coco"), "--resolution", "16"]
    assert main(["features", *common, "--weights", "random", "--cache", str(tmp_path / "c")]) == 1
    assert "absolute or contains '..'" in capsys.readouterr().err
    assert main(["pseudo", *common, "--backbone", "dino_vits8", "--weights", "random",
                 "--out", str(tmp_path / "p")]) == 1
    assert "absolute or contains '..'" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["coco"]
    assert not any(f.startswith("escaped") for _, _, fs in os.walk(tmp_path.parent) for f in fs)


def test_ordinary_names_still_work(tmp_path):
    """Ids with dots, dashes and subfolders are fine; only absolute and '..' components are refused."""
    for ok in ("000000000139", "a.b-c_d", "sub/dir/id", "..hidden", "x..y"):
        assert D.check_name(ok, "t") == ok
