"""Prints the short table that ends benchmarks/gpu_suite.sh: one line per measured figure found
in the JSON files under the given folder."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def lines_for(name: str, data: dict):
    if data.get("benchmark") == "bench_cg":
        for r in data["results"]:
            probe = r.get("one_pass_probe", {})
            extra = (f"; {probe['imaml_ext_passes_per_iteration']:.2f} X-passes per iteration"
                     if "imaml_ext_passes_per_iteration" in probe else "")
            if "raw_op" in r:
                extra += (f"; the op alone {r['raw_op']['time_s'] * 1e3:.3f} ms (cg() wrapper "
                          f"{r['raw_op']['wrapper_s'] * 1e3:+.3f} ms)")
            vs = ("no other contender ran" if r.get("fastest_other") is None else
                  f"{r['speedup_vs_fastest_other']:.2f}x vs {r['fastest_other']}")
            yield (f"{name}: lstsq CG B={r['B']} n={r['n']} d={r['d']}: imaml_ext "
                   f"{r['times_s']['imaml_ext'] * 1e3:.3f} ms, {vs}{extra}")
    if data.get("benchmark") == "bench_kernels":
        # Achieved bandwidth against the copy measured in the same run, per path: the line that
        # decides between the least-squares product kernels (IMAML_CUDA_XTXV) and the CG paths.
        for r in data.get("hvp", []) + data.get("cg", []):
            frac = r.get("fraction_of_copy")
            if not frac:
                continue
            size = " ".join(f"{k}={r[k]}" for k in ("B", "n", "d", "P", "f", "c") if k in r)
            paths = ", ".join(f"{k.replace('imaml_ext', '').strip(' ,') or 'default'} "
                              f"{r['times_s'][k] * 1e3:.3f} ms {100 * v:.0f}%"
                              for k, v in sorted(frac.items(), key=lambda kv: -kv[1]))
            yield f"{name}: {r['op']} {size}: % of copy bandwidth: {paths}"
    if data.get("benchmark") == "head_only":
        for sp in data.get("speed") or []:
            res = sp["results"]
            for algo in ("imaml-gd", "imaml-hf"):
                a, h = res.get(f"{algo}/all"), res.get(f"{algo}/head")
                if a and h:
                    yield (f"{name}: {sp['setting']} M={sp['meta_batch']} {algo}: all "
                           f"{a['median_s']:.3f} s, head {h['median_s']:.3f} s, "
                           f"{sp[f'speedup_{algo}']['median']:.1f}x")
    for key in ("summary", "summary_lines"):
        val = data.get(key)
        if isinstance(val, list):
            for s in val:
                yield f"{name}: {s}"
        elif isinstance(val, dict):
            for k, v in val.items():
                yield f"{name}: {k} = {v}"


def main(folder: str) -> None:
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        if isinstance(data, dict):
            for line in lines_for(path.stem, data):
                print(line)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu_out")
