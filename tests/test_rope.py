"""Rotary embedding (``gptfast.ops.rope``): every fused backend against the torch oracle, forward and backward.

Cases: float32/bfloat16/float16 (and float64 on cpu), head dims whose half is not a
multiple of any vector width, one token and many, a position offset (KV-cache decode) and
per-row positions (left-padded batches), Llama 3's scaled tables, non-contiguous views of
x (transposed heads) and of the tables and upstream gradient, x and tables expanded from one
row (stride 0), results independent of the thread count, NaN/inf, ``opcheck`` and the
argument checks (positions outside the tables included).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gptfast import ops
from gptfast.models.layers import rope_tables
from gptfast.ops import torch_ops

from parity import backend_cases, backend_devices, kernel_namespace, needs_cpu_backend, opcheck_kwargs, tol

_ORACLE = torch_ops.rope

CASES = backend_cases("rope") + [
    pytest.param("cpu", "cpu", torch.float16, marks=[needs_cpu_backend], id="cpu-cpu-float16")]
LLAMA_FREQ = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_context_length=64)
# (B, H, T, D, offset)
SHAPES = [(1, 1, 1, 2, 0), (2, 3, 5, 18, 0), (1, 2, 1, 64, 37), (2, 2, 9, 128, 3), (1, 4, 33, 34, 0)]


def _inputs(b, h, t, d, seed=0, context=48, freq_config=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, t, d, generator=g) * 2
    grad = torch.randn(b, h, t, d, generator=g)
    cos, sin = rope_tables(d, theta_base=500.0, context_length=context, freq_config=freq_config)
    return x, cos, sin, grad


def check_rope_parity(backend, device, dtype, x, cos, sin, grad, offset=0, positions=None):
    x1 = x.to(device=device, dtype=dtype).detach().requires_grad_(True)
    pos1 = None if positions is None else positions.to(device)
    out = ops.rope(x1, cos.to(device), sin.to(device), offset=offset, positions=pos1, backend=backend)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x1.device
    out.backward(grad.to(device=device, dtype=dtype))
    x2 = x1.detach().cpu().double().requires_grad_(True)
    ref = _ORACLE(x2, cos.double(), sin.double(), offset=offset, positions=positions)
    ref.backward(grad.to(dtype).double())
    torch.testing.assert_close(out.detach().cpu().double(), ref.detach(), **tol(dtype), equal_nan=True)
    torch.testing.assert_close(x1.grad.cpu().double(), x2.grad, **tol(dtype), equal_nan=True)


@pytest.mark.parametrize("backend, device, dtype", CASES)
@pytest.mark.parametrize("b, h, t, d, offset", SHAPES, ids=lambda v: str(v))
def test_forward_and_backward_match_the_oracle(backend, device, dtype, b, h, t, d, offset):
    x, cos, sin, grad = _inputs(b, h, t, d)
    check_rope_parity(backend, device, dtype, x, cos, sin, grad, offset=offset)


@pytest.mark.parametrize("backend, device, dtype", CASES)
def test_per_row_positions_and_llama3_scaled_tables(backend, device, dtype):
    x, cos, sin, grad = _inputs(3, 2, 4, 32, freq_config=LLAMA_FREQ, context=100)
    positions = torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8], [96, 97, 98, 99]])
    check_rope_parity(backend, device, dtype, x, cos, sin, grad, positions=positions.to(torch.int32))


@pytest.mark.parametrize("backend, device, dtype", CASES)
def test_non_contiguous_views_of_every_input(backend, device, dtype):
    b, t, h, d = 2, 7, 3, 36
    x, cos, sin, grad = _inputs(b, t, h, d)  # (B, T, H, D) as a projection gives it
    x, grad = x.transpose(1, 2), grad.transpose(1, 2)  # heads view (B, H, T, D): strided
    cos_wide, sin_wide = (torch.stack([c, c], dim=-1)[..., 0] for c in (cos, sin))  # strided tables, same values
    assert not x.is_contiguous() and not cos_wide.is_contiguous() and torch.equal(cos_wide, cos)
    check_rope_parity(backend, device, dtype, x, cos_wide, sin_wide, grad, offset=5)


@pytest.mark.parametrize("backend, device, dtype", backend_cases("rope", dtypes=(torch.float32, torch.bfloat16)))
@pytest.mark.parametrize("expanded_tables", [False, True], ids=["tables", "expanded-tables"])
def test_expanded_inputs_match_the_oracle(backend, device, dtype, expanded_tables):
    """x broadcast over batch and tokens from one (1, H, 1, D) slice (stride 0 there), optionally with
    tables broadcast from one position's row: forward, and the gradient summed back into the slice."""
    b, h, t, d = 2, 3, 5, 18
    base, cos, sin, grad = _inputs(1, h, 1, d, seed=14, context=12)
    grad = torch.randn(b, h, t, d, generator=torch.Generator().manual_seed(15))
    if expanded_tables:
        cos, sin = cos[7:8].expand(12, d), sin[7:8].expand(12, d)
        assert cos.stride() == (0, 1)
    base1 = base.to(device=device, dtype=dtype).requires_grad_(True)
    x1 = base1.expand(b, h, t, d)
    assert x1.stride()[0] == 0 and x1.stride()[2] == 0
    out = ops.rope(x1, cos.to(device), sin.to(device), offset=4, backend=backend)
    out.backward(grad.to(device=device, dtype=dtype))
    base2 = base1.detach().cpu().double().requires_grad_(True)
    ref = _ORACLE(base2.expand(b, h, t, d), cos.double(), sin.double(), offset=4)
    ref.backward(grad.to(dtype).double())
    tolerance = tol(dtype)
    grow = 1.0 if dtype == torch.float32 else 3.0  # the slice's gradient sums b * t = 10 rounded terms
    torch.testing.assert_close(out.detach().cpu().double(), ref.detach(), **tolerance)
    torch.testing.assert_close(base1.grad.cpu().double(), base2.grad, atol=tolerance["atol"] * grow,
                               rtol=tolerance["rtol"] * grow)


