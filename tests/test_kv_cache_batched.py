"""gptfast.kv_cache_batched.{qwen3,generate,utils} against ``llms_from_scratch.kv_cache_batched``."""

import inspect
import itertools

import pytest
import torch

from gptfast import ops
from hf_checkpoints import random_hf_state_dict

ref_qwen = pytest.importorskip("llms_from_scratch.kv_cache_batched.qwen3",
                               reason="llms-from-scratch is a test dependency")
import llms_from_scratch.kv_cache_batched.generate as ref_generate  # noqa: E402
import llms_from_scratch.kv_cache_batched.utils as ref_utils  # noqa: E402

import gptfast.kv_cache_batched.generate as generate  # noqa: E402
import gptfast.kv_cache_batched.qwen3 as qwen  # noqa: E402
import gptfast.kv_cache_batched.utils as utils  # noqa: E402
import gptfast.models.qwen3 as qwen_plain  # noqa: E402

RATIOS = [pytest.param(4, id="ratio1"), pytest.param(2, id="ratio2"), pytest.param(1, id="ratio4")]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def qwen_cfg(n_kv_groups=2, qk_norm=True, dtype=torch.float32, context_length=32):
    return {"vocab_size": 101, "context_length": context_length, "emb_dim": 32, "hidden_dim": 40, "n_layers": 2,
            "n_heads": 4, "head_dim": 8, "n_kv_groups": n_kv_groups, "qk_norm": qk_norm, "dtype": dtype,
            "rope_base": 1_000_000.0}


def pair(cfg, seed=123):
    torch.manual_seed(seed)
    r = ref_qwen.Qwen3Model(cfg)
    torch.manual_seed(seed)
    o = qwen.Qwen3Model(cfg)
    return r.eval(), o.eval()


def _signature(obj):
    return [(p.name, p.kind, p.default) for p in inspect.signature(obj).parameters.values()]


# ----------------------------------------------------------------------------- names, signatures, parameters


@pytest.mark.parametrize("ref,ours", [(ref_qwen, qwen), (ref_generate, generate), (ref_utils, utils)],
                         ids=["qwen3", "generate", "utils"])
def test_every_public_name_of_the_reference_exists_with_the_same_signature(ref, ours):
    names = [n for n, o in vars(ref).items() if not n.startswith("_") and (inspect.isclass(o) or inspect.isfunction(o))
             and getattr(o, "__module__", "").startswith("llms_from_scratch")]
    assert names
    for name in names:
        obj = getattr(ref, name)
        assert hasattr(ours, name), f"{ours.__name__} lacks {name}"
        assert _signature(getattr(ours, name)) == _signature(obj), f"{name} signature differs"
        if inspect.isclass(obj):
            for method in [m for m in vars(obj) if not m.startswith("_")] + ["forward"]:
                if inspect.isfunction(getattr(obj, method, None)):
                    assert _signature(getattr(getattr(ours, name), method)) == _signature(getattr(obj, method)), \
                        f"{name}.{method} signature differs"
    configs = [n for n in vars(ref) if "CONFIG" in n]
    assert all(getattr(ours, n) == getattr(ref, n) for n in configs)


@pytest.mark.parametrize("qk_norm", [True, False], ids=["qknorm", "no-qknorm"])
def test_same_parameters_and_state_dict_keys_under_the_same_seed(qk_norm):
    r, o = pair(qwen_cfg(2, qk_norm))
    ref_sd, our_sd = r.state_dict(), o.state_dict()
    assert list(our_sd) == list(ref_sd)
    assert all(torch.equal(our_sd[k], ref_sd[k]) and our_sd[k].dtype == ref_sd[k].dtype for k in ref_sd)
    # One checkpoint serves the batched and the plain model.
    qwen_plain.Qwen3Model(qwen_cfg(2, qk_norm)).load_state_dict(our_sd, strict=True)


def test_the_hugging_face_loader_fills_the_batched_model_like_the_reference():
    r, o = pair(qwen_cfg(2))
    params = random_hf_state_dict(o, seed=5)
    ref_qwen.load_weights_into_qwen(r, {"n_layers": 2}, params)
    qwen.load_weights_into_qwen(o, {"n_layers": 2}, params)
    for (k, a), b in zip(o.state_dict().items(), r.state_dict().values()):
        assert torch.equal(a, b), k


