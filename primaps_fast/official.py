"""The public surface of the official PriMaPs code (github visinf/primaps), with our kernels inside.

Same names, signatures, argument conventions, return types, dtypes and devices as the official
``primaps_modules`` (ImageNet-normalised float images, features at patch resolution, numpy out where
the official returns numpy), each implemented by one batched call into ``primaps_fast``; no process
pool (the official ``pool`` argument is accepted and not used).

* :class:`PriMaPs` (``primaps_modules/primaps.py``): ``primaps_fast.pseudo_labels``.
* :func:`dense_crf`, :func:`batched_crf` (``primaps_modules/crf.py``): ``primaps_fast.dense_crf``.
* :class:`EMA` (``primaps_modules/ema.py``): one multi-tensor ``lerp`` per update.
* :class:`FocalLoss` (defined inside ``UnsupervisedSegmenter.__init__`` in ``train.py``, so only user
  code that constructs it can use this one): ``primaps_fast.focal_loss``.

To accelerate an unchanged official checkout, run its scripts through this module::

    python -m primaps_fast.official train.py <its usual arguments>      # also test.py, demo.py

which calls :func:`install` (replaces the names of :data:`REPLACEMENTS` in the official modules) and
then runs the script as ``__main__``; where pydensecrf does not import, ``primaps_fast.pydensecrf``
stands in for it (the official ``crf.py`` imports it), so a checkout runs without pydensecrf. ``docs/official.md`` lists what is replaced, what cannot be
replaced from outside (code written inline in the official scripts) and the measured speed-ups.

Deliberate differences shared by every backend (``docs/design.md``): a deterministic
sign of the principal direction (the official ``pca_lowrank`` is randomized and draws from torch's
global RNG; ours draws nothing), no empty proposals, a defined result for degenerate features, the
background summed over masks also for a single proposal, float images clamped to [0, 255] before the
uint8 cast of the CRF image (the official cast wraps values outside; identical for images that come
from the official transforms).
"""
from __future__ import annotations

import copy
import importlib
import os
import runpy
import sys
import warnings

import torch

from primaps_fast.common import crf_image

# Official module -> the names install() replaces there. ``primaps_modules.primaps`` binds its own
# ``dense_crf`` at import, so that binding is replaced too (the official PriMaPs class, if a user kept a
# reference to it, then also runs our CRF).
REPLACEMENTS = {
    "primaps_modules.primaps": ("PriMaPs", "dense_crf"),
    "primaps_modules.crf": ("dense_crf", "batched_crf"),
    "primaps_modules.ema": ("EMA",),
}

_saved: dict = {}  # (module name, attribute) -> the official object, while installed


