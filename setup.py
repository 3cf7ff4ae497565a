"""Builds the one compiled module, ``primaps_fast._C``, from every ``csrc/*.cpp``.

The build needs only pybind11 (no torch headers): kernels work on raw float32 buffers.
Set ``PRIMAPS_FAST_DEBUG=1`` for an unoptimised build with assertions and debug symbols.
"""
import glob
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

debug = os.environ.get("PRIMAPS_FAST_DEBUG", "0") == "1"
# No -ffast-math: the dense CRF and the proposals must round exactly like the reference.
compile_args = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]

ext = Pybind11Extension(
    "primaps_fast._C",
    sorted(glob.glob("csrc/*.cpp")),
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=compile_args + ["-pthread"],
    extra_link_args=["-pthread"],
)

# PRIMAPS_FAST_SANITIZE=1: AddressSanitizer + UndefinedBehaviorSanitizer, any UB report fatal (.ci/run builds a
# copy of the checkout this way and runs the tests there, with libasan and libstdc++ preloaded).
if os.environ.get("PRIMAPS_FAST_SANITIZE", "0") == "1":
    sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
    ext.extra_compile_args += sanitize + ["-O1", "-g"]
    ext.extra_link_args += sanitize

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
