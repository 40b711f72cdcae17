"""Backend "triton": every kernel against the torch oracle, forward and backward.

Without a GPU these run in Triton's interpreter (conftest sets TRITON_INTERPRET=1)
on small fp32 CPU tensors.  With a CUDA device the same tests run on "cuda" in
fp32/fp16/bf16 with full-size shapes added; the CUDA cases are skipped only when
no CUDA device exists.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import parity
from gptfast import ops
from gptfast.ops import torch_ops

pytest.importorskip("triton")

HAS_CUDA = torch.cuda.is_available()
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
BACKEND = "triton"

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
needs_interpreter = pytest.mark.skipif(not INTERPRETER, reason="CPU tensors need TRITON_INTERPRET=1")

# (device, dtype) pairs: fp32 on CPU through the interpreter; every dtype on a GPU.
CASES = [
    pytest.param("cpu", torch.float32, marks=needs_interpreter, id="cpu-fp32"),
    pytest.param("cuda", torch.float32, marks=needs_cuda, id="cuda-fp32"),
    pytest.param("cuda", torch.float16, marks=needs_cuda, id="cuda-fp16"),
    pytest.param("cuda", torch.bfloat16, marks=needs_cuda, id="cuda-bf16"),
]
GPU_CASES = CASES[1:]
DEVICES = [pytest.param("cpu", marks=needs_interpreter), pytest.param("cuda", marks=needs_cuda)]

# Full-size shapes, only on a GPU (the interpreter would take minutes).
GPU_ATTENTION_SHAPES = [(4, 12, 1024, 1024, 64), (2, 4, 300, 513, 128), (2, 3, 777, 777, 32), (8, 12, 1, 1000, 64)]
GPU_CROSS_ENTROPY_SHAPES = [(4096, 50257), (1000, 32000)]


def test_backend_is_available_and_registered():
    assert ops.unavailable_reason("triton") is None
    assert "triton" in ops.available_backends()
    for name in ("attention_fwd", "attention_bwd", "cross_entropy_fwd", "linear_cross_entropy_fwd",
                 "linear_cross_entropy_bwd", "sample"):
        assert hasattr(torch.ops.gptfast_triton, name)


@needs_interpreter
def test_auto_never_picks_the_interpreter():
    from gptfast.ops import triton_ops
    assert triton_ops.AUTO_OPS == frozenset()
    x = torch.randn(2, 2, 4, 16)
    assert ops.selected_backend("causal_attention", x) != "triton"


# --------------------------------------------------------------------------- attention

@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("shape", parity.ATTENTION_SHAPES)
def test_attention_matches_oracle(shape, device, dtype):
    parity.check_attention_parity(BACKEND, shape, dtype, device=device)


@pytest.mark.parametrize("device,dtype", GPU_CASES)
@pytest.mark.parametrize("shape", GPU_ATTENTION_SHAPES)
def test_attention_matches_oracle_full_size(shape, device, dtype):
    parity.check_attention_parity(BACKEND, shape, dtype, device=device)


@pytest.mark.parametrize("device,dtype", CASES)
def test_attention_custom_scale(device, dtype):
    parity.check_attention_parity(BACKEND, (2, 2, 19, 23, 32), dtype, device=device, scale=0.3)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_accepts_strided_inputs(device):
    """(B, T, H, D) projections viewed as (B, H, T, D), as the model passes them."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 21, 3, 32, generator=g).to(device).transpose(1, 2) for _ in range(3))
    out = ops.causal_attention(q, k, v, backend=BACKEND)
    ref = torch_ops.causal_attention(q.double(), k.double(), v.double())
    parity.assert_close(out.cpu(), ref.cpu(), torch.float32, "strided attention")


