"""Tiny data sets in the real on-disk formats, written by the tests into tmp_path.

- Omniglot: images_background.zip / images_evaluation.zip with
  ``<set>/<Alphabet>/characterNN/XXXX_YY.png`` (105x105, 1-bit PNGs), or the extracted folders.
- Mini-ImageNet: ``images/*.jpg`` + ``train.csv`` / ``val.csv`` / ``test.csv`` (``filename,label``),
  the same inside a zip, and the ``mini-imagenet-cache-<split>.pkl`` pickle format.
"""
from __future__ import annotations

import io
import os
import pickle
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

REAL_DATA = os.environ.get("IMAML_DATA")

# set -> {alphabet: number of characters}
OMNIGLOT_LAYOUT = {
    "images_background": {"Alpha": 4, "Beta": 3},
    "images_evaluation": {"Gamma": 3, "Delta": 2},
}
OMNIGLOT_DRAWINGS = 5


def png_bytes(seed: int, size: int = 105) -> bytes:
    """A 1-bit PNG of random ink blobs (asymmetric, so rotations are distinguishable)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((7, 7)) < 0.3
    big = np.kron(coarse, np.ones((15, 15), bool))[:size, :size]
    img = Image.fromarray(~big).convert("1")  # ink black (0) on white paper, like Omniglot
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def omniglot_members(set_name: str, drawings: int = OMNIGLOT_DRAWINGS, salt: int = 0
                     ) -> dict[str, bytes]:
    """{member name: png bytes} of one fixture set, in the original layout."""
    out = {}
    code = 0
    for alpha, nchar in OMNIGLOT_LAYOUT[set_name].items():
        for c in range(1, nchar + 1):
            code += 1
            for d in range(1, drawings + 1):
                name = f"{set_name}/{alpha}/character{c:02d}/{code:04d}_{d:02d}.png"
                out[name] = png_bytes(zlib.crc32(f"{name}|{salt}".encode()))
    return out


def write_zip(path: Path, members: dict[str, bytes], dirs: list[str] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for d in dirs:
            zf.writestr(zipfile.ZipInfo(d), b"")
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def write_tree(root: Path, members: dict[str, bytes]) -> Path:
    for name, data in members.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def make_omniglot_zips(root: Path, sub: str = "omniglot", salt: int = 0) -> Path:
    """Writes ``<root>/<sub>/images_{background,evaluation}.zip``; returns ``root``."""
    for s in OMNIGLOT_LAYOUT:
        write_zip(root / sub / f"{s}.zip", omniglot_members(s, salt=salt))
    return root


def make_omniglot_folders(root: Path, sub: str = "omniglot-py") -> Path:
    """Writes the extracted layout ``<root>/<sub>/images_*/<Alphabet>/<char>/*.png``."""
    for s in OMNIGLOT_LAYOUT:
        write_tree(root / sub, omniglot_members(s))
    return root


def jpg_bytes(seed: int, size: int = 64, gray: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    arr = np.kron(arr, np.ones((8, 8, 1), np.uint8))
    img = Image.fromarray(arr)
    if gray:
        img = img.convert("L")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


# split -> list of wnids
MINI_CLASSES = {"train": ["n01000001", "n01000002", "n01000003", "n01000004"],
                "val": ["n02000001", "n02000002"], "test": ["n03000001", "n03000002", "n03000003"]}
MINI_PER_CLASS = 6


def mini_files(per_class: int = MINI_PER_CLASS) -> tuple[dict[str, str], dict[str, bytes]]:
    """csv texts by split and jpg bytes by file name (every 4th image grayscale)."""
    csvs, images = {}, {}
    for split, wnids in MINI_CLASSES.items():
        rows = ["filename,label"]
        for wnid in wnids:
            for i in range(per_class):
                fn = f"{wnid}{i:08d}.jpg"
                rows.append(f"{fn},{wnid}")
                images[fn] = jpg_bytes(len(images), gray=len(images) % 4 == 0)
        csvs[split] = "\n".join(rows) + "\n"
    return csvs, images


def make_mini_folder(root: Path, sub: str = "miniimagenet") -> Path:
    """``<root>/<sub>/images/*.jpg`` + ``train.csv``, ``val.csv``, ``test.csv``; returns the folder."""
    d = root / sub
    csvs, images = mini_files()
    (d / "images").mkdir(parents=True, exist_ok=True)
    for split, text in csvs.items():
        (d / f"{split}.csv").write_text(text)
    for fn, data in images.items():
        (d / "images" / fn).write_bytes(data)
    return d


def make_mini_zip(path: Path, top: str = "mini-imagenet/") -> Path:
    csvs, images = mini_files()
    members = {f"{top}{s}.csv": t.encode() for s, t in csvs.items()}
    members.update({f"{top}images/{fn}": b for fn, b in images.items()})
    return write_zip(path, members)


def make_mini_pickles(root: Path, sub: str = "miniimagenet") -> Path:
    """``mini-imagenet-cache-<split>.pkl`` in the common format; returns the folder."""
    d = root / sub
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, wnids in MINI_CLASSES.items():
        n = len(wnids) * MINI_PER_CLASS
        data = rng.integers(0, 256, (n, 84, 84, 3), dtype=np.uint8)
        # interleave classes so the class_dict indices matter
        class_dict = {w: list(range(i, n, len(wnids))) for i, w in enumerate(wnids)}
        with open(d / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"image_data": data, "class_dict": class_dict}, f)
    return d
