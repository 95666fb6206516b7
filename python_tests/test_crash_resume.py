"""Crash and resume of `imaml train` on the real Omniglot (IMAML_DATA; skipped without it).

A tiny FOMAML run (5-way 1-shot, meta-batch 4, one inner step, a checkpoint every step) is killed
with SIGKILL three times and resumed each time:
- in the middle of writing a checkpoint file and in the middle of writing the `latest` pointer
  (first, since each needs two more steps of the run):
  the child is the same CLI entry point (imaml_ext.cli:main) with a test-side shim that writes the
  checkpoint files in two halves with a pause between, announced on stderr, so the kill lands
  inside the write (the trainer has no hook of its own for this), and
- at a random moment (after a random number of steps plus a random delay; IMAML_CRASH_SEED
  picks another draw).
After every kill: each checkpoint file present loads, and `latest` names one that does. At the
end the run has finished, its parameters, Adam state and per-step meta-losses equal an
uninterrupted run's exactly (CPU, one thread), and its metrics log holds every step once.
A truncated, empty or foreign checkpoint given to --resume is an error naming the file.
"""
from __future__ import annotations

import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from imaml_ext import checkpoint as ck

DATA = os.environ.get("IMAML_DATA")
HAVE_OMNIGLOT = bool(DATA) and all(
    (Path(DATA) / "omniglot" / f"images_{s}.zip").is_file() for s in ("background", "evaluation"))
needs_omniglot = pytest.mark.skipif(not HAVE_OMNIGLOT, reason="IMAML_DATA with omniglot/"
                                    "images_background.zip and images_evaluation.zip is not set")

REPO = Path(__file__).resolve().parents[1]
STEPS = 10
CONFIG = ["--dataset", "omniglot", "--ways", "5", "--shots", "1", "--queries", "1",
          "--algo", "fomaml", "--meta-batch", "4", "--inner-steps", "1", "--ckpt-every", "1",
          "--keep-ckpts", "3", "--val-every", "0", "--log-every", "1", "--seed", "3", "--quiet"]
TRAIN_ARGS = CONFIG + ["--steps", str(STEPS)]

