"""Omniglot (Lake, Salakhutdinov, Tenenbaum 2015) from its original distribution.

Accepted layouts under the data root (see :func:`imaml_ext.data.common.resolve_data_root`), for
each of the two sets ``images_background`` (964 characters, 30 alphabets) and
``images_evaluation`` (659 characters, 20 alphabets), looked for in ``<root>/omniglot-py/``
(torchvision's layout), ``<root>/omniglot/`` and ``<root>/`` itself:

  * ``<set>.zip`` holding ``<set>/<Alphabet>/characterNN/XXXX_YY.png`` (the original zips);
  * the extracted folder ``<set>/<Alphabet>/characterNN/XXXX_YY.png``.

A zip is preferred to a folder in the same place. Every image (105x105, 1 bit) is decoded once,
converted to grayscale, resized to 28x28 with PIL's LANCZOS filter and inverted (ink = 255,
paper = 0: MAML's reference code inverts, so the ink is 1.0 once scaled to [0, 1]); the result is
cached as a uint8 tensor (see :mod:`imaml_ext.data.common` for where and when it is rebuilt).

Splits (all seeded by ONE ``seed``, so train, val and test are disjoint by construction):
  * ``protocol="paper"`` (default; MAML's and the iMAML paper's): all 1,623 characters pooled
    and permuted with ``seed``; the first 1,200 are the training pool (val = its first
    ``val_classes``, train = the rest), the other 423 test.
  * ``protocol="background"``: test = the evaluation set's 659 characters (unseen alphabets);
    train = the background set's 964 characters less ``val_classes`` (default 100) drawn from
    them for val.

Nothing is downloaded unless asked: if no Omniglot is found, ``download=True`` (or
:func:`download_omniglot`) fetches the two zips from the brendenlake/omniglot repository (short
timeout); otherwise, or if that fails too, the small subset shipped in ``imaml_ext/data/embedded``
is used (with a warning; by default only when no data root was named: a named one that holds no
Omniglot is an error), else :class:`DatasetNotFoundError` says what to put where. The trainer
and the CLI never download (a mistyped data root must not fill up with a fresh copy).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import torch

from imaml_ext._atomic import atomic_write

from .common import (DatasetFormatError, DatasetNotFoundError, DecodeSpec, SplitOptionError,
                     FewShotDataset, cached_decode, check_split, classes_from_flat,
                     decode_images, is_writable_dir, open_zip, resolve_data_root, source_key)

logger = logging.getLogger("imaml_ext.data")

BACKGROUND = "images_background"
EVALUATION = "images_evaluation"
SETS = (BACKGROUND, EVALUATION)
OMNIGLOT_URLS = {
    s: f"https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{s}.zip" for s in SETS
}
IMAGE_SIZE = 28
PROTOCOLS = ("background", "paper")
PAPER_NUM_CLASSES = 1623
PAPER_TRAIN_CLASSES = 1200
DEFAULT_VAL_CLASSES = 100          # full Omniglot
EMBEDDED_VAL_CLASSES = 20          # the shipped subset (enough for 20-way validation tasks)
EMBEDDED_FILE = "omniglot_subset.npz"
DOWNLOAD_TIMEOUT_S = 10.0

# Images scaled to [0, 1] with ink = 1 (no mean/std normalisation), as MAML does.
OMNIGLOT_MEAN = (0.0,)
OMNIGLOT_STD = (1.0,)


@dataclasses.dataclass(frozen=True)
class OmniglotSource:
    """One Omniglot set on disk: a zip, or the extracted folder of that set."""

    set_name: str
    path: Path
    is_zip: bool


def _candidate_dirs(root: Path) -> list[Path]:
    return [root / "omniglot-py", root / "omniglot", root]


def find_omniglot_sources(root: str | os.PathLike) -> dict[str, OmniglotSource]:
    """The Omniglot sets present under ``root`` (possibly none, one or both), by set name."""
    root = Path(root)
    found: dict[str, OmniglotSource] = {}
    for set_name in SETS:
        for d in _candidate_dirs(root):
            z = d / f"{set_name}.zip"
            if z.is_file():
                found[set_name] = OmniglotSource(set_name, z, True)
                break
            f = d / set_name
            if f.is_dir():
                found[set_name] = OmniglotSource(set_name, f, False)
                break
    return found


def _layout_error(where: str, what: str, set_name: str) -> DatasetFormatError:
    return DatasetFormatError(
        f"{where}: {what}; expected the original Omniglot layout "
        f"{set_name}/<Alphabet>/<character>/<drawing>.png")


def _hidden(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX"


def list_omniglot_set(src: OmniglotSource) -> tuple[list[str], list[list[str]]]:
    """Class names (``"<set>/<Alphabet>/<character>"``, sorted) and each class's image names.

    Image names are zip members (zip source) or paths relative to the set folder (folder source),
    sorted within each class.

    Raises:
        DatasetFormatError: wrong layout, empty character folder, no images, corrupt zip.
    """
    classes: dict[tuple[str, str], list[str]] = {}
    if src.is_zip:
        zf = open_zip(src.path)
        try:
            names = zf.namelist()
        finally:
            zf.close()
        for n in names:
            parts = n.rstrip("/").split("/")
            if any(_hidden(p) for p in parts):
                continue
            if n.endswith("/"):
                if len(parts) >= 3 and parts[-3] == src.set_name:
                    classes.setdefault((parts[-2], parts[-1]), [])
                continue
            if not n.lower().endswith(".png"):
                continue
            if len(parts) < 4 or parts[-4] != src.set_name:
                raise _layout_error(f"{src.path}: member {n!r}", "image at an unexpected place",
                                    src.set_name)
            classes.setdefault((parts[-3], parts[-2]), []).append(n)
    else:
        for alpha in sorted(os.listdir(src.path)):
            if _hidden(alpha):
                continue
            adir = src.path / alpha
            if not adir.is_dir():
                if alpha.lower().endswith(".png"):
                    raise _layout_error(str(adir), "image directly in the set folder", src.set_name)
                continue
            for char in sorted(os.listdir(adir)):
                if _hidden(char):
                    continue
                cdir = adir / char
                if not cdir.is_dir():
                    if char.lower().endswith(".png"):
                        raise _layout_error(str(cdir), "image directly in an alphabet folder",
                                            src.set_name)
                    continue
                classes[(alpha, char)] = [f"{alpha}/{char}/{f}" for f in os.listdir(cdir)
                                          if f.lower().endswith(".png") and not _hidden(f)]
    if not classes:
        raise _layout_error(str(src.path), "no character folders with .png images found",
                            src.set_name)
    keys = sorted(classes)
    for k in keys:
        if not classes[k]:
            cdir = src.path / k[0] / k[1]
            if cdir.is_dir() and any((cdir / e).is_dir() and not _hidden(e)
                                     for e in os.listdir(cdir)):
                # images_background/images_background/Latin/character01/*.png
                raise _layout_error(str(cdir), "a character folder that holds folders, not "
                                    "images: extracted one level too deep?", src.set_name)
            raise DatasetFormatError(
                f"{src.path}: character folder {src.set_name}/{k[0]}/{k[1]} is empty; expected "
                f"its drawings (20 .png files) - the data set is incomplete: get it again")
    # Every character has the same number of drawings (20 in Omniglot): one missing file would
    # otherwise cut every character to 19 (tasks need a rectangular array) and surface later as
    # a shots + queries error that blames the arguments.
    counts = {k: len(classes[k]) for k in keys}
    usual = max(set(counts.values()), key=list(counts.values()).count)
    odd = [k for k in keys if counts[k] != usual]
    if odd:
        a, c = odd[0]
        raise DatasetFormatError(
            f"{src.path}: character {src.set_name}/{a}/{c} has {counts[odd[0]]} drawings where "
            f"the others have {usual} ({len(odd)} character(s) differ) - a file is missing or "
            f"extra: get the data set again")
    return ([f"{src.set_name}/{a}/{c}" for a, c in keys], [sorted(classes[k]) for k in keys])


def decode_omniglot_set(src: OmniglotSource, image_size: int = IMAGE_SIZE,
                        workers: int | None = None) -> dict:
    """Decodes one set. Returns ``{"images": uint8 (classes, 20, 1, S, S), "class_names": [...]}``."""
    class_names, members = list_omniglot_set(src)
    flat = [m for ms in members for m in ms]
    t0 = time.perf_counter()
    arr = decode_images(src.path, src.is_zip, flat, DecodeSpec(image_size, "L", invert=True),
                        workers, channels_first=True)
    logger.info("imaml_ext: decoded %d Omniglot images of %s in %.1f s", len(flat), src.path,
                time.perf_counter() - t0)
    images = classes_from_flat(arr, [len(ms) for ms in members], class_names, str(src.path))
    return {"images": images, "class_names": class_names}


def load_omniglot_set(src: OmniglotSource, image_size: int = IMAGE_SIZE, cache_dir=None,
                      workers: int | None = None) -> dict:
    """Like :func:`decode_omniglot_set`, through the on-disk cache."""
    key = source_key([src.path], extra=f"omniglot;{src.set_name};size={image_size};invert=1;"
                                         f"lanczos")
    return cached_decode(src.path, f"omniglot-{src.set_name}-{image_size}px", key,
                         lambda: decode_omniglot_set(src, image_size, workers), cache_dir)


def download_omniglot(dest: Path, sets=SETS, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Downloads the original zips of ``sets`` into ``dest`` (atomically, validated as zips).

    Raises:
        OSError: no network, timeout, unwritable ``dest``, or a download that is not a zip.
    """
    dest = Path(dest)
    if not is_writable_dir(dest):
        raise OSError(f"{dest} is not writable")
    dest.mkdir(parents=True, exist_ok=True)
    for s in sets:
        target = dest / f"{s}.zip"
        url = OMNIGLOT_URLS[s]
        logger.warning("imaml_ext: downloading %s to %s", url, target)

        def fetch(f, url=url):
            with urllib.request.urlopen(url, timeout=timeout) as r:
                while chunk := r.read(1 << 20):
                    f.write(chunk)

        def check_zip(tmp, url=url):
            if not zipfile.is_zipfile(tmp):
                raise OSError(f"{url} did not return a zip file")

        atomic_write(target, fetch, suffix=".part", validate=check_zip)


