"""Shared helpers of the pytest-benchmark suite: device, shapes, backends to compare, peak memory.

Run on CPU (this machine): ``pytest benchmarks`` (a few minutes).  On a GPU the same files
switch to the GPU shapes and bf16.  ``GPTFAST_BENCH_DEVICE=cpu`` forces CPU.
Triton is never benchmarked under its interpreter (``TRITON_INTERPRET=1``): those numbers
would say nothing about the kernels.
"""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

from gptfast import ops

REPO = pathlib.Path(__file__).resolve().parents[1]

DEVICE = torch.device(os.environ.get("GPTFAST_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
ON_GPU = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32

# The target shapes of the kernels: CPU and H100.
SHAPES = {
    "attention": dict(B=8, H=12, T=1024, D=64) if ON_GPU else dict(B=2, H=12, T=256, D=64),
    "cross_entropy": dict(N=8192, V=50257) if ON_GPU else dict(N=512, V=50257),
    # CPU: fewer rows than on GPU; the full 8192 x 768 x 50257 matmul takes seconds per call here.
    "linear_cross_entropy": dict(N=8192, H=768, V=50257) if ON_GPU else dict(N=256, H=768, V=50257),
    "sampling": dict(B=64, V=50257, top_k=50) if ON_GPU else dict(B=8, V=50257, top_k=25),
}
DECODE_TK = (1024, 4096, 8192)
ROUNDS = {"fast": 50 if ON_GPU else 10, "medium": 30 if ON_GPU else 5, "slow": 10 if ON_GPU else 3}


# The generation benchmarks: GPT-2 124M shape, context 1024, a 4-token prompt and
# GPTFAST_BENCH_GEN_TOKENS (default 200) new greedy tokens.
GEN_NEW_TOKENS = int(os.environ.get("GPTFAST_BENCH_GEN_TOKENS", "200"))
GEN_PROMPT = [6109, 3626, 6100, 345]  # "Every effort moves you"
GEN_CONTEXT = 1024


def gpt2_124m_config() -> dict:
    """GPT-2 124M's configuration without dropout (the generation benchmarks' model)."""
    from gptfast.models import gpt2_config

    return gpt2_config("gpt2", drop_rate=0.0)


def same_weight_pair(ref_cls, our_cls, seed=123):
    """The reference's and our GPT-2 124M of these classes with the same random weights (same seed,
    same creation order), in eval mode, on the benchmark device in its dtype."""
    torch.manual_seed(seed)
    ref = ref_cls(gpt2_124m_config()).eval()
    torch.manual_seed(seed)
    ours = our_cls(gpt2_124m_config()).eval()
    return ref.to(DEVICE, DTYPE), ours.to(DEVICE, DTYPE)


def synchronize() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def bench_backends(op: str) -> list[str]:
    """Backends worth timing for ``op`` on the benchmark device (never Triton's interpreter)."""
    names = []
    for name in ops.available_backends():
        if name == "triton" and (not ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"):
            continue
        names.append(name)
    return names


def require_backend(backend: str, op: str, args, kwargs) -> None:
    """Skip (with the backend's own reason) when ``backend`` cannot serve this call."""
    try:
        ops.resolve(op, DEVICE, args, kwargs, backend)
    except RuntimeError as exc:
        pytest.skip(str(exc))


def peak_memory(fn) -> dict:
    """Peak bytes ``fn`` allocates above what is live when it starts, with how that was measured.

    GPU: ``torch.cuda.max_memory_allocated`` (the caching allocator's exact count).
    CPU: the running sum of torch.profiler's ``[memory]`` allocation events, i.e. every
    tensor torch's CPU allocator hands out and frees during the call.  It does not see
    memory a kernel takes outside torch's allocator (``malloc``/``std::vector`` scratch).
    """
    if ON_GPU:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return {"peak_bytes": torch.cuda.max_memory_allocated() - base,
                "memory_method": "torch.cuda.max_memory_allocated delta"}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return {"peak_bytes": peak, "memory_method": "torch.profiler [memory] events (torch CPU allocator only)"}


def read_bandwidth_gb_per_s(nbytes: int = 1 << 29, repeats: int = 5) -> float:
    """The machine's read bandwidth in GB/s: the best of ``repeats`` sums over a buffer of ``nbytes`` (far
    larger than any cache) with torch's threads, the roof a decode step that reads every weight once sits under."""
    import time

    buf = torch.ones(nbytes // 4, device=DEVICE)
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        buf.sum()
        synchronize()
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def run_benchmark(benchmark, fn, *, rounds: int, group: str, setup=None, **extra_info):
    """Time ``fn`` (synchronised on GPU) with pytest-benchmark's pedantic mode and attach ``extra_info``."""

    def timed():
        fn()
        synchronize()

    benchmark.group = group
    benchmark.extra_info.update({"device": str(DEVICE), "device_name": device_name(), **extra_info})
    return benchmark.pedantic(timed, setup=setup, rounds=rounds, iterations=1, warmup_rounds=1)


def device_name() -> str:
    if ON_GPU:
        return torch.cuda.get_device_name(DEVICE)
    import platform

    return platform.processor() or platform.machine()


def median_seconds(benchmark) -> float | None:
    """The median of the finished benchmark, for derived figures (TFLOP/s, GB/s)."""
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else stats.stats.median


def run_interleaved(benchmark, steps: dict, *, rounds: int, group: str, **extra_info) -> dict:
    """Time ``steps[impl]()`` for every impl in turn, round after round (who goes first rotates), so load on a
    shared machine hits all alike.  Returns per-impl median seconds (the warm-up round left out) and records
    them, with ``speedup_vs_reference``, in ``extra_info``."""
    import time

    times = {impl: [] for impl in steps}
    impls = tuple(steps)
    rounds_done = [0]

    def one_round():
        offset = rounds_done[0] % len(impls)
        rounds_done[0] += 1
        for impl in impls[offset:] + impls[:offset]:
            t0 = time.perf_counter()
            steps[impl]()
            times[impl].append(time.perf_counter() - t0)

    run_benchmark(benchmark, one_round, rounds=rounds, group=group, **extra_info)
    return record_interleaved(benchmark, times)


def record_interleaved(benchmark, times: dict) -> dict:
    """Per-impl median seconds of interleaved rounds (``times[impl]``: one entry per round, the warm-up first),
    recorded in ``extra_info`` with ``speedup_vs_reference`` (ratio of the medians) and each round's own ratios.

    A round's ratio compares steps run seconds apart, so slow drift of a shared machine's load
    cancels in it; ``speedup_median_of_rounds`` is the median of those.
    """
    import statistics

    # The warm-up round is left out: pytest-benchmark ran it before the timed rounds.
    timed = {impl: ts[1:] if len(ts) > 1 else ts for impl, ts in times.items()}
    medians = {impl: statistics.median(ts) for impl, ts in timed.items()}
    per_round = {impl: [ref / t for ref, t in zip(timed["reference"], ts)] for impl, ts in timed.items()}
    benchmark.extra_info["per_impl_median_s"] = medians
    benchmark.extra_info["speedup_vs_reference"] = {impl: medians["reference"] / m for impl, m in medians.items()}
    benchmark.extra_info["speedup_per_round"] = per_round
    benchmark.extra_info["speedup_median_of_rounds"] = {impl: statistics.median(r) for impl, r in per_round.items()}
    return medians
