"""primaps_fast.official: the official PriMaPs surface on our kernels, install()/uninstall() and the runner.

No official code here: the stand-in package below has the official module names and signatures (written
from them, with bodies that raise, so a stand-in that was not replaced fails loudly), and the official
flows the results are compared with are re-implemented in this file from their semantics.
"""
import importlib
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import primaps_fast
from primaps_fast import official, reference
from primaps_fast.common import IMAGENET_MEAN, IMAGENET_STD
from primaps_fast.data.synthetic import make_scenes
from primaps_fast.reference.official_crf import official_crf_image, official_dense_crf_pydensecrf

from child_process import child_env

ROOT = Path(primaps_fast.__file__).resolve().parent.parent

# The contract: exactly these names, in these official modules.
REPLACED = ["primaps_modules.primaps.PriMaPs", "primaps_modules.primaps.dense_crf",
            "primaps_modules.crf.dense_crf", "primaps_modules.crf.batched_crf", "primaps_modules.ema.EMA"]

STANDIN = {
    "primaps_modules/__init__.py": "",
    "primaps_modules/crf.py": """
        import torch
        MAX_ITER = 10

        def dense_crf(image_tensor, output_logits):
            raise RuntimeError("stand-in dense_crf was called")

        def _apply_crf(tup):
            return dense_crf(tup[0], tup[1])

        def batched_crf(pool, img_tensor, prob_tensor):
            raise RuntimeError("stand-in batched_crf was called")
        """,
    "primaps_modules/median_pool.py": """
        import torch

        class MedianPool2d(torch.nn.Module):
            def __init__(self, kernel_size=3, stride=1, padding=0, same=False):
                super().__init__()
        """,
    "primaps_modules/primaps.py": """
        from primaps_modules.crf import dense_crf
        from primaps_modules.median_pool import MedianPool2d

        class PriMaPs:
            def __init__(self, threshold=0.4, ignore_id=27):
                self.threshold, self.ignore_id = threshold, ignore_id

            def _get_pseudo(self, img, feat, cls_prior):
                raise RuntimeError("stand-in PriMaPs._get_pseudo was called")

            def _apply_batched_decompose(self, tup):
                return self._get_pseudo(*tup)

            def __call__(self, pool, imgs, features, cls_prior):
                raise RuntimeError("stand-in PriMaPs was called")
        """,
    "primaps_modules/ema.py": """
        import torch

        class EMA(torch.nn.Module):
            def __init__(self, model, ema_model=None, beta=0.9999, update_after_step=100, update_every=10):
                raise RuntimeError("stand-in EMA was constructed")
        """,
    # as the official train.py: names bound at import, the decomposer called with a pool argument
    "train.py": """
        import argparse
        import sys

        import torch
        from primaps_modules.crf import batched_crf
        from primaps_modules.ema import EMA
        from primaps_modules.primaps import PriMaPs

        if __name__ == "__main__":
            parser = argparse.ArgumentParser()
            parser.add_argument("--inputs")
            parser.add_argument("--out")
            parser.add_argument("--threshold", type=float)
            args = parser.parse_args()
            x = torch.load(args.inputs, weights_only=True)
            decomposer = PriMaPs(threshold=args.threshold, ignore_id=27)
            labels = decomposer("a pool", x["imgs"], x["feats"], torch.zeros_like(x["feats"]))
            single = decomposer._get_pseudo(x["imgs"][0], x["feats"][0], torch.zeros(x["imgs"].shape[-2:]))
            ema = EMA(torch.nn.Linear(2, 2), beta=0.5, update_after_step=0, update_every=1)
            torch.save({"labels": labels, "single": single, "q": batched_crf(None, x["imgs"], x["logits"]),
                        "modules": [PriMaPs.__module__, batched_crf.__module__, type(ema).__module__],
                        "name": __name__, "argv": sys.argv, "path0": sys.path[0]}, args.out)
        """,
    # as the official test.py: a star import of the CRF module and train imported as a module
    "test.py": """
        import sys

        import torch
        from primaps_modules.crf import *
        import train

        if __name__ == "__main__":
            torch.save({"modules": [dense_crf.__module__, batched_crf.__module__, train.PriMaPs.__module__],
                        "argv": sys.argv}, sys.argv[1])
        """,
}


