#!/usr/bin/env python3
"""First command on a lent GPU: verified results inside a short window (<= 8 minutes by default).

    python3 benchmarks/gpu/first_contact.py                 # files in $OUT (else benchmarks/results/...)
    python3 benchmarks/gpu/first_contact.py --dry-run       # CPU rehearsal: same machinery, no GPU work

Steps, in order, each under its own cap (and never past the total budget):

  env      nvidia-smi, versions                                         10 s
  install  pure-Python install (editable, no extensions: Triton kernels
           and embedded data exist whatever the build does)               30 s
  build    the CUDA extension in place, sm_90 only, 16 jobs             180 s
  status   gptfast.ops.backend_status()                                  10 s
  smoke    every CUDA and Triton kernel once (benchmarks/gpu/smoke.py)   45 s
  cuda     CUDA parity tests     (pytest -m "gpu and not triton", xdist) 75 s
  triton   Triton parity tests   (pytest -m "gpu and triton", xdist)     90 s
  bench    op benchmarks (benchmarks/test_bench_ops.py)                  what is left (>= 30 s)

The fixed caps add up to 440 s; with 10 s kept for the summary that fits the 480 s budget, which
is enforced as well: a step never runs past what the budget has left.  A failing or timed-out step is recorded and the run goes on.  Per-test lines
(and benchmark medians) stream to ``results.jsonl`` as each test ends, so a cap loses nothing that
finished.  Output folder: at most 8 files, never a checkpoint (``first_contact.log``,
``results.jsonl``, ``summary.json``, ``bench-ops.json``).  The last thing printed is the summary.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PY = sys.executable or "python3"

# Every step but the benchmarks has a fixed cap; these plus the summary's reserve fit the 480 s budget
# (440 + 10), and the benchmarks get what is left (at least 30 s, more when the build is quick).
DEFAULT_CAPS = {"env": 10, "install": 30, "build": 180, "status": 10, "smoke": 45, "cuda": 75, "triton": 90,
                "bench": 480}
FIXED_STEPS = ("env", "install", "build", "status", "smoke", "cuda", "triton")
DEFAULT_BUDGET_S = 480.0
SUMMARY_RESERVE_S = 10
MAX_FILES = 8


@dataclass
class StepResult:
    name: str
    command: str
    cap_s: float
    rc: int | None = None
    seconds: float = 0.0
    status: str = "not run"  # ok | failed | timeout | skipped (budget) | not run
    notes: list[str] = field(default_factory=list)


class Runner:
    """Runs steps with caps inside one budget, streaming their output to the log."""

    def __init__(self, out_dir: str, budget_s: float, caps: dict[str, float], echo: bool = True):
        self.out_dir = out_dir
        self.budget_s = budget_s
        self.caps = caps
        self.start = time.monotonic()
        self.log_path = os.path.join(out_dir, "first_contact.log")
        self.log = open(self.log_path, "a", buffering=1)
        self.results: list[StepResult] = []
        self.echo = echo

    def left(self) -> float:
        return self.budget_s - SUMMARY_RESERVE_S - (time.monotonic() - self.start)

    def say(self, text: str, echo: bool = True) -> None:
        stamp = f"[{time.monotonic() - self.start:6.1f}s]"
        self.log.write(f"{stamp} {text}\n")
        if echo and self.echo:
            print(f"{stamp} {text}", flush=True)

    def step(self, name: str, argv: list[str], env: dict | None = None, echo_filter=None) -> StepResult:
        cap = min(self.caps.get(name, 60), self.left())
        result = StepResult(name, shlex.join(argv), round(cap, 1))
        self.results.append(result)
        if cap < 5:
            result.status = "skipped (budget)"
            self.say(f"=== {name}: skipped, {max(0, self.left()):.0f}s of the budget left")
            return result
        self.say(f"=== {name} (cap {cap:.0f}s): {result.command}")
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                                start_new_session=True)

        def pump():
            for line in proc.stdout:
                line = line.rstrip("\n")
                self.log.write(f"  {name}| {line}\n")
                if echo_filter is not None and echo_filter(line) and self.echo:
                    print(f"  {name}| {line}", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            timed_out = True
            self._kill(proc)
        reader.join(timeout=5)
        result.seconds = round(time.monotonic() - t0, 1)
        result.rc = proc.returncode
        result.status = "timeout" if timed_out else ("ok" if proc.returncode == 0 else "failed")
        self.say(f"--- {name}: {result.status} (rc {result.rc}) after {result.seconds}s")
        return result

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


# ----------------------------------------------------------------------------- summary


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by a kill
    return rows


def summarize(runner: Runner, results_path: str, environment: dict, args) -> str:
    rows = read_jsonl(results_path)
    smoke = [r for r in rows if r.get("kind") == "smoke"]
    tests = [r for r in rows if r.get("kind") == "test"]
    benches = [r for r in rows if r.get("kind") == "benchmark"]
    # A test step that streamed nothing (all its time spent starting workers, say) still gets its line.
    per_step: dict[str, dict[str, int]] = {r.name: {} for r in runner.results if r.name in ("cuda", "triton")}
    for t in tests:
        counts = per_step.setdefault(t.get("step", ""), {})
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    summary = {
        "command": " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "dry_run": args.dry_run,
        "budget_s": runner.budget_s,
        "wall_s": round(time.monotonic() - runner.start, 1),
        "environment": environment,
        "steps": [vars(r) for r in runner.results],
        "smoke": {s: sum(1 for r in smoke if r["status"] == s) for s in ("OK", "FAIL", "SKIP")},
        "smoke_failures": [f"{r['backend']} {r['case']}: {r['detail']}" for r in smoke if r["status"] == "FAIL"],
        "tests": per_step,
        "test_failures": [f"{t['nodeid']}: {t['message']}" for t in tests if t["outcome"] == "failed"][:50],
        "benchmarks": len(benches),
    }
    tmp = os.path.join(runner.out_dir, "summary.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1, default=str)
    os.replace(tmp, os.path.join(runner.out_dir, "summary.json"))

    lines = ["", "=" * 30 + " first-contact summary " + "=" * 30,
             f"{'step':8s} {'status':17s} {'rc':>4s} {'secs':>6s} {'cap':>5s}"]
    for r in runner.results:
        lines.append(f"{r.name:8s} {r.status:17s} {str(r.rc):>4s} {r.seconds:6.1f} {r.cap_s:5.0f}")
    lines.append(f"smoke: {summary['smoke']['OK']} OK, {summary['smoke']['FAIL']} FAIL, {summary['smoke']['SKIP']} SKIP")
    lines += [f"  FAIL {f}"[:200] for f in summary["smoke_failures"][:15]]
    for step, counts in per_step.items():
        lines.append(f"tests[{step}]: " + (", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "0 results"))
    lines += [f"  FAILED {f}"[:200] for f in summary["test_failures"][:15]]
    lines.append(f"benchmarks recorded: {len(benches)}")
    device = environment.get("device") or "no CUDA device"
    lines.append(f"device: {device}; torch {environment.get('torch')}; triton {environment.get('triton')}")
    lines.append(f"wall {summary['wall_s']}s of {runner.budget_s}s; files in {runner.out_dir}: "
                 f"{', '.join(sorted(os.listdir(runner.out_dir)))}")
    return "\n".join(lines)


def environment_info() -> dict:
    info = {"python": platform.python_version(), "machine": platform.machine()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception as exc:  # noqa: BLE001
        info["torch"] = f"unavailable: {exc}"
    for name in ("triton", "pytest", "xdist", "pytest_benchmark", "llms_from_scratch", "tiktoken"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "present")
        except Exception as exc:  # noqa: BLE001
            info[name] = f"missing ({type(exc).__name__})"
    return info


# ----------------------------------------------------------------------------- plan


# Seconds one test may take where pytest-timeout is installed: a hung kernel then costs one test, not its step's cap
# and every test queued behind it.
TEST_TIMEOUT_S = 30


def pytest_argv(marker: str, paths: list[str], jobs: int, extra: list[str]) -> list[str]:
    argv = [PY, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-p", "pytest_stream", "-m", marker, *paths,
            "-o", "console_output_style=classic", "--tb=line", "-rfE"]
    if importlib.util.find_spec("pytest_timeout") is not None:  # unknown to pytest without it: exit status 4
        argv.append(f"--timeout={TEST_TIMEOUT_S}")
    if jobs > 1:
        argv += ["-n", str(jobs)]
    return argv + extra


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default: $OUT)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="total seconds (default 480)")
    parser.add_argument("--dry-run", action="store_true", help="CPU rehearsal: no build, smoke on the torch backend")
    parser.add_argument("--jobs", type=int, default=16, help="build jobs (MAX_JOBS)")
    parser.add_argument("--test-workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="xdist workers for the parity tests (default: 8, at most the CPU count)")
    parser.add_argument("--tests", nargs="+", default=["tests"], help="test paths")
    parser.add_argument("--bench", nargs="+", default=["benchmarks/test_bench_ops.py"], help="benchmark paths")
    parser.add_argument("--cap", action="append", default=[], metavar="STEP=SECONDS", help="override a step's cap")
    args = parser.parse_args(argv)

    caps = dict(DEFAULT_CAPS)
    for item in args.cap:
        name, _, seconds = item.partition("=")
        caps[name] = float(seconds)
    out_dir = args.out or os.path.join(ROOT, "benchmarks", "results",
                                       "first-contact-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    os.makedirs(out_dir, exist_ok=True)
    runner = Runner(out_dir, args.budget, caps)
    results_path = os.path.join(out_dir, "results.jsonl")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [HERE, ROOT, os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", "GPTFAST_STREAM_JSONL": results_path}
    runner.say(f"gptfast first contact in {ROOT}, output in {out_dir}, budget {args.budget:.0f}s"
               f"{' (dry run)' if args.dry_run else ''}")

    # env
    runner.step("env", ["sh", "-c", "nvidia-smi || echo 'nvidia-smi: not available'; " + shlex.quote(PY) +
                        " -m pip list 2>/dev/null | grep -i -E '^(torch|triton|pytest|numpy|tiktoken) ' || true"])
    environment = environment_info()
    runner.say("environment: " + json.dumps(environment))

    # install + build
    if args.dry_run:
        runner.step("install", [PY, "-c", "print('dry run: no install')"])
        runner.step("build", [PY, "-c", "print('dry run: no CUDA build')"])
    else:
        no_ext = {"GPTFAST_BUILD_CPU": "0", "GPTFAST_BUILD_CUDA": "0"}
        runner.step("install", [PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
                                "-e", "."], env={**env, **no_ext})
        runner.step("build", [PY, "setup.py", "build_ext", "--inplace"],
                    env={**env, "GPTFAST_BUILD_CPU": "0", "GPTFAST_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "9.0",
                         "MAX_JOBS": str(args.jobs)})
        runner.step("status", [PY, "-c", "from gptfast import ops; [print(k, '=', v) for k, v in "
                                         "ops.backend_status().items()]"], env=env, echo_filter=lambda _: True)

    # smoke
    smoke = [PY, os.path.join(HERE, "smoke.py"), "--jsonl", results_path]
    if args.dry_run:
        smoke += ["--device", "cpu", "--backends", "torch", "--dtypes", "float32"]
    runner.step("smoke", smoke, env=env, echo_filter=lambda line: line[:4] in ("OK  ", "FAIL", "smok"))

    # parity tests, then benchmarks
    runner.step("cuda", pytest_argv("gpu and not triton", args.tests, max(1, args.test_workers // 2), []),
                env={**env, "GPTFAST_STREAM_STEP": "cuda"}, echo_filter=lambda l: " FAILED" in l or "passed" in l)
    runner.step("triton", pytest_argv("gpu and triton", args.tests, args.test_workers, []),
                env={**env, "GPTFAST_STREAM_STEP": "triton"}, echo_filter=lambda l: " FAILED" in l or "passed" in l)
    bench_json = os.path.join(out_dir, "bench-ops.json")
    runner.step("bench", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "pytest_stream", *args.bench,
                          f"--benchmark-json={bench_json}", "--benchmark-columns=median,rounds"],
                env={**env, "GPTFAST_STREAM_STEP": "bench"}, echo_filter=lambda l: "passed" in l or "FAILED" in l)

    text = summarize(runner, results_path, environment, args)
    runner.log.write(text + "\n")
    runner.log.close()
    files = sorted(os.listdir(out_dir))
    if len(files) > MAX_FILES:  # never expected: every writer above is accounted for
        text += f"\nWARNING: {len(files)} files in the output folder (limit {MAX_FILES})"
    print(text, flush=True)
    return 0 if all(r.status == "ok" for r in runner.results) else 1


if __name__ == "__main__":
    sys.exit(main())