def _dropout_mask_probe(b, h, tq, tk, d, p, seed, device):
    """Recover the kernel's dropout mask: q = k = 0 gives uniform weights and v = I copies them out."""
    torch.manual_seed(seed)
    q = torch.zeros(b, h, tq, d, device=device)
    k = torch.zeros(b, h, tk, d, device=device)
    v = torch.eye(tk, d, device=device).expand(b, h, tk, d).contiguous()
    out = ops.causal_attention(q, k, v, dropout_p=p, training=True, backend=BACKEND)
    weights = out[..., :tk].cpu().double()
    visible = ~torch_ops.causal_mask(tq, tk, "cpu")
    uniform = 1.0 / visible.sum(-1, keepdim=True).double()
    kept = weights > 0
    # Every kept weight is the uniform weight scaled by 1/(1-p); dropped ones are exactly 0.
    torch.testing.assert_close(weights[kept], (uniform / (1 - p)).expand_as(weights)[kept])
    assert not kept[..., ~visible].any(), "dropout mask reaches masked (future) keys"
    return kept, visible


@pytest.mark.parametrize("device", DEVICES)
def test_attention_dropout_statistics_and_reproducibility(device):
    p = 0.3
    kept, visible = _dropout_mask_probe(2, 2, 48, 48, 64, p, seed=11, device=device)
    again, _ = _dropout_mask_probe(2, 2, 48, 48, 64, p, seed=11, device=device)
    other, _ = _dropout_mask_probe(2, 2, 48, 48, 64, p, seed=12, device=device)
    assert torch.equal(kept, again), "same torch seed must give the same dropout mask"
    assert not torch.equal(kept, other), "a different torch seed must change the dropout mask"
    n = int(visible.sum()) * 2 * 2
    frac = kept.sum().item() / n
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(frac - (1 - p)) < 5 * sigma, f"kept fraction {frac:.4f}, expected {1 - p} +- {5 * sigma:.4f}"
    # Different heads and rows get different masks (the Philox key includes batch*head).
    assert not torch.equal(kept[0, 0], kept[0, 1]) and not torch.equal(kept[0, 0], kept[1, 0])


