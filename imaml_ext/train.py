"""Meta-training: the trainer behind ``imaml train`` and ``python -m imaml_ext.train``.

One meta-step: draw meta-batch ``step`` (the sampler is seeded by (seed, step), so the task stream
is the same after a resume or on any number of processes), compute the algorithm's meta-gradient
for all its tasks at once, average it over the tasks that came out finite, and take one
meta-optimizer step (Adam by default; see :mod:`imaml_ext.config` for Reptile).

Host synchronisation: none per step on one process. The step's "is the meta-gradient finite"
test, the skipped-task and bad-step counters and the metric sums all stay on the device; they are
read to the host once per logged step (``--log-every``), at validation and at checkpoints.
Under torch.distributed the all-reduced buffer also carries the SIGINT/SIGTERM flag so every rank
stops at the same step; that one scalar is read every step there.

NaN policy: tasks the algorithm flags (``task_ok`` False) are left out of its meta-gradient and
counted (``skipped_tasks``); a meta-gradient that is non-finite anyway (or has no finite task)
skips the meta-optimizer step entirely (``bad_steps``; Adam's moments and step count untouched);
``--max-bad-steps`` consecutive bad steps abort the run with :class:`TrainingDivergedError`
(checked when the counters are read, at each logged step: a run of bad steps can exceed it by up
to ``--log-every`` - 1 steps, which changed nothing since a bad step takes no optimizer step).

Multi-process: ``torchrun --nproc_per_node=N -m imaml_ext.train ...``. Every rank draws the same
meta-batch and keeps its share of the tasks (``TaskSampler(shard=(rank, world))``, cut before
they are moved to the device); the per-rank meta-gradients, weighted by their numbers of finite
tasks, are summed with one all-reduce (gloo on CPU, NCCL on CUDA) and divided by the total, which
equals the one-process average. Only rank 0 writes logs, checkpoints and the config dump;
validation is shared out over the ranks (:meth:`Trainer.validate`).

Signals: SIGINT / SIGTERM finish the current meta-step, write a checkpoint and leave
(:class:`Interrupted`, exit code 128 + signal on the command line); an interrupted run loses at
most the steps since its last checkpoint, and ``--resume RUN_DIR`` continues it exactly. The
prefetching workers leave the signals to the trainer (SIGINT ignored, SIGTERM a quiet exit); a
batch lost with them is drawn in the training process (it depends on (seed, step) alone). Under
torch.distributed the stop flags (SIGINT, SIGTERM, --max-time) are all-reduced with the
meta-gradient, so every rank stops after the same step for the same reason; the same signal
again within 3 s (torchrun forwards what a scheduler sent to every process) is the same stop.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from imaml_ext import checkpoint as ck
from imaml_ext.config import HEAD_ALGORITHMS, TrainConfig, UsageError, resolve
from imaml_ext.evaluate import evaluate_tasks
from imaml_ext.types import TaskBatch

log = logging.getLogger("imaml_ext.train")

METRIC_KEYS = ("query_loss", "query_acc", "inner_loss", "cg_residual", "cg_iterations",
               "cg_negative_curvature", "inner_ls_failures")
# cg_negative_curvature (the fraction of tasks whose CG met p^T A p <= 0) and
# inner_ls_failures (the fraction whose Newton-CG inner solver, iMAML-HF, had a line search
# that found no step: see imaml_ext.inner.hessian_free; 0 for the other algorithms) came
# later: a run resumed from an older log keeps writing that log's own columns.
LOG_FIELDS = ("kind", "step", "meta_loss", "query_acc", "inner_loss", "cg_residual",
              "cg_iterations", "skipped_tasks", "bad_steps", "val_loss", "val_acc", "val_ci95",
              "elapsed_s", "tasks_per_s", "cg_negative_curvature", "inner_ls_failures")
# The share of tasks with negative curvature in one log window above which the run warns (once).
NEGATIVE_CURVATURE_WARN = 0.5


class TrainingDivergedError(RuntimeError):
    """Too many consecutive meta-steps had a non-finite meta-gradient."""


class Interrupted(Exception):
    """SIGINT / SIGTERM stopped the run after a checkpoint was written."""

    def __init__(self, signum: int, step: int, path: Path | None):
        self.signum, self.step, self.path = signum, step, path
        name = signal.Signals(signum).name
        where = f"; checkpoint {path}" if path else ""
        super().__init__(f"{name} received: stopped after meta-step {step}{where}")


class ForcedStop(KeyboardInterrupt):
    """A second SIGINT / SIGTERM: the run quits at once, without a new checkpoint (the last one
    written stays whole: checkpoints are written atomically)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name} received twice: quit at once, without a "
                         f"new checkpoint")


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------