@needs_cpu_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_results_do_not_depend_on_the_thread_count(dtype):
    """Output and gradient are bitwise the same with 1, 2 and 3 threads (1280 rows of 64: several tasks),
    with an offset and with per-row positions."""
    x, cos, sin, grad = _inputs(2, 4, 160, 64, seed=16, context=200)
    positions = torch.randint(0, 200, (2, 160), generator=torch.Generator().manual_seed(17))
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for offset, pos in ((7, None), (0, positions)):
                x1 = x.to(dtype).requires_grad_(True)
                out = ops.rope(x1, cos, sin, offset=offset, positions=pos, backend="cpu")
                out.backward(grad.to(dtype))
                results.append((out.detach(), x1.grad))
    finally:
        torch.set_num_threads(before)
    for i, other in enumerate(results[2:], start=2):
        assert all(torch.equal(a, c) for a, c in zip(results[i % 2], other))


@pytest.mark.parametrize("backend, device, dtype", backend_cases("rope", dtypes=(torch.float32,)))
def test_nan_and_inf_stay_in_their_pairs(backend, device, dtype):
    x, cos, sin, _ = _inputs(1, 1, 3, 8)
    x[0, 0, 1, 2] = float("nan")
    x[0, 0, 2, 5] = float("inf")
    out = ops.rope(x.to(device), cos.to(device), sin.to(device), backend=backend).cpu()
    ref = _ORACLE(x, cos, sin)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    torch.testing.assert_close(out, ref, equal_nan=True, **tol(dtype))


@pytest.mark.parametrize("backend, device", backend_devices())
def test_opcheck(backend, device):
    kwargs, namespace = opcheck_kwargs(backend, device), kernel_namespace(backend)
    x, cos, sin, grad = (t.to(device) for t in _inputs(2, 2, 3, 16))
    positions = torch.tensor([[0, 1, 2], [4, 5, 6]], device=device)
    for pos, offset in ((None, 4), (positions, 0)):
        torch.library.opcheck(namespace.rope_fwd.default, (x.requires_grad_(True), cos, sin, pos, offset), **kwargs)
        torch.library.opcheck(namespace.rope_bwd.default, (grad, cos, sin, pos, offset), **kwargs)


def test_torch_backend_is_the_reference_apply_rope_bitwise():
    from llms_from_scratch.llama3 import apply_rope, compute_rope_params
    cos, sin = compute_rope_params(16, theta_base=500.0, context_length=20)
    x = torch.randn(2, 3, 6, 16).to(torch.bfloat16)
    assert torch.equal(ops.rope(x, cos, sin, backend="torch"), apply_rope(x, cos, sin))


