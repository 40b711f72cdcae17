"""Causal attention on every fused backend (cpu, triton, cuda) against the torch oracle, forward and backward.

Shapes and tolerances: tests/parity.py.  Without a GPU the Triton kernels run in its
interpreter (conftest sets TRITON_INTERPRET=1) on float32 CPU tensors; the CUDA cases
are skipped only where no CUDA device exists.  The CUDA kernels themselves, run in the
CPU emulator of the CUDA code, are tested in tests/test_cuda_emulator.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import parity
from gptfast import ops
from gptfast.ops import attention, cuda_ops, torch_ops
from parity import (HAS_CUDA, backend_cases, backend_devices, kernel_namespace, needs_cpu_backend, needs_cuda,
                    needs_interpreter, opcheck_kwargs)

OP = "causal_attention"
# Full-size shapes, only on a GPU (the interpreter would take minutes).
GPU_SHAPES = [(4, 12, 1024, 1024, 64), (2, 4, 300, 513, 128), (2, 3, 777, 777, 32), (8, 12, 1, 1000, 64),
              (1, 1, 1, 1, 128), (2, 3, 17, 17, 64), (1, 1, 64, 64, 64), (1, 2, 65, 65, 128), (2, 2, 127, 200, 64),
              (1, 3, 31, 513, 128), (2, 2, 300, 300, 64), (1, 2, 1024, 1024, 64)]


def _device_dtype(backend, device):
    """The most precise dtype ``backend`` takes on ``device`` (for tests about behaviour, not precision)."""
    if backend == "cpu":
        return torch.float64
    return torch.float16 if backend == "cuda" else torch.float32


def _qkv(shape, dtype, device, seed=0, requires_grad=False):
    b, h, tq, tk, d = shape
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(b, h, t, d, generator=g).to(device=device, dtype=dtype) for t in (tq, tk, tk)]
    return [t.requires_grad_(requires_grad) for t in tensors]


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("backend,device,dtype", backend_cases(OP))
@pytest.mark.parametrize("shape", parity.ATTENTION_SHAPES, ids=str)
def test_parity(backend, device, dtype, shape):
    parity.check_attention_parity(backend, shape, dtype, device=device)


@pytest.mark.parametrize("backend,device,dtype", [c for c in backend_cases(OP) if c.values[1] == "cuda"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_parity_full_size(backend, device, dtype, shape):
    parity.check_attention_parity(backend, shape, dtype, device=device)


@pytest.mark.parametrize("backend,device,dtype", backend_cases(OP, dtypes=(torch.float32, torch.float16,
                                                                          torch.bfloat16)))
@pytest.mark.parametrize("shape", [(2, 2, 20, 33, 16), (2, 2, 45, 70, 64)], ids=str)
def test_parity_custom_scale(backend, device, dtype, shape):
    parity.check_attention_parity(backend, shape, dtype, device=device, scale=0.3)


@needs_cpu_backend
@pytest.mark.parametrize("shape", [(1, 2, 9, 9, 17), (2, 1, 3, 130, 40), (1, 1, 150, 150, 8), (1, 2, 65, 65, 16),
                                   (2, 2, 2, 300, 24)], ids=str)
def test_cpu_parity_odd_head_dims_and_long(shape):
    parity.check_attention_parity("cpu", shape, torch.float32)


@needs_cpu_backend
def test_cpu_parity_float16():
    parity.check_attention_parity("cpu", (2, 3, 17, 17, 32), torch.float16)
    parity.check_attention_parity("cpu", (1, 2, 5, 40, 64), torch.float16)


@needs_cpu_backend
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,kv_heads", [((2, 4, 1, 37, 64), 4), ((2, 4, 2, 70, 128), 2), ((1, 8, 1, 9, 40), 1),
                                            ((1, 2, 2, 5, 17), 2), ((3, 4, 1, 1, 16), 2)], ids=str)
def test_cpu_16_bit_decode_rows(dtype, shape, kv_heads):
    # One or two query rows read 16-bit keys and values directly (widened as read): the decode
    # steps of bf16/fp16 models, grouped-query heads and head dims off the vector width included.
    parity.check_attention_parity("cpu", shape, dtype, kv_heads=kv_heads)


@needs_cpu_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [8, 17, 40, 72, 96, 136], ids=str)
def test_cpu_decode_rows_key_blocks_and_head_dim_tails(dtype, head_dim):
    # Decode rows score four keys at a time and keep four vectors of the output in registers: key counts
    # around a block of four and head dims past a whole number of 32- and 64-float chunks take the tails.
    for n_keys in (1, 3, 4, 5, 9):
        parity.check_attention_parity("cpu", (1, 2, 1, n_keys, head_dim), dtype, seed=n_keys)


@needs_cpu_backend
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpu_16_bit_decode_reads_cache_views(dtype):
    g = torch.Generator().manual_seed(4)
    cache_k, cache_v = (torch.randn(2, 2, 50, 64, generator=g).to(dtype) for _ in range(2))
    q = torch.randn(2, 4, 1, 64, generator=g).to(dtype)
    for n_keys in (1, 17, 33, 50):
        k, v = cache_k[:, :, :n_keys], cache_v[:, :, :n_keys]  # the cache's first keys, not contiguous
        out = ops.causal_attention(q, k, v, backend="cpu")
        ref = torch_ops.causal_attention(*(t.double() for t in (q, k.repeat_interleave(2, 1),
                                                                 v.repeat_interleave(2, 1))))
        parity.assert_close(out, ref, dtype, f"16-bit decode over {n_keys} cached keys")


@needs_cpu_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_decode_rows_of_a_batch_split_over_threads(dtype):
    # Qwen3-0.6B's decode attention at batch 8: 128 (row, head) tasks over 150 keys, enough for several chunks.
    parity.check_attention_parity("cpu", (8, 16, 1, 150, 128), dtype, kv_heads=8)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("shape", [(2, 2, 1, 40, 64), (1, 2, 2, 37, 32), (1, 2, 33, 33, 64)], ids=str)
def test_nan_and_inf_reach_the_rows_that_see_them(backend, device, shape):
    """A NaN query row, a NaN key and an infinite value spoil exactly the rows the causal mask lets see them."""
    dtype = _device_dtype(backend, device)
    q, k, v = _qkv(shape, dtype, device, seed=6)
    tq, tk = shape[2], shape[3]
    q[0, 0, tq - 1, 3] = math.nan  # the last query row of head 0
    k[0, 1, tk - 2, 5] = math.nan  # a key only the last rows of head 1 see
    # The first key's value, which every row sees: its column becomes inf everywhere.  (An infinite value behind
    # the causal mask makes the dense oracle's 0 * inf a NaN in the rows before it; whether a kernel multiplies
    # a masked key's zero probability by its value depends on its tiles, so the test puts the inf where no row
    # is masked from it.)
    v[-1, 0, 0, 7] = math.inf
    out, ref = _against_the_oracle(q, k, v, backend)
    assert out[0, 0, tq - 1].isnan().all() and out[0, 1, tq - 1].isnan().all()
    assert out[-1, 0, :-1, 7].isinf().all()  # (the last row of batch 0's head 0 is the NaN query's)
    if tq > 2:  # rows before the NaN key stay finite
        assert out[0, 1, 0].isfinite().all()


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("shape,kv_heads", [((1, 2, 40, 40, 32), 2), ((2, 4, 5, 37, 32), 2), ((1, 4, 70, 70, 32), 1)],
                         ids=str)
def test_a_nan_upstream_gradient_reaches_only_the_keys_its_row_sees(backend, device, shape, kv_heads):
    """The oracle's masked_fill zeroes the score gradients behind the causal mask whatever dP holds, so a NaN in
    one row's upstream gradient spoils dQ of that row and dK of the keys it sees, and no other dQ or dK entry."""
    dtype = _device_dtype(backend, device)
    q, k, v = _qkv(shape, dtype, device, seed=11)
    k, v = k[:, :kv_heads].contiguous(), v[:, :kv_heads].contiguous()
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(12)).to(device=device, dtype=dtype)
    grad[0, 0, 0, 3] = math.nan  # the first query row of head 0: it sees keys 0 .. tk - tq
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ours = torch.autograd.grad(ops.causal_attention(q, k, v, backend=backend), (q, k, v), grad)
    wide = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref = torch.autograd.grad(torch_ops.causal_attention(*wide), wide, grad.cpu().double())
    seen = shape[3] - shape[2] + 1
    assert ref[1][0, 0, :seen].isnan().any(dim=-1).all() and ref[1][0, 0, seen:].isfinite().all()  # the setup
    for name, mine, theirs in zip(("dq", "dk"), ours[:2], ref[:2]):
        mine = mine.cpu().double()
        assert torch.equal(mine.isnan(), theirs.isnan()), name
        finite = theirs.isfinite()
        torch.testing.assert_close(mine[finite], theirs[finite], rtol=2e-2, atol=2e-2, msg=name)
    assert ours[2][0, 0, :seen, 3].isnan().all()  # dV of the keys it sees (behind the mask, tiles may differ)


