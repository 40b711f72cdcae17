"""Property-based parity: random shapes, strides, dtypes and ignore_index patterns, every backend vs torch.

Hypothesis draws the cases (derandomized, so a run is reproducible and CI sees the same
cases every time) for the kernel backends available here: ``cpu`` and ``triton`` (under
the interpreter on CPU tensors, fp32 only; the interpreter is slow, so it gets fewer
examples).  Each input is given as a random view -- contiguous, transposed, sliced
(non-unit row/column strides) or expanded (stride 0) -- and the result is compared
with the torch path computed in float64 on the same values:

* attention forward and dq/dk/dv;
* cross-entropy loss and dlogits (with -inf logits sprinkled in: same NaN/inf class);
* linear cross-entropy loss and d hidden / d weight / d bias;
* sampling: greedy equals the torch path exactly (ties and NaN included), and every
  token drawn with top-k lies in the top-k set.
"""

from __future__ import annotations

import os

import pytest
import torch

from gptfast import ops

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
AVAILABLE = ops.available_backends()
# Examples per test: the interpreter costs ~0.1-1 s per kernel call, the C++ kernels almost nothing.
EXAMPLES = {"cpu": 30, "triton": 6}
DTYPES = {"cpu": [torch.float32, torch.float64, torch.bfloat16], "triton": [torch.float32]}
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float64: dict(atol=1e-9, rtol=1e-9),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2), torch.float16: dict(atol=3e-3, rtol=3e-3)}


def _backends():
    """The kernel backends these properties run on here (triton only on CPU tensors via the interpreter)."""
    names = ["cpu"]
    if INTERPRETER:
        names.append("triton")
    return [pytest.param(n, marks=pytest.mark.skipif(n not in AVAILABLE, reason=f"backend {n} unavailable"))
            for n in names]