# ----------------------------------------------------------------------------- logits


def _stepwise(model, cache, prompt, chunks):
    """Prefill ``prompt`` at the model's positions, then feed each chunk (B rows of new tokens)."""
    model.reset_kv_cache(prompt.shape[0])
    outs = []
    for ids in [prompt] + chunks:
        outs.append(model(ids, cache=cache, start_pos=model.current_pos.clone()))
        model.current_pos += ids.shape[1]
    outs.append(model(prompt, cache=None))
    return outs


def _chunks(batch):
    return [torch.randint(0, 101, (batch, 1)), torch.randint(0, 101, (batch, 3)), torch.randint(0, 101, (batch, 1))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [True, False], ids=["qknorm", "no-qknorm"])
@pytest.mark.parametrize("n_kv_groups", RATIOS)
def test_cached_steps_are_bitwise_the_references_with_the_torch_backend(n_kv_groups, qk_norm, dtype):
    cfg = qwen_cfg(n_kv_groups, qk_norm, dtype)
    r, o = pair(cfg)
    prompt, chunks = torch.randint(0, 101, (3, 7)), _chunks(3)
    with torch.no_grad(), ops.use_backend("torch"):
        expected = _stepwise(r, ref_utils.KVCache(2, 3), prompt, chunks)
        got = _stepwise(o, utils.KVCache(2, 3), prompt, chunks)
        # our model driven with the reference's own cache object (the row-list path)
        got_ref_cache = _stepwise(o, ref_utils.KVCache(2, 3), prompt, chunks)
    assert torch.equal(o.current_pos, r.current_pos)
    for step, (a, b, c) in enumerate(zip(got, expected, got_ref_cache)):
        assert a.dtype == b.dtype == c.dtype and torch.equal(a, b) and torch.equal(c, b), f"step {step} differs"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_kv_groups", RATIOS)
def test_cached_steps_match_the_reference_with_the_default_backend(n_kv_groups, dtype):
    cfg = qwen_cfg(n_kv_groups, True, dtype)
    r, o = pair(cfg)
    prompt, chunks = torch.randint(0, 101, (2, 6)), _chunks(2)
    with torch.no_grad():
        with ops.use_backend("torch"):
            expected = _stepwise(r, ref_utils.KVCache(2, 2), prompt, chunks)
        got = _stepwise(o, utils.KVCache(2, 2), prompt, chunks)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.float(), b.float(), **tol)


def test_rows_at_different_positions_each_get_their_single_row_logits():
    """The reference needs every row at one position; here each row may sit at its own (keys past it masked)."""
    _, o = pair(qwen_cfg(2))
    prompts = [torch.randint(0, 101, (1, n)) for n in (3, 7, 5)]
    step = torch.randint(0, 101, (3, 1))
    with torch.no_grad():
        singles = []
        for b, p in enumerate(prompts):
            cache = utils.KVCache(2, 1)
            o(p, cache=cache, start_pos=torch.tensor([0]))
            singles.append(o(step[b:b + 1], cache=cache, start_pos=torch.tensor([p.shape[1]])))
        cache = utils.KVCache(2, 3)
        for b, p in enumerate(prompts):  # fill each row through the reference's API, as a caller may
            row_cache = utils.KVCache(2, 1)
            o(p, cache=row_cache, start_pos=torch.tensor([0]))
            for layer in range(2):
                cache.update(layer, b, row_cache.get(layer, 0))
        assert cache.row_lengths(0) == [3, 7, 5]
        batched = o(step, cache=cache, start_pos=torch.tensor([3, 7, 5]))
    assert cache.row_lengths(1) == [4, 8, 6]
    for b in range(3):
        torch.testing.assert_close(batched[b:b + 1], singles[b], atol=1e-5, rtol=1e-5)
        k_single = cache.get(0, b)[0]
        assert k_single.shape == (1, 2, [4, 8, 6][b], 8)


