"""Multi-process training over torch.distributed (gloo on 127.0.0.1, 2 CPU processes).

- The all-reduced meta-gradient of 2 ranks (each holding half the meta-batch) equals the
  1-process meta-gradient of the whole batch, also when the ranks have different numbers of
  finite tasks.
- ``torchrun --nproc_per_node=2 -m imaml_ext.train`` ends with the parameters of the 1-process run.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data_fixtures import make_omniglot_zips
from imaml_ext import train as tr
from imaml_ext.models import make_model

from test_train import QueryGradient, synthetic_dataset

HAVE_ALGORITHMS = importlib.util.find_spec("imaml_ext.algorithms") is not None
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = make_model("omniglot", 3).to(torch.float64)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    from imaml_ext.data import TaskSampler
    batch = TaskSampler(synthetic_dataset(), 3, 1, 2, 4, seed=seed).batch(0).to(
        dtype=torch.float64)
    return model, params, batch


def _algorithm(kind: str, bad_global: set[int], rank: int, per: int):
    if kind == "standin":
        return QueryGradient(bad_tasks={i - rank * per for i in bad_global
                                        if per == 0 or 0 <= i - rank * per < per})
    from imaml_ext.algorithms import make_algorithm
    return make_algorithm(kind, inner_steps=2, cg_steps=2)


def _worker(rank: int, world: int, port: int, out: str, kind: str, bad: set[int]):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        model, params, batch = _setup()
        info = tr.DistInfo(rank, world)
        shard = batch.shard(rank, world)
        algo = _algorithm(kind, bad, rank, batch.num_tasks // world)
        grads, metrics = algo.meta_gradient(model, params, shard)
        red, total, _ = tr.reduce_meta_gradient(grads, metrics["task_ok"], info)
        torch.save({"grads": red, "total": total}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind,bad", [
    ("standin", set()),
    ("standin", {0}),  # rank 0 has 1 finite task, rank 1 has 2: weighted, not a plain mean
    pytest.param("imaml-gd", set(), marks=pytest.mark.skipif(
        not HAVE_ALGORITHMS, reason="imaml_ext.algorithms not available")),
])
def test_two_rank_meta_gradient_equals_one_process(tmp_path, kind, bad):
    # fork, not spawn: the children need not import torch again (seconds each on 2 cores).
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path), kind, bad), nprocs=2,
                       join=True, start_method="fork")
    model, params, batch = _setup()
    algo = _algorithm(kind, bad, 0, 0)
    ref, metrics = algo.meta_gradient(model, params, batch)
    assert int(metrics["task_ok"].sum()) == 4 - len(bad)
    for r in (0, 1):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert float(got["total"]) == 4 - len(bad)
        for k, v in ref.items():
            torch.testing.assert_close(got["grads"][k], v, rtol=1e-9, atol=1e-12)


class _Scores:
    """evaluate() of a stand-in algorithm: loss and accuracy from each task's first support
    image, and a record of the tasks it adapted."""

    def __init__(self):
        self.seen = []

    def evaluate(self, model, params, batch):
        key = batch.x_support.reshape(batch.num_tasks, -1)[:, :50].double().sum(1)
        self.seen.append(key)
        return key, (key % 1.0)


def _val_sampler(meta_batch):
    from imaml_ext.data import TaskSampler
    return TaskSampler(synthetic_dataset(), 3, 1, 2, meta_batch, seed=5, per_task_seed=True)


def _eval_worker(rank: int, world: int, port: int, out: str, num_tasks: int, meta_batch: int):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        from imaml_ext.evaluate import evaluate_tasks

        def gather(local):
            every = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(every, local)
            return torch.stack(every)
        algo = _Scores()
        res = evaluate_tasks(algo, None, {}, _val_sampler(meta_batch), num_tasks,
                             shard=(rank, world), gather=gather)
        torch.save({"res": res.to_dict(), "seen": torch.cat(algo.seen) if algo.seen else None},
                   f"{out}/eval{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,num_tasks,meta_batch", [(2, 11, 3), (3, 5, 2), (2, 2, 4)])
def test_sharded_evaluation_equals_one_process(tmp_path, world, num_tasks, meta_batch):
    # validation under torchrun: each rank adapts every world-th meta-batch (the last batch
    # part-used, ranks with one batch fewer or none), the per-task results are gathered
    mp.start_processes(_eval_worker, args=(world, free_port(), str(tmp_path), num_tasks,
                                           meta_batch), nprocs=world, join=True,
                       start_method="fork")
    from imaml_ext.evaluate import evaluate_tasks
    one = _Scores()
    ref = evaluate_tasks(one, None, {}, _val_sampler(meta_batch), num_tasks).to_dict()
    batches = -(-num_tasks // meta_batch)
    seen = []
    for r in range(world):
        got = torch.load(tmp_path / f"eval{r}.pt", weights_only=False)
        for k in ("accuracy", "ci95", "loss", "num_tasks", "nonfinite_tasks"):
            assert got["res"][k] == pytest.approx(ref[k], rel=1e-12), (r, k)
        mine = len(range(r, batches, world))  # this rank adapted its share, no more
        assert (0 if got["seen"] is None else got["seen"].numel()) == mine * meta_batch
        if got["seen"] is not None:
            seen.append(got["seen"])
    assert torch.equal(torch.cat(seen).sort().values, torch.cat(one.seen).sort().values)


def test_evaluation_shard_arguments_are_checked():
    from imaml_ext.evaluate import evaluate_tasks
    with pytest.raises(ValueError, match=r"shard must be \(rank, world\)"):
        evaluate_tasks(_Scores(), None, {}, _val_sampler(2), 4, shard=(2, 2), gather=lambda t: t)
    with pytest.raises(ValueError, match="needs gather"):
        evaluate_tasks(_Scores(), None, {}, _val_sampler(2), 4, shard=(0, 2))


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_ALGORITHMS, reason="imaml_ext.algorithms not available")
def test_torchrun_two_processes_match_one(tmp_path):
    data = tmp_path / "data"
    make_omniglot_zips(data)
    args = ["--data-root", str(data), "--val-classes", "3", "--ways", "3", "--shots", "1",
            "--queries", "2", "--algo", "imaml-gd", "--inner-steps", "2", "--cg-steps", "2",
            "--meta-batch", "4", "--steps", "2", "--dtype", "float64", "--val-every", "1",
            "--val-tasks", "7", "--log-every", "1", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(ROOT))
    one = subprocess.run([sys.executable, "-m", "imaml_ext.train", *args, "--out",
                          str(tmp_path / "one")], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run([str(torchrun), "--nnodes=1", "--nproc_per_node=2",
                          "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                          "-m", "imaml_ext.train", *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    a = torch.load(tmp_path / "one" / "checkpoints" / "ckpt_00000002.pt", weights_only=False)
    b = torch.load(tmp_path / "two" / "checkpoints" / "ckpt_00000002.pt", weights_only=False)
    for k, v in a["params"].items():
        # the all-reduce sums two halves: rounding-level differences, which Adam's per-element
        # normalisation lifts to ~1e-8 relative where a gradient element is near zero
        torch.testing.assert_close(b["params"][k], v, rtol=1e-7, atol=1e-9)
    rows = tr.read_metrics(tmp_path / "two")
    assert [(r["kind"], r["step"]) for r in rows] == [("train", 1), ("val", 1), ("train", 2),
                                                      ("val", 2)]
    # validation shared out over the ranks (batches of 4 and 3 tasks, one per rank) scores
    # the same tasks as one process
    val_one = [r for r in tr.read_metrics(tmp_path / "one") if r["kind"] == "val"]
    assert len(val_one) == 2
    for a, b in zip(val_one, rows[1::2]):
        for k in ("val_loss", "val_acc", "val_ci95"):
            assert b[k] == pytest.approx(a[k], rel=1e-9, abs=1e-12), (k, a, b)
    assert not (tmp_path / "two" / "metrics.csv.rank1").exists()


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("who", ["every process", "rank 1"])
def test_torchrun_sigterm_stops_every_rank_with_a_checkpoint(tmp_path, who):
    # "every process" (a scheduler's time limit signals the whole job; torchrun forwards it to
    # each rank's process group, DataLoader workers included): every rank got it twice, took the
    # second for "quit at once", and the workers' exit lost even prefetched batches: no
    # checkpoint. "rank 1": rank 0 stopped with it but reported "done", exit 0.
    data = tmp_path / "data"
    make_omniglot_zips(data)
    out = tmp_path / "run"
    args = ["--data-root", str(data), "--val-classes", "2", "--ways", "3", "--shots", "1",
            "--queries", "2", "--algo", "fomaml", "--inner-steps", "1", "--meta-batch", "4",
            "--steps", "100000", "--val-every", "0", "--ckpt-every", "0", "--log-every", "1",
            "--num-workers", "1", "--quiet", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(ROOT))
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.Popen([str(torchrun), "--nnodes=1", "--nproc_per_node=2",
                             "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                             "-m", "imaml_ext.train", *args], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            log = out / "metrics.csv"
            if log.is_file() and len(log.read_text().splitlines()) > 3:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        ranks = sorted(_children(proc.pid))
        assert len(ranks) == 2, ranks
        if who == "every process":
            for pid in [proc.pid, *ranks]:
                os.kill(pid, signal.SIGTERM)
        else:
            rank1 = [p for p in ranks
                     if b"RANK=1" in Path(f"/proc/{p}/environ").read_bytes().split(b"\0")]
            os.kill(rank1[0], signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0  # stopped, not done: a scheduler requeues it
    assert "received twice" not in err and "exited unexpectedly" not in err, err[-3000:]
    ckpts = list((out / "checkpoints").glob("ckpt_*.pt"))
    assert len(ckpts) == 1, err[-4000:]
    (ckpt,) = ckpts
    step = torch.load(ckpt, weights_only=False)["step"]
    assert f"SIGTERM received: stopped after meta-step {step}; checkpoint" in err, err[-3000:]
    assert "imaml: done" not in err
    assert tr.read_metrics(out)[-1]["step"] == step
