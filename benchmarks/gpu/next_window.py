#!/usr/bin/env python3
"""Second GPU window: training and decode speed, and a memory check of every kernel.

    python3 benchmarks/gpu/next_window.py                 # files in $OUT (else benchmarks/results/...)
    python3 benchmarks/gpu/next_window.py --skip-build    # the extension is already built in place

Run after first_contact.py has passed.  Same machinery (caps inside one budget, results streamed
to ``results.jsonl``, <= 8 files, summary printed last), these steps:

  env, install, build   as in first_contact.py                                        10+30+180 s
  train     gptfast's training step vs the reference's optimized recipe (SDPA,
            fused AdamW, bf16, torch.compile): tokens/s and MFU per implementation
            (benchmarks/test_bench_train.py -k gpu; temporary out-dirs, no checkpoint here)  120 s
  decode    124M batch-1 decode: gptfast's CUDA-graph decoder vs the reference's
            generate, tokens/s (benchmarks/test_bench_generation.py -k gpu)                  90 s
  memcheck  compute-sanitizer --tool memcheck over the smoke run, bf16 (every CUDA and
            Triton kernel once; any invalid access fails the step)                          rest
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import first_contact as fc

CAPS = {"env": 10, "install": 30, "build": 180, "train": 120, "decode": 90, "memcheck": 480}
FIXED_STEPS = ("env", "install", "build", "train", "decode")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--budget", type=float, default=fc.DEFAULT_BUDGET_S)
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--jobs", type=int, default=16)
    args = parser.parse_args(argv)

    out_dir = args.out or os.path.join(fc.ROOT, "benchmarks", "results", "next-window")
    os.makedirs(out_dir, exist_ok=True)
    runner = fc.Runner(out_dir, args.budget, CAPS)
    results = os.path.join(out_dir, "results.jsonl")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [fc.HERE, fc.ROOT, os.path.join(fc.ROOT, "benchmarks"),
                                                       os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", "GPTFAST_STREAM_JSONL": results}
    py = fc.PY
    runner.step("env", ["sh", "-c", "nvidia-smi; compute-sanitizer --version | head -2"])
    environment = fc.environment_info()
    if not args.skip_build:
        runner.step("install", [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e",
                                "."], env={**env, "GPTFAST_BUILD_CPU": "0", "GPTFAST_BUILD_CUDA": "0"})
        runner.step("build", [py, "setup.py", "build_ext", "--inplace"],
                    env={**env, "GPTFAST_BUILD_CPU": "0", "GPTFAST_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "9.0",
                         "MAX_JOBS": str(args.jobs)})
    bench = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "pytest_stream",
             "--benchmark-columns=median,rounds", "-k", "gpu"]
    runner.step("train", [*bench, "benchmarks/test_bench_train.py",
                          f"--benchmark-json={os.path.join(out_dir, 'bench-train.json')}"],
                env={**env, "GPTFAST_STREAM_STEP": "train"}, echo_filter=lambda l: "passed" in l or "FAILED" in l)
    runner.step("decode", [*bench, "benchmarks/test_bench_generation.py",
                           f"--benchmark-json={os.path.join(out_dir, 'bench-generation.json')}"],
                env={**env, "GPTFAST_STREAM_STEP": "decode"}, echo_filter=lambda l: "passed" in l or "FAILED" in l)
    sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    runner.step("memcheck", [sanitizer, "--tool", "memcheck", "--error-exitcode", "97", "--print-limit", "20", py,
                             os.path.join(fc.HERE, "smoke.py"), "--dtypes", "bfloat16", "--jsonl", results],
                env=env, echo_filter=lambda l: l[:4] in ("OK  ", "FAIL", "smok") or "ERROR SUMMARY" in l)

    class Args:  # what summarize() reads
        dry_run = False

    text = fc.summarize(runner, results, environment, Args)
    runner.log.write(text + "\n")
    runner.log.close()
    print(text, flush=True)
    return 0 if all(r.status == "ok" for r in runner.results) else 1


if __name__ == "__main__":
    sys.path.insert(0, fc.HERE)
    sys.exit(main())
