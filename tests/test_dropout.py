"""Dropout (``gptfast.ops.dropout``): every fused backend against the mask's definition and torch's semantics.

The fused kernels' mask is not torch's (it is a hash of one seed and each element's index,
csrc/dropout_hash.h), so the oracle here is that definition spelt in numpy (``keep_mask``):
every element of every backend must equal ``x * keep / (1 - p)`` rounded once, bitwise.  Also:
the backward (the same mask, regenerated), odd sizes, non-contiguous views of the input and of
the upstream gradient, an input expanded from one row (stride 0), results independent of the
thread count, the kept share, reproducibility under ``torch.manual_seed``, p = 0 / 1 and
eval mode, NaN/inf (a dropped NaN or inf is NaN, as in torch), ``opcheck``, ``gradcheck``, the
argument checks, and the GPT's ``Dropout`` modules (the fused op on a fused backend,
``nn.Dropout`` bitwise on backend "torch").
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gptfast import ops
from gptfast.ops.regularization import keep_mask

from parity import backend_cases, backend_devices, kernel_namespace, needs_cpu_backend, opcheck_kwargs

CASES = backend_cases("dropout") + [
    pytest.param("cpu", "cpu", torch.float16, marks=[needs_cpu_backend], id="cpu-cpu-float16")]
# 70 x 1100 = 77000 elements: more than one parallel task on the cpu backend
SHAPES = [(0,), (1,), (7,), (1023,), (3, 33), (2, 5, 129), (70, 1100)]


def expected(x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """``x * keep / (1 - p)`` in the kernels' math dtype (float32, float64 for float64), rounded once."""
    math_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    scale = torch.tensor(1.0 / (1.0 - p) if p < 1.0 else 0.0, dtype=math_dtype)
    keep = keep_mask(seed, x.numel(), p).reshape(x.shape)
    factor = torch.where(keep, scale, torch.zeros((), dtype=math_dtype))
    return (x.cpu().to(math_dtype) * factor).to(x.dtype)


def _seed(device, value=1234):
    return torch.tensor([value], dtype=torch.int64, device=device)


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 3, torch.randn(*shape, generator=g)


def _same(mine: torch.Tensor, want: torch.Tensor, what: str) -> None:
    mine = mine.detach().cpu()
    assert mine.dtype == want.dtype and mine.shape == want.shape, what
    assert torch.equal(mine.isnan(), want.isnan()), what
    assert torch.equal(torch.nan_to_num(mine), torch.nan_to_num(want)), what


