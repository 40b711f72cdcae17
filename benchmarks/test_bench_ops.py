"""Per-op benchmarks: every available backend against the torch path and the plain-PyTorch baselines.

Shapes are the project's target shapes (``bench_utils.SHAPES``): on CPU fp32, on a
GPU bf16.  Each result carries the shape, dtype, backend, peak memory of one
call (with how it was measured) and, where it means something, TFLOP/s or GB/s.
Compare within a group: ``pytest benchmarks --benchmark-group-by=group``.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from gptfast import ops

from bench_utils import (DECODE_TK, DEVICE, DTYPE, ON_GPU, ROUNDS, SHAPES, bench_backends, median_seconds,
                         peak_memory, require_backend, run_benchmark)

PASSES = ("fwd", "fwd+bwd")
DTYPE_NAME = str(DTYPE).removeprefix("torch.")


def _randn(*shape, grad=False, scale=1.0):
    t = torch.randn(*shape, device=DEVICE, dtype=torch.float32) * scale
    return t.to(DTYPE).requires_grad_(grad)


def _attention_fn(impl, q, k, v):
    if impl == "sdpa":
        # The baseline the speed goals name: ATen's fused kernel (flash on H100, its CPU flash kernel here).
        is_causal = q.shape[2] > 1
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    require_backend(impl, "causal_attention", (q, k, v), dict(dropout_p=0.0, training=False, scale=None))
    return lambda: ops.causal_attention(q, k, v, backend=impl)


def _with_backward(forward, inputs, grad_out=None):
    """``forward()`` followed by backward; returns (fn, setup) where setup clears the gradients."""

    def fn():
        out = forward()
        out.backward(grad_out if grad_out is not None else None)

    def setup():
        for t in inputs:
            t.grad = None

    return fn, setup


def _flops_attention(b, h, tq, tk, d, passes):
    # Two matmuls of 2*tq*tk*d each, half of them masked away by causality (tq == tk);
    # backward does 2.5x the forward's matmul work.
    forward = 4 * b * h * tq * tk * d * (0.5 if tq == tk else 1.0)
    return forward * (3.5 if passes == "fwd+bwd" else 1.0)


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("impl", bench_backends("causal_attention") + ["sdpa"])
def test_attention(benchmark, impl, passes):
    s = SHAPES["attention"]
    training = passes == "fwd+bwd"
    q, k, v = (_randn(s["B"], s["H"], s["T"], s["D"], grad=training) for _ in range(3))
    forward = _attention_fn(impl, q, k, v)
    setup = None
    fn = forward
    if training:
        fn, setup = _with_backward(forward, (q, k, v), torch.randn_like(q))
    memory = peak_memory(lambda: (setup and setup(), fn()))
    run_benchmark(benchmark, fn, setup=setup, rounds=ROUNDS["fast"], group=f"attention {passes} {s} {DTYPE_NAME}",
                  op="causal_attention", impl=impl, passes=passes, shape=s, dtype=DTYPE_NAME, **memory)
    seconds = median_seconds(benchmark)
    if seconds:
        benchmark.extra_info["tflops"] = _flops_attention(s["B"], s["H"], s["T"], s["T"], s["D"], passes) / seconds / 1e12


# Grouped-query attention (Llama 3 / Qwen3 style): H query heads over H_kv shared k/v heads.
GQA_SHAPE = dict(B=4, H=32, H_kv=8, T=1024, D=128) if ON_GPU else dict(B=1, H=16, H_kv=8, T=256, D=64)


def _gqa_fn(impl, q, k, v):
    if impl == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return _attention_fn(impl, q, k, v)


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("impl", bench_backends("causal_attention") + ["sdpa"])
def test_gqa_attention(benchmark, impl, passes):
    """Grouped k/v: the fused backends read the shared heads in place; the torch path expands them."""
    s = GQA_SHAPE
    training = passes == "fwd+bwd"
    q = _randn(s["B"], s["H"], s["T"], s["D"], grad=training)
    k, v = (_randn(s["B"], s["H_kv"], s["T"], s["D"], grad=training) for _ in range(2))
    forward = _gqa_fn(impl, q, k, v)
    setup = None
    fn = forward
    if training:
        fn, setup = _with_backward(forward, (q, k, v), torch.randn_like(q))
    memory = peak_memory(lambda: (setup and setup(), fn()))
    run_benchmark(benchmark, fn, setup=setup, rounds=ROUNDS["fast"], group=f"gqa attention {passes} {s} {DTYPE_NAME}",
                  op="causal_attention", impl=impl, passes=passes, shape=s, dtype=DTYPE_NAME, **memory)
    seconds = median_seconds(benchmark)
    if seconds:
        benchmark.extra_info["tflops"] = _flops_attention(s["B"], s["H"], s["T"], s["T"], s["D"], passes) / seconds / 1e12


@pytest.mark.skipif(not ON_GPU, reason="decode attention is a GPU benchmark")
@pytest.mark.parametrize("tk", DECODE_TK)
@pytest.mark.parametrize("impl", bench_backends("causal_attention") + ["sdpa"])
def test_decode_attention(benchmark, impl, tk):
    q = _randn(1, 12, 1, 64)
    k, v = _randn(1, 12, tk, 64), _randn(1, 12, tk, 64)
    fn = _attention_fn(impl, q, k, v)
    run_benchmark(benchmark, fn, rounds=ROUNDS["fast"] * 4, group=f"decode attention B=1 H=12 Tk={tk}",
                  op="decode_attention", impl=impl, shape=dict(B=1, H=12, Tq=1, Tk=tk, D=64), dtype=DTYPE_NAME)
    seconds = median_seconds(benchmark)
    if seconds:
        kv_bytes = 2 * k.numel() * k.element_size()
        benchmark.extra_info["gbytes_per_s"] = kv_bytes / seconds / 1e9


# Qwen3-0.6B's decode attention on CPU: one query row per head (16 query heads sharing 8 key/value heads of
# 128) over the first Tk positions of a static cache (a view, as a decode step reads it), batch 1 and 8.
CPU_DECODE_CACHE = 600


@pytest.mark.skipif(ON_GPU, reason="the CPU decode shapes; test_decode_attention is the GPU one")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("batch,tk", [(1, 144), (1, 512), (8, 144), (8, 512)], ids=lambda x: str(x))
@pytest.mark.parametrize("impl", bench_backends("causal_attention") + ["sdpa"])
def test_cpu_decode_attention_qwen3(benchmark, impl, batch, tk, dtype):
    g = torch.Generator().manual_seed(0)
    cache_k, cache_v = (torch.randn(batch, 8, CPU_DECODE_CACHE, 128, generator=g).to(dtype) for _ in range(2))
    q = torch.randn(batch, 16, 1, 128, generator=g).to(dtype)
    k, v = cache_k[:, :, :tk], cache_v[:, :, :tk]
    if impl == "sdpa":
        fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    else:
        require_backend(impl, "causal_attention", (q, k, v), dict(dropout_p=0.0, training=False, scale=None))
        fn = lambda: ops.causal_attention(q, k, v, backend=impl)  # noqa: E731
    name = str(dtype).removeprefix("torch.")
    run_benchmark(benchmark, fn, rounds=ROUNDS["fast"] * 4, group=f"cpu decode attention B={batch} Tk={tk} {name}",
                  op="decode_attention", impl=impl, shape=dict(B=batch, H=16, H_kv=8, Tq=1, Tk=tk, D=128), dtype=name)
    seconds = median_seconds(benchmark)
    if seconds:
        benchmark.extra_info["gbytes_per_s"] = 2 * k.numel() * k.element_size() / seconds / 1e9


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("impl", bench_backends("cross_entropy"))
def test_cross_entropy(benchmark, impl, passes):
    s = SHAPES["cross_entropy"]
    logits = _randn(s["N"], s["V"], grad=passes == "fwd+bwd", scale=2.0)
    targets = torch.randint(0, s["V"], (s["N"],), device=DEVICE)
    kwargs = dict(ignore_index=-100, reduction="mean")
    require_backend(impl, "cross_entropy", (logits, targets), kwargs)
    forward = lambda: ops.cross_entropy(logits, targets, backend=impl)  # noqa: E731
    fn, setup = (forward, None) if passes == "fwd" else _with_backward(forward, (logits,))
    memory = peak_memory(lambda: (setup and setup(), fn()))
    run_benchmark(benchmark, fn, setup=setup, rounds=ROUNDS["medium"],
                  group=f"cross_entropy {passes} {s} {DTYPE_NAME}", op="cross_entropy", impl=impl, passes=passes,
                  shape=s, dtype=DTYPE_NAME, **memory)


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("impl", bench_backends("linear_cross_entropy"))
def test_linear_cross_entropy(benchmark, impl, passes):
    s = SHAPES["linear_cross_entropy"]
    training = passes == "fwd+bwd"
    hidden = _randn(s["N"], s["H"], grad=training)
    weight = _randn(s["V"], s["H"], grad=training, scale=0.02)
    targets = torch.randint(0, s["V"], (s["N"],), device=DEVICE)
    require_backend(impl, "linear_cross_entropy", (hidden, weight, targets),
                    dict(bias=None, ignore_index=-100, reduction="mean"))
    forward = lambda: ops.linear_cross_entropy(hidden, weight, targets, backend=impl)  # noqa: E731
    fn, setup = (forward, None) if not training else _with_backward(forward, (hidden, weight))
    memory = peak_memory(lambda: (setup and setup(), fn()))
    run_benchmark(benchmark, fn, setup=setup, rounds=ROUNDS["slow"],
                  group=f"linear_cross_entropy {passes} {s} {DTYPE_NAME}", op="linear_cross_entropy", impl=impl,
                  passes=passes, shape=s, dtype=DTYPE_NAME, **memory)


# ----------------------------------------------------------------------------- sampling


def topk_softmax_sample(logits, top_k, temperature, generator):
    """The best plain-PyTorch formulation: softmax over the k kept logits only, then map back."""
    top_logits, top_idx = torch.topk(logits, top_k, dim=-1)
    probs = torch.softmax(top_logits / temperature, dim=-1)
    return top_idx.gather(1, torch.multinomial(probs, 1, generator=generator))


def full_vocab_sample(logits, top_k, temperature, generator):
    """The reference's formulation: mask below the k-th largest to -inf, softmax over the whole vocabulary."""
    top_logits, _ = torch.topk(logits, top_k)
    masked = torch.where(logits < top_logits[:, -1:], torch.tensor(float("-inf"), device=logits.device), logits)
    probs = torch.softmax(masked / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


BASELINE_SAMPLERS = {"topk_softmax": topk_softmax_sample, "reference_full_vocab": full_vocab_sample}


@pytest.mark.parametrize("impl", bench_backends("sample_next_token") + list(BASELINE_SAMPLERS))
def test_sampling(benchmark, impl):
    s = SHAPES["sampling"]
    logits = _randn(s["B"], s["V"], scale=3.0)
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    if impl in BASELINE_SAMPLERS:
        sampler = BASELINE_SAMPLERS[impl]
        fn = lambda: sampler(logits, s["top_k"], 1.0, generator)  # noqa: E731
    else:
        require_backend(impl, "sample_next_token", (logits,), dict(temperature=1.0, top_k=s["top_k"],
                                                                     generator=generator))
        fn = lambda: ops.sample_next_token(logits, temperature=1.0, top_k=s["top_k"],  # noqa: E731
                                           generator=generator, backend=impl)
    memory = peak_memory(fn)
    run_benchmark(benchmark, fn, rounds=ROUNDS["fast"] * 2, group=f"sampling {s} temperature=1 {DTYPE_NAME}",
                  op="sample_next_token", impl=impl, shape=s, dtype=DTYPE_NAME, **memory)


# Layer ops at Qwen3-0.6B's widths (emb 1024, hidden 3072, 16 heads of 128; GELU at GPT-2's
# hidden 3072): CPU 256 tokens, GPU 8192; the GPT's LayerNorm and dropout (p 0.1) at the 124M model's
# width (768) over a training step's tokens (batch 2 x context 256 on CPU).  Against the torch path
# (backend "torch", the reference's math; for dropout F.dropout's Bernoulli mask).
LAYER_TOKENS = 8192 if ON_GPU else 256
LAYER_SHAPES = {
    "rms_norm": dict(N=LAYER_TOKENS, D=1024),
    "layer_norm": dict(N=2 * LAYER_TOKENS, D=768),
    "swiglu": dict(N=LAYER_TOKENS, H=3072),
    "gelu": dict(N=LAYER_TOKENS, H=3072),  # GPT-2 124M's MLP activation
    "dropout": dict(N=2 * LAYER_TOKENS, D=768, p=0.1),  # the GPT's residual and embedding dropout
    "rope": dict(B=1, H=16, T=LAYER_TOKENS, D=128),
}


def _layer_case(op, impl):
    """``(forward, leaves, shape)`` for one layer op on the benchmark device."""
    s = LAYER_SHAPES[op]
    if op == "rms_norm":
        x, w = _randn(s["N"], s["D"], grad=True, scale=2.0), _randn(s["D"], grad=True)
        args, kwargs, leaves = (x, w), dict(eps=1e-6), (x, w)
    elif op == "layer_norm":
        x = _randn(s["N"], s["D"], grad=True, scale=2.0)
        w, b = _randn(s["D"], grad=True), _randn(s["D"], grad=True)
        args, kwargs, leaves = (x, w, b), dict(eps=1e-5), (x, w, b)
    elif op == "swiglu":
        gate, up = _randn(s["N"], s["H"], grad=True, scale=2.0), _randn(s["N"], s["H"], grad=True)
        args, kwargs, leaves = (gate, up), {}, (gate, up)
    elif op == "gelu":
        x = _randn(s["N"], s["H"], grad=True, scale=2.0)
        args, kwargs, leaves = (x,), {}, (x,)
    elif op == "dropout":
        x = _randn(s["N"], s["D"], grad=True)
        args, kwargs, leaves = (x, s["p"]), dict(training=True), (x,)
    else:
        from gptfast.models.layers import rope_tables
        x = _randn(s["B"], s["T"], s["H"], s["D"], grad=True)
        cos, sin = (t.to(DEVICE) for t in rope_tables(s["D"], theta_base=1_000_000.0, context_length=s["T"]))
        # the heads view a projection gives the model: (B, H, T, D) over (B, T, H, D) memory
        args, kwargs, leaves = (x.transpose(1, 2), cos, sin), dict(offset=0, positions=None), (x,)
    require_backend(impl, op, args, kwargs)
    return (lambda: getattr(ops, op)(*args, **kwargs, backend=impl)), leaves, s


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("op", sorted(LAYER_SHAPES))
@pytest.mark.parametrize("impl", sorted(set(bench_backends("rms_norm")) | {"torch"}))
def test_layer_op(benchmark, impl, op, passes):
    forward, leaves, s = _layer_case(op, impl)
    if passes == "fwd":
        fn, setup = (lambda: forward()), None
    else:
        out = forward()
        grad_out = torch.randn_like(out)
        fn, setup = _with_backward(forward, leaves, grad_out)
    memory = peak_memory(lambda: (setup and setup(), fn()))
    run_benchmark(benchmark, fn, setup=setup, rounds=ROUNDS["fast"], group=f"{op} {passes} {s} {DTYPE_NAME}",
                  op=op, impl=impl, passes=passes, shape=s, dtype=DTYPE_NAME, **memory)


# ----------------------------------------------------------------------------- decode linear

# Qwen3-0.6B's decode matrix-vector products: a block's widest projection (N=3072, K=1024) and
# the 151936-row output head; GPTFAST_BENCH_DECODE_LINEAR_SMALL=1 swaps the head for GPT-2's
# 50257 x 768 (less memory).
_HEAD = (50257, 768) if os.environ.get("GPTFAST_BENCH_DECODE_LINEAR_SMALL") == "1" else (151936, 1024)
DECODE_LINEAR_SHAPES = [(3072, 1024), _HEAD]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("n, k", DECODE_LINEAR_SHAPES, ids=[f"N{n}K{k}" for n, k in DECODE_LINEAR_SHAPES])
@pytest.mark.parametrize("m", [1, 8])
@pytest.mark.parametrize("impl", bench_backends("decode_linear") + ["F.linear"])
def test_decode_linear(benchmark, impl, m, n, k, dtype):
    weight = torch.randn(n, k, device=DEVICE).to(dtype)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    if impl == "F.linear":
        fn = lambda: F.linear(x, weight)  # noqa: E731
    else:
        require_backend(impl, "decode_linear", (x, weight), dict(bias=None))
        fn = lambda: ops.decode_linear(x, weight, backend=impl)  # noqa: E731
    name = str(dtype).removeprefix("torch.")
    run_benchmark(benchmark, fn, rounds=ROUNDS["medium"] * 2, group=f"decode linear M={m} N={n} K={k} {name}",
                  op="decode_linear", impl=impl, shape=dict(M=m, N=n, K=k), dtype=name)
    seconds = median_seconds(benchmark)
    if seconds:  # the weight-read floor: every weight byte once per call
        benchmark.extra_info["gbytes_per_s"] = weight.numel() * weight.element_size() / seconds / 1e9


# Every matrix of a Qwen3-0.6B decode step (q, k/v, o, gate/up, down projections and the head) as
# (name, N, K): on a GPU the fused kernels are weighed against F.linear before decode steps route
# to them there.
QWEN3_06B_LINEARS = [("q_proj", 2048, 1024), ("kv_proj", 1024, 1024), ("o_proj", 1024, 2048),
                     ("gate_up_proj", 3072, 1024), ("down_proj", 1024, 3072), ("lm_head", 151936, 1024)]


@pytest.mark.skipif(not ON_GPU, reason="the GPU decode-linear comparison needs a CUDA device")
@pytest.mark.parametrize("layer, n, k", QWEN3_06B_LINEARS, ids=[name for name, _, _ in QWEN3_06B_LINEARS])
@pytest.mark.parametrize("m", [1, 8])
@pytest.mark.parametrize("impl", bench_backends("decode_linear") + ["F.linear"])
def test_decode_linear_gpu_qwen3(benchmark, impl, m, layer, n, k):
    weight = torch.randn(n, k, device=DEVICE).to(torch.bfloat16)
    x = torch.randn(m, k, device=DEVICE).to(torch.bfloat16)
    if impl == "F.linear":
        fn = lambda: F.linear(x, weight)  # noqa: E731
    else:
        require_backend(impl, "decode_linear", (x, weight), dict(bias=None))
        fn = lambda: ops.decode_linear(x, weight, backend=impl)  # noqa: E731
    run_benchmark(benchmark, fn, rounds=ROUNDS["medium"] * 2, group=f"decode linear gpu {layer} M={m} bfloat16",
                  op="decode_linear", impl=impl, shape=dict(M=m, N=n, K=k), layer=layer, dtype="bfloat16")
    seconds = median_seconds(benchmark)
    if seconds:  # the weight-read floor: every weight byte once per call
        benchmark.extra_info["gbytes_per_s"] = weight.numel() * weight.element_size() / seconds / 1e9