def test_apply_rope_with_per_row_offsets_is_bitwise_the_references():
    cos, sin = ref_qwen.compute_rope_params(16, 10_000, 20)
    x = torch.randn(3, 2, 4, 16)
    offset = torch.tensor([0, 5, 16])
    assert torch.equal(qwen.apply_rope(x, cos, sin, offset), ref_qwen.apply_rope(x, cos, sin, offset))
    with pytest.raises(ValueError, match="row 2: positions 17..20 lie outside the model's 20 positions"):
        qwen.apply_rope(x, cos, sin, torch.tensor([0, 5, 17]))  # the reference clamps to position 19
    with pytest.raises(ValueError, match="one position per row"):
        qwen.apply_rope(x, cos, sin, torch.tensor([0, 5]))


# ----------------------------------------------------------------------------- the cache API


def test_kv_cache_has_the_references_interface():
    ours, theirs = utils.KVCache(n_layers=2, batch_size=3), ref_utils.KVCache(n_layers=2, batch_size=3)
    pair_kv = (torch.ones(1, 2, 4, 8), torch.zeros(1, 2, 4, 8))
    for cache in (ours, theirs):
        cache.update(1, 2, pair_kv)
    assert ours.get_layer(1) == theirs.get_layer(1) and ours.get(1, 2) is pair_kv
    assert ours.get(0, 0) is None and ours.cache[1][2] is pair_kv and len(ours.cache) == 2
    # .cache is the reference's writable list of lists: item assignment, of an entry or of a whole layer, updates
    other = (torch.full((1, 2, 3, 8), 2.0), torch.full((1, 2, 3, 8), 3.0))
    for cache in (ours, theirs):
        cache.cache[0][-1] = other
        cache.cache[1] = [other, None, None]
    for layer, row in itertools.product(range(2), range(3)):
        assert ours.get(layer, row) is theirs.get(layer, row), (layer, row)
    assert ours.cache == theirs.cache and list(ours.cache[0]) == theirs.cache[0] and len(ours.cache[1]) == 3
    with pytest.raises(ValueError, match="holds 3 rows"):
        ours.cache[0] = [None]
    ours.reset()
    assert ours.cache == [[None] * 3, [None] * 3]
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="batch_size"):
            utils.KVCache(2, bad)
        with pytest.raises(ValueError, match="n_layers"):
            utils.KVCache(bad, 2)


def test_the_cache_grows_without_copying_each_step_and_keeps_its_contents():
    _, o = pair(qwen_cfg(2, context_length=200))
    cache = utils.KVCache(2, 2)
    o.reset_kv_cache(2)
    with torch.no_grad():
        for t in range(70):  # past the first buffer size (64 positions): the buffer doubles once
            o(torch.full((2, 1), t % 100), cache=cache, start_pos=o.current_pos)
            o.current_pos += 1
            if t == 10:
                buffer_at_10 = cache.get(0, 0)[0].untyped_storage().data_ptr()
            if t == 50:
                assert cache.get(0, 0)[0].untyped_storage().data_ptr() == buffer_at_10
        keys = cache.get(1, 1)[0].clone()
        # a negative row counts from the end, as in the reference's lists
        assert all(torch.equal(a, b) for a, b in zip(cache.get(1, -1), cache.get(1, 1)))
        with pytest.raises(IndexError):
            cache.get(1, -3)
        plain = qwen_plain.Qwen3Model(qwen_cfg(2, context_length=200)).eval()
        plain.load_state_dict(o.state_dict())
        full = plain(torch.arange(70).remainder(100).unsqueeze(0).expand(2, 70))
    assert keys.shape == (1, 2, 70, 8) and cache.row_lengths(1) == [70, 70]
    assert torch.isfinite(keys).all()
    # the last step's logits equal the plain model's last position
    with torch.no_grad():
        o2 = o(torch.full((2, 1), 70), cache=cache, start_pos=o.current_pos)
        full2 = plain(torch.arange(71).remainder(100).unsqueeze(0).expand(2, 71))
    torch.testing.assert_close(o2[:, -1], full2[:, -1], atol=1e-4, rtol=1e-4)
    assert full.shape == (2, 70, 101)