def write_standin(folder: Path, skip=(), extra=None) -> Path:
    for rel, text in {**STANDIN, **(extra or {})}.items():
        if rel in skip:
            continue
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    importlib.invalidate_caches()
    return folder


def _forget_standin():
    for name in list(sys.modules):
        if name == "primaps_modules" or name.startswith("primaps_modules."):
            del sys.modules[name]


@pytest.fixture
def standin(tmp_path, monkeypatch):
    """The stand-in checkout on sys.path; uninstalled and forgotten afterwards."""
    _forget_standin()
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    official.uninstall()
    _forget_standin()


def normalize(images_uint8):
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (images_uint8.float() / 255 - mean) / std


def smooth_logits(L, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, L, h, w, generator=g) * 3
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)[0]


# ---------------------------------------------------------------------------------------------- install


def test_install_replaces_exactly_the_listed_names_and_uninstall_restores(standin):
    write_standin(standin)
    modules = {n: importlib.import_module(n) for n in
               ("primaps_modules.primaps", "primaps_modules.crf", "primaps_modules.ema",
                "primaps_modules.median_pool")}
    before = {n: dict(vars(m)) for n, m in modules.items()}
    assert official.install() == REPLACED
    for mod_name, module in modules.items():
        assert set(vars(module)) == set(before[mod_name])
        for attr, value in vars(module).items():
            if f"{mod_name}.{attr}" in REPLACED:
                assert value is getattr(official, attr)
            else:
                assert value is before[mod_name][attr], f"{mod_name}.{attr} changed"
    # a script importing now binds ours, a star import included
    namespace = {}
    exec("from primaps_modules.crf import *\nfrom primaps_modules.primaps import PriMaPs", namespace)
    assert namespace["batched_crf"] is official.batched_crf and namespace["PriMaPs"] is official.PriMaPs
    assert official.install() == REPLACED  # idempotent: the saved originals stay the official ones
    assert sorted(official.uninstall()) == sorted(REPLACED)
    for mod_name, module in modules.items():
        assert vars(module).keys() == before[mod_name].keys()
        assert all(vars(module)[k] is v for k, v in before[mod_name].items())
    assert official.uninstall() == []


def test_install_without_an_official_checkout(standin):
    assert official.install() == []  # nothing on sys.path: nothing replaced, no warning


def test_install_skips_missing_and_broken_modules(standin):
    broken = {"primaps_modules/crf.py": "import a_dependency_that_is_not_installed_xyz\n"}
    write_standin(standin, skip=("primaps_modules/ema.py",), extra=broken)
    with pytest.warns(UserWarning, match="not replaced") as caught:
        replaced = official.install()
    # primaps.py imports crf.py, so it is broken too; ema.py is absent (an older checkout): silent
    assert replaced == []
    assert [str(w.message).split(" not replaced")[0] for w in caught] == [
        "primaps_fast.official: primaps_modules.primaps", "primaps_fast.official: primaps_modules.crf"]
    assert all("a_dependency_that_is_not_installed_xyz" in str(w.message) for w in caught)
    write_standin(standin, skip=("primaps_modules/ema.py",))
    _forget_standin()
    assert official.install() == REPLACED[:4]


# ----------------------------------------------------------------------------------------------- runner


