"""Every Triton kernel compiles for the GPU, checked without one.

The interpreter (TRITON_INTERPRET=1, how the other tests run Triton on the CPU) never runs Triton's GPU
compiler, and a kernel that it runs correctly can still fail there: the Triton CRF's splat failed to
compile with Triton 3.6 (``'tt.load' op failed to verify that mask type matches ptr type``) on the first
GPU run, while the interpreter and Triton 3.8 accepted it. This test runs every Triton entry point on
small CPU inputs under the interpreter, records each kernel launch's argument types and constexprs as
Triton's launcher would specialise them, and compiles each distinct launch ahead of time for Hopper
(sm_90) and Ampere (sm_80) in a child process without the interpreter: MLIR passes and ptxas included, no
GPU needed.

Run as a script (``python tests/test_triton_compile.py LAUNCHES.json``) it compiles the launches of a
JSON file, e.g. under another Triton version on ``PYTHONPATH``.
"""
import importlib
import inspect
import json
import os
import subprocess
import sys

import pytest

ARCHS = (90, 80)
_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int64": "i64",
          "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


def _describe(value):
    """(type, divisible by 16) of one launch argument, as Triton's launcher specialises it."""
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[str(value.dtype).removeprefix("torch.")], value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "i1", False
    if isinstance(value, int):
        if value == 1:
            return "one", False  # the launcher makes an int equal to 1 a constant
        return ("i32" if -2 ** 31 <= value < 2 ** 31 else "i64"), value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    return "other", False


def record_launches(run):
    """Call ``run()`` under the interpreter; the distinct launches as JSON-ready dicts."""
    from triton.runtime.interpreter import InterpretedFunction

    seen = {}
    original = InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        names = self.arg_names
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        options = {k: v for k, v in kwargs.items() if k not in names}
        params = inspect.signature(self.fn).parameters
        args_desc = {}
        for name in names:
            kind, divisible = _describe(bound[name])
            constant = kind == "one" or "constexpr" in str(params[name].annotation)
            args_desc[name] = {"type": kind, "divisible": divisible, "value": bound[name] if constant else None}
        launch = {"module": self.fn.__module__, "kernel": self.fn.__name__, "args": args_desc, "options": options}
        seen.setdefault(json.dumps(launch, sort_keys=True), launch)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording
    try:
        run()
    finally:
        InterpretedFunction.run = original
    return list(seen.values())


def compile_launches(launches, archs=ARCHS):
    """Compile each launch for each compute capability; a list of failure messages (empty: all compiled)."""
    import triton
    from triton.backends.compiler import GPUTarget

    failures = []
    for launch in launches:
        fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
        signature, constexprs, attrs = {}, {}, {}
        for i, param in enumerate(fn.params):
            arg = launch["args"][param.name]
            if param.is_constexpr or arg["type"] == "one":
                signature[param.name] = "constexpr"
                constexprs[(i,)] = arg["value"]
            else:
                signature[param.name] = arg["type"]
                if arg["divisible"]:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        for arch in archs:
            try:
                triton.compile(triton.compiler.ASTSource(fn, signature, constexprs, attrs),
                               target=GPUTarget("cuda", arch, 32), options=dict(launch["options"]))
            except Exception as exc:  # noqa: BLE001 - every failure is reported
                failures.append(f"{launch['module']}.{launch['kernel']} sm_{arch} {signature} {constexprs}: "
                                f"{type(exc).__name__}: {str(exc)[-400:]}")
    return failures


def every_entry_point():
    """Each Triton entry point on small CPU inputs, with the label counts that pick different lane widths."""
    import torch

    import primaps_fast
    from primaps_fast.data.synthetic import make_scenes
    from primaps_fast.ops.dense_crf import dense_crf_list
    from primaps_fast.ops.pseudo_labels import crf_images

    sc = make_scenes(2, image_size=24, dim=16, patch=8, seed=3)
    primaps_fast.pseudo_labels(sc.images, sc.features, crf_iterations=1, backend="triton")
    primaps_fast.pseudo_labels(sc.images, sc.features, crf=False, backend="triton")
    g = torch.Generator().manual_seed(0)
    for labels in (2, 3, 7, 9):
        p = torch.rand(labels, 12, 10, generator=g)
        dense_crf_list(crf_images(sc.images[:1, :, :12, :10].contiguous()), [p / p.sum(0)], iterations=1,
                       backend="triton")
    primaps_fast.median_filter(torch.rand(2, 3, 9, 7, generator=g), backend="triton")
    for K, (H, W) in ((5, (16, 16)), (27, (40, 32))):
        logits = torch.randn(2, K, 4, 5, generator=g)
        ids = torch.randint(-1, 6, (2, H, W), generator=g)
        primaps_fast.assign_pseudo_labels(logits, ids, ignore_index=-1, backend="triton")
        primaps_fast.assign_pseudo_labels(logits, torch.arange(H * W).view(1, H, W).repeat(2, 1, 1),
                                          ignore_index=-1, backend="triton")
        target = torch.randint(0, K, (2, H, W), generator=g)
        target[:, 0] = 255
        leaf = logits.clone().requires_grad_(True)
        primaps_fast.focal_loss(leaf, target, backend="triton").backward()


def launched_kernels():
    """(module, name) of every Triton kernel of primaps_fast.triton that its module launches (``name[``)."""
    import pkgutil

    import primaps_fast.triton as package
    from triton.runtime.interpreter import InterpretedFunction

    found = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        source = open(module.__file__).read()
        found |= {(module.__name__, name) for name, value in vars(module).items()
                  if isinstance(value, InterpretedFunction) and f"{name}[" in source}
    return found


def test_every_triton_kernel_compiles_for_the_gpu(tmp_path):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("records launches under the interpreter; with PRIMAPS_FAST_TEST_DEVICE=cuda the GPU tests "
                    "compile every kernel for real")
    launches = record_launches(every_entry_point)
    assert {(x["module"], x["kernel"]) for x in launches} == launched_kernels()  # each one reached
    path = tmp_path / "launches.json"
    path.write_text(json.dumps(launches))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    done = subprocess.run([sys.executable, __file__, str(path)], env=env, capture_output=True, text=True,
                          timeout=840)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert f"{len(launches)} launches, sm_90 and sm_80: all compiled" in done.stdout


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    found = json.load(open(sys.argv[1]))
    problems = compile_launches(found)
    for line in problems:
        print("FAILED", line)
    import triton

    verdict = f"{len(problems)} failures" if problems else "all compiled"
    print(f"triton {triton.__version__}: {len(found)} launches, sm_{' and sm_'.join(map(str, ARCHS))}: {verdict}")
    sys.exit(1 if problems else 0)
