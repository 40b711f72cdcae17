"""Cross-entropy and fused linear cross-entropy on every fused backend (cpu, triton, cuda) against the oracle.

Shapes and tolerances: tests/parity.py.  The shared layer above the kernels
(gptfast/ops/cross_entropy.py: reductions, autograd, fakes, the chunked linear
cross-entropy driver) is also run on a reference implementation of the kernel schema
written here in plain torch, so its wiring is checked on any machine.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import parity
from gptfast import ops
from gptfast.ops import linear as dense, loss as ce, torch_ops
from parity import (backend_cases, backend_devices, needs_cpu_backend, needs_cuda, needs_interpreter, needs_onednn,
                    spy_onednn)

OP = "cross_entropy"
REDUCTIONS = ["mean", "sum", "none"]
GPU_SHAPES = [(4096, 50257), (1000, 32000)]


# --------------------------------------------------------------------------- a reference kernel for the schema

# A plain-torch implementation of cross_entropy_fwd's contract (csrc/schemas.h), registered under
# its own namespace, so the shared Python layer can be exercised without any compiled kernel.
_REF = "gptfast_schema_reference"
_ref_lib = torch.library.Library(_REF, "DEF")
_ref_lib.define("cross_entropy_fwd(Tensor logits, Tensor targets, int ignore_index, bool want_grad) -> (Tensor, Tensor)")
_ref_calls: list = []


def _reference_cross_entropy_fwd(logits, targets, ignore_index, want_grad):
    _ref_calls.append(want_grad)
    x = logits.float()
    t = targets.long()
    ignored = t == ignore_index
    bad = ~ignored & ((t < 0) | (t >= x.shape[1]))
    safe = torch.where(ignored | bad, torch.zeros_like(t), t)
    loss = torch.logsumexp(x, dim=1) - x.gather(1, safe[:, None]).squeeze(1)
    loss = torch.where(ignored, torch.zeros_like(loss), loss).masked_fill(bad, math.nan)
    if not want_grad:
        return loss, logits.new_empty((0,))
    grad = torch.softmax(x, dim=1) - F.one_hot(safe, x.shape[1]).float()
    grad = grad.masked_fill(ignored[:, None], 0.0).masked_fill(bad[:, None], math.nan)
    return loss, grad.to(logits.dtype).contiguous()


_ref_lib.impl("cross_entropy_fwd", _reference_cross_entropy_fwd, "CPU")
ce.register(_REF)


def _ce_case(shape, dtype, ignore_index=-100, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=g) * 3
    targets = torch.randint(0, shape[-1], shape[:-1], generator=g)
    targets[torch.rand(shape[:-1], generator=g) < 0.25] = ignore_index
    return logits.to(dtype), targets


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 3), (7, 100), (2, 5, 33)])
def test_wiring_matches_the_oracle_forward_and_grad(shape, dtype, reduction):
    logits, targets = _ce_case(shape, dtype)
    x1 = logits.clone().requires_grad_(True)
    loss = ce.fused_cross_entropy(_REF, x1, targets, ignore_index=-100, reduction=reduction)
    x2 = logits.double().requires_grad_(True)
    ref = torch_ops.cross_entropy(x2, targets, ignore_index=-100, reduction=reduction)
    assert loss.dtype == dtype and loss.shape == ref.shape
    parity.assert_close(loss.detach(), ref.detach(), dtype, f"loss {reduction}")
    upstream = torch.randn(ref.shape) if reduction == "none" else torch.tensor(1.7)
    loss.backward(upstream.to(dtype))
    ref.backward(upstream.double())
    parity.assert_close(x1.grad, x2.grad, dtype, f"grad {reduction}")


def test_wiring_all_ignored_mean_is_nan_like_pytorch():
    logits = torch.randn(3, 4, requires_grad=True)
    assert torch.isnan(ce.fused_cross_entropy(_REF, logits, torch.full((3,), -1), ignore_index=-1))


def test_wiring_asks_for_the_gradient_only_when_one_will_be_needed():
    logits, targets = _ce_case((4, 9), torch.float32)
    _ref_calls.clear()
    with torch.no_grad():
        ce.fused_cross_entropy(_REF, logits.requires_grad_(True), targets)
    ce.fused_cross_entropy(_REF, logits.detach(), targets)
    ce.fused_cross_entropy(_REF, logits.requires_grad_(True), targets)
    assert _ref_calls == [False, False, True]


def test_wiring_out_of_range_target_gives_nan():
    logits = torch.randn(3, 5, requires_grad=True)
    targets = torch.tensor([1, 7, -100])
    per_row = ce.fused_cross_entropy(_REF, logits, targets, reduction="none")
    assert torch.isnan(per_row[1]) and not torch.isnan(per_row[0]) and per_row[2] == 0
    assert torch.isnan(ce.fused_cross_entropy(_REF, logits, targets))


@pytest.mark.parametrize("want_grad", [True, False])
def test_wiring_opcheck_fake_and_autograd_registration(want_grad):
    logits, targets = _ce_case((5, 11), torch.float32)
    torch.library.opcheck(getattr(torch.ops, _REF).cross_entropy_fwd,
                          (logits.requires_grad_(want_grad), targets, -100, want_grad))


def test_fake_gradient_is_contiguous_like_the_kernels_output():
    """A transposed (N, V) view gets a fresh contiguous gradient from every kernel; the fake must say so."""
    logits = torch.randn(11, 5).t()  # (5, 11), column stride 5
    loss_rows, grad = ce._fake_cross_entropy_fwd(logits, torch.zeros(5, dtype=torch.long), -100, True)
    assert grad.shape == (5, 11) and grad.is_contiguous() and loss_rows.dtype == torch.float32
    assert ce._fake_cross_entropy_fwd(logits.double(), None, -100, False)[0].dtype == torch.float64
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(logits)
        _, fake_grad = getattr(torch.ops, _REF).cross_entropy_fwd(fake, torch.zeros(5, dtype=torch.long), -100, True)
    assert fake_grad.stride() == (11, 1)


# --------------------------------------------------------------------------- second backward


def _second_backward_raises(loss, match="second backward"):
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=match) as info:
        loss.backward()
    return str(info.value)


def test_wiring_second_backward_names_the_op_and_the_reason():
    logits, targets = _ce_case((4, 9), torch.float32)
    loss = ce.fused_cross_entropy(_REF, logits.requires_grad_(True), targets)
    message = _second_backward_raises(loss)
    assert f"{_REF}::cross_entropy_fwd" in message and "in place" in message


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_second_backward_is_refused_with_a_clear_message(backend, device, reduction):
    """The saved gradient becomes logits.grad in place: a retained graph cannot run twice, and says so."""
    x = torch.randn(4, 20, device=device, requires_grad=True)
    loss = ops.cross_entropy(x, torch.tensor([1, 2, 3, 4], device=device), reduction=reduction, backend=backend)
    message = _second_backward_raises(loss.sum())
    assert f"gptfast_{backend}::cross_entropy_fwd" in message and "in place" in message
    expected = torch.softmax(x.detach().double().cpu(), -1) - F.one_hot(torch.tensor([1, 2, 3, 4]), 20)
    parity.assert_close(x.grad.cpu(), expected / (4 if reduction == "mean" else 1), torch.float32,
                        "the first backward's gradient")


@pytest.mark.parametrize("backend,device", backend_devices())
def test_linear_cross_entropy_second_backward(backend, device):
    """mean/sum scale the gradients saved by the forward in place (refused twice); "none" recomputes (works)."""
    hidden = torch.randn(6, 8, device=device, requires_grad=True)
    weight = torch.randn(30, 8, device=device, requires_grad=True)
    targets = torch.randint(0, 30, (6,), device=device)
    loss = ops.linear_cross_entropy(hidden, weight, targets, backend=backend)
    assert "linear cross-entropy" in _second_backward_raises(loss)
    per_row = ops.linear_cross_entropy(hidden, weight, targets, reduction="none", backend=backend)
    hidden.grad = weight.grad = None
    per_row.sum().backward(retain_graph=True)
    first = hidden.grad.clone()
    per_row.sum().backward()
    torch.testing.assert_close(hidden.grad, 2 * first)


# --------------------------------------------------------------------------- cross-entropy parity


@pytest.mark.parametrize("backend,device,dtype", backend_cases(OP))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", parity.CROSS_ENTROPY_SHAPES, ids=str)
def test_parity(backend, device, dtype, reduction, shape):
    parity.check_cross_entropy_parity(backend, shape, dtype, device=device, reduction=reduction)


@pytest.mark.parametrize("backend,device,dtype", [c for c in backend_cases(OP) if c.values[1] == "cuda"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_parity_full_size(backend, device, dtype, shape):
    parity.check_cross_entropy_parity(backend, shape, dtype, device=device)


@needs_cpu_backend
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cpu_parity_float16(reduction):
    parity.check_cross_entropy_parity("cpu", (33, 4097), torch.float16, reduction=reduction)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_other_ignore_index_and_all_ignored(backend, device, reduction):
    parity.check_cross_entropy_parity(backend, (9, 300), torch.float32, device=device, reduction=reduction,
                                      ignore_index=3, ignore_fraction=0.5)
    parity.check_cross_entropy_parity(backend, (40, 300), torch.float32, device=device, reduction=reduction,
                                      ignore_index=7, ignore_fraction=0.3)
    parity.check_cross_entropy_parity(backend, (6, 100), torch.float32, device=device, reduction=reduction,
                                      ignore_fraction=1.0)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("upstream", [float("inf"), float("nan")])
@pytest.mark.parametrize("all_ignored", [False, True], ids=["some-ignored", "all-ignored"])
def test_a_non_finite_upstream_gradient_leaves_ignored_rows_at_zero(backend, device, reduction, upstream,
                                                                    all_ignored):
    """An ignored row's gradient is 0 whatever gradient reaches the loss, as in PyTorch; the saved gradient
    scaled by it would give 0 * inf = NaN."""
    torch.manual_seed(0)
    logits = torch.randn(5, 33, device=device)
    hidden, weight = torch.randn(5, 8, device=device), torch.randn(33, 8, device=device)
    targets = torch.tensor([1, -100, 2, -100, 30], device=device)
    if all_ignored:
        targets.fill_(-100)
    upstream = torch.full((5,) if reduction == "none" else (), upstream, device=device)
    for name, inputs in [("cross_entropy", (logits,)), ("linear_cross_entropy", (hidden, weight))]:
        grads = {}
        for impl in ("torch", backend):
            leaves = [t.clone().requires_grad_() for t in inputs]
            getattr(ops, name)(*leaves, targets, reduction=reduction, backend=impl).backward(upstream)
            grads[impl] = [t.grad for t in leaves]
        # Where torch's gradient is inf or NaN (inf - inf at a target logit) ours is non-finite too.
        for ours, expected in zip(grads[backend], grads["torch"]):
            ours, expected = ours.cpu(), expected.cpu()
            finite = torch.isfinite(expected)
            assert torch.equal(torch.isfinite(ours), finite)
            torch.testing.assert_close(ours[finite], expected[finite])
        assert (grads[backend][0][targets == -100] == 0).all()


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ignore_index", [0, -1, 7])
def test_cuda_other_ignore_index(dtype, ignore_index):
    parity.check_cross_entropy_parity("cuda", (9, 257), dtype, device="cuda", ignore_index=ignore_index,
                                      ignore_fraction=0.3)


@pytest.mark.parametrize("backend,device,dtype", backend_cases(OP, dtypes=(torch.float32, torch.bfloat16)))
def test_large_logits_do_not_overflow(backend, device, dtype):
    parity.check_cross_entropy_parity(backend, (9, 777), dtype, device=device, logit_scale=3e4)
    logits = torch.full((2, 5), 1e30, device=device)
    logits[:, 0] = 2e30
    loss = ops.cross_entropy(logits, torch.tensor([0, 1], device=device), reduction="none", backend=backend)
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("backend,device", backend_devices())
def test_a_small_loss_next_to_large_logits_keeps_its_digits(backend, device):
    """A confident row's loss is log(1 + tiny): computed as (max - target) + log(sum), not as the log-sum-exp
    (rounded at the size of the max) minus the target, it keeps its leading digits."""
    logits = torch.tensor([[1000.0, 990.0, 985.0], [30.0, 18.0, -5.0], [-200.0, -212.0, -230.0]])
    targets = torch.tensor([0, 0, 0])
    loss = ops.cross_entropy(logits.to(device), targets.to(device), reduction="none", backend=backend).cpu()
    exact = -torch.log_softmax(logits.double(), -1)[:, 0]
    assert exact.max() < 1e-4  # the setup: every loss is tiny next to its row's logits
    relative = ((loss.double() - exact) / exact).abs()
    assert relative.max() < 1e-2, relative  # fp32's log(sum) near 1 leaves ~1e-3; the old form lost 7-35%


@pytest.mark.parametrize("backend,device,dtype", backend_cases(OP, dtypes=(torch.bfloat16, torch.float16)))
def test_16_bit_target_gradient_is_rounded_once(backend, device, dtype):
    """The target's gradient p - 1 comes from the unrounded p: rounding p to 16 bits first would leave little
    of 1 - p when p is near 1."""
    margins = torch.tensor([4.15625, 5.0, 6.0, 7.0])
    logits = torch.zeros(4, 4)
    logits[:, 0] = margins
    logits = logits.to(dtype)
    x = logits.to(device).requires_grad_(True)
    ops.cross_entropy(x, torch.zeros(4, dtype=torch.long, device=device), reduction="sum", backend=backend).backward()
    got = x.grad[:, 0].double().cpu()
    exact = torch.softmax(logits.double(), -1)[:, 0] - 1
    mantissa = 7 if dtype == torch.bfloat16 else 10
    one_step = 2.0 ** (torch.floor(torch.log2(exact.abs())) - mantissa)
    assert ((got - exact).abs() <= one_step).all(), (got, exact)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_3d_logits_int32_targets_and_extreme_values(backend, device):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 70, generator=g) * 40  # large logits: the online max must keep exp finite
    logits[0, 0, :35] = float("-inf")
    targets = torch.randint(35, 70, (2, 5), generator=g, dtype=torch.int32)
    for reduction in ("mean", "none"):
        x1 = logits.to(device).detach().requires_grad_(True)
        loss = ops.cross_entropy(x1, targets.to(device), reduction=reduction, backend=backend)
        assert loss.shape == (() if reduction == "mean" else (2, 5))
        loss.sum().backward()
        x2 = logits.double().requires_grad_(True)
        ref = torch_ops.cross_entropy(x2, targets.long(), reduction=reduction)
        ref.sum().backward()
        parity.assert_close(loss.detach().cpu(), ref.detach(), torch.float32, "3-D cross-entropy")
        parity.assert_close(x1.grad.cpu(), x2.grad, torch.float32, "3-D cross-entropy grad")


@pytest.mark.parametrize("backend,device,dtype", backend_cases("cross_entropy", dtypes=(torch.bfloat16,)))
def test_under_autocast_the_loss_is_float32_as_torchs(backend, device, dtype):
    """Autocast runs torch's cross-entropy in float32: a 16-bit loss would be rounded (0.03 at a loss near 11)."""
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(8, 50, generator=g) * 3).to(torch.bfloat16)
    targets = torch.randint(0, 50, (8,), generator=g)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        expected = torch.nn.functional.cross_entropy(logits.to(device), targets.to(device))
        for reduction in ("mean", "none"):
            got = ops.cross_entropy(logits.to(device), targets.to(device), reduction=reduction, backend=backend)
            assert got.dtype == torch.float32
    torch.testing.assert_close(got.mean().cpu(), expected.cpu(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,device,dtype", backend_cases("linear_cross_entropy", dtypes=(torch.bfloat16,)))
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_under_autocast_the_linear_loss_is_float32_as_torchs(backend, device, dtype, grad):
    """Autocast multiplies in bf16 and runs the loss in float32: the linear loss's float32 result must not be a
    bf16-rounded one (4.0 for 4.0059, steps of 0.0625 near 11)."""
    g = torch.Generator().manual_seed(6)
    hidden = (torch.randn(8, 32, generator=g) * 2).to(device).requires_grad_(grad)
    weight = torch.randn(50, 32, generator=g).to(device).requires_grad_(grad)
    targets = torch.randint(0, 50, (8,), generator=g).to(device)
    with torch.autocast(torch.device(device).type, dtype=dtype), torch.set_grad_enabled(grad):
        expected = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight), targets,
                                                     reduction="none")
        for reduction in ("mean", "sum", "none"):
            got = ops.linear_cross_entropy(hidden, weight, targets, reduction=reduction, backend=backend)
            assert got.dtype == torch.float32
            want = {"mean": expected.mean(), "sum": expected.sum(), "none": expected}[reduction]
            torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_uint8_targets_are_class_indices_as_in_torch(backend, device):
    g = torch.Generator().manual_seed(3)
    logits, hidden, weight = torch.randn(6, 30, generator=g), torch.randn(6, 8, generator=g), torch.randn(30, 8)
    targets = torch.randint(0, 30, (6,), generator=g, dtype=torch.uint8)
    expected = torch.nn.functional.cross_entropy(logits, targets)
    got = ops.cross_entropy(logits.to(device), targets.to(device), backend=backend)
    parity.assert_close(got.cpu(), expected, torch.float32, "uint8 targets")
    got = ops.linear_cross_entropy(hidden.to(device), weight.to(device), targets.to(device), backend=backend)
    parity.assert_close(got.cpu(), torch.nn.functional.cross_entropy(hidden @ weight.T, targets), torch.float32,
                        "uint8 targets through the head")
    with pytest.raises(TypeError, match="int64, int32 or uint8"):
        ops.cross_entropy(logits.to(device), targets.to(device, torch.int8), backend=backend)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_without_grad_computes_only_the_loss(backend, device):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 30, generator=g).to(device)
    t = torch.randint(0, 30, (6,), generator=g).to(device)
    expected = torch_ops.cross_entropy(x.double().cpu(), t.cpu())
    with torch.no_grad():
        loss = ops.cross_entropy(x.requires_grad_(True), t, backend=backend)
    assert not loss.requires_grad
    parity.assert_close(loss.cpu(), expected, torch.float32, "no-grad CE")
    plain = ops.cross_entropy(x.detach(), t, backend=backend)
    assert not plain.requires_grad
    parity.assert_close(plain.cpu(), expected, torch.float32, "CE of a plain tensor")


