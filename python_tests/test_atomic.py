"""Atomic writes (imaml_ext._atomic): the temp files of a killed writer are removed by the next
write of the same target; a live writer's, another host's and other targets' are kept."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from imaml_ext import _atomic, checkpoint
from imaml_ext.data import common


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def temp_name(target, host, pid, suffix=".tmp"):
    return target.parent / f".{target.name}.{host}.{pid}.abc_123{suffix}"


def test_killed_writers_temp_is_swept_by_the_next_write(tmp_path):
    target = tmp_path / "ckpt_00000010.pt"
    host = _atomic._host()
    stale = temp_name(target, host, dead_pid())
    live = temp_name(target, host, os.getppid())
    remote = temp_name(target, "another-host", dead_pid())
    other_target = temp_name(tmp_path / "other.pt", host, dead_pid())
    for p in (stale, live, remote, other_target):
        p.write_bytes(b"half a checkpoint")
    checkpoint.atomic_torch_save({"a": torch.arange(3)}, target)
    assert not stale.exists()
    assert live.exists() and remote.exists() and other_target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (target, live, remote, other_target))
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.arange(3))


def test_cache_writer_sweeps_and_names_its_temp_with_host_and_pid(tmp_path, monkeypatch):
    target = tmp_path / "cache.pt"
    stale = temp_name(target, _atomic._host(), dead_pid())
    stale.write_bytes(b"junk")
    seen = []

    def spy(obj, f):
        seen.extend(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp"))
        torch.save(obj, f)
    monkeypatch.setattr(common, "_serialize", spy)
    common.atomic_save({"a": torch.arange(2)}, target)
    assert not stale.exists()
    assert seen and seen[0].startswith(f".cache.pt.{_atomic._host()}.{os.getpid()}.")
    assert list(tmp_path.iterdir()) == [target]


def test_rejected_file_keeps_the_old_one_and_no_temp(tmp_path):
    target = tmp_path / "images_background.zip"
    target.write_bytes(b"old")

    def reject(tmp):
        raise OSError("not a zip")
    with pytest.raises(OSError, match="not a zip"):
        _atomic.atomic_write(target, lambda f: f.write(b"new"), suffix=".part", validate=reject)
    assert list(tmp_path.iterdir()) == [target] and target.read_bytes() == b"old"
    _atomic.atomic_write(target, lambda f: f.write(b"new"), suffix=".part")
    assert target.read_bytes() == b"new"
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_atomic._umask())


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_get_the_umask_mode_not_the_temp_files(tmp_path, umask):
    """A checkpoint, a cache file or a download gets the mode a plain open() would give it
    (0o666 less the umask), not the 0o600 of mkstemp's temp file: another user of a shared run
    directory (or an evaluation job under another account) can read a checkpoint as it could
    read the metrics beside it."""
    old = os.umask(umask)
    try:
        assert _atomic._umask() == umask
        checkpoint.atomic_torch_save({"w": torch.zeros(2)}, tmp_path / "ckpt.pt")
        common.atomic_save({"x": torch.ones(1)}, tmp_path / "cache.pt")
        _atomic.atomic_write(tmp_path / "explicit", lambda f: f.write(b"x"), mode=0o640)
    finally:
        os.umask(old)
    want = oct(0o666 & ~umask)
    assert oct((tmp_path / "ckpt.pt").stat().st_mode & 0o777) == want
    assert oct((tmp_path / "cache.pt").stat().st_mode & 0o777) == want
    assert oct((tmp_path / "explicit").stat().st_mode & 0o777) == "0o640"


def test_save_checkpoint_sweeps_killed_writers_temps_of_every_step(tmp_path):
    """A writer killed while writing step 20's checkpoint leaves a temp file as large as a
    checkpoint; the run resumed from step 10 writes steps 15, 25, ... and never step 20's name
    again, so the sweep of the same name alone would keep it for good."""
    d = tmp_path / "checkpoints"
    checkpoint.save_checkpoint(tmp_path, {"step": 10, "params": {}, "optimizer": {},
                                          "config": {}})
    host = _atomic._host()
    stale = temp_name(d / "ckpt_00000020.pt", host, dead_pid())
    live = temp_name(d / "ckpt_00000030.pt", host, os.getppid())
    remote = temp_name(d / "ckpt_00000040.pt", "another-host", dead_pid())
    foreign = temp_name(d / "notes.txt", host, dead_pid())
    for p in (stale, live, remote, foreign):
        p.write_bytes(b"half a checkpoint")
    checkpoint.save_checkpoint(tmp_path, {"step": 15, "params": {}, "optimizer": {},
                                          "config": {}})
    assert not stale.exists()
    assert live.exists() and remote.exists() and foreign.exists()
