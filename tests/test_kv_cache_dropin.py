"""``gptfast.kv_cache.{gpt2,utils,generate}`` and ``gptfast.generate`` against the reference's modules.

The reference's GPT-2 cache model computes a correct first (prefill) call only: a
later call slices its causal mask along the wrong axis and fails to broadcast.  So
cached calls after the first are checked against the reference's *uncached* logits
of the whole sequence, and cached generation against uncached generation.
"""

import importlib
import inspect

import numpy as np
import pytest
import torch

ref_gpt2 = pytest.importorskip("llms_from_scratch.kv_cache.gpt2", reason="llms-from-scratch is a test dependency")
import llms_from_scratch.kv_cache.generate as ref_generate  # noqa: E402
import llms_from_scratch.kv_cache.utils as ref_utils  # noqa: E402

from gptfast.generation import generate_text_simple as book_generate_text_simple  # noqa: E402
from gptfast.generate import trim_input_tensor  # noqa: E402
from gptfast.kv_cache import generate as kv_generate  # noqa: E402
from gptfast.kv_cache.gpt2 import GPTModel  # noqa: E402
from gptfast.kv_cache.utils import KVCache  # noqa: E402
from oracle_backend import torch_backend_one_thread  # noqa: E402,F401

CFG = {"vocab_size": 300, "context_length": 12, "emb_dim": 32, "n_heads": 4, "n_layers": 2, "drop_rate": 0.0,
       "qkv_bias": True}
MODULES = ["generate", "kv_cache.gpt2", "kv_cache.utils", "kv_cache.generate"]


def models(seed=0, **overrides):
    cfg = {**CFG, **overrides}
    torch.manual_seed(seed)
    ref = ref_gpt2.GPTModel(cfg).eval()
    torch.manual_seed(seed)
    return ref, GPTModel(cfg).eval()


def ids(batch, length, seed=1):
    return torch.randint(0, CFG["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- names and signatures


def _signature(obj):
    return [(p.name, p.kind, p.default) for p in inspect.signature(obj).parameters.values()]


def _public(module):
    return {name: obj for name, obj in vars(module).items()
            if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))}


@pytest.mark.parametrize("name", MODULES)
def test_every_reference_name_exists_with_the_same_parameters(name):
    ref = importlib.import_module(f"llms_from_scratch.{name}")
    ours = importlib.import_module(f"gptfast.{name}")
    members = _public(ref)
    assert members
    for member, ref_obj in members.items():
        assert hasattr(ours, member), f"gptfast.{name} lacks {member}"
        our_obj = getattr(ours, member)
        assert _signature(our_obj) == _signature(ref_obj), f"{name}.{member} signature differs"
        if inspect.isclass(ref_obj):  # and every public method the reference defines
            for method, ref_fn in vars(ref_obj).items():
                if inspect.isfunction(ref_fn) and (not method.startswith("_") or method == "__init__"):
                    assert _signature(getattr(our_obj, method)) == _signature(ref_fn), f"{member}.{method}"


def test_the_model_has_reset_kv_cache_and_the_reference_api_of_the_cache():
    _, ours = models()
    assert callable(ours.reset_kv_cache)
    cache = KVCache(3)
    assert cache and cache.get_all() == [None, None, None]
    cache.update(1, ("k", "v"))
    assert cache.get(1) == ("k", "v")
    cache.reset()
    assert cache.get_all() == [None, None, None]
    with pytest.raises(ValueError, match="n_layers"):
        KVCache(0)
    assert KVCache(np.int64(2)).get_all() == [None, None]  # a numpy count, as the reference's list takes it


# ----------------------------------------------------------------------------- numbers


def test_state_dict_keys_and_seeded_values_equal_the_reference():
    ref, ours = models(seed=5)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(ref_sd) == list(our_sd)
    assert all(torch.equal(ref_sd[k], our_sd[k]) for k in ref_sd)
    fresh = GPTModel(CFG)
    fresh.load_state_dict(ref_sd)  # strict: loads both ways
    ref.load_state_dict(fresh.state_dict())