def _settings(backend):
    return settings(max_examples=EXAMPLES[backend], deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _run_property(check, backend):
    """Run ``check(backend, data)`` as a Hypothesis property under the backend's :func:`_settings`."""
    @_settings(backend)
    @given(st.data())
    def run(data):
        check(backend, data)

    run()


def _random(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _view(data, base_shape, seed, dtype, layouts=("contiguous", "transposed", "sliced", "expanded"),
          expand_dim=0, transpose_dims=(0, 1)):
    """A leaf tensor and a view of it with ``base_shape``; the view's layout is drawn."""
    layout = data.draw(st.sampled_from(layouts), label="layout")
    shape = list(base_shape)
    if layout == "transposed":
        a, b = transpose_dims
        shape[a], shape[b] = shape[b], shape[a]
        leaf = _random(shape, seed, dtype).requires_grad_(True)
        return leaf, leaf.transpose(a, b)
    if layout == "sliced":  # every dim padded, then a strided slice: non-unit strides everywhere
        step = data.draw(st.integers(1, 2), label="step")
        padded = [n * step + 1 for n in shape]
        leaf = _random(padded, seed, dtype).requires_grad_(True)
        index = tuple(slice(1, 1 + n * step, step) for n in shape)
        return leaf, leaf[index]
    if layout == "expanded":
        shape[expand_dim] = 1
        leaf = _random(shape, seed, dtype).requires_grad_(True)
        return leaf, leaf.expand(*base_shape)
    leaf = _random(shape, seed, dtype).requires_grad_(True)
    return leaf, leaf


def _oracle_views(leaves_and_views):
    """float64 copies of the (contiguous) leaves and the same views of them, for the torch path."""
    leaves, views = [], []
    for leaf, view in leaves_and_views:
        if leaf is None:
            leaves.append(None)
            views.append(None)
            continue
        assert leaf.is_contiguous()
        copy = leaf.detach().double().requires_grad_(True)
        leaves.append(copy)
        views.append(copy.as_strided(view.shape, view.stride(), view.storage_offset()))
    return leaves, views


def _close(actual, expected, dtype, what):
    actual, expected = actual.double(), expected.double()
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN positions differ"
    assert torch.equal(actual.isinf(), expected.isinf()), f"{what}: inf positions differ"
    finite = expected.isfinite()
    torch.testing.assert_close(actual[finite], expected[finite], **TOL[dtype], msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------- attention


def _check_attention(backend, data):
    dtype = data.draw(st.sampled_from(DTYPES[backend]), label="dtype")
    b, h = data.draw(st.integers(1, 2), label="B"), data.draw(st.integers(1, 3), label="H")
    tk = data.draw(st.integers(1, 24), label="Tk")
    tq = data.draw(st.integers(1, tk), label="Tq")
    d = data.draw(st.sampled_from([16, 32] if backend == "triton" else [8, 16, 24]), label="D")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    parts = []
    for i, t in enumerate((tq, tk, tk)):
        # Expanded: q shares one batch row, k and v one head (their grads are sums over the expansion).
        parts.append(_view(data, (b, h, t, d), seed + i, dtype, expand_dim=1 if i else 0, transpose_dims=(1, 2)))
    scale = data.draw(st.sampled_from([None, 0.3]), label="scale")
    out = ops.causal_attention(*(v for _, v in parts), scale=scale, backend=backend)
    grad_out = _random(out.shape, seed + 7, dtype)
    out.backward(grad_out)

    leaves, views = _oracle_views(parts)
    expected = ops.causal_attention(*views, scale=scale, backend="torch")
    expected.backward(grad_out.double())
    _close(out.detach(), expected.detach(), dtype, "attention out")
    for name, (leaf, _), oleaf in zip("qkv", parts, leaves):
        _close(leaf.grad, oleaf.grad, dtype, f"d{name}")


@pytest.mark.parametrize("backend", _backends())
def test_attention_properties(backend):
    _run_property(_check_attention, backend)


# ----------------------------------------------------------------------------- cross-entropy


def _draw_targets(data, shape, vocab, seed):
    """Targets of ``shape`` (possibly a strided/expanded view), an ignore_index and its pattern."""
    ignore_index = data.draw(st.sampled_from([-100, 0, vocab - 1]), label="ignore_index")
    pattern = data.draw(st.sampled_from(["none", "some", "all"]), label="ignored")
    g = torch.Generator().manual_seed(seed)
    index_dtype = data.draw(st.sampled_from([torch.int64, torch.int32]), label="targets dtype")
    layout = data.draw(st.sampled_from(["contiguous", "sliced", "expanded", "transposed"]), label="targets layout")
    n = 1
    for s in shape:
        n *= s
    if layout == "sliced":
        base = torch.randint(0, vocab, (*shape[:-1], 2 * shape[-1]), generator=g)[..., ::2]
    elif layout == "expanded":
        base = torch.randint(0, vocab, (*shape[:-1], 1), generator=g).expand(*shape)
    elif layout == "transposed" and len(shape) == 2:
        base = torch.randint(0, vocab, (shape[1], shape[0]), generator=g).t()
    else:
        base = torch.randint(0, vocab, shape, generator=g)
    if pattern != "none":
        mask = torch.rand(shape, generator=g) < 0.4 if pattern == "some" else torch.ones(shape, dtype=torch.bool)
        base = torch.where(mask, torch.full_like(base, ignore_index), base)
        if layout == "sliced":  # keep a strided view after the edit
            wide = torch.zeros((*shape[:-1], 2 * shape[-1]), dtype=base.dtype)
            wide[..., ::2] = base
            base = wide[..., ::2]
        elif layout in ("expanded", "transposed"):
            base = base.t().contiguous().t() if len(shape) == 2 else base
    return base.to(index_dtype), ignore_index


def _check_cross_entropy(backend, data):
    dtype = data.draw(st.sampled_from(DTYPES[backend]), label="dtype")
    three_d = data.draw(st.booleans(), label="3-D logits")
    vocab = data.draw(st.integers(1, 300), label="V")
    shape = (data.draw(st.integers(1, 3), label="B"), data.draw(st.integers(1, 6), label="T")) if three_d else \
        (data.draw(st.integers(1, 20), label="N"),)
    seed = data.draw(st.integers(0, 2**16), label="seed")
    leaf, logits = _view(data, (*shape, vocab), seed, dtype, transpose_dims=(0, 1) if three_d else (0, 1))
    minus_inf = data.draw(st.booleans(), label="-inf logits")
    scale = data.draw(st.sampled_from([1.0, 30.0]), label="logit scale")
    with torch.no_grad():  # on the leaf, so the oracle sees exactly the same (rounded) values
        leaf.mul_(scale)
        if minus_inf:  # -inf entries are legal: zero probability (an infinite loss if a target sits there)
            mask = torch.rand(leaf.shape, generator=torch.Generator().manual_seed(seed)) < 0.2
            leaf.masked_fill_(mask, float("-inf"))
    targets, ignore_index = _draw_targets(data, shape, vocab, seed + 1)
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]), label="reduction")

    def run(name, x):
        loss = ops.cross_entropy(x, targets, ignore_index=ignore_index, reduction=reduction, backend=name)
        loss.backward(torch.ones_like(loss) if reduction == "none" else None)
        return loss.detach()

    got = run(backend, logits)
    (oleaf,), (oview,) = _oracle_views([(leaf, logits)])
    expected = run("torch", oview)
    _close(got, expected, dtype, "loss")
    _close(leaf.grad, oleaf.grad, dtype, "dlogits")


@pytest.mark.parametrize("backend", _backends())
def test_cross_entropy_properties(backend):
    _run_property(_check_cross_entropy, backend)


