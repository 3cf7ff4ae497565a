"""Backbones: patch tokens equal a hand-written forward of the same timm model (random weights, no
downloads), position-embedding interpolation at 320 / 322, weight loading, clear errors."""
import pytest
import torch
from timm.layers import resample_abs_pos_embed

from primaps_fast.backbones import BACKBONES, Backbone


def manual_features(model, x, patch):
    """Patch embed, class token, bicubic-resampled position embedding, blocks, final norm, drop the
    class token: written out step by step from the ViT definition, not through forward_features."""
    B, _, H, W = x.shape
    h, w = H // patch, W // patch
    tok = torch.nn.functional.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=patch)
    tok = tok.flatten(2).transpose(1, 2)  # (B, h*w, C)
    n_old = model.pos_embed.shape[1] - 1
    g = int(round(n_old ** 0.5))
    pos = resample_abs_pos_embed(model.pos_embed, (h, w), (g, g), num_prefix_tokens=1)
    x = torch.cat([model.cls_token.expand(B, -1, -1), tok], 1) + pos
    for blk in model.blocks:
        x = blk(x)
    x = model.norm(x)[:, 1:]
    return x.transpose(1, 2).reshape(B, -1, h, w)


@pytest.mark.parametrize("name,size", [("dino_vits8", 320), ("dinov2_vits14", 322), ("dino_vitb8", 48),
                                       ("dinov2_vitb14", 56)])
def test_features_match_manual_forward(name, size, rng):
    bb = Backbone(name, "random", seed=3)
    spec = BACKBONES[name]
    x = torch.randn(2 if size < 100 else 1, 3, size, size, generator=rng)
    got = bb(x)
    assert got.shape == (x.shape[0], spec.dim, size // spec.patch, size // spec.patch)
    with torch.no_grad():
        want = manual_features(bb.model, x, spec.patch)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the resampled grid really differs from the native one (interpolation happened)
    assert bb.model.pos_embed.shape[1] - 1 != (size // spec.patch) ** 2


def test_non_square_and_batch_independence(rng):
    bb = Backbone("dino_vits8", "random")
    x = torch.randn(2, 3, 32, 48, generator=rng)
    f = bb(x)
    assert f.shape == (2, 384, 4, 6)
    torch.testing.assert_close(bb(x[1:]), f[1:], rtol=1e-4, atol=1e-5)


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
