"""Every stage under torchrun (docs/distributed.md): 2 processes (and 2 "nodes") against 1 on tiny data,
CPU + gloo on loopback only: feature cache and pseudo-label folder byte-identical, training (PCA, k-means,
3 epochs: losses, head, EMA head, Adam state) equal to 1e-5, evaluation identical, resume with another
world size; faults: a rank killed or hanging, a rank with other settings, a half-set environment."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import primaps_fast
from primaps_fast import distributed, fileio
from primaps_fast.cli import main
from primaps_fast.data.synthetic import make_scenes
import child_process

LIMIT = 240  # seconds any launch may take before the test kills it (a quiet 2-core machine needs ~10)

# Runs primaps-fast commands in one process, in order, under torchrun or alone. PF_TEST_FAULT
# "<rank>:<function>:<n>:<kill|hang>" makes that rank SIGKILL itself (or hang) at the n-th call of
# primaps_fast.fileio.<function>; PF_TEST_RANK1_ARGS appends arguments to rank 1's first command.
DRIVER = """
import json, os, signal, sys, time
from primaps_fast import fileio
from primaps_fast.cli import main


rank = int(os.environ.get("RANK", "0"))
fault = os.environ.get("PF_TEST_FAULT", "")
if fault:
    who, name, n, how = fault.split(":")
    if int(who) == rank:
        real, calls = getattr(fileio, name), [0]
        def wrapped(*a, **k):
            calls[0] += 1
            if calls[0] == int(n):
                if how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(3600)
            return real(*a, **k)
        setattr(fileio, name, wrapped)
plan = json.loads(sys.argv[1])
if rank == 1 and os.environ.get("PF_TEST_RANK1_ARGS"):
    plan[0] = plan[0] + json.loads(os.environ["PF_TEST_RANK1_ARGS"])
for argv in plan:
    rc = main(argv)
    if rc:
        sys.exit(rc)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra):
    env = child_process.child_env(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PRIMAPS_FAST_DIST_TIMEOUT="60",
                                  PRIMAPS_FAST_PROGRESS="0")
    env.pop("PRIMAPS_FAST_DEBUG", None)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def torchrun_cmd(nproc, *, nnodes=1, port=None, run_id="primaps-test"):
    port = port or free_port()
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_id}",
            "--local-addr=127.0.0.1", "--monitor-interval=0.2", "--max-restarts=0"]


