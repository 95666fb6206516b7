"""Checkpoints: atomic writes, rotation, corrupt files, config mismatches, exact resume."""
from __future__ import annotations

import os

import pytest
import torch

from imaml_ext import checkpoint as ck
from imaml_ext import train as tr

from test_train import make_trainer, one_thread  # noqa: F401  (fixture reused)


def _state(step: int) -> dict:
    return {"step": step, "params": {"w": torch.full((3,), float(step))}, "optimizer": {},
            "config": {"algo": "fomaml", "lam": 2.0}}


def test_atomic_write_crash_keeps_old_checkpoint(tmp_path, monkeypatch):
    ck.save_checkpoint(tmp_path, _state(10))
    real_fsync = os.fsync

    def crash(fd):  # the machine "dies" after part of the new file was written
        raise OSError("simulated crash mid-write")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="simulated crash"):
        ck.save_checkpoint(tmp_path, _state(20))
    monkeypatch.setattr(os, "fsync", real_fsync)
    # No file under a checkpoint name was created or damaged, no temp file was left, and the
    # run directory still resumes from step 10.
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["ckpt_00000010.pt", "latest"]
    state = ck.load_latest(tmp_path)
    assert state["step"] == 10 and torch.equal(state["params"]["w"], torch.full((3,), 10.0))


def test_leftover_temp_file_from_a_killed_writer_is_ignored(tmp_path):
    ck.save_checkpoint(tmp_path, _state(10))
    (tmp_path / "checkpoints" / ".ckpt_00000020.pt.abc.tmp").write_bytes(b"\x80half a pickle")
    assert ck.load_latest(tmp_path)["step"] == 10


def test_rotation_keeps_last_k_and_latest(tmp_path):
    for s in (1, 2, 3, 4, 5):
        ck.save_checkpoint(tmp_path, _state(s), keep=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [4, 5]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "ckpt_00000005.pt"
    assert ck.load_latest(tmp_path)["step"] == 5


def test_corrupt_checkpoint_error_names_the_file(tmp_path):
    path = ck.save_checkpoint(tmp_path, _state(7))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ck.CheckpointError, match=r"ckpt_00000007\.pt is corrupt or truncated"):
        ck.load_latest(path)
    with pytest.raises(ck.CheckpointError, match="ckpt_00000007.pt"):
        ck.load_latest(tmp_path)  # the only one: nothing valid to fall back on
    not_ours = tmp_path / "other.pt"
    torch.save({"weights": 1}, not_ours)
    with pytest.raises(ck.CheckpointError, match="not an imaml_ext checkpoint"):
        ck.load_latest(not_ours)


def test_run_dir_falls_back_to_the_newest_valid_checkpoint(tmp_path, caplog):
    ck.save_checkpoint(tmp_path, _state(1))
    newest = ck.save_checkpoint(tmp_path, _state(2))
    newest.write_bytes(b"garbage")
    state = ck.load_latest(tmp_path)
    assert state["step"] == 1
    assert "ckpt_00000002.pt" in caplog.text


def test_config_mismatch_names_the_fields(tmp_path):
    t = make_trainer(tmp_path, steps=2, ckpt_every=2)
    t.run()
    with pytest.raises(ck.ConfigMismatchError) as info:
        make_trainer(tmp_path, steps=4, resume=tmp_path / "run", algo="imaml-gd", lam=0.5)
    msg = str(info.value)
    assert "algo: checkpoint 'fomaml', requested 'imaml-gd'" in msg
    assert "lam: checkpoint 2.0, requested 0.5" in msg
    with pytest.raises(ck.ConfigMismatchError, match="ways"):
        make_trainer(tmp_path, steps=4, resume=tmp_path / "run", ways=4)


