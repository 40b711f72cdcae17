"""The static KV cache and the batched decoder serving Llama 3 and Qwen3 models (gptfast's and the reference's)."""

import pytest
import torch

from gptfast.generation import (CachedRunner, KVCache, api, check_decodable, context_length, generate_batch,
                                generate_stream, prepare_model)
from hf_checkpoints import random_hf_state_dict

ref_qwen = pytest.importorskip("llms_from_scratch.qwen3", reason="llms-from-scratch is a test dependency")
import llms_from_scratch.kv_cache.generate as ref_kv_generate  # noqa: E402
import llms_from_scratch.kv_cache.qwen3 as ref_kv_qwen  # noqa: E402
import llms_from_scratch.llama3 as ref_llama  # noqa: E402

import gptfast.kv_cache.generate as kv_generate  # noqa: E402
import gptfast.models.llama3 as llama  # noqa: E402
import gptfast.models.llama3_cached as llama_cached  # noqa: E402
import gptfast.models.qwen3 as qwen  # noqa: E402
import gptfast.models.qwen3_batched as qwen_batched  # noqa: E402
import gptfast.models.qwen3_cached as qwen_cached  # noqa: E402

SCALING = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 16}


def llama_cfg(n_kv_groups=2):
    return {"vocab_size": 97, "context_length": 32, "emb_dim": 32, "n_heads": 4, "n_layers": 2, "hidden_dim": 48,
            "n_kv_groups": n_kv_groups, "rope_base": 500_000.0, "dtype": torch.float32, "rope_freq": dict(SCALING)}


def qwen_cfg(n_kv_groups=2, qk_norm=True, num_experts=0):
    cfg = {"vocab_size": 101, "context_length": 32, "emb_dim": 32, "hidden_dim": 40, "n_layers": 2, "n_heads": 4,
           "head_dim": 8, "n_kv_groups": n_kv_groups, "qk_norm": qk_norm, "dtype": torch.float32,
           "rope_base": 1_000_000.0, "num_experts": num_experts}
    if num_experts:
        cfg.update(num_experts_per_tok=2, moe_intermediate_size=24)
    return cfg


def _moe():
    model = qwen.Qwen3Model(qwen_cfg(2, num_experts=4))
    qwen.load_weights_into_qwen(model, {"n_layers": 2}, random_hf_state_dict(model, seed=2))
    return model


MODELS = {
    "llama-ratio2": lambda: llama.Llama3Model(llama_cfg(2)),
    "llama-fast-ratio4": lambda: llama.Llama3ModelFast(llama_cfg(1)),
    "llama-cached": lambda: llama_cached.Llama3Model(llama_cfg(4)),
    "qwen-ratio1": lambda: qwen.Qwen3Model(qwen_cfg(4)),
    "qwen-ratio2-no-qknorm": lambda: qwen.Qwen3Model(qwen_cfg(2, qk_norm=False)),
    "qwen-ratio4": lambda: qwen.Qwen3Model(qwen_cfg(1)),
    "qwen-moe": _moe,
    "qwen-cached": lambda: qwen_cached.Qwen3Model(qwen_cfg(2)),
    "qwen-batched": lambda: qwen_batched.Qwen3Model({**qwen_cfg(2), "num_experts": 0}),
    "reference-qwen": lambda: ref_qwen.Qwen3Model(qwen_cfg(2)),
    "reference-llama": lambda: ref_llama.Llama3Model(llama_cfg(2)),
}


def build(name, seed=0):
    torch.manual_seed(seed)
    return MODELS[name]().eval()


def plain_forward(model):
    """The model's own uncached forward (the batched variant needs ``cache=None`` spelled out)."""
    if isinstance(model, qwen_batched.Qwen3Model):
        return lambda ids: model(ids, cache=None)
    return model