# The CLI with checkpoint-directory writes split in two halves around a pause, for the N-th such
# write of this process (SLOW_AT); "MIDWRITE <path>" on stderr says the first half is on disk.
_SHIM = textwrap.dedent("""
    import os, sys, time
    _real_fdopen = os.fdopen
    _count = [0]

    class _Slow:
        def __init__(self, f, path):
            self.f, self.path = f, path
        def write(self, data):
            half = len(data) // 2
            n = self.f.write(data[:half])
            self.f.flush()
            sys.stderr.write("MIDWRITE " + self.path + "\\n")
            sys.stderr.flush()
            time.sleep(30)
            return n + self.f.write(data[half:])
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self.f.__exit__(*exc)
        def __getattr__(self, name):
            return getattr(self.f, name)

    def fdopen(fd, *args, **kw):
        f = _real_fdopen(fd, *args, **kw)
        try:
            path = os.readlink("/proc/self/fd/%d" % fd)
        except OSError:
            return f
        if "/checkpoints/" in path:
            _count[0] += 1
            if _count[0] == int(os.environ["SLOW_AT"]):
                return _Slow(f, path)
        return f

    os.fdopen = fdopen
    from imaml_ext.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The children's environment; the decoded Omniglot cache is filled here first, so that the
    runs started side by side do not each decode the 19,280 images."""
    cache = os.environ.get("IMAML_CACHE") or str(tmp_path_factory.mktemp("imaml-cache"))
    if HAVE_OMNIGLOT:
        from imaml_ext.data import load_dataset
        old = os.environ.get("IMAML_CACHE")
        os.environ["IMAML_CACHE"] = cache
        try:
            load_dataset("omniglot", "train", root=DATA, protocol="background", seed=3)
        finally:
            if old is None:
                del os.environ["IMAML_CACHE"]
            else:
                os.environ["IMAML_CACHE"] = old
    return {**os.environ, "IMAML_DATA": DATA, "IMAML_CACHE": cache, "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


class ReferenceRun:
    """The uninterrupted run, started once in the background and shared by the tests."""

    def __init__(self, out: Path, env: dict):
        self.out = out
        self.proc = subprocess.Popen(train_cmd(*TRAIN_ARGS, "--out", str(out)), env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait(self) -> Path:
        if self.proc.returncode is None:
            _, err = self.proc.communicate(timeout=300)
            assert self.proc.returncode == 0, err
        return self.out

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    ref = ReferenceRun(tmp_path_factory.mktemp("reference") / "run", env)
    yield ref
    ref.close()


def train_cmd(*args: str, shim: bool = False) -> list[str]:
    head = [sys.executable, "-c", _SHIM] if shim else [sys.executable, "-m", "imaml_ext.cli"]
    return head + ["train", *args]


def metric_rows(run: Path) -> list[dict]:
    path = run / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("kind") == "train"]


def check_checkpoints(run: Path) -> dict:
    """Every checkpoint file present loads; `latest` (if there) names one that does. Returns
    {"steps": [...], "temp_files": n} for the report."""
    d = run / ck.CKPT_DIR
    if not d.is_dir():
        return {"steps": [], "temp_files": 0}
    steps = []
    for step, path in ck.list_checkpoints(run):
        state = ck.load_checkpoint_file(path)   # raises CheckpointError if half-written
        assert int(state["step"]) == step, path
        steps.append(step)
    latest = d / ck.LATEST
    if latest.exists():
        name = latest.read_text().strip()
        assert name in {ck.ckpt_name(s) for s in steps}, f"latest names {name!r}, have {steps}"
    temps = [p for p in d.iterdir() if p.name.endswith(".tmp")]
    return {"steps": steps, "temp_files": len(temps)}


def kill_at_random(cmd, env, run: Path, rng: random.Random, timeout: float = 120) -> str:
    """Starts cmd, waits until it has logged a random number (1-3) of new steps, sleeps a
    random 0-0.4 s, SIGKILLs it. Returns what happened."""
    before = len(metric_rows(run))
    want = before + rng.randint(1, 3)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    try:
        while proc.poll() is None and len(metric_rows(run)) < want:
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"no progress in {timeout} s")
            time.sleep(0.02)
        if proc.poll() is not None:
            return f"finished before the kill (rc {proc.returncode})"
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        return f"killed after {len(metric_rows(run)) - before} new step(s)"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def kill_mid_write(cmd, env, slow_at: int, timeout: float = 120) -> str:
    """Starts the shim CLI, kills it while the slow_at-th checkpoint-directory file of the
    process is half written."""
    proc = subprocess.Popen(cmd, env={**env, "SLOW_AT": str(slow_at)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    try:
        for line in proc.stderr:
            if line.startswith("MIDWRITE "):
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                return f"killed while writing {Path(line.split(' ', 1)[1].strip()).name}"
            if time.monotonic() - t0 > timeout:
                break
        proc.wait(timeout=timeout)
        return f"ended without the slow write (rc {proc.returncode})"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@needs_omniglot
def test_sigkill_anywhere_then_resume_equals_uninterrupted(tmp_path, env, reference):
    seed = int(os.environ.get("IMAML_CRASH_SEED", "0"))
    rng = random.Random(seed)
    run = tmp_path / "killed"   # the uninterrupted run goes on alongside (2 cores)
    log = []
    # First start, then resumes: kills inside a checkpoint write (in one process the
    # checkpoint files are write 1, 3, 5, ..., the `latest` pointers 2, 4, ...; each needs 2
    # steps of the process, so they come first), then a kill at a random moment, which may
    # overshoot by several steps (a step takes tens of milliseconds) or even let the run finish.
    plan = [("midwrite", 3), ("midwrite", 4), ("random", None)]
    for i, (how, slow_at) in enumerate(plan):
        args = [*TRAIN_ARGS, "--out", str(run)] if i == 0 else ["--resume", str(run), "--quiet"]
        if how == "random":
            what = kill_at_random(train_cmd(*args), env, run, rng)
        else:
            what = kill_mid_write(train_cmd(*args, shim=True), env, slow_at)
        state = check_checkpoints(run)
        log.append(f"attempt {i} ({how}): {what}; checkpoints {state['steps']}, "
                   f"temp files {state['temp_files']}")
    done = subprocess.run(train_cmd("--resume", str(run), "--quiet"), env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ref_dir = reference.wait()
    print("\n".join(["", f"crash/resume (seed {seed}):"] + log))
    assert any("killed while writing .ckpt_" in s for s in log), log
    assert any("killed while writing .latest" in s for s in log), log
    final = check_checkpoints(run)
    assert final["steps"][-1] == STEPS
    a = ck.load_latest(ref_dir)
    b = ck.load_latest(run)
    assert int(a["step"]) == int(b["step"]) == STEPS
    for k, v in a["params"].items():
        assert torch.equal(v, b["params"][k]), k
    for part in ("m", "v"):
        for k, v in a["optimizer"][part].items():
            assert torch.equal(v, b["optimizer"][part][k]), (part, k)
    assert torch.equal(a["optimizer"]["t"], b["optimizer"]["t"])
    rows_a, rows_b = metric_rows(ref_dir), metric_rows(run)
    assert [int(r["step"]) for r in rows_b] == list(range(1, STEPS + 1))
    assert [r["meta_loss"] for r in rows_b] == [r["meta_loss"] for r in rows_a]


@pytest.mark.parametrize("damage,message", [
    ("truncated", "is corrupt or truncated"), ("empty", "is corrupt or truncated"),
    ("garbage", "is corrupt or truncated"), ("foreign", "is not an imaml_ext checkpoint")])
def test_bad_checkpoint_given_to_resume_names_the_file(tmp_path, damage, message, capsys):
    """`imaml train --resume FILE` with a damaged FILE: exit 2 and one line naming FILE, no
    traceback (needs no data: the checkpoint is read before anything else)."""
    src = tmp_path / "src.pt"
    state = {"format": ck.FORMAT, "params": {"w": torch.ones(3)}, "optimizer": {}, "step": 1,
             "config": {}}
    ck.atomic_torch_save(state, src)
    bad = tmp_path / "ckpt_00000001.pt"
    data = src.read_bytes()
    if damage == "foreign":
        torch.save({"state_dict": {"w": torch.ones(3)}}, bad)
    else:
        bad.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                         "garbage": b"not a checkpoint at all\n" * 4}[damage])
    from imaml_ext.cli import main
    rc = main(["train", "--resume", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("imaml: error:") and str(bad) in err and message in err, err
    assert "Traceback" not in err and err.count("\n") == 1


@needs_omniglot
def test_damaged_newest_checkpoint_in_a_run_dir_falls_back_with_a_warning(
        tmp_path, env, reference, capsys, caplog, monkeypatch):
    """--resume RUN_DIR whose newest checkpoint is truncated: a warning naming it, the previous
    one is used, and the run finishes (in-process, on a copy of the reference run)."""
    run = tmp_path / "run"
    shutil.copytree(reference.wait(), run)
    newest = ck.list_checkpoints(run)[-1][1]
    newest.write_bytes(newest.read_bytes()[:1000])
    for k, v in env.items():
        if k.startswith("IMAML") or k.endswith("NUM_THREADS"):
            monkeypatch.setenv(k, v)
    from imaml_ext.cli import main
    rc = main(["train", "--resume", str(run), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0, err
    said = err + caplog.text
    assert str(newest) in said and "corrupt or truncated" in said, said
    assert check_checkpoints(run)["steps"][-1] == STEPS