def usable_device(device: str) -> torch.device:
    """``torch.device(device)`` where this process can use it, else a UsageError that names the
    option and says what is visible (a CUDA device asked for on a machine without one would
    otherwise end in torch's traceback at the first tensor moved there)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"--device must be a torch device such as cpu, cuda or cuda:1, got "
                         f"{device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device is visible here "
                             f"(torch.cuda.is_available() is False; torch {torch.__version__}, "
                             f"built for CUDA {torch.version.cuda or 'none'}); use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise UsageError(f"--device {device}: only {n} CUDA device(s) are visible "
                             f"(cuda:0 to cuda:{n - 1})")
    elif dev.type != "cpu":
        # mps, xpu, ...: the kernels and the trainer are written and tested for cpu and cuda
        raise UsageError(f"--device {device}: imaml trains on cpu or cuda, got {dev.type}")
    return dev


def build_model(cfg: TrainConfig) -> torch.nn.Module:
    from imaml_ext.models import make_model
    return make_model(cfg.dataset, cfg.ways, downsample=cfg.downsample)


def build_algorithm(cfg: TrainConfig):
    from imaml_ext.algorithms import make_algorithm
    return make_algorithm(cfg.algo, **cfg.algorithm_kwargs())


# what a user can change when the validation split is what does not fit
_VAL_HINT = {"val": "; that is the validation split: --val-every 0 trains without validation"
                    " (Omniglot: --val-classes sets its size)"}


def load_split(cfg: TrainConfig, split: str):
    from imaml_ext.data import SplitOptionError, load_dataset
    kw = {"protocol": cfg.protocol, "seed": cfg.seed} if cfg.dataset == "omniglot" else {}
    if cfg.dataset == "omniglot":
        # The shipped subset stands in only when no data root was named: a root given with
        # --data-root or IMAML_DATA that holds no Omniglot (a typo) is an error, not a quiet
        # training run on 200 characters.
        kw["allow_embedded"] = cfg.data_root is None and not os.environ.get("IMAML_DATA")
    try:
        return load_dataset(cfg.dataset, split, root=cfg.data_root, val_classes=cfg.val_classes,
                            **kw)
    except SplitOptionError as exc:  # a user's flag: named as one, not a traceback
        raise UsageError(f"--{exc.option.replace('_', '-')}: {exc}"
                         + _VAL_HINT.get(split, "")) from None


def check_trained_classes(state: dict[str, Any], dataset, what: str) -> None:
    """Refuses data that contradicts the classes a checkpoint was trained on (checkpoints of
    2026-11-28 on; older ones carry no record): for "resume", a training split with other
    classes; for an evaluation split, any class the run trained on. A different data root (the
    shipped subset against full Omniglot, another IMAML_DATA) otherwise passes unseen, and an
    evaluation would score characters the model was trained on."""
    rec = state.get("data")
    if not rec:
        return
    trained = rec["train_classes"]
    if what in ("resume", "train"):  # the training split itself: the same classes
        if list(dataset.class_names) != list(trained):
            head = "--resume" if what == "resume" else "the train split"
            raise UsageError(
                f"{head}: this run trained on {len(trained)} classes from {rec['source']}; the "
                f"training split found now has {dataset.num_classes} from {dataset.source}, not "
                f"the same classes: point --data-root (or IMAML_DATA) at the data it trained on")
        return
    shared = sorted(set(dataset.class_names) & set(trained))
    if shared:
        raise UsageError(
            f"the {what} split ({dataset.num_classes} classes from {dataset.source}) shares "
            f"{len(shared)} classes with the {len(trained)} this checkpoint trained on (from "
            f"{rec['source']}), e.g. {shared[0]!r}: its accuracy would not be held out; evaluate "
            f"on the data it trained on (--data-root or IMAML_DATA)")
    if (rec["source"] == "embedded") != (dataset.source == "embedded"):
        log.warning("imaml_ext: the checkpoint trained on %s; the %s split comes from %s",
                    rec["source"], what, dataset.source)


def make_sampler(cfg: TrainConfig, dataset, meta_batch: int, seed: int | None = None,
                 num_workers: int | None = None, device: str | None = None,
                 per_task_seed: bool = False, shard: tuple[int, int] = (0, 1)):
    """per_task_seed: evaluation's draw, the same tasks whatever meta_batch; shard: this
    process's tasks of each batch (TaskSampler)."""
    from imaml_ext.data import TaskSampler
    try:
        return TaskSampler(dataset, cfg.ways, cfg.shots, cfg.queries, meta_batch,
                           seed=cfg.seed if seed is None else seed,
                           device=device or cfg.device,
                           num_workers=cfg.num_workers if num_workers is None else num_workers,
                           per_task_seed=per_task_seed, shard=shard)
    except ValueError as exc:
        raise UsageError(str(exc) + _VAL_HINT.get(getattr(dataset, "split", ""), "")) from exc


class MetaOptimizer:
    """Adam (or SGD) over a dict of tensors whose step can be skipped by a device-side flag.

    ``step(params, grads, ok)`` with ``ok`` a 0-d bool tensor: when False, nothing changes (not
    the parameters, not the moments, not the step count), and no host synchronisation is needed
    to decide it. The Adam update is torch.optim.Adam's (bias-corrected, eps outside the sqrt).
    """

    def __init__(self, params: dict[str, torch.Tensor], lr: float, kind: str = "adam",
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.kind, self.lr, self.betas, self.eps = kind, float(lr), betas, float(eps)
        any_p = next(iter(params.values()))
        self.t = torch.zeros((), dtype=any_p.dtype, device=any_p.device)
        self.m = {k: torch.zeros_like(v) for k, v in params.items()} if kind == "adam" else {}
        self.v = {k: torch.zeros_like(v) for k, v in params.items()} if kind == "adam" else {}

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
             ok: torch.Tensor) -> None:
        okf = ok.to(self.t.dtype)
        self.t.add_(okf)
        if self.kind == "sgd":
            for k, p in params.items():
                g = torch.where(ok, grads[k], torch.zeros_like(grads[k]))
                p.sub_(g, alpha=self.lr)
            return
        b1, b2 = self.betas
        t = self.t.clamp_min(1.0)
        bc1 = 1 - b1 ** t
        bc2_sqrt = (1 - b2 ** t).sqrt()
        for k, p in params.items():
            g = torch.where(ok, grads[k], torch.zeros_like(grads[k]))
            m, v = self.m[k], self.v[k]
            m.lerp_(g, (1 - b1) * okf)
            v.add_((g * g - v) * ((1 - b2) * okf))
            denom = v.sqrt() / bc2_sqrt + self.eps
            p.sub_((self.lr / bc1) * okf * m / denom)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "lr": self.lr, "betas": self.betas, "eps": self.eps,
                "t": self.t.clone(), "m": {k: v.clone() for k, v in self.m.items()},
                "v": {k: v.clone() for k, v in self.v.items()}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd["kind"] != self.kind:
            raise ck.ConfigMismatchError(f"meta-optimizer: checkpoint {sd['kind']!r}, requested "
                                         f"{self.kind!r}")
        dev, dt = self.t.device, self.t.dtype
        self.t = sd["t"].to(dev, dt)
        self.m = {k: v.to(dev, dt) for k, v in sd["m"].items()}
        self.v = {k: v.to(dev, dt) for k, v in sd["v"].items()}


# --------------------------------------------------------------------------------------------
# torch.distributed
# --------------------------------------------------------------------------------------------

class DistInfo:
    """This process's place in the job (rank 0 of 1 without torch.distributed)."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> tuple[DistInfo, str]:
    """Joins the torchrun job if its environment is set (WORLD_SIZE > 1); returns the info and
    the device this rank uses (``cuda:LOCAL_RANK`` when training on CUDA)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UsageError(f"WORLD_SIZE must be an int, got {os.environ['WORLD_SIZE']!r}") from None
    if world <= 1:
        return DistInfo(), device
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing and not dist.is_initialized():
        raise UsageError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start several "
                         f"processes with torchrun (torchrun --nproc_per_node={world} -m "
                         f"imaml_ext.train ...), which sets them all, or unset WORLD_SIZE")
    cuda = torch.device(device).type == "cuda"
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if cuda and local >= torch.cuda.device_count():
        raise UsageError(f"--device cuda: this process is LOCAL_RANK {local}, but only "
                         f"{torch.cuda.device_count()} CUDA device(s) are visible: one process "
                         f"per GPU (torchrun --nproc_per_node <= the GPU count)")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank()
    if cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return DistInfo(rank, dist.get_world_size()), device


