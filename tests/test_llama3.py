"""gptfast.llama3 against ``llms_from_scratch.llama3``: same API, same parameters, same logits."""

import base64
import math

import pytest
import torch

from gptfast import ops
from dropin_model_checks import (assert_blocks_of_the_users_get_the_references_mask, assert_loaded_like_the_reference,
                                 assert_logits_bitwise, assert_parameter_count, assert_same_public_api,
                                 assert_training_gradients_bitwise, seeded_pair)
from hf_checkpoints import random_hf_state_dict, write_checkpoint

ref = pytest.importorskip("llms_from_scratch.llama3", reason="llms-from-scratch is a test dependency")
import gptfast.llama3 as ours  # noqa: E402
from gptfast.models.hub import load_safetensors_folder  # noqa: E402

SCALING = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 16}


def tiny_cfg(n_kv_groups=2, n_heads=4, emb_dim=32, dtype=torch.float32, **extra):
    return {"vocab_size": 97, "context_length": 40, "emb_dim": emb_dim, "n_heads": n_heads, "n_layers": 2,
            "hidden_dim": 48, "n_kv_groups": n_kv_groups, "rope_base": 500_000.0, "dtype": dtype,
            "rope_freq": dict(SCALING), **extra}


# GQA ratios 1 (multi-head), 2 and 4 (multi-query with 4 heads).
RATIOS = [pytest.param(4, id="ratio1"), pytest.param(2, id="ratio2"), pytest.param(1, id="ratio4")]


def test_every_public_name_of_the_reference_exists_with_the_same_signature():
    assert_same_public_api(ours, ref, 14)
    for config in ("LLAMA32_CONFIG_1B", "LLAMA32_CONFIG_3B"):
        assert getattr(ours, config) == getattr(ref, config)


def _pair(cls_name, cfg, seed=123):
    return seeded_pair(ref, ours, cls_name, cfg, seed)


@pytest.mark.parametrize("n_kv_groups", RATIOS)
@pytest.mark.parametrize("cls_name", ["Llama3Model", "Llama3ModelFast"])
def test_state_dict_keys_shapes_dtypes_and_seeded_values_are_the_references(cls_name, n_kv_groups):
    r, o = _pair(cls_name, tiny_cfg(n_kv_groups, dtype=torch.bfloat16))
    rs, os_ = r.state_dict(), o.state_dict()
    assert list(rs) == list(os_)
    for key in rs:
        assert rs[key].dtype == os_[key].dtype and torch.equal(rs[key], os_[key]), key
    assert torch.equal(r.cos, o.cos) and torch.equal(r.sin, o.sin)
    assert "cos" not in os_  # non-persistent, as in the reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n_kv_groups", RATIOS)
@pytest.mark.parametrize("seq_len", [1, 9, 40])
def test_logits_are_bitwise_the_references_with_the_torch_backend(seq_len, n_kv_groups, dtype):
    cfg = tiny_cfg(n_kv_groups, dtype=dtype)
    r, o = _pair("Llama3Model", cfg)
    assert_logits_bitwise(r, o, cfg["vocab_size"], seq_len, dtype)