def _against_the_oracle(q, k, v, backend):
    """``backend``'s output and the float64 oracle's: NaN and inf in the same places, the rest close."""
    out = ops.causal_attention(q, k, v, backend=backend).cpu().double()
    ref = torch_ops.causal_attention(*(t.cpu().double() for t in (q, k, v)))
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    finite = ref.isfinite()
    torch.testing.assert_close(out[finite], ref[finite], rtol=2e-2, atol=2e-2)
    return out, ref


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("shape", [(2, 2, 1, 9, 16), (1, 2, 2, 37, 32), (1, 2, 17, 40, 64)], ids=str)
def test_a_zero_weight_times_an_infinite_value_is_nan(backend, device, shape):
    """A key whose weight underflows to exactly 0 still multiplies its value: 0 * inf is NaN, as in P @ V."""
    dtype = _device_dtype(backend, device)
    q, k, v = _qkv(shape, dtype, device, seed=8)
    q[..., 0] = 8.0
    # The first key (every row sees it, and another) scores ~800 below the others: its weight underflows to 0
    # even in fp64.
    k[:, :, 0, 0] = -800.0
    v[:, 0, 0, 5] = math.inf
    _, ref = _against_the_oracle(q, k, v, backend)
    assert ref[:, 0, :, 5].isnan().all() and ref[:, 1].isfinite().all()  # the setup does what it says


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("shape", [(2, 4, 1, 1, 16), (2, 4, 2, 2, 16), (2, 4, 33, 33, 64)], ids=str)
def test_dropout_keeps_a_nan_row_nan(backend, device, shape):
    """Dropout multiplies the weights by the mask (NaN * 0 is NaN, as in torch's dropout), so a NaN query row
    stays NaN even where every weight it has is dropped; the keys it sees get NaN value gradients."""
    dtype = _device_dtype(backend, device)
    q, k, v = _qkv(shape, dtype, device, seed=9)
    q[:, :, 0, 3] = math.nan  # each head's first query row: one visible key when tq == tk
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.manual_seed(5)
    out = ops.causal_attention(q, k, v, dropout_p=0.9, training=True, backend=backend)
    assert out[:, :, 0].isnan().all()
    assert out[:, :, 1:].isfinite().all()
    out.backward(torch.ones_like(out))
    offset = shape[3] - shape[2]
    assert v.grad[:, :, :offset + 1].isnan().all()  # the keys row 0 sees
    assert q.grad[:, :, 0].isnan().all()


@needs_cpu_backend
@pytest.mark.parametrize("shape", [(1, 2, 1, 16, 8), (1, 2, 2, 16, 8), (2, 2, 1, 40, 64)], ids=str)
def test_cpu_16_bit_decode_dropout_uses_one_mask(shape):
    _check_dropout_uses_one_mask("cpu", "cpu", torch.bfloat16, shape)


@needs_cpu_backend
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 3), (1, 2, 3, 3, 4), (2, 1, 2, 5, 3)], ids=str)
def test_cpu_gradcheck_float64(shape):
    q, k, v = _qkv(shape, torch.float64, "cpu", seed=4, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: ops.causal_attention(q, k, v, backend="cpu"), (q, k, v))


@pytest.mark.parametrize("backend,device", backend_devices())
def test_strided_views_match_contiguous(backend, device):
    """The model passes q/k/v as transposed (B, T, H, D) views; results must not depend on layout."""
    dtype = _device_dtype(backend, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 19, 3, 3 * 64, generator=g).to(device=device, dtype=dtype)
    views = [x[..., i * 64:(i + 1) * 64].transpose(1, 2) for i in range(3)]
    assert not views[0].is_contiguous()
    strided = ops.causal_attention(*views, backend=backend)
    packed = ops.causal_attention(*(t.contiguous() for t in views), backend=backend)
    torch.testing.assert_close(strided, packed, atol=0, rtol=0)
    ref = torch_ops.causal_attention(*(t.double().cpu() for t in views))
    parity.assert_close(strided.cpu(), ref, dtype, f"{backend} strided attention")
    # last dimension not unit-stride: handled by a copy
    odd = [t.transpose(2, 3).contiguous().transpose(2, 3) for t in views]
    assert odd[0].stride(-1) != 1
    parity.assert_close(ops.causal_attention(*odd, backend=backend).cpu(), ref, dtype, f"{backend} odd strides")


# --------------------------------------------------------------------------- dropout


def _dropout_keep_mask(backend, device, dtype, b, h, tq, tk, p, seed):
    """The kernel's keep mask under ``torch.manual_seed(seed)`` (bool ``(b, h, tq, tk)``), and the visible keys.

    q = k = 0 gives every visible key the weight 1 / visible; v = identity copies each weight
    into its own output column (head dim 64 or 128 >= tk).  The mask depends only on the seed
    and the element's (batch, head, query, key), not on the head dim.
    """
    d = 64 if tk <= 64 else 128
    torch.manual_seed(seed)
    q = torch.zeros(b, h, tq, d, device=device, dtype=dtype)
    k = torch.zeros(b, h, tk, d, device=device, dtype=dtype)
    v = torch.eye(tk, d, device=device, dtype=dtype).expand(b, h, tk, d).contiguous()
    out = ops.causal_attention(q, k, v, dropout_p=p, training=True, backend=backend)[..., :tk].double().cpu()
    visible = ~torch_ops.causal_mask(tq, tk, "cpu")
    ratio = out * visible.sum(-1, keepdim=True) * (1 - p)  # 1 where kept, 0 where dropped or masked
    assert torch.all((ratio - ratio.round()).abs() < 0.05), "dropout output not in {0, 1/(1-p)} x weight"
    assert torch.all(ratio[..., ~visible] == 0), "dropout mask reaches masked (future) keys"
    return ratio.round().bool() & visible, visible


