"""``kv_cache.generate.generate_text_simple(use_cache=True)`` against the reference's GPT-2 KV-cache code.

GPT-2 124M shape, context 1024, random weights (one seed for both models), a 4-token
prompt, ``GPTFAST_BENCH_GEN_TOKENS`` (default 200) new greedy tokens, batch 1; fp32 on
CPU, bf16 on a GPU.  Group ``kv-cache-generate``:

* ``gptfast``: ``gptfast.kv_cache.generate.generate_text_simple`` on
  ``gptfast.kv_cache.gpt2.GPTModel`` (static cache, CUDA-graph decode on a GPU);
* ``reference-cached``: the reference's ``kv_cache.gpt2.GPTModel`` called directly with
  ``use_cache=True`` and its ``KVCache`` (its own generator cannot drive it: the model
  has no ``reset_kv_cache``).  In 1.0.19 its second call fails (the causal mask is
  sliced along the key axis and does not broadcast), so this case records the error
  and skips;
* ``reference-cached-fixed-mask``: the same loop with the reference's attention
  computing what it means to (the mask's rows for the new queries), everything else
  the reference's (``torch.cat`` growing the cache, full-sequence scores);
* ``reference-uncached``: the reference's ``kv_cache.generate.generate_text_simple``
  with ``use_cache=False``.

``extra_info``: ``tokens_per_s``, ``ms_per_token`` and ``same_tokens`` (the greedy tokens
equal the reference's uncached ones).
"""

from __future__ import annotations

import types

import pytest
import torch

from bench_utils import DEVICE, DTYPE, ON_GPU, run_benchmark, same_weight_pair
from bench_utils import GEN_CONTEXT as CONTEXT
from bench_utils import GEN_NEW_TOKENS as NEW_TOKENS
from bench_utils import GEN_PROMPT as PROMPT

ROUNDS = {"gptfast": 10 if ON_GPU else 3, "reference": 3 if ON_GPU else 1}
IMPLS = ["gptfast", "reference-cached", "reference-cached-fixed-mask", "reference-uncached"]


@pytest.fixture(scope="module")
def models():
    """The reference's GPT-2 cache model and gptfast's, with the same random weights."""
    import llms_from_scratch.kv_cache.gpt2 as ref_gpt2

    from gptfast.kv_cache.gpt2 import GPTModel

    return same_weight_pair(ref_gpt2.GPTModel, GPTModel)


@pytest.fixture(scope="module")
def uncached_tokens(models):
    return _reference_uncached(models[0])


def _reference_uncached(model):
    """The reference's uncached generator; its GPT-2 embeds positions from ``current_pos``, so start at 0."""
    import llms_from_scratch.kv_cache.generate as ref_generate

    model.current_pos = 0
    return ref_generate.generate_text_simple(model, _prompt(), NEW_TOKENS, CONTEXT, use_cache=False)


def _prompt():
    return torch.tensor([PROMPT], device=DEVICE)


def _reference_cached_loop(model, idx, max_new_tokens):
    """The reference's cached greedy loop on its GPT-2, calling the model directly."""
    from llms_from_scratch.kv_cache.utils import KVCache

    model.current_pos = 0
    cache = KVCache(n_layers=len(model.trf_blocks))
    with torch.no_grad():
        logits = model(idx, use_cache=True, cache=cache)
        for _ in range(max_new_tokens):
            next_idx = logits[:, -1].argmax(dim=-1, keepdim=True)
            idx = torch.cat([idx, next_idx], dim=1)
            logits = model(next_idx, use_cache=True, cache=cache)
    return idx


def _cat_cache_attention(self, x, use_cache=False, start_pos=0, cache=None):
    """The reference attention's algorithm with the causal mask taken for the new queries' rows."""
    b, t, _ = x.shape

    def heads(y):
        return y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    queries, keys, values = heads(self.W_query(x)), heads(self.W_key(x)), heads(self.W_value(x))
    if use_cache and cache is not None:
        keys, values = torch.cat([cache[0], keys], dim=2), torch.cat([cache[1], values], dim=2)
    n_keys = keys.shape[2]
    hidden = torch.ones(n_keys, n_keys, dtype=torch.bool, device=x.device).triu(1)[-t:]
    scores = (queries @ keys.transpose(2, 3)).masked_fill(hidden, -torch.inf)
    weights = self.dropout(torch.softmax(scores / self.head_dim ** 0.5, dim=-1))
    context = (weights @ values).transpose(1, 2).reshape(b, t, self.d_out)
    return self.out_proj(context), ((keys, values) if use_cache else None)


class _fixed_mask:
    """The reference model's attention modules run :func:`_cat_cache_attention` while inside."""

    def __init__(self, model):
        self.atts = [block.att for block in model.trf_blocks]

    def __enter__(self):
        for att in self.atts:
            att.forward = types.MethodType(_cat_cache_attention, att)

    def __exit__(self, *exc):
        for att in self.atts:
            del att.forward


@pytest.mark.parametrize("impl", IMPLS)
def test_kv_cache_generate(benchmark, models, uncached_tokens, impl):
    import gptfast.kv_cache.generate as kv_generate

    ref, ours = models
    if impl == "reference-cached":
        try:
            _reference_cached_loop(ref, _prompt(), min(NEW_TOKENS, 2))
        except RuntimeError as exc:
            pytest.skip(f"the reference's cached GPT-2 fails after its first call: {exc}")
    fns = {
        "gptfast": lambda: kv_generate.generate_text_simple(ours, _prompt(), NEW_TOKENS),
        "reference-cached": lambda: _reference_cached_loop(ref, _prompt(), NEW_TOKENS),
        "reference-cached-fixed-mask": lambda: _reference_cached_loop(ref, _prompt(), NEW_TOKENS),
        "reference-uncached": lambda: _reference_uncached(ref),
    }
    result = {}

    def fn():
        result["tokens"] = fns[impl]()

    patch = _fixed_mask(ref) if impl == "reference-cached-fixed-mask" else _no_patch()
    with patch:
        run_benchmark(benchmark, fn, rounds=ROUNDS["gptfast" if impl == "gptfast" else "reference"],
                      group="kv-cache-generate", impl=impl, dtype=str(DTYPE).removeprefix("torch."), batch=1,
                      prompt_tokens=len(PROMPT), new_tokens=NEW_TOKENS, context=CONTEXT,
                      threads=torch.get_num_threads())
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["tokens_per_s"] = NEW_TOKENS / stats.stats.median
        benchmark.extra_info["ms_per_token"] = 1e3 * stats.stats.median / NEW_TOKENS
    benchmark.extra_info["same_tokens"] = bool(torch.equal(result["tokens"], uncached_tokens))


class _no_patch:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None
