"""The raw Triton ops check their arguments on the host, as the C++ kernels do.

Called directly (skipping gptfast.ops' Python checks), a kernel given a too-short weight, bias,
second operand, per-row tensor or seed would read past its end: garbage, or a crash.  Each case
passes one bad argument to ``torch.ops.gptfast_triton.<op>`` and to ``torch.ops.gptfast_cpu.<op>``;
both refuse it with a ``RuntimeError`` naming the argument.
"""

from __future__ import annotations

import pytest
import torch

import parity
from parity import kernel_namespace, needs_cpu_backend, needs_interpreter

pytestmark = [parity.needs_triton, needs_interpreter, needs_cpu_backend]


def _x(*shape):
    return torch.ones(shape)


def _seed():
    return torch.zeros(1, dtype=torch.int64)


# A bigger buffer behind the short arguments: a kernel reading past a view's end gets numbers, not a fault.
_STORE = torch.arange(64.0) + 100

# (id, the pattern both backends' messages match, the call on a namespace N)
CASES = [
    ("dropout_empty_seed", "seed", lambda N: N.dropout_fwd(_x(4), 0.5, torch.empty(0, dtype=torch.int64))),
    ("dropout_float_seed", "seed", lambda N: N.dropout_fwd(_x(4), 0.5, torch.zeros(1))),
    ("dropout_p_above_one", "p must be in", lambda N: N.dropout_fwd(_x(4), 1.5, _seed())),
    ("rms_norm_fwd_short_weight", "weight must be", lambda N: N.rms_norm_fwd(_x(1, 8), _STORE[:2], 1e-6)),
    ("rms_norm_fwd_x_not_2d", "x must be", lambda N: N.rms_norm_fwd(_x(8), _STORE[:8], 1e-6)),
    ("rms_norm_fwd_zero_eps", "eps", lambda N: N.rms_norm_fwd(_x(1, 8), _STORE[:8], 0.0)),
    ("rms_norm_bwd_short_rstd", "rstd must be",
     lambda N: N.rms_norm_bwd(_x(3, 8), _x(3, 8), _STORE[:8], _STORE[:2])),
    ("rms_norm_bwd_short_grad", "grad_out .*must",
     lambda N: N.rms_norm_bwd(_x(1, 8), _x(3, 8), _STORE[:8], _STORE[:3])),
    ("layer_norm_fwd_short_bias", "bias must be", lambda N: N.layer_norm_fwd(_x(1, 8), _x(8), _STORE[:2], 1e-5)),
    ("layer_norm_fwd_short_weight", "weight must be",
     lambda N: N.layer_norm_fwd(_x(1, 8), _STORE[:3], _x(8), 1e-5)),
    ("layer_norm_bwd_short_mean", "mean must be",
     lambda N: N.layer_norm_bwd(_x(3, 8), _x(3, 8), _x(8), _STORE[:1], _STORE[:3])),
    ("layer_norm_bwd_short_grad", "grad_out .*must",
     lambda N: N.layer_norm_bwd(_x(2, 8), _x(3, 8), _x(8), _STORE[:3], _STORE[:3])),
    ("swiglu_fwd_short_up", "up .*must have one shape", lambda N: N.swiglu_fwd(_x(8), _STORE[:4])),
    ("swiglu_fwd_dtype_mismatch", "dtype", lambda N: N.swiglu_fwd(_x(8), _x(8).double())),
    ("swiglu_bwd_short_grad", "grad_out .*must have gate's shape", lambda N: N.swiglu_bwd(_STORE[:4], _x(8), _x(8))),
    ("gelu_bwd_short_grad", "grad_out .*must", lambda N: N.gelu_bwd(_STORE[:4], _x(8))),
    ("cross_entropy_short_targets", "targets must be",
     lambda N: N.cross_entropy_fwd(_x(4, 5), torch.zeros(2, dtype=torch.int64), -100, True)),
    ("cross_entropy_float_targets", "targets must be int64 or int32",
     lambda N: N.cross_entropy_fwd(_x(4, 5), torch.zeros(4), -100, False)),
    ("rope_fwd_positions_shape", "positions must be",
     lambda N: N.rope_fwd(_x(2, 1, 3, 4), _x(8, 4), _x(8, 4), torch.zeros(1, 3, dtype=torch.int64), 0)),
    ("rope_fwd_narrow_tables", "cos and sin must both be",
     lambda N: N.rope_fwd(_x(1, 1, 3, 8), _x(8, 4), _x(8, 4), None, 0)),
    ("rope_fwd_odd_head_dim", "head_dim must be even",
     lambda N: N.rope_fwd(_x(1, 1, 3, 5), _x(8, 5), _x(8, 5), None, 0)),
    ("rope_bwd_sin_differs", "cos and sin must both be",
     lambda N: N.rope_bwd(_x(1, 1, 3, 4), _x(8, 4), _x(6, 4), None, 0)),
    ("sample_short_temperature", "temperature must be",
     lambda N: N.sample_next_token(_x(3, 5), torch.ones(1), 0.0, None, 5, None)),
    ("sample_short_top_k", "top_k must be",
     lambda N: N.sample_next_token(_x(3, 5), None, 1.0, torch.ones(2, dtype=torch.int64), 5, None)),
    ("sample_float_top_k", "top_k must be an integer",
     lambda N: N.sample_next_token(_x(3, 5), None, 1.0, torch.full((3,), 0.2), 5, None)),
    ("sample_2d_temperature", "temperature must be",
     lambda N: N.sample_next_token(_x(4, 5), torch.ones(2, 2), 0.0, None, 5, None)),
    ("sample_integer_temperature", "temperature must be",
     lambda N: N.sample_next_token(_x(3, 5), torch.ones(3, dtype=torch.int64), 0.0, None, 5, None)),
    ("rope_fwd_float_positions", "positions must be an integer",
     lambda N: N.rope_fwd(_x(1, 1, 3, 4), _x(8, 4), _x(8, 4), torch.tensor([[0.5, 1.9, 2.9]]), 0)),
    ("rope_bwd_bool_positions", "positions must be an integer",
     lambda N: N.rope_bwd(_x(1, 1, 3, 4), _x(8, 4), _x(8, 4), torch.ones(1, 3, dtype=torch.bool), 0)),
    ("rms_norm_fwd_empty_rows", "rows must hold at least one element",
     lambda N: N.rms_norm_fwd(_x(3, 0), _x(0), 1e-6)),
    ("layer_norm_fwd_empty_rows", "rows must hold at least one element",
     lambda N: N.layer_norm_fwd(_x(3, 0), _x(0), _x(0), 1e-5)),
    ("dropout_integer_x", "x must be floating point",
     lambda N: N.dropout_fwd(torch.ones(4, dtype=torch.int64), 0.5, _seed())),
    ("decode_linear_short_bias", "bias must be", lambda N: N.decode_linear(_x(1, 4), _x(6, 4), _STORE[:2])),
    ("decode_linear_weight_columns", "weight must be", lambda N: N.decode_linear(_x(1, 4), _x(6, 3), None)),
    ("decode_linear_weight_dtype", "weight must have x's dtype|weight must be torch.float32",
     lambda N: N.decode_linear(_x(1, 4), _x(6, 4).double(), None)),
    ("attention_v_shape", "k and v shapes differ",
     lambda N: N.attention_fwd(_x(1, 1, 8, 16), _x(1, 1, 8, 16), _x(1, 1, 2, 16), 1.0, 0.0, None)),
    ("attention_batch", "batch or head_dim",
     lambda N: N.attention_fwd(_x(2, 1, 4, 16), _x(1, 1, 4, 16), _x(1, 1, 4, 16), 1.0, 0.0, None)),
    ("attention_head_dim", "batch or head_dim",
     lambda N: N.attention_fwd(_x(1, 1, 4, 16), _x(1, 1, 4, 32), _x(1, 1, 4, 32), 1.0, 0.0, None)),
    ("attention_tq_above_tk", "Tq <= Tk",
     lambda N: N.attention_fwd(_x(1, 1, 4, 16), _x(1, 1, 3, 16), _x(1, 1, 3, 16), 1.0, 0.0, None)),
    ("attention_no_queries", "Tq <= Tk",
     lambda N: N.attention_fwd(_x(1, 1, 0, 16), _x(1, 1, 3, 16), _x(1, 1, 3, 16), 1.0, 0.0, None)),
    ("attention_not_4d", "4-D", lambda N: N.attention_fwd(_x(1, 4, 16), _x(1, 4, 16), _x(1, 4, 16), 1.0, 0.0, None)),
    ("attention_dtypes", "one dtype",
     lambda N: N.attention_fwd(_x(1, 1, 4, 16), _x(1, 1, 4, 16).double(), _x(1, 1, 4, 16), 1.0, 0.0, None)),
    ("attention_empty_seed", "seed must be",
     lambda N: N.attention_fwd(_x(1, 1, 4, 16), _x(1, 1, 4, 16), _x(1, 1, 4, 16), 1.0, 0.5,
                               torch.empty(0, dtype=torch.int64))),
    ("attention_dropout_p", "dropout_p must be in",
     lambda N: N.attention_fwd(_x(1, 1, 4, 16), _x(1, 1, 4, 16), _x(1, 1, 4, 16), 1.0, 1.5, _seed())),
    ("attention_bwd_v_shape", "k and v shapes differ",
     lambda N: N.attention_bwd(_x(1, 1, 4, 16), _x(1, 1, 4, 16), _x(1, 1, 4, 16), _x(1, 1, 2, 16),
                               _x(1, 1, 4, 16), torch.zeros(1, 1, 4), 1.0, 0.0, None)),
    ("attention_bwd_short_lse", "lse must be",
     lambda N: N.attention_bwd(_x(1, 1, 4, 16), _x(1, 1, 4, 16), _x(1, 1, 4, 16), _x(1, 1, 4, 16),
                               _x(1, 1, 4, 16), torch.zeros(1, 1, 2), 1.0, 0.0, None)),
    ("attention_bwd_out_shape", "grad_out and out must have q's shape",
     lambda N: N.attention_bwd(_x(1, 1, 4, 16), _x(1, 1, 4, 16), _x(1, 1, 4, 16), _x(1, 1, 4, 16),
                               _x(1, 1, 2, 16), torch.zeros(1, 1, 4), 1.0, 0.0, None)),
]


