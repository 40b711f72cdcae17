"""No silent wrong result from any kernel: non-finite logits, strided inputs, result classes.

Every available kernel backend (cpu; triton under the interpreter in fp32; cuda where a
device exists) is held to the torch path through the public ``gptfast.ops`` API:

* sampling never returns an id outside ``[0, V)``.  A sampled row (temperature > 0) whose
  logits hold a NaN or +inf, or are all -inf, has no distribution: the torch and cpu
  backends raise ``RuntimeError`` (torch.multinomial's "probability tensor contains
  either inf, nan or element < 0"); the GPU backends cannot raise without a host sync
  and return the row's ``torch.argmax`` instead.  Greedy rows equal ``torch.argmax``
  (NaN counts as the largest value) on every backend;
* targets, logits and hidden states given as strided views (``Y[:, -1]``, expanded,
  transposed) give the torch path's loss and gradients;
* cross-entropy of rows with NaN / +inf / -inf logits has the torch path's result class
  (NaN, inf or finite, element by element) in the loss and in the gradients, ignored
  rows included.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from gptfast import ops

from parity import kernel_namespace, needs_cpu_backend

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
AVAILABLE = ops.available_backends()


def _device_for(backend: str) -> str:
    return "cuda" if backend == "cuda" or (backend == "triton" and not INTERPRETER) else "cpu"


def _leaf(t: torch.Tensor, backend: str) -> torch.Tensor:
    """A fresh leaf copy of ``t`` (same strides where dense) on the backend's device."""
    return t.detach().to(_device_for(backend), copy=True).requires_grad_(True)


KERNEL_BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(b not in AVAILABLE, reason=f"backend {b} unavailable"))
                   for b in ("cpu", "triton", "cuda")]
GPU_BACKENDS = [p for p in KERNEL_BACKENDS if p.values[0] in ("triton", "cuda")]
NAN, INF = math.nan, math.inf
V = 37  # odd, not a tile size

# ----------------------------------------------------------------------------- sampling


def _bad_rows() -> dict[str, torch.Tensor]:
    """Rows (V values) with no softmax: NaN somewhere / everywhere, +inf, all -inf, NaN among -inf."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(V, generator=g)
    rows = {}
    r = base.clone(); r[5] = NAN; rows["one-nan"] = r
    r = base.clone(); r[[3, 30]] = NAN; r[7] = 100.0; rows["nan-and-large"] = r
    rows["all-nan"] = torch.full((V,), NAN)
    r = base.clone(); r[11] = INF; rows["plus-inf"] = r
    r = base.clone(); r[[2, 20]] = INF; r[9] = NAN; rows["inf-and-nan"] = r
    rows["all-minus-inf"] = torch.full((V,), -INF)
    r = torch.full((V,), -INF); r[33] = NAN; rows["nan-among-minus-inf"] = r
    r = base.clone(); r[-1] = NAN; rows["nan-last"] = r  # in a vector tail on the CPU
    return rows


BAD_ROWS = _bad_rows()
TOP_KS = [None, 1, 2, 5, V]


def _sample(backend, logits, **kwargs):
    return ops.sample_next_token(logits.to(_device_for(backend)), backend=backend, **kwargs).cpu()


@pytest.mark.parametrize("name", list(BAD_ROWS))
@pytest.mark.parametrize("top_k", TOP_KS)
def test_torch_path_raises_on_rows_without_a_distribution(name, top_k):
    """The oracle's behaviour the cpu backend matches (checked, so a torch change shows up here)."""
    logits = torch.stack([torch.randn(V), BAD_ROWS[name]])
    with pytest.raises(RuntimeError, match="probability tensor contains either"):
        ops.sample_next_token(logits, temperature=0.8, top_k=top_k, backend="torch")