@needs_cpu_backend
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cpu_gradient_matches_finite_differences_float64(reduction):
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
    numerical = torch.zeros_like(logits)
    with torch.no_grad():
        flat, eps = logits.clone().view(-1), 1e-6
        for i in range(flat.numel()):
            orig = flat[i].item()
            flat[i] = orig + eps
            plus = scalar_loss(flat.view(logits.shape)).item()
            flat[i] = orig - eps
            minus = scalar_loss(flat.view(logits.shape)).item()
            flat[i] = orig
            numerical.view(-1)[i] = (plus - minus) / (2 * eps)
    torch.testing.assert_close(leaf.grad, numerical, atol=1e-8, rtol=1e-6)


@needs_cpu_backend
def test_cpu_gradient_buffer_is_reused():
    """Forward writes softmax - one_hot into one (N, V) buffer; backward hands that buffer out, scaled."""
    g = torch.Generator().manual_seed(22)
    x = torch.randn(6, 50, generator=g, requires_grad=True)
    targets = torch.tensor([3, -100, 0, 49, 7, 7])
    loss_rows, grad = torch.ops.gptfast_cpu.cross_entropy_fwd(x, targets, -100, True)
    expected = torch.softmax(x.detach(), -1) - F.one_hot(targets.clamp(min=0), 50)
    expected[1] = 0
    torch.testing.assert_close(grad, expected, **parity.tol(torch.float32))
    buffer_address = grad.data_ptr()
    del grad
    (loss_rows * 2).sum().backward()
    assert x.grad.data_ptr() == buffer_address, "backward allocated a second gradient-sized buffer"
    torch.testing.assert_close(x.grad, 2 * expected, **parity.tol(torch.float32))
    _, no_grad = torch.ops.gptfast_cpu.cross_entropy_fwd(x.detach(), targets, -100, False)
    assert no_grad.numel() == 0