@pytest.mark.parametrize("pattern, call", [pytest.param(p, c, id=name) for name, p, c in CASES])
def test_triton_kernel_refuses_what_the_cpu_kernel_refuses(pattern, call):
    with pytest.raises(RuntimeError, match=pattern):
        call(kernel_namespace("cpu"))
    with pytest.raises(RuntimeError, match=f"gptfast_triton .*({pattern})"):
        call(kernel_namespace("triton"))


def test_valid_calls_still_run():
    """The checks pass the shapes the schemas describe (one call per op family)."""
    triton_ops = kernel_namespace("triton")
    out, rstd = triton_ops.rms_norm_fwd(_x(2, 8), _x(8), 1e-6)
    assert out.shape == (2, 8) and rstd.shape == (2,)
    dx, dw = triton_ops.rms_norm_bwd(_x(2, 8), _x(2, 8), _x(8), rstd)
    assert dx.shape == (2, 8) and dw.shape == (8,)
    assert triton_ops.dropout_fwd(_x(4), 0.5, _seed()).shape == (4,)
    assert triton_ops.decode_linear(_x(1, 4), _x(6, 4), _x(6)).shape == (1, 6)
    q = torch.randn(1, 2, 3, 16)
    kv = torch.randn(1, 1, 5, 16)
    out, lse = triton_ops.attention_fwd(q, kv, kv, 0.25, 0.0, None)
    dq, dk, dv = triton_ops.attention_bwd(torch.ones_like(out), q, kv, kv, out, lse, 0.25, 0.0, None)
    assert dq.shape == q.shape and dk.shape == kv.shape and dv.shape == kv.shape


