"""``primaps-fast demo``: the whole PriMaPs-EM pipeline on embedded synthetic scenes, offline.

Synthetic scenes (``primaps_fast.data.synthetic.make_scenes``: images, labels and SSL-like features,
so no backbone weights are needed) -> PriMaPs pseudo labels -> PCA + cosine k-means (the baseline) ->
PriMaPs-EM -> a results table (mIoU, accuracy, timings), printed and written to ``<out>/results.md``
and ``<out>/results.json``, and one PNG per shown scene in ``<out>/overlays/``: image | PriMaPs
proposals | pseudo labels | k-means | PriMaPs-EM | ground truth (predictions coloured with the
Hungarian matching, so colours agree with the ground truth).

The output folder is created if needed; a non-empty folder not made by the demo is refused, so no
unrelated file is ever overwritten.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from primaps_fast import fileio, pipeline

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


def format_table(rows, header) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in cells[1:]])


def run_demo(out="primaps_out", *, images: int = 32, epochs: int = 6, crf: bool = True, image_size: int = 320,
             num_classes: int = 6, batch_size: int = 8, show: int = 4, seed: int = 0, backend=None,
             show_progress: bool = True, log=print) -> dict:
    """Run the demo; returns the results dict written to ``<out>/results.json``."""
    import primaps_fast
    from primaps_fast.data.synthetic import make_scenes

    if images < 2 or epochs < 0 or image_size % 8 or image_size < 32:
        raise ValueError("images >= 2, epochs >= 0 and image_size a multiple of 8 (>= 32) are required")
    out = prepare_out(out)
    torch.manual_seed(seed)
    times = {}
    scenes, times["scenes + features (synthetic)"] = pipeline.timed(
        make_scenes, images, num_classes=num_classes, image_size=image_size, seed=seed)
    feats, S = scenes.features, image_size
    log(f"demo: {images} synthetic scenes of {S}x{S}, {num_classes} classes, features {tuple(feats.shape[1:])}")

    def pseudo_all():
        return torch.cat([primaps_fast.pseudo_labels(scenes.images[s:s + batch_size], feats[s:s + batch_size],
                                                     crf=crf, backend=backend)
                          for s in range(0, images, batch_size)])

    pseudo, times["PriMaPs pseudo labels" + (" + CRF" if crf else "")] = pipeline.timed(pseudo_all)
    log(f"demo: pseudo labels {times['PriMaPs pseudo labels' + (' + CRF' if crf else '')]:.2f} s "
        f"({images / times['PriMaPs pseudo labels' + (' + CRF' if crf else '')]:.1f} images/s)")

    predictions = {}
    config = {"num_classes": num_classes, "dim": feats.shape[1], "lr": 5e-3, "ema_decay": 0.98,
              "ema_every": 10, "focal_gamma": 2.0, "seed": seed}
    em = pipeline.build_em(config)
    batches = [feats[s:s + batch_size] for s in range(0, images, batch_size)]
    _, times["PCA + k-means init"] = pipeline.timed(pipeline.initialise, em, batches)
    predictions["k-means baseline"] = torch.cat([em.predict(b, size=(S, S)) for b in batches])
    data = torch.utils.data.TensorDataset(feats, pseudo, torch.arange(images))
    history, times[f"PriMaPs-EM ({epochs} epochs)"] = pipeline.timed(
        pipeline.train_epochs, em, data, start_epoch=0, epochs=epochs, batch_size=batch_size, seed=seed,
        show_progress=show_progress)
    predictions["PriMaPs-EM"] = torch.cat([em.predict(b, size=(S, S)) for b in batches])

    rows, results = [], {}
    for name, pred in predictions.items():
        r = pipeline.evaluate_batches([(pred, scenes.labels)], num_classes)
        results[name] = r
        rows.append([name, f"{r['mIoU']:.2f}", f"{r['Accuracy']:.2f}"])
    # pseudo labels leave the background (255) unlabelled: report how much of the image they cover
    covered = pseudo != 255
    masks_per_image = float(np.mean([p[p != 255].unique().numel() for p in pseudo]))
    table = format_table(rows, ["method", "mIoU (%)", "Accuracy (%)"]) + (
        f"\n\npseudo labels: {masks_per_image:.1f} masks per image, covering "
        f"{100 * covered.float().mean():.1f}% of the pixels")
    ttable = format_table([[k, f"{v:.2f}"] for k, v in times.items()], ["stage", "time (s)"])

    # overlays
    masks = primaps_fast.principal_masks(feats[:show], backend=backend)
    for i in range(min(show, images)):
        img = scenes.images[i].permute(1, 2, 0).numpy()
        m = masks.masks[i, : int(masks.counts[i])]
        prop = torch.nn.functional.interpolate(m[None], size=(S, S), mode="nearest")[0]
        prop_ids = torch.where(prop.max(0).values > 0, prop.argmax(0), torch.tensor(-1)).numpy()
        npal = max(num_classes, int(masks.counts.max()) + 1, 10)
        pse = pseudo[i].numpy().astype(np.int64)
        panels = [img, pipeline.blend(img, pipeline.colorize(prop_ids, npal)),
                  pipeline.blend(img, pipeline.colorize(np.where(pse == 255, -1, pse - 1), npal))]
        for name, pred in predictions.items():
            mapped = results[name]["mapping"][pred[i].numpy()]
            panels.append(pipeline.blend(img, pipeline.colorize(mapped, num_classes)))
        panels.append(pipeline.blend(img, pipeline.colorize(scenes.labels[i].numpy(), num_classes)))
        fileio.write_png(os.path.join(out, "overlays", f"scene_{i:03d}.png"), pipeline.strip(panels))

    summary = {"images": images, "image_size": S, "num_classes": num_classes, "epochs": epochs, "crf": crf,
               "metrics": {k: {"mIoU": v["mIoU"], "Accuracy": v["Accuracy"]} for k, v in results.items()},
               "pseudo_label_coverage": float(covered.float().mean()), "times_s": times,
               "pseudo_images_per_s": images / times["PriMaPs pseudo labels" + (" + CRF" if crf else "")],
               "em_loss": [h["loss"] for h in history]}
    text = (f"# primaps-fast demo\n\n{images} synthetic scenes, {S}x{S}, {num_classes} classes, CRF "
            f"{'on' if crf else 'off'}, {epochs} EM epochs\n\n{table}\n\n{ttable}\n\n"
            "Overlays (overlays/scene_*.png): image | PriMaPs proposals | pseudo labels | "
            + "".join(f"{name} | " for name in predictions) + "ground truth\n")
    fileio.write_bytes(os.path.join(out, "results.md"), text.encode())
    fileio.write_bytes(os.path.join(out, "results.json"), (json.dumps(summary, indent=2) + "\n").encode())
    log("\n" + table + "\n\n" + ttable + f"\n\nwritten to {os.path.abspath(out)}/ (results.md, results.json, "
        f"overlays/scene_*.png)")
    return summary