@pytest.mark.parametrize("backend,device", backend_devices())
def test_dropout_statistics_and_reproducibility(backend, device):
    dtype, p = _device_dtype(backend, device), 0.3
    kept, visible = _dropout_keep_mask(backend, device, dtype, 2, 2, 48, 48, p, seed=11)
    again, _ = _dropout_keep_mask(backend, device, dtype, 2, 2, 48, 48, p, seed=11)
    other, _ = _dropout_keep_mask(backend, device, dtype, 2, 2, 48, 48, p, seed=12)
    assert torch.equal(kept, again), "same torch seed must give the same dropout mask"
    assert not torch.equal(kept, other), "a different torch seed must change the dropout mask"
    n = int(visible.sum()) * 2 * 2
    frac = kept.sum().item() / n
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(frac - (1 - p)) < 5 * sigma, f"kept fraction {frac:.4f}, expected {1 - p} +- {5 * sigma:.4f}"
    # Different heads and batches get different masks.
    assert not torch.equal(kept[0, 0], kept[0, 1]) and not torch.equal(kept[0, 0], kept[1, 0])


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_cuda_dropout_statistics(dtype, p):
    kept, visible = _dropout_keep_mask("cuda", "cuda", dtype, 4, 4, 128, 128, p, seed=0)
    n = int(visible.sum()) * 16
    dropped_fraction = 1 - int(kept.sum()) / n
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(dropped_fraction - p) < 6 * sigma, f"dropped {dropped_fraction:.4f}, expected {p}"
    # Neighbouring rows/columns/heads must not share one pattern (a broken counter would repeat it).
    assert not torch.equal(kept[0, 0], kept[0, 1]) and not torch.equal(kept[0, 0], kept[1, 0])
    assert not torch.equal(kept[0, 0, 100:, :64], kept[0, 0, 100:, 64:])


_MASK_SHAPES = [(1, 2, 16, 16, 8), (1, 2, 5, 16, 8), (1, 2, 2, 16, 8), (1, 2, 1, 16, 8), (2, 2, 29, 40, 64)]
_CUDA_MASK_SHAPES = [(2, 2, 64, 64, 64), (1, 3, 40, 128, 128), (1, 2, 128, 128, 128)]


def _check_dropout_uses_one_mask(backend, device, dtype, shape, p=0.25, seed=11):
    """Output and gradients equal the oracle's with the kernel's own mask applied explicitly."""
    b, h, tq, tk, d = shape
    kept, _ = _dropout_keep_mask(backend, device, dtype, b, h, tq, tk, p, seed)
    assert 0 < kept.sum() < kept.numel()
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, h, t, d, generator=g, dtype=torch.float64) for t in (tq, tk, tk))
    grad_out = torch.randn(b, h, tq, d, generator=g, dtype=torch.float64)

    torch.manual_seed(seed)
    q1, k1, v1 = (t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v))
    out = ops.causal_attention(q1, k1, v1, dropout_p=p, training=True, backend=backend)
    out.backward(grad_out.to(device=device, dtype=dtype))

    q2, k2, v2 = (t.to(dtype).double().requires_grad_() for t in (q, k, v))
    scores = (q2 @ k2.transpose(2, 3)).masked_fill(torch_ops.causal_mask(tq, tk, "cpu"), -torch.inf) / d ** 0.5
    ref = (torch.softmax(scores, -1) * kept / (1 - p)) @ v2
    ref.backward(grad_out.to(dtype).double())
    parity.assert_close(out.detach().cpu(), ref.detach(), dtype, f"{backend} dropout output {shape}")
    grow = 1.0 if dtype in (torch.float32, torch.float64) else math.sqrt(tk / 16) + 1
    t = parity.tol(dtype)
    for name, mine, theirs in (("dq", q1, q2), ("dk", k1, k2), ("dv", v1, v2)):
        torch.testing.assert_close(mine.grad.double().cpu(), theirs.grad, atol=t["atol"] * grow,
                                   rtol=t["rtol"] * grow, msg=lambda m: f"{backend} dropout {name} {shape}: {m}")


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("shape", _MASK_SHAPES, ids=str)
def test_dropout_forward_and_backward_use_one_mask(backend, device, shape):
    if backend != "cpu" and shape[-1] not in (16, 32, 64, 128):
        shape = shape[:-1] + (16,)  # the smallest head dim the Triton kernels take
    _check_dropout_uses_one_mask(backend, device, _device_dtype(backend, device), shape)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", _CUDA_MASK_SHAPES, ids=str)
def test_cuda_dropout_backward_uses_forward_mask(shape, dtype):
    _check_dropout_uses_one_mask("cuda", "cuda", dtype, shape, p=0.3)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_dropout_only_in_training_and_p_one_drops_everything(backend, device):
    dtype = _device_dtype(backend, device)
    q, k, v = _qkv((1, 2, 12, 12, 64), dtype, device, seed=2, requires_grad=True)
    no_drop = ops.causal_attention(q, k, v, backend=backend)
    # Not training: dropout is off whatever p is.
    torch.manual_seed(5)
    assert torch.equal(ops.causal_attention(q, k, v, dropout_p=0.5, training=False, backend=backend), no_drop)
    parity.assert_close(no_drop.detach().cpu(), torch_ops.causal_attention(*(t.detach().double().cpu() for t in
                                                                             (q, k, v))), dtype, "eval mode")
    dropped = ops.causal_attention(q, k, v, dropout_p=1.0, training=True, backend=backend)
    assert torch.count_nonzero(dropped) == 0, "p=1 drops everything, as F.dropout does"
    dropped.sum().backward()
    assert torch.count_nonzero(v.grad) == 0 and torch.isfinite(q.grad).all()


# --------------------------------------------------------------------------- registration


@pytest.mark.parametrize("backend,device", backend_devices())
def test_opcheck(backend, device):
    dtype = torch.float16 if backend == "cuda" else torch.float32
    kwargs, kernels = opcheck_kwargs(backend, device), kernel_namespace(backend)
    seed = torch.tensor([1234], dtype=torch.int64, device=device)
    q, k, v = _qkv((1, 2, 5, 9, 64), dtype, device, seed=5, requires_grad=True)
    torch.library.opcheck(kernels.attention_fwd.default, (q, k, v, 0.125, 0.0, None), **kwargs)
    torch.library.opcheck(kernels.attention_fwd.default, (q, k, v, 0.125, 0.3, seed), **kwargs)
    out, lse = kernels.attention_fwd(q.detach(), k.detach(), v.detach(), 0.125, 0.2, seed)
    torch.library.opcheck(kernels.attention_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, 0.125, 0.2, seed),
                          **kwargs)


