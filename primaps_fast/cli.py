"""``primaps-fast``: the PriMaPs-EM pipeline from the command line.

    primaps-fast features --dataset-root DATA/cityscapes --split train --weights dino_vits8.pth --cache C/train
    primaps-fast pseudo   --dataset-root DATA/cityscapes --split train --cache C/train --out C/pseudos
    primaps-fast train    --cache C/train --pseudo C/pseudos --out runs/cs
    primaps-fast features --dataset-root DATA/cityscapes --split val --weights dino_vits8.pth --flip --cache C/val
    primaps-fast eval     --checkpoint runs/cs/last.pt --cache C/val --out runs/cs/eval
    primaps-fast demo     (synthetic data, offline, about a minute)
    primaps-fast bench    (reference vs fast timings of every op; source checkout)

Every long step is resumable: rerun the same command after an interrupt.

Many GPUs and nodes: the same commands under torchrun (docs/distributed.md), e.g.

    torchrun --nproc_per_node=8 -m primaps_fast pseudo --dataset-root DATA/cityscapes --cache C/train --out C/pseudos
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _report(msg: str) -> None:
    """Print a command's summary (rank 0 only under torchrun: every rank has the same)."""
    from primaps_fast import distributed

    if distributed.is_main():
        print(msg)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def _add_backend_arg(p, what: str = "the kernels", help: str | None = None):
    """``--backend``, the same option in every subcommand; its choices are the dispatch module's."""
    from primaps_fast._dispatch import BACKENDS

    p.add_argument("--backend", default=None, choices=BACKENDS,
                   help=help or f"backend of {what} (default: C++ on CPU tensors; CUDA C++ when built, else "
                                "Triton, on CUDA tensors)")


def _add_dataset_args(p, required=True):
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset-root", required=required,
                   help="dataset folder (Cityscapes torchvision layout, STEGO's COCO-Stuff or Potsdam layout, "
                        "or a folder of images)")
    g.add_argument("--dataset", default=None, choices=["cityscapes", "cocostuff", "potsdam", "folder"],
                   help="layout of --dataset-root (default: detected)")
    g.add_argument("--split", default="train",
                   help="split: train/val (Cityscapes, COCO-Stuff), train/val/unlabelled_train/all (Potsdam); "
                        "ignored for a folder (default: train)")
    g.add_argument("--labels", default=None, help="folder dataset only: label PNGs <labels>/<image path>.png")
    g.add_argument("--num-classes", type=_positive_int, default=None,
                   help="number of classes (default: 27 Cityscapes/COCO-Stuff, 3 Potsdam; required for a folder "
                        "dataset when training)")
    g.add_argument("--resolution", type=_positive_int, default=None,
                   help="square input size after resize + centre crop (default: 320 for patch 8 and "
                        "dino_resnet50, 322 for patch 14)")
    g.add_argument("--num-workers", type=_count, default=None,
                   help="data loading worker processes that decode and resize the images (default: 0; for "
                        "`features` on a CUDA device min(8, CPU cores), so the GPU does not wait for decoding)")


def _add_backbone_args(p):
    from primaps_fast.backbones import BACKBONES

    g = p.add_argument_group("backbone")
    g.add_argument("--backbone", default="dino_vits8", choices=sorted(BACKBONES),
                   help="frozen backbone (default: dino_vits8, the paper's default)")
    g.add_argument("--weights", default=None,
                   help="weights file: the official DINO/DINOv2 .pth or a timm checkpoint; 'random' for a random "
                        "initialisation (smoke tests only); default: timm's pretrained weights (needs internet once)")
    g.add_argument("--device", default="cpu", help="torch device for the backbone (default: cpu)")
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="backbone arithmetic: fp32, or bf16 autocast (faster on GPUs; features differ by "
                        "~0.5 %%, docs/gpu.md); the cache stores float16 either way (default: fp32)")
    g.add_argument("--batch-size", type=_positive_int, default=16, help="images per batch (default: 16)")


def _dataset(args, backbone_name=None):
    from primaps_fast.backbones import BACKBONES
    from primaps_fast.data.datasets import build_dataset

    res = args.resolution or (BACKBONES[backbone_name].resolution if backbone_name else 320)
    return build_dataset(args.dataset_root, args.dataset, args.split, size=res, labels_root=args.labels,
                         num_classes=args.num_classes)