@pytest.mark.parametrize("batch,length", [(1, 1), (2, 7), (3, 12)])
def test_uncached_and_first_cached_logits_equal_the_reference_bit_for_bit(batch, length):
    ref, ours = models()
    x = ids(batch, length)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
        ref_cached = ref(x, use_cache=True, cache=ref_utils.KVCache(CFG["n_layers"]))
        cache = KVCache(CFG["n_layers"])
        assert torch.equal(ours(x, use_cache=True, cache=cache), ref_cached)
    assert ours.current_pos == ref.current_pos == length
    assert all(entry[0].shape == (batch, CFG["n_heads"], length, 8) for entry in cache.get_all())


def test_cached_calls_continue_the_sequence_like_the_full_uncached_pass():
    ref, ours = models(seed=3)
    x = ids(2, CFG["context_length"], seed=4)
    with torch.no_grad():
        full = ref(x)
        cache = KVCache(CFG["n_layers"])
        pieces = [ours(x[:, :5], use_cache=True, cache=cache)]
        pieces += [ours(x[:, t:t + 1], use_cache=True, cache=cache) for t in range(5, 9)]
        pieces.append(ours(x[:, 9:], use_cache=True, cache=cache))  # several tokens after a cached past
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.num_tokens() == CFG["context_length"]


