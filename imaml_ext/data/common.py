"""Shared plumbing of the data loaders: errors, where data and caches live, the decoded cache.

Where the data is (first hit wins):
  1. an explicit ``root`` argument (``--data-root`` on the command line);
  2. the environment variable ``IMAML_DATA``;
  3. the user data directory ``~/.cache/imaml_ext/data``.

Where decoded caches go: next to the source files (``<dir>/imaml_cache/``) when that directory is
writable, else the user cache directory (``$IMAML_CACHE``, else ``~/.cache/imaml_ext``). A directory
whose permission bits deny writing counts as read-only even for root, so a shared read-only data
folder is never written to. An explicit ``cache_dir`` argument overrides both.

A cache is one ``torch.save`` file holding a dict of uint8 images, class names and a ``key`` that
describes the source (path, size and mtime of every file it was decoded from, plus the decoding
settings); a cache whose key no longer matches is rebuilt. Caches are written atomically (temp file
in the same directory, fsync, ``os.replace``), so readers see the old cache or the new one, never a
half-written file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import multiprocessing
import os
import stat
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from imaml_ext._atomic import atomic_write

logger = logging.getLogger("imaml_ext.data")

# Bump when the cache layout or the decoding changes, so old caches are rebuilt.
CACHE_FORMAT = 1

# Below this many images decoding runs in-process: a pool costs more than it saves.
_POOL_MIN_IMAGES = 2000


class DatasetError(Exception):
    """Base class of every data-set error this package raises."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A data set, or a file it names, is not where it was looked for.

    The message says which files to put where (and mentions ``IMAML_DATA`` / ``--data-root``).
    """


class DatasetFormatError(DatasetError, ValueError):
    """A data set is there but malformed: corrupt image, truncated zip, wrong layout, bad csv."""


class SplitOptionError(DatasetError, ValueError):
    """A split option out of range for the data set found (``option`` names it, e.g.
    "val_classes"): the range depends on the data, so only the loader can check it."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option

    def __reduce__(self):  # pickles (a data-loader worker, another rank) with both arguments
        return type(self), (self.option, str(self))


# --------------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------------

def user_data_dir() -> Path:
    """The default data root when neither ``root`` nor ``IMAML_DATA`` is given."""
    return Path("~/.cache/imaml_ext/data").expanduser()


def user_cache_dir() -> Path:
    """``$IMAML_CACHE`` if set, else ``~/.cache/imaml_ext``."""
    env = os.environ.get("IMAML_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/imaml_ext").expanduser()


def resolve_data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: explicit ``root``, else ``$IMAML_DATA``, else :func:`user_data_dir`."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("IMAML_DATA")
    if env:
        return Path(env).expanduser()
    return user_data_dir()