def run(cmd, env, limit=LIMIT):
    """Run ``cmd`` in its own process group; kill the whole group when it outlives ``limit``."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=child_process.CWD)
    try:
        out, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{cmd} did not end within {limit} s:\n{out[-4000:]}")
    return proc.returncode, out


def launch(tmp_path, plan, nproc=2, **extra):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    return run(torchrun_cmd(nproc) + [str(driver), json.dumps(plan)], child_env(**extra))


def files(root) -> dict:
    out = {}
    for folder, _, names in os.walk(root):
        for n in names:
            path = os.path.join(folder, n)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def assert_same_files(a, b):
    fa, fb = files(a), files(b)
    assert sorted(fa) == sorted(fb)
    different = [k for k in fa if fa[k] != fb[k]]
    assert not different, f"files differ: {different}"


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """A folder dataset of 10 synthetic 32x32 scenes and the single-process (1 thread) results of every
    stage: the reference of the launches."""
    root = tmp_path_factory.mktemp("dist")
    scenes = make_scenes(10, num_classes=3, image_size=32, seed=3)
    for i, (im, lab) in enumerate(zip(scenes.images, scenes.labels)):
        fileio.write_png(root / "imgs" / f"s{i}.png", im.permute(1, 2, 0).numpy())
        fileio.write_png(root / "labels" / f"s{i}.png", lab.numpy().astype(np.uint8))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker (OMP_NUM_THREADS=1): the comparison is about ranks only
    try:
        for argv in plan(root, "1"):
            assert main(argv) == 0, argv
    finally:
        torch.set_num_threads(threads)
    return root


def data_args(root):
    return ["--dataset-root", str(root / "imgs"), "--labels", str(root / "labels"), "--num-classes", "3",
            "--resolution", "32"]


def plan(root, tag, train_epochs=3):
    c, p, r = str(root / f"cache{tag}"), str(root / f"pseudo{tag}"), str(root / f"run{tag}")
    return [["features", *data_args(root), "--weights", "random", "--batch-size", "3", "--cache", c],
            ["pseudo", *data_args(root), "--cache", c, "--out", p, "--batch-size", "3"],
            ["train", "--cache", c, "--pseudo", p, "--out", r, "--num-classes", "3", "--epochs", str(train_epochs),
             "--batch-size", "4", "--kmeans-epochs", "1", "--ema-every", "1", "--seed", "5"],
            ["eval", "--checkpoint", r + "/last.pt", "--cache", c, "--out", str(root / f"eval{tag}"), "--crf",
             *data_args(root)]]


def assert_same_training(a, b, tol=1e-5):
    for name in ("init.pt", "last.pt"):
        x = torch.load(os.path.join(a, name), weights_only=True)
        y = torch.load(os.path.join(b, name), weights_only=True)
        assert x["epoch"] == y["epoch"]
        for k in ("g", "v", "ema_g", "ema_v"):
            torch.testing.assert_close(y["em"][k], x["em"][k], rtol=tol, atol=tol)
        for i, st in x["em"]["adam"].items():
            for k, t in st.items():
                torch.testing.assert_close(y["em"]["adam"][i][k], t, rtol=tol, atol=tol)
        assert (x["em"]["global_step"], x["em"]["ema_calls"]) == (y["em"]["global_step"], y["em"]["ema_calls"])
        np.testing.assert_allclose([h["mean_loss"] for h in y["history"]], [h["mean_loss"] for h in x["history"]],
                                   rtol=tol)


def test_two_processes_equal_one(one, tmp_path):
    """features, pseudo, train, eval on 2 ranks; then the 2-rank run of 2 epochs resumed by 1 process."""
    steps = plan(one, "2") + [plan(one, "2b", train_epochs=2)[2]]
    steps[-1][steps[-1].index("--cache") + 1] = str(one / "cache2")
    steps[-1][steps[-1].index("--pseudo") + 1] = str(one / "pseudo2")
    rc, out = launch(tmp_path, steps)
    assert rc == 0, out
    assert_same_files(one / "cache1", one / "cache2")  # features.npy, labels.npy, done.npy, manifest
    assert sorted(os.listdir(one / "cache2")) == ["done.npy", "features.npy", "labels.npy", "manifest.json"]
    assert_same_files(one / "pseudo1", one / "pseudo2")
    assert_same_training(one / "run1", one / "run2")
    assert json.loads((one / "eval1" / "results.json").read_text()) == \
        json.loads((one / "eval2" / "results.json").read_text())
    assert out.count("feature cache") == 1 and out.count("pseudo labels in") == 1  # rank 0 reports alone
    # the 2-rank run stopped after 2 epochs, resumed by one process, equals the uninterrupted 1-process run
    train = plan(one, "2b")[2]
    train[train.index("--cache") + 1], train[train.index("--pseudo") + 1] = str(one / "cache1"), str(one / "pseudo1")
    assert main(train + ["--resume"]) == 0
    assert_same_training(one / "run1", one / "run2b")


def test_two_nodes_and_no_python_launch(one, tmp_path):
    """--nnodes=2 --nproc_per_node=1: two launchers meet at a c10d rendezvous on 127.0.0.1; one node runs
    `-m primaps_fast`, the other `--no-python primaps-fast`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "primaps-fast"  # what `pip install` makes of the console script
    shim.write_text(f"#!{sys.executable}\nimport sys\nfrom primaps_fast.cli import main\nsys.exit(main())\n")
    shim.chmod(0o755)
    env = child_env(PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    args = ["pseudo", *data_args(one), "--cache", str(one / "cache1"), "--out", str(tmp_path / "p"),
            "--batch-size", "3"]
    port = free_port()
    nodes = [torchrun_cmd(1, nnodes=2, port=port) + ["-m", "primaps_fast", *args],
             torchrun_cmd(1, nnodes=2, port=port) + ["--no-python", "primaps-fast", *args]]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True, cwd=child_process.CWD) for cmd in nodes]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=LIMIT)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    assert "10 computed" in "".join(outs)
    assert_same_files(one / "pseudo1", tmp_path / "p")


