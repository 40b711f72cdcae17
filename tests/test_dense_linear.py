"""The models' dense products (``gptfast.ops.linear.dense_linear``, ``gptfast.models.blocks.apply_linear``).

On an x86 CPU a large float32 layer's forward runs through oneDNN's product; everything else
is ``F.linear`` itself.  Checked here: values and first and second derivatives against
``F.linear``, which products go through oneDNN (the real size rule and forced small ones),
every fallback bit for bit, and that the models send their plain layers (attention
projections, feed-forwards, heads) through it while hooked layers, wrapped layers and backend
``"torch"`` keep the module's own call.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gptfast import ops
from gptfast.models import blocks
from gptfast.ops import linear as dense
from parity import ONEDNN_LIMITS, needs_onednn, spy_onednn

def _spy_onednn(monkeypatch, *, every_size=True):
    """Record the row count of each product oneDNN computes; with ``every_size`` any layer qualifies."""
    return spy_onednn(monkeypatch, limits=ONEDNN_LIMITS if every_size else ())


def _case(shape, out_features, in_features, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, in_features, generator=g, requires_grad=True)
    weight = torch.randn(out_features, in_features, generator=g, requires_grad=True)
    b = torch.randn(out_features, generator=g, requires_grad=True) if bias else None
    return x, weight, b


def _inputs(*tensors):
    return [t for t in tensors if t is not None]


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(7,), (2, 5)], ids=["rows", "batch-by-positions"])
def test_onednn_forward_matches_f_linear_values_and_gradients(monkeypatch, bias, shape):
    """Values and every gradient as F.linear's (float32 rounding), the forward through oneDNN."""
    calls = _spy_onednn(monkeypatch)
    x, weight, b = _case(shape, 30, 12, bias, seed=41)
    upstream = torch.randn(*shape, 30, generator=torch.Generator().manual_seed(1))
    ours = dense.dense_linear(x, weight, b)
    grads = torch.autograd.grad(ours, _inputs(x, weight, b), upstream)
    theirs = F.linear(x, weight, b)
    expected = torch.autograd.grad(theirs, _inputs(x, weight, b), upstream)
    assert calls == [math.prod(shape)] and ours.shape == (*shape, 30)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_onednn_forward_has_f_linear_s_second_derivative(monkeypatch):
    """A gradient penalty (create_graph) differentiates through the backward as through F.linear's."""
    calls = _spy_onednn(monkeypatch)
    x, weight, b = _case((6,), 20, 10, True, seed=43)

    def penalty(linear):
        out = torch.tanh(linear(x, weight, b))
        (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), [x, weight, b])

    ours, theirs = penalty(dense.dense_linear), penalty(F.linear)
    assert calls == [6]
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@needs_onednn
def test_size_rule_sends_large_layers_and_heads_to_onednn(monkeypatch):
    """Without patched limits: a 512x512 layer over 256 rows and a vocabulary-sized head over 2 rows go through
    oneDNN; the same layer over 8 rows and a 64x64 layer over 4096 rows stay on torch's BLAS."""
    calls = _spy_onednn(monkeypatch, every_size=False)
    g = torch.Generator().manual_seed(44)
    square, head, small = (torch.randn(512, 512, generator=g), torch.randn(dense.ONEDNN_MIN_VOCAB, 64, generator=g),
                           torch.randn(64, 64, generator=g))
    for rows, weight in ((256, square), (2, head), (8, square), (4096, small)):
        x = torch.randn(rows, weight.shape[1], generator=g)
        torch.testing.assert_close(dense.dense_linear(x, weight), F.linear(x, weight), rtol=1e-4, atol=1e-4)
    assert calls == [256, 2]
    assert dense.onednn_pays(256, square) and dense.onednn_pays(1, head)
    assert not dense.onednn_pays(8, square) and not dense.onednn_pays(4096, small)