def test_entries_handed_out_keep_their_values_after_a_reset():
    _, o = pair(qwen_cfg(2))
    cache = utils.KVCache(2, 2)
    with torch.no_grad():
        o.reset_kv_cache(2)
        o(torch.tensor([[1, 2, 3], [4, 5, 6]]), cache=cache, start_pos=o.current_pos.clone())
        kept = cache.get(1, 0)
        snapshot = [t.clone() for t in kept]
        cache.reset()
        o.reset_kv_cache(2)
        o(torch.tensor([[7, 8, 9], [10, 11, 12]]), cache=cache, start_pos=o.current_pos.clone())
    assert all(torch.equal(a, b) for a, b in zip(kept, snapshot))
    assert not torch.equal(cache.get(1, 0)[0], snapshot[0])


def test_a_cache_filled_under_inference_mode_goes_on_outside_it():
    """Buffers made under ``torch.inference_mode`` cannot be written outside it: the cache remakes them (its
    entries copied over), as the reference's concatenated entries simply work there."""
    r, o = pair(qwen_cfg(2))
    x = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]])
    results = {}
    for name, model, cache in (("reference", r, ref_utils.KVCache(2, 2)), ("gptfast", o, utils.KVCache(2, 2))):
        model.reset_kv_cache(2)
        with torch.inference_mode(), ops.use_backend("torch"):
            first = model(x[:, :4], cache=cache, start_pos=model.current_pos.clone())
        model.current_pos += 4
        with torch.no_grad(), ops.use_backend("torch"):
            rest = model(x[:, 4:], cache=cache, start_pos=model.current_pos.clone())  # continues the sequence
        cache.reset()
        model.reset_kv_cache(2)
        with torch.no_grad(), ops.use_backend("torch"):
            again = model(x[:, :4], cache=cache, start_pos=model.current_pos.clone())  # a new sequence
        results[name] = (first, rest, again)
    for got, want in zip(results["gptfast"], results["reference"]):
        assert torch.equal(got, want)


def test_a_backward_through_two_cached_calls_gives_the_references_gradients():
    """The second call's keys follow the first's in the cache; the first call's backward still reads its own."""
    r, o = pair(qwen_cfg(2))
    x = torch.randint(0, 101, (2, 6))
    grads = {}
    for name, model, cache in (("reference", r, ref_utils.KVCache(2, 2)), ("gptfast", o, utils.KVCache(2, 2))):
        model.reset_kv_cache(2)
        first = model(x, cache=cache, start_pos=model.current_pos.clone())
        model.current_pos += 6
        second = model(x[:, :1], cache=cache, start_pos=model.current_pos.clone())
        (first.sum() + second.sum()).backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters()}
    for n, want in grads["reference"].items():
        torch.testing.assert_close(grads["gptfast"][n], want, atol=1e-4, rtol=1e-4, msg=n)


def test_an_earlier_cached_call_keeps_its_backward_when_only_the_queries_need_gradients():
    _, o = pair(qwen_cfg(2))
    for name, p in o.named_parameters():
        p.requires_grad_(name == "trf_blocks.0.att.W_query.weight")
    x = torch.randint(0, 101, (2, 8))
    cache = utils.KVCache(2, 2)
    o(x[:, :5], cache=cache, start_pos=torch.tensor([0, 0]))
    second = o(x[:, 5:6], cache=cache, start_pos=torch.tensor([5, 5])).sum()
    o(x[:, 6:7], cache=cache, start_pos=torch.tensor([6, 6]))
    second.backward()  # the third call must not have written over keys the second call's backward reads
    assert o.trf_blocks[0].att.W_query.weight.grad.abs().sum() > 0