@pytest.mark.parametrize("stage", ["features", "pseudo"])
def test_killed_rank_fails_the_others_and_any_world_size_finishes(one, tmp_path, stage):
    """Rank 1 is SIGKILLed in the middle of an image (features: between the rows and the record of its
    second batch; pseudo: between an image's files): the launch fails within the timeout with the others
    stopped, nothing half-written counts as complete, and one process finishes the job identically."""
    steps = plan(one, "k")
    if stage == "features":
        cmd, fault, ref = steps[0], "1:write_npy:2:kill", "cache1"
    else:
        cmd, fault, ref = steps[1], "1:write_png:2:kill", "pseudo1"
        cmd[cmd.index("--cache") + 1] = str(one / "cache1")
    out_arg = "--cache" if stage == "features" else "--out"
    out_dir = tmp_path / stage
    cmd[cmd.index(out_arg) + 1] = str(out_dir)
    t = time.monotonic()
    rc, out = launch(tmp_path, [cmd], PF_TEST_FAULT=fault)
    assert rc != 0 and time.monotonic() - t < LIMIT
    assert "exitcode  : -9" in out or "Signal 9" in out, out  # torchrun names the killed rank ...
    assert "rank: 1" in out or "local_rank: 1" in out, out
    if stage == "features":  # ... rank 1's first batch is recorded, its second batch is not
        from primaps_fast.data.cache import FeatureCache

        done = FeatureCache(out_dir).done
        assert 0 < done.sum() < 10
        assert not (set(np.flatnonzero(done)) & {9})  # rank 1's second batch: images 9 (batches 1 and 3)
    else:
        from primaps_fast.pseudo_gen import complete

        names = sorted(os.listdir(one / "imgs"))
        assert not complete(out_dir, names[3][:-4], 32)  # rank 1's first image: imgs/ written, gts/ not
    # a single process (another world size) finishes it: identical to the uninterrupted run
    assert main(cmd) == 0
    assert_same_files(one / ref, out_dir)


def test_hanging_rank_is_named_by_the_timeout(one, tmp_path):
    """Rank 1 hangs before its first pseudo label: rank 0 finishes its share, then its wait for rank 1 runs
    out and names it."""
    cmd = plan(one, "h")[1]
    cmd[cmd.index("--cache") + 1] = str(one / "cache1")
    t = time.monotonic()
    rc, out = launch(tmp_path, [cmd], PF_TEST_FAULT="1:write_png:1:hang", PRIMAPS_FAST_DIST_TIMEOUT="4")
    assert rc != 0 and time.monotonic() - t < LIMIT
    assert "rank(s) 1 did not arrive within 4 s" in out, out


def test_rank_with_other_settings_is_refused_before_any_work(one, tmp_path):
    cmd = plan(one, "s")[1]
    cmd[cmd.index("--cache") + 1] = str(one / "cache1")
    rc, out = launch(tmp_path, [cmd], PF_TEST_RANK1_ARGS=json.dumps(["--threshold", "0.3"]))
    assert rc != 0
    assert "different settings" in out and "threshold: rank 0 has 0.4, rank 1 has 0.3" in out, out
    assert not (one / "pseudos").exists()


def test_demo_on_two_processes_equals_one(tmp_path, monkeypatch, capsys):
    """`primaps-fast demo --nproc 2` starts torchrun itself; its results equal the single-process demo's."""
    args = ["--images", "8", "--epochs", "2", "--image-size", "64", "--batch-size", "4", "--no-crf"]
    for k, v in child_env().items():
        monkeypatch.setenv(k, v)
    assert main(["demo", "--nproc", "2", "--out", str(tmp_path / "d2"), *args]) == 0
    assert "torch.distributed.run --standalone --nproc_per_node=2 -m primaps_fast demo" in capsys.readouterr().out
    assert main(["demo", "--out", str(tmp_path / "d1"), *args]) == 0
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("d1", "d2"))
    assert two["pseudo_label_coverage"] == one["pseudo_label_coverage"] and two["em_steps"] == one["em_steps"]
    np.testing.assert_allclose(two["em_epoch_mean_loss"], one["em_epoch_mean_loss"], rtol=1e-5)
    for name, m in one["metrics"].items():
        assert abs(two["metrics"][name]["mIoU"] - m["mIoU"]) < 0.05


