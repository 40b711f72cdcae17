"""RMSNorm (``gptfast.ops.rms_norm``): every fused backend against the torch oracle, forward and backward.

Cases: float32/bfloat16/float16 (and float64 on cpu), odd widths (not a multiple of any
vector width), one row and many rows, non-contiguous views of x, weight and the upstream
gradient, inputs expanded from one row or value (stride 0), the weight alone requiring grad,
rows of huge, tiny and denormal magnitude, NaN/inf rows, a weight in another dtype than x,
determinism of dweight (also across thread counts), ``torch.library.opcheck`` and the argument checks.
"""

from __future__ import annotations

import math

import pytest
import torch

from gptfast import ops
from gptfast.ops import torch_ops

from parity import (assert_close_at_scale, backend_cases, backend_devices, kernel_namespace, needs_cpu_backend,
                    opcheck_kwargs, tol)

_ORACLE = torch_ops.rms_norm

CASES = backend_cases("rms_norm") + [
    pytest.param("cpu", "cpu", torch.float16, marks=[needs_cpu_backend], id="cpu-cpu-float16")]

# (leading shape, D): one row, odd widths, many rows, a Qwen3/Llama-sized width.
SHAPES = [((1,), 1), ((1,), 7), ((3, 5), 33), ((2, 9), 64), ((300,), 129), ((4, 3), 1024)]


def _inputs(lead, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d, generator=g) * 2
    w = torch.randn(d, generator=g)
    grad = torch.randn(*lead, d, generator=g)
    return x, w, grad


def _leaf(t, dtype, device):
    return t.to(device=device, dtype=dtype).detach().requires_grad_(True)


def _grad_tol(dtype, rows):
    """dweight sums ``rows`` terms: let the low-precision tolerance grow with sqrt(rows)."""
    t = tol(dtype)
    grow = 1.0 if dtype in (torch.float32, torch.float64) else math.sqrt(max(rows, 1) / 16) + 1
    return dict(atol=t["atol"] * grow, rtol=t["rtol"] * grow)