def test_entries_handed_out_keep_their_values_when_a_branch_is_restored():
    """Save the entries, go on, restore them, take another branch, then restore the first branch: the
    continuation equals the uncached pass, as with the reference's entries (tensors of their own)."""
    _, o = pair(qwen_cfg(2, context_length=16))
    prompt, a, b, c = torch.randint(0, 101, (1, 5)), torch.tensor([[7]]), torch.tensor([[9]]), torch.tensor([[11]])
    with torch.no_grad():
        cache = utils.KVCache(2, 1)
        o(prompt, cache=cache, start_pos=torch.tensor([0]))
        fork = [cache.get(i, 0) for i in range(2)]
        o(a, cache=cache, start_pos=torch.tensor([5]))
        branch_a = [cache.get(i, 0) for i in range(2)]
        for i, entry in enumerate(fork):
            cache.update(i, 0, entry)
        o(b, cache=cache, start_pos=torch.tensor([5]))
        for i, entry in enumerate(branch_a):
            cache.update(i, 0, entry)
        got = o(c, cache=cache, start_pos=torch.tensor([6]))[0, -1]
        want = o(torch.cat([prompt, a, c], 1))[0, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_an_entry_handed_out_keeps_its_values_when_its_row_is_cleared_and_refilled():
    _, o = pair(qwen_cfg(2))
    x = torch.randint(0, 101, (2, 6))
    with torch.no_grad():
        cache = utils.KVCache(2, 2)
        o(x[:, :5], cache=cache, start_pos=torch.tensor([0, 0]))
        kept = cache.get(1, 0)
        snapshot = [t.clone() for t in kept]
        for layer in range(2):
            cache.update(layer, 0, None)
        o(x[:, 5:], cache=cache, start_pos=torch.tensor([0, 5]))  # row 0 starts again at position 0
        assert cache.row_lengths(1) == [1, 6]
        buffer = cache.get(1, 1)[0].untyped_storage().data_ptr()
        o(x[:, :1], cache=cache, start_pos=torch.tensor([1, 6]))  # past what get() handed out: written in place
        assert cache.get(1, 1)[0].untyped_storage().data_ptr() == buffer
    assert all(torch.equal(t, want) for t, want in zip(kept, snapshot))


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("qk_norm,n_kv_groups", [(True, 4), (False, 2), (True, 1)], ids=["ratio1", "ratio2", "ratio4"])
def test_generate_gives_the_references_tokens(qk_norm, n_kv_groups):
    cfg = qwen_cfg(n_kv_groups, qk_norm)
    r, o = pair(cfg)
    idx = torch.randint(0, 101, (4, 6))
    # context_size 10 and 4: the cache keeps the prompt's last tokens, then grows past context_size as the
    # reference's does (only past the model's positions does the window slide: see the test past the context)
    for kwargs in ({}, {"use_cache": False}, {"context_size": 20}, {"use_cache": False, "context_size": 10},
                   {"context_size": 10}, {"context_size": 4}):
        expected = ref_generate.generate_text_simple(r, idx, max_new_tokens=12, **kwargs)
        got = generate.generate_text_simple(o, idx, max_new_tokens=12, **kwargs)
        assert got.shape == (4, 18) and torch.equal(got, expected), kwargs
    generate.generate_text_simple(o, idx, max_new_tokens=5)
    ref_generate.generate_text_simple(r, idx, max_new_tokens=5)
    assert torch.equal(o.current_pos, r.current_pos)  # left where the reference leaves it


def test_generate_with_left_padded_rows_gives_the_references_tokens_and_batched_rows_equal_single_runs():
    r, o = pair(qwen_cfg(2))
    pad = 0
    prompts = [torch.randint(1, 101, (n,)) for n in (2, 6, 4)]
    idx = torch.stack([torch.cat([torch.full((6 - len(p),), pad), p]) for p in prompts])  # left padding
    expected = ref_generate.generate_text_simple(r, idx, max_new_tokens=10)
    got = generate.generate_text_simple(o, idx, max_new_tokens=10)
    assert torch.equal(got, expected)
    for b in range(3):
        assert torch.equal(generate.generate_text_simple(o, idx[b:b + 1], max_new_tokens=10)[0], got[b])


def test_generate_drives_the_references_model_and_a_model_outside_the_decoder_through_the_protocol():
    r, o = pair(qwen_cfg(2))
    idx = torch.randint(0, 101, (2, 5))
    expected = ref_generate.generate_text_simple(r, idx, max_new_tokens=8)
    assert torch.equal(generate.generate_text_simple(r, idx, max_new_tokens=8), expected)
    assert torch.equal(generate._protocol_cached(o, idx, 8, 32), expected)


def test_bfloat16_generation_under_the_torch_backend_gives_the_references_tokens():
    """The batched reference's RoPE keeps bf16 models' queries and keys in float32, in its cache too: under backend
    "torch" gptfast gives its tokens bitwise (the reference's protocol), whichever way close logits fall."""
    from gptfast.models.qwen3_batched import rotates_in_float32
    r, o = pair(qwen_cfg(1, dtype=torch.bfloat16))
    with ops.use_backend("torch"):
        for seed in range(12):
            idx = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(seed))
            expected = ref_generate.generate_text_simple(r, idx, 3)
            assert torch.equal(generate.generate_text_simple(o, idx, 3), expected), seed
            assert torch.equal(o.current_pos, r.current_pos)
    assert rotates_in_float32(o) and rotates_in_float32(r)
    assert not rotates_in_float32(pair(qwen_cfg(1))[1])  # float32 weights: the decoder's cache is exact