def test_attention_and_block_modules_take_and_return_the_books_cache_pair():
    from gptfast.kv_cache.gpt2 import MultiHeadAttention, TransformerBlock

    torch.manual_seed(0)
    ref_att = ref_gpt2.MultiHeadAttention(32, 32, 12, 0.0, 4, qkv_bias=True)
    torch.manual_seed(0)
    att = MultiHeadAttention(32, 32, 12, 0.0, 4, qkv_bias=True)
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref_out, ref_pair = ref_att(x, use_cache=True)
        out, pair = att(x, use_cache=True)
        assert torch.equal(out, ref_out) and all(torch.equal(a, b) for a, b in zip(pair, ref_pair))
        assert att(x)[1] is None
        first, past = att(x[:, :4], use_cache=True)
        rest, full_pair = att(x[:, 4:], use_cache=True, cache=past)
        torch.testing.assert_close(torch.cat([first, rest], dim=1), out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(full_pair[0], pair[0], rtol=0, atol=0)
        torch.manual_seed(0)
        block = TransformerBlock(CFG)
        torch.manual_seed(0)
        ref_block = ref_gpt2.TransformerBlock(CFG)
        (y, block_pair), (ref_y, ref_block_pair) = block(x, use_cache=True), ref_block(x, use_cache=True)
        assert torch.equal(y, ref_y) and torch.equal(block_pair[1], ref_block_pair[1])


def test_use_cache_without_a_cache_uses_one_the_model_keeps_until_reset():
    ref, ours = models(seed=2)
    x = ids(1, 8)
    with torch.no_grad():
        full = ref(x)
        first = ours(x[:, :6], use_cache=True)
        rest = ours(x[:, 6:], use_cache=True)
        torch.testing.assert_close(torch.cat([first, rest], dim=1), full, rtol=1e-5, atol=1e-5)
        ours.reset_kv_cache()
        assert ours.current_pos == 0
        uncached = ours(x)  # positions start at current_pos, as in the reference: uncached first
        assert torch.equal(ours(x, use_cache=True), uncached)


def test_a_cache_kept_under_inference_mode_serves_calls_outside_it():
    """The model-kept cache's buffers, made under ``torch.inference_mode``, are remade for a call outside it
    (the sequence goes on; after a reset a new one starts), where writing them in place would fail."""
    ref, ours = models(seed=2)
    x = ids(1, 8)
    with torch.no_grad():
        full = ref(x)
    with torch.inference_mode():
        first = ours(x[:, :6], use_cache=True)
    with torch.no_grad():
        rest = ours(x[:, 6:], use_cache=True)
        torch.testing.assert_close(torch.cat([first.clone(), rest], dim=1), full, rtol=1e-5, atol=1e-5)
        ours.reset_kv_cache()
        with torch.inference_mode():
            ours(x, use_cache=True)
        ours.reset_kv_cache()
        torch.testing.assert_close(ours(x, use_cache=True), full, rtol=1e-5, atol=1e-5)


def test_entries_handed_out_keep_their_values_after_a_reset():
    """``get`` hands out views of the cache's buffers; after ``reset()`` the next sequence writes new ones, so a
    kept entry still holds its sequence's keys, as the reference's (tensors of their own) do."""
    _, ours = models(seed=2)
    cache = KVCache(len(ours.trf_blocks))
    with torch.no_grad():
        ours(ids(1, 5, seed=1), use_cache=True, cache=cache)
        kept = cache.get(0)
        snapshot = [t.clone() for t in kept]
        cache.reset()
        ours.reset_kv_cache()
        ours(ids(1, 5, seed=2), use_cache=True, cache=cache)
    assert all(torch.equal(a, b) for a, b in zip(kept, snapshot))
    assert not torch.equal(cache.get(0)[0], snapshot[0])


def test_a_cache_filled_through_update_is_continued():
    """Entries set with ``update`` (the book's way) are taken over into the static buffers."""
    _, ours = models(seed=4)
    x = ids(2, 9)
    with torch.no_grad():
        cache = KVCache(CFG["n_layers"])
        ours(x[:, :4], use_cache=True, cache=cache)
        copied = KVCache(CFG["n_layers"])
        for i, (k, v) in enumerate(cache.get_all()):
            copied.update(i, (k.clone(), v.clone()))
        ours.current_pos = 4
        a = ours(x[:, 4:], use_cache=True, cache=copied)
        ours.current_pos = 4
        b = ours(x[:, 4:], use_cache=True, cache=cache)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_entries_assigned_into_the_cache_list_are_continued():
    """The reference's ``cache`` is a plain list: an entry set by item assignment is the one continued, as one
    set through ``update`` is (not the buffers the replaced entry lived in)."""
    _, ours = models(seed=4)
    x, y = ids(2, 9, seed=1), ids(2, 9, seed=2)
    with torch.no_grad():
        cache, other = KVCache(CFG["n_layers"]), KVCache(CFG["n_layers"])
        ours(x[:, :4], use_cache=True, cache=cache)
        ours.current_pos = 0
        ours(y[:, :4], use_cache=True, cache=other)
        for i, entry in enumerate(other.get_all()):
            cache.cache[i] = tuple(t.clone() for t in entry)
        ours.current_pos = 4
        got = ours(y[:, 4:], use_cache=True, cache=cache)
        ours.reset_kv_cache()
        want = ours(y)[:, 4:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_entries_handed_out_keep_their_values_when_a_branch_is_restored():
    """Save the entries, go on, restore them, take another branch, then restore the first branch: the
    continuation equals the uncached pass, as with the reference's entries (tensors of their own)."""
    _, ours = models(seed=0)
    prompt, a, b, c = ids(1, 5), torch.tensor([[7]]), torch.tensor([[9]]), torch.tensor([[11]])
    with torch.no_grad():
        cache = KVCache(CFG["n_layers"])
        ours(prompt, cache=cache)
        fork = list(cache.get_all())
        ours(a, cache=cache)
        branch_a = list(cache.get_all())
        for i, entry in enumerate(fork):
            cache.update(i, entry)
        ours.current_pos = 5
        ours(b, cache=cache)
        for i, entry in enumerate(branch_a):
            cache.update(i, entry)
        ours.current_pos = 6
        got = ours(c, cache=cache)[0, -1]
        ours.reset_kv_cache()
        want = ours(torch.cat([prompt, a, c], 1))[0, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_an_entry_handed_out_keeps_its_values_when_its_layer_is_cleared_and_refilled():
    _, ours = models(seed=0)
    x = ids(1, 8)
    with torch.no_grad():
        cache = KVCache(CFG["n_layers"])
        ours(x[:, :5], cache=cache)
        kept = cache.get(0)
        snapshot = [t.clone() for t in kept]
        for i in range(CFG["n_layers"]):
            cache.update(i, None)
        ours.current_pos = 0
        ours(x[:, 5:7], cache=cache)
        buffer = cache.get(0)[0].untyped_storage().data_ptr()
        ours(x[:, 7:], cache=cache)  # past what get() handed out: written in place
        assert cache.get(0)[0].untyped_storage().data_ptr() == buffer
    assert all(torch.equal(t, want) for t, want in zip(kept, snapshot))


def test_cached_forward_keeps_gradients():
    _, ours = models(seed=6)
    ours.train()
    x = ids(1, 6)
    cache = KVCache(CFG["n_layers"])
    logits = torch.cat([ours(x[:, :4], use_cache=True, cache=cache), ours(x[:, 4:], use_cache=True, cache=cache)],
                       dim=1)
    logits.sum().backward()
    grad = ours.trf_blocks[0].att.W_key.weight.grad
    assert grad is not None and grad.abs().sum() > 0


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("prompt_len,new_tokens,context_size", [
    (3, 5, None),       # within the context
    (4, 20, None),      # 24 tokens: past the 12-position context window
    (15, 6, None),      # the prompt alone is longer than the context
    (5, 10, 6),         # a context_size smaller than the model's
])
def test_cached_greedy_equals_uncached_token_for_token(prompt_len, new_tokens, context_size):
    ref, ours = models(seed=7)
    x = ids(2, prompt_len, seed=8)
    cached = kv_generate.generate_text_simple(ours, x, new_tokens, context_size=context_size)
    uncached = kv_generate.generate_text_simple(ours, x, new_tokens, context_size=context_size, use_cache=False)
    assert cached.shape == (2, prompt_len + new_tokens)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :prompt_len], x)
    # The reference's own uncached loop on the reference model gives the same tokens (its GPT-2 has no
    # cfg for the generator to read the context length from: pass it).
    ref_context = context_size or CFG["context_length"]
    assert torch.equal(ref_generate.generate_text_simple(ref, x, new_tokens, ref_context, use_cache=False),
                       cached)
    streamed = list(kv_generate.generate_text_simple_stream(ours, x, new_tokens, context_size=context_size))
    assert torch.equal(torch.cat(streamed, dim=1), cached[:, prompt_len:])


def test_generation_equals_the_book_generator_and_runs_twice_on_one_model():
    _, ours = models(seed=9)
    x = ids(1, 5)
    first = kv_generate.generate_text_simple(ours, x, 9)
    assert torch.equal(first, book_generate_text_simple(ours, x, 9, CFG["context_length"]))
    ours.train()
    assert torch.equal(kv_generate.generate_text_simple(ours, x, 9), first)
    assert not ours.training  # the generator puts the model in eval mode, as the reference does


def test_stream_stops_before_the_step_where_every_row_is_eos():
    _, ours = models(seed=10)
    x = ids(1, 4)
    tokens = kv_generate.generate_text_simple(ours, x, 8)[0, 4:].tolist()
    eos = tokens[3]
    streamed = [int(t) for t in kv_generate.generate_text_simple_stream(ours, x, 8, eos_token_id=eos)]
    assert streamed == tokens[:tokens.index(eos)]


def test_the_reference_generator_drives_the_model_too():
    """The book's generator calls model(ids, cache=cache) without use_cache: the cache is used."""
    ref, ours = models(seed=13)
    x = ids(2, 4)
    expected = kv_generate.generate_text_simple(ours, x, 7, use_cache=False)
    assert torch.equal(ref_generate.generate_text_simple(ours, x, 7), expected)
    streamed = list(ref_generate.generate_text_simple_stream(ours, x, 7))
    assert torch.equal(torch.cat(streamed, dim=1), expected[:, 4:])
    with torch.no_grad():  # and a first call with a cache gives the reference's uncached numbers
        ours.reset_kv_cache()
        assert torch.equal(ours(x, cache=KVCache(CFG["n_layers"])), ref(x))


def test_the_reference_protocol_drives_other_cache_models():
    """A model outside the book's GPT layout is driven by reset_kv_cache and model(ids, cache=...)."""
    _, inner = models(seed=11)

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.cfg, self.resets = inner, dict(CFG), 0

        def reset_kv_cache(self):
            self.resets += 1
            self.inner.reset_kv_cache()

        def forward(self, in_idx, cache=None):
            return self.inner(in_idx, use_cache=cache is not None, cache=cache)

    model = Wrapped()
    x = ids(2, 4)
    out = kv_generate.generate_text_simple(model, x, 6)
    assert model.resets == 1
    assert torch.equal(out, kv_generate.generate_text_simple(inner, x, 6))


# ----------------------------------------------------------------------------- bad input


def _snapshot(cache):
    return [None if e is None else (e[0].clone(), e[1].clone()) for e in cache.get_all()]


def test_a_sequence_outgrowing_the_cache_is_refused_and_the_cache_stays_intact():
    _, ours = models(seed=12)
    x = ids(2, CFG["context_length"] + 3)
    cache = KVCache(CFG["n_layers"])
    with torch.no_grad():
        ours(x[:, :10], use_cache=True, cache=cache)
        before = _snapshot(cache)
        with pytest.raises(ValueError, match="context length|outgrow"):
            ours(x[:, 10:13], use_cache=True, cache=cache)
        assert ours.current_pos == 10
        after = _snapshot(cache)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(before, after))
        # The cache still works: the two tokens that fit continue the sequence correctly.
        tail = ours(x[:, 10:12], use_cache=True, cache=cache)
        ours.reset_kv_cache()
        torch.testing.assert_close(tail, ours(x[:, :12])[:, 10:], rtol=1e-5, atol=1e-5)


