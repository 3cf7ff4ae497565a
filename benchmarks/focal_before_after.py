"""The C++ focal-loss kernels of two builds of this package (before and after a change), side by side in one
process on inputs that decide their speed; the figures of the README's focal-loss sections.

    python benchmarks/focal_before_after.py BEFORE_CHECKOUT AFTER_CHECKOUT [--threads 2] [--rounds 7]

Each checkout must have its C++ module built in place (``primaps_fast/_C*.so``); the inputs are made with
the installed package. Both modules are loaded into this process and called in alternation, ``--rounds``
times 5 calls each, a call being what one loss and gradient takes in C++ after the target's first read: the
one pass (``focal_moments``) and the gradient from its moments (``focal_combine``). Each row also gives the
largest difference between the two builds' gradients, relative to the gradient's largest value (0 where
the change keeps the bits). Prints a Markdown table of the medians and the best rounds.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from estep_before_after import alternate, setup, speedup_cells  # noqa: E402

IGNORE = 255


def inputs():
    """``{row: (float32 logits (B, K, h, w), int64 target (B, H, W))}``."""
    import primaps_fast
    from primaps_fast import PriMaPsEM
    from primaps_fast.data.synthetic import make_scenes
    from primaps_fast.em import _scores

    scenes = make_scenes(8, image_size=320, dim=384, seed=1)  # the EM step benchmark's batch
    masks = primaps_fast.pseudo_labels(scenes.images, scenes.features, crf=False)
    em = PriMaPsEM(27, 384)
    em.init_prototypes(torch.randn(27, 384, generator=torch.Generator().manual_seed(3)))
    labels = em.step(scenes.features, masks)["labels"]
    with torch.no_grad():
        student = _scores(em.weight(), scenes.features)
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 27, (8, 40, 40), generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2)
    blocks[torch.rand(8, 320, 320, generator=g) < 0.1] = IGNORE
    scores = torch.randn(8, 27, 40, 40, generator=g)
    dinov2 = torch.randint(0, 27, (8, 23, 23), generator=g).repeat_interleave(14, 1).repeat_interleave(14, 2)
    rows = {
        "EM step: student scores, pseudo labels (40x40 -> 320x320, K = 27)": (student, labels),
        "random scores x3, 8x8 blocks of random classes, 10 % ignored": (3 * scores, blocks),
        "the same, scores x60 (spreads beyond 80: an exp per pixel)": (60 * scores, blocks),
        "random scores x3, 23x23 -> 322x322 (the /14 backbones)": (3 * torch.randn(8, 27, 23, 23, generator=g),
                                                                   dinov2),
    }
    return {k: (x.float().contiguous(), t.contiguous()) for k, (x, t) in rows.items()}


def loss_and_grad(module, logits, target, threads):
    """A call of one build's one pass and gradient, and the gradient ``(B, K, h, w)`` it writes."""
    B, K, h, w = logits.shape
    slot, bad = torch.empty(B, K, dtype=torch.int32), torch.empty(B, dtype=torch.int64)
    module.focal_target_classes(target.numpy(), IGNORE, slot.numpy(), bad.numpy(), threads)
    R, Kp = max(int((slot >= 0).sum(1).max()), 1), (K + 7) // 8 * 8
    sums, class_loss = torch.empty(B, K, dtype=torch.float64), torch.empty(B, K, dtype=torch.float64)
    moments, grad = torch.empty(B, h, w, R, Kp), torch.empty_like(logits)
    weight = torch.linspace(0.5, 1.0, K)

    def call():
        module.focal_moments(logits.numpy(), target.numpy(), slot.numpy(), torch.ones(K).numpy(), IGNORE,
                             sums.numpy(), class_loss.numpy(), moments.numpy(), True, threads)
        module.focal_combine(moments.numpy(), slot.numpy(), weight.numpy(), float(target.numel()), grad.numpy(),
                             threads)

    return call, grad


def main():
    args, rows, builds = setup(__doc__.splitlines()[0], inputs)
    print("| input | before (ms) | after (ms) | speed-up (medians; best rounds) | gradients differ by |\n"
          "|---|---|---|---|---|")
    for row, (x, t) in rows.items():
        calls = {name: loss_and_grad(module, x, t, args.threads) for name, module in builds.items()}
        times = alternate({name: call for name, (call, _) in calls.items()}, args.rounds, 5)
        g0, g1 = calls["before"][1], calls["after"][1]
        differ = float((g1 - g0).abs().max() / g0.abs().max())
        print(f"| {row} | {speedup_cells(times)} | {differ:.1e} |")


if __name__ == "__main__":
    main()
