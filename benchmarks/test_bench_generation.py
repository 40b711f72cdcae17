"""Generation benchmarks: gptfast's KV-cached generate against ``llms_from_scratch.ch05.generate``.

GPT-2 124M shape, context 1024, random weights, a 4-token prompt, ``GPTFAST_BENCH_GEN_TOKENS``
(default 200) new tokens, greedy.  Every result carries ``tokens_per_s`` in ``extra_info``.

CPU, fp32 (group ``generate-b1``): the reference (one round: it takes about a minute), gptfast with
torch's thread setting (its decode steps then pick torch's count or one thread by timing the first
steps) and with one thread throughout (``threads=1``), plus the weight-read floor: the
matrix-vector products over every weight a cached step reads, timed in the same process
(``floor_ms_per_token``, ``floor_ratio`` = step time / floor), and the way gpt-fast reports it:
``gb_per_s`` (weight bytes per step times tokens/s) against the machine's read bandwidth measured in
the same process (``read_floor_ratio``).
CPU bf16 weights (``generate-b1-bf16``): tokens/s, ``gb_per_s`` against bf16's own floor, and how many of the 200 greedy tokens agree with
fp32 (``agree_with_fp32``, ``same_prefix``).  CPU batch 8 (``generate-b8``): tokens/s over all rows.

GPU: batch 1, bf16 weights, CUDA-graph decode against the reference's generate on the same bf16
model; ``bandwidth_ratio`` = (weight + cache bytes read per token) / step time / ``GPTFAST_BENCH_HBM_TBS``
(default 3.35 TB/s, an H100 SXM; 4.8 on an H200).
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from bench_utils import DEVICE, ON_GPU, gpt2_124m_config, read_bandwidth_gb_per_s, run_benchmark, same_weight_pair
from bench_utils import synchronize
from bench_utils import GEN_CONTEXT as CONTEXT
from bench_utils import GEN_NEW_TOKENS as NEW_TOKENS
from bench_utils import GEN_PROMPT as PROMPT

ROUNDS = {"reference": 1, "gptfast": 3 if not ON_GPU else 10}


@pytest.fixture(scope="module")
def models():
    """The reference's GPTModel and gptfast's, with the same random weights (same seed, same creation order)."""
    import llms_from_scratch.ch04 as ref_ch04

    from gptfast.models import GPTModel

    return same_weight_pair(ref_ch04.GPTModel, GPTModel)


def _prompt(batch=1):
    return torch.tensor([PROMPT] * batch, device=DEVICE)


class _threads:
    """Run with ``n`` torch threads (None: leave the setting), restoring it afterwards."""

    def __init__(self, n):
        self.n, self.saved = n, torch.get_num_threads()

    def __enter__(self):
        if self.n is not None:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


def _add_rate(benchmark, tokens):
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["tokens_per_s"] = tokens / stats.stats.median
        benchmark.extra_info["ms_per_token"] = 1e3 * stats.stats.median / tokens
    return stats


def _linear_weight_bytes(model):
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Linear))


def _add_bandwidth(benchmark, model):
    """gpt-fast's figure: the bytes of the weights one cached step reads times tokens/s (``gb_per_s``), and how far
    that sits under the machine's read bandwidth measured in the same process (``read_floor_ratio`` = bandwidth /
    achieved, 1.0 = every step at the memory roof)."""
    rate = benchmark.extra_info.get("tokens_per_s")
    if rate is None:
        return
    achieved = _linear_weight_bytes(model) * rate / 1e9
    roof = read_bandwidth_gb_per_s()
    benchmark.extra_info.update(weight_bytes_per_token=_linear_weight_bytes(model), gb_per_s=achieved,
                                read_bandwidth_gb_per_s=roof, read_floor_ratio=roof / achieved)


def _weight_read_floor_ms(model, repeats=5):
    """Median time of the matrix-vector products over every weight one cached decode step reads."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.zeros(1, w.shape[1], dtype=w.dtype, device=w.device) for w in weights}
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for w in weights:
            torch.nn.functional.linear(inputs[w.shape[1]], w)
        synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times[1:])[repeats // 2]


# ----------------------------------------------------------------------------- CPU


@pytest.mark.skipif(ON_GPU, reason="CPU shapes; the GPU comparison is test_gpu_generate")
@pytest.mark.parametrize("impl,threads", [("reference", None), ("gptfast", None), ("gptfast", 1)])
def test_cpu_generate_b1(benchmark, models, impl, threads):
    import llms_from_scratch.ch05 as ref_ch05

    import gptfast.ch05 as ch05

    ref, ours = models
    fn = (lambda: ref_ch05.generate(ref, _prompt(), NEW_TOKENS, CONTEXT)) if impl == "reference" else \
        (lambda: ch05.generate(ours, _prompt(), NEW_TOKENS, CONTEXT))
    with _threads(threads):
        run_benchmark(benchmark, fn, rounds=ROUNDS[impl], group="generate-b1", impl=impl,
                      threads=torch.get_num_threads() if threads is None else threads, dtype="float32",
                      batch=1, prompt_tokens=len(PROMPT), new_tokens=NEW_TOKENS, context=CONTEXT)
        stats = _add_rate(benchmark, NEW_TOKENS)
        _add_bandwidth(benchmark, ours)
        if impl == "gptfast" and stats is not None:
            floor = _weight_read_floor_ms(ours)
            benchmark.extra_info["floor_ms_per_token"] = floor
            benchmark.extra_info["floor_ratio"] = 1e3 * stats.stats.median / NEW_TOKENS / floor


@pytest.mark.skipif(ON_GPU, reason="CPU shapes")
@pytest.mark.parametrize("threads", [None, 1])
def test_cpu_generate_b1_bf16(benchmark, models, threads):
    from gptfast.generation import generate_batch
    from gptfast.generation import prepare_model

    _, ours = models
    bf16 = prepare_model(ours, torch.bfloat16)
    with _threads(threads):
        result = {}

        def fn():
            result["tokens"] = generate_batch(bf16, _prompt(), NEW_TOKENS, context_size=CONTEXT).tokens

        run_benchmark(benchmark, fn, rounds=ROUNDS["gptfast"], group="generate-b1-bf16", impl="gptfast-bf16",
                      threads=torch.get_num_threads() if threads is None else threads, dtype="bfloat16",
                      batch=1, new_tokens=NEW_TOKENS, context=CONTEXT)
        _add_rate(benchmark, NEW_TOKENS)
        _add_bandwidth(benchmark, bf16)
        fp32 = generate_batch(ours, _prompt(), NEW_TOKENS, context_size=CONTEXT).tokens[0, len(PROMPT):]
    got = result["tokens"][0, len(PROMPT):]
    differs = (got != fp32).nonzero()
    benchmark.extra_info["agree_with_fp32"] = float((got == fp32).float().mean())
    benchmark.extra_info["same_prefix"] = int(differs[0, 0]) if len(differs) else NEW_TOKENS


@pytest.mark.skipif(ON_GPU, reason="CPU shapes")
@pytest.mark.parametrize("threads", [None, 1])
def test_cpu_generate_b8(benchmark, models, threads):
    from gptfast.generation import generate_batch

    _, ours = models
    prompts = torch.randint(0, 50257, (8, len(PROMPT)), generator=torch.Generator().manual_seed(0))
    with _threads(threads):
        run_benchmark(benchmark, lambda: generate_batch(ours, prompts, NEW_TOKENS, context_size=CONTEXT),
                      rounds=ROUNDS["gptfast"], group="generate-b8", impl="gptfast",
                      threads=torch.get_num_threads() if threads is None else threads, dtype="float32", batch=8,
                      new_tokens=NEW_TOKENS, context=CONTEXT)
        _add_rate(benchmark, 8 * NEW_TOKENS)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["reference", "gptfast"])