@pytest.mark.parametrize("backend, device, dtype", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_kernel_is_the_mask_definition_bitwise(backend, device, dtype, shape, p):
    x = _inputs(shape)[0].to(device=device, dtype=dtype)
    out = kernel_namespace(backend).dropout_fwd(x, p, _seed(device))
    _same(out, expected(x, 1234, p), f"{backend} {dtype} {shape} p={p}")


@pytest.mark.parametrize("backend, device, dtype", CASES)
def test_backward_applies_the_forwards_mask_to_the_gradient(backend, device, dtype):
    x, grad = (t.to(device=device, dtype=dtype) for t in _inputs((33, 65)))
    x.requires_grad_(True)
    torch.manual_seed(7)
    out = ops.dropout(x, 0.3, backend=backend)
    out.backward(grad)
    kept = out.detach() != 0  # randn has no exact zeros
    scale = torch.tensor(1.0 / 0.7, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    want = (grad.to(scale.dtype) * torch.where(kept, scale, torch.zeros_like(scale))).to(dtype)
    _same(x.grad, want.cpu(), f"{backend} {dtype} grad")
    assert 0.6 < kept.float().mean().item() < 0.8


@pytest.mark.parametrize("backend, device, dtype", CASES)
def test_non_contiguous_views_of_the_input_and_the_gradient(backend, device, dtype):
    x, grad = _inputs((9, 2 * 41))
    xv, gv = x.t()[::2].to(device=device, dtype=dtype), grad.t()[::2].to(device=device, dtype=dtype)
    assert not xv.is_contiguous() and not gv.is_contiguous()
    xv.requires_grad_(True)
    torch.manual_seed(3)
    seed = torch.randint(0, 2**31 - 1, (1,)).item()  # what ops.dropout draws first after manual_seed(3)
    torch.manual_seed(3)
    out = ops.dropout(xv, 0.4, backend=backend)
    _same(out, expected(xv.detach().contiguous(), seed, 0.4), f"{backend} view out")
    out.backward(gv)
    _same(xv.grad, expected(gv.contiguous(), seed, 0.4), f"{backend} view grad")


@pytest.mark.parametrize("backend, device, dtype", backend_cases("dropout", dtypes=(torch.float32, torch.bfloat16)))
def test_expanded_input_is_masked_as_its_contiguous_copy(backend, device, dtype):
    """x broadcast from one row (stride 0 over the rows): each element gets the mask of its index in the
    contiguous tensor (the rows differ), and the row's gradient is the masked gradient summed over rows."""
    row, _ = _inputs((45,), seed=4)
    grad = _inputs((7, 45), seed=5)[1].to(device=device, dtype=dtype)
    row1 = row.to(device=device, dtype=dtype).requires_grad_(True)
    x1 = row1.expand(7, 45)
    assert x1.stride() == (0, 1)
    torch.manual_seed(6)
    seed = torch.randint(0, 2**31 - 1, (1,)).item()  # what ops.dropout draws first after manual_seed(6)
    torch.manual_seed(6)
    out = ops.dropout(x1, 0.4, backend=backend)
    _same(out, expected(x1.detach().contiguous(), seed, 0.4), f"{backend} expanded out")
    assert not torch.equal(out[0] != 0, out[1] != 0)
    out.backward(grad)
    want = expected(grad, seed, 0.4).sum(0)
    assert row1.grad.dtype == dtype
    # the sum over rows may run in another order on another device: a rounding of the sum apart
    torch.testing.assert_close(row1.grad.cpu().double(), want.double(), atol=1e-5,
                               rtol=1e-5 if dtype == torch.float32 else 1e-2)


@needs_cpu_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_results_do_not_depend_on_the_thread_count(dtype):
    """Under one seed, output and gradient are bitwise the same with 1, 2 and 3 threads (100000 elements:
    several parallel blocks)."""
    x, grad = (t.to(dtype) for t in _inputs((100, 1000), seed=7))
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            x1 = x.clone().requires_grad_(True)
            torch.manual_seed(12)
            out = ops.dropout(x1, 0.3, backend="cpu")
            out.backward(grad)
            results.append((out.detach(), x1.grad))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, c) for a, c in zip(results[0], other))


@pytest.mark.parametrize("backend, device", backend_devices())
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_share_and_mean_are_unbiased(backend, device, p):
    n = 200_000
    x = torch.ones(n, device=device)
    out = ops.dropout(x, p, backend=backend).cpu()
    kept = (out != 0).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) < 5 * sigma, kept
    assert abs(out.double().mean().item() - 1.0) < 5 * sigma / (1 - p)
    # consecutive elements are independent draws: the share of kept pairs is (1 - p)^2
    pairs = ((out[:-1] != 0) & (out[1:] != 0)).double().mean().item()
    assert abs(pairs - (1 - p) ** 2) < 0.01


@pytest.mark.parametrize("backend, device", backend_devices())
def test_manual_seed_reproduces_the_mask_and_calls_differ(backend, device):
    x = torch.randn(4096, device=device)
    torch.manual_seed(11)
    a, b = ops.dropout(x, 0.5, backend=backend), ops.dropout(x, 0.5, backend=backend)
    torch.manual_seed(11)
    c = ops.dropout(x, 0.5, backend=backend)
    assert torch.equal(a, c)
    assert not torch.equal(a != 0, b != 0)


@pytest.mark.parametrize("backend, device", backend_devices())
def test_p_zero_eval_and_p_one(backend, device):
    x = torch.tensor([1.0, -2.0, float("nan"), float("inf")], device=device, requires_grad=True)
    assert ops.dropout(x, 0.0, backend=backend) is x
    assert ops.dropout(x, 0.7, training=False, backend=backend) is x
    out = ops.dropout(x, 1.0, backend=backend)
    ref = F.dropout(x.detach().cpu(), 1.0, True)  # torch multiplies by the zero mask: NaN and inf give NaN
    _same(out, ref, f"{backend} p=1")
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad.cpu(), torch.zeros(4))


@pytest.mark.parametrize("backend, device", backend_devices())
def test_nan_and_inf_follow_torchs_semantics(backend, device):
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 1.0, -5.0]).repeat(50)
    x = specials.to(device)
    out = kernel_namespace(backend).dropout_fwd(x, 0.5, _seed(device, 99)).cpu()
    keep = keep_mask(99, x.numel(), 0.5)
    assert keep.any() and not keep.all()
    # kept: x * 2 (NaN stays NaN, inf stays inf); dropped: x * 0 (NaN for NaN and inf, as torch's mask multiply)
    want = torch.where(keep, specials * 2.0, specials * 0.0)
    _same(out, want, f"{backend} specials")


