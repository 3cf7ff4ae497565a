"""The dense CRF table of docs/dense_crf.md: pydensecrf2 against two builds of this package (before and
after a change), one thread each, side by side in one run.

    python benchmarks/crf_before_after.py BEFORE_CHECKOUT AFTER_CHECKOUT [--rounds 2] [--iterations 10]
        [--rows textured:320:3,astronaut:320:27]

Each checkout must have its C++ module built in place. For every row of the scenes benchmark
(``test_bench_dense_crf.SCENES``, or the ``--rows`` given as kind:size:labels), the two builds are timed
in alternating subprocesses (a warm-up call, then the best of 3, ``--rounds`` subprocesses per build),
and pydensecrf2 once (best of 3) in the first "after" subprocess, which also checks the agreement with
pydensecrf. All with ``--iterations`` mean-field iterations (fewer weigh the lattices and the unary
more). Prints a Markdown table.
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import test_bench_dense_crf as bench
kind, size, labels, its = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[6])
img, probs = bench._inputs(kind, size, labels)
got = bench._cpu(img, probs, 1, its)  # also the warm-up
res = {"ms": bench._best_ms(lambda: bench._cpu(img, probs, 1, its))}
if sys.argv[5] == "1":
    from primaps_fast.reference.official_crf import pydensecrf_marginals
    want = pydensecrf_marginals(img, probs, its)
    res["pydensecrf_ms"] = bench._best_ms(lambda: pydensecrf_marginals(img, probs, its))
    res["agreement"] = (got.argmax(0) == want.argmax(0)).float().mean().item()
    res["max_dq"] = (got - want).abs().max().item()
print(json.dumps(res))
"""


def run(checkout, row, with_pydensecrf, iterations):
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout), OMP_NUM_THREADS="1")
    argv = [sys.executable, "-c", CHILD, HERE, *map(str, row), "1" if with_pydensecrf else "0", str(iterations)]
    out = subprocess.run(argv, cwd=checkout, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise SystemExit(f"{checkout}: {out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--rows", help="kind:size:labels,... (default: every row of the scenes benchmark)")
    args = parser.parse_args()
    sys.path.insert(0, HERE)
    from test_bench_dense_crf import SCENES

    rows = SCENES if args.rows is None else [(k, int(s), int(n)) for k, s, n in
                                             (r.split(":") for r in args.rows.split(","))]
    print(f"| input (one image, {args.iterations} iterations, 1 thread) | pydensecrf2 | before | after | "
          "after / before | after vs pydensecrf2 | agreement | max dQ |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        before, after, first = [], [], None
        for r in range(args.rounds):
            before.append(run(args.before, row, False, args.iterations)["ms"])
            res = run(args.after, row, r == 0, args.iterations)
            first = first or res
            after.append(res["ms"])
        b, a, p = min(before), min(after), first["pydensecrf_ms"]
        print(f"| {row[0]} {row[1]} px, {row[2]} labels | {p:,.0f} ms | {b:,.0f} ms | {a:,.0f} ms | "
              f"{b / a:.2f}x | {p / a:.2f}x | {first['agreement'] * 100:.3f} % | {first['max_dq']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
