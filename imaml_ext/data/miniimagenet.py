"""Mini-ImageNet (Vinyals et al. 2016; Ravi & Larochelle's 64 / 16 / 20 class split).

Accepted layouts, looked for in the data root and in its sub-folders ``miniimagenet``,
``mini-imagenet``, ``mini_imagenet`` and ``miniImageNet`` (first hit wins, in this order):

  1. the pickle caches ``mini-imagenet-cache-{train,val,test}.pkl``: a dict with ``image_data``
     (uint8 (N, 84, 84, 3)) and ``class_dict`` ({label: [row indices]}). Pickles can run code when
     loaded: only load files you trust.
  2. the usual folder: ``images/*.jpg`` plus ``train.csv``, ``val.csv``, ``test.csv`` (header
     ``filename,label``);
  3. the same layout inside ``mini-imagenet.zip`` / ``miniimagenet.zip`` (top folder optional);
  4. split files without their images (e.g. the bare Ravi & Larochelle csvs): an error naming
     the first missing image (not the stand-in in their place);
  5. the stand-in ``tiny-mini-imagenet.zip`` (or its extracted folder ``tiny-mini-imagenet/``,
     found with 2): 100 Tiny-ImageNet classes, 100 64x64 photos each; used with a warning, since
     its accuracies are not comparable with Mini-ImageNet's.

Split files of one source that share a class are refused (tasks would test on classes that
meta-training saw). Images are converted to RGB (some photos are grayscale), resized to 84x84
with LANCZOS when they are not already that size, decoded once and cached as uint8 (see
:mod:`imaml_ext.data.common`). As floats they are normalised per channel with
:data:`MINIIMAGENET_MEAN` / :data:`MINIIMAGENET_STD` (the statistics of Mini-ImageNet's training
images, as used by common few-shot code; the same constants for every split and for the
stand-in, so no test statistics leak in).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import logging
import pickle
import time
from pathlib import Path

import numpy as np
import torch

from .common import (SPLITS, DatasetFormatError, DatasetNotFoundError, DecodeSpec,
                     FewShotDataset, SplitOptionError, cached_decode, check_split,
                     classes_from_flat, decode_images, open_zip, per_class_count, read_member,
                     resolve_data_root, source_key)

logger = logging.getLogger("imaml_ext.data")

IMAGE_SIZE = 84
MINIIMAGENET_MEAN = (120.39586422 / 255.0, 115.59361427 / 255.0, 104.54012653 / 255.0)
MINIIMAGENET_STD = (70.68188272 / 255.0, 68.27635443 / 255.0, 72.54505529 / 255.0)
_SUBDIRS = ("", "miniimagenet", "mini-imagenet", "mini_imagenet", "miniImageNet")
_ZIPS = ("mini-imagenet.zip", "miniimagenet.zip")
STANDIN = "tiny-mini-imagenet"


@dataclasses.dataclass(frozen=True)
class MiniImageNetSource:
    """Where one split lives.

    Attributes:
        kind: ``"pickle"``, ``"folder"`` (csv + images/ in ``path``) or ``"zip"``.
        path: the pickle file, the folder holding the csvs, or the zip.
        prefix: inside a zip, the folder holding the csvs (``""`` or ``"top/"``).
        standin: True for the tiny-mini-imagenet stand-in.
    """

    kind: str
    path: Path
    prefix: str = ""
    standin: bool = False


def _zip_prefix(path: Path, split: str) -> str | None:
    zf = open_zip(path)
    try:
        names = zf.namelist()
    finally:
        zf.close()
    for n in sorted(names, key=len):
        if n.split("/")[-1] == f"{split}.csv" and n.count("/") <= 1:
            return n[: -len(f"{split}.csv")]
    return None


def find_miniimagenet(root, split: str) -> MiniImageNetSource:
    """The source of ``split`` under ``root`` (see the module docstring for the order).

    Raises:
        DatasetNotFoundError: nothing usable; the message says what to put where.
        DatasetFormatError: a zip that cannot be read.
    """
    root = Path(root)
    dirs = [root / s if s else root for s in _SUBDIRS]
    for d in dirs:
        p = d / f"mini-imagenet-cache-{split}.pkl"
        if p.is_file():
            return MiniImageNetSource("pickle", p)
    for d in dirs + [root / STANDIN]:
        if (d / f"{split}.csv").is_file() and (d / "images").is_dir():
            return MiniImageNetSource("folder", d, standin=d.name == STANDIN)
    def from_zip(z: Path, standin: bool) -> MiniImageNetSource:
        prefix = _zip_prefix(z, split)
        if prefix is None:  # not there, as a folder without it: the trainer then skips val
            raise DatasetNotFoundError(
                f"{z}: no {split}.csv inside; expected the Mini-ImageNet layout "
                f"[top/]images/*.jpg plus [top/]train.csv, val.csv, test.csv")
        return MiniImageNetSource("zip", z, prefix, standin or prefix.rstrip("/") == STANDIN)

    for z in (root / z for z in _ZIPS):
        if z.is_file():
            return from_zip(z, False)
    # Real split files whose images/ folder is missing: an error that says so (checking the
    # folder), not the stand-in zip beside them in its place
    for d in dirs:
        if (d / f"{split}.csv").is_file():
            return MiniImageNetSource("folder", d)
    if (root / f"{STANDIN}.zip").is_file():
        return from_zip(root / f"{STANDIN}.zip", True)
    looked = ", ".join(str(d) for d in dirs)
    raise DatasetNotFoundError(
        f"Mini-ImageNet split {split!r} not found under the data root {root}. Looked in {looked} "
        f"for mini-imagenet-cache-{split}.pkl, or {split}.csv beside an images/ folder, and for "
        f"{', '.join(_ZIPS)} / {STANDIN}.zip in {root}. Mini-ImageNet has no official download: "
        f"put images/*.jpg and train.csv, val.csv, test.csv (Ravi & Larochelle's split files, "
        f"header 'filename,label') into {root / 'miniimagenet'}/, or the pickle caches "
        f"mini-imagenet-cache-train.pkl / -val.pkl / -test.pkl there, then point IMAML_DATA (or "
        f"--data-root) at {root}.")


def parse_split_csv(text: str, where: str) -> list[tuple[str, str, int]]:
    """Rows ``(filename, label, line number)`` of a ``filename,label`` split file.

    Raises:
        DatasetFormatError: bad header, a row without exactly two fields, or no rows.
    """
    rows = list(csv.reader(io.StringIO(text.lstrip("\ufeff"))))
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        got = rows[0] if rows else "an empty file"
        raise DatasetFormatError(f"{where}: expected the header 'filename,label', got {got!r}")
    out = []
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DatasetFormatError(f"{where}:{lineno}: expected 'filename,label', got {row!r}")
        out.append((row[0].strip(), row[1].strip(), lineno))
    if not out:
        raise DatasetFormatError(f"{where}: no rows after the header; expected one row per image")
    return out


def _split_texts(src: MiniImageNetSource) -> dict[str, tuple[str, str]]:
    """{split: (where, csv text)} of the split files a folder or zip source holds."""
    out = {}
    if src.kind == "folder":
        for s in SPLITS:
            path = src.path / f"{s}.csv"
            if path.is_file():
                try:
                    out[s] = (str(path), path.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError):
                    continue  # reading that split reports it
    elif src.kind == "zip":
        zf = open_zip(src.path)
        try:
            names = set(zf.namelist())
            for s in SPLITS:
                member = f"{src.prefix}{s}.csv"
                if member in names:
                    where = f"{src.path}:{member}"
                    try:
                        out[s] = (where, read_member(zf, member, where).decode("utf-8"))
                    except (DatasetFormatError, UnicodeDecodeError):
                        continue  # reading that split reports it
        finally:
            zf.close()
    return out


def check_disjoint_splits(src: MiniImageNetSource, split: str) -> None:
    """DatasetFormatError when ``split``'s classes appear in another split file of the same
    source (hand-made split files; Ravi & Larochelle's are disjoint): tasks would test on
    classes meta-training saw."""
    texts = _split_texts(src)
    if split not in texts:
        return
    mine = {label for _, label, _ in parse_split_csv(texts[split][1], texts[split][0])}
    for other, (where, text) in texts.items():
        if other == split:
            continue
        try:
            shared = mine & {label for _, label, _ in parse_split_csv(text, where)}
        except DatasetFormatError:
            continue  # reading that split reports it
        if shared:
            raise DatasetFormatError(
                f"{texts[split][0]} and {where} share {len(shared)} class(es) "
                f"({', '.join(sorted(shared)[:5])}): the {split} and {other} splits must be "
                f"disjoint (Ravi & Larochelle's split files are)")


def _group(rows: list[tuple[str, str, int]]) -> tuple[list[str], list[list[str]]]:
    by_label: dict[str, list[str]] = {}
    for fn, label, _ in rows:
        by_label.setdefault(label, []).append(fn)
    labels = sorted(by_label)
    return labels, [by_label[lab] for lab in labels]


def _missing_error(csv_where: str, lineno: int, expected: str, n_missing: int, n_total: int,
                   images_where: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{csv_where}:{lineno} names the image {expected}, which does not exist ({n_missing} of "
        f"the {n_total} images this split file names are missing). Expected every image it names "
        f"in {images_where}: put the Mini-ImageNet images there (or point IMAML_DATA / "
        f"--data-root at a folder that has them).")


def _check_folder(src: MiniImageNetSource, split: str) -> tuple[list, list[Path]]:
    """The csv rows of a folder source and the image paths they name; raises if any is missing."""
    csv_path = src.path / f"{split}.csv"
    try:
        text = csv_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetFormatError(f"{csv_path}: not a UTF-8 text file ({exc}); expected a csv "
                                 f"with header filename,label") from None
    rows = parse_split_csv(text, str(csv_path))
    images_dir = src.path / "images"
    files = [images_dir / r[0] for r in rows]
    missing = [(r, p) for r, p in zip(rows, files) if not p.is_file()]
    if missing:
        (fn, _, lineno), path = missing[0]
        raise _missing_error(str(csv_path), lineno, str(path), len(missing), len(rows),
                             f"{images_dir}/")
    return rows, files


def _decode_split(src: MiniImageNetSource, split: str, image_size: int,
                  workers: int | None, rows: list | None = None) -> dict:
    """Decodes one split; ``rows``: a folder source's csv rows, already checked by
    :func:`_check_folder` (read and checked here if None)."""
    spec = DecodeSpec(image_size, "RGB")
    if src.kind == "folder":
        if rows is None:
            rows, _ = _check_folder(src, split)
        container, is_zip, where = src.path / "images", False, str(src.path / f"{split}.csv")
        members = lambda fn: fn  # noqa: E731
    else:
        zf = open_zip(src.path)
        try:
            names = set(zf.namelist())
            where = f"{src.path}:{src.prefix}{split}.csv"
            try:
                text = read_member(zf, f"{src.prefix}{split}.csv", where).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetFormatError(f"{where}: the split file is not UTF-8 ({exc})") from None
            rows = parse_split_csv(text, where)
        finally:
            zf.close()
        container, is_zip = src.path, True
        members = lambda fn: f"{src.prefix}images/{fn}"  # noqa: E731
        missing = [r for r in rows if members(r[0]) not in names]
        if missing:
            fn, _, lineno = missing[0]
            raise _missing_error(where, lineno, f"{src.path}:{members(fn)}", len(missing),
                                 len(rows), f"{src.path}:{src.prefix}images/")
    labels, files = _group(rows)
    flat = [members(f) for fs in files for f in fs]
    t0 = time.perf_counter()
    arr = decode_images(container, is_zip, flat, spec, workers, channels_first=True)
    logger.info("imaml_ext: decoded %d Mini-ImageNet images (%s, %s) in %.1f s", len(flat),
                src.path, split, time.perf_counter() - t0)
    return {"images": classes_from_flat(arr, [len(fs) for fs in files], labels, where),
            "class_names": labels}


def _load_pickle(path: Path, image_size: int) -> dict:
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as exc:
        raise DatasetFormatError(f"{path}: cannot unpickle ({type(exc).__name__}: {exc}); the "
                                 f"file is probably truncated or corrupt") from None
    if not isinstance(data, dict) or "image_data" not in data or "class_dict" not in data:
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DatasetFormatError(f"{path}: expected a dict with 'image_data' and 'class_dict', "
                                 f"got {got}")
    x = np.asarray(data["image_data"])
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (image_size, image_size, 3):
        raise DatasetFormatError(f"{path}: expected image_data uint8 (N, {image_size}, "
                                 f"{image_size}, 3), got {x.dtype} {x.shape}")
    labels = sorted(data["class_dict"])
    idxs = []
    for lab in labels:
        idx = np.asarray(data["class_dict"][lab], dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(x)):
            raise DatasetFormatError(f"{path}: class {lab!r} indexes rows outside image_data "
                                     f"(0..{len(x) - 1})")
        idxs.append(idx)
    m = per_class_count([len(i) for i in idxs], labels, str(path))
    # each class copied once, straight into the result (channels first): the pickle's array and
    # the result at the peak, not a third copy for np.stack's inputs
    out = np.empty((len(labels), m, 3, image_size, image_size), np.uint8)
    for k, idx in enumerate(idxs):
        out[k] = x[idx[:m]].transpose(0, 3, 1, 2)
    return {"images": torch.from_numpy(out), "class_names": labels}


_warned_standin: set[str] = set()


def load_miniimagenet(split: str = "train", root=None, cache_dir=None,
                      image_size: int = IMAGE_SIZE, decode_workers: int | None = None,
                      val_classes: int | None = None) -> FewShotDataset:
    """One split of Mini-ImageNet as a :class:`FewShotDataset` of uint8 (C, P, 3, 84, 84) images.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` (the split files' own classes).
        root: data root (else ``IMAML_DATA``, else ``~/.cache/imaml_ext/data``).
        cache_dir: where the decoded cache goes (default: beside the data, else ``IMAML_CACHE``).
        image_size: side of the resized images.
        decode_workers: processes decoding the JPEGs on a cache miss (default: all CPUs).
        val_classes: must be None: Mini-ImageNet's val split is its own val.csv.

    Float images (:meth:`FewShotDataset.to_float`) are normalised with
    :data:`MINIIMAGENET_MEAN` / :data:`MINIIMAGENET_STD`.
    """
    check_split(split)
    if val_classes is not None:
        raise SplitOptionError("val_classes", f"val_classes applies to omniglot only "
                               f"(Mini-ImageNet's val split is its val.csv), got {val_classes}")
    src = find_miniimagenet(resolve_data_root(root), split)
    if src.standin and str(src.path) not in _warned_standin:  # once per process, not per split
        _warned_standin.add(str(src.path))
        logger.warning("imaml_ext: using the Mini-ImageNet STAND-IN %s (100 Tiny-ImageNet classes, "
                       "64x64 photos upsampled to 84x84); accuracies are not comparable with "
                       "published Mini-ImageNet numbers", src.path)
    if src.kind == "pickle":
        data = _load_pickle(src.path, image_size)
    else:
        check_disjoint_splits(src, split)
        rows = None
        if src.kind == "folder":
            rows, files = _check_folder(src, split)  # names the first missing image, if any
            cache_src = src.path / f"{split}.csv"
            key_paths = [cache_src] + files  # the csv and every image it names
        else:
            key_paths, cache_src = [src.path], src.path
        key = source_key(key_paths, extra=f"miniimagenet;{split};{src.prefix};"
                                          f"size={image_size};rgb;lanczos")
        tag = "tiny-miniimagenet" if src.standin else "miniimagenet"
        data = cached_decode(cache_src, f"{tag}-{split}-{image_size}px", key,
                             lambda: _decode_split(src, split, image_size, decode_workers, rows),
                             cache_dir)
    return FewShotDataset(images=data["images"], class_names=list(data["class_names"]),
                          name="miniimagenet", split=split, mean=MINIIMAGENET_MEAN,
                          std=MINIIMAGENET_STD, rotate=False, source=str(src.path))