@needs_cuda
def test_cuda_opcheck_bf16_and_decode():
    q, k, v = _qkv((1, 2, 33, 70, 64), torch.bfloat16, "cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.gptfast_cuda.attention_fwd.default, (q, k, v, 0.125, 0.0, None))
    q1, k1, v1 = _qkv((2, 3, 1, 300, 64), torch.bfloat16, "cuda")
    torch.library.opcheck(torch.ops.gptfast_cuda.decode_attention.default, (q1, k1, v1, 0.125))


def test_fakes_return_the_kernels_shapes_dtypes_and_contiguous_strides():
    q = torch.randn(2, 5, 3, 16).transpose(1, 2)  # a strided (B, H, T, D) view
    k = torch.randn(2, 3, 7, 16)
    out, lse = attention._fake_attention_fwd(q, k, k, 0.25, 0.0, None)
    assert out.shape == q.shape and out.is_contiguous() and out.dtype == q.dtype
    assert lse.shape == (2, 3, 5) and lse.dtype == torch.float32
    assert attention._fake_attention_fwd(q.double(), k.double(), k.double(), 0.25, 0.0, None)[1].dtype == torch.float64
    dq, dk, dv = attention._fake_attention_bwd(out, q, k, k, out, lse, 0.25, 0.0, None)
    assert dq.shape == q.shape and dq.is_contiguous() and dk.shape == dv.shape == k.shape


@needs_cpu_backend
def test_cpu_torch_compile_attention_and_cross_entropy():
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


@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_torch_compile_matches_eager(backend):
    q, k, v = _qkv((2, 2, 100, 100, 64), torch.bfloat16, "cuda", requires_grad=True)
    fn_backend = cuda_ops if backend == "cuda" else __import__("gptfast.ops.triton_ops", fromlist=["x"])

    def fn(q, k, v):  # the backend function itself: the dispatch layer is not what is tested here
        return fn_backend.causal_attention(q, k, v).float().square().sum()

    eager = fn(q, k, v)
    grads = torch.autograd.grad(eager, (q, k, v))
    compiled = torch.compile(fn, fullgraph=True)(q, k, v)
    cgrads = torch.autograd.grad(compiled, (q, k, v))
    # Same kernels either way; only inductor's fused square-sum may add in another order.
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    for a, b_ in zip(cgrads, grads):
        torch.testing.assert_close(a, b_, rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------- bad input and refusals


def test_bad_input_raises_before_any_kernel():
    q = torch.randn(1, 2, 4, 8)
    for backend in ("cpu", "triton", "cuda"):
        with pytest.raises(ValueError, match="4-D"):
            ops.causal_attention(q[0], q[0], q[0], backend=backend)
        with pytest.raises(ValueError, match="k and v"):
            ops.causal_attention(q, q, torch.randn(1, 2, 5, 8), backend=backend)
        with pytest.raises(ValueError, match="Tq <= Tk"):
            ops.causal_attention(torch.randn(1, 2, 6, 8), q, q, backend=backend)
        with pytest.raises(TypeError, match="dtype"):
            ops.causal_attention(q, q.double(), q, backend=backend)
        with pytest.raises(TypeError, match="floating"):
            ops.causal_attention(q.long(), q.long(), q.long(), backend=backend)
        with pytest.raises(ValueError, match="dropout_p"):
            ops.causal_attention(q, q, q, dropout_p=1.5, backend=backend)
        with pytest.raises(ValueError, match="scale"):
            ops.causal_attention(q, q, q, scale=-1.0, backend=backend)
        for truthy in ("no", 1, None):  # "no" would switch dropout on
            with pytest.raises(TypeError, match=f"training must be a bool, got {type(truthy).__name__}"):
                ops.causal_attention(q, q, q, dropout_p=0.5, training=truthy, backend=backend)


def test_a_numpy_bool_is_a_bool_for_training_flags():
    np = pytest.importorskip("numpy")
    q = torch.randn(1, 2, 4, 8)
    torch.manual_seed(0)
    expected = ops.causal_attention(q, q, q, dropout_p=0.5, training=True, backend="torch")
    torch.manual_seed(0)
    assert torch.equal(ops.causal_attention(q, q, q, dropout_p=0.5, training=np.bool_(True), backend="torch"),
                       expected)
    assert torch.equal(ops.dropout(q, 0.5, training=np.bool_(False)), q)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("tokens,hidden_keys", [(80, 64), (40, 32), (130, 70)])
@pytest.mark.parametrize("how", ["overflow", "minus-inf"])
def test_keys_scoring_minus_inf_in_a_whole_tile_leave_later_rows_finite(backend, device, tokens, hidden_keys, how):
    """Rows whose first key tile scores only -inf (finite q.k overflowing, or -inf keys) get their softmax from
    the later keys, as the oracle's: the running max starts at -inf, and exp((-inf) - (-inf)) must not leave a
    NaN behind.  Rows that see only such keys are NaN in both."""
    torch.manual_seed(0)
    q = torch.full((1, 2, tokens, 16), 10.0, device=device)
    k = torch.zeros(1, 2, tokens, 16, device=device)
    k[:, :, :hidden_keys] = -1e38 if how == "overflow" else float("-inf")
    v = torch.randn(1, 2, tokens, 16, device=device)
    ours = ops.causal_attention(q, k, v, backend=backend)
    assert torch.isfinite(ours[:, :, hidden_keys:]).all()
    torch.testing.assert_close(ours.cpu(), ops.causal_attention(q, k, v, backend="torch").cpu(), equal_nan=True)
    # Queries only at the positions that see a finite key (the last ones): gradients too.
    q = q[:, :, hidden_keys:]
    grad = torch.randn_like(q)
    results = {}
    for impl in ("torch", backend):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = ops.causal_attention(*leaves, backend=impl)
        out.backward(grad)
        results[impl] = [out, *(t.grad for t in leaves)]
    for mine, theirs in zip(results[backend], results["torch"]):
        torch.testing.assert_close(mine.cpu(), theirs.cpu(), equal_nan=True, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(results[backend][0]).all() and torch.isfinite(results[backend][3]).all()


@needs_cpu_backend
def test_cpu_kernel_checks_shapes_and_seed_itself():
    """Called directly (skipping the Python checks), the C++ op still refuses bad input."""
    with pytest.raises(RuntimeError, match="Tq <= Tk"):
        torch.ops.gptfast_cpu.attention_fwd(torch.randn(1, 1, 4, 2), torch.randn(1, 1, 3, 2),
                                            torch.randn(1, 1, 3, 2), 1.0, 0.0, None)
    q = torch.randn(1, 1, 3, 2)
    with pytest.raises(RuntimeError, match="seed"):
        torch.ops.gptfast_cpu.attention_fwd(q, q, q, 1.0, 0.5, None)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=[parity.needs_triton, needs_interpreter]),
                                    pytest.param("cuda", marks=[parity.needs_triton, needs_cuda])])
