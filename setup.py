"""Builds ``primaps_fast._C`` from every ``csrc/*.cpp`` (the CPU kernels) and, when ``nvcc`` is found,
``primaps_fast._C_cuda`` from every ``csrc/cuda/*.cu`` (the CUDA kernels).

Neither needs torch headers: the CPU kernels work on raw float32 buffers, the CUDA kernels on device
pointers, sizes and a stream handed over from Python. Environment:

* ``PRIMAPS_FAST_DEBUG=1``: unoptimised build with assertions and debug symbols.
* ``PRIMAPS_FAST_CUDA``: ``0`` skips the CUDA module, ``1`` requires it (an error without nvcc); unset,
  it is built when nvcc is found (``$CUDA_HOME/bin``, then ``PATH``, then ``/usr/local/cuda/bin``).
* ``PRIMAPS_FAST_CUDA_ARCH``: compute capabilities, e.g. ``"90"`` or ``"80;90"`` (default ``"80;90"``):
  machine code for each, plus PTX of the highest, which newer GPUs compile when loading the module.

The CUDA runtime is linked statically (``libcudart_static``), so the module needs only the driver.
"""
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import pybind11
from pybind11.setup_helpers import Pybind11Extension
from pybind11.setup_helpers import build_ext as pybind11_build_ext
from setuptools import Extension, setup