def check_rms_norm_parity(backend, device, dtype, x, w, grad, eps=1e-6, weight_dtype=None):
    x1, w1 = _leaf(x, dtype, device), _leaf(w, weight_dtype or dtype, device)
    out = ops.rms_norm(x1, w1, eps=eps, backend=backend)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x1.device
    out.backward(grad.to(device=device, dtype=dtype))
    # The oracle in float64 from the same (rounded) inputs.
    x2, w2 = _leaf(x1.detach().cpu(), torch.float64, "cpu"), _leaf(w1.detach().cpu(), torch.float64, "cpu")
    ref = _ORACLE(x2, w2, eps=eps)
    ref.backward(grad.to(dtype).double())
    rows = max(1, x.numel() // x.shape[-1])
    torch.testing.assert_close(out.detach().cpu().double(), ref.detach(), **tol(dtype), equal_nan=True)
    torch.testing.assert_close(x1.grad.cpu().double(), x2.grad, **tol(dtype), equal_nan=True)
    assert w1.grad.dtype == w1.dtype
    torch.testing.assert_close(w1.grad.cpu().double(), w2.grad, **_grad_tol(w1.dtype, rows), equal_nan=True)


@pytest.mark.parametrize("backend, device, dtype", CASES)
@pytest.mark.parametrize("lead, d", SHAPES, ids=[f"{'x'.join(map(str, s))}x{d}" for s, d in SHAPES])
def test_forward_and_backward_match_the_oracle(backend, device, dtype, lead, d):
    check_rms_norm_parity(backend, device, dtype, *_inputs(lead, d))


@pytest.mark.parametrize("backend, device, dtype", CASES)
def test_non_contiguous_views_of_every_input(backend, device, dtype):
    x, w, grad = _inputs((6, 8), 2 * 45)
    # x: every other feature of a wider tensor, transposed leading axes; weight: a strided slice
    xv = x.transpose(0, 1)[..., ::2]
    wv = w[::2]
    gv = grad.transpose(0, 1)[..., ::2]
    assert not xv.is_contiguous() and not wv.is_contiguous() and not gv.is_contiguous()
    x1 = xv.to(device=device, dtype=dtype).detach().requires_grad_(True)
    w1 = wv.to(device=device, dtype=dtype).detach().requires_grad_(True)
    out = ops.rms_norm(x1, w1, eps=1e-5, backend=backend)
    out.backward(gv.to(device=device, dtype=dtype))
    x2, w2 = _leaf(xv, torch.float64, "cpu"), _leaf(wv, torch.float64, "cpu")
    x2 = x1.detach().cpu().double().requires_grad_(True)
    w2 = w1.detach().cpu().double().requires_grad_(True)
    ref = _ORACLE(x2, w2, eps=1e-5)
    ref.backward(gv.to(dtype).double())
    torch.testing.assert_close(out.detach().cpu().double(), ref.detach(), **tol(dtype))
    torch.testing.assert_close(x1.grad.cpu().double(), x2.grad, **tol(dtype))
    torch.testing.assert_close(w1.grad.cpu().double(), w2.grad, **_grad_tol(dtype, 48))


@pytest.mark.parametrize("backend, device, dtype", backend_cases("rms_norm", dtypes=(torch.float32,)))
def test_weight_in_another_dtype(backend, device, dtype):
    """A bfloat16 weight with float32 activations (and the gradient back in bfloat16)."""
    check_rms_norm_parity(backend, device, dtype, *_inputs((5,), 40), weight_dtype=torch.bfloat16)


@pytest.mark.parametrize("backend, device, dtype", backend_cases("rms_norm", dtypes=(torch.float32,)))
def test_nan_and_inf_propagate_to_their_row_only(backend, device, dtype):
    x, w, _ = _inputs((4,), 19)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    out = ops.rms_norm(x.to(device), w.to(device), backend=backend).cpu()
    ref = _ORACLE(x, w)
    assert out[1].isnan().all() and out[2, 0].isnan() and torch.equal(out[2].isnan(), ref[2].isnan())
    torch.testing.assert_close(out[[0, 3]], ref[[0, 3]], **tol(dtype))


@pytest.mark.parametrize("backend, device", backend_devices())
def test_dweight_is_deterministic(backend, device):
    x, w, grad = _inputs((257,), 100, seed=3)
    grads = []
    for _ in range(2):
        w1 = w.to(device).requires_grad_(True)
        ops.rms_norm(x.to(device), w1, backend=backend).backward(grad.to(device))
        grads.append(w1.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("backend, device, dtype", backend_cases("rms_norm", dtypes=(torch.float32, torch.bfloat16)))
def test_expanded_inputs_match_the_oracle(backend, device, dtype):
    """x broadcast from one row (stride 0 over the rows) and a weight broadcast from one value:
    forward and the gradients reaching the un-expanded leaves."""
    g = torch.Generator().manual_seed(11)
    row, scale, grad = torch.randn(37, generator=g) * 2, torch.randn(1, generator=g), torch.randn(6, 5, 37, generator=g)
    row1, scale1 = _leaf(row, dtype, device), _leaf(scale, dtype, device)
    x1, w1 = row1.expand(6, 5, 37), scale1.expand(37)
    assert x1.stride() == (0, 0, 1) and w1.stride() == (0,)
    out = ops.rms_norm(x1, w1, backend=backend)
    out.backward(grad.to(device=device, dtype=dtype))
    row2, scale2 = _leaf(row1.detach().cpu(), torch.float64, "cpu"), _leaf(scale1.detach().cpu(), torch.float64, "cpu")
    ref = _ORACLE(row2.expand(6, 5, 37), scale2.expand(37))
    ref.backward(grad.to(dtype).double())
    torch.testing.assert_close(out.detach().cpu().double(), ref.detach(), **tol(dtype))
    torch.testing.assert_close(row1.grad.cpu().double(), row2.grad, **_grad_tol(dtype, 30))
    torch.testing.assert_close(scale1.grad.cpu().double(), scale2.grad, **_grad_tol(dtype, 30 * 37))


@pytest.mark.parametrize("backend, device, dtype", backend_cases("rms_norm", dtypes=(torch.float32, torch.bfloat16)))
def test_gradient_of_the_weight_alone(backend, device, dtype):
    """Only the weight requires grad: its gradient is the oracle's and x gets none."""
    x, w, grad = _inputs((4, 5), 40, seed=4)
    x1, w1 = x.to(device=device, dtype=dtype), _leaf(w, dtype, device)
    out = ops.rms_norm(x1, w1, backend=backend)
    out.backward(grad.to(device=device, dtype=dtype))
    w2 = _leaf(w1.detach().cpu(), torch.float64, "cpu")
    ref = _ORACLE(x1.cpu().double(), w2)
    ref.backward(grad.to(dtype).double())
    assert x1.grad is None and w1.grad.dtype == dtype
    torch.testing.assert_close(out.detach().cpu().double(), ref.detach(), **tol(dtype))
    torch.testing.assert_close(w1.grad.cpu().double(), w2.grad, **_grad_tol(dtype, 20))


@pytest.mark.parametrize("backend, device, dtype", backend_cases("rms_norm", dtypes=(torch.float32,)))
@pytest.mark.parametrize("magnitude", [1e18, 1e-30, 1e-40], ids=["huge", "tiny", "denormal"])
def test_huge_tiny_and_denormal_rows(backend, device, dtype, magnitude):
    """Rows of magnitude 1e18 (sum of squares near float32's top), 1e-30 (squares underflow to 0) and
    float32 denormals: forward and gradients as the float64 oracle's, relative to each result's scale."""
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(6, 64, generator=g, dtype=torch.float64) * magnitude).to(dtype)
    w, grad = torch.randn(64, generator=g), torch.randn(6, 64, generator=g)
    if magnitude < 1e-38:
        assert (x.abs() < torch.finfo(dtype).tiny).all()
    x1, w1 = _leaf(x, dtype, device), _leaf(w, dtype, device)
    out = ops.rms_norm(x1, w1, backend=backend)
    out.backward(grad.to(device=device, dtype=dtype))
    x2, w2 = _leaf(x, torch.float64, "cpu"), _leaf(w, torch.float64, "cpu")
    ref = _ORACLE(x2, w2)
    ref.backward(grad.double())
    assert_close_at_scale(out.detach(), ref.detach(), dtype, f"{backend} out at {magnitude}")
    assert_close_at_scale(x1.grad, x2.grad, dtype, f"{backend} dx at {magnitude}")
    assert_close_at_scale(w1.grad, w2.grad, dtype, f"{backend} dweight at {magnitude}")


@needs_cpu_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_results_do_not_depend_on_the_thread_count(dtype):
    """Output, dx and dweight are bitwise the same with 1, 2 and 3 threads (dweight's row blocks are fixed by N)."""
    x, w, grad = _inputs((1000,), 77, seed=5)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            x1, w1 = _leaf(x, dtype, "cpu"), _leaf(w, dtype, "cpu")
            out = ops.rms_norm(x1, w1, backend="cpu")
            out.backward(grad.to(dtype))
            results.append((out.detach(), x1.grad, w1.grad))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, c) for a, c in zip(results[0], other))


