"""The trainer: NaN policy, logs and config dump, signals, and a short real-Omniglot run.

The mechanics tests use a tiny synthetic data set and, where the trainer's arithmetic is what is
tested, a cheap stand-in algorithm (the query-loss gradient at theta, no adaptation) with the
interface of ``imaml_ext.algorithms``; the real-data test uses the real algorithms.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

from imaml_ext import train as tr
from imaml_ext.config import TrainConfig
from imaml_ext.data import FewShotDataset

DATA = os.environ.get("IMAML_DATA")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a loaded 2-core machine OpenMP's spinning threads make these tiny
    steps ~10x slower than one thread does."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def synthetic_dataset(classes: int = 12, per_class: int = 6, seed: int = 0,
                      split: str = "train") -> FewShotDataset:
    """Random 28x28 binary 'characters' (uint8), Omniglot-shaped."""
    g = torch.Generator().manual_seed(seed)
    proto = (torch.rand(classes, 1, 1, 28, 28, generator=g) < 0.3)
    noise = torch.rand(classes, per_class, 1, 28, 28, generator=g) < 0.05
    images = ((proto ^ noise).to(torch.uint8) * 255)
    # the training split's classes are c0..; other splits' are named apart (the checks of
    # resume and evaluation compare class names with the ones a checkpoint trained on)
    prefix = "c" if split == "train" else f"{split}-c"
    return FewShotDataset(images=images, class_names=[f"{prefix}{i}" for i in range(classes)],
                          name="omniglot", split=split, mean=(0.0,), std=(1.0,), rotate=True,
                          source="synthetic")


class QueryGradient:
    """Stand-in algorithm: meta-gradient = mean over tasks of grad L_query(theta).

    ``bad_steps`` marks calls whose gradient is made NaN; ``bad_tasks`` marks task indices that
    come out not ok (left out of the average, as the real algorithms do).
    """

    def __init__(self, bad_calls=(), bad_tasks=()):
        self.calls = 0
        self.bad_calls, self.bad_tasks = set(bad_calls), set(bad_tasks)

    def _loss_acc(self, model, params, x, y):
        out = functional_call(model, params, (x,))
        loss = F.cross_entropy(out, y)
        return loss, (loss, (out.argmax(-1) == y).to(out.dtype).mean())

    def _per_task(self, model, params, tasks):
        # A loop, not vmap: for these tiny tasks it is several times faster on a CPU.
        outs = [grad(lambda p: self._loss_acc(model, p, x, y), has_aux=True)(params)
                for x, y in zip(tasks.x_query, tasks.y_query)]
        g = {k: torch.stack([o[0][k] for o in outs]) for k in params}
        loss = torch.stack([o[1][0] for o in outs])
        acc = torch.stack([o[1][1] for o in outs])
        return g, loss, acc

    def meta_gradient(self, model, params, tasks):
        g, loss, acc = self._per_task(model, params, tasks)
        m = loss.shape[0]
        ok = torch.ones(m, dtype=torch.bool)
        for i in self.bad_tasks:
            if i < m:
                ok[i] = False
        w = ok.to(loss.dtype) / ok.sum().clamp_min(1)
        grads = {k: torch.einsum("m,m...->...", w, v) for k, v in g.items()}
        if self.calls in self.bad_calls:
            grads = {k: v * float("nan") for k, v in grads.items()}
        self.calls += 1
        z = torch.zeros(m, dtype=loss.dtype)
        return grads, {"inner_loss": loss.detach(), "query_loss": loss.detach(),
                       "query_acc": acc.detach(), "cg_residual": z, "cg_iterations": z,
                       "cg_status": z, "task_ok": ok}

    def evaluate(self, model, params, tasks):
        _, loss, acc = self._per_task(model, params, tasks)
        return loss.detach(), acc.detach()


def tiny_config(tmp_path, **kw) -> TrainConfig:
    base = dict(dataset="omniglot", ways=3, shots=1, queries=2, algo="fomaml", steps=6,
                meta_batch=2, inner_steps=1, meta_lr=1e-2, val_every=0, ckpt_every=2,
                log_every=1, quiet=True, out=str(tmp_path / "run"))
    base.update(kw)
    return TrainConfig(**base)


def make_trainer(tmp_path, algorithm=None, resume=None, **kw) -> tr.Trainer:
    cfg = tiny_config(tmp_path, **kw)
    return tr.Trainer(cfg, resume=resume, algorithm=algorithm or QueryGradient(),
                      dist_info=tr.DistInfo(), train_data=synthetic_dataset(),
                      val_data=synthetic_dataset(seed=1, split="val"))


def params_of(trainer: tr.Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.params.items()}


def test_meta_optimizer_matches_torch_adam_and_skips():
    torch.manual_seed(0)
    p0 = {"a": torch.randn(5, 3, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}
    ours = {k: v.clone() for k, v in p0.items()}
    theirs = [v.clone().requires_grad_() for v in p0.values()]
    opt = tr.MetaOptimizer(ours, lr=1e-2)
    ref = torch.optim.Adam(theirs, lr=1e-2)
    for i in range(5):
        gs = {k: torch.randn_like(v) for k, v in p0.items()}
        ok = torch.tensor(i != 2)
        before = {k: v.clone() for k, v in ours.items()}
        opt.step(ours, gs, ok)
        if not ok:
            assert all(torch.equal(before[k], ours[k]) for k in ours)
            continue
        for t, g in zip(theirs, gs.values()):
            t.grad = g.clone()
        ref.step()
    for t, v in zip(theirs, ours.values()):
        torch.testing.assert_close(v, t.detach(), rtol=1e-12, atol=1e-12)
    assert float(opt.t) == 4.0


def test_logs_config_dump_and_validation(tmp_path):
    t = make_trainer(tmp_path, val_every=3, val_tasks=4, log_format="jsonl")
    rows = []
    summary = t.run(on_log=rows.append)
    run = tmp_path / "run"
    dump = json.loads((run / "config.json").read_text())
    assert dump["config"]["algo"] == "fomaml" and dump["config"]["lam"] == 2.0
    assert dump["config"]["inner_steps"] == 1 and "torch" in dump["versions"]
    logged = tr.read_metrics(run)
    assert [r["step"] for r in logged if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    vals = [r for r in logged if r["kind"] == "val"]
    assert [r["step"] for r in vals] == [3, 6] and 0 <= vals[0]["val_acc"] <= 1
    assert summary["step"] == 6 and summary["bad_steps"] == 0
    assert len(rows) == 8


class CurvedQueryGradient(QueryGradient):
    """QueryGradient whose tasks report negative curvature in CG from call `from_call` on."""

    def __init__(self, from_call):
        super().__init__()
        self.from_call = from_call

    def meta_gradient(self, model, params, tasks):
        call = self.calls
        grads, metrics = super().meta_gradient(model, params, tasks)
        m = metrics["task_ok"].shape[0]
        metrics["cg_iterations"] = torch.full((m,), 3.0)
        metrics["cg_negative_curvature"] = torch.full((m,), call >= self.from_call)
        return grads, metrics


@pytest.mark.parametrize("from_call", [2, 100])
def test_negative_curvature_is_logged_and_warned_once(tmp_path, caplog, from_call):
    t = make_trainer(tmp_path, algorithm=CurvedQueryGradient(from_call), steps=5, ckpt_every=0)
    with caplog.at_level(logging.WARNING, logger="imaml_ext.train"):
        t.run()
    rows = tr.read_metrics(tmp_path / "run")
    want = [1.0 if i >= from_call else 0.0 for i in range(5)]
    assert [r["cg_negative_curvature"] for r in rows] == want
    warned = [r for r in caplog.records if "negative curvature" in r.getMessage()]
    if from_call == 2:
        # Once, at the first window over the threshold, naming the authors' recipe.
        assert len(warned) == 1 and "window ending at step 3" in warned[0].getMessage()
        assert "--cg-damping 1 --cg-lam 12" in warned[0].getMessage()
        # once per run: a resumed run remembers it (it came again in every session)
        caplog.clear()
        r = make_trainer(tmp_path, algorithm=CurvedQueryGradient(from_call), steps=9,
                         ckpt_every=0, resume=tmp_path / "run")
        with caplog.at_level(logging.WARNING, logger="imaml_ext.train"):
            r.run()
        assert not [x for x in caplog.records if "negative curvature" in x.getMessage()]
    else:
        assert not warned


class FailingLineSearch(QueryGradient):
    """QueryGradient whose first task reports Newton-CG line-search failures (iMAML-HF's)."""

    def meta_gradient(self, model, params, tasks):
        grads, metrics = super().meta_gradient(model, params, tasks)
        m = metrics["task_ok"].shape[0]
        metrics["hf_ls_failures"] = torch.zeros(m, dtype=torch.int32).index_fill(
            0, torch.tensor([0]), 2)
        return grads, metrics


def test_inner_line_search_failures_are_logged_and_an_older_log_keeps_its_columns(tmp_path):
    t = make_trainer(tmp_path, algorithm=FailingLineSearch(), steps=2, ckpt_every=2)
    t.run()
    rows = tr.read_metrics(tmp_path / "run")
    m = t.cfg.meta_batch
    assert [r["inner_ls_failures"] for r in rows] == [pytest.approx(1 / m)] * 2
    # algorithms without a line search log 0
    t = make_trainer(tmp_path / "plain", steps=1, ckpt_every=1)
    t.run()
    assert [r["inner_ls_failures"] for r in tr.read_metrics(tmp_path / "plain" / "run")] == [0.0]
    # a log written before the column existed: the resumed run writes the log's own columns
    log = tmp_path / "run" / "metrics.csv"
    lines = log.read_text().splitlines()
    old = [",".join(ln.split(",")[:-1]) for ln in lines]
    log.write_text("\n".join(old) + "\n")
    state = torch.load(tmp_path / "run" / "checkpoints" / "ckpt_00000002.pt", weights_only=False)
    state["log"]["position"] = log.stat().st_size
    torch.save(state, tmp_path / "run" / "checkpoints" / "ckpt_00000002.pt")
    t = make_trainer(tmp_path, algorithm=FailingLineSearch(), steps=3, ckpt_every=0,
                     resume=tmp_path / "run")
    t.run()
    header, *body = log.read_text().splitlines()
    assert "inner_ls_failures" not in header
    assert all(len(b.split(",")) == len(header.split(",")) for b in body) and len(body) == 3
    assert [r["step"] for r in tr.read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_negative_curvature_warning_names_what_applies_to_imaml_hf(tmp_path, caplog):
    t = make_trainer(tmp_path, algorithm=CurvedQueryGradient(0), steps=2, ckpt_every=0,
                     algo="imaml-hf")
    with caplog.at_level(logging.WARNING, logger="imaml_ext.train"):
        t.run()
    (msg,) = [r.getMessage() for r in caplog.records if "negative curvature" in r.getMessage()]
    assert "--hvp ggn" in msg and "--proximal" not in msg and "82% query accuracy" in msg


def test_nan_policy_skips_bad_steps_and_counts_tasks(tmp_path):
    algo = QueryGradient(bad_calls={1, 2}, bad_tasks={1})
    t = make_trainer(tmp_path, algorithm=algo, steps=4, ckpt_every=0)
    snaps = []
    t.run(on_log=lambda row: snaps.append(params_of(t)))
    # Steps 2 and 3 (calls 1, 2) had NaN meta-gradients: the parameters did not move.
    assert all(torch.equal(snaps[0][k], snaps[2][k]) for k in snaps[0])
    assert not all(torch.equal(snaps[2][k], snaps[3][k]) for k in snaps[0])
    assert float(t.opt.t) == 2.0
    rows = tr.read_metrics(tmp_path / "run")
    assert rows[-1]["bad_steps"] == 2 and rows[-1]["skipped_tasks"] == 4  # 1 of 2 tasks x 4
    assert all(torch.isfinite(v).all() for v in t.params.values())


@pytest.mark.parametrize("algo_name", ["fomaml", "imaml-gd"])
def test_consecutive_bad_steps_abort(tmp_path, algo_name):
    algo = QueryGradient(bad_calls=set(range(100)))
    t = make_trainer(tmp_path, algorithm=algo, steps=20, max_bad_steps=3, log_every=5,
                     algo=algo_name)
    # judged where a window is logged: at step 4 (a checkpoint step, log_every 5, ckpt_every 2)
    with pytest.raises(tr.TrainingDivergedError, match="[345] consecutive") as info:
        t.run()
    # the advice names --lam only where it is an option (the baselines refuse it)
    assert ("raise --lam" in str(info.value)) == (algo_name == "imaml-gd")


def test_sigint_finishes_step_writes_checkpoint_and_resumes_exactly(tmp_path):
    ref = make_trainer(tmp_path / "a", steps=5, ckpt_every=0)
    ref.run()

    t = make_trainer(tmp_path / "b", steps=5, ckpt_every=0)

    def on_log(row):
        if row["step"] == 1:
            time.sleep(0.3)  # the first process's training time: far above a tiny step's
        if row["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(tr.Interrupted) as info:
        t.run(on_log=on_log)
    assert info.value.step == 3 and info.value.path.name == "ckpt_00000003.pt"
    r = make_trainer(tmp_path / "b", steps=5, resume=tmp_path / "b" / "run")
    assert r.step == 3
    r.run()
    for k, v in ref.params.items():
        assert torch.equal(v, r.params[k]), k
    rows = tr.read_metrics(tmp_path / "b" / "run")
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]
    # config.json is the last session's; sessions.jsonl keeps each one's start and command
    sessions = [json.loads(ln) for ln in
                (tmp_path / "b" / "run" / "sessions.jsonl").read_text().splitlines()]
    assert [(x["start_step"], x["resumed_from"] is None) for x in sessions] == [(0, True),
                                                                                 (3, False)]
    # elapsed_s goes on from the checkpoint's after the resume (it restarted at 0)
    elapsed = [row["elapsed_s"] for row in rows]
    assert elapsed[2] >= 0.3 and elapsed == sorted(elapsed), elapsed


def test_ctrl_c_with_prefetching_workers_still_checkpoints(tmp_path, capfd):
    """Ctrl-C signals the whole process group: the DataLoader workers as well. They leave it to
    the trainer (they inherited its handler and printed its message, or with the default one
    died while the step still needed a batch): the run stops after the step, checkpointed."""
    t = make_trainer(tmp_path, steps=6, ckpt_every=0, num_workers=1)

    def on_log(row):
        if row["step"] == 2:
            (worker,) = t.sampler._loader._iterator._workers
            os.kill(worker.pid, signal.SIGINT)  # the group, without pytest's parents
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(tr.Interrupted) as info:
        t.run(on_log=on_log)
    assert info.value.step == 3 and info.value.path.is_file()
    assert capfd.readouterr().err.count("SIGINT received") == 1  # the trainer's, not the worker's


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_sigterm_to_the_workers_too_still_checkpoints(tmp_path, signame):
    """A scheduler's time limit (Slurm signals every process of the job), `timeout` (the whole
    group) or torchrun (each rank's group) sends SIGTERM to the DataLoader workers as well as the
    trainer. A worker killed by it made torch's SIGCHLD handler raise in the trainer mid-step:
    no checkpoint, a traceback. SIGHUP (a closed terminal or ssh session; torchrun forwards it)
    killed the run without a checkpoint: it stops as SIGTERM does."""
    if not hasattr(signal, signame):
        pytest.skip(f"no {signame} here")
    signum = getattr(signal, signame)
    t = make_trainer(tmp_path, steps=6, ckpt_every=0, num_workers=1)

    def on_log(row):
        if row["step"] == 2:
            (worker,) = t.sampler._loader._iterator._workers
            os.kill(worker.pid, signum)
            worker.join(10)  # gone before the trainer goes on
            os.kill(os.getpid(), signum)

    with pytest.raises(tr.Interrupted) as info:
        t.run(on_log=on_log)
    assert info.value.signum == signum and info.value.step == 3
    assert torch.load(info.value.path, weights_only=False)["step"] == 3


@pytest.mark.parametrize("lost", [
    RuntimeError("DataLoader worker (pid(s) 12345) exited unexpectedly"),
    ConnectionResetError(104, "Connection reset by peer"),  # a prefetched batch's shared memory
])
def test_a_batch_lost_with_the_workers_is_drawn_in_the_trainer(tmp_path, lost):
    # The signal came while the trainer waited for a batch that a worker, stopped by the same
    # signal, will never send (under torchrun even prefetched ones are lost with it): the batch
    # is drawn in the training process, the same tasks, and the step in flight completes.
    t = make_trainer(tmp_path / "a", steps=6, ckpt_every=0, log_every=5)
    drawn = t.sampler.iter_batches

    def iter_batches(start, num):
        for i, batch in enumerate(drawn(start, num)):
            if i == 2:
                os.kill(os.getpid(), signal.SIGTERM)
                raise lost
            yield batch

    t.sampler.iter_batches = iter_batches
    with pytest.raises(tr.Interrupted) as info:
        t.run()
    assert info.value.signum == signal.SIGTERM and info.value.step == 3
    state = torch.load(info.value.path, weights_only=False)
    assert state["step"] == 3 and state["counters"]["tasks"] == 3 * 2
    straight = make_trainer(tmp_path / "b", steps=3, ckpt_every=0)
    straight.run()
    for k, v in straight.params.items():
        assert torch.equal(state["params"][k], v.cpu()), k


def test_a_worker_failure_without_a_signal_is_not_taken_for_a_stop(tmp_path):
    t = make_trainer(tmp_path, steps=6, ckpt_every=0)
    drawn = t.sampler.iter_batches

    def iter_batches(start, num):
        for i, batch in enumerate(drawn(start, num)):
            if i == 2:
                raise RuntimeError("DataLoader worker (pid(s) 12345) exited unexpectedly")
            yield batch

    t.sampler.iter_batches = iter_batches
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        t.run()


def test_a_second_signal_quits_at_once_with_its_own_exception(tmp_path):
    # it raised a bare KeyboardInterrupt: a traceback, and exit 130 even after SIGTERM
    t = make_trainer(tmp_path, steps=5, ckpt_every=0)
    before = signal.getsignal(signal.SIGTERM)

    def on_log(row):
        if row["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(tr.ForcedStop) as info:
        t.run(on_log=on_log)
    assert info.value.signum == signal.SIGTERM and isinstance(info.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers were restored


def test_the_same_signal_again_within_the_repeat_window_is_the_same_stop():
    # under torchrun a scheduler's SIGTERM reaches each rank twice (directly, and forwarded by
    # torchrun's agent): the second was taken for "quit at once", no checkpoint
    with tr._signal_flag(True, repeat_s=30.0) as sig:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert sig["signum"] == signal.SIGTERM
        with pytest.raises(tr.ForcedStop):  # another signal still quits at once
            os.kill(os.getpid(), signal.SIGINT)
    with tr._signal_flag(True) as sig:  # one process: no window, the second quits
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(tr.ForcedStop):
            os.kill(os.getpid(), signal.SIGTERM)


class FakeSummaryWriter:
    """Records what the trainer sends to TensorBoard (tensorboard itself is not a dependency)."""
    made: list = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        FakeSummaryWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def test_tensorboard_gets_every_row_and_a_resume_purges_the_lost_steps(tmp_path, monkeypatch):
    import sys
    import types
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    FakeSummaryWriter.made = []
    t = make_trainer(tmp_path, steps=3, ckpt_every=2)
    t.run()
    w = FakeSummaryWriter.made[-1]
    assert w.log_dir == str(tmp_path / "run" / "tensorboard") and w.purge_step is None
    assert w.closed
    train = [(tag, step) for tag, _, step in w.scalars if tag == "train/meta_loss"]
    assert train == [("train/meta_loss", s) for s in (1, 2, 3)]
    logged = {r["step"]: r["meta_loss"] for r in tr.read_metrics(tmp_path / "run")}
    assert all(logged[step] == pytest.approx(v, rel=1e-5)
               for tag, v, step in w.scalars if tag == "train/meta_loss")
    # Resuming from the step-2 checkpoint: TensorBoard must drop the old run's step 3.
    ckpt = tmp_path / "run" / "checkpoints" / "ckpt_00000002.pt"
    assert ckpt.exists()
    r = make_trainer(tmp_path, steps=3, resume=ckpt)
    r.run()
    w2 = FakeSummaryWriter.made[-1]
    assert w2 is not w and w2.purge_step == 3
    assert [s for tag, _, s in w2.scalars if tag == "train/meta_loss"] == [3]


@pytest.mark.slow
@pytest.mark.skipif(not DATA, reason="IMAML_DATA is not set (real Omniglot needed)")
def test_short_real_omniglot_run_beats_chance(tmp_path):
    """FOMAML, 5-way 1-shot, a few dozen meta-steps: query accuracy far above chance (0.2)."""
    cfg = TrainConfig(dataset="omniglot", ways=5, shots=1, queries=3, algo="fomaml", steps=40,
                      meta_batch=4, inner_steps=3, inner_lr=0.4, meta_lr=3e-3, val_every=0,
                      ckpt_every=0, log_every=5, quiet=True, out=str(tmp_path / "run"),
                      data_root=DATA)
    t = tr.Trainer(cfg, dist_info=tr.DistInfo())
    t.run()
    from imaml_ext.evaluate import evaluate_tasks
    test = tr.load_split(t.cfg, "test")
    res = evaluate_tasks(t.algorithm, t.model, t.params, tr.make_sampler(t.cfg, test, 20), 60)
    rows = [r for r in tr.read_metrics(tmp_path / "run") if r["kind"] == "train"]
    late = sum(r["query_acc"] for r in rows[-2:]) / 2
    assert late > 0.5, rows
    assert res.accuracy > 0.5, res


def test_max_time_stops_with_a_checkpoint(tmp_path):
    t = make_trainer(tmp_path, steps=100, ckpt_every=0, max_time=1e-9)
    summary = t.run()
    assert summary["time_limited"] and summary["step"] == 1
    assert summary["checkpoint"].endswith("ckpt_00000001.pt")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_trainer_cudnn_benchmark_option_sets_the_switch(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    make_trainer(tmp_path, device="cuda")
    assert torch.backends.cudnn.benchmark is False
    make_trainer(tmp_path / "b", device="cuda", cudnn_benchmark=True)
    assert torch.backends.cudnn.benchmark is True


# ---- what a checkpoint trained on (review, 2026-11-28) ----------------------------------------

def test_resume_and_evaluation_refuse_data_that_contradicts_the_training_classes(tmp_path,
                                                                                monkeypatch):
    # Checkpoints did not record their data: trained on the shipped subset and evaluated with
    # IMAML_DATA set, 33 of the 128 training characters were in the test split, scored silently;
    # a resume switched from 128 to 1,100 training classes without a word.
    from imaml_ext.config import UsageError
    from imaml_ext.evaluate import evaluate_checkpoint
    make_trainer(tmp_path, steps=2, ckpt_every=2).run()
    run = tmp_path / "run"
    state = torch.load(run / "checkpoints" / "ckpt_00000002.pt", weights_only=False)
    assert state["data"] == {"source": "synthetic",
                             "train_classes": [f"c{i}" for i in range(12)]}
    cfg = tiny_config(tmp_path, steps=4)
    with pytest.raises(UsageError, match=r"--resume: this run trained on 12 classes from "
                                         r"synthetic; the training split found now has 10"):
        tr.Trainer(cfg, resume=str(run), algorithm=QueryGradient(), dist_info=tr.DistInfo(),
                   train_data=synthetic_dataset(classes=10))
    monkeypatch.setattr(tr, "build_algorithm", lambda cfg: QueryGradient())
    leaky = synthetic_dataset(split="test")
    leaky.class_names[3] = "c3"  # one training class in the test split
    monkeypatch.setattr(tr, "load_split", lambda cfg, split: leaky)
    with pytest.raises(UsageError, match=r"the test split \(12 classes from synthetic\) shares 1 "
                                         r"classes with the 12 this checkpoint trained on"):
        evaluate_checkpoint(run, tasks=2, meta_batch=2)
    monkeypatch.setattr(tr, "load_split", lambda cfg, split: synthetic_dataset(split=split))
    res, _ = evaluate_checkpoint(run, tasks=2, meta_batch=2)  # held out: fine
    assert res.num_tasks == 2
    # a checkpoint written before the record (no "data") is not checked
    del state["data"]
    monkeypatch.setattr(tr.ck, "load_latest", lambda path: dict(state, path=str(path)))
    monkeypatch.setattr(tr, "load_split", lambda cfg, split: leaky)
    evaluate_checkpoint(run, tasks=2, meta_batch=2)


def test_a_named_data_root_without_omniglot_is_an_error_not_the_shipped_subset(tmp_path,
                                                                              monkeypatch):
    # a mistyped --data-root trained on the 200-character subset with a warning and exit 0
    import imaml_ext.data as data_mod
    from imaml_ext.data import DatasetNotFoundError
    monkeypatch.delenv("IMAML_DATA", raising=False)
    empty = tmp_path / "typo"
    empty.mkdir()
    monkeypatch.setattr("imaml_ext.data.omniglot.download_omniglot",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    with pytest.raises(DatasetNotFoundError):
        tr.load_split(tiny_config(tmp_path, data_root=str(empty)), "train")
    seen = []
    real = data_mod.load_dataset
    monkeypatch.setattr(data_mod, "load_dataset",
                        lambda *a, **k: seen.append(k["allow_embedded"]) or real(*a, **k))
    monkeypatch.setenv("IMAML_DATA", str(empty))
    with pytest.raises(DatasetNotFoundError):
        tr.load_split(tiny_config(tmp_path), "train")
    monkeypatch.delenv("IMAML_DATA")
    monkeypatch.setattr(data_mod, "load_dataset", lambda *a, **k: seen.append(k["allow_embedded"]))
    tr.load_split(tiny_config(tmp_path), "train")  # no root named: the demo's fallback stays
    assert seen == [False, True]


def test_evaluation_scores_the_same_tasks_whatever_its_meta_batch(tmp_path, monkeypatch):
    from imaml_ext.evaluate import evaluate_checkpoint
    make_trainer(tmp_path, steps=2, ckpt_every=2).run()
    monkeypatch.setattr(tr, "build_algorithm", lambda cfg: QueryGradient())
    monkeypatch.setattr(tr, "load_split", lambda cfg, split: synthetic_dataset(split=split))
    got = [evaluate_checkpoint(tmp_path / "run", tasks=8, meta_batch=m)[0] for m in (2, 4, 8)]
    assert len({(r.accuracy, r.ci95, r.loss) for r in got}) == 1, got


def test_checkpoint_counters_include_the_window_in_flight(tmp_path):
    # counters were saved as of the last metrics row: with --log-every 2 --ckpt-every 3,
    # ckpt_00000003 said 4 tasks for 6, and a resumed run lost the difference for good
    t = make_trainer(tmp_path, steps=5, log_every=2, ckpt_every=3)
    t.run()
    state = torch.load(tmp_path / "run" / "checkpoints" / "ckpt_00000003.pt", weights_only=False)
    assert state["counters"]["tasks"] == 3 * 2  # 3 steps of meta-batch 2


def test_consecutive_bad_steps_survive_a_resume(tmp_path):
    # the run of non-finite steps restarted from zero on resume, so an abort never came
    algo = QueryGradient(bad_calls=set(range(100)))
    t = make_trainer(tmp_path, algorithm=algo, steps=2, max_bad_steps=3, ckpt_every=2)
    t.run()
    t2 = make_trainer(tmp_path, algorithm=QueryGradient(bad_calls=set(range(100))), steps=6,
                      max_bad_steps=3, resume=str(tmp_path / "run"))
    with pytest.raises(tr.TrainingDivergedError, match="3 consecutive meta-steps .* up to step 3"):
        t2.run()


def test_an_abort_right_after_a_resume_names_the_checkpoint_it_resumed_from(tmp_path):
    # "the last checkpoint is None" though the run had one (it had not written its own yet)
    algo = QueryGradient(bad_calls=set(range(100)))
    make_trainer(tmp_path, algorithm=algo, steps=2, max_bad_steps=3, ckpt_every=2).run()
    t2 = make_trainer(tmp_path, algorithm=QueryGradient(bad_calls=set(range(100))), steps=6,
                      max_bad_steps=3, ckpt_every=0, resume=str(tmp_path / "run"))
    with pytest.raises(tr.TrainingDivergedError, match=r"checked at each logged step.*the last "
                                                       r"checkpoint is .*ckpt_00000002\.pt"):
        t2.run()


def test_the_config_dump_is_written_atomically(tmp_path, monkeypatch):
    # Path.write_text: a crash mid-write (each resume rewrites it) left a torn config.json
    cfg = tiny_config(tmp_path)
    path = tmp_path / "config.json"
    cfg.save(path, extra={"argv": ["first"]})
    before = path.read_bytes()

    def failing_fsync(fd):
        raise OSError("disk full")
    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        cfg.save(path, extra={"argv": ["second"]})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temp file left


def test_a_resume_never_pads_a_short_log_with_nul_bytes(tmp_path, caplog):
    # The log was only flushed, not fsynced, while its checkpoint was: after a power loss the
    # saved position could lie past the log's end, and truncate() extended it with NUL bytes
    # (read_metrics then failed on the row). Now: the complete rows kept, a warning, no NUL.
    make_trainer(tmp_path, steps=4, ckpt_every=4).run()
    log_path = tmp_path / "run" / "metrics.csv"
    data = log_path.read_bytes()
    log_path.write_bytes(data[:-40])  # the last row's tail never reached the disk
    with caplog.at_level(logging.WARNING, logger="imaml_ext"):
        r = make_trainer(tmp_path, steps=6, resume=str(tmp_path / "run"))
    assert "shorter than the" in caplog.text
    r.run()
    data = log_path.read_bytes()
    assert b"\0" not in data
    steps = [row["step"] for row in tr.read_metrics(tmp_path / "run")]
    assert steps == [1, 2, 3, 5, 6]  # step 4's row was the one cut


def test_validation_prints_progress_unless_quiet(tmp_path, capsys, monkeypatch):
    from imaml_ext import evaluate as ev
    loud = make_trainer(tmp_path, steps=1, quiet=False, val_tasks=6, val_every=1)
    quiet = make_trainer(tmp_path / "q", steps=1, quiet=True, val_tasks=6, val_every=1)
    clock = iter(range(0, 10_000, 40))  # each reading 40 s after the last
    monkeypatch.setattr(ev.time, "perf_counter", lambda: float(next(clock)))
    assert loud.validate() is not None
    quiet.validate()
    monkeypatch.undo()
    err = capsys.readouterr().err
    # meta-batch 2: lines after 2 and 4 tasks, none at the end (the result says it)
    assert err.count("eval val: ") == 2, err
    assert "eval val: 2/6 tasks, accuracy so far" in err and "s to go" in err


def test_max_time_does_not_start_a_step_that_would_end_past_it(tmp_path, monkeypatch):
    # a step started after the limit had nearly passed: 1 s steps, --max-time 2.5 ended at 3.9 s
    clock = [0.0]
    monkeypatch.setattr(tr.time, "perf_counter", lambda: clock[0])

    class Slow(QueryGradient):
        def meta_gradient(self, *a, **k):
            clock[0] += 1.0
            return super().meta_gradient(*a, **k)
    t = make_trainer(tmp_path, algorithm=Slow(), steps=10, max_time=2.5)
    summary = t.run()
    assert t.step == 2 and clock[0] <= 2.5 + 1e-9, (t.step, clock[0])
    assert summary["time_limited"] and summary["step"] == 2


def test_a_half_set_torchrun_environment_is_a_usage_error(monkeypatch):
    # was torch's traceback ("environment variable RANK expected, but not set"), exit 1
    from imaml_ext.config import UsageError
    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(UsageError, match=r"WORLD_SIZE=2 but RANK, MASTER_ADDR, MASTER_PORT not "
                                         r"set: start several processes with torchrun"):
        tr.init_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UsageError, match="WORLD_SIZE must be an int, got 'two'"):
        tr.init_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    info, device = tr.init_distributed("cpu")
    assert (info.rank, info.world, device) == (0, 1, "cpu")


def test_damaged_validation_data_is_an_error_a_missing_split_a_warning(tmp_path, monkeypatch,
                                                                       caplog):
    # every ValueError (DatasetFormatError among them) disabled validation with a warning, so a
    # corrupt val.csv or image trained on without validation
    from imaml_ext.data import DatasetFormatError, DatasetNotFoundError
    cfg = tiny_config(tmp_path, val_every=2)

    def broken(cfg, split):
        if split == "val":
            raise DatasetFormatError("val.csv line 3: no label")
        return synthetic_dataset()
    monkeypatch.setattr(tr, "load_split", broken)
    with pytest.raises(DatasetFormatError, match="val.csv line 3"):
        tr.Trainer(cfg, algorithm=QueryGradient(), dist_info=tr.DistInfo())

    def missing(cfg, split):
        if split == "val":
            raise DatasetNotFoundError("no val split here")
        return synthetic_dataset()
    monkeypatch.setattr(tr, "load_split", missing)
    with caplog.at_level(logging.WARNING, logger="imaml_ext.train"):
        t = tr.Trainer(cfg, algorithm=QueryGradient(), dist_info=tr.DistInfo())
    assert t.val_sampler is None and "validation disabled" in caplog.text


def signal_after_validation(t: tr.Trainer) -> tr.Trainer:
    """t, whose every validation ends with a SIGINT to this process."""
    validate = t.validate

    def validate_then_signal(**kw):
        out = validate(**kw)
        os.kill(os.getpid(), signal.SIGINT)
        return out
    t.validate = validate_then_signal
    return t


def test_a_signal_during_validation_stops_after_it_not_a_step_later(tmp_path):
    # validation can take minutes; the stop flags were read only at the next meta-step, so a
    # Ctrl-C during it ran one more step (and its wait) before the checkpoint
    t = signal_after_validation(make_trainer(tmp_path, steps=6, val_every=2, ckpt_every=0,
                                             log_every=5))
    with pytest.raises(tr.Interrupted) as info:
        t.run()
    assert info.value.step == 2 and info.value.path.name == "ckpt_00000002.pt"
    rows = tr.read_metrics(tmp_path / "run")
    # the window in flight (steps 1-2, log_every 5) was logged before the checkpoint
    assert [(r["kind"], r["step"]) for r in rows] == [("val", 2), ("train", 2)]


def test_a_signal_in_the_middle_of_a_validation_abandons_it(tmp_path):
    """A validation of thousands of tasks takes minutes, and torchrun (or a scheduler) kills a
    process 30 s after its SIGTERM: the trainer finished the validation first and lost the
    checkpoint. It now stops after the validation's current meta-batch: checkpoint, no row."""
    t = make_trainer(tmp_path, steps=6, val_every=2, val_tasks=8, ckpt_every=0, log_every=5)
    assert t.val_sampler.meta_batch == 2  # four meta-batches of validation
    evaluate = t.algorithm.evaluate
    calls = []

    def evaluate_and_signal(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*a, **kw)
    t.algorithm.evaluate = evaluate_and_signal
    with pytest.raises(tr.Interrupted) as info:
        t.run()
    assert len(calls) == 1  # abandoned after its first meta-batch
    assert info.value.step == 2 and info.value.path.name == "ckpt_00000002.pt"
    rows = tr.read_metrics(tmp_path / "run")
    assert [(r["kind"], r["step"]) for r in rows] == [("train", 2)]


def test_progress_shows_cg_columns_for_imaml_even_at_zero_iterations(capsys):
    # CG that broke down at once runs 0 iterations: the line dropped cg_res and neg_curv
    # exactly then (0 iterations stood for "an algorithm without CG")
    row = {"kind": "train", "step": 1, "meta_loss": 1.0, "query_acc": 0.5, "cg_residual": 21.5,
           "cg_iterations": 0.0, "cg_negative_curvature": 1.0, "tasks_per_s": 2.0}
    tr._Progress(10, 0, False, "x", cg=True).show(row)
    tr._Progress(10, 0, False, "x", cg=False).show(row)
    first, second = capsys.readouterr().err.splitlines()
    assert "cg_res 2.15e+01" in first and "neg_curv 100%" in first
    assert "cg_res" not in second


def test_a_signal_during_the_last_validation_leaves_a_complete_run(tmp_path):
    # after the last step's validation the run is complete: it ended as interrupted (exit 130,
    # "resume with", no summary) when a signal came during that validation
    t = signal_after_validation(make_trainer(tmp_path, steps=2, val_every=2, ckpt_every=0))
    summary = t.run()
    assert summary["step"] == 2 and not summary.get("interrupted")
    assert not summary.get("time_limited")


def test_a_signal_during_the_last_step_leaves_a_complete_run(tmp_path):
    """The last step done and checkpointed, a signal that came during it raised Interrupted
    ("continue with --resume", which then had no step to run)."""
    t = make_trainer(tmp_path, steps=2, val_every=0, ckpt_every=0)
    step = t.meta_step

    def step_and_signal(*a, **kw):
        if t.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(*a, **kw)
    t.meta_step = step_and_signal
    summary = t.run()
    assert summary["step"] == 2 and not summary.get("interrupted")
    assert torch.load(summary["checkpoint"], weights_only=False)["step"] == 2


def test_a_folder_whose_run_wrote_no_checkpoint_is_taken_over(tmp_path, caplog):
    # a run killed before its first checkpoint leaves config.json and metrics: nothing to
    # resume (--resume finds no checkpoint), so a new run takes the folder over, afresh
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "metrics.csv").write_text("kind,step\ntrain,1\ntrain,2\ntrain,3\n")
    with caplog.at_level(logging.WARNING, logger="imaml_ext"):
        t = make_trainer(tmp_path, steps=2)
    assert "wrote no checkpoint" in caplog.text
    t.run()
    assert [r["step"] for r in tr.read_metrics(run)] == [1, 2]
    with pytest.raises(tr.UsageError, match="already holds a run"):  # now it has checkpoints
        make_trainer(tmp_path, steps=2)


def test_steps_0_writes_the_initialisation_and_one_val_task_shows_no_interval(tmp_path, capsys):
    # --steps 0 on a new run wrote no checkpoint ("checkpoint None"): nothing for imaml eval to
    # score the initialisation with; a validation of one task showed "+- 0.00%"
    t = make_trainer(tmp_path, steps=0)
    summary = t.run()
    assert summary["checkpoint"] and Path(summary["checkpoint"]).name == "ckpt_00000000.pt"
    for k, v in tr.ck.load_latest(tmp_path / "run")["params"].items():
        assert torch.equal(v, t.params[k]), k
    tr._Progress(2, 0, False, "x", val_tasks=1).show(
        {"kind": "val", "step": 1, "val_acc": 0.5, "val_ci95": 0.0})
    assert "val acc 50.00% (one task: no interval)" in capsys.readouterr().err
