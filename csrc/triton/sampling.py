"""Top-k / temperature sampling in Triton without sorting.

Each program handles a tile of rows.  With top-k, the k-th largest logit of every
row is found exactly by a counting bisection over the 32-bit ordered integer image
of the float values (``_kth_largest_key``): no sort, no (B, k) buffers.  Everything
at or above that threshold is kept, so ties at the k-th value survive, as in the
reference.

The draw itself is a Gumbel-max over the kept tokens: ``argmax(x / T + G)`` with
``G = -log(E)``, ``E ~ Exp(1)``, has exactly the distribution ``softmax(x / T)`` restricted
to the kept set.  ``E`` is made from two Philox words (``tl.randint4x``, see
``_exponential``) keyed by a seed tensor drawn from
torch's generator on the device, so there is no host synchronisation and the op can
be captured in a CUDA graph.  Rows with temperature 0 take the plain argmax (first
index on ties, like ``torch.argmax``).

Non-finite logits (no host synchronisation, so no exception): greedy rows follow
``torch.argmax`` exactly (the first NaN wins).  A sampled row whose logits hold a NaN or
+inf, or are all -inf, has no softmax to draw from; it returns its ``torch.argmax``
instead (the torch and CPU backends raise there).  The CUDA kernel follows the same
rule, so every backend returns an id in ``[0, V)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import require, require_device, require_floating, require_integer
from ._launch import INTERPRETER, draw_seed, next_power_of_2

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _ordered_key(x):
    """int32 whose signed order is the float order of ``x`` (with -0 folded onto +0)."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _key_to_float(key):
    """Inverse of ``_ordered_key`` (keys outside int32 wrap; callers check the result)."""
    key32 = key.to(tl.int32)
    return tl.where(key32 < 0, key32 ^ 0x7FFFFFFF, key32).to(tl.float32, bitcast=True)


_VALUE_SWEEPS = tl.constexpr(16)  # value-space midpoints before the keys take every other sweep