def embedded_path() -> Path:
    """Path of the Omniglot subset shipped inside the package."""
    return Path(__file__).resolve().parent / "embedded" / EMBEDDED_FILE


def load_embedded_omniglot() -> dict:
    """The shipped subset: ``{"images": uint8 (C, 20, 1, 28, 28), "class_names": [...]}``.

    Its class names start with ``images_background/`` or ``images_evaluation/`` (the set each
    character comes from), so the splitting protocols apply to it unchanged.
    """
    path = embedded_path()
    if not path.is_file():
        raise DatasetNotFoundError(f"the embedded Omniglot subset {path} is missing from this "
                                   f"installation (package_data not installed?)")
    with np.load(path, allow_pickle=False) as z:
        images = torch.from_numpy(np.ascontiguousarray(z["images"]))
        names = [str(n) for n in z["class_names"]]
    if images.dim() == 4:
        images = images.unsqueeze(2)
    return {"images": images, "class_names": names}


def _not_found_message(root: Path, root_origin: str, needed: list[str], reason: str | None) -> str:
    lines = [
        f"Omniglot set(s) {', '.join(needed)} not found under the data root {root} ({root_origin}).",
        "Looked for, in " + ", ".join(str(d) for d in _candidate_dirs(root)) + ":",
    ]
    lines += [f"  {s}.zip or the extracted folder {s}/<Alphabet>/<character>/*.png" for s in needed]
    lines.append(
        f"Fix: put {' and '.join(s + '.zip' for s in needed)} (from "
        f"https://github.com/brendenlake/omniglot, folder python/) into {root / 'omniglot'}/, or "
        f"point IMAML_DATA (or --data-root) at the folder that holds them; or, with a "
        f"network, fetch them with imaml_ext.data.omniglot.download_omniglot("
        f"'{root / 'omniglot'}').")
    if reason:
        lines.append(f"Automatic download failed: {reason}")
    return "\n".join(lines)


