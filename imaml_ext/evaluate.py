"""Few-shot evaluation: mean accuracy over test tasks with a 95% confidence interval.

The interval is the usual one of the few-shot literature: ``1.96 * std / sqrt(n)`` over the
per-task accuracies, with ``std`` the population standard deviation (NumPy's default,
``ddof=0``, as MAML's and the iMAML authors' evaluation code use).

Tasks are drawn and adapted in meta-batches (one vectorised ``algorithm.evaluate`` call per
meta-batch), with the algorithm's own test-time inner solver: the same inner problem it solves in
training (GD with the proximal term for iMAML-GD, Newton-CG for iMAML-HF, plain GD for MAML /
FOMAML / Reptile).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


@dataclass
class EvalResult:
    """Accuracy over ``num_tasks`` tasks; ``accuracy`` and ``ci95`` are fractions in [0, 1]."""

    accuracy: float
    ci95: float
    loss: float
    num_tasks: int
    nonfinite_tasks: int
    split: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self, what: str = "") -> str:
        ci = (f" +- {100 * self.ci95:.2f}% (95% CI, " if self.num_tasks > 1
              else " (one task: no interval, ")  # a spread of one task is not 0
        s = (f"accuracy {100 * self.accuracy:.2f}%{ci}{self.num_tasks} {self.split} "
             f"task{'s' if self.num_tasks != 1 else ''}{', ' + what if what else ''})")
        if self.nonfinite_tasks:
            s += f"; {self.nonfinite_tasks} tasks gave non-finite losses"
        return s


def confidence_interval(values) -> tuple[float, float]:
    """(mean, 1.96 * std / sqrt(n)) of per-task values; ``std`` with ddof=0. n = 0 -> (nan, nan)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(1.96 * v.std() / math.sqrt(v.size))


def _progress_line(split, accs, num_tasks, t0, t_shown, every_s) -> float:
    """Prints one progress line when every_s has passed since the last (and the evaluation is
    not done); returns the time of the last line shown."""
    now = time.perf_counter()
    done = min(sum(a.numel() for a in accs), num_tasks)
    if now - t_shown < every_s or done >= num_tasks:
        return t_shown
    acc = torch.cat(accs)[:done]
    acc = torch.where(torch.isfinite(acc), acc, torch.zeros_like(acc))
    el = now - t0
    print(f"eval {split}: {done}/{num_tasks} tasks, accuracy so far {100 * float(acc.mean()):.2f}%, "
          f"{el:.0f} s elapsed, ~{el * (num_tasks - done) / done:.0f} s to go", file=sys.stderr,
          flush=True)
    return now