@pytest.mark.parametrize("backend, device", backend_devices())
def test_opcheck(backend, device):
    kwargs, namespace = opcheck_kwargs(backend, device), kernel_namespace(backend)
    x, w, grad = _inputs((6,), 37)
    x, w, grad = x.to(device), w.to(device), grad.to(device)
    torch.library.opcheck(namespace.rms_norm_fwd.default, (x.requires_grad_(True), w.requires_grad_(True), 1e-6),
                          **kwargs)
    _, rstd = namespace.rms_norm_fwd(x.detach(), w.detach(), 1e-6)
    torch.library.opcheck(namespace.rms_norm_bwd.default, (grad, x.detach(), w.detach(), rstd), **kwargs)


def test_torch_backend_is_the_reference_math_bitwise():
    """The oracle is op for op the reference's Qwen3 RMSNorm, and equals F.rms_norm (Llama 3's norms)."""
    from llms_from_scratch.qwen3 import RMSNorm
    for dtype in (torch.float32, torch.bfloat16):
        x, w, _ = _inputs((3, 4), 64)
        norm = RMSNorm(64, eps=1e-6).to(dtype)
        with torch.no_grad():
            norm.scale.copy_(w)
        x = x.to(dtype)
        assert torch.equal(ops.rms_norm(x, norm.scale, eps=1e-6, backend="torch"), norm(x))
        assert torch.equal(ops.rms_norm(x, norm.scale, eps=1e-6, backend="torch"),
                           torch.nn.functional.rms_norm(x, (64,), norm.scale, 1e-6))


def test_bad_arguments_are_named_before_any_kernel():
    x, w = torch.randn(3, 8), torch.randn(8)
    for backend in ("torch", "cpu", "triton", "cuda"):
        with pytest.raises(TypeError, match="x must be a torch.Tensor"):
            ops.rms_norm([1.0], w, backend=backend)
        with pytest.raises(TypeError, match="x must be a floating"):
            ops.rms_norm(x.long(), w, backend=backend)
        with pytest.raises(TypeError, match="weight must be a floating"):
            ops.rms_norm(x, w.long(), backend=backend)
        with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
            ops.rms_norm(x, torch.randn(7), backend=backend)
        with pytest.raises(ValueError, match="non-empty last axis"):
            ops.rms_norm(torch.randn(3, 0), torch.randn(0), backend=backend)
        for eps in (0.0, -1e-6, float("nan"), float("inf"), True, "1e-6"):
            with pytest.raises(ValueError, match="eps must be a positive"):
                ops.rms_norm(x, w, eps=eps, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_builtin_rms_norm_without_eps_uses_torchs_eps(dtype):
    """``nn.RMSNorm(eps=None)`` normalises with the eps of the dtype it computes in: float32's for 16-bit inputs."""
    from gptfast.models.layers import BuiltinRMSNorm
    theirs = torch.nn.RMSNorm(8, eps=None, dtype=dtype)
    ours = BuiltinRMSNorm(8, eps=None, dtype=dtype)
    torch.nn.init.normal_(theirs.weight)
    ours.load_state_dict(theirs.state_dict())
    x = (torch.randn(3, 8) * 1e-3).to(dtype)  # small enough that eps matters
    for backend in ("torch", "auto"):
        with ops.use_backend(backend):
            torch.testing.assert_close(ours(x), theirs(x), **tol(dtype))