def reduce_meta_gradient(grads: dict[str, torch.Tensor], task_ok: torch.Tensor,
                         info: DistInfo, extra: torch.Tensor | None = None
                         ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """The meta-gradient averaged over every finite task of every rank.

    Each rank's ``grads`` is its average over its own ``task_ok`` tasks; the all-reduce sums
    ``grads * n_ok`` and ``n_ok`` in one flat buffer (plus ``extra``, summed too), and the result
    is ``sum / total``: exactly the one-process average over the finite tasks of the whole batch.

    Returns:
        (averaged grads, total number of finite tasks as a 0-d tensor, summed ``extra``).
    """
    any_g = next(iter(grads.values()))
    n_ok = task_ok.to(any_g.device).sum().to(any_g.dtype)
    if not info.active:
        return grads, n_ok, extra
    names = list(grads)
    has = n_ok > 0
    parts = [torch.where(has, grads[k] * n_ok, torch.zeros_like(grads[k])).reshape(-1)
             for k in names]
    parts.append(n_ok.reshape(1))
    if extra is not None:
        parts.append(extra.to(any_g.device, any_g.dtype).reshape(-1))
    flat = torch.cat(parts)
    dist.all_reduce(flat)
    sizes = [grads[k].numel() for k in names]
    total_params = sum(sizes)
    total = flat[total_params]
    avg = flat[:total_params] / total.clamp_min(1)
    out = {k: chunk.view_as(grads[k]) for k, chunk in zip(names, avg.split(sizes))}
    red_extra = flat[total_params + 1:] if extra is not None else None
    return out, total, red_extra


# --------------------------------------------------------------------------------------------
# Metrics log
# --------------------------------------------------------------------------------------------

class MetricsLog:
    """Rows of metrics to ``metrics.csv`` or ``metrics.jsonl`` (and TensorBoard if installed).

    ``position()`` is the byte offset after the last flushed row; a resumed run truncates the
    file there, so the log holds each step once. TensorBoard's events are purged the same way:
    a resumed run passes ``purge_step`` (the first step it will run), and TensorBoard drops the
    interrupted run's events from that step on.
    """

    def __init__(self, run_dir: Path, fmt: str, truncate_at: int | None = None,
                 tensorboard: bool = True, purge_step: int | None = None):
        self.fmt = fmt
        self.path = run_dir / f"metrics.{fmt}"
        if truncate_at is not None and self.path.exists():
            size = self.path.stat().st_size
            if size >= truncate_at:
                with open(self.path, "r+b") as f:
                    f.truncate(truncate_at)
            else:
                # Shorter than the checkpoint's position (rows lost in a crash before they
                # reached the disk, or another run's log): truncate() would pad it with NUL
                # bytes. Keep the complete rows it has and say what is missing.
                with open(self.path, "r+b") as f:
                    data = f.read()
                    f.truncate(data.rfind(b"\n") + 1)
                log.warning("imaml_ext: %s is %d bytes, shorter than the %d the checkpoint "
                            "recorded: the rows of the last steps before the checkpoint are "
                            "missing from it (resuming after its last complete row)", self.path,
                            size, truncate_at)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self.fields = LOG_FIELDS
        if not new and fmt == "csv":  # an older run's log: its own columns, in its order
            with open(self.path, encoding="utf-8", newline="") as f:
                header = f.readline().strip()
            if header:
                self.fields = tuple(header.split(","))
        self.f = open(self.path, "a", encoding="utf-8", newline="")
        if new and fmt == "csv":
            self.f.write(",".join(LOG_FIELDS) + "\n")
            self.f.flush()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415
                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)
            except Exception:  # noqa: BLE001 - tensorboard is optional
                self.tb = None

    def write(self, row: dict[str, Any]) -> None:
        if self.fmt == "csv":
            vals = []
            for k in self.fields:
                v = row.get(k, "")
                vals.append(f"{v:.6g}" if isinstance(v, float) else str(v))
            self.f.write(",".join(vals) + "\n")
        else:
            self.f.write(json.dumps({k: v for k, v in row.items()
                                     if not (isinstance(v, float) and math.isnan(v))}) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{row['kind']}/{k}", v, row["step"])

    def position(self) -> int:
        """The offset after the last row, once the rows are on disk (fsync: the checkpoint that
        records it is fsynced too, so a crash cannot leave the log shorter than its position)."""
        self.f.flush()
        os.fsync(self.f.fileno())
        return self.f.tell()

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics log (csv or jsonl), numbers as floats."""
    run_dir = Path(run_dir)
    rows: list[dict[str, Any]] = []
    if (run_dir / "metrics.jsonl").exists():
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
        return rows
    import csv  # noqa: PLC0415
    with open(run_dir / "metrics.csv", newline="") as f:
        for r in csv.DictReader(f):
            row: dict[str, Any] = {}
            for k, v in r.items():
                if v == "":
                    continue
                try:
                    row[k] = float(v) if k != "kind" else v
                except ValueError:
                    row[k] = v
            rows.append(row)
    return rows


class _Progress:
    """tqdm when installed and not quiet; else one plain line per logged step."""

    def __init__(self, total: int, initial: int, quiet: bool, desc: str, cg: bool = True,
                 val_tasks: int = 2):
        self.quiet, self.bar, self.cg, self.val_tasks = quiet, None, cg, val_tasks
        if quiet or not sys.stderr.isatty():
            return  # plain lines in logs and pipes
        try:
            from tqdm import tqdm  # noqa: PLC0415
        except ImportError:
            return
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                        mininterval=1.0, file=sys.stderr)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def show(self, row: dict[str, Any]) -> None:
        if self.quiet:
            return
        if row["kind"] == "val":
            text = (f"step {row['step']}: val acc {100 * row['val_acc']:.2f}% "
                    + (f"+- {100 * row['val_ci95']:.2f}%" if self.val_tasks > 1
                       else "(one task: no interval)"))
            if self.bar is not None:
                self.bar.write(text, file=sys.stderr)
            else:
                print(text, file=sys.stderr, flush=True)  # stdout holds the JSON summary
            return
        post = {"loss": f"{row['meta_loss']:.3f}", "acc": f"{100 * row['query_acc']:.1f}%"}
        if self.cg:  # (a CG that broke down at once runs 0 iterations: shown all the same)
            post["cg_res"] = f"{row['cg_residual']:.2e}"
            if row.get("cg_negative_curvature", 0) > 0:
                post["neg_curv"] = f"{100 * row['cg_negative_curvature']:.0f}%"
        if row.get("inner_ls_failures", 0) > 0:
            post["ls_fail"] = f"{100 * row['inner_ls_failures']:.0f}%"
        if row.get("skipped_tasks"):
            post["skipped"] = str(row["skipped_tasks"])
        if self.bar is not None:
            self.bar.set_postfix(post, refresh=False)
        else:
            print(f"step {row['step']}: " + " ".join(f"{k} {v}" for k, v in post.items())
                  + f" ({row['tasks_per_s']:.1f} tasks/s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _detach_terminal() -> None:
    """After a hang-up the terminal is gone and every write to it fails (EIO), the progress
    bar's and the stop notice's among them, before the checkpoint: the standard streams that
    were on a terminal are pointed at /dev/null (as nohup would have), the stop goes on."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    for fd in (1, 2):
        try:
            if os.isatty(fd):
                os.dup2(null, fd)
        except OSError:
            pass
    os.close(null)


# The signals that stop a run as SIGTERM does (a terminal's or ssh session's hang-up too).
_TERMINATE = (signal.SIGTERM,) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())


