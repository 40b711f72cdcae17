"""Backend ``"cpu"`` (csrc/cpu C++ kernels) against the torch oracle, plus its own checks.

Tolerances: parity.TOLERANCES (fp32 2e-5/2e-4, bf16 2e-2, fp64 1e-10/1e-9) against the
oracle evaluated in float64.  The kernels accept float64 (accumulating in float64), so
gradcheck runs on them directly.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import parity
from gptfast import ops
from gptfast.models import gpt2_config
from gptfast.models import GPTModel
from gptfast.ops import cpu_ops, torch_ops

pytestmark = pytest.mark.skipif(cpu_ops.unavailable_reason() is not None,
                                reason=f"cpu backend unavailable: {cpu_ops.unavailable_reason()}")

DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def test_backend_is_listed():
    assert "cpu" in ops.available_backends()
    assert cpu_ops.DEVICES == ("cpu",)


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", parity.ATTENTION_SHAPES, ids=str)
def test_attention_parity(shape, dtype):
    parity.check_attention_parity("cpu", shape, dtype)


@pytest.mark.parametrize("shape", [(1, 2, 9, 9, 17), (2, 1, 3, 130, 40), (1, 1, 150, 150, 8), (1, 2, 65, 65, 16), (2, 2, 2, 300, 24)], ids=str)
def test_attention_parity_odd_head_dims_and_long(shape):
    parity.check_attention_parity("cpu", shape, torch.float32)


def test_attention_parity_float16():
    parity.check_attention_parity("cpu", (2, 3, 17, 17, 32), torch.float16)
    parity.check_attention_parity("cpu", (1, 2, 5, 40, 64), torch.float16)


def test_attention_parity_custom_scale():
    parity.check_attention_parity("cpu", (2, 2, 20, 33, 16), torch.float32, scale=0.3)


def test_attention_strided_views_match_contiguous():
    """The model passes q/k/v as transposed (B, T, H, D) views; results must not depend on layout."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 19, 3, 3 * 16, generator=g)
    views = [x[..., i * 16:(i + 1) * 16].transpose(1, 2) for i in range(3)]
    assert not views[0].is_contiguous()
    strided = ops.causal_attention(*views, backend="cpu")
    packed = ops.causal_attention(*(t.contiguous() for t in views), backend="cpu")
    torch.testing.assert_close(strided, packed, atol=0, rtol=0)
    # last dimension not unit-stride: handled by a copy in the wrapper
    odd = [t.transpose(2, 3).contiguous().transpose(2, 3) for t in views]
    assert odd[0].stride(-1) != 1
    torch.testing.assert_close(ops.causal_attention(*odd, backend="cpu"), packed, atol=0, rtol=0)


def test_attention_dropout_keep_rate_and_scaling():
    p, t = 0.3, 64
    scaled = _dropout_scaled_weights(2, 4, t, t, p, seed=0)
    visible = torch.ones(t, t, dtype=torch.bool).tril()
    # every visible weight is either dropped (0) or kept and scaled by exactly 1/(1-p)
    kept = scaled[..., visible]
    assert torch.all((kept.abs() < 1e-9) | ((kept - 1).abs() < 1e-9))
    assert torch.all(scaled[..., ~visible].abs() < 1e-12), "dropout must not un-mask future keys"
    n = kept.numel()
    rate = float((kept > 0.5).double().mean())
    assert abs(rate - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n), f"keep rate {rate} vs {1 - p}"


def test_attention_dropout_seeded_and_eval_mode():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 12, 8, generator=g) for _ in range(3))

    def run(seed, training=True):
        torch.manual_seed(seed)
        return ops.causal_attention(q, k, v, dropout_p=0.5, training=training, backend="cpu")

    assert torch.equal(run(5), run(5)), "same torch seed must give the same dropout mask"
    assert not torch.equal(run(5), run(6))
    expected = torch_ops.causal_attention(q, k, v)
    torch.testing.assert_close(run(5, training=False), expected, **parity.tol(torch.float32))
    dropped = ops.causal_attention(q, k, v, dropout_p=1.0, training=True, backend="cpu")
    assert torch.equal(dropped, torch.zeros_like(dropped)), "p=1 drops everything, as F.dropout does"


