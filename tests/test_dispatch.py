"""Backend choice and the errors of missing builds (primaps_fast._dispatch)."""
import os
import signal
import sys
import time

import pytest
import torch

import primaps_fast
from primaps_fast import _dispatch

from child_process import CWD, child_env


def test_backends_and_auto_choice():
    assert _dispatch.BACKENDS == ("cpu", "cuda", "triton", "reference")
    x = torch.zeros(2)
    assert _dispatch.choose_backend(None, x) == "cpu"
    assert _dispatch.choose_backend("reference", x) == "reference"
    with pytest.raises(ValueError, match="backend"):
        _dispatch.choose_backend("gpu", x)


def test_cuda_backend_needs_cuda_tensors():
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        _dispatch.choose_backend("cuda", torch.zeros(2))
    with pytest.raises(ValueError, match="backend='cuda'"):
        primaps_fast.median_filter(torch.zeros(3, 3), backend="cuda")


@pytest.mark.skipif(_dispatch.cuda_available(), reason="this build has primaps_fast._C_cuda")
def test_cuda_module_missing_is_a_clear_error():
    with pytest.raises(RuntimeError, match="not built with its CUDA module.*nvcc"):
        _dispatch.cuda_module()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_choice_on_cuda_tensors():
    want = "cuda" if _dispatch.cuda_available() else "triton"
    assert _dispatch.choose_backend(None, torch.zeros(2, device="cuda")) == want


def test_every_kernel_of_the_table_resolves():
    """Every op has a kernel for every fast backend (the confidence sums: per device), and each entry is a
    function of the module that the table names, imported on first use."""
    import importlib

    for op, table in _dispatch.KERNELS.items():
        want = {"cpu", "cuda"} if op == "focal_confidence" else {"cpu", "cuda", "triton"}
        assert set(table) == want, op
        for backend, path in table.items():
            fn = _dispatch.kernel(op, backend)
            module, name = path.split(":")
            assert callable(fn) and fn is getattr(importlib.import_module("primaps_fast." + module), name)
    assert _dispatch.kernel("dense_crf_list", "cuda") is _dispatch.kernel("dense_crf_list", "triton")
    with pytest.raises(KeyError):
        _dispatch.kernel("median_filter", "reference")  # the oracle is reached through reference()


def test_reference_resolves_by_name():
    from primaps_fast import reference

    assert _dispatch.reference("dense_crf_list") is reference.dense_crf_list
    x = torch.rand(2, 5, 6)
    assert torch.equal(primaps_fast.median_filter(x, backend="reference"), reference.median_filter(x))


