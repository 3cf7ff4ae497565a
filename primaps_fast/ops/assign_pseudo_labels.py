"""E-step of PriMaPs-EM: majority class of every pseudo mask (official ``training_step`` loop)."""
from __future__ import annotations

import torch

from primaps_fast import _dispatch

# Above this many ids (or more ids than pixels), ids are renumbered densely before the kernels, which
# keep one table slot per possible id.
_MAX_DIRECT_IDS = 1 << 16


def check_logits(logits: torch.Tensor, name: str = "logits") -> None:
    """``logits``: finite float ``(B, K, h, w)`` with ``K >= 2`` (shared with focal_loss)."""
    _dispatch.check_tensor(logits, name, ndim=4, floating=True, finite=True)
    if logits.shape[1] < 2:
        raise ValueError(f"{name}: expected at least 2 classes (dim 1), got shape {tuple(logits.shape)}")


def check_labels(labels: torch.Tensor, logits: torch.Tensor, name: str, ignore_index: int, *,
                 values: bool = True):
    """``labels``: integer ``(B, H, W)`` matching the batch of ``logits``, no negative ids but ``ignore_index``
    (that value check only with ``values``: ``check_label_values``, whose largest id it returns)."""
    _dispatch.check_tensor(labels, name, ndim=3, integer=True)
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"{name}: batch size {labels.shape[0]} does not match logits batch size "
                         f"{logits.shape[0]}")
    if labels.device != logits.device:
        raise ValueError(f"{name}: on {labels.device}, but logits are on {logits.device}")
    _dispatch.check_int(ignore_index, "ignore_index")
    return check_label_values(labels, name, ignore_index) if values else None


def check_label_values(labels: torch.Tensor, name: str, ignore_index: int) -> int:
    """No negative id in ``labels`` but ``ignore_index``; returns the largest id (-1 if empty). One min/max
    pass over ``labels``, and a second one only when a negative value is there."""
    if labels.numel() == 0:
        return -1
    lo, hi = (int(v) for v in torch.stack(torch.aminmax(labels)).tolist())
    if lo >= 0:
        return hi
    negative = labels < 0
    if ignore_index < 0:
        negative &= labels != ignore_index
    if bool(negative.any()):
        raise ValueError(f"{name}: negative ids (other than ignore_index={ignore_index}) are not allowed")
    return hi


def direct_ids(mask_ids: torch.Tensor) -> int:
    """The most ids the kernels take as they are in ``(B, H, W)`` ``mask_ids`` (a table slot per id)."""
    return max(_MAX_DIRECT_IDS, mask_ids[0].numel())


def dense_ids(mask_ids: torch.Tensor, ignore_index: int, max_id: int):
    """``(ids, ignore, num_ids)``: int64 ids in ``[0, num_ids)`` at every pixel not equal to ``ignore``, from
    ``mask_ids`` whose largest value is ``max_id``.

    Ids are used as they are when small; otherwise they are renumbered per batch (``torch.unique``) and
    unassigned pixels get ``-1``.
    """
    ids = mask_ids.to(torch.int64).contiguous()
    num_ids = max_id + 1
    if num_ids <= direct_ids(ids):
        return ids, ignore_index, max(num_ids, 1)
    keep = ids != ignore_index
    uniq, inverse = torch.unique(ids[keep], return_inverse=True)
    out = torch.full_like(ids, -1)
    out[keep] = inverse
    return out, -1, max(int(uniq.numel()), 1)


@torch.library.custom_op("primaps_fast::assign_pseudo_labels", mutates_args=(), device_types="cpu")
def _assign_pseudo_labels_op(logits: torch.Tensor, ids: torch.Tensor, num_ids: int, ignore: int,
                             ignore_class: int) -> torch.Tensor:
    """The custom op; this is its C++ kernel: float32 ``(B, K, h, w)`` logits, int64 ``(B, H, W)`` ids in
    ``[0, num_ids)`` or ``ignore`` -> int64 ``(B, H, W)`` majority classes (``ignore`` where the id is
    ``ignore``), the votes for class ``ignore_class`` not counted (``ignore_class`` for a mask without
    votes: the official loop drops the votes equal to its ignore label). The C++ kernel raises
    ``ValueError`` for a negative id other than ``ignore`` and ``IndexError`` for one ``>= num_ids``."""
    out = torch.empty_like(ids)
    _dispatch.cpp().assign_pseudo_labels(logits.numpy(), ids.numpy(), out.numpy(), num_ids, ignore, ignore_class,
                                         _dispatch.num_threads())
    return out


