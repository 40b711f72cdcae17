"""LayerNorm (``gptfast.ops.layer_norm``): every fused backend against the torch oracle, forward and backward.

The oracle is the book's GPT ``LayerNorm`` line for line (biased variance), run in float64
on the fused backend's (rounded) inputs.  Cases: float32/bfloat16/float16 (and float64 on
cpu), odd widths (1, 7, 769: not a multiple of any vector width), 1-D and 3-D inputs, one
row and many rows, non-contiguous views of x, weight, bias and the upstream gradient, inputs
expanded from one row or value (stride 0), the parameters alone requiring grad, rows of huge,
tiny and denormal magnitude, NaN/inf rows, parameters in another dtype than x, determinism of dweight/dbias (also across
thread counts), ``torch.library.opcheck``, gradcheck in float64, the argument checks and the
routing of the GPT's ``LayerNorm`` module.
"""

from __future__ import annotations

import math

import pytest
import torch

from gptfast import ops
from gptfast.ops import torch_ops

from parity import (assert_close_at_scale, backend_cases, backend_devices, kernel_namespace, needs_cpu_backend,
                    opcheck_kwargs, tol)

_ORACLE = torch_ops.layer_norm

CASES = backend_cases("layer_norm") + [
    pytest.param("cpu", "cpu", torch.float16, marks=[needs_cpu_backend], id="cpu-cpu-float16")]

# (leading shape, D): 1-D and 3-D inputs, width 1, odd widths, many rows, the GPT's width + 1.
SHAPES = [((), 7), ((1,), 1), ((1,), 7), ((3, 5), 33), ((2, 9), 64), ((300,), 129), ((2, 3), 769),
          ((4, 3), 1024)]


def _inputs(lead, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d, generator=g) * 2 + 3  # a mean away from 0, as activations have
    w = torch.randn(d, generator=g)
    b = torch.randn(d, generator=g)
    grad = torch.randn(*lead, d, generator=g)
    return x, w, b, grad


def _leaf(t, dtype, device):
    return t.to(device=device, dtype=dtype).detach().requires_grad_(True)


def _grad_tol(dtype, rows):
    """dweight/dbias sum ``rows`` terms: let the low-precision tolerance grow with sqrt(rows)."""
    t = tol(dtype)
    grow = 1.0 if dtype in (torch.float32, torch.float64) else math.sqrt(max(rows, 1) / 16) + 1
    return dict(atol=t["atol"] * grow, rtol=t["rtol"] * grow)