def test_gpu_generate(benchmark, models, impl):
    import llms_from_scratch.ch05 as ref_ch05

    from gptfast.generation import generate_batch

    ref, ours = models  # both bf16 on the GPU
    if impl == "reference":
        fn = lambda: ref_ch05.generate(ref, _prompt(), NEW_TOKENS, CONTEXT)  # noqa: E731
    else:
        fn = lambda: generate_batch(ours, _prompt(), NEW_TOKENS, context_size=CONTEXT)  # noqa: E731
    run_benchmark(benchmark, fn, rounds=ROUNDS[impl], group="generate-b1-gpu", impl=impl, dtype="bfloat16",
                  batch=1, new_tokens=NEW_TOKENS, context=CONTEXT)
    stats = _add_rate(benchmark, NEW_TOKENS)
    if impl == "gptfast" and stats is not None:
        weight_bytes = _linear_weight_bytes(ours)
        # The graph's step reads the whole static cache: layers x (k, v) x emb_dim x max_len, bf16.
        cfg = gpt2_124m_config()
        cache_bytes = cfg["n_layers"] * 2 * cfg["emb_dim"] * min(CONTEXT, len(PROMPT) + NEW_TOKENS - 1) * 2
        seconds = stats.stats.median / NEW_TOKENS
        peak = float(os.environ.get("GPTFAST_BENCH_HBM_TBS", "3.35")) * 1e12
        benchmark.extra_info["bytes_per_token"] = weight_bytes + cache_bytes
        benchmark.extra_info["bandwidth_ratio"] = (weight_bytes + cache_bytes) / seconds / peak
