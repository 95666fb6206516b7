"""The ``imaml`` command line.

    imaml train --dataset omniglot --ways 5 --shots 1 --algo imaml-gd [options]
    imaml train --resume runs/20250101-120000-imaml-gd          # continue exactly
    imaml eval --checkpoint runs/20250101-120000-imaml-gd --tasks 600
    torchrun --nproc_per_node=2 -m imaml_ext.train --algo imaml-gd ...   # multi-process

Every training option defaults to the paper's setting for the (data set, ways) pair (see
:mod:`imaml_ext.config`); an option given on the command line overrides it. With ``--resume`` the
checkpoint's settings are the defaults; an option that contradicts one of its identity fields is
an error naming the fields.

Exit codes: 0 done; 1 training diverged (too many non-finite meta-gradients); 2 bad input (bad
option, data set not found, bad checkpoint): one line on stderr, no traceback (set
``IMAML_TRACEBACK=1`` to see one); 128 + signal number after SIGINT / SIGTERM (a checkpoint was
written first).
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from pathlib import Path

from imaml_ext.config import (ADAPT, ALGORITHM_NAMES, DTYPES, HVP_KINDS, LOG_FORMATS, META_OPTS,
                              PROTOCOLS, PROXIMAL, TrainConfig, UsageError, check_seed,
                              run_unused_fields)


def _bool_or_none(s: str):
    v = s.lower()
    if v in ("auto", "none"):
        return None
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false/auto, got {s!r}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own convention)
        self.print_usage(sys.stderr)
        self.exit(2, f"imaml: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="imaml", description="Implicit MAML (and MAML, FOMAML, Reptile) on "
                "Omniglot / Mini-ImageNet.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="meta-train a model", argument_default=argparse.SUPPRESS,
                       description="Meta-train. Unset options take the paper's settings for the "
                       "(data set, ways) pair: lam 2.0 (Omniglot) / 0.5 (Mini-ImageNet), inner GD "
                       "steps 16 (5-way) / 25 (20-way) / 10 (Mini-ImageNet), inner lr 0.1, 5 CG "
                       "steps, meta-batch 32, Adam with meta lr 1e-3, 15 queries per class.")
    g = t.add_argument_group("task")
    g.add_argument("--dataset", choices=("omniglot", "miniimagenet", "mini-imagenet"))
    g.add_argument("--ways", type=int)
    g.add_argument("--shots", type=int)
    g.add_argument("--queries", type=int, help="query images per class (default 15)")
    g.add_argument("--protocol", choices=PROTOCOLS,
                   help="Omniglot split: paper (default: 1200/423 characters drawn with the "
                   "seed, as MAML and the iMAML paper) or background (964/659: the background "
                   "set, tested on the evaluation set's unseen alphabets); --val-classes of the "
                   "training characters are held out for validation (so 1,100 or 864 "
                   "meta-train by default)")
    g.add_argument("--val-classes", type=int, help="training classes held out for validation "
                   "(Omniglot: 100; 0 meta-trains on all of them, with --val-every 0)")
    g.add_argument("--data-root", help="data root (default $IMAML_DATA, else "
                   "~/.cache/imaml_ext/data)")
    g = t.add_argument_group("algorithm")
    g.add_argument("--algo", choices=ALGORITHM_NAMES)
    g.add_argument("--lam", type=float, help="proximal strength lambda")
    g.add_argument("--inner-steps", type=int)
    g.add_argument("--inner-lr", type=float)
    g.add_argument("--cg-steps", type=int, help="CG steps of the implicit meta-gradient")
    g.add_argument("--cg-damping", type=float, help="the authors' code: 1.0")
    g.add_argument("--cg-lam", type=float, help="lambda inside the CG matrix (authors: lam + 10)")
    g.add_argument("--hf-cg-steps", type=int, help="CG steps per Newton direction (iMAML-HF)")
    g.add_argument("--hvp", choices=HVP_KINDS)
    g.add_argument("--proximal", choices=PROXIMAL)
    g.add_argument("--adapt", choices=ADAPT, help="all (default: every parameter, the paper) or "
                   "head (imaml-gd/imaml-hf: only the linear head on the body's features)")
    g.add_argument("--use-ext", type=_bool_or_none, help="true/false/auto: compiled kernels")
    g.add_argument("--compile-hvp", action=argparse.BooleanOptionalAction,
                   default=argparse.SUPPRESS,
                   help="imaml-gd/imaml-hf: torch.compile the meta-gradient's HVP (compiles on "
                   "the first step; 1.9-3.8x faster per product on an H100, slower on a CPU)")
    g.add_argument("--cuda-graph", nargs="?", const="solve", choices=("solve", "step", "off"),
                   default=argparse.SUPPRESS,
                   help="imaml-gd/imaml-hf on a GPU: replay a captured CUDA graph every "
                   "meta-step: of the meta-gradient's solve (HVP set-up and CG; the default "
                   "when no value is given) or of the whole step ('step': inner solver, query "
                   "gradient and solve); 'off' (e.g. to resume a GPU run on the CPU): none")
    g.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction,
                   default=argparse.SUPPRESS,
                   help="on a GPU: let cuDNN time its convolution algorithms once per shape and "
                   "keep the fastest (torch.backends.cudnn.benchmark; a run's shapes are fixed)")
    g = t.add_argument_group("meta-optimisation")
    g.add_argument("--steps", type=int, help="meta-steps (default 30000)")
    g.add_argument("--meta-batch", type=int)
    g.add_argument("--meta-lr", type=float)
    g.add_argument("--meta-opt", choices=META_OPTS,
                   help="adam (default; Reptile's direction fed to Adam) or sgd")
    g.add_argument("--max-bad-steps", type=int,
                   help="abort after this many consecutive non-finite meta-gradients (10; "
                   "judged at each logged step)")
    g.add_argument("--seed", type=int)
    g.add_argument("--max-time", type=float, help="stop (with a checkpoint) before a step that "
                   "would end past this many seconds of training (judged by the last step's "
                   "time), whatever --steps says (0: no limit)")
    g = t.add_argument_group("run")
    g.add_argument("--device")
    g.add_argument("--dtype", choices=DTYPES)
    g.add_argument("--num-workers", type=int, help="task-prefetching processes")
    g.add_argument("--out", help="run directory (default runs/<timestamp>-<algo>)")
    g.add_argument("--resume", help="checkpoint file or run directory to continue")
    g.add_argument("--ckpt-every", type=int, help="checkpoint every N steps (500; 0: at the end)")
    g.add_argument("--keep-ckpts", type=int, help="checkpoints kept (3)")
    g.add_argument("--val-every", type=int, help="validate every N steps (1000; 0: never)")
    g.add_argument("--val-tasks", type=int, help="validation tasks (200)")
    g.add_argument("--log-every", type=int, help="log metrics every N steps (10)")
    g.add_argument("--log-format", choices=LOG_FORMATS)
    g.add_argument("--quiet", action="store_true")

    e = sub.add_parser("eval", help="evaluate a checkpoint on test tasks")
    e.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    e.add_argument("--tasks", type=int, default=600)
    e.add_argument("--split", choices=("train", "val", "test"), default="test")
    e.add_argument("--meta-batch", type=int, default=None,
                   help="tasks adapted at once (default: the training meta-batch)")
    e.add_argument("--seed", type=int, default=None, help="task draw seed (default: the run's)")
    e.add_argument("--device", default=None)
    e.add_argument("--data-root", default=None)
    e.add_argument("--num-workers", type=int, default=0,
                   help="task-prefetching processes (default 0: none)")
    e.add_argument("--json", default=None, help="also write the result here")
    return p


def _config_from_args(ns: argparse.Namespace) -> tuple[TrainConfig, str | None]:
    given = {k: v for k, v in vars(ns).items() if k not in ("command", "resume")}
    if given.get("cuda_graph") == "off":
        given["cuda_graph"] = False
    resume = getattr(ns, "resume", None)
    if given.get("protocol") is not None and (given.get("dataset") or "omniglot") != "omniglot":
        # (the config records Mini-ImageNet's one split as "background", so it cannot tell)
        raise UsageError(f"--protocol applies to omniglot only, got --protocol "
                         f"{given['protocol']} with --dataset {given['dataset']}")
    if resume is None:
        return TrainConfig(**given), None
    from imaml_ext import checkpoint as ck
    state = ck.load_latest(resume)
    saved = dict(state["config"])
    saved["out"] = None  # the checkpoint's own run directory, unless --out is given
    saved.pop("quiet", None)  # how this session prints, not the run's: --quiet is not sticky
    for k in run_unused_fields(given.get("algo", saved.get("algo"))):
        saved.pop(k, None)  # values a baseline never used (runs saved before resolve refused them)
    return TrainConfig.from_dict({**saved, **given}), state["path"]


# A write that failed for want of room or of a working disk: a one-line error naming the last
# good checkpoint, as the checkpoint write's own failure is (other OSErrors keep their traceback).
_DISK_ERRNOS = {errno.ENOSPC, errno.EIO, errno.EROFS, errno.EFBIG} | (
    {errno.EDQUOT} if hasattr(errno, "EDQUOT") else set())


def _disk_error(exc: OSError, run_dir, last) -> "CheckpointError":
    from imaml_ext.checkpoint import CheckpointError
    what = f"writing {exc.filename}" if exc.filename else "writing the run's files"
    return CheckpointError(f"{exc.strerror or exc} {what}; the last good checkpoint is "
                           f"{last or 'none (this run wrote none yet)'}: free space and "
                           + (f"resume with imaml train --resume {run_dir}" if last
                              else "start the run again"))


def _last_checkpoint(run_dir) -> str | None:
    from imaml_ext import checkpoint as ck
    try:
        return str(ck.find_checkpoint(run_dir)) if run_dir else None
    except ck.CheckpointError:
        return None


def _train(ns: argparse.Namespace) -> int:
    from imaml_ext import train as tr
    cfg, resume = _config_from_args(ns)
    try:
        return _train_run(tr, cfg, resume)
    except (OSError, RuntimeError) as exc:
        peer = _peer_lost(exc)
        run_dir = getattr(exc, "run_dir", None) or cfg.out
        if run_dir is None and resume is not None:
            run_dir = resume if Path(resume).is_dir() else tr.run_dir_of_checkpoint(resume)
        # (a hung-up terminal's EIO cannot come here: the trainer points the standard streams
        # at /dev/null on SIGHUP)
        disk = isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS
        if not peer and not disk:
            raise
        last = _last_checkpoint(run_dir)
        if not peer:
            raise _disk_error(exc, run_dir, last) from exc
        raise PeerLost(f"a collective operation failed ({_first_line(exc)}): another process "
                       f"of this torchrun job is likely gone (its own log says why); "
                       f"the last good checkpoint is {last or 'none (the run wrote none yet)'}"
                       + (f": continue with the same torchrun command with --resume {run_dir}"
                          if last else "")) from exc


class PeerLost(RuntimeError):
    """A collective failed because another rank of the job died (its own error is in its log)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _peer_lost(exc: BaseException) -> bool:
    """Whether exc is a collective's failure after another rank died (gloo: the connection
    reset or closed by the peer; NCCL: a DistBackendError), in a job of several processes."""
    try:
        import torch.distributed as dist  # noqa: PLC0415
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return False
    except Exception:  # noqa: BLE001
        return False
    backend_error = getattr(dist, "DistBackendError", ())
    if backend_error and isinstance(exc, backend_error):
        return True
    # gloo's transport errors are RuntimeErrors; an OSError (a closed stdout pipe, "| head")
    # is this process's own
    msg = str(exc)
    return isinstance(exc, RuntimeError) and any(
        k in msg for k in ("Connection reset by peer", "Connection closed by peer"))