def check_layer_norm_parity(backend, device, dtype, x, w, b, grad, eps=1e-5, param_dtype=None):
    x1 = _leaf(x, dtype, device)
    w1, b1 = _leaf(w, param_dtype or dtype, device), _leaf(b, param_dtype or dtype, device)
    out = ops.layer_norm(x1, w1, b1, eps=eps, backend=backend)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x1.device
    out.backward(grad.to(device=device, dtype=dtype))
    # The oracle in float64 from the same (rounded) inputs.
    x2, w2, b2 = (_leaf(t.detach().cpu(), torch.float64, "cpu") for t in (x1, w1, b1))
    ref = _ORACLE(x2, w2, b2, eps=eps)
    ref.backward(grad.to(dtype).double())
    rows = max(1, x.numel() // x.shape[-1])
    torch.testing.assert_close(out.detach().cpu().double(), ref.detach(), **tol(dtype), equal_nan=True)
    torch.testing.assert_close(x1.grad.cpu().double(), x2.grad, **tol(dtype), equal_nan=True)
    assert w1.grad.dtype == w1.dtype and b1.grad.dtype == b1.dtype
    torch.testing.assert_close(w1.grad.cpu().double(), w2.grad, **_grad_tol(w1.dtype, rows), equal_nan=True)
    torch.testing.assert_close(b1.grad.cpu().double(), b2.grad, **_grad_tol(b1.dtype, rows), equal_nan=True)


@pytest.mark.parametrize("backend, device, dtype", CASES)
@pytest.mark.parametrize("lead, d", SHAPES, ids=[f"{'x'.join(map(str, s)) or 'vec'}x{d}" for s, d in SHAPES])
def test_forward_and_backward_match_the_oracle(backend, device, dtype, lead, d):
    check_layer_norm_parity(backend, device, dtype, *_inputs(lead, d))


@pytest.mark.parametrize("backend, device, dtype", CASES)
def test_non_contiguous_views_of_every_input(backend, device, dtype):
    x, w, b, grad = _inputs((6, 8), 2 * 45)
    # x: every other feature of a wider tensor, transposed leading axes; parameters: strided slices
    xv, wv, bv = x.transpose(0, 1)[..., ::2], w[::2], b[1::2]
    gv = grad.transpose(0, 1)[..., ::2]
    assert not any(t.is_contiguous() for t in (xv, wv, bv, gv))
    x1, w1, b1 = (t.to(device=device, dtype=dtype).detach().requires_grad_(True) for t in (xv, wv, bv))
    out = ops.layer_norm(x1, w1, b1, eps=1e-5, backend=backend)
    out.backward(gv.to(device=device, dtype=dtype))
    x2, w2, b2 = (t.detach().cpu().double().requires_grad_(True) for t in (x1, w1, b1))
    ref = _ORACLE(x2, w2, b2, eps=1e-5)
    ref.backward(gv.to(dtype).double())
    torch.testing.assert_close(out.detach().cpu().double(), ref.detach(), **tol(dtype))
    torch.testing.assert_close(x1.grad.cpu().double(), x2.grad, **tol(dtype))
    torch.testing.assert_close(w1.grad.cpu().double(), w2.grad, **_grad_tol(dtype, 48))
    torch.testing.assert_close(b1.grad.cpu().double(), b2.grad, **_grad_tol(dtype, 48))


@pytest.mark.parametrize("backend, device, dtype",
                         backend_cases("layer_norm", dtypes=(torch.float32, torch.bfloat16, torch.float16)))
def test_parameters_in_another_dtype(backend, device, dtype):
    """float32 parameters with 16-bit activations (bfloat16 ones with float32); gradients in their own dtype."""
    param_dtype = torch.bfloat16 if dtype == torch.float32 else torch.float32
    check_layer_norm_parity(backend, device, dtype, *_inputs((5,), 40), param_dtype=param_dtype)


@pytest.mark.parametrize("backend, device, dtype", backend_cases("layer_norm", dtypes=(torch.float32,)))
def test_nan_and_inf_propagate_to_their_row_only(backend, device, dtype):
    x, w, b, _ = _inputs((4,), 19)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    out = ops.layer_norm(x.to(device), w.to(device), b.to(device), backend=backend).cpu()
    ref = _ORACLE(x, w, b)
    assert out[1].isnan().all() and out[2].isnan().all() and ref[2].isnan().all()
    torch.testing.assert_close(out[[0, 3]], ref[[0, 3]], **tol(dtype))


@pytest.mark.parametrize("backend, device", backend_devices())
def test_parameter_gradients_are_deterministic(backend, device):
    x, w, b, grad = _inputs((257,), 100, seed=3)
    grads = []
    for _ in range(2):
        w1, b1 = w.to(device).requires_grad_(True), b.to(device).requires_grad_(True)
        ops.layer_norm(x.to(device), w1, b1, backend=backend).backward(grad.to(device))
        grads.append((w1.grad, b1.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("backend, device, dtype",
                         backend_cases("layer_norm", dtypes=(torch.float32, torch.bfloat16)))
def test_expanded_inputs_match_the_oracle(backend, device, dtype):
    """x broadcast from one row (stride 0 over the rows), weight and bias broadcast from one value each:
    forward and the gradients reaching the un-expanded leaves."""
    g = torch.Generator().manual_seed(11)
    row = torch.randn(37, generator=g) * 2 + 3
    scale, shift, grad = torch.randn(1, generator=g), torch.randn(1, generator=g), torch.randn(6, 5, 37, generator=g)
    leaves = [_leaf(t, dtype, device) for t in (row, scale, shift)]
    x1, w1, b1 = leaves[0].expand(6, 5, 37), leaves[1].expand(37), leaves[2].expand(37)
    assert x1.stride() == (0, 0, 1) and w1.stride() == (0,) and b1.stride() == (0,)
    out = ops.layer_norm(x1, w1, b1, backend=backend)
    out.backward(grad.to(device=device, dtype=dtype))
    refs = [_leaf(t.detach().cpu(), torch.float64, "cpu") for t in leaves]
    ref = _ORACLE(refs[0].expand(6, 5, 37), refs[1].expand(37), refs[2].expand(37))
    ref.backward(grad.to(dtype).double())
    torch.testing.assert_close(out.detach().cpu().double(), ref.detach(), **tol(dtype))
    for name, mine, theirs, terms in (("row", leaves[0], refs[0], 30), ("scale", leaves[1], refs[1], 30 * 37),
                                      ("shift", leaves[2], refs[2], 30 * 37)):
        torch.testing.assert_close(mine.grad.cpu().double(), theirs.grad, **_grad_tol(dtype, terms),
                                   msg=lambda m: f"{backend} d{name}: {m}")


@pytest.mark.parametrize("backend, device, dtype",
                         backend_cases("layer_norm", dtypes=(torch.float32, torch.bfloat16)))
@pytest.mark.parametrize("with_bias_grad", [True, False], ids=["weight-and-bias", "weight"])
def test_gradient_of_the_parameters_alone(backend, device, dtype, with_bias_grad):
    """x does not require grad: the parameters' gradients are the oracle's and x gets none."""
    x, w, b, grad = _inputs((4, 5), 40, seed=4)
    x1, w1 = x.to(device=device, dtype=dtype), _leaf(w, dtype, device)
    b1 = _leaf(b, dtype, device) if with_bias_grad else b.to(device=device, dtype=dtype)
    out = ops.layer_norm(x1, w1, b1, backend=backend)
    out.backward(grad.to(device=device, dtype=dtype))
    w2 = _leaf(w1.detach().cpu(), torch.float64, "cpu")
    b2 = b1.detach().cpu().double().requires_grad_(with_bias_grad)
    ref = _ORACLE(x1.cpu().double(), w2, b2)
    ref.backward(grad.to(dtype).double())
    assert x1.grad is None and w1.grad.dtype == dtype
    torch.testing.assert_close(out.detach().cpu().double(), ref.detach(), **tol(dtype))
    torch.testing.assert_close(w1.grad.cpu().double(), w2.grad, **_grad_tol(dtype, 20))
    if with_bias_grad:
        torch.testing.assert_close(b1.grad.cpu().double(), b2.grad, **_grad_tol(dtype, 20))
    else:
        assert b1.grad is None


@pytest.mark.parametrize("backend, device, dtype", backend_cases("layer_norm", dtypes=(torch.float32,)))
@pytest.mark.parametrize("magnitude", [1e18, 1e-30, 1e-40], ids=["huge", "tiny", "denormal"])
def test_huge_tiny_and_denormal_rows(backend, device, dtype, magnitude):
    """Rows of magnitude 1e18 with a mean of 3e18 (squared deviations near float32's top), 1e-30
    (the variance underflows to 0) and float32 denormals: forward and gradients as the float64
    oracle's, relative to each result's scale."""
    g = torch.Generator().manual_seed(9)
    x = ((torch.randn(6, 48, generator=g, dtype=torch.float64) + 3) * magnitude).to(dtype)
    w, b, grad = torch.randn(48, generator=g), torch.randn(48, generator=g), torch.randn(6, 48, generator=g)
    if magnitude < 1e-38:
        assert (x.abs() < torch.finfo(dtype).tiny).all()
    x1, w1, b1 = (_leaf(t, dtype, device) for t in (x, w, b))
    out = ops.layer_norm(x1, w1, b1, backend=backend)
    out.backward(grad.to(device=device, dtype=dtype))
    x2, w2, b2 = (_leaf(t, torch.float64, "cpu") for t in (x, w, b))
    ref = _ORACLE(x2, w2, b2)
    ref.backward(grad.double())
    for name, mine, theirs in (("out", out.detach(), ref.detach()), ("dx", x1.grad, x2.grad),
                               ("dweight", w1.grad, w2.grad), ("dbias", b1.grad, b2.grad)):
        assert_close_at_scale(mine, theirs, dtype, f"{backend} {name} at {magnitude}")


@pytest.mark.parametrize("backend, device, dtype", backend_cases("layer_norm", dtypes=(torch.float32,)) + [
    pytest.param("cpu", "cpu", torch.float64, marks=[needs_cpu_backend], id="cpu-cpu-float64")])
@pytest.mark.parametrize("value", [123456.7, -3.3e7, 1e30, 0.1], ids=["1e5", "-3e7", "1e30", "0.1"])
def test_constant_rows_far_from_zero_normalise_to_zero(backend, device, dtype, value):
    """A constant row's deviations are all 0: a mean an ulp off would make each deviation that ulp, and with a
    variance of ulp^2 >> eps every xhat +-1 (the output then weight + bias instead of bias)."""
    width = 100 if value != 1e30 else 37
    x = torch.full((3, width), value, dtype=dtype, device=device)
    w = torch.randn(width, generator=torch.Generator().manual_seed(4)).to(device=device, dtype=dtype)
    b = torch.randn(width, generator=torch.Generator().manual_seed(5)).to(device=device, dtype=dtype)
    out = ops.layer_norm(x, w, b, backend=backend)
    torch.testing.assert_close(out, b.expand_as(out), rtol=0, atol=0)  # (the book's lines, the oracle, are not)


@needs_cpu_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_results_do_not_depend_on_the_thread_count(dtype):
    """The row blocks of the dweight/dbias reduction are fixed by the row count, not the threads."""
    x, w, b, grad = _inputs((1000,), 77, seed=5)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            x1, w1, b1 = (_leaf(t, dtype, "cpu") for t in (x, w, b))
            out = ops.layer_norm(x1, w1, b1, backend="cpu")
            out.backward(grad.to(dtype))
            results.append((out.detach(), x1.grad, w1.grad, b1.grad))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, c) for a, c in zip(results[0], other))


@pytest.mark.parametrize("backend, device", backend_devices())
def test_opcheck(backend, device):
    kwargs, namespace = opcheck_kwargs(backend, device), kernel_namespace(backend)
    x, w, b, grad = (t.to(device) for t in _inputs((6,), 37))
    torch.library.opcheck(namespace.layer_norm_fwd.default,
                          (x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True), 1e-5), **kwargs)
    _, mean, rstd = namespace.layer_norm_fwd(x.detach(), w.detach(), b.detach(), 1e-5)
    torch.library.opcheck(namespace.layer_norm_bwd.default, (grad, x.detach(), w.detach(), mean, rstd), **kwargs)


