"""The PriMaPs-EM model (docs/api.md, "PriMaPs-EM"): PCA + cosine k-means initialisation, the EM step with a
weight-normalised 1x1 conv head, its EMA copy, Adam, the epoch loop, prediction and exact state dicts.
A training run around it (data, checkpoints, resume, history) is ``primaps_fast.train``.

Every step works at feature resolution: the 1x1 conv commutes with bilinear upsampling, so the class
scores (K channels) are computed on the ``(B, C, h, w)`` features and only ``primaps_fast.assign_pseudo_labels``
/ ``primaps_fast.focal_loss`` see the label size, without materialising upsampled ``C``-channel features
(the official code upsamples the features first; docs/design.md, "Where the time goes").

Deliberate differences from the official code: the PCA directions come from a deterministic symmetric
eigendecomposition of the feature covariance (the subspace of ``pca_lowrank(q=2K, niter=200)``), each
direction's sign fixed so that its largest-magnitude entry is positive.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import math
import os

import torch
import torch.nn.functional as F

from primaps_fast._dispatch import (BACKENDS, INT64_MAX, all_finite, check_device, check_int, check_memory,
                                    check_number, check_tensor, cpp, num_threads)
from primaps_fast.progress import progress

_STATE_VERSION = 1
_STATE_KEYS = ("num_classes", "dim", "g", "v", "ema_g", "ema_v", "global_step", "ema_calls", "adam")
# the head has num_classes rows; the E-step kernel takes fewer than 2**24 classes
MAX_CLASSES = (1 << 24) - 1
# Adam moves every weight by up to about lr a step: 1e3 is far beyond any useful rate (official 5e-3), and
# a head trained with it for billions of steps stays far from float32 overflow (lr = 1e19 overflowed |v|
# in three steps). A step that still overflows is rolled back (PriMaPsEM.step).
MAX_LR = 1e3
_ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")


class NonFiniteUpdateError(FloatingPointError, ValueError):
    """A :meth:`PriMaPsEM.step` whose update would have made the head, its EMA copy or Adam's state
    non-finite; the step was rolled back. Its message starts with the cause (``lr``, ``features`` or
    ``student_features``). A ``FloatingPointError`` and, like every argument error here, a ``ValueError``."""


@functools.lru_cache(maxsize=None)
def _mkl_set_num_threads_local():
    """MKL's ``mkl_set_num_threads_local`` in torch's own MKL (exported by ``libtorch_cpu``), or None when
    torch was built without MKL or does not export it."""
    if not torch.backends.mkl.is_available():
        return None
    for path in sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "*torch_cpu.*"))):
        try:
            fn = ctypes.CDLL(path).MKL_Set_Num_Threads_Local
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        return fn
    return None


@contextlib.contextmanager
def deterministic_blas():
    """Run the block's MKL calls with one thread, in the calling thread only (MKL's thread-local setting
    ``mkl_set_num_threads_local``, restored on exit: torch's thread count and other threads are untouched).

    MKL's GEMM and LAPACK split their sums differently at different thread counts (e.g. at 2 threads for
    the head's ``(K, C) x (C, h*w)`` products), so results would differ in the last bits with
    ``torch.set_num_threads``; on one thread the summation order is fixed. Without MKL (torch builds for ARM
    or macOS) this does nothing, and results depend on that BLAS.
    """
    fn = _mkl_set_num_threads_local()
    if fn is None:
        yield
        return
    previous = fn(1)
    try:
        yield
    finally:
        fn(previous)


# The model's large products on the CPU are cut into tasks of at most _COLUMNS pixels (a cut that does not
# depend on the thread count), each a one-thread GEMM; the tasks run on the C++ kernels' threads
# (_dispatch.num_threads()) and partial sums are added in task order. So every result is the same at any
# thread count, and the products still use every core.
_COLUMNS = 4096


def _run(tasks: list) -> list:
    """The results of the zero-argument callables ``tasks``, in order, each run with one MKL thread, on the
    C++ kernels' threads (torch's own OpenMP threads: threads of our own would compete with them while
    they spin after a torch op)."""
    threads = num_threads()
    results = [None] * len(tasks)

    def call(i):
        with deterministic_blas():
            results[i] = tasks[i]()

    if threads <= 1 or len(tasks) <= 1:
        for i in range(len(tasks)):
            call(i)
    else:
        cpp().run_tasks(call, len(tasks), threads)
    return results


def _spans(batch: int, pixels: int) -> list:
    return [(b, c0, min(pixels, c0 + _COLUMNS)) for b in range(batch) for c0 in range(0, pixels, _COLUMNS)]


class _Scores(torch.autograd.Function):
    """``(K, C)`` weight x ``(B, C, P)`` features -> ``(B, K, P)`` on the CPU, by the fixed tasks of ``_run``;
    the weight's gradient is the sum of the tasks' partial products in task order."""

    @staticmethod
    def forward(ctx, weight, features):
        ctx.save_for_backward(weight, features)
        w, f = weight.detach(), features.detach()  # the tasks run in other threads (their own grad mode)
        out = f.new_empty(f.shape[0], w.shape[0], f.shape[2])

        def task(b, c0, c1):
            out[b, :, c0:c1] = torch.mm(w, f[b, :, c0:c1])

        _run([functools.partial(task, *span) for span in _spans(f.shape[0], f.shape[2])])
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, features = ctx.saved_tensors
        w, f, g = weight.detach(), features.detach(), grad.detach().contiguous()
        spans = _spans(f.shape[0], f.shape[2])
        grad_w = grad_f = None
        if ctx.needs_input_grad[0]:
            grad_w = torch.zeros_like(w)
            for part in _run([functools.partial(lambda b, c0, c1: torch.mm(g[b, :, c0:c1], f[b, :, c0:c1].t()),
                                                *span) for span in spans]):
                grad_w += part
        if ctx.needs_input_grad[1]:
            grad_f = torch.empty_like(f)

            def task(b, c0, c1):
                grad_f[b, :, c0:c1] = torch.mm(w.t(), g[b, :, c0:c1])

            _run([functools.partial(task, *span) for span in spans])
        return grad_w, grad_f


def _weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return g[:, None] * v / v.norm(dim=1, keepdim=True)


def _scores(weight: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """1x1 conv without bias: ``(K, C)`` x ``(B, C, h, w)`` -> ``(B, K, h, w)`` (on the CPU by ``_Scores``, the
    same at any thread count)."""
    b, c, h, w = features.shape
    x = features.reshape(b, c, h * w)
    out = _Scores.apply(weight, x) if x.device.type == "cpu" else torch.matmul(weight, x)
    return out.reshape(b, weight.shape[0], h, w)


def _check_scores(scores: torch.Tensor, name: str) -> torch.Tensor:
    """Non-finite features always give non-finite scores (every head row is non-zero), so checking the
    K-channel scores replaces a pass over the C-channel features."""
    if not all_finite(scores):
        raise ValueError(f"{name}: contains NaN or Inf (or values so large that the class scores overflow)")
    return scores


def _norms_ok(v: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
    """0-d bool tensor (no host synchronisation): every row of ``(K, C)`` ``v`` has a finite, non-zero norm,
    so the weight norm ``g * v / |v|`` is defined (torch's float32 norm of a row of 1e-23 is 0, of 1e19
    inf), and, given ``g (K,)``, that weight is finite too (the norms computed once)."""
    norms = v.norm(dim=1, keepdim=True)
    ok = (torch.isfinite(norms) & (norms > 0)).all()
    return ok if g is None else ok & torch.isfinite(g[:, None] * v / norms).all()


def _fix_signs(directions: torch.Tensor) -> torch.Tensor:
    idx = directions.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(directions.gather(1, idx))
    sign[sign == 0] = 1
    return directions * sign


class PriMaPsEM:
    """PriMaPs-EM head ``theta_R`` (weight-normalised 1x1 conv without bias: ``g (K,)``, ``v (K, C)``),
    its EMA copy ``theta_M`` and the Adam optimiser.

    Args:
        num_classes: number of classes ``K`` (an int in ``[2, 2**24)``).
        dim: feature channels ``C`` (>= 1).
        lr: Adam learning rate of the head (official 5e-3), in ``(0, 1e3]``; also the k-means learning
            rate. Settable later (``em.lr = 1e-3``): the optimiser follows, its state is kept.
        ema_decay: EMA decay (official 0.98), with the official warm-up: the n-th EMA update copies the
            head for n <= 1 and otherwise uses decay ``min(ema_decay, 1 - 1/(n + 1))`` (the official
            ``ema.py`` with ``update_after_step=0``: its step counter is already n + 1 when the decay
            is computed, so the decays run 2/3, 3/4, ... up to ``ema_decay``).
        ema_every: after the Adam update of step ``k`` (counted from 0), the EMA is updated when
            ``k > 0 and k % ema_every == 0``.
        focal_gamma: exponent of the focal loss class weights (finite, >= 0).
        ignore_index: mask id / label of unassigned pixels (an int64).
        seed: seeds the random initial prototypes and the k-means batch order (an int64).
        device: device of the parameters (default CPU; CPU or CUDA).

    Training is identical at any ``torch.set_num_threads`` on the CPU: the matrix products are cut into
    tasks that do not depend on the thread count, each a one-thread MKL product (``_run``), and the
    eigendecomposition of the PCA runs on one MKL thread (:func:`deterministic_blas`).
        backend: kernel backend of the E-step and the loss (``assign_pseudo_labels``, ``focal_loss``):
            None (auto) or one of ``"cpu"``, ``"cuda"``, ``"triton"``, ``"reference"``.

    Data parallel: with ``em.sync = primaps_fast.distributed.data_parallel()`` (set by ``primaps_fast.train``
    under ``torchrun``), each rank passes its share of every global batch to :meth:`step` and the global
    data to the initialisations, which take their shares themselves; the batch statistics, the gradients
    and the sums are reduced across ranks, so every rank holds the same head, EMA copy and Adam state,
    equal (to float rounding) to one process running the global batches.
    """

    def __init__(self, num_classes: int, dim: int, *, lr: float = 5e-3, ema_decay: float = 0.98,
                 ema_every: int = 10, focal_gamma: float = 2.0, ignore_index: int = 255, seed: int = 0,
                 device=None, backend: str | None = None):
        check_int(num_classes, "num_classes", lo=2, hi=MAX_CLASSES)
        check_int(dim, "dim", lo=1)
        check_number(lr, "lr", lo=0.0, hi=MAX_LR, lo_open=True)
        ema_decay = check_number(ema_decay, "ema_decay", lo=0.0, hi=1.0)
        check_int(ema_every, "ema_every", lo=1)
        focal_gamma = check_number(focal_gamma, "focal_gamma", lo=0.0)
        check_int(ignore_index, "ignore_index")
        check_int(seed, "seed")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
        self.device = check_device(device if device is not None else "cpu", "device")
        # head, EMA copy, gradient and Adam's two moments: five (K, C) float32 tensors
        check_memory(5 * 4 * num_classes * dim, "num_classes", f"a head of {num_classes} x {dim} weights",
                     self.device)
        self.backend = backend
        self.sync = None  # data-parallel reductions (class docstring); not part of the state
        self.num_classes, self.dim = num_classes, dim
        self.lr = lr
        self.ema_decay, self.ema_every = ema_decay, ema_every
        self.focal_gamma, self.ignore_index, self.seed = focal_gamma, ignore_index, seed
        gen = torch.Generator().manual_seed(self.seed)
        self.init_prototypes(torch.randn(num_classes, dim, generator=gen))

    @property
    def lr(self) -> float:
        """Adam's learning rate; setting it (a number in ``(0, 1e3]``) also sets the optimiser's."""
        return self._lr

    @lr.setter
    def lr(self, value) -> None:
        self._lr = check_number(value, "lr", lo=0.0, hi=MAX_LR, lo_open=True)
        if hasattr(self, "optimizer"):
            for group in self.optimizer.param_groups:
                group["lr"] = self._lr

    # ------------------------------------------------------------------ initialisation
    def init_prototypes(self, prototypes: torch.Tensor) -> None:
        """Head from ``(K, C)`` prototypes: ``v = prototypes``, ``g = 1``, EMA copy = head; resets Adam
        and the step/EMA counters (the official checkpoint init)."""
        check_tensor(prototypes, "prototypes", ndim=2, floating=True, finite=True)
        if tuple(prototypes.shape) != (self.num_classes, self.dim):
            raise ValueError(f"prototypes: expected shape ({self.num_classes}, {self.dim}), "
                             f"got {tuple(prototypes.shape)}")
        if not bool(_norms_ok(prototypes.detach().float())):
            raise ValueError("prototypes: every row must have a non-zero, finite float32 norm (weight norm "
                             "divides by |v|)")
        v = prototypes.detach().float()
        g = torch.ones(self.num_classes)
        self._set_state(v, g, g, v, {}, 0, 0)

    def _set_state(self, v, g, ema_g, ema_v, adam: dict, global_step: int, ema_calls: int) -> None:
        """Replace the whole state at once (nothing is changed if building it fails): head ``v (K, C)``,
        ``g (K,)``, its EMA copy, Adam's state per parameter index (0: ``v``, 1: ``g``) and the counters."""
        v = v.detach().to(self.device, torch.float32).clone().requires_grad_(True)
        g = g.detach().to(self.device, torch.float32).clone().requires_grad_(True)
        optimizer = torch.optim.Adam([v, g], lr=self.lr)
        for p, st in zip((v, g), (adam.get(0), adam.get(1))):
            if st is not None:  # the step count stays a CPU tensor, as Adam keeps it
                optimizer.state[p] = {"step": st["step"].detach().to("cpu", torch.float32).clone(),
                                      "exp_avg": st["exp_avg"].detach().to(self.device, torch.float32).clone(),
                                      "exp_avg_sq": st["exp_avg_sq"].detach().to(self.device, torch.float32).clone()}
        self.v, self.g, self.optimizer = v, g, optimizer
        self.ema_g = ema_g.detach().to(self.device, torch.float32).clone()
        self.ema_v = ema_v.detach().to(self.device, torch.float32).clone()
        self.global_step, self.ema_calls = global_step, ema_calls

    def _feature_batches(self, features, name: str):
        if isinstance(features, torch.Tensor):
            batches = [features]
        else:
            batches = list(features)
        if not batches:
            raise ValueError(f"{name}: no feature batches (empty)")
        out = []
        for f in batches:
            f = check_tensor(f, name, ndim=4, floating=True, finite=True)
            if f.shape[1] != self.dim:
                raise ValueError(f"{name}: expected {self.dim} channels, got {f.shape[1]}")
            out.append(f.to(self.device, torch.float32))
        return out

    def init_pca(self, features, *, batch_size: int = 32) -> torch.Tensor:
        """Official PCA init from ``(N, C, h, w)`` features, an iterable of such batches, or rows (anything
        with ``len()`` and ``get_features(indices)``, such as a feature cache, read ``batch_size`` images at
        a time): the top-K principal directions of the centred pixel features (deterministic
        eigendecomposition of the covariance in float64; signs fixed so each direction's largest-magnitude
        entry is positive). Sets the head as ``init_prototypes`` would and returns the ``(K, C)`` directions."""
        n, s = 0, torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        ss = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)
        for f in self._pca_batches(features, batch_size):
            x = f.permute(1, 0, 2, 3).reshape(self.dim, -1).double()
            n += x.shape[1]
            s += x.sum(1)
            # x x^T as fixed column tasks added in order (_run): the same at any thread count
            for part in _run([functools.partial(lambda c0: x[:, c0:c0 + _COLUMNS] @ x[:, c0:c0 + _COLUMNS].t(), c0)
                              for c0 in range(0, x.shape[1], _COLUMNS)]):
                ss += part
        if self.sync is not None:
            n = self._sum_pca(n, s, ss)
        if n < 2:
            raise ValueError("features: PCA needs at least 2 pixels")
        mean = s / n
        cov = (ss - n * torch.outer(mean, mean)) / (n - 1)
        with deterministic_blas():  # LAPACK's threads would change the last bits
            _, vecs = torch.linalg.eigh(cov)
        k = min(self.num_classes, self.dim)
        directions = vecs[:, -k:].flip(1).t()
        if k < self.num_classes:
            raise ValueError(f"features: PCA gives at most dim={self.dim} directions, "
                             f"num_classes={self.num_classes} needed")
        protos = _fix_signs(directions).float()
        if self.sync is not None:  # identical on every rank even where eigh's last bits could differ
            self.sync.broadcast_([protos], "init: PCA directions")
        self.init_prototypes(protos)
        return protos

    def _pca_batches(self, features, batch_size: int):
        """The batches of ``init_pca``'s input that this rank sums (all of them in a single process; with
        ``sync``, its contiguous rows of a tensor or its round-robin share of the batches)."""
        from primaps_fast import distributed

        if hasattr(features, "get_features"):
            chunks = [range(i, min(i + batch_size, len(features))) for i in range(0, len(features), batch_size)]
            if not chunks:
                raise ValueError("features: no feature batches (empty)")
            for idx in (distributed.round_robin(chunks) if self.sync is not None else chunks):
                yield self._check_features(features.get_features(list(idx)), "features")
            return
        batches = self._feature_batches(features, "features")
        if self.sync is None:
            yield from batches
        elif isinstance(features, torch.Tensor):
            yield distributed.split(batches[0])
        else:
            yield from distributed.round_robin(batches)

    def _sum_pca(self, n: int, s: torch.Tensor, ss: torch.Tensor) -> int:
        """Sums of the PCA statistics over the ranks (in place); returns the global pixel count."""
        count = torch.tensor([float(n)], dtype=torch.float64, device=self.device)
        self.sync.sum_([count, s, ss], "init: PCA sums")
        return int(count.item())

    def init_kmeans(self, features, epochs: int = 2, *, batch_size: int = 32, shuffle: bool = True,
                    show_progress: bool = False) -> torch.Tensor:
        """Official baseline stage: cosine k-means (``ClusterLoss``: maximise the cosine of every
        L2-normalised pixel feature with its arg-max prototype ``v / |v|``; Adam, ``lr``) for ``epochs``
        passes from the current head's ``v`` (the PCA init after ``init_pca``). ``features``: ``(N, C,
        h, w)`` (split into batches of ``batch_size``, shuffled with ``seed + epoch`` when ``shuffle``)
        or an iterable of batches (used in order), or rows (``len()`` and ``get_features(indices)``, read a
        batch at a time, in the order of a tensor). Sets the head from the centres with ``g = 1``, as
        ``init_prototypes``, and returns them ``(K, C)``."""
        check_int(epochs, "epochs", lo=0)
        check_int(batch_size, "batch_size", lo=1)
        rows = None
        if isinstance(features, torch.Tensor):
            feats = self._feature_batches(features, "features")[0]
            n, rows = feats.shape[0], feats.__getitem__
        elif hasattr(features, "get_features"):
            n = len(features)
            rows = lambda idx: self._check_features(features.get_features(idx.tolist()), "features",  # noqa: E731
                                                    nonempty=False)
        else:
            fixed = self._feature_batches(features, "features")
        if rows is not None and n == 0:
            raise ValueError("features: empty")
        v = self.v.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([v], lr=self.lr)
        total = epochs * (-(-n // batch_size) if rows is not None else len(fixed))
        with progress(desc="k-means", total=total, unit="step", enabled=show_progress) as bar:
            for epoch in range(epochs):
                if rows is not None:
                    order = (torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
                             if shuffle else torch.arange(n))
                    batches = (self._kmeans_share(rows, order[i:i + batch_size]) for i in range(0, n, batch_size))
                else:
                    batches = (self._kmeans_share(f.__getitem__, torch.arange(f.shape[0]))
                               if self.sync is not None else (f, f.shape[0]) for f in fixed)
                for f, global_batch in batches:
                    opt.zero_grad()
                    scores = _scores(v / v.norm(dim=1, keepdim=True), F.normalize(f, dim=1))
                    # -(one_hot(argmax) * scores).sum(1).mean() of the official ClusterLoss
                    top = scores.max(dim=1).values.double()
                    if self.sync is None:
                        loss = -top.mean()
                        loss.backward()
                    else:  # this rank's pixels' part of the global mean; the parts' gradients are summed
                        loss = -top.sum() / (global_batch * top[0].numel() if top.shape[0] else 1)
                        loss.backward()
                        loss = self.sync.sum_grads([v], loss, "init: k-means gradients")
                    opt.step()
                    bar.set_postfix(f"loss {float(loss.detach()):.4f}")
                    bar.update(1)
        centres = v.detach().clone()
        if self.sync is not None:
            self.sync.broadcast_([centres], "init: k-means centres")
        self.init_prototypes(centres)
        return centres

    def _kmeans_share(self, rows, batch: torch.Tensor):
        """``(features of this rank's part of the global batch of indices batch, global batch size)``."""
        if self.sync is None:
            return rows(batch), len(batch)
        from primaps_fast import distributed

        return rows(distributed.split(batch)), len(batch)

    # ------------------------------------------------------------------ head
    def weight(self, ema: bool = False) -> torch.Tensor:
        """``(K, C)`` effective head weight ``g * v / |v|`` (of the EMA copy when ``ema``), detached."""
        with torch.no_grad():
            return _weight_norm(self.ema_g, self.ema_v) if ema else _weight_norm(self.g, self.v)

    def _check_features(self, features, name: str, batch=None, finite: bool = True,
                        nonempty: bool = True) -> torch.Tensor:
        f = check_tensor(features, name, ndim=4, floating=True, finite=finite, nonempty=nonempty)
        if f.shape[1] != self.dim:
            raise ValueError(f"{name}: expected {self.dim} channels, got {f.shape[1]}")
        if batch is not None and f.shape[0] != batch:
            raise ValueError(f"{name}: batch size {f.shape[0]} does not match mask_ids' {batch}")
        return f.to(self.device, torch.float32)

    def _ema_update(self) -> None:
        n = self.ema_calls
        self.ema_calls += 1
        with torch.no_grad():
            if n <= 1:
                self.ema_g.copy_(self.g)
                self.ema_v.copy_(self.v)
                return
            decay = min(self.ema_decay, 1 - 1 / (n + 1))  # official: epoch = step - 1 = n after step += 1
            self.ema_g.lerp_(self.g, 1 - decay)
            self.ema_v.lerp_(self.v, 1 - decay)

    def step(self, features: torch.Tensor, mask_ids: torch.Tensor, student_features=None) -> dict:
        """One EM step.

        Args:
            features: float ``(B, C, h, w)`` teacher features (E-step).
            mask_ids: integer ``(B, H, W)`` PriMaPs mask ids (``ignore_index``: no mask).
            student_features: optional float ``(B, C, h, w)`` features of the augmented image (M-step);
                defaults to ``features``.

        Returns:
            ``{"loss": float, "labels": (B, H, W) int64 pseudo labels, "step": int}``.

        Raises:
            NonFiniteUpdateError: (a ``FloatingPointError`` and ``ValueError``) the update would make the
                head, its EMA copy or Adam's state non-finite; nothing of it is kept, the model is as before
                the call (lower ``lr`` or fix the features and go on).
        """
        import primaps_fast

        m = check_tensor(mask_ids, "mask_ids", ndim=3, integer=True)
        f = self._check_features(features, "features", batch=m.shape[0], finite=False)
        s = f if student_features is None else self._check_features(student_features, "student_features",
                                                                     batch=m.shape[0], finite=False)
        if s.shape != f.shape:
            raise ValueError(f"student_features: shape {tuple(s.shape)} differs from features' {tuple(f.shape)}")
        m = m.to(self.device)
        with torch.no_grad():
            teacher = _check_scores(_scores(self.weight(ema=True), f), "features")
            labels = primaps_fast.assign_pseudo_labels(teacher, m, ignore_index=self.ignore_index,
                                                       backend=self.backend)
        self.optimizer.zero_grad(set_to_none=True)
        scores = _scores(_weight_norm(self.g, self.v), s)
        if s is not f:
            _check_scores(scores.detach(), "student_features")
        loss = primaps_fast.focal_loss(scores, labels, gamma=self.focal_gamma, ignore_index=self.ignore_index,
                                       backend=self.backend,
                                       class_stats=None if self.sync is None else self.sync.class_stats)
        loss.backward()
        if self.sync is not None:  # the sum of the ranks' parts is the gradient of the global batch's loss
            loss = self.sync.sum_grads([self.v, self.g], loss, "train: gradients of the head")
        before = self._copy_state()
        self.optimizer.step()
        k = self.global_step
        if k > 0 and k % self.ema_every == 0:
            self._ema_update()
        # the loss's one host synchronisation also reads whether the update kept everything finite
        value, grads_ok, adam_ok, head_ok = self._step_flags(loss).tolist()
        if not (grads_ok and adam_ok and head_ok):
            self._set_state(*before)
            name = "features" if student_features is None else "student_features"
            if not (grads_ok and adam_ok):
                raise NonFiniteUpdateError(
                    f"{name}: the loss ({value:g}), its gradient or the gradient's square (Adam's second "
                    "moment) is not finite on this batch (features too large?); the step was not applied, the "
                    "model is as before it")
            raise NonFiniteUpdateError(
                f"lr: the Adam update with lr={self.lr:g} makes the head, its EMA copy or Adam's state "
                "non-finite; the step was not applied, the model is as before it: lower lr (em.lr = ...) and "
                "go on")
        self.global_step += 1
        return {"loss": value, "labels": labels, "step": k}

    def _copy_state(self) -> tuple:
        """The arguments of :meth:`_set_state` that restore the current state (copies, no synchronisation)."""
        adam = {i: {k: t.detach().clone() for k, t in self.optimizer.state[p].items()}
                for i, p in enumerate((self.v, self.g)) if p in self.optimizer.state}
        tensors = [t.detach().clone() for t in (self.v, self.g, self.ema_g, self.ema_v)]
        return (*tensors, adam, self.global_step, self.ema_calls)

    def _step_flags(self, loss: torch.Tensor) -> torch.Tensor:
        """``[loss, loss and gradients finite, Adam's moments finite, head finite]`` as one float64 tensor on
        the parameters' device; the head is the effective head and EMA weights (``g * v / |v|``, the norms
        of ``v`` and of its EMA copy non-zero and finite)."""
        with torch.no_grad():
            grads = [torch.isfinite(p.grad).all() for p in (self.v, self.g)] + [torch.isfinite(loss).all()]
            adam = [torch.isfinite(t).all() for st in self.optimizer.state.values()
                    for key, t in st.items() if key != "step"]
            head = [_norms_ok(self.v, self.g), _norms_ok(self.ema_v, self.ema_g)]
            return torch.stack([loss.detach().double().reshape(())]
                               + [torch.stack(flags).all().double() for flags in (grads, adam, head)])

    def run_epoch(self, batches, *, desc: str = "EM epoch", total: int | None = None,
                  show_progress: bool = True) -> float:
        """One pass of :meth:`step` over ``batches`` (``(features, mask_ids)`` or ``(features, mask_ids,
        student_features)``); returns the mean loss of its steps, which the progress bar shows as it goes
        ("mean loss": the running mean of the epoch so far)."""
        total_loss, n = 0.0, 0
        with progress(desc=desc, total=total, unit="step", enabled=show_progress) as bar:
            for batch in batches:
                if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
                    raise ValueError("loader: every batch must be (features, mask_ids[, student_features])")
                out = self.step(batch[0], batch[1], batch[2] if len(batch) == 3 else None)
                total_loss, n = total_loss + out["loss"], n + 1
                bar.set_postfix(f"mean loss {total_loss / n:.4f}")
                bar.update(1)
        if n == 0:
            raise ValueError("loader: empty (no batches)")
        return total_loss / n

    def fit(self, loader, epochs: int = 1, *, show_progress: bool = True) -> list:
        """Run ``epochs`` passes over ``loader`` (re-iterable; yields ``(features, mask_ids)`` or
        ``(features, mask_ids, student_features)``); returns the mean loss of every epoch."""
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs: must be an int >= 1, got {epochs!r}")
        total = len(loader) if hasattr(loader, "__len__") else None
        return [self.run_epoch(loader, desc=f"EM epoch {epoch + 1}/{epochs}", total=total,
                               show_progress=show_progress) for epoch in range(epochs)]

    def scores(self, features: torch.Tensor, use_ema: bool = True) -> torch.Tensor:
        """``(B, K, h, w)`` class scores at feature resolution: the head's 1x1 conv (the EMA copy's when
        ``use_ema``) of float ``(B, C, h, w)`` features, without gradient."""
        f = self._check_features(features, "features")
        with torch.no_grad():
            return _scores(self.weight(ema=use_ema), f)

    def predict(self, features: torch.Tensor, size=None, use_ema: bool = True) -> torch.Tensor:
        """``(B, H, W)`` int64 class ids: argmax of the head's (EMA copy's when ``use_ema``) scores,
        bilinearly upsampled (``align_corners=False``) to ``size`` ``(H, W)`` (default: feature size)."""
        if size is not None:
            pair = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
            if not isinstance(pair, (tuple, list, torch.Size)) or len(pair) != 2:
                raise TypeError(f"size: expected an int or (H, W), got {size!r}")
            size = tuple(check_int(x, "size", lo=1) for x in pair)
            f = self._check_features(features, "features")
            # the upsampled (B, K, H, W) float32 scores and the (B, H, W) int64 ids
            check_memory(f.shape[0] * size[0] * size[1] * (4 * self.num_classes + 8), "size",
                         f"predicting {f.shape[0]} images at {size[0]}x{size[1]}", self.device)
        scores = self.scores(features, use_ema)
        if size is not None:
            scores = F.interpolate(scores, size, mode="bilinear", align_corners=False)
        return scores.argmax(1)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Plain tensors and numbers (``torch.load(weights_only=True)`` safe): head, EMA copy, Adam
        state and the step/EMA counters, so a resumed run continues exactly."""
        opt = self.optimizer.state_dict()
        return {"version": _STATE_VERSION, "num_classes": self.num_classes, "dim": self.dim,
                "g": self.g.detach().cpu().clone(), "v": self.v.detach().cpu().clone(),
                "ema_g": self.ema_g.cpu().clone(), "ema_v": self.ema_v.cpu().clone(),
                "global_step": self.global_step, "ema_calls": self.ema_calls,
                "adam": {str(i): {k: (t.cpu().clone() if isinstance(t, torch.Tensor) else t)
                                  for k, t in st.items()} for i, st in opt["state"].items()}}

    def load_state_dict(self, sd: dict) -> None:
        """Restore a ``state_dict``. Every entry is checked first (ints that are ints in range, tensors of
        the expected shape and dtype with finite values, Adam's state); a missing or refused entry, or
        another ``num_classes``/``dim``, raises ``ValueError`` naming it and changes nothing."""
        if not isinstance(sd, dict) or "v" not in sd or "g" not in sd:
            raise ValueError("sd: not a PriMaPsEM state_dict")
        missing = [key for key in _STATE_KEYS if key not in sd]
        if missing:
            raise ValueError(f"sd: the state has no {', '.join(repr(k) for k in missing)} entry (a truncated or "
                             "foreign state_dict; the optimiser state is 'adam')")
        if "version" in sd:
            _state_int(sd, "version", _STATE_VERSION, _STATE_VERSION)
        num_classes, dim = _state_int(sd, "num_classes", 2, MAX_CLASSES), _state_int(sd, "dim", 1)
        if (num_classes, dim) != (self.num_classes, self.dim):
            raise ValueError(f"sd: state of num_classes={num_classes}, dim={dim} does not fit this PriMaPsEM "
                             f"(num_classes={self.num_classes}, dim={self.dim})")
        head = {key: _state_tensor(sd[key], repr(key), shape)
                for key, shape in (("g", (self.num_classes,)), ("v", (self.num_classes, self.dim)),
                                   ("ema_g", (self.num_classes,)), ("ema_v", (self.num_classes, self.dim)))}
        for key in ("v", "ema_v"):
            if not bool(_norms_ok(head[key])):
                raise ValueError(f"sd: {key!r} has a row whose norm is 0 or overflows float32 (weight norm "
                                 "divides by |v|)")
        counters = [_state_int(sd, key, 0) for key in ("global_step", "ema_calls")]
        self._set_state(head["v"], head["g"], head["ema_g"], head["ema_v"], self._checked_adam(sd["adam"]),
                        *counters)

    def _checked_adam(self, adam) -> dict:
        """Adam's state of a state dict (``{"0": v's, "1": g's}``, either absent before the first step),
        checked: ``step`` a finite whole number >= 0, the moments float32 of the parameter's shape, finite,
        the second one >= 0. Keyed by parameter index."""
        if not isinstance(adam, dict):
            raise ValueError(f"sd: 'adam' is a {type(adam).__name__}, not Adam's state")
        out = {}
        for i, st in adam.items():
            index = {"0": 0, "1": 1, 0: 0, 1: 1}.get(i) if isinstance(i, (str, int)) and not isinstance(i, bool) \
                else None
            if index is None:
                raise ValueError(f"sd: 'adam' has an entry {i!r:.40}; Adam's state has entries '0' (v) and '1' (g)")
            name = f"'adam'[{i!r}]"
            if not isinstance(st, dict) or sorted(st) != sorted(_ADAM_KEYS):
                raise ValueError(f"sd: {name} must be a dict of {', '.join(_ADAM_KEYS)}")
            shape = (self.num_classes, self.dim) if index == 0 else (self.num_classes,)
            step = st["step"]
            if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_complex():
                step = step.item()
            if isinstance(step, bool) or not isinstance(step, (int, float)) or not (
                    math.isfinite(step) and step >= 0 and step == int(step) and step <= INT64_MAX):
                raise ValueError(f"sd: {name}['step'] must be a whole number >= 0, got {step!r:.40}")
            moments = {key: _state_tensor(st[key], f"{name}[{key!r}]", shape) for key in ("exp_avg", "exp_avg_sq")}
            if bool((moments["exp_avg_sq"] < 0).any()):
                raise ValueError(f"sd: {name}['exp_avg_sq'] has negative entries (a second moment is >= 0)")
            out[index] = {"step": torch.tensor(float(step)), **moments}
        return out


def _state_int(sd: dict, key: str, lo: int, hi: int = INT64_MAX) -> int:
    """``sd[key]`` if it is an int (not a bool) in ``[lo, hi]``, else a ``ValueError`` naming the entry."""
    x = sd[key]
    if isinstance(x, bool) or not isinstance(x, int) or not lo <= x <= hi:
        rule = f"the int {lo}" if lo == hi else f"an int in [{lo}, {hi}]"
        raise ValueError(f"sd: {key!r} must be {rule}, got {type(x).__name__} {x!r:.40}")
    return int(x)


def _state_tensor(x, name: str, shape: tuple) -> torch.Tensor:
    """``x`` if it is a float32 tensor of ``shape`` with finite values, else a ``ValueError`` naming ``name``
    (an entry of a state dict)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"sd: {name} is a {type(x).__name__}, not a tensor")
    if tuple(x.shape) != shape:
        raise ValueError(f"sd: {name} has shape {tuple(x.shape)}, expected {shape}")
    if x.dtype != torch.float32:
        raise ValueError(f"sd: {name} has dtype {x.dtype}, expected torch.float32")
    if not all_finite(x):
        raise ValueError(f"sd: {name} contains NaN or Inf")
    return x
