"""KV-cached generation against the reference's uncached loop.

The cached path computes the same logits as the uncached one up to float
rounding (other matmul shapes); ``test_cached_logits_match_the_full_forward``
bounds that difference.  Every token-equality test below is seeded and
deterministic, so a case that landed on a near-tie would fail every run rather
than flake; none does.
"""

import copy

import pytest
import torch

import llms_from_scratch.ch04 as ref_ch04
import llms_from_scratch.ch05 as ref_ch05

from gptfast import ops
from gptfast.generation import (GenerationResult, TextChunk, generate, generate_batch, generate_stream,
                                generate_text_simple, stream_text)
from gptfast.generation import CachedRunner, KVCache, masked_decode_attention, prepare_model
from gptfast.models import GPTModel, GPTModelFast, split_heads

from conftest import HAS_CUDA
from oracle_backend import torch_backend_one_thread  # noqa: F401

CFG = {"vocab_size": 500, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2, "drop_rate": 0.0,
       "qkv_bias": True}


def make_model(seed=0, cls=GPTModel, **overrides):
    torch.manual_seed(seed)
    return cls({**CFG, **overrides}).eval()


def prompt(batch, length, seed=1):
    return torch.randint(0, CFG["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def uncached_generate(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, eos_id=None):
    """The reference loop with per-row top-k and eos padding (what ``gptfast.generate`` did before the cache)."""
    finished = torch.zeros(idx.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(idx[:, -context_size:])[:, -1, :]
        next_token = ops.sample_next_token(logits, temperature=temperature, top_k=top_k)
        if eos_id is not None:
            finished |= next_token.squeeze(1) == eos_id
            if bool(finished.all()):
                break
            next_token = next_token.masked_fill(finished.unsqueeze(1), eos_id)
        idx = torch.cat((idx, next_token), dim=1)
    return idx


# ----------------------------------------------------------------------------- the cache itself


@pytest.mark.parametrize("batch,length", [(1, 1), (1, 5), (3, 4), (2, 16)])
def test_cached_logits_match_the_full_forward(batch, length):
    model = make_model()
    idx = prompt(batch, length)
    runner = CachedRunner(model)
    cache = KVCache.for_model(model, batch, 16)
    with torch.no_grad():
        full = model(idx)
    torch.testing.assert_close(runner.prefill(idx[:, :1], cache), full[:, 0], atol=1e-5, rtol=1e-5)
    for p in range(1, length):
        torch.testing.assert_close(runner.decode(idx[:, p:p + 1], cache, p), full[:, p], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(runner.prefill(idx, KVCache.for_model(model, batch, 16)), full[:, -1],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(runner.last_logits(idx), full[:, -1], atol=1e-5, rtol=1e-5)


def test_prefill_stores_the_keys_and_values_the_model_computes():
    model = make_model()
    idx = prompt(2, 6)
    cache = KVCache.for_model(model, 2, 10)
    CachedRunner(model).prefill(idx, cache)
    block = model.trf_blocks[1]
    with torch.no_grad():
        x = model.trf_blocks[0](model.embed(idx))
        keys = split_heads(block.att, block.att.W_key(block.norm1(x)))
    torch.testing.assert_close(cache.keys[1][:, :, :6], keys, atol=1e-6, rtol=1e-6)
    assert cache.keys[1][:, :, 6:].abs().sum() == 0
    assert cache.keys[0].shape == (2, CFG["n_heads"], 10, CFG["emb_dim"] // CFG["n_heads"])


def test_per_row_positions_decode_like_each_row_alone():
    model = make_model()
    runner = CachedRunner(model)
    rows = [prompt(1, 3, seed=2), prompt(1, 7, seed=3)]
    cache = KVCache.for_model(model, 2, 12)
    runner.prefill(rows[0], cache, torch.tensor([0]))
    runner.prefill(rows[1], cache, torch.tensor([1]))
    step = torch.tensor([[11], [12]])
    got = runner.decode(step, cache, [3, 7])
    for r, row in enumerate(rows):
        with torch.no_grad():
            want = model(torch.cat([row, step[r:r + 1]], dim=1))[:, -1]
        torch.testing.assert_close(got[r:r + 1], want, atol=1e-5, rtol=1e-5)


def test_masked_decode_attention_equals_the_oracle_when_nothing_is_masked_and_masks_per_row():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 3, 1, 8, generator=g), torch.randn(2, 3, 9, 8, generator=g), torch.randn(2, 3, 9, 8,
                                                                                                         generator=g)
    full = masked_decode_attention(q, k, v, torch.tensor([8, 8]))
    assert torch.equal(full, ops.causal_attention(q, k, v, backend="torch"))
    part = masked_decode_attention(q, k, v, torch.tensor([2, 5]))
    for r, last in enumerate((2, 5)):
        want = ops.causal_attention(q[r:r + 1], k[r:r + 1, :, :last + 1], v[r:r + 1, :, :last + 1], backend="torch")
        torch.testing.assert_close(part[r:r + 1], want, atol=1e-6, rtol=1e-6)


def test_cache_rows_can_be_dropped():
    model = make_model()
    cache = KVCache.for_model(model, 3, 8)
    CachedRunner(model).prefill(prompt(3, 4), cache)
    kept = cache.keys[0][2].clone()
    cache.keep_rows(torch.tensor([2]))
    assert cache.batch == 1 and torch.equal(cache.keys[0][0], kept)
    assert cache.nbytes() == 2 * CFG["n_layers"] * 1 * CFG["emb_dim"] * 8 * 4


# ----------------------------------------------------------------------------- the reference's API


@pytest.mark.parametrize("length", [1, 4, 9])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("context_size", [16, 6, 2])
def test_greedy_equals_the_reference_within_and_past_the_context(length, batch, context_size):
    model = make_model()
    idx = prompt(batch, length)
    expected = ref_ch05.generate(model, idx, 14, context_size)
    assert torch.equal(generate(model, idx, 14, context_size), expected)
    assert torch.equal(generate_text_simple(model, idx, 14, context_size),
                       ref_ch05.generate_text_simple(model, idx, 14, context_size))


def test_greedy_equals_the_reference_for_a_reference_model_instance():
    torch.manual_seed(4)
    model = ref_ch04.GPTModel(CFG).eval()
    idx = prompt(2, 5)
    for context_size in (16, 7):
        assert torch.equal(generate(model, idx, 20, context_size), ref_ch05.generate(model, idx, 20, context_size))


@pytest.mark.parametrize("top_k", [1, 3, 50])
@pytest.mark.parametrize("context_size", [16, 5])
def test_top_k_greedy_equals_the_reference(top_k, context_size):
    model = make_model()
    idx = prompt(1, 4)
    assert torch.equal(generate(model, idx, 15, context_size, top_k=top_k),
                       ref_ch05.generate(model, idx, 15, context_size, top_k=top_k))
    batch = prompt(3, 4)  # the reference's top-k broadcasting only works for one row: the loop is the oracle
    assert torch.equal(generate(model, batch, 15, context_size, top_k=top_k),
                       uncached_generate(model, batch, 15, context_size, top_k=top_k))


@pytest.mark.parametrize("temperature,top_k", [(0.7, None), (1.5, None), (1.0, 5), (2.0, 40)])
@pytest.mark.parametrize("context_size", [16, 5])
def test_seeded_sampling_draws_the_reference_tokens(temperature, top_k, context_size):
    model = make_model()
    idx = prompt(1, 3)
    torch.manual_seed(123)
    expected = ref_ch05.generate(model, idx, 20, context_size, temperature=temperature, top_k=top_k)
    torch.manual_seed(123)
    got = generate(model, idx, 20, context_size, temperature=temperature, top_k=top_k)
    assert torch.equal(got, expected)
    after_ours = torch.rand(3)
    torch.manual_seed(123)
    ref_ch05.generate(model, idx, 20, context_size, temperature=temperature, top_k=top_k)
    assert torch.equal(after_ours, torch.rand(3)), "the global RNG must end where the reference leaves it"


def assert_seeded_draws_match(model, idx, max_new_tokens, context_size, seed, **sampling):
    """``generate`` draws the reference's tokens under one torch seed."""
    torch.manual_seed(seed)
    expected = ref_ch05.generate(model, idx, max_new_tokens, context_size, **sampling)
    torch.manual_seed(seed)
    assert torch.equal(generate(model, idx, max_new_tokens, context_size, **sampling), expected)


def test_seeded_batch_sampling_draws_the_reference_tokens():
    assert_seeded_draws_match(make_model(), prompt(4, 5), 16, 8, seed=9, temperature=1.2)


def test_seeded_sampling_is_reproducible_and_depends_on_the_seed():
    model = make_model()
    idx = prompt(2, 3)

    def run(seed):
        torch.manual_seed(seed)
        return generate(model, idx, 25, 10, temperature=1.0, top_k=20)

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))
    gen = lambda seed: torch.cat(list(generate_stream(model, idx, 25, 10, 1.0, 20, None,  # noqa: E731
                                                      torch.Generator().manual_seed(seed))), dim=1)
    assert torch.equal(gen(1), gen(1)) and not torch.equal(gen(1), gen(2))


def test_eos_stops_one_row_like_the_reference():
    model = make_model()
    idx = prompt(1, 3)
    full = ref_ch05.generate(model, idx, 12, 16)
    eos = int(full[0, 6])
    expected = ref_ch05.generate(model, idx, 12, 16, eos_id=eos)
    got = generate(model, idx, 12, 16, eos_id=eos)
    assert torch.equal(got, expected) and got.shape[1] == 6
    first = int(full[0, 3])  # the very first new token: nothing is generated
    assert torch.equal(generate(model, idx, 12, 16, eos_id=first), idx)


@pytest.mark.parametrize("context_size", [16, 6])
def test_batched_eos_pads_finished_rows_like_the_uncached_loop(context_size):
    model = make_model()
    idx = prompt(3, 4)
    greedy = generate(model, idx, 12, context_size)
    eos = int(greedy[1, 7])  # row 1's fourth new token
    expected = uncached_generate(model, idx, 12, context_size, eos_id=eos)
    got = generate(model, idx, 12, context_size, eos_id=eos)
    assert torch.equal(got, expected)
    assert (got[1, 7:] == eos).all() and not torch.equal(got, greedy)
    torch.manual_seed(3)
    expected = uncached_generate(model, idx, 12, context_size, temperature=1.0, top_k=4, eos_id=eos)
    torch.manual_seed(3)
    assert torch.equal(generate(model, idx, 12, context_size, temperature=1.0, top_k=4, eos_id=eos), expected)


def test_models_without_the_book_layout_use_the_uncached_loop():
    model = make_model(cls=GPTModelFast)
    idx = prompt(2, 4)
    assert torch.equal(generate(model, idx, 10, 6), ref_ch05.generate(model, idx, 10, 6))
    result = generate_batch(model, [[1, 2], [3, 4, 5]], 5, context_size=6)
    assert torch.equal(result.row(0), ref_ch05.generate(model, torch.tensor([[1, 2]]), 5, 6)[0])
    with pytest.raises(TypeError, match="context_size is required"):
        generate_batch(model, [[1, 2]], 5)


def test_a_model_training_with_dropout_draws_the_reference_tokens():
    """In training mode dropout acts on every position the reference's loop feeds the model; the cached passes
    see fewer positions, so such a model runs the uncached loop and draws the same random numbers."""
    model = make_model(drop_rate=0.3).train()
    idx = prompt(1, 4)
    for temperature in (0.0, 1.0):
        assert_seeded_draws_match(model, idx, 10, 16, seed=7, temperature=temperature)


@pytest.mark.parametrize("where", ["model", "block", "attention", "global"])
def test_forward_hooks_the_cached_passes_would_skip_are_honoured(where):
    """The cached passes call a block's parts, not ``block(x)``: a hook on the model, a block or an attention
    module (or a global one) sends generation through the model's own forward, as in the reference."""
    model = make_model()
    idx = prompt(2, 4)

    def shift(module, args, output):
        if isinstance(output, torch.Tensor):
            output = output.clone()
            output[..., 3] += 50.0
        return output

    target = {"model": model, "block": model.trf_blocks[0], "attention": model.trf_blocks[1].att}.get(where)
    handle = (target.register_forward_hook(shift) if target is not None
              else torch.nn.modules.module.register_module_forward_hook(
                  lambda m, a, out: shift(m, a, out) if m is model.trf_blocks[0] else out))
    try:
        expected = ref_ch05.generate(model, idx, 8, 16)
        assert not torch.equal(expected, ref_ch05.generate(make_model(), idx, 8, 16))  # the hook changes tokens
        assert torch.equal(generate(model, idx, 8, 16), expected)
    finally:
        handle.remove()


def _mean_over_positions(module, args, output):
    """A hook that looks at every position: it subtracts half the mean over the sequence."""
    return output - 0.5 * output.mean(dim=1, keepdim=True)


@pytest.mark.parametrize("part", ["ff", "norm2", "final_norm", "out_head", "pos_emb"])
def test_a_hook_on_any_part_gets_every_position_the_reference_gives_it(part):
    """The cached passes call a block's feed-forward, the norms, the head and the embeddings on fewer positions
    than the forward does: a hook on any of them (one that looks across positions, or records its input) sends
    generation through the model's own forward, as in the reference."""
    model = make_model()
    target = {"ff": model.trf_blocks[1].ff, "norm2": model.trf_blocks[0].norm2}.get(part) or getattr(model, part)
    seen = []
    handle = target.register_forward_hook(lambda m, a, out: seen.append(out.shape) or _mean_over_positions(m, a, out))
    idx = prompt(1, 5)
    try:
        torch.manual_seed(0)
        expected = ref_ch05.generate(model, idx, 6, 16, temperature=1.0)
        expected_shapes, seen[:] = list(seen), []
        torch.manual_seed(0)
        assert torch.equal(generate(model, idx, 6, 16, temperature=1.0), expected)
        assert seen == expected_shapes
    finally:
        handle.remove()


def test_a_feed_forward_of_the_users_that_mixes_positions_is_called_on_every_position():
    """A block part replaced by a module of the user's own may mix positions (here a running mean): the first
    step's logits show that the cached passes compute otherwise, and generation keeps the model's forward."""

    class RunningMean(torch.nn.Module):
        def forward(self, x):
            counts = torch.arange(1, x.shape[1] + 1, dtype=x.dtype).view(1, -1, 1)
            return x.cumsum(dim=1) / counts

    model = make_model()
    model.trf_blocks[1].ff = RunningMean()
    idx = prompt(2, 5)
    expected = ref_ch05.generate(model, idx, 8, 16)
    assert not torch.equal(expected, ref_ch05.generate(make_model(), idx, 8, 16))
    assert torch.equal(generate(model, idx, 8, 16), expected)


class _NotebookAttention(torch.nn.Module):
    """The book's attention copied into a notebook (a class of its own, the book's parts), changed: each query
    sees only its last ``window`` keys, and the scores are multiplied by ``sharpen``."""

    def __init__(self, att, window, sharpen):
        super().__init__()
        self.W_query, self.W_key, self.W_value, self.out_proj = att.W_query, att.W_key, att.W_value, att.out_proj
        self.num_heads, self.head_dim, self.d_out = att.num_heads, att.head_dim, att.d_out
        self.dropout = torch.nn.Dropout(0.0)
        self.register_buffer("mask", torch.triu(torch.ones(CFG["context_length"], CFG["context_length"]), 1))
        self.window, self.sharpen = window, sharpen

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (split_heads(self, proj(x)) for proj in (self.W_query, self.W_key, self.W_value))
        scores = q @ k.transpose(2, 3) * (self.sharpen / self.head_dim ** 0.5)
        position = torch.arange(t)
        hidden = self.mask.bool()[:t, :t] | (position[None, :] <= position[:, None] - self.window)
        weights = torch.softmax(scores.masked_fill(hidden, -torch.inf), dim=-1)
        return self.out_proj((weights @ v).transpose(1, 2).reshape(b, t, self.d_out))


@pytest.mark.parametrize("prompt_len, window, sharpen", [(3, 4, 1.0), (1, 16, 0.0)], ids=["window", "scale"])
def test_a_notebook_attention_that_differs_only_past_the_prompt_runs_its_own_forward(prompt_len, window, sharpen):
    """The prompt's logits cannot show a window wider than the prompt, nor a changed scale when the prompt is one
    token (a softmax over one key is 1): the check at the run's length does, and generation keeps the model's
    forward, as the reference does."""
    model = make_model()
    torch.manual_seed(4)
    for param in model.parameters():
        torch.nn.init.normal_(param, std=1.0)  # large weights: a changed attention changes the greedy tokens
    plain = copy.deepcopy(model)
    for block in model.trf_blocks:
        block.att = _NotebookAttention(block.att, window, sharpen)
    idx = prompt(1, prompt_len)
    expected = ref_ch05.generate(model, idx, 12, 16)
    assert not torch.equal(expected, ref_ch05.generate(plain, idx, 12, 16))
    assert torch.equal(generate(model, idx, 12, 16), expected)
    assert torch.equal(generate_batch(model, idx, 12).tokens, expected)


@pytest.mark.parametrize("change", ["other heads", "another block class"])
def test_a_block_unlike_the_first_runs_through_the_models_forward(change):
    """One cache, sized from the first block, serves every layer: a later block with other heads, or of a kind
    the walk cannot read (the reference's fast block), leaves generation to the model's forward."""
    from gptfast.models.gpt import TransformerBlock

    model = make_model()
    torch.manual_seed(3)
    if change == "other heads":
        model.trf_blocks[1] = TransformerBlock({**CFG, "n_heads": 2}).eval()
    else:
        model.trf_blocks[1] = ref_ch04.TransformerBlockFast(CFG).eval()
    idx = prompt(2, 5)
    assert torch.equal(generate(model, idx, 6, 16), ref_ch05.generate(model, idx, 6, 16))


def test_a_model_without_blocks_generates_like_the_reference():
    model = make_model(n_layers=0)
    idx = prompt(2, 4)
    assert torch.equal(generate(model, idx, 5, 16), ref_ch05.generate(model, idx, 5, 16))
    assert torch.equal(generate_text_simple(model, idx, 5, 16), ref_ch04.generate_text_simple(model, idx, 5, 16))


def test_which_forwards_the_cached_passes_may_stand_in_for():
    """A copy of the book's classes outside gptfast (a notebook's) keeps the cached passes, and so does a
    torch.compile wrapper; a subclass replacing a gptfast or reference forward does not."""
    from gptfast.generation.cache import walk_reproduces_forward
    from gptfast.models.blocks import overrides_library_forward
    from gptfast.models.gpt import TransformerBlock

    class NotebookBlock(torch.nn.Module):  # the book's code, copied: its own class, its own forward
        def forward(self, x):
            return x

    class Tweaked(TransformerBlock):
        def forward(self, x):
            return super().forward(x) * 2

    class Renamed(TransformerBlock):  # inherits the library's forward
        pass

    assert not overrides_library_forward(NotebookBlock) and not overrides_library_forward(Renamed)
    assert overrides_library_forward(Tweaked) and not overrides_library_forward(GPTModel)
    model = make_model()
    assert walk_reproduces_forward(model) and walk_reproduces_forward(torch.compile(model))
    model.trf_blocks[1].__class__ = Tweaked
    assert not walk_reproduces_forward(model)


def test_unset_per_row_top_k_keeps_every_logit_of_a_wrapped_head():
    """Rows with top_k None keep the whole vocabulary even when the head is not a plain nn.Linear."""
    from gptfast import appendix_e
    from gptfast.generation.decoding import Decoder

    model = make_model()
    appendix_e.replace_linear_with_lora(model, rank=2, alpha=4)
    decoder = Decoder(model, [torch.tensor([1, 2, 3])], 3, 16, 1.0, [None], None, None)
    assert decoder.top_k == CFG["vocab_size"]
    assert generate(model, prompt(1, 4), 3, 16).shape == (1, 7)


def test_a_top_k_past_the_vocabulary_of_a_lora_head_is_refused_before_the_prompt_runs():
    from gptfast import appendix_e

    model = make_model()
    appendix_e.replace_linear_with_lora(model, rank=2, alpha=4)
    calls = []
    model.tok_emb.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="top_k"):
        generate(model, prompt(1, 4), 3, 16, top_k=CFG["vocab_size"] + 1)
    assert calls == []


def test_a_patched_linear_forward_is_used_and_kept():
    """A forward set on an ``nn.Linear`` instance (as wrappers do) computes the layer, and it is still there after
    generation (the decode-time routing never replaces or removes it)."""
    model = make_model()
    original = model.out_head.forward

    def boosted(x):
        out = original(x)
        out[..., 7] += 1000.0
        return out

    model.out_head.forward = boosted
    idx = prompt(1, 4)
    out = generate(model, idx, 5, 16)
    assert torch.equal(out[:, 4:], torch.full((1, 5), 7))
    assert model.out_head.__dict__.get("forward") is boosted
    with ops.use_backend("auto"):
        generate(model, idx, 3, 16)
    assert model.out_head.__dict__.get("forward") is boosted


def test_a_classifier_head_samples_over_its_own_outputs():
    """The sampler takes the logits' width (the head's outputs), not the embedding's rows."""
    model = make_model()
    torch.manual_seed(3)
    model.out_head = torch.nn.Linear(CFG["emb_dim"], 2)
    idx = prompt(1, 4) % 2
    assert torch.equal(generate(model, idx, 3, 16), ref_ch05.generate(model, idx, 3, 16))
    assert_seeded_draws_match(model, idx, 3, 16, seed=5, temperature=1.0)


def test_zero_dimensional_tensors_pass_as_ints():
    model = make_model()
    idx = prompt(1, 4)
    expected = ref_ch05.generate(model, idx, 6, 16, eos_id=int(ref_ch05.generate(model, idx, 3, 16)[0, -1]))
    eos = torch.tensor(int(expected[0, -1]))
    got = generate(model, idx, torch.tensor(6), torch.tensor(16), eos_id=eos)
    assert torch.equal(got, ref_ch05.generate(model, idx, torch.tensor(6), torch.tensor(16), eos_id=eos))


def test_generation_leaves_the_model_and_autograd_alone():
    model = make_model()
    model.train()
    before = [p.clone() for p in model.parameters()]
    out = generate(model, prompt(1, 3), 5, 16)
    assert model.training and not out.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ----------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("eos_offset", [None, 5])
def test_stream_yields_exactly_the_generated_tokens(eos_offset):
    model = make_model()
    idx = prompt(2, 4)
    eos = None if eos_offset is None else int(generate(model, idx, 12, 6)[0, 4 + eos_offset])
    torch.manual_seed(8)
    streamed = list(generate_stream(model, idx, 12, 6, temperature=0.9, eos_id=eos))
    torch.manual_seed(8)
    full = generate(model, idx, 12, 6, temperature=0.9, eos_id=eos)
    assert all(t.shape == (2, 1) for t in streamed)
    assert torch.equal(torch.cat([idx, *streamed], dim=1), full)


def test_stream_text_yields_the_tokens_and_their_text():
    from gptfast.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    model = make_model(vocab_size=50257)
    ids = torch.tensor([tokenizer.encode("Every effort moves you")])
    chunks = list(stream_text(model, ids, 15, tokenizer))
    expected = generate(model, ids, 15, CFG["context_length"])[0, ids.shape[1]:].tolist()
    assert all(isinstance(c, TextChunk) for c in chunks)
    assert [c.token_id for c in chunks if c.token_id is not None] == expected
    assert "".join(c.text for c in chunks) == tokenizer.decode(expected)


@pytest.mark.parametrize("with_bytes", [False, True], ids=["text only", "decode_bytes"])
def test_stream_text_holds_back_split_characters(with_bytes):
    class ByteTokenizer:  # token i is byte i: "é" is two tokens
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    class ByteTokenizerWithBytes(ByteTokenizer):  # as tiktoken's encodings: the bytes themselves too
        def decode_bytes(self, ids):
            return bytes(ids)

    from gptfast.generation.api import _text_chunks
    tokenizer = ByteTokenizerWithBytes() if with_bytes else ByteTokenizer()
    stream = (torch.tensor([[t]]) for t in "aé€😀b".encode())
    chunks = list(_text_chunks(stream, tokenizer))
    assert [c.text for c in chunks] == ["a", "", "é", "", "", "€", "", "", "", "😀", "b"]
    dangling = list(_text_chunks((torch.tensor([[t]]) for t in "a€".encode()[:3]), tokenizer))
    assert dangling[-1].token_id is None and "".join(c.text for c in dangling) == "a\ufffd"


# ----------------------------------------------------------------------------- batches of different prompts


def alone(model, row, n, context_size, **kwargs):
    return generate(model, torch.tensor([row]), n, context_size, **kwargs)[0]


@pytest.mark.parametrize("context_size", [16, 7])
def test_batch_of_different_lengths_equals_each_row_alone(context_size):
    model = make_model()
    rows = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [17], [18, 19, 20]]
    result = generate_batch(model, rows, 12, context_size=context_size, pad_id=-1)
    assert isinstance(result, GenerationResult)
    assert result.lengths.tolist() == [len(r) + 12 for r in rows]
    assert result.prompt_lengths.tolist() == [len(r) for r in rows]
    for i, row in enumerate(rows):
        assert torch.equal(result.row(i), alone(model, row, 12, context_size)), f"row {i}"
        assert torch.equal(result.new_tokens(i), result.row(i)[len(row):])
    assert (result.tokens[2, result.lengths[2]:] == -1).all()
    assert not result.stopped_at_eos.any()


def test_batch_prompt_longer_than_the_context_is_cropped_like_the_reference():
    model = make_model()
    rows = [list(range(1, 21)), [3, 4]]
    result = generate_batch(model, rows, 6, context_size=8)
    for i, row in enumerate(rows):
        assert torch.equal(result.row(i), ref_ch05.generate(model, torch.tensor([row]), 6, 8)[0])


def test_batch_per_row_temperature_top_k_and_eos():
    model = make_model()
    rows = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    greedy = [alone(model, r, 10, 16) for r in rows]
    eos_row1 = int(greedy[1][2 + 3])  # row 1's fourth new token
    result = generate_batch(model, rows, 10, context_size=16, temperature=[0.0, 0.0, 1.5], top_k=[3, None, 7],
                            eos_id=[None, eos_row1, -1], generator=torch.Generator().manual_seed(0))
    assert torch.equal(result.row(0), alone(model, rows[0], 10, 16, top_k=3))
    assert torch.equal(result.row(1), greedy[1][:2 + 3])
    assert result.stopped_at_eos.tolist() == [False, True, False]
    assert result.lengths.tolist() == [13, 5, 14]
    sampled = result.new_tokens(2)
    again = generate_batch(model, rows, 10, context_size=16, temperature=[0.0, 0.0, 1.5], top_k=[3, None, 7],
                           eos_id=[None, eos_row1, -1], generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.tokens, result.tokens)
    with torch.no_grad():  # every sampled token is within the top 7 of its step's logits
        for j, token in enumerate(sampled.tolist()):
            logits = model(result.row(2)[:4 + j].unsqueeze(0))[0, -1]
            assert token in torch.topk(logits, 7).indices.tolist()


def test_finished_rows_stop_costing_work(monkeypatch):
    model = make_model()
    batch_sizes = []
    real = CachedRunner.decode

    def counting(self, tokens, cache, positions):
        batch_sizes.append((tokens.shape[0], cache.batch))
        return real(self, tokens, cache, positions)

    monkeypatch.setattr(CachedRunner, "decode", counting)
    rows = [[5, 6, 7], [8, 9, 10], [11, 12, 13]]
    eos = int(alone(model, rows[0], 10, 16)[3 + 1])  # row 0's second new token
    batch_sizes.clear()
    result = generate_batch(model, rows, 10, context_size=16, eos_id=[eos, -1, -1])
    assert result.stopped_at_eos.tolist() == [True, False, False]
    assert batch_sizes[0] == (3, 3) and batch_sizes[-1] == (2, 2)
    assert len(batch_sizes) == 9


@pytest.mark.parametrize("slow_threads,expected", [(2, 1), (1, 2)])
def test_decode_steps_run_with_the_faster_thread_count(monkeypatch, slow_threads, expected):
    import gptfast.generation.decoding as decoding

    clock = [0.0]
    monkeypatch.setattr(decoding.time, "perf_counter", lambda: clock[0])
    monkeypatch.delenv("GPTFAST_DECODE_THREADS", raising=False)
    torch.set_num_threads(2)  # the fixture restores the caller's setting
    chooser = decoding.DecodeThreads()
    seen = []

    def step():
        seen.append(torch.get_num_threads())
        clock[0] += 5.0 if seen[-1] == slow_threads else 1.0
        return seen[-1]

    assert [chooser.run(step) for _ in range(7)] == [2, 1, 2, 1] + [expected] * 3
    assert torch.get_num_threads() == 2
    monkeypatch.setenv("GPTFAST_DECODE_THREADS", "1")
    assert decoding.DecodeThreads().run(lambda: torch.get_num_threads()) == 1
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("value", ["two", "0", "-1", "1.5"])
def test_a_bad_decode_thread_count_is_named(monkeypatch, value):
    import gptfast.generation.decoding as decoding

    monkeypatch.setenv("GPTFAST_DECODE_THREADS", value)
    with pytest.raises(ValueError, match="GPTFAST_DECODE_THREADS"):
        decoding.DecodeThreads()
    monkeypatch.setenv("GPTFAST_DECODE_THREADS", " ")
    assert decoding.DecodeThreads().chosen in (None, 1)


def test_bfloat16_decoding_agrees_with_float32():
    model = make_model()
    converted = prepare_model(model, torch.bfloat16)
    assert converted is not model and model.trf_blocks[0].att.W_key.weight.dtype == torch.float32
    assert converted.trf_blocks[0].att.W_key.weight.dtype == torch.bfloat16
    assert "mask" in dict(converted.trf_blocks[0].att.named_buffers())  # the model's own forward may need it
    assert prepare_model(model) is model
    idx = prompt(2, 6)
    with torch.no_grad():
        want = model(idx)[:, -1]
    got = CachedRunner(converted).prefill(idx, KVCache.for_model(converted, 2, 8))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.05)
    result = generate_batch(model, idx, 5, dtype=torch.bfloat16)
    assert result.tokens.shape == (2, 11)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_gets_clear_errors():
    model = make_model()
    idx = prompt(1, 3)
    with pytest.raises(ValueError, match="idx must be a non-empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 5, 16)
    with pytest.raises(ValueError, match="idx must be a non-empty"):
        generate(model, torch.tensor([1, 2, 3]), 5, 16)
    with pytest.raises(TypeError, match="idx must hold integer"):
        generate(model, idx.float(), 5, 16)
    with pytest.raises(TypeError, match="idx must be"):
        generate(model, [[1, 2]], 5, 16)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        generate(model, idx, -1, 16)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        generate_stream(model, idx, -1, 16)
    with pytest.raises(TypeError, match="max_new_tokens must be an int"):
        generate(model, idx, 2.5, 16)
    with pytest.raises(ValueError, match="context_size must be >= 1"):
        generate(model, idx, 5, 0)
    with pytest.raises(ValueError, match="context_size 40 .* only 16 positions"):
        generate(model, idx, 30, 40)
    with pytest.raises(ValueError, match="token id 500"):
        generate(model, torch.tensor([[1, 500]]), 5, 16)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate(model, idx, 5, 16, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k must be in"):
        generate(model, idx, 5, 16, top_k=0)
    with pytest.raises(ValueError, match="prompt 1 must be a non-empty"):
        generate_batch(model, [[1], []], 5)
    with pytest.raises(ValueError, match="at least one prompt"):
        generate_batch(model, [], 5)
    with pytest.raises(ValueError, match="temperature must be a number or have one value per prompt"):
        generate_batch(model, [[1], [2]], 5, temperature=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="eos_id must be an int or have one value per prompt"):
        generate_batch(model, [[1], [2]], 5, eos_id=[1])
    # named before any model work: values that are no numbers, fractional top_k, and pad_id
    for kwargs, message in [(dict(temperature=[1.0, None]), "temperature must be a number"),
                            (dict(temperature="1"), "temperature must be a number"),
                            (dict(eos_id="3"), "eos_id must be a number"),
                            (dict(top_k=[1.9, 1.9]), "top_k must hold integers"),
                            (dict(pad_id=None), "pad_id must be an int"), (dict(pad_id=0.7), "pad_id must be an int")]:
        with pytest.raises(TypeError, match=message):
            generate_batch(model, [[1], [2]], 5, **kwargs)
    with pytest.raises(ValueError, match="pad_id must fit in int64"):
        generate_batch(model, [[1], [2]], 5, pad_id=2**70)
    # booleans among per-row numbers (torch.as_tensor would read them as 1 / 1.0), ids past int64
    for kwargs in (dict(eos_id=[True, 2]), dict(temperature=1.0, top_k=[True, 3]), dict(temperature=[True, 1.0])):
        with pytest.raises(TypeError, match="must hold numbers, not booleans"):
            generate_batch(model, [[1], [2]], 5, **kwargs)
    for eos_id in (2**63, [2**63, 1], [1, -2**63 - 1]):
        with pytest.raises(ValueError, match="eos_id must fit in int64"):
            generate_batch(model, [[1], [2]], 5, eos_id=eos_id)
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA model"):
            generate_batch(model, [[1]], 5, cuda_graph=True)
    runner, cache = CachedRunner(model), KVCache.for_model(model, 1, 4)
    with pytest.raises(ValueError, match="does not fit the cache's max_len 4"):
        runner.prefill(prompt(1, 5), cache)
    with pytest.raises(ValueError, match="does not fit the cache's max_len 4"):
        runner.decode(prompt(1, 1), cache, 4)
    with pytest.raises(ValueError, match="max_len 17 exceeds the model's context length 16"):
        KVCache.for_model(model, 1, 17)
    with pytest.raises(ValueError, match="max_len must be a positive int"):
        KVCache(2, 1, 4, 0, 8)
    with pytest.raises(TypeError, match="lacks"):
        CachedRunner(torch.nn.Linear(2, 2))


def test_zero_new_tokens_returns_the_prompt():
    model = make_model()
    idx = prompt(2, 3)
    assert torch.equal(generate(model, idx, 0, 16), idx)
    # As the reference's loop: nothing generated (no step, or an eos first) returns the input tensor itself.
    small = prompt(1, 3).to(torch.int32)
    eos = int(ref_ch05.generate(model, small, 1, 16)[0, -1])
    for steps, eos_id in ((0, None), (4, eos)):
        assert ref_ch05.generate(model, small, steps, 16, eos_id=eos_id) is small
        assert generate(model, small, steps, 16, eos_id=eos_id) is small
    assert list(generate_stream(model, idx, 0, 16)) == []
    assert generate_batch(model, [[1, 2]], 0).lengths.tolist() == [2]


# ----------------------------------------------------------------------------- CUDA


def test_captured_steps_are_reused_only_when_free_and_for_the_same_weights(monkeypatch):
    import gptfast.generation.cuda_graphs as cuda_graphs

    class FakeGraph:  # stands in for the CUDA capture; records what would be captured
        busy = False

        def __init__(self, runner, cache):
            self.runner, self.cache = runner, cache

    monkeypatch.setattr(cuda_graphs, "CUDAGraphDecoder", FakeGraph)
    monkeypatch.setattr(cuda_graphs, "_GRAPHS", {})
    model = make_model()
    runner = CachedRunner(model)
    first = cuda_graphs.captured_decoder(runner, 2, 8)
    assert first.busy and first.cache.batch == 2 and first.cache.max_len == 8
    second = cuda_graphs.captured_decoder(runner, 2, 8)  # the first is still in use: a private one
    assert second is not first and cuda_graphs._GRAPHS[(id(model), 2, 8, ops.get_backend())][0] is first
    first.busy = False
    assert cuda_graphs.captured_decoder(runner, 2, 8) is first
    first.busy = False
    assert cuda_graphs.captured_decoder(runner, 3, 8) is not first
    with ops.use_backend("auto"):  # another backend selection: other kernels, so another capture
        assert cuda_graphs.captured_decoder(runner, 2, 8) is not first
    first.busy = False
    model.out_head.weight = torch.nn.Parameter(model.out_head.weight.clone())  # new tensors: capture again
    assert cuda_graphs.captured_decoder(runner, 2, 8) is not first
    for change in ("activation", "buffer", "inference"):  # each is another capture
        for held, _ in cuda_graphs._GRAPHS.values():
            held.busy = False
        last = cuda_graphs.captured_decoder(runner, 2, 8)
        last.busy = False
        assert cuda_graphs.captured_decoder(runner, 2, 8) is last
        last.busy = False
        if change == "activation":  # a module without weights swapped for another
            model.trf_blocks[0].ff.layers[1] = torch.nn.ReLU()
        elif change == "buffer":
            model.trf_blocks[0].att.mask = model.trf_blocks[0].att.mask.clone()
        with torch.inference_mode(change == "inference"):
            assert cuda_graphs.captured_decoder(runner, 2, 8) is not last
    cuda_graphs.clear_cuda_graphs()
    assert not cuda_graphs._GRAPHS



needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@needs_cuda
def test_cuda_graph_decoding_equals_eager_decoding():
    model = make_model().cuda()
    rows = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    eager = generate_batch(model, rows, 20, context_size=12, cuda_graph=False)
    graphed = generate_batch(model, rows, 20, context_size=12, cuda_graph=True)
    assert torch.equal(graphed.tokens, eager.tokens)
    again = generate_batch(model, rows, 20, context_size=12, cuda_graph=True)  # the captured step is reused
    assert torch.equal(again.tokens, eager.tokens)
    idx = prompt(2, 4).cuda()
    assert torch.equal(generate(model, idx, 20, 16), ref_ch05.generate(model, idx, 20, 16))
    eos = int(eager.tokens[0, 3 + 2])
    assert torch.equal(generate_batch(model, rows, 20, context_size=12, eos_id=eos).tokens,
                       generate_batch(model, rows, 20, context_size=12, eos_id=eos, cuda_graph=False).tokens)


@needs_cuda
def test_cuda_graph_bfloat16_decoding_tracks_float32():
    model = make_model().cuda()
    bf16 = prepare_model(model, torch.bfloat16)
    runner = CachedRunner(bf16)
    cache = KVCache.for_model(bf16, 2, 16)
    from gptfast.generation import CUDAGraphDecoder

    graph = CUDAGraphDecoder(runner, cache)
    idx = prompt(2, 9).cuda()
    runner.prefill(idx[:, :4], cache)
    with torch.no_grad():
        want = model(idx)
    for p in range(4, 9):
        got = graph.step(idx[:, p:p + 1], torch.full((2,), p, device="cuda"))
        torch.testing.assert_close(got.float(), want[:, p], atol=0.05, rtol=0.05)
    fp32 = generate_batch(model, idx, 30).tokens
    low = generate_batch(bf16, idx, 30).tokens
    assert (fp32 == low).float().mean() >= 0.8


# ----------------------------------------------------------------------------- non-integer prompt ids


def test_float_prompt_ids_are_refused_not_rounded():
    import gptfast.ch04 as ch04
    import gptfast.ch05 as ch05

    model = make_model()
    floats = torch.tensor([[1.5, 2.0, 3.0]])
    for fn in (generate, ch05.generate, generate_text_simple, ch04.generate_text_simple):
        with pytest.raises(TypeError, match="idx must hold integer token ids"):
            fn(model, floats, 2, 8)
    with pytest.raises(TypeError, match="idx must hold integer token ids"):
        generate_stream(model, floats, 2, 8)
    with pytest.raises(TypeError, match="prompt 1 must hold integer token ids"):
        generate_batch(model, [[1, 2], [1.5, 2.0]], 2)
    with pytest.raises(TypeError, match="prompt 0 must hold integer token ids"):
        generate_batch(model, [torch.tensor([1.0, 2.0])], 2)
    with pytest.raises(TypeError, match="prompts must hold integer token ids"):
        generate_batch(model, floats, 2)
    with pytest.raises(TypeError, match="prompt_ids must hold integer token ids"):
        list(stream_text(model, [1.5, 2.0], 2, tokenizer=None, context_size=8))
    with pytest.raises(TypeError, match="prompt_ids must hold integer token ids"):
        list(stream_text(model, floats, 2, tokenizer=None, context_size=8))
    # Integer ids of every width still work, as before.
    ints = torch.tensor([[1, 2, 3]])
    assert torch.equal(generate(model, ints.to(torch.int32), 2, 8).long(), generate(model, ints, 2, 8))
    assert torch.equal(generate_batch(model, [[1, 2, 3]], 2).tokens, generate(model, ints, 2, 8))


def test_static_shape_decode_step_matches_the_model_on_cpu():
    """The step CUDA graphs capture (whole cache, per-row key mask) computes the model's logits."""
    model = make_model()
    runner = CachedRunner(model)
    idx = prompt(2, 7)
    cache = KVCache.for_model(model, 2, 12)
    runner.prefill(idx[:, :5], cache)
    with torch.no_grad():
        want = model(idx)
    for p in (5, 6):
        got = runner.decode_static(idx[:, p:p + 1], cache, torch.tensor([p, p]))
        torch.testing.assert_close(got, want[:, p], atol=1e-5, rtol=1e-5)
    # Rows at different positions: row 1 steps again at position 6 while row 0 is at 5.
    other = KVCache.for_model(model, 2, 12)
    runner.prefill(idx[:, :5], other)
    runner.decode_static(idx[:, 5:6], other, torch.tensor([5, 5]))
    got = runner.decode_static(torch.stack([idx[0, 5:6], idx[1, 6:7]]), other, torch.tensor([5, 6]))
    torch.testing.assert_close(got[1], want[1, 6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], want[0, 5], atol=1e-5, rtol=1e-5)


def test_sampling_arguments_are_checked_once_per_call_not_per_token(monkeypatch):
    from gptfast.ops import _checks

    calls = []
    real = _checks.normalize_sampling_args
    monkeypatch.setattr(_checks, "normalize_sampling_args", lambda *a: calls.append(1) or real(*a))
    out = generate_batch(make_model(), [prompt(1, 3)[0], prompt(1, 5, seed=2)[0]], max_new_tokens=6,
                         temperature=torch.tensor([0.0, 0.7]), top_k=[None, 5],
                         generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1
    assert [out.row(r).shape[0] for r in range(2)] == [3 + 6, 5 + 6]


def test_a_sampler_refuses_logits_of_another_shape():
    draw = ops.sampler(2, 7, torch.device("cpu"), temperature=0.5, top_k=3)
    assert draw(torch.randn(2, 7)).shape == (2, 1)
    with pytest.raises(ValueError, match="shape"):
        draw(torch.randn(3, 7))
    with pytest.raises(ValueError, match="top_k"):
        ops.sampler(2, 7, torch.device("cpu"), top_k=8)


def test_a_forward_patched_onto_a_library_class_is_called(monkeypatch):
    """``FeedForward.forward = ...`` (on the class, not an instance) sends generation through the model's forward."""
    model = make_model()
    idx = prompt(2, 4)
    unchanged = ref_ch05.generate(model, idx, 8, 16)
    ff_class = type(model.trf_blocks[0].ff)
    original = ff_class.forward
    monkeypatch.setattr(ff_class, "forward", lambda self, x: original(self, x) * 0.0)
    expected = ref_ch05.generate(model, idx, 8, 16)
    assert not torch.equal(expected, unchanged)
    assert torch.equal(generate(model, idx, 8, 16), expected)
    with ops.use_backend("auto"):
        assert torch.equal(generate(model, idx, 8, 16), expected)


def test_a_converted_copy_keeps_what_the_models_own_forward_reads():
    """``dtype=`` on a model that runs its own forward (a hook here): the copy keeps the attention masks."""
    torch.manual_seed(0)
    model = ref_ch04.GPTModel(CFG).eval()  # the reference's attention reads its mask
    model.trf_blocks[0].register_forward_hook(lambda module, args, out: None)
    out = generate_batch(model, [[1, 2, 3]], 4, dtype=torch.bfloat16)
    assert out.tokens.shape[1] == 7
    converted = prepare_model(model, torch.bfloat16)
    assert converted(prompt(1, 3)).dtype == torch.bfloat16


def test_rows_keeping_the_whole_vocabulary_of_a_model_without_a_linear_head():
    """top_k None in a row keeps every logit even before the first logits tell how many there are."""
    class Fixed(torch.nn.Module):
        def forward(self, idx):
            return torch.arange(10.0).div(5).expand(*idx.shape, 10)

    def draw(top_k):
        return generate_batch(Fixed(), [[1], [1]], 8, context_size=4, temperature=1.0, top_k=top_k,
                              generator=torch.Generator().manual_seed(0)).tokens

    per_row = draw([None, None])
    assert torch.equal(per_row, draw(None)) and torch.equal(per_row, draw([10, 10]))
    assert len(set(per_row[0, 1:].tolist())) > 1  # sampled, not greedy


def test_a_real_replacement_character_streams_at_once():
    """U+FFFD as a token of its own is text, not half a character: each one is a chunk as it comes."""
    from gptfast.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    replacement = tokenizer.encode("\ufffd")
    assert len(replacement) == 1

    class Replacements(torch.nn.Module):
        def forward(self, idx):
            logits = torch.zeros(*idx.shape, 50257)
            logits[..., replacement[0]] = 1.0
            return logits

    chunks = list(stream_text(Replacements(), [1, 2], 4, tokenizer, context_size=8))
    assert [(c.token_id, c.text) for c in chunks] == [(replacement[0], "\ufffd")] * 4


def test_the_token_buffer_grows_with_the_run_instead_of_holding_every_requested_token():
    from gptfast.generation.decoding import Decoder

    model = make_model()
    decoder = Decoder(model, [torch.tensor([1, 2])], 10**9, 16, 0.0, None, None, None)
    assert decoder.seq.shape[1] <= 2 + 256  # not 10**9 tokens (8 GB) up front
    idx = prompt(2, 3)
    assert torch.equal(generate(model, idx, 300, 16), uncached_generate(model, idx, 300, 16))


def test_the_probe_tells_rounding_from_another_formula():
    from gptfast.generation.decoding import _same_logits

    g = torch.Generator().manual_seed(0)
    own = torch.randn(2, 50, generator=g) * 8
    rounded = own + torch.randn(2, 50, generator=g) * 0.3  # bf16 through many layers: ~4% of the row's size
    assert _same_logits(rounded, own, torch.bfloat16) and not _same_logits(rounded, own, torch.float32)
    assert not _same_logits(torch.randn(2, 50, generator=g) * 8, own, torch.bfloat16)  # another formula
    nan_row = own.clone()
    nan_row[0, 3] = float("nan")
    assert _same_logits(nan_row, nan_row.clone(), torch.float32) and not _same_logits(nan_row, own, torch.float32)
