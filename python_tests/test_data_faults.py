"""Data faults not covered by test_data.py: each gives a clear error naming the file (a
DatasetError, which the command line prints as one message), and the decoded cache is never left
half-written.

test_data.py already covers: a truncated zip, a truncated PNG inside a zip, a missing image in a
folder, an empty character folder (folder and zip), wrong layouts, a bad csv header and a row
with one field, a csv row naming a missing image (folder), a corrupt JPEG, an unpicklable or
wrongly shaped pickle, and cache writes that fail or crash in-process. Here: corrupt members of
intact zips (stored and deflated), corrupt PNGs in folders, files that are not zips at all, csv
rows with an empty target, a csv row naming an image missing from a zip, a non-UTF-8 csv, pickles
truncated anywhere or holding bad indices or an empty class, failures inside the decoding worker
pool, and a decoding process killed with SIGKILL in the middle of writing its cache.
"""
from __future__ import annotations

import functools
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

from data_fixtures import (MINI_CLASSES, make_mini_folder, make_mini_pickles, make_mini_zip,
                           make_omniglot_folders, mini_files, omniglot_members, write_zip)
from imaml_ext.data import (DatasetError, DatasetFormatError, DatasetNotFoundError,
                            load_miniimagenet)
from imaml_ext.data import common
from imaml_ext.data import omniglot as omniglot_mod