@_assign_pseudo_labels_op.register_fake
def _(logits, ids, num_ids, ignore, ignore_class):
    return torch.empty_like(ids)


if _dispatch.cuda_available():
    from primaps_fast.cuda.assign_pseudo_labels import assign_pseudo_labels_cuda

    _assign_pseudo_labels_op.register_kernel("cuda")(assign_pseudo_labels_cuda)


_dispatch.skip_dynamo_import(_assign_pseudo_labels_op)


def assign_pseudo_labels(logits: torch.Tensor, mask_ids: torch.Tensor, *, ignore_index: int = 255,
                         backend: str | None = None) -> torch.Tensor:
    """Majority class of every pseudo mask under the argmax of the bilinearly upsampled scores.

    Args:
        logits: float ``(B, K, h, w)``, ``K >= 2``, finite: class scores at feature resolution (e.g. the
            EMA head's 1x1 conv of the features; the conv commutes with the upsampling, docs/design.md).
            The C++ and Triton backends compute in float32.
        mask_ids: integer ``(B, H, W)``: pseudo-mask id of every pixel, ``ignore_index`` for pixels in
            no mask; other ids must be >= 0 (any size: large ids are renumbered).
        ignore_index: id of unassigned pixels (an int64), written to them in the output.
        backend: None (C++ on CPU; CUDA C++ or Triton on CUDA), "cpu", "cuda", "triton" or "reference".

    Returns:
        int64 ``(B, H, W)`` on the device of ``logits``: for each image and each mask id
        ``m != ignore_index``, the class that wins the most pixels of
        ``argmax_k F.interpolate(logits, (H, W), mode="bilinear", align_corners=False)`` inside the
        mask, written to every pixel of the mask; ``ignore_index`` elsewhere. Ties between classes go
        to the smallest class id (what the official ``torch.mode`` does on CPU); ties in the
        per-pixel argmax go to the first class. As in the official loop, pixels whose class equals
        ``ignore_index`` (when it is a class id, e.g. 0) do not vote, and a mask without votes keeps
        ``ignore_index``. The C++ and Triton backends never materialise the ``(B, K, H, W)`` upsampled
        scores; they upsample in float32 without FMA, so a pixel whose top two upsampled scores agree to
        float32 rounding may take the other class than PyTorch's kernel.
    """
    check_logits(logits)
    check_labels(mask_ids, logits, "mask_ids", ignore_index, values=False)
    backend = _dispatch.choose_backend(backend, logits, mask_ids)
    if backend == "reference":
        check_label_values(mask_ids, "mask_ids", ignore_index)
        return _dispatch.reference("assign_pseudo_labels")(logits, mask_ids, ignore_index=ignore_index)
    x = logits.detach().to(torch.float32).contiguous()
    kernel = _dispatch.kernel("assign_pseudo_labels", backend)
    if backend == "cpu":  # the C++ kernel checks the ids as it reads them, with check_label_values' message
        ids = mask_ids.to(torch.int64).contiguous()
        try:
            return kernel(x, ids, direct_ids(ids), ignore_index, ignore_index)
        except IndexError:  # an id beyond its table: renumbered below
            pass
    max_id = check_label_values(mask_ids, "mask_ids", ignore_index)
    ids, ignore, num_ids = dense_ids(mask_ids, ignore_index, max_id)
    out = kernel(x, ids, num_ids, ignore, ignore_index)
    if ignore != ignore_index:
        out[ids == ignore] = ignore_index
    return out