@pytest.mark.parametrize("n_kv_groups", RATIOS)
def test_fast_variant_matches_the_references_fast_and_our_plain_model(n_kv_groups):
    cfg = tiny_cfg(n_kv_groups)
    r_fast, o_fast = _pair("Llama3ModelFast", cfg)
    _, o_plain = _pair("Llama3Model", cfg)
    o_plain.load_state_dict(o_fast.state_dict())
    idx = torch.randint(0, cfg["vocab_size"], (3, 23))
    with torch.no_grad():
        # The default backend runs the plain model's fused op: equal up to fp32 rounding to the reference's SDPA.
        torch.testing.assert_close(o_fast(idx), r_fast(idx), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(o_fast(idx), o_plain(idx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n_kv_groups", RATIOS)
def test_fast_variant_is_bitwise_the_references_with_the_torch_backend(n_kv_groups, dtype):
    cfg = tiny_cfg(n_kv_groups, dtype=dtype)
    r_fast, o_fast = _pair("Llama3ModelFast", cfg)
    idx = torch.randint(0, cfg["vocab_size"], (2, 16))
    with ops.use_backend("torch"):
        mine, theirs = o_fast(idx), r_fast(idx)
        assert torch.equal(mine, theirs)
        mine.float().pow(2).mean().backward()
        theirs.float().pow(2).mean().backward()
    for (name, p), q in zip(o_fast.named_parameters(), r_fast.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_default_backend_matches_the_reference_within_fp32_tolerance():
    cfg = tiny_cfg(2)
    r, o = _pair("Llama3Model", cfg)
    idx = torch.randint(0, cfg["vocab_size"], (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(o(idx), r(idx), atol=1e-5, rtol=1e-5)


def test_training_gradients_are_bitwise_the_references_with_the_torch_backend():
    cfg = tiny_cfg(2)
    r, o = _pair("Llama3Model", cfg)
    assert_training_gradients_bitwise(r, o, cfg["vocab_size"])


@pytest.mark.parametrize("n_kv_groups", RATIOS)
def test_attention_with_an_explicit_mask_is_the_references(n_kv_groups):
    torch.manual_seed(0)
    d_in, d_out, heads, t = 24, 32, 4, 10
    r = ref.GroupedQueryAttention(d_in, d_out, heads, n_kv_groups)
    o = ours.GroupedQueryAttention(d_in, d_out, heads, n_kv_groups)
    o.load_state_dict(r.state_dict())
    cos, sin = ref.compute_rope_params(d_out // heads, 50_000, 16, SCALING)
    x = torch.randn(2, t, d_in)
    causal = torch.triu(torch.ones(16, 16, dtype=torch.bool), diagonal=1)  # larger than t: cut to t x t
    sliding = causal | torch.tril(torch.ones(16, 16, dtype=torch.bool), diagonal=-3)  # a 3-token window
    with ops.use_backend("torch"):
        for mask in (causal, sliding):
            assert torch.equal(o(x, mask, cos, sin), r(x, mask, cos, sin))
        # mask=None is the causal fast path and gives the same numbers as the explicit causal mask
        assert torch.equal(o(x, None, cos, sin), r(x, causal, cos, sin))


# ----------------------------------------------------------------------------- RoPE


def _llama3_inv_freq_float64(head_dim, theta, cfg):
    """Llama 3's frequency scaling written independently, in float64."""
    out = []
    low_wavelen = cfg["original_context_length"] / cfg["low_freq_factor"]
    high_wavelen = cfg["original_context_length"] / cfg["high_freq_factor"]
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(freq)
        elif wavelen > low_wavelen:
            out.append(freq / cfg["factor"])
        else:
            smooth = (cfg["original_context_length"] / wavelen - cfg["low_freq_factor"]) / (
                cfg["high_freq_factor"] - cfg["low_freq_factor"])
            out.append((1 - smooth) * freq / cfg["factor"] + smooth * freq)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("freq_config", [None, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_context_length": 64},
                                         {"factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 2.0,
                                          "original_context_length": 64}], ids=["plain", "scaled", "step"])
def test_rope_tables_with_llama3_frequency_scaling(freq_config):
    head_dim, theta, ctx = 16, 500_000, 256
    cos, sin = ours.compute_rope_params(head_dim, theta, ctx, freq_config)
    ref_cos, ref_sin = ref.compute_rope_params(head_dim, theta, ctx, freq_config)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    if freq_config is None:
        inv = torch.tensor([1.0 / theta ** (i / head_dim) for i in range(0, head_dim, 2)], dtype=torch.float64)
    else:
        inv = _llama3_inv_freq_float64(head_dim, theta, freq_config)
        # this head size spans all three regimes: kept, interpolated (none for a step), divided by factor
        plain = torch.tensor([1.0 / theta ** (i / head_dim) for i in range(0, head_dim, 2)], dtype=torch.float64)
        ratio = plain / inv
        assert ratio.min() == 1.0 and ratio.max() == pytest.approx(freq_config["factor"])
        step = freq_config["low_freq_factor"] == freq_config["high_freq_factor"]
        assert ((ratio > 1.0) & (ratio < freq_config["factor"] - 1e-9)).any() != step
    angles = torch.arange(ctx, dtype=torch.float64)[:, None] * inv[None, :]
    angles = torch.cat([angles, angles], dim=1)
    torch.testing.assert_close(cos.double(), torch.cos(angles), atol=1e-4, rtol=0)
    torch.testing.assert_close(sin.double(), torch.sin(angles), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_is_the_references_and_a_rotation(dtype):
    cos, sin = ours.compute_rope_params(32, 500_000, 64, SCALING)
    x = torch.randn(2, 3, 20, 32).to(dtype)
    expected = ref.apply_rope(x, cos, sin)
    with ops.use_backend("torch"):  # the oracle: the reference's numbers bit for bit
        assert torch.equal(ours.apply_rope(x, cos, sin), expected)
    got = ours.apply_rope(x, cos, sin)  # the default backend: the fused kernel where one serves
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, **({} if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)))
    # rotate-half pairs (i, i + D/2) keep their length; position 0 is the identity
    x32, got32 = ours.apply_rope(x.float(), cos, sin), x.float()
    pair_norm = lambda t: t[..., :16] ** 2 + t[..., 16:] ** 2  # noqa: E731
    torch.testing.assert_close(pair_norm(x32), pair_norm(got32), atol=1e-4, rtol=1e-4)
    assert torch.equal(x32[:, :, 0], got32[:, :, 0])


# ----------------------------------------------------------------------------- weights


def _hf_pair(cfg, tie_embeddings=False, seed=5):
    r, o = _pair("Llama3Model", cfg)
    return r, o, random_hf_state_dict(o, seed=seed, tie_embeddings=tie_embeddings)


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("tie_embeddings", [False, True], ids=["untied", "tied"])
def test_safetensors_checkpoint_loads_like_the_reference(tmp_path, shards, tie_embeddings, capsys):
    cfg = tiny_cfg(2)
    r, o, params = _hf_pair(cfg, tie_embeddings)
    loaded = load_safetensors_folder(write_checkpoint(params, tmp_path, shards))
    assert set(loaded) == set(params) and all(torch.equal(loaded[k], params[k]) for k in params)
    ours.load_weights_into_llama(o, {"n_layers": cfg["n_layers"]}, loaded)
    ref.load_weights_into_llama(r, {"n_layers": cfg["n_layers"]}, loaded)
    printed = capsys.readouterr().out
    assert printed.count("Model uses weight tying.") == (2 if tie_embeddings else 0)
    if tie_embeddings:
        assert torch.equal(o.out_head.weight, params["model.embed_tokens.weight"])
        assert o.out_head.weight.data_ptr() != o.tok_emb.weight.data_ptr()  # a copy, as in the reference
    # equal state dicts; back to Hugging Face names the same tensors come out; equal logits
    assert_loaded_like_the_reference(o, r, params, tie_embeddings, cfg["vocab_size"])


def test_loader_names_the_missing_or_misshapen_tensor():
    cfg = tiny_cfg(2)
    _, o, params = _hf_pair(cfg)
    missing = dict(params)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        ours.load_weights_into_llama(o, {"n_layers": 2}, missing)
    wrong = dict(params)
    wrong["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight"):
        ours.load_weights_into_llama(o, {"n_layers": 2}, wrong)
    with pytest.raises(ValueError, match="n_layers"):
        ours.load_weights_into_llama(o, {"n_layers": 3}, params)


def test_loading_a_folder_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_safetensors_folder(tmp_path)
    write_checkpoint({"a": torch.zeros(2), "b": torch.ones(2)}, tmp_path / "sharded", shards=2)
    (tmp_path / "sharded" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        load_safetensors_folder(tmp_path / "sharded")


# ----------------------------------------------------------------------------- tokenizer


def _write_bpe(path):
    """A tiny tiktoken BPE file: every byte, then merges spelling 'hello' and ' world'."""
    merges = [b"ll", b"he", b"hell", b"hello", b" w", b"or", b" wor", b"ld", b" world", b"\n\n"]
    tokens = [bytes([i]) for i in range(256)] + merges
    path.write_bytes(b"".join(base64.b64encode(t) + b" " + str(i).encode() + b"\n" for i, t in enumerate(tokens)))
    return path


@pytest.fixture
def tokenizers(tmp_path, monkeypatch):
    path = str(_write_bpe(tmp_path / "tokenizer.model"))
    # tiktoken's loader would copy the file into the repository's tiktoken cache: point it elsewhere.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    return ours.Llama3Tokenizer(path), ref.Llama3Tokenizer(path)


def test_tokenizer_and_chat_format_give_the_references_ids(tokenizers):
    mine, theirs = tokenizers
    assert mine.special == theirs.special and len(mine.special) == 5 + 253  # 3 reserved ids are named
    for text in ["hello world", "hello\n\nworld 123", "Ünïcödé, hello!"]:
        for bos, eos in [(False, False), (True, True)]:
            assert mine.encode(text, bos=bos, eos=eos) == theirs.encode(text, bos=bos, eos=eos)
        assert mine.decode(mine.encode(text)) == text
    assert mine.encode("hello world") == [259, 264]
    chat, ref_chat = ours.ChatFormat(mine), ref.ChatFormat(theirs)
    for system in (None, "Be brief."):
        ids = chat.encode("hello world", system_message=system)
        assert ids == ref_chat.encode("hello world", system_message=system)
        assert chat.decode(ids) == ref_chat.decode(ids)
    text = chat.decode(chat.encode("hi") + mine.encode(" hello"))
    assert ours.clean_text(text) == ref.clean_text(text) == "hello"
    assert ours.clean_text("no header") == "no header"


@pytest.mark.parametrize("layout", ["CR line endings", "CRLF line endings", "byte-order mark"])
def test_ranks_files_with_other_line_endings_or_a_bom_read_as_the_reference_reads_them(tokenizers, tmp_path, layout):
    _, theirs = tokenizers
    lines = _write_bpe(tmp_path / "plain.model").read_bytes().splitlines()
    data = {"CR line endings": b"\r".join(lines), "CRLF line endings": b"\r\n".join(lines),
            "byte-order mark": b"\xef\xbb\xbf" + b"\n".join(lines)}[layout]
    path = tmp_path / "other.model"
    path.write_bytes(data)
    mine = ours.Llama3Tokenizer(str(path))
    for text in ["hello world", "hello\n\nworld 123"]:
        assert mine.encode(text, bos=True, eos=True) == theirs.encode(text, bos=True, eos=True)


def test_missing_tokenizer_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        ours.Llama3Tokenizer(str(tmp_path / "tokenizer.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"aGVsbG8= 0\nnot-a-pair\n")
    with pytest.raises(ValueError, match="line 2"):
        ours.Llama3Tokenizer(str(bad))


# ----------------------------------------------------------------------------- bad input


def test_bad_head_counts_are_value_errors_naming_the_argument():
    with pytest.raises(ValueError, match="num_heads.*num_kv_groups"):
        ours.GroupedQueryAttention(32, 32, 4, 3)
    with pytest.raises(ValueError, match="d_out.*num_heads"):
        ours.GroupedQueryAttentionFast(32, 30, 4, 2)
    with pytest.raises(ValueError, match="num_kv_groups"):
        ours.GroupedQueryAttention(32, 32, 4, 0)
    with pytest.raises(ValueError, match="num_heads.*num_kv_groups"):
        ours.Llama3Model(tiny_cfg(n_kv_groups=3))
    with pytest.raises(ValueError, match="head_dim must be even"):
        ours.compute_rope_params(15)
    with pytest.raises(ValueError, match="freq_config lacks"):
        ours.compute_rope_params(16, freq_config={"factor": 8.0})


def test_bad_token_ids_and_positions_are_clear_errors():
    cfg = tiny_cfg(2)
    _, o = _pair("Llama3Model", cfg)
    with pytest.raises(ValueError, match="context_length 40"):
        o(torch.zeros(1, 41, dtype=torch.long))
    with pytest.raises(ValueError, match="token id 97"):
        o(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="token id -1"):
        o(torch.tensor([[-1, 2]]))
    for dtype in (torch.float32, torch.bool, torch.uint8, torch.int16):
        with pytest.raises(TypeError, match="in_idx must hold integer token ids as int64 or int32"):
            o(torch.zeros(1, 3, dtype=dtype))
    assert torch.equal(o(torch.tensor([[1, 2]], dtype=torch.int32)), o(torch.tensor([[1, 2]])))
    with pytest.raises(ValueError, match="2-D"):
        o(torch.zeros(3, dtype=torch.long))
    cos, sin = ours.compute_rope_params(8, context_length=4)
    with pytest.raises(ValueError, match="4 positions"):
        ours.apply_rope(torch.zeros(1, 1, 5, 8), cos, sin)


@pytest.mark.parametrize("config,total,without_embedding", [("LLAMA32_CONFIG_1B", 1_498_482_688, 1_235_814_400),
                                                            ("LLAMA32_CONFIG_3B", None, None)])
def test_real_configs_have_the_references_parameter_count(config, total, without_embedding):
    # Llama 3.2 1B: the figures the book's notebook prints
    assert_parameter_count(ours, ref, "Llama3Model", config, total, without_embedding)


def test_a_block_of_the_references_own_class_gets_the_mask_it_needs():
    cfg = tiny_cfg()
    r, o = _pair("Llama3Model", cfg)
    assert_blocks_of_the_users_get_the_references_mask(ref, r, o, cfg)


def test_the_causal_mask_lives_only_as_long_as_the_forward():
    """The mask handed to the blocks is not kept after the call (at a long context it is large)."""
    import gc

    from gptfast.models import layers

    cfg = tiny_cfg()
    _, o = _pair("Llama3Model", cfg)
    with torch.no_grad():
        o(torch.randint(0, cfg["vocab_size"], (1, 23)))
    gc.collect()
    assert (23, 23, torch.device("cpu")) not in layers._CAUSAL_MASKS


def test_inference_mode_runs_the_models_and_their_kv_cache_variants():
    """Masks made in inference mode have no version counter: recognised all the same."""
    import gptfast.kv_cache.llama3 as cached

    cfg = tiny_cfg()
    _, o = _pair("Llama3Model", cfg)
    x = torch.randint(0, cfg["vocab_size"], (1, 7))
    expected = o(x).detach()
    with torch.inference_mode():
        torch.testing.assert_close(o(x), expected)
        model = cached.Llama3Model(cfg).eval()
        model.load_state_dict(o.state_dict())
        torch.testing.assert_close(model(x, cache=cached.KVCache(cfg["n_layers"])), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_a_hook_editing_the_mask_in_place_is_honoured(mode):
    """A pre-hook that narrows the causal mask in place (a sliding window): gptfast's attention must see the edit and
    leave the fused causal op, in inference mode too (where a mask made there would count no edits)."""
    cfg = tiny_cfg(2)
    r, o = _pair("Llama3Model", cfg)

    def window(module, args):
        args[1].__ior__(torch.ones_like(args[1]).tril(-2))

    for model in (r, o):
        model.trf_blocks[0].register_forward_pre_hook(window)
    x = torch.randint(0, cfg["vocab_size"], (2, 9))
    context = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    with context:
        for _ in range(2):  # also once the edited mask is the cached one
            torch.testing.assert_close(o(x), r(x), atol=1e-5, rtol=1e-5)