def _run(args, cwd, timeout=240):
    return subprocess.run([sys.executable, "-m", "primaps_fast.official", *args], cwd=cwd, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_runner_runs_the_script_with_the_replacements(tmp_path):
    checkout = write_standin(tmp_path / "checkout")
    sc = make_scenes(2, image_size=32, dim=16, seed=5)
    logits = smooth_logits(4, 4, 4, 0)[None].repeat(2, 1, 1, 1)
    x = {"imgs": normalize(sc.images), "feats": sc.features, "logits": logits}
    torch.save(x, tmp_path / "inputs.pt")
    args = ["--inputs", str(tmp_path / "inputs.pt"), "--out", str(tmp_path / "out.pt"), "--threshold", "0.35"]
    proc = _run(["train.py", *args], cwd=checkout)
    assert proc.returncode == 0, proc.stderr
    assert "replaced " + ", ".join(REPLACED) in proc.stderr
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert got["modules"] == ["primaps_fast.official"] * 3
    assert got["name"] == "__main__" and got["argv"] == ["train.py", *args]
    assert got["path0"] == str(checkout.resolve())  # as `python train.py` puts it
    want = official.PriMaPs(threshold=0.35, ignore_id=27)(None, x["imgs"], x["feats"], torch.zeros_like(x["feats"]))
    assert torch.equal(got["labels"], want) and torch.equal(got["single"], want[0])
    assert torch.equal(got["q"], official.batched_crf(None, x["imgs"], x["logits"]))

    # from another folder, with a path to the script; a star import and `import train` see ours too
    proc = _run(["checkout/test.py", str(tmp_path / "out2.pt")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = torch.load(tmp_path / "out2.pt", weights_only=True)
    assert got["modules"] == ["primaps_fast.official"] * 3
    assert got["argv"] == ["checkout/test.py", str(tmp_path / "out2.pt")]


def test_runner_usage_and_missing_script(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert official.main([]) == 2
    assert "usage: python -m primaps_fast.official SCRIPT.py" in capsys.readouterr().err
    assert official.main(["no_such_script.py", "--x"]) == 2
    assert "script: no such file: 'no_such_script.py'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ pseudo labels


@pytest.mark.parametrize("B,size,patch,dim,threshold,ignore_id,seed", [
    (2, 64, 8, 48, 0.4, 27, 0), (1, (40, 56), 8, 32, 0.35, 255, 1), (3, (36, 20), 4, 24, 0.4, 27, 2)])
def test_primaps_equals_reference(B, size, patch, dim, threshold, ignore_id, seed):
    sc = make_scenes(B, image_size=size, patch=patch, dim=dim, seed=seed)
    imgs = normalize(sc.images)
    decomposer = official.PriMaPs(threshold=threshold, ignore_id=ignore_id)
    got = decomposer(None, imgs, sc.features, torch.zeros_like(sc.features))  # as train.py calls it
    assert got.dtype == torch.float32 and got.device == sc.features.device
    assert got.shape == (B, *sc.images.shape[-2:])
    torch.manual_seed(0)  # the reference's pca_lowrank is randomized
    want = reference.pseudo_labels(imgs, sc.features, threshold=threshold, ignore_index=ignore_id)
    # identical on these inputs (a pixel could only differ where two CRF marginals tie to ~1e-5)
    assert torch.equal(got.long(), want)
    for b in range(B):  # as demo.py calls it: one image, features (C, h, w), a (H, W) zero prior
        single = decomposer._get_pseudo(imgs[b], sc.features[b], torch.zeros(imgs.shape[-2:]))
        assert torch.equal(single, got[b])
    assert torch.equal(decomposer._apply_batched_decompose((imgs[0][None], sc.features[0], torch.zeros(1))), got[0])


def test_primaps_ignore_id_among_mask_ids_merges_like_the_official():
    sc = make_scenes(2, image_size=64, dim=32, seed=3)
    imgs = normalize(sc.images)
    ids = primaps_fast.pseudo_labels(imgs, sc.features, ignore_index=255)
    assert int(ids[ids != 255].max()) >= 2
    got = official.PriMaPs(ignore_id=2)(None, imgs, sc.features, torch.zeros(2))
    # the official writes ignore_id over the background: mask 2 and the background become one label
    assert torch.equal(got.long(), torch.where(ids == 255, 2, ids))


def official_prior_labels(ids, prior, ignore_id):
    """The official cls_prior branch of _get_pseudo, literally: per mask id (ascending) of the CRF labels,
    int(torch.mode(prior over the still unassigned pixels of the mask))."""
    out = torch.full(ids.shape, float(ignore_id))
    for m in [int(i) for i in ids.unique() if i != 0]:
        fill = (out == ignore_id) & (ids == m)
        out[fill] = int(torch.mode(prior[fill])[0])
    return out


def test_primaps_class_prior_takes_the_mask_mode():
    sc = make_scenes(2, image_size=48, dim=24, seed=9)
    imgs = normalize(sc.images)
    ids = primaps_fast.pseudo_labels(imgs, sc.features, ignore_index=0)
    g = torch.Generator().manual_seed(0)
    priors = [torch.randint(0, 4, (48, 48), generator=g),                # class ids
              torch.randn(48, 48, generator=g).mul(2).round().div(2)]    # floats: int() truncates
    # ties in every mask of even size: pixels alternate 3 and 1, so the mode is the smaller, 1
    tie = torch.zeros(48, 48, dtype=torch.int64)
    for m in ids[1].unique():
        where = (ids[1] == m).flatten().nonzero()[:, 0]
        tie.view(-1)[where[0::2]], tie.view(-1)[where[1::2]] = 3, 1
    priors.append(tie)
    for ignore_id in (27, 255):
        got = official.PriMaPs(ignore_id=ignore_id)(None, imgs, sc.features, priors[:2])  # a list, as zip allows
        for b in range(2):
            assert torch.equal(got[b], official_prior_labels(ids[b], priors[b], ignore_id))
        single = official.PriMaPs(ignore_id=ignore_id)._get_pseudo(imgs[1], sc.features[1], tie)
        assert torch.equal(single, official_prior_labels(ids[1], tie, ignore_id))
        assert (single[ids[1] != 0] == 1).any()


def test_primaps_bad_inputs():
    sc = make_scenes(2, image_size=32, dim=16, seed=1)
    imgs, feats = normalize(sc.images), sc.features
    decomposer = official.PriMaPs()
    with pytest.raises(ValueError, match="cls_prior"):
        decomposer(None, imgs, feats, torch.zeros(3))
    with pytest.raises(ValueError, match="cls_prior"):
        decomposer(None, imgs, feats, torch.ones(2, 5, 5))  # a non-zero prior must be (H, W) per image
    with pytest.raises(TypeError, match="imgs"):
        decomposer(None, sc.images, feats, torch.zeros(2))
    with pytest.raises(ValueError, match="imgs"):
        decomposer(None, imgs[0], feats, torch.zeros(2))
    with pytest.raises(ValueError, match="feat"):
        decomposer._get_pseudo(imgs[0], feats, torch.zeros(32, 32))
    with pytest.raises(ValueError, match="features"):
        decomposer(None, imgs, feats.fill_(float("nan")), torch.zeros(2))


# ---------------------------------------------------------------------------------------------------- CRF


@pytest.mark.parametrize("H,W,L,h,w,seed", [(48, 64, 5, 6, 8, 0), (37, 29, 3, 5, 4, 1), (40, 40, 4, 40, 40, 2),
                                            (24, 32, 1, 3, 4, 3)])
def test_dense_crf_equals_reference(H, W, L, h, w, seed):
    img = normalize(make_scenes(1, image_size=(H, W), patch=1, dim=4, seed=seed).images[0])
    logits = smooth_logits(L, h, w, seed)
    got = official.dense_crf(img, logits)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (L, H, W)
    bgr = torch.from_numpy(official_crf_image(img)).permute(2, 0, 1)
    want = reference.dense_crf(bgr[None], logits[None])[0]
    assert torch.equal(torch.from_numpy(got).argmax(0), want.argmax(0))
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("H,W,L,h,w,seed", [(48, 64, 5, 6, 8, 4), (56, 40, 7, 7, 5, 5), (33, 45, 2, 33, 45, 6)])
def test_dense_crf_equals_official_flow_with_pydensecrf(H, W, L, h, w, seed):
    img = normalize(make_scenes(1, image_size=(H, W), patch=1, dim=4, seed=seed).images[0])
    logits = smooth_logits(L, h, w, seed)
    pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 is an optional comparison")
    want = official_dense_crf_pydensecrf(img, logits)
    got = official.dense_crf(img, logits)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert (got.argmax(0) == want.argmax(0)).all()
    assert np.abs(got - want).max() < 1e-4


def test_batched_crf_stacks_dense_crf():
    sc = make_scenes(3, image_size=(40, 48), dim=8, seed=7)
    imgs = normalize(sc.images)
    soft = torch.log_softmax(torch.stack([smooth_logits(4, 5, 6, s) for s in range(3)]), dim=1)  # as test.py
    got = official.batched_crf("a pool", imgs, soft)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and got.device.type == "cpu"
    assert got.shape == (3, 4, 40, 48)
    for b in range(3):  # one batched call, the same numbers as one image at a time
        assert torch.equal(got[b], torch.from_numpy(official.dense_crf(imgs[b], soft[b])))
    with pytest.raises(ValueError, match="img_tensor"):
        official.batched_crf(None, imgs[0], soft)
    with pytest.raises(ValueError, match="image_tensor"):
        official.dense_crf(imgs[:1], soft[0])
    with pytest.raises(ValueError, match="output_logits"):
        official.dense_crf(imgs[0], soft)


# ------------------------------------------------------------------------------------- focal loss and EMA


def official_focal_loss(logits, target, gamma, ignore_index):
    """The official FocalLoss on full-resolution logits, from its definition."""
    conf = logits.detach().softmax(1).transpose(0, 1).reshape(logits.shape[1], -1).mean(1)
    return F.cross_entropy(logits, target, weight=(1 - conf) ** gamma, ignore_index=ignore_index,
                           reduction="none").mean()


@pytest.mark.parametrize("B,K,H,W,gamma,ignore", [(2, 5, 16, 12, 2.0, 27), (1, 3, 7, 9, 0.5, 255)])
def test_focal_loss_equals_official(B, K, H, W, gamma, ignore, rng):
    logits = torch.randn(B, K, H, W, generator=rng, requires_grad=True)
    target = torch.randint(0, K, (B, H, W), generator=rng)
    target[torch.rand(B, H, W, generator=rng) < 0.3] = ignore
    loss_fn = official.FocalLoss(gamma, ignore)
    assert (loss_fn.gamma, loss_fn.ignore_index) == (gamma, ignore)
    got = loss_fn(logits, target)
    (grad,) = torch.autograd.grad(got, logits)
    want = official_focal_loss(logits, target, gamma, ignore)
    (want_grad,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-7)


def official_ema_states(model, steps, mutate, *, beta, after, every, inv_gamma=1.0, power=1.0, min_value=0.0,
                        no_ema=(), ignore=(), ignore_prefix=()):
    """The official EMA rule from its definition: the EMA copies of the float tensors of ``model`` after
    each of ``steps`` calls of update(), ``mutate(model, step)`` changing the model before each call."""
    tensors = lambda: {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]  # noqa: E731
                       if t.dtype in (torch.float32, torch.float16)}
    ema = {n: t.detach().clone() for n, t in tensors().items()}
    initted, states = False, []
    for step in range(steps):
        mutate(model, step)
        if step % every == 0:
            if step <= after or not initted:
                ema = {n: t.detach().clone() for n, t in tensors().items()}
                initted = initted or step > after
            if step > after:
                epoch = step - after  # the counter is step + 1 when the decay is computed
                decay = beta if beta in (0.0, 1.0) else (
                    0.0 if epoch <= 0 else min(max(1 - (1 + epoch / inv_gamma) ** -power, min_value), beta))
                for n, t in tensors().items():
                    if n in ignore or any(n.startswith(p) for p in ignore_prefix):
                        continue
                    ema[n] = t.detach().clone() if n in no_ema else ema[n].lerp(t.detach(), 1 - decay)
        states.append({n: t.clone() for n, t in ema.items()})
    return states


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 3))


def _mutate(model, step):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.sin(torch.arange(p.numel(), dtype=torch.float32) + step).view_as(p) * 0.1)
        model[1].running_mean.add_(0.05 * step)
        model[1].num_batches_tracked.add_(1)  # int64: not averaged