@contextlib.contextmanager
def _signal_flag(enabled: bool, repeat_s: float = 0.0, announce: bool = True):
    """Installs SIGINT / SIGTERM / SIGHUP handlers that record the signal; restores the old ones
    after. A second signal quits at once (ForcedStop), except the same one again within
    ``repeat_s`` seconds of the first, which is taken for the same stop. announce: print the
    stop notice (rank 0 only under torchrun, whose every rank gets the forwarded signal)."""
    box = {"signum": 0, "at": 0.0}
    if not enabled or not _in_main_thread():
        yield box
        return

    def handler(signum, frame):  # noqa: ARG001
        if box["signum"]:
            if signum == box["signum"] and time.monotonic() - box["at"] < repeat_s:
                return  # the same stop, delivered twice (torchrun forwards what it received)
            # A second signal while the checkpoint is written: leave now.
            raise ForcedStop(signum)
        box["signum"], box["at"] = signum, time.monotonic()
        if signum == getattr(signal, "SIGHUP", None):
            _detach_terminal()
        if not announce:  # another rank's line says it (torchrun forwards to every rank)
            return
        try:
            print(f"\nimaml: {signal.Signals(signum).name} received; finishing this meta-step "
                  f"and writing a checkpoint (send it again to quit at once)", file=sys.stderr,
                  flush=True)
        except OSError:  # a hung-up terminal (EIO): the stop goes on without the notice
            pass

    # SIGHUP too: a closed terminal or ssh session sends it, and torchrun forwards it; unless
    # it is ignored (nohup), which stays so
    stops = [s for s in (signal.SIGINT,) + _TERMINATE
             if s in (signal.SIGINT, signal.SIGTERM) or signal.getsignal(s) is not signal.SIG_IGN]
    old = {s: signal.signal(s, handler) for s in stops}
    try:
        yield box
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _batches(sampler, start: int, num: int, sig: dict[str, Any]) -> Iterator[Any]:
    """``sampler.iter_batches(start, num)``; when the DataLoader reports a worker gone after a
    stop signal (the signal reached the prefetching workers too: they leave at once on SIGTERM,
    see data.sampler; torchrun signals each rank's whole process group), the remaining batches
    are drawn in this process: a batch depends on (seed, step) alone, so the step in flight runs
    on the same tasks and every rank reaches the all-reduce that stops the run. Anything else
    raises."""
    it = sampler.iter_batches(start, num)
    step, end = start, start + num
    while step < end:
        try:
            batch = next(it)
        except StopIteration:
            return
        except (RuntimeError, ConnectionError, EOFError) as e:
            # "DataLoader worker ... exited unexpectedly", or a prefetched batch whose shared
            # memory the gone worker can no longer hand over (resource_sharer's connection)
            lost = not isinstance(e, RuntimeError) or str(e).startswith("DataLoader worker")
            if not (sig["signum"] and lost):
                raise
            log.info("imaml_ext: the prefetching workers left with the signal (%s); drawing "
                     "the batches in the training process", e)
            for s in range(step, end):
                yield sampler.batch(s)
            return
        yield batch
        step += 1


def _in_main_thread() -> bool:
    import threading  # noqa: PLC0415
    return threading.current_thread() is threading.main_thread()


def _versions() -> dict[str, Any]:
    import imaml_ext  # noqa: PLC0415
    try:
        build = imaml_ext.build_info()
    except Exception:  # noqa: BLE001
        build = {}
    return {"imaml_ext": imaml_ext.__version__, "torch": str(torch.__version__),
            "python": platform.python_version(), "platform": platform.platform(),
            "extension": build}


def default_run_dir(algo: str) -> Path:
    """runs/<date-time>-<algo>, with -2, -3, ... when a run started in the same second."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, k = Path("runs") / f"{stamp}-{algo}", 1
    while path.exists():
        k += 1
        path = Path("runs") / f"{stamp}-{algo}-{k}"
    return path


def run_dir_of_checkpoint(path: str | Path) -> Path:
    """The run directory a checkpoint file belongs to (<run>/checkpoints/ckpt_N.pt)."""
    p = Path(os.path.abspath(path))  # a bare "ckpt.pt" inside checkpoints/ has parent "."
    return p.parent.parent if p.parent.name == ck.CKPT_DIR else p.parent


# The run folders this process holds the lock of: path -> [open lock file, holders].
_LOCKS: dict[str, list] = {}


def lock_run_dir(run_dir: Path) -> str | None:
    """An exclusive lock on ``run_dir/.lock`` (flock, which the OS drops when the process ends,
    kill -9 included) for a training process, so that a second one, an accidental relaunch or a
    requeued job while the first still runs, is refused instead of interleaving the metrics and
    overwriting each other's checkpoints. Reentrant within one process. Returns the key for
    ``unlock_run_dir``; None where flock does not exist (no lock taken)."""
    try:
        import fcntl  # noqa: PLC0415 (POSIX only)
    except ImportError:  # pragma: no cover - Windows
        return None
    key = os.path.abspath(run_dir)
    if key in _LOCKS:
        _LOCKS[key][1] += 1
        return key
    os.makedirs(key, exist_ok=True)
    f = open(os.path.join(key, ".lock"), "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # held: EWOULDBLOCK
        f.seek(0)
        pid = f.read().strip()
        f.close()
        raise UsageError(f"{run_dir} is in use by another training process (pid {pid or '?'}, "
                         f"per its .lock file): two runs writing one folder interleave its "
                         f"metrics and overwrite each other's checkpoints; let it finish or "
                         f"stop it first") from None
    except OSError as exc:  # a file system without flock (NFS, Lustre: ENOLCK, EOPNOTSUPP)
        f.close()
        log.warning("imaml_ext: could not lock %s (%s); training without the folder lock",
                    run_dir, exc.strerror or exc)
        return None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _LOCKS[key] = [f, 1]
    return key


def unlock_run_dir(key: str | None) -> None:
    """Releases one hold of lock_run_dir's lock (the lock itself with the last)."""
    if key is None or key not in _LOCKS:
        return
    _LOCKS[key][1] -= 1
    if _LOCKS[key][1] == 0:
        _LOCKS.pop(key)[0].close()  # closing the file releases the flock


