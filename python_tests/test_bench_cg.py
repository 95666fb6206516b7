"""benchmarks/bench_cg.py on a tiny size: every contender that runs agrees with the float64
reference of the same iterations (to a bar that a run cut short fails), the speedups are the
per-round ratios, and the one-pass probe (ITERS bmm passes over X: a reference point for our
iteration's cost, not a bound) and the read probe (ITERS reads of X) are measured in the same
rounds."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import load_benchmark, needs_ext
from imaml_ext import reference


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_cg")


def test_rows_and_probe(bench, capsys):
    row, one = bench.run([(2, 12, 9), (1, 12, 9)], "cpu", min_time=0.0)
    assert "read_probe" not in row  # several systems: see READ_PROBE
    row = one
    timed = set(row["times_s"])
    assert {"imaml_ext", "torch (two bmm)"} <= timed
    assert bench.PROBE not in timed and bench.PROBE not in row["speedups"]
    for name in timed:
        assert row["errors"][name] < 1e-5, (name, row["errors"][name])
    assert row["fastest_other"] in row["speedups"]
    assert row["speedup_vs_fastest_other"] == min(row["speedups"].values())
    probe = row["one_pass_probe"]
    assert probe["time_s"] > 0
    assert probe["imaml_ext_passes_per_iteration"] > 0
    assert probe["two_bmm_speedup_at_one_pass"] > 0
    assert bench.READ_PROBE not in timed and bench.READ_PROBE not in row["speedups"]
    reads = row["read_probe"]
    assert reads["time_s"] > 0 and reads["imaml_ext_reads_per_iteration"] > 0
    assert reads["one_read_ceiling_vs_fastest_other"] > 0
    assert bench.RAW_OP not in timed and bench.RAW_OP not in row["speedups"]
    assert row["raw_op"]["time_s"] > 0 and "wrapper_s" in row["raw_op"]
    out = capsys.readouterr().out
    assert "probe:" in out and "two-bmm CG" in out and "the wrapper adds" in out
    assert "such reads" in out and "the fastest other" in out


def test_rounds_rotate_the_order(bench):
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    times = bench.interleaved_times(fns, "cpu", min_time=0.0)
    assert all(len(v) == 5 for v in times.values())
    rounds = [calls[3 + 3 * i: 6 + 3 * i] for i in range(5)]  # after the three warm-up calls
    assert [r[0] for r in rounds] == ["a", "b", "c", "a", "b"]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)


def test_a_change_of_thread_pool_gets_a_settle_and_an_untimed_call(bench, monkeypatch):
    """SciPy's OpenBLAS threads spin after a call, torch's after torch's: on a switch of pool
    between calls the rounds sleep SETTLE_S and call the next contender once untimed, so no
    timed call runs against the other pool's spinning threads; within a pool, nothing."""
    calls, sleeps = [], []
    monkeypatch.setattr(bench.time, "sleep", lambda s: sleeps.append(s))
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    times = bench.interleaved_times(fns, "cpu", min_time=0.0, pools={"b": "openblas"})
    assert all(len(v) == 5 for v in times.values())
    # round orders abc bca cab abc bca after the warm-up's c: b is entered or left 10 times,
    # and each of those calls comes twice (the untimed one, then the timed one)
    assert sleeps == [bench.SETTLE_S] * 10
    assert "".join(calls[3:]) == "abbcc" + "bbcca" + "cabb" + "aabbcc" + "bbcca"
    # no pools given: torch's alone, no sleep, no extra call
    sleeps.clear(), calls.clear()
    bench.interleaved_times(fns, "cpu", min_time=0.0)
    assert sleeps == [] and len(calls) == 3 + 15


def test_bad_sizes_rejected(bench):
    with pytest.raises(SystemExit):
        bench.main(["--sizes", "2,3"])


@needs_ext
def test_partial_runs_write_only_where_asked(bench, tmp_path, monkeypatch):
    # a --sizes (or --quick) run must not replace the committed benchmarks/results/cg_cpu.json
    monkeypatch.chdir(tmp_path)
    bench.main(["--sizes", "2,40,30", "--min-time", "0"])
    assert not (tmp_path / "benchmarks").exists()
    bench.main(["--sizes", "2,40,30", "--min-time", "0", "--out", str(tmp_path / "cg.json")])
    assert json.loads((tmp_path / "cg.json").read_text())["results"][0]["d"] == 30


def test_no_other_contender_is_reported_not_a_crash(bench, monkeypatch, capsys):
    # every other contender skipped (here: all non-finite): the row says so instead of raising
    def nan(X, b, *rest):
        return torch.full_like(b, float("nan"))
    for name in ("torch_two_bmm", "torch_gram", "torchopt_cg", "linear_operator_cg"):
        monkeypatch.setattr(bench, name, nan)
    monkeypatch.setattr(bench, "scipy_cg", lambda *a: (_ for _ in ()).throw(ImportError("no")))
    (row,) = bench.run([(2, 40, 30)], "cpu", min_time=0.0)
    assert row["fastest_other"] is None and row["speedup_vs_fastest_other"] is None
    assert "wrong answer" in row["skipped"]["torch (two bmm)"]
    assert "no other contender ran" in capsys.readouterr().out


def test_a_contender_cut_short_is_not_timed(bench, monkeypatch):
    # 8 of the 20 iterations: at 2 x 40 x 30 that errs ~1e-4 against the 20-iteration float64
    # iterate, which the former bar of 1e-3 passed and timed as a "faster" contender.
    def short(X, b, n):
        return reference.cg_solve_lstsq(X, b, torch.zeros_like(b), 1.0, 1.0 / n, 8, 0.0, 0.0)[0]

    def short_counted(X, b, n):  # one that says how many it ran
        return reference.cg_solve_lstsq(X, b, torch.zeros_like(b), 1.0, 1.0 / n, 8, 0.0,
                                        0.0)[:2]
    monkeypatch.setattr(bench, "torch_two_bmm", short)
    monkeypatch.setattr(bench, "torch_gram", short_counted)
    (row,) = bench.run([(2, 40, 30)], "cpu", min_time=0.0)
    assert row["skipped"]["torch (two bmm)"].startswith("wrong answer"), row["skipped"]
    assert "torch (two bmm)" not in row["times_s"]
    assert row["tolerance"] == bench.TOL
    assert row["check"]["bar_catches_8_iterations"]
    assert 1e-5 < row["check"]["error_after_8_iterations"] < 1e-3
    assert row["iterations_run"]["torch (Gram matrix)"] == 8
    assert row["skipped"]["torch (Gram matrix)"] == "ran 8 of 20 iterations (its own count)"
    # the honest ones, counted where they count: all 20, within the bar, timed
    assert row["iterations_run"]["imaml_ext"] == bench.ITERS
    assert row["iterations_run"][bench.RAW_OP] == bench.ITERS
    assert row["iterations_run"].get("scipy cg (per system)", bench.ITERS) == bench.ITERS
    assert row["errors"]["imaml_ext"] < bench.TOL and "imaml_ext" in row["times_s"]
