"""Many processes and nodes (``torchrun``; docs/distributed.md): the process group from the launcher's
environment, each rank's share of the work, and the reductions that make N ranks equal one process.

Without a launcher (no ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment) or with one rank,
nothing here starts and every function below is the single-process identity: ``rank() == 0``,
``world_size() == 1``, ``on_main(fn) == fn()``, shares are everything, reductions return their input.

Two channels:

- **control** (settings checks, rank-0 decisions, scan results, barriers, the global progress count)
  goes through the launcher's key-value store (``TCPStore``). Waits poll it in short sleeps, so a
  Ctrl-C or the launcher's SIGTERM is handled at once, and a wait that runs out names the ranks that
  did not arrive.
- **data** (gradients and batch statistics of training, the confusion matrix of evaluation) goes
  through the process group's collectives: NCCL for CUDA tensors when every rank has a GPU, gloo for
  CPU tensors. Before each collective a rank records in the store which collective it reached, so a
  failed or timed-out collective names the ranks that never reached it.

The timeout of every wait and collective is ``PRIMAPS_FAST_DIST_TIMEOUT`` seconds (default 1800).
"""
from __future__ import annotations

import contextlib
import datetime
import builtins
import hashlib
import io
import json
import os
import signal
import time

import torch

from primaps_fast.progress import progress