def _train_run(tr, cfg, resume) -> int:
    trainer = tr.Trainer(cfg, resume=resume)
    if trainer.info.is_main and not trainer.cfg.quiet:
        c = trainer.cfg
        inner = (f"{c.inner_steps} Newton-CG x {c.hf_cg_steps} CG steps" if c.algo == "imaml-hf"
                 else f"{c.inner_steps} x lr {c.inner_lr}")
        solve = (f", CG {c.cg_steps}, hvp {c.hvp}" if c.algo.startswith("imaml")
                 else "")
        print(f"imaml: {c.algo} on {c.dataset} {c.ways}-way {c.shots}-shot ({c.queries} queries), "
              f"meta-batch {c.meta_batch}, steps {trainer.step}->{c.steps}, "
              + (f"lam {c.lam}, " if c.algo.startswith("imaml") else "") + f"inner {inner}{solve}"
              + (", head-only adaptation" if c.adapt == "head" else "")
              + f"; run dir {trainer.run_dir}"
              + (f"; {trainer.info.world} processes" if trainer.info.active else ""),
              file=sys.stderr, flush=True)
    try:
        summary = trainer.run()
    except (tr.ForcedStop, OSError, RuntimeError) as exc:  # main's message: where to resume
        exc.run_dir = trainer.run_dir
        raise
    if trainer.info.is_main:
        if not trainer.cfg.quiet:
            if summary.get("time_limited"):
                print(f"imaml: --max-time {trainer.cfg.max_time:g} s reached after "
                      f"{summary['step']} of {trainer.cfg.steps} meta-steps", file=sys.stderr)
            print(f"imaml: done: {summary['step']} meta-steps in {summary['seconds']:.0f} s; "
                  f"skipped tasks {summary['skipped_tasks']}, bad steps {summary['bad_steps']}; "
                  f"checkpoint {summary['checkpoint']}", file=sys.stderr, flush=True)
        print(json.dumps({"run_dir": summary["run_dir"], "checkpoint": summary["checkpoint"],
                          "step": summary["step"], "seconds": round(summary["seconds"], 1),
                          "time_limited": summary.get("time_limited", False)}))
    return 0


