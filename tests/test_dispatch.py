"""Backend choice and the errors of missing builds (primaps_fast._dispatch)."""
import sys

import pytest
import torch

import primaps_fast
from primaps_fast import _dispatch


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
