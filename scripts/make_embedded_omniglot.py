#!/usr/bin/env python
"""Builds the small Omniglot subset shipped in imaml_ext/data/embedded/ (the offline default).

It draws, with one seed, a number of characters from the background set and from the
evaluation set of the full Omniglot (the original zips or folders under --data-root / IMAML_DATA),
decodes them exactly as the loader does (28x28, LANCZOS, ink = 255), and writes

    imaml_ext/data/embedded/omniglot_subset.npz
        images       uint8 (C, 20, 28, 28)
        class_names  str (C,): "images_background/<Alphabet>/<character>" or "images_evaluation/..."
    imaml_ext/data/embedded/LICENSE   Omniglot's MIT notice

The loader splits it like the full set: protocol "background" trains on its background
characters (less 20 for val) and tests on its evaluation characters.

    python scripts/make_embedded_omniglot.py --data-root ../shared/data
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from imaml_ext.data.omniglot import (BACKGROUND, EVALUATION, decode_omniglot_set,  # noqa: E402
                                     find_omniglot_sources)

OMNIGLOT_MIT = """The MIT License (MIT)

Copyright (c) 2015 Brenden Lake

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", default=os.environ.get("IMAML_DATA"),
                    help="folder holding Omniglot (default: $IMAML_DATA)")
    ap.add_argument("--background", type=int, default=150,
                    help="characters drawn from images_background (train + val)")
    ap.add_argument("--evaluation", type=int, default=50,
                    help="characters drawn from images_evaluation (test)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "imaml_ext/data/embedded/omniglot_subset.npz")
    ap.add_argument("--max-bytes", type=int, default=1_000_000)
    args = ap.parse_args(argv)
    if not args.data_root:
        ap.error("give --data-root or set IMAML_DATA")
    sources = find_omniglot_sources(args.data_root)
    missing = [s for s in (BACKGROUND, EVALUATION) if s not in sources]
    if missing:
        ap.error(f"{', '.join(missing)} not found under {args.data_root}")
    rng = np.random.default_rng(args.seed)
    images, names = [], []
    for set_name, count in ((BACKGROUND, args.background), (EVALUATION, args.evaluation)):
        t0 = time.perf_counter()
        data = decode_omniglot_set(sources[set_name])
        n = len(data["class_names"])
        if not 0 < count <= n:
            ap.error(f"--{set_name.split('_')[1]} must be in 1..{n}")
        pick = np.sort(rng.choice(n, size=count, replace=False))
        images.append(data["images"].numpy()[pick, :, 0])
        names += [data["class_names"][i] for i in pick]
        print(f"{set_name}: {count} of {n} characters ({time.perf_counter() - t0:.1f} s)")
    arr = np.concatenate(images)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, images=arr, class_names=np.array(names))
    size = tmp.stat().st_size
    if size > args.max_bytes:
        tmp.unlink()
        print(f"error: {size} bytes exceeds --max-bytes {args.max_bytes}; draw fewer characters",
              file=sys.stderr)
        return 1
    os.replace(tmp, args.out)
    lic = Path(args.data_root) / "omniglot" / "LICENSE"
    text = lic.read_text() if lic.is_file() else OMNIGLOT_MIT
    (args.out.parent / "LICENSE").write_text(
        "The Omniglot images in omniglot_subset.npz (a resized subset of\n"
        "https://github.com/brendenlake/omniglot) are under this license:\n\n" + text)
    print(f"wrote {args.out}: {arr.shape[0]} characters x {arr.shape[1]} drawings, {size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
