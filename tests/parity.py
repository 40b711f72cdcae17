"""Shared parity checks: every kernel backend is compared with the ``"torch"`` oracle here.

The per-op test files (test_attention.py, test_cross_entropy.py, test_sampling.py)
parametrize these helpers over ``backend_cases(op)``: every backend with the devices and
dtypes it runs here, so every backend is held to the same cases and the same tolerances.
"""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch

from gptfast import ops
from gptfast.ops import linear as dense, torch_ops

# The oracle, bound at import so that a test patching the torch backend still compares
# against the real thing.
_ORACLE_ATTENTION = torch_ops.causal_attention
_ORACLE_CROSS_ENTROPY = torch_ops.cross_entropy

# Tolerances per dtype, against the torch oracle computed in float64 from the same inputs.
# fp32: accumulation-order differences only.  bf16/fp16: inputs and outputs are rounded
# (8 / 11 mantissa bits) and kernels accumulate in fp32, so a few ulps of the output dtype.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=2e-5, rtol=2e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}

# (B, H, Tq, Tk, D): odd sizes that do not divide any tile, T=1, the decode case Tq < Tk.
ATTENTION_SHAPES = [
    (1, 1, 1, 1, 16),
    (2, 3, 17, 17, 32),
    (1, 2, 1, 37, 64),
    (2, 2, 5, 40, 64),
    (1, 2, 70, 70, 64),
    (2, 1, 33, 65, 128),
]

# (N, V): tiny, odd, and the real GPT-2 vocabulary.
CROSS_ENTROPY_SHAPES = [(1, 3), (7, 1000), (33, 4097), (8, 50257)]


HAS_CUDA = torch.cuda.is_available()
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
needs_interpreter = pytest.mark.skipif(not INTERPRETER, reason="CPU tensors need TRITON_INTERPRET=1")


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _cpu_reason():
    from gptfast.ops import cpu_ops
    return cpu_ops.unavailable_reason()


needs_cpu_backend = pytest.mark.skipif(_cpu_reason() is not None, reason=f"cpu backend: {_cpu_reason()}")
needs_triton = pytest.mark.skipif(not _has_triton(), reason="triton is not installed")

# Dtypes per (backend, device): the CPU kernels take float64 too; the Triton interpreter only
# float32 (it computes 16-bit tl.dot wrongly); CUDA attention kernels are 16-bit only.
_ALL_GPU = (torch.float32, torch.float16, torch.bfloat16)
_DTYPES = {
    ("cpu", "cpu"): (torch.float32, torch.bfloat16, torch.float64),
    ("triton", "cpu"): (torch.float32,),
    ("triton", "cuda"): _ALL_GPU,
    ("cuda", "cuda"): _ALL_GPU,
}
_MARKS = {
    ("cpu", "cpu"): [needs_cpu_backend],
    ("triton", "cpu"): [needs_triton, needs_interpreter],
    ("triton", "cuda"): [needs_triton, needs_cuda],
    ("cuda", "cuda"): [needs_cuda],
}


def backend_cases(op: str, dtypes=None):
    """``pytest.param(backend, device, dtype)`` for every fused backend of ``op`` on every device it runs on.

    ``dtypes`` narrows the dtypes (each backend keeps those it supports).
    """
    cases = []
    for (backend, device), supported in _DTYPES.items():
        if backend == "cuda" and op == "causal_attention":
            supported = (torch.float16, torch.bfloat16)
        for dtype in supported:
            if dtypes is None or dtype in dtypes:
                cases.append(pytest.param(backend, device, dtype, marks=_MARKS[(backend, device)],
                                          id=f"{backend}-{device}-{str(dtype).replace('torch.', '')}"))
    return cases


def backend_devices():
    """``pytest.param(backend, device)`` for every fused backend and device it runs on (no dtype axis)."""
    return [pytest.param(backend, device, marks=_MARKS[(backend, device)], id=f"{backend}-{device}")
            for (backend, device) in _DTYPES]


