"""Frozen DINO / DINOv2 ViT feature extractors through timm (the official ``DinoFeaturizerv2``).

The features are the last block's patch tokens after the model's final LayerNorm (DINO's and
DINOv2's ``get_intermediate_layers(img, n=1)``), the class (and register) tokens dropped, as
``(B, C, H / patch, W / patch)``. The models are created with ``dynamic_img_size=True``, so the
position embedding is resampled (bicubic, timm's ``resample_abs_pos_embed``) to the input's patch
grid: 40x40 at the official 320x320 for patch 8, 23x23 at 322x322 for patch 14. DINO's own
``interpolate_pos_encoding`` also uses bicubic interpolation but a slightly different scale factor
(``+0.1``), so features differ from the official ones by a small amount at non-native sizes.

Weights: ``weights=<file>`` loads the official DINO/DINOv2 ``.pth`` (also a DINO training checkpoint
with a ``teacher`` entry) or a timm checkpoint (``.pth``/``.bin``/``.safetensors``); key names are
mapped to timm's. ``weights=None`` takes timm's pretrained weights from the Hugging Face hub cache (or
downloads them when online). ``weights="random"`` gives a seeded random initialisation (smoke tests).
"""
from __future__ import annotations

import hashlib
import os
from typing import NamedTuple

import torch
from torch import nn


class BackboneSpec(NamedTuple):
    timm_name: str
    patch: int
    dim: int
    resolution: int  # the official input size (320 for patch 8, 322 for patch 14)


BACKBONES = {
    "dino_vits8": BackboneSpec("vit_small_patch8_224.dino", 8, 384, 320),
    "dino_vitb8": BackboneSpec("vit_base_patch8_224.dino", 8, 768, 320),
    "dinov2_vits14": BackboneSpec("vit_small_patch14_dinov2.lvd142m", 14, 384, 322),
    "dinov2_vitb14": BackboneSpec("vit_base_patch14_dinov2.lvd142m", 14, 768, 322),
}

WEIGHTS_HELP = (
    "Provide the weights with --weights PATH: the official file (DINO: dino_deitsmall8_300ep_pretrain.pth "
    "or dino_vitbase8_pretrain.pth from https://dl.fbaipublicfiles.com/dino/; DINOv2: dinov2_vits14_pretrain.pth "
    "or dinov2_vitb14_pretrain.pth from https://dl.fbaipublicfiles.com/dinov2/) or a timm checkpoint "
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
        if k.startswith("head.") or k == "mask_token":  # DINO projection head, DINOv2 masking token
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


class Backbone(nn.Module):
    """A frozen ViT returning ``(B, C, H / patch, W / patch)`` normalised patch tokens.

    ``weights_id`` identifies the weights (``tensors-sha256:<hash>`` of the loaded model's tensors, whatever
    file or hub download they came from, or ``random:<seed>``) so feature caches made with other weights are
    rejected.
    """

    def __init__(self, name: str = "dino_vits8", weights=None, *, allow_download: bool | None = None,
                 seed: int = 0):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"backbone: expected one of {sorted(BACKBONES)}, got {name!r}")
        import timm

        self.name = name
        self.spec = BACKBONES[name]
        kwargs = dict(dynamic_img_size=True, num_classes=0)
        if weights == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.model = timm.create_model(self.spec.timm_name, pretrained=False, **kwargs)
        elif weights is not None:
            self.model = timm.create_model(self.spec.timm_name, pretrained=False, **kwargs)
            _load_weights(self.model, os.fspath(weights), name)
        else:
            if allow_download is None:
                allow_download = not any(os.environ.get(v, "0") not in ("0", "") for v in
                                         ("HF_HUB_OFFLINE", "PRIMAPS_FAST_OFFLINE"))
            cached = _hub_cached_file(self.spec.timm_name)
            try:
                if cached is not None:
                    self.model = timm.create_model(self.spec.timm_name, pretrained=False, **kwargs)
                    _load_weights(self.model, cached, name)
                elif allow_download:
                    if not _hub_reachable():
                        raise ConnectionError("the Hugging Face hub is not reachable (offline?)")
                    self.model = timm.create_model(self.spec.timm_name, pretrained=True, **kwargs)
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
        tokens = self.model.forward_features(images)  # (B, prefix + h*w, C), after the final norm
        patches = tokens[:, self.model.num_prefix_tokens:]
        B, _, C = patches.shape
        return patches.reshape(B, H // self.patch, W // self.patch, C).permute(0, 3, 1, 2).contiguous()


def load_backbone(name: str = "dino_vits8", weights=None, *, device=None, allow_download=None) -> Backbone:
    """Create the backbone ``name`` (see ``BACKBONES``) with ``weights`` (a file, ``"random"`` or None)."""
    model = Backbone(name, weights, allow_download=allow_download)
    return model.to(device) if device is not None else model