def test_a_prompt_longer_than_the_cache_is_refused_on_a_fresh_cache():
    _, ours = models()
    cache = KVCache(CFG["n_layers"])
    with pytest.raises(ValueError, match="context length|outgrow"):
        ours(ids(1, CFG["context_length"] + 1), use_cache=True, cache=cache)
    assert cache.get_all() == [None] * CFG["n_layers"] and ours.current_pos == 0


def test_a_cache_that_outgrows_after_a_position_reset_is_refused():
    """Resetting the model's position but not the cache: the cache itself is full."""
    _, ours = models()
    cache = KVCache(CFG["n_layers"])
    with torch.no_grad():
        ours(ids(1, 10), use_cache=True, cache=cache)
        ours.reset_kv_cache()
        with pytest.raises(ValueError, match="outgrow"):
            ours(ids(1, 4), use_cache=True, cache=cache)
    assert cache.num_tokens() == 10


def test_mismatched_cache_rows_and_layers_are_refused():
    _, ours = models()
    cache = KVCache(CFG["n_layers"])
    with torch.no_grad():
        ours(ids(2, 3), use_cache=True, cache=cache)
        with pytest.raises(ValueError, match="rows"):
            ours(ids(3, 1), use_cache=True, cache=cache)
        with pytest.raises(ValueError, match="layers"):
            ours(ids(2, 1), use_cache=True, cache=KVCache(CFG["n_layers"] + 1))