def _dropout_scaled_weights(b, h, tq, tk, p, seed):
    """The kernel's attention weights times (visible keys) * (1 - p): 1 where kept, 0 where dropped/masked.

    q = k = 0 makes every visible weight 1/visible; v = identity copies the weights to the output.
    """
    q = torch.zeros(b, h, tq, tk, dtype=torch.float64)
    k = torch.zeros(b, h, tk, tk, dtype=torch.float64)
    v = torch.eye(tk, dtype=torch.float64).expand(b, h, tk, tk).contiguous()
    torch.manual_seed(seed)
    out = ops.causal_attention(q, k, v, dropout_p=p, training=True, backend="cpu")
    visible_counts = torch.arange(tk - tq + 1, tk + 1, dtype=torch.float64).view(tq, 1)
    return out * visible_counts * (1 - p)


def _dropout_keep_mask(b, h, tq, tk, p, seed):
    """The kernel's keep mask as {0, 1} floats."""
    return (_dropout_scaled_weights(b, h, tq, tk, p, seed) > 0.5).double()


@pytest.mark.parametrize("tq", [16, 5, 2, 1])
def test_attention_dropout_backward_uses_forward_mask(tq):
    """Output and gradients equal the oracle's with the kernel's own mask applied explicitly."""
    b, h, t, p, seed = 1, 2, 16, 0.25, 11
    mask = _dropout_keep_mask(b, h, tq, t, p, seed)
    assert 0 < mask.sum() < mask.numel()
    g = torch.Generator().manual_seed(3)
    q0 = torch.randn(b, h, tq, 8, generator=g, dtype=torch.float64)
    k0, v0 = (torch.randn(b, h, t, 8, generator=g, dtype=torch.float64) for _ in range(2))
    grad_out = torch.randn(b, h, tq, 8, generator=g, dtype=torch.float64)

    q1, k1, v1 = (x.clone().requires_grad_() for x in (q0, k0, v0))
    torch.manual_seed(seed)
    out = ops.causal_attention(q1, k1, v1, dropout_p=p, training=True, backend="cpu")
    out.backward(grad_out)

    q2, k2, v2 = (x.clone().requires_grad_() for x in (q0, k0, v0))
    scores = (q2 @ k2.transpose(2, 3)).masked_fill(torch_ops.causal_mask(tq, t, "cpu"), -torch.inf) / 8 ** 0.5
    ref = (torch.softmax(scores, -1) * mask / (1 - p)) @ v2
    ref.backward(grad_out)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    for mine, theirs in ((q1, q2), (k1, k2), (v1, v2)):
        torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 3), (1, 2, 3, 3, 4), (2, 1, 2, 5, 3)], ids=str)
def test_attention_gradcheck_float64(shape):
    b, h, tq, tk, d = shape
    g = torch.Generator().manual_seed(4)
    q = torch.randn(b, h, tq, d, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(b, h, tk, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda q, k, v: ops.causal_attention(q, k, v, backend="cpu"), (q, k, v))


def test_attention_opcheck():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 5, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(1, 2, 7, 8, generator=g, requires_grad=True) for _ in range(2))
    torch.library.opcheck(torch.ops.gptfast_cpu.attention_forward.default, (q, k, v, 0.35, 0.0, 0))
    out, lse = torch.ops.gptfast_cpu.attention_forward(q.detach(), k.detach(), v.detach(), 0.35, 0.2, 9)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(torch.ops.gptfast_cpu.attention_backward.default,
                          (grad_out, q.detach(), k.detach(), v.detach(), out, lse, 0.35, 0.2, 9))