def _root_origin(root) -> str:
    if root is not None:
        return "the root argument / --data-root"
    if os.environ.get("IMAML_DATA"):
        return "from IMAML_DATA"
    return "the default user data dir; set IMAML_DATA or --data-root to change it"


def resolve_omniglot(root=None, needed=SETS, download: bool = False,
                     allow_embedded: bool | None = None) -> dict[str, OmniglotSource] | str:
    """Finds Omniglot: the sources of the ``needed`` sets, or ``"embedded"``.

    Order: the data root's layouts; a download into ``<root>/omniglot/`` when nothing is found
    and ``download=True`` (off by default); the shipped subset when no Omniglot set at all is
    found and ``allow_embedded`` (logged as a warning). ``allow_embedded=None`` (the default):
    only when no data root was named (neither ``root`` nor ``$IMAML_DATA``), so that a mistyped
    root is an error, not a silent switch to the 200-character subset.

    Raises:
        DatasetNotFoundError: with the files to put where.
    """
    data_root = resolve_data_root(root)
    found = find_omniglot_sources(data_root)
    missing = [s for s in needed if s not in found]
    if not missing:
        return found
    reason = None
    if download:
        try:
            download_omniglot(data_root / "omniglot", missing)
        except Exception as exc:  # no network, timeout, read-only root: say why, fall through
            reason = f"{type(exc).__name__}: {exc}"
        else:
            found = find_omniglot_sources(data_root)
            missing = [s for s in needed if s not in found]
            if not missing:
                return found
    message = _not_found_message(data_root, _root_origin(root), missing, reason)
    if allow_embedded is None:
        allow_embedded = root is None and not os.environ.get("IMAML_DATA")
    if allow_embedded and not found:
        logger.warning("imaml_ext: %s\nUSING THE SMALL OMNIGLOT SUBSET SHIPPED WITH THE PACKAGE "
                       "(%s) instead; its accuracies are not comparable with published ones.",
                       message, embedded_path())
        return "embedded"
    raise DatasetNotFoundError(message)