REPO = Path(__file__).resolve().parents[1]
# the background protocol reads one zip per split, which these tests damage one at a time
load_omniglot = functools.partial(omniglot_mod.load_omniglot, protocol="background")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No network, no writes to ~/.cache, no IMAML_DATA leaking in (as in test_data.py)."""
    def no_network(dest, sets=omniglot_mod.SETS, timeout=None):
        raise OSError("network disabled in tests")
    monkeypatch.setattr(omniglot_mod, "download_omniglot", no_network)
    monkeypatch.setenv("IMAML_CACHE", str(tmp_path / "user-cache"))
    monkeypatch.delenv("IMAML_DATA", raising=False)


def member_data_span(zpath: Path, name: str) -> tuple[int, int]:
    """(offset, size) of a member's (compressed) bytes inside the zip file."""
    with zipfile.ZipFile(zpath) as zf:
        info = zf.getinfo(name)
    with open(zpath, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len = int.from_bytes(header[26:28], "little")
    extra_len = int.from_bytes(header[28:30], "little")
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


def scramble(path: Path, offset: int, size: int) -> None:
    raw = bytearray(path.read_bytes())
    for k in range(offset, offset + size):
        raw[k] = (raw[k] * 7 + 3) & 0xFF
    path.write_bytes(bytes(raw))


def omniglot_zip(tmp_path: Path, compression=zipfile.ZIP_STORED) -> tuple[Path, dict]:
    members = omniglot_members("images_evaluation")
    z = tmp_path / "omniglot" / "images_evaluation.zip"
    z.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(z, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return z, members


def no_cache_written(cache_dir: Path) -> bool:
    return not cache_dir.exists() or not any(cache_dir.iterdir())


# ---- Omniglot zips whose directory is intact but whose member bytes are not --------------------

def test_corrupt_stored_member_names_zip_and_member(tmp_path):
    """The original Omniglot zips store their PNGs uncompressed: a damaged member fails its
    CRC check."""
    z, members = omniglot_zip(tmp_path)
    bad = sorted(members)[4]
    off, size = member_data_span(z, bad)
    scramble(z, off + size // 3, 16)
    with pytest.raises(DatasetFormatError, match="cannot read member") as e:
        load_omniglot("test", root=tmp_path, cache_dir=tmp_path / "c")
    assert f"{z}:{bad}" in str(e.value)
    assert no_cache_written(tmp_path / "c")


def test_zeroed_local_header_names_zip_and_member(tmp_path):
    z, members = omniglot_zip(tmp_path)
    bad = sorted(members)[2]
    with zipfile.ZipFile(z) as zf:
        hdr = zf.getinfo(bad).header_offset
    raw = bytearray(z.read_bytes())
    raw[hdr:hdr + 4] = b"\0\0\0\0"
    z.write_bytes(bytes(raw))
    with pytest.raises(DatasetFormatError) as e:
        load_omniglot("test", root=tmp_path, cache_dir=tmp_path / "c")
    assert str(z) in str(e.value) and bad in str(e.value)


def test_corrupt_deflated_member_names_zip_and_member(tmp_path):
    z, members = omniglot_zip(tmp_path, compression=zipfile.ZIP_DEFLATED)
    bad = sorted(members)[4]
    off, size = member_data_span(z, bad)
    scramble(z, off, size)
    with pytest.raises(DatasetFormatError) as e:
        load_omniglot("test", root=tmp_path, cache_dir=tmp_path / "c")
    assert f"{z}:{bad}" in str(e.value)


def _patch_central_entry(z: Path, name: str, offset: int, value) -> None:
    """Rewrites the 2-byte field at `offset` of member `name`'s central-directory entry with
    value(old)."""
    raw = bytearray(z.read_bytes())
    pos = 0
    while (pos := raw.find(b"PK\x01\x02", pos)) >= 0:
        n = int.from_bytes(raw[pos + 28:pos + 30], "little")
        if raw[pos + 46:pos + 46 + n].decode() == name:
            old = int.from_bytes(raw[pos + offset:pos + offset + 2], "little")
            raw[pos + offset:pos + offset + 2] = value(old).to_bytes(2, "little")
            z.write_bytes(bytes(raw))
            return
        pos += 4
    raise AssertionError(f"{name} not in {z}")


@pytest.mark.parametrize("kind", ["deflate64", "encrypted"])
def test_member_zipfile_cannot_read_names_zip_member_and_fix(tmp_path, kind):
    # Deflate64 (what Windows and 7-Zip write for large files) raised NotImplementedError, an
    # encrypted member RuntimeError: both were tracebacks from inside zipfile
    z, members = omniglot_zip(tmp_path, compression=zipfile.ZIP_DEFLATED)
    bad = sorted(members)[-1]
    if kind == "deflate64":
        _patch_central_entry(z, bad, 10, lambda old: 9)   # compression method 9
    else:
        _patch_central_entry(z, bad, 8, lambda old: old | 1)  # flag bit 0: encrypted
    with pytest.raises(DatasetFormatError, match="re-zip it with standard deflate") as e:
        load_omniglot("test", root=tmp_path, cache_dir=tmp_path / "c")
    assert f"{z}:{bad}" in str(e.value)


@pytest.mark.parametrize("content", [b"", b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
                                     b"PK\x03\x04" + b"\0" * 40],
                         ids=["empty", "html-error-page", "bare-header"])
def test_file_that_is_not_a_zip_names_it(tmp_path, content):
    """A download that never started, an error page saved under the zip's name, a stub."""
    z = tmp_path / "omniglot" / "images_evaluation.zip"
    z.parent.mkdir(parents=True)
    z.write_bytes(content)
    with pytest.raises(DatasetFormatError, match="not a readable zip") as e:
        load_omniglot("test", root=tmp_path, cache_dir=tmp_path / "c")
    assert str(z) in str(e.value)


# ---- corrupt PNGs in the extracted layout -------------------------------------------------------

@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n" + b"\xde\xad\xbe\xef" * 20,
                                     b"GIF89a not a png at all"],
                         ids=["zero-bytes", "garbage-after-signature", "other-format"])
def test_corrupt_png_in_folder_names_the_file(tmp_path, content):
    root = make_omniglot_folders(tmp_path)
    bad = sorted((root / "omniglot-py" / "images_evaluation" / "Gamma" / "character02")
                 .glob("*.png"))[2]
    bad.write_bytes(content)
    with pytest.raises(DatasetFormatError, match="cannot decode image") as e:
        load_omniglot("test", root=root, cache_dir=tmp_path / "c")
    assert str(bad) in str(e.value)
    assert no_cache_written(tmp_path / "c")


def test_decode_failure_in_worker_pool_names_the_file(tmp_path, monkeypatch):
    """Large sets decode in a process pool; an error raised in a worker still names the file."""
    z, members = omniglot_zip(tmp_path)
    bad = sorted(members)[-2]
    # Keep the CRC valid: rewrite the zip with the member replaced by a broken PNG.
    members[bad] = members[bad][:40]
    write_zip(z, members)
    monkeypatch.setattr(common, "_POOL_MIN_IMAGES", 1)
    monkeypatch.setenv("IMAML_DECODE_WORKERS", "2")
    pools = []
    real_ctx = common.multiprocessing.get_context

    def spy(*a, **k):
        pools.append(1)
        return real_ctx(*a, **k)
    monkeypatch.setattr(common.multiprocessing, "get_context", spy)
    with pytest.raises(DatasetFormatError, match="cannot decode image") as e:
        load_omniglot("test", root=tmp_path, cache_dir=tmp_path / "c")
    assert pools, "the worker pool was not used"
    assert f"{z}:{bad}" in str(e.value)
    assert no_cache_written(tmp_path / "c")


# ---- Mini-ImageNet split files and pickles ------------------------------------------------------

@pytest.mark.parametrize("row", ["n0100000100000000.jpg,", "n0100000100000000.jpg, ",
                                 ",n01000001", "n0100000100000000.jpg,n01000001,extra"],
                         ids=["empty-target", "blank-target", "empty-filename", "three-fields"])
def test_csv_row_with_a_missing_target_names_file_and_line(tmp_path, row):
    d = make_mini_folder(tmp_path)
    lines = (d / "train.csv").read_text().splitlines()
    lines[4] = row
    (d / "train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetFormatError, match=r"expected 'filename,label'") as e:
        load_miniimagenet("train", root=tmp_path, cache_dir=tmp_path / "c")
    assert f"{d / 'train.csv'}:5" in str(e.value)


def test_csv_row_naming_an_image_missing_from_the_zip(tmp_path):
    csvs, images = mini_files()
    gone = f"{MINI_CLASSES['test'][1]}00000003.jpg"
    members = {f"mini-imagenet/{s}.csv": t.encode() for s, t in csvs.items()}
    members.update({f"mini-imagenet/images/{fn}": b for fn, b in images.items() if fn != gone})
    z = write_zip(tmp_path / "miniimagenet.zip", members)
    with pytest.raises(DatasetNotFoundError) as e:
        load_miniimagenet("test", root=tmp_path, cache_dir=tmp_path / "c")
    msg = str(e.value)
    line = csvs["test"].splitlines().index(f"{gone},{MINI_CLASSES['test'][1]}") + 1
    assert f"{z}:mini-imagenet/test.csv:{line}" in msg and f"mini-imagenet/images/{gone}" in msg


def test_non_utf8_csv_names_the_file(tmp_path):
    d = make_mini_folder(tmp_path)
    (d / "train.csv").write_bytes(b"filename,label\nn01000001000000\xe9.jpg,n01000001\n")
    with pytest.raises(DatasetFormatError) as e:
        load_miniimagenet("train", root=tmp_path, cache_dir=tmp_path / "c")
    assert str(d / "train.csv") in str(e.value)


def test_corrupt_csv_member_in_zip_names_the_zip(tmp_path):
    z = make_mini_zip(tmp_path / "miniimagenet.zip")
    off, size = member_data_span(z, "mini-imagenet/train.csv")
    scramble(z, off + 3, 4)
    with pytest.raises(DatasetError) as e:
        load_miniimagenet("train", root=tmp_path, cache_dir=tmp_path / "c")
    assert str(z) in str(e.value)


def test_pickle_truncated_anywhere_names_the_file(tmp_path):
    """Cut at 24 places from the first byte to the last: always a DatasetFormatError naming the
    pickle, never an EOFError / UnpicklingError / numpy error of its own."""
    d = make_mini_pickles(tmp_path)
    path = d / "mini-imagenet-cache-val.pkl"
    data = path.read_bytes()
    cuts = sorted({0, 1, 2, 5, 11, 40, 100, len(data) - 1, len(data) - 2, len(data) - 5}
                  | {len(data) * k // 14 for k in range(1, 14)})
    for cut in cuts:
        path.write_bytes(data[:cut])
        with pytest.raises(DatasetFormatError) as e:
            load_miniimagenet("val", root=tmp_path)
        assert str(path) in str(e.value), cut


@pytest.mark.parametrize("content, match", [
    ({"image_data": None}, "expected a dict with 'image_data' and 'class_dict'"),
    (["not", "a", "dict"], "expected a dict with 'image_data' and 'class_dict'"),
    ({"class_dict": {"n1": [0, 7]}}, "indexes rows outside image_data"),
    ({"class_dict": {"n1": [-1]}}, "indexes rows outside image_data"),
    ({"class_dict": {"n1": [0, 1], "n2": []}}, "class 'n2' has no images"),
], ids=["no-class-dict", "not-a-dict", "index-past-end", "negative-index", "empty-class"])
def test_pickle_with_bad_contents_names_the_file(tmp_path, content, match):
    import numpy as np
    d = tmp_path / "miniimagenet"
    d.mkdir()
    if isinstance(content, dict) and "class_dict" in content:
        content = {"image_data": np.zeros((4, 84, 84, 3), np.uint8), **content}
    path = d / "mini-imagenet-cache-train.pkl"
    with open(path, "wb") as f:
        pickle.dump(content, f)
    with pytest.raises(DatasetFormatError, match=match) as e:
        load_miniimagenet("train", root=tmp_path)
    assert str(path) in str(e.value)


# ---- the decoded cache under failure ------------------------------------------------------------

def test_decode_failure_keeps_the_previous_cache(tmp_path):
    """A source changed into a corrupt one: the load fails naming the file, and the old cache
    (of the old source) is left exactly as it was, with no temp file beside it."""
    z, members = omniglot_zip(tmp_path)
    cdir = tmp_path / "c"
    good = load_omniglot("test", root=tmp_path, cache_dir=cdir)
    (cache,) = cdir.iterdir()
    before = cache.read_bytes()
    bad = sorted(members)[1]
    members[bad] = b"\x89PNG\r\n\x1a\n garbage"
    write_zip(z, members)
    st = z.stat()
    os.utime(z, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(DatasetFormatError, match="cannot decode image"):
        load_omniglot("test", root=tmp_path, cache_dir=cdir)
    assert list(cdir.iterdir()) == [cache] and cache.read_bytes() == before
    assert torch.equal(torch.load(cache, weights_only=True)["images"], good.images)


_KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from imaml_ext.data import common, load_omniglot

    def slow(obj, f):
        import io, torch
        buf = io.BytesIO()
        torch.save(obj, buf)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        print("HALF", flush=True)
        time.sleep(60)
        f.write(data[len(data) // 2:])

    common._serialize = slow
    load_omniglot("test", root=sys.argv[1], cache_dir=sys.argv[2], protocol="background")
""")


def test_cache_writer_killed_mid_write_leaves_no_half_cache(tmp_path):
    """A real SIGKILL (no cleanup runs) while the cache is half written: no file under the
    cache's name, the next load decodes again and writes a complete cache; the orphaned temp file
    is never taken for a cache."""
    omniglot_zip(tmp_path)
    cdir = tmp_path / "c"
    env = {**os.environ, "PYTHONPATH": str(REPO), "IMAML_EXT_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(tmp_path), str(cdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "HALF", proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    leftovers = list(cdir.iterdir())
    assert leftovers and all(p.name.startswith(".") and p.name.endswith(".tmp")
                             for p in leftovers), leftovers
    ds = load_omniglot("test", root=tmp_path, cache_dir=cdir)
    caches = [p for p in cdir.iterdir() if not p.name.endswith(".tmp")]
    assert len(caches) == 1
    assert torch.equal(torch.load(caches[0], weights_only=True)["images"], ds.images)
    # and a third load reads that cache rather than decoding
    t0 = time.perf_counter()
    again = load_omniglot("test", root=tmp_path, cache_dir=cdir)
    assert torch.equal(again.images, ds.images) and time.perf_counter() - t0 < 30


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs sched_getaffinity")
def test_decode_workers_follow_the_cpu_affinity(monkeypatch):
    # os.cpu_count() counts the node's CPUs, not the share a scheduler (or taskset) gives the
    # process: 8 ranks on a 16-CPU node each started 16 decoders
    monkeypatch.delenv("IMAML_DECODE_WORKERS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert common.default_decode_workers() == 3
    monkeypatch.setenv("IMAML_DECODE_WORKERS", "5")
    assert common.default_decode_workers() == 5


@pytest.mark.parametrize("layout", ["folder", "zip"])
def test_miniimagenet_split_files_sharing_a_class_are_refused(tmp_path, layout):
    # a hand-made val.csv that reuses a training class was accepted: its tasks scored classes
    # meta-training had seen
    csvs, images = mini_files()
    leak = MINI_CLASSES["train"][0]
    csvs["val"] += "\n".join(line for line in csvs["train"].splitlines()[1:]
                             if line.endswith("," + leak)) + "\n"
    if layout == "folder":
        d = tmp_path / "miniimagenet"
        (d / "images").mkdir(parents=True)
        for fn, data in images.items():
            (d / "images" / fn).write_bytes(data)
        for split, text in csvs.items():
            (d / f"{split}.csv").write_text(text)
    else:
        members = {f"mini-imagenet/{s}.csv": t.encode() for s, t in csvs.items()}
        members.update({f"mini-imagenet/images/{fn}": b for fn, b in images.items()})
        write_zip(tmp_path / "mini-imagenet.zip", members)
    for split in ("train", "val"):
        with pytest.raises(DatasetFormatError, match=rf"share 1 class\(es\) \({leak}\)"):
            load_miniimagenet(split, root=tmp_path, cache_dir=tmp_path / "c")
    assert load_miniimagenet("test", root=tmp_path, cache_dir=tmp_path / "c").num_classes == 3


def test_miniimagenet_zip_without_a_split_file_is_a_missing_split(tmp_path):
    # as a folder without val.csv: DatasetNotFoundError, which the trainer takes for "no
    # validation split" (a DatasetFormatError stopped training since damaged validation data
    # became an error)
    csvs, images = mini_files()
    members = {f"mini-imagenet/{s}.csv": t.encode() for s, t in csvs.items() if s != "val"}
    members.update({f"mini-imagenet/images/{fn}": b for fn, b in images.items()})
    write_zip(tmp_path / "mini-imagenet.zip", members)
    assert load_miniimagenet("train", root=tmp_path, cache_dir=tmp_path / "c").num_classes == 4
    with pytest.raises(DatasetNotFoundError, match=r"no val.csv inside"):
        load_miniimagenet("val", root=tmp_path, cache_dir=tmp_path / "c")
