"""Limits of the Triton attention launch: grid size and 32-bit offsets.

* The kernels use one flat grid axis of ``blocks x batch*heads`` programs, so
  ``batch*heads`` above 65,535 (the limit of a CUDA grid's second axis) still launches;
  only more than 2**31 - 1 programs in all is refused, with a clear error.
* Offsets ``token * stride`` inside one batch*head switch to int64 when they could pass
  2**31 (long sequences in a (B, T, H, D) layout); the int64 path is checked for parity
  on small tensors by forcing it (no test allocates 2 GiB).
"""

from __future__ import annotations

import os

import pytest
import torch

from gptfast import ops

pytest.importorskip("triton")
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
pytestmark = pytest.mark.skipif("triton" not in ops.available_backends(), reason="triton backend unavailable")


def _attention_module():
    from gptfast.triton_kernels import attention
    return attention


def test_grid_is_one_axis_beyond_65535_batch_heads():
    attention = _attention_module()
    assert attention.flat_grid(3, 70_000) == (210_000,)
    assert attention.flat_grid(1, 65_536) == (65_536,)
    with pytest.raises(ValueError, match="more than one launch grid holds"):
        attention.flat_grid(40_000, 60_000)


def _meta(shape, strides):
    return torch.empty_strided(shape, strides, device="meta")


def test_wide_offsets_are_chosen_when_token_times_stride_passes_int32():
    attention = _attention_module()
    # (B, H, T, D) views of a (B, T, H, D) tensor with H*D = 32768: 65536 tokens reach 2**31.
    long_bthd = _meta((1, 512, 65536, 64), (65536 * 32768, 64, 32768, 1))
    assert attention.needs_wide_offsets(long_bthd)
    # GPT-2 sizes and the same long layout at 60000 tokens stay int32.
    assert not attention.needs_wide_offsets(_meta((8, 12, 1024, 64), (12 * 1024 * 64, 1024 * 64, 64, 1)))
    assert not attention.needs_wide_offsets(_meta((1, 512, 60000, 64), (60000 * 32768, 64, 32768, 1)))
    # Contiguous outputs: T * head_dim decides (16.8M tokens x 128).
    assert attention.needs_wide_offsets(_meta((1, 1, 2**24, 128), (2**31, 2**31, 128, 1)))


@pytest.mark.skipif(not INTERPRETER and not torch.cuda.is_available(), reason="needs the interpreter or a GPU")
@pytest.mark.parametrize("shape", [(2, 3, 37, 37, 16), (1, 2, 5, 40, 32)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_int64_offset_path_matches_the_int32_path(monkeypatch, shape, dropout_p):
    """The kernels compiled with int64 offsets give the same outputs and gradients (and dropout masks)."""
    attention = _attention_module()
    device = "cpu" if INTERPRETER else "cuda"
    b, h, tq, tk, d = shape
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(b, t, h, d, generator=g).to(device) for t in (tq, tk, tk)]
    results = []
    for wide in (False, True):
        monkeypatch.setattr(attention, "needs_wide_offsets", lambda *tensors, _w=wide: _w)
        leaves = [t.clone().requires_grad_(True) for t in base]
        q, k, v = (t.transpose(1, 2) for t in leaves)  # strided (B, H, T, D) views
        torch.manual_seed(1)
        out = ops.causal_attention(q, k, v, dropout_p=dropout_p, training=True, backend="triton")
        out.square().sum().backward()
        results.append([out.detach()] + [t.grad for t in leaves])
    for narrow, wide in zip(*results):
        torch.testing.assert_close(wide, narrow, atol=0, rtol=0)
    if dropout_p == 0.0:
        leaves = [t.double().requires_grad_(True) for t in base]
        expected = ops.causal_attention(*(t.transpose(1, 2) for t in leaves), backend="torch")
        torch.testing.assert_close(results[1][0].double(), expected.detach(), atol=1e-4, rtol=1e-4)


def test_only_dropout_limits_the_sequence_product():
    """Tq*Tk past 2**31 overflows only the dropout counter: without dropout the kernels still serve the call."""
    from gptfast.ops import triton_ops

    q = torch.empty(1, 2, 46_341, 64, device="meta")  # 46341**2 > 2**31 - 1
    assert triton_ops.supports("causal_attention", q, q, q, dropout_p=0.0, training=True) is None
    assert triton_ops.supports("causal_attention", q, q, q, dropout_p=0.1, training=False) is None
    reason = triton_ops.supports("causal_attention", q, q, q, dropout_p=0.1, training=True)
    assert reason is not None and "dropout" in reason
    short = torch.empty(1, 2, 46_340, 64, device="meta")
    assert triton_ops.supports("causal_attention", short, short, short, dropout_p=0.1, training=True) is None


@pytest.mark.skipif(not INTERPRETER and not torch.cuda.is_available(), reason="needs the interpreter or a GPU")
@pytest.mark.parametrize("op", ["attention_fwd", "attention_bwd"])
def test_raw_kernels_refuse_dropout_past_the_counter_range(monkeypatch, op):
    """Called directly, the kernels check the limit themselves, before any launch (the tensors are only 12 MB)."""

    def launched(*_args, **_kwargs):
        raise AssertionError("a kernel was launched before the check")

    monkeypatch.setattr(_attention_module(), "launch", launched)
    device = "cpu" if INTERPRETER else "cuda"
    q = torch.zeros(1, 1, 46_341, 16, device=device)
    seed = torch.zeros(1, dtype=torch.int64, device=device)
    kernel = getattr(torch.ops.gptfast_triton, op)
    if op == "attention_fwd":
        args = (q, q, q, 1.0, 0.1, seed)
    else:
        args = (q, q, q, q, q, torch.zeros(1, 1, 46_341, device=device), 1.0, 0.1, seed)
    with pytest.raises(RuntimeError, match=r"dropout needs Tq\*Tk <= 2\*\*31 - 1"):
        kernel(*args)