@pytest.mark.parametrize("call", ["cached", "uncached", "stream"])
def test_a_negative_token_count_is_an_error_on_every_path(call):
    _, ours = models()
    run = {"cached": lambda: kv_generate.generate_text_simple(ours, ids(1, 4), -1),
           "uncached": lambda: kv_generate.generate_text_simple(ours, ids(1, 4), -1, use_cache=False),
           "stream": lambda: kv_generate.generate_text_simple_stream(ours, ids(1, 4), -1)}[call]
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        run()


def test_generation_with_a_context_size_past_the_model_is_refused():
    _, ours = models()
    with pytest.raises(ValueError, match="context_size"):
        kv_generate.generate_text_simple(ours, ids(1, 4), 20, context_size=CFG["context_length"] + 1)


# ----------------------------------------------------------------------------- trim_input_tensor


@pytest.mark.parametrize("length,context_len,max_new", [(10, 8, 3), (4, 8, 3), (5, 8, 3), (9, 8, 7)])
def test_trim_input_tensor_matches_the_reference(length, context_len, max_new):
    ref = importlib.import_module("llms_from_scratch.generate")
    x = ids(2, length)
    assert torch.equal(trim_input_tensor(x, context_len, max_new), ref.trim_input_tensor(x, context_len, max_new))


