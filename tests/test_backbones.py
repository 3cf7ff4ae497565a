"""Backbones: features equal the official DINO / DINOv2 featurizer written out in plain PyTorch
(tests/official_vit.py: seeded state dicts under the official key names, loaded from a .pth through
``Backbone(..., weights=path)``; no downloads), the position-embedding interpolation against its formula,
the DINO ResNet-50, bf16 autocast against fp32, weight loading, clear errors."""
import pytest
import torch
from official_vit import (interpolate_pos_embed, official_resnet50_features, official_resnet50_state_dict,
                          official_vit_features, official_vit_state_dict)
from timm.layers import resample_abs_pos_embed

import primaps_fast as pf
from primaps_fast.backbones import BACKBONES, Backbone, official_pos_embed
from primaps_fast.data.synthetic import make_scenes
from primaps_fast.data.transforms import normalize


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    """name -> (path of a seeded official-layout .pth, its state dict), made on first use."""
    root, made = tmp_path_factory.mktemp("official"), {}

    def get(name, seed=0):
        if (name, seed) not in made:
            sd = (official_resnet50_state_dict(seed) if name == "dino_resnet50"
                  else official_vit_state_dict(name, seed))
            torch.save(sd, root / f"{name}-{seed}.pth")
            made[name, seed] = root / f"{name}-{seed}.pth", sd
        return made[name, seed]
    return get


@pytest.mark.parametrize("M,grid", [(4, (5, 7)), (4, (3, 2)), (5, (5, 6)), (3, (8, 3)), (6, (6, 6)), (2, (9, 11))])
def test_pos_embed_interpolation_formula(M, grid, rng):
    """The hook's interpolation against the bicubic formula built in the test (scale factors (g + 0.1) / M,
    Keys' cubic with A = -0.75, clamped taps), on small grids; the native square grid is unchanged."""
    pos = torch.randn(1, 1 + M * M, 5, generator=rng)
    got = official_pos_embed(pos, grid)
    want = interpolate_pos_embed(pos, *grid)
    assert got.shape == (1, 1 + grid[0] * grid[1], 5) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    if grid != (M, M):  # timm's resampling to the output size samples elsewhere: the hook matters
        timm_pos = resample_abs_pos_embed(pos, grid, (M, M), num_prefix_tokens=1)
        assert (timm_pos - want).abs().max() > 1e-3
    else:
        assert got is pos


@pytest.mark.parametrize("name,size", [("dino_vits8", (320, 320)), ("dinov2_vits14", (322, 322)),
                                       ("dino_vits8", (224, 224)), ("dino_vits8", (48, 80)),
                                       ("dinov2_vits14", (98, 56)), ("dino_vitb8", (64, 64)),
                                       ("dinov2_vitb14", (56, 84))])
