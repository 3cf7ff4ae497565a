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

import torch
import torch.nn.functional as F

from primaps_fast._dispatch import BACKENDS, check_tensor
from primaps_fast.progress import progress

_STATE_VERSION = 1


def _weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return g[:, None] * v / v.norm(dim=1, keepdim=True)


def _scores(weight: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """1x1 conv without bias: ``(K, C)`` x ``(B, C, h, w)`` -> ``(B, K, h, w)`` (one batched GEMM)."""
    b, c, h, w = features.shape
    return torch.matmul(weight, features.reshape(b, c, h * w)).reshape(b, weight.shape[0], h, w)


def _check_scores(scores: torch.Tensor, name: str) -> torch.Tensor:
    """Non-finite features always give non-finite scores (every head row is non-zero), so checking the
    K-channel scores replaces a pass over the C-channel features."""
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{name}: contains NaN or Inf (or values so large that the class scores overflow)")
    return scores


def _fix_signs(directions: torch.Tensor) -> torch.Tensor:
    idx = directions.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(directions.gather(1, idx))
    sign[sign == 0] = 1
    return directions * sign


class PriMaPsEM:
    """PriMaPs-EM head ``theta_R`` (weight-normalised 1x1 conv without bias: ``g (K,)``, ``v (K, C)``),
    its EMA copy ``theta_M`` and the Adam optimiser.

    Args:
        num_classes: number of classes ``K`` (>= 2).
        dim: feature channels ``C``.
        lr: Adam learning rate of the head (official 5e-3); also the k-means learning rate.
        ema_decay: EMA decay (official 0.98), with the official warm-up: the n-th EMA update copies the
            head for n <= 1 and otherwise uses decay ``min(ema_decay, 1 - 1/(n + 1))`` (the official
            ``ema.py`` with ``update_after_step=0``: its step counter is already n + 1 when the decay
            is computed, so the decays run 2/3, 3/4, ... up to ``ema_decay``).
        ema_every: after the Adam update of step ``k`` (counted from 0), the EMA is updated when
            ``k > 0 and k % ema_every == 0``.
        focal_gamma: exponent of the focal loss class weights.
        ignore_index: mask id / label of unassigned pixels.
        seed: seeds the random initial prototypes and the k-means batch order.
        device: device of the parameters (default CPU).
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
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes: must be an int >= 2, got {num_classes!r}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: must be a positive int, got {dim!r}")
        if not lr > 0:
            raise ValueError(f"lr: must be > 0, got {lr!r}")
        if not 0 <= ema_decay <= 1:
            raise ValueError(f"ema_decay: must be in [0, 1], got {ema_decay!r}")
        if not isinstance(ema_every, int) or ema_every < 1:
            raise ValueError(f"ema_every: must be an int >= 1, got {ema_every!r}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
        self.backend = backend
        self.sync = None  # data-parallel reductions (class docstring); not part of the state
        self.num_classes, self.dim = num_classes, dim
        self.lr, self.ema_decay, self.ema_every = float(lr), float(ema_decay), ema_every
        self.focal_gamma, self.ignore_index, self.seed = float(focal_gamma), int(ignore_index), int(seed)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        gen = torch.Generator().manual_seed(self.seed)
        self.init_prototypes(torch.randn(num_classes, dim, generator=gen))

    # ------------------------------------------------------------------ initialisation
    def init_prototypes(self, prototypes: torch.Tensor) -> None:
        """Head from ``(K, C)`` prototypes: ``v = prototypes``, ``g = 1``, EMA copy = head; resets Adam
        and the step/EMA counters (the official checkpoint init)."""
        check_tensor(prototypes, "prototypes", ndim=2, floating=True, finite=True)
        if tuple(prototypes.shape) != (self.num_classes, self.dim):
            raise ValueError(f"prototypes: expected shape ({self.num_classes}, {self.dim}), "
                             f"got {tuple(prototypes.shape)}")
        if bool((prototypes.norm(dim=1) == 0).any()):
            raise ValueError("prototypes: every row must be non-zero (weight norm divides by |v|)")
        self.v = prototypes.detach().to(self.device, torch.float32).clone().requires_grad_(True)
        self.g = torch.ones(self.num_classes, device=self.device, requires_grad=True)
        self.ema_g = self.g.detach().clone()
        self.ema_v = self.v.detach().clone()
        self.optimizer = torch.optim.Adam([self.v, self.g], lr=self.lr)
        self.global_step = 0
        self.ema_calls = 0

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
            ss += x @ x.t()
        if self.sync is not None:
            n = self._sum_pca(n, s, ss)
        if n < 2:
            raise ValueError("features: PCA needs at least 2 pixels")
        mean = s / n
        cov = (ss - n * torch.outer(mean, mean)) / (n - 1)
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
        if not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"epochs: must be an int >= 0, got {epochs!r}")
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
        self.optimizer.step()
        k = self.global_step
        if k > 0 and k % self.ema_every == 0:
            self._ema_update()
        self.global_step += 1
        return {"loss": float(loss.detach()), "labels": labels, "step": k}

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
            size = (size, size) if isinstance(size, int) else tuple(size)
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"size: expected (H, W) of positive ints, got {size!r}")
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
        """Restore a ``state_dict``; another ``num_classes``/``dim`` raises ``ValueError``."""
        if not isinstance(sd, dict) or "v" not in sd or "g" not in sd:
            raise ValueError("sd: not a PriMaPsEM state_dict")
        if sd.get("num_classes") != self.num_classes or sd.get("dim") != self.dim:
            raise ValueError(f"sd: state of num_classes={sd.get('num_classes')}, dim={sd.get('dim')} does not "
                             f"fit this PriMaPsEM (num_classes={self.num_classes}, dim={self.dim})")
        for key, shape in (("g", (self.num_classes,)), ("v", (self.num_classes, self.dim)),
                           ("ema_g", (self.num_classes,)), ("ema_v", (self.num_classes, self.dim))):
            if tuple(sd[key].shape) != shape:
                raise ValueError(f"sd: {key} has shape {tuple(sd[key].shape)}, expected {shape}")
        self.init_prototypes(sd["v"].float())
        with torch.no_grad():
            self.g.copy_(sd["g"])
            self.ema_g.copy_(sd["ema_g"])
            self.ema_v.copy_(sd["ema_v"])
        self.global_step, self.ema_calls = int(sd["global_step"]), int(sd["ema_calls"])
        opt = self.optimizer.state_dict()
        opt["state"] = {int(i): {k: (t.to(self.device) if isinstance(t, torch.Tensor) else t)
                                 for k, t in st.items()} for i, st in sd["adam"].items()}
        self.optimizer.load_state_dict(opt)