# ----------------------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", parity.CROSS_ENTROPY_SHAPES, ids=str)
def test_cross_entropy_parity(shape, dtype, reduction):
    parity.check_cross_entropy_parity("cpu", shape, dtype, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_parity_float16(reduction):
    parity.check_cross_entropy_parity("cpu", (33, 4097), torch.float16, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_all_ignored(reduction):
    parity.check_cross_entropy_parity("cpu", (6, 100), torch.float32, reduction=reduction, ignore_fraction=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cross_entropy_large_logits_do_not_overflow(dtype):
    parity.check_cross_entropy_parity("cpu", (9, 777), dtype, logit_scale=3e4)
    logits = torch.full((2, 5), 1e30)
    logits[:, 0] = 2e30
    loss = ops.cross_entropy(logits, torch.tensor([0, 1]), reduction="none", backend="cpu")
    assert torch.isfinite(loss).all()


def test_cross_entropy_other_ignore_index_int32_targets_and_3d():
    parity.check_cross_entropy_parity("cpu", (40, 300), torch.float32, ignore_index=7, ignore_fraction=0.3)
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 5, 11, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5), generator=g, dtype=torch.int32)
    loss = ops.cross_entropy(logits, targets, reduction="none", backend="cpu")
    assert loss.shape == (2, 5)
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten().long(), reduction="none").view(2, 5)
    torch.testing.assert_close(loss, ref, **parity.tol(torch.float32))