@needs_onednn
def test_fallbacks_are_f_linear_bit_for_bit(monkeypatch):
    """bf16, a non-contiguous input or weight, an empty batch, CPU autocast, torch.func transforms and a torch
    without oneDNN's op: F.linear itself, never oneDNN."""
    calls = _spy_onednn(monkeypatch)
    g = torch.Generator().manual_seed(42)
    x, weight = torch.randn(6, 12, generator=g), torch.randn(30, 12, generator=g)
    cases = [(x.bfloat16(), weight.bfloat16()), (x.t().contiguous().t(), weight),
             (x, weight.t().contiguous().t()), (x[:0], weight)]
    for inp, w in cases:
        assert torch.equal(dense.dense_linear(inp, w), F.linear(inp, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dense.dense_linear(x, weight)
        assert out.dtype == torch.bfloat16 and torch.equal(out, F.linear(x, weight))
    rows = torch.func.vmap(lambda row: dense.dense_linear(row, weight))(x)
    assert torch.equal(rows, F.linear(x, weight))
    grad = torch.func.grad(lambda w: dense.dense_linear(x, w).sum())(weight)
    torch.testing.assert_close(grad, torch.func.grad(lambda w: F.linear(x, w).sum())(weight))
    assert calls == []
    monkeypatch.setattr(dense, "onednn_linear", lambda: None)
    assert torch.equal(dense.dense_linear(x, weight), F.linear(x, weight))


@needs_onednn
@pytest.mark.parametrize("case", ["input", "bias"])
def test_shapes_that_do_not_multiply_raise_f_linear_s_error(monkeypatch, case):
    """A wrong input width or bias length gets F.linear's own error, not oneDNN's."""
    calls = _spy_onednn(monkeypatch)
    x, weight = torch.randn(6, 12), torch.randn(30, 12)
    bias = torch.randn(29) if case == "bias" else None
    if case == "input":
        x = torch.randn(6, 11)
    with pytest.raises(RuntimeError) as ours:
        dense.dense_linear(x, weight, bias)
    with pytest.raises(RuntimeError) as theirs:
        F.linear(x, weight, bias)
    assert str(ours.value) == str(theirs.value) and calls == []


@needs_onednn
def test_compiled_model_layer_traces_f_linear(monkeypatch):
    """Under make_fx (what torch.compile's tracing sees) the product is aten's, not oneDNN's private op."""
    from torch.fx.experimental.proxy_tensor import make_fx
    calls = _spy_onednn(monkeypatch)
    x, weight = torch.randn(6, 12), torch.randn(30, 12)
    graph = make_fx(lambda inp, w: dense.dense_linear(inp, w))(x, weight)
    assert calls == [] and "mkldnn" not in graph.code
    torch.testing.assert_close(graph(x, weight), F.linear(x, weight))


def _tiny_models():
    from gptfast.models import GPTModel, GPTModelFast, llama3, qwen3
    torch.manual_seed(0)
    gpt_cfg = {"vocab_size": 50, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
               "drop_rate": 0.0, "qkv_bias": False}
    rotary = dict(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1, hidden_dim=24, n_kv_groups=1,
                  dtype=torch.float32)
    # Layers a forward computes through dense_linear: q, k, v, out, two (GPT) or three (SwiGLU) MLP layers, head.
    return [(GPTModel(gpt_cfg), 7), (GPTModelFast(gpt_cfg), 5),
            (llama3.Llama3Model({**rotary, "rope_base": 500_000.0, "rope_freq": None}), 8),
            (qwen3.Qwen3Model({**rotary, "head_dim": 8, "qk_norm": True, "rope_base": 1e6}), 8)]


@needs_onednn
def test_models_send_plain_layers_through_dense_linear(monkeypatch):
    """GPT, GPT fast, Llama 3 and Qwen3 forwards compute every plain layer (projections, MLP, head) through
    dense_linear with the backend's default, and call the modules under backend "torch"."""
    calls = _spy_onednn(monkeypatch)
    idx = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(3))
    for model, layers in _tiny_models():
        calls.clear()
        out = model(idx)
        assert calls == [10] * layers, type(model).__name__
        with ops.use_backend("torch"):
            reference = model(idx)
        assert len(calls) == layers
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_cached_passes_send_the_same_layers_through_dense_linear(monkeypatch):
    """The KV-cache GPT-2's cached pass computes q, k, v, out, the MLP and the head through dense_linear as the
    plain forward does, and its logits match the uncached ones."""
    from gptfast.kv_cache.gpt2 import GPTModel
    calls = _spy_onednn(monkeypatch)
    torch.manual_seed(0)
    model = GPTModel({"vocab_size": 50, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
                      "drop_rate": 0.0, "qkv_bias": False}).eval()
    idx = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(5))
    cached = model(idx, use_cache=True)
    assert calls == [10] * 7
    calls.clear()
    model.reset_kv_cache()
    torch.testing.assert_close(cached, model(idx), rtol=1e-5, atol=1e-5)
    assert calls == [10] * 7