# --------------------------------------------------------------------------- registration and bad input


@pytest.mark.parametrize("backend,device,dtype", backend_cases(OP, dtypes=(torch.float32, torch.float16,
                                                                          torch.bfloat16)))
@pytest.mark.parametrize("want_grad", [True, False])
def test_opcheck(backend, device, dtype, want_grad):
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(6, 40, generator=g).to(device=device, dtype=dtype).requires_grad_(want_grad)
    targets = torch.tensor([0, 3, -100, 39, 7, 1], device=device)
    kwargs = parity.opcheck_kwargs(backend, device)
    op = parity.kernel_namespace(backend).cross_entropy_fwd.default
    torch.library.opcheck(op, (logits, targets, -100, want_grad), **kwargs)
    torch.library.opcheck(op, (logits.detach().t().contiguous().t(), targets, -100, False), **kwargs)


def test_bad_input_raises_before_any_kernel():
    logits = torch.randn(4, 10)
    for backend in ("cpu", "triton", "cuda"):
        with pytest.raises(ValueError, match="logits"):
            ops.cross_entropy(logits[0], torch.tensor(1), backend=backend)
        with pytest.raises(ValueError, match="targets must have shape"):
            ops.cross_entropy(logits, torch.zeros(5, dtype=torch.long), backend=backend)
        with pytest.raises(TypeError, match="targets"):
            ops.cross_entropy(logits, torch.zeros(4), backend=backend)
        with pytest.raises(ValueError, match="outside"):
            ops.cross_entropy(logits, torch.tensor([0, 1, 10, 2]), backend=backend)
        with pytest.raises(ValueError, match="reduction"):
            ops.cross_entropy(logits, torch.zeros(4, dtype=torch.long), reduction="avg", backend=backend)
        with pytest.raises(ValueError, match="weight"):
            ops.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 7), torch.zeros(4, dtype=torch.long),
                                     backend=backend)
        with pytest.raises(ValueError, match="targets"):
            ops.linear_cross_entropy(torch.randn(3, 8), torch.randn(10, 8), torch.tensor([1, 2, 10]), backend=backend)


