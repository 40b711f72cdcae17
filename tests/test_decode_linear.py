"""Small-batch linear layer (``gptfast.ops.decode_linear``): every fused backend against ``F.linear``.

Cases: float32/bfloat16/float16 (Triton's interpreter: float32 only), odd K and N (not multiples
of any vector width or tile), M = 1-8, 12, 16 and 17 rows (and a 3-D x), bias on and off,
non-contiguous views of x and weight, x, weight and bias expanded from one row, column or value
(stride 0), a contiguous weight passed without a copy, NaN/inf propagation, the gradient (also
of the weight alone), results independent of the thread count, empty shapes, the Triton
kernel's split and unsplit K paths, ``torch.library.opcheck`` and the argument checks.  CUDA
cases run only with a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gptfast import ops
from gptfast.ops import linear as linear_module

from parity import kernel_namespace, needs_cpu_backend, needs_cuda, needs_interpreter, needs_triton, opcheck_kwargs

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MARKS = {("cpu", "cpu"): [needs_cpu_backend], ("triton", "cpu"): [needs_triton, needs_interpreter],
          ("triton", "cuda"): [needs_triton, needs_cuda], ("cuda", "cuda"): [needs_cuda]}
_DTYPES = {("cpu", "cpu"): DTYPES, ("triton", "cpu"): (torch.float32,), ("triton", "cuda"): DTYPES,
           ("cuda", "cuda"): DTYPES}
CASES = [pytest.param(backend, device, dt, marks=_MARKS[(backend, device)], id=f"{backend}-{device}-{str(dt)[6:]}")
         for (backend, device), dtypes in _DTYPES.items() for dt in dtypes]
FP32_CASES = [case for case in CASES if case.values[2] == torch.float32]
DEVICES = [pytest.param(backend, device, marks=_MARKS[(backend, device)], id=f"{backend}-{device}")
           for backend, device in _DTYPES]

# Against F.linear in float64 from the same rounded inputs: accumulation order (float32) and
# one rounding of the output (a few ulps of the output dtype, relative to the row's scale).
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=0.3, rtol=1.6e-2),
       torch.float16: dict(atol=4e-2, rtol=2e-3)}

# (M, K, N): one row, odd K and N, the decode row counts 1-16 at N=37 K=65 (the CPU kernel's
# tiled rows up to 4, its broadcast rows with one and two vectors of x rows from 5), more rows
# than a register tile holds, Qwen3-0.6B's width.
SHAPES = [(1, 1, 1), (1, 7, 5), (3, 33, 19), (8, 100, 67), (17, 129, 31), (1, 1024, 257), (8, 1023, 13),
          (1, 65, 37), (2, 65, 37), (5, 65, 37), (12, 300, 50), (16, 65, 37),
          # bf16 dot-product path (2-4 rows): 4 rows, a K of one step plus one, a K of exactly one step, odd N
          (4, 65, 37), (3, 33, 9), (4, 32, 3),
          # bf16 tile path (1-16 rows, with AMX): 16-row blocks and fewer rows; K in whole 32-steps, with a
          # tail, and below one step; slices on both threads
          (5, 96, 100), (8, 70, 150), (16, 33, 81), (9, 31, 20), (12, 1024, 200), (6, 64, 2000)]


def _inputs(m, k, n, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    return x.to(device), w.to(device), b.to(device)


def _reference(x, w, b):
    x, w, b = (None if t is None else t.cpu().double() for t in (x, w, b))
    return F.linear(x, w, b)


def _check(out, x, w, b, dtype):
    assert out.dtype == dtype and out.shape == (*x.shape[:-1], w.shape[0]) and out.device == x.device
    torch.testing.assert_close(out.cpu().double(), _reference(x, w, b), **TOL[dtype], equal_nan=True)


@pytest.mark.parametrize("backend, device, dtype", CASES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("m, k, n", SHAPES, ids=[f"M{m}K{k}N{n}" for m, k, n in SHAPES])
def test_matches_f_linear(backend, device, dtype, with_bias, m, k, n):
    x, w, b = _inputs(m, k, n, dtype, device=device)
    b = b if with_bias else None
    _check(ops.decode_linear(x, w, b, backend=backend), x, w, b, dtype)


@pytest.mark.parametrize("backend, device, dtype", CASES)
def test_leading_axes_are_rows(backend, device, dtype):
    x, w, b = _inputs(6, 40, 9, dtype, device=device)
    x3 = x.view(2, 3, 40)
    out = ops.decode_linear(x3, w, b, backend=backend)
    assert out.shape == (2, 3, 9)
    _check(out, x3, w, b, dtype)


@pytest.mark.parametrize("backend, device, dtype", CASES)
def test_non_contiguous_views(backend, device, dtype):
    x, w, b = _inputs(8, 2 * 37, 2 * 23, dtype, seed=1, device=device)
    xv, wv, bv = x.t().contiguous().t()[:, ::2], w[::2, ::2], b[::2]  # strided rows, strided columns
    assert not xv.is_contiguous() and not wv.is_contiguous() and not bv.is_contiguous()
    _check(ops.decode_linear(xv, wv, bv, backend=backend), xv, wv, bv, dtype)
    wt = torch.randn(37, 11).to(dtype).to(device).t()  # a transposed weight
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
@pytest.mark.parametrize("m, k, n", [(3, 45, 21), (6, 45, 21), (12, 45, 21), (8, 96, 100)])
def test_nan_and_inf_propagate_to_their_entries(backend, device, dtype, m, k, n):
    x, w, b = _inputs(m, k, n, dtype, seed=2, device=device)
    x[1, 7] = float("nan")
    w[4, k - 1] = float("inf")  # in the K tail of any vector width (K = 45), in a whole tile step (K = 96)
    out = ops.decode_linear(x, w, b, backend=backend)
    ref = _reference(x, w, b)
    out = out.cpu()
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    assert out[1].isnan().all() and not out[[0, 2]][:, [0, 1, 2, 3, 5]].isnan().any()
    finite = ref.isfinite()
    torch.testing.assert_close(out.double()[finite], ref[finite], **TOL[dtype])


@pytest.mark.parametrize("backend, device, dtype", CASES)
def test_empty_shapes(backend, device, dtype):
    for m, k, n in ((0, 8, 3), (2, 8, 0), (2, 0, 3)):
        x, w, b = _inputs(m, k, n, dtype, device=device)
        for bias in (None, b):
            out = ops.decode_linear(x, w, bias, backend=backend)
            assert out.shape == (m, n) and out.device == x.device
            torch.testing.assert_close(out.cpu().double(), _reference(x, w, bias))


@pytest.mark.parametrize("backend, device, dtype", FP32_CASES)
def test_gradient_is_f_linear_s(backend, device, dtype):
    x, w, b = _inputs(3, 20, 7, dtype, seed=4)
    leaves = [t.clone().to(device).requires_grad_(True) for t in (x, w, b)]
    refs = [t.clone().double().requires_grad_(True) for t in (x, w, b)]
    g = torch.randn(3, 7)
    ops.decode_linear(*leaves, backend=backend).backward(g.to(device))
    F.linear(*refs).backward(g.double())
    for got, ref in zip(leaves, refs):
        torch.testing.assert_close(got.grad.cpu().double(), ref.grad, **TOL[dtype])


def _expanded(row, column, value, m, n):
    """x (2, m // 2, K) from one row, weight (n, K) from one value per output row, bias (n,) from one value."""
    x, w, b = row.expand(2, m // 2, row.shape[0]), column.expand(n, row.shape[0]), value.expand(n)
    assert x.stride()[0] == 0 and x.stride()[2] == 1 and w.stride() == (1, 0) and b.stride() == (0,)
    return x, w, b


@pytest.mark.parametrize("backend, device, dtype", CASES)
@pytest.mark.parametrize("m", [2, 6, 12])
def test_expanded_inputs_match_f_linear(backend, device, dtype, m):
    """x broadcast from one row, weight from one value per output row and bias from one value (stride 0)."""
    g = torch.Generator().manual_seed(6)
    row, column, value = (torch.randn(*s, generator=g).to(dtype).to(device) for s in ((45,), (21, 1), (1,)))
    x, w, b = _expanded(row, column, value, m, 21)
    _check(ops.decode_linear(x, w, b, backend=backend), x, w, b, dtype)


@pytest.mark.parametrize("backend, device, dtype", FP32_CASES)
def test_gradient_through_expanded_inputs_is_f_linear_s(backend, device, dtype):
    """The gradients of expanded x, weight and bias, summed back into their one row, column and value."""
    g = torch.Generator().manual_seed(7)
    sources = [torch.randn(*s, generator=g) for s in ((45,), (21, 1), (1,))]
    leaves = [t.clone().to(device).requires_grad_(True) for t in sources]
    refs = [t.clone().double().requires_grad_(True) for t in sources]
    grad = torch.randn(2, 3, 21, generator=g)
    ops.decode_linear(*_expanded(*leaves, 6, 21), backend=backend).backward(grad.to(device))
    F.linear(*_expanded(*refs, 6, 21)).backward(grad.double())
    for got, ref in zip(leaves, refs):
        torch.testing.assert_close(got.grad.cpu().double(), ref.grad, **TOL[dtype])


@pytest.mark.parametrize("backend, device, dtype", FP32_CASES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_gradient_of_the_weight_alone(backend, device, dtype, with_bias):
    """Only the weight requires grad: its gradient is F.linear's, and x and bias get none."""
    x, w, b = _inputs(3, 20, 7, dtype, seed=8)
    b = b if with_bias else None
    w1 = w.clone().to(device).requires_grad_(True)
    x1, b1 = x.to(device), None if b is None else b.to(device)
    w2 = w.clone().double().requires_grad_(True)
    g = torch.randn(3, 7, generator=torch.Generator().manual_seed(9))
    out = ops.decode_linear(x1, w1, b1, backend=backend)
    out.backward(g.to(device))
    F.linear(x.double(), w2, None if b is None else b.double()).backward(g.double())
    assert x1.grad is None and (b1 is None or b1.grad is None)
    torch.testing.assert_close(w1.grad.cpu().double(), w2.grad, **TOL[dtype])


@needs_cpu_backend
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_results_do_not_depend_on_the_thread_count(dtype):
    """Output and gradients are bitwise the same with 1, 2 and 3 threads, for 1, 3, 8 and 12 rows
    (N = 2000 at K = 64: several slices of output rows)."""
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for m in (1, 3, 8, 12):
                x, w, b = (t.requires_grad_(True) for t in _inputs(m, 64, 2000, dtype, seed=m))
                out = ops.decode_linear(x, w, b, backend="cpu")
                out.backward(torch.ones_like(out))
                results.setdefault(m, []).append((out.detach(), x.grad, w.grad, b.grad))
    finally:
        torch.set_num_threads(before)
    for m, runs in results.items():
        for other in runs[1:]:
            assert all(torch.equal(a, c) for a, c in zip(runs[0], other)), f"M={m}"


@pytest.mark.parametrize("backend, device", DEVICES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(backend, device, with_bias):
    x, w, b = _inputs(3, 37, 11, torch.float32, device=device)
    args = (x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True) if with_bias else None)
    torch.library.opcheck(kernel_namespace(backend).decode_linear.default, args, **opcheck_kwargs(backend, device))


@pytest.mark.parametrize("m, k, n", [(1, 65, 37), (5, 300, 37), (16, 1023, 13), (33, 129, 70)])
def test_triton_plan_covers_k_once_and_splits_narrow_layers_only(m, k, n):
    dl = pytest.importorskip("gptfast.triton_kernels.decode_linear")
    for dtype in DTYPES:
        p = dl.plan(m, n, k, dtype)
        tiles = -(-k // p["block_k"])
        # the K ranges of the splits are disjoint, all non-empty and cover every tile: each weight
        # element is read once per row group
        assert (p["splits"] - 1) * p["tiles_per_split"] < tiles <= p["splits"] * p["tiles_per_split"]
        assert p["block_m"] >= min(m, dl.MAX_BLOCK_M) and p["block_m"] >= 16
    wide = dl.plan(8, 151936, 1024, torch.bfloat16)  # Qwen3-0.6B's LM head: columns enough, no split
    narrow = dl.plan(8, 1024, 1024, torch.bfloat16)  # its k_proj: split
    assert wide["splits"] == 1 and narrow["splits"] > 1


@needs_triton
@needs_interpreter
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_triton_split_and_unsplit_k_agree(monkeypatch, with_bias):
    import gptfast.triton_kernels.decode_linear as dl
    x, w, b = _inputs(5, 300, 37, torch.float32, seed=5)
    b = b if with_bias else None
    assert dl.plan(5, 37, 300, torch.float32)["splits"] > 1
    split = ops.decode_linear(x, w, b, backend="triton")
    monkeypatch.setattr(dl, "TARGET_PROGRAMS", 1)
    assert dl.plan(5, 37, 300, torch.float32)["splits"] == 1
    whole = ops.decode_linear(x, w, b, backend="triton")
    _check(split, x, w, b, torch.float32)
    _check(whole, x, w, b, torch.float32)


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
def test_routed_linears_send_few_row_calls_to_the_fused_op(monkeypatch, backend):
    from gptfast.generation.runner import DECODE_LINEAR_MAX_ROWS, RoutedLinears
    _widen_16_bit_here(monkeypatch)
    calls = _count_routed(monkeypatch)
    one = torch.randn(1, 24).to(torch.bfloat16)
    layer = torch.nn.Linear(24, 10).to(torch.bfloat16)
    layer32, layer64 = torch.nn.Linear(24, 10), torch.nn.Linear(24, 10).double()
    few = torch.randn(2, 1, 24).to(torch.bfloat16)
    many = torch.randn(DECODE_LINEAR_MAX_ROWS + 1, 24).to(torch.bfloat16)
    with ops.use_backend(backend), torch.no_grad():
        with RoutedLinears([layer, layer32, layer64]):
            out_few, out_many = layer(few), layer(many)
            single16 = layer(one)  # a single row: the fused kernel too, 16-bit ...
            single32 = layer32(one.float())  # ... and float32
            layer64(few.double())  # float64: no fused kernel, the model's own F.linear
            untouched = torch.nn.Linear(24, 10).to(torch.bfloat16)(few)  # not handed over: never routed
        after = layer(few)  # the context is left: plain F.linear again
    assert calls == [(2, 1, 24), (1, 24), (1, 24)]
    assert "forward" not in layer.__dict__ and torch.equal(after, F.linear(few, layer.weight, layer.bias))
    assert single32.shape == (1, 10) and untouched.shape == (2, 1, 10)
    _check(single16, one, layer.weight, layer.bias, torch.bfloat16)
    _check(out_few, few, layer.weight.to(torch.bfloat16), layer.bias.to(torch.bfloat16), torch.bfloat16)
    assert out_many.shape == (DECODE_LINEAR_MAX_ROWS + 1, 10)


@needs_cpu_backend
def test_routed_linears_resolve_each_kind_of_call_once_per_step(monkeypatch):
    from gptfast.generation import runner
    calls = _count_routed(monkeypatch)
    resolved = []
    real_entry_point = runner.ops.fused_entry_point

    def counting_entry_point(op, device, args=(), kwargs=None):
        resolved.append(tuple(args[0].shape))
        return real_entry_point(op, device, args, kwargs)

    monkeypatch.setattr(runner.ops, "fused_entry_point", counting_entry_point)
    first, second = torch.nn.Linear(24, 10), torch.nn.Linear(24, 10)
    x, wide = torch.randn(2, 24), torch.randn(3, 24)
    with torch.no_grad():
        with runner.RoutedLinears([first, second]):
            outs = [first(x), second(x), first(x), first(wide)]
        with runner.RoutedLinears([first]):  # a new step resolves again
            first(x)
    assert resolved == [(2, 24), (3, 24), (2, 24)]
    assert calls == [(2, 24), (2, 24), (2, 24), (3, 24), (2, 24)]
    for out, layer, inp in zip(outs, (first, second, first, first), (x, x, x, wide)):
        torch.testing.assert_close(out, F.linear(inp, layer.weight, layer.bias))


def test_routed_linears_are_restored_after_an_error():
    from gptfast.generation.runner import RoutedLinears
    layer = torch.nn.Linear(4, 3)
    with pytest.raises(RuntimeError, match="boom"), RoutedLinears([layer]):
        assert "forward" in layer.__dict__
        raise RuntimeError("boom")
    assert "forward" not in layer.__dict__


def test_decode_steps_route_only_batches_the_kernel_serves():
    from gptfast.generation.runner import DECODE_LINEAR_MAX_ROWS, RoutedLinears, decode_linears, plain_linears
    cpu = [torch.zeros(rows, 1, dtype=torch.long) for rows in (1, 2, DECODE_LINEAR_MAX_ROWS + 1)]
    assert isinstance(decode_linears(cpu[0], []), RoutedLinears)
    assert isinstance(decode_linears(cpu[1], []), RoutedLinears)
    assert not isinstance(decode_linears(cpu[2], []), RoutedLinears)
    assert not isinstance(decode_linears(cpu[0].to("meta"), []), RoutedLinears)  # CPU only

    class OwnLinear(torch.nn.Linear):  # computes otherwise: left alone
        def forward(self, x):
            return super().forward(x) * 2

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), OwnLinear(3, 3), torch.nn.ReLU())
    assert plain_linears(model) == [model[0]]


@needs_cpu_backend
def test_routed_linears_keep_f_linear_with_the_torch_backend(monkeypatch):
    from gptfast.generation.runner import RoutedLinears
    calls = _count_routed(monkeypatch)
    layer = torch.nn.Linear(24, 10)
    x = torch.randn(3, 24)
    with ops.use_backend("torch"), torch.no_grad(), RoutedLinears([layer]):
        out = layer(x)
    assert calls == [] and torch.equal(out, F.linear(x, layer.weight, layer.bias))


def _tiny_gpt(context_length):
    """A seeded one-layer GPT (vocabulary 50, width 16) in eval mode."""
    from gptfast.models.gpt import GPTModel
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, context_length=context_length, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0,
               qkv_bias=True)
    return GPTModel(cfg).eval()


@needs_cpu_backend
def test_cached_decode_steps_use_the_fused_op(monkeypatch):
    from gptfast.generation import generate
    calls = _count_routed(monkeypatch)
    model = _tiny_gpt(16)
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with ops.use_backend("auto"):
        cached = generate(model, idx, max_new_tokens=4, context_size=16)
    assert len(calls) >= 3 * 5  # the decode steps' q/k/v, out, ff and head projections
    with ops.use_backend("torch"):
        assert torch.equal(cached, generate(model, idx, max_new_tokens=4, context_size=16))


@needs_cpu_backend
def test_short_prompts_use_the_fused_op_and_long_ones_f_linear(monkeypatch):
    from gptfast.generation.runner import DECODE_LINEAR_MAX_ROWS, CachedRunner
    calls = _count_routed(monkeypatch)
    runner = CachedRunner(_tiny_gpt(32))
    short = torch.randint(0, 50, (2, DECODE_LINEAR_MAX_ROWS // 2))
    long = torch.randint(0, 50, (2, DECODE_LINEAR_MAX_ROWS // 2 + 1))
    with ops.use_backend("auto"):
        fused = runner.prefill(short)
        assert (*short.shape, 16) in calls and (2, 1, 16) in calls  # the prompt's rows, the last positions
        calls.clear()
        runner.prefill(long)
        assert calls == []
    with ops.use_backend("torch"):
        torch.testing.assert_close(fused, runner.prefill(short), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- 16-bit rows in float32


def _widened_reference(x, w, b):
    """What ``linear_in_float32`` promises: float32 products of the 16-bit values, rounded once."""
    return F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("m,k,n", [(17, 65, 37), (40, 129, 300), (1, 7, 5), (0, 9, 4)])
def test_linear_in_float32_is_float32_math_rounded_once(monkeypatch, dtype, with_bias, m, k, n):
    # Blocks of 3 output rows: several blocks and a short last one.
    monkeypatch.setattr(linear_module, "FLOAT32_WEIGHT_BLOCK_BYTES", 3 * 4 * k)
    x, w, b = _inputs(m, k, n, dtype, seed=m + n)
    b = b if with_bias else None
    out = linear_module.linear_in_float32(x, w, b)
    assert out.dtype == dtype and out.shape == (m, n)
    # The float32 sums of a block may add in another order than the whole matrix's (BLAS picks its
    # kernel by shape): at most a rounding step of the output apart.
    torch.testing.assert_close(out, _widened_reference(x, w, b), rtol=2 * torch.finfo(dtype).eps, atol=0)
    _check(out, x, w, b, dtype)
    # torch's own 16-bit product accumulates in float32 too: equal up to the output's rounding.
    torch.testing.assert_close(out, F.linear(x, w, b), **TOL[dtype])


def test_linear_in_float32_takes_views_and_leading_axes_and_keeps_nan():
    x, w, b = _inputs(24, 33, 20, torch.bfloat16)
    x3 = x.view(2, 12, 33).transpose(0, 1)  # (12, 2, 33), not contiguous
    wt = w.t().contiguous().t()  # the weight as a transposed view
    x3 = x3.clone()
    x3[3, 1, 5] = float("nan")
    out = linear_module.linear_in_float32(x3, wt, b[::1])
    assert out.shape == (12, 2, 20)
    torch.testing.assert_close(out, _widened_reference(x3, w, b), rtol=0, atol=0, equal_nan=True)
    assert out[3, 1].isnan().all() and not out[3, 0].isnan().any()


def test_linear_in_float32_gradient_is_f_linear_s():
    x, w, b = (t.requires_grad_() for t in _inputs(20, 17, 11, torch.bfloat16))
    grad = torch.randn(20, 11).to(torch.bfloat16)
    linear_module.linear_in_float32(x, w, b).backward(grad)
    got = [t.grad for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    F.linear(x.float(), w.float(), b.float()).backward(grad.float())
    for mine, want in zip(got, (x.grad, w.grad, b.grad)):
        assert mine.dtype == torch.bfloat16
        torch.testing.assert_close(mine.float(), want.float(), **TOL[torch.bfloat16])


def _widen_16_bit_here(monkeypatch):
    """Route as on a CPU without 16-bit matrix instructions, whatever this one has."""
    from gptfast.generation import runner
    monkeypatch.setattr(runner, "widens_16_bit", lambda dtype: dtype in (torch.bfloat16, torch.float16))


@needs_cpu_backend
@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_16_bit_calls_route_one_row_only_where_the_cpu_has_16_bit_instructions(monkeypatch, backend):
    from gptfast.generation import runner
    from gptfast.generation.runner import RoutedLinears
    monkeypatch.setattr(runner, "widens_16_bit", lambda dtype: False)  # AMX / AVX512-BF16 here
    monkeypatch.setattr(runner, "kernel_bf16_native_rows", lambda: 0)  # the AVX2 build: no bf16 rows natively
    calls = _count_routed(monkeypatch)
    layer16, layer32 = torch.nn.Linear(24, 10).to(torch.bfloat16), torch.nn.Linear(24, 10)
    one, few = torch.randn(1, 24), torch.randn(3, 24)
    with ops.use_backend(backend), torch.no_grad(), RoutedLinears([layer16, layer32]):
        out_one, out_few = layer16(one.to(torch.bfloat16)), layer16(few.to(torch.bfloat16))
        out32 = layer32(few)
    assert calls == [(1, 24), (3, 24)]  # the bf16 row, then float32's few rows; bf16's few rows: F.linear
    assert torch.equal(out_few, F.linear(few.to(torch.bfloat16), layer16.weight, layer16.bias))
    _check(out_one, one.to(torch.bfloat16), layer16.weight, layer16.bias, torch.bfloat16)
    _check(out32, few, layer32.weight, layer32.bias, torch.float32)
    assert runner.has_16_bit_matmul(torch.bfloat16) and not runner.has_16_bit_matmul(torch.float32)
    monkeypatch.setattr(runner, "widens_16_bit", lambda dtype: dtype in (torch.bfloat16, torch.float16))
    assert not runner.has_16_bit_matmul(torch.bfloat16)


@needs_cpu_backend
def test_bf16_rows_the_kernel_multiplies_natively_route_to_it(monkeypatch):
    from gptfast.generation import runner
    from gptfast.generation.runner import RoutedLinears
    monkeypatch.setattr(runner, "widens_16_bit", lambda dtype: False)
    monkeypatch.setattr(runner, "kernel_bf16_native_rows", lambda: 4)
    calls = _count_routed(monkeypatch)
    bf16, fp16 = torch.nn.Linear(24, 10).to(torch.bfloat16), torch.nn.Linear(24, 10).to(torch.float16)
    rows = {n: torch.randn(n, 24) for n in (1, 2, 4, 5)}
    with torch.no_grad(), RoutedLinears([bf16, fp16]):
        outs = {n: bf16(x.to(torch.bfloat16)) for n, x in rows.items()}
        half = fp16(rows[4].to(torch.float16))
    monkeypatch.setattr(runner, "kernel_bf16_native_rows", lambda: 16)  # a CPU with AMX
    with torch.no_grad(), RoutedLinears([bf16]):  # a new step: its kinds of call resolve again
        five = bf16(rows[5].to(torch.bfloat16))
    assert calls == [(1, 24), (2, 24), (4, 24), (5, 24)]  # fp16 rows stay on torch's 16-bit product
    for n in (1, 2, 4):
        _check(outs[n], rows[n].to(torch.bfloat16), bf16.weight, bf16.bias, torch.bfloat16)
    _check(five, rows[5].to(torch.bfloat16), bf16.weight, bf16.bias, torch.bfloat16)
    assert torch.equal(outs[5], F.linear(rows[5].to(torch.bfloat16), bf16.weight, bf16.bias))
    assert torch.equal(half, F.linear(rows[4].to(torch.float16), fp16.weight, fp16.bias))


@needs_cpu_backend
def test_the_native_bf16_rows_follow_the_build_and_the_cpu():
    import os
    import sys

    from gptfast.generation import runner
    from gptfast.ops import cpu_ops
    avx512_build = cpu_ops.LOADED == "gptfast._C_cpu_avx512"
    tiles = (avx512_build and sys.platform == "linux" and torch.cpu._is_amx_tile_supported()
             and os.environ.get("GPTFAST_CPU_AMX") != "0")  # scripts/test.sh runs these tests once with it off
    dots = avx512_build and torch.cpu._is_avx512_bf16_supported()
    rows = 16 if tiles else 4 if dots else 0
    assert cpu_ops.bf16_native_rows() == rows
    assert runner.kernel_bf16_native_rows() == rows
    if rows and not runner.widens_16_bit(torch.bfloat16):
        assert not runner.torch_16_bit_is_faster(torch.bfloat16, rows)
        assert runner.torch_16_bit_is_faster(torch.bfloat16, rows + 1)


@needs_cpu_backend
@pytest.mark.parametrize("backend", ["auto", "cpu", "torch"])
def test_routed_linears_send_many_16_bit_rows_to_float32(monkeypatch, backend):
    from gptfast.generation import runner
    from gptfast.generation.runner import DECODE_LINEAR_MAX_ROWS, RoutedLinears, decode_linears
    _widen_16_bit_here(monkeypatch)
    widened = []
    real = runner.linear_in_float32
    monkeypatch.setattr(runner, "linear_in_float32",
                        lambda x, *args, **kwargs: widened.append(x.shape) or real(x, *args, **kwargs))
    calls = _count_routed(monkeypatch)
    layer16, layer32 = torch.nn.Linear(24, 10).to(torch.bfloat16), torch.nn.Linear(24, 10)
    many = torch.randn(2, DECODE_LINEAR_MAX_ROWS, 24)
    with ops.use_backend(backend), torch.no_grad(), RoutedLinears([layer16, layer32]):
        out16, out32 = layer16(many.to(torch.bfloat16)), layer32(many)
    assert calls == []  # too many rows for the decode kernel
    assert widened == ([] if backend == "torch" else [many.shape])
    assert torch.equal(out32, F.linear(many, layer32.weight, layer32.bias))
    want = (F.linear(many.to(torch.bfloat16), layer16.weight, layer16.bias) if backend == "torch" else
            _widened_reference(many.to(torch.bfloat16), layer16.weight, layer16.bias))
    assert torch.equal(out16, want)
    tokens = torch.zeros(2, DECODE_LINEAR_MAX_ROWS, dtype=torch.long)  # a prompt's pass
    assert isinstance(decode_linears(tokens, [layer32, layer16]), RoutedLinears)
    assert not isinstance(decode_linears(tokens, [layer32]), RoutedLinears)


@needs_cpu_backend
def test_a_long_16_bit_prompt_prefills_in_float32(monkeypatch):
    from gptfast.generation.runner import DECODE_LINEAR_MAX_ROWS, CachedRunner
    _widen_16_bit_here(monkeypatch)
    model = _tiny_gpt(64).to(torch.bfloat16)
    runner = CachedRunner(model)
    long = torch.randint(0, 50, (2, DECODE_LINEAR_MAX_ROWS + 5))
    with ops.use_backend("auto"):
        fused = runner.prefill(long)
    with ops.use_backend("torch"):
        plain = runner.prefill(long)
        assert torch.equal(plain, model(long)[:, -1])  # the oracle is the model's own forward
    torch.testing.assert_close(fused.float(), plain.float(), **TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype,native", [(torch.bfloat16, "_is_avx512_bf16_supported"),
                                          (torch.bfloat16, "_is_amx_tile_supported"),
                                          (torch.float16, "_is_amx_fp16_supported")])
def test_16_bit_rows_widen_only_on_cpus_without_16_bit_instructions(monkeypatch, dtype, native):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_amx_fp16_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    linear_module.widens_16_bit.cache_clear()
    try:
        assert linear_module.widens_16_bit(dtype)
        assert not linear_module.widens_16_bit(torch.float32) and not linear_module.widens_16_bit(torch.float64)
        monkeypatch.setattr(torch.cpu, native, lambda: True)
        linear_module.widens_16_bit.cache_clear()
        assert not linear_module.widens_16_bit(dtype)  # torch's own 16-bit matmul is the fast one there
        monkeypatch.delattr(torch.cpu, native)  # a torch without the probe: counts as lacking the instructions
        linear_module.widens_16_bit.cache_clear()
        assert linear_module.widens_16_bit(dtype)
    finally:
        monkeypatch.undo()
        linear_module.widens_16_bit.cache_clear()


@needs_cpu_backend
def test_many_16_bit_rows_keep_f_linear_where_the_cpu_has_16_bit_instructions(monkeypatch):
    from gptfast.generation import runner
    from gptfast.generation.runner import DECODE_LINEAR_MAX_ROWS, RoutedLinears, decode_linears
    monkeypatch.setattr(runner, "widens_16_bit", lambda dtype: False)
    layer = torch.nn.Linear(24, 10).to(torch.bfloat16)
    many = torch.randn(DECODE_LINEAR_MAX_ROWS + 3, 24).to(torch.bfloat16)
    with torch.no_grad(), RoutedLinears([layer]):
        out = layer(many)
    assert torch.equal(out, F.linear(many, layer.weight, layer.bias))
    assert not isinstance(decode_linears(torch.zeros(1, DECODE_LINEAR_MAX_ROWS + 3, dtype=torch.long), [layer]),
                          RoutedLinears)


def test_linear_in_float32_of_an_empty_inner_dimension_is_the_bias():
    x, w, b = torch.zeros(3, 0, dtype=torch.bfloat16), torch.zeros(4, 0, dtype=torch.bfloat16), torch.arange(4.)
    out = linear_module.linear_in_float32(x, w, b.to(torch.bfloat16))
    assert torch.equal(out, b.to(torch.bfloat16).expand(3, 4))


BF16_CASES = [case for case in CASES if case.values[2] == torch.bfloat16]


@pytest.mark.parametrize("backend,device,dtype", BF16_CASES)
@pytest.mark.parametrize("given", [torch.float32, torch.float16], ids=str)
def test_under_autocast_inputs_are_multiplied_in_its_dtype_as_torchs(backend, device, dtype, given):
    """As ``F.linear`` under autocast: float32 (or float16) inputs cast to its dtype, the product in it."""
    g = torch.Generator().manual_seed(4)
    x, weight, bias = torch.randn(3, 40, generator=g), torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    x, weight, bias = x.to(device, given), weight.to(device, given), bias.to(device, given)
    with torch.autocast(torch.device(device).type, dtype=dtype):
        expected = F.linear(x, weight, bias)
        got = ops.decode_linear(x, weight, bias, backend=backend)
    assert got.dtype == expected.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), **TOL[dtype])
