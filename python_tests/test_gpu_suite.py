"""benchmarks/gpu_suite.sh, dry-run on the CPU: every command it would run on a lent GPU, checked
here before a GPU's scarce minutes are spent on it.

The suite runs with PY set to a shim that records each Python invocation's arguments and
succeeds at once (no build, no CUDA). Then: the shell control flow finished with every step
recorded "ok" and the results packed; each benchmark script accepts the exact flags the suite
gives it (its own argparse, stopped after parsing); the training preset's `imaml train` / `eval`
command lines are valid configurations (every recipe and CUDA-graph variant of
gpu_train_preset.sh); the CUDA-test selection (-k) collects the tests each opt-in gate reads,
so a renamed test cannot switch a path's benchmark rows off unseen; and the gates themselves
(the suite's Python snippets on stdin, which the shim runs for real) turn each path on or off
from a junit file as its CUDA tests passed or failed.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_benchmark, write_junit
from imaml_ext import cli

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"
PRESET = ROOT / "benchmarks" / "gpu_train_preset.sh"


class _Parsed(Exception):
    pass


RECORD = ("import json, os, sys; open(os.environ['SHIM_LOG'], 'a').write(json.dumps({'argv': "
          "sys.argv[1:], 'env': {k: v for k, v in os.environ.items() if k.startswith(("
          "'IMAML_BENCH_', 'IMAML_CUDA_'))}}) + chr(10))")


def _dry_run(tmp_path, script: Path, *args: str, env: dict | None = None, entries=None):
    """(completed process, [argv of each Python invocation]) of `script` run with the shim; the
    suite's own Python snippets on stdin (its gates: `"$PY" - ...`) run for real. `entries`, a
    list, receives each invocation's argv and IMAML_BENCH_* / IMAML_CUDA_* environment."""
    log = tmp_path / "invocations.jsonl"
    shim = tmp_path / "shim"
    py = shlex.quote(sys.executable)
    shim.write_text(f'#!/bin/sh\nif [ "$1" = "-" ]; then exec {py} "$@"; fi\n'
                    f'exec {py} -c {shlex.quote(RECORD)} "$@"\n')
    shim.chmod(0o755)
    full_env = {**os.environ, "PY": str(shim), "SHIM_LOG": str(log), "OUT": str(tmp_path / "out"),
                **(env or {})}
    # the caller's suite settings too: on a card this test runs inside the suite, whose
    # SUITE_PACK would otherwise receive this dry run's fake archive
    for k in [k for k in full_env if k == "IMAML_DATA" or k.startswith(("IMAML_BENCH_",
                                                                        "IMAML_CUDA_", "SUITE_"))
              and k not in (env or {})]:
        full_env.pop(k)
    proc = subprocess.run(["bash", str(script), *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=120)
    logged = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    if entries is not None:
        entries.extend(logged)
    return proc, [e["argv"] for e in logged]


def _parses(script: str, argv: list[str], monkeypatch) -> None:
    """Runs benchmarks/<script>'s main(argv) up to the end of its argument parsing."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    mod = load_benchmark(script[len("benchmarks/"):-len(".py")])
    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        with pytest.raises(_Parsed):
            mod.main(argv)


def _check_cli(argv: list[str]) -> None:
    assert argv[:2] == ["-m", "imaml_ext.cli"], argv
    ns = cli.build_parser().parse_args(argv[2:])
    if ns.command == "train":
        cfg, _ = cli._config_from_args(ns)  # the option combination checks (UsageError)
        assert cfg.device == "cuda"


@pytest.mark.parametrize("compile_", ["", "1"])
def test_suite_dry_run_quick_full(tmp_path, monkeypatch, compile_):
    pack = tmp_path / "pack"
    proc, calls = _dry_run(tmp_path, SUITE, "quick", "full",
                           env={"SUITE_PACK": str(pack), "SUITE_DEADLINE_S": "530",
                                "SUITE_COMPILE": compile_})
    meta = [c for c in calls if c[:1] == ["benchmarks/bench_meta_gradient.py"]]
    assert len(meta) == 1 and ("--compile-hvp" in meta[0]) == (compile_ == "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    status = (tmp_path / "out" / "suite_status_quick_full.txt").read_text().splitlines()
    steps = [line.split()[0] for line in status if line.endswith("s") and " ok " in line]
    assert steps == ["build", "tests_cuda", "bench_kernels", "bench_cg", "bench_meta_gradient",
                     "train_preset", "hvp_op_count", "root_graph", "head_only", "fig2b"], status
    assert (pack / "suite_quick_full.tgz").is_file() and (pack / "summary_quick_full.txt").is_file()
    scripts = [c for c in calls if c and c[0].startswith("benchmarks/")
               and not c[0].endswith("gpu_summary.py")]
    assert {c[0] for c in scripts} == {
        "benchmarks/pytest_resilient.py", "benchmarks/bench_kernels.py", "benchmarks/bench_cg.py",
        "benchmarks/bench_meta_gradient.py", "benchmarks/probes/hvp_op_count.py",
        "benchmarks/probes/root_graph.py", "benchmarks/bench_head_only.py",
        "benchmarks/fig2b_compute_memory.py"}
    for c in scripts:
        _parses(c[0], c[1:], monkeypatch)
    preset = [c for c in calls if c[:2] == ["-m", "imaml_ext.cli"]]
    assert [c[2] for c in preset] == ["train", "eval"]
    i = preset[0].index("--cuda-graph")  # the preset's default: the step graph
    assert preset[0][i + 1] == "step"
    for c in preset:
        _check_cli(c)
    # a second call on the still-warm machine goes on where the first stopped: nothing reruns
    log = tmp_path / "invocations.jsonl"
    log.unlink()
    proc, calls = _dry_run(tmp_path, SUITE, "full")
    assert proc.returncode == 0
    assert not [c for c in calls if c and c[0].startswith("benchmarks/bench")]
    assert "done by an earlier call" in proc.stdout


def test_suite_dry_run_quick_alone(tmp_path, monkeypatch):
    proc, calls = _dry_run(tmp_path, SUITE, "quick")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # unset, the deadline keeps a call within the 8 minutes
    assert "deadline 470 s" in proc.stdout, proc.stdout[:500]
    scripts = [c for c in calls if c and c[0].startswith("benchmarks/")
               and not c[0].endswith("gpu_summary.py")]
    assert {c[0] for c in scripts} == {
        "benchmarks/pytest_resilient.py",
        "benchmarks/probes/hvp_op_count.py", "benchmarks/probes/root_graph.py",
        "benchmarks/bench_cg.py", "benchmarks/bench_kernels.py"}
    for c in scripts:
        _parses(c[0], c[1:], monkeypatch)
    bad = subprocess.run(["bash", str(SUITE), "fast"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


@pytest.mark.parametrize("pooled_ok", [True, False])
def test_suite_gates_follow_the_cuda_tests(tmp_path, pooled_ok):
    """The gates read the CUDA tests' junit file for real: a path whose tests passed has its
    benchmark rows on (IMAML_BENCH_*=1 in the benchmarks' environment), one whose tests failed
    or did not run has them off, and the benchmarks' defaults are moved off such a path
    (IMAML_CUDA_XTXV=rows, IMAML_CUDA_CG_STEP=separate, IMAML_CUDA_POOLED_BN=reference)."""
    out = tmp_path / "out"
    out.mkdir()
    fail = '<failure message="x"/>'
    write_junit(out / "tests_cuda.xml", [
        ("test_cg_solve", "test_cuda_lstsq_product_kernels[f32-tiles]", ""),
        ("test_cg_solve", "test_cuda_lstsq_product_kernels[f32-bulk-epilogue]", ""),
        ("test_cg_solve", "test_cuda_lstsq_product_kernels[f32-prefetch-epilogue]", fail),
        ("test_cg_solve", "test_cuda_step_epilogue[f32]", fail),
        ("test_cg_solve", "test_cuda_step_epilogue_tiles[f32]", '<skipped message="no"/>'),
        ("test_pooled_bn", "test_backward_matches_twin[cuda-f64]", "" if pooled_ok else fail),
        ("test_pooled_bn", "test_forward_matches_twin[cuda-f32]", "")])
    entries = []
    proc, _ = _dry_run(tmp_path, SUITE, "quick", "full", entries=entries)
    assert proc.returncode == 0, proc.stderr[-2000:]
    bench = [e for e in entries if e["argv"][:1] == ["benchmarks/bench_kernels.py"]]
    assert len(bench) == 1
    env = bench[0]["env"]
    assert (env["IMAML_BENCH_TILES"], env["IMAML_BENCH_STEP_EPILOGUE"],
            env["IMAML_BENCH_STEP_EPILOGUE_TILES"], env["IMAML_BENCH_BULK"],
            env["IMAML_BENCH_PREFETCH"]) == ("1", "0", "0", "1", "0")
    assert env["IMAML_BENCH_POOLED_BN"] == ("1" if pooled_ok else "0")
    assert "IMAML_CUDA_XTXV" not in env and env["IMAML_CUDA_CG_STEP"] == "separate"
    assert env.get("IMAML_CUDA_POOLED_BN") == (None if pooled_ok else "reference")
    status = (out / "suite_status_quick_full.txt").read_text()
    assert ("pooled batch-norm derivative kernels: CUDA tests failed or did not run; off"
            in status) == (not pooled_ok)


def test_opt_in_kernels_failing_leave_the_default_paths_on(tmp_path):
    # the bulk-copy and prefetch kernels' epilogue tests hold "epilogue" too: one failing moved
    # the real default (the CG step in the tiled product's epilogue) off for every benchmark
    out = tmp_path / "out"
    out.mkdir()
    fail = '<failure message="x"/>'
    write_junit(out / "tests_cuda.xml", [
        ("test_cg_solve", "test_cuda_lstsq_product_kernels[f32-tiles]", ""),
        ("test_cg_solve", "test_cuda_lstsq_product_kernels[f32-bulk-epilogue]", fail),
        ("test_cg_solve", "test_cuda_lstsq_product_kernels[f32-prefetch-epilogue]", fail),
        ("test_cg_solve", "test_cuda_lstsq_product_kernels[f32-tiles-bulk]", fail),
        ("test_cg_solve", "test_cuda_step_epilogue[f32]", ""),
        ("test_cg_solve", "test_cuda_step_epilogue_tiles[f32]", ""),
        ("test_pooled_bn", "test_backward_matches_twin[cuda-f64]", "")])
    entries = []
    proc, _ = _dry_run(tmp_path, SUITE, "quick", "full", entries=entries)
    assert proc.returncode == 0, proc.stderr[-2000:]
    env = [e for e in entries if e["argv"][:1] == ["benchmarks/bench_kernels.py"]][0]["env"]
    assert (env["IMAML_BENCH_TILES"], env["IMAML_BENCH_STEP_EPILOGUE"],
            env["IMAML_BENCH_STEP_EPILOGUE_TILES"], env["IMAML_BENCH_BULK"],
            env["IMAML_BENCH_PREFETCH"]) == ("1", "1", "1", "0", "0")
    assert "IMAML_CUDA_CG_STEP" not in env and "IMAML_CUDA_XTXV" not in env


def test_suite_fits_the_training_preset_to_the_deadline_and_packs_as_it_goes(tmp_path):
    # The preset trained its full PRESET_MAX_TIME even when the deadline left less, and its step
    # was then killed before the evaluation; the pack was made only at the very end.
    pack = tmp_path / "out"  # the tool's $OUT as both: the archive must not hold itself
    proc, calls = _dry_run(tmp_path, SUITE, "quick", "full",
                           env={"SUITE_DEADLINE_S": "125", "SUITE_PACK": str(pack)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    preset = [c for c in calls if c[:3] == ["-m", "imaml_ext.cli", "train"]]
    assert len(preset) == 1
    max_time = float(preset[0][preset[0].index("--max-time") + 1])
    assert 30 <= max_time <= 125 - 30 - 40, max_time
    import tarfile
    with tarfile.open(pack / "suite_quick_full.tgz") as tar:
        names = tar.getnames()
    assert "./tests_cuda.log" in names and not [n for n in names if ".tgz" in n], names
    (tmp_path / "again").mkdir()
    proc, calls = _dry_run(tmp_path / "again", SUITE, "full", env={"SUITE_DEADLINE_S": "85"})
    assert "train_preset skipped" in proc.stdout, proc.stdout[-2000:]
    assert not [c for c in calls if c[:3] == ["-m", "imaml_ext.cli", "train"]]


@pytest.mark.parametrize("recipe,graph", [("authors", "0"), ("paper", "0"), ("authors", "1"),
                                          ("authors", "step")])
def test_train_preset_command_lines_are_valid(tmp_path, recipe, graph):
    proc, calls = _dry_run(tmp_path, PRESET, env={"RECIPE": recipe, "CUDA_GRAPH": graph,
                                                  "MAX_TIME": "80"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [c[2] for c in calls] == ["train", "eval"]
    for c in calls:
        _check_cli(c)
    train = cli._config_from_args(cli.build_parser().parse_args(calls[0][2:]))[0]
    assert train.proximal == recipe and train.max_time == 80
    assert train.cuda_graph == {"0": False, "1": "solve", "step": "step"}[graph]


def test_cuda_selection_collects_what_each_gate_reads():
    """The suite's `pytest -k "cuda or graph"` and its gates (gpu_suite.sh's `gate` calls: words
    that a test's module::name must hold, and words it must not): each gate must find tests in
    the selection, else its path's benchmark rows are skipped on the card for want of a test."""
    text = SUITE.read_text()
    k = shlex.split(text.split(" -- \\\n", 1)[1].split("\n", 1)[0])
    assert k[0] == "python_tests"
    assert k[k.index("-k") + 1] == "cuda or graph"
    gates = [shlex.split(line.strip())[1:4] for line in text.splitlines()
             if line.strip().startswith("gate IMAML_BENCH_")]
    assert len(gates) == 6
    out = subprocess.run([sys.executable, "-m", "pytest", "python_tests", "--collect-only", "-q",
                          "-k", "cuda or graph", "-p", "no:cacheprovider"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    ids = [line.replace("/", ".").replace(".py::", "::") for line in out.stdout.splitlines()
           if "::" in line]
    assert len(ids) > 100, out.stdout[-2000:]
    for want, avoid in ((g[1].split(), g[2].split()) for g in gates):
        hits = [i for i in ids if all(w in i for w in want) and not any(w in i for w in avoid)]
        assert hits, f"no collected CUDA test holds {want} without {avoid}"