def test_cross_entropy_without_grad_and_single_backward():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(4, 30, generator=g)
    targets = torch.randint(0, 30, (4,), generator=g)
    loss = ops.cross_entropy(logits, targets, backend="cpu")
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets), **parity.tol(torch.float32))
    assert not loss.requires_grad
    leaf = logits.clone().requires_grad_()
    loss = ops.cross_entropy(leaf, targets, backend="cpu")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def _numerical_grad(fn, x, eps=1e-6):
    """Central finite differences of scalar fn at x (float64)."""
    grad = torch.zeros_like(x)
    flat, out = x.detach().clone().view(-1), grad.view(-1)
    for i in range(flat.numel()):
        orig = flat[i].item()
        flat[i] = orig + eps
        plus = fn(flat.view(x.shape)).item()
        flat[i] = orig - eps
        minus = fn(flat.view(x.shape)).item()
        flat[i] = orig
        out[i] = (plus - minus) / (2 * eps)
    return grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_gradcheck_float64(reduction):
    """gradcheck by hand: torch.autograd.gradcheck runs backward twice on one graph (a reentrancy
    check), which the in-place gradient buffer refuses, so compare one backward with finite
    differences of a random projection of the loss instead."""
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(5, 7, generator=g, dtype=torch.float64)
    targets = torch.tensor([0, 6, -100, 3, 3])
    weights = torch.randn(5, generator=g, dtype=torch.float64) if reduction == "none" else torch.tensor(1.0)

    def scalar_loss(x):
        return (ops.cross_entropy(x, targets, reduction=reduction, backend="cpu") * weights).sum()

    leaf = logits.clone().requires_grad_()
    scalar_loss(leaf).backward()
    with torch.no_grad():
        numerical = _numerical_grad(scalar_loss, logits)
    torch.testing.assert_close(leaf.grad, numerical, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("compute_grad", [True, False])
def test_cross_entropy_opcheck(compute_grad):
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(6, 13, generator=g, requires_grad=compute_grad)
    targets = torch.tensor([1, -100, 12, 0, 5, 5])
    torch.library.opcheck(torch.ops.gptfast_cpu.cross_entropy_forward.default, (logits, targets, -100, compute_grad))


def test_cross_entropy_gradient_buffer_is_reused():
    """Forward writes softmax - one_hot into one (N, V) buffer; backward hands that buffer out, scaled."""
    g = torch.Generator().manual_seed(22)
    x = torch.randn(6, 50, generator=g, requires_grad=True)
    targets = torch.tensor([3, -100, 0, 49, 7, 7])
    loss_rows, grad = torch.ops.gptfast_cpu.cross_entropy_forward(x, targets, -100, True)
    expected = torch.softmax(x.detach(), -1) - F.one_hot(targets.clamp(min=0), 50)
    expected[1] = 0
    torch.testing.assert_close(grad, expected, **parity.tol(torch.float32))
    buffer_address = grad.data_ptr()
    del grad
    (loss_rows * 2).sum().backward()
    assert x.grad.data_ptr() == buffer_address, "backward allocated a second gradient-sized buffer"
    torch.testing.assert_close(x.grad, 2 * expected, **parity.tol(torch.float32))
    _, no_grad = torch.ops.gptfast_cpu.cross_entropy_forward(x.detach(), targets, -100, False)
    assert no_grad.numel() == 0


# ----------------------------------------------------------------------------- linear cross-entropy


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cross_entropy_parity(reduction, with_bias, monkeypatch):
    monkeypatch.setattr(cpu_ops, "_LOGITS_CHUNK_ELEMENTS", 5 * 97)  # force several chunks (5 rows each)
    g = torch.Generator().manual_seed(10)
    hidden = torch.randn(3, 7, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(97, 16, generator=g, dtype=torch.float64) * 0.3
    bias = torch.randn(97, generator=g, dtype=torch.float64) if with_bias else None
    targets = torch.randint(0, 97, (3, 7), generator=g)
    targets[0, :3] = -100
    upstream = torch.randn(3, 7, generator=g, dtype=torch.float64) if reduction == "none" else torch.tensor(1.3)

    def run(backend, dtype):
        leaves = [t.to(dtype).detach().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
        loss = ops.linear_cross_entropy(leaves[0], leaves[1], targets, bias=leaves[2], reduction=reduction,
                                        backend=backend)
        loss.backward(upstream.to(dtype))
        return loss, [t.grad for t in leaves if t is not None]

    ref_loss, ref_grads = run("torch", torch.float64)
    for dtype in (torch.float64, torch.float32):
        loss, grads = run("cpu", dtype)
        assert loss.dtype == dtype and loss.shape == ref_loss.shape
        parity.assert_close(loss.detach(), ref_loss.detach(), dtype, f"linear CE loss {dtype}")
        for mine, theirs in zip(grads, ref_grads):
            parity.assert_close(mine, theirs, dtype, f"linear CE grad {dtype}")


def test_linear_cross_entropy_bf16_and_no_grad():
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(9, 32, generator=g)
    weight = torch.randn(300, 32, generator=g) * 0.2
    targets = torch.randint(0, 300, (9,), generator=g)
    ref = F.cross_entropy(hidden @ weight.t(), targets)
    got = ops.linear_cross_entropy(hidden, weight, targets, backend="cpu")
    torch.testing.assert_close(got, ref, **parity.tol(torch.float32))
    h16, w16 = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    loss = ops.linear_cross_entropy(h16, w16, targets, backend="cpu")
    loss.backward()
    h32, w32 = hidden.requires_grad_(), weight.clone().requires_grad_()
    F.cross_entropy(h32 @ w32.t(), targets).backward()
    parity.assert_close(loss.float().detach(), ref, torch.bfloat16, "bf16 linear CE loss")
    parity.assert_close(h16.grad.float(), h32.grad, torch.bfloat16, "bf16 linear CE grad_hidden")
    parity.assert_close(w16.grad.float(), w32.grad, torch.bfloat16, "bf16 linear CE grad_weight")


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sampling_greedy(dtype):
    g = torch.Generator().manual_seed(12)
    logits = (torch.randn(5, 50257, generator=g) * 3).to(dtype)
    parity.check_sampling_greedy("cpu", logits)
    parity.check_sampling_greedy("cpu", logits, top_k=25)


@pytest.mark.parametrize("top_k,vocab", [(7, 50), (2, 30), (300, 400), (60, 60)])
def test_sampling_distribution(top_k, vocab):
    """Heap path (small k), nth_element path (k > 256) and no filter (k = vocab)."""
    parity.check_sampling_distribution("cpu", vocab=vocab, top_k=top_k)


def test_sampling_distribution_bf16_and_no_top_k():
    parity.check_sampling_distribution("cpu", dtype=torch.bfloat16, temperature=1.3)
    g = torch.Generator().manual_seed(13)
    row = torch.randn(20, generator=g)
    logits = row.expand(4000, 20).contiguous()
    gen = torch.Generator().manual_seed(14)
    tokens = ops.sample_next_token(logits, temperature=0.5, generator=gen, backend="cpu").squeeze(1)
    freq = torch.bincount(tokens, minlength=20).double() / 4000
    expected = torch.softmax(row.double() / 0.5, -1)
    assert (freq - expected).abs().max() < 0.04


def test_sampling_reproducible():
    logits = torch.randn(8, 50257, generator=torch.Generator().manual_seed(15))
    parity.check_sampling_reproducible("cpu", logits)
    torch.manual_seed(3)
    a = ops.sample_next_token(logits, temperature=1.0, top_k=25, backend="cpu")
    torch.manual_seed(3)
    b = ops.sample_next_token(logits, temperature=1.0, top_k=25, backend="cpu")
    assert torch.equal(a, b), "default generator must be used when generator is None"


def test_sampling_ties_at_kth_value_are_kept():
    logits = torch.tensor([[5.0, 3.0, 3.0, 3.0, 1.0, 0.0]]).expand(3000, 6).contiguous()
    gen = torch.Generator().manual_seed(16)
    tokens = ops.sample_next_token(logits, temperature=1.0, top_k=2, generator=gen, backend="cpu").squeeze(1)
    seen = set(tokens.tolist())
    assert seen <= {0, 1, 2, 3} and {1, 2, 3} <= seen


def test_sampling_per_row_parameters():
    g = torch.Generator().manual_seed(17)
    logits = torch.randn(4, 100, generator=g) * 2
    logits = logits.repeat_interleave(500, 0)
    temperature = torch.tensor([0.0, 1.0, 0.7, 2.0]).repeat_interleave(500)
    top_k = torch.tensor([5, 1, 3, 100]).repeat_interleave(500)
    gen = torch.Generator().manual_seed(18)
    tokens = ops.sample_next_token(logits, temperature=temperature, top_k=top_k, generator=gen,
                                   backend="cpu").squeeze(1)
    argmax = logits.argmax(-1)
    assert torch.equal(tokens[:500], argmax[:500]), "temperature 0 rows are greedy"
    assert torch.equal(tokens[500:1000], argmax[500:1000]), "top_k 1 rows are greedy"
    allowed = logits[1000:1500] >= torch.topk(logits[1000:1500], 3).values[:, -1:]
    assert allowed.gather(1, tokens[1000:1500, None]).all(), "per-row top_k respected"
    assert len(set(tokens[1500:].tolist())) > 20, "top_k = vocab with T=2 spreads widely"


def test_sampling_opcheck():
    g = torch.Generator().manual_seed(19)
    logits = torch.randn(3, 40, generator=g)
    uniforms = torch.rand(3, generator=g, dtype=torch.float64)
    torch.library.opcheck(torch.ops.gptfast_cpu.sample_next_token.default, (logits, 0.8, 5, None, None, uniforms))
    torch.library.opcheck(torch.ops.gptfast_cpu.sample_next_token.default,
                          (logits, 0.0, 0, torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1, 40, 3]), uniforms))


# ----------------------------------------------------------------------------- bad input


def test_bad_attention_input_raises_before_cpp():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="4-D"):
        ops.causal_attention(q[0], q[0], q[0], backend="cpu")
    with pytest.raises(ValueError, match="k and v"):
        ops.causal_attention(q, q, torch.randn(1, 2, 5, 8), backend="cpu")
    with pytest.raises(ValueError, match="Tq <= Tk"):
        ops.causal_attention(torch.randn(1, 2, 6, 8), q, q, backend="cpu")
    with pytest.raises(TypeError, match="dtype"):
        ops.causal_attention(q, q.double(), q, backend="cpu")
    with pytest.raises(TypeError, match="floating"):
        ops.causal_attention(q.long(), q.long(), q.long(), backend="cpu")
    with pytest.raises(ValueError, match="dropout_p"):
        ops.causal_attention(q, q, q, dropout_p=1.5, backend="cpu")
    with pytest.raises(ValueError, match="scale"):
        ops.causal_attention(q, q, q, scale=-1.0, backend="cpu")


