"""Causal flash attention (FlashAttention-2 style) in Triton, forward and backward.

Layout: q ``(B, H, Tq, D)``, k/v ``(B, H_kv, Tk, D)`` with ``Tq <= Tk``; query ``i`` sits at
position ``Tk - Tq + i`` and sees keys ``j <= Tk - Tq + i`` (the KV-cache decode case).
Grouped-query attention: ``H_kv`` divides ``H`` and query head ``h`` reads kv head
``h // (H // H_kv)`` in place; nothing is expanded.

Forward: one program per (query block, batch*head).  It walks the key blocks with an
online softmax (running max and sum, base-2 exponentials) and saves the log-sum-exp
per query so the backward pass can rebuild the probabilities without storing them.
Key blocks that are fully visible run without any mask; only the blocks crossing the
diagonal are masked, and blocks entirely above it are never visited (loop bounds).

Backward: a small kernel computes ``delta = rowsum(dO * O)``, then two kernels without atomics: one program
per key block of one kv head accumulates dK and dV over the query blocks that see it, for every
query head of its group in turn, one program per query block accumulates dQ over its visible
key blocks.

Dropout on the attention weights is generated in the kernel with Philox
(``tl.rand``): key = a seed drawn from torch's generator plus the batch*head index in
the high word, counter = ``query * Tk + key``.  The backward regenerates the same
mask from the same seed tensor, so nothing of size ``T x T`` is stored.

The ops follow the shared schemas (csrc/schemas.h); their autograd formula is registered by
``gptfast.ops.attention``, which also draws the seed.
"""

from __future__ import annotations

from typing import Optional  # op schema annotations: Optional[...] is parsed by every torch version

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._checks import require, require_device, require_dtype, require_probability, require_seed, require_shape
from ._launch import INTERPRETER, dot_precision, launch, next_power_of_2

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634
# Dropout counters are int32 ``query * Tk + key`` within one batch*head.
MAX_TOKENS_SQUARED = 2**31 - 1


# --------------------------------------------------------------------------- forward

@triton.jit
def _idx(offs, WIDE: tl.constexpr):
    """Token offsets for address arithmetic: int64 when ``token * stride`` may pass 2**31.

    Dropout counters keep the int32 offsets, so masks do not depend on this choice.
    """
    if WIDE:
        return offs.to(tl.int64)
    else:
        return offs


@triton.jit
def _program_tile(n_blocks, n_heads):
    """This program's (block within its batch*head, batch*head, batch, head).

    One flat grid axis (the second axis of a CUDA grid stops at 65535 programs); the
    blocks of one batch*head are consecutive programs, as with a 2-D grid.
    """
    block = tl.program_id(0) % n_blocks
    bh = tl.program_id(0) // n_blocks
    return block, bh, bh // n_heads, bh % n_heads


@triton.jit
def _head_base(ptr, b, h, stride_b, stride_h):
    """Start of the (b, h) slice of a (B, H, T, D) tensor (int64: B*H*T*D may pass 2**31)."""
    return ptr + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@triton.jit
def _load_rows(base, offs, stride_t, offs_d, n_rows, WIDE: tl.constexpr):
    """Tokens ``offs`` of one (b, h) slice as a (tokens, head_dim) tile; tokens >= ``n_rows`` read as 0."""
    return tl.load(base + _idx(offs, WIDE)[:, None] * stride_t + offs_d[None, :], mask=(offs < n_rows)[:, None],
                   other=0.0)


@triton.jit
def _dropout_seed(seed_ptr, bh, DROPOUT: tl.constexpr):
    """Philox seed of one batch*head: the drawn seed plus ``bh`` in the high word (0 without dropout)."""
    if DROPOUT:
        return tl.load(seed_ptr) + (bh.to(tl.int64) << 32)
    else:
        return 0