@needs_cpu_backend
def test_gradcheck_in_float64():
    x, w, b, _ = _inputs((3, 2), 11, seed=7)
    args = tuple(t.double().requires_grad_(True) for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda *a: ops.layer_norm(*a, eps=1e-5, backend="cpu"), args)


@pytest.mark.parametrize("backend, device", backend_devices())
def test_no_rows(backend, device):
    x = torch.randn(0, 16, device=device, requires_grad=True)
    w = torch.randn(16, device=device, requires_grad=True)
    b = torch.randn(16, device=device, requires_grad=True)
    out = ops.layer_norm(x, w, b, backend=backend)
    assert out.shape == (0, 16)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_torch_backend_is_the_book_layer_norm_bitwise():
    """The oracle is op for op the book's ``LayerNorm`` (ch04), gradients included."""
    from llms_from_scratch.ch04 import LayerNorm
    for dtype in (torch.float32, torch.bfloat16):
        x, w, b, grad = _inputs((3, 4), 64)
        norm = LayerNorm(64).to(dtype)
        with torch.no_grad():
            norm.scale.copy_(w)
            norm.shift.copy_(b)
        x1, x2 = _leaf(x, dtype, "cpu"), _leaf(x, dtype, "cpu")
        ours = ops.layer_norm(x1, norm.scale, norm.shift, eps=norm.eps, backend="torch")
        theirs = norm(x2)
        assert torch.equal(ours, theirs)
        ours.backward(grad.to(dtype))
        theirs.backward(grad.to(dtype))
        assert torch.equal(x1.grad, x2.grad)