TIMEOUT_ENV = "PRIMAPS_FAST_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0
# the variables torchrun sets for every worker; RANK, WORLD_SIZE or LOCAL_RANK alone mark a launch
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A rank failed, did not arrive in time, or runs other settings than rank 0; or the launcher's
    environment is incomplete."""


class Stopped(KeyboardInterrupt):
    """SIGTERM (the launcher stops every rank when one fails): unwinds like Ctrl-C, so the process
    group is destroyed and finished work is kept."""


# ----------------------------------------------------------------------------- environment
def launch_env(environ=None) -> dict | None:
    """The launch described by ``environ`` (default ``os.environ``): ``None`` without a launcher, else
    ``{"rank", "world_size", "local_rank", "master_addr", "master_port"}``. A half-set environment
    (some of the variables torchrun sets, not all) or an invalid value raises :class:`DistributedError`."""
    env = os.environ if environ is None else environ
    if not any(env.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return None
    missing = [k for k in _LAUNCH_VARS if not env.get(k)]
    if missing:
        present = [k for k in _LAUNCH_VARS if env.get(k)]
        raise DistributedError(
            f"distributed: the launcher environment is half set: {', '.join(present)} set, but "
            f"{', '.join(missing)} missing. Start the command with torchrun (it sets all of "
            f"{', '.join(_LAUNCH_VARS)}), or unset {', '.join(present)} to run a single process.")
    out = {}
    for key, name in (("RANK", "rank"), ("WORLD_SIZE", "world_size"), ("LOCAL_RANK", "local_rank"),
                      ("MASTER_PORT", "master_port")):
        try:
            out[name] = int(env[key])
        except ValueError:
            raise DistributedError(f"distributed: {key}={env[key]!r} is not an integer") from None
    if out["world_size"] < 1 or not 0 <= out["rank"] < out["world_size"] or out["local_rank"] < 0:
        raise DistributedError(f"distributed: RANK={out['rank']}, LOCAL_RANK={out['local_rank']}, "
                               f"WORLD_SIZE={out['world_size']}: expected 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0")
    if not 0 < out["master_port"] < 2 ** 16:
        raise DistributedError(f"distributed: MASTER_PORT={out['master_port']} is not a port (1..65535)")
    out["master_addr"] = env["MASTER_ADDR"]
    return out


def timeout_s() -> float:
    """Seconds a rank waits for the others (``PRIMAPS_FAST_DIST_TIMEOUT``, default 1800)."""
    text = os.environ.get(TIMEOUT_ENV)
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise DistributedError(f"distributed: {TIMEOUT_ENV}={text!r}: expected a positive number of seconds")
    return value


# ----------------------------------------------------------------------------- state
class _Session:
    """The process group this module works with, its store (keys under a per-session prefix) and the
    counters that name each wait and collective (every rank calls them in the same order)."""

    def __init__(self, group, store, rank: int, world: int, name: str):
        self.group, self.rank, self.world = group, rank, world
        self.store = torch.distributed.PrefixStore(f"primaps_fast/{name}", store)
        self.seq = 0

    def next_key(self, kind: str) -> str:
        self.seq += 1
        return f"{kind}{self.seq}"


_session: _Session | None = None
_sessions_seen = 0


def _current() -> _Session | None:
    """The session of the initialised default process group with more than one rank, or None."""
    global _session, _sessions_seen
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        _session = None
        return None
    group = dist.group.WORLD
    if _session is not None and _session.group is group:
        return _session
    if dist.get_world_size() == 1:
        return None
    # a group initialised by the caller (the Python API): its store, a name every rank agrees on
    _sessions_seen += 1
    store = dist.distributed_c10d._get_default_store()
    _session = _Session(group, store, dist.get_rank(), dist.get_world_size(), f"api{_sessions_seen}")
    return _session


def is_active() -> bool:
    """True inside a process group of more than one rank."""
    return _current() is not None


def rank() -> int:
    s = _current()
    return s.rank if s else 0


def world_size() -> int:
    s = _current()
    return s.world if s else 1


def is_main() -> bool:
    return rank() == 0


def device(requested) -> str | None:
    """The device of this rank: ``"cuda"`` becomes ``cuda:<LOCAL_RANK>`` under a launcher."""
    env = launch_env() if is_active() else None
    if env is not None and requested is not None and str(requested) == "cuda":
        return f"cuda:{env['local_rank']}"
    return requested


# ----------------------------------------------------------------------------- process group
def _choose_backend(local_rank: int) -> str:
    if torch.cuda.is_available() and local_rank < torch.cuda.device_count():
        torch.cuda.set_device(local_rank)
        return "cpu:gloo,cuda:nccl"  # CPU tensors (control, CPU training) through gloo, CUDA through NCCL
    return "gloo"


def _raise_on_sigterm(signum, frame):
    raise Stopped(f"stopped by signal {signal.Signals(signum).name} (a launcher stops every rank when one fails)")


@contextlib.contextmanager
def launch():
    """Inside a ``torchrun`` launch of more than one rank: start the process group from the environment
    (env:// rendezvous; NCCL + gloo when this rank has the GPU ``LOCAL_RANK``, else gloo), check that every
    rank arrives, and destroy the group on exit, on an error, on Ctrl-C and on SIGTERM. Without a
    launcher, with one rank, or when the caller already started a group, it does nothing."""
    global _session, _sessions_seen
    env = launch_env()
    dist = torch.distributed
    if env is None or env["world_size"] == 1 or (dist.is_available() and dist.is_initialized()):
        yield
        return
    if not dist.is_available():
        raise DistributedError("distributed: this torch build has no torch.distributed")
    limit = timeout_s()
    delta = datetime.timedelta(seconds=limit)
    rank_, world = env["rank"], env["world_size"]
    where = f"{env['master_addr']}:{env['master_port']}"
    try:
        store, _, _ = next(dist.rendezvous("env://", timeout=delta))
    except Exception as exc:
        raise DistributedError(f"distributed: rank {rank_} could not reach the rendezvous store at {where} within "
                               f"{limit:.0f} s: {exc}") from exc
    _sessions_seen += 1
    session = _Session(None, store, rank_, world, f"run{_sessions_seen}")
    session.store.set(f"joined/{rank_}", b"1")
    try:
        dist.init_process_group(_choose_backend(env["local_rank"]),
                                store=dist.PrefixStore(f"primaps_fast/run{_sessions_seen}/pg", store),
                                rank=rank_, world_size=world, timeout=delta)
    except Exception as exc:
        missing = _absent(session, "joined")
        who = f": rank(s) {_ranks(missing)} never joined" if missing else ""
        raise DistributedError(f"distributed: rank {rank_} could not start the process group of {world} ranks "
                               f"within {limit:.0f} s{who} ({exc})") from exc
    session.group = dist.group.WORLD
    _session = session
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm) if _main_thread() else None
    try:
        barrier("distributed: waiting for every rank to start")
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        _session = None
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ----------------------------------------------------------------------------- control channel (store)
def _ranks(ranks) -> str:
    return ", ".join(str(r) for r in ranks)


def _absent(session: _Session, key: str) -> list:
    """Ranks whose ``key/<rank>`` entry is missing (best effort: [] when the store is unreachable)."""
    try:
        return [r for r in range(session.world) if not session.store.check([f"{key}/{r}"])]
    except Exception:
        return []


def _store_call(session: _Session, what: str, fn):
    try:
        return fn()
    except Stopped:
        raise
    except Exception as exc:
        raise DistributedError(f"{what}: rank {session.rank} lost the rendezvous store ({exc}); the launcher or "
                               "the node of rank 0 stopped") from exc


def _wait_all(session: _Session, key: str, what: str, poll=None, limit: float | None = None) -> None:
    """Mark this rank at ``key`` and wait until every rank is there; ``poll()`` runs while waiting.
    Running out of time raises :class:`DistributedError` naming the ranks that did not arrive."""
    store = session.store
    _store_call(session, what, lambda: (store.set(f"{key}/{session.rank}", b"1"), store.add(f"{key}/n", 1)))
    limit = timeout_s() if limit is None else limit
    start = time.monotonic()
    pause = 0.001
    while _store_call(session, what, lambda: store.add(f"{key}/n", 0)) < session.world:
        if poll is not None:
            poll()
        waited = time.monotonic() - start
        if waited > limit:
            missing = _absent(session, key)
            raise DistributedError(f"{what}: rank(s) {_ranks(missing) or '?'} did not arrive within {limit:.0f} s "
                                   f"(waiting on rank {session.rank}): a rank stopped, hangs or is much slower; "
                                   f"see its output. {TIMEOUT_ENV} sets the limit.")
        time.sleep(pause)
        pause = min(0.2, pause * 2)


def barrier(what: str, poll=None) -> None:
    """Wait until every rank reached this point (no-op in a single process); ``poll()`` runs while
    waiting (rank 0's progress bar). Running out of time names the ranks that did not arrive."""
    s = _current()
    if s is not None:
        _wait_all(s, s.next_key("barrier"), what, poll)


def _exchange(s: _Session, what: str, mine: bytes | None, senders) -> dict:
    """Publish ``mine`` (when not None), wait for every rank, return ``{rank: bytes}`` of ``senders``."""
    key = s.next_key("exchange")
    if mine is not None:
        _store_call(s, what, lambda: s.store.set(f"{key}/v{s.rank}", mine))
    _wait_all(s, key, what)
    return {r: _store_call(s, what, lambda r=r: s.store.get(f"{key}/v{r}")) for r in senders}


def _encode(value) -> bytes:
    """``value`` (tensors, numbers, strings, None and lists, tuples and dicts of them) as bytes for the
    store; :func:`_decode` reads it back with ``weights_only=True``, so bytes that reach the store from
    anywhere else cannot run code (unlike pickle)."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _decode(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


def all_gather_object(value, what: str) -> list:
    """``[value of rank 0, value of rank 1, ...]`` (``[value]`` in a single process); ``value`` made of
    tensors, numbers, strings, None, lists, tuples and dicts."""
    s = _current()
    if s is None:
        return [value]
    got = _exchange(s, what, _encode(value), range(s.world))
    return [_decode(got[r]) for r in range(s.world)]


def on_main(fn, what: str):
    """Run ``fn()`` on rank 0 only (creating folders, reading a checkpoint, a resume scan); every rank gets
    its result, or raises its error (the same type and message; ``exc.replica`` is True on the other ranks,
    so that only rank 0 reports it)."""
    s = _current()
    if s is None:
        return fn()
    if s.rank == 0:
        try:
            payload = ("ok", fn())
        except Exception as exc:
            _exchange(s, what, _encode(("error", type(exc).__name__, str(exc))), [])
            raise
        _exchange(s, what, _encode(payload), [])
        return payload[1]
    payload = _decode(_exchange(s, what, None, [0])[0])
    if payload[0] == "ok":
        return payload[1]
    _, kind, message = payload
    # the same built-in exception type (ValueError, FileNotFoundError, ...); others as DistributedError's base
    kind = getattr(builtins, kind, None)
    exc = kind(message) if isinstance(kind, type) and issubclass(kind, Exception) else RuntimeError(message)
    exc.replica = True
    raise exc


def _digest(value):
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 200 else "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def check_same(settings: dict, what: str) -> None:
    """Every rank must run with rank 0's ``settings`` (a dict of JSON-able values; long values are
    compared by hash): otherwise every rank raises :class:`DistributedError` naming the ranks and the
    settings that differ, before any work."""
    s = _current()
    if s is None:
        return
    mine = {k: _digest(v) for k, v in settings.items()}
    everyone = all_gather_object(mine, f"{what}: settings check")
    lines = []
    for r, other in enumerate(everyone[1:], start=1):
        for k in sorted(set(other) | set(everyone[0])):
            if other.get(k) != everyone[0].get(k):
                lines.append(f"  {k}: rank 0 has {everyone[0].get(k)}, rank {r} has {other.get(k)}")
    if lines:
        raise DistributedError(f"{what}: the ranks were started with different settings:\n" + "\n".join(lines)
                               + "\nEvery rank must run the same command (torchrun starts the same one on each).")


# ----------------------------------------------------------------------------- shares of the work
def round_robin(items: list) -> list:
    """This rank's items ``items[rank::world]`` (whole batches, so a rank's batches are those of the
    single-process run)."""
    return list(items)[rank()::world_size()]


def split(items, part: int | None = None, parts: int | None = None):
    """The ``part``-th (default: this rank's) of ``parts`` (default: the world size) contiguous, nearly equal
    pieces of ``items`` (the first ``len % parts`` pieces are one longer), as ``items[a:b]``."""
    part = rank() if part is None else part
    parts = world_size() if parts is None else parts
    n = len(items)
    base, extra = divmod(n, parts)
    a = part * base + min(part, extra)
    return items[a:a + base + (part < extra)]


class _Count:
    """The global count of finished items of a stage: each rank ``add``s its own and gets the global
    count back (one store round trip; in a single process, the local count)."""

    def __init__(self, what: str):
        self.s = _current()
        self.key = self.s.next_key(f"progress-{what}-") if self.s else None
        self.local = 0

    def add(self, n: int) -> int:
        self.local += n
        if self.s is None:
            return self.local
        return int(_store_call(self.s, "progress", lambda: self.s.store.add(self.key, n)))

    def total(self) -> int:
        return self.add(0) if self.s is not None else self.local


class SharedProgress:
    """One progress bar for a stage whose items are split over the ranks: ``add(n)`` counts items this
    rank finished into the global count, which rank 0's bar shows. Leaving the ``with`` block without an
    error waits for every rank (a barrier named after ``what``, keeping the bar moving), so the bar
    ends at the global total."""

    def __init__(self, what: str, *, desc: str, total: int, unit: str, enabled: bool = True):
        self.what, self.main, self.count = what, is_main(), _Count(what)
        self.bar = progress(desc=desc, total=total, unit=unit, enabled=enabled and self.main)

    def __enter__(self):
        return self

    def add(self, n: int) -> None:
        done = self.count.add(n)
        if self.main:
            self.bar.update(done - self.bar.count)

    def _show(self) -> None:
        self.bar.update(self.count.total() - self.bar.count)

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                barrier(f"{self.what}: waiting for every rank to finish its share",
                        poll=self._show if self.main else None)
                if self.main:
                    self._show()
        finally:
            self.bar.close()


# ----------------------------------------------------------------------------- data channel (collectives)
def _behind(s: _Session, seq: int) -> list:
    """Ranks whose last recorded collective is before the ``seq``-th (best effort: [] without the store)."""
    try:
        return [r for r in range(s.world)
                if not s.store.check([f"reached/{r}"]) or int(s.store.get(f"reached/{r}")) < seq]
    except Exception:
        return []


def _collective(s: _Session, what: str, fn):
    """Run the collective ``fn()``, first recording in the store (one key per rank, overwritten) that this
    rank reached it; a failure or timeout names the ranks that never reached it."""
    s.seq += 1
    seq = s.seq
    _store_call(s, what, lambda: s.store.set(f"reached/{s.rank}", str(seq)))
    try:
        return fn()
    except Stopped:
        raise
    except Exception as exc:
        missing = _behind(s, seq)
        who = (f"rank(s) {_ranks(missing)} never reached it" if missing
               else "every rank reached it, so one of them failed during it or the network did")
        raise DistributedError(f"{what}: the collective failed on rank {s.rank} after at most "
                               f"{timeout_s():.0f} s: {who} ({type(exc).__name__}: {exc})") from exc


def all_reduce_sum(tensors, what: str) -> None:
    """Sum each tensor of ``tensors`` across ranks, in place (one collective per dtype and device;
    nothing in a single process)."""
    s = _current()
    if s is None:
        return
    groups = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for ts in groups.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        _collective(s, what, lambda flat=flat: torch.distributed.all_reduce(flat))
        offset = 0
        for t in ts:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def broadcast_(tensors, what: str) -> None:
    """Overwrite ``tensors`` with rank 0's, in place (one collective per tensor)."""
    s = _current()
    if s is None:
        return
    for t in tensors:
        _collective(s, what, lambda t=t: torch.distributed.broadcast(t, src=0))


class DataParallel:
    """The reductions of :class:`~primaps_fast.em.PriMaPsEM` when each rank holds a share of every global
    batch (``em.sync``; made by :func:`data_parallel`): the focal-loss class statistics and the pixel count
    of the whole batch, the sum of the ranks' gradients (each rank's loss is its pixels' part of the global
    mean, so the sum is the gradient of the global loss) and the sum of the ranks' losses."""

    def __init__(self, session: _Session):
        self.s = session

    def class_stats(self, sums: torch.Tensor, num_pixels: int):
        """``focal_loss(class_stats=...)``: per-image softmax sums ``(B_r, K)`` and pixels of this rank ->
        ``(1, K)`` sums and the pixel count of the global batch."""
        packed = torch.cat([sums.sum(0), torch.tensor([float(num_pixels)], dtype=sums.dtype, device=sums.device)])
        all_reduce_sum([packed], "train: focal-loss class statistics")
        return packed[None, :-1], int(round(float(packed[-1])))

    def sum_grads(self, params, loss: torch.Tensor, what: str) -> torch.Tensor:
        """Sum the gradients of ``params`` and the scalar ``loss`` across ranks (one collective);
        returns the summed loss."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1).to(grads[0].dtype)])
        all_reduce_sum([flat], what)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
            offset += g.numel()
        return flat[-1]

    def sum_(self, tensors, what: str) -> None:
        all_reduce_sum(tensors, what)

    def broadcast_(self, tensors, what: str) -> None:
        broadcast_(tensors, what)


def data_parallel() -> DataParallel | None:
    """The reductions for a model trained on shares of each batch, or None in a single process."""
    s = _current()
    return DataParallel(s) if s is not None else None