@pytest.mark.skipif("cpu" not in AVAILABLE, reason="cpu backend unavailable")
@pytest.mark.parametrize("name", list(BAD_ROWS))
@pytest.mark.parametrize("top_k", TOP_KS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_raises_like_torch_on_rows_without_a_distribution(name, top_k, dtype):
    logits = torch.stack([torch.randn(V), BAD_ROWS[name]]).to(dtype)
    with pytest.raises(RuntimeError, match=r"probability tensor contains either inf, nan.*row 1"):
        ops.sample_next_token(logits, temperature=0.8, top_k=top_k, backend="cpu")


@pytest.mark.skipif("cpu" not in AVAILABLE, reason="cpu backend unavailable")
def test_cpu_raises_for_a_bad_sampled_row_given_per_row_temperatures():
    logits = torch.stack([BAD_ROWS["one-nan"], torch.randn(V), BAD_ROWS["all-minus-inf"]])
    temps = torch.tensor([0.0, 1.0, 0.7])  # row 0 is greedy: fine; row 2 is drawn: no distribution
    with pytest.raises(RuntimeError, match=r"probability tensor contains either inf, nan.*row 2"):
        ops.sample_next_token(logits, temperature=temps, top_k=torch.tensor([3, 3, 3]), backend="cpu")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("top_k", TOP_KS)
@pytest.mark.parametrize("temperature", [0.8, 1e-3])
def test_gpu_kernels_return_the_argmax_of_rows_without_a_distribution(backend, top_k, temperature):
    """No host sync on the GPU, so no exception: a defined, in-range fallback (torch.argmax)."""
    good = torch.randn(3, V, generator=torch.Generator().manual_seed(1))
    logits = torch.cat([good[:1], torch.stack(list(BAD_ROWS.values())), good[1:]])
    out = _sample(backend, logits, temperature=temperature, top_k=top_k).squeeze(1)
    assert ((out >= 0) & (out < V)).all(), out
    torch.testing.assert_close(out[1:-2], torch.argmax(logits[1:-2], dim=-1))
    if top_k == 1:  # the draw itself is exact there
        torch.testing.assert_close(out[[0, -2, -1]], torch.argmax(good, dim=-1))
    else:
        kept = torch.topk(good, top_k or V).values[:, -1:]
        assert (good.gather(1, out[[0, -2, -1]].unsqueeze(1)) >= kept).all()


def _greedy_cases():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(len(BAD_ROWS) + 2, V, generator=g)
    logits[1:-1] = torch.stack(list(BAD_ROWS.values()))
    logits[-1, [4, 9]] = logits[-1].max() + 1  # a tie: the first index wins
    return logits


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("top_k", [None, 1, 3])
def test_greedy_with_nan_and_inf_picks_what_torch_picks(backend, top_k):
    logits = _greedy_cases()
    expected = ops.sample_next_token(logits, temperature=0.0, top_k=top_k, backend="torch")
    torch.testing.assert_close(expected.squeeze(1), torch.argmax(logits, dim=-1))  # NaN is the largest
    torch.testing.assert_close(_sample(backend, logits, temperature=0.0, top_k=top_k), expected)


@pytest.mark.parametrize("backend", ["torch"] + KERNEL_BACKENDS)
def test_greedy_rows_with_nan_among_per_row_arguments(backend):
    """Per-row temperature 0 is greedy for that row (no draw, no error), whatever the other rows do."""
    logits = _greedy_cases()
    b = logits.shape[0]
    good = torch.randn(2, V, generator=torch.Generator().manual_seed(3))
    logits = torch.cat([logits, good])
    temps = torch.cat([torch.zeros(b), torch.ones(2)])
    top_k = torch.cat([torch.tensor([1, 3, V]).repeat(b)[:b], torch.tensor([1, 1])])
    device = _device_for(backend)
    out = ops.sample_next_token(logits.to(device), temperature=temps.to(device), top_k=top_k.to(device),
                                backend=backend).cpu().squeeze(1)
    torch.testing.assert_close(out, torch.argmax(logits, dim=-1))  # top_k=1 rows are greedy as well


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_tiny_temperatures_stay_in_range(backend):
    """1 / T overflowing (or x / T overflowing on the torch path) never yields a wild id."""
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(4)) * 50
    for t in (1e-30, 1e-38, 1e-45):  # the last two: 1 / T overflows float32, so the row is greedy
        out = _sample(backend, logits, temperature=t)
        torch.testing.assert_close(out.squeeze(1), torch.argmax(logits, dim=-1))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_minus_inf_logits_are_never_drawn(backend):
    logits = torch.full((64, V), -INF)
    logits[:, [3, 17, 36]] = torch.randn(64, 3)
    for top_k in (None, 2, 3, 10, V):
        out = _sample(backend, logits, temperature=1.0, top_k=top_k).squeeze(1)
        allowed = torch.tensor([3, 17, 36])
        assert torch.isin(out, allowed).all(), out


# ----------------------------------------------------------------------------- strided inputs


def _ce_grads(backend, logits, targets, reduction, **kw):
    leaf = _leaf(logits, backend)
    view = kw.pop("view", lambda t: t)
    loss = ops.cross_entropy(view(leaf), targets.to(_device_for(backend)), reduction=reduction, backend=backend,
                             **kw)
    (loss.sum() if reduction == "none" else loss).backward()
    return loss.detach().cpu(), leaf.grad.cpu()


def _assert_same_class(actual, expected, what):
    """Same NaN and inf positions; finite values close."""
    actual, expected = actual.double(), expected.double()
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN positions differ\n{actual}\n{expected}"
    assert torch.equal(actual.isinf() & (actual > 0), expected.isinf() & (expected > 0)), f"{what}: +inf differs"
    assert torch.equal(actual.isinf() & (actual < 0), expected.isinf() & (expected < 0)), f"{what}: -inf differs"
    finite = expected.isfinite()
    torch.testing.assert_close(actual[finite], expected[finite], atol=2e-5, rtol=2e-4, msg=lambda m: f"{what}: {m}")