def test_bad_cross_entropy_input_raises_before_cpp():
    logits = torch.randn(4, 10)
    with pytest.raises(ValueError, match="logits"):
        ops.cross_entropy(logits[0], torch.tensor(1), backend="cpu")
    with pytest.raises(ValueError, match="targets must have shape"):
        ops.cross_entropy(logits, torch.zeros(5, dtype=torch.long), backend="cpu")
    with pytest.raises(TypeError, match="targets"):
        ops.cross_entropy(logits, torch.zeros(4), backend="cpu")
    with pytest.raises(ValueError, match="outside"):
        ops.cross_entropy(logits, torch.tensor([0, 1, 10, 2]), backend="cpu")
    with pytest.raises(ValueError, match="reduction"):
        ops.cross_entropy(logits, torch.zeros(4, dtype=torch.long), reduction="avg", backend="cpu")
    with pytest.raises(ValueError, match="weight"):
        ops.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 7), torch.zeros(4, dtype=torch.long),
                                 backend="cpu")


def test_bad_sampling_input_raises_before_cpp():
    logits = torch.randn(2, 10)
    with pytest.raises(ValueError, match="top_k"):
        ops.sample_next_token(logits, temperature=1.0, top_k=0, backend="cpu")
    with pytest.raises(ValueError, match="top_k"):
        ops.sample_next_token(logits, temperature=1.0, top_k=11, backend="cpu")
    with pytest.raises(ValueError, match="temperature"):
        ops.sample_next_token(logits, temperature=-0.5, backend="cpu")
    with pytest.raises(ValueError, match="temperature"):
        ops.sample_next_token(logits, temperature=torch.tensor([1.0, -1.0]), backend="cpu")
    with pytest.raises(ValueError, match="top_k"):
        ops.sample_next_token(logits, temperature=1.0, top_k=torch.tensor([3, 0]), backend="cpu")
    with pytest.raises(ValueError, match="batch, vocab"):
        ops.sample_next_token(logits[0], backend="cpu")
    with pytest.raises(TypeError, match="floating"):
        ops.sample_next_token(logits.long(), backend="cpu")