@pytest.mark.parametrize("kw", [
    dict(beta=0.98, after=0, every=1), dict(beta=0.9999, after=100, every=10),
    dict(beta=0.9, after=3, every=2, inv_gamma=2.0, power=0.75, min_value=0.3, no_ema={"0.bias"},
         ignore={"2.weight"}, ignore_prefix={"1."}),
    dict(beta=0.0, after=0, every=1), dict(beta=1.0, after=0, every=3)])
def test_ema_equals_official_rule(kw):
    steps = 130 if kw["after"] == 100 else 12
    want = official_ema_states(_net(), steps, _mutate, **kw)
    model = _net()
    ema = official.EMA(model, beta=kw["beta"], update_after_step=kw["after"], update_every=kw["every"],
                       inv_gamma=kw.get("inv_gamma", 1.0), power=kw.get("power", 1.0),
                       min_value=kw.get("min_value", 0.0), param_or_buffer_names_no_ema=kw.get("no_ema", set()),
                       ignore_names=kw.get("ignore", set()), ignore_startswith_names=kw.get("ignore_prefix", set()))
    for step in range(steps):
        _mutate(model, step)
        ema.update()
        got = dict([*ema.ema_model.named_parameters(), *ema.ema_model.named_buffers()])
        for name, value in want[step].items():
            assert torch.equal(got[name], value), (step, name)
    assert int(ema.step) == steps and ema.model is model
    x = torch.randn(5, 4)
    ema.eval()
    torch.testing.assert_close(ema(x), ema.ema_model(x))
    assert not any(p.requires_grad for p in ema.ema_model.parameters())