def _sets_needed(protocol: str, split: str) -> tuple[str, ...]:
    if protocol == "paper":
        return SETS
    return (EVALUATION,) if split == "test" else (BACKGROUND,)


def split_class_indices(class_names: list[str], protocol: str, seed: int,
                        val_classes: int) -> dict[str, list[int]]:
    """Indices of the train / val / test classes among ``class_names`` (disjoint, sorted).

    ``class_names`` are ``"<set>/<Alphabet>/<character>"``; the background protocol reads the set
    from the prefix. The paper protocol trains on 1,200 of 1,623 characters; on any other pool
    size (the embedded subset, a test fixture) it keeps that proportion.
    """
    n = len(class_names)
    g = torch.Generator().manual_seed(int(seed))
    if protocol == "background":
        bg = [i for i, c in enumerate(class_names) if c.startswith(BACKGROUND + "/")]
        test = [i for i, c in enumerate(class_names) if c.startswith(EVALUATION + "/")]
        pool = [bg[i] for i in torch.randperm(len(bg), generator=g).tolist()]
    elif protocol == "paper":
        n_train = PAPER_TRAIN_CLASSES if n == PAPER_NUM_CLASSES else max(
            1, min(n - 1, round(n * PAPER_TRAIN_CLASSES / PAPER_NUM_CLASSES)))
        perm = torch.randperm(n, generator=g).tolist()
        pool, test = perm[:n_train], perm[n_train:]
    else:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if pool and not 0 <= val_classes < len(pool):
        raise SplitOptionError("val_classes", f"val_classes={val_classes} must be in [0, "
                               f"{len(pool)}) for the {len(pool)} training characters of "
                               f"protocol {protocol!r}")
    return {"train": sorted(pool[val_classes:]), "val": sorted(pool[:val_classes]),
            "test": sorted(test)}