def test_cached_generation_past_the_context_equals_uncached_generation():
    _, o = pair(qwen_cfg(2, context_length=16))
    idx = torch.randint(0, 101, (2, 10))
    cached = generate.generate_text_simple(o, idx, max_new_tokens=12)  # 22 tokens > 16 positions
    uncached = generate.generate_text_simple(o, idx, max_new_tokens=12, use_cache=False)
    assert torch.equal(cached, uncached)


def test_torch_backend_16_bit_generation_past_the_context_slides_the_window():
    """The reference's own loop (taken for 16-bit weights under backend "torch") matches it while positions last,
    then, like the default path, runs the last context_length tokens each step instead of failing."""
    r, o = pair(qwen_cfg(2, dtype=torch.bfloat16, context_length=16))
    idx = torch.randint(0, 101, (2, 10), generator=torch.Generator().manual_seed(0))
    with ops.use_backend("torch"):
        out = generate.generate_text_simple(o, idx, max_new_tokens=12)  # 22 tokens > 16 positions
        assert out.shape == (2, 22) and torch.equal(o.current_pos, torch.full((2,), 22))
        assert torch.equal(out[:, :16], ref_generate.generate_text_simple(r, idx, 6))
        with torch.no_grad():
            for t in range(16, 22):
                window = o(out[:, :t][:, -16:], cache=None, start_pos=None)
                assert torch.equal(out[:, t], window[:, -1].argmax(dim=-1)), t


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_negative_token_count_is_an_error_with_or_without_the_cache(use_cache):
    _, o = pair(qwen_cfg(2))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        generate.generate_text_simple(o, torch.zeros(2, 3, dtype=torch.long), -1, use_cache=use_cache)