@pytest.mark.parametrize("backend, device", backend_devices())
def test_opcheck(backend, device):
    kwargs, namespace = opcheck_kwargs(backend, device), kernel_namespace(backend)
    x = _inputs((5, 37))[0].to(device)
    torch.library.opcheck(namespace.dropout_fwd.default, (x.requires_grad_(True), 0.25, _seed(device)), **kwargs)


@needs_cpu_backend
def test_gradcheck_in_float64():
    namespace = kernel_namespace("cpu")
    x = torch.randn(3, 17, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    seed = _seed("cpu", 5)  # one fixed mask: gradcheck calls the function many times
    assert torch.autograd.gradcheck(lambda t: namespace.dropout_fwd(t, 0.3, seed), (x,))


def test_torch_backend_is_f_dropout_bitwise():
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)
    ours = ops.dropout(x, 0.2, backend="torch")
    torch.manual_seed(5)
    assert torch.equal(ours, F.dropout(x, 0.2, True))


def test_bad_arguments_are_named_before_any_kernel():
    x = torch.randn(3, 8)
    for backend in ("torch", "cpu", "triton", "cuda"):
        with pytest.raises(TypeError, match="x must be a torch.Tensor"):
            ops.dropout(1.0, 0.1, backend=backend)
        with pytest.raises(TypeError, match="x must be a floating"):
            ops.dropout(x.long(), 0.1, backend=backend)
        for bad in (-0.1, 1.5, float("nan"), True, "0.1", None):
            with pytest.raises(ValueError, match="p must be a number in"):
                ops.dropout(x, bad, backend=backend)
        with pytest.raises(TypeError, match="training must be a bool"):
            ops.dropout(x, 0.1, training=1, backend=backend)


@needs_cpu_backend
def test_kernel_rejects_a_bad_p_or_seed_itself():
    namespace = kernel_namespace("cpu")
    x = torch.randn(4)
    with pytest.raises(RuntimeError, match="p must be in"):
        namespace.dropout_fwd(x, 1.5, _seed("cpu"))
    with pytest.raises(RuntimeError, match="seed must be an int64"):
        namespace.dropout_fwd(x, 0.5, torch.tensor([1.0]))


@needs_cpu_backend
@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_gpt_dropout_modules_run_the_fused_op_on_a_fused_backend(backend):
    from gptfast.ch04 import GPTModel
    from gptfast.models.gpt import Dropout

    cfg = dict(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.25, qkv_bias=False)
    model = GPTModel(cfg).train()
    modules = [model.drop_emb] + [b.drop_shortcut if hasattr(b, "drop_shortcut") else b.drop_resid
                                  for b in model.trf_blocks]
    assert all(type(m) is Dropout for m in modules)
    x = torch.randn(2, 16, 32)
    with ops.use_backend(backend):
        assert ops.selected_backend("dropout", x) == "cpu"
        torch.manual_seed(8)
        out = model.drop_emb(x)
    torch.manual_seed(8)
    assert torch.equal(out, ops.dropout(x, 0.25, backend="cpu"))
    assert not torch.equal(out != 0, F.dropout(x, 0.25, True) != 0)
    ids = torch.randint(0, 97, (2, 16))
    with ops.use_backend(backend):
        model(ids).sum().backward()
    assert model.tok_emb.weight.grad is not None


def test_gpt_dropout_module_is_nn_dropout_bitwise_on_backend_torch_and_in_eval():
    from gptfast.models.gpt import Dropout

    x = torch.randn(4, 50, requires_grad=True)
    grad = torch.randn(4, 50)
    theirs_x = x.detach().clone().requires_grad_(True)
    with ops.use_backend("torch"):
        torch.manual_seed(9)
        ours = Dropout(0.3)(x)
    torch.manual_seed(9)
    theirs = torch.nn.Dropout(0.3)(theirs_x)
    assert torch.equal(ours, theirs)
    ours.backward(grad)
    theirs.backward(grad)
    assert torch.equal(x.grad, theirs_x.grad)
    assert Dropout(0.3).eval()(x) is x
    assert repr(Dropout(0.3)) == repr(torch.nn.Dropout(0.3))