def _eval(ns: argparse.Namespace) -> int:
    from imaml_ext.evaluate import evaluate_checkpoint, write_json
    if ns.tasks <= 0:
        raise UsageError(f"--tasks must be > 0, got {ns.tasks}")
    if ns.meta_batch is not None and ns.meta_batch <= 0:
        raise UsageError(f"--meta-batch must be > 0, got {ns.meta_batch}")
    if ns.num_workers < 0:
        raise UsageError(f"--num-workers must be >= 0 (0: tasks drawn in this process), got "
                         f"{ns.num_workers}")
    if ns.seed is not None:
        check_seed(ns.seed)
    if ns.json:  # before the evaluation, which can take minutes, not after it
        _check_writable(ns.json, "--json")
    res, info = evaluate_checkpoint(ns.checkpoint, tasks=ns.tasks, split=ns.split,
                                    meta_batch=ns.meta_batch, seed=ns.seed, device=ns.device,
                                    data_root=ns.data_root, num_workers=ns.num_workers)
    c = info["config"]
    what = f"{c['algo']} {c['dataset']} {c['ways']}-way {c['shots']}-shot, step {info['step']}"
    print(f"{info['checkpoint']}: {res.summary(what)}")
    if ns.json:
        try:
            write_json(ns.json, res, info)
        except OSError as exc:
            raise UsageError(f"--json {ns.json}: could not write it ({exc}); the result is the "
                             f"line above") from None
    return 0


