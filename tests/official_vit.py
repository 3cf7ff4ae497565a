"""The official DINO / DINOv2 featurizers written out in plain PyTorch for the tests (and
``benchmarks/backbone_parity.py``): seeded state dicts with the official files' key names and shapes,
the position-embedding interpolation built from its formula, and the forwards step by step from the
papers' model definitions (no timm, no primaps_fast)."""
import math

import numpy as np
import torch
import torch.nn.functional as F

# name -> (patch, dim, heads, native grid, DINOv2 (LayerScale, masking token))
VITS = {"dino_vits8": (8, 384, 6, 28, False), "dino_vitb8": (8, 768, 12, 28, False),
        "dinov2_vits14": (14, 384, 6, 37, True), "dinov2_vitb14": (14, 768, 12, 37, True)}
DEPTH = 12
# ResNet-50: (blocks, width) of layer1..layer4; the first block of layer2..4 strides by 2 in its 3x3 conv
RESNET_LAYERS = ((3, 64), (4, 128), (6, 256), (3, 512))


def cubic_weights(t: float) -> list:
    """The four bicubic taps (A = -0.75, Keys) at distances t + 1, t, 1 - t, 2 - t."""
    A = -0.75

    def near(x):
        return ((A + 2) * x - (A + 3)) * x * x + 1

    def far(x):
        return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A
    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def resize_matrix(n_in: int, n_out: int, scale: float) -> np.ndarray:
    """``(n_out, n_in)`` float64: bicubic resampling of one axis with the given scale factor; output cell
    i samples position (i + 0.5) / scale - 0.5, the taps' indices clamped to the border."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) / scale - 0.5
        f = math.floor(src)
        for k, wk in zip(range(f - 1, f + 3), cubic_weights(src - f)):
            m[i, min(max(k, 0), n_in - 1)] += wk
    return m


def interpolate_pos_embed(pos_embed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """DINO's / DINOv2's ``interpolate_pos_encoding`` from its formula (float64 matrices): the native
    square grid unchanged, else scale factors ((h + 0.1) / M, (w + 0.1) / M) along rows and columns."""
    M = math.isqrt(pos_embed.shape[1] - 1)
    if (h, w) == (M, M):
        return pos_embed
    grid = pos_embed[0, 1:].double().numpy().reshape(M, M, -1)
    rows, cols = resize_matrix(M, h, (h + 0.1) / M), resize_matrix(M, w, (w + 0.1) / M)
    patch = np.einsum("iy,yxc,jx->ijc", rows, grid, cols).reshape(h * w, -1)
    return torch.cat([pos_embed[:, :1], torch.from_numpy(patch).float()[None]], 1)


def official_vit_state_dict(name: str, seed: int, depth: int = DEPTH, *, pos_std: float = 0.5) -> dict:
    """Seeded random tensors under the key names and shapes of the official ``.pth`` (DINO:
    ``dino_deitsmall8_300ep_pretrain.pth`` layout; DINOv2: ``dinov2_vits14_pretrain.pth`` with LayerScale
    ``ls1/ls2.gamma`` and ``mask_token``). Scales keep every term of the residual stream visible; a small
    ``pos_std`` lets the image content dominate the features (segments that PriMaPs can find)."""
    patch, C, _, M, v2 = VITS[name]
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.02, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    sd = {"cls_token": rnd(1, 1, C, std=0.5), "pos_embed": rnd(1, 1 + M * M, C, std=pos_std),
          "patch_embed.proj.weight": rnd(C, 3, patch, patch, std=0.05), "patch_embed.proj.bias": rnd(C)}
    if v2:
        sd["mask_token"] = rnd(1, C)
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": rnd(C, std=0.1, mean=1), b + "norm1.bias": rnd(C, std=0.1),
                   b + "attn.qkv.weight": rnd(3 * C, C, std=0.06), b + "attn.qkv.bias": rnd(3 * C),
                   b + "attn.proj.weight": rnd(C, C), b + "attn.proj.bias": rnd(C),
                   b + "norm2.weight": rnd(C, std=0.1, mean=1), b + "norm2.bias": rnd(C, std=0.1),
                   b + "mlp.fc1.weight": rnd(4 * C, C), b + "mlp.fc1.bias": rnd(4 * C),
                   b + "mlp.fc2.weight": rnd(C, 4 * C), b + "mlp.fc2.bias": rnd(C)})
        if v2:
            sd.update({b + "ls1.gamma": rnd(C, std=0.3, mean=1), b + "ls2.gamma": rnd(C, std=0.3, mean=1)})
    sd.update({"norm.weight": rnd(C, std=0.1, mean=1), "norm.bias": rnd(C, std=0.1)})
    return sd


@torch.no_grad()
def official_vit_features(name: str, sd: dict, x: torch.Tensor) -> torch.Tensor:
    """``get_intermediate_layers(x, n=1)``'s patch tokens (final LayerNorm, class token dropped) as
    ``(B, C, H / patch, W / patch)``: patch embedding, class token, interpolated position embedding,
    pre-norm blocks (attention, GELU MLP, DINOv2's LayerScale), LayerNorm eps 1e-6."""
    patch, C, heads, _, v2 = VITS[name]
    B, _, H, W = x.shape
    h, w = H // patch, W // patch
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    t = torch.cat([sd["cls_token"].expand(B, -1, -1), t.flatten(2).transpose(1, 2)], 1)
    t = t + interpolate_pos_embed(sd["pos_embed"], h, w)
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})

    def ln(v, key):
        return F.layer_norm(v, (C,), sd[key + ".weight"], sd[key + ".bias"], eps=1e-6)

    for i in range(depth):
        b = f"blocks.{i}."
        qkv = F.linear(ln(t, b + "norm1"), sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
        q, k, v = qkv.reshape(B, -1, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) * (C // heads) ** -0.5, -1) @ v
        a = F.linear(a.transpose(1, 2).reshape(B, -1, C), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        t = t + (a * sd[b + "ls1.gamma"] if v2 else a)
        m = F.gelu(F.linear(ln(t, b + "norm2"), sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
        m = F.linear(m, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        t = t + (m * sd[b + "ls2.gamma"] if v2 else m)
    t = ln(t, "norm")[:, 1:]
    return t.transpose(1, 2).reshape(B, C, h, w)


def official_resnet50_state_dict(seed: int) -> dict:
    """Seeded tensors in the layout of ``dino_resnet50_pretrain.pth`` (torchvision's ResNet-50 names, no
    ``fc``), BatchNorm statistics included; weights scaled so activations stay of order one."""
    g = torch.Generator().manual_seed(seed)

    def conv(o, i, k):
        return torch.randn(o, i, k, k, generator=g) * math.sqrt(2.0 / (i * k * k))

    def bn(prefix, c, sd):
        sd.update({prefix + ".weight": 1 + 0.1 * torch.randn(c, generator=g),
                   prefix + ".bias": 0.1 * torch.randn(c, generator=g),
                   prefix + ".running_mean": 0.1 * torch.randn(c, generator=g),
                   prefix + ".running_var": 1 + torch.rand(c, generator=g),
                   prefix + ".num_batches_tracked": torch.tensor(100)})

    sd = {"conv1.weight": conv(64, 3, 7)}
    bn("bn1", 64, sd)
    cin = 64
    for li, (blocks, width) in enumerate(RESNET_LAYERS, 1):
        for bi in range(blocks):
            p = f"layer{li}.{bi}."
            sd[p + "conv1.weight"] = conv(width, cin, 1)
            sd[p + "conv2.weight"] = conv(width, width, 3)
            sd[p + "conv3.weight"] = conv(4 * width, width, 1) * 0.3
            for j, c in ((1, width), (2, width), (3, 4 * width)):
                bn(p + f"bn{j}", c, sd)
            if bi == 0:
                sd[p + "downsample.0.weight"] = conv(4 * width, cin, 1)
                bn(p + "downsample.1", 4 * width, sd)
            cin = 4 * width
    return sd


@torch.no_grad()
def official_resnet50_features(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """torchvision's ResNet-50 up to ``layer4`` (the official ``layer4.2.relu_2`` node) in eval mode,
    ``(B, 2048, H / 32, W / 32)``."""
    def bn(v, p):
        return F.batch_norm(v, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"],
                            sd[p + ".bias"], training=False, eps=1e-5)

    x = F.max_pool2d(F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1")), 3, 2, 1)
    for li, (blocks, _) in enumerate(RESNET_LAYERS, 1):
        for bi in range(blocks):
            p = f"layer{li}.{bi}."
            stride = 2 if bi == 0 and li > 1 else 1
            y = F.relu(bn(F.conv2d(x, sd[p + "conv1.weight"]), p + "bn1"))
            y = F.relu(bn(F.conv2d(y, sd[p + "conv2.weight"], stride=stride, padding=1), p + "bn2"))
            y = bn(F.conv2d(y, sd[p + "conv3.weight"]), p + "bn3")
            if bi == 0:
                x = bn(F.conv2d(x, sd[p + "downsample.0.weight"], stride=stride), p + "downsample.1")
            x = F.relu(x + y)
    return x