def test_triton_unsupported_calls_give_reasons(device):
    q = torch.randn(1, 1, 4, 96, device=device)
    with pytest.raises(RuntimeError, match="head_dim 96"):
        ops.causal_attention(q, q, q, backend="triton")
    q64 = torch.randn(1, 1, 4, 32, device=device, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float64"):
        ops.causal_attention(q64, q64, q64, backend="triton")
    with pytest.raises(ValueError, match="Tq <= Tk"):
        ops.causal_attention(torch.randn(1, 1, 5, 32, device=device), q[..., :32], q[..., :32], backend="triton")


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_interpreter_refuses_16_bit_instead_of_returning_garbage(dtype):
    q = torch.randn(1, 2, 8, 32, dtype=dtype)
    with pytest.raises(RuntimeError, match="interpreter.*wrongly"):
        ops.causal_attention(q, q, q, backend="triton")
    assert ops.selected_backend("causal_attention", q, q, q) != "triton"


@needs_interpreter
@pytest.mark.parametrize("tile_dtype", [torch.float32, torch.bfloat16])
def test_triton_gpu_tile_sizes_in_the_interpreter(monkeypatch, tile_dtype):
    """The tile sizes a GPU uses (larger than the interpreter's) must give the same results.

    The data stay fp32 on CPU; only the tile choice is the GPU's for ``tile_dtype``.
    """
    from gptfast.triton_kernels import attention as kernels
    monkeypatch.setattr(kernels, "INTERPRETER", False)
    fwd, bwd = kernels._fwd_config, kernels._bwd_configs
    monkeypatch.setattr(kernels, "_fwd_config", lambda d, dtype, tq: fwd(d, tile_dtype, tq))
    monkeypatch.setattr(kernels, "_bwd_configs", lambda d, dtype: bwd(d, tile_dtype))
    for shape in ((1, 1, 1, 300, 64), (1, 1, 150, 150, 64), (1, 1, 70, 200, 32), (1, 1, 65, 65, 128)):
        parity.check_attention_parity("triton", shape, torch.float32)


# --------------------------------------------------------------------------- cuda: routing and reasons (any machine)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_unsupported_dtype_reason(dtype):
    q, k, v = _qkv((1, 2, 5, 5, 64), dtype, "cpu")
    reason = cuda_ops.supports(OP, q, k, v, dropout_p=0.0, training=False, scale=None)
    assert reason is not None and "float16/bfloat16" in reason and str(dtype) in reason


@pytest.mark.parametrize("head_dim", [129, 192, 256])
def test_cuda_unsupported_head_dim_reason(head_dim):
    q, k, v = _qkv((1, 2, 5, 5, head_dim), torch.float16, "cpu")
    reason = cuda_ops.supports(OP, q, k, v, dropout_p=0.0, training=False, scale=None)
    assert reason is not None and "head_dim" in reason and str(head_dim) in reason


def test_cuda_huge_batch_reason():
    q = torch.empty(70000, 1, 1, 64, dtype=torch.float16)
    reason = cuda_ops.supports(OP, q, q, q, dropout_p=0.0, training=False, scale=None)
    assert reason is not None and "65535" in reason


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only machine's backend status")
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_cuda_backend_refuses_without_gpu(head_dim):
    assert ops.backend_status()["cuda"] != "available"
    q, k, v = _qkv((1, 2, 5, 5, head_dim), torch.float16, "cpu")
    with pytest.raises(RuntimeError, match="cuda"):
        ops.causal_attention(q, k, v, backend="cuda")


class _RecordingOps:
    """Stands in for torch.ops.gptfast_cuda: records which kernel a call would launch."""

    def __init__(self):
        self.calls = []

    def decode_attention(self, q, k, v, scale):
        self.calls.append(("decode", scale, None, None))
        return torch.zeros_like(q)

    def attention_fwd(self, q, k, v, scale, dropout_p, seed):
        self.calls.append(("fwd", scale, dropout_p, seed))
        return torch.zeros_like(q), torch.zeros(q.shape[:3])


def test_cuda_single_query_without_grad_uses_decode_kernel():
    rec = _RecordingOps()
    q, k, v = _qkv((1, 2, 1, 40, 64), torch.float16, "cpu")
    attention.cuda_causal_attention(rec, q, k, v, dropout_p=0.1, training=False, scale=None)
    assert rec.calls == [("decode", 1 / 8, None, None)]


def test_cuda_single_query_with_grad_uses_fused_kernel():
    rec = _RecordingOps()
    q, k, v = _qkv((1, 2, 1, 40, 64), torch.float16, "cpu", requires_grad=True)
    attention.cuda_causal_attention(rec, q, k, v, dropout_p=0.0, training=True, scale=0.5)
    assert rec.calls == [("fwd", 0.5, 0.0, None)]
    with torch.no_grad():
        attention.cuda_causal_attention(rec, q, k, v, dropout_p=0.0, training=True, scale=0.5)
    assert rec.calls[-1][0] == "decode"


def test_cuda_single_query_with_dropout_uses_fused_kernel():
    rec = _RecordingOps()
    q, k, v = _qkv((1, 2, 1, 40, 128), torch.float16, "cpu")
    attention.cuda_causal_attention(rec, q, k, v, dropout_p=0.25, training=True, scale=None)
    kind, scale, p, seed = rec.calls[0]
    assert (kind, p) == ("fwd", 0.25) and scale == pytest.approx(1 / math.sqrt(128))
    assert seed.dtype == torch.int64 and seed.shape == (1,)


@pytest.mark.parametrize("head_dim,kernel_dim", [(16, 64), (40, 64), (80, 128), (96, 128)])
def test_cuda_small_head_dims_are_zero_padded(head_dim, kernel_dim):
    rec = _RecordingOps()
    q, k, v = _qkv((1, 2, 6, 9, head_dim), torch.float16, "cpu")
    seen = []

    def fwd(q_, k_, v_, scale, dropout_p, seed):
        seen.append((q_, k_, v_, scale))
        return q_ * 2, torch.zeros(q_.shape[:3])

    rec.attention_fwd = fwd
    out = attention.cuda_causal_attention(rec, q, k, v, dropout_p=0.0, training=False, scale=None)
    q_, k_, v_, scale = seen[0]
    assert q_.shape[-1] == k_.shape[-1] == v_.shape[-1] == kernel_dim
    assert scale == pytest.approx(1 / math.sqrt(head_dim))  # the unpadded dim sets the scale
    assert torch.equal(q_[..., :head_dim], q) and not q_[..., head_dim:].any()
    assert torch.equal(out, q * 2)


def test_dropout_only_in_training_and_seed_follows_manual_seed():
    for call in (attention.cuda_causal_attention, attention.fused_causal_attention):
        rec = _RecordingOps()
        q, k, v = _qkv((1, 2, 9, 9, 64), torch.bfloat16, "cpu")
        call(rec, q, k, v, dropout_p=0.5, training=False, scale=None)
        assert rec.calls[-1][2:] == (0.0, None)
        seeds = []
        for manual in (3, 3, 4):
            torch.manual_seed(manual)
            call(rec, q, k, v, dropout_p=0.5, training=True, scale=None)
            seeds.append(int(rec.calls[-1][3]))
        assert seeds[0] == seeds[1] != seeds[2]
        assert all(0 <= s < attention.SEED_BOUND for s in seeds)


# --------------------------------------------------------------------------- cuda: GPU only


def _oracle_grads(q, k, v, grad_out):
    leaves = [t.detach().double().cpu().requires_grad_(True) for t in (q, k, v)]
    out = torch_ops.causal_attention(*leaves)
    out.backward(grad_out.double().cpu())
    return out.detach(), [t.grad for t in leaves]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_transposed_views_and_strided_grad(dtype):
    """The model passes (B, T, H, D) projections transposed to (B, H, T, D); grad_out may be strided too."""
    b, t, h, d = 2, 77, 4, 64
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(b, t, 3, h, d, generator=g).to("cuda", dtype).requires_grad_(True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    grad_out = torch.randn(b, t, h, d, generator=g).to("cuda", dtype).transpose(1, 2)
    out = ops.causal_attention(q, k, v, backend="cuda")
    out.backward(grad_out)
    ref, ref_grads = _oracle_grads(q, k, v, grad_out)
    parity.assert_close(out.detach().cpu(), ref, dtype, "strided output")
    grow = math.sqrt(t / 16) + 1
    tl = parity.tol(dtype)
    for mine, theirs in zip(qkv.grad.permute(2, 0, 3, 1, 4), ref_grads):
        torch.testing.assert_close(mine.double().cpu(), theirs, atol=tl["atol"] * grow, rtol=tl["rtol"] * grow)


@needs_cuda
def test_cuda_misaligned_and_non_contiguous_inputs():
    """Rows that are not 16-byte aligned or not contiguous along D are copied, not misread."""
    dtype = torch.float16
    g = torch.Generator().manual_seed(2)
    base = torch.randn(3 * 2 * 33 * 64 + 1, generator=g).to("cuda", dtype)
    q = base[1:].view(3, 2, 33, 64)[:1]  # storage offset of one element: misaligned
    k = torch.randn(1, 2, 64, 33, generator=g).to("cuda", dtype).transpose(2, 3)  # D not contiguous
    v = torch.randn(1, 2, 33, 64, generator=g).to("cuda", dtype)
    out = ops.causal_attention(q, k, v, backend="cuda")
    ref = torch_ops.causal_attention(q.double().cpu(), k.double().cpu(), v.double().cpu())
    parity.assert_close(out.cpu(), ref, dtype, "misaligned output")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("b,h,tk,d", [(1, 12, 1, 64), (1, 12, 7, 64), (1, 12, 64, 64), (1, 12, 1000, 64),
                                      (1, 12, 4097, 64), (1, 12, 8192, 64), (3, 5, 333, 128),
                                      (1, 8, 8192, 128), (16, 12, 1024, 64)])
def test_cuda_decode_kernel_matches_oracle(b, h, tk, d, dtype):
    q, k, v = _qkv((b, h, 1, tk, d), dtype, "cuda", seed=tk)
    direct = torch.ops.gptfast_cuda.decode_attention(q, k, v, 1 / math.sqrt(d))
    with torch.no_grad():
        routed = ops.causal_attention(q, k, v, backend="cuda")
    ref = torch_ops.causal_attention(q.double().cpu(), k.double().cpu(), v.double().cpu())
    parity.assert_close(direct.cpu(), ref, dtype, f"decode {(b, h, tk, d)}")
    parity.assert_close(routed.cpu(), ref, dtype, f"routed decode {(b, h, tk, d)}")


@needs_cuda
def test_cuda_decode_reads_a_strided_kv_cache():
    """A KV cache preallocated for 256 positions and sliced to the filled 150."""
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(9)
    cache_k = torch.randn(2, 4, 256, 64, generator=g).to("cuda", dtype)
    cache_v = torch.randn(2, 4, 256, 64, generator=g).to("cuda", dtype)
    q = torch.randn(2, 1, 4, 64, generator=g).to("cuda", dtype).transpose(1, 2)
    k, v = cache_k[:, :, :150], cache_v[:, :, :150]
    with torch.no_grad():
        out = ops.causal_attention(q, k, v, backend="cuda")
    ref = torch_ops.causal_attention(q.double().cpu(), k.double().cpu(), v.double().cpu())
    parity.assert_close(out.cpu(), ref, dtype, "strided cache decode")


@needs_cuda
def test_cuda_decode_with_padded_head_dim():
    q, k, v = _qkv((2, 3, 1, 129, 32), torch.float16, "cuda")
    with torch.no_grad():
        out = ops.causal_attention(q, k, v, backend="cuda")
    ref = torch_ops.causal_attention(q.double().cpu(), k.double().cpu(), v.double().cpu())
    parity.assert_close(out.cpu(), ref, torch.float16, "padded decode")


@needs_cuda
def test_cuda_explicit_backend_refuses_unsupported_inputs():
    q, k, v = _qkv((1, 2, 5, 5, 64), torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="float16/bfloat16"):
        ops.causal_attention(q, k, v, backend="cuda")
    q, k, v = _qkv((1, 2, 5, 5, 192), torch.float16, "cuda")
    with pytest.raises(RuntimeError, match="head_dim"):
        ops.causal_attention(q, k, v, backend="cuda")
    # "auto" falls back instead of failing
    assert ops.selected_backend(OP, q, k, v) != "cuda"


@needs_cuda
def test_cuda_op_called_directly_rejects_bad_shapes():
    q, k, v = _qkv((1, 2, 5, 5, 96), torch.float16, "cuda")
    with pytest.raises(RuntimeError, match="head_dim"):
        torch.ops.gptfast_cuda.attention_fwd(q, k, v, 0.1, 0.0, None)
    q, k, v = _qkv((1, 2, 9, 5, 64), torch.float16, "cuda")
    with pytest.raises(RuntimeError, match="Tq"):
        torch.ops.gptfast_cuda.attention_fwd(q, k, v, 0.1, 0.0, None)
    q, k, v = _qkv((1, 2, 5, 5, 64), torch.float16, "cuda")
    with pytest.raises(RuntimeError, match="seed"):
        torch.ops.gptfast_cuda.attention_fwd(q, k, v, 0.1, 0.5, None)
    with pytest.raises(RuntimeError, match="one token"):
        torch.ops.gptfast_cuda.decode_attention(q, k, v, 0.1)


# --------------------------------------------------------------------------- grouped-query attention

# (B, H, H_kv, Tq, Tk, D): group sizes 1, 2, 4 and 8 (H_kv = 1 is multi-query), odd lengths,
# prefill against a longer cache (Tq < Tk) and single-token decode.
GQA_SHAPES = [
    (2, 4, 4, 17, 17, 32),
    (2, 4, 2, 17, 17, 32),
    (1, 8, 2, 33, 33, 64),
    (2, 4, 1, 19, 19, 16),
    (1, 8, 1, 70, 70, 64),
    (2, 6, 3, 5, 41, 64),
    (1, 4, 2, 1, 37, 64),
    (2, 8, 1, 1, 65, 128),
]


def _gqa_case(shape):
    b, h, h_kv, tq, tk, d = shape
    return (b, h, tq, tk, d), h_kv


@pytest.mark.parametrize("backend,device,dtype", backend_cases(OP))
@pytest.mark.parametrize("shape", GQA_SHAPES, ids=str)
def test_gqa_parity(backend, device, dtype, shape):
    qshape, h_kv = _gqa_case(shape)
    parity.check_attention_parity(backend, qshape, dtype, device=device, kv_heads=h_kv)


@needs_cpu_backend
@pytest.mark.parametrize("shape", [(1, 4, 2, 3, 4, 3), (2, 3, 1, 2, 5, 4)], ids=str)
def test_gqa_cpu_gradcheck_float64(shape):
    (b, h, tq, tk, d), h_kv = _gqa_case(shape)
    g = torch.Generator().manual_seed(8)
    q = torch.randn(b, h, tq, d, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(b, h_kv, tk, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda q, k, v: ops.causal_attention(q, k, v, backend="cpu"), (q, k, v))


@needs_cpu_backend
@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_gqa_cpu_backward_same_for_any_thread_count(threads):
    """dK/dV sum a group's query heads in one task or in slices added afterwards: same result either way."""
    q, k, v = (t.requires_grad_(True) for t in _gqa_inputs((1, 8, 1, 40, 40, 32), torch.float64, "cpu"))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = ops.causal_attention(q, k, v, backend="cpu")
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    finally:
        torch.set_num_threads(old)
    ref = torch.autograd.grad(torch_ops.causal_attention(q, k, v), (q, k, v), torch.ones_like(out))
    for name, mine, theirs in zip(("dq", "dk", "dv"), grads, ref):
        parity.assert_close(mine, theirs, torch.float64, f"{threads} threads {name}")


def _gqa_inputs(shape, dtype, device, seed=3):
    (b, h, tq, tk, d), h_kv = _gqa_case(shape)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, d, generator=g).to(device=device, dtype=dtype)
    k, v = (torch.randn(b, h_kv, tk, d, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    return q, k, v


def _expand(t, group):
    return t.repeat_interleave(group, dim=1)


@needs_cpu_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 7, 1, 1, 45, 64), (2, 12, 4, 2, 30, 72), (1, 16, 1, 1, 33, 128),
                                   (3, 10, 2, 2, 9, 40), (1, 8, 8, 1, 20, 16), (2, 6, 2, 1, 3, 24)], ids=str)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_cpu_decode_scores_a_kv_heads_query_heads_together(dtype, shape, threads, dropout_p):
    """16-bit decode rows of the query heads sharing a kv head are scored together (four, then two, then one at a
    time; a kv head's heads split over threads when there are fewer kv heads than threads): every row's output
    and log-sum-exp come out bitwise as with k/v expanded to one head per query head (one head a task), dropout's
    mask included, and close to the oracle."""
    b, h, h_kv, tq, tk, d = shape
    q, k, v = _gqa_inputs(shape, dtype, "cpu")
    group = h // h_kv
    kernels = parity.kernel_namespace("cpu")
    seed = torch.tensor([7]) if dropout_p else None
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        grouped = kernels.attention_fwd(q, k, v, d ** -0.5, dropout_p, seed)
        expanded = kernels.attention_fwd(q, _expand(k, group), _expand(v, group), d ** -0.5, dropout_p, seed)
    finally:
        torch.set_num_threads(saved)
    for mine, theirs in zip(grouped, expanded):
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0)
    if dropout_p == 0.0:
        ref = torch_ops.causal_attention(q.double(), _expand(k, group).double(), _expand(v, group).double())
        parity.assert_close(grouped[0], ref, dtype, f"grouped decode {shape}")