debug = os.environ.get("PRIMAPS_FAST_DEBUG", "0") == "1"
# No -ffast-math: the dense CRF and the proposals must round exactly like the reference. No FMA contraction
# either: the kernels' AVX2 / AVX-512 variants (csrc/common.h) must round exactly like the SSE2 baseline.
compile_args = (["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]) + ["-ffp-contract=off"]

cpu_ext = Pybind11Extension(
    "primaps_fast._C",
    sorted(glob.glob("csrc/*.cpp")),
    depends=sorted(glob.glob("csrc/*.h")),  # an edited header rebuilds the module
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=compile_args + ["-pthread", "-fopenmp"],
    extra_link_args=["-pthread", "-fopenmp"],
)
cuda_ext = Extension("primaps_fast._C_cuda", sorted(glob.glob("csrc/cuda/*.cu")))
CUDA_DEPENDS = sorted(glob.glob("csrc/*.h") + glob.glob("csrc/cuda/*.cuh"))


def find_nvcc():
    """nvcc in ``$CUDA_HOME/bin``, then on ``PATH``, then in ``/usr/local/cuda/bin``; None if absent."""
    home = os.environ.get("CUDA_HOME")
    candidates = [os.path.join(home, "bin", "nvcc")] if home else []
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def gencode_flags(spec):
    """``-gencode`` flags for ``"80;90"``-style compute capabilities: SASS for each, PTX of the highest."""
    archs = []
    for item in re.split(r"[;,\s]+", spec.strip()):
        if not item:
            continue
        arch = item.lower().removeprefix("sm_").removeprefix("compute_").replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", arch):
            raise SystemExit(f"PRIMAPS_FAST_CUDA_ARCH: {item!r} is not a compute capability (e.g. 90 or 8.0)")
        if arch not in archs:
            archs.append(arch)
    if not archs:
        raise SystemExit("PRIMAPS_FAST_CUDA_ARCH: no compute capability given")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    top = max(archs, key=lambda a: int(re.match(r"\d+", a).group()))
    return flags + [f"-gencode=arch=compute_{top},code=compute_{top}"]


class build_ext(pybind11_build_ext):
    """pybind11's build_ext for ``_C``; ``_C_cuda`` is compiled with nvcc and linked by nvcc against the
    static CUDA runtime, or dropped (with one message) when there is no nvcc."""

    def finalize_options(self):
        super().finalize_options()
        self.nvcc = None
        mode = os.environ.get("PRIMAPS_FAST_CUDA", "")
        if mode not in ("", "0", "1"):
            raise SystemExit(f"PRIMAPS_FAST_CUDA: expected 0, 1 or unset, got {mode!r}")
        if mode != "0":
            self.nvcc = find_nvcc()
            if self.nvcc is None and mode == "1":
                raise SystemExit("PRIMAPS_FAST_CUDA=1, but nvcc was not found ($CUDA_HOME/bin, PATH, "
                                 "/usr/local/cuda/bin)")
        if self.nvcc is None:
            why = ("PRIMAPS_FAST_CUDA=0" if mode == "0"
                   else "nvcc not found ($CUDA_HOME/bin, PATH, /usr/local/cuda/bin)")
            print(f"primaps_fast: {why}: the CUDA backend (primaps_fast._C_cuda) is skipped; "
                  "CUDA tensors use the Triton kernels", file=sys.stderr)
            self.extensions = [e for e in self.extensions if e.name != cuda_ext.name]

    def build_extension(self, ext):
        if ext.name != cuda_ext.name:
            return super().build_extension(ext)
        out = self.get_ext_fullpath(ext.name)
        sources = list(ext.sources)
        arch = gencode_flags(os.environ.get("PRIMAPS_FAST_CUDA_ARCH", "80;90"))
        opt = ["-O0", "-g", "-G"] if debug else ["-O3", "-DNDEBUG"]
        includes = ["-Icsrc", f"-I{pybind11.get_include()}"]
        includes += [f"-I{p}" for p in dict.fromkeys([sysconfig.get_paths()["include"],
                                                        sysconfig.get_paths()["platinclude"]])]
        flags = ["-std=c++17", "-Xcompiler", "-fPIC,-fvisibility=hidden", *opt, *arch, *includes]
        tmp = os.path.join(self.build_temp, "cuda")
        stamp = os.path.join(tmp, "flags")  # a change of flags (e.g. of architectures) rebuilds too
        same_flags = os.path.exists(stamp) and _read(stamp) == " ".join(flags)
        if same_flags and not (self.force or _newer_than(sources + CUDA_DEPENDS + [__file__], out)):
            return
        nvcc = [self.nvcc]
        if os.environ.get("CXX", "").split()[:1] == ["ccache"]:  # the compiler cache the C++ build uses
            nvcc = ["ccache"] + nvcc
        os.makedirs(tmp, exist_ok=True)
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        objects = [os.path.join(tmp, os.path.basename(s) + ".o") for s in sources]
        jobs = self.parallel if isinstance(self.parallel, int) and self.parallel > 0 else (os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            list(pool.map(lambda so: _run(nvcc + ["-c", so[0], "-o", so[1], *flags]), zip(sources, objects)))
        # Static CUDA runtime, its symbols kept private (--exclude-libs), so that torch's own libcudart in
        # the same process is never mixed with ours.
        _run(nvcc + ["-shared", "-o", out, *objects, "-cudart", "static", "-ldl", "-lrt", "-lpthread",
                     "-Xlinker", "--exclude-libs,ALL"])
        with open(stamp, "w") as f:
            f.write(" ".join(flags))


def _read(path):
    with open(path) as f:
        return f.read()


def _newer_than(inputs, output):
    if not os.path.exists(output):
        return True
    stamp = os.path.getmtime(output)
    return any(os.path.getmtime(p) > stamp for p in inputs)


def _run(cmd):
    print(" ".join(shlex.quote(c) for c in cmd))
    subprocess.run(cmd, check=True)


# PRIMAPS_FAST_SANITIZE=1: AddressSanitizer + UndefinedBehaviorSanitizer, any UB report fatal (.ci/run builds a
# copy of the checkout this way and runs the tests there, with libasan and libstdc++ preloaded).
if os.environ.get("PRIMAPS_FAST_SANITIZE", "0") == "1":
    sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
    cpu_ext.extra_compile_args += sanitize + ["-O1", "-g"]
    cpu_ext.extra_link_args += sanitize


setup(ext_modules=[cpu_ext, cuda_ext], cmdclass={"build_ext": build_ext})