def test_a_zero_dimensional_tensor_offset_is_an_offset_as_in_the_reference():
    from llms_from_scratch.kv_cache.qwen3 import apply_rope as reference_apply_rope

    from gptfast.kv_cache.qwen3 import apply_rope
    x, cos, sin, _ = _inputs(2, 3, 4, 8, context=10)
    expected = reference_apply_rope(x, cos, sin, torch.tensor(3))
    assert torch.equal(apply_rope(x, cos, sin, torch.tensor(3)), apply_rope(x, cos, sin, 3))
    torch.testing.assert_close(apply_rope(x, cos, sin, torch.tensor(3)), expected)
    with pytest.raises(TypeError, match="offset must be an int"):
        ops.rope(x, cos, sin, offset=torch.tensor(3.0))


def test_bad_arguments_are_named_before_any_kernel():
    x, cos, sin, _ = _inputs(2, 1, 3, 8, context=10)
    for backend in ("torch", "cpu", "triton", "cuda"):
        with pytest.raises(ValueError, match="x must be 4-D"):
            ops.rope(x[0], cos, sin, backend=backend)
        with pytest.raises(ValueError, match="head_dim must be even"):
            ops.rope(x[..., :7], cos[:, :7], sin[:, :7], backend=backend)
        with pytest.raises(ValueError, match=r"cos and sin must both be \(positions, 8\)"):
            ops.rope(x, cos[:, :6], sin[:, :6], backend=backend)
        with pytest.raises(ValueError, match="lie outside the RoPE tables"):
            ops.rope(x, cos, sin, offset=8, backend=backend)
        with pytest.raises(ValueError, match="lie outside the RoPE tables"):
            ops.rope(x, cos, sin, offset=-1, backend=backend)
        with pytest.raises(TypeError, match="offset must be an int"):
            ops.rope(x, cos, sin, offset=1.0, backend=backend)
        with pytest.raises(ValueError, match="lie outside the RoPE tables"):  # numpy's sum would wrap to negative
            ops.rope(x, cos, sin, offset=np.int64(2**63 - 1), backend=backend)
        with pytest.raises(ValueError, match="positions contains 10, outside"):
            ops.rope(x, cos, sin, positions=torch.tensor([[0, 1, 2], [8, 9, 10]]), backend=backend)
        with pytest.raises(ValueError, match="positions contains -1, outside"):
            ops.rope(x, cos, sin, positions=torch.tensor([[0, 1, -1], [8, 9, 9]]), backend=backend)
        with pytest.raises(ValueError, match=r"positions must have shape \(2, 3\)"):
            ops.rope(x, cos, sin, positions=torch.zeros(2, 2, dtype=torch.long), backend=backend)
        with pytest.raises(TypeError, match="positions must be an int64 or int32"):
            ops.rope(x, cos, sin, positions=torch.zeros(2, 3), backend=backend)
        with pytest.raises(TypeError, match="cos must be a floating"):
            ops.rope(x, cos.long(), sin, backend=backend)


@needs_cpu_backend
@pytest.mark.parametrize("name", ["rope_fwd", "rope_bwd"])
def test_the_cpu_kernel_refuses_an_offset_whose_last_position_overflows(name):
    """The kernel's own check: offset + T would wrap past 2^63 and pass a plain sum test, reading far outside."""
    x, cos, sin, _ = _inputs(1, 1, 2, 8, context=4)
    kernel = getattr(torch.ops.gptfast_cpu, name)
    for offset in (2**63 - 1, 2**63 - 2, 3, -1):
        with pytest.raises(RuntimeError, match="lie outside the tables"):
            kernel(x, cos, sin, None, offset)
    assert torch.isfinite(kernel(x, cos, sin, None, 2)).all()  # the last window inside the tables


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu_backend)])
def test_per_row_positions_compile_into_one_graph(backend):
    """The front door reads the positions' range on CPU, but not while torch.compile traces (the values are not
    known then; the kernels' own bounds checks stand)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, 16, generator=g)
    cos, sin = rope_tables(16, context_length=20)
    positions = torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    torch._dynamo.reset()
    compiled = torch.compile(lambda x_, p: ops.rope(x_, cos, sin, positions=p, backend=backend), backend="eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(x, positions), ops.rope(x, cos, sin, positions=positions, backend="torch"))
