"""``primaps-fast``: the PriMaPs-EM pipeline from the command line.

    primaps-fast features --dataset-root DATA/cityscapes --split train --weights dino_vits8.pth --cache C/train
    primaps-fast pseudo   --dataset-root DATA/cityscapes --split train --cache C/train --out C/pseudos
    primaps-fast train    --cache C/train --pseudo C/pseudos --out runs/cs
    primaps-fast features --dataset-root DATA/cityscapes --split val --weights dino_vits8.pth --flip --cache C/val
    primaps-fast eval     --checkpoint runs/cs/last.pt --cache C/val --out runs/cs/eval
    primaps-fast demo     (synthetic data, offline, about a minute)
    primaps-fast bench    (reference vs fast timings of every op; source checkout)

Every long step is resumable: rerun the same command after an interrupt.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

DEFAULT_CLASSES = {"cityscapes": 27, "cocostuff": 27, "potsdam": 3}


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
    g.add_argument("--num-classes", type=int, default=None,
                   help="number of classes (default: 27 Cityscapes/COCO-Stuff, 3 Potsdam; required for a folder "
                        "dataset when training)")
    g.add_argument("--resolution", type=int, default=None,
                   help="square input size after resize + centre crop (default: 320 for patch 8, 322 for patch 14)")
    g.add_argument("--num-workers", type=int, default=0, help="data loading worker processes (default: 0)")


def _add_backbone_args(p):
    from primaps_fast.backbones import BACKBONES

    g = p.add_argument_group("backbone")
    g.add_argument("--backbone", default="dino_vits8", choices=sorted(BACKBONES),
                   help="frozen ViT (default: dino_vits8, the paper's default)")
    g.add_argument("--weights", default=None,
                   help="weights file: the official DINO/DINOv2 .pth or a timm checkpoint; 'random' for a random "
                        "initialisation (smoke tests only); default: timm's pretrained weights (needs internet once)")
    g.add_argument("--device", default="cpu", help="torch device for the backbone (default: cpu)")
    g.add_argument("--batch-size", type=int, default=16, help="images per batch (default: 16)")


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
    bb = load_backbone(args.backbone, args.weights, device=args.device)
    t = time.perf_counter()
    cache = compute_features(ds, bb, args.cache, batch_size=args.batch_size, flip=args.flip, device=args.device,
                             num_workers=args.num_workers)
    print(f"feature cache {args.cache}: {len(cache)} images, features {cache.feature_shape} float16 "
          f"({time.perf_counter() - t:.1f} s)")


def cmd_pseudo(args):
    from primaps_fast.data.cache import FeatureCache
    from primaps_fast.pseudo_gen import generate_pseudo_labels

    if args.cache:
        cache = FeatureCache(args.cache)
        ds = _dataset(args)
        if args.resolution is None:
            ds.size = cache.manifest["resolution"]
        stats = generate_pseudo_labels(ds, args.out, cache=cache, threshold=args.threshold, crf=args.crf,
                                       crf_iterations=args.crf_iterations, batch_size=args.batch_size,
                                       backend=args.backend, num_workers=args.num_workers)
    else:
        from primaps_fast.backbones import load_backbone

        ds = _dataset(args, args.backbone)
        bb = load_backbone(args.backbone, args.weights, device=args.device)
        stats = generate_pseudo_labels(ds, args.out, backbone=bb, threshold=args.threshold, crf=args.crf,
                                       crf_iterations=args.crf_iterations, batch_size=args.batch_size,
                                       backend=args.backend, device=args.device, num_workers=args.num_workers)
    print(f"pseudo labels in {args.out}: {stats['computed']} computed, {stats['skipped']} already complete"
          + (f", {stats['images_per_s']:.2f} images/s" if stats["computed"] else ""))


def _num_classes(args, manifest):
    if args.num_classes:
        return args.num_classes
    kind = manifest["dataset"]["kind"]
    if kind not in DEFAULT_CLASSES:
        raise ValueError("--num-classes is required for a folder dataset")
    return DEFAULT_CLASSES[kind]


def cmd_train(args):
    import torch

    from primaps_fast import fileio, pipeline
    from primaps_fast.data.cache import FeatureCache
    from primaps_fast.pseudo_gen import PseudoLabelData

    cache = FeatureCache(args.cache)
    data = PseudoLabelData(cache, args.pseudo, hflip=args.hflip, images=args.student_augs, seed=args.seed)
    K, C = _num_classes(args, cache.manifest), cache.feature_shape[0]
    student_fn = None
    if args.student_augs:
        import random

        from primaps_fast.backbones import load_backbone
        from primaps_fast.data.transforms import student_augment

        bb = load_backbone(cache.manifest["backbone"], args.weights, device=args.device)
        if bb.weights_id != cache.manifest["weights"]:
            raise ValueError(f"--weights: {bb.weights_id} differs from the weights of the cache "
                             f"({cache.manifest['weights']})")
        def student_fn(images, epoch, step):
            aug_rng = random.Random(f"{args.seed}-{epoch}-{step}")  # the same views after a resume
            student = torch.stack([student_augment(im, aug_rng) for im in images])
            return bb(student.to(args.device)).float().cpu()

    os.makedirs(args.out, exist_ok=True)
    last = os.path.join(args.out, "last.pt")
    source = {k: cache.manifest[k] for k in ("backbone", "weights", "resolution", "dataset")}
    config = {"num_classes": K, "dim": C, "lr": args.lr, "ema_decay": args.ema_decay, "ema_every": args.ema_every,
              "focal_gamma": args.focal_gamma, "seed": args.seed, "epochs": args.epochs,
              "batch_size": args.batch_size, "kmeans_epochs": args.kmeans_epochs, "hflip": args.hflip,
              "student_augs": args.student_augs}
    if os.path.exists(last):
        if not args.resume:
            raise FileExistsError(f"out: {last} exists; pass --resume to continue that run, or choose another --out")
        ckpt = pipeline.load_checkpoint(last, num_classes=K, dim=C)
        if ckpt.get("features") != source:
            raise ValueError(f"checkpoint: {last} was trained on other features ({ckpt.get('features')})")
        em, start, history = pipeline.em_from_checkpoint(ckpt), ckpt["epoch"], ckpt["history"]
        torch.set_rng_state(ckpt["torch_rng"])
        print(f"resuming {last} at epoch {start}/{args.epochs}")
    else:
        torch.manual_seed(args.seed)
        em = pipeline.build_em(config)
        n = len(cache) if args.pca_images is None else min(args.pca_images, len(cache))
        t = time.perf_counter()
        pipeline.initialise(em, (f for _, f in cache.batches(args.batch_size, range(n))),
                            kmeans_epochs=args.kmeans_epochs)
        print(f"PCA + k-means init on {n} images: {time.perf_counter() - t:.1f} s")
        pipeline.save_checkpoint(os.path.join(args.out, "init.pt"), em, epoch=0, config=config, history=[],
                                 extra={"features": source})
        start, history = 0, []

    def save(epoch, hist):
        pipeline.save_checkpoint(last, em, epoch=epoch, config=config, history=history + hist,
                                 extra={"features": source})

    if start == 0:
        save(0, [])
    hist = pipeline.train_epochs(em, data, start_epoch=start, epochs=args.epochs, batch_size=args.batch_size,
                                 seed=args.seed, on_epoch_end=save, student_fn=student_fn)
    fileio.write_json(os.path.join(args.out, "history.json"), history + hist)
    print(f"trained {args.epochs} epochs; checkpoints {os.path.join(args.out, 'init.pt')} (k-means baseline), {last}")


def cmd_eval(args):
    import torch

    from primaps_fast import fileio, pipeline
    from primaps_fast.data.cache import FeatureCache
    from primaps_fast.demo import format_table

    cache = FeatureCache(args.cache)
    cache.require_complete()
    ckpt = pipeline.load_checkpoint(args.checkpoint, dim=cache.feature_shape[0])
    K = ckpt["num_classes"]
    if args.num_classes and args.num_classes != K:
        raise ValueError(f"checkpoint: {args.checkpoint} has num_classes={K}, not {args.num_classes}")
    em = pipeline.em_from_checkpoint(ckpt)
    S = cache.manifest["resolution"]
    ds = None
    if args.crf:
        if not args.dataset_root:
            raise ValueError("--crf needs --dataset-root (the images of the cached dataset)")
        ds = _dataset(args)
        ds.size = S
        if ds.names != cache.names:
            raise ValueError(f"--dataset-root: its images are not those of the cache {args.cache}")
    heads = {"ema": [("theta_M (EMA head)", True)], "head": [("theta_R (head)", False)],
             "both": [("theta_M (EMA head)", True), ("theta_R (head)", False)]}[args.head]
    rows, results = [], {}
    for crf in ([False, True] if args.crf else [False]):
        for name, use_ema in heads:
            label = name + (" + CRF" if crf else "")

            def batches():
                for idx, feats in cache.batches(args.batch_size):
                    crf_imgs = None
                    if crf:
                        from primaps_fast.ops.pseudo_labels import crf_images

                        crf_imgs = crf_images(torch.stack([ds[int(i)][0] for i in idx]))
                    yield (pipeline.predict(em, feats, (S, S), use_ema=use_ema, crf_images=crf_imgs),
                           cache.get_labels(idx))

            r = pipeline.evaluate_batches(batches(), K)
            results[label] = r
            rows.append([label, f"{r['mIoU']:.2f}", f"{r['Accuracy']:.2f}"])
    print(format_table(rows, ["prediction", "mIoU (%)", "Accuracy (%)"]))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        first = next(iter(results))
        pipeline.confusion_png(os.path.join(args.out, "confusion.png"), results[first]["confusion"])
        fileio.write_json(os.path.join(args.out, "results.json"),
                          {k: {"mIoU": v["mIoU"], "Accuracy": v["Accuracy"],
                               "class_iou": [float(x) for x in v["class_iou"]]} for k, v in results.items()})
        print(f"written {args.out}/results.json and confusion.png ({first}, rows = classes, row-normalised)")


def cmd_demo(args):
    from primaps_fast.demo import run_demo

    run_demo(args.out, images=args.images, epochs=args.epochs, crf=args.crf, image_size=args.image_size,
             num_classes=args.classes, batch_size=args.batch_size, seed=args.seed, backend=args.backend)


def find_benchmarks():
    """The ``benchmarks`` folder of a source checkout: next to the imported package (a source tree or an
    editable install), else in the current folder (a checkout whose package was installed); or None."""
    import primaps_fast

    home = os.path.dirname(os.path.dirname(os.path.abspath(primaps_fast.__file__)))
    for folder in (os.path.join(home, "benchmarks"), os.path.join(os.getcwd(), "benchmarks")):
        if os.path.isfile(os.path.join(folder, "side_by_side.py")):
            return folder
    return None


def cmd_bench(args):
    import subprocess

    import primaps_fast

    folder = find_benchmarks()
    if folder is None:
        raise FileNotFoundError("bench: the benchmarks are not part of an installed package; they run from a "
                                "source checkout: `cd <checkout> && primaps-fast bench` (or `pytest benchmarks "
                                "--benchmark-only`)")
    extra = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    select = [] if args.backend is None else ["-k", " or ".join(dict.fromkeys(["reference", "official", args.backend]))]
    cmd = [sys.executable, "-m", "pytest", folder, "--benchmark-only", "-q", *select, *extra]
    print("+ " + " ".join(cmd), flush=True)
    # cwd: the benchmarks folder, so `-m` puts no source tree first on sys.path; PYTHONPATH: the child
    # imports the primaps_fast this process imported (installed, or a source tree built in place)
    home = os.path.dirname(os.path.dirname(os.path.abspath(primaps_fast.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [home, os.environ.get("PYTHONPATH")])))
    return subprocess.call(cmd, cwd=folder, env=env)


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
    p.add_argument("--threshold", type=float, default=0.4, help="PriMaPs threshold psi (default: 0.4)")
    p.add_argument("--crf", action=argparse.BooleanOptionalAction, default=True,
                   help="refine the pseudo labels with the dense CRF (default: on, as the paper)")
    p.add_argument("--crf-iterations", type=int, default=10, help="mean-field iterations (default: 10)")
    p.add_argument("--backend", default=None, choices=["cpu", "triton", "reference"],
                   help="kernel backend (default: C++ on CPU, Triton on CUDA)")
    p.set_defaults(func=cmd_pseudo)

    p = sub.add_parser("train", help="PCA + k-means init, then PriMaPs-EM from a feature cache (checkpoints, --resume)",
                       description="Train the segmentation head from cached features and pseudo labels; the "
                                   "backbone is not needed. Writes init.pt (k-means baseline) and last.pt (every epoch).")
    p.add_argument("--cache", required=True, help="feature cache of the training images (no --flip)")
    p.add_argument("--pseudo", required=True, help="pseudo-label folder of the same images")
    p.add_argument("--out", required=True, help="run folder for checkpoints")
    p.add_argument("--num-classes", type=int, default=None, help="classes (default: from the dataset: 27 or 3)")
    p.add_argument("--epochs", type=int, default=50, help="EM epochs (default: 50)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    p.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate (default: 5e-3)")
    p.add_argument("--ema-decay", type=float, default=0.98, help="EMA decay of theta_M (default: 0.98)")
    p.add_argument("--ema-every", type=int, default=10, help="EMA update every n steps (default: 10)")
    p.add_argument("--focal-gamma", type=float, default=2.0, help="focal loss gamma (default: 2)")
    p.add_argument("--kmeans-epochs", type=int, default=2, help="cosine k-means epochs of the init (default: 2)")
    p.add_argument("--pca-images", type=int, default=92 * 32,
                   help="first images used for PCA + k-means init (default: 2944 = the official 92 batches of 32)")
    p.add_argument("--hflip", action="store_true", help="random horizontal flips of features and pseudo labels")
    p.add_argument("--student-augs", action="store_true",
                   help="official student view: the M-step sees features of a photometrically augmented image "
                        "(blur, colour jitter / grayscale), computed by the backbone of the cache (needs its weights)")
    p.add_argument("--weights", default=None, help="with --student-augs: the backbone weights used for the cache")
    p.add_argument("--device", default="cpu", help="with --student-augs: torch device of the backbone")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="mIoU / accuracy of a checkpoint on a feature cache (optional CRF, confusion PNG)",
                       description="Hungarian-matched mIoU and pixel accuracy (official metrics) of the EMA head "
                                   "theta_M and the head theta_R.")
    p.add_argument("--checkpoint", required=True, help="checkpoint from `primaps-fast train`")
    p.add_argument("--cache", required=True, help="feature cache of the evaluation images (ideally made with --flip)")
    p.add_argument("--head", default="both", choices=["ema", "head", "both"], help="which head (default: both)")
    p.add_argument("--crf", action=argparse.BooleanOptionalAction, default=False,
                   help="also report predictions refined with the dense CRF (needs --dataset-root)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (default: 16)")
    p.add_argument("--out", default=None, help="folder for results.json and confusion.png")
    _add_dataset_args(p, required=False)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="the whole pipeline on synthetic scenes, offline (about a minute)",
                       description="Synthetic scenes -> pseudo labels -> k-means baseline and PriMaPs-EM -> "
                                   "results table and PNG overlays in --out.")
    p.add_argument("--out", default="primaps_out", help="output folder (default: ./primaps_out)")
    p.add_argument("--images", type=int, default=32, help="number of scenes (default: 32)")
    p.add_argument("--epochs", type=int, default=6, help="PriMaPs-EM epochs (default: 6)")
    p.add_argument("--image-size", type=int, default=320, help="scene size, multiple of 8 (default: 320)")
    p.add_argument("--classes", type=int, default=6, help="classes in the scenes (default: 6)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size (default: 8)")
    p.add_argument("--crf", action=argparse.BooleanOptionalAction, default=True, help="CRF on pseudo labels (default: on)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--backend", default=None, choices=["cpu", "triton", "reference"], help="kernel backend")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="reference vs fast timings of every op (pytest benchmarks, source checkout)",
                       description="Runs `pytest benchmarks --benchmark-only` of a source checkout: every op timed "
                                   "against the reference on the same inputs, after checking that they agree. "
                                   "Arguments after `--` go to pytest (e.g. `-- -k median_filter`).")
    p.add_argument("--backend", default=None, choices=["cpu", "triton", "reference"],
                   help="time only this backend next to the reference (default: every backend)")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="arguments for pytest, after `--`")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from primaps_fast.data.datasets import DataError

    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("\nprimaps-fast: interrupted; rerun the same command to resume (finished work is kept)",
              file=sys.stderr)
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
        print(f"primaps-fast {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
