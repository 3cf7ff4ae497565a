"""PriMaPsEM never holds or returns a broken state: a step that would make the head, its EMA copy or Adam's
state non-finite is rolled back with a clear error, and ``load_state_dict`` checks every entry before it
changes anything."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from primaps_fast import PriMaPsEM
from primaps_fast.em import NonFiniteUpdateError
from stress_entry_points import clear_error, same_state

K, C, h, H = 3, 8, 4, 8
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _batch(seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, C, h, h, generator=gen) * scale, torch.randint(0, 4, (2, H, H), generator=gen)


def _trained(steps=3, **kw):
    em = PriMaPsEM(K, C, ema_every=1, **kw)
    for i in range(steps):
        em.step(*_batch(i))
    return em


def _finite(em) -> bool:
    sd = em.state_dict()
    tensors = [sd[k] for k in ("g", "v", "ema_g", "ema_v")] + [t for st_ in sd["adam"].values()
                                                               for t in st_.values()]
    return all(bool(torch.isfinite(t).all()) for t in tensors) and bool(torch.isfinite(em.weight()).all()) \
        and bool(torch.isfinite(em.weight(ema=True)).all())


@pytest.mark.parametrize("student", [False, True])
def test_overflowing_gradients_are_rolled_back(student):
    """Features so large that the gradient's square overflows (1e25; the scores stay finite): the step
    raises naming the features, keeps nothing, and the model goes on exactly as if it had not been called."""
    em, twin = _trained(), _trained()
    before = em.state_dict()
    f, m = _batch(10)
    big = _batch(11, scale=1e25)[0]
    args = (f, m, big) if student else (big, m)
    with pytest.raises(NonFiniteUpdateError, match="^student_features: " if student else "^features: "):
        em.step(*args)
    assert same_state(em.state_dict(), before)
    assert em.v.grad is None and em.g.grad is None
    for i in range(12, 15):  # the next steps equal those of a twin that never saw the bad batch
        assert em.step(*_batch(i))["loss"] == twin.step(*_batch(i))["loss"]
    assert same_state(em.state_dict(), twin.state_dict())


def test_the_error_is_a_floating_point_and_a_value_error():
    assert issubclass(NonFiniteUpdateError, FloatingPointError) and issubclass(NonFiniteUpdateError, ValueError)


def test_an_update_that_overflows_the_head_is_rolled_back_and_lr_can_be_lowered():
    """No lr the constructor accepts overflows a step (|v| needs entries near 1e19): the optimiser's rate is
    forced to 1e30 here to reach the check. The error names lr; lowering it continues as a twin would."""
    em, twin = _trained(), _trained()
    before = em.state_dict()
    em.optimizer.param_groups[0]["lr"] = 1e30
    with pytest.raises(NonFiniteUpdateError, match=r"^lr: the Adam update with lr="):
        em.step(*_batch(20))
    assert same_state(em.state_dict(), before)
    em.lr = twin.lr = 1e-3
    assert em.optimizer.param_groups[0]["lr"] == 1e-3
    for i in range(21, 24):
        assert em.step(*_batch(i))["loss"] == twin.step(*_batch(i))["loss"]
    assert same_state(em.state_dict(), twin.state_dict())


def test_lr_bounds_and_messages():
    for lr in (1e30, 1e19, 1e4, 0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match=r"^lr: expected a finite number in \(0, 1000\], got "):
            PriMaPsEM(K, C, lr=lr)
    em = PriMaPsEM(K, C, lr=1000)
    with pytest.raises(ValueError, match="^lr: "):
        em.lr = 1e30
    assert em.lr == 1000 and em.optimizer.param_groups[0]["lr"] == 1000
    with pytest.raises(ValueError, match=r"^focal_gamma: expected a finite number in \[0, inf\), got inf"):
        PriMaPsEM(K, C, focal_gamma=math.inf)
    with pytest.raises(ValueError, match=r"^ema_decay: expected a finite number in \[0, 1\], got 2"):
        PriMaPsEM(K, C, ema_decay=2)


def _hostile_entries():
    """(description, change of a state dict, the entry named in the error)."""
    def put(path, value):
        def change(sd):
            d = sd
            for key in path[:-1]:
                d = d[key]
            d[path[-1]] = value(d[path[-1]]) if callable(value) else value
        return change

    nan_at = lambda t: t.clone().index_fill_(0, torch.tensor([0]), math.nan)  # noqa: E731
    cases = []
    for key in ("global_step", "ema_calls"):
        for bad in ("abc", None, math.nan, 1.5, 2 ** 70, -1, True, torch.tensor(3), 3.0):
            cases.append((f"{key}={bad!r}", put([key], bad), f"'{key}'"))
    for key in ("num_classes", "dim"):
        for bad in ("3", None, 3.0, True):
            cases.append((f"{key}={bad!r}", put([key], bad), f"'{key}'"))
    cases.append(("version=2", put(["version"], 2), "'version'"))
    for key in ("g", "v", "ema_g", "ema_v"):
        cases += [(f"{key} NaN", put([key], nan_at), f"'{key}'"),
                  (f"{key} inf", put([key], lambda t: t.clone().fill_(math.inf)), f"'{key}'"),
                  (f"{key} float64", put([key], lambda t: t.double()), f"'{key}'"),
                  (f"{key} float16", put([key], lambda t: t.half()), f"'{key}'"),
                  (f"{key} transposed shape", put([key], lambda t: t.t() if t.dim() == 2 else t[None]), f"'{key}'"),
                  (f"{key} list", put([key], lambda t: t.tolist()), f"'{key}'")]
    for key in ("v", "ema_v"):
        cases += [(f"{key} zero row", put([key], lambda t: t.clone().index_fill_(0, torch.tensor([1]), 0.0)),
                   f"'{key}'"),
                  (f"{key} overflowing norm", put([key], lambda t: t.clone().fill_(1e38)), f"'{key}'")]
    for i in ("0", "1"):
        name = f"'adam'['{i}']"
        cases += [(f"adam {i} step NaN", put(["adam", i, "step"], torch.tensor(math.nan)), name),
                  (f"adam {i} step -1", put(["adam", i, "step"], torch.tensor(-1.0)), name),
                  (f"adam {i} step 1.5", put(["adam", i, "step"], 1.5), name),
                  (f"adam {i} step str", put(["adam", i, "step"], "1"), name),
                  (f"adam {i} exp_avg NaN", put(["adam", i, "exp_avg"], nan_at), name),
                  (f"adam {i} exp_avg_sq negative", put(["adam", i, "exp_avg_sq"], lambda t: -t - 1), name),
                  (f"adam {i} exp_avg shape", put(["adam", i, "exp_avg"], lambda t: t[:1]), name),
                  (f"adam {i} exp_avg float64", put(["adam", i, "exp_avg"], lambda t: t.double()), name),
                  (f"adam {i} extra key", put(["adam", i, "max_exp_avg_sq"], torch.zeros(1)), name),
                  (f"adam {i} not a dict", put(["adam", i], [1, 2]), name)]
    cases.append(("adam key 2", put(["adam", "2"], {}), "'adam'"))
    cases.append(("adam key float", put(["adam", 1.0], {}), "'adam'"))
    return cases


HOSTILE = _hostile_entries()


@pytest.mark.parametrize("desc,change,entry", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_load_state_dict_refuses_a_bad_entry_and_changes_nothing(desc, change, entry):
    source, target = _trained(seed=1), _trained(steps=2)
    sd = source.state_dict()
    change(sd)
    before = target.state_dict()
    with pytest.raises(ValueError, match=f"^sd: {entry}".replace("[", r"\[").replace("]", r"\]")):
        target.load_state_dict(sd)
    assert same_state(target.state_dict(), before)


def test_load_state_dict_accepts_what_state_dict_writes_and_resumes_exactly():
    fresh = PriMaPsEM(K, C)
    copy = PriMaPsEM(K, C, seed=5)
    copy.load_state_dict(fresh.state_dict())  # before any step: Adam's state is empty
    assert same_state(copy.state_dict(), fresh.state_dict())
    em = _trained()
    other = PriMaPsEM(K, C, ema_every=1, seed=9)
    sd = em.state_dict()
    sd["adam"] = {int(i): st_ for i, st_ in sd["adam"].items()}  # int keys, as an older writer may use
    other.load_state_dict(sd)
    for i in range(30, 33):
        assert em.step(*_batch(i))["loss"] == other.step(*_batch(i))["loss"]
    assert same_state(em.state_dict(), other.state_dict())


CTOR_NAMES = {"num_classes", "dim", "lr", "ema_decay", "ema_every", "focal_gamma", "ignore_index", "seed"}


@SETTINGS
@given(st.data())
def test_constructor_and_steps_give_a_finite_model_or_a_clear_error(data):
    """Over the constructor's arguments and the features' scale: either every step leaves finite
    parameters, or the error names an argument and the model is as before the failing step."""
    number = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2 ** 70, 2 ** 70))
    ctor = {"lr": data.draw(st.one_of(st.sampled_from([5e-3, 1.0, 1000.0, 1000.5, 1e19, 1e30]), number)),
            "ema_decay": data.draw(st.one_of(st.sampled_from([0.98, 0.0, 1.0]), number)),
            "ema_every": data.draw(st.one_of(st.sampled_from([1, 2, 10]), st.integers(-3, 2 ** 70))),
            "focal_gamma": data.draw(st.one_of(st.sampled_from([2.0, 0.0, 50.0]), number))}
    try:
        em = PriMaPsEM(K, C, **ctor)
    except (ValueError, TypeError) as exc:
        assert clear_error(exc, CTOR_NAMES), exc
        return
    scale = data.draw(st.sampled_from([1.0, 1.0, 1e3, 1e10, 1e18, 1e22, 1e25, 1e30]))
    for i in range(3):
        before = em.state_dict()
        try:
            em.step(*_batch(i, scale))
        except (ValueError, TypeError) as exc:
            assert clear_error(exc, {"features", "lr"}), exc
            assert same_state(em.state_dict(), before)
            return
        assert _finite(em)


@SETTINGS
@given(st.data())
def test_load_state_dict_gives_a_working_model_or_a_clear_error(data):
    """Random entries replaced by random values: either the load succeeds and the model steps to finite
    parameters, or the error names an ``sd`` entry and the model is unchanged."""
    source, target = _trained(seed=1), _trained(steps=2)
    sd = source.state_dict()
    value = st.one_of(st.none(), st.integers(-2 ** 70, 2 ** 70), st.floats(), st.text(max_size=3),
                      st.sampled_from([torch.tensor(1.0), torch.zeros(K), torch.ones(K, C), torch.ones(K, C).double(),
                                       torch.full((K,), math.inf), torch.ones(K, C) * 1e20]))
    paths = [["global_step"], ["ema_calls"], ["num_classes"], ["dim"], ["version"], ["g"], ["v"], ["ema_g"],
             ["ema_v"]] + [["adam", i, k] for i in ("0", "1") for k in ("step", "exp_avg", "exp_avg_sq")]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        d = sd
        for key in path[:-1]:
            d = d[key]
        d[path[-1]] = data.draw(value)
    before = target.state_dict()
    try:
        target.load_state_dict(sd)
    except ValueError as exc:
        assert str(exc).startswith("sd: "), exc
        assert same_state(target.state_dict(), before)
        return
    target.step(*_batch(40))
    assert _finite(target)
