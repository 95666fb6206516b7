"""The probes under benchmarks/probes run (tiny sizes) and report what they claim to."""
from __future__ import annotations

import json

import pytest

from conftest import load_benchmark, needs_ext

pytestmark = pytest.mark.usefixtures("one_thread")


@needs_ext
def test_hvp_op_count_probe(tmp_path, capsys):
    probe = load_benchmark("probes/hvp_op_count")
    out = tmp_path / "ops.json"
    probe.main(["--device", "cpu", "--tasks", "3", "--settings", "5w1s", "--rounds", "1",
                "--out", str(out)])
    rep = json.loads(out.read_text())
    e = rep["settings"]["5w1s"]
    aten, own = e["counts"]["aten_conv"], e["counts"]["own_conv"]
    # the per-group loop of ATen's convolution double backward: one convolution per task in
    # each of the 3 layers after the first, which replaces a few of _Conv's (M=32: 111 vs 17)
    assert aten["product"]["convolution_ops"] - own["product"]["convolution_ops"] >= 3 * 3 - 2
    assert own["grad"]["kernel_ops"] == aten["grad"]["kernel_ops"] > 0
    assert e["rel_diff_own_vs_aten"] < 1e-5
    # the block's derivative kernels: one op for each of the two derivatives of the 4 blocks,
    # against ~13 and ~19 ATen ops each
    fused = e["counts"]["own_conv+bn_kernels"]
    assert fused["product"]["kernel_ops"] <= own["product"]["kernel_ops"] - 4 * 20
    assert fused["grad"]["kernel_ops"] == own["grad"]["kernel_ops"]
    # and the graph build: the forward, the backward and the factor table, one op each per block
    assert fused["graph_build"]["kernel_ops"] <= own["graph_build"]["kernel_ops"] - 4 * 40
    assert e["rel_diff_vs_aten"]["own_conv+bn_kernels"] < 1e-5
    assert set(e["timing"]) == {"rounds", "aten_conv", "own_conv", "own_conv+bn_kernels"}
    assert set(e["profile"]) == {"grad", "product"}
    prof = e["profile"]["product"]
    assert prof["busy_ms"] > 0 and "convolution" in prof["table"]
    assert "imaml_ext::pooled_bn_double_backward" in prof["table"]
    # the solve beyond its products: cg_begin, 5 cg_step, cg_end (the CPU's early-stop reads
    # apart), and each product's 2 ops more than an HVP on dicts (copy in, concatenate out)
    so = e["solve_overhead"]
    assert so["solver_ops"] == 7 and so["ops"]["imaml_ext.cg_step.default"] == 5
    assert so["product_kernel_ops"] == fused["product"]["kernel_ops"] + 2
    assert len(rep["summary_lines"]) == 4 and "the gradient's" in capsys.readouterr().out


def test_hvp_op_count_busy_time_counts_each_kernel_once():
    # the profiler lists a kernel twice: as the ATen op that launched it (CPU device type, its
    # kernels' time as "self device time") and as itself (CUDA device type)
    from types import SimpleNamespace

    from torch.autograd import DeviceType
    busy_us = load_benchmark("probes/hvp_op_count").busy_us
    ev = [SimpleNamespace(device_type=DeviceType.CPU, self_device_time_total=100.0,
                          self_cpu_time_total=30.0, is_user_annotation=False),
          SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=100.0,
                          self_cpu_time_total=0.0, is_user_annotation=False),
          SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=7.0,
                          self_cpu_time_total=0.0, is_user_annotation=True)]
    assert busy_us(ev, cuda=True) == 100.0 and busy_us(ev, cuda=False) == 30.0


def test_root_graph_probe(tmp_path, capsys):
    probe = load_benchmark("probes/root_graph")
    out = tmp_path / "root.json"
    probe.main(["--device", "cpu", "--settings", "B32_n256_d64", "--iters", "3", "--rounds", "2",
                "--out", str(out)])
    rep = json.loads(out.read_text())
    e = rep["settings"]["B32_n256_d64"]
    assert e["eager_s"] > 0 and "graph_s" not in e  # the capture needs CUDA
    assert "needs a CUDA device" in rep["summary_lines"][0] in capsys.readouterr().out
