"""The KV-cache variants of Llama 3 and Qwen3 against ``llms_from_scratch.kv_cache.{llama3,qwen3}``."""

import inspect

import pytest
import torch

from gptfast import ops
from hf_checkpoints import random_hf_state_dict

ref_llama = pytest.importorskip("llms_from_scratch.kv_cache.llama3", reason="llms-from-scratch is a test dependency")
import llms_from_scratch.ch04 as ref_ch04  # noqa: E402
import llms_from_scratch.kv_cache.generate as ref_generate  # noqa: E402
import llms_from_scratch.kv_cache.qwen3 as ref_qwen  # noqa: E402
import llms_from_scratch.kv_cache.utils as ref_utils  # noqa: E402

import gptfast.models.llama3 as llama_plain  # noqa: E402
import gptfast.models.llama3_cached as llama  # noqa: E402
import gptfast.models.qwen3 as qwen_plain  # noqa: E402
import gptfast.models.qwen3_cached as qwen  # noqa: E402
import gptfast.kv_cache.llama3 as dropin_llama  # noqa: E402
import gptfast.kv_cache.qwen3 as dropin_qwen  # noqa: E402

SCALING = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 16}
RATIOS = [pytest.param(4, id="ratio1"), pytest.param(2, id="ratio2"), pytest.param(1, id="ratio4")]


def llama_cfg(n_kv_groups=2, dtype=torch.float32):
    return {"vocab_size": 97, "context_length": 32, "emb_dim": 32, "n_heads": 4, "n_layers": 2, "hidden_dim": 48,
            "n_kv_groups": n_kv_groups, "rope_base": 500_000.0, "dtype": dtype, "rope_freq": dict(SCALING)}


def qwen_cfg(n_kv_groups=2, qk_norm=True, dtype=torch.float32, num_experts=0):
    cfg = {"vocab_size": 101, "context_length": 32, "emb_dim": 32, "hidden_dim": 40, "n_layers": 2, "n_heads": 4,
           "head_dim": 8, "n_kv_groups": n_kv_groups, "qk_norm": qk_norm, "dtype": dtype,
           "rope_base": 1_000_000.0, "num_experts": num_experts}
    if num_experts:
        cfg.update(num_experts_per_tok=2, moe_intermediate_size=24)
    return cfg


PAIRS = {"llama": (ref_llama, llama, "Llama3Model"), "qwen": (ref_qwen, qwen, "Qwen3Model"),
         # The drop-in module paths (gptfast.kv_cache.llama3 / .qwen3) re-export the same objects.
         "kv_cache.llama3": (ref_llama, dropin_llama, "Llama3Model"), "kv_cache.qwen3": (ref_qwen, dropin_qwen, "Qwen3Model")}


def _signature(obj):
    return [(p.name, p.kind, p.default) for p in inspect.signature(obj).parameters.values()]


@pytest.mark.parametrize("which", list(PAIRS))
def test_every_public_name_of_the_reference_exists_with_the_same_signature(which):
    ref, ours, _ = PAIRS[which]
    names = [n for n, o in vars(ref).items() if not n.startswith("_") and (inspect.isclass(o) or inspect.isfunction(o))
             and getattr(o, "__module__", "").startswith("llms_from_scratch")]
    assert len(names) >= 13, names
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
    assert configs and all(getattr(ours, n) == getattr(ref, n) for n in configs)


def test_kv_cache_has_the_references_interface():
    ours, theirs = llama.KVCache(3), ref_utils.KVCache(3)
    for cache in (ours, theirs):
        cache.update(1, ("k", "v"))
    assert ours.get_all() == theirs.get_all() == [None, ("k", "v"), None]
    ours.reset()
    assert ours.get_all() == [None, None, None] and ours.get(1) is None
    assert qwen.KVCache is llama.KVCache


def _pair(which, cfg, seed=123):
    ref, ours, cls = PAIRS[which]
    torch.manual_seed(seed)
    r = getattr(ref, cls)(cfg)
    torch.manual_seed(seed)
    o = getattr(ours, cls)(cfg)
    return r.eval(), o.eval()


def _stepwise(model, cache, prompt, chunks):
    """Prefill ``prompt``, then feed ``chunks`` (lists of token ids) one after another."""
    model.reset_kv_cache()
    outs = [model(prompt, cache=cache)]
    for chunk in chunks:
        outs.append(model(torch.tensor([chunk] * prompt.shape[0]), cache=cache))
    return outs


CHUNKS = [[5], [7, 8, 9], [11]]


