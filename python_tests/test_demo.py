"""The demo (`make demo`): a tiny run end to end, on the embedded subset (no data root)."""
from __future__ import annotations

import json

import pytest

from imaml_ext import demo


@pytest.mark.parametrize("proximal", [None, "paper"])
def test_demo_runs_and_records_its_recipe(tmp_path, monkeypatch, capsys, proximal):
    # no data root named and none in the default place: the shipped subset, said so
    monkeypatch.delenv("IMAML_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("IMAML_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    argv = ["--steps", "2", "--meta-batch", "2", "--inner-steps", "2", "--eval-tasks", "4",
            "--out", str(out)] + (["--proximal", proximal] if proximal else [])
    assert demo.main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "demo_result.json").read_text())
    assert result["meta_steps"] == 2 and result["eval_tasks"] == 4 and result["embedded_data"]
    # the authors' inner loop by default: the paper's is a matter of rounding this early
    assert result["config"]["proximal"] == (proximal or "authors")
    assert ("the authors' inner loop" in printed) == (proximal is None)
    assert "NO OMNIGLOT FOUND" in printed and "test accuracy" in printed