STRIDED_TARGET_CASES = {
    # name: (logits (B, T, V) -> view, targets (B, T) -> view)
    "last-position": (lambda L: L[:, -1, :], lambda Y: Y[:, -1]),
    "every-other-position": (lambda L: L[:, ::2, :], lambda Y: Y[:, ::2]),
    "transposed-batch-time": (lambda L: L.transpose(0, 1), lambda Y: Y.transpose(0, 1)),
    "expanded-targets": (lambda L: L[:, 0, :], lambda Y: Y[:1, 0].expand(Y.shape[0])),
    "column-strided-logits": (lambda L: L[:, -1, ::2], lambda Y: Y[:, -1]),
}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", list(STRIDED_TARGET_CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_strided_views_match_torch(backend, case, reduction):
    logits_view, targets_view = STRIDED_TARGET_CASES[case]
    g = torch.Generator().manual_seed(5)
    L = torch.randn(4, 6, V, generator=g)
    Y = torch.randint(0, (V + 1) // 2, (4, 6), generator=g)  # valid for the column-strided view too
    Y[1, -1] = -100  # an ignored target inside the view
    targets = targets_view(Y)
    assert not targets.is_contiguous()
    expected = _ce_grads("torch", L, targets, reduction, view=logits_view)
    actual = _ce_grads(backend, L, targets, reduction, view=logits_view)
    _assert_same_class(actual[0], expected[0], f"{case} loss")
    _assert_same_class(actual[1], expected[1], f"{case} grad")


@pytest.mark.parametrize("backend", [p for p in KERNEL_BACKENDS if p.values[0] != "cuda"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_strided_views_match_torch(backend, reduction, bias):
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(3, 5, 16, generator=g)
    weight = torch.randn(16, V, generator=g)  # used transposed: a (V, H) view with strides (1, V)
    b = torch.randn(2 * V, generator=g) if bias else None  # used as the strided view b[::2]
    Y = torch.randint(0, V, (3, 5), generator=g)
    Y[0, -1] = -100
    results = {}
    for name in ("torch", backend):
        device = _device_for(name)
        h, w = _leaf(hidden, name), _leaf(weight, name)
        bb = _leaf(b, name) if b is not None else None
        loss = ops.linear_cross_entropy(h[:, -1, :], w.t(), Y.to(device)[:, -1],
                                        bias=bb[::2] if bb is not None else None, reduction=reduction, backend=name)
        (loss.sum() if reduction == "none" else loss).backward()
        results[name] = [loss.detach().cpu(), h.grad.cpu(), w.grad.cpu()] + ([bb.grad.cpu()] if bias else [])
    for what, actual, expected in zip(("loss", "d hidden", "d weight", "d bias"), results[backend], results["torch"]):
        _assert_same_class(actual, expected, what)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_sampling_strided_and_expanded_per_row_arguments(backend):
    device = _device_for(backend)
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(5, 2 * V, generator=g)[:, ::2]  # column stride 2
    temps = torch.zeros(10)[::2]  # strided per-row temperatures: all greedy
    top_k = torch.tensor(3).expand(5)  # expanded (stride 0)
    out = ops.sample_next_token(logits.to(device), temperature=temps.to(device), top_k=top_k.to(device),
                                backend=backend).cpu()
    torch.testing.assert_close(out.squeeze(1), torch.argmax(logits, dim=-1))
    out = ops.sample_next_token(logits.t().contiguous().t().to(device), temperature=0.0, backend=backend).cpu()
    torch.testing.assert_close(out.squeeze(1), torch.argmax(logits, dim=-1))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_attention_strided_and_expanded_inputs_match_torch(backend):
    g = torch.Generator().manual_seed(8)
    b, h, t, d = 2, 3, 19, 16
    qkv = torch.randn(b, t, 3, h, d, generator=g)
    kv_one_head = torch.randn(b, 1, t, d, generator=g)
    results = {}
    for name in ("torch", backend):
        base, shared = _leaf(qkv, name), _leaf(kv_one_head, name)
        q = base[:, :, 0].transpose(1, 2)  # (B, H, T, D) view of a (B, T, 3, H, D) tensor
        k = base[:, :, 1].transpose(1, 2)
        v = shared.expand(b, h, t, d)  # one value head shared by all heads: stride 0
        out = ops.causal_attention(q, k, v, backend=name)
        out.square().sum().backward()
        results[name] = (out.detach().cpu(), base.grad.cpu(), shared.grad.cpu())
    for what, actual, expected in zip(("out", "d qkv", "d shared v"), results[backend], results["torch"]):
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------- result classes

CE_CLASS_ROWS = {
    "finite": [0.5, -1.0, 2.0, 0.0],
    "plus-inf-other": [0.5, INF, 2.0, 0.0],
    "plus-inf-target": [INF, -1.0, 2.0, 0.0],
    "two-plus-inf": [INF, INF, 2.0, 0.0],
    "minus-inf-other": [0.5, -INF, 2.0, 0.0],
    "minus-inf-target": [-INF, -1.0, 2.0, 0.0],
    "all-minus-inf": [-INF, -INF, -INF, -INF],
    "nan-other": [0.5, NAN, 2.0, 0.0],
    "nan-target": [NAN, -1.0, 2.0, 0.0],
    "all-nan": [NAN, NAN, NAN, NAN],
}


def _class_logits(width):
    """Every class row padded to ``width`` columns (-inf padding keeps each row's class), target 0."""
    rows = torch.tensor(list(CE_CLASS_ROWS.values()))
    pad = torch.full((rows.shape[0], width - rows.shape[1]), -INF)
    return torch.cat([rows, pad], dim=1)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("ignored", ["none", "every-other", "bad-rows"])
@pytest.mark.parametrize("width", [4, 37, 300])
def test_cross_entropy_non_finite_result_class_matches_torch(backend, reduction, ignored, width):
    logits = _class_logits(width)
    n = logits.shape[0]
    targets = torch.zeros(n, dtype=torch.long)
    names = list(CE_CLASS_ROWS)
    if ignored == "every-other":
        targets[::2] = -100
    elif ignored == "bad-rows":  # ignore exactly the rows without a softmax: loss finite, grads NaN there
        targets[[i for i, k in enumerate(names) if "plus-inf" in k or "nan" in k or k == "all-minus-inf"]] = -100
    expected = _ce_grads("torch", logits, targets, reduction)
    actual = _ce_grads(backend, logits, targets, reduction)
    _assert_same_class(actual[0], expected[0], "loss")
    _assert_same_class(actual[1], expected[1], "grad")
    if reduction == "none":  # per row as well: the class of each row, not only of the sum
        for i, name in enumerate(names):
            _assert_same_class(actual[0][i], expected[0][i], f"loss of row {name}")


@pytest.mark.parametrize("backend", [p for p in KERNEL_BACKENDS if p.values[0] != "cuda"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_linear_cross_entropy_non_finite_result_class_matches_torch(backend, reduction):
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(6, 8, generator=g)
    hidden[1, 2] = NAN  # a NaN row, kept
    hidden[3, 0] = NAN  # a NaN row, ignored: loss finite, gradients NaN as on the torch path
    weight = torch.randn(V, 8, generator=g)
    targets = torch.randint(0, V, (6,), generator=g)
    targets[3] = -100
    results = {}
    for name in ("torch", backend):
        h, w = _leaf(hidden, name), _leaf(weight, name)
        loss = ops.linear_cross_entropy(h, w, targets.to(_device_for(name)), reduction=reduction, backend=name)
        (loss.sum() if reduction == "none" else loss).backward()
        results[name] = (loss.detach().cpu(), h.grad.cpu(), w.grad.cpu())
    for what, actual, expected in zip(("loss", "d hidden", "d weight"), results[backend], results["torch"]):
        _assert_same_class(actual, expected, what)


@pytest.mark.parametrize("backend", [p for p in KERNEL_BACKENDS if p.values[0] == "cpu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_cross_entropy_non_finite_result_class_other_dtypes(backend, dtype):
    logits = _class_logits(37).to(dtype)
    targets = torch.zeros(logits.shape[0], dtype=torch.long)
    targets[1::3] = -100
    for reduction in ("none", "mean"):
        expected = _ce_grads("torch", logits, targets, reduction)
        actual = _ce_grads(backend, logits, targets, reduction)
        assert torch.equal(actual[0].isnan(), expected[0].isnan()) and torch.equal(actual[0].isinf(),
                                                                                   expected[0].isinf())
        assert torch.equal(actual[1].isnan(), expected[1].isnan()) and torch.equal(actual[1].isinf(),
                                                                                   expected[1].isinf())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_all_targets_ignored_mean_is_nan_with_zero_gradients_like_torch(backend):
    g = torch.Generator().manual_seed(10)
    logits, hidden, weight = torch.randn(4, V, generator=g), torch.randn(4, 8, generator=g), torch.randn(V, 8,
                                                                                                        generator=g)
    targets = torch.full((4,), -100)
    expected = _ce_grads("torch", logits, targets, "mean")
    actual = _ce_grads(backend, logits, targets, "mean")
    _assert_same_class(actual[0], expected[0], "loss")
    _assert_same_class(actual[1], expected[1], "grad")
    assert torch.isnan(actual[0]) and (actual[1] == 0).all()
    if backend == "cuda":
        return
    grads = {}
    for name in ("torch", backend):
        h, w = _leaf(hidden, name), _leaf(weight, name)
        loss = ops.linear_cross_entropy(h, w, targets.to(_device_for(name)), backend=name)
        loss.backward()
        grads[name] = (loss.detach().cpu(), h.grad.cpu(), w.grad.cpu())
    for what, a, e in zip(("loss", "d hidden", "d weight"), grads[backend], grads["torch"]):
        _assert_same_class(a, e, f"linear {what}")


ATTENTION_POISON = {  # (tensor, batch*head, token, dim, value)
    "nan-query": ("q", 0, 2, 3, NAN),
    "inf-query": ("q", 0, 2, 3, INF),
    "nan-value": ("v", 0, 1, 3, NAN),
    "inf-key": ("k", 0, 1, 3, INF),
    "minus-inf-key": ("k", 1, 33, 0, -INF),
    "nan-last-key": ("k", 0, 39, 5, NAN),
}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", list(ATTENTION_POISON))
def test_attention_non_finite_inputs_give_the_torch_result_class(backend, case):
    """The output has torch's NaN/inf positions exactly.  A gradient is non-finite exactly when the
    torch path's is, never +-inf where that one has NaN, and entries finite on both sides agree
    (which entries turn NaN differs: the torch path's full matmuls also multiply masked zeros by NaN)."""
    which, bh, tok, dim, value = ATTENTION_POISON[case]
    g = torch.Generator().manual_seed(11)
    inputs = {name: torch.randn(1, 2, 40, 16, generator=g) for name in "qkv"}
    inputs[which][0, bh, tok, dim] = value
    results = {}
    for name in ("torch", backend):
        leaves = [_leaf(inputs[n], name) for n in "qkv"]
        out = ops.causal_attention(*leaves, backend=name)
        out.sum().backward()
        results[name] = [out.detach().cpu()] + [t.grad.cpu() for t in leaves]
    expected, actual = results["torch"], results[backend]
    _assert_same_class(actual[0], expected[0], "out")
    for what, a, e in zip(("dq", "dk", "dv"), actual[1:], expected[1:]):
        assert a.isfinite().all() == e.isfinite().all(), f"{what}: finite on one side only"
        both = a.isfinite() & e.isfinite()
        torch.testing.assert_close(a[both], e[both], atol=1e-4, rtol=1e-4, msg=lambda m: f"{what}: {m}")
        assert not (a.isinf() & ~e.isinf()).any(), f"{what}: inf where the torch path has none"


# --------------------------------------------------------------------------- second derivatives

def _second_order_cases(device, dtype):
    """``(name, inputs, f)``: ``f(*inputs, backend)`` a scalar whose gradient in ``inputs[0]`` depends on it."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    half = torch.randn(5, 4, generator=g, dtype=torch.float64)
    cos, sin = torch.cat([half.cos()] * 2, -1).to(device, dtype), torch.cat([half.sin()] * 2, -1).to(device, dtype)
    targets = torch.tensor([1, 2, 0, 3], device=device)
    return [
        ("gelu", [rand(4, 8)], lambda x, b: ops.gelu(x, backend=b).pow(2).sum()),
        ("swiglu", [rand(4, 8), rand(4, 8)], lambda a, u, b: ops.swiglu(a, u, backend=b).pow(2).sum()),
        ("rms_norm", [rand(4, 8), rand(8)], lambda x, w, b: ops.rms_norm(x, w, backend=b).pow(2).sum()),
        ("layer_norm", [rand(4, 8), rand(8), rand(8)],
         lambda x, w, s, b: ops.layer_norm(x, w, s, backend=b).pow(3).sum()),
        ("rope", [rand(1, 2, 5, 8)], lambda x, b: ops.rope(x, cos, sin, backend=b).pow(2).sum()),
        ("causal_attention", [rand(1, 2, 5, 16), rand(1, 2, 5, 16), rand(1, 2, 5, 16)],
         lambda q, k, v, b: ops.causal_attention(q, k, v, backend=b).pow(2).sum()),
        ("cross_entropy", [rand(4, 6)], lambda x, b: ops.cross_entropy(x, targets, backend=b)),
        ("linear_cross_entropy", [rand(4, 8), rand(6, 8)],
         lambda h, w, b: ops.linear_cross_entropy(h, w, targets, backend=b)),
        ("linear_cross_entropy none", [rand(4, 8), rand(6, 8)],
         lambda h, w, b: ops.linear_cross_entropy(h, w, targets, reduction="none", backend=b).pow(2).sum()),
    ]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_a_second_derivative_through_a_fused_backward_is_an_error_not_zero(backend):
    """The backward kernels have no derivative of their own: differentiating a gradient taken with
    create_graph=True through one raises (at once, or when the second backward reaches it) instead of
    treating the kernel's gradient as a constant.  First derivatives under create_graph are unchanged."""
    device = _device_for(backend)
    dtype = torch.float64 if backend == "cpu" else torch.float32
    for name, inputs, f in _second_order_cases(device, dtype):
        xs = [t.detach().requires_grad_() for t in inputs]
        with pytest.raises(RuntimeError, match="no derivative of its own"):
            (grad,) = torch.autograd.grad(f(*xs, backend), xs[0], create_graph=True)
            torch.autograd.grad(grad.pow(2).sum(), xs[0])
        if "cross_entropy" in name:
            continue  # no input is saved to tie the gradient to: the create_graph backward itself refuses
        ref = [t.detach().requires_grad_() for t in inputs]
        (expected,) = torch.autograd.grad(f(*ref, "torch"), ref[0])
        xs = [t.detach().requires_grad_() for t in inputs]
        (first,) = torch.autograd.grad(f(*xs, backend), xs[0], create_graph=True)
        torch.testing.assert_close(first.detach(), expected, rtol=1e-4, atol=1e-5, msg=name)


def test_the_torch_backend_keeps_second_derivatives():
    for name, inputs, f in _second_order_cases("cpu", torch.float64):
        xs = [t.detach().requires_grad_() for t in inputs]
        (grad,) = torch.autograd.grad(f(*xs, "torch"), xs[0], create_graph=True)
        (second,) = torch.autograd.grad(grad.pow(2).sum(), xs[0])
        assert second.abs().sum() > 0, name


# --------------------------------------------------------------------------- linear cross-entropy edges


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_under_autocast_computes_as_the_torch_path_does(backend, reduction):
    """Under autocast the head multiplies in the autocast dtype and the loss comes back in float32, as
    F.cross_entropy(F.linear(...)) gives; the chunks' products with out= buffers no longer clash with it."""
    if backend == "triton" and INTERPRETER:
        pytest.skip("Triton's interpreter is trustworthy in float32 only")
    device = _device_for(backend)
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(40, 16, generator=g), torch.randn(900, 16, generator=g)
    targets = torch.randint(0, 900, (40,), generator=g)
    results = {}
    for name in (backend, "torch"):
        h, w = hidden.to(device).requires_grad_(), weight.to(device).requires_grad_()
        with torch.autocast(device, dtype=dtype):
            loss = ops.linear_cross_entropy(h, w, targets.to(device), reduction=reduction, backend=name)
        assert loss.dtype == torch.float32, (name, loss.dtype)
        loss.sum().backward()
        results[name] = (loss.detach().cpu(), h.grad.cpu(), w.grad.cpu())
    for got, expected in zip(results[backend], results["torch"]):
        torch.testing.assert_close(got, expected, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_int32_targets_with_an_ignore_index_past_int32_ignore_nothing(backend):
    """2**32 + 1 is not 1: int32 targets are compared with a wide ignore_index in int64, as the kernels do."""
    device = _device_for(backend)
    g = torch.Generator().manual_seed(4)
    logits, hidden, weight = torch.randn(3, 5, generator=g), torch.randn(3, 8, generator=g), torch.randn(5, 8, generator=g)
    targets = torch.tensor([1, 2, 3], dtype=torch.int32)
    for reduction in ("mean", "none"):
        for fn, args in ((ops.cross_entropy, (logits,)), (ops.linear_cross_entropy, (hidden, weight))):
            kwargs = dict(ignore_index=2**32 + 1, reduction=reduction)
            got = fn(*(a.to(device) for a in args), targets.to(device), backend=backend, **kwargs)
            expected = fn(*args, targets.long(), backend="torch", **kwargs)
            torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        ops.cross_entropy(logits, targets, ignore_index=2**64, backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_linear_cross_entropy_with_an_empty_hidden_dim_and_checked_bias(backend):
    device = _device_for(backend)
    hidden = torch.zeros(3, 0, device=device, requires_grad=True)
    weight = torch.zeros(5, 0, device=device, requires_grad=True)
    targets = torch.tensor([0, 1, 2], device=device)
    loss = ops.linear_cross_entropy(hidden, weight, targets, backend=backend)
    torch.testing.assert_close(loss.detach().cpu(), torch.tensor(math.log(5)))
    loss.backward()
    assert hidden.grad.shape == (3, 0) and weight.grad.shape == (5, 0)
    h, w = torch.randn(3, 8, device=device), torch.randn(5, 8, device=device)
    for bad in (torch.zeros(5, dtype=torch.int64, device=device), torch.zeros(5, dtype=torch.float64, device=device)):
        with pytest.raises(TypeError, match="bias"):
            ops.linear_cross_entropy(h, w, targets, bias=bad, backend=backend)


def test_attention_without_heads_is_empty_on_every_backend():
    q = k = v = torch.zeros(2, 0, 3, 8)
    for backend in ["torch"] + [b for b in ("cpu",) if b in AVAILABLE]:
        assert ops.causal_attention(q, k, v, backend=backend).shape == (2, 0, 3, 8)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_rope_tables_that_need_a_gradient_take_the_torch_path(backend):
    """The fused kernels give cos/sin no gradient: "auto" runs such a call on the torch path (the tables get
    their gradient), a named fused backend refuses it, and constant tables keep the kernels."""
    device = _device_for(backend)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 2, 5, 16, generator=g).to(device)
    cos, sin = (torch.randn(5, 16, generator=g).to(device).requires_grad_() for _ in range(2))
    with pytest.raises(RuntimeError, match="no gradient"):
        ops.rope(x, cos, sin, backend=backend)
    with torch.no_grad():
        ops.rope(x, cos, sin, backend=backend)  # no gradient wanted: the kernels serve it
    ops.rope(x, cos.detach(), sin.detach(), backend=backend)
    with ops.use_backend("auto"):
        ops.rope(x, cos, sin).sum().backward()
    assert cos.grad is not None and sin.grad is not None


# ----------------------------------------------------------------------------- the raw CPU kernels' own checks
# What a direct caller of ``torch.ops.gptfast_cpu`` gets: an error, never unwritten memory or a truncated index.


@needs_cpu_backend
def test_raw_norm_kernels_refuse_rows_of_no_elements():
    kernels = kernel_namespace("cpu")
    with pytest.raises(RuntimeError, match="rows must hold at least one element"):
        kernels.rms_norm_fwd(torch.randn(3, 0), torch.randn(0), 1e-6)
    with pytest.raises(RuntimeError, match="rows must hold at least one element"):
        kernels.layer_norm_fwd(torch.randn(3, 0), torch.randn(0), torch.randn(0), 1e-5)


@needs_cpu_backend
def test_raw_kernels_refuse_float_indices_instead_of_truncating_them():
    kernels = kernel_namespace("cpu")
    logits = torch.randn(4, 9)
    with pytest.raises(RuntimeError, match="top_k must be an integer"):
        kernels.sample_next_token(logits, None, 1.0, torch.full((4,), 0.2), 9, None)
    with pytest.raises(RuntimeError, match="temperature must be a floating"):
        kernels.sample_next_token(logits, torch.ones(2, 2), 0.0, None, 9, None)
    with pytest.raises(RuntimeError, match="got Long"):  # the right shape, an integer dtype
        kernels.sample_next_token(logits, torch.ones(4, dtype=torch.int64), 0.0, None, 9, None)
    x = torch.randn(1, 1, 3, 8)
    cos, sin = torch.randn(10, 8), torch.randn(10, 8)
    with pytest.raises(RuntimeError, match="positions must be an integer"):
        kernels.rope_fwd(x, cos, sin, torch.tensor([[0.5, 1.9, 7.99]]), 0)
    with pytest.raises(RuntimeError, match=r"top_k must be in \[1, 9\], got 0 in row 1"):  # not "keep all"
        kernels.sample_next_token(logits, None, 1.0, torch.tensor([3, 0, 2, 9]), 9, None)
    with pytest.raises(RuntimeError, match=r"top_k must be in \[1, 9\], got 0"):
        kernels.sample_next_token(logits, None, 1.0, None, 0, None)
    # The same calls with integer indices run.
    assert kernels.sample_next_token(logits, None, 1.0, torch.full((4,), 2), 9, None).shape == (4, 1)
    assert kernels.rope_fwd(x, cos, sin, torch.tensor([[0, 1, 7]]), 0).shape == x.shape


@needs_cpu_backend
@pytest.mark.parametrize("case", ["sample_next_token", "cross_entropy_fwd", "rms_norm_fwd", "rope_fwd", "gelu_bwd"])
def test_raw_kernels_refuse_meta_tensors_mixed_with_real_ones(case):
    """The Meta key wins such a call's dispatch: without the check the fake answered with unwritten memory."""
    kernels = kernel_namespace("cpu")
    meta = dict(device="meta")
    call = {
        "sample_next_token": lambda: kernels.sample_next_token(torch.randn(2, 5), torch.ones(2, **meta), 0.0, None,
                                                               5, None),
        "cross_entropy_fwd": lambda: kernels.cross_entropy_fwd(torch.randn(2, 3), torch.tensor([0, 1], **meta), -100,
                                                               False),
        "rms_norm_fwd": lambda: kernels.rms_norm_fwd(torch.randn(2, 4), torch.ones(4, **meta), 1e-6),
        "rope_fwd": lambda: kernels.rope_fwd(torch.randn(1, 1, 2, 4), torch.randn(4, 4, **meta), torch.randn(4, 4),
                                             None, 0),
        "gelu_bwd": lambda: kernels.gelu_bwd(torch.randn(4, **meta), torch.randn(4)),
    }[case]
    with pytest.raises(RuntimeError, match="must all be on one device, got cpu, meta"):
        call()
    # All on the meta device, a call is shape propagation, as torch.compile's tracing needs.
    assert kernels.rms_norm_fwd(torch.randn(2, 4, **meta), torch.ones(4, **meta), 1e-6)[0].device.type == "meta"


# ----------------------------------------------------------------------------- forward-mode AD
# The fused kernels have reverse-mode formulas only. Under forward-mode AD "auto" takes the torch path, and a
# named fused backend refuses the call: before, the tangent was dropped and came out zero, without an error.

def _forward_mode_cases():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    cos, sin = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    head = torch.randn(11, 8, generator=g)
    return {
        "gelu": lambda a: ops.gelu(a),
        "layer_norm": lambda a: ops.layer_norm(a, w, b),
        "rms_norm": lambda a: ops.rms_norm(a, w),
        "swiglu": lambda a: ops.swiglu(a, a * 2),
        "causal_attention": lambda a: ops.causal_attention(*(a.view(1, 1, 3, 8),) * 3),
        "rope": lambda a: ops.rope(a.view(1, 1, 3, 8), cos, sin),
        "cross_entropy": lambda a: ops.cross_entropy(a, torch.tensor([1, 2, 3])),
        "linear_cross_entropy": lambda a: ops.linear_cross_entropy(a, head, torch.tensor([1, 2, 3])),
        "decode_linear": lambda a: ops.decode_linear(a, head),
    }


@pytest.mark.parametrize("name", list(_forward_mode_cases()))
def test_forward_mode_ad_takes_the_torch_path_under_auto_and_is_refused_by_a_fused_backend(name):
    import torch.autograd.forward_ad as forward_ad

    fn = _forward_mode_cases()[name]
    g = torch.Generator().manual_seed(1)
    x, tangent = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    with ops.use_backend("torch"):
        expected = torch.func.jvp(fn, (x,), (tangent,))[1]
    assert expected.abs().sum() > 0
    with ops.use_backend("auto"):
        torch.testing.assert_close(torch.func.jvp(fn, (x,), (tangent,))[1], expected)
        with forward_ad.dual_level():
            dual_tangent = forward_ad.unpack_dual(fn(forward_ad.make_dual(x, tangent))).tangent
        torch.testing.assert_close(dual_tangent, expected)
    if "cpu" in AVAILABLE:
        with ops.use_backend("cpu"):
            with pytest.raises(RuntimeError, match="no forward derivative"):
                torch.func.jvp(fn, (x,), (tangent,))
            fn(x)  # outside forward-mode AD the fused kernel serves the same call


def test_a_drop_in_model_gives_the_torch_paths_forward_derivative():
    from gptfast.ch04 import GPTModel

    cfg = {"vocab_size": 50, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 1, "drop_rate": 0.0,
           "qkv_bias": False}
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    idx = torch.randint(0, 50, (2, 8))
    params = dict(model.named_parameters())
    name = "trf_blocks.0.ff.layers.0.weight"
    direction = torch.randn_like(params[name])

    def logits(weight):
        return torch.func.functional_call(model, {**params, name: weight}, (idx,))

    tangents = {}
    for backend in ("torch", "auto"):
        with ops.use_backend(backend):
            tangents[backend] = torch.func.jvp(logits, (params[name],), (direction,))[1]
    assert tangents["torch"].abs().sum() > 0
    torch.testing.assert_close(tangents["auto"], tangents["torch"], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- mixed dtypes under autocast
# As F.linear and matmul under autocast, the product ops take inputs of different floating dtypes there (all cast
# to autocast's dtype); outside autocast, and with a float64 input, mixed dtypes stay an error.

def _mixed_dtype_calls():
    g = torch.Generator().manual_seed(2)
    hidden, head = torch.randn(6, 16, generator=g), torch.randn(50, 16, generator=g).bfloat16()
    q, kv = torch.randn(1, 2, 4, 8, generator=g), torch.randn(1, 2, 4, 8, generator=g).bfloat16()
    targets = torch.randint(0, 50, (6,), generator=g)
    return {
        "linear_cross_entropy": lambda backend: ops.linear_cross_entropy(hidden, head, targets, bias=torch.zeros(50),
                                                                         backend=backend),
        "causal_attention": lambda backend: ops.causal_attention(q, kv, kv, backend=backend),
        "decode_linear": lambda backend: ops.decode_linear(hidden[:2], head, backend=backend),
    }


def test_meta_tensors_of_one_dtype_still_give_shapes():
    """The autocast test of mixed dtypes is not asked of one dtype (autocast knows no meta device)."""
    hidden, weight = torch.randn(6, 16, device="meta"), torch.randn(50, 16, device="meta")
    loss = ops.linear_cross_entropy(hidden, weight, torch.zeros(6, dtype=torch.long, device="meta"), backend="torch")
    assert loss.device.type == "meta" and loss.shape == ()


def test_the_loss_backend_is_chosen_for_the_inputs_autocast_hands_over(monkeypatch):
    """A float32 hidden with a bf16 head under autocast: the backends are asked about one dtype, as their paths
    cast to it; before, a backend refusing mixed dtypes in its own limits was skipped or refused."""
    from gptfast.ops import _dispatch

    asked = []
    real = _dispatch.resolve
    monkeypatch.setattr(_dispatch, "resolve", lambda op, device, args=(), kwargs=None, backend=None: (
        asked.append({t.dtype for t in (*args[:2], (kwargs or {}).get("bias")) if t is not None}),
        real(op, device, args, kwargs, backend))[1])
    import gptfast.ops as front_door

    monkeypatch.setattr(front_door, "resolve", _dispatch.resolve)
    hidden, head = torch.randn(6, 16), torch.randn(50, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ops.linear_cross_entropy(hidden, head, torch.randint(0, 50, (6,)), bias=torch.zeros(50), backend="torch")
    assert asked == [{torch.bfloat16}]


@pytest.mark.parametrize("name", list(_mixed_dtype_calls()))
def test_mixed_dtypes_under_autocast_are_cast_as_autocast_casts_a_product(name):
    call = _mixed_dtype_calls()[name]
    with pytest.raises(TypeError, match="must share one dtype"):
        call("torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = call("torch")
        if "cpu" in AVAILABLE:  # (the Triton interpreter's bf16 is not trustworthy)
            torch.testing.assert_close(call("cpu").float(), expected.float(), rtol=2e-2, atol=2e-2)