@needs_cpu_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tq", [65, 66, 130])
def test_cpu_a_prefills_last_one_or_two_rows_are_its_decode_rows(dtype, tq):
    """A query tile of one or two rows (the last of 65, 66, 130 queries) is scored key by key as a decode call
    is: those rows equal, bitwise, the same rows attended on their own, the log-sum-exp too."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, n, 64, generator=g).to(dtype) for n in (tq, tq + 3, tq + 3))
    kernels = parity.kernel_namespace("cpu")
    whole = kernels.attention_fwd(q, k, v, 0.125, 0.0, None)
    rows = tq % 64
    alone = kernels.attention_fwd(q[:, :, -rows:], k, v, 0.125, 0.0, None)
    torch.testing.assert_close(whole[0][:, :, -rows:], alone[0], atol=0, rtol=0)
    torch.testing.assert_close(whole[1][:, :, -rows:], alone[1], atol=0, rtol=0)


@needs_cpu_backend
@pytest.mark.parametrize("tq", [1, 2, 3])
def test_cpu_an_empty_batch_of_grouped_heads_gives_empty_results(tq):
    q = torch.randn(0, 8, tq, 16, requires_grad=True)
    k, v = (torch.randn(0, 2, 5, 16, requires_grad=True) for _ in range(2))
    out = ops.causal_attention(q, k, v, backend="cpu")
    assert out.shape == (0, 8, tq, 16)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("shape", [(2, 4, 2, 19, 19, 64), (1, 4, 1, 6, 30, 64)], ids=str)
def test_gqa_equals_expanded_kv_with_dropout(backend, device, shape):
    """The mask is keyed by the query head, so grouped k/v give what k/v expanded per query head give:
    the same output under one seed, and dk/dv equal to the expanded gradients summed over each group."""
    dtype = _device_dtype(backend, device)
    q, k, v = _gqa_inputs(shape, dtype, device)
    group = q.shape[1] // k.shape[1]
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    expanded = [q.clone().requires_grad_(True), _expand(k, group).requires_grad_(True),
                _expand(v, group).requires_grad_(True)]
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(device=device, dtype=dtype)
    outs = []
    for inputs in (leaves, expanded):
        torch.manual_seed(21)
        out = ops.causal_attention(*inputs, dropout_p=0.3, training=True, backend=backend)
        out.backward(grad_out)
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    assert not torch.equal(outs[0], ops.causal_attention(q, k, v, backend=backend)), "dropout was not applied"
    b, h_kv, tk, d = k.shape
    t = parity.tol(torch.float32 if dtype == torch.float64 else dtype)
    torch.testing.assert_close(leaves[0].grad, expanded[0].grad, atol=0, rtol=0)
    for mine, theirs in ((leaves[1].grad, expanded[1].grad), (leaves[2].grad, expanded[2].grad)):
        assert mine.shape == (b, h_kv, tk, d)
        summed = theirs.double().view(b, h_kv, group, tk, d).sum(2)
        torch.testing.assert_close(mine.double(), summed, atol=t["atol"], rtol=t["rtol"])


@pytest.mark.parametrize("backend,device", backend_devices())
def test_gqa_strided_kv_views(backend, device):
    """k/v as transposed views of (B, T, H_kv, D) projections, as the models pass them."""
    dtype = _device_dtype(backend, device)
    g = torch.Generator().manual_seed(6)
    b, t, h, h_kv, d = 2, 23, 4, 2, 64
    q = torch.randn(b, t, h, d, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
    kv = torch.randn(b, t, 2 * h_kv * d, generator=g).to(device=device, dtype=dtype)
    k, v = (kv[..., i * h_kv * d:(i + 1) * h_kv * d].view(b, t, h_kv, d).transpose(1, 2) for i in range(2))
    assert not k.is_contiguous() and k.shape == (b, h_kv, t, d)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    strided = ops.causal_attention(*leaves, backend=backend)
    packed = ops.causal_attention(*(x.contiguous() for x in (q, k, v)), backend=backend)
    torch.testing.assert_close(strided.detach(), packed, atol=0, rtol=0)
    ref_leaves = [x.detach().double().cpu().requires_grad_(True) for x in (q, k, v)]
    ref = torch_ops.causal_attention(*ref_leaves)
    parity.assert_close(strided.detach().cpu(), ref.detach(), dtype, f"{backend} strided gqa")
    strided.sum().backward()
    ref.sum().backward()
    for name, mine, theirs in zip(("dq", "dk", "dv"), leaves, ref_leaves):
        assert mine.grad.shape == mine.shape
        parity.assert_close(mine.grad.cpu(), theirs.grad, dtype, f"{backend} strided gqa {name}")


@pytest.mark.parametrize("backend,device", backend_devices())
def test_gqa_opcheck(backend, device):
    dtype = torch.float16 if backend == "cuda" else torch.float32
    kwargs, kernels = opcheck_kwargs(backend, device), kernel_namespace(backend)
    seed = torch.tensor([77], dtype=torch.int64, device=device)
    q, k, v = (t.requires_grad_(True) for t in _gqa_inputs((1, 4, 2, 5, 9, 64), dtype, device))
    torch.library.opcheck(kernels.attention_fwd.default, (q, k, v, 0.125, 0.0, None), **kwargs)
    torch.library.opcheck(kernels.attention_fwd.default, (q, k, v, 0.125, 0.3, seed), **kwargs)
    out, lse = kernels.attention_fwd(q.detach(), k.detach(), v.detach(), 0.125, 0.2, seed)
    dq, dk, dv = kernels.attention_bwd(torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse,
                                       0.125, 0.2, seed)
    assert dq.shape == q.shape and dk.shape == dv.shape == k.shape
    torch.library.opcheck(kernels.attention_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, 0.125, 0.2, seed),
                          **kwargs)


def test_gqa_fakes_give_dk_dv_the_kv_shapes():
    q, k = torch.randn(2, 6, 5, 16), torch.randn(2, 2, 9, 16)
    out, lse = attention._fake_attention_fwd(q, k, k, 0.25, 0.0, None)
    assert out.shape == q.shape and lse.shape == (2, 6, 5)
    dq, dk, dv = attention._fake_attention_bwd(out, q, k, k, out, lse, 0.25, 0.0, None)
    assert dq.shape == q.shape and dk.shape == dv.shape == k.shape
    assert attention._fake_decode_attention(q[:, :, :1], k, k, 0.25).shape == (2, 6, 1, 16)


@pytest.mark.parametrize("h,h_kv", [(4, 3), (6, 4), (2, 4), (4, 0), (0, 1)])
@pytest.mark.parametrize("tq", [1, 4], ids=["decode", "prefill"])
def test_gqa_bad_head_ratio_raises_before_any_kernel(h, h_kv, tq):
    q, k = torch.randn(1, h, tq, 8), torch.randn(1, h_kv, 4, 8)
    for backend in ("torch", "cpu", "triton", "cuda"):
        with pytest.raises(ValueError, match=r"k has .* heads but q has .*multiple of the key/value heads"):
            ops.causal_attention(q, k, k, backend=backend)


@needs_cpu_backend
@pytest.mark.parametrize("h", [3, 0], ids=["not a multiple", "no query head"])
def test_gqa_cpu_kernel_checks_head_ratio_itself(h):
    """The kernel checks too (a group of no query heads would divide by zero in its head loops)."""
    q, k = torch.randn(1, h, 2, 4), torch.randn(1, 2, 2, 4)
    with pytest.raises(RuntimeError, match="multiple of k's heads"):
        torch.ops.gptfast_cpu.attention_fwd(q, k, k, 1.0, 0.0, None)
    with pytest.raises(RuntimeError, match="multiple of k's heads"):
        torch.ops.gptfast_cpu.attention_bwd(q, q, k, k, q, torch.zeros(1, h, 2), 1.0, 0.0, None)


@parity.needs_triton
@needs_interpreter
def test_gqa_triton_kernels_check_head_ratio_themselves():
    # The installed kernel package: importing csrc.triton by its path would define the ops a second time.
    triton_attention = pytest.importorskip("gptfast.triton_kernels.attention")
    q, k = torch.randn(1, 0, 2, 16), torch.randn(1, 2, 2, 16)
    with pytest.raises(ValueError, match="whole multiple of k's"):
        triton_attention.attention_fwd(q, k, k, 1.0, 0.0, None)
    with pytest.raises(ValueError, match="whole multiple of k's"):
        triton_attention.attention_bwd(q, q, k, k, q, torch.zeros(1, 0, 2), 1.0, 0.0, None)


def test_gqa_kernels_receive_the_unexpanded_kv():
    """The fused front ends hand the kernel the caller's k/v heads themselves, not an expanded copy."""
    for call in (attention.fused_causal_attention, attention.cuda_causal_attention):
        rec = _RecordingOps()
        seen = []

        def fwd(q_, k_, v_, scale, dropout_p, seed):
            seen.append((k_, v_))
            return torch.zeros_like(q_), torch.zeros(q_.shape[:3])

        rec.attention_fwd = rec.decode_attention = lambda q_, k_, v_, scale, *rest: (
            fwd(q_, k_, v_, scale, *rest) if rest else fwd(q_, k_, v_, scale, 0.0, None)[0])
        q = torch.randn(1, 8, 1 if call is attention.cuda_causal_attention else 5, 64, dtype=torch.float16)
        k, v = torch.randn(1, 2, 9, 64, dtype=torch.float16), torch.randn(1, 2, 9, 64, dtype=torch.float16)
        call(rec, q, k, v, dropout_p=0.0, training=False, scale=None)
        (k_, v_), = seen
        assert k_.data_ptr() == k.data_ptr() and v_.data_ptr() == v.data_ptr() and k_.shape[1] == 2


