"""The GPU first-contact script, rehearsed on the CPU: it runs, respects its caps and budget, streams
per-test results before a step is killed, writes at most 8 files, and prints the summary last;
plus the collection rules the script relies on (``-m gpu`` selects real tests, a missing reference
package skips instead of erroring)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
GPU_DIR = REPO / "benchmarks" / "gpu"
sys.path.insert(0, str(GPU_DIR))

import first_contact  # noqa: E402

FAKE_GPU_TESTS = '''
import time
import pytest

@pytest.mark.gpu
def test_quick_cuda_kernel():
    pass

@pytest.mark.gpu
def test_hangs_past_the_cap():
    time.sleep(600)

@pytest.mark.gpu
@pytest.mark.triton
def test_quick_triton_kernel():
    pass

def test_cpu_only_not_selected():
    pass
'''

FAKE_BENCH = '''
def test_tiny_bench(benchmark):
    benchmark(sum, range(100))
'''


def test_default_caps_fit_the_window():
    fixed = sum(first_contact.DEFAULT_CAPS[name] for name in first_contact.FIXED_STEPS)
    assert fixed + first_contact.SUMMARY_RESERVE_S <= first_contact.DEFAULT_BUDGET_S <= 8 * 60
    assert first_contact.DEFAULT_CAPS["build"] <= 4 * 60
    assert set(first_contact.DEFAULT_CAPS) == set(first_contact.FIXED_STEPS) | {"bench"}


def test_runner_cuts_a_step_at_the_budget_and_skips_the_rest(tmp_path):
    runner = first_contact.Runner(str(tmp_path), budget_s=first_contact.SUMMARY_RESERVE_S + 8, caps={"a": 100},
                                  echo=False)
    t0 = time.monotonic()
    first = runner.step("a", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"])
    second = runner.step("b", [sys.executable, "-c", "print('never')"])
    assert time.monotonic() - t0 < 20
    assert first.status == "timeout" and first.seconds < 12
    assert second.status == "skipped (budget)"
    log = (tmp_path / "first_contact.log").read_text()
    assert "a| started" in log and "never" not in log


def test_each_test_gets_a_time_limit_where_pytest_timeout_is_installed(monkeypatch):
    """A hung kernel then costs one test, not its step's cap; without the plugin the option would stop pytest."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    for installed in (True, False):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, installed=installed: (
            (object() if installed else None) if name == "pytest_timeout" else real_find_spec(name, *a)))
        argv = first_contact.pytest_argv("gpu", ["tests"], 4, [])
        assert (f"--timeout={first_contact.TEST_TIMEOUT_S}" in argv) == installed
        assert argv[argv.index("-n") + 1] == "4"


def test_a_test_step_that_streamed_nothing_still_has_its_summary_line(tmp_path):
    runner = first_contact.Runner(str(tmp_path), budget_s=60, caps={}, echo=False)
    runner.step("triton", [sys.executable, "-c", "pass"])
    text = first_contact.summarize(runner, str(tmp_path / "none.jsonl"), {}, type("Args", (), {"dry_run": True}))
    assert "tests[triton]: 0 results" in text


# The dry run's cuda step: long enough for two pytest workers to start and pass the quick test on a
# loaded CI machine before the hanging test uses up the cap.
CUDA_CAP = 90


def test_dry_run(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "test_fake_gpu.py").write_text(textwrap.dedent(FAKE_GPU_TESTS))
    (work / "test_fake_bench.py").write_text(textwrap.dedent(FAKE_BENCH))
    out = tmp_path / "out"
    cmd = [sys.executable, str(GPU_DIR / "first_contact.py"), "--dry-run", "--out", str(out), "--budget", "300",
           "--tests", str(work / "test_fake_gpu.py"), "--bench", str(work / "test_fake_bench.py"),
           "--test-workers", "2", "--cap", f"cuda={CUDA_CAP}"]
    t0 = time.monotonic()
    # Run it as a user would: without this pytest's own variables (an xdist worker's PYTEST_XDIST_WORKER
    # would make the script's inner pytest runs behave as workers of this session).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=REPO, env=env)
    wall = time.monotonic() - t0
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the hanging test times out its step
    assert wall < 300, proc.stdout

    files = [p for p in out.rglob("*") if p.is_file()]
    assert 3 <= len(files) <= first_contact.MAX_FILES, files
    assert not any(p.suffix in (".pt", ".pth", ".ckpt", ".safetensors") for p in files)

    # the summary is the last thing printed
    tail = proc.stdout.strip().splitlines()
    start = max(i for i, line in enumerate(tail) if "first-contact summary" in line)
    assert tail[-1].startswith("wall ") and start > len(tail) - 30

    summary = json.loads((out / "summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == ["env", "install", "build", "smoke", "cuda", "triton", "bench"]
    assert steps["cuda"]["status"] == "timeout" and steps["cuda"]["seconds"] < CUDA_CAP + 12
    assert steps["smoke"]["status"] == "ok" and steps["triton"]["status"] == "ok" and steps["bench"]["status"] == "ok"
    assert summary["smoke"]["OK"] >= 9 and summary["smoke"]["FAIL"] == 0

    # results streamed before the kill; only gpu-marked tests selected; the benchmark median recorded
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    tests = {(r["step"], r["nodeid"].split("::")[-1]): r["outcome"] for r in rows if r["kind"] == "test"}
    assert tests[("cuda", "test_quick_cuda_kernel")] == "passed"
    assert ("triton", "test_quick_triton_kernel") in tests and ("cuda", "test_quick_triton_kernel") not in tests
    assert not any(name == "test_cpu_only_not_selected" for _, name in tests)
    assert any(r["kind"] == "benchmark" and r["median_s"] > 0 for r in rows)
    assert (out / "bench-ops.json").exists()


@pytest.mark.slow
def test_gpu_marker_selects_the_cuda_and_triton_parity_tests():
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-p", "no:xdist", "-m", "gpu", "tests"], capture_output=True, text=True, cwd=REPO,
                          timeout=600)
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    files = {line.split("::")[0] for line in ids}
    assert len(ids) > 100, proc.stdout[-2000:]
    # Tests are grouped per op, so the backends show in the test ids (parametrised over backends).
    assert any("cuda" in i for i in ids) and any("triton" in i for i in ids), ids[:50]
    assert not any("test_first_contact" in f for f in files)


REFERENCE_CONFTEST = '''
import sys
sys.path.insert(0, {tests!r})
import importlib.abc

class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "llms_from_scratch":
            raise ModuleNotFoundError("No module named 'llms_from_scratch'", name="llms_from_scratch")
        return None

sys.meta_path.insert(0, _Block())
from collection_rules import pytest_collection_modifyitems, pytest_make_collect_report, pytest_runtest_makereport
'''


def test_missing_reference_package_skips_with_a_reason(tmp_path):
    (tmp_path / "conftest.py").write_text(REFERENCE_CONFTEST.format(tests=str(REPO / "tests")))
    (tmp_path / "test_module_level.py").write_text("import llms_from_scratch\n\ndef test_x():\n    pass\n")
    (tmp_path / "test_in_test.py").write_text(
        "def test_y():\n    import llms_from_scratch.ch04\n\ndef test_z():\n    assert 1 == 2\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "no:xdist",
                           str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    out = proc.stdout
    assert "1 failed" in out and "2 skipped" in out, out  # test_z still fails: only the import is forgiven
    assert out.count("needs the reference package llms_from_scratch") == 2, out
