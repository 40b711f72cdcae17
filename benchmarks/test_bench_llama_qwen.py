"""Qwen3 KV-cache generation: gptfast's drop-ins against ``llms_from_scratch`` in the same run.

Qwen3-0.6B shape (``QWEN_CONFIG_06_B``: 28 layers, 1024 wide, 16 query / 8 key-value
heads of 128, vocabulary 151936) with random weights, CPU, fp32 and bf16 (the model
built with ``dtype`` in its config, as the reference's own bf16 setup: RMSNorm scales and
RoPE tables stay fp32), a 16-token prompt, ``NEW_TOKENS`` (128) greedy new tokens:

* ``qwen3-b1-<dtype>``: batch 1, ``kv_cache.generate.generate_text_simple`` on
  ``kv_cache.qwen3.Qwen3Model``: the reference's against gptfast's;
* ``qwen3-b4-<dtype>`` and ``qwen3-b8-<dtype>``: batch 4 and 8, ``kv_cache_batched.generate.generate_text_simple``
  on ``kv_cache_batched.qwen3.Qwen3Model``: the reference's against gptfast's.  Where the CPU kernels
  multiply that many bf16 rows natively (AVX512-BF16 dot products up to 4 rows, AMX tile products up to 16),
  a third variant runs gptfast with those rows on torch's own bf16 product instead (``gptfast, 16-bit rows on
  torch``): the native path's gain, same run.

All four models of one dtype share one set of weight tensors (same values, one copy in
memory).  The two implementations run in turn, round after round, so load on a shared
machine hits both alike; ``extra_info`` has per-implementation medians,
``speedup_vs_reference``, ``tokens_per_s`` (new tokens of all rows per second),
``gb_per_s`` (the weight-read floor, as gpt-fast reports it: bytes of the weights one
step reads, all parameters but the token embedding, times the steps, over the time) and
``same_tokens`` (gptfast's tokens equal the reference's; in bf16 random weights give
exactly tied top logits now and then, 2.5625 twice for the first token of this prompt, and a
tie goes either way under the fused attention's rounding: with backend ``torch`` the
logits are bitwise the reference's, see the tests).

``GPTFAST_BENCH_LLAMA_QWEN_TINY=1`` shrinks everything (2 layers, 64 wide, 8 new tokens,
one round) to check that the file runs; its numbers mean nothing.
"""

from __future__ import annotations

import os

import pytest
import torch

from bench_utils import ON_GPU, run_interleaved

TINY = os.environ.get("GPTFAST_BENCH_LLAMA_QWEN_TINY") == "1"
NEW_TOKENS = 8 if TINY else 128
PROMPT_TOKENS = 16
ROUNDS = 1 if TINY else 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
pytestmark = pytest.mark.skipif(ON_GPU, reason="CPU shapes")


def _config(dtype):
    from gptfast.qwen3 import QWEN_CONFIG_06_B

    if TINY:
        return {"vocab_size": 1000, "context_length": 256, "emb_dim": 64, "n_heads": 4, "n_layers": 2,
                "hidden_dim": 128, "head_dim": 16, "qk_norm": True, "n_kv_groups": 2, "rope_base": 1_000_000.0,
                "dtype": dtype}
    return {**QWEN_CONFIG_06_B, "dtype": dtype}


def _on_meta(cls, cfg):
    """``cls(cfg)`` without memory for its parameters (they are assigned shared tensors next)."""
    with torch.device("meta"):
        return cls(cfg)


def _share(model, weights, source):
    """Give ``model`` the tensors of ``weights`` (a state dict) and ``source``'s RoPE tables; eval mode."""
    model.load_state_dict(weights, assign=True, strict=True)
    model.cos, model.sin = source.cos, source.sin
    return model.eval()