@needs_cpu_backend
def test_cpu_kernel_bounds_checks_targets_itself():
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.gptfast_cpu.cross_entropy_fwd(torch.randn(2, 5), torch.tensor([0, 9]), -100, True)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=[parity.needs_triton, needs_interpreter]),
                                    pytest.param("cuda", marks=[parity.needs_triton, needs_cuda])])
def test_triton_kernel_bounds_checks_targets_and_refuses_float64(device):
    """A target outside [0, V) that slipped past the Python checks gives NaN, never an out-of-bounds read."""
    logits = torch.randn(3, 10, device=device)
    losses, _ = torch.ops.gptfast_triton.cross_entropy_fwd(logits, torch.tensor([1, 10, -5], device=device), -100,
                                                          False)
    assert torch.isfinite(losses[0]) and torch.isnan(losses[1:]).all()
    targets = torch.tensor([1, 2, 3], device=device)
    with pytest.raises(RuntimeError, match="float64"):
        ops.cross_entropy(logits.double(), targets, backend="triton")
    hidden, weight = torch.randn(3, 8, device=device), torch.randn(10, 8, device=device)
    with pytest.raises(TypeError, match="bias must have hidden's dtype"):
        ops.linear_cross_entropy(hidden, weight, targets, bias=torch.zeros(10, device=device, dtype=torch.float16),
                                 backend="triton")


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_interpreter_refuses_16_bit_instead_of_returning_garbage(dtype):
    logits, targets = torch.randn(4, 50, dtype=dtype), torch.tensor([1, 2, 3, 4])
    with pytest.raises(RuntimeError, match="interpreter.*wrongly"):
        ops.cross_entropy(logits, targets, backend="triton")
    with pytest.raises(RuntimeError, match="interpreter.*wrongly"):
        ops.linear_cross_entropy(torch.randn(4, 8, dtype=dtype), torch.randn(50, 8, dtype=dtype), targets,
                                 backend="triton")


@needs_interpreter
def test_triton_gpu_tile_sizes_in_the_interpreter(monkeypatch):
    """The block sizes a GPU uses (larger than the interpreter's) must give the same results."""
    from gptfast.triton_kernels import cross_entropy as kernels
    monkeypatch.setattr(kernels, "INTERPRETER", False)
    parity.check_cross_entropy_parity("triton", (4, 50257), torch.float32)


def test_cuda_supports_refuses_float64_with_a_reason():
    from gptfast.ops import cuda_ops
    x = torch.randn(2, 5, dtype=torch.float64)
    assert "float64" in cuda_ops.supports("cross_entropy", x, torch.tensor([0, 1]))
    assert "float64" in cuda_ops.supports("linear_cross_entropy", x, x, torch.tensor([0, 1]))
    assert cuda_ops.supports("cross_entropy", x.float(), torch.tensor([0, 1])) is None
    assert cuda_ops.supports("linear_cross_entropy", x.half(), x.half(), torch.tensor([0, 1])) is None


# --------------------------------------------------------------------------- linear cross-entropy


