"""Small-batch linear layer (``gptfast.ops.decode_linear``): every fused backend against ``F.linear``.

Cases: float32/bfloat16/float16, odd K and N (not multiples of any vector width), M = 1, 3,
8 and 17 rows (and a 3-D x), bias on and off, non-contiguous views of x and weight, a
contiguous weight passed without a copy, NaN/inf propagation, the gradient, empty shapes,
``torch.library.opcheck`` and the argument checks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gptfast import ops
from gptfast.ops import linear as linear_module

from parity import needs_cpu_backend

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CASES = [pytest.param("cpu", "cpu", dt, marks=[needs_cpu_backend], id=f"cpu-cpu-{str(dt)[6:]}") for dt in DTYPES]

# Against F.linear in float64 from the same rounded inputs: accumulation order (float32) and
# one rounding of the output (a few ulps of the output dtype, relative to the row's scale).
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=0.3, rtol=1.6e-2),
       torch.float16: dict(atol=4e-2, rtol=2e-3)}

# (M, K, N): one row, odd K and N, 8 rows, more rows than a tile holds, Qwen3-0.6B's width.
SHAPES = [(1, 1, 1), (1, 7, 5), (3, 33, 19), (8, 100, 67), (17, 129, 31), (1, 1024, 257), (8, 1023, 13)]


def _inputs(m, k, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    return x, w, b


def _reference(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


def _check(out, x, w, b, dtype):
    assert out.dtype == dtype and out.shape == (*x.shape[:-1], w.shape[0])
    torch.testing.assert_close(out.double(), _reference(x, w, b), **TOL[dtype], equal_nan=True)


@pytest.mark.parametrize("backend, device, dtype", CASES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("m, k, n", SHAPES, ids=[f"M{m}K{k}N{n}" for m, k, n in SHAPES])
def test_matches_f_linear(backend, device, dtype, with_bias, m, k, n):
    x, w, b = _inputs(m, k, n, dtype)
    b = b if with_bias else None
    _check(ops.decode_linear(x, w, b, backend=backend), x, w, b, dtype)


@pytest.mark.parametrize("backend, device, dtype", CASES)
def test_leading_axes_are_rows(backend, device, dtype):
    x, w, b = _inputs(6, 40, 9, dtype)
    x3 = x.view(2, 3, 40)
    out = ops.decode_linear(x3, w, b, backend=backend)
    assert out.shape == (2, 3, 9)
    _check(out, x3, w, b, dtype)


@pytest.mark.parametrize("backend, device, dtype", CASES)
def test_non_contiguous_views(backend, device, dtype):
    x, w, b = _inputs(8, 2 * 37, 2 * 23, dtype, seed=1)
    xv, wv, bv = x.t().contiguous().t()[:, ::2], w[::2, ::2], b[::2]  # strided rows, strided columns
    assert not xv.is_contiguous() and not wv.is_contiguous() and not bv.is_contiguous()
    _check(ops.decode_linear(xv, wv, bv, backend=backend), xv, wv, bv, dtype)
    wt = torch.randn(37, 11).to(dtype).t()  # a transposed weight
    _check(ops.decode_linear(xv, wt, None, backend=backend), xv, wt, None, dtype)


def test_a_contiguous_weight_is_passed_to_the_kernel_as_is():
    seen = []

    class Recorder:
        @staticmethod
        def decode_linear(x, weight, bias):
            seen.append(weight)
            return F.linear(x, weight, bias)

    x, w, b = _inputs(2, 16, 4, torch.float32)
    out = linear_module.fused_decode_linear(Recorder, x.view(1, 2, 16), w, b)
    assert seen[0] is w and out.shape == (1, 2, 4)


@pytest.mark.parametrize("backend, device, dtype", CASES)
def test_nan_and_inf_propagate_to_their_entries(backend, device, dtype):
    x, w, b = _inputs(3, 45, 21, dtype, seed=2)
    x[1, 7] = float("nan")
    w[4, 44] = float("inf")  # in the K tail of any vector width
    out = ops.decode_linear(x, w, b, backend=backend)
    ref = _reference(x, w, b)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    assert out[1].isnan().all() and not out[[0, 2]][:, [0, 1, 2, 3, 5]].isnan().any()
    finite = ref.isfinite()
    torch.testing.assert_close(out.double()[finite], ref[finite], **TOL[dtype])


@pytest.mark.parametrize("backend, device, dtype", CASES)
def test_empty_shapes(backend, device, dtype):
    for m, k, n in ((0, 8, 3), (2, 8, 0), (2, 0, 3)):
        x, w, b = _inputs(m, k, n, dtype)
        for bias in (None, b):
            out = ops.decode_linear(x, w, bias, backend=backend)
            torch.testing.assert_close(out.double(), _reference(x, w, bias))


@pytest.mark.parametrize("backend, device, dtype", CASES[:1])
def test_gradient_is_f_linear_s(backend, device, dtype):
    x, w, b = _inputs(3, 20, 7, dtype, seed=4)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
    refs = [t.clone().double().requires_grad_(True) for t in (x, w, b)]
    g = torch.randn(3, 7)
    ops.decode_linear(*leaves, backend=backend).backward(g)
    F.linear(*refs).backward(g.double())
    for got, ref in zip(leaves, refs):
        torch.testing.assert_close(got.grad.double(), ref.grad, **TOL[dtype])


@needs_cpu_backend
@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(with_bias):
    x, w, b = _inputs(3, 37, 11, torch.float32)
    args = (x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True) if with_bias else None)
    torch.library.opcheck(torch.ops.gptfast_cpu.decode_linear.default, args)


@needs_cpu_backend
def test_float64_is_refused_by_the_cpu_backend_and_served_by_torch():
    x, w, b = _inputs(2, 8, 3, torch.float64)
    with pytest.raises(RuntimeError, match="decode_linear runs float32, bfloat16 and float16"):
        ops.decode_linear(x, w, b, backend="cpu")
    assert torch.equal(ops.decode_linear(x, w, b, backend="torch"), F.linear(x, w, b))


def test_torch_backend_is_f_linear_bitwise():
    for dtype in DTYPES:
        x, w, b = _inputs(3, 64, 10, dtype)
        assert torch.equal(ops.decode_linear(x, w, b, backend="torch"), F.linear(x, w, b))


def test_bad_arguments_are_named_before_any_kernel():
    x, w, b = torch.randn(2, 8), torch.randn(3, 8), torch.randn(3)
    for backend in ("torch", "cpu", "triton", "cuda"):
        with pytest.raises(TypeError, match="x must be a torch.Tensor"):
            ops.decode_linear([1.0], w, backend=backend)
        with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
            ops.decode_linear(x, None, backend=backend)
        with pytest.raises(TypeError, match="x must be a floating"):
            ops.decode_linear(x.long(), w, backend=backend)
        with pytest.raises(TypeError, match="weight must be a floating"):
            ops.decode_linear(x, w.long(), backend=backend)
        with pytest.raises(ValueError, match=r"weight must be \(N, K\) with K=8"):
            ops.decode_linear(x, torch.randn(3, 7), backend=backend)
        with pytest.raises(ValueError, match=r"weight must be \(N, K\)"):
            ops.decode_linear(x, torch.randn(8), backend=backend)
        with pytest.raises(TypeError, match="x and weight must share one dtype"):
            ops.decode_linear(x, w.double(), backend=backend)
        with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
            ops.decode_linear(x, w, torch.randn(4), backend=backend)
        with pytest.raises(TypeError, match="bias must have x's dtype"):
            ops.decode_linear(x, w, b.half(), backend=backend)
        with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
            ops.decode_linear(x, w, 1.0, backend=backend)
        with pytest.raises(ValueError, match="x must be"):
            ops.decode_linear(torch.tensor(1.0), w, backend=backend)


# -- routing of a decode step's linear layers --------------------------------------------------


def _count_routed(monkeypatch):
    from gptfast.ops import cpu_ops
    calls = []
    real = cpu_ops.decode_linear

    def counting(x, weight, bias=None):
        calls.append(tuple(x.shape))
        return real(x, weight, bias=bias)

    monkeypatch.setattr(cpu_ops, "decode_linear", counting)
    return calls


@needs_cpu_backend
@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_decode_mode_routes_few_row_linears_to_the_fused_op(monkeypatch, backend):
    from gptfast.generation.runner import DECODE_LINEAR_MAX_ROWS, DecodeLinearMode
    calls = _count_routed(monkeypatch)
    one = torch.randn(1, 24).to(torch.bfloat16)
    layer = torch.nn.Linear(24, 10).to(torch.bfloat16)
    few = torch.randn(2, 1, 24).to(torch.bfloat16)
    many = torch.randn(DECODE_LINEAR_MAX_ROWS + 1, 24).to(torch.bfloat16)
    with ops.use_backend(backend), torch.no_grad():
        with DecodeLinearMode():
            out_few, out_many = layer(few), layer(many)
            layer(one)  # a single row: torch's own matrix-vector path
            layer.double()(few.double())  # float64: no fused kernel, the model's own F.linear
    assert calls == [(2, 1, 24)]
    _check(out_few, few, layer.weight.to(torch.bfloat16), layer.bias.to(torch.bfloat16), torch.bfloat16)
    assert out_many.shape == (DECODE_LINEAR_MAX_ROWS + 1, 10)


@needs_cpu_backend
def test_decode_mode_keeps_f_linear_with_the_torch_backend(monkeypatch):
    from gptfast.generation.runner import DecodeLinearMode
    calls = _count_routed(monkeypatch)
    layer = torch.nn.Linear(24, 10)
    x = torch.randn(3, 24)
    with ops.use_backend("torch"), torch.no_grad(), DecodeLinearMode():
        out = layer(x)
    assert calls == [] and torch.equal(out, F.linear(x, layer.weight, layer.bias))


@needs_cpu_backend
def test_cached_decode_steps_use_the_fused_op(monkeypatch):
    from gptfast.generation import generate
    from gptfast.models.gpt import GPTModel
    calls = _count_routed(monkeypatch)
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, context_length=16, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0, qkv_bias=True)
    model = GPTModel(cfg).eval()
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with ops.use_backend("auto"):
        cached = generate(model, idx, max_new_tokens=4, context_size=16)
    assert len(calls) >= 3 * 5  # the decode steps' q/k/v, out, ff and head projections
    with ops.use_backend("torch"):
        assert torch.equal(cached, generate(model, idx, max_new_tokens=4, context_size=16))
