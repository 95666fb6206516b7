"""benchmarks/fig2b_compute_memory.py (paper Fig. 2b): each point timed as the median of several
calls after a warm-up, with every call kept; the point shared by the inner-steps and CG-steps
curves measured once; the JSON names the commit, the tree state, the date and the command; the
expected shape (MAML's memory grows, iMAML's is flat) checked from the rows."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import load_benchmark

SHARED = ("imaml-gd", 10, 5)


@pytest.fixture(scope="module")
def fig2b():
    return load_benchmark("fig2b_compute_memory")


def _fake_child(calls):
    """Stands in for run_in_fresh_process: MAML's memory grows with its inner steps, the others'
    is flat; records the arguments of every child started."""
    def run(args_list, timeout=3600):
        algo, k, c = args_list[0], int(args_list[1]), int(args_list[2])
        calls.append(args_list)
        peak = (1 + k) * 2**20 if algo == "maml" else 2**20
        times = [0.3, 0.1, 0.2]
        return {"algo": algo, "inner_steps": k, "cg_steps": c, "time_s": 0.2, "min_s": 0.1,
                "max_s": 0.3, "times_s": times, "repeats": 3, "warmup": 1, "peak_bytes": peak,
                "peak_bytes_per_call": [peak] * 3}
    return run


def test_default_grid_holds_the_shared_point_once(fig2b):
    points = fig2b.grid(fig2b.ALGOS, [1, 5, 10, 25, 50, 100], [1, 2, 5, 10, 20])
    assert len(points) == len(set(points)) == 4 * 6 + 5 - 1
    assert points.count(SHARED) == 1
    assert fig2b.curves({"algo": "imaml-gd", "inner_steps": 10, "cg_steps": 5}) == \
        ["inner_steps", "cg_steps"]


def test_full_run_measures_each_point_once_and_records_the_environment(fig2b, tmp_path,
                                                                        monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(fig2b, "run_in_fresh_process", _fake_child(calls))
    monkeypatch.setattr(fig2b, "plot", lambda *a, **k: None)
    out = tmp_path / "f.json"
    fig2b.main(["--out", str(out)])  # the default (not --quick) grid, where 10 inner steps is in
    keys = [(c[0], int(c[1]), int(c[2])) for c in calls]
    assert len(keys) == len(set(keys)) == 28 and keys.count(SHARED) == 1
    assert all(c[c.index("--repeats") + 1] == "3" for c in calls)  # the default: 3 timed calls
    assert capsys.readouterr().out.count("imaml-gd  inner=  10 cg=  5") == 1
    d = json.loads(out.read_text())
    shared = [r for r in d["rows"] if (r["algo"], r["inner_steps"], r["cg_steps"]) == SHARED]
    assert len(shared) == 1 and shared[0]["curves"] == ["inner_steps", "cg_steps"]
    assert d["repeats"] == 3 and d["warmup"] == 1
    env = d["environment"]
    assert env["git_commit"] and d["git_commit"] == env["git_commit"]
    assert d["git_dirty"] == env["git_commit"].endswith("+dirty")
    assert env["date"] and env["torch"] == torch.__version__ and env["cpu"]["model"]
    assert d["command"] == f"python benchmarks/fig2b_compute_memory.py --out {out}"
    assert all(r["git_commit"] == env["git_commit"] for r in d["rows"])
    # both curves drawn from the one measurement; the expected shape holds on these rows
    assert "imaml-gd: memory at 20 / 1 CG steps" in d["summary"]
    assert d["summary"]["maml: memory at 100 / 5 inner steps"] == round(101 / 6, 3)
    assert all(c["ok"] for c in d["shape"].values()) and len(d["shape"]) == 5, d["shape"]


def test_shape_checks_flag_a_growing_imaml_curve(fig2b):
    rows = [{"algo": "imaml-gd", "inner_steps": k, "cg_steps": 5, "peak_bytes": 100 + k}
            for k in (5, 25, 100)]
    checks = fig2b.shape_checks(rows)
    assert not checks["imaml-gd: memory flat in inner steps (within 5%)"]["ok"]
    # in CG steps the criterion starts at 5 steps too (the "from 5 to 100 steps"): a
    # lighter 1-step point is not a failure, growth from 5 on is
    cg = [{"algo": "imaml-gd", "inner_steps": 10, "cg_steps": c, "peak_bytes": p}
          for c, p in ((1, 90), (5, 100), (20, 101))]
    name = "imaml-gd: memory flat in cg steps (within 5%)"
    assert fig2b.shape_checks(cg)[name]["ok"]
    cg[-1]["peak_bytes"] = 110
    assert not fig2b.shape_checks(cg)[name]["ok"]


def test_a_partial_file_of_another_timing_setting_is_not_resumed(fig2b, tmp_path, monkeypatch):
    out = tmp_path / "f.json"
    old = {"setting": {"device": "cpu", "ways": 20, "shots": 5, "meta_batch": 8},  # no repeats
           "rows": [{"algo": "maml", "inner_steps": 1, "cg_steps": 5, "time_s": 9.0,
                     "peak_bytes": 1}]}
    out.with_suffix(".partial.json").write_text(json.dumps(old))
    calls = []
    monkeypatch.setattr(fig2b, "run_in_fresh_process", _fake_child(calls))
    monkeypatch.setattr(fig2b, "plot", lambda *a, **k: None)
    fig2b.main(["--out", str(out), "--algos", "maml", "--inner-steps", "1,5"])
    assert [(c[0], c[1]) for c in calls] == [("maml", "1"), ("maml", "5")]
    assert all(r["time_s"] == 0.2 for r in json.loads(out.read_text())["rows"])


def test_real_small_run_times_three_calls_per_point(fig2b, tmp_path):
    """Fresh child processes, a 2-way 1-shot meta-batch of 1: every row keeps its calls."""
    out = tmp_path / "f.json"
    n = torch.get_num_threads()
    try:
        fig2b.main(["--ways", "2", "--shots", "1", "--meta-batch", "1", "--algos", "imaml-gd",
                    "--inner-steps", "5,10", "--cg-steps", "1,5", "--out", str(out)])
    finally:
        torch.set_num_threads(n)
    d = json.loads(out.read_text())
    assert [(r["inner_steps"], r["cg_steps"]) for r in d["rows"]] == [(5, 5), (10, 5), (10, 1)]
    for r in d["rows"]:
        assert r["repeats"] == 3 and r["warmup"] == 1 and len(r["times_s"]) == 3
        assert r["time_s"] == sorted(r["times_s"])[1] and r["min_s"] == min(r["times_s"])
        assert len(r["peak_bytes_per_call"]) == 3
        assert r["peak_bytes"] == max(r["peak_bytes_per_call"]) > 0
    assert d["environment"]["git_commit"] and d["command"].startswith("python benchmarks/")
    assert not out.with_suffix(".partial.json").exists()