def evaluate_tasks(algorithm, model: torch.nn.Module, params: dict[str, torch.Tensor], sampler,
                   num_tasks: int, dtype: torch.dtype | None = None, split: str = "test",
                   start_step: int = 0, progress_every_s: float | None = None,
                   shard: tuple[int, int] = (0, 1),
                   gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> EvalResult | None:
    """Adapts to and scores ``num_tasks`` tasks drawn by ``sampler`` (its meta-batch at a time).

    Batches ``start_step, start_step + 1, ...`` of the sampler are used, so a given sampler seed
    always evaluates on the same tasks (with ``per_task_seed=True``, as evaluate_checkpoint and
    the trainer's validation build it, whatever the meta-batch). Per-task accuracies are read to
    the host once per meta-batch. progress_every_s: print a progress line to stderr (tasks done,
    accuracy so far, elapsed and remaining time) at most this often; None: silent.

    Over several processes (the trainer's validation under torchrun): ``shard=(rank, world)``
    makes this process adapt batches ``start_step + rank``, ``+ rank + world``, ... only, and
    ``gather`` (required then) maps this process's (K, 2) tensor of per-task (loss, accuracy),
    K = the same count on every process, to the (world, K, 2) stack of every process's; the
    result is every process's, equal to the one-process evaluation of the same tasks.

    should_stop: asked after every meta-batch; once it says True the evaluation is abandoned and
    None returned (the trainer's validation when a stop signal comes: a validation can take
    minutes, longer than a scheduler or torchrun waits after its SIGTERM). Over several
    processes every one returns None when any stopped (its flag travels with the gather).
    """
    if num_tasks <= 0:
        raise ValueError(f"num_tasks must be > 0, got {num_tasks}")
    rank, world = shard
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int)
            and 0 <= rank < world):
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard!r}")
    if world > 1 and gather is None:
        raise ValueError(f"shard={shard!r}: evaluating over {world} processes needs gather")
    m = sampler.meta_batch
    num_batches = -(-num_tasks // m)
    per_rank = -(-num_batches // world)  # batches of every process, the last ones padded
    mine = len(range(rank, num_batches, world))
    accs, losses = [], []
    t0 = time.perf_counter()
    t_shown = t0
    stopped = False
    for batch in sampler.iter_batches(start_step + rank, mine, stride=world):
        batch = batch.to(dtype=dtype) if dtype is not None else batch
        # No torch.no_grad(): adaptation differentiates the inner loss (the algorithm manages
        # its own autograd), so evaluation runs with grad mode on.
        loss, acc = algorithm.evaluate(model, params, batch)
        losses.append(loss.detach().double().cpu())
        accs.append(acc.detach().double().cpu())
        if progress_every_s is not None:  # this process's share
            t_shown = _progress_line(split, accs, min(num_tasks, mine * m), t0, t_shown,
                                     progress_every_s)
        if should_stop is not None and should_stop():
            stopped = True
            break
    if world > 1:
        # the last row carries this process's stop flag
        local = torch.full((per_rank * m + 1, 2), float("nan"), dtype=torch.float64)
        if accs:
            done = torch.stack([torch.cat(losses), torch.cat(accs)], 1)
            local[:done.shape[0]] = done
        local[-1] = float(stopped)
        every = gather(local).cpu()
        if bool((every[:, -1, 0] > 0).any()):
            return None
        every = every[:, :-1].reshape(world, per_rank, m, 2)
        # batch k * world + r is process r's k-th: the stack's (k, r) order is the batches'
        ordered = every.transpose(0, 1).reshape(-1, 2)
        losses, accs = [ordered[:, 0]], [ordered[:, 1]]
    elif stopped:
        return None
    acc = torch.cat(accs)[:num_tasks]
    loss = torch.cat(losses)[:num_tasks]
    finite = torch.isfinite(loss) & torch.isfinite(acc)
    # A task whose adaptation diverged counts as wrong (accuracy 0), not as missing, and not as
    # the chance score its NaN logits' argmax (index 0, the first class) would give it.
    acc = torch.where(finite, acc, torch.zeros_like(acc))
    mean, ci = confidence_interval(acc.numpy())
    lmean = float(loss[finite].mean()) if finite.any() else float("nan")
    return EvalResult(accuracy=mean, ci95=ci, loss=lmean, num_tasks=int(acc.numel()),
                      nonfinite_tasks=int((~finite).sum()), split=split,
                      seconds=time.perf_counter() - t0)


def evaluate_checkpoint(checkpoint: str | Path, tasks: int = 600, split: str = "test",
                        meta_batch: int | None = None, seed: int | None = None,
                        device: str | None = None, data_root: str | None = None,
                        num_workers: int = 0, overrides: dict[str, Any] | None = None,
                        progress_every_s: float | None = 10.0,
                        ) -> tuple[EvalResult, dict[str, Any]]:
    """Loads a checkpoint (file or run directory) and evaluates it on ``tasks`` tasks of ``split``.
    A progress line goes to stderr every ``progress_every_s`` seconds (None: none).

    Returns the result and a description dict (checkpoint path, step, config).
    """
    from imaml_ext import checkpoint as ck
    from imaml_ext import train as tr
    state = ck.load_latest(checkpoint)
    cfg = tr.TrainConfig.from_dict(state["config"])
    if device is not None:
        cfg = cfg.replace(device=device)
    if data_root is not None:
        cfg = cfg.replace(data_root=data_root)
    if overrides:
        cfg = cfg.replace(**overrides)
    dev = tr.usable_device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    model = tr.build_model(cfg).to(dev, dtype)
    # the model's own shapes (the checkpoint's params against its own signature always match)
    ck.check_compatible(state, cfg.to_dict(), ck.model_signature(dict(model.named_parameters()),
                                                                 model))
    params = {k: v.to(dev, dtype) for k, v in state["params"].items()}
    algorithm = tr.build_algorithm(cfg)
    dataset = tr.load_split(cfg, split)
    tr.check_trained_classes(state, dataset, split)
    sampler = tr.make_sampler(cfg, dataset, meta_batch or cfg.meta_batch,
                              seed=cfg.seed if seed is None else seed, num_workers=num_workers,
                              per_task_seed=True)
    try:
        res = evaluate_tasks(algorithm, model, params, sampler, tasks, dtype=dtype, split=split,
                             progress_every_s=progress_every_s)
    finally:
        sampler.close()
    info = {"checkpoint": state["path"], "step": int(state["step"]), "config": cfg.to_dict(),
            "data_source": dataset.source}
    return res, info


def write_json(path: str | Path, res: EvalResult, info: dict[str, Any]) -> None:
    """The result and its description as JSON at `path` (its folder made if missing), written
    atomically: a crash leaves the old file or the new one, never half of it."""
    from imaml_ext.checkpoint import atomic_write_bytes
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps({"result": res.to_dict(), **info}, indent=2,
                                         default=str) + "\n").encode())


__all__ = ["EvalResult", "confidence_interval", "evaluate_checkpoint", "evaluate_tasks",
           "write_json"]