def _crf_images(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised float ``(B, 3, H, W)`` -> the uint8 BGR images the official CRF sees
    (``to_pil_image(UnNormalize()(x))[..., ::-1]``), clamped to [0, 255] first (the official cast wraps)."""
    return crf_image(images.detach()).flip(1).contiguous()


def _check_image(image, name: str, ndim: int) -> None:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(image).__name__}")
    if not image.is_floating_point():
        raise TypeError(f"{name}: expected an ImageNet-normalised float image, got {image.dtype}")
    if image.dim() != ndim or image.shape[-3] != 3:
        want = "(3, H, W)" if ndim == 3 else "(B, 3, H, W)"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(image.shape)}")


class PriMaPs:
    """Official ``PriMaPs(threshold=0.4, ignore_id=27)``: PriMaPs pseudo labels.

    Identical: the constructor, the attributes ``threshold`` and ``ignore_id``, ``__call__(pool, imgs,
    features, cls_prior)`` returning the stacked labels, ``_get_pseudo(img, feat, cls_prior)``; labels
    are float (the default dtype) on the device of the features, mask ids ``1..M`` with background
    ``ignore_id`` when ``cls_prior`` is all zeros (as the official scripts call it), else the most
    frequent ``cls_prior`` value of each mask (ties: the smallest value; ``int()`` of it). The median
    filter, the background mask, the upsampling and the dense CRF (pydensecrf's parameters, BGR image)
    run inside, as in the official flow.

    Differs: the batch is one call of :func:`primaps_fast.pseudo_labels` (C++ on CPU features, Triton
    on CUDA features), ``pool`` is not used; the deliberate differences of the module docstring; the
    image size must be a multiple of the feature grid (true for every official configuration); a
    ``cls_prior`` whose length differs from the batch is an error (the official ``zip`` truncates);
    no ``medianfilter`` attribute.
    """

    def __init__(self, threshold=0.4, ignore_id=27):
        self.threshold = threshold
        self.ignore_id = ignore_id

    def __call__(self, pool, imgs, features, cls_prior):
        """``imgs`` ``(B, 3, H, W)`` normalised, ``features`` ``(B, C, h, w)``, ``cls_prior`` ``B``
        per-image priors (all zeros, or ``(H, W)`` class ids) -> float ``(B, H, W)``."""
        _check_image(imgs, "imgs", 4)
        return self._labels(imgs, features, cls_prior)

    def _get_pseudo(self, img, feat, cls_prior):
        """One image: ``img`` ``(3, H, W)`` (extra unit dimensions are squeezed, as the official),
        ``feat`` ``(C, h, w)``, ``cls_prior`` zeros or ``(H, W)`` -> float ``(H, W)``."""
        img = img.squeeze() if isinstance(img, torch.Tensor) else img
        _check_image(img, "img", 3)
        if not isinstance(feat, torch.Tensor):
            raise TypeError(f"feat: expected a torch.Tensor, got {type(feat).__name__}")
        if feat.dim() != 3:
            raise ValueError(f"feat: expected shape (C, h, w), got {tuple(feat.shape)}")
        return self._labels(img[None], feat[None], [cls_prior])[0]

    def _apply_batched_decompose(self, tup):
        """The official multiprocessing wrapper: ``_get_pseudo(*tup)``."""
        return self._get_pseudo(tup[0], tup[1], tup[2])

    def _labels(self, imgs, features, cls_prior):
        import primaps_fast

        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features: expected a torch.Tensor, got {type(features).__name__}")
        if len(cls_prior) != imgs.shape[0]:
            raise ValueError(f"cls_prior: expected {imgs.shape[0]} per-image priors, got {len(cls_prior)}")
        # Mask ids come back with background 0, so an ignore_id among the ids merges that mask with the
        # background exactly as the official code does, instead of raising.
        ids = primaps_fast.pseudo_labels(imgs.detach().to(features.device), features.detach(),
                                         threshold=self.threshold, ignore_index=0)
        out = torch.empty(ids.shape, dtype=torch.get_default_dtype(), device=features.device)
        for b, prior in enumerate(cls_prior):
            if not isinstance(prior, torch.Tensor):
                raise TypeError(f"cls_prior: expected tensors, got {type(prior).__name__}")
            if bool((prior == 0).all()):
                out[b] = torch.where(ids[b] == 0, self.ignore_id, ids[b])
            else:
                out[b] = _mask_modes(ids[b], prior.to(features.device), self.ignore_id)
        return out


def _mask_modes(ids: torch.Tensor, prior: torch.Tensor, ignore_id) -> torch.Tensor:
    """The official prior branch of ``_get_pseudo``: every pixel of mask ``m >= 1`` gets
    ``int(mode of prior over the mask)`` (ties: the smallest value), background gets ``ignore_id``."""
    if tuple(prior.shape) != tuple(ids.shape):
        raise ValueError(f"cls_prior: a non-zero prior must have the image shape {tuple(ids.shape)}, "
                         f"got {tuple(prior.shape)}")
    inside = ids != 0
    out = torch.full(ids.shape, float(ignore_id), dtype=torch.get_default_dtype(), device=ids.device)
    if not bool(inside.any()):
        return out
    mask_id = ids[inside]
    values, value_idx = torch.unique(prior[inside], sorted=True, return_inverse=True)
    V = values.numel()
    # (mask, value) pairs that occur, with their counts: memory bounded by the pixels, whatever V is
    pairs, counts = torch.unique(mask_id * V + value_idx, return_counts=True)
    pair_mask, pair_value = pairs // V, pairs % V
    n = int(mask_id.max()) + 1
    top = torch.zeros(n, dtype=counts.dtype, device=ids.device).scatter_reduce(0, pair_mask, counts, "amax")
    is_top = counts == top[pair_mask]
    best = torch.full((n,), V, dtype=torch.int64, device=ids.device).scatter_reduce(  # ties: the smallest
        0, pair_mask[is_top], pair_value[is_top], "amin")
    out[inside] = values[best[mask_id]].to(torch.int64).to(out.dtype)  # int(): truncation toward zero
    return out


def dense_crf(image_tensor, output_logits):
    """Official ``dense_crf(image_tensor, output_logits)``: the dense CRF of one image.

    ``image_tensor``: ImageNet-normalised float ``(3, H, W)``; ``output_logits``: float ``(L, h, w)``,
    upsampled bilinearly (``align_corners=False``) to ``(H, W)`` and softmaxed. Returns the numpy
    float32 ``(L, H, W)`` marginals of pydensecrf's ``DenseCRF2D`` with the official parameters (10
    iterations, Gaussian sxy 1 / compat 3, bilateral sxy 67 / srgb 3 / compat 4) on the uint8 image
    in BGR order, as the official.

    Differs: one call of :func:`primaps_fast.dense_crf` on the device of ``output_logits`` (marginals
    within ~1e-5 of pydensecrf); the uint8 image is clamped (module docstring); ``L = 1`` works (the
    official ``squeeze()`` breaks it).
    """
    _check_image(image_tensor, "image_tensor", 3)
    if not isinstance(output_logits, torch.Tensor):
        raise TypeError(f"output_logits: expected a torch.Tensor, got {type(output_logits).__name__}")
    if output_logits.dim() != 3:
        raise ValueError(f"output_logits: expected shape (L, h, w), got {tuple(output_logits.shape)}")
    import primaps_fast

    logits = output_logits.detach()
    q = primaps_fast.dense_crf(_crf_images(image_tensor[None].to(logits.device)), logits[None])
    return q[0].cpu().numpy()


def batched_crf(pool, img_tensor, prob_tensor):
    """Official ``batched_crf(pool, img_tensor, prob_tensor)``: :func:`dense_crf` of every image.

    ``img_tensor`` ``(B, 3, H, W)`` normalised, ``prob_tensor`` ``(B, L, h, w)`` logits (the official
    passes log-probabilities). Returns a float32 CPU tensor ``(B, L, H, W)``, as the official.

    Differs: the whole batch is one call of :func:`primaps_fast.dense_crf` (C++ threads, or the GPU
    when both inputs are on CUDA); ``pool`` is not used; the differences of :func:`dense_crf`.
    """
    _check_image(img_tensor, "img_tensor", 4)
    if not isinstance(prob_tensor, torch.Tensor):
        raise TypeError(f"prob_tensor: expected a torch.Tensor, got {type(prob_tensor).__name__}")
    import primaps_fast

    images, logits = img_tensor.detach(), prob_tensor.detach()
    if images.device != logits.device:  # the official moves both to the CPU
        images, logits = images.cpu(), logits.cpu()
    return primaps_fast.dense_crf(_crf_images(images), logits).cpu()


class FocalLoss:
    """The official ``FocalLoss(gamma, ignore_id)`` of ``train.py``: called with full-resolution
    ``logits`` ``(B, K, H, W)`` and int64 ``pseudo_gt`` ``(B, H, W)``, it returns the mean over all
    ``B*H*W`` pixels of the cross-entropy weighted by ``(1 - mean softmax confidence of the class) **
    gamma`` (detached), ignored pixels contributing 0. Attributes ``gamma``, ``ignore_index``.

    Differs: one fused call of :func:`primaps_fast.focal_loss` (forward and backward). That function
    also accepts logits at feature resolution and upsamples them inside, which is where most of its
    speed comes from; the official head computes full-resolution logits, so it gets less.
    """

    def __init__(self, gamma, ignore_id):
        self.gamma = gamma
        self.ignore_index = ignore_id

    def __call__(self, logits, pseudo_gt):
        import primaps_fast

        return primaps_fast.focal_loss(logits, pseudo_gt, gamma=self.gamma, ignore_index=self.ignore_index)


class EMA(torch.nn.Module):
    """Official ``EMA`` (``primaps_modules/ema.py``, after lucidrains' ema-pytorch): an exponential
    moving average copy ``ema_model`` of ``model``.

    Identical: the constructor, the attributes, the submodules ``online_model`` / ``ema_model`` and the
    buffers ``initted`` / ``step`` (so checkpoints load both ways), ``update()``, the decay schedule
    ``clamp(1 - (1 + e / inv_gamma) ** -power, min_value, beta)`` with ``e = step - update_after_step
    - 1`` (0 while ``e <= 0``; ``beta`` itself when it is 0 or 1), the printed decay line, the name
    filters, and ``__call__`` running the EMA model. Float32 and float16 tensors are averaged.

    Differs: the averaged tensors are updated by one multi-tensor ``lerp`` instead of one call each;
    a model ``copy.deepcopy`` cannot copy raises its error (the official prints and exits).
    """

    def __init__(self, model, ema_model=None, beta=0.9999, update_after_step=100, update_every=10,
                 inv_gamma=1.0, power=1.0, min_value=0.0, param_or_buffer_names_no_ema=frozenset(),
                 ignore_names=frozenset(), ignore_startswith_names=frozenset(), include_online_model=True):
        super().__init__()
        if not isinstance(param_or_buffer_names_no_ema, (set, frozenset, list, tuple)):
            raise TypeError("param_or_buffer_names_no_ema: expected a set or a list of names, got "
                            f"{type(param_or_buffer_names_no_ema).__name__}")
        self.beta = beta
        self.include_online_model = include_online_model
        # Outside the module tree (a list) when the caller saves the online model separately.
        self.online_model = model if include_online_model else [model]
        self.ema_model = copy.deepcopy(model) if ema_model is None else ema_model
        self.ema_model.requires_grad_(False)
        averaged = (torch.float, torch.float16)
        self.parameter_names = {n for n, p in self.ema_model.named_parameters() if p.dtype in averaged}
        self.buffer_names = {n for n, b in self.ema_model.named_buffers() if b.dtype in averaged}
        self.update_every = update_every
        self.update_after_step = update_after_step
        self.inv_gamma = inv_gamma
        self.power = power
        self.min_value = min_value
        self.param_or_buffer_names_no_ema = param_or_buffer_names_no_ema
        self.ignore_names = ignore_names
        self.ignore_startswith_names = ignore_startswith_names
        self.register_buffer("initted", torch.tensor([0.0]))
        self.register_buffer("step", torch.tensor([0]))

    @property
    def model(self):
        return self.online_model if self.include_online_model else self.online_model[0]

    def restore_ema_model_device(self):
        self.ema_model.to(self.initted.device)

    def get_params_iter(self, model):
        return ((n, p) for n, p in model.named_parameters() if n in self.parameter_names)

    def get_buffers_iter(self, model):
        return ((n, b) for n, b in model.named_buffers() if n in self.buffer_names)

    def _pairs(self, ma_model, current_model):
        for tensors in (self.get_params_iter, self.get_buffers_iter):
            for (name, ma), (_, cur) in zip(tensors(ma_model), tensors(current_model)):
                yield name, ma, cur

    @torch.no_grad()
    def copy_params_from_model_to_ema(self):
        for _, ma, cur in self._pairs(self.ema_model, self.model):
            ma.copy_(cur)

    def get_current_decay(self):
        epoch = max(self.step.item() - self.update_after_step - 1, 0.0)
        if epoch <= 0:
            return 0.0
        value = 1 - (1 + epoch / self.inv_gamma) ** -self.power
        return min(max(value, self.min_value), self.beta)

    def update(self):
        step = self.step.item()
        self.step += 1
        if step % self.update_every != 0:
            return
        if step <= self.update_after_step:
            self.copy_params_from_model_to_ema()
            return
        if not self.initted.item():
            self.copy_params_from_model_to_ema()
            self.initted.fill_(1.0)
        self.update_moving_average(self.ema_model, self.model)

    @torch.no_grad()
    def update_moving_average(self, ma_model, current_model):
        decay = self.beta if self.beta in (0.0, 1.0) else self.get_current_decay()
        print("-- EMA decay: %s" % decay)
        ema, cur = [], []
        for name, ma, current in self._pairs(ma_model, current_model):
            if name in self.ignore_names or any(name.startswith(p) for p in self.ignore_startswith_names):
                continue
            if name in self.param_or_buffer_names_no_ema:
                ma.copy_(current)
            else:
                ema.append(ma)
                cur.append(current)
        if ema:
            torch._foreach_lerp_(ema, cur, 1.0 - decay)

    def __call__(self, *args, **kwargs):
        return self.ema_model(*args, **kwargs)


def install() -> list:
    """Replace the names of :data:`REPLACEMENTS` in the official modules that import; returns the
    replaced names as ``"module.name"``. A module that is absent is skipped silently, one that exists but
    fails to import is skipped with a warning. Idempotent; :func:`uninstall` restores the originals.

    The official scripts bind these names when they are imported (``from primaps_modules.primaps import
    PriMaPs``): call this before importing them, or use the runner ``python -m primaps_fast.official``.
    """
    ours = sys.modules[__name__]
    replaced = []
    for module_name, names in REPLACEMENTS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
                continue  # no official checkout on sys.path (or an older one without this module)
            warnings.warn(f"primaps_fast.official: {module_name} not replaced, it does not import: {exc}")
            continue
        except ImportError as exc:
            warnings.warn(f"primaps_fast.official: {module_name} not replaced, it does not import: {exc}")
            continue
        for name in names:
            if not hasattr(module, name):
                continue
            _saved.setdefault((module_name, name), getattr(module, name))
            setattr(module, name, getattr(ours, name))
            replaced.append(f"{module_name}.{name}")
    return replaced


def uninstall() -> list:
    """Put the official objects back where :func:`install` replaced them; returns those names."""
    restored = []
    for (module_name, name), original in list(_saved.items()):
        module = sys.modules.get(module_name)
        if module is not None:
            setattr(module, name, original)
            restored.append(f"{module_name}.{name}")
        del _saved[(module_name, name)]
    return restored


def _stand_in_for_pydensecrf() -> None:
    """The official ``crf.py`` imports pydensecrf: where it does not import (not installed, or a broken
    build), ``primaps_fast.pydensecrf`` takes its place in this process, and the runner says so."""
    try:
        importlib.import_module("pydensecrf.densecrf")
        importlib.import_module("pydensecrf.utils")
    except ImportError as exc:
        from primaps_fast import pydensecrf

        pydensecrf.install()
        print(f"primaps_fast.official: pydensecrf does not import ({exc}); primaps_fast.pydensecrf stands in "
              "for it", file=sys.stderr)


USAGE = "usage: python -m primaps_fast.official SCRIPT.py [ARGS...]   (e.g. train.py, test.py, demo.py)"


def main(argv=None) -> int:
    """The runner: install the replacements, then run ``SCRIPT.py`` as ``__main__`` with ``ARGS`` as
    ``python SCRIPT.py ARGS`` would (``sys.argv``, the script's folder first on ``sys.path``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    script = argv[0]
    if not os.path.isfile(script):
        print(f"primaps_fast.official: script: no such file: {script!r}\n{USAGE}", file=sys.stderr)
        return 2
    sys.argv = [script, *argv[1:]]
    if not getattr(sys.flags, "safe_path", False):  # -P / PYTHONSAFEPATH (3.11+): no script folder either
        # `python -m` put the working directory first; `python script.py` puts the script's folder there.
        folder = os.path.dirname(os.path.realpath(script))
        if sys.path and sys.path[0] == os.getcwd():
            sys.path[0] = folder
        else:
            sys.path.insert(0, folder)
    _stand_in_for_pydensecrf()
    replaced = install()
    print("primaps_fast.official: replaced " + (", ".join(replaced) if replaced else
          "nothing (no official primaps_modules importable from the script's folder)"), file=sys.stderr)
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    # Run through the imported module, so the replacements are primaps_fast.official.* (picklable by
    # name) and not objects of this __main__ copy, which the script's __main__ then replaces.
    from primaps_fast.official import main as _main

    sys.exit(_main())