@triton.jit
def _fwd_key_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                    n_start, n_end, tk, pos_offset, qk_scale, seed, dropout_p, keep_scale,
                    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DROPOUT: tl.constexpr,
                    PRECISION: tl.constexpr, WIDE: tl.constexpr):
    """Fold key blocks ``[n_start, n_end)`` into the running (acc, sum, max) of one query block."""
    for block_start in range(n_start, n_end, BLOCK_N):
        offs_n = block_start + tl.arange(0, BLOCK_N)
        if MASKED:
            in_range = offs_n < tk
            k_t = tl.load(k_base + _idx(offs_n, WIDE)[None, :] * stride_kt + offs_d[:, None],
                          mask=in_range[None, :], other=0.0)
        else:
            k_t = tl.load(k_base + _idx(offs_n, WIDE)[None, :] * stride_kt + offs_d[:, None])
        s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale
        if MASKED:
            visible = (offs_n[None, :] <= pos_offset + offs_m[:, None]) & in_range[None, :]
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Shift by 0 while every score seen is -inf, so exp2 never sees (-inf) - (-inf): its NaN would stay in
        # the running sum and output after a later block's finite scores.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - shift[:, None])
        alpha = tl.exp2(m_i - shift)
        # The normaliser uses the undropped weights: dropout acts after the softmax.
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            r = tl.rand(seed, offs_m[:, None] * tk + offs_n[None, :])
            # Multiplied by the mask, not replaced: a dropped NaN weight stays NaN, as in torch's dropout.
            p = p * tl.where(r >= dropout_p, keep_scale, 0.0)
        if MASKED:
            v = _load_rows(v_base, offs_n, stride_vt, offs_d, tk, WIDE)
        else:
            v = tl.load(v_base + _idx(offs_n, WIDE)[:, None] * stride_vt + offs_d[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, seed_ptr,
                          sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_h, so_t,
                          n_heads, group, tq, tk, qk_scale, dropout_p, keep_scale,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                          DROPOUT: tl.constexpr, PRECISION: tl.constexpr, WIDE: tl.constexpr):
    m_block, bh, b, h = _program_tile(tl.cdiv(tq, BLOCK_M), n_heads)
    start_m = m_block * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < tq
    pos_offset = tk - tq

    k_base = _head_base(k_ptr, b, h // group, sk_b, sk_h)
    v_base = _head_base(v_ptr, b, h // group, sv_b, sv_h)
    q = _load_rows(_head_base(q_ptr, b, h, sq_b, sq_h), offs_m, sq_t, offs_d, tq, WIDE)
    seed = _dropout_seed(seed_ptr, bh, DROPOUT)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Keys before `full_end` are visible to every query of this block: no mask needed.
    full_end = ((pos_offset + start_m + 1) // BLOCK_N) * BLOCK_N
    # Keys past the last query's position are never visited.
    causal_end = tl.minimum(tk, pos_offset + start_m + BLOCK_M)
    acc, l_i, m_i = _fwd_key_blocks(acc, l_i, m_i, q, k_base, v_base, sk_t, sv_t, offs_m, offs_d,
                                    0, full_end, tk, pos_offset, qk_scale, seed, dropout_p, keep_scale,
                                    BLOCK_N, False, DROPOUT, PRECISION, WIDE)
    acc, l_i, m_i = _fwd_key_blocks(acc, l_i, m_i, q, k_base, v_base, sk_t, sv_t, offs_m, offs_d,
                                    full_end, causal_end, tk, pos_offset, qk_scale, seed, dropout_p,
                                    keep_scale, BLOCK_N, True, DROPOUT, PRECISION, WIDE)

    out = acc / l_i[:, None]
    o_base = _head_base(o_ptr, b, h, so_b, so_h)
    tl.store(o_base + _idx(offs_m, WIDE)[:, None] * so_t + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None])
    # Log-sum-exp in base 2 of the scaled scores, what the backward needs to rebuild p.
    tl.store(lse_ptr + bh.to(tl.int64) * tq + offs_m, m_i + tl.log2(l_i), mask=row_ok)


# --------------------------------------------------------------------------- backward

@triton.jit
def _attention_delta_kernel(o_ptr, do_ptr, delta_ptr, so_b, so_h, so_t, sdo_b, sdo_h, sdo_t, n_heads, tq,
                            BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, WIDE: tl.constexpr):
    """``delta = rowsum(dO * O)`` in float32, one (query block, batch*head) per program."""
    m_block, bh, b, h = _program_tile(tl.cdiv(tq, BLOCK_M), n_heads)
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < tq
    o = _load_rows(_head_base(o_ptr, b, h, so_b, so_h), offs_m, so_t, offs_d, tq, WIDE).to(tl.float32)
    do = _load_rows(_head_base(do_ptr, b, h, sdo_b, sdo_h), offs_m, sdo_t, offs_d, tq, WIDE).to(tl.float32)
    tl.store(delta_ptr + bh.to(tl.int64) * tq + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _dkdv_query_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sq_t, sdo_t, offs_n, offs_d,
                       m_start, m_end, tq, tk, pos_offset, qk_scale, seed, dropout_p, keep_scale,
                       BLOCK_M: tl.constexpr, MASKED: tl.constexpr, DROPOUT: tl.constexpr,
                       PRECISION: tl.constexpr, WIDE: tl.constexpr):
    """Add the contributions of query blocks ``[m_start, m_end)`` to one key block's dK, dV."""
    for block_start in range(m_start, m_end, BLOCK_M):
        offs_m = block_start + tl.arange(0, BLOCK_M)
        row_ok = offs_m < tq
        q_t = tl.load(q_base + _idx(offs_m, WIDE)[None, :] * sq_t + offs_d[:, None], mask=row_ok[None, :], other=0.0)
        do = _load_rows(do_base, offs_m, sdo_t, offs_d, tq, WIDE)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        s_t = tl.dot(k, q_t, input_precision=PRECISION) * qk_scale  # (keys, queries)
        # Rows past Tq get probability 0: their zero queries times an infinite key would score NaN.
        p_t = tl.where(row_ok[None, :], tl.exp2(s_t - lse[None, :]), 0.0)
        if MASKED:
            p_t = tl.where(offs_n[:, None] <= pos_offset + offs_m[None, :], p_t, 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        if DROPOUT:
            r = tl.rand(seed, offs_m[None, :] * tk + offs_n[:, None])
            factor = tl.where(r >= dropout_p, keep_scale, 0.0)
            dv = tl.dot((p_t * factor).to(do.dtype), do, dv, input_precision=PRECISION)
            dp_t = dp_t * factor
        else:
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if MASKED:  # behind the causal mask the oracle's masked_fill zeroes the gradient, whatever dP holds
            ds_t = tl.where(offs_n[:, None] <= pos_offset + offs_m[None, :], ds_t, 0.0)
        dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attention_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, seed_ptr,
                           sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sdo_b, sdo_h, sdo_t,
                           n_heads, group, tq, tk, scale, qk_scale, dropout_p, keep_scale,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                           DROPOUT: tl.constexpr, PRECISION: tl.constexpr, WIDE: tl.constexpr):
    # One program per key block of one (batch, kv head); n_heads counts the query heads.
    n_block, bkv, b, hk = _program_tile(tl.cdiv(tk, BLOCK_N), n_heads // group)
    start_n = n_block * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < tk
    pos_offset = tk - tq

    k = _load_rows(_head_base(k_ptr, b, hk, sk_b, sk_h), offs_n, sk_t, offs_d, tk, WIDE)
    v = _load_rows(_head_base(v_ptr, b, hk, sv_b, sv_h), offs_n, sv_t, offs_d, tk, WIDE)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # Queries before the first one that sees key `start_n` contribute nothing: skipped.
    first_m = (tl.maximum(start_n - pos_offset, 0) // BLOCK_M) * BLOCK_M
    # From `full_m` on, every query sees the whole key block: no causal mask.
    full_m = tl.maximum(start_n + BLOCK_N - 1 - pos_offset, 0)
    full_m = first_m + tl.cdiv(tl.maximum(full_m - first_m, 0), BLOCK_M) * BLOCK_M
    full_m = tl.minimum(full_m, tl.cdiv(tq, BLOCK_M) * BLOCK_M)
    # The group's query heads in turn: this program owns the key block, so the sum needs no atomics.
    for g in range(0, group):
        h = hk * group + g
        bh = b * n_heads + h
        q_base = _head_base(q_ptr, b, h, sq_b, sq_h)
        do_base = _head_base(do_ptr, b, h, sdo_b, sdo_h)
        lse_base = lse_ptr + bh.to(tl.int64) * tq
        delta_base = delta_ptr + bh.to(tl.int64) * tq
        seed = _dropout_seed(seed_ptr, bh, DROPOUT)
        dk, dv = _dkdv_query_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sq_t, sdo_t, offs_n,
                                    offs_d, first_m, full_m, tq, tk, pos_offset, qk_scale, seed, dropout_p,
                                    keep_scale, BLOCK_M, True, DROPOUT, PRECISION, WIDE)
        dk, dv = _dkdv_query_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sq_t, sdo_t, offs_n,
                                    offs_d, full_m, tq, tq, tk, pos_offset, qk_scale, seed, dropout_p, keep_scale,
                                    BLOCK_M, False, DROPOUT, PRECISION, WIDE)

    # dK and dV are written contiguous (B, H_kv, Tk, D).
    out_offs = bkv.to(tl.int64) * tk * HEAD_DIM + _idx(offs_n, WIDE)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(dk_ptr + out_offs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=key_ok[:, None])
    tl.store(dv_ptr + out_offs, dv.to(dv_ptr.dtype.element_ty), mask=key_ok[:, None])


@triton.jit
def _dq_key_blocks(dq, q, do, lse, delta, k_base, v_base, sk_t, sv_t, offs_m, offs_d, n_start, n_end, tk,
                   pos_offset, qk_scale, seed, dropout_p, keep_scale,
                   BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                   WIDE: tl.constexpr):
    """Add the contributions of key blocks ``[n_start, n_end)`` to one query block's dQ."""
    for block_start in range(n_start, n_end, BLOCK_N):
        offs_n = block_start + tl.arange(0, BLOCK_N)
        if MASKED:
            in_range = offs_n < tk
            k = _load_rows(k_base, offs_n, sk_t, offs_d, tk, WIDE)
            v = _load_rows(v_base, offs_n, sv_t, offs_d, tk, WIDE)
        else:
            k = tl.load(k_base + _idx(offs_n, WIDE)[:, None] * sk_t + offs_d[None, :])
            v = tl.load(v_base + _idx(offs_n, WIDE)[:, None] * sv_t + offs_d[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            visible = (offs_n[None, :] <= pos_offset + offs_m[:, None]) & in_range[None, :]
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            r = tl.rand(seed, offs_m[:, None] * tk + offs_n[None, :])
            dp = dp * tl.where(r >= dropout_p, keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if MASKED:  # behind the causal mask the oracle's masked_fill zeroes the gradient, whatever dP holds
            ds = tl.where(visible, ds, 0.0)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attention_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, seed_ptr,
                         sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sdo_b, sdo_h, sdo_t,
                         n_heads, group, tq, tk, scale, qk_scale, dropout_p, keep_scale,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                         DROPOUT: tl.constexpr, PRECISION: tl.constexpr, WIDE: tl.constexpr):
    m_block, bh, b, h = _program_tile(tl.cdiv(tq, BLOCK_M), n_heads)
    start_m = m_block * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < tq
    pos_offset = tk - tq

    q = _load_rows(_head_base(q_ptr, b, h, sq_b, sq_h), offs_m, sq_t, offs_d, tq, WIDE)
    do = _load_rows(_head_base(do_ptr, b, h, sdo_b, sdo_h), offs_m, sdo_t, offs_d, tq, WIDE)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * tq + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_ptr + bh.to(tl.int64) * tq + offs_m, mask=row_ok, other=0.0)
    k_base = _head_base(k_ptr, b, h // group, sk_b, sk_h)
    v_base = _head_base(v_ptr, b, h // group, sv_b, sv_h)
    seed = _dropout_seed(seed_ptr, bh, DROPOUT)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full_end = ((pos_offset + start_m + 1) // BLOCK_N) * BLOCK_N
    causal_end = tl.minimum(tk, pos_offset + start_m + BLOCK_M)
    dq = _dq_key_blocks(dq, q, do, lse, delta, k_base, v_base, sk_t, sv_t, offs_m, offs_d, 0, full_end, tk,
                        pos_offset, qk_scale, seed, dropout_p, keep_scale, BLOCK_N, False, DROPOUT, PRECISION, WIDE)
    dq = _dq_key_blocks(dq, q, do, lse, delta, k_base, v_base, sk_t, sv_t, offs_m, offs_d, full_end, causal_end,
                        tk, pos_offset, qk_scale, seed, dropout_p, keep_scale, BLOCK_N, True, DROPOUT, PRECISION, WIDE)

    out_offs = bh.to(tl.int64) * tq * HEAD_DIM + _idx(offs_m, WIDE)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(dq_ptr + out_offs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


# --------------------------------------------------------------------------- host side

def _fwd_config(head_dim: int, dtype: torch.dtype, tq: int) -> dict:
    """Tile sizes for the forward kernel (small in the interpreter so tests cover several tiles)."""
    if INTERPRETER:
        return dict(BLOCK_M=32, BLOCK_N=16)
    if dtype == torch.float32 or head_dim == 128:
        cfg = dict(BLOCK_M=64, BLOCK_N=32 if dtype == torch.float32 else 64, num_warps=4, num_stages=2)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    # Decoding (few queries): a small query tile instead of 128 mostly-empty rows; tl.dot needs >= 16.
    cfg["BLOCK_M"] = min(cfg["BLOCK_M"], max(16, next_power_of_2(tq)))
    return cfg


def _bwd_configs(head_dim: int, dtype: torch.dtype) -> tuple[dict, dict]:
    """Tile sizes for the (dK, dV) and dQ kernels."""
    if INTERPRETER:
        return dict(BLOCK_M=16, BLOCK_N=32), dict(BLOCK_M=32, BLOCK_N=16)
    small = dtype == torch.float32 or head_dim == 128
    block = 32 if small else 64
    launch_cfg = dict(num_warps=4, num_stages=2 if small else 3)
    return dict(BLOCK_M=block, BLOCK_N=block, **launch_cfg), dict(BLOCK_M=block, BLOCK_N=block, **launch_cfg)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# A grid axis holds at most 2**31 - 1 programs; the kernels use one flat axis.
MAX_PROGRAMS = 2**31 - 1
# Offsets within one batch*head are int32 unless ``token * stride`` may reach 2**31.
_INT32_LIMIT = 2**31


def flat_grid(blocks_per_head: int, batch_heads: int) -> tuple[int]:
    """One grid axis of ``blocks_per_head * batch_heads`` programs (no 65535 limit on batch*heads)."""
    programs = blocks_per_head * batch_heads
    if programs > MAX_PROGRAMS:
        raise ValueError(f"causal attention needs {programs} Triton programs ({blocks_per_head} blocks x "
                         f"{batch_heads} batch*heads), more than one launch grid holds ({MAX_PROGRAMS})")
    return (programs,)


def needs_wide_offsets(*tensors: torch.Tensor) -> bool:
    """True when an offset ``token * stride`` (or ``token * head_dim``) inside one batch*head can pass int32.

    The margin of 256 tokens covers the masked lanes of a last, partial tile.
    """
    for t in tensors:
        reach = (t.shape[2] + 256) * max(t.stride(2), t.shape[3], 1)
        if reach >= _INT32_LIMIT:
            return True
    return False


def _check_heads(q: torch.Tensor, k: torch.Tensor) -> None:
    """The kernels index a key/value head as ``h // group``: the query heads must be a whole multiple of them,
    with at least one query head per key/value head (a group of 0 divides by zero)."""
    h, h_kv = q.shape[1], k.shape[1]
    if not (h == h_kv or (h_kv >= 1 and h >= h_kv and h % h_kv == 0)):
        raise ValueError(f"gptfast_triton attention: q's heads must be a whole multiple of k's, got {h} and {h_kv}")


def _check_qkv(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """The shapes the kernels index: q ``(B, H, Tq, D)``, k and v ``(B, H_kv, Tk, D)``, ``1 <= Tq <= Tk``."""
    require(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, op,
            f"q, k, v must be 4-D, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    require_device(op, "q", q, k=k, v=v)
    require(k.dtype == q.dtype and v.dtype == q.dtype, op,
            f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    require(tuple(k.shape) == tuple(v.shape), op, f"k and v shapes differ: {tuple(k.shape)} and {tuple(v.shape)}")
    require(q.shape[0] == k.shape[0] and q.shape[3] == k.shape[3], op,
            f"q and k disagree in batch or head_dim: {tuple(q.shape)} and {tuple(k.shape)}")
    _check_heads(q, k)
    require(q.shape[2] >= 1 and q.shape[2] <= k.shape[2], op,
            f"need 1 <= Tq <= Tk, got Tq {q.shape[2]}, Tk {k.shape[2]}")


def _check_backward_inputs(grad_out: torch.Tensor, q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """grad_out and out like q; lse the forward's float32 ``(B, H, Tq)``."""
    op = "attention_bwd"
    require_device(op, "q", q, grad_out=grad_out, out=out, lse=lse)
    require(tuple(grad_out.shape) == tuple(q.shape) and tuple(out.shape) == tuple(q.shape), op,
            f"grad_out and out must have q's shape {tuple(q.shape)}, got {tuple(grad_out.shape)} and "
            f"{tuple(out.shape)}")
    require(grad_out.dtype == q.dtype and out.dtype == q.dtype, op,
            f"grad_out and out must have q's dtype {q.dtype}, got {grad_out.dtype} and {out.dtype}")
    require_shape(op, "lse", lse, tuple(q.shape[:3]))
    require_dtype(op, "lse", lse, torch.float32)


def _dropout_args(dropout_p: float, seed: torch.Tensor | None, op: str, q: torch.Tensor,
                  k_len: int) -> tuple[bool, float]:
    """(dropout on?, scale of kept weights); p = 1 drops everything, like F.dropout."""
    require_probability(op, "dropout_p", dropout_p)
    active = dropout_p > 0.0
    if active and seed is None:
        raise ValueError("gptfast_triton attention: dropout_p > 0 needs a seed tensor")
    if active:
        require_seed(op, seed, "q", q)
        require(q.shape[2] * k_len <= MAX_TOKENS_SQUARED, op,
                f"dropout needs Tq*Tk <= 2**31 - 1 (its int32 counter), got {q.shape[2]} x {k_len}")
    keep_scale = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
    return active, keep_scale


@triton_op("gptfast_triton::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float,
                  seed: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention forward; returns ``(out, lse)`` with lse ``(B, H, Tq)`` float32 (base 2)."""
    _check_qkv("attention_fwd", q, k, v)
    dropout, keep_scale = _dropout_args(dropout_p, seed, "attention_fwd", q, k.shape[2])
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    b, h, tq, d = q.shape
    tk = k.shape[2]
    out = torch.empty((b, h, tq, d), device=q.device, dtype=q.dtype)
    lse = torch.empty((b, h, tq), device=q.device, dtype=torch.float32)
    cfg = _fwd_config(d, q.dtype, tq)
    grid = flat_grid(triton.cdiv(tq, cfg["BLOCK_M"]), b * h)
    launch(_attention_fwd_kernel, grid, q, k, v, out, lse, seed if dropout else lse,
           *_strides(q), *_strides(k), *_strides(v), *_strides(out),
           h, h // max(k.shape[1], 1), tq, tk, scale * LOG2E, dropout_p, keep_scale,
           HEAD_DIM=d, DROPOUT=dropout, PRECISION=dot_precision(q.dtype),
           WIDE=needs_wide_offsets(q, k, v, out), **cfg)
    return out, lse


@triton_op("gptfast_triton::attention_bwd", mutates_args=())
def attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, scale: float, dropout_p: float,
                  seed: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of causal attention, recomputing the probabilities from ``lse``."""
    _check_qkv("attention_bwd", q, k, v)
    _check_backward_inputs(grad_out, q, out, lse)
    dropout, keep_scale = _dropout_args(dropout_p, seed, "attention_bwd", q, k.shape[2])
    q, k, v, grad_out = (_last_dim_contiguous(t) for t in (q, k, v, grad_out))
    b, h, tq, d = q.shape
    tk = k.shape[2]
    out = _last_dim_contiguous(out)
    lse = lse.contiguous()  # the kernels index it as a dense (B, H, Tq) buffer
    # delta_i = sum_j P_ij dP_ij = rowsum(dO * O), also with dropout (O already holds the mask).
    delta = torch.empty((b, h, tq), device=q.device, dtype=torch.float32)
    delta_block = 32 if INTERPRETER else 64
    wide = needs_wide_offsets(q, k, v, out, grad_out)
    launch(_attention_delta_kernel, flat_grid(triton.cdiv(tq, delta_block), b * h), out, grad_out, delta,
           *_strides(out), *_strides(grad_out), h, tq, BLOCK_M=delta_block, HEAD_DIM=d, WIDE=wide)
    dq = torch.empty((b, h, tq, d), device=q.device, dtype=q.dtype)
    h_kv = k.shape[1]
    dk = torch.empty((b, h_kv, tk, d), device=q.device, dtype=k.dtype)
    dv = torch.empty((b, h_kv, tk, d), device=q.device, dtype=v.dtype)
    seed_ptr = seed if dropout else lse  # never read without dropout
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out),
              h, h // max(h_kv, 1), tq, tk, scale, scale * LOG2E, dropout_p, keep_scale)
    consts = dict(HEAD_DIM=d, DROPOUT=dropout, PRECISION=dot_precision(q.dtype), WIDE=wide)
    kv_cfg, q_cfg = _bwd_configs(d, q.dtype)
    launch(_attention_dkdv_kernel, flat_grid(triton.cdiv(tk, kv_cfg["BLOCK_N"]), b * h_kv),
           q, k, v, grad_out, lse, delta, dk, dv, seed_ptr, *common, **consts, **kv_cfg)
    launch(_attention_dq_kernel, flat_grid(triton.cdiv(tq, q_cfg["BLOCK_M"]), b * h),
           q, k, v, grad_out, lse, delta, dq, seed_ptr, *common, **consts, **q_cfg)
    return dq, dk, dv


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, dropout: bool) -> str | None:
    """``None`` if these kernels can run this attention call (with attention dropout or not), else why not."""
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} is not supported (float32/float16/bfloat16)"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head_dim {q.shape[-1]} is not supported (one of {HEAD_DIMS})"
    if dropout and q.shape[2] * k.shape[2] > MAX_TOKENS_SQUARED:
        return f"Tq*Tk = {q.shape[2] * k.shape[2]} exceeds the dropout counter range 2**31"
    return None