def is_writable_dir(path: Path) -> bool:
    """True if ``path`` is (or can be created as) a directory we may write into.

    Permission bits are honoured even for root: a directory with no write bit set is treated as
    read-only, so a data folder shared read-only is never written to.
    """
    p = Path(path)
    while not p.exists():
        if p.parent == p:
            return False
        p = p.parent
    try:
        st = p.stat()
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or not (st.st_mode & 0o222):
        return False
    return os.access(p, os.W_OK | os.X_OK)


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def cache_locations(source: Path, name: str, cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Candidate cache files for ``source``, in lookup order; the first writable one is written.

    Args:
        source: the zip file or folder the images are decoded from.
        name: the cache file's base name, e.g. ``"omniglot-images_background-28px"``.
        cache_dir: if given, the only place looked at.
    """
    tag = _short_hash(str(Path(source).resolve()))
    if cache_dir is not None:
        return [Path(cache_dir).expanduser() / f"{name}-{tag}.pt"]
    beside = Path(source).resolve().parent / "imaml_cache" / f"{name}.pt"
    return [beside, user_cache_dir() / f"{name}-{tag}.pt"]


# --------------------------------------------------------------------------------------------
# Source keys
# --------------------------------------------------------------------------------------------

def _stat_tuple(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def source_key(paths: Iterable[Path], extra: str = "") -> str:
    """A string that changes when any of ``paths`` (files, or folders walked recursively) changes.

    Uses each file's path, size and mtime (nanoseconds); ``extra`` carries decoding settings.
    """
    h = hashlib.sha1()
    h.update(f"format={CACHE_FORMAT};{extra}".encode())
    parents: dict[str, Path] = {}  # each folder resolved once (38,400 images in one folder:
    # resolving every path walked its components again, 1.7 s of a 2.3 s cache hit)
    for path in paths:
        path = Path(path)
        if os.path.islink(path):
            path = path.resolve()
        else:
            parent = str(path.parent)
            if parent not in parents:
                parents[parent] = path.parent.resolve()
            path = parents[parent] / path.name
        if path.is_dir():
            # Through symlinked folders too, as the loaders read them (a set assembled from
            # links, say to leave alphabets out): otherwise an edit behind a link kept the old
            # cache. Each real folder once, so a link cycle ends.
            seen: set[str] = set()
            for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
                real = os.path.realpath(dirpath)
                if real in seen:
                    dirnames[:] = []
                    continue
                seen.add(real)
                dirnames.sort()
                for fn in sorted(filenames):
                    fp = Path(dirpath) / fn
                    size, mtime = _stat_tuple(fp)
                    h.update(f"{fp.relative_to(path)}\0{size}\0{mtime}\n".encode())
        else:
            size, mtime = _stat_tuple(path)
            h.update(f"{path}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Atomic cache files
# --------------------------------------------------------------------------------------------

def _serialize(obj: dict, fileobj) -> None:
    """Writes ``obj`` to an open binary file (a seam tests patch to simulate a failing write)."""
    torch.save(obj, fileobj)


def atomic_save(obj: dict, path: Path) -> None:
    """Writes ``obj`` to ``path`` so that ``path`` is either the old file or the complete new one.

    The data goes to a temp file in the same directory, is fsynced, then renamed over ``path``
    (``os.replace`` is atomic within a file system). On any failure the temp file is removed;
    one left by a killed writer is removed by the next write (imaml_ext._atomic).
    """
    atomic_write(path, lambda f: _serialize(obj, f))


def _load_cache_file(path: Path, key: str) -> dict | None:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except Exception as exc:  # a damaged cache is rebuilt, never fatal
        logger.warning("imaml_ext: ignoring unreadable cache %s (%s); rebuilding it", path, exc)
        return None
    if not isinstance(obj, dict) or obj.get("format") != CACHE_FORMAT or obj.get("key") != key:
        logger.info("imaml_ext: cache %s is stale (source changed); rebuilding it", path)
        return None
    return obj


def cached_decode(source: Path, name: str, key: str, build: Callable[[], dict],
                  cache_dir: str | os.PathLike | None = None) -> dict:
    """Returns the decoded data for ``source``, from its cache if valid, else via ``build()``.

    Args:
        source: zip or folder the data comes from (decides where the cache lives).
        name: base name of the cache file.
        key: from :func:`source_key`; a cache with another key is rebuilt.
        build: decodes the source; returns a dict of tensors / lists / strings.
        cache_dir: explicit cache folder (overrides the default locations).

    Returns:
        The dict from ``build`` (or the cache), with ``format`` and ``key`` entries added.
    """
    locations = cache_locations(source, name, cache_dir)
    for loc in locations:
        obj = _load_cache_file(loc, key)
        if obj is not None:
            logger.debug("imaml_ext: loaded cache %s", loc)
            return obj
    obj = dict(build())
    obj["format"] = CACHE_FORMAT
    obj["key"] = key
    for loc in locations:
        if not is_writable_dir(loc.parent):
            continue
        try:
            atomic_save(obj, loc)
        except OSError as exc:
            logger.warning("imaml_ext: could not write cache %s (%s)", loc, exc)
            continue
        logger.info("imaml_ext: wrote cache %s", loc)
        break
    else:
        logger.warning("imaml_ext: no writable cache location among %s; the data will be decoded "
                       "again next time (set IMAML_CACHE to a writable folder)",
                       ", ".join(map(str, locations)))
    return obj


# --------------------------------------------------------------------------------------------
# Image decoding (optionally in a process pool)
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """How to turn one image file into a uint8 array.

    Attributes:
        size: output side length (square images).
        mode: PIL mode, ``"L"`` (output (size, size)) or ``"RGB"`` (output (size, size, 3)).
        invert: store ``255 - value`` (Omniglot: ink becomes bright, as MAML does).
    """

    size: int
    mode: str
    invert: bool = False

    def __post_init__(self):
        if self.mode not in _MODE_CHANNELS:
            raise ValueError(f"DecodeSpec: mode must be one of {sorted(_MODE_CHANNELS)}, got "
                             f"{self.mode!r}")

    def shape(self, channels_first: bool = False) -> tuple[int, ...]:
        """One decoded image's shape: (C, size, size) if ``channels_first``, else (size, size)
        for mode L and (size, size, 3) for RGB, as Pillow lays it out."""
        s, c = self.size, _MODE_CHANNELS[self.mode]
        if channels_first:
            return (c, s, s)
        return (s, s) if c == 1 else (s, s, c)


_MODE_CHANNELS = {"L": 1, "RGB": 3}


def open_zip(path: Path) -> zipfile.ZipFile:
    """Opens a zip, turning a truncated or corrupt file into a :class:`DatasetFormatError`."""
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise DatasetFormatError(
            f"{path}: not a readable zip file ({exc}); expected a complete zip archive - the file "
            f"is probably truncated or corrupt: download it again") from None


def _decode_one(data: bytes, spec: DecodeSpec, where: str) -> np.ndarray:
    from PIL import Image  # imported lazily: only decoding needs Pillow

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            im = im.convert(spec.mode)
            if im.size != (spec.size, spec.size):
                im = im.resize((spec.size, spec.size), resample=Image.LANCZOS)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as exc:
        raise DatasetFormatError(
            f"{where}: cannot decode image ({type(exc).__name__}: {exc}); expected a valid "
            f"image file - it is probably truncated or corrupt") from None
    if spec.invert:
        arr = 255 - arr
    return arr


# In pool workers: zips opened once per process (parsing a 20k-member central directory costs
# ~0.1 s, too much to repeat per chunk). None in the parent, which closes what it opens.
_worker_zips: dict[str, zipfile.ZipFile] | None = None


def _pool_init() -> None:
    global _worker_zips
    _worker_zips = {}


def read_member(zf: zipfile.ZipFile, name: str, where: str) -> bytes:
    """``zf.read(name)``; a missing member is DatasetNotFoundError, one that cannot be read
    DatasetFormatError naming ``where`` and why: damage (truncated, bad CRC) or a method
    zipfile does not read (Deflate64, which Windows and 7-Zip write for large files;
    encryption), which were tracebacks from inside zipfile."""
    try:
        return zf.read(name)
    except KeyError:
        raise DatasetNotFoundError(f"{where}: member missing from the zip") from None
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        raise DatasetFormatError(f"{where}: cannot read member ({exc}); the zip is probably "
                                 f"truncated or corrupt") from None
    except (NotImplementedError, RuntimeError) as exc:
        raise DatasetFormatError(
            f"{where}: cannot read member ({exc}); the zip uses a compression method or "
            f"encryption Python's zipfile does not read: re-zip it with standard deflate and no "
            f"password (or extract it to a folder)") from None


def _decode_chunk(args: tuple[str, bool, Sequence[str], DecodeSpec, bool],
                  out: np.ndarray | None = None) -> np.ndarray:
    """Decodes a list of members of one zip (``is_zip``) or of files under one folder into
    ``out`` (allocated if None) in the layout of ``spec.shape(channels_first)``."""
    container, is_zip, names, spec, channels_first = args
    if out is None:
        out = np.empty((len(names),) + spec.shape(channels_first), np.uint8)
    rgb_first = channels_first and spec.mode != "L"

    def put(i: int, arr: np.ndarray) -> None:
        # L images broadcast from (S, S) into (1, S, S); RGB goes (S, S, 3) -> (3, S, S).
        out[i] = arr.transpose(2, 0, 1) if rgb_first else arr

    if is_zip:
        if _worker_zips is not None:
            zf = _worker_zips.get(container)
            if zf is None:
                zf = _worker_zips[container] = open_zip(Path(container))
        else:
            zf = open_zip(Path(container))
        try:
            for i, name in enumerate(names):
                where = f"{container}:{name}"
                put(i, _decode_one(read_member(zf, name, where), spec, where))
        finally:
            if _worker_zips is None:
                zf.close()
    else:
        for i, name in enumerate(names):
            path = Path(container) / name
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise DatasetNotFoundError(f"{path}: image file missing") from None
            except OSError as exc:  # unreadable (permissions, I/O error)
                raise DatasetFormatError(f"{path}: cannot read the image file "
                                         f"({exc.strerror or exc})") from None
            put(i, _decode_one(data, spec, str(path)))
    return out


def default_decode_workers() -> int:
    """``$IMAML_DECODE_WORKERS`` if set, else the number of CPUs this process may run on (its
    affinity mask, e.g. a scheduler's or taskset's share of the node; at most 16)."""
    env = os.environ.get("IMAML_DECODE_WORKERS")
    if env:
        return max(1, int(env))
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(16, cpus))


def decode_images(container: Path, is_zip: bool, names: Sequence[str], spec: DecodeSpec,
                  workers: int | None = None, channels_first: bool = False) -> np.ndarray:
    """Decodes ``names`` (zip members or paths relative to the folder ``container``).

    Returns:
        uint8 array (len(names), *spec.shape(channels_first)) in the order of ``names``: (n, S,
        S) for mode L and (n, S, S, 3) for RGB, or (n, C, S, S) with ``channels_first``. Uses a
        process pool of ``workers`` (default: :func:`default_decode_workers`) when there are
        many images. Each image is written once into the one output array (the pool's chunks as
        they arrive), so the peak is the output plus a few chunks, not twice the data.
    """
    names = list(names)
    if not names:
        raise ValueError("decode_images: no images to decode")
    workers = default_decode_workers() if workers is None else max(1, int(workers))
    out = np.empty((len(names),) + spec.shape(channels_first), np.uint8)
    if workers == 1 or len(names) < _POOL_MIN_IMAGES:
        return _decode_chunk((str(container), is_zip, names, spec, channels_first), out)
    nchunks = workers * 8
    step = -(-len(names) // nchunks)
    starts = range(0, len(names), step)
    chunks = [(str(container), is_zip, names[i:i + step], spec, channels_first) for i in starts]
    with multiprocessing.get_context().Pool(workers, initializer=_pool_init) as pool:
        for start, part in zip(starts, pool.imap(_decode_chunk, chunks)):
            out[start:start + len(part)] = part
    return out


def classes_from_flat(arr: np.ndarray, counts: Sequence[int], class_names: Sequence[str],
                      what: str) -> torch.Tensor:
    """Images (sum(counts), C, H, W) stored class after class -> (classes, per_class, C, H, W).

    A view of ``arr`` (no copy) when every class has the same count; otherwise
    :func:`stack_classes`' copy, truncated to the smallest class.
    """
    if sum(counts) != len(arr):
        raise ValueError(f"classes_from_flat: counts sum to {sum(counts)}, got {len(arr)} images")
    if counts and min(counts) == max(counts) > 0 and arr.flags.c_contiguous:
        return torch.from_numpy(arr).view(len(counts), counts[0], *arr.shape[1:])
    per_class, start = [], 0
    for n in counts:
        per_class.append(arr[start:start + n])
        start += n
    return stack_classes(per_class, class_names, what)


# --------------------------------------------------------------------------------------------
# The data set object
# --------------------------------------------------------------------------------------------

def stack_classes(per_class: Sequence[np.ndarray], class_names: Sequence[str], what: str) -> torch.Tensor:
    """Stacks per-class uint8 arrays (n_c, C, H, W) into (num_classes, per_class, C, H, W).

    Classes with more images than the smallest are truncated to its count (with a warning naming
    the smallest), since tasks need a rectangular array.
    """
    m = per_class_count([len(a) for a in per_class], class_names, what)
    return torch.from_numpy(np.stack([a[:m] for a in per_class]))


def per_class_count(counts: Sequence[int], class_names: Sequence[str], what: str) -> int:
    """The images per class a rectangular array keeps: the smallest count (with a warning
    naming that class when they differ); a class without images is an error."""
    m = min(counts)
    if m == 0:
        raise DatasetFormatError(f"{what}: class {class_names[counts.index(0)]!r} has no images; "
                                 f"expected at least one image per class")
    if max(counts) != m:
        logger.warning("imaml_ext: %s: classes have between %d and %d images (class %r has %d); "
                       "using the first %d of each", what, m, max(counts),
                       class_names[counts.index(m)], m, m)
    return m


@dataclasses.dataclass
class FewShotDataset:
    """One split of a few-shot classification data set, all images decoded in memory.

    Attributes:
        images: uint8 (num_classes, per_class, C, H, W).
        class_names: one name per class (Omniglot: ``"images_background/Latin/character01"``,
            Mini-ImageNet: the WordNet id).
        name: data set name, ``"omniglot"`` or ``"miniimagenet"``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        mean, std: per-channel constants used by :meth:`to_float`: ``(x / 255 - mean) / std``.
        rotate: whether tasks drawn from it rotate each class by a random multiple of 90 degrees
            by default (Omniglot: True).
        source: where the images came from (a path, or ``"embedded"``).
    """

    images: torch.Tensor
    class_names: list[str]
    name: str
    split: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    rotate: bool = False
    source: str = ""

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 5:
            raise ValueError(f"FewShotDataset: images must be uint8 (classes, per_class, C, H, W), "
                             f"got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.class_names) != self.images.shape[0]:
            raise ValueError(f"FewShotDataset: {len(self.class_names)} class names for "
                             f"{self.images.shape[0]} classes")
        c = self.images.shape[2]
        if len(self.mean) != c or len(self.std) != c:
            raise ValueError(f"FewShotDataset: mean/std need {c} channels")

    @property
    def num_classes(self) -> int:
        return self.images.shape[0]

    @property
    def per_class(self) -> int:
        return self.images.shape[1]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return tuple(self.images.shape[2:])

    def __len__(self) -> int:
        return self.num_classes

    def __repr__(self) -> str:
        c, h, w = self.image_shape
        return (f"FewShotDataset({self.name}/{self.split}: {self.num_classes} classes x "
                f"{self.per_class} images of {c}x{h}x{w}, source={self.source!r})")

    def to_float(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images (..., C, H, W) -> float32 ``(x / 255 - mean) / std`` on x's device."""
        y = x.to(torch.float32).div_(255.0)
        if any(m != 0.0 for m in self.mean) or any(s != 1.0 for s in self.std):
            shape = (-1, 1, 1)
            mean = torch.tensor(self.mean, dtype=torch.float32, device=y.device).view(shape)
            std = torch.tensor(self.std, dtype=torch.float32, device=y.device).view(shape)
            y = y.sub_(mean).div_(std)
        return y

    def subset(self, indices: Sequence[int] | torch.Tensor, split: str) -> "FewShotDataset":
        """The classes at ``indices`` as a new data set of split ``split`` (images shared)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return dataclasses.replace(self, images=self.images[idx],
                                   class_names=[self.class_names[i] for i in idx.tolist()],
                                   split=split)


SPLITS = ("train", "val", "test")


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split
