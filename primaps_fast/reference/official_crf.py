"""pydensecrf2, called the way the official code calls it: the comparison for the dense CRF in tests and
benchmarks, where pydensecrf2 is installed. It is not a dependency: each function imports it when
called, and raises ImportError without it (tests skip with ``pytest.importorskip`` first).

The official ``crf.py``: ``DenseCRF2D(W, H, L)``, the unary ``unary_from_softmax(probs)``, a Gaussian
kernel (sxy=1, compat=3) and a bilateral kernel (sxy=67, srgb=3, compat=4) on the uint8 HWC image, then
``inference(10)``; the image it sees is the normalised network input un-normalised, truncated to uint8
and with its channels reversed (BGR).
"""
import numpy as np
import torch
import torch.nn.functional as F

from primaps_fast.common import IMAGENET_MEAN, IMAGENET_STD


def official_crf_image(image: torch.Tensor) -> np.ndarray:
    """The official uint8 HWC BGR array of a normalised float (3, H, W) image: un-normalised channel by
    channel, times 255, truncated (``to_pil_image``), channels reversed."""
    x = image.clone()
    for channel, m, s in zip(x, IMAGENET_MEAN, IMAGENET_STD):
        channel.mul_(s).add_(m)
    rgb = x.mul(255).byte().permute(1, 2, 0).numpy()
    return np.ascontiguousarray(rgb[:, :, ::-1])


def pydensecrf_model(image: torch.Tensor, probs: torch.Tensor):
    """pydensecrf2's ``DenseCRF2D`` of a uint8 (3, H, W) image (channels in the order the kernel should
    see them) and float32 probabilities (L, H, W), set up with the official unary and kernels; no
    inference yet."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    L, H, W = probs.shape
    model = dcrf.DenseCRF2D(W, H, L)
    model.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.numpy())))
    model.addPairwiseGaussian(sxy=1, compat=3)
    model.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.ascontiguousarray(image.permute(1, 2, 0).numpy()), compat=4)
    return model


def pydensecrf_marginals(image: torch.Tensor, probs: torch.Tensor, iterations: int = 10) -> torch.Tensor:
    """float32 (L, H, W): pydensecrf2's marginals after ``iterations`` of its mean field (see
    ``pydensecrf_model`` for the inputs)."""
    q = pydensecrf_model(image, probs).inference(iterations)
    return torch.from_numpy(np.array(q)).reshape(probs.shape)


def official_dense_crf_pydensecrf(image_tensor: torch.Tensor, output_logits: torch.Tensor) -> np.ndarray:
    """The official ``dense_crf(image_tensor, output_logits)`` with pydensecrf2: a normalised (3, H, W)
    image and logits (L, h, w), upsampled bilinearly to (H, W) and softmaxed; float32 numpy (L, H, W)."""
    bgr = torch.from_numpy(official_crf_image(image_tensor)).permute(2, 0, 1)
    H, W = bgr.shape[-2:]
    probs = F.softmax(F.interpolate(output_logits[None], size=(H, W), mode="bilinear", align_corners=False)[0], dim=0)
    return pydensecrf_marginals(bgr, probs).numpy()