# What marks a folder as a run's (a new run there would mix its files into the old one's).
RUN_MARKERS = ("config.json", ck.CKPT_DIR, "metrics.csv", "metrics.jsonl")


def check_run_dir(run_dir: Path, resumed_from: str | Path | None) -> bool:
    """A UsageError unless ``run_dir`` can take this run: a folder (or creatable), writable, and
    holding no other run with a checkpoint unless this one resumes from it (a new run there
    overwrote the config, appended its steps to the old metrics and left the old checkpoints
    beside its own: `latest` then pointed at whichever was written last).

    Returns True when the folder holds a run that wrote no checkpoint (it stopped at its first
    steps: an error, a kill): nothing to resume there, so this run replaces its files."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir}: is a file; give a folder for the run")
    own = resumed_from is not None and \
        run_dir_of_checkpoint(resumed_from).resolve() == run_dir.resolve()
    stale = False
    if not own and run_dir.is_dir():
        found = [m for m in RUN_MARKERS if (run_dir / m).exists()]
        if found and ck.list_checkpoints(run_dir):
            raise UsageError(f"--out {run_dir} already holds a run ({', '.join(found)}): "
                             f"continue it with --resume {run_dir}, or give another --out")
        stale = bool(found)
    anc = run_dir
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir() or not os.access(anc, os.W_OK | os.X_OK):
        raise UsageError(f"--out {run_dir}: cannot create or write the run folder there "
                         f"({anc} is not a writable folder)")
    return stale


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------

class Trainer:
    """Meta-trains one model with one algorithm (see the module docstring).

    Args:
        cfg: the run's configuration (``None`` fields take the paper defaults).
        resume: a checkpoint file or run directory to continue from; its identity fields must
            equal ``cfg``'s (else :class:`~imaml_ext.checkpoint.ConfigMismatchError`).
        algorithm: an algorithm object to use instead of ``make_algorithm(cfg.algo, ...)``.
        dist_info: the process's rank and world (default: from the torchrun environment).
        train_data / val_data: data sets to use instead of loading them (tests).
        stop_after: leave (as if interrupted, without a signal) once this many steps are done;
            for tests of resume.

    With ``cfg.cudnn_benchmark`` it sets ``torch.backends.cudnn.benchmark = True`` for the
    process (a global switch of torch's; it stays on after the Trainer is gone).
    """

    def __init__(self, cfg: TrainConfig, resume: str | Path | None = None, algorithm=None,
                 dist_info: DistInfo | None = None, train_data=None, val_data=None,
                 stop_after: int | None = None):
        cfg = resolve(cfg)
        usable_device(cfg.device)
        if dist_info is None:
            dist_info, device = init_distributed(cfg.device)
            cfg = cfg.replace(device=device)
        self.info = dist_info
        self.state = ck.load_latest(resume) if resume is not None else None
        if self.state is not None:
            # Where the run lives: --out if given, else the checkpoint's run directory.
            if cfg.out is None:
                cfg = cfg.replace(out=str(run_dir_of_checkpoint(self.state["path"])))
            if cfg.steps < int(self.state["step"]):
                raise UsageError(f"--steps {cfg.steps}: the run is already at step "
                                 f"{int(self.state['step'])}; give a larger --steps to go on")
        if cfg.out is None:
            cfg = cfg.replace(out=str(default_run_dir(cfg.algo)))
        # (rank 0's: it alone writes there, and another rank could see rank 0's new files)
        self._stale_run = self.info.is_main and check_run_dir(
            Path(cfg.out), self.state["path"] if self.state else None)
        self._lock = None
        if self.info.active and cfg.meta_batch % self.info.world:
            raise UsageError(f"--meta-batch {cfg.meta_batch} does not split evenly over "
                             f"{self.info.world} processes")
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        self.device = torch.device(cfg.device)
        self.dtype = getattr(torch, cfg.dtype)
        if cfg.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        self.stop_after = stop_after

        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg).to(self.device, self.dtype)
        self.params = {k: p.detach().clone() for k, p in self.model.named_parameters()}
        self.opt = MetaOptimizer(self.params, cfg.meta_lr, kind=cfg.meta_opt)
        self.step = 0
        self.counters = {"skipped_tasks": 0, "bad_steps": 0, "tasks": 0}
        log_pos = None
        if self.state is not None:
            ck.check_compatible(self.state, cfg.to_dict(),
                                ck.model_signature(self.params, self.model))
            with torch.no_grad():
                for k, v in self.state["params"].items():
                    self.params[k].copy_(v)
            self.opt.load_state_dict(self.state["optimizer"])
            self.step = int(self.state["step"])
            self.counters.update(self.state.get("counters", {}))
            log_pos = self.state.get("log", {}).get("position")
            log_file = self.state.get("log", {}).get("file")
            if log_file and log_file != f"metrics.{cfg.log_format}":
                # the other file would start at the resumed step: the log split in two
                raise UsageError(f"--log-format {cfg.log_format}: this run logs to {log_file}; "
                                 f"resume it with --log-format {log_file.rsplit('.', 1)[-1]}")
            rng = self.state.get("rng", {})
            if "torch" in rng:
                torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available() and self.device.type == "cuda":
                torch.cuda.set_rng_state_all(rng["cuda"])

        self.train_data = train_data if train_data is not None else load_split(cfg, "train")
        if self.state is not None:
            check_trained_classes(self.state, self.train_data, "resume")
        # under torchrun each rank draws every batch and keeps its share of the tasks
        self.sampler = make_sampler(cfg, self.train_data, cfg.meta_batch,
                                    shard=(self.info.rank, self.info.world))
        self.val_sampler = None
        if cfg.val_every:
            # every rank validates its share of the tasks (see validate)
            vd = val_data if val_data is not None else self._load_val()
            if self.info.active:  # all or none: a rank without the split would hang the others
                have = torch.tensor([float(vd is not None)], device=self.device)
                dist.all_reduce(have, op=dist.ReduceOp.MIN)
                if vd is not None and not bool(have.item()):
                    log.warning("imaml_ext: another process has no validation split; "
                                "validation disabled")
                    vd = None
            if vd is not None:
                self.val_sampler = make_sampler(cfg, vd, min(cfg.meta_batch, cfg.val_tasks),
                                                num_workers=0, per_task_seed=True)
        # Built last, so bad data or a bad checkpoint is reported before any heavier set-up.
        self.algorithm = algorithm if algorithm is not None else build_algorithm(cfg)
        self.log: MetricsLog | None = None
        if self.info.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UsageError(f"--out {self.run_dir}: cannot create the run folder "
                                 f"({exc.strerror or exc})") from None
            # rank 0, which writes there, holds the folder from its first write until run()
            # ends (or close())
            self._lock = lock_run_dir(self.run_dir)
            try:
                self._claim_run_dir(cfg, log_pos)
            except BaseException:
                if self.log is not None:
                    self.log.close()
                self.close()
                raise
        # the newest checkpoint on disk: the one resumed from until this run writes its own
        self.last_checkpoint: Path | None = Path(self.state["path"]) if self.state else None
        # once per run, not per session: a resumed run remembers it in its counters
        self._warned_curvature = bool(self.counters.get("warned_negative_curvature", 0))

    def _claim_run_dir(self, cfg: TrainConfig, log_pos) -> None:
        """Rank 0's first writes in the run folder, under its lock: the metrics log (truncated
        to a resumed checkpoint's position), config.json, sessions.jsonl. The folder is checked
        again first: another process may have written a run there between the first check and
        the lock (set-up can take minutes)."""
        self._stale_run = check_run_dir(self.run_dir, self.state["path"] if self.state else None)
        if self._stale_run:
            log.warning("imaml_ext: %s holds a run that wrote no checkpoint (it stopped "
                        "before its first); this run starts its metrics afresh there",
                        self.run_dir)
            for name in ("metrics.csv", "metrics.jsonl"):
                (self.run_dir / name).unlink(missing_ok=True)
        self.log = MetricsLog(self.run_dir, cfg.log_format, truncate_at=log_pos,
                              purge_step=self.step + 1 if self.state
                              else 1 if self._stale_run else None)
        session = {"argv": sys.argv, "world_size": self.info.world,
                   "resumed_from": self.state["path"] if self.state else None,
                   "start_step": self.step}
        cfg.save(self.run_dir / "config.json", extra={
            "versions": _versions(), **session, "train_data": self.train_data.source,
            "train_classes": self.train_data.num_classes})
        # config.json is this session's; every session's command line stays here
        with open(self.run_dir / "sessions.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": _dt.datetime.now().isoformat(timespec="seconds"),
                                **session}) + "\n")

    def close(self) -> None:
        """Releases the run folder's lock (run() does at its end; for a Trainer made and not
        run). Idempotent."""
        unlock_run_dir(self._lock)
        self._lock = None

    def __del__(self):
        if getattr(self, "_lock", None) is not None:  # (a constructor that failed early: none)
            self.close()

    def _load_val(self):
        """The validation split, or None (a warning) where the data set has none; damaged
        validation data is an error, as damaged training data is (DatasetFormatError)."""
        from imaml_ext.data import DatasetNotFoundError, SplitOptionError
        try:
            return load_split(self.cfg, "val")
        except (DatasetNotFoundError, SplitOptionError) as exc:
            log.warning("imaml_ext: no validation split (%s); validation disabled", exc)
            return None

    # ----------------------------------------------------------------------------------------

    def meta_step(self, batch: TaskBatch, stop_flags: tuple[float, ...] = (0.0, 0.0, 0.0)):
        """One meta-step on ``batch``: this rank's share of the meta-batch (what the trainer's
        sampler draws: TaskSampler(shard=(rank, world))).

        Returns (metrics of this rank's tasks, ok flag (0-d bool), finite-task count, the stop
        flags (SIGINT, SIGTERM, --max-time) summed over ranks, or None with one process).
        """
        local = batch.to(self.device, self.dtype)
        grads, metrics = self.algorithm.meta_gradient(self.model, self.params, local)
        task_ok = metrics["task_ok"]
        extra = (torch.tensor(list(stop_flags), device=self.device, dtype=self.dtype)
                 if self.info.active else None)
        grads, n_ok, extra = reduce_meta_gradient(grads, task_ok, self.info, extra)
        norms = torch._foreach_norm([g.reshape(-1) for g in grads.values()])
        ok = torch.isfinite(torch.stack(norms).sum()) & (n_ok > 0)
        self.opt.step(self.params, grads, ok)
        return metrics, ok, n_ok, extra

    def checkpoint(self) -> Path | None:
        """Writes a checkpoint of the current step (rank 0 only)."""
        if not self.info.is_main:
            return None
        state = {
            "params": {k: v.detach().cpu() for k, v in self.params.items()},
            "optimizer": _to_cpu(self.opt.state_dict()),
            "step": self.step,
            "config": self.cfg.to_dict(),
            "model": ck.model_signature(self.params, self.model),
            "algorithm": {"name": self.cfg.algo, **self.cfg.algorithm_kwargs()},
            "rng": _rng_state(self.device),
            "log": {"file": self.log.path.name, "position": self.log.position()},
            "counters": dict(self.counters),
            "versions": _versions(),
            # what it trained on: resume and evaluation refuse data that contradicts it
            "data": {"source": self.train_data.source,
                     "train_classes": list(self.train_data.class_names)},
        }
        try:
            path = ck.save_checkpoint(self.run_dir, state, keep=self.cfg.keep_ckpts)
        except OSError as exc:  # disk full, I/O error: the previous checkpoint is intact
            raise ck.CheckpointError(
                f"could not write the checkpoint of step {self.step} under "
                f"{self.run_dir / ck.CKPT_DIR} ({exc.strerror or exc}); the last good one is "
                f"{self.last_checkpoint or 'none (this run wrote none yet)'}: free space and "
                f"resume with imaml train --resume {self.run_dir}") from exc
        self.last_checkpoint = path
        return path

    def validate(self, should_stop: Callable[[], bool] | None = None) -> dict[str, Any] | None:
        """Scores ``val_tasks`` validation tasks (the same ones at every validation). Under
        torchrun each rank adapts every world-th meta-batch of them and the per-task results are
        gathered (no rank waits on another's whole evaluation, as the collective's timeout would
        otherwise bound it); the figures equal a one-process validation's. None when there is
        no validation split, or when should_stop() said True after some meta-batch (a stop
        signal: the run checkpoints at once rather than after minutes of validation, which a
        scheduler's or torchrun's grace period, 30 s by default, does not wait for)."""
        if self.val_sampler is None:
            return None
        shard, gather = (0, 1), None
        if self.info.active:
            shard = (self.info.rank, self.info.world)

            def gather(local: torch.Tensor) -> torch.Tensor:
                mine = local.to(self.device)
                every = [torch.empty_like(mine) for _ in range(self.info.world)]
                dist.all_gather(every, mine)
                return torch.stack(every)
        res = evaluate_tasks(self.algorithm, self.model, self.params, self.val_sampler,
                             self.cfg.val_tasks, dtype=self.dtype, split="val",
                             progress_every_s=None if self.cfg.quiet or not self.info.is_main
                             else 30.0, shard=shard, gather=gather, should_stop=should_stop)
        if res is None:
            return None
        return {"kind": "val", "step": self.step, "val_loss": res.loss, "val_acc": res.accuracy,
                "val_ci95": res.ci95}

    def run(self, on_log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Trains from the current step to ``cfg.steps``; returns a summary dict. The run
        folder's lock (lock_run_dir, taken when the Trainer was made) is released at the end.

        Raises:
            Interrupted: after SIGINT/SIGTERM/SIGHUP (a checkpoint was written first).
            TrainingDivergedError: after ``max_bad_steps`` consecutive bad meta-steps.
        """
        try:
            return self._run(on_log)
        finally:
            self.close()

    def _run(self, on_log) -> dict[str, Any]:
        cfg, dev = self.cfg, self.device
        nm = len(METRIC_KEYS)
        # Window sums on the device: per metric (sum over finite tasks, count), then tasks,
        # skipped tasks. Bad-step counters are the same on every rank and kept apart.
        window = torch.zeros(2 * nm + 2, dtype=torch.float64, device=dev)
        bad = torch.zeros(3, dtype=torch.int64, device=dev)  # bad steps, consecutive, max consec
        bad[1:] = int(self.counters.get("consecutive_bad_steps", 0))  # a resumed run's run of them
        self._bad_base = int(self.counters["bad_steps"])
        # training wall time over the run's processes: a resumed run goes on from its
        # checkpoint's (the steps a crash lost after it are run, and counted, again)
        self._elapsed_base = float(self.counters.get("elapsed_s", 0.0))
        if self.info.active:
            dist.barrier()  # every rank's --max-time clock from the same moment
        t_start = time.perf_counter()
        t_window, steps_window, last_val = t_start, 0, None
        progress = _Progress(cfg.steps, self.step, cfg.quiet or not self.info.is_main,
                             f"{cfg.algo} {cfg.dataset} {cfg.ways}w{cfg.shots}s",
                             cg=cfg.algo.startswith("imaml"), val_tasks=cfg.val_tasks)
        try:
            # Under torchrun a scheduler's signal comes twice (to every process, and forwarded
            # by torchrun's agent): a repeat within a few seconds is the same stop.
            with _signal_flag(True, repeat_s=3.0 if self.info.active else 0.0,
                              announce=self.info.is_main) as sig:
                batches = _batches(self.sampler, self.step, max(cfg.steps - self.step, 0), sig)
                t_prev = None
                for batch in batches:
                    now = time.perf_counter()
                    step_s = 0.0 if t_prev is None else now - t_prev  # the last step's time
                    t_prev = now
                    # Checked before the step and acted on after it (all ranks agree through
                    # the all-reduce): stop after this step when the next one, as long as the
                    # last, would end past --max-time, so that no step ends after it (with
                    # steady step times; the first step always runs).
                    timed_out = bool(cfg.max_time) and now - t_start + 2 * step_s > cfg.max_time
                    want = (float(sig["signum"] == signal.SIGINT),
                            float(sig["signum"] in _TERMINATE), float(timed_out))
                    metrics, ok, _, stop = self.meta_step(batch, want)
                    self.step += 1
                    steps_window += 1
                    window += _metric_sums(metrics, dev)
                    okl = ok.to(torch.int64)
                    bad[0] += 1 - okl
                    bad[1] = (bad[1] + 1) * (1 - okl)
                    bad[2] = torch.maximum(bad[2], bad[1])
                    progress.update()
                    last = self.step == cfg.steps
                    # One process: a signal that came during the step stops after it. Several:
                    # the flags (SIGINT, SIGTERM, --max-time) all-reduced with the
                    # meta-gradient, so every rank agrees on whether and why.
                    if stop is not None:
                        s_int, s_term, s_time = (v > 0 for v in stop.tolist())
                    else:
                        s_int, s_term, s_time = (sig["signum"] == signal.SIGINT,
                                                 sig["signum"] in _TERMINATE, timed_out)
                    stopping = s_int or s_term or s_time
                    if self.stop_after is not None and self.step >= self.stop_after:
                        stopping = True
                    ckpt_now = (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or last \
                        or stopping

                    def log_window():
                        nonlocal t_window, steps_window
                        row = self._log_row(window, bad, steps_window,
                                            time.perf_counter() - t_window, t_start)
                        window.zero_()
                        t_window, steps_window = time.perf_counter(), 0
                        if row is not None:
                            progress.show(row)
                            if on_log:
                                on_log(row)

                    # a checkpoint step logs too: its window goes into the counters it saves
                    if self.step % cfg.log_every == 0 or ckpt_now:
                        log_window()
                    # (not after a stop signal: the run checkpoints and leaves; s_int / s_term
                    # are the ranks' agreed flags, so all skip it or none does)
                    if cfg.val_every and (self.step % cfg.val_every == 0 or last) \
                            and self.val_sampler is not None and not (s_int or s_term):
                        # every rank takes part; a stop signal abandons it (no row), except
                        # the last step's, which completes the run
                        val = self.validate(should_stop=None if last
                                            else (lambda: bool(sig["signum"])))
                        if self.info.is_main and val is not None:
                            last_val = val
                            self.log.write(last_val)
                            progress.show(last_val)
                            if on_log:
                                on_log(last_val)
                        if not stopping and not last:
                            # validation can take minutes: a signal (or --max-time) that came
                            # during it stops the run here, not after one more meta-step (after
                            # the last step's, the run is complete and ends as such)
                            s_int, s_term, s_time = self._stop_flags(sig, t_start, step_s)
                            if s_int or s_term or s_time:
                                stopping = True
                                if not ckpt_now:
                                    ckpt_now = True
                                    if steps_window:
                                        log_window()
                    if ckpt_now:
                        self.checkpoint()
                    if stopping and not last:  # after the last step the run is complete
                        # this rank's signal, else another rank's (the same exit code everywhere)
                        signum = sig["signum"] if sig["signum"] and (s_int or s_term) else (
                            signal.SIGTERM if s_term else signal.SIGINT if s_int else 0)
                        if signum:
                            raise Interrupted(signum, self.step, self.last_checkpoint)
                        if s_time:
                            return self._summary(t_start, last_val, time_limited=True)
                        return self._summary(t_start, last_val, interrupted=True)  # stop_after
        finally:
            progress.close()
            self.sampler.close()
        if self.last_checkpoint is None:  # --steps 0, a new run: its initialisation, for eval
            self.checkpoint()
        return self._summary(t_start, last_val)

    def _stop_flags(self, sig, t_start: float, step_s: float) -> tuple[bool, bool, bool]:
        """(SIGINT, SIGTERM, --max-time) as of now, agreed over the ranks (an all-reduce) under
        torchrun: between steps, e.g. after a validation."""
        flags = [float(sig["signum"] == signal.SIGINT), float(sig["signum"] in _TERMINATE),
                 float(bool(self.cfg.max_time)
                       and time.perf_counter() - t_start + step_s > self.cfg.max_time)]
        if self.info.active:
            t = torch.tensor(flags, device=self.device, dtype=torch.float64)
            dist.all_reduce(t)
            flags = t.tolist()
        return flags[0] > 0, flags[1] > 0, flags[2] > 0

    def _log_row(self, window, bad, steps_window, dt, t_start) -> dict[str, Any] | None:
        nm = len(METRIC_KEYS)
        if self.info.active:
            dist.all_reduce(window)
        w = window.tolist()  # the one host read of this window
        b = bad.tolist()
        bad[2] = bad[1]
        self.counters["bad_steps"] = self._bad_base + int(b[0])
        self.counters["consecutive_bad_steps"] = int(b[1])
        self.counters["skipped_tasks"] += int(w[2 * nm + 1])
        self.counters["tasks"] += int(w[2 * nm])
        self.counters["elapsed_s"] = self._elapsed_base + time.perf_counter() - t_start
        if b[2] >= self.cfg.max_bad_steps:
            raise TrainingDivergedError(
                f"{b[2]} consecutive meta-steps had a non-finite meta-gradient (or no finite "
                f"task) up to step {self.step}; aborting (--max-bad-steps "
                f"{self.cfg.max_bad_steps}, checked at each logged step: the bad steps left the "
                f"parameters unchanged). Lower --meta-lr / --inner-lr"
                f"{' or raise --lam' if self.cfg.algo in HEAD_ALGORITHMS else ''}; "
                f"the last checkpoint is {self.last_checkpoint}")
        if not self.info.is_main:
            return None

        def mean(i):
            return w[2 * i] / w[2 * i + 1] if w[2 * i + 1] else float("nan")

        row = {"kind": "train", "step": self.step, "meta_loss": mean(0), "query_acc": mean(1),
               "inner_loss": mean(2), "cg_residual": mean(3), "cg_iterations": mean(4),
               "cg_negative_curvature": mean(5), "inner_ls_failures": mean(6),
               "skipped_tasks": self.counters["skipped_tasks"],
               "bad_steps": self.counters["bad_steps"],
               "elapsed_s": self.counters["elapsed_s"],
               "tasks_per_s": steps_window * self.cfg.meta_batch / max(dt, 1e-9)}
        self.log.write(row)
        self._warn_negative_curvature(row)
        return row

    def _warn_negative_curvature(self, row: dict[str, Any]) -> None:
        """Warns once per run when most tasks' CG meets negative curvature: their meta-gradient
        is then CG's last good iterate, not the implicit gradient, and training tends to stall.
        Measured (Omniglot 5-way 1-shot, conv net, 8 tasks a step, CPU;
        benchmarks/results/imaml_recipe_cpu.md): iMAML-GD with the paper's lam 2 / inner lr 0.1
        / 16 steps met it in 75% of tasks at the random initialisation and stalled at 62% query
        accuracy over 211 meta-steps (on an H100 it fell from 67% to 34% in 488 steps of 32),
        while the authors' inner loop (--proximal authors) reached 91% in 50 steps. iMAML-HF
        (4 Newton-CG steps on G) met it in 90% of tasks and hovered near 70% over 100 steps;
        with the Gauss-Newton product (--hvp ggn) in 0% and reached 82% at step 100, rising.
        The advice names what applies to the run's algorithm."""
        frac = row.get("cg_negative_curvature", 0.0)
        if self._warned_curvature or not frac > NEGATIVE_CURVATURE_WARN:
            return
        self._warned_curvature = True
        self.counters["warned_negative_curvature"] = 1
        c = self.cfg
        if c.algo == "imaml-hf":
            advice = ("For iMAML-HF the Gauss-Newton product avoids it: --hvp ggn is positive "
                      "semi-definite, so neither the Newton-CG nor the meta-gradient's CG meets "
                      "negative curvature (Omniglot 5-way 1-shot: 82%% query accuracy at step "
                      "100 against about 70%% with the exact Hessian, at about 1.2x the time per "
                      "step on a CPU).")
        else:
            advice = ("The iMAML authors' inner loop avoids it on the Omniglot conv net: "
                      "--proximal authors (their whole recipe: --proximal authors --cg-damping 1 "
                      f"--cg-lam {c.lam + 10:g}).")
        log.warning(
            "imaml_ext: CG met negative curvature in %.0f%% of the tasks of the log window "
            "ending at step %d: the matrix (1 + cg_damping) I + H / cg_lam is indefinite at "
            "these inner solutions (the inner solver has not reached a minimum of G), so those "
            "tasks' meta-gradients are CG's last good iterate, not the implicit gradient, and "
            "training tends to stall. " + advice + " Reported once per run.",
            100 * frac, self.step)

    def _summary(self, t_start, last_val, interrupted: bool = False,
                 time_limited: bool = False) -> dict[str, Any]:
        if self.log is not None:
            self.log.close()
        return {"run_dir": str(self.run_dir), "step": self.step, "interrupted": interrupted,
                "time_limited": time_limited,
                "seconds": time.perf_counter() - t_start, "last_val": last_val,
                "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
                **self.counters}


def _metric_sums(metrics: dict[str, torch.Tensor], device) -> torch.Tensor:
    """Per metric: sum over the finite ok tasks and their count; then #tasks and #skipped."""
    ok = metrics["task_ok"].to(device=device, dtype=torch.bool)
    parts = []
    for k in METRIC_KEYS:
        v = metrics.get(k)
        if k == "inner_ls_failures":  # per task: had one; no line search, none
            ls = metrics.get("hf_ls_failures")
            v = (ls > 0) if ls is not None else torch.zeros_like(ok)
        if v is None:
            parts += [torch.zeros((), dtype=torch.float64, device=device)] * 2
            continue
        v = v.detach().to(device=device, dtype=torch.float64)
        use = ok & torch.isfinite(v)
        parts += [torch.where(use, v, 0.0).sum(), use.sum().to(torch.float64)]
    parts += [torch.tensor(float(ok.numel()), dtype=torch.float64, device=device),
              (~ok).sum().to(torch.float64)]
    return torch.stack(parts)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


def _rng_state(device: torch.device) -> dict[str, Any]:
    s = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def train(cfg: TrainConfig, resume=None, **kw) -> dict[str, Any]:
    """Builds a :class:`Trainer` and runs it; returns its summary."""
    return Trainer(cfg, resume=resume, **kw).run()


def main(argv: list[str] | None = None) -> int:
    """``python -m imaml_ext.train ARGS``: the same as ``imaml train ARGS`` (torchrun-ready)."""
    from imaml_ext.cli import main as cli_main
    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


__all__ = ["DistInfo", "ForcedStop", "Interrupted", "MetaOptimizer", "MetricsLog", "Trainer",
           "TrainingDivergedError", "build_algorithm", "build_model", "init_distributed",
           "load_split", "main", "make_sampler", "read_metrics", "reduce_meta_gradient", "train"]

if __name__ == "__main__":
    sys.exit(main())
