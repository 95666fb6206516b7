"""The imaml command line: bad input gives one clean line and exit code 2; eval prints the CI."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_fixtures import make_omniglot_zips
from imaml_ext import cli
from imaml_ext import train as tr
from imaml_ext.config import identity_mismatch, resolve
from imaml_ext.evaluate import confidence_interval

from test_train import QueryGradient, make_trainer, one_thread  # noqa: F401  (fixture reused)


@pytest.fixture(scope="module")
def omniglot_root(tmp_path_factory):
    """Fixture Omniglot in its real zip layout: 7 background characters, 5 drawings each."""
    root = tmp_path_factory.mktemp("data")
    make_omniglot_zips(root)
    return root


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("imaml: error: "), err
    for n in needles:
        assert n in lines[0], err


def test_ways_larger_than_classes(capsys, omniglot_root, tmp_path):
    code, _, err = run_cli(capsys, "train", "--data-root", str(omniglot_root), "--val-classes",
                           "2", "--ways", "9", "--out", str(tmp_path / "r"), "--quiet")
    # the paper's split (the default) of the fixture's 12 characters: 9 train, 2 of them val
    assert_clean_error(code, err, "ways=9 exceeds the 7 classes of omniglot/train")
    code, _, err = run_cli(capsys, "train", "--data-root", str(omniglot_root), "--val-classes",
                           "2", "--ways", "9", "--protocol", "background", "--out",
                           str(tmp_path / "r"), "--quiet")
    assert_clean_error(code, err, "ways=9 exceeds the 5 classes")  # 7 background less 2


def test_shots_plus_queries_larger_than_images(capsys, omniglot_root, tmp_path):
    code, _, err = run_cli(capsys, "train", "--data-root", str(omniglot_root), "--val-classes",
                           "2", "--ways", "3", "--shots", "2", "--queries", "4",
                           "--out", str(tmp_path / "r"), "--quiet")
    assert_clean_error(code, err, "shots + queries = 2 + 4 = 6 exceeds the 5 images per class")


def test_bad_values_and_unknown_options(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--lam", "-1", "--out", str(tmp_path / "r"))
    assert_clean_error(code, err, "--lam must be a finite number > 0")
    # NaN passed `v <= 0` (--meta-lr nan trained and checkpointed NaN parameters, --lam nan
    # crashed with a traceback and exit 1, the code of a diverged run); inf likewise
    for opt, v, what in (("--meta-lr", "nan", "> 0"), ("--lam", "nan", "> 0"),
                         ("--inner-lr", "inf", "> 0"), ("--cg-damping", "nan", ">= 0"),
                         ("--cg-lam", "nan", "> 0")):
        code, _, err = run_cli(capsys, "train", opt, v, "--out", str(tmp_path / "r"))
        assert_clean_error(code, err, f"{opt} must be a finite number {what}, got {v}")
    # a seed beyond torch's 64-bit generator state was an OverflowError traceback
    for seed in ("-1", str(2 ** 64)):
        code, _, err = run_cli(capsys, "train", "--seed", seed, "--out", str(tmp_path / "r"))
        assert_clean_error(code, err, "--seed must be an int in [0, 2**64)", f"got {seed}")
        code, _, err = run_cli(capsys, "eval", "--checkpoint", str(tmp_path / "none.pt"),
                               "--seed", seed)
        assert_clean_error(code, err, "--seed must be an int in [0, 2**64)", f"got {seed}")
    # a baseline does not use lam: refused like the implicit meta-gradient's options (it was
    # printed, saved and part of the run's identity, and changed nothing)
    code, _, err = run_cli(capsys, "train", "--algo", "maml", "--lam", "1000", "--out",
                           str(tmp_path / "r"))
    assert_clean_error(code, err, "--lam 1000.0", "the proximal inner objective",
                       "--algo maml does not use")
    code, _, err = run_cli(capsys, "train", "--algo", "imaml-hf", "--proximal", "authors",
                           "--out", str(tmp_path / "r"))
    assert_clean_error(code, err, "--proximal authors", "is for --algo imaml-gd",
                       "got --algo imaml-hf")
    # a GD inner loop whose proximal term alone cannot contract (make_algorithm's rule, before
    # it raised a traceback from inside the trainer)
    code, _, err = run_cli(capsys, "train", "--algo", "imaml-gd", "--lam", "100", "--out",
                           str(tmp_path / "r"))
    assert_clean_error(code, err, "--inner-lr 0.1 x --lam 100.0 = 10",
                       "needs inner_lr * lam < 2")
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--algo", "sgd"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    code, _, err = run_cli(capsys, "train", "--compile-hvp", "--hvp", "ggn", "--out",
                           str(tmp_path / "r"))
    assert_clean_error(code, err, "--compile-hvp", "--hvp ggn")
    code, _, err = run_cli(capsys, "train", "--compile-hvp", "--algo", "maml", "--out",
                           str(tmp_path / "r"))
    assert_clean_error(code, err, "--compile-hvp", "--algo maml")


def test_cuda_graph_flag(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--cuda-graph", "--out", str(tmp_path / "r"))
    assert_clean_error(code, err, "--cuda-graph", "--device cpu")
    code, _, err = run_cli(capsys, "train", "--cuda-graph", "--device", "cuda", "--algo", "maml",
                           "--out", str(tmp_path / "r"))
    assert_clean_error(code, err, "--cuda-graph", "--algo maml")
    ns = cli.build_parser().parse_args(["train", "--cuda-graph", "--device", "cuda"])
    cfg, _ = cli._config_from_args(ns)
    assert cfg.cuda_graph == "solve" and cfg.algorithm_kwargs()["cuda_graph"] == "solve"
    ns = cli.build_parser().parse_args(["train", "--cuda-graph", "step", "--device", "cuda"])
    cfg, _ = cli._config_from_args(ns)
    assert cfg.cuda_graph == "step" and cfg.algorithm_kwargs()["cuda_graph"] == "step"
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["train", "--cuda-graph", "all"])
    assert exc.value.code == 2 and "'step'" in capsys.readouterr().err
    cfg, _ = cli._config_from_args(cli.build_parser().parse_args(["train"]))
    assert cfg.cuda_graph is False and cfg.algorithm_kwargs()["cuda_graph"] is False


def test_device_that_is_not_there_is_a_clean_error(capsys, tmp_path):
    """A device string torch does not know, or a CUDA device this process cannot see, is one
    line naming --device before anything is written, not torch's traceback at the first tensor
    moved there (train, and eval of a checkpoint)."""
    code, _, err = run_cli(capsys, "train", "--device", "gpu", "--out", str(tmp_path / "r"))
    assert_clean_error(code, err, "--device must be a torch device", "'gpu'")
    assert not (tmp_path / "r").exists()
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    want = "only" if n else "no CUDA device is visible"
    code, _, err = run_cli(capsys, "train", "--device", f"cuda:{n}", "--out", str(tmp_path / "r"))
    assert_clean_error(code, err, f"--device cuda:{n}", want)
    assert not (tmp_path / "r").exists()


def test_implicit_gradient_options_with_a_baseline_are_refused(capsys, tmp_path):
    """--hvp / --cg-* / --hf-cg-steps would be ignored by an algorithm that does not compute
    them: one line naming them; their defaults (a resumed baseline's saved config) pass."""
    for algo, opts, named in (("maml", ["--hvp", "ggn"], "--hvp ggn: this option sets"),
                              ("reptile", ["--cg-steps", "3", "--cg-lam", "12"],
                               "--cg-steps 3, --cg-lam 12.0: these options set"),
                              ("fomaml", ["--cg-damping", "1"], "--cg-damping 1.0"),
                              ("imaml-gd", ["--hf-cg-steps", "3"], "--hf-cg-steps sets"),
                              ("imaml-hf", ["--inner-lr", "0.05"],
                               "--inner-lr sets the GD inner loop's step size")):
        code, _, err = run_cli(capsys, "train", "--algo", algo, *opts, "--out", str(tmp_path))
        assert_clean_error(code, err, named, algo)
    for algo in ("maml", "fomaml", "reptile"):
        cfg, _ = cli._config_from_args(cli.build_parser().parse_args(
            ["train", "--algo", algo, "--cg-steps", "5", "--hvp", "exact"]))
        assert resolve(cfg).cg_steps == 5


def test_a_baseline_saved_with_unused_implicit_options_still_resumes(tmp_path):
    """A baseline's checkpoint written before those options were refused may hold them (they
    had no effect on its run): resuming drops them and the identity check skips them; for
    iMAML they stay identity fields."""
    from imaml_ext import checkpoint as ck
    t = make_trainer(tmp_path, steps=2, ckpt_every=2)
    t.run()
    run = tmp_path / "run"
    state = ck.load_latest(run)
    state.pop("path")
    state["config"].update(hvp="ggn", cg_steps=1, cg_lam=12.0, hf_cg_steps=3, lam=1000.0)
    ck.save_checkpoint(run, state)
    cfg, _ = cli._config_from_args(cli.build_parser().parse_args(["train", "--resume",
                                                                  str(run)]))
    cfg = resolve(cfg)
    assert (cfg.algo, cfg.hvp, cfg.cg_steps, cfg.cg_lam) == ("fomaml", "exact", 5, None)
    assert cfg.lam == 2.0  # the paper default: a baseline never used it
    ck.check_compatible(ck.load_latest(run), cfg.to_dict())
    saved = dict(state["config"], algo="imaml-gd")
    assert "cg_steps: checkpoint 1, requested 5" in " ".join(
        identity_mismatch(saved, dict(cfg.to_dict(), algo="imaml-gd")))
    assert not [d for d in identity_mismatch(saved, dict(cfg.to_dict(), algo="imaml-gd",
                                                         hvp="ggn", cg_steps=1, cg_lam=12.0,
                                                         lam=1000.0))]
    assert "lam: checkpoint 1000.0, requested 2.0" in " ".join(  # lam is iMAML's identity
        identity_mismatch(saved, dict(cfg.to_dict(), algo="imaml-gd")))


def test_cudnn_benchmark_flag(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--cudnn-benchmark", "--out", str(tmp_path / "r"))
    assert_clean_error(code, err, "--cudnn-benchmark", "--device cpu")
    cfg, _ = cli._config_from_args(cli.build_parser().parse_args(
        ["train", "--cudnn-benchmark", "--device", "cuda"]))
    assert cfg.cudnn_benchmark is True and "cudnn_benchmark" not in cfg.algorithm_kwargs()
    assert "cudnn_benchmark" not in cfg.identity()  # a speed knob: a run resumes without it
    cfg, _ = cli._config_from_args(cli.build_parser().parse_args(["train"]))
    assert cfg.cudnn_benchmark is False


def test_compile_hvp_flag_reaches_the_algorithm():
    ns = cli.build_parser().parse_args(["train", "--compile-hvp"])
    cfg, _ = cli._config_from_args(ns)
    assert cfg.compile_hvp is True and cfg.algorithm_kwargs()["compile_hvp"] is True
    cfg, _ = cli._config_from_args(cli.build_parser().parse_args(["train"]))
    assert cfg.compile_hvp is False


@pytest.mark.parametrize("algo,want,absent", [
    ("imaml-hf", "inner 1 Newton-CG x 2 CG steps, CG 1, hvp ggn", "lr"),
    ("fomaml", "inner 1 x lr 0.1;", "CG"),
])
def test_train_banner_names_the_inner_solver(capsys, omniglot_root, tmp_path, algo, want, absent):
    extra = ["--hvp", "ggn", "--hf-cg-steps", "2", "--cg-steps", "1"] if algo == "imaml-hf" \
        else []
    code, _, err = run_cli(capsys, "train", "--data-root", str(omniglot_root), "--algo", algo,
                           "--ways", "2", "--queries", "1", "--val-classes", "2", "--steps", "1",
                           "--meta-batch", "1", "--inner-steps", "1",
                           "--val-every", "0", "--ckpt-every", "0", *extra,
                           "--out", str(tmp_path / "r"))
    banner = err.splitlines()[0].split("; run dir")[0]
    assert code == 0 and want in banner + ";" and absent not in banner.split(", inner ")[1], err


def test_missing_data_dir(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--dataset", "miniimagenet", "--data-root",
                           str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"))
    assert code == 2 and "Traceback" not in err
    assert err.startswith("imaml: error: ") and "nowhere" in err and "Mini-ImageNet" in err


def test_resume_mismatch_and_corrupt_checkpoint(capsys, tmp_path):
    t = make_trainer(tmp_path, steps=2, ckpt_every=2)
    t.run()
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--algo", "maml",
                           "--inner-steps", "3")
    assert_clean_error(code, err, "algo: checkpoint 'fomaml', requested 'maml'",
                       "inner_steps: checkpoint 1, requested 3")
    path = run / "checkpoints" / "ckpt_00000002.pt"
    path.write_bytes(path.read_bytes()[:100])
    code, _, err = run_cli(capsys, "eval", "--checkpoint", str(path))
    assert_clean_error(code, err, "ckpt_00000002.pt is corrupt or truncated")
    code, _, err = run_cli(capsys, "train", "--resume", str(tmp_path / "absent"))
    assert_clean_error(code, err, "absent does not exist")


def test_confidence_interval_formula():
    accs = np.array([0.2, 0.6, 1.0, 0.8, 0.4])
    mean, ci = confidence_interval(accs)
    assert mean == pytest.approx(0.6)
    assert ci == pytest.approx(1.96 * np.std(accs) / math.sqrt(5))
    assert ci == pytest.approx(1.96 * math.sqrt(0.08) / math.sqrt(5))


def test_eval_prints_accuracy_and_interval(capsys, tmp_path, monkeypatch):
    t = make_trainer(tmp_path, steps=2, ckpt_every=2)
    t.run()
    monkeypatch.setattr(tr, "build_algorithm", lambda cfg: QueryGradient())
    from test_train import synthetic_dataset
    monkeypatch.setattr(tr, "load_split", lambda cfg, split: synthetic_dataset(split=split))
    code, out, err = run_cli(capsys, "eval", "--checkpoint", str(tmp_path / "run"), "--tasks",
                             "7", "--meta-batch", "3", "--json", str(tmp_path / "e.json"))
    assert code == 0, err
    assert "accuracy" in out and "% +- " in out and "(95% CI, 7 test tasks" in out
    res = json.loads((tmp_path / "e.json").read_text())["result"]
    assert res["num_tasks"] == 7 and 0 <= res["accuracy"] <= 1 and res["ci95"] >= 0
    code, _, err = run_cli(capsys, "eval", "--checkpoint", str(tmp_path / "run"), "--device",
                           "gpu")
    assert_clean_error(code, err, "--device must be a torch device", "'gpu'")
    # --json: a new folder is made; a folder or an unwritable place fails before evaluating
    code, out, err = run_cli(capsys, "eval", "--checkpoint", str(tmp_path / "run"), "--tasks",
                             "2", "--json", str(tmp_path / "new" / "sub" / "e.json"))
    assert code == 0, err
    assert json.loads((tmp_path / "new" / "sub" / "e.json").read_text())["result"]["num_tasks"] == 2
    (tmp_path / "a_file").write_text("x")
    import imaml_ext.evaluate as ev
    monkeypatch.setattr(ev, "evaluate_checkpoint", lambda *a, **k: pytest.fail("evaluated"))
    for dest, msg in ((tmp_path, "is a folder, give a file name"),
                      (tmp_path / "a_file" / "e.json", "cannot write there")):
        code, _, err = run_cli(capsys, "eval", "--checkpoint", str(tmp_path / "run"), "--json",
                               str(dest))
        assert_clean_error(code, err, f"--json {dest}: {msg}")
    code, _, err = run_cli(capsys, "eval", "--checkpoint", str(tmp_path / "run"),
                           "--num-workers", "-1")
    assert_clean_error(code, err, "--num-workers must be >= 0", "got -1")


def test_console_script_error_has_no_traceback(omniglot_root, tmp_path):
    p = subprocess.run([sys.executable, "-m", "imaml_ext.cli", "train", "--data-root",
                        str(omniglot_root), "--val-classes", "2", "--ways", "40",
                        "--out", str(tmp_path / "r")], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and "imaml: error: TaskSampler: ways=40" in p.stderr


# ---- found by review (2026-11-28): each failed before its fix ---------------------------------

def test_an_out_of_range_val_classes_is_a_clean_error(capsys, omniglot_root, tmp_path):
    # it was a traceback ending in "ValueError: val_classes=500 must be in [0, 7)"
    code, _, err = run_cli(capsys, "train", "--data-root", str(omniglot_root), "--val-classes",
                           "500", "--out", str(tmp_path / "r"))
    assert_clean_error(code, err, "--val-classes: val_classes=500 must be in [0, ")


def test_gpu_only_options_can_be_switched_off_on_resume(capsys):
    # a GPU run's saved config (cudnn_benchmark, cuda_graph) could not be resumed on a CPU:
    # there was no way to switch them off
    p = cli.build_parser()
    ns = p.parse_args(["train", "--no-cudnn-benchmark", "--no-compile-hvp", "--cuda-graph",
                       "off", "--device", "cpu"])
    cfg, _ = cli._config_from_args(ns)
    assert (cfg.cudnn_benchmark, cfg.compile_hvp, cfg.cuda_graph) == (False, False, False)
    ns = p.parse_args(["train", "--cudnn-benchmark", "--compile-hvp", "--cuda-graph"])
    cfg, _ = cli._config_from_args(ns)
    assert (cfg.cudnn_benchmark, cfg.compile_hvp, cfg.cuda_graph) == (True, True, "solve")
    assert "cudnn_benchmark" not in vars(p.parse_args(["train"]))  # unset: the saved value


def test_a_second_signal_exits_with_its_code_and_no_traceback(capsys, monkeypatch):
    import signal as _signal
    def forced(ns):
        raise tr.ForcedStop(_signal.SIGTERM)
    monkeypatch.setattr(cli, "_train", forced)
    code, _, err = run_cli(capsys, "train")
    assert code == 128 + _signal.SIGTERM and "Traceback" not in err
    assert "SIGTERM received twice: quit at once" in err and "--resume" in err


def test_a_second_signal_names_the_run_to_resume(capsys, monkeypatch, omniglot_root, tmp_path):
    # it said "--resume <run dir>"
    import signal as _signal

    def forced(self, on_log=None):
        if self.cfg.steps == 2:
            self.checkpoint()
        raise tr.ForcedStop(_signal.SIGINT)
    monkeypatch.setattr(tr.Trainer, "run", forced)
    args = ["train", "--data-root", str(omniglot_root), "--val-classes", "2", "--ways", "3",
            "--queries", "1", "--algo", "fomaml", "--val-every", "0", "--quiet"]
    out = tmp_path / "r"
    code, _, err = run_cli(capsys, *args, "--steps", "2", "--out", str(out))
    assert code == 128 + _signal.SIGINT and f"imaml train --resume {out}" in err
    # before its first checkpoint: "--resume" would fail ("no checkpoint found")
    out = tmp_path / "r0"
    code, _, err = run_cli(capsys, *args, "--steps", "3", "--out", str(out))
    assert code == 128 + _signal.SIGINT and "--resume" not in err
    assert f"the run wrote no checkpoint yet ({out}): start it again" in err


def test_a_full_disk_outside_the_checkpoint_write_is_one_line(capsys, monkeypatch,
                                                               omniglot_root, tmp_path):
    """The metrics log's flush (or config.json, sessions.jsonl) meeting a full disk gave a
    traceback; the checkpoint write alone had the one-line error naming the last good one."""
    import errno as _errno
    real = tr.MetricsLog.write
    calls = []

    def write(self, row):
        calls.append(row)
        if len(calls) == 3:
            raise OSError(_errno.ENOSPC, "No space left on device", str(self.path))
        return real(self, row)
    monkeypatch.setattr(tr.MetricsLog, "write", write)
    out = tmp_path / "r"
    code, _, err = run_cli(capsys, "train", "--data-root", str(omniglot_root), "--val-classes",
                           "2", "--ways", "3", "--queries", "1", "--algo", "fomaml",
                           "--meta-batch", "2", "--inner-steps", "1", "--val-every", "0",
                           "--log-every", "1", "--ckpt-every", "1", "--steps", "5",
                           "--out", str(out), "--quiet")
    assert_clean_error(code, err, f"No space left on device writing {out / 'metrics.csv'}",
                       "the last good checkpoint is", "ckpt_00000002.pt",
                       f"resume with imaml train --resume {out}")


def test_quiet_is_not_carried_over_by_a_resume(tmp_path):
    # --quiet was saved with the run and, a store_true with no negation, could not be undone
    make_trainer(tmp_path, steps=2, ckpt_every=2).run()  # tiny_config: quiet=True
    run = str(tmp_path / "run")
    parse = cli.build_parser().parse_args
    assert cli._config_from_args(parse(["train", "--resume", run]))[0].quiet is False
    assert cli._config_from_args(parse(["train", "--resume", run, "--quiet"]))[0].quiet is True


def test_resume_keeps_the_log_format(capsys, tmp_path):
    # resumed with another --log-format, the log was split over two files from the resumed step
    make_trainer(tmp_path, steps=2, ckpt_every=2).run()
    from imaml_ext.config import UsageError
    from test_train import synthetic_dataset, tiny_config
    cfg = tiny_config(tmp_path, steps=4, log_format="jsonl")
    with pytest.raises(UsageError, match=r"--log-format jsonl: this run logs to metrics.csv; "
                                         r"resume it with --log-format csv"):
        tr.Trainer(cfg, resume=str(tmp_path / "run"), algorithm=QueryGradient(),
                   dist_info=tr.DistInfo(), train_data=synthetic_dataset())


def test_progress_goes_to_stderr_and_stdout_holds_the_summary(capsys, tmp_path):
    # `imaml train ... > out` mixed "step N: ..." lines into the JSON summary
    make_trainer(tmp_path, steps=2, quiet=False).run()  # stderr is no tty here: plain lines
    out, err = capsys.readouterr()
    assert "step 1:" in err and "step 1:" not in out


def test_out_that_holds_another_run_or_cannot_be_a_folder(capsys, omniglot_root, tmp_path):
    # a second run with the same --out overwrote the first one's config, appended to its
    # metrics and left its checkpoints beside the new ones; a bad --out was a traceback
    base = ["train", "--data-root", str(omniglot_root), "--val-classes", "2", "--ways", "3",
            "--algo", "fomaml", "--inner-steps", "1", "--meta-batch", "1", "--queries", "1",
            "--val-every", "0", "--quiet"]
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *base, "--steps", "2", "--out", str(run))
    assert code == 0, err
    code, _, err = run_cli(capsys, *base, "--steps", "3", "--out", str(run))
    assert_clean_error(code, err, f"--out {run} already holds a run", f"--resume {run}")
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--steps", "3")
    assert code == 0, err  # its own folder: resumed in place
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--steps", "2")
    assert_clean_error(code, err, "--steps 2: the run is already at step 3")
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "run"):
        code, _, err = run_cli(capsys, *base, "--steps", "1", "--out", str(out))
        assert_clean_error(code, err, f"--out {out}")
    code, _, err = run_cli(capsys, *base, "--steps", "1", "--device", "mps")
    assert_clean_error(code, err, "--device mps: imaml trains on cpu or cuda")
    code, _, err = run_cli(capsys, "train", "--dataset", "miniimagenet", "--protocol",
                           "background", "--out", str(tmp_path / "m"))
    assert_clean_error(code, err, "--protocol applies to omniglot only")
    # a file that is not a checkpoint is named as such (it was "corrupt or truncated": delete it)
    code, _, err = run_cli(capsys, "eval", "--checkpoint", str(run / "config.json"))
    assert_clean_error(code, err, "is not a checkpoint")


def test_eval_of_one_task_gives_no_interval_and_ctrl_c_is_one_line(capsys, monkeypatch):
    from imaml_ext.evaluate import EvalResult
    one = EvalResult(accuracy=0.8, ci95=0.0, loss=0.5, num_tasks=1, nonfinite_tasks=0,
                     split="test", seconds=1.0)
    assert "80.00% (one task: no interval, 1 test task)" in one.summary()
    assert "+- " not in one.summary()

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr("imaml_ext.evaluate.evaluate_checkpoint", interrupted)
    code, _, err = run_cli(capsys, "eval", "--checkpoint", "whatever")
    assert code == 130 and "Traceback" not in err and "imaml: interrupted" in err


def test_a_validation_split_that_does_not_fit_says_what_to_change(capsys, omniglot_root, tmp_path):
    # "ways=3 exceeds the 2 classes of omniglot/val" named neither --val-every nor --val-classes
    code, _, err = run_cli(capsys, "train", "--data-root", str(omniglot_root), "--val-classes",
                           "2", "--ways", "3", "--queries", "1", "--algo", "fomaml",
                           "--val-every", "1", "--out", str(tmp_path / "r"), "--quiet")
    assert_clean_error(code, err, "exceeds the 2 classes of omniglot/val",
                       "--val-every 0 trains without validation")


def test_under_torchrun_the_resume_hint_names_the_launcher(capsys, monkeypatch, tmp_path):
    """`imaml train --resume DIR` restarted a torchrun job as one process."""
    import signal as _signal

    def stopped(ns):
        raise tr.Interrupted(_signal.SIGTERM, 7, tmp_path / "run" / "checkpoints" / "c.pt")
    monkeypatch.setattr(cli, "_train", stopped)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_cli(capsys, "train")
    assert code == 128 + _signal.SIGTERM
    assert f"continue with: the same torchrun command with --resume {tmp_path / 'run'}" in err
    monkeypatch.setenv("WORLD_SIZE", "1")
    code, _, err = run_cli(capsys, "train")
    assert f"continue with: imaml train --resume {tmp_path / 'run'}" in err


def test_only_the_announcing_rank_prints_the_stop_notice(capfd):
    """torchrun forwards a signal to every rank: each printed the notice (and the lines of two
    ranks merged)."""
    import os as _os
    import signal as _signal
    for announce in (False, True):
        with tr._signal_flag(True, announce=announce) as sig:
            _os.kill(_os.getpid(), _signal.SIGTERM)
        assert sig["signum"] == _signal.SIGTERM
        assert ("SIGTERM received" in capfd.readouterr().err) == announce


def test_a_lost_rank_is_one_line_naming_the_last_checkpoint(capsys, monkeypatch, tmp_path):
    """kill -9 of one rank: the others died in a gloo collective with some 30 lines of
    traceback and nothing on where to go on from."""
    import torch.distributed as dist
    from imaml_ext import checkpoint as ck
    run = tmp_path / "run"
    ck.save_checkpoint(run, {"step": 3, "params": {}, "config": {}})

    def lost(tr_, cfg, resume):
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:534] Read error [10.0.0.1]: "
                           "Connection reset by peer\nmore lines")
    monkeypatch.setattr(cli, "_train_run", lost)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: None)
    code, _, err = run_cli(capsys, "train", "--out", str(run))
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "a collective operation failed ([../gloo" in err
    assert "another process of this torchrun job is likely gone" in err
    assert f"the last good checkpoint is {run / 'checkpoints' / 'ckpt_00000003.pt'}" in err
    assert f"the same torchrun command with --resume {run}" in err
    def own_pipe(tr_, cfg, resume):  # this rank's own stdout closed ("| head"): not a peer
        raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(cli, "_train_run", own_pipe)
    with pytest.raises(BrokenPipeError):
        cli.main(["train", "--out", str(run)])
    monkeypatch.setattr(cli, "_train_run", lost)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)  # one process: as it was
    with pytest.raises(RuntimeError, match="Connection reset by peer"):
        cli.main(["train", "--out", str(run)])
