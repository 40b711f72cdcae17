"""pytest plugin: one JSON line per test result, written and flushed as each test finishes.

junit/JSON reports are written only when pytest exits, so a step killed at its time cap would
lose every result; these lines survive.  Enable with ``-p pytest_stream`` (this folder on
``PYTHONPATH``) and ``GPTFAST_STREAM_JSONL=<file>``.  Works under xdist (the controller writes
test results; workers append benchmark medians, one short ``O_APPEND`` write per line).
"""

from __future__ import annotations

import json
import os

import pytest


def _write(record: dict) -> None:
    path = os.environ.get("GPTFAST_STREAM_JSONL")
    if not path:
        return
    line = (json.dumps(record, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def pytest_runtest_logreport(report):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return  # under xdist the controller gets every report too and writes the line
    # one line per test: its call phase, or the setup/teardown phase that failed or skipped it
    if report.when == "call" or report.outcome != "passed":
        message = ""
        if report.outcome != "passed" and report.longrepr is not None:
            message = (report.longreprtext or str(report.longrepr)).strip().splitlines()[-1][:300]
        _write({"kind": "test", "step": os.environ.get("GPTFAST_STREAM_STEP", ""), "nodeid": report.nodeid,
                "when": report.when, "outcome": report.outcome, "seconds": round(report.duration, 3),
                "message": message})


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    yield
    if call.when != "call":
        return
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    stats = getattr(getattr(fixture, "stats", None), "stats", None)
    if stats is None or not getattr(stats, "data", None):
        return
    _write({"kind": "benchmark", "nodeid": item.nodeid, "median_s": stats.median, "mean_s": stats.mean,
            "rounds": stats.rounds, "extra_info": getattr(fixture, "extra_info", {})})
