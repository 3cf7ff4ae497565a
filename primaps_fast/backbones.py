"""Frozen DINO / DINOv2 feature extractors through timm, equal to the official ``DinoFeaturizerv2``.

ViTs (``dino_vits8``, ``dino_vitb8``, ``dinov2_vits14``, ``dinov2_vitb14``): the last block's patch
tokens after the model's final LayerNorm (DINO's and DINOv2's ``get_intermediate_layers(img, n=1)``),
the class token dropped, as ``(B, C, H / patch, W / patch)``. timm builds the model; one hook,
:func:`official_pos_embed` (installed as the model's ``_pos_embed``), replaces timm's resampling of the
position embedding with DINO's / DINOv2's ``interpolate_pos_encoding``: unchanged at the native square
grid (28x28 for DINO /8, 37x37 for DINOv2 /14), else bicubic with the *scale factors*
``((h + 0.1) / M, (w + 0.1) / M)`` (not the output size, so the sampling positions differ slightly from
timm's), antialias off, in float32. The features then equal the official ones to float32 rounding at
every size divisible by the patch (timm's resampling is 0.3-0.8 % off at 320 / 322 px).

Non-square images: the official featurizer reshapes DINO's tokens with ``W / patch`` for both sides,
which fails unless ``H == W`` (its DINOv2 branch reshapes with ``(H / patch, W / patch)``); here every
backbone returns the ``(H / patch, W / patch)`` grid (a deliberate difference: the official code
gives no result there). The position embedding's rows follow ``H`` and its columns ``W``, as in both
official models.

``dino_resnet50``: timm's ResNet-50 (torchvision's layout and key names), the output of ``layer4``
(the official ``layer4.2.relu_2`` node), ``(B, 2048, H / 32, W / 32)``.

``precision="bf16"`` runs the forward under bfloat16 autocast (on CUDA timm's attention is PyTorch's
fused ``scaled_dot_product_attention``); the features are returned as float32 either way.

Weights: ``weights=<file>`` loads the official DINO/DINOv2 ``.pth`` (also a DINO training checkpoint
with a ``teacher`` entry), the official ``dino_resnet50_pretrain.pth`` or a timm checkpoint
(``.pth``/``.bin``/``.safetensors``); key names are mapped to timm's. ``weights=None`` takes timm's
pretrained weights from the Hugging Face hub cache (or downloads them when online); timm has no DINO
ResNet-50, so ``dino_resnet50`` needs a file. ``weights="random"`` gives a seeded random initialisation
(smoke tests).
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
from typing import NamedTuple

import torch
from torch import nn

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
POS_EMBED_OFFSET = 0.1  # DINO's and DINOv2's ``interpolate_offset``


class BackboneSpec(NamedTuple):
    timm_name: str
    patch: int  # the feature grid's stride in pixels
    dim: int
    resolution: int  # the official input size (320 for patch 8 and the ResNet, 322 for patch 14)
    kind: str = "vit"  # "vit" or "resnet"


BACKBONES = {
    "dino_vits8": BackboneSpec("vit_small_patch8_224.dino", 8, 384, 320),
    "dino_vitb8": BackboneSpec("vit_base_patch8_224.dino", 8, 768, 320),
    "dinov2_vits14": BackboneSpec("vit_small_patch14_dinov2.lvd142m", 14, 384, 322),
    "dinov2_vitb14": BackboneSpec("vit_base_patch14_dinov2.lvd142m", 14, 768, 322),
    "dino_resnet50": BackboneSpec("resnet50", 32, 2048, 320, "resnet"),
}

WEIGHTS_HELP = (
    "Provide the weights with --weights PATH: the official file (DINO: dino_deitsmall8_300ep_pretrain.pth "
    "or dino_vitbase8_pretrain.pth from https://dl.fbaipublicfiles.com/dino/; DINOv2: dinov2_vits14_pretrain.pth "
    "or dinov2_vitb14_pretrain.pth from https://dl.fbaipublicfiles.com/dinov2/; dino_resnet50: "
    "dino_resnet50_pretrain.pth from https://dl.fbaipublicfiles.com/dino/) or a timm checkpoint "
    "(model.safetensors of the Hugging Face repo timm/{timm_name}). On a machine with internet access, "
    "omitting --weights downloads them through timm once (cached in ~/.cache/huggingface).")


def tensors_sha256(state_dict: dict) -> str:
    """SHA-256 of a state dict's tensors (names, dtypes, shapes and bytes, in name order): the identity of
    the weights themselves, so the same weights as ``.pth`` or ``.safetensors`` (or with other key names
    before timm's mapping) are recognised as the same."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read_state_dict(path) -> dict:
    if os.fspath(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(os.fspath(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("teacher", "state_dict", "model"):  # DINO training checkpoints and common wrappers
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"weights: {path} does not contain a state dict")
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith(("head.", "fc.")) or k == "mask_token":  # DINO heads, DINOv2 masking token
            continue
        out[k] = v
    return out


def _load_weights(model: nn.Module, path, name: str) -> None:
    from timm.models.vision_transformer import checkpoint_filter_fn

    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights: file not found: {path}")
    try:
        sd = _read_state_dict(path)
    except Exception as exc:
        raise ValueError(f"weights: cannot read {path}: {exc}") from exc
    if BACKBONES[name].kind == "vit":
        sd = checkpoint_filter_fn(sd, model)  # DINOv2 names -> timm, position embedding to the model's grid
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.startswith("head")]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        detail = (f"missing {missing[:4]}" if missing else "") + (
            f" shape mismatch {[(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in wrong[:3]]}" if wrong else "")
        raise ValueError(f"weights: {path} does not fit backbone {name}: {detail.strip()}")
    model.load_state_dict({k: sd[k] for k in own if k in sd}, strict=False)


def _hub_cached_file(timm_name: str):
    """The cached ``model.safetensors`` of ``timm/<timm_name>`` (no network access), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    path = try_to_load_from_cache(f"timm/{timm_name}", "model.safetensors")
    return path if isinstance(path, str) and os.path.isfile(path) else None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick connection test, so an offline machine fails at once instead of after minutes of retries."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def official_pos_embed(pos_embed: torch.Tensor, grid) -> torch.Tensor:
    """DINO's / DINOv2's ``interpolate_pos_encoding``: ``pos_embed`` ``(1, 1 + M * M, C)`` (class token
    first) for the patch grid ``grid = (h, w)``, as ``(1, 1 + h * w, C)``.

    Unchanged when ``(h, w) == (M, M)``; else the ``M x M`` patch part is resized bicubically with the
    scale factors ``((h + 0.1) / M, (w + 0.1) / M)``: the output has ``h x w`` cells and output cell
    ``i`` samples input position ``(i + 0.5) * M / (h + 0.1) - 0.5`` (PyTorch's rule for a given scale
    factor), antialias off, computed in float32 (DINOv2 casts; DINO's weights are float32)."""
    h, w = grid
    M = math.isqrt(pos_embed.shape[1] - 1)
    if (h, w) == (M, M):
        return pos_embed
    pos = pos_embed.float()
    patch = pos[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)
    patch = nn.functional.interpolate(
        patch, scale_factor=((h + POS_EMBED_OFFSET) / M, (w + POS_EMBED_OFFSET) / M), mode="bicubic",
        antialias=False)
    return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, h * w, -1)], 1)