def load_omniglot(split: str = "train", root=None, protocol: str = "paper", seed: int = 0,
                  val_classes: int | None = None, allow_embedded: bool | None = None,
                  download: bool = False, cache_dir=None, image_size: int = IMAGE_SIZE,
                  decode_workers: int | None = None) -> FewShotDataset:
    """One split of Omniglot as a :class:`FewShotDataset` of uint8 (C, 20, 1, 28, 28) images.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        root: data root (else ``IMAML_DATA``, else ``~/.cache/imaml_ext/data``).
        protocol: ``"paper"`` (the default: 1,200 / 423 characters drawn with ``seed``) or
            ``"background"`` (964 / 659); see the module docstring.
        seed: the one seed of the class split and of the validation draw.
        val_classes: training characters moved to the val split (default 100; 20 for the
            embedded subset; 0 for none).
        allow_embedded: fall back to the shipped subset when no Omniglot is found (default
            None: only when no data root was named, neither ``root`` nor ``$IMAML_DATA``).
        download: fetch the official zips into ``<root>/omniglot/`` when no Omniglot is found
            (default False: nothing goes over the network unless asked).
        cache_dir: where the decoded cache goes (default: beside the data, else ``IMAML_CACHE``).
        image_size: side of the resized images.
        decode_workers: processes decoding the PNGs on a cache miss (default: all CPUs).

    Float images (:meth:`FewShotDataset.to_float`) are in [0, 1], ink 1, paper 0 (MAML's
    convention); no mean/std normalisation. Tasks rotate each class by a random multiple of 90
    degrees by default (``dataset.rotate``).
    """
    check_split(split)
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    needed = _sets_needed(protocol, split)
    where = resolve_omniglot(root, needed, download=download, allow_embedded=allow_embedded)
    if where == "embedded":
        if image_size != IMAGE_SIZE:
            raise ValueError(f"the embedded Omniglot subset is {IMAGE_SIZE}x{IMAGE_SIZE}; "
                             f"image_size={image_size} needs the full data set")
        data = load_embedded_omniglot()
        images, names, source = data["images"], data["class_names"], "embedded"
        default_val = EMBEDDED_VAL_CLASSES
    else:
        parts = [load_omniglot_set(where[s], image_size, cache_dir, decode_workers)
                 for s in needed]
        per_class = {p["images"].shape[1] for p in parts}
        if len(per_class) > 1:
            m = min(per_class)
            logger.warning("imaml_ext: Omniglot sets have %s images per class; using %d",
                           sorted(per_class), m)
            parts = [dict(p, images=p["images"][:, :m]) for p in parts]
        images = torch.cat([p["images"] for p in parts]) if len(parts) > 1 else parts[0]["images"]
        names = [c for p in parts for c in p["class_names"]]
        source = ", ".join(str(where[s].path) for s in needed)
        default_val = DEFAULT_VAL_CLASSES
    if val_classes is None:
        val_classes = default_val
    if val_classes < 0:
        raise SplitOptionError("val_classes", f"val_classes must be >= 0, got {val_classes}")
    # The background protocol's test split loads no background characters; its val draw only
    # depends on the background names, so train and val match whichever splits were loaded.
    idx = split_class_indices(names, protocol, seed, val_classes)
    chosen = idx[split]
    if not chosen:
        msg = (f"omniglot split {split!r} is empty (val_classes={val_classes}, "
               f"protocol={protocol!r})")
        if split == "val":  # the one split that --val-classes alone can leave empty
            raise SplitOptionError("val_classes", msg)
        raise DatasetFormatError(f"{msg}: the data under {source} hold no such characters")
    full = FewShotDataset(images=images, class_names=names, name="omniglot", split=split,
                          mean=OMNIGLOT_MEAN, std=OMNIGLOT_STD, rotate=True, source=source)
    return full.subset(chosen, split)