def test_trim_input_tensor_refuses_max_new_tokens_not_below_the_context():
    with pytest.raises(ValueError, match="max_new_tokens"):
        trim_input_tensor(ids(1, 5), 8, 8)
    with pytest.raises(TypeError, match="context_len"):
        trim_input_tensor(ids(1, 5), 8.0, 2)


def test_gptfast_generate_is_the_drop_in_module_whichever_import_comes_first():
    import subprocess
    import sys

    # The package must not also bind a function to the name, which the submodule import would replace.
    code = ("import gptfast, types; assert not hasattr(gptfast, 'generate') or isinstance(gptfast.generate, "
            "types.ModuleType); from gptfast import generate; assert hasattr(generate, 'trim_input_tensor'); "
            "import gptfast.generate as g; assert g is generate")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- the user's modules in cached calls


def _two_cached_calls(model, x, cache):
    return torch.cat([model(x[:, :4], use_cache=True, cache=cache), model(x[:, 4:], use_cache=True, cache=cache)],
                     dim=1)


@pytest.mark.parametrize("change", ["LoRA", "hook on a block"])
def test_cached_calls_run_what_the_models_own_blocks_run(change):
    from gptfast import appendix_e
    from llms_from_scratch import appendix_e as ref_appendix_e

    ref, ours = models(seed=6)
    x = ids(2, 7)
    for model, wrap in ((ref, ref_appendix_e.replace_linear_with_lora), (ours, appendix_e.replace_linear_with_lora)):
        if change == "LoRA":
            torch.manual_seed(2)
            wrap(model, rank=2, alpha=4)
            for module in model.modules():
                if hasattr(module, "B") and isinstance(module.B, torch.nn.Parameter):
                    torch.nn.init.normal_(module.B)
        else:
            model.trf_blocks[0].register_forward_hook(lambda module, args, out: (out[0] * 0.5, out[1]))
    expected = ref(x)  # the reference's uncached logits (its own cached attention fails after one call)
    with torch.no_grad():
        torch.testing.assert_close(_two_cached_calls(ours, x, KVCache(CFG["n_layers"])), expected,
                                   atol=1e-5, rtol=1e-5)
        ours.reset_kv_cache()
        torch.testing.assert_close(_two_cached_calls(ours, x, ref_utils.KVCache(CFG["n_layers"])), expected,
                                   atol=1e-5, rtol=1e-5)


def test_cached_gradients_are_the_uncached_ones_bitwise_with_the_torch_backend():
    _, ours = models(seed=6)
    ours.train()
    x = ids(2, 7)
    grads = []
    for cached in (False, True):
        ours.zero_grad(set_to_none=True)
        ours.reset_kv_cache()
        logits = ours(x[:, :5], use_cache=cached, cache=KVCache(CFG["n_layers"]) if cached else None)
        logits.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters()})
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_an_earlier_cached_call_keeps_its_backward_when_only_the_queries_need_gradients():
    _, ours = models(seed=6)
    for name, p in ours.named_parameters():
        p.requires_grad_(name == "trf_blocks.0.att.W_query.weight")
    x = ids(1, 8)
    cache = KVCache(CFG["n_layers"])
    ours(x[:, :5], use_cache=True, cache=cache)
    second = ours(x[:, 5:6], use_cache=True, cache=cache).sum()
    ours(x[:, 6:7], use_cache=True, cache=cache)
    second.backward()  # the third call must not have written over keys the second call's backward reads
    assert ours.trf_blocks[0].att.W_query.weight.grad.abs().sum() > 0


def test_cached_attention_dropout_follows_its_own_module_mode():
    """``model.train()`` then every ``nn.Dropout`` in eval mode: cached calls are deterministic, as uncached ones."""
    _, ours = models(seed=6, drop_rate=0.5)
    ours.train()
    for module in ours.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    x = ids(2, 5)
    with torch.no_grad():
        expected = ours(x)
        ours.reset_kv_cache()
        torch.testing.assert_close(ours(x, use_cache=True, cache=KVCache(CFG["n_layers"])), expected)
