"""N-way K-shot Q-query task sampling, deterministic in (seed, step).

A meta-batch is drawn with one ``torch.Generator`` seeded from ``(seed, step)``, so batch ``step``
is the same whether it is drawn first or after a resume, on any device and with any number of
prefetching workers. Per task: ``ways`` classes chosen without replacement (argsort of random
keys), then ``shots + queries`` distinct images per chosen class (argsort again), all tasks at once
by tensor indexing; no Python loop over tasks or images.

Label convention: a task's class ``j`` (in 0..N-1) is the ``j``-th of its randomly drawn classes;
support and query are class-contiguous: ``y_support = [0]*K + [1]*K + ... + [N-1]*K`` and
``y_query = [0]*Q + ... + [N-1]*Q`` (the same for every task). Conv nets with batch statistics do
not see the order; shuffle yourself if a model does.
"""
from __future__ import annotations

import itertools
import os
import signal
from typing import Iterator

import numpy as np
import torch
import torch.utils.data

from imaml_ext.types import TaskBatch

from .common import FewShotDataset


def step_seed(seed: int, step: int) -> int:
    """A well-mixed 63-bit generator seed for ``(seed, step)`` (NumPy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(step)]).generate_state(
        2, np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) & 0x7FFFFFFFFFFFFFFF


class _TaskDrawer:
    """The picklable part of a sampler: draws one meta-batch of uint8 images (CPU or device).

    Images live in a row table (classes * per_class, C*H*W); with rotation, the table holds all
    four rotations of every image (4x the memory: 60 MB for Omniglot's training characters), so a
    whole meta-batch, rotation included, is two ``index_select`` calls on contiguous rows.
    """

    def __init__(self, images: torch.Tensor, ways: int, shots: int, queries: int,
                 meta_batch: int, seed: int, rotate: bool, per_task: bool = False):
        num_classes, per_class = images.shape[:2]
        self.num_classes, self.per_class = num_classes, per_class
        self.item_shape = tuple(images.shape[2:])
        rows = num_classes * per_class
        if rotate:
            self.table = torch.cat([torch.rot90(images, r, dims=(-2, -1)).reshape(rows, -1)
                                    for r in range(4)])
        else:
            self.table = images.reshape(rows, -1)
        self.ways, self.shots, self.queries = ways, shots, queries
        self.meta_batch, self.seed, self.rotate = meta_batch, seed, rotate
        self.per_task = per_task

    def _rows(self, g: torch.Generator, m: int) -> torch.Tensor:
        """Table rows (m, N, K+Q) of m tasks drawn from g."""
        n, k, q = self.ways, self.shots, self.queries
        # Random keys + argsort: a uniformly random subset, in random order, per task (classes)
        # and per chosen class (images), for all tasks at once. Drawn on the CPU so the tasks
        # do not depend on the device.
        classes = torch.rand(m, self.num_classes, generator=g).argsort(dim=1)[:, :n]
        picks = torch.rand(m, n, self.per_class, generator=g).argsort(dim=2)[:, :, :k + q]
        row = classes[:, :, None] * self.per_class + picks  # (M, N, K+Q)
        if self.rotate:
            # One angle per class per task, shared by its support and query images.
            rot = torch.randint(0, 4, (m, n), generator=g)
            row = row + (rot * (self.num_classes * self.per_class))[:, :, None]
        return row

    def draw(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 support (M, N*K, C, H, W) and query (M, N*Q, C, H, W), rotation applied."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        m, n, k, q = self.meta_batch, self.ways, self.shots, self.queries
        if self.per_task:
            # task i = step * M + j from its own seed: the same tasks whatever M (evaluation,
            # where M only says how many tasks are adapted at once); a loop of M small draws
            row = torch.cat([self._rows(torch.Generator().manual_seed(
                step_seed(self.seed, int(step) * m + j)), 1) for j in range(m)])
        else:
            row = self._rows(torch.Generator().manual_seed(step_seed(self.seed, int(step))), m)
        dev = self.table.device
        xs = self.table.index_select(0, row[:, :, :k].reshape(-1).to(dev))
        xq = self.table.index_select(0, row[:, :, k:].reshape(-1).to(dev))
        return xs.view(m, n * k, *self.item_shape), xq.view(m, n * q, *self.item_shape)


def _ignore_stop_signals(worker_id: int) -> None:  # noqa: ARG001 (DataLoader's signature)
    """worker_init_fn: the stop signals are the training process's to act on.

    A Ctrl-C (SIGINT, sent to the whole process group): a forked worker inherits the trainer's
    handler (which printed the stop message once more per worker), and with the default one a
    Ctrl-C killed the workers while the trainer still needed batches to finish its meta-step and
    checkpoint; so workers ignore it (the trainer stops them after its checkpoint).
    SIGTERM (a scheduler's time limit signals every process of the job, `timeout` the whole
    group; the DataLoader's shutdown and multiprocessing's at exit stop a late worker with it and
    then wait): the worker leaves at once with status 0. Killed by the signal, torch's SIGCHLD
    handler raised in the trainer in the middle of its step (no checkpoint); ignoring it hung the
    shutdown. A batch lost with the workers is drawn in the trainer (train._batches)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _leave_quietly)
    # a hang-up reaches the whole group too: as SIGTERM (unless ignored, as under nohup)
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, _leave_quietly)