def test_kernels_bounds_check_values_themselves():
    """Called directly (skipping the Python checks), the C++ ops still refuse bad values."""
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.gptfast_cpu.cross_entropy_forward(torch.randn(2, 5), torch.tensor([0, 9]), -100, True)
    with pytest.raises(RuntimeError, match="top_k"):
        torch.ops.gptfast_cpu.sample_next_token(torch.randn(2, 5), 1.0, 6, None, None, torch.rand(2).double())
    with pytest.raises(RuntimeError, match="Tq <= Tk"):
        torch.ops.gptfast_cpu.attention_forward(torch.randn(1, 1, 4, 2), torch.randn(1, 1, 3, 2),
                                                torch.randn(1, 1, 3, 2), 1.0, 0.0, 0)


# ----------------------------------------------------------------------------- integration


def test_gpt_model_forward_backward_matches_torch_backend():
    torch.manual_seed(20)
    model = GPTModel(gpt2_config("tiny", vocab_size=500)).eval()
    idx = torch.randint(0, 500, (2, 23))
    targets = torch.randint(0, 500, (2, 23))

    def step(backend):
        model.zero_grad()
        with ops.use_backend(backend):
            logits = model(idx)
            loss = ops.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logits_c, loss_c, grads_c = step("cpu")
    logits_t, loss_t, grads_t = step("torch")
    torch.testing.assert_close(logits_c, logits_t, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss_c, loss_t, atol=1e-5, rtol=1e-5)
    for name in grads_t:
        torch.testing.assert_close(grads_c[name], grads_t[name], atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")


def test_torch_compile_with_cpu_backend():
    def loss_fn(q, k, v, w, targets):
        ctx = ops.causal_attention(q, k, v, backend="cpu")
        logits = ctx.flatten(0, 2) @ w
        return ops.cross_entropy(logits, targets, backend="cpu")

    g = torch.Generator().manual_seed(21)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=g, requires_grad=True) for _ in range(3))
    w = torch.randn(8, 11, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (12,), generator=g)
    eager = loss_fn(q, k, v, w, targets)
    eager_grads = torch.autograd.grad(eager, (q, k, v, w))
    compiled = torch.compile(loss_fn, backend="aot_eager")(q, k, v, w, targets)
    compiled_grads = torch.autograd.grad(compiled, (q, k, v, w))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)
