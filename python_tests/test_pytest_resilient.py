"""benchmarks/pytest_resilient.py, the GPU suite's test runner: a test that kills its process
costs that test alone, and the junit file still covers every test (the suite's gates read it)."""
from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "benchmarks" / "pytest_resilient.py"

DEMO = '''
import os, signal, pytest
def test_a(): pass
def test_b_segfault(): os.kill(os.getpid(), signal.SIGSEGV)
def test_c_fails(): assert 1 == 2
@pytest.mark.skip(reason="no CUDA device")
def test_d(): pass
@pytest.mark.parametrize("x", [1, 2])
def test_e(x): pass
class TestK:
    def test_m(self): pass
def test_f_aborts(): os.abort()
'''


def run(tmp_path, source: str, *extra: str):
    (tmp_path / "test_demo.py").write_text(source)
    junit = tmp_path / "out" / "junit.xml"
    proc = subprocess.run([sys.executable, str(RUNNER), "--junitxml", str(junit), *extra, "--",
                           "-q", "-p", "no:cacheprovider", "test_demo.py"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    cases = {}
    if junit.exists():
        for c in ET.parse(junit).iter("testcase"):
            kind = [e.tag for e in c] or ["passed"]
            cases[f"{c.get('classname')}::{c.get('name')}"] = (kind[0], (list(c) or [c])[0]
                                                                .get("message"))
    return proc, cases


def test_crashing_tests_cost_themselves_alone(tmp_path):
    proc, cases = run(tmp_path, DEMO)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert list(cases) == ["test_demo::test_a", "test_demo::test_b_segfault",
                           "test_demo::test_c_fails", "test_demo::test_d", "test_demo::test_e[1]",
                           "test_demo::test_e[2]", "test_demo.TestK::test_m",
                           "test_demo::test_f_aborts"]
    assert cases["test_demo::test_b_segfault"] == ("error", "the test process died: signal 11")
    assert cases["test_demo::test_f_aborts"] == ("error", "the test process died: signal 6")
    assert cases["test_demo::test_c_fails"][0] == "failure"
    assert cases["test_demo::test_d"] == ("skipped", "Skipped: no CUDA device")
    assert [cases[k][0] for k in ("test_demo::test_a", "test_demo::test_e[2]",
                                  "test_demo.TestK::test_m")] == ["passed"] * 3
    assert ("the process died in: test_demo.py::test_b_segfault, test_demo.py::test_f_aborts"
            in proc.stdout)


def test_a_clean_run_matches_pytests_own_junit(tmp_path):
    source = "\n".join(line for line in DEMO.splitlines()
                       if "segfault" not in line and "abort" not in line and "fails" not in line)
    proc, cases = run(tmp_path, source)
    assert proc.returncode == 0, proc.stderr[-2000:]
    own = tmp_path / "own.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    f"--junitxml={own}", "test_demo.py"], cwd=tmp_path, capture_output=True,
                   timeout=300)
    theirs = {f"{c.get('classname')}::{c.get('name')}": ([e.tag for e in c] or ["passed"])[0]
              for c in ET.parse(own).iter("testcase")}
    assert {k: v[0] for k, v in cases.items()} == theirs


def test_crash_budget(tmp_path):
    # past --max-crashes the run stops; what did not run is absent, and the status says failed
    proc, cases = run(tmp_path, DEMO, "--max-crashes", "0")
    assert proc.returncode == 1
    assert cases["test_demo::test_b_segfault"][0] == "error"
    assert "test_demo::test_c_fails" not in cases


HANGS = '''
import time
def test_a(): pass
def test_b_hangs(): time.sleep(300)
def test_c(): pass
'''


def test_a_timeout_still_writes_the_junit_file(tmp_path):
    # `timeout` signals the runner and pytest (its process group): the runner died without a
    # junit file, and every gate of the GPU suite went off with it
    (tmp_path / "test_demo.py").write_text(HANGS)
    junit = tmp_path / "out" / "junit.xml"
    proc = subprocess.run(["timeout", "8", sys.executable, str(RUNNER), "--junitxml", str(junit),
                           "--", "-q", "-p", "no:cacheprovider", "test_demo.py"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 124, proc.stderr[-2000:]
    cases = {c.get("name"): [e.tag for e in c] for c in ET.parse(junit).iter("testcase")}
    assert cases == {"test_a": [], "test_b_hangs": ["error"]}
    assert "stopped by SIGTERM" in proc.stderr


def test_a_second_sigterm_does_not_cut_the_junit_file_short(tmp_path):
    # `timeout` signals its child, then its process group: the runner gets SIGTERM twice, and a
    # second one after the first was handled killed it while it wrote the junit file (seen once
    # on a loaded machine: no summary, no "stopped by SIGTERM"). The write is slowed here so that
    # the second signal lands in it.
    import signal
    import time
    (tmp_path / "test_demo.py").write_text(HANGS.replace(
        "def test_b_hangs(): time.sleep(300)",
        "def test_b_hangs():\n    open('started', 'w').close()\n    time.sleep(300)"))
    junit = tmp_path / "out" / "junit.xml"
    code = ("import sys, time; sys.path.insert(0, {here!r}); import pytest_resilient as r\n"
            "w = r.write_junit\n"
            "def slow(*a):\n    print('writing', flush=True); time.sleep(3); w(*a)\n"
            "r.write_junit = slow\n"
            "sys.exit(r.main(sys.argv[1:]))\n").format(here=str(RUNNER.parent))
    proc = subprocess.Popen([sys.executable, "-c", code, "--junitxml", str(junit), "--", "-q",
                             "-p", "no:cacheprovider", "test_demo.py"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (tmp_path / "started").exists():
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.5)  # inside the slowed write
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert "writing" in out, (out, err)
    assert proc.returncode == 124, (out, err[-2000:])
    cases = {c.get("name"): [e.tag for e in c] for c in ET.parse(junit).iter("testcase")}
    assert cases == {"test_a": [], "test_b_hangs": ["error"]}
    assert "stopped by SIGTERM" in err


def test_named_tests_run_last(tmp_path):
    import os
    (tmp_path / "test_demo.py").write_text("def test_bulk_x(): pass\ndef test_a(): pass\n"
                                           "def test_prefetch_y(): pass\ndef test_b(): pass\n")
    junit = tmp_path / "junit.xml"
    proc = subprocess.run([sys.executable, str(RUNNER), "--junitxml", str(junit), "--", "-q",
                           "-p", "no:cacheprovider", "test_demo.py"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "IMAML_TEST_LAST": "bulk prefetch"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [c.get("name") for c in ET.parse(junit).iter("testcase")] == [
        "test_a", "test_b", "test_bulk_x", "test_prefetch_y"]