def _book_and_ours(dtype):
    from llms_from_scratch.ch04 import LayerNorm as BookLayerNorm

    from gptfast.ch04 import LayerNorm
    x, w, b, grad = _inputs((2, 5), 48, seed=2)
    book, ours = BookLayerNorm(48).to(dtype), LayerNorm(48).to(dtype)
    with torch.no_grad():
        for module in (book, ours):
            module.scale.copy_(w)
            module.shift.copy_(b)
    return book, ours, x.to(dtype), grad.to(dtype)


def _run(module, x, grad):
    x = x.detach().requires_grad_(True)
    out = module(x)
    out.backward(grad)
    return out.detach(), x.grad, module.scale.grad, module.shift.grad


def _no_layer_norm_op_calls(monkeypatch):
    """A list that records any call of a backend's layer_norm (the module must not make one)."""
    from gptfast.ops import cpu_ops, torch_ops
    calls = []
    for backend in (cpu_ops, torch_ops, ops):
        monkeypatch.setattr(backend, "layer_norm", lambda *a, **k: calls.append(a))
    return calls


def test_gpt_layer_norm_keeps_the_book_lines_on_backend_torch(monkeypatch):
    calls = _no_layer_norm_op_calls(monkeypatch)
    book, ours, x, grad = _book_and_ours(torch.float32)
    with ops.use_backend("torch"):
        got = _run(ours, x, grad)
    assert not calls
    assert all(torch.equal(a, c) for a, c in zip(got, _run(book, x, grad)))