def _check_linear_cross_entropy(backend, data):
    dtype = data.draw(st.sampled_from([d for d in DTYPES[backend] if d != torch.bfloat16]), label="dtype")
    n, hid = data.draw(st.integers(1, 40), label="N"), data.draw(st.integers(1, 24), label="H")
    vocab = data.draw(st.integers(1, 90), label="V")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    h_leaf, hidden = _view(data, (n, hid), seed, dtype)
    w_leaf, weight = _view(data, (vocab, hid), seed + 1, dtype, layouts=("contiguous", "transposed", "sliced"))
    with_bias = data.draw(st.booleans(), label="bias")
    b_leaf, bias = _view(data, (vocab,), seed + 2, dtype, layouts=("contiguous", "sliced")) if with_bias \
        else (None, None)
    targets, ignore_index = _draw_targets(data, (n,), vocab, seed + 3)
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]), label="reduction")

    def run(name, h, w, b):
        loss = ops.linear_cross_entropy(h, w, targets, bias=b, ignore_index=ignore_index, reduction=reduction,
                                        backend=name)
        loss.backward(torch.ones_like(loss) if reduction == "none" else None)
        return loss.detach()

    got = run(backend, hidden, weight, bias)
    leaves, views = _oracle_views([(h_leaf, hidden), (w_leaf, weight), (b_leaf, bias)])
    expected = run("torch", *views)
    tol_dtype = torch.float32 if dtype == torch.float32 else dtype
    _close(got, expected, tol_dtype, "loss")
    for what, leaf, oleaf in zip(("d hidden", "d weight", "d bias"), (h_leaf, w_leaf, b_leaf), leaves):
        if leaf is not None:
            _close(leaf.grad, oleaf.grad, tol_dtype, what)


@pytest.mark.parametrize("backend", _backends())
def test_linear_cross_entropy_properties(backend):
    _run_property(_check_linear_cross_entropy, backend)


# ----------------------------------------------------------------------------- sampling


def _sampling_logits(data, backend, seed):
    dtype = data.draw(st.sampled_from(DTYPES[backend] + ([torch.float16] if backend == "cpu" else [])),
                      label="dtype")
    rows, vocab = data.draw(st.integers(1, 9), label="B"), data.draw(st.integers(1, 400), label="V")
    values = _random((rows, vocab), seed)
    if data.draw(st.booleans(), label="ties"):  # few distinct values: many ties at the max and the k-th value
        values = values.mul(2).round()
    layout = data.draw(st.sampled_from(["contiguous", "column-strided", "transposed", "expanded-rows"]),
                       label="layout")
    if layout == "column-strided":
        wide = torch.zeros(rows, 2 * vocab, dtype=torch.float64)
        wide[:, ::2] = values
        logits = wide.to(dtype)[:, ::2]
    elif layout == "transposed":
        logits = values.to(dtype).t().contiguous().t()
    elif layout == "expanded-rows":
        logits = values[:1].to(dtype).expand(rows, vocab)
    else:
        logits = values.to(dtype)
    return logits


def _check_sampling(backend, data):
    seed = data.draw(st.integers(0, 2**16), label="seed")
    logits = _sampling_logits(data, backend, seed)
    rows, vocab = logits.shape
    per_row = data.draw(st.booleans(), label="per-row top_k")
    if per_row:
        top_k = torch.randint(1, vocab + 1, (rows,), generator=torch.Generator().manual_seed(seed))
        kth = torch.sort(logits.double(), dim=-1, descending=True).values.gather(1, (top_k - 1).unsqueeze(1))
    else:
        k = data.draw(st.one_of(st.none(), st.integers(1, vocab)), label="top_k")
        top_k = k
        kth = torch.topk(logits.double(), k or vocab).values[:, -1:]
    # Greedy: exactly what the torch path picks (torch.argmax over the top-k filtered row).
    greedy_t = torch.zeros(rows) if data.draw(st.booleans(), label="per-row temperature") else 0.0
    expected = ops.sample_next_token(logits, temperature=greedy_t, top_k=top_k, backend="torch")
    got = ops.sample_next_token(logits, temperature=greedy_t, top_k=top_k, backend=backend)
    assert torch.equal(got, expected), (got.squeeze(1), expected.squeeze(1))
    # Drawn: always a token of the top-k set (ties at the k-th value included).
    temperature = data.draw(st.sampled_from([0.5, 1.0, 3.0]), label="temperature")
    gen = torch.Generator().manual_seed(seed)
    drawn = ops.sample_next_token(logits, temperature=temperature, top_k=top_k, generator=gen, backend=backend)
    assert drawn.shape == (rows, 1) and drawn.dtype == torch.int64
    assert ((drawn >= 0) & (drawn < vocab)).all()
    assert (logits.double().gather(1, drawn) >= kth).all()


@pytest.mark.parametrize("backend", _backends())
def test_sampling_properties(backend):
    _run_property(_check_sampling, backend)
