"""The C++ E-step kernel of two builds of this package (before and after a change), side by side in one
process on the E-step inputs that decide its speed; the table of docs/design.md.

    python benchmarks/estep_before_after.py BEFORE_CHECKOUT AFTER_CHECKOUT [--threads 2] [--rounds 7]

Each checkout must have its C++ module built in place (``primaps_fast/_C*.so``); the inputs are made with
the installed package. Both modules are loaded into this process and called in alternation, ``--rounds``
times 20 calls each (batch 8, 27 classes, 40x40 scores, 320x320 ids); every row checks that the two give
the same labels. Older builds, whose kernel has no ``ignore_class`` argument, are called
without it. Prints a Markdown table of the medians and the best rounds.
"""
import argparse
import glob
import importlib.machinery
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))


def load_module(checkout: str, name: str):
    """The C++ module built in ``checkout``, loaded under the package name ``name``."""
    (built,) = glob.glob(os.path.join(checkout, "primaps_fast", "_C.*.so"))
    path = os.path.join(tempfile.mkdtemp(), os.path.basename(built))  # a copy: never the file the package
    shutil.copyfile(built, path)                                      # loaded (dlopen would return that one)
    loader = importlib.machinery.ExtensionFileLoader(f"{name}._C", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(f"{name}._C", path,
                                                                                    loader=loader))
    loader.exec_module(module)
    return module


def inputs():
    """``{row: (float32 logits (8, 27, 40, 40), int64 ids (8, 320, 320))}``."""
    sys.path.insert(0, HERE)
    import primaps_fast
    from bench_inputs import em_inputs
    from primaps_fast import PriMaPsEM
    from primaps_fast.data.synthetic import make_scenes
    from primaps_fast.em import _scores

    scenes = make_scenes(8, image_size=320, dim=384, seed=1)  # the EM step benchmark's batch
    masks = primaps_fast.pseudo_labels(scenes.images, scenes.features, crf=False)
    em = PriMaPsEM(27, 384)
    em.init_prototypes(torch.randn(27, 384, generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():
        teacher = _scores(em.weight(ema=True), scenes.features)
    logits, salted, _ = em_inputs()  # random scores, 12 blocky masks, 10 % salt-noise ignored pixels
    g = torch.Generator().manual_seed(1)
    smooth = F.interpolate(torch.randn(8, 27, 5, 5, generator=g) * 3, (40, 40), mode="bilinear")
    rows = {
        "EM step: teacher scores, pseudo-label masks": (teacher, masks),
        "random scores, blocky masks with 10 % salt noise": (logits, salted),
        "smooth scores, the same masks": (smooth, salted),
        "random scores, 30 random ids per pixel": (logits, torch.randint(0, 30, (8, 320, 320), generator=g)),
        "random scores, one mask per pixel": (logits, torch.arange(320 * 320).view(1, 320, 320).repeat(8, 1, 1)),
    }
    return {k: (x.float().contiguous(), ids.contiguous()) for k, (x, ids) in rows.items()}


def setup(description: str, make_inputs):
    """The command line of a before/after script (BEFORE AFTER [--threads] [--rounds]), its inputs
    ``make_inputs()`` and the two builds' modules: ``(args, rows, {"before": module, "after": module})``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    rows = make_inputs()  # first: the package loads its own module before the two others
    return args, rows, {"before": load_module(args.before, "before"), "after": load_module(args.after, "after")}


def alternate(calls: dict, rounds: int, repeat: int) -> dict:
    """``{name: [ms per call, one per round]}``: the ``calls`` (name -> function) in alternation, ``rounds``
    times, each warmed by one call and then timed over ``repeat`` calls."""
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            call()
            start = time.perf_counter()
            for _ in range(repeat):
                call()
            times[name].append((time.perf_counter() - start) / repeat * 1e3)
    return times


def speedup_cells(times: dict) -> str:
    """The ``before | after | speed-up (medians; best rounds)`` cells of a row from ``alternate``'s times."""
    b, a = statistics.median(times["before"]), statistics.median(times["after"])
    return f"{b:.2f} | {a:.2f} | {b / a:.2f}x; {min(times['before']) / min(times['after']):.2f}x"


def main():
    args, rows, builds = setup(__doc__.splitlines()[0], inputs)
    print("| input | before (ms) | after (ms) | speed-up (medians; best rounds) |\n|---|---|---|---|")
    for row, (x, ids) in rows.items():
        num_ids = int(ids.max()) + 1
        calls, labels = {}, {}
        for name, module in builds.items():
            out = labels[name] = torch.empty_like(ids)
            ignore = (255, 255) if "ignore_class" in module.assign_pseudo_labels.__doc__ else (255,)
            calls[name] = lambda module=module, out=out, ignore=ignore: module.assign_pseudo_labels(
                x.numpy(), ids.numpy(), out.numpy(), num_ids, *ignore, args.threads)
        times = alternate(calls, args.rounds, 20)
        if not torch.equal(labels["before"], labels["after"]):
            raise SystemExit(f"{row}: the two builds' labels differ")
        print(f"| {row} | {speedup_cells(times)} |")


if __name__ == "__main__":
    main()