def test_bad_input_is_a_clear_error_and_changes_nothing():
    _, o = pair(qwen_cfg(2))
    cache = utils.KVCache(2, 2)
    o.reset_kv_cache(2)
    with torch.no_grad():
        o(torch.zeros(2, 30, dtype=torch.long), cache=cache, start_pos=o.current_pos)
        o.current_pos += 30
        with pytest.raises(ValueError, match=r"row 0: positions 30..32 lie outside the model's 32 positions"):
            o(torch.zeros(2, 3, dtype=torch.long), cache=cache, start_pos=o.current_pos)
        assert cache.row_lengths(0) == [30, 30]
        with pytest.raises(ValueError, match="does not continue the cached rows"):
            o(torch.zeros(2, 1, dtype=torch.long), cache=cache, start_pos=torch.tensor([29, 30]))
        with pytest.raises(ValueError, match="start_pos .* is required"):
            o(torch.zeros(2, 1, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="the cache has 3 layers but the model has 2"):
            o(torch.zeros(2, 1, dtype=torch.long), cache=utils.KVCache(3, 2), start_pos=torch.tensor([0, 0]))
        partial = utils.KVCache(2, 2)
        partial.update(0, 0, cache.get(0, 0))
        partial.update(0, 1, cache.get(0, 1))  # layer 1 left empty
        with pytest.raises(ValueError, match="in layer 1"):
            o(torch.zeros(2, 1, dtype=torch.long), cache=partial, start_pos=o.current_pos)
        with pytest.raises(ValueError, match="the cache has 2 rows but in_idx has 3"):
            o(torch.zeros(3, 1, dtype=torch.long), cache=cache, start_pos=torch.tensor([30, 30, 30]))
        with pytest.raises(TypeError, match="integer positions"):
            o(torch.zeros(2, 1, dtype=torch.long), cache=cache, start_pos=torch.tensor([30.0, 30.0]))
        with pytest.raises(ValueError, match="at least one row"):
            o(torch.zeros(0, 3, dtype=torch.long))
        with pytest.raises(ValueError, match="token id 101"):
            o(torch.full((2, 1), 101), cache=cache, start_pos=o.current_pos)
        assert cache.row_lengths(0) == [30, 30]
        # the reference's list cache: the rows' stored keys tell how far they are
        rows = ref_utils.KVCache(2, 2)
        o(torch.zeros(2, 5, dtype=torch.long), cache=rows, start_pos=torch.tensor([0, 0]))
        with pytest.raises(ValueError, match=r"start_pos \[0, 0\] does not continue the cached rows, which hold "
                                             r"\[5, 5\]"):
            o(torch.zeros(2, 3, dtype=torch.long), cache=rows, start_pos=torch.tensor([0, 0]))
        assert o(torch.zeros(2, 1, dtype=torch.long), cache=rows, start_pos=torch.tensor([5, 5])).shape == (2, 1, 101)
        o(torch.zeros(2, 2, dtype=torch.long), cache=cache, start_pos=o.current_pos)  # exactly full is fine
    with pytest.raises(ValueError, match="non-empty"):
        generate.generate_text_simple(o, torch.zeros(0, 3, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        o.reset_kv_cache(0)
    with pytest.raises(ValueError, match="num_heads .* divisible by num_kv_groups"):
        qwen.Qwen3Model(qwen_cfg(3))


@pytest.mark.parametrize("change", ["hook on a block", "hook on an attention", "a block of the reference's class"])
def test_blocks_the_fast_path_cannot_run_are_called_as_the_reference_calls_them(change):
    r, o = pair(qwen_cfg(2))
    for model in (r, o):
        if change == "hook on a block":
            model.trf_blocks[0].register_forward_hook(lambda module, args, out: (out[0] * 0.5, out[1]))
        elif change == "hook on an attention":
            model.trf_blocks[1].att.register_forward_hook(lambda module, args, out: (out[0] * 0.5, out[1]))
    if change == "a block of the reference's class":
        block = ref_qwen.TransformerBlock(qwen_cfg(2))
        block.load_state_dict(o.trf_blocks[1].state_dict())
        o.trf_blocks[1] = block
    x = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), ops.use_backend("torch"):
        assert torch.equal(o(x), r(x))
        rows_r, rows_o = ref_utils.KVCache(2, 2), utils.KVCache(2, 2)
        r.reset_kv_cache(2), o.reset_kv_cache(2)
        for chunk in (x[:, :4], x[:, 4:5]):
            expected = r(chunk, cache=rows_r, start_pos=r.current_pos.clone())
            got = o(chunk, cache=rows_o, start_pos=o.current_pos.clone())
            r.current_pos += chunk.shape[1]
            o.current_pos += chunk.shape[1]
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_an_input_of_no_tokens_gives_empty_logits_as_the_reference():
    r, o = pair(qwen_cfg(2))
    empty = torch.zeros((2, 0), dtype=torch.long)
    assert o(empty).shape == r(empty).shape == (2, 0, 101)
    cache = utils.KVCache(n_layers=2, batch_size=2)
    o.reset_kv_cache(batch_size=2, device="cpu")
    assert o(empty, cache=cache, start_pos=o.current_pos).shape == (2, 0, 101)
    assert cache.get(0, 0) is None  # nothing cached
    with pytest.raises(ValueError, match="at least one row"):
        o(torch.zeros((0, 3), dtype=torch.long))