def _check_writable(path: str, option: str) -> None:
    """UsageError naming `option` unless a file can be written at `path` (its folder is made)."""
    import tempfile
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"{option} {path}: is a folder, give a file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.probe."):
            pass
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot write there ({exc.strerror or exc})") \
            from None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``imaml`` console script; returns the exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    ns = build_parser().parse_args(argv)
    from imaml_ext.checkpoint import CheckpointError
    from imaml_ext.data import DatasetError
    from imaml_ext.train import ForcedStop, Interrupted, TrainingDivergedError
    debug = os.environ.get("IMAML_TRACEBACK", "") not in ("", "0")
    try:
        return _train(ns) if ns.command == "train" else _eval(ns)
    except (UsageError, DatasetError, CheckpointError) as exc:
        if debug:
            raise
        # Data-set messages say what to put where, over several lines; the rest are one line.
        msg = str(exc) if isinstance(exc, DatasetError) else " ".join(str(exc).split())
        print(f"imaml: error: {msg}", file=sys.stderr)
        return 2
    except (TrainingDivergedError, PeerLost) as exc:
        if debug:
            raise
        print(f"imaml: error: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        if os.environ.get("RANK", "0") in ("", "0"):  # under torchrun: rank 0 wrote it
            run = Path(exc.path).parent.parent if exc.path else "<run dir>"
            how = (f"the same torchrun command with --resume {run}"
                   if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
                   else f"imaml train --resume {run}")
            print(f"imaml: {exc}; continue with: {how}", file=sys.stderr)
        return 128 + exc.signum
    except ForcedStop as exc:  # a second signal: no traceback, the signal's exit code
        run_dir = getattr(exc, "run_dir", None)
        if run_dir is not None and _last_checkpoint(run_dir) is None:
            print(f"\nimaml: {exc}; the run wrote no checkpoint yet ({run_dir}): start it "
                  f"again", file=sys.stderr)
        else:
            print(f"\nimaml: {exc}; resume from the last checkpoint with: imaml train "
                  f"--resume {run_dir or '<run dir>'}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:  # Ctrl-C in imaml eval (training handles its own signals)
        print("\nimaml: interrupted", file=sys.stderr)
        return 130
    finally:
        _shutdown_distributed()


def _shutdown_distributed() -> None:
    try:
        import torch.distributed as dist  # noqa: PLC0415
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort at exit
        pass


if __name__ == "__main__":
    sys.exit(main())
