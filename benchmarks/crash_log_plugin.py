"""pytest plugin of benchmarks/pytest_resilient.py (loaded with ``-p crash_log_plugin``).

Logs the number of tests collected, then each test's start and outcome, one flushed line each, to the file named by IMAML_TEST_LOG,
so a process that dies mid-test leaves a record of what finished and which test was running; and
deselects the node ids listed (one per line) in the file named by IMAML_TEST_SKIP, so a rerun
goes on past them. IMAML_TEST_LAST (words, space-separated) moves the tests whose node id holds
one of them to the end: kernels never yet run on a card go last, so that a hang or a sticky
CUDA fault there cannot take the other tests along.
"""
from __future__ import annotations

import os

_log = None


def _write(*fields: str) -> None:
    global _log
    path = os.environ.get("IMAML_TEST_LOG")
    if not path:
        return
    if _log is None:
        _log = open(path, "a", buffering=1)  # noqa: SIM115 (open for the session)
    _log.write("\t".join(f.replace("\t", " ").replace("\n", " ") for f in fields) + "\n")
    _log.flush()


def pytest_collection_modifyitems(config, items):
    last = os.environ.get("IMAML_TEST_LAST", "").split()
    if last:  # a stable partition: the others first, in pytest's order
        late = [any(w in it.nodeid for w in last) for it in items]
        items[:] = [it for it, x in zip(items, late) if not x] + \
            [it for it, x in zip(items, late) if x]
    path = os.environ.get("IMAML_TEST_SKIP")
    if not path or not os.path.exists(path):
        return
    with open(path) as f:
        skip = {line.strip() for line in f if line.strip()}
    keep = [it for it in items if it.nodeid not in skip]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[it for it in items if it.nodeid in skip])
        items[:] = keep


def pytest_collection_finish(session):
    _write("collected", str(len(session.items)))


def pytest_runtest_logstart(nodeid, location):
    _write("start", nodeid)


def pytest_runtest_logreport(report):
    # a test's outcome: its call, or a setup that did not pass (skip or error), or a failed
    # teardown (after a passed call: reported as a second line, the last one wins)
    if report.when == "call" or (report.when != "call" and not report.passed):
        msg = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            msg = str(report.longrepr[2])
        elif report.failed:
            msg = str(getattr(report.longrepr, "reprcrash", None) or report.longrepr)[:500]
        outcome = report.outcome if report.when == "call" or report.skipped else "error"
        _write(outcome, report.nodeid, report.when, msg)