def test_features_equal_official(official_files, name, size, rng):
    """An official-layout .pth through Backbone(weights=path) against the plain-PyTorch official forward:
    float32 rounding at the official sizes, the native grid, non-square images (rows follow H)."""
    path, sd = official_files(name)
    bb = Backbone(name, path)
    x = torch.randn(2 if size[0] * size[1] < 10_000 else 1, 3, *size, generator=rng)
    got = bb(x)
    spec = BACKBONES[name]
    assert got.shape == (x.shape[0], spec.dim, size[0] // spec.patch, size[1] // spec.patch)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, official_vit_features(name, sd, x), rtol=0, atol=5e-5)


def test_batch_independence(official_files, rng):
    bb = Backbone("dino_vits8", official_files("dino_vits8")[0])
    x = torch.randn(2, 3, 32, 48, generator=rng)
    f = bb(x)
    assert f.shape == (2, 384, 4, 6)
    torch.testing.assert_close(bb(x[1:]), f[1:], rtol=1e-4, atol=1e-5)


def test_copies_keep_the_official_interpolation(official_files, rng):
    """deepcopy and pickle (e.g. torch.save of the module) keep the hook, bound to the copy."""
    import copy
    import pickle

    bb = Backbone("dino_vits8", official_files("dino_vits8")[0])
    x = torch.randn(1, 3, 40, 56, generator=rng)
    want = bb(x)
    for other in (copy.deepcopy(bb), pickle.loads(pickle.dumps(bb))):
        assert other.model._pos_embed.model is other.model
        torch.testing.assert_close(other(x), want, rtol=0, atol=0)


def test_resnet50_layer4(official_files, tmp_path, rng):
    """dino_resnet50: the official dino_resnet50_pretrain.pth layout (torchvision names, no fc) -> layer4."""
    path, sd = official_files("dino_resnet50")
    bb = Backbone("dino_resnet50", path)
    x = torch.randn(2, 3, 64, 96, generator=rng)
    got = bb(x)
    assert got.shape == (2, 2048, 2, 3) and bb.patch == 32 and bb.dim == 2048
    torch.testing.assert_close(got, official_resnet50_features(sd, x), rtol=1e-5, atol=1e-5)
    # a DINO training checkpoint (teacher, module./backbone. prefixes, a head and an fc) gives the same
    wrapped = {"module.backbone." + k: v for k, v in sd.items()}
    wrapped.update({"module.backbone.fc.weight": torch.zeros(3, 2048), "module.head.last_layer.weight": torch.zeros(2)})
    torch.save({"teacher": wrapped}, tmp_path / "ckpt.pth")
    torch.testing.assert_close(Backbone("dino_resnet50", tmp_path / "ckpt.pth")(x), got, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="--weights"):
        Backbone("dino_resnet50")
    with pytest.raises(ValueError, match="does not fit backbone dino_resnet50"):
        Backbone("dino_resnet50", official_files("dino_vits8")[0])
    with pytest.raises(ValueError, match="multiple of the patch"):
        bb(torch.zeros(1, 3, 48, 64))


@pytest.mark.parametrize("name,size", [("dino_vits8", 160), ("dinov2_vits14", 168)])
def test_bf16_close_to_fp32(official_files, name, size):
    """bf16 autocast (runs on CPU too): features within 2 % relative L2 of fp32 (measured 0.4-0.5 %) and
    the pseudo labels of synthetic scenes nearly all equal (measured: all equal)."""
    path, _ = official_files(name)
    fp32, bf16 = Backbone(name, path), Backbone(name, path, precision="bf16")
    scenes = make_scenes(4, image_size=size, patch=fp32.patch, seed=0)
    x = normalize(scenes.images)
    a, b = fp32(x), bf16(x)
    assert b.dtype == torch.float32
    rel = ((a - b).norm() / a.norm()).item()
    assert 1e-5 < rel < 2e-2  # bf16 really ran, and stayed close
    la = pf.pseudo_labels(scenes.images, a, crf=False)
    lb = pf.pseudo_labels(scenes.images, b, crf=False)
    assert (la == lb).float().mean() >= 0.98


def test_weights_file_official_names(tmp_path, rng):
    src = Backbone("dino_vits8", "random", seed=1)
    # an official DINO training checkpoint: teacher weights with module./backbone. prefixes and a head
    sd = {"module.backbone." + k: v for k, v in src.model.state_dict().items()}
    sd["module.head.mlp.0.weight"] = torch.zeros(4, 384)
    torch.save({"teacher": sd, "epoch": 3}, tmp_path / "dino.pth")
    loaded = Backbone("dino_vits8", tmp_path / "dino.pth")
    x = torch.randn(1, 3, 32, 32, generator=rng)
    torch.testing.assert_close(loaded(x), src(x))
    assert loaded.weights_id.startswith("tensors-sha256:") and len(loaded.weights_id) == 15 + 64
    # the same weights in another file format (and with timm's key names) have the same identity
    from safetensors.torch import save_file

    save_file(src.model.state_dict(), str(tmp_path / "model.safetensors"))
    assert Backbone("dino_vits8", tmp_path / "model.safetensors").weights_id == loaded.weights_id
    other = Backbone("dino_vits8", "random", seed=5).model.state_dict()
    torch.save(other, tmp_path / "other.pth")
    assert Backbone("dino_vits8", tmp_path / "other.pth").weights_id != loaded.weights_id

    v2 = Backbone("dinov2_vits14", "random", seed=2)
    sd2 = dict(v2.model.state_dict(), mask_token=torch.zeros(1, 384))  # official DINOv2 file layout
    torch.save(sd2, tmp_path / "dinov2.pth")
    x = torch.randn(1, 3, 28, 28, generator=rng)
    torch.testing.assert_close(Backbone("dinov2_vits14", tmp_path / "dinov2.pth")(x), v2(x))


def test_weights_errors(tmp_path):
    torch.save(Backbone("dino_vits8", "random").model.state_dict(), tmp_path / "s8.pth")
    with pytest.raises(ValueError, match="does not fit backbone dinov2_vits14"):
        Backbone("dinov2_vits14", tmp_path / "s8.pth")
    with pytest.raises(FileNotFoundError, match="not found"):
        Backbone("dino_vits8", tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read"):
        Backbone("dino_vits8", tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="backbone"):
        Backbone("resnet50", "random")
    with pytest.raises(ValueError, match="^precision"):
        Backbone("dino_vits8", "random", precision="fp16")


def test_offline_without_weights_says_how(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty hub cache
    import primaps_fast.backbones as B

    monkeypatch.setattr(B, "_hub_cached_file", lambda name: None)
    with pytest.raises(RuntimeError, match="--weights"):
        Backbone("dinov2_vits14", allow_download=False)


def test_bad_images():
    bb = Backbone("dino_vits8", "random")
    with pytest.raises(ValueError, match="multiple of the patch"):
        bb(torch.zeros(1, 3, 30, 32))
    with pytest.raises(TypeError, match="images"):
        bb(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