def _leave_quietly(signum, frame) -> None:  # noqa: ARG001
    os._exit(0)


class _StepDataset(torch.utils.data.Dataset):
    """Map-style dataset whose index is the training step (for DataLoader prefetching)."""

    def __init__(self, drawer: _TaskDrawer):
        self.drawer = drawer

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.drawer.draw(step)


class _StepRange(torch.utils.data.Sampler):
    """The steps the next pass over the DataLoader yields; reset before each pass, so one pool
    of persistent workers serves every call of :meth:`TaskSampler.iter_batches`."""

    def __init__(self):
        self.steps = range(0)

    def __iter__(self):
        return iter(self.steps)


class TaskSampler:
    """Draws meta-batches of N-way K-shot Q-query tasks from a :class:`FewShotDataset`.

    Args:
        dataset: the split to draw from.
        ways: N classes per task.
        shots: K support images per class.
        queries: Q query images per class.
        meta_batch: M tasks per batch.
        seed: with the step, fixes every batch.
        rotate: rotate each class of a task by a random multiple of 90 degrees (the same angle
            for all its images, drawn anew per task). Default: ``dataset.rotate`` (Omniglot: True).
        device: where the returned tensors live.
        num_workers: with > 0, :meth:`iter_batches` prefetches in that many worker processes
            (persistent, pinned memory on CUDA); the batches are identical to ``batch(step)``.
        images_on_device: keep the whole uint8 image table on ``device`` and index there (the
            default on CUDA with ``num_workers=0``; Omniglot's training characters with their
            four rotations take 60 MB, Mini-ImageNet's training split 0.8 GB).
        per_task_seed: draw task i (= step * meta_batch + j) from (seed, i) alone, so that the
            tasks do not depend on meta_batch (evaluation); by default a batch is drawn at once
            from (seed, step) (training: one generator per meta-step).
        shard: (rank, world): every batch is drawn whole (the same task stream whatever the
            world) and this process gets tasks [rank * M / world, (rank + 1) * M / world) of it,
            cut before they are moved to ``device`` and made float (multi-process training:
            each GPU holds and converts its share only). M must split evenly.

    Images come out float32: Omniglot in [0, 1] (ink 1), Mini-ImageNet normalised per channel
    (see ``dataset.mean`` / ``dataset.std``). Labels are int64, class-contiguous (module doc).
    """

    def __init__(self, dataset: FewShotDataset, ways: int, shots: int, queries: int,
                 meta_batch: int, seed: int = 0, rotate: bool | None = None,
                 device: str | torch.device = "cpu", num_workers: int = 0,
                 images_on_device: bool | None = None, per_task_seed: bool = False,
                 shard: tuple[int, int] = (0, 1)):
        for arg, v in (("ways", ways), ("shots", shots), ("queries", queries),
                       ("meta_batch", meta_batch)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"TaskSampler: {arg} must be a positive int, got {v!r}")
        rank, world = shard
        if not (isinstance(world, int) and isinstance(rank, int) and 0 <= rank < world
                and meta_batch % world == 0):
            raise ValueError(f"TaskSampler: shard must be (rank, world) with 0 <= rank < world "
                             f"and world dividing meta_batch={meta_batch}, got {shard!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or \
                not 0 <= seed < 2 ** 64:
            raise ValueError(f"TaskSampler: seed must be an int in [0, 2**64), got {seed!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"TaskSampler: num_workers must be an int >= 0, got {num_workers!r}")
        what = f"{dataset.name}/{dataset.split}"
        if ways > dataset.num_classes:
            raise ValueError(f"TaskSampler: ways={ways} exceeds the {dataset.num_classes} classes "
                             f"of {what}")
        if shots + queries > dataset.per_class:
            raise ValueError(f"TaskSampler: shots + queries = {shots} + {queries} = "
                             f"{shots + queries} exceeds the {dataset.per_class} images per class "
                             f"of {what}")
        c, h, w = dataset.image_shape
        rotate = dataset.rotate if rotate is None else bool(rotate)
        if rotate and h != w:
            raise ValueError(f"TaskSampler: rotate=True needs square images, got {h}x{w}")
        self.dataset = dataset
        self.ways, self.shots, self.queries = int(ways), int(shots), int(queries)
        self.meta_batch, self.seed, self.rotate = int(meta_batch), int(seed), rotate
        self.device = torch.device(device)
        self.num_workers = num_workers
        if images_on_device is None:
            images_on_device = self.device.type == "cuda" and num_workers == 0
        if images_on_device and num_workers > 0:
            raise ValueError("TaskSampler: images_on_device=True needs num_workers=0 (workers "
                             "draw on the CPU)")
        images = dataset.images.to(self.device) if images_on_device else dataset.images
        self._drawer = _TaskDrawer(images, self.ways, self.shots, self.queries,
                                   self.meta_batch, self.seed, rotate, per_task=per_task_seed)
        n, k, q = self.ways, self.shots, self.queries
        per = meta_batch // world
        self._rows = slice(rank * per, (rank + 1) * per) if world > 1 else None
        self._y_support = torch.arange(n).repeat_interleave(k).expand(per, -1).contiguous()
        self._y_query = torch.arange(n).repeat_interleave(q).expand(per, -1).contiguous()
        self._loader = None
        self._steps = None

    def __repr__(self) -> str:
        return (f"TaskSampler({self.dataset.name}/{self.dataset.split}, {self.ways}-way "
                f"{self.shots}-shot {self.queries}-query, meta_batch={self.meta_batch}, "
                f"seed={self.seed}, rotate={self.rotate}, device={self.device})")

    def _finish(self, raw: tuple[torch.Tensor, torch.Tensor]) -> TaskBatch:
        """uint8 support / query -> a float TaskBatch on the device (converted there), this
        shard's tasks only."""
        if self._rows is not None:
            raw = tuple(x[self._rows] for x in raw)
        xs, xq = (self.dataset.to_float(x.to(self.device, non_blocking=True)) for x in raw)
        return TaskBatch(xs, self._y_support.to(self.device, non_blocking=True), xq,
                         self._y_query.to(self.device, non_blocking=True))

    def batch(self, step: int) -> TaskBatch:
        """The meta-batch of ``step``: the same for the same (seed, step), whatever came before.

        Returns:
            TaskBatch with x_support (M, N*K, C, H, W) float32, y_support (M, N*K) int64,
            x_query (M, N*Q, C, H, W), y_query (M, N*Q); with ``shard=(rank, world)``, M / world
            tasks (this process's share).
        """
        return self._finish(self._drawer.draw(step))

    def iter_batches(self, start_step: int = 0, num_steps: int | None = None,
                     stride: int = 1) -> Iterator[TaskBatch]:
        """Yields ``batch(s)`` for s = start_step, start_step + stride, ... (``num_steps`` of
        them, forever if None; a stride > 1 shares an evaluation's batches out over processes).

        With ``num_workers > 0`` the batches are drawn ahead in worker processes (a DataLoader
        with persistent workers reused across calls); the results equal ``batch(s)``. Use one
        iterator at a time.
        """
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
        if num_steps is not None and num_steps < 0:
            raise ValueError(f"num_steps must be >= 0 or None, got {num_steps!r}")
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be an int >= 1, got {stride!r}")
        steps = (itertools.count(start_step, stride) if num_steps is None
                 else range(start_step, start_step + num_steps * stride, stride))
        if self.num_workers == 0:
            for s in steps:
                yield self.batch(s)
            return
        if self._loader is None:
            self._steps = _StepRange()
            self._loader = torch.utils.data.DataLoader(
                _StepDataset(self._drawer), batch_size=None, sampler=self._steps,
                num_workers=self.num_workers, persistent_workers=True,
                worker_init_fn=_ignore_stop_signals,
                pin_memory=self.device.type == "cuda",
                prefetch_factor=2)
        self._steps.steps = steps
        for raw in self._loader:
            yield self._finish(raw)

    def __iter__(self) -> Iterator[TaskBatch]:
        return self.iter_batches(0, None)

    def close(self) -> None:
        """Stops the prefetching workers (they also stop when the sampler is garbage collected)."""
        self._loader = None
        self._steps = None