def opcheck_kwargs(backend, device) -> dict:
    """``torch.library.opcheck`` keyword arguments for ``backend``'s ops on ``device``.

    Triton's interpreter on CPU runs the kernels as Python, which AOT dispatch cannot
    trace; the schema, autograd-registration and fake-tensor checks still apply there.
    """
    if backend == "triton" and device == "cpu":
        return dict(test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    return {}


def kernel_namespace(backend):
    """``torch.ops.gptfast_<backend>``: the namespace holding ``backend``'s kernels.

    The backend's module is imported first: it registers the kernels, and a test run
    alone (``-k opcheck``) may not have loaded it yet.
    """
    importlib.import_module(f"gptfast.ops.{backend}_ops")
    return getattr(torch.ops, f"gptfast_{backend}")


def tol(dtype):
    return TOLERANCES[dtype]


def assert_close(actual, expected, dtype, what):
    t = tol(dtype)
    torch.testing.assert_close(actual.double(), expected.double(), atol=t["atol"], rtol=t["rtol"], msg=lambda m: f"{what}: {m}")


def assert_close_at_scale(mine, ref, dtype, what):
    """``mine`` close to the float64 ``ref`` relative to ``ref``'s largest magnitude (for results far from 1)."""
    assert ref.isfinite().all() and mine.isfinite().all(), what
    scale = ref.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    torch.testing.assert_close(mine.cpu().double() / scale, ref / scale, **tol(dtype), msg=lambda m: f"{what}: {m}")


def _leaf(t, dtype, device):
    return t.to(device=device, dtype=dtype).detach().requires_grad_(True)


def check_attention_parity(backend, shape, dtype, device="cpu", scale=None, seed=0, kv_heads=None):
    """Forward and dq/dk/dv of ``backend`` vs the torch oracle (float64) on random inputs.

    ``kv_heads`` (default: H) gives k/v fewer heads than q: grouped-query attention.
    """
    b, h, tq, tk, d = shape
    kv_heads = h if kv_heads is None else kv_heads
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, heads, t, d, generator=g) for heads, t in ((h, tq), (kv_heads, tk), (kv_heads, tk)))
    grad_out = torch.randn(b, h, tq, d, generator=g)

    q1, k1, v1 = (_leaf(t, dtype, device) for t in (q, k, v))
    out = ops.causal_attention(q1, k1, v1, scale=scale, backend=backend)
    assert out.shape == (b, h, tq, d) and out.dtype == dtype and out.device == q1.device
    out.backward(grad_out.to(device=device, dtype=dtype))

    q2, k2, v2 = (_leaf(t, torch.float64, "cpu") for t in (q, k, v))
    ref = _ORACLE_ATTENTION(q2, k2, v2, scale=scale)
    ref.backward(grad_out.double())

    assert_close(out.detach().cpu(), ref.detach(), dtype, f"{backend} attention output {shape}")
    for name, mine, theirs in (("dq", q1, q2), ("dk", k1, k2), ("dv", v1, v2)):
        # gradients sum over T terms: allow the tolerance to grow with sqrt(T) for low precision
        grow = 1.0 if dtype in (torch.float32, torch.float64) else math.sqrt(max(tk, 1) / 16) + 1
        t = tol(dtype)
        torch.testing.assert_close(mine.grad.double().cpu(), theirs.grad, atol=t["atol"] * grow,
                                   rtol=t["rtol"] * grow, msg=lambda m: f"{backend} attention {name} {shape}: {m}")


def check_cross_entropy_parity(backend, shape, dtype, device="cpu", reduction="mean", ignore_fraction=0.2,
                               ignore_index=-100, logit_scale=3.0, seed=0):
    """Loss and dlogits of ``backend`` vs the torch oracle (float64), with some ignored targets."""
    n, vocab = shape
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * logit_scale
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignore_fraction] = ignore_index

    x1 = _leaf(logits, dtype, device)
    loss = ops.cross_entropy(x1, targets.to(device), ignore_index=ignore_index, reduction=reduction, backend=backend)
    x2 = _leaf(logits, torch.float64, "cpu")
    ref = _ORACLE_CROSS_ENTROPY(x2, targets, ignore_index=ignore_index, reduction=reduction)
    assert loss.shape == ref.shape, f"{backend} cross_entropy shape {loss.shape} != {ref.shape}"
    if torch.isnan(ref).all():  # every target ignored with reduction="mean": 0/0, as in PyTorch
        assert torch.isnan(loss).all()
        return
    assert_close(loss.detach().cpu(), ref.detach(), dtype, f"{backend} cross_entropy {shape} {reduction}")
    upstream = torch.randn(ref.shape, generator=g) if reduction == "none" else torch.tensor(1.7)
    loss.backward(upstream.to(device=device, dtype=loss.dtype))
    ref.backward(upstream.double())
    assert_close(x1.grad.cpu(), x2.grad, dtype, f"{backend} cross_entropy grad {shape} {reduction}")


