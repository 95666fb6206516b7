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
