"""SwiGLU (``gptfast.ops.swiglu``): every fused backend against the torch oracle, forward and backward.

Cases: float32/bfloat16/float16 (and float64 on cpu), odd sizes (not a multiple of any
vector width or chunk), one element and many rows, non-contiguous views of both inputs and
of the upstream gradient, inputs expanded from one row or one value per row (stride 0), results
independent of the thread count, NaN/inf, ``torch.library.opcheck`` and the argument checks.
"""

from __future__ import annotations

import pytest
import torch

from gptfast import ops
from gptfast.ops import torch_ops

from parity import backend_cases, backend_devices, kernel_namespace, needs_cpu_backend, opcheck_kwargs, tol

_ORACLE = torch_ops.swiglu

CASES = backend_cases("swiglu") + [
    pytest.param("cpu", "cpu", torch.float16, marks=[needs_cpu_backend], id="cpu-cpu-float16")]
SHAPES = [(1,), (7,), (3, 33), (2, 5, 129), (70, 1100)]


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g) * 3 for _ in range(3))


def check_swiglu_parity(backend, device, dtype, gate, up, grad):
    a1 = gate.to(device=device, dtype=dtype).detach().requires_grad_(True)
    b1 = up.to(device=device, dtype=dtype).detach().requires_grad_(True)
    out = ops.swiglu(a1, b1, backend=backend)
    assert out.shape == gate.shape and out.dtype == dtype and out.device == a1.device
    out.backward(grad.to(device=device, dtype=dtype))
    a2 = a1.detach().cpu().double().requires_grad_(True)
    b2 = b1.detach().cpu().double().requires_grad_(True)
    ref = _ORACLE(a2, b2)
    ref.backward(grad.to(dtype).double())
    for name, mine, theirs in (("out", out.detach(), ref.detach()), ("d_gate", a1.grad, a2.grad),
                               ("d_up", b1.grad, b2.grad)):
        torch.testing.assert_close(mine.cpu().double(), theirs, **tol(dtype), equal_nan=True,
                                   msg=lambda m: f"{backend} swiglu {name} {tuple(gate.shape)}: {m}")


@pytest.mark.parametrize("backend, device, dtype", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_backward_match_the_oracle(backend, device, dtype, shape):
    check_swiglu_parity(backend, device, dtype, *_inputs(shape))


@pytest.mark.parametrize("backend, device, dtype", CASES)
def test_non_contiguous_views_of_every_input(backend, device, dtype):
    gate, up, grad = _inputs((9, 2 * 41))
    views = (gate.t()[::2], up.t()[::2], grad.t()[::2])  # (41, 9), strided both ways
    assert not any(v.is_contiguous() for v in views)
    check_swiglu_parity(backend, device, dtype, *views)


@pytest.mark.parametrize("backend, device, dtype", backend_cases("swiglu", dtypes=(torch.float32, torch.bfloat16)))
def test_expanded_inputs_match_the_oracle(backend, device, dtype):
    """gate broadcast from one row (stride 0 over the rows), up from one value per row (stride 0 along it):
    forward, and the gradients summed back into the un-expanded leaves."""
    g = torch.Generator().manual_seed(13)
    row, column = torch.randn(45, generator=g) * 3, torch.randn(7, 1, generator=g) * 3
    grad = torch.randn(7, 45, generator=g)
    row1, col1 = (t.to(device=device, dtype=dtype).requires_grad_(True) for t in (row, column))
    gate, up = row1.expand(7, 45), col1.expand(7, 45)
    assert gate.stride() == (0, 1) and up.stride() == (1, 0)
    out = ops.swiglu(gate, up, backend=backend)
    out.backward(grad.to(device=device, dtype=dtype))
    row2, col2 = (t.detach().cpu().double().requires_grad_(True) for t in (row1, col1))
    ref = _ORACLE(row2.expand(7, 45), col2.expand(7, 45))
    ref.backward(grad.to(dtype).double())
    t = tol(dtype)
    torch.testing.assert_close(out.detach().cpu().double(), ref.detach(), **t)
    # the leaves' gradients sum 7 and 45 rounded terms
    for name, mine, theirs, grow in (("d_gate", row1, row2, 2.0), ("d_up", col1, col2, 4.0)):
        grow = 1.0 if dtype == torch.float32 else grow
        torch.testing.assert_close(mine.grad.cpu().double(), theirs.grad, atol=t["atol"] * grow,
                                   rtol=t["rtol"] * grow, msg=lambda m: f"{backend} {name}: {m}")


@needs_cpu_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_results_do_not_depend_on_the_thread_count(dtype):
    """Output and both gradients are bitwise the same with 1, 2 and 3 threads (77000 elements: several chunks)."""
    gate, up, grad = (t.to(dtype) for t in _inputs((70, 1100), seed=6))
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            a, b = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
            out = ops.swiglu(a, b, backend="cpu")
            out.backward(grad)
            results.append((out.detach(), a.grad, b.grad))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(x, y) for x, y in zip(results[0], other))


@pytest.mark.parametrize("backend, device, dtype", backend_cases("swiglu", dtypes=(torch.float32,)))
def test_nan_and_inf_follow_the_oracle(backend, device, dtype):
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 1.0, -90.0, 90.0])
    gate = specials.repeat_interleave(7)
    up = specials.repeat(7)
    out = ops.swiglu(gate.to(device), up.to(device), backend=backend).cpu()
    ref = _ORACLE(gate, up)
    torch.testing.assert_close(out, ref, equal_nan=True, **tol(dtype))


@pytest.mark.parametrize("backend, device", backend_devices())
def test_opcheck(backend, device):
    kwargs, namespace = opcheck_kwargs(backend, device), kernel_namespace(backend)
    gate, up, grad = (t.to(device) for t in _inputs((5, 37)))
    torch.library.opcheck(namespace.swiglu_fwd.default, (gate.requires_grad_(True), up.requires_grad_(True)), **kwargs)
    torch.library.opcheck(namespace.swiglu_bwd.default, (grad, gate.detach(), up.detach()), **kwargs)


def test_torch_backend_is_the_reference_feed_forward_math():
    from llms_from_scratch.qwen3 import FeedForward
    cfg = dict(emb_dim=16, hidden_dim=40, dtype=torch.bfloat16)
    torch.manual_seed(0)
    ff = FeedForward(cfg)
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    ours = ff.fc3(ops.swiglu(ff.fc1(x), ff.fc2(x), backend="torch"))
    assert torch.equal(ours, ff(x))


def test_bad_arguments_are_named_before_any_kernel():
    a = torch.randn(3, 8)
    for backend in ("torch", "cpu", "triton", "cuda"):
        with pytest.raises(TypeError, match="gate must be a torch.Tensor"):
            ops.swiglu(1.0, a, backend=backend)
        with pytest.raises(TypeError, match="up must be a floating"):
            ops.swiglu(a, a.long(), backend=backend)
        with pytest.raises(ValueError, match="gate and up must have one shape"):
            ops.swiglu(a, a[:, :4], backend=backend)
        with pytest.raises(TypeError, match="gate and up must share one dtype"):
            ops.swiglu(a, a.double(), backend=backend)