@pytest.fixture(scope="module", params=list(DTYPES))
def models(request):
    """The four Qwen3 models of one dtype (reference and gptfast, KV-cache and batched), one set of weights."""
    import llms_from_scratch.kv_cache.qwen3 as ref_kv
    import llms_from_scratch.kv_cache_batched.qwen3 as ref_batched

    import gptfast.kv_cache.qwen3 as kv
    import gptfast.kv_cache_batched.qwen3 as batched

    cfg = _config(DTYPES[request.param])
    torch.manual_seed(123)
    base = ref_kv.Qwen3Model(cfg).eval()
    weights = base.state_dict()
    out = {"dtype": request.param, "cfg": cfg, "b1": {"reference": base}, "b8": {}}
    out["b1"]["gptfast"] = _share(_on_meta(kv.Qwen3Model, cfg), weights, base)
    out["b8"]["reference"] = _share(_on_meta(ref_batched.Qwen3Model, cfg), weights, base)
    out["b8"]["gptfast"] = _share(_on_meta(batched.Qwen3Model, cfg), weights, base)
    # Bytes one decode step reads: every weight but the token embedding (a lookup of one row per token).
    out["weight_bytes"] = sum(t.numel() * t.element_size() for k, t in weights.items() if not k.startswith("tok_emb"))
    return out


def _generators(batch):
    import llms_from_scratch.kv_cache.generate as ref_kv_generate
    import llms_from_scratch.kv_cache_batched.generate as ref_batched_generate

    import gptfast.kv_cache.generate as kv_generate
    import gptfast.kv_cache_batched.generate as batched_generate

    if batch == 1:
        return {"reference": ref_kv_generate.generate_text_simple, "gptfast": kv_generate.generate_text_simple}
    return {"reference": ref_batched_generate.generate_text_simple, "gptfast": batched_generate.generate_text_simple}


TORCH_16_BIT = "gptfast, 16-bit rows on torch"


def _without_native_bf16_rows(fn):
    """``fn`` with the decode routing told the CPU kernels multiply no bf16 rows natively (torch's product takes
    them)."""
    from gptfast.generation import runner

    def run():
        real = runner.kernel_bf16_native_rows
        runner.kernel_bf16_native_rows = lambda: 0
        try:
            return fn()
        finally:
            runner.kernel_bf16_native_rows = real

    return run


@pytest.mark.parametrize("batch", [1, 4, 8], ids=["b1", "b4", "b8"])
def test_qwen3_generate(benchmark, models, batch):
    from gptfast.generation import runner

    cfg = models["cfg"]
    generators = _generators(batch)
    pair = models["b1" if batch == 1 else "b8"]
    idx = torch.randint(0, cfg["vocab_size"], (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    tokens = {}

    def step(impl):
        return lambda: tokens.__setitem__(impl, generators[impl](pair[impl], idx, NEW_TOKENS))

    steps = {impl: step(impl) for impl in generators}
    if models["dtype"] == "bf16" and 2 <= batch <= runner.kernel_bf16_native_rows():
        steps[TORCH_16_BIT] = _without_native_bf16_rows(
            lambda: tokens.__setitem__(TORCH_16_BIT, generators["gptfast"](pair["gptfast"], idx, NEW_TOKENS)))
    medians = run_interleaved(
        benchmark, steps, rounds=ROUNDS, group=f"qwen3-b{batch}-{models['dtype']}",
        impl="reference and gptfast, interleaved", dtype=models["dtype"], batch=batch, prompt_tokens=PROMPT_TOKENS,
        new_tokens=NEW_TOKENS, threads=torch.get_num_threads(),
        model="tiny (2 layers, 64 wide)" if TINY else "Qwen3-0.6B shape, random weights")
    info = benchmark.extra_info
    info["tokens_per_s"] = {impl: batch * NEW_TOKENS / m for impl, m in medians.items()}
    info["weight_bytes"] = models["weight_bytes"]
    info["gb_per_s"] = {impl: models["weight_bytes"] * NEW_TOKENS / m / 1e9 for impl, m in medians.items()}
    info["same_tokens"] = bool(torch.equal(tokens["gptfast"], tokens["reference"]))
    assert tokens["gptfast"].shape == (batch, PROMPT_TOKENS + NEW_TOKENS)