@triton.jit
def _kth_largest_key(row_base, row_ok, k, n_cols, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """Key of each row's k-th largest value, by a bisection that snaps to the row's own values.

    Invariant: ``lo`` is a key present in the row with ``count(key >= lo) >= k``, and
    ``count(key >= hi) < k``.  Each sweep counts the keys ``>= mid`` for a midpoint taken
    in value space (key space as a fallback) and moves ``lo`` up to the smallest key
    ``>= mid`` or ``hi`` down to just above the largest key ``< mid``.  A row is done
    once exactly k keys are ``>= lo`` or ``hi = lo + 1``; typical logits need far fewer
    sweeps than the 32 a plain bisection over 32-bit keys takes.  A value midpoint need
    not halve the key range, though (values spread over many powers of two move ``lo`` one
    value per sweep), so after ``_VALUE_SWEEPS`` sweeps every other sweep bisects the keys:
    that ends every row within ``_VALUE_SWEEPS + 2 * 33`` sweeps.
    """
    big = tl.full([BLOCK_R], 2147483648, tl.int64)
    lo = big
    hi = -big
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (cols[None, :] < n_cols)
        key = _ordered_key(tl.load(row_base + cols[None, :], mask=ok, other=0.0).to(tl.float32)).to(tl.int64)
        lo = tl.minimum(lo, tl.min(tl.where(ok, key, big[:, None]), 1))
        hi = tl.maximum(hi, tl.max(tl.where(ok, key, -big[:, None]), 1) + 1)
    done = (hi - lo <= 1) | (k >= n_cols) | (row_ok == 0)
    active = tl.sum((done == 0).to(tl.int32), 0)
    sweeps = tl.zeros([], tl.int32)
    while (active > 0) & (sweeps < _VALUE_SWEEPS + 80):  # a guard only: rows end by 16 + 66 sweeps
        lo_v = _key_to_float(lo)
        hi_v = _key_to_float(hi)
        mid = _ordered_key(lo_v + (hi_v - lo_v) * 0.5).to(tl.int64)
        # Infinite, NaN or adjacent endpoints, or the keys' turn: the midpoint of the keys.
        values_turn = (sweeps < _VALUE_SWEEPS) | (sweeps % 2 == 0)
        mid = tl.where((mid > lo) & (mid < hi) & values_turn, mid, lo + (hi - lo) // 2)
        count = tl.zeros([BLOCK_R], tl.int64)
        min_above = hi
        max_below = lo
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            ok = row_ok[:, None] & (cols[None, :] < n_cols)
            key = _ordered_key(tl.load(row_base + cols[None, :], mask=ok, other=0.0).to(tl.float32)).to(tl.int64)
            above = ok & (key >= mid[:, None])
            count += tl.sum(above.to(tl.int64), 1)
            min_above = tl.minimum(min_above, tl.min(tl.where(above, key, hi[:, None]), 1))
            max_below = tl.maximum(max_below, tl.max(tl.where(ok & (key < mid[:, None]), key, lo[:, None]), 1))
        enough = count >= k
        # Too few at mid: nothing lies in (max_below, mid), so count(key >= max_below + 1) < k too.
        lo = tl.where(done | (enough == 0), lo, min_above)
        hi = tl.where(done | enough, hi, max_below + 1)
        # Exactly k at or above lo (or no key left between lo and hi): lo is the k-th largest.
        done = done | (enough & (count == k)) | (hi - lo <= 1)
        active = tl.sum((done == 0).to(tl.int32), 0)
        sweeps += 1
    return lo


_TWO_POW_M23 = tl.constexpr(1.1920928955078125e-07)
_TWO_POW_M24 = tl.constexpr(5.9604644775390625e-08)
_TWO_POW_M46 = tl.constexpr(1.4210854715202004e-14)


@triton.jit
def _exponential(word0, word1):
    """An Exp(1) draw ``-log(1 - v)`` from two uniform 32-bit words: finite, > 0, down to ~2**-47.

    ``word0`` picks one of 2**23 equal buckets of [0, 1) and ``word1`` the point inside it.
    Below 1/2 fp32 holds that sum to 24 significant bits, so ``v`` keeps its relative
    precision down to 2**-47; from 1/2 up ``v`` is the bucket's midpoint, which keeps it
    exact and below 1 (a sum could round up to 1 and give an infinite draw).

    Small draws are what let a token far below the top one win the race, so their
    resolution sets how far into the tail the sampler reaches: a token ``Δ = (x_top - x) / T``
    below needs ``E`` about ``e**-Δ``, which ``-log(tl.rand())`` (never above 1 - 2**-23,
    so never below 1.2e-7) cannot give beyond Δ ≈ 16; here the limit is Δ ≈ 32, where
    each token left out has probability below 1e-13.
    """
    high = (word0 >> 9).to(tl.float32) * _TWO_POW_M23
    low = ((word1 >> 9).to(tl.float32) + 0.5) * _TWO_POW_M46
    v = tl.where(high < 0.5, high + low, high + _TWO_POW_M24)
    # -log1p(-v) by its series below 1/16 (error < v**7): the GPU's fp32 log has an
    # absolute, not relative, error near 1, which would swamp the small draws.
    series = v * (1.0 + v * (0.5 + v * (1.0 / 3.0 + v * (0.25 + v * (0.2 + v * (1.0 / 6.0))))))
    return tl.where(v < 0.0625, series, -tl.log(1.0 - v))


@triton.jit
def _row_argmax(row_base, row_ok, n_cols, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """torch.argmax of each row (the first NaN wins, else the first maximum), and the row's max.

    Returns ``(index, max_value, has_nan)``; ``max_value`` ignores NaN (it is what the
    draw shifts by, and only rows without NaN are drawn from).
    """
    no_nan = tl.full([BLOCK_R], 2147483647, tl.int64)
    first_nan = no_nan
    best_value = tl.full([BLOCK_R], float("-inf"), tl.float32)
    best_index = tl.zeros([BLOCK_R], tl.int64)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (cols[None, :] < n_cols)
        x = tl.load(row_base + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
        is_nan = x != x
        first_nan = tl.minimum(first_nan, tl.min(tl.where(is_nan, cols[None, :].to(tl.int64), no_nan[:, None]), 1))
        # NaN taken out before max/argmax: their NaN handling differs between the GPU and the interpreter.
        x = tl.where(is_nan, float("-inf"), x)
        block_best = tl.max(x, 1)
        block_index = tl.argmax(x, 1, tie_break_left=True).to(tl.int64) + start
        better = block_best > best_value  # strict: the earlier index wins ties, as torch.argmax
        best_index = tl.where(better, block_index, best_index)
        best_value = tl.where(better, block_best, best_value)
    has_nan = first_nan < n_cols
    return tl.where(has_nan, first_nan, best_index), best_value, has_nan


@triton.jit
def _sample_kernel(logits_ptr, row_stride, out_ptr, seed_ptr, temperature_ptr, temperature_value,
                   top_k_ptr, top_k_value, n_rows, n_cols,
                   BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, PER_ROW_T: tl.constexpr,
                   PER_ROW_K: tl.constexpr, HAS_TOP_K: tl.constexpr, GREEDY_ONLY: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    row_base = logits_ptr + rows.to(tl.int64)[:, None] * row_stride

    # Every row's greedy answer first: it is also the fallback of a row that cannot be drawn from.
    greedy_index, max_value, has_nan = _row_argmax(row_base, row_ok, n_cols, BLOCK_R, BLOCK_V)
    if GREEDY_ONLY:
        tl.store(out_ptr + rows, greedy_index, mask=row_ok)
    else:
        if PER_ROW_T:
            temperature = tl.load(temperature_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        else:
            temperature = tl.full([BLOCK_R], temperature_value, tl.float32)
        inv_t = 1.0 / tl.where(temperature > 0.0, temperature, 1.0)
        # Greedy: temperature 0 (and anything not > 0), or so small that 1 / T overflows.
        sampling = (temperature > 0.0) & (inv_t < float("inf"))
        # softmax(x / T) is undefined for a row holding NaN or +inf, or only -inf: such rows
        # take their argmax (no host sync to raise; the same rule as the CUDA kernel).
        drawable = sampling & (has_nan == 0) & (max_value > float("-inf")) & (max_value < float("inf"))
        draw_rows = row_ok & drawable

        threshold = tl.full([BLOCK_R], -2147483648, tl.int64)
        if HAS_TOP_K:
            if PER_ROW_K:
                k = tl.load(top_k_ptr + rows, mask=row_ok, other=1).to(tl.int64)
            else:
                k = tl.full([BLOCK_R], top_k_value, tl.int64)
            k = tl.minimum(tl.maximum(k, 1), n_cols)  # out-of-range k on the GPU is clamped, not trusted
            threshold = _kth_largest_key(row_base, draw_rows, k, n_cols, BLOCK_R, BLOCK_V)

        # Philox key: seed in the low word, row index in the high word; counter: column.
        row_seed = tl.load(seed_ptr) + (rows.to(tl.int64) << 32)
        shift = tl.where(drawable, max_value, 0.0)
        best_score = tl.full([BLOCK_R], float("-inf"), tl.float32)
        best_index = tl.full([BLOCK_R], n_cols, tl.int64)  # n_cols: nothing drawn yet
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            ok = draw_rows[:, None] & (cols[None, :] < n_cols)
            x = tl.load(row_base + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
            word0, word1, _, _ = tl.randint4x(row_seed[:, None], tl.broadcast_to(cols[None, :], [BLOCK_R, BLOCK_V]))
            gumbel = -tl.log(_exponential(word0, word1))
            # A -inf logit is never kept: at T = inf its (-inf) * 0 would be a NaN score (softmax(x / T) tends to
            # uniform over the finite logits).
            kept = ok & (_ordered_key(x).to(tl.int64) >= threshold[:, None]) & (x > float("-inf"))
            # Shifted by the row max so x / T cannot overflow; scores are finite or -inf, never NaN.
            score = tl.where(kept, (x - shift[:, None]) * inv_t[:, None] + gumbel, float("-inf"))
            block_best = tl.max(score, 1)
            block_index = tl.argmax(score, 1, tie_break_left=True).to(tl.int64) + start
            better = block_best > best_score
            best_index = tl.where(better, block_index, best_index)
            best_score = tl.where(better, block_best, best_score)
        # Every kept score -inf ((x - max) / T overflowing for all of them) also falls back to the argmax.
        drawn = drawable & (best_index < n_cols)
        tl.store(out_ptr + rows, tl.where(drawn, best_index, greedy_index), mask=row_ok)


def _config(n_rows: int, n_cols: int) -> dict:
    if INTERPRETER:  # few, large tiles: the interpreter's cost is per operation, not per element
        block_v = min(next_power_of_2(n_cols), 4096)
        return dict(BLOCK_R=max(1, min(next_power_of_2(n_rows), 32768 // block_v, 1024)), BLOCK_V=block_v)
    block_v = min(next_power_of_2(n_cols), 4096)
    block_r = max(1, min(next_power_of_2(n_rows), 4096 // block_v, 64))
    return dict(BLOCK_R=block_r, BLOCK_V=block_v, num_warps=8 if block_r * block_v >= 4096 else 4)


def _check_args(logits: torch.Tensor, temperature: torch.Tensor | None, top_k: torch.Tensor | None) -> None:
    """The kernel reads one temperature and one top-k per row of ``logits`` ``(B, V)``."""
    op = "sample_next_token"
    require(logits.dim() == 2 and logits.shape[1] > 0, op, f"logits must be (B, V), got {tuple(logits.shape)}")
    require_device(op, "logits", logits, temperature=temperature, top_k=top_k)
    rows = logits.shape[0]
    for name, per_row in (("temperature", temperature), ("top_k", top_k)):
        if per_row is not None:
            require(per_row.dim() == 1 and per_row.shape[0] == rows, op,
                    f"{name} must be ({rows},), got {tuple(per_row.shape)}")
    if temperature is not None:
        require_floating(op, temperature=temperature)
    if top_k is not None:
        require_integer(op, "top_k", top_k)  # a float k would be truncated (0.2 to 0, then clamped to 1)


def _sample_next_token(logits, temperature, temperature_value, top_k, top_k_value, generator):
    """Next token per row, ``(B, 1)`` int64.

    ``temperature``/``top_k`` are per-row tensors or None (then the scalar
    ``temperature_value``/``top_k_value`` applies; ``top_k_value`` = V means no top-k).
    A Philox seed is drawn from ``generator`` on the device (none for greedy calls).
    """
    _check_args(logits, temperature, top_k)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    # The kernel reads per-row values at unit stride (they are B numbers: copying is free).
    temperature = temperature.contiguous() if temperature is not None else None
    top_k = top_k.contiguous() if top_k is not None else None
    n_rows, n_cols = logits.shape
    out = torch.empty((n_rows, 1), device=logits.device, dtype=torch.int64)
    has_top_k = top_k is not None or 0 < top_k_value < n_cols
    greedy = temperature is None and temperature_value <= 0.0
    # Greedy decoding consumes no random numbers, like the torch path.
    seed = logits.new_zeros(1, dtype=torch.int64) if greedy else draw_seed(logits.device, generator)
    cfg = _config(n_rows, n_cols)
    # An absent per-row tensor is never read; logits stands in for its pointer.
    _sample_kernel[(triton.cdiv(n_rows, cfg["BLOCK_R"]),)](
        logits, logits.stride(0), out, seed, temperature if temperature is not None else logits, temperature_value,
        top_k if top_k is not None else logits, top_k_value, n_rows, n_cols,
        PER_ROW_T=temperature is not None, PER_ROW_K=top_k is not None, HAS_TOP_K=has_top_k,
        GREEDY_ONLY=greedy, **cfg)
    return out


# The shared schema (csrc/schemas.h).  It takes the caller's torch.Generator, which triton_op cannot
# declare (its schema is inferred from annotations, and Generator is not among the inferable types),
# so this one op is a plain custom op: opaque to torch.compile, like the C++ sampling ops; its fake
# is registered by gptfast.ops.sampling, as for every namespace.
sample_next_token = torch.library.custom_op(
    "gptfast_triton::sample_next_token", _sample_next_token, mutates_args=(),
    schema="(Tensor logits, Tensor? temperature, float temperature_value, Tensor? top_k, int top_k_value, "
           "Generator? generator) -> Tensor")


def unsupported_reason(logits: torch.Tensor) -> str | None:
    """``None`` if the kernel can sample from these logits, else why not."""
    if logits.dtype not in DTYPES:
        return f"dtype {logits.dtype} is not supported (float32/float16/bfloat16)"
    return None