@needs_cpu_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_layer_norm_runs_the_fused_op_on_a_fused_backend(monkeypatch, dtype):
    from gptfast.ops import cpu_ops
    calls = []
    fused = cpu_ops.layer_norm

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return fused(*args, **kwargs)

    monkeypatch.setattr(cpu_ops, "layer_norm", counting)
    book, ours, x, grad = _book_and_ours(dtype)
    with ops.use_backend("cpu"):
        got = _run(ours, x, grad)
    assert calls == [x.shape]
    want = _run(book.double(), x.double(), grad.double())
    for a, c, rows in zip(got, want, (1, 1, 10, 10)):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), c, **_grad_tol(dtype, rows))


@needs_cpu_backend
def test_gpt_layer_norm_keeps_the_book_lines_when_dtypes_differ(monkeypatch):
    """bfloat16 activations with float32 parameters: the book promotes to float32, so do we."""
    calls = _no_layer_norm_op_calls(monkeypatch)
    book, ours, x, _ = _book_and_ours(torch.float32)
    with ops.use_backend("cpu"), torch.no_grad():
        out = ours(x.bfloat16())
    assert not calls and out.dtype == torch.float32
    assert torch.equal(out, book(x.bfloat16()))


def test_bad_arguments_are_named_before_any_kernel():
    x, w, b = torch.randn(3, 8), torch.randn(8), torch.randn(8)
    for backend in ("torch", "cpu", "triton", "cuda"):
        with pytest.raises(TypeError, match="x must be a torch.Tensor"):
            ops.layer_norm([1.0], w, b, backend=backend)
        with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
            ops.layer_norm(x, w, None, backend=backend)
        with pytest.raises(TypeError, match="x must be a floating"):
            ops.layer_norm(x.long(), w, b, backend=backend)
        with pytest.raises(TypeError, match="weight must be a floating"):
            ops.layer_norm(x, w.long(), b, backend=backend)
        with pytest.raises(TypeError, match="bias must be a floating"):
            ops.layer_norm(x, w, b.int(), backend=backend)
        with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
            ops.layer_norm(x, torch.randn(7), b, backend=backend)
        with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
            ops.layer_norm(x, w, torch.randn(1, 8), backend=backend)
        with pytest.raises(ValueError, match="non-empty last axis"):
            ops.layer_norm(torch.randn(3, 0), torch.randn(0), torch.randn(0), backend=backend)
        with pytest.raises(ValueError, match="non-empty last axis"):
            ops.layer_norm(torch.tensor(1.0), torch.randn(0), torch.randn(0), backend=backend)
        with pytest.raises(ValueError, match="one device"):
            ops.layer_norm(x, w, b.to("meta"), backend=backend)
        for eps in (-1e-6, float("nan"), float("inf"), True, "1e-6", None):
            with pytest.raises(ValueError, match="eps must be a non-negative"):
                ops.layer_norm(x, w, b, eps=eps, backend=backend)


@needs_cpu_backend
def test_eps_zero_is_allowed_and_matches_the_book():
    x, w, b, _ = _inputs((4,), 9)
    torch.testing.assert_close(ops.layer_norm(x, w, b, eps=0.0, backend="cpu"), _ORACLE(x, w, b, eps=0.0),
                               **tol(torch.float32))