def cmd_features(args):
    from primaps_fast.backbones import load_backbone
    from primaps_fast.data.cache import compute_features

    ds = _dataset(args, args.backbone)
    bb = load_backbone(args.backbone, args.weights, device=args.device, precision=args.precision)
    workers = args.num_workers
    if workers is None:  # decoding in worker processes keeps a GPU busy
        workers = min(8, os.cpu_count() or 1) if str(args.device).startswith("cuda") else 0
    t = time.perf_counter()
    cache = compute_features(ds, bb, args.cache, batch_size=args.batch_size, flip=args.flip, device=args.device,
                             num_workers=workers)
    _report(f"feature cache {args.cache}: {len(cache)} images, features {cache.feature_shape} float16 "
            f"({time.perf_counter() - t:.1f} s)")


def cmd_pseudo(args):
    from primaps_fast.pseudo_gen import generate_pseudo_labels

    if args.cache:  # features from the cache; the dataset at the cache's resolution
        from primaps_fast.data.cache import FeatureCache

        source = {"cache": FeatureCache(args.cache)}
        ds = _dataset(args)
        ds.size = args.resolution or source["cache"].manifest["resolution"]
    else:
        from primaps_fast.backbones import load_backbone

        ds = _dataset(args, args.backbone)
        source = {"backbone": load_backbone(args.backbone, args.weights, device=args.device,
                                            precision=args.precision), "device": args.device}
    stats = generate_pseudo_labels(ds, args.out, threshold=args.threshold, crf=args.crf,
                                   crf_iterations=args.crf_iterations, batch_size=args.batch_size,
                                   backend=args.backend, num_workers=args.num_workers or 0, **source)
    _report(f"pseudo labels in {args.out}: {stats['computed']} computed, {stats['skipped']} already complete"
            + (f", {stats['images_per_s']:.2f} images/s" if stats["computed"] else ""))


def cmd_train(args):
    from primaps_fast import train

    train.run(args.cache, args.pseudo, args.out, num_classes=args.num_classes, epochs=args.epochs,
              batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay, ema_every=args.ema_every,
              focal_gamma=args.focal_gamma, kmeans_epochs=args.kmeans_epochs, pca_images=args.pca_images,
              hflip=args.hflip, student_augs=args.student_augs, weights=args.weights, device=args.device,
              seed=args.seed, resume=args.resume, backend=args.backend)


def cmd_eval(args):
    if args.crf and not args.dataset_root:  # an argument error: reported before anything is loaded
        raise ValueError("--crf needs --dataset-root (the images of the cached dataset)")
    from primaps_fast import evaluate

    evaluate.run(args.checkpoint, args.cache, heads=args.head, crf_dataset=_dataset(args) if args.crf else None,
                 num_classes=args.num_classes, batch_size=args.batch_size, out=args.out, backend=args.backend)


def cmd_demo(args):
    from primaps_fast import distributed
    from primaps_fast.demo import run_demo

    if args.nproc > 1 and distributed.launch_env() is None:  # start the launcher, which runs this demo N times
        return launch_local(args.nproc, ["demo", *_without_nproc(args.argv)])
    run_demo(args.out, images=args.images, epochs=args.epochs, crf=args.crf, image_size=args.image_size,
             num_classes=args.classes, batch_size=args.batch_size, seed=args.seed, backend=args.backend)