@needs_cpu_backend
def test_gqa_cpu_backward_does_not_allocate_expanded_kv():
    """Peak memory of a long multi-query backward stays far below one expanded (B, H, T, D) k copy."""
    b, h, t, d = 1, 16, 512, 64
    q, k, v = (x.requires_grad_(True) for x in _gqa_inputs((b, h, 1, t, t, d), torch.float32, "cpu"))
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = ops.causal_attention(q, k, v, backend="cpu")
        out.sum().backward()
    expanded_bytes = b * h * t * d * 4
    bwd = [e.cpu_memory_usage for e in prof.key_averages() if e.key == "gptfast_cpu::attention_bwd"]
    # dq is one (B, H, T, D) tensor; dk/dv expanded per query head would add two more.
    assert len(bwd) == 1 and expanded_bytes <= bwd[0] < 1.5 * expanded_bytes, (bwd, expanded_bytes)
    assert k.grad.shape == (b, 1, t, d)


class _RecordingAttention:
    """Stands in for ``gptfast.ops.causal_attention``: records the k/v it is given, then runs the real op."""

    def __init__(self, real):
        self.real, self.kv = real, []

    def __call__(self, q, k, v, **kwargs):
        self.kv.append((k, v))
        return self.real(q, k, v, **kwargs)