def uncached_greedy(model, idx, max_new_tokens, context_size):
    forward = plain_forward(model)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = forward(idx[:, -context_size:])
            idx = torch.cat([idx, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("name", list(MODELS))
def test_cached_greedy_generation_equals_uncached_token_for_token(name):
    model = build(name)
    vocab = model.tok_emb.weight.shape[0]
    idx = torch.randint(0, vocab, (3, 6))
    for context_size in (32, 9):  # 9: every row outgrows the window and slides
        expected = uncached_greedy(model, idx, 14, context_size)
        assert torch.equal(api.generate(model, idx, 14, context_size), expected), context_size


@pytest.mark.parametrize("name", ["llama-ratio2", "qwen-ratio4", "qwen-moe"])
def test_batch_of_prompts_of_different_lengths_equals_single_runs_and_stops_at_eos(name):
    model = build(name)
    prompts = [torch.randint(0, 90, (n,)) for n in (3, 8, 5, 1)]
    singles = [api.generate(model, p.unsqueeze(0), 12, 32)[0, len(p):] for p in prompts]
    eos = [None, int(singles[1][4]), None, int(singles[3][0])]  # row 1 stops after 4 tokens, row 3 at once
    result = generate_batch(model, prompts, 12, eos_id=[-1 if e is None else e for e in eos])
    for b, (p, single) in enumerate(zip(prompts, singles)):
        new = result.new_tokens(b)
        if eos[b] is None:
            assert torch.equal(new, single) and not result.stopped_at_eos[b]
        else:
            stop = int((single == eos[b]).nonzero()[0])
            assert torch.equal(new, single[:stop]) and result.stopped_at_eos[b]
        assert torch.equal(result.row(b)[:len(p)], p)


def test_streaming_yields_the_generated_tokens_one_step_at_a_time():
    model = build("qwen-ratio2-no-qknorm")
    idx = torch.randint(0, 101, (2, 4))
    steps = list(generate_stream(model, idx, 7, 32))
    assert len(steps) == 7 and all(s.shape == (2, 1) for s in steps)
    assert torch.equal(torch.cat([idx] + steps, dim=1), api.generate(model, idx, 7, 32))


@pytest.mark.parametrize("name", ["llama-ratio2", "qwen-ratio4"])
def test_the_static_shape_step_for_cuda_graphs_equals_the_per_row_step(name):
    """``decode_static`` is what a CUDA graph captures; on CPU it must give what ``decode`` gives."""
    model = build(name)
    runner = CachedRunner(model)
    prompts = [torch.randint(0, 90, (1, n)) for n in (4, 7)]
    caches = [KVCache.for_model(model, 2, 16) for _ in range(2)]
    for cache in caches:
        for b, p in enumerate(prompts):
            runner.prefill(p, cache, rows=torch.tensor([b]))
    tokens = torch.tensor([[5], [9]])
    per_row = runner.decode(tokens, caches[0], [4, 7])
    static = runner.decode_static(tokens, caches[1], torch.tensor([4, 7]))
    torch.testing.assert_close(static, per_row, atol=1e-5, rtol=1e-5)
    # The first layer's keys are the step's write itself: bitwise.  Later layers' keys follow an
    # attention over the whole masked cache instead of the trimmed one; its reductions group the keys
    # by the CPU's vector width, so they agree to rounding only.
    assert torch.equal(caches[0].keys[0], caches[1].keys[0])
    for layer in range(1, 2):
        torch.testing.assert_close(caches[0].keys[layer], caches[1].keys[layer], atol=1e-6, rtol=1e-6)
    single = runner.decode(tokens[1:], _alone(runner, model, prompts[1]), 7)  # row 1 run by itself
    torch.testing.assert_close(per_row[1:], single, atol=1e-5, rtol=1e-5)


def _alone(runner, model, prompt):
    cache = KVCache.for_model(model, 1, 16)
    runner.prefill(prompt, cache)
    return cache


def test_mixture_of_experts_models_decode_without_cuda_graphs():
    from gptfast.generation.cuda_graphs import graph_capturable

    moe, dense = build("qwen-moe"), build("qwen-ratio4")
    assert not graph_capturable(moe) and graph_capturable(dense) and graph_capturable(build("llama-ratio2"))
    idx = torch.randint(0, 101, (1, 4))
    with pytest.raises(ValueError, match="mixture-of-experts"):
        api.generate_batch(moe, idx, 2, cuda_graph=True)
    assert api.generate_batch(moe, idx, 2).tokens.shape == (1, 6)  # the default picks the plain step


def test_the_cache_holds_one_head_per_key_value_group():
    model = build("qwen-ratio4")  # 4 query heads, 1 kv head
    cache = KVCache.for_model(model, 3, 20)
    assert cache.keys[0].shape == (3, 1, 20, 8) and len(cache.keys) == 2
    assert context_length(model) == 32
    with pytest.raises(ValueError, match="exceeds the model's context length 32"):
        KVCache.for_model(model, 1, 33)


def test_bfloat16_decoding_keeps_the_rope_tables_in_float32():
    model = build("qwen-ratio2-no-qknorm")
    converted = prepare_model(model, torch.bfloat16)
    assert converted.out_head.weight.dtype == torch.bfloat16 and converted.cos.dtype == torch.float32
    assert model.out_head.weight.dtype == torch.float32  # the original is untouched
    idx = torch.randint(0, 101, (2, 5))
    out = api.generate_batch(model, idx, 6, dtype=torch.bfloat16)
    assert out.tokens.shape == (2, 11) and torch.equal(out.tokens[:, :5], idx)


def test_positions_past_the_context_are_refused_before_any_work():
    model = build("llama-ratio2")
    with pytest.raises(ValueError, match="only 32 positions"):
        api.generate(model, torch.zeros(1, 30, dtype=torch.long), 5, 40)
    runner = CachedRunner(model)
    with pytest.raises(ValueError, match="max_len 16"):
        runner.decode(torch.zeros(1, 1, dtype=torch.long), KVCache.for_model(model, 1, 16), 16)


def test_a_model_lacking_part_of_the_layout_is_named():
    model = build("qwen-ratio4")
    del model.trf_blocks[0].att.num_kv_groups
    with pytest.raises(TypeError, match="lacks trf_blocks\\[0\\].att.num_kv_groups"):
        check_decodable(model)


def test_the_kv_cache_stream_leaves_current_pos_where_the_references_stream_does():
    """The reference's stream runs the prompt at the first next() and one cached call each time it resumes after
    a token; a stream stopped early, at an eos or after no tokens leaves the position there."""
    torch.manual_seed(4)
    r = ref_kv_qwen.Qwen3Model(qwen_cfg(2)).eval()
    o = qwen_cached.Qwen3Model(qwen_cfg(2)).eval()
    o.load_state_dict(r.state_dict())
    idx = torch.randint(0, 101, (1, 6))
    first = next(ref_kv_generate.generate_text_simple_stream(r, idx, max_new_tokens=1)).item()
    for kwargs, taken in (({"max_new_tokens": 5}, None), ({"max_new_tokens": 5}, 2), ({"max_new_tokens": 0}, None),
                          ({"max_new_tokens": 5, "eos_token_id": first}, None)):
        streams = [generate.generate_text_simple_stream(model, idx, **kwargs)
                   for model, generate in ((r, ref_kv_generate), (o, kv_generate))]
        for stream in streams:
            for i, _ in enumerate(stream):
                if taken is not None and i + 1 == taken:
                    break
        assert o.current_pos == r.current_pos, (kwargs, taken, o.current_pos, r.current_pos)


def test_the_kv_cache_generator_serves_the_qwen3_cache_model_with_the_references_tokens():
    torch.manual_seed(4)
    r = ref_kv_qwen.Qwen3Model(qwen_cfg(2)).eval()
    o = qwen_cached.Qwen3Model(qwen_cfg(2)).eval()
    o.load_state_dict(r.state_dict())
    idx = torch.randint(0, 101, (2, 6))
    expected = ref_kv_generate.generate_text_simple(r, idx, max_new_tokens=15)
    assert torch.equal(kv_generate.generate_text_simple(o, idx, max_new_tokens=15), expected)
    assert o.current_pos == r.current_pos == 6 + 15  # left where the reference leaves it
    ref_kv_generate.generate_text_simple(r, idx, max_new_tokens=4, context_size=5)
    kv_generate.generate_text_simple(o, idx, max_new_tokens=4, context_size=5)
    assert o.current_pos == r.current_pos == 5 + 4
    streamed = list(kv_generate.generate_text_simple_stream(o, idx, max_new_tokens=15))
    assert torch.equal(torch.cat([idx] + streamed, dim=1), expected)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_the_kv_cache_generator_keeps_what_the_references_cached_loop_keeps(backend):
    """A ``context_size`` shorter than the prompt, or than the prompt and the new tokens: the reference caches the
    prompt's last ``context_size`` tokens and then every new one (no window while the model has positions); its
    stream takes the whole prompt whatever ``context_size`` says."""
    from gptfast import ops
    torch.manual_seed(3)
    r = ref_kv_qwen.Qwen3Model(qwen_cfg(2)).eval()
    o = qwen_cached.Qwen3Model(qwen_cfg(2)).eval()
    o.load_state_dict(r.state_dict())
    with ops.use_backend(backend):
        for seed in range(3):
            idx = torch.randint(0, 101, (1, 6), generator=torch.Generator().manual_seed(seed))
            for context_size, new in ((4, 6), (8, 6), (3, 1)):
                expected = ref_kv_generate.generate_text_simple(r, idx, new, context_size=context_size)
                got = kv_generate.generate_text_simple(o, idx, new, context_size=context_size)
                assert torch.equal(got, expected), (seed, context_size, new)
                assert o.current_pos == r.current_pos
                ref_stream = list(ref_kv_generate.generate_text_simple_stream(r, idx, new, context_size=context_size))
                ours = list(kv_generate.generate_text_simple_stream(o, idx, new, context_size=context_size))
                assert torch.equal(torch.cat(ours, dim=1), torch.cat(ref_stream, dim=1)), (seed, context_size)


def test_a_bad_context_size_is_named_before_any_work():
    o = qwen_cached.Qwen3Model(qwen_cfg(2)).eval()
    idx = torch.randint(0, 101, (2, 6))
    with pytest.raises(ValueError, match="context_size must be >= 1, got -2"):
        kv_generate.generate_text_simple(o, idx, 5, context_size=-2)
    with pytest.raises(TypeError, match="context_size must be an int"):
        kv_generate.generate_text_simple(o, idx, 5, context_size=3.0)
    batched = qwen_batched.Qwen3Model(qwen_cfg(2)).eval()
    import gptfast.kv_cache_batched.generate as batched_generate
    with pytest.raises(ValueError, match="context_size must be >= 1"):
        batched_generate.generate_text_simple(batched, idx, 5, context_size=-1)


def test_a_kv_cache_stream_touches_the_model_only_once_started():
    """Like the reference's generator, creating the stream neither switches the model to eval nor resets its
    position; the first next() does both."""
    torch.manual_seed(4)
    for module in (ref_kv_qwen, qwen_cached):
        model = module.Qwen3Model(qwen_cfg(2)).train()
        model.current_pos = 5
        stream = (ref_kv_generate if module is ref_kv_qwen else kv_generate).generate_text_simple_stream(
            model, torch.randint(0, 101, (1, 6)), max_new_tokens=2)
        assert model.training and model.current_pos == 5, module.__name__
        next(stream)
        assert not model.training and model.current_pos != 5, module.__name__