def _without_nproc(argv) -> list:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def launch_local(nproc: int, argv) -> int:
    """Run ``primaps-fast <argv>`` on ``nproc`` local processes under torchrun (``--standalone``: a
    rendezvous on a free local port) and return its exit status. The workers import the primaps_fast
    this process runs, also when the current folder holds a source tree (``PYTHONSAFEPATH``: Python
    3.11+ does not put the current folder first on their ``sys.path``)."""
    import subprocess

    import primaps_fast

    home = os.path.dirname(os.path.dirname(os.path.abspath(primaps_fast.__file__)))
    env = dict(os.environ, PYTHONSAFEPATH="1",
               PYTHONPATH=os.pathsep.join(filter(None, [home, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "primaps_fast", *argv]
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env)


def find_benchmarks():
    """The ``benchmarks`` folder of a source checkout: next to the imported package (a source tree or an
    editable install), else in the current folder (a checkout whose package was installed); or None."""
    import primaps_fast

    home = os.path.dirname(os.path.dirname(os.path.abspath(primaps_fast.__file__)))
    for folder in (os.path.join(home, "benchmarks"), os.path.join(os.getcwd(), "benchmarks")):
        if os.path.isfile(os.path.join(folder, "side_by_side.py")):
            return folder
    return None


def run_benchmarks(backend=None, pytest_args=()) -> int:
    """``pytest benchmarks --benchmark-only`` of the source checkout (:func:`find_benchmarks`), in a child
    process that imports the primaps_fast this one imported; ``backend`` keeps only its cases and the
    baselines' (reference, official). Returns pytest's exit status."""
    import subprocess

    import primaps_fast

    folder = find_benchmarks()
    if folder is None:
        raise FileNotFoundError("bench: the benchmarks are not part of an installed package; they run from a "
                                "source checkout: `cd <checkout> && primaps-fast bench` (or `pytest benchmarks "
                                "--benchmark-only`)")
    # pytest keeps only its last -k: the backend's selection and the user's are joined into one
    keyword = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    keyword.add_argument("-k", action="append", default=[])
    known, rest = keyword.parse_known_args(list(pytest_args))
    exprs = known.k
    if backend is not None:
        exprs.insert(0, " or ".join(dict.fromkeys(["reference", "official", backend])))
    select = ["-k", " and ".join(f"({e})" for e in exprs) if len(exprs) > 1 else exprs[0]] if exprs else []
    cmd = [sys.executable, "-m", "pytest", folder, "--benchmark-only", "-q", *select, *rest]
    print("+ " + " ".join(cmd), flush=True)
    # cwd: the benchmarks folder, so `-m` puts no source tree first on sys.path; PYTHONPATH: the child
    # imports the primaps_fast this process imported (installed, or a source tree built in place); an
    # xdist worker's variables stay behind (pytest-benchmark would take the child for a worker and not time)
    home = os.path.dirname(os.path.dirname(os.path.abspath(primaps_fast.__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [home, os.environ.get("PYTHONPATH")]))
    return subprocess.call(cmd, cwd=folder, env=env)


def cmd_bench(args):
    from primaps_fast import distributed

    if distributed.is_active():
        raise ValueError("bench: timings are per process; run it without torchrun")
    extra = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    return run_benchmarks(args.backend, extra)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="primaps-fast", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `primaps-fast <command> --help` for the options of a command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser("features", help="compute the backbone feature cache of a dataset (float16, resumable)",
                       description="Compute frozen DINO/DINOv2 features once per image into a memory-mapped "
                                   "float16 cache; rerunning resumes, other settings are refused.")
    _add_dataset_args(p)
    _add_backbone_args(p)
    p.add_argument("--cache", required=True, help="cache folder to create or complete")
    p.add_argument("--flip", action="store_true",
                   help="average with the features of the mirrored image (official evaluation; not for pseudo labels)")
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("pseudo", help="PriMaPs pseudo labels of a dataset (one PNG per image, resumable)",
                       description="Write imgs/, gts/ and pseudos/<name>.png (the official cached_datasets layout). "
                                   "Features come from --cache, else from the backbone.")
    _add_dataset_args(p)
    _add_backbone_args(p)
    p.set_defaults(batch_size=8)
    p.add_argument("--cache", default=None, help="feature cache of the same dataset (from `primaps-fast features`)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--threshold", type=_fraction, default=0.4, help="PriMaPs threshold psi (default: 0.4)")
    p.add_argument("--crf", action=argparse.BooleanOptionalAction, default=True,
                   help="refine the pseudo labels with the dense CRF (default: on, as the paper)")
    p.add_argument("--crf-iterations", type=_positive_int, default=10, help="mean-field iterations (default: 10)")
    _add_backend_arg(p, "principal_masks, the post-processing and the dense CRF")
    p.set_defaults(func=cmd_pseudo)

    p = sub.add_parser("train", help="PCA + k-means init, then PriMaPs-EM from a feature cache (checkpoints, --resume)",
                       description="Train the segmentation head from cached features and pseudo labels; the "
                                   "backbone is not needed. Writes init.pt (k-means baseline), last.pt (every "
                                   "epoch) and history.json.")
    p.add_argument("--cache", required=True, help="feature cache of the training images (no --flip)")
    p.add_argument("--pseudo", required=True, help="pseudo-label folder of the same images")
    p.add_argument("--out", required=True, help="run folder for checkpoints")
    p.add_argument("--num-classes", type=_positive_int, default=None,
                   help="classes (default: from the dataset: 27 or 3)")
    p.add_argument("--epochs", type=_positive_int, default=50, help="EM epochs (default: 50)")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="batch size (default: 32)")
    p.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate (default: 5e-3)")
    p.add_argument("--ema-decay", type=float, default=0.98, help="EMA decay of theta_M (default: 0.98)")
    p.add_argument("--ema-every", type=_positive_int, default=10, help="EMA update every n steps (default: 10)")
    p.add_argument("--focal-gamma", type=float, default=2.0, help="focal loss gamma (default: 2)")
    p.add_argument("--kmeans-epochs", type=_count, default=2, help="cosine k-means epochs of the init (default: 2)")
    p.add_argument("--pca-images", type=_positive_int, default=92 * 32,
                   help="first images used for PCA + k-means init (default: 2944 = the official 92 batches of 32)")
    p.add_argument("--hflip", action="store_true", help="random horizontal flips of features and pseudo labels")
    p.add_argument("--student-augs", action="store_true",
                   help="official student view: the M-step sees features of a photometrically augmented image "
                        "(blur, colour jitter / grayscale), computed by the backbone of the cache (needs its weights)")
    p.add_argument("--weights", default=None, help="with --student-augs: the backbone weights used for the cache")
    p.add_argument("--device", default="cpu",
                   help="torch device of the model and, with --student-augs, of the backbone (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    _add_backend_arg(p, "the E-step and the focal loss")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="mIoU / accuracy of a checkpoint on a feature cache (optional CRF, confusion PNG)",
                       description="Hungarian-matched mIoU and pixel accuracy (official metrics) of the EMA head "
                                   "theta_M and the head theta_R.")
    p.add_argument("--checkpoint", required=True, help="checkpoint from `primaps-fast train`")
    p.add_argument("--cache", required=True, help="feature cache of the evaluation images (ideally made with --flip)")
    p.add_argument("--head", default="both", choices=["ema", "head", "both"], help="which head (default: both)")
    p.add_argument("--crf", action=argparse.BooleanOptionalAction, default=False,
                   help="also report predictions refined with the dense CRF (needs --dataset-root)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="images per batch (default: 16)")
    p.add_argument("--out", default=None, help="folder for results.json and confusion.png")
    _add_backend_arg(p, "the dense CRF")
    _add_dataset_args(p, required=False)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="the whole pipeline on synthetic scenes, offline (about a minute)",
                       description="Synthetic scenes -> pseudo labels -> k-means baseline and PriMaPs-EM -> "
                                   "results table and PNG overlays in --out.")
    p.add_argument("--out", default="primaps_out", help="output folder (default: ./primaps_out)")
    p.add_argument("--images", type=_positive_int, default=32, help="number of scenes (default: 32)")
    p.add_argument("--epochs", type=_count, default=6, help="PriMaPs-EM epochs (default: 6)")
    p.add_argument("--image-size", type=_positive_int, default=320, help="scene size, multiple of 8 (default: 320)")
    p.add_argument("--classes", type=_positive_int, default=6, help="classes in the scenes (default: 6)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="batch size (default: 8)")
    p.add_argument("--crf", action=argparse.BooleanOptionalAction, default=True,
                   help="CRF on pseudo labels (default: on)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--nproc", type=_positive_int, default=1,
                   help="run the demo on N local processes under torchrun (pseudo labels shared, data-parallel "
                        "EM; default: 1)")
    _add_backend_arg(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="reference vs fast timings of every op (pytest benchmarks, source checkout)",
                       description="Runs `pytest benchmarks --benchmark-only` of a source checkout: every op timed "
                                   "against the reference on the same inputs, after checking that they agree. "
                                   "Arguments after `--` go to pytest (e.g. `-- -k median_filter`).")
    _add_backend_arg(p, help="time only this backend next to the reference (default: every backend)")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="arguments for pytest, after `--`")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv[1:]
    from primaps_fast import distributed
    from primaps_fast.data.datasets import DataError

    # under torchrun, messages say which rank they come from; an error that every rank received from
    # rank 0 (exc.replica) is printed by rank 0 only
    where = ""
    try:
        with distributed.launch():
            if distributed.is_active():
                where = f" [rank {distributed.rank()}/{distributed.world_size()}]"
            rc = args.func(args)
    except KeyboardInterrupt as exc:
        why = str(exc) or "interrupted"
        print(f"\nprimaps-fast {args.command}{where}: {why}; rerun the same command to resume (finished work "
              "is kept)", file=sys.stderr)
        return 130
    except ImportError as exc:
        if os.environ.get("PRIMAPS_FAST_DEBUG") == "1" or not (exc.name or "").startswith("primaps_fast"):
            raise
        print(f"primaps-fast {args.command}: error: {exc.name} is not part of this installation "
              "(a kernel of this build is missing; e.g. pass --no-crf if it is the dense CRF)", file=sys.stderr)
        return 1
    except (DataError, ValueError, TypeError, FileNotFoundError, FileExistsError, RuntimeError, OSError) as exc:
        if os.environ.get("PRIMAPS_FAST_DEBUG") == "1":
            raise
        if not getattr(exc, "replica", False):
            print(f"primaps-fast {args.command}{where}: error: {exc}", file=sys.stderr)
        return 1
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