def test_resume_equals_uninterrupted_run(tmp_path):
    full = make_trainer(tmp_path / "full", steps=6, ckpt_every=0)
    full.run()
    part = make_trainer(tmp_path / "part", steps=6, ckpt_every=2)
    part.stop_after = 4
    summary = part.run()
    assert summary["interrupted"] and summary["step"] == 4
    resumed = make_trainer(tmp_path / "part", steps=6, resume=tmp_path / "part" / "run")
    assert resumed.step == 4
    resumed.run()
    for k, v in full.params.items():
        assert torch.equal(v, resumed.params[k]), k
    assert torch.equal(full.opt.t, resumed.opt.t)
    for k in full.opt.m:
        assert torch.equal(full.opt.m[k], resumed.opt.m[k])
        assert torch.equal(full.opt.v[k], resumed.opt.v[k])
    rows = tr.read_metrics(tmp_path / "part" / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    full_rows = tr.read_metrics(tmp_path / "full" / "run")
    assert [r["meta_loss"] for r in rows] == [r["meta_loss"] for r in full_rows]


def test_rotation_after_resuming_from_an_older_step_keeps_the_new_file(tmp_path):
    # steps 200 and 300 on disk, the run resumed from 200: with keep=1 the rotation counted 300
    # as the newest and deleted the step-210 file just written, latest naming a missing file
    for s in (200, 300):
        ck.save_checkpoint(tmp_path, _state(s), keep=5)
    path = ck.save_checkpoint(tmp_path, _state(210), keep=1)
    assert path.is_file() and ck.find_checkpoint(tmp_path) == path
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [210, 300]  # 200 rotated out
    ck.save_checkpoint(tmp_path, _state(220), keep=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [210, 220, 300]
    ck.save_checkpoint(tmp_path, _state(230), keep=3)  # fewer old files than keep: none go
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [210, 220, 230, 300]


def test_a_damaged_newest_falls_back_below_it_not_to_an_abandoned_continuation(tmp_path):
    """Steps 20, 25, 30 written, the run resumed from 20 and continued to 27 (latest names it,
    30 is the abandoned continuation's): 27 damaged, the fallback took 30, a gap in the log
    (28-30 missing) and the other branch's parameters. It takes 25."""
    for s in (20, 25, 30):
        ck.save_checkpoint(tmp_path, _state(s), keep=5)
    newest = ck.save_checkpoint(tmp_path, _state(27), keep=5)
    newest.write_bytes(newest.read_bytes()[:100])
    assert ck.load_latest(tmp_path)["step"] == 25


def test_relative_paths_inside_the_checkpoints_folder(tmp_path, monkeypatch):
    """`--resume ckpt_N.pt` (or `.`) from inside checkpoints/: the run folder was taken to be
    checkpoints/ itself (Path("ckpt.pt").parent is "."), so the resumed run nested a second run
    there."""
    for s in (1, 2):
        ck.save_checkpoint(tmp_path, _state(s))
    monkeypatch.chdir(tmp_path / "checkpoints")
    assert tr.run_dir_of_checkpoint(ck.ckpt_name(2)) == tmp_path
    assert tr.run_dir_of_checkpoint(os.path.join("..", "checkpoints", ck.ckpt_name(2))) == \
        tmp_path
    assert ck.find_checkpoint(".").resolve() == (tmp_path / "checkpoints" / ck.ckpt_name(2))
    assert ck.load_latest(".")["step"] == 2
    monkeypatch.chdir(tmp_path)
    assert tr.run_dir_of_checkpoint(os.path.join("checkpoints", ck.ckpt_name(2))) == tmp_path


def test_an_unreadable_latest_pointer_falls_back_to_the_highest_step(tmp_path):
    for s in (1, 2):
        ck.save_checkpoint(tmp_path, _state(s))
    (tmp_path / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00")  # was UnicodeDecodeError
    assert ck.find_checkpoint(tmp_path).name == ck.ckpt_name(2)


def test_a_failed_checkpoint_write_names_the_last_good_one(tmp_path, monkeypatch):
    t = make_trainer(tmp_path, steps=4, ckpt_every=2)
    calls = []

    def full_disk(obj, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(obj, path)
    real = ck.atomic_torch_save
    monkeypatch.setattr(ck, "atomic_torch_save", full_disk)
    with pytest.raises(ck.CheckpointError, match=r"could not write the checkpoint of step 4 .*No "
                                                 r"space left on device.*the last good one is .*"
                                                 r"ckpt_00000002.pt.*--resume"):
        t.run()
    assert ck.load_latest(tmp_path / "run")["step"] == 2  # intact


@pytest.mark.parametrize("damage", ["missing", "broadcastable", "other model"])
def test_params_that_do_not_fit_the_model_are_refused(tmp_path, damage):
    # resume copied whatever the file held (a missing key kept its fresh initialisation, a [1]
    # tensor was broadcast); eval compared the checkpoint's params with their own signature
    t = make_trainer(tmp_path, steps=2, ckpt_every=2)
    t.run()
    path = tmp_path / "run" / "checkpoints" / ck.ckpt_name(2)
    state = torch.load(path, weights_only=False)
    if damage == "missing":
        del state["params"]["head.bias"]
    elif damage == "broadcastable":
        state["params"]["head.bias"] = torch.zeros(1)
    else:  # a consistent 20-way head and signature under a 3-way config
        state["params"]["head.weight"] = torch.zeros(20, state["params"]["head.weight"].shape[1])
        state["model"]["shapes"]["head.weight"] = list(state["params"]["head.weight"].shape)
    # a file written that way (not damaged after writing): its checksum matches what it holds
    state["integrity"] = {"sha256": ck.tensor_digest([state["params"], state["optimizer"]])}
    torch.save(state, path)
    with pytest.raises(ck.ConfigMismatchError, match=r"head\.(bias|weight)"):
        make_trainer(tmp_path, resume=str(tmp_path / "run"), steps=4)
    if damage == "other model":
        from imaml_ext.evaluate import evaluate_checkpoint
        with pytest.raises(ck.ConfigMismatchError, match=r"head\.weight: checkpoint shape \[20, "):
            evaluate_checkpoint(tmp_path / "run", tasks=2)


def test_a_diverged_task_scores_zero_not_chance():
    # NaN logits' argmax is class 0, the first label of every task: a diverged task scored 1/N
    from imaml_ext.data import TaskSampler
    from imaml_ext.evaluate import evaluate_tasks
    from test_train import synthetic_dataset

    class Diverges:
        def evaluate(self, model, params, batch):
            M = batch.num_tasks
            loss = torch.full((M,), float("nan"), dtype=torch.float64)
            loss[0] = 0.5  # the first task of each batch adapted fine, scored 1.0
            acc = torch.full((M,), 0.2, dtype=torch.float64)
            acc[0] = 1.0
            return loss, acc

    sampler = TaskSampler(synthetic_dataset(), 5, 1, 2, 4, seed=0, per_task_seed=True)
    res = evaluate_tasks(Diverges(), None, {}, sampler, 8)
    assert res.nonfinite_tasks == 6 and res.accuracy == pytest.approx(2 / 8)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # loading it creates the marker file


def test_a_checkpoint_holding_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "checkpoints" / ck.ckpt_name(1)
    path.parent.mkdir()
    torch.save({"format": ck.FORMAT, **_state(1), "payload": _RunsCode(str(marker))}, path)
    with pytest.raises(ck.CheckpointError, match="holds Python objects beyond tensors"):
        ck.load_checkpoint_file(path)
    assert not marker.exists()


def test_a_checkpoint_written_with_torchs_version_object_still_loads(tmp_path):
    # written before 2026-11-29: versions["torch"] was a TorchVersion, not a str
    path = tmp_path / ck.ckpt_name(1)
    torch.save({"format": ck.FORMAT, **_state(1), "versions": {"torch": torch.__version__}},
               path)
    assert ck.load_checkpoint_file(path)["versions"]["torch"] == str(torch.__version__)


def test_a_second_process_training_in_the_same_folder_is_refused(tmp_path):
    """Two processes in one run folder (a relaunch while the first runs, orphaned ranks after
    torchrun's agent was killed) interleaved metrics.csv and overwrote each other's checkpoints:
    the folder is locked (flock on .lock, dropped by the OS when its holder ends)."""
    import subprocess
    import sys
    import textwrap
    pytest.importorskip("fcntl")
    make_trainer(tmp_path, steps=2, ckpt_every=2).run()  # lock released at the end of run()
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from imaml_ext import train
            train.lock_run_dir(Path({str(run)!r}))
            print("locked", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(tr.UsageError, match=rf"in use by another training process \(pid "
                                                rf"{holder.pid}, per its .lock file\)"):
            make_trainer(tmp_path, steps=4, resume=str(run))
    finally:
        holder.kill()
        holder.wait()
    t = make_trainer(tmp_path, steps=4, resume=str(run))  # the holder gone: free again
    assert t.run()["step"] == 4


def test_bytes_damaged_inside_a_tensor_are_caught_by_the_checksum(tmp_path, caplog):
    """64 flipped bytes inside a weight unpickled fine: eval scored the damaged model (a weight
    read 7652). The parameters and optimizer state carry a SHA-256 written with them."""
    state = _state(1)
    state["optimizer"] = {"m": torch.zeros(3), "t": torch.tensor(4)}
    ck.save_checkpoint(tmp_path, state)
    state = _state(2)
    state["params"]["w"] = torch.full((4096,), 2.0)
    newest = ck.save_checkpoint(tmp_path, state)
    data = bytearray(newest.read_bytes())
    at = data.find(torch.full((4096,), 2.0).numpy().tobytes()[:64])
    assert at > 0
    data[at + 100:at + 164] = bytes(b ^ 0xFF for b in data[at + 100:at + 164])
    newest.write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match="ckpt_00000002.pt is damaged: its parameters "
                                                 "or optimizer state do not match the checksum"):
        ck.load_checkpoint_file(newest)
    assert ck.load_latest(tmp_path)["step"] == 1  # the older one, intact
    assert "is damaged" in caplog.text


def test_the_lock_on_file_systems_without_flock_and_trainers_never_run(tmp_path, monkeypatch,
                                                                     caplog):
    """From the review of the lock: ENOLCK (NFS, Lustre) read as "in use by another process"
    (training impossible there), and a Trainer made but never run held the lock until exit."""
    import errno
    import logging
    fcntl = pytest.importorskip("fcntl")
    t = make_trainer(tmp_path, steps=2)
    assert tr._LOCKS and t._lock in tr._LOCKS
    t.close()
    t.close()  # idempotent
    assert not tr._LOCKS

    def no_flock(f, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    with caplog.at_level(logging.WARNING, logger="imaml_ext.train"):
        assert tr.lock_run_dir(tmp_path / "nfs") is None
    assert "training without the folder lock" in caplog.text and "No locks available" in caplog.text
    assert make_trainer(tmp_path / "x", steps=2).run()["step"] == 2


def test_sighup_stays_ignored_under_nohup():
    """nohup sets SIGHUP to SIG_IGN; the trainer replaced it, so logging out stopped the run."""
    import signal
    if not hasattr(signal, "SIGHUP"):
        pytest.skip("no SIGHUP here")
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with tr._signal_flag(True):
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


def test_the_folder_is_checked_again_under_the_lock(tmp_path, monkeypatch):
    """Set-up (data, checkpoint, algorithm) can take minutes between the folder's check and the
    lock: a run another process wrote there meanwhile was then overwritten."""
    real = tr.lock_run_dir

    def lock_after_another_run(run_dir):
        ck.save_checkpoint(run_dir, _state(5))  # the other process, finished meanwhile
        return real(run_dir)
    monkeypatch.setattr(tr, "lock_run_dir", lock_after_another_run)
    with pytest.raises(tr.UsageError, match="holds"):
        make_trainer(tmp_path, steps=2)
    assert not tr._LOCKS  # released on the way out


def test_a_hang_up_points_the_terminal_streams_at_dev_null(monkeypatch):
    """After SIGHUP every write to the gone terminal fails (EIO): the progress line before the
    checkpoint took the stop down with it."""
    import signal
    if not hasattr(signal, "SIGHUP"):
        pytest.skip("no SIGHUP here")
    duped = []
    monkeypatch.setattr(os, "isatty", lambda fd: fd == 2)
    monkeypatch.setattr(os, "dup2", lambda a, b: duped.append(b))
    with tr._signal_flag(True, announce=False) as sig:
        os.kill(os.getpid(), signal.SIGHUP)
    assert sig["signum"] == signal.SIGHUP and duped == [2]
    duped.clear()
    with tr._signal_flag(True, announce=False):
        os.kill(os.getpid(), signal.SIGTERM)
    assert duped == []  # only a hang-up