def test_missing_build_names_a_shadowing_source_tree(tmp_path, monkeypatch):
    source = tmp_path / "checkout" / "primaps_fast"  # a source tree without its build
    installed = tmp_path / "site" / "primaps_fast"  # an installed copy with its compiled module
    source.mkdir(parents=True)
    installed.mkdir(parents=True)
    (installed / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    monkeypatch.setattr(sys, "path", [str(tmp_path / "checkout")])
    msg = _dispatch._missing_build("primaps_fast._C", "its C++ extension", "reinstall", here=str(source))
    assert "shadows" not in msg and "not built with its C++ extension" in msg
    monkeypatch.setattr(sys, "path", [str(tmp_path / "checkout"), str(tmp_path / "site")])
    msg = _dispatch._missing_build("primaps_fast._C", "its C++ extension", "reinstall", here=str(source))
    assert f"missing in {source}" in msg and "shadows the installed package" in msg
    assert str(installed) in msg and "pip install -e ." in msg and "build_ext --inplace" in msg
    # a CUDA module missing in both copies is not a shadowing problem
    msg = _dispatch._missing_build("primaps_fast._C_cuda", "its CUDA module", "nvcc", here=str(source))
    assert "shadows" not in msg
    # a build that exists but fails to import is not one either
    (source / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    msg = _dispatch._missing_build("primaps_fast._C", "its C++ extension", "reinstall", here=str(source))
    assert "shadows" not in msg
    # nor a tree built without its CUDA module while the installed copy has one
    (installed / "_C_cuda.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    msg = _dispatch._missing_build("primaps_fast._C_cuda", "its CUDA module", "nvcc", here=str(source))
    assert "shadows" not in msg and "not built with its CUDA module" in msg


# ----------------------------------------------------------------------------- checks shared by every op
def _calls_of_every_op(device):
    """Each public entry point called with its tensors on ``device`` (its first tensor argument named)."""
    z = lambda *s, dtype=torch.float32: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
    img = z(1, 3, 4, 4, dtype=torch.uint8)
    return [
        ("features", lambda: primaps_fast.principal_masks(z(1, 3, 4, 4))),
        ("masks", lambda: primaps_fast.median_filter(z(2, 4, 4))),
        ("images", lambda: primaps_fast.pseudo_labels(img, z(1, 3, 2, 2))),
        ("images", lambda: primaps_fast.dense_crf(img, z(1, 2, 4, 4))),
        ("images", lambda: primaps_fast.dense_crf_list(img, [z(2, 4, 4)])),
        ("logits", lambda: primaps_fast.assign_pseudo_labels(z(1, 2, 2, 2), z(1, 4, 4, dtype=torch.int64))),
        ("logits", lambda: primaps_fast.focal_loss(z(1, 2, 2, 2), z(1, 4, 4, dtype=torch.int64))),
        ("mask_ids", lambda: primaps_fast.PriMaPsEM(2, 3).step(z(1, 3, 2, 2), z(1, 4, 4, dtype=torch.int64))),
        ("preds", lambda: primaps_fast.UnsupervisedMetrics(3).update(z(5, dtype=torch.int64),
                                                                     z(5, dtype=torch.int64))),
    ]


@pytest.mark.parametrize("device", ["meta", "xpu"])
def test_unsupported_devices_are_named(device):
    """Meta tensors (and any device other than CPU and CUDA) get one clear message from every op, not
    'Tensor.item() cannot be called on meta tensors' from deep inside."""
    if device == "xpu":
        try:
            torch.zeros(1, device="xpu")
        except (RuntimeError, AssertionError):
            pytest.skip("this torch cannot create xpu tensors (the meta case covers the check)")
    for name, call in _calls_of_every_op(device):
        with pytest.raises(ValueError, match=f"^{name}: {device} tensors are not supported; primaps_fast "
                                             "runs on CPU and CUDA tensors"):
            call()
    with pytest.raises(ValueError, match="^device: meta tensors are not supported"):
        primaps_fast.PriMaPsEM(2, 3, device="meta")
    with pytest.raises(ValueError, match="^device: not a device"):
        primaps_fast.PriMaPsEM(2, 3, device="bogus")


def test_every_op_runs_on_cpu_tensors_of_the_device_check():
    for _, call in _calls_of_every_op("cpu"):
        call()


def test_check_int_and_number():
    assert _dispatch.check_int(2 ** 63 - 1, "n") == 2 ** 63 - 1
    for bad, err in ((2 ** 63, ValueError), (-(2 ** 63) - 1, ValueError), (1.0, TypeError), (True, TypeError),
                     (float("inf"), TypeError), ("3", TypeError), (None, TypeError)):
        with pytest.raises(err, match="^n: expected an int"):
            _dispatch.check_int(bad, "n")
    with pytest.raises(ValueError, match=r"^n: expected an int in \[1, 5\], got 6"):
        _dispatch.check_int(6, "n", lo=1, hi=5)
    assert _dispatch.check_number(10 ** 30, "x") == 1e30
    for bad in (float("nan"), float("inf"), 10 ** 400, -1.0):
        with pytest.raises(ValueError, match="^x: expected a finite number"):
            _dispatch.check_number(bad, "x", lo=0.0)
    with pytest.raises(TypeError, match="^x: expected a number"):
        _dispatch.check_number("1", "x")


def test_check_memory_names_the_argument_and_the_sizes():
    _dispatch.check_memory(1 << 20, "size", "a small thing")
    total = _dispatch.device_memory(torch.device("cpu"))
    with pytest.raises(ValueError, match=r"^size: predicting needs [0-9.]+ GiB, more than the [0-9.]+ GiB of memory "
                                         "of this CPU device"):
        _dispatch.check_memory(total + 1, "size", "predicting")


def test_eager_custom_op_calls_do_not_import_dynamo():
    """The first custom-op call used to import torch._dynamo (~2 s, torch._disable_dynamo's wrapper): eager
    calls of every op skip it now, and torch.compile still goes through the ops (test_custom_ops).
    (``PriMaPsEM`` is not in this list: torch wraps the methods of every ``torch.optim`` optimizer in
    ``torch._disable_dynamo`` itself, so creating its Adam optimizer imports torch._dynamo.)"""
    import subprocess

    code = ("import sys, torch, primaps_fast\n"
            "x = torch.rand(1, 3, 4, 4); ids = torch.randint(0, 3, (1, 8, 8))\n"
            "primaps_fast.median_filter(x)\n"
            "primaps_fast.assign_pseudo_labels(x, ids)\n"
            "l = primaps_fast.focal_loss(x.requires_grad_(), ids); l.backward()\n"
            "primaps_fast.dense_crf(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), x.detach())\n"
            "primaps_fast.pseudo_labels(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.rand(1, 5, 4, 4))\n"
            "m = primaps_fast.UnsupervisedMetrics(3); m.update(ids, ids); m.compute()\n"
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))\n"
            "f = torch.compile(lambda a: primaps_fast.median_filter(a) + 1, backend='eager')\n"
            "assert torch.equal(f(x.detach()), primaps_fast.median_filter(x.detach()) + 1)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=child_env(),
                         cwd=CWD)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_kernels_run_in_a_forked_child_on_one_thread():
    """The C++ kernels run on torch's OpenMP threads, which a forked child does not have: there, a team of
    several threads waits forever, in torch's own parallel ops as in ours, so a child sets one thread as
    torch's DataLoader workers do. In a child of a process whose kernels ran on two threads, with
    torch.set_num_threads(1), the kernels (E-step, focal loss, dense CRF, the EM heads) end and give the
    parent's results."""
    from primaps_fast import PriMaPsEM

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn(2, 5, 40, 40, generator=gen)
        masks = torch.randint(0, 4, (2, 320, 320), generator=gen)
        images = torch.randint(0, 256, (2, 3, 80, 80), dtype=torch.uint8, generator=gen)
        feats = torch.randn(2, 16, 40, 40, generator=gen)
        probs = torch.softmax(logits[:, :, :10].repeat(1, 1, 8, 2), 1)

        def run():
            em = PriMaPsEM(5, 16)
            em.init_prototypes(torch.randn(5, 16, generator=torch.Generator().manual_seed(1)))
            em.step(feats, masks)
            return [primaps_fast.assign_pseudo_labels(logits, masks), primaps_fast.focal_loss(logits, masks),
                    primaps_fast.dense_crf(images, probs), em.weight().detach()]

        want = run()
        pid = os.fork()
        if pid == 0:  # the child: exit 0 when every result matches, never return into pytest
            code = 1
            try:
                torch.set_num_threads(1)
                code = 0 if all(torch.equal(a, b) for a, b in zip(run(), want)) else 2
            finally:
                os._exit(code)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        torch.set_num_threads(before)