def test_strided_bias_and_lse_are_read_by_their_strides():
    """A strided (or expanded) bias and lse hold the same values as dense ones: same results, no read past them."""
    triton_ops, cpu_ops = kernel_namespace("triton"), kernel_namespace("cpu")
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 32, generator=g), torch.randn(64, 32, generator=g)
    for bias in (torch.randn(128, generator=g)[::2], torch.randn(1, generator=g).expand(64)):
        torch.testing.assert_close(triton_ops.decode_linear(x, w, bias), x @ w.T + bias)
        torch.testing.assert_close(cpu_ops.decode_linear(x, w, bias), x @ w.T + bias)
    q, kv = torch.randn(1, 2, 5, 16, generator=g), torch.randn(1, 2, 5, 16, generator=g)
    out, lse = triton_ops.attention_fwd(q, kv, kv, 0.25, 0.0, None)
    grad = torch.randn(out.shape, generator=g)
    dense = triton_ops.attention_bwd(grad, q, kv, kv, out, lse, 0.25, 0.0, None)
    strided_lse = torch.empty(1, 2, 5, 2).select(-1, 0).copy_(lse)  # the same values, every other float32
    assert not strided_lse.is_contiguous()
    for got, want in zip(triton_ops.attention_bwd(grad, q, kv, kv, out, strided_lse, 0.25, 0.0, None), dense):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