# ----------------------------------------------------------------------------- in-process
def test_environment_checks(monkeypatch):
    assert distributed.launch_env({}) is None
    full = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert distributed.launch_env(full) == {"rank": 1, "world_size": 2, "local_rank": 1, "master_addr": "127.0.0.1",
                                            "master_port": 29500}
    with pytest.raises(distributed.DistributedError, match="half set.*MASTER_ADDR, MASTER_PORT missing"):
        distributed.launch_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(distributed.DistributedError, match="WORLD_SIZE='two' is not an integer"):
        distributed.launch_env({**full, "WORLD_SIZE": "two"})
    with pytest.raises(distributed.DistributedError, match="RANK < WORLD_SIZE"):
        distributed.launch_env({**full, "RANK": "2"})
    with pytest.raises(distributed.DistributedError, match="not a port"):
        distributed.launch_env({**full, "MASTER_PORT": "70000"})
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(distributed.DistributedError, match="positive number of seconds"):
        distributed.timeout_s()
    # the command line reports a half-set environment instead of hanging or running alone
    monkeypatch.delenv(distributed.TIMEOUT_ENV)
    for k in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["eval", "--checkpoint", "x.pt", "--cache", "nope"]) == 1


def test_single_process_is_the_identity():
    assert not distributed.is_active() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.on_main(lambda: 7, "x") == 7
    assert distributed.all_gather_object({"a": 1}, "x") == [{"a": 1}]
    assert distributed.round_robin([1, 2, 3]) == [1, 2, 3] and distributed.split([1, 2, 3]) == [1, 2, 3]
    assert distributed.data_parallel() is None
    distributed.check_same({"a": 1}, "x")
    t = torch.ones(3)
    distributed.all_reduce_sum([t], "x")
    assert t.tolist() == [1, 1, 1]
    with distributed.launch():  # no launcher: nothing starts
        assert not distributed.is_active()


def test_split_and_round_robin_shares():
    items = list(range(11))
    parts = [distributed.split(items, r, 3) for r in range(3)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert [distributed.split(items[:2], r, 3) for r in range(3)] == [[0], [1], []]


def test_rank_batches_keep_the_single_process_order():
    """The sampler of train_epochs yields what DataLoader(shuffle=True, generator) yields (one rank)."""
    from primaps_fast.train import _RankBatches

    data = torch.utils.data.TensorDataset(torch.arange(23))
    for drop_last in (True, False):
        want = [b[0].tolist() for b in torch.utils.data.DataLoader(
            data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(3), drop_last=drop_last)]
        g = torch.Generator().manual_seed(3)
        sampler = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(data, generator=g), 4, drop_last)
        got = [b[0].tolist() for b in torch.utils.data.DataLoader(data, batch_sampler=_RankBatches(sampler, False),
                                                                  generator=g)]
        assert got == want


def test_wait_names_the_ranks_that_did_not_arrive():
    store = torch.distributed.TCPStore("127.0.0.1", free_port(), 1, True, wait_for_workers=False)
    session = distributed._Session(None, store, 0, 3, "test")
    session.store.set("b1/2", b"1")  # rank 2 arrived, rank 1 did not
    session.store.add("b1/n", 1)
    t = time.monotonic()
    with pytest.raises(distributed.DistributedError, match=r"step x: rank\(s\) 1 did not arrive within 1 s"):
        distributed._wait_all(session, "b1", "step x", limit=1.0)
    assert time.monotonic() - t < 10
    # a collective that fails names the ranks whose last recorded collective is an earlier one

    def broken():
        raise RuntimeError("Connection closed by peer")

    session.store.set("reached/1", "0")
    session.store.set("reached/2", "1")
    with pytest.raises(distributed.DistributedError, match=r"train step: the collective failed on rank 0 .*rank\(s\) "
                                                           r"1 never reached it .*Connection closed by peer"):
        distributed._collective(session, "train step", broken)


def test_focal_class_stats_of_two_ranks_equal_one_batch(rng):
    """The reduction PriMaPsEM.sync uses, with the ranks simulated in one process."""
    logits = torch.randn(4, 5, 3, 3, generator=rng)
    target = torch.randint(0, 5, (4, 12, 12), generator=rng)
    want = primaps_fast.focal_loss(logits, target)
    sums = [None, None]
    for r, part in enumerate((slice(0, 2), slice(2, 4))):
        primaps_fast.focal_loss(logits[part], target[part],
                                class_stats=lambda s, n, r=r: (sums.__setitem__(r, (s.sum(0), n)), (s, n))[1])
    total = (torch.stack([sums[0][0], sums[1][0]]).sum(0)[None], sums[0][1] + sums[1][1])
    got = sum(primaps_fast.focal_loss(logits[p], target[p], class_stats=lambda s, n: total)
              for p in (slice(0, 2), slice(2, 4)))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
