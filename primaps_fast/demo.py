"""``primaps-fast demo``: the whole PriMaPs-EM pipeline on embedded synthetic scenes, offline.

Synthetic scenes (``primaps_fast.data.synthetic.make_scenes``: images, labels and SSL-like features,
so no backbone weights are needed) -> PriMaPs pseudo labels -> PCA + cosine k-means (the baseline) ->
PriMaPs-EM -> a results table (mIoU, accuracy, timings), printed and written to ``<out>/results.md``
and ``<out>/results.json``, and one PNG per shown scene in ``<out>/overlays/``: titled panels image |
PriMaPs proposals | pseudo labels | k-means | PriMaPs-EM | ground truth over a legend of the class
colours (predictions coloured with the Hungarian matching, so colours agree with the ground truth).

The output folder is created if needed; a non-empty folder not made by the demo is refused, so no
unrelated file is ever overwritten.

``primaps-fast demo --nproc N`` runs it under ``torchrun`` on N local processes: the pseudo labels are
shared between the ranks (round-robin batches, gathered), PCA + k-means and PriMaPs-EM are data parallel
(``primaps_fast.distributed``), and rank 0 writes the results, equal to those of one process.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from primaps_fast import distributed, fileio, pictures, train
from primaps_fast.evaluate import evaluate_batches

MARKER = ".primaps_fast_demo"


def prepare_out(out) -> str:
    out = os.fspath(out)
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise FileExistsError(f"out: {out} exists and is not a folder")
        if os.listdir(out) and not os.path.exists(os.path.join(out, MARKER)):
            raise FileExistsError(f"out: {out} is not empty and was not written by the demo; choose another "
                                  "--out (the demo never overwrites unrelated files)")
    os.makedirs(os.path.join(out, "overlays"), exist_ok=True)
    fileio.write_bytes(os.path.join(out, MARKER), b"written by primaps-fast demo\n")
    return out


def _timed(times: dict, name: str, fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    times[name] = time.perf_counter() - t
    return out


def run_demo(out="primaps_out", *, images: int = 32, epochs: int = 6, crf: bool = True, image_size: int = 320,
             num_classes: int = 6, batch_size: int = 8, show: int = 4, seed: int = 0, backend=None,
             show_progress: bool = True, log=print) -> dict:
    """Run the demo; returns the results dict written to ``<out>/results.json``."""
    import primaps_fast
    from primaps_fast.data.synthetic import make_scenes

    if images < 2 or epochs < 0 or image_size % 8 or image_size < 32:
        raise ValueError("images >= 2, epochs >= 0 and image_size a multiple of 8 (>= 32) are required")
    main = distributed.is_main()
    if not main:
        log, show_progress = (lambda msg: None), False
    out = distributed.on_main(lambda: prepare_out(out), "demo: preparing the output folder on rank 0")
    torch.manual_seed(seed)
    times = {}
    log(f"demo: making {images} synthetic scenes of {image_size}x{image_size} ({num_classes} classes) with "
        "SSL-like features")
    scenes = _timed(times, "scenes + features (synthetic)", make_scenes, images, num_classes=num_classes,
                    image_size=image_size, seed=seed, show_progress=show_progress)
    feats, S = scenes.features, image_size
    starts = range(0, images, batch_size)

    pseudo_stage = "PriMaPs pseudo labels" + (" + CRF" if crf else "")

    def pseudo_all():  # each rank its round-robin batches, gathered in order (uint8: the ids are <= 255)
        parts = {}
        with distributed.SharedProgress("demo-pseudo", desc="pseudo labels", total=images, unit="img",
                                        enabled=show_progress) as bar:
            for s in distributed.round_robin(starts):
                parts[s] = primaps_fast.pseudo_labels(scenes.images[s:s + batch_size], feats[s:s + batch_size],
                                                      crf=crf, backend=backend).to(torch.uint8)
                bar.add(len(parts[s]))
        everyone = distributed.all_gather_object(parts, "demo: pseudo labels")
        return torch.cat([next(p[s] for p in everyone if s in p) for s in starts]).long()

    pseudo = _timed(times, pseudo_stage, pseudo_all)
    log(f"demo: pseudo labels {times[pseudo_stage]:.2f} s ({images / times[pseudo_stage]:.1f} images/s)")

    predictions = {}
    config = {"num_classes": num_classes, "dim": feats.shape[1], "lr": 5e-3, "ema_decay": 0.98,
              "ema_every": 10, "focal_gamma": 2.0, "seed": seed}
    em = train.build_em(config, backend=backend)
    batches = [feats[s:s + batch_size] for s in starts]
    _timed(times, "PCA + k-means init", train.initialise, em, batches, show_progress=show_progress)
    predictions["k-means baseline"] = torch.cat([em.predict(b, size=(S, S)) for b in batches])
    data = torch.utils.data.TensorDataset(feats, pseudo, torch.arange(images))
    train.check_ema_schedule(train.steps_per_epoch(images, batch_size), epochs, config["ema_every"], log)
    history = _timed(times, f"PriMaPs-EM ({epochs} epochs)", train.train_epochs, em, data, start_epoch=0,
                     epochs=epochs, batch_size=batch_size, seed=seed, show_progress=show_progress)
    predictions["PriMaPs-EM"] = torch.cat([em.predict(b, size=(S, S)) for b in batches])
    if not main:  # every rank holds the same model; rank 0 evaluates and writes
        return {}

    rows, results = [], {}
    for name, pred in predictions.items():
        r = evaluate_batches([(pred, scenes.labels)], num_classes)
        results[name] = r
        rows.append([name, f"{r['mIoU']:.2f}", f"{r['Accuracy']:.2f}"])
    # pseudo labels leave the background (255) unlabelled: report how much of the image they cover
    covered = pseudo != 255
    masks_per_image = float(np.mean([p[p != 255].unique().numel() for p in pseudo]))
    mean_losses = ", ".join(f"{h['mean_loss']:.4f}" for h in history) or "-"
    table = pictures.format_table(rows, ["method", "mIoU (%)", "Accuracy (%)"]) + (
        f"\n\npseudo labels: {masks_per_image:.1f} masks per image, covering "
        f"{100 * covered.float().mean():.1f}% of the pixels\n"
        f"PriMaPs-EM: {em.global_step} steps, {em.ema_calls} EMA updates of theta_M (ema_every "
        f"{config['ema_every']}); mean loss per epoch: {mean_losses}")
    ttable = pictures.format_table([[k, f"{v:.2f}"] for k, v in times.items()], ["stage", "time (s)"])

    titles = ["image", "PriMaPs proposals", "pseudo labels", *predictions, "ground truth"]
    _overlays(out, scenes, pseudo, predictions, results, titles, num_classes, min(show, images), backend)

    summary = {"images": images, "image_size": S, "num_classes": num_classes, "epochs": epochs, "crf": crf,
               "metrics": {k: {"mIoU": v["mIoU"], "Accuracy": v["Accuracy"]} for k, v in results.items()},
               "pseudo_label_coverage": float(covered.float().mean()), "times_s": times,
               "pseudo_images_per_s": images / times[pseudo_stage],
               "em_steps": em.global_step, "ema_updates": em.ema_calls,
               "em_epoch_mean_loss": [h["mean_loss"] for h in history]}
    text = (f"# primaps-fast demo\n\n{images} synthetic scenes, {S}x{S}, {num_classes} classes, CRF "
            f"{'on' if crf else 'off'}, {epochs} EM epochs\n\n{table}\n\n{ttable}\n\n"
            "Overlays (overlays/scene_*.png): " + " | ".join(titles) + "\n")
    fileio.write_bytes(os.path.join(out, "results.md"), text.encode())
    fileio.write_json(os.path.join(out, "results.json"), summary)
    log("\n" + table + "\n\n" + ttable + f"\n\nwritten to {os.path.abspath(out)}/ (results.md, results.json, "
        f"overlays/scene_*.png)")
    return summary


def _overlays(out, scenes, pseudo, predictions, results, titles, num_classes, show, backend):
    """``<out>/overlays/scene_<i>.png``: the titled panels of scene i over a legend of the class colours
    (predictions coloured through the Hungarian matching, so their colours are the ground truth's)."""
    import primaps_fast

    S = scenes.images.shape[-1]
    masks = primaps_fast.principal_masks(scenes.features[:show], backend=backend)
    npal = max(num_classes, int(masks.counts.max()) + 1, 10)
    for i in range(show):
        img = scenes.images[i].permute(1, 2, 0).numpy()
        m = masks.masks[i, : int(masks.counts[i])]
        prop = torch.nn.functional.interpolate(m[None], size=(S, S), mode="nearest")[0]
        prop_ids = torch.where(prop.max(0).values > 0, prop.argmax(0), torch.tensor(-1)).numpy()
        pse = pseudo[i].numpy().astype(np.int64)
        panels = [img, pictures.blend(img, pictures.colorize(prop_ids, npal)),
                  pictures.blend(img, pictures.colorize(np.where(pse == 255, -1, pse - 1), npal))]
        for name, pred in predictions.items():
            mapped = results[name]["mapping"][pred[i].numpy()]
            panels.append(pictures.blend(img, pictures.colorize(mapped, num_classes)))
        panels.append(pictures.blend(img, pictures.colorize(scenes.labels[i].numpy(), num_classes)))
        strip = pictures.titled_panels(panels, titles)
        key = pictures.legend([f"class {k}" for k in range(num_classes)], pictures.palette(num_classes),
                              strip.shape[1], caption="classes (predictions matched to them; proposals and "
                                                      "pseudo labels: one colour per mask):")
        fileio.write_png(os.path.join(out, "overlays", f"scene_{i:03d}.png"), pictures.stack(strip, key))