def check_linear_cross_entropy_parity(backend, shape, dtype, device, reduction, bias=False, ignore_fraction=0.2,
                                      seed=0):
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
                                    backend=backend)
    theirs = [t.double().requires_grad_(True) if t is not None else None for t in (hidden, weight, b)]
    ref = torch_ops.linear_cross_entropy(theirs[0], theirs[1], targets, bias=theirs[2], reduction=reduction)
    assert loss.shape == ref.shape and loss.dtype == dtype
    parity.assert_close(loss.detach().cpu(), ref.detach(), dtype, f"{backend} linear CE {shape} {reduction}")
    upstream = torch.randn(ref.shape, generator=g) if reduction == "none" else torch.tensor(0.7)
    loss.backward(upstream.to(device=device, dtype=dtype))
    ref.backward(upstream.double())
    grow = 1.0 if dtype in (torch.float32, torch.float64) else math.sqrt(hidden.numel() // hidden_size / 16) + 1
    t = parity.tol(dtype)
    for name, a, r in zip(("hidden", "weight", "bias"), mine, theirs):
        if a is not None:
            torch.testing.assert_close(a.grad.double().cpu(), r.grad, atol=t["atol"] * grow, rtol=t["rtol"] * grow,
                                       msg=lambda m: f"{backend} linear CE d{name} {shape} {reduction}: {m}")


@pytest.fixture
def small_chunks(monkeypatch):
    """Five tokens per chunk, so the tests go through several chunks and a partial last one."""
    monkeypatch.setattr(ce, "chunk_rows", lambda n, h, v, device_type: min(n, 5))


@pytest.mark.parametrize("backend,device,dtype", backend_cases(OP))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape,bias", [((1, 16, 3), False), ((37, 32, 1000), True), ((2, 9, 24, 257), False),
                                        ((3, 7, 16, 97), True)], ids=str)
def test_linear_parity(backend, device, dtype, reduction, shape, bias, small_chunks):
    check_linear_cross_entropy_parity(backend, shape, dtype, device, reduction, bias=bias)


@pytest.mark.parametrize("backend,device,dtype", backend_cases(OP, dtypes=(torch.float32,)))
def test_linear_gpt2_vocab(backend, device, dtype):
    shape = (8192, 768, 50257) if device == "cuda" else (6, 32, 50257)
    check_linear_cross_entropy_parity(backend, shape, dtype, device, "mean", ignore_fraction=0.1)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_linear_frozen_weight_and_no_grad(backend, device):
    hidden = torch.randn(20, 16, device=device, requires_grad=True)
    weight = torch.randn(50, 16, device=device)
    targets = torch.randint(0, 50, (20,), device=device)
    loss = ops.linear_cross_entropy(hidden, weight, targets, backend=backend)
    loss.backward()
    h2 = hidden.detach().double().requires_grad_(True)
    ref = torch_ops.linear_cross_entropy(h2, weight.double(), targets)
    ref.backward()
    parity.assert_close(hidden.grad.cpu(), h2.grad.cpu(), torch.float32, "frozen-weight d hidden")
    with torch.no_grad():
        plain = ops.linear_cross_entropy(hidden, weight, targets, backend=backend)
    assert not plain.requires_grad
    parity.assert_close(plain.cpu(), ref.detach().cpu(), torch.float32, "no-grad linear CE")


@needs_cpu_backend
def test_cpu_linear_bf16_against_float32():
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(9, 32, generator=g)
    weight = torch.randn(300, 32, generator=g) * 0.2
    targets = torch.randint(0, 300, (9,), generator=g)
    ref = F.cross_entropy(hidden @ weight.t(), targets)
    torch.testing.assert_close(ops.linear_cross_entropy(hidden, weight, targets, backend="cpu"), ref,
                               **parity.tol(torch.float32))
    h16, w16 = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    loss = ops.linear_cross_entropy(h16, w16, targets, backend="cpu")
    loss.backward()
    h32, w32 = hidden.requires_grad_(), weight.clone().requires_grad_()
    F.cross_entropy(h32 @ w32.t(), targets).backward()
    parity.assert_close(loss.float().detach(), ref, torch.bfloat16, "bf16 linear CE loss")
    parity.assert_close(h16.grad.float(), h32.grad, torch.bfloat16, "bf16 linear CE grad_hidden")
    parity.assert_close(w16.grad.float(), w32.grad, torch.bfloat16, "bf16 linear CE grad_weight")


def test_linear_driver_runs_any_backends_kernel(small_chunks):
    """The one chunked driver serves every backend: here on the reference kernel, in several chunks."""
    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(2, 11, 8, generator=g, requires_grad=True)
    weight = torch.randn(40, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 40, (2, 11), generator=g)
    _ref_calls.clear()
    loss = ce.fused_linear_cross_entropy(_REF, hidden, weight, targets)
    assert _ref_calls == [True] * 5  # 22 tokens in chunks of 5
    loss.backward()
    h2, w2 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    torch_ops.linear_cross_entropy(h2, w2, targets).backward()
    parity.assert_close(hidden.grad, h2.grad, torch.float32, "d hidden")
    parity.assert_close(weight.grad, w2.grad, torch.float32, "d weight")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_driver_without_grad_mode_computes_no_gradient(small_chunks, reduction):
    """Evaluation under no_grad (inputs that require grad): the kernel is asked for the loss only."""
    hidden, weight, _, targets = _linear_case(12, 8, 40, seed=24)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    targets[::3] = -100
    _ref_calls.clear()
    with torch.no_grad():
        loss = ce.fused_linear_cross_entropy(_REF, hidden, weight, targets, reduction=reduction)
    assert _ref_calls == [False] * 2 and not loss.requires_grad  # 8 kept rows in chunks of 5
    ref = torch_ops.linear_cross_entropy(hidden.detach().double(), weight.detach().double(), targets,
                                         reduction=reduction)
    parity.assert_close(loss, ref, torch.float32, "no-grad linear CE")