@needs_onednn
def test_hooked_or_wrapped_layers_keep_their_module_call(monkeypatch):
    """A hook on a layer or the head runs (the module is called); a layer replaced by another module, or a GPT
    feed-forward whose Sequential was changed, runs as the user left it."""
    calls = _spy_onednn(monkeypatch)
    idx = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(4))
    model, layers = _tiny_models()[0]
    block = model.trf_blocks[0]
    seen = []
    hooks = [layer.register_forward_hook(lambda module, args, output: seen.append(output.shape))
             for layer in (block.att.W_query, block.ff.layers[0], model.out_head)]
    model(idx)
    for hook in hooks:
        hook.remove()
    assert seen == [(2, 5, 16), (2, 5, 64), (2, 5, 50)] and len(calls) == layers - 3
    calls.clear()
    block.ff.layers.append(torch.nn.Identity())
    model(idx)
    assert len(calls) == layers - 2  # the feed-forward's two layers now run inside its Sequential
    block.ff.layers = block.ff.layers[:3]
    block.att.out_proj = torch.nn.Sequential(block.att.out_proj)
    calls.clear()
    model(idx)
    assert len(calls) == layers - 1


@needs_onednn
def test_lora_sum_takes_the_base_product_through_dense_linear(monkeypatch):
    """A LoRA-wrapped layer's fused sum computes the base product through dense_linear and adds the low-rank update
    in place on its output: values and gradients as the plain ``linear(x) + lora(x)``."""
    from gptfast.finetuning.lora import LinearWithLoRA
    calls = _spy_onednn(monkeypatch)
    torch.manual_seed(6)
    layer = LinearWithLoRA(torch.nn.Linear(12, 20), rank=3, alpha=2.0)
    torch.nn.init.normal_(layer.lora.B)
    x = torch.randn(2, 5, 12, requires_grad=True)
    params = [x, layer.linear.weight, layer.linear.bias, layer.lora.A, layer.lora.B]
    ours = layer(x)
    grads = torch.autograd.grad(ours.square().sum(), params)
    assert calls == [10]
    theirs = F.linear(x, layer.linear.weight, layer.linear.bias) + layer.lora(x)
    expected = torch.autograd.grad(theirs.square().sum(), params)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_apply_linear_calls_any_other_module():
    """``apply_linear`` on a module that is not a plain nn.Linear is that module's call."""
    layer = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    x = torch.randn(2, 4)
    assert torch.equal(blocks.apply_linear(layer, x), layer(x))


def test_onednn_is_not_used_off_x86(monkeypatch):
    """On arm64 torch's BLAS (Accelerate, OpenBLAS) keeps the product: oneDNN was measured on x86-64 only."""
    dense.onednn_linear.cache_clear()
    monkeypatch.setattr(dense.platform, "machine", lambda: "arm64")
    try:
        assert dense.onednn_linear() is None
    finally:
        dense.onednn_linear.cache_clear()


def test_onednn_probe_leaves_the_random_state_alone():
    """The one-time check of oneDNN's linear uses fixed numbers: seeded runs draw the same after it."""
    dense.onednn_linear.cache_clear()
    before = torch.random.get_rng_state()
    dense.onednn_linear()
    assert torch.equal(torch.random.get_rng_state(), before)


def test_rule_comparison_script_runs_both_rules_and_restores_the_rule(tmp_path):
    """``benchmarks/dense_rule_ab.py`` on the tiny Llama step: both gptfast variants step every round, the
    reference too, and the size rule is the module's own again afterwards."""
    import os
    import pathlib
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[1]
    check = ("import sys; sys.argv = ['x']; sys.path.insert(0, 'benchmarks'); import dense_rule_ab as ab; "
             "from gptfast.ops import linear; rule = linear.onednn_pays; sys.path.insert(0, str(ab.BENCH_DIR)); "
             "times = ab.measure('book', 2); assert linear.onednn_pays is rule; "
             "print(sorted((name, len(ts)) for name, ts in times.items()))")
    env = dict(os.environ, GPTFAST_BENCH_LLAMA_TRAIN_TINY="1")
    done = subprocess.run([sys.executable, "-c", check], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[('heads', 2), ('layers', 2), ('reference', 2)]"
