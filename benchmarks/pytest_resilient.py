"""Runs pytest so that a test which kills its process (a segfault, an abort) costs that test
alone: the run goes on past it, and the junit file covers every test.

    python benchmarks/pytest_resilient.py --junitxml OUT.xml [--max-crashes 5] -- PYTEST_ARGS...

pytest runs with benchmarks/crash_log_plugin.py, which logs each test's start and outcome as it
happens. When the process dies by a signal, the test that had started and not finished is
recorded as an error ("the test process died: signal N") and pytest is run again with every
test already done deselected, up to --max-crashes times. The junit file is written from the log
(classname / name as pytest's own, a <failure>, <error> or <skipped> element where due), so
gpu_suite.sh's gates and its zero-host-sync verdict can read it after a crash. SIGTERM (a
`timeout` that ran out, which signals pytest too) still writes the junit file of what finished,
the running test as an error, and exits 124. Exit status: 0 when every test passed or was
skipped, 1 when one failed or crashed (or the process died outside a test), 124 when stopped by
SIGTERM, pytest's own otherwise (e.g. 2: a collection error, 5: none collected).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from xml.sax.saxutils import quoteattr

HERE = Path(__file__).resolve().parent


def read_log(path: Path) -> tuple[list[str], dict[str, tuple[str, str]], int]:
    """(node ids in the order they started, {node id: (outcome, message)}, how many tests the
    last pytest run collected and did not start) from the plugin's log."""
    started, done, left = [], {}, 0
    if path.exists():
        for line in path.read_text().splitlines():
            fields = line.split("\t")
            if fields[0] == "collected" and len(fields) > 1:
                left = int(fields[1])
            elif fields[0] == "start" and len(fields) > 1:
                left -= 1
                if fields[1] not in started:
                    started.append(fields[1])
            elif len(fields) >= 2:
                done[fields[1]] = (fields[0], fields[3] if len(fields) > 3 else "")
    return started, done, left


def junit_name(nodeid: str) -> tuple[str, str]:
    """pytest's junit (classname, name) of a node id: python_tests/test_x.py::C::t[p] ->
    ("python_tests.test_x.C", "t[p]")."""
    parts = nodeid.split("::")
    module = parts[0][:-3] if parts[0].endswith(".py") else parts[0]
    return ".".join([module.replace("/", "."), *parts[1:-1]]), parts[-1]


def write_junit(path: Path, started: list[str], done: dict[str, tuple[str, str]]) -> None:
    tag = {"failed": "failure", "error": "error", "crashed": "error", "skipped": "skipped"}
    cases = []
    for nodeid in started:
        outcome, msg = done.get(nodeid, ("crashed", "the test did not finish"))
        cls, name = junit_name(nodeid)
        inner = f"<{tag[outcome]} message={quoteattr(msg)}/>" if outcome in tag else ""
        cases.append(f"<testcase classname={quoteattr(cls)} name={quoteattr(name)}>{inner}"
                     "</testcase>")
    counts = {k: sum(done.get(n, ("crashed",))[0] == k for n in started)
              for k in ("failed", "error", "crashed", "skipped")}
    tmp = path.with_suffix(".tmp")
    tmp.write_text('<?xml version="1.0" encoding="utf-8"?>\n<testsuites><testsuite name="pytest" '
                   f'tests="{len(started)}" failures="{counts["failed"]}" '
                   f'errors="{counts["error"] + counts["crashed"]}" '
                   f'skipped="{counts["skipped"]}">' + "".join(cases) + "</testsuite></testsuites>\n")
    tmp.replace(path)


class _Terminated(Exception):
    """SIGTERM arrived (raised from the handler; subprocess.run then kills and reaps pytest)."""


def _on_sigterm(signum, frame):
    # `timeout` signals its child and then its whole process group: this process gets SIGTERM
    # twice, and a second one after the first was handled killed it before it wrote the junit
    # file or its messages (seen on a loaded machine). Ignore the rest.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Terminated(signum)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--junitxml", required=True, help="the junit file to write")
    ap.add_argument("--max-crashes", type=int, default=5,
                    help="process deaths to go on past (default 5)")
    ap.add_argument("pytest_args", nargs=argparse.REMAINDER,
                    help="after --: the arguments for pytest")
    args = ap.parse_args(argv)
    pytest_args = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    junit = Path(args.junitxml)
    junit.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        log, skip = Path(tmp) / "log.tsv", Path(tmp) / "skip.txt"
        env = {**os.environ, "IMAML_TEST_LOG": str(log), "IMAML_TEST_SKIP": str(skip),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE),
                                                           os.environ.get("PYTHONPATH")]))}
        crashes, ended = [], None
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            try:
                ended = _loop(pytest_args, env, log, skip, crashes, args.max_crashes)
                # from here on a SIGTERM (a late one, or the second of a pair) must not cut
                # the junit file or the verdict short: what remains takes milliseconds
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            except _Terminated:  # the handler ignores further ones
                pass
            started, done, _ = read_log(log)
            write_junit(junit, started, done)
            return _report(junit, started, done, crashes, ended)
        finally:
            signal.signal(signal.SIGTERM, previous)


def _report(junit: Path, started: list, done: dict, crashes: list, ended) -> int:
    """Prints the summary line (and why the run stopped) and returns the exit code."""
    outcomes = [done.get(n, ("crashed",))[0] for n in started]
    bad = sum(o in ("failed", "error", "crashed") for o in outcomes)
    print(f"pytest_resilient: {len(started)} tests: {outcomes.count('passed')} passed, "
          f"{outcomes.count('skipped')} skipped, {bad} failed or crashed"
          + (f" (the process died in: {', '.join(crashes)})" if crashes else "")
          + f"; junit {junit}", flush=True)
    if ended is None:
        print("pytest_resilient: stopped by SIGTERM; the junit file holds the tests that "
              "finished (the running one as an error)", file=sys.stderr, flush=True)
        return 124
    rc, died_outside = ended
    if bad:
        return 1
    if died_outside:
        print(f"pytest_resilient: the process died (return code {rc}) outside a test",
              file=sys.stderr, flush=True)
        return 1
    return rc


def _loop(pytest_args, env, log: Path, skip: Path, crashes: list,
          max_crashes: int) -> tuple[int, bool]:
    """Runs pytest until it ends without dying in a test (or too many deaths), appending the
    node ids it died in to `crashes`; returns the last run's return code and whether that run
    died outside a test."""
    while True:
        rc = subprocess.run([sys.executable, "-m", "pytest", "-p", "crash_log_plugin",
                             *pytest_args], env=env).returncode
        started, done, left = read_log(log)
        running = [n for n in started if n not in done]
        died = rc < 0 or rc >= 128
        if not (died and running):
            return rc, died  # died: at collection or at exit
        signal_no = -rc if rc < 0 else rc - 128
        crashes.append(running[-1])
        with open(log, "a") as f:
            f.write(f"crashed\t{running[-1]}\tcall\tthe test process died: signal {signal_no}\n")
        print(f"pytest_resilient: the process died (signal {signal_no}) in {running[-1]}; "
              f"going on past it", file=sys.stderr, flush=True)
        if len(crashes) > max_crashes or left <= 0:  # no test left to run
            return rc, False
        skip.write_text("\n".join(started) + "\n")


if __name__ == "__main__":
    sys.exit(main())