def _check_bitwise_stepwise(which, cfg, r, o):
    prompt = torch.randint(0, cfg["vocab_size"], (2, 7))
    with torch.no_grad(), ops.use_backend("torch"):
        expected = _stepwise(r, ref_utils.KVCache(cfg["n_layers"]), prompt, CHUNKS)
        got = _stepwise(o, llama.KVCache(cfg["n_layers"]), prompt, CHUNKS)
    assert o.current_pos == r.current_pos == 7 + 5
    for step, (a, b) in enumerate(zip(got, expected)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"step {step} differs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n_kv_groups", RATIOS)
def test_llama_cached_steps_are_bitwise_the_references(n_kv_groups, dtype):
    cfg = llama_cfg(n_kv_groups, dtype)
    _check_bitwise_stepwise("llama", cfg, *_pair("llama", cfg))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("qk_norm", [True, False], ids=["qknorm", "no-qknorm"])
@pytest.mark.parametrize("n_kv_groups", RATIOS)
def test_qwen_cached_steps_are_bitwise_the_references(n_kv_groups, qk_norm, dtype):
    cfg = qwen_cfg(n_kv_groups, qk_norm, dtype)
    _check_bitwise_stepwise("qwen", cfg, *_pair("qwen", cfg))


def test_qwen_moe_cached_steps_are_bitwise_the_references():
    cfg = qwen_cfg(2, num_experts=4)
    r, o = _pair("qwen", cfg)
    params = random_hf_state_dict(o, seed=3)
    ref_qwen.load_weights_into_qwen(r, {"n_layers": 2, "num_experts": 4}, params)
    qwen.load_weights_into_qwen(o, {"n_layers": 2, "num_experts": 4}, params)
    _check_bitwise_stepwise("qwen", cfg, r, o)


@pytest.mark.parametrize("which,cfg", [("llama", llama_cfg(2)), ("qwen", qwen_cfg(1)), ("qwen", qwen_cfg(4, False))])
def test_cached_greedy_generation_equals_uncached_and_one_checkpoint_serves_both(which, cfg):
    plain_module = llama_plain if which == "llama" else qwen_plain
    _, cached = _pair(which, cfg)
    plain = getattr(plain_module, PAIRS[which][2])(cfg).eval()
    plain.load_state_dict(cached.state_dict(), strict=True)
    prompt = torch.randint(0, cfg["vocab_size"], (2, 5))
    with torch.no_grad():
        full = plain(prompt)
        cached.reset_kv_cache()
        cache = llama.KVCache(cfg["n_layers"])
        steps = [cached(prompt[:, :2], cache=cache)] + [cached(prompt[:, t:t + 1], cache=cache) for t in range(2, 5)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    # the reference's own generators drive our models
    out_cached = ref_generate.generate_text_simple(cached, prompt, max_new_tokens=10)
    out_plain = ref_ch04.generate_text_simple(plain, prompt, max_new_tokens=10, context_size=cfg["context_length"])
    assert out_cached.shape == (2, 15) and torch.equal(out_cached, out_plain)


@pytest.mark.parametrize("which", ["llama", "qwen"])
def test_positions_past_the_context_are_a_clear_error_and_change_nothing(which):
    cfg = llama_cfg(2) if which == "llama" else qwen_cfg(2)
    _, o = _pair(which, cfg)
    cache = llama.KVCache(cfg["n_layers"])
    with torch.no_grad():
        o(torch.zeros(1, 30, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="context_length 32"):
            o(torch.zeros(1, 3, dtype=torch.long), cache=cache)
        assert o.current_pos == 30 and cache.get(0)[0].shape[2] == 30
        o(torch.zeros(1, 2, dtype=torch.long), cache=cache)  # exactly full is fine
        assert o.current_pos == 32
        o.reset_kv_cache()
        with pytest.raises(ValueError, match="batch"):
            o(torch.zeros(3, 1, dtype=torch.long), cache=cache)  # a cache of batch 1 with 3 rows
        assert o.current_pos == 0  # the refused call hands its positions back


@pytest.mark.parametrize("which", ["llama", "qwen"])
def test_cached_apply_rope_offsets_match_the_reference(which):
    ref, ours, _ = PAIRS[which]
    cos, sin = ref.compute_rope_params(16, 10_000, 20)
    x = torch.randn(2, 3, 4, 16)
    for offset in (0, 5, 16):
        expected = ref.apply_rope(x, cos, sin, offset=offset)
        with ops.use_backend("torch"):  # the oracle: the reference's numbers bit for bit
            assert torch.equal(ours.apply_rope(x, cos, sin, offset=offset), expected)
        torch.testing.assert_close(ours.apply_rope(x, cos, sin, offset=offset), expected)
    with pytest.raises(ValueError, match="20 positions"):
        ours.apply_rope(x, cos, sin, offset=17)