class _OfficialPosEmbed:
    """Replaces timm's ``VisionTransformer._pos_embed`` on one model (class token, no registers): ``x``
    ``(B, h, w, C)`` from the patch embedding (``dynamic_img_size``) -> ``(B, 1 + h * w, C)`` with the
    position embedding of :func:`official_pos_embed` added (in ``x``'s dtype, as DINOv2). An object
    rather than a bound function, so that the model still copies and pickles with the hook."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        B, h, w, C = x.shape
        x = torch.cat([m.cls_token.expand(B, -1, -1), x.reshape(B, h * w, C)], 1)
        return m.pos_drop(x + official_pos_embed(m.pos_embed, (h, w)).to(x.dtype))


def _create(spec: BackboneSpec, **kwargs) -> nn.Module:
    """The timm model of ``spec`` without classifier; ViTs with the official position embedding hook."""
    import timm

    if spec.kind == "resnet":
        return timm.create_model(spec.timm_name, num_classes=0, **kwargs)
    model = timm.create_model(spec.timm_name, num_classes=0, dynamic_img_size=True, **kwargs)
    assert model.num_prefix_tokens == 1 and not model.no_embed_class, "the hook assumes a class token only"
    model._pos_embed = _OfficialPosEmbed(model)
    return model


class Backbone(nn.Module):
    """A frozen backbone returning ``(B, C, H / patch, W / patch)`` float32 features (module docstring);
    ``precision`` ``"fp32"`` or ``"bf16"`` (autocast).

    ``weights_id`` identifies the weights (``tensors-sha256:<hash>`` of the loaded model's tensors, whatever
    file or hub download they came from, or ``random:<seed>``) so feature caches made with other weights are
    rejected.
    """

    def __init__(self, name: str = "dino_vits8", weights=None, *, allow_download: bool | None = None,
                 seed: int = 0, precision: str = "fp32"):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"backbone: expected one of {sorted(BACKBONES)}, got {name!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {sorted(PRECISIONS)}, got {precision!r}")
        self.name = name
        self.spec = BACKBONES[name]
        self.precision = precision
        if weights == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.model = _create(self.spec)
        elif weights is not None:
            self.model = _create(self.spec)
            _load_weights(self.model, os.fspath(weights), name)
        elif self.spec.kind == "resnet":
            raise RuntimeError(f"backbone {name}: timm has no DINO weights for it. "
                               + WEIGHTS_HELP.format(timm_name=self.spec.timm_name))
        else:
            if allow_download is None:
                allow_download = not any(os.environ.get(v, "0") not in ("0", "") for v in
                                         ("HF_HUB_OFFLINE", "PRIMAPS_FAST_OFFLINE"))
            cached = _hub_cached_file(self.spec.timm_name)
            try:
                if cached is not None:
                    self.model = _create(self.spec)
                    _load_weights(self.model, cached, name)
                elif allow_download:
                    if not _hub_reachable():
                        raise ConnectionError("the Hugging Face hub is not reachable (offline?)")
                    self.model = _create(self.spec, pretrained=True)
                else:
                    raise FileNotFoundError("not in the local Hugging Face cache and downloads are off")
            except Exception as exc:
                raise RuntimeError(
                    f"backbone {name}: pretrained weights are not available ({exc}). "
                    + WEIGHTS_HELP.format(timm_name=self.spec.timm_name)) from exc
        self.weights_id = (f"random:{seed}" if weights == "random"
                           else "tensors-sha256:" + tensors_sha256(self.model.state_dict()))
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @property
    def patch(self) -> int:
        return self.spec.patch

    @property
    def dim(self) -> int:
        return self.spec.dim

    def train(self, mode: bool = True):  # always frozen in eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: float ``(B, 3, H, W)`` ImageNet-normalised, ``H`` and ``W`` multiples of the patch."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected (B, 3, H, W), got {getattr(images, 'shape', type(images))}")
        if not images.is_floating_point():
            raise TypeError(f"images: expected ImageNet-normalised float images, got {images.dtype}")
        H, W = images.shape[-2:]
        if H % self.patch or W % self.patch:
            raise ValueError(f"images: size {H}x{W} is not a multiple of the patch size {self.patch}")
        dtype = PRECISIONS[self.precision]
        with torch.autocast(images.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            out = self.model.forward_features(images)
        if self.spec.kind == "resnet":  # (B, 2048, H / 32, W / 32), layer4's output
            return out.float()
        patches = out[:, self.model.num_prefix_tokens:]  # (B, h*w, C), after the final norm
        B, _, C = patches.shape
        return patches.float().reshape(B, H // self.patch, W // self.patch, C).permute(0, 3, 1, 2).contiguous()


def load_backbone(name: str = "dino_vits8", weights=None, *, device=None, allow_download=None,
                  precision: str = "fp32") -> Backbone:
    """Create the backbone ``name`` (see ``BACKBONES``) with ``weights`` (a file, ``"random"`` or None),
    run at ``precision`` (``"fp32"`` or ``"bf16"`` autocast)."""
    model = Backbone(name, weights, allow_download=allow_download, precision=precision)
    return model.to(device) if device is not None else model
