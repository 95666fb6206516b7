"""Few-shot data: Omniglot, Mini-ImageNet, and N-way K-shot task sampling.

Public entry points:
    load_dataset(name, split, root=None, protocol=None, seed=0, val_classes=None,
                 allow_embedded=None, **kwargs) -> FewShotDataset
    TaskSampler(dataset, ways, shots, queries, meta_batch, seed=0, rotate=None, device="cpu",
                num_workers=0) with .batch(step) -> TaskBatch and .iter_batches(start, num)

Where the data is: ``root`` (``--data-root``), else ``$IMAML_DATA``, else
``~/.cache/imaml_ext/data``. Decoded caches: beside the data when writable, else ``$IMAML_CACHE``
(default ``~/.cache/imaml_ext``). See the submodules' docstrings for layouts and conventions.
"""
from __future__ import annotations

from .common import (DatasetError, DatasetFormatError, DatasetNotFoundError, FewShotDataset,
                     SplitOptionError,
                     resolve_data_root, user_cache_dir, user_data_dir)
from .miniimagenet import MINIIMAGENET_MEAN, MINIIMAGENET_STD, load_miniimagenet
from .omniglot import load_embedded_omniglot, load_omniglot, resolve_omniglot
from .sampler import TaskSampler

DATASETS = ("omniglot", "miniimagenet")

__all__ = [
    "DATASETS", "DatasetError", "DatasetFormatError", "DatasetNotFoundError", "FewShotDataset",
    "SplitOptionError",
    "MINIIMAGENET_MEAN", "MINIIMAGENET_STD", "TaskSampler", "load_dataset",
    "load_embedded_omniglot", "load_miniimagenet", "load_omniglot", "resolve_data_root",
    "resolve_omniglot", "user_cache_dir", "user_data_dir",
]


def load_dataset(name: str, split: str = "train", root=None, protocol: str | None = None,
                 seed: int = 0, val_classes: int | None = None,
                 allow_embedded: bool | None = None,
                 **kwargs) -> FewShotDataset:
    """One split of a few-shot data set.

    Args:
        name: ``"omniglot"`` or ``"miniimagenet"`` (``"mini-imagenet"`` accepted).
        split: ``"train"``, ``"val"`` or ``"test"``.
        root: data root; else ``$IMAML_DATA``; else ``~/.cache/imaml_ext/data``.
        protocol: Omniglot only: ``"paper"`` (the default: 1,200 / 423 characters drawn with
            ``seed``, the iMAML paper's) or ``"background"`` (964 / 659).
        seed: Omniglot only: the one seed of the class split and of the val draw.
        val_classes: Omniglot only: training characters held out as val (default 100).
        allow_embedded: Omniglot only: fall back to the shipped subset when none is found
            (default None: only when no data root was named, neither ``root`` nor
            ``$IMAML_DATA``).
        **kwargs: passed on (``cache_dir``, ``download``, ``image_size``, ``decode_workers``).
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key == "omniglot":
        return load_omniglot(split, root=root, protocol=protocol or "paper", seed=seed,
                             val_classes=val_classes, allow_embedded=allow_embedded, **kwargs)
    if key == "miniimagenet":
        if protocol not in (None, "background"):  # "background": what runs have recorded
            raise ValueError(f"protocol={protocol!r} applies to omniglot only")
        return load_miniimagenet(split, root=root, val_classes=val_classes, **kwargs)
    raise ValueError(f"unknown data set {name!r}; expected one of {DATASETS}")