@needs_cpu_backend
@pytest.mark.parametrize("h,h_kv", [(4, 2), (8, 1), (4, 4)])
def test_model_grouped_attention_passes_unexpanded_kv_to_fused_backends(monkeypatch, h, h_kv):
    """The models' grouped attention hands a fused backend the k/v heads themselves; the torch
    backend gets the reference's repeat_interleave copies (what keeps it bitwise)."""
    from gptfast.models import layers
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, h, 11, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(2, h_kv, 11, 16, generator=g, requires_grad=True) for _ in range(2))
    results = {}
    for backend in ("torch", "cpu"):
        recorder = _RecordingAttention(ops.causal_attention)
        monkeypatch.setattr(ops, "causal_attention", recorder)
        with ops.use_backend(backend):
            out = layers.grouped_query_attention(q, k, v)
        monkeypatch.undo()
        (k_seen, v_seen), = recorder.kv
        if backend == "torch":
            assert k_seen.shape[1] == h and k_seen.is_contiguous()
            torch.testing.assert_close(k_seen, k.repeat_interleave(h // h_kv, dim=1), atol=0, rtol=0)
        else:
            assert k_seen is k and v_seen is v
        results[backend] = (out, torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    (ref, ref_grads), (mine, grads) = results["torch"], results["cpu"]
    parity.assert_close(mine.detach(), ref.detach(), torch.float32, "grouped attention on cpu")
    for name, a, b_ in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert a.shape == b_.shape
        parity.assert_close(a, b_, torch.float32, f"grouped attention {name}")


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("h,h_kv,filled", [(8, 2, 150), (4, 1, 1), (6, 3, 77)])
def test_gqa_decode_step_over_a_strided_kv_cache(backend, device, h, h_kv, filled):
    """One new token (no grad: CUDA's split-key decode kernel) over a preallocated cache of H_kv heads."""
    dtype = _device_dtype(backend, device)
    g = torch.Generator().manual_seed(filled)
    cache_k, cache_v = (torch.randn(2, h_kv, 256, 64, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    q = torch.randn(2, 1, h, 64, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
    k, v = cache_k[:, :, :filled], cache_v[:, :, :filled]
    with torch.no_grad():
        out = ops.causal_attention(q, k, v, backend=backend)
    assert out.shape == (2, h, 1, 64)
    ref = torch_ops.causal_attention(q.double().cpu(), k.double().cpu(), v.double().cpu())
    parity.assert_close(out.cpu(), ref, dtype, f"{backend} gqa decode")
    if backend == "cuda":
        direct = torch.ops.gptfast_cuda.decode_attention(q, k, v, 0.125)
        parity.assert_close(direct.cpu(), ref, dtype, "gqa decode kernel")
        torch.library.opcheck(torch.ops.gptfast_cuda.decode_attention.default, (q, k, v, 0.125))


@needs_cpu_backend
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_generation_runner_hands_the_cache_kv_heads_to_the_op(monkeypatch, backend):
    """Prefill and decode of a grouped-query Llama pass the cache's H_kv heads to causal_attention
    (no per-step copy of the cache per query head); logits agree with the uncached model."""
    from gptfast.generation import CachedRunner, KVCache
    from gptfast.models import llama3
    torch.manual_seed(0)
    cfg = {"vocab_size": 97, "context_length": 32, "emb_dim": 32, "n_heads": 4, "n_layers": 2, "hidden_dim": 48,
           "n_kv_groups": 1, "rope_base": 500_000.0, "dtype": torch.float32,
           "rope_freq": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_context_length": 16}}
    model = llama3.Llama3Model(cfg).eval()
    idx = torch.randint(0, 97, (2, 9))
    recorder = _RecordingAttention(ops.causal_attention)
    monkeypatch.setattr(ops, "causal_attention", recorder)
    with ops.use_backend(backend):
        runner = CachedRunner(model)
        cache = KVCache.for_model(model, 2, 16)
        runner.prefill(idx[:, :8], cache)
        step = runner.decode(idx[:, 8:], cache, 8)
    monkeypatch.undo()
    assert recorder.kv and all(k.shape[1] == v.shape[1] == 1 for k, v in recorder.kv)
    with torch.no_grad(), ops.use_backend(backend):
        full = model(idx)[:, -1]
    parity.assert_close(step, full, torch.float32, f"{backend} cached decode")


@pytest.mark.parametrize("backend,device,dtype", backend_cases("causal_attention", dtypes=(torch.bfloat16,)))
@pytest.mark.parametrize("given", [torch.float32, torch.float16], ids=str)
def test_under_autocast_inputs_are_attended_in_its_dtype_as_torchs(backend, device, dtype, given):
    """Autocast runs the torch path's products in its dtype, so the output is in it; a fused backend, one op
    autocast does not cast, takes its inputs cast the same way (and their gradients flow back in theirs)."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 4, 6, 16, generator=g).to(device, given).requires_grad_(True) for _ in range(3))
    with torch.autocast(torch.device(device).type, dtype=dtype):
        expected = ops.causal_attention(q, k[:, :2], v[:, :2], backend="torch")
        got = ops.causal_attention(q, k[:, :2], v[:, :2], backend=backend)
    assert got.dtype == expected.dtype == dtype
    parity.assert_close(got.float(), expected.float(), dtype, "attention under autocast")
    got.float().sum().backward()
    assert q.grad.dtype == k.grad.dtype == given and torch.isfinite(q.grad).all()