@needs_cpu_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_cpu_inplace_kernel_writes_the_out_of_place_gradient_over_the_logits(dtype):
    """cross_entropy_fwd_inplace: the loss rows and, over the logits, the gradient cross_entropy_fwd returns
    (ignored rows, a NaN row, a -inf logit and a -inf target logit included)."""
    logits, targets = _ce_case((9, 77), dtype)
    logits[2, 5] = math.nan
    logits[3, 0] = -math.inf
    logits[4, targets[4]] = -math.inf
    targets[5] = -100
    loss, grad = torch.ops.gptfast_cpu.cross_entropy_fwd(logits, targets, -100, True)
    buffer = logits.clone()
    loss_inplace = torch.ops.gptfast_cpu.cross_entropy_fwd_inplace(buffer, targets.int(), -100)
    torch.testing.assert_close(loss_inplace, loss, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(buffer, grad, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.gptfast_cpu.cross_entropy_fwd_inplace(logits.t().contiguous().t(), targets, -100)
    bad_targets, untouched = targets.clone(), logits.clone()
    bad_targets[-1] = 77  # the last row's: every row before it would already be written
    with pytest.raises(RuntimeError, match="target 77 in row 8 is outside"):
        torch.ops.gptfast_cpu.cross_entropy_fwd_inplace(untouched, bad_targets, -100)
    torch.testing.assert_close(untouched, logits, rtol=0, atol=0, equal_nan=True)
    torch.library.opcheck(torch.ops.gptfast_cpu.cross_entropy_fwd_inplace.default, (logits.clone(), targets, -100),
                          test_utils=("test_schema", "test_faketensor"))


@needs_cpu_backend
def test_cpu_linear_cross_entropy_computes_the_gradient_in_the_logits_buffer(small_chunks, monkeypatch):
    """The CPU linear cross-entropy never asks the kernel for a separate gradient buffer."""
    calls = []
    namespace = torch.ops.gptfast_cpu
    original = ce._inplace_kernel
    monkeypatch.setattr(ce, "_inplace_kernel", lambda ops: original(ops) if ops != "gptfast_cpu" else (
        lambda logits, t, i: (calls.append(logits.shape[0]), namespace.cross_entropy_fwd_inplace(logits, t, i))[1]))
    hidden, weight, b, targets = _linear_case(12, 8, 40, seed=25, bias=True)
    run = lambda h, w, bb: ops.linear_cross_entropy(h, w, targets, bias=bb, backend="cpu")  # noqa: E731
    _linear_grads_vs_oracle(run, hidden, weight, b, targets, what="in-place gradient")
    assert calls == [5, 5, 2]


def _spy_onednn(monkeypatch):
    """Route every float32 chunk (any vocabulary) through oneDNN and record each call's row count."""
    return spy_onednn(monkeypatch, limits=("ONEDNN_MIN_VOCAB",))


@needs_onednn
@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu_backend), "reference kernel"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_chunks_through_onednn(small_chunks, monkeypatch, backend, reduction, bias):
    """A chunk's logits from oneDNN: loss and gradients equal the float64 oracle (several chunks, ignored rows)."""
    calls = _spy_onednn(monkeypatch)
    hidden, weight, b, targets = _linear_case(13, 8, 40, seed=31, bias=bias)
    targets[[2, 9]] = -100
    if backend == "cpu":
        run = lambda h, w, bb: ops.linear_cross_entropy(h, w, targets, bias=bb, reduction=reduction,  # noqa: E731
                                                        backend="cpu")
    else:  # the one driver on the reference kernel (as the other backends' kernels use it)
        run = lambda h, w, bb: ce.fused_linear_cross_entropy(_REF, h, w, targets, bias=bb,  # noqa: E731
                                                             reduction=reduction)
    _linear_grads_vs_oracle(run, hidden, weight, b, targets, reduction=reduction, what=f"oneDNN {backend}")
    assert calls[:3] == [5, 5, 1]  # 11 kept rows in chunks of 5 (a "none" backward runs the chunks again)


@needs_onednn
def test_linear_chunks_stay_on_torch_mm_where_onednn_does_not_serve(small_chunks, monkeypatch):
    """bf16, a non-contiguous weight, a graph being recorded, a small vocabulary or no oneDNN: the plain matmul."""
    calls = _spy_onednn(monkeypatch)
    hidden, weight, _, targets = _linear_case(7, 8, 40, seed=32)
    assert not ce._onednn_serves(hidden.bfloat16(), weight.bfloat16(), None)
    assert not ce._onednn_serves(hidden, weight.t().contiguous().t(), None)
    with torch.enable_grad():
        assert not ce._onednn_serves(hidden, weight.requires_grad_(True), None)
    weight.requires_grad_(False)
    with torch.no_grad():
        assert ce._onednn_serves(hidden, weight.requires_grad_(True), None)  # what the chunk driver sees
    weight.requires_grad_(False)
    monkeypatch.setattr(dense, "ONEDNN_MIN_VOCAB", 41)
    assert not ce._onednn_serves(hidden, weight, None)
    monkeypatch.setattr(dense, "onednn_linear", lambda: None)
    monkeypatch.setattr(dense, "ONEDNN_MIN_VOCAB", 1)
    assert not ce._onednn_serves(hidden, weight, None)
    run = lambda h, w, bb: ce.fused_linear_cross_entropy(_REF, h, w, targets)  # noqa: E731
    _linear_grads_vs_oracle(run, hidden, weight, None, targets, what="no oneDNN")
    assert calls == []


def _linear_case(n, hidden_size, vocab, seed, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hidden_size, generator=g)
    weight = torch.randn(vocab, hidden_size, generator=g) / math.sqrt(hidden_size) * 3
    b = torch.randn(vocab, generator=g) if bias else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    return hidden, weight, b, targets


def _linear_grads_vs_oracle(run, hidden, weight, bias, targets, reduction="mean", what=""):
    """``run(h, w, b)`` (a linear CE with these targets) against the float64 oracle: loss and every gradient."""
    mine = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    theirs = [t.detach().double().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    loss = run(*mine)
    ref = torch_ops.linear_cross_entropy(theirs[0], theirs[1], targets, bias=theirs[2], reduction=reduction)
    torch.testing.assert_close(loss.double(), ref, atol=1e-4, rtol=1e-4, equal_nan=True, msg=lambda m: f"{what}: {m}")
    upstream = torch.linspace(0.5, 1.5, ref.numel()).view(ref.shape) if reduction == "none" else torch.tensor(0.7)
    loss.backward(upstream.to(loss.dtype))
    ref.backward(upstream.double())
    for name, a, r in zip(("hidden", "weight", "bias"), mine, theirs):
        if a is not None:
            torch.testing.assert_close(a.grad.double(), r.grad, atol=1e-5, rtol=1e-4, equal_nan=True,
                                       msg=lambda m: f"{what} d{name}: {m}")
    return mine


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("ignored", ["many", "chunk", "all"])
def test_linear_driver_skips_ignored_rows(small_chunks, reduction, bias, ignored):
    """Rows whose target is ignore_index never reach the kernel on a CPU; the numbers stay the oracle's.

    "many": 3 of 4 rows ignored, scattered; "chunk": a whole chunk's worth of ignored rows in a
    row (an all-ignored chunk without the gather); "all": nothing kept (mean is NaN, gradients 0).
    """
    hidden, weight, b, targets = _linear_case(23, 8, 40, seed=21, bias=bias)
    if ignored == "many":
        targets[torch.arange(23) % 4 != 1] = -100
    elif ignored == "chunk":
        targets[5:15] = -100
    else:
        targets[:] = -100
    kept = int((targets != -100).sum())
    rows_seen = []
    ns = torch.ops.gptfast_schema_reference

    class _Counting:  # the reference kernel, recording how many rows it is handed
        @staticmethod
        def cross_entropy_fwd(logits, t, ignore_index, want_grad):
            rows_seen.append(logits.shape[0])
            return ns.cross_entropy_fwd(logits, t, ignore_index, want_grad)

    run = lambda h, w, bb: ce.fused_linear_cross_entropy(  # noqa: E731
        _Counting, h, w, targets, bias=bb, reduction=reduction)
    mine = _linear_grads_vs_oracle(run, hidden, weight, b, targets, reduction, f"{ignored} ignored")
    forward_rows = rows_seen[:-(-kept // 5)] if kept else rows_seen
    assert sum(forward_rows) == kept and all(r <= 5 for r in rows_seen)
    assert (mine[0].grad[targets == -100] == 0).all()


@needs_cpu_backend
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_linear_many_ignored_rows_and_non_contiguous_inputs(small_chunks, bias):
    """The CPU backend on strided views (hidden a column slice, weight transposed back, targets strided)."""
    hidden, weight, b, targets = _linear_case(40, 12, 300, seed=22, bias=bias)
    wide_targets = torch.stack([targets, targets], 1)
    wide_targets[::3, 0] = -100
    targets = wide_targets[:, 0]  # stride 2
    assert not targets.is_contiguous()

    def strided(t):  # the same values, every element two apart: a non-contiguous view reaching t's gradient
        view = torch.stack([t, t], -1)[..., 0]
        assert not view.is_contiguous()
        return view

    run = lambda h, w, bb: ops.linear_cross_entropy(strided(h), strided(w), targets, bias=bb,  # noqa: E731
                                                    backend="cpu")
    _linear_grads_vs_oracle(run, hidden, weight, b, targets, what="cpu strided")


@needs_cpu_backend
def test_cpu_linear_ignored_rows_keep_pytorchs_nan(small_chunks):
    """A non-finite ignored row, bias or weight still spreads NaN into the gradients as in PyTorch
    (the rows are not skipped then; the kernel gives an ignored row with a NaN softmax a NaN gradient)."""
    for case in ("hidden", "bias", "weight-all-ignored"):
        hidden, weight, b, targets = _linear_case(12, 8, 30, seed=23, bias=case == "bias")
        targets[::2] = -100
        if case == "hidden":
            hidden[2, 3] = math.nan
        elif case == "bias":
            b[4] = math.inf
        else:
            targets[:] = -100
            weight[7, 1] = math.nan
        run = lambda h, w, bb: ops.linear_cross_entropy(h, w, targets, bias=bb, backend="cpu")  # noqa: E731
        mine = _linear_grads_vs_oracle(run, hidden, weight, b, targets, what=f"non-finite {case}")
        assert torch.isnan(mine[1].grad).any(), case


@needs_cpu_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cpu_linear_ignored_rows_whose_logits_overflow_keep_pytorchs_nan(small_chunks, dtype):
    """An ignored row of finite numbers whose logits overflow the dtype gives PyTorch NaN gradients (0 * the NaN
    softmax of inf - inf): it is computed, not skipped, so the gradients are NaN in the same places."""
    hidden, weight, _, targets = _linear_case(12, 8, 30, seed=24)
    targets[::2] = -100
    big = 1e20 if dtype != torch.float16 else 300.0
    hidden[0], weight[5] = big, big ** 1.5  # row 0 is ignored; its logit at row 5 is ~8 big^2.5: inf
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    grads = {}
    for backend in ("torch", "cpu"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = ops.linear_cross_entropy(h, w, targets, backend=backend)
        grads[backend] = (loss, *torch.autograd.grad(loss, (h, w)))
    assert grads["torch"][0].isfinite() and grads["torch"][1].isnan().any()  # the setup does what it says
    for mine, theirs in zip(grads["cpu"], grads["torch"]):
        assert torch.equal(mine.isnan(), theirs.isnan())
        torch.testing.assert_close(mine[theirs.isfinite()].float(), theirs[theirs.isfinite()].float(),
                                   rtol=2e-2, atol=1e-3)


def test_chunk_rows_policy():
    most = ce.CPU_CHUNK_ELEMENTS // 50257
    for n in (1, 333, 334, 512, 10_000):  # equal chunks, none above the element budget, none a sliver
        rows = ce.chunk_rows(n, 768, 50257, "cpu")
        chunks = -(-n // rows)
        assert rows <= most and chunks == -(-n // most) and n - (chunks - 1) * rows >= rows - chunks
    assert ce.chunk_rows(512, 768, 50257, "cpu") == 256
    assert ce.chunk_rows(300, 16, 1000, "cuda") == 256  # two chunks, the last one partial
    assert ce.chunk_rows(10_000, 768, 50257, "cuda") == 1024
    assert ce.chunk_rows(3, 768, 50257, "cuda") == 3


# --------------------------------------------------------------------------- cuda: GPU only


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vocab", [1, 7, 8, 9, 1023, 50257])
def test_cuda_unaligned_strided_rows_and_int32_targets(dtype, vocab):
    """Rows that start at every alignment (a column slice) and int32 targets."""
    g = torch.Generator().manual_seed(1)
    wide = (torch.randn(6, vocab + 3, generator=g) * 4).to(dtype)
    targets = torch.randint(0, vocab, (6,), generator=g)
    for start in range(3):
        base = wide.cuda()[:, start:start + vocab]  # row stride vocab + 3, offset start
        x1 = base.detach().requires_grad_(True)
        loss = ops.cross_entropy(x1, targets.cuda().int(), reduction="sum", backend="cuda")
        loss.backward()
        x2 = wide[:, start:start + vocab].double().requires_grad_(True)
        ref = torch_ops.cross_entropy(x2, targets, reduction="sum")
        ref.backward()
        parity.assert_close(loss.detach().cpu(), ref.detach(), dtype, f"loss start={start}")
        parity.assert_close(x1.grad.cpu(), x2.grad, dtype, f"grad start={start}")


@needs_cuda
def test_cuda_3d_logits_and_no_grad_forward():
    logits, targets = _ce_case((2, 33, 4097), torch.bfloat16)
    with torch.no_grad():
        loss = ops.cross_entropy(logits.cuda(), targets.cuda(), backend="cuda")
    parity.assert_close(loss.cpu(), torch_ops.cross_entropy(logits.double(), targets), torch.bfloat16, "3-D no-grad")


@needs_cuda
def test_cuda_extreme_logits():
    logits = torch.tensor([[1e4, -1e4, 0.0], [-math.inf, 0.0, 1.0], [30.0, 30.0, 30.0]], device="cuda")
    targets = torch.tensor([0, 2, 1], device="cuda")
    x1 = logits.clone().requires_grad_(True)
    loss = ops.cross_entropy(x1, targets, reduction="none", backend="cuda")
    x2 = logits.cpu().double().requires_grad_(True)
    ref = torch_ops.cross_entropy(x2, targets.cpu(), reduction="none")
    torch.testing.assert_close(loss.double().cpu(), ref.detach(), atol=1e-5, rtol=1e-5)
    loss.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x1.grad.double().cpu(), x2.grad, atol=1e-5, rtol=1e-5)


@needs_cpu_backend
def test_cpu_loss_compiles_into_one_graph():
    """The front door's target checks read values on CPU, but not while torch.compile traces (a graph break)."""
    logits = torch.randn(6, 40, requires_grad=True)
    targets = torch.randint(0, 40, (6,))
    compiled = torch.compile(lambda x, t: ops.cross_entropy(x, t, backend="cpu"), backend="eager", fullgraph=True)
    loss = compiled(logits, targets)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, targets))
    loss.backward()
    assert logits.grad is not None


@pytest.mark.parametrize("backend,device", [case for case in backend_devices() if case.values != ("triton", "cpu")])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_loss_with_gradients_compiles_into_one_graph(backend, device, reduction):
    """The guard against a second backward through the in-place gradient is left out while torch.compile traces
    (the traced backward scales out of place): dynamo refused its mutation, breaking the graph."""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(5, 16, generator=g).to(device).requires_grad_(True)
    weight = torch.randn(11, 16, generator=g).to(device).requires_grad_(True)
    targets = torch.tensor([1, 2, -100, 4, 5], device=device)
    torch._dynamo.reset()
    compiled = torch.compile(lambda h, w: ops.linear_cross_entropy(h, w, targets, reduction=reduction,
                                                                    backend=backend),
                             backend="aot_eager", fullgraph=True)
    loss = compiled(hidden, weight)
    loss.sum().backward()
    h2, w2 = (t.detach().double().cpu().requires_grad_(True) for t in (hidden, weight))
    expected = torch.nn.functional.cross_entropy(h2 @ w2.T, targets.cpu(), reduction=reduction)
    expected.sum().backward()
    parity.assert_close(loss.detach().cpu(), expected.detach(), torch.float32, "compiled linear loss")
    parity.assert_close(hidden.grad.cpu(), h2.grad, torch.float32, "compiled linear loss, hidden grad")
    parity.assert_close(weight.grad.cpu(), w2.grad, torch.float32, "compiled linear loss, weight grad")


@parity.needs_triton
@needs_interpreter
def test_the_triton_interpreter_refuses_to_run_traced():
    """Traced by torch.compile, the interpreter's kernels read tensors without real data (a loss of 1e-28 or
    1e26): the backend says it cannot run there instead."""
    hidden, weight = torch.randn(5, 16), torch.randn(11, 16)
    targets = torch.tensor([1, 2, -100, 4, 5])
    torch._dynamo.reset()
    compiled = torch.compile(lambda h, w: ops.linear_cross_entropy(h, w, targets, backend="triton"),
                             backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="interpreter .* cannot run under torch.compile"):
        compiled(hidden, weight)


@needs_cuda
def test_cuda_bad_target_is_nan_not_a_wild_read():
    logits = torch.randn(4, 50257, device="cuda", requires_grad=True)
    targets = torch.tensor([3, 50257, -5, -100], device="cuda")  # device values are not checked in Python
    per_row = ops.cross_entropy(logits, targets, reduction="none", backend="cuda")
    assert torch.isnan(per_row[1:3]).all() and torch.isfinite(per_row[0]) and per_row[3] == 0
    per_row.sum().backward()
    assert torch.isnan(logits.grad[1:3]).all() and torch.isfinite(logits.grad[0]).all()
    assert (logits.grad[3] == 0).all()


@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_no_host_sync_and_torch_compile(backend):
    from gptfast.ops import cuda_ops, triton_ops
    module = cuda_ops if backend == "cuda" else triton_ops
    logits, targets = _ce_case((16, 1000), torch.float32)
    logits, targets = logits.cuda().requires_grad_(True), targets.cuda()
    hidden = torch.randn(256, 64, device="cuda", requires_grad=True)
    weight = torch.randn(1000, 64, device="cuda", requires_grad=True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        module.cross_entropy(logits, targets).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    eager_grad = logits.grad.clone()
    logits.grad = None
    compiled = torch.compile(lambda x, t: module.cross_entropy(x, t), fullgraph=True)
    loss = compiled(logits, targets)
    loss.backward()
    torch.testing.assert_close(loss, module.cross_entropy(logits.detach(), targets))
    torch.testing.assert_close(logits.grad, eager_grad)
    long_targets = torch.randint(0, 1000, (256,), device="cuda")
    step = lambda h, w: module.linear_cross_entropy(h, w, long_targets)  # noqa: E731
    eager = step(hidden, weight)
    eager_grads = torch.autograd.grad(eager, (hidden, weight))
    compiled_loss = torch.compile(step, fullgraph=True)(hidden, weight)
    compiled_grads = torch.autograd.grad(compiled_loss, (hidden, weight))
    torch.testing.assert_close(compiled_loss, eager, atol=1e-3, rtol=1e-3)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


@needs_cuda
def test_cuda_binding_rejects_float64():
    logits = torch.randn(3, 10, device="cuda")
    with pytest.raises(TypeError, match="logits must be float32"):
        torch.ops.gptfast_cuda.cross_entropy_fwd(logits.double(), torch.zeros(3, dtype=torch.long, device="cuda"),
                                                 -100, False)
