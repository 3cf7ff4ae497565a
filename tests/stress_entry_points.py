"""Stress the nine public entry points with random and edge-case inputs, each case in its own process.

    python tests/stress_entry_points.py --cases 40 --seed 0            # 40 cases per entry point
    python tests/stress_entry_points.py --entry dense_crf --show unclear --cases 100

Not collected by pytest (it takes minutes). The parent imports torch and the package once and forks a
child per case (it never runs a tensor op itself, so forking is safe with OpenMP); a child that dies on a
signal, exceeds ``--timeout`` or its address-space limit counts as a crash. Each outcome is classified:

- correct: a result that passes the entry point's checks (shapes, dtypes, ranges, finiteness; and,
  where the reference is exact and cheap, agreement with ``backend="reference"``);
- clear error: ``ValueError``/``TypeError`` whose message starts with the name of one of the entry
  point's arguments (``name:``, ``name[i]:``, ``a/b:`` or ``name=...``);
- unclear error: any other exception (pybind11's "incompatible function arguments", internal names...);
- wrong: a result that fails the checks (e.g. a silent NaN);
- crash: a signal, a timeout (a hang, e.g. 10**9 iterations) or the memory limit.

Set ``PYTHONPATH`` to another checkout to stress that one (e.g. the code before a fix).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import resource
import signal
import sys
import time
import traceback
import zlib

import torch

import primaps_fast

ENTRY_ARGS = {
    "principal_masks": {"features", "threshold", "stop_fraction", "max_masks", "backend"},
    "median_filter": {"masks", "backend"},
    "pseudo_labels": {"images", "features", "threshold", "ignore_index", "crf", "crf_iterations", "backend"},
    "dense_crf": {"images", "logits", "iterations", "pos_sxy", "pos_compat", "bi_sxy", "bi_srgb", "bi_compat",
                  "backend"},
    "dense_crf_list": {"images", "probs", "iterations", "pos_sxy", "pos_compat", "bi_sxy", "bi_srgb",
                       "bi_compat", "backend"},
    "assign_pseudo_labels": {"logits", "mask_ids", "ignore_index", "backend"},
    "focal_loss": {"logits", "target", "gamma", "ignore_index", "backend"},
    "PriMaPsEM": {"num_classes", "dim", "lr", "ema_decay", "ema_every", "focal_gamma", "ignore_index", "seed",
                  "device", "backend", "prototypes", "features", "mask_ids", "student_features", "size",
                  "epochs", "batch_size", "use_ema", "sd", "batches", "loader"},
    "UnsupervisedMetrics": {"num_classes", "extra_clusters", "hungarian", "preds", "target"},
}


# ----------------------------------------------------------------------------- input generation
def _dim(r: random.Random, typical: int) -> int:
    x = r.random()
    if x < 0.03:
        return 0
    if x < 0.15:
        return 1
    if x < 0.35:
        return r.choice([2, 3, 5, 7, 9])
    return typical


def _values(r, shape, dtype, kind, gen):
    if dtype.is_floating_point:
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        special = {"zeros": 0.0, "nan": math.nan, "inf": math.inf, "-inf": -math.inf,
                   "huge": 1e300 if dtype == torch.float64 else 3e38, "denormal": 1e-42}
        if kind == "const":
            x = torch.full(shape, 0.7, dtype=torch.float64)
        elif kind == "zeros":
            x = torch.zeros(shape, dtype=torch.float64)
        elif kind in ("huge", "denormal"):
            x = x.sign() * special[kind] * (1 + x.abs())
        elif kind in ("nan", "inf", "-inf") and x.numel():
            x.view(-1)[r.randrange(x.numel())] = special[kind]
        elif kind == "big":
            x = x * 1e15
        return x.to(dtype)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) < 0.5
    return torch.randint(0, 7, shape, generator=gen).to(dtype)


def tensor(r: random.Random, gen, shape, dtype=torch.float32, *, kind=None, edge=0.15, values=None):
    """A tensor of ``shape``: with probability ``edge`` an edge dtype / value kind / layout / device."""
    if r.random() < edge:
        dtype = r.choice([torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool,
                          dtype])
    if kind is None:
        kind = r.choice(["nan", "inf", "-inf", "huge", "denormal", "zeros", "const", "big"]) \
            if r.random() < edge else "normal"
    x = values if values is not None else _values(r, shape, dtype, kind, gen)
    layout = r.random()
    if layout < edge / 2 and x.dim() >= 2:  # non-contiguous: a strided view of the same values
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
        if x.is_contiguous() and x.numel() > 1:
            x = torch.stack([x, x], -1)[..., 0]
    elif layout < edge and x.dim() >= 1 and x.shape[0] >= 1:  # expanded: stride 0 along dim 0
        x = x[:1].expand(x.shape)
    if r.random() < 0.03:
        x = x.to("meta")
    return x


def pick(r, good, bad, p=0.12):
    """``good`` (a value or a callable) with probability 1 - p, else one of ``bad``."""
    if bad and r.random() < p:
        return r.choice(bad)
    return good() if callable(good) else good


BAD_INTS = [0, -1, 2 ** 63, -(2 ** 63) - 1, 2 ** 64, 1.5, math.inf, math.nan, "3", True, None]
BAD_FLOATS = [0.0, -1.0, math.nan, math.inf, -math.inf, 1e-300, 1e300, "0.4", None, True]


# ----------------------------------------------------------------------------- checks of results
def _finite(x):
    return bool(torch.isfinite(x).all())


def same_state(a, b) -> bool:
    """Two state dicts (nested dicts of tensors and numbers) hold the same values."""
    if isinstance(a, dict):
        return isinstance(b, dict) and sorted(map(str, a)) == sorted(map(str, b)) and all(
            same_state(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return type(a) is type(b) and a == b


def _close(a, b, rtol, atol):
    return a.shape == b.shape and bool(torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol))


def _reference_or_none(fn):
    try:
        return fn()
    except Exception:
        return None


# ----------------------------------------------------------------------------- cases per entry point
def case_principal_masks(r, gen):
    B, C, h, w = r.choice([1, 2, 3]), _dim(r, r.choice([4, 8, 16])), _dim(r, 6), _dim(r, 5)
    shape = (C, h, w) if r.random() < 0.2 else (B, C, h, w)
    f = pick(r, lambda: tensor(r, gen, shape), [[1.0], None, torch.zeros(2, 2)], p=0.05)
    kw = dict(threshold=pick(r, lambda: r.choice([0.4, r.uniform(0.05, 1)]), BAD_FLOATS + [1.5, 0]),
              stop_fraction=pick(r, lambda: r.choice([0.95, r.uniform(0.05, 1)]), BAD_FLOATS),
              max_masks=pick(r, lambda: r.choice([None, 1, 3]), BAD_INTS))

    def call():
        return primaps_fast.principal_masks(f, **kw)

    def check(out):
        masks, counts = out
        if masks.dtype != torch.float32 or counts.dtype != torch.int64 or masks.dim() != 4:
            return "dtype/rank"
        if not _finite(masks) or masks.min() < 0 or masks.max() > 1:
            return "values outside [0, 1]"
        if bool(((masks > 0).sum(1) > 1).any()):
            return "proposals overlap"
        for b in range(masks.shape[0]):
            n = int(counts[b])
            if bool(masks[b, n:].ne(0).any()) or any(float(masks[b, i].max()) != 1.0 for i in range(n)):
                return "rows beyond counts not zero, or a proposal without its anchor"
        return None

    return call, check, {"shape": list(getattr(f, "shape", [])), **{k: repr(v) for k, v in kw.items()}}


def case_median_filter(r, gen):
    nd = r.choice([2, 3, 4, 4, 5, 1])
    shape = tuple(_dim(r, r.choice([2, 5, 8])) for _ in range(nd))
    m = tensor(r, gen, shape)

    def call():
        return primaps_fast.median_filter(m)

    def check(out):
        if out.dtype != torch.float32 or out.shape != m.shape or not _finite(out):
            return "dtype/shape/finite"
        ref = _reference_or_none(lambda: primaps_fast.median_filter(m, backend="reference"))
        if ref is not None and not torch.equal(ref.float(), out):
            return "differs from the reference"
        return None

    return call, check, {"shape": list(shape), "dtype": str(m.dtype)}


def _images(r, gen, B, H, W, float_ok=True):
    if float_ok and r.random() < 0.3:
        return tensor(r, gen, (B, 3, H, W))
    return tensor(r, gen, (B, 3, H, W), torch.uint8, values=torch.randint(0, 256, (B, 3, H, W), generator=gen,
                                                                        dtype=torch.uint8))


def case_pseudo_labels(r, gen):
    B, C, h, w, s = r.choice([1, 2]), r.choice([3, 8]), _dim(r, 4), _dim(r, 5), r.choice([1, 2, 4])
    images = _images(r, gen, B, _dim(r, h * s), w * s)
    features = tensor(r, gen, (B, C, h, w))
    kw = dict(threshold=pick(r, 0.4, BAD_FLOATS), ignore_index=pick(r, lambda: r.choice([255, 0, -1]),
                                                                     BAD_INTS + [1, 2 ** 31]),
              crf=r.random() < 0.6, crf_iterations=pick(r, lambda: r.choice([1, 3]), BAD_INTS + [10 ** 9]))

    def call():
        return primaps_fast.pseudo_labels(images, features, **kw)

    def check(out):
        if out.dtype != torch.int64 or tuple(out.shape) != (B, images.shape[2], images.shape[3]):
            return "dtype/shape"
        ok = (out == kw["ignore_index"]) | ((out >= 1) & (out <= h * w))
        return None if bool(ok.all()) else "ids outside 1..M and ignore_index"

    return call, check, {"images": [list(images.shape), str(images.dtype)], "features": list(features.shape),
                         **{k: repr(v) for k, v in kw.items()}}


def _crf_params(r):
    kw = {}
    for name, good in (("iterations", lambda: r.choice([0, 1, 5])), ("pos_sxy", 1.0), ("pos_compat", 3.0),
                       ("bi_sxy", lambda: r.choice([67.0, 5.0])), ("bi_srgb", lambda: r.choice([3.0, 13.0])),
                       ("bi_compat", 4.0)):
        bad = BAD_INTS + [10 ** 9] if name == "iterations" else BAD_FLOATS + [1e-6, 1e-9]
        if r.random() < 0.5:
            kw[name] = pick(r, good, bad, p=0.15)
    return kw


def _marginals_ok(q, L, H, W):
    return (q.dtype == torch.float32 and tuple(q.shape) == (L, H, W) and _finite(q) and q.min() >= 0
            and q.max() <= 1.0001 and bool((q.sum(0) - 1).abs().max() < 1e-3))


def case_dense_crf(r, gen):
    B, L, H, W = r.choice([1, 2]), _dim(r, r.choice([2, 3, 5, 37, 300])), _dim(r, 7), _dim(r, 9)
    small = r.random() < 0.5
    h, w = (max(1, H // 2), max(1, W // 2)) if small else (H, W)
    images = _images(r, gen, B, H, W, float_ok=r.random() < 0.1)
    logits = tensor(r, gen, (B, L, h, w), r.choice([torch.float32, torch.float64]))
    kw = _crf_params(r)

    def call():
        return primaps_fast.dense_crf(images, logits, **kw)

    def check(out):
        if tuple(out.shape) != (B, L, H, W) or not all(_marginals_ok(q, L, H, W) for q in out):
            return "not marginals of shape (B, L, H, W)"
        ref = _reference_or_none(lambda: primaps_fast.dense_crf(images, logits, backend="reference", **kw))
        if ref is not None and not _close(ref, out, 1e-3, 1e-3):
            return "differs from the reference"
        return None

    return call, check, {"images": list(images.shape), "logits": [list(logits.shape), str(logits.dtype)],
                         **{k: repr(v) for k, v in kw.items()}}


def case_dense_crf_list(r, gen):
    B, H, W = r.choice([1, 2, 3]), _dim(r, 6), _dim(r, 7)
    images = _images(r, gen, B, H, W, float_ok=False)
    Ls = [_dim(r, r.choice([1, 2, 4, 33, 260])) for _ in range(B)]
    probs = []
    for L in Ls:
        p = torch.softmax(torch.randn(L, H, W, generator=gen), 0)
        probs.append(tensor(r, gen, p.shape, values=p) if r.random() < 0.85 else tensor(r, gen, (L, H, W)))
    if r.random() < 0.08:
        probs = r.choice([probs[:-1], torch.stack(probs) if len(set(Ls)) == 1 else probs, tuple(probs), None])
    kw = _crf_params(r)

    def call():
        return primaps_fast.dense_crf_list(images, probs, **kw)

    def check(out):
        if len(out) != B or not all(_marginals_ok(q, p.shape[0], H, W) for q, p in zip(out, probs)):
            return "not a list of marginals"
        ref = _reference_or_none(lambda: primaps_fast.dense_crf_list(images, probs, backend="reference", **kw))
        if ref is not None and not all(_close(a, b, 1e-3, 1e-3) for a, b in zip(ref, out)):
            return "differs from the reference"
        return None

    return call, check, {"images": list(images.shape), "L": Ls, **{k: repr(v) for k, v in kw.items()}}


def _ids(r, gen, shape, hi):
    ids = torch.randint(0, hi, shape, generator=gen)
    x = r.random()
    if x < 0.1:
        ids = ids * 2 ** 40
    elif x < 0.15:
        ids = ids - 3
    elif x < 0.2:
        ids = torch.full(shape, 255)
    if r.random() < 0.3 and ids.numel():
        ids.view(-1)[:: max(1, ids.numel() // 5)] = 255
    return tensor(r, gen, shape, torch.int64, values=ids, edge=0.1)


def case_assign_pseudo_labels(r, gen):
    B, K, h, w, s = r.choice([1, 2, 3]), _dim(r, r.choice([2, 5])), _dim(r, 4), _dim(r, 5), r.choice([1, 2, 3])
    logits = tensor(r, gen, (B, K, h, w))
    ids = _ids(r, gen, (pick(r, B, [B + 1], 0.05), h * s, w * s), 6)
    kw = dict(ignore_index=pick(r, 255, BAD_INTS + [-1, 3]))

    def call():
        return primaps_fast.assign_pseudo_labels(logits, ids, **kw)

    def check(out):
        if out.dtype != torch.int64 or out.shape != ids.shape:
            return "dtype/shape"
        ig = kw["ignore_index"]
        if not bool(((out == ig) | ((out >= 0) & (out < K))).all()) or not bool(((ids == ig) == (out == ig)).all()):
            return "labels out of range"
        ref = _reference_or_none(lambda: primaps_fast.assign_pseudo_labels(logits, ids, backend="reference", **kw))
        if ref is not None and float((ref != out).float().mean()) > 0.02:
            return "differs from the reference"
        return None

    return call, check, {"logits": [list(logits.shape), str(logits.dtype)], "mask_ids": list(ids.shape),
                         **{k: repr(v) for k, v in kw.items()}}


def case_focal_loss(r, gen):
    B, K, h, w, s = r.choice([1, 2]), _dim(r, r.choice([2, 4])), _dim(r, 4), _dim(r, 3), r.choice([1, 2, 4])
    grad = r.random() < 0.95
    logits = tensor(r, gen, (B, K, h, w))
    if grad and r.random() < 0.5 and logits.is_floating_point():
        logits.requires_grad_(True)
    target = _ids(r, gen, (B, h * s, w * s), max(K, 1))
    kw = dict(gamma=pick(r, lambda: r.choice([2.0, 0.0, 0.5]), BAD_FLOATS + [-1.0, -0.5, 1e308]),
              ignore_index=pick(r, 255, BAD_INTS + [-1]))

    def call():
        loss = primaps_fast.focal_loss(logits, target, **kw)
        if loss.requires_grad:
            loss.backward()
        return loss

    def check(out):
        if out.dim() != 0 or not _finite(out):
            return "not a finite scalar"
        if logits.grad is not None and not _finite(logits.grad):
            return "non-finite gradient"
        ref = _reference_or_none(lambda: primaps_fast.focal_loss(logits.detach(), target, backend="reference", **kw))
        if ref is not None and torch.isfinite(ref) and not _close(ref, out.detach(), 1e-3, 1e-5):
            return "differs from the reference"
        return None

    return call, check, {"logits": [list(logits.shape), str(logits.dtype)], "target": list(target.shape),
                         **{k: repr(v) for k, v in kw.items()}}


def case_em(r, gen):
    from primaps_fast import PriMaPsEM

    K, C = pick(r, lambda: r.choice([2, 3, 5]), [1, 0, 2 ** 63, 2.0]), pick(r, lambda: r.choice([4, 8]), [0, -1])
    ctor = {name: pick(r, good, bad, p=0.1) for name, good, bad in (
        ("lr", 5e-3, BAD_FLOATS), ("ema_decay", 0.98, BAD_FLOATS + [1.5]), ("ema_every", 2, BAD_INTS),
        ("focal_gamma", 2.0, BAD_FLOATS + [-1.0]), ("ignore_index", 255, BAD_INTS + [-1]),
        ("seed", 0, BAD_INTS + [2 ** 63 - 1, -5]), ("device", None, ["meta", "cuda", "xpu", "bogus"]),
        ("backend", None, ["gpu", 3]))}
    method = r.choice(["step", "step", "predict", "init_pca", "init_kmeans", "scores", "load_state_dict", "ctor"])
    Kc, Cc = (K if isinstance(K, int) and 1 < K < 100 else 3), (C if isinstance(C, int) and C > 0 else 4)
    B, h, s = r.choice([1, 2]), _dim(r, 4), r.choice([1, 2])
    feats = tensor(r, gen, (B, pick(r, Cc, [Cc + 1], 0.05), h, h))
    extra = {}

    def call():
        em = PriMaPsEM(K, C, **ctor)
        if method == "step":
            ids = _ids(r, gen, (B, h * s, h * s), 4)
            student = tensor(r, gen, feats.shape) if r.random() < 0.3 else None
            out = em.step(feats, ids, student)
            return [em.v.detach(), em.g.detach(), em.ema_v, torch.tensor(out["loss"]), out["labels"]]
        if method == "predict":
            size = pick(r, lambda: r.choice([None, (h * s, h * s), 5]), [(0, 3), (10 ** 5, 10 ** 5), (2 ** 40, 1),
                                                                          "a", (1.5, 2)], p=0.3)
            extra["size"] = repr(size)
            return [em.predict(feats, size=size)]
        if method == "scores":
            return [em.scores(feats)]
        if method == "init_pca":
            return [em.init_pca(feats)]
        if method == "init_kmeans":
            epochs = pick(r, 1, BAD_INTS, p=0.3)
            extra["epochs"] = repr(epochs)
            return [em.init_kmeans(feats, epochs=epochs)]
        if method == "load_state_dict":
            sd = em.state_dict()
            em.step(torch.randn(1, Cc, 2, 2, generator=gen), torch.zeros(1, 2, 2, dtype=torch.int64))
            sd = em.state_dict()
            victim = r.choice(sorted(sd))
            x = r.random()
            if x < 0.35:
                extra["dropped"] = victim
                del sd[victim]
            elif x < 0.7:  # a hostile value in place of an entry (or of an entry of Adam's state)
                holder = sd
                if victim == "adam" and sd["adam"] and r.random() < 0.7:
                    holder = sd["adam"][r.choice(sorted(sd["adam"]))]
                    victim = r.choice(sorted(holder))
                value = r.choice(BAD_INTS + BAD_FLOATS + ["abc", 2 ** 70, torch.tensor(math.nan),
                                                           torch.full((Kc,), math.inf), torch.zeros(Kc, Cc),
                                                           torch.ones(Kc, Cc).double(), torch.ones(Cc, Kc)])
                extra["replaced"] = f"{victim}={value!r:.40}"
                holder[victim] = value
            em2 = PriMaPsEM(K, C, **ctor)
            before = em2.state_dict()
            try:
                em2.load_state_dict(sd)
            except ValueError:
                if not same_state(em2.state_dict(), before):
                    raise AssertionError("load_state_dict changed the model before it refused an entry")
                raise
            em2.step(torch.randn(1, Cc, 2, 2, generator=gen), torch.zeros(1, 2, 2, dtype=torch.int64))
            return [em2.v.detach(), em2.g.detach(), em2.weight(), em2.weight(ema=True)]
        return [em.weight()]

    def check(out):
        for t in out:
            if t.is_floating_point() and not _finite(t):
                return "non-finite result"
            if not t.is_floating_point() and t.numel() and (t.min() < 0 or t.max() >= Kc) and \
                    not bool((t == ctor["ignore_index"]).any()):
                return "class ids out of range"
        return None

    return call, check, {"method": method, "K": repr(K), "C": repr(C), "shape": list(feats.shape),
                         **{k: repr(v) for k, v in ctor.items() if v not in (None,)}, **extra}


def case_metrics(r, gen):
    from primaps_fast import UnsupervisedMetrics

    K = pick(r, lambda: r.choice([2, 3, 27]), [1, 0, 20000, 100000, 2 ** 40, 2.0, None], p=0.15)
    E = pick(r, 0, [1, 3, -1, 10 ** 6], p=0.15)
    Kc = K if isinstance(K, int) and 1 < K < 100 else 3
    n = _dim(r, 50)
    preds = tensor(r, gen, (n,), torch.int64, values=torch.randint(0, Kc, (n,), generator=gen), edge=0.1)
    tgt = torch.randint(0, Kc + 2, (n,), generator=gen)
    if r.random() < 0.2:
        tgt = torch.full((n,), 255)
    target = tensor(r, gen, (n,), torch.int64, values=tgt, edge=0.1)

    def call():
        m = UnsupervisedMetrics(K, E)
        m.update(preds, target)
        return m.compute()

    def check(out):
        if not (0 <= out["mIoU"] <= 100 and 0 <= out["Accuracy"] <= 100):
            return f"mIoU/Accuracy not in [0, 100]: {out['mIoU']}, {out['Accuracy']}"
        return None

    return call, check, {"num_classes": repr(K), "extra_clusters": repr(E), "n": n,
                         "preds": str(preds.dtype), "target": str(target.dtype)}


CASES = {"principal_masks": case_principal_masks, "median_filter": case_median_filter,
         "pseudo_labels": case_pseudo_labels, "dense_crf": case_dense_crf, "dense_crf_list": case_dense_crf_list,
         "assign_pseudo_labels": case_assign_pseudo_labels, "focal_loss": case_focal_loss,
         "PriMaPsEM": case_em, "UnsupervisedMetrics": case_metrics}


# ----------------------------------------------------------------------------- classification
_NAME = re.compile(r"^([A-Za-z_][\w\[\]]*(?:/[A-Za-z_][\w\[\]]*)*)(=\S*)?:?")


def clear_error(exc: BaseException, names) -> bool:
    """ValueError/TypeError whose message starts with argument name(s) among ``names``: ``name: ...``,
    ``name[i]: ...``, ``a/b: ...`` or ``name=...``."""
    if not isinstance(exc, (ValueError, TypeError)):
        return False
    msg = str(exc)
    m = _NAME.match(msg)
    if not m or (m.group(2) is None and not msg[m.end() - 1:].startswith(":")):
        return False
    return all(re.sub(r"\[.*?\]", "", part) in names for part in m.group(1).split("/"))


def run_child(entry: str, seed: int, write_fd: int, mem_limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))
    r = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    result = {"entry": entry, "seed": seed}
    try:
        call, check, desc = CASES[entry](r, gen)
        result["case"] = desc
        out = call()
        problem = check(out)
        result["outcome"] = "correct" if problem is None else "wrong"
        if problem:
            result["detail"] = problem
    except BaseException as exc:  # noqa: BLE001 - every outcome is classified
        result["outcome"] = "clear" if clear_error(exc, ENTRY_ARGS[entry]) else "unclear"
        result["detail"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        if result["outcome"] == "unclear":
            result["where"] = traceback.format_exc(limit=-2)[-600:]
    data = json.dumps(result, default=str).encode()
    os.write(write_fd, data)
    os.close(write_fd)


def run_case(entry: str, seed: int, timeout: float, mem_limit: int) -> dict:
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(rfd)
        code = 0
        try:
            run_child(entry, seed, wfd, mem_limit)
        except BaseException:  # noqa: BLE001
            code = 1
        os._exit(code)
    os.close(wfd)
    start = time.monotonic()
    chunks, status = [], None
    os.set_blocking(rfd, False)
    while True:
        try:
            data = os.read(rfd, 1 << 16)
            if data:
                chunks.append(data)
        except BlockingIOError:
            pass
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - start > timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = "timeout"
            break
        time.sleep(0.02)
    try:
        while True:
            data = os.read(rfd, 1 << 16)
            if not data:
                break
            chunks.append(data)
    except BlockingIOError:
        pass
    os.close(rfd)
    seconds = round(time.monotonic() - start, 2)
    if status == "timeout":
        return {"entry": entry, "seed": seed, "outcome": "crash", "detail": f"timeout after {timeout} s",
                "seconds": seconds}
    if chunks and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        res = json.loads(b"".join(chunks))
        res["seconds"] = seconds
        return res
    how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
    return {"entry": entry, "seed": seed, "outcome": "crash", "detail": how, "seconds": seconds}


COLUMNS = ["correct", "clear", "unclear", "wrong", "crash"]


def table(results) -> str:
    rows = []
    for entry in CASES:
        rs = [x for x in results if x["entry"] == entry]
        if rs:
            rows.append([entry, len(rs)] + [sum(x["outcome"] == c for x in rs) for c in COLUMNS])
    total = ["total", sum(r[1] for r in rows)] + [sum(r[i] for r in rows) for i in range(2, 2 + len(COLUMNS))]
    head = ["entry point", "cases", "correct", "clear errors", "unclear errors", "wrong results", "crashes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows + [total]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=40, help="cases per entry point")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--entry", action="append", choices=sorted(CASES), help="only these entry points")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per case before it counts as a hang")
    p.add_argument("--mem-gb", type=float, default=6.0, help="address-space limit of each case")
    p.add_argument("--show", action="append", default=[], choices=COLUMNS, help="print the cases of an outcome")
    p.add_argument("--jsonl", help="write every outcome to this file")
    args = p.parse_args(argv)
    # Imported once here, before forking, so that the children do not pay them (torch._dynamo: the first
    # custom-op call imports it in builds before the fix of issue 14). No tensor op runs in this process.
    import importlib

    for module in ("torch._dynamo", "primaps_fast.em", "primaps_fast.metrics", "primaps_fast.ops.dense_crf",
                   "primaps_fast.ops.pseudo_labels", "primaps_fast.reference", "scipy.optimize"):
        importlib.import_module(module)
    torch.set_num_threads(1)  # the machine is shared; results do not depend on it
    results = []
    for entry in args.entry or list(CASES):
        for i in range(args.cases):
            seed = zlib.crc32(f"{args.seed}/{entry}/{i}".encode())
            res = run_case(entry, seed, args.timeout, int(args.mem_gb * 2 ** 30))
            results.append(res)
            if res["outcome"] in args.show:
                print(json.dumps(res, default=str), flush=True)
    if args.jsonl:
        with open(args.jsonl, "w") as f:
            f.writelines(json.dumps(x, default=str) + "\n" for x in results)
    print(f"primaps_fast from {os.path.dirname(primaps_fast.__file__)}")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