@pytest.mark.parametrize("device", DEVICES)
def test_attention_dropout_forward_and_backward_use_one_mask(device):
    """With the mask recovered, dropout attention must equal the oracle's formula with that mask, grads too."""
    b, h, tq, tk, d, p, seed = 2, 2, 29, 40, 64, 0.25, 5
    kept, _ = _dropout_mask_probe(b, h, tq, tk, d, p, seed, device)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b, h, t, d, generator=g) for t in (tq, tk, tk))
    grad_out = torch.randn(b, h, tq, d, generator=g)

    torch.manual_seed(seed)
    q1, k1, v1 = (t.to(device).detach().requires_grad_(True) for t in (q, k, v))
    out = ops.causal_attention(q1, k1, v1, dropout_p=p, training=True, backend=BACKEND)
    out.backward(grad_out.to(device))

    q2, k2, v2 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    scores = (q2 @ k2.transpose(2, 3)).masked_fill(torch_ops.causal_mask(tq, tk, "cpu"), float("-inf"))
    weights = torch.softmax(scores / math.sqrt(d), dim=-1) * kept / (1 - p)
    ref = weights @ v2
    ref.backward(grad_out.double())
    parity.assert_close(out.detach().cpu(), ref.detach(), torch.float32, "dropout attention output")
    for name, mine, theirs in (("dq", q1, q2), ("dk", k1, k2), ("dv", v1, v2)):
        parity.assert_close(mine.grad.cpu(), theirs.grad, torch.float32, f"dropout attention {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_attention_dropout_edge_values(device):
    q, k, v = (torch.randn(1, 2, 9, 32, device=device) for _ in range(3))
    no_drop = ops.causal_attention(q, k, v, backend=BACKEND)
    # Not training: dropout is off whatever p is.
    assert torch.equal(ops.causal_attention(q, k, v, dropout_p=0.5, training=False, backend=BACKEND), no_drop)
    all_dropped = ops.causal_attention(q, k, v, dropout_p=1.0, training=True, backend=BACKEND)
    assert torch.equal(all_dropped, torch.zeros_like(all_dropped))


@pytest.mark.parametrize("device", DEVICES)
def test_attention_unsupported_calls_give_reasons(device):
    q = torch.randn(1, 1, 4, 96, device=device)
    with pytest.raises(RuntimeError, match="head_dim 96"):
        ops.causal_attention(q, q, q, backend=BACKEND)
    q64 = torch.randn(1, 1, 4, 32, device=device, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float64"):
        ops.causal_attention(q64, q64, q64, backend=BACKEND)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        ops.causal_attention(torch.randn(1, 1, 5, 32, device=device), q[..., :32], q[..., :32], backend=BACKEND)


# --------------------------------------------------------------------------- cross-entropy

@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", parity.CROSS_ENTROPY_SHAPES)
def test_cross_entropy_matches_oracle(shape, reduction, device, dtype):
    parity.check_cross_entropy_parity(BACKEND, shape, dtype, device=device, reduction=reduction)


@pytest.mark.parametrize("device,dtype", GPU_CASES)
@pytest.mark.parametrize("shape", GPU_CROSS_ENTROPY_SHAPES)
def test_cross_entropy_matches_oracle_full_size(shape, device, dtype):
    parity.check_cross_entropy_parity(BACKEND, shape, dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_other_ignore_index_and_all_ignored(device, reduction):
    parity.check_cross_entropy_parity(BACKEND, (9, 300), torch.float32, device=device, reduction=reduction,
                                      ignore_index=3, ignore_fraction=0.5)
    parity.check_cross_entropy_parity(BACKEND, (4, 50), torch.float32, device=device, reduction=reduction,
                                      ignore_fraction=1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_3d_logits_int32_targets_and_extreme_values(device):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 70, generator=g) * 40  # large logits: the online max must keep exp finite
    logits[0, 0, :35] = float("-inf")
    targets = torch.randint(35, 70, (2, 5), generator=g, dtype=torch.int32)
    x1 = logits.to(device).detach().requires_grad_(True)
    loss = ops.cross_entropy(x1, targets.to(device), backend=BACKEND)
    loss.backward()
    x2 = logits.double().requires_grad_(True)
    ref = torch_ops.cross_entropy(x2, targets.long())
    ref.backward()
    parity.assert_close(loss.detach().cpu(), ref.detach(), torch.float32, "3-D cross-entropy")
    parity.assert_close(x1.grad.cpu(), x2.grad, torch.float32, "3-D cross-entropy grad")


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_kernel_bounds_checks_targets(device):
    """A target outside [0, V) that slipped past the Python checks gives NaN, never an out-of-bounds read."""
    logits = torch.randn(3, 10, device=device)
    targets = torch.tensor([1, 10, -5], device=device)
    losses, _ = torch.ops.gptfast_triton.cross_entropy_fwd(logits, targets, -100, False)
    assert torch.isfinite(losses[0]) and torch.isnan(losses[1:]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_second_backward_is_refused(device):
    """The stored gradient is scaled in place, so reusing the graph must raise, not return wrong values."""
    x = torch.randn(4, 20, device=device, requires_grad=True)
    loss = ops.cross_entropy(x, torch.tensor([1, 2, 3, 4], device=device), backend=BACKEND)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace|in-place"):
        loss.backward()


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_without_grad_computes_only_the_loss(device):
    x = torch.randn(6, 30, device=device)
    t = torch.randint(0, 30, (6,), device=device)
    with torch.no_grad():
        loss = ops.cross_entropy(x.requires_grad_(True), t, backend=BACKEND)
    assert not loss.requires_grad
    parity.assert_close(loss.cpu(), torch_ops.cross_entropy(x.detach().double(), t).cpu(), torch.float32, "no-grad CE")


@pytest.mark.parametrize("device", DEVICES)
def test_loss_bad_input(device):
    logits = torch.randn(3, 10, device=device)
    targets = torch.tensor([1, 2, 3], device=device)
    with pytest.raises(RuntimeError, match="float64"):
        ops.cross_entropy(logits.double(), targets, backend=BACKEND)
    with pytest.raises(ValueError, match="reduction"):
        ops.cross_entropy(logits, targets, reduction="avg", backend=BACKEND)
    hidden, weight = torch.randn(3, 8, device=device), torch.randn(10, 8, device=device)
    with pytest.raises(RuntimeError, match="bias dtype"):
        ops.linear_cross_entropy(hidden, weight, targets, bias=torch.zeros(10, device=device, dtype=torch.float16),
                                 backend=BACKEND)
    if device == "cpu":  # target values are checked in Python only for CPU tensors (no host sync on a GPU)
        with pytest.raises(ValueError, match="targets"):
            ops.linear_cross_entropy(hidden, weight, torch.tensor([1, 2, 10]), backend=BACKEND)


# --------------------------------------------------------------------------- linear cross-entropy

def check_linear_cross_entropy_parity(shape, dtype, device, reduction, bias=False, ignore_fraction=0.2, seed=0):
    """Loss and d hidden / d weight / d bias of the fused op vs linear + cross-entropy in float64."""
    *lead, hidden_size, vocab = shape
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, hidden_size, generator=g)
    weight = torch.randn(vocab, hidden_size, generator=g) / math.sqrt(hidden_size) * 3
    b = torch.randn(vocab, generator=g) if bias else None
    targets = torch.randint(0, vocab, tuple(lead), generator=g)
    targets[torch.rand(tuple(lead), generator=g) < ignore_fraction] = -100

    mine = [t.to(device=device, dtype=dtype).detach().requires_grad_(True) if t is not None else None
            for t in (hidden, weight, b)]
    loss = ops.linear_cross_entropy(mine[0], mine[1], targets.to(device), bias=mine[2], reduction=reduction,
                                    backend=BACKEND)
    theirs = [t.double().requires_grad_(True) if t is not None else None for t in (hidden, weight, b)]
    ref = torch_ops.linear_cross_entropy(theirs[0], theirs[1], targets, bias=theirs[2], reduction=reduction)
    assert loss.shape == ref.shape and loss.dtype == dtype
    parity.assert_close(loss.detach().cpu(), ref.detach(), dtype, f"linear CE {shape} {reduction}")
    upstream = torch.randn(ref.shape, generator=g) if reduction == "none" else torch.tensor(0.7)
    loss.backward(upstream.to(device=device, dtype=dtype))
    ref.backward(upstream.double())
    grow = 1.0 if dtype == torch.float32 else math.sqrt(hidden.numel() // hidden_size / 16) + 1
    t = parity.tol(dtype)
    for name, a, r in zip(("hidden", "weight", "bias"), mine, theirs):
        if a is not None:
            torch.testing.assert_close(a.grad.double().cpu(), r.grad, atol=t["atol"] * grow, rtol=t["rtol"] * grow,
                                       msg=lambda m: f"linear CE d{name} {shape} {reduction}: {m}")


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape,bias", [((1, 16, 3), False), ((37, 32, 1000), True), ((2, 9, 24, 257), False)])
def test_linear_cross_entropy_matches_oracle(shape, bias, reduction, device, dtype):
    check_linear_cross_entropy_parity(shape, dtype, device, reduction, bias=bias)


@pytest.mark.parametrize("device,dtype", CASES)
def test_linear_cross_entropy_gpt2_vocab(device, dtype):
    shape = (8192, 768, 50257) if device == "cuda" else (6, 32, 50257)
    check_linear_cross_entropy_parity(shape, dtype, device, "mean", ignore_fraction=0.1)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_cross_entropy_frozen_weight_and_no_grad(device):
    hidden = torch.randn(20, 16, device=device, requires_grad=True)
    weight = torch.randn(50, 16, device=device)
    targets = torch.randint(0, 50, (20,), device=device)
    loss = ops.linear_cross_entropy(hidden, weight, targets, backend=BACKEND)
    loss.backward()
    h2 = hidden.detach().double().requires_grad_(True)
    ref = torch_ops.linear_cross_entropy(h2, weight.double(), targets)
    ref.backward()
    parity.assert_close(hidden.grad.cpu(), h2.grad.cpu(), torch.float32, "frozen-weight d hidden")
    with torch.no_grad():
        plain = ops.linear_cross_entropy(hidden, weight, targets, backend=BACKEND)
    assert not plain.requires_grad
    parity.assert_close(plain.cpu(), ref.detach().cpu(), torch.float32, "no-grad linear CE")


# --------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("top_k", [None, 1, 5])
def test_sampling_greedy_is_argmax(top_k, device, dtype):
    g = torch.Generator().manual_seed(4)
    for shape in ((8, 1000), (3, 50257), (1, 50257)):  # one row: a one-row tile, as B=64 V=50257 gets on a GPU
        logits = (torch.randn(*shape, generator=g) * 3).to(device=device, dtype=dtype)
        parity.check_sampling_greedy(BACKEND, logits, top_k=top_k)
    ties = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]], device=device, dtype=dtype)
    parity.check_sampling_greedy(BACKEND, ties)  # first index on ties, like torch.argmax


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("top_k,temperature", [(7, 0.8), (50, 1.5)])
def test_sampling_distribution(top_k, temperature, device, dtype):
    parity.check_sampling_distribution(BACKEND, top_k=top_k, temperature=temperature, device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_top_1_is_argmax_at_any_temperature(device):
    logits = torch.randn(300, 64, device=device)
    gen = torch.Generator(device=device).manual_seed(2)
    tokens = ops.sample_next_token(logits, temperature=5.0, top_k=1, generator=gen, backend=BACKEND)
    assert torch.equal(tokens, logits.argmax(-1, keepdim=True))


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_reproducible_and_seeded(device):
    logits = torch.randn(8, 1000, device=device)
    parity.check_sampling_reproducible(BACKEND, logits, device=device)
    parity.check_sampling_reproducible(BACKEND, logits, top_k=None, temperature=0.7, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_single_row_large_vocab_stays_in_top_k(device):
    g = torch.Generator().manual_seed(6)
    logits = (torch.randn(1, 50257, generator=g) * 3).to(device)
    allowed = parity.top_k_support(logits.cpu(), 50)[0]
    for seed in range(4):
        gen = torch.Generator(device=device).manual_seed(seed)
        token = ops.sample_next_token(logits, temperature=1.0, top_k=50, generator=gen, backend=BACKEND)
        assert allowed[token.item()]


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_keeps_ties_at_the_kth_value(device):
    row = torch.tensor([5.0, 4.0, 4.0, 4.0, 1.0, -2.0, 4.0 - 1e-3])
    logits = row.expand(3000, -1).contiguous().to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    tokens = ops.sample_next_token(logits, temperature=50.0, top_k=2, generator=gen, backend=BACKEND).cpu()
    assert set(tokens.flatten().tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_support_is_exactly_top_k_with_many_ties(device):
    """Coarsely rounded logits tie everywhere; the kept set must still be exactly {x >= k-th largest}."""
    g = torch.Generator().manual_seed(8)
    rows = [(torch.randn(60, generator=g) * 2).round() / 2 for _ in range(2)]
    rows.append(torch.full((60,), -1.5))  # all equal
    rows.append(torch.linspace(-1e-30, 1e-30, 60))  # tiny values around +-0
    for top_k in (1, 5, 40):
        for row in rows:
            logits = row.expand(800, -1).contiguous().to(device)
            gen = torch.Generator(device=device).manual_seed(top_k)
            tokens = ops.sample_next_token(logits, temperature=1e4, top_k=top_k, generator=gen, backend=BACKEND)
            support = parity.top_k_support(row[None], top_k)[0].nonzero().flatten().tolist()
            assert sorted(set(tokens.flatten().tolist())) == support, f"top_k={top_k} row={row.tolist()}"


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_per_row_arguments(device):
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(64, 300, generator=g) * 2).to(device)
    # Uniform per-row tensors draw exactly what the scalar arguments draw under one seed.
    def draw(temperature, top_k):
        gen = torch.Generator(device=device).manual_seed(9)
        return ops.sample_next_token(logits, temperature=temperature, top_k=top_k, generator=gen, backend=BACKEND)
    scalar = draw(0.9, 20)
    tensors = draw(torch.full((64,), 0.9, device=device), torch.full((64,), 20, device=device, dtype=torch.long))
    assert torch.equal(scalar, tensors)
    # Mixed rows: temperature 0 rows are greedy, the others stay inside their own top-k.
    temperature = torch.tensor([0.0, 1.0] * 32, device=device)
    top_k = torch.arange(1, 65, device=device)
    tokens = draw(temperature, top_k).squeeze(1).cpu()
    cpu_logits = logits.cpu()
    assert torch.equal(tokens[0::2], cpu_logits[0::2].argmax(-1))
    for row in range(1, 64, 2):
        kth = torch.topk(cpu_logits[row], row + 1).values[-1]
        assert cpu_logits[row, tokens[row]] >= kth


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_never_draws_masked_tokens_and_full_top_k_is_no_top_k(device):
    logits = torch.randn(200, 40, device=device)
    logits[:, ::2] = float("-inf")
    gen = torch.Generator(device=device).manual_seed(1)
    tokens = ops.sample_next_token(logits, temperature=2.0, generator=gen, backend=BACKEND)
    assert (tokens % 2 == 1).all()

    def draw(top_k):
        gen = torch.Generator(device=device).manual_seed(3)
        return ops.sample_next_token(logits, temperature=1.0, top_k=top_k, generator=gen, backend=BACKEND)
    assert torch.equal(draw(40), draw(None))


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_bad_input(device):
    logits = torch.randn(2, 10, device=device)
    with pytest.raises(ValueError, match="top_k"):
        ops.sample_next_token(logits, temperature=1.0, top_k=0, backend=BACKEND)
    with pytest.raises(ValueError, match="temperature"):
        ops.sample_next_token(logits, temperature=-1.0, backend=BACKEND)
    with pytest.raises(RuntimeError, match="float64"):
        ops.sample_next_token(logits.double(), temperature=1.0, backend=BACKEND)


@needs_interpreter
@pytest.mark.parametrize("tile_dtype", [torch.float32, torch.bfloat16])
def test_gpu_tile_sizes_in_the_interpreter(monkeypatch, tile_dtype):
    """The tile sizes a GPU uses (larger than the interpreter's) must give the same results.

    The data stay fp32 on CPU; only the tile choice is the GPU's for ``tile_dtype``.
    """
    from gptfast.triton_kernels import attention, cross_entropy, linear_cross_entropy, sampling
    for module in (attention, cross_entropy, linear_cross_entropy, sampling):
        monkeypatch.setattr(module, "INTERPRETER", False)
    fwd, bwd = attention._fwd_config, attention._bwd_configs
    monkeypatch.setattr(attention, "_fwd_config", lambda d, dtype, tq: fwd(d, tile_dtype, tq))
    monkeypatch.setattr(attention, "_bwd_configs", lambda d, dtype: bwd(d, tile_dtype))
    for shape in ((1, 1, 1, 300, 64), (1, 1, 150, 150, 64), (1, 1, 70, 200, 32), (1, 1, 65, 65, 128)):
        parity.check_attention_parity(BACKEND, shape, torch.float32)
    if tile_dtype == torch.float32:
        parity.check_cross_entropy_parity(BACKEND, (4, 50257), torch.float32)
        assert linear_cross_entropy.chunk_rows(300, 16, 1000) == 256  # two chunks, the last one partial
        check_linear_cross_entropy_parity((300, 16, 1000), torch.float32, "cpu", "mean", bias=True)
        logits = torch.randn(2, 50257)
        parity.check_sampling_greedy(BACKEND, logits, top_k=50)
        gen = torch.Generator().manual_seed(0)
        tokens = ops.sample_next_token(logits, temperature=1.0, top_k=50, generator=gen, backend=BACKEND)
        assert parity.top_k_support(logits, 50).gather(1, tokens).all()


# --------------------------------------------------------------------------- op registration

def _opcheck_utils(device):
    # Under the interpreter the kernels cannot run inside AOT tracing, so only the
    # schema, autograd-registration and fake-tensor checks apply there.
    if device == "cpu":
        return ("test_schema", "test_autograd_registration", "test_faketensor")
    return ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    utils = _opcheck_utils(device)
    tg = torch.ops.gptfast_triton
    seed = torch.tensor([123], device=device)
    q, k, v = (torch.randn(1, 2, t, 32, device=device, requires_grad=True) for t in (5, 9, 9))
    torch.library.opcheck(tg.attention_fwd.default, (q, k, v, seed, 0.0, 0.2), test_utils=utils)
    torch.library.opcheck(tg.attention_fwd.default, (q, k, v, seed, 0.3, 0.2), test_utils=utils)
    out, lse = tg.attention_fwd(q, k, v, seed, 0.0, 0.2)
    torch.library.opcheck(tg.attention_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, seed, 0.0, 0.2),
                          test_utils=utils)
    logits = torch.randn(6, 40, device=device, requires_grad=True)
    targets = torch.tensor([0, 3, -100, 39, 7, 1], device=device)
    torch.library.opcheck(tg.cross_entropy_fwd.default, (logits, targets, -100, True), test_utils=utils)
    hidden = torch.randn(6, 16, device=device, requires_grad=True)
    weight = torch.randn(40, 16, device=device, requires_grad=True)
    bias = torch.randn(40, device=device, requires_grad=True)
    for reduction in ("mean", "none"):
        torch.library.opcheck(tg.linear_cross_entropy_fwd.default,
                              (hidden, weight, bias, targets, -100, reduction, True), test_utils=utils)
    torch.library.opcheck(tg.linear_cross_entropy_bwd.default,
                          (torch.rand(6, device=device), hidden.detach(), weight.detach(), None, targets, -100),
                          test_utils=utils)
    torch.library.opcheck(tg.sample.default, (logits.detach(), seed, None, 0.7, None, 5), test_utils=utils)


# --------------------------------------------------------------------------- GPU only

@needs_cuda
def test_torch_compile_traces_the_triton_ops():
    q, k, v = (torch.randn(2, 4, 128, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    logits = torch.randn(256, 1000, device="cuda", requires_grad=True)
    targets = torch.randint(0, 1000, (256,), device="cuda")
    hidden = torch.randn(256, 64, device="cuda", requires_grad=True)
    weight = torch.randn(1000, 64, device="cuda", requires_grad=True)

    from gptfast.ops import triton_ops  # the backend functions themselves: fullgraph checks the ops, not dispatch

    def step(q, k, v, logits, hidden, weight):
        out = triton_ops.causal_attention(q, k, v)
        return (out.float().square().mean() + triton_ops.cross_entropy(logits, targets)
                + triton_ops.linear_cross_entropy(hidden, weight, targets))

    inputs = (q, k, v, logits, hidden, weight)
    eager = step(*inputs)
    eager_grads = torch.autograd.grad(eager, inputs)
    compiled = torch.compile(step, fullgraph=True)(*inputs)
    compiled_grads = torch.autograd.grad(compiled, inputs)
    torch.testing.assert_close(compiled, eager, atol=1e-3, rtol=1e-3)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


@needs_cuda
def test_sampling_has_no_host_sync_and_captures_in_a_cuda_graph():
    logits = torch.randn(64, 50257, device="cuda", dtype=torch.bfloat16)
    temperature = torch.full((64,), 0.8, device="cuda")
    ops.sample_next_token(logits, temperature=temperature, top_k=50, backend=BACKEND)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.sample_next_token(logits, temperature=temperature, top_k=50, backend=BACKEND)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = ops.sample_next_token(logits, temperature=temperature, top_k=50, backend=BACKEND)
    graph.replay()
    first = tokens.clone()
    graph.replay()
    allowed = parity.top_k_support(logits, 50)
    assert allowed.gather(1, first).all() and allowed.gather(1, tokens).all()