def top_k_support(logits, top_k):
    """Boolean mask of the tokens that top-k (ties at the k-th value kept) allows in each row."""
    kth = torch.topk(logits.float(), top_k, dim=-1).values[:, -1:]
    return logits.float() >= kth


def check_sampling_greedy(backend, logits, top_k=None):
    """Temperature 0 must give exactly the argmax, with or without top_k."""
    out = ops.sample_next_token(logits, temperature=0.0, top_k=top_k, backend=backend)
    assert out.shape == (logits.shape[0], 1) and out.dtype == torch.int64
    expected = torch.argmax(logits.float(), dim=-1, keepdim=True).to(out.device)
    assert torch.equal(out, expected), f"{backend} greedy sampling differs from argmax"


def check_sampling_distribution(backend, vocab=50, top_k=7, temperature=0.8, draws=4000, device="cpu",
                                dtype=torch.float32, seed=0):
    """Only top-k tokens appear, and their frequencies match softmax(logits / T) over the kept set.

    Uses a chi-square statistic over the kept tokens; the bound is the 99.99th
    percentile for ``top_k - 1`` degrees of freedom, so a correct sampler fails about
    once in 10,000 runs while a wrong temperature or support is caught reliably.
    """
    g = torch.Generator().manual_seed(seed)
    row = torch.randn(vocab, generator=g) * 2
    logits = row.expand(draws, vocab).contiguous().to(device=device, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    tokens = ops.sample_next_token(logits, temperature=temperature, top_k=top_k, generator=gen,
                                   backend=backend).squeeze(1).cpu()
    allowed = top_k_support(logits[:1].cpu(), top_k)[0]
    assert allowed[tokens].all(), f"{backend} sampled a token outside the top-{top_k} set"
    kept = row.to(dtype).float().masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(kept / temperature, dim=-1)[allowed]
    counts = torch.bincount(tokens, minlength=vocab)[allowed].double()
    expected = probs.double() * draws
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    dof = int(allowed.sum()) - 1
    # Wilson-Hilferty approximation of the chi-square 99.99% quantile.
    z = 3.719
    bound = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < bound, f"{backend} sampling frequencies off: chi2={chi2:.1f} > {bound:.1f} (dof {dof})"


def check_sampling_reproducible(backend, logits, temperature=1.0, top_k=25, device="cpu"):
    """Same generator seed, same tokens; a different seed gives different tokens."""
    def draw(seed):
        gen = torch.Generator(device=device).manual_seed(seed)
        return ops.sample_next_token(logits, temperature=temperature, top_k=top_k, generator=gen, backend=backend)

    assert torch.equal(draw(7), draw(7)), f"{backend} sampling not reproducible under one seed"
    assert not torch.equal(draw(7), draw(8)), f"{backend} sampling ignores the generator"


# ----------------------------------------------------------------------------- oneDNN's dense product

needs_onednn = pytest.mark.skipif(dense.onednn_linear() is None, reason="this torch build has no oneDNN linear")

# The size rule's limits (gptfast.ops.linear.onednn_pays).
ONEDNN_LIMITS = ("ONEDNN_MIN_VOCAB", "ONEDNN_MIN_WEIGHT", "ONEDNN_MIN_MACS")


def spy_onednn(monkeypatch, limits=ONEDNN_LIMITS):
    """Record the row count of each product oneDNN computes; the size limits named in ``limits`` are set to 1
    (every size qualifies by them)."""
    calls, product = [], dense.onednn_linear()
    for name in limits:
        monkeypatch.setattr(dense, name, 1)
    monkeypatch.setattr(dense, "onednn_linear", lambda: lambda x, w, b: (calls.append(x.shape[0]), product(x, w, b))[1])
    return calls