def test_ema_state_dict_layout_and_online_model_option():
    model = _net()
    keys = set(official.EMA(model).state_dict())
    assert {"initted", "step"} <= keys
    assert {k for k in keys if k.startswith("online_model.")} == {f"online_model.{k}" for k in model.state_dict()}
    assert {k for k in keys if k.startswith("ema_model.")} == {f"ema_model.{k}" for k in model.state_dict()}
    outside = official.EMA(model, include_online_model=False)
    assert outside.model is model and not any(k.startswith("online_model") for k in outside.state_dict())


def test_official_training_step_with_our_ema_and_focal_loss_equals_primaps_em(rng):
    """The official training step (weight-normalised 1x1 head on upsampled features, EMA head for the
    E-step, focal loss, Adam, EMA every 3 steps) built from official.EMA / official.FocalLoss follows
    primaps_fast.PriMaPsEM step by step."""
    B, C, h, K, H, every = 2, 12, 6, 4, 24, 3
    protos = torch.randn(K, C, generator=rng)
    em = primaps_fast.PriMaPsEM(K, C, ema_every=every, ignore_index=27)
    em.init_prototypes(protos)
    with warnings.catch_warnings():  # the official head uses the deprecated weight_norm
        warnings.simplefilter("ignore", FutureWarning)
        head = torch.nn.utils.weight_norm(torch.nn.Conv2d(C, K, 1, bias=False), name="weight", dim=0)
    with torch.no_grad():
        head.weight_v.copy_(protos[:, :, None, None])
        head.weight_g.fill_(1.0)
        head(torch.zeros(1, C, 1, 1))  # the official validation pass: the head's weight is a leaf again
    optim = torch.optim.Adam(head.parameters(), lr=5e-3)
    ema = official.EMA(head, beta=0.98, update_after_step=0, update_every=1)  # as on_train_start
    loss_fn = official.FocalLoss(2.0, 27)
    for step in range(13):
        f = torch.randn(B, C, h, h, generator=rng)
        m = torch.randint(0, 5, (B, H, H), generator=rng)
        m[m == 4] = 27
        out = em.step(f, m)
        up = F.interpolate(f, (H, H), mode="bilinear", align_corners=False)
        with torch.no_grad():
            labels = primaps_fast.assign_pseudo_labels(ema(up), m, ignore_index=27)
        optim.zero_grad()
        loss = loss_fn(head(up), labels)
        loss.backward()
        optim.step()
        if step > 0 and step % every == 0:
            ema.update()
        assert float(loss.detach()) == pytest.approx(out["loss"], rel=1e-4)
        torch.testing.assert_close(head.weight_v.detach()[:, :, 0, 0], em.v.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ema.ema_model.weight_v[:, :, 0, 0], em.ema_v, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ema.ema_model.weight_g.flatten(), em.ema_g, rtol=1e-4, atol=1e-5)
    assert int(ema.step) == em.ema_calls == 4


# ------------------------------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inputs_keep_the_official_devices():
    sc = make_scenes(2, image_size=64, dim=32, seed=2)
    imgs = normalize(sc.images)
    cpu = official.PriMaPs()(None, imgs, sc.features, torch.zeros(2))
    got = official.PriMaPs()(None, imgs, sc.features.cuda(), torch.zeros(2, device="cuda"))  # imgs on the CPU
    assert got.device.type == "cuda" and got.dtype == torch.float32
    assert (got.cpu() == cpu).float().mean() >= 0.99
    soft = torch.log_softmax(torch.stack([smooth_logits(4, 8, 8, s) for s in range(2)]), 1)
    q = official.batched_crf(None, imgs.cuda(), soft.cuda())
    assert q.device.type == "cpu"
    assert (q.argmax(1) == official.batched_crf(None, imgs, soft).argmax(1)).float().mean() >= 0.995
