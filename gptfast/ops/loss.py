"""Softmax cross-entropy and the fused linear cross-entropy above the kernels, for every fused backend.

The kernel is one torch op with one schema in each namespace (csrc/schemas.h)::

    cross_entropy_fwd(logits, targets, ignore_index, want_grad) -> (loss_rows, grad)

One pass over each row gives its loss and, when ``want_grad``, ``softmax - onehot``.
Everything else lives here, once for all backends:

* the fake implementation (for the C++ ops; a Triton op's fake is its own body);
* the autograd formula: the backward only scales the saved gradient by each row's
  upstream factor, in place, so no second ``(N, V)`` buffer exists;
* the reduction (mean over kept targets, sum, none);
* the chunked linear cross-entropy driver, which takes a backend's ``cross_entropy_fwd``
  and never builds the full ``(N, V)`` logits;
* the chunks' logits, through oneDNN's product on an x86 CPU (:mod:`gptfast.ops.linear`, the
  home of the dense products).

A second backward through the same graph (``retain_graph=True``) is refused with a
``RuntimeError`` that says why: the first backward consumed the saved gradient in place.
Keeping it intact would cost a second gradient-sized buffer on every ordinary backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import linear
from ._autograd import first_order_only, guard_second_derivative, second_derivative_message
from ._dispatch import autocast_inputs, is_tracing, kernels, register_fake, without_graph

# Logits elements per chunk of the linear cross-entropy: ~64 MB in float32 (about 330 tokens of
# GPT-2's vocabulary on a CPU, large enough for efficient matmuls).
CPU_CHUNK_ELEMENTS = 1 << 24
# On a GPU a chunk has about hidden_size tokens (at least 256): its logits are then about the size
# of the weight (which d weight needs anyway), while the float32 d weight, a pass over V x H, is
# added to only N / hidden_size times.
GPU_MIN_CHUNK_ROWS = 256


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The per-row loss dtype the kernels return: float64 for float64 logits (cpu), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scale_saved_grad(grad: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``grad * factor`` in ``grad``'s dtype: the backward of a loss whose forward saved its gradient.

    Eagerly it multiplies in place, so the saved buffer becomes the input's gradient and no
    second buffer of its size exists.  While tracing it is out of place, so the traced
    backward has no mutated inputs.
    """
    if is_tracing(grad):
        return (grad * factor).to(grad.dtype)
    return grad.mul_(factor)


class _SavedGradient:
    """Guards a gradient saved by a forward and scaled in place by the one backward it serves."""

    def __init__(self, op_name: str):
        self.op_name = op_name
        self.consumed = False

    def take(self) -> None:
        if self.consumed:
            raise RuntimeError(
                f"{self.op_name}: a second backward through the same graph is not supported: the first "
                "backward turned the gradient saved by the forward into the input's gradient in place "
                "(which saves a second gradient-sized buffer); recompute the loss, or use backend='torch'")
        self.consumed = True


# --------------------------------------------------------------------------- registration


def _fake_cross_entropy_fwd(logits, targets, ignore_index, want_grad):
    # The kernels write a fresh contiguous gradient whatever the logits' strides.
    grad = logits.new_empty(logits.shape) if want_grad else logits.new_empty((0,))
    return logits.new_empty((logits.shape[0],), dtype=acc_dtype(logits.dtype)), grad


def _fake_cross_entropy_fwd_inplace(logits, targets, ignore_index):
    return logits.new_empty((logits.shape[0],), dtype=acc_dtype(logits.dtype))


def register(namespace: str, *, fakes: bool = True) -> None:
    """Register the autograd formula (and, with ``fakes``, the fake impl) of ``namespace::cross_entropy_fwd``."""
    op_name = f"{namespace}::cross_entropy_fwd"
    if fakes:
        register_fake(op_name, _fake_cross_entropy_fwd)
        if _inplace_kernel(namespace) is not None:
            register_fake(f"{namespace}::cross_entropy_fwd_inplace", _fake_cross_entropy_fwd_inplace)

    def setup_context(ctx, inputs, output):
        _, grad = output
        ctx.save_for_backward(grad, inputs[1])
        ctx.mark_non_differentiable(grad)
        ctx.ignore_index, ctx.want_grad = inputs[2], inputs[3]
        ctx.saved_gradient = _SavedGradient(op_name)
        # Otherwise autograd hands backward a zero-filled (N, V) "gradient" of `grad`.
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_loss_rows, _grad_of_grad):
        if grad_loss_rows is None:  # the loss rows did not reach the differentiated result
            return None, None, None, None
        if not ctx.want_grad:
            raise RuntimeError(f"{op_name} ran without a gradient buffer (grad mode was off or logits did "
                               "not require grad); cannot backpropagate")
        ctx.saved_gradient.take()
        grad, targets = ctx.saved_tensors
        # An ignored row keeps the kernel's gradient (0, or NaN for a NaN softmax) whatever reaches its loss, as
        # in PyTorch: scaled by an inf or NaN upstream gradient, its 0 would become NaN.
        factor = grad_loss_rows.masked_fill(targets == ctx.ignore_index, 1)
        return scale_saved_grad(grad, factor.unsqueeze(1)), None, None, None

    torch.library.register_autograd(op_name, first_order_only(op_name, backward), setup_context=setup_context)


# --------------------------------------------------------------------------- cross-entropy


def reduce_loss(loss_rows, targets, ignore_index, reduction, dtype):
    """Apply ``reduction`` to per-row losses as ``F.cross_entropy`` does; the result in ``dtype``."""
    if reduction == "none":
        return loss_rows.view(targets.shape).to(dtype)
    total = loss_rows.sum()
    if reduction == "mean":  # all ignored: NaN with zero gradients, as in PyTorch (not 0 * inf)
        kept = (targets != ignore_index).sum()
        total = torch.where(kept > 0, total / kept.clamp(min=1), torch.full_like(total, float("nan")))
    return total.to(dtype)


def _flat_targets(targets: torch.Tensor) -> torch.Tensor:
    # Targets are small next to the logits: one contiguous copy spares every kernel a stride.
    return targets.reshape(-1).contiguous()


def fused_cross_entropy(ops, logits, targets, *, ignore_index=-100, reduction="mean"):
    """Cross-entropy on ``ops``' kernel (a namespace name such as ``"gptfast_cpu"``), one pass per row."""
    flat = logits.reshape(-1, logits.shape[-1])
    want_grad = torch.is_grad_enabled() and logits.requires_grad
    with without_graph():
        loss_rows, _ = kernels(ops).cross_entropy_fwd(flat, _flat_targets(targets), int(ignore_index), want_grad)
    return reduce_loss(loss_rows, targets, ignore_index, reduction, loss_dtype(logits))


def loss_dtype(logits: torch.Tensor) -> torch.dtype:
    """The loss's dtype as ``F.cross_entropy`` gives it: float32 under autocast (which runs the loss in float32),
    else the logits' dtype.  The kernels' per-row losses are float32 either way, so nothing is lost to a
    16-bit rounding that torch's autocast would not make."""
    if logits.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(logits.device.type):
        return torch.float32
    return logits.dtype


# --------------------------------------------------------------------------- linear cross-entropy


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def chunk_rows(n_rows: int, hidden_size: int, vocab: int, device_type: str) -> int:
    """Tokens per chunk of the linear cross-entropy (see CPU_CHUNK_ELEMENTS and GPU_MIN_CHUNK_ROWS).

    On a CPU the rows are split into chunks of equal size (the last one no smaller than the
    others by more than one row), so no chunk is a sliver whose matmuls run inefficiently.
    """
    if device_type == "cpu":
        rows = max(1, CPU_CHUNK_ELEMENTS // max(vocab, 1))
        rows = -(-n_rows // max(1, -(-n_rows // rows)))  # ceil(n / number of chunks)
    else:
        rows = max(GPU_MIN_CHUNK_ROWS, _next_power_of_2(hidden_size))
    return max(1, min(n_rows, rows))


def _accumulate(acc_tensor, product, first):
    """``acc_tensor (+)= product`` (the first chunk writes, so the accumulator needs no zero fill)."""
    if first:
        acc_tensor.copy_(product)
    else:
        acc_tensor += product


def _inplace_kernel(ops):
    """``ops``' ``cross_entropy_fwd_inplace`` (the gradient written over the logits), or None where it has none."""
    try:
        return getattr(kernels(ops), "cross_entropy_fwd_inplace")
    except AttributeError:
        return None


def _gradient_in_place(kernel, inplace):
    """``kernel`` that, where it can, returns the logits themselves overwritten by their gradient.

    The chunk's logits are not needed once the kernel has read them, so writing the gradient
    over them spares a second chunk-sized buffer (and, on a CPU, the page faults of a fresh one).
    """
    if inplace is None:
        return kernel

    def run(logits, targets, ignore_index, want_grad):
        if want_grad and logits.is_contiguous() and not is_tracing(logits):
            return inplace(logits, targets, ignore_index), logits
        return kernel(logits, targets, ignore_index, want_grad)

    return run


def _onednn_serves(h, weight, bias) -> bool:
    """True when a chunk's logits go through oneDNN's product (:func:`~gptfast.ops.linear.onednn_fits`)."""
    tensors = (h, weight) if bias is None else (h, weight, bias)
    # Never recorded by autograd (the chunk driver runs without a graph): the op has no derivative here.
    recording = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return not recording and linear.onednn_fits(h, weight, bias)


def _chunk_logits(h, weight, bias, buffer):
    """``h @ weight.T (+ bias)``, into the first rows of ``buffer`` when one is given (or via oneDNN on a CPU)."""
    if _onednn_serves(h, weight, bias):
        return linear.onednn_linear()(h, weight, bias)
    if buffer is None:
        return F.linear(h, weight, bias)
    out = buffer[:h.shape[0]]
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


def _dense_chunks(kernel, hidden, weight, bias, targets, ignore_index, row_scale, need):
    """Per-row losses and the ``need``-ed gradients of every row of ``hidden``, chunk by chunk."""
    n, hidden_size = hidden.shape
    vocab = weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    any_grad = any(need)
    loss_rows = torch.empty(n, dtype=acc, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need[0] else None
    # Written by the first chunk: an (V, H) zero fill is a full pass over the weight's size.
    grad_weight = torch.empty(weight.shape, dtype=acc, device=weight.device) if need[1] else None
    grad_bias = torch.empty(vocab, dtype=acc, device=weight.device) if need[2] else None
    if n == 0:
        for g in (grad_weight, grad_bias):
            if g is not None:
                g.zero_()
        return loss_rows, grad_hidden, grad_weight, grad_bias
    step = chunk_rows(n, hidden_size, vocab, hidden.device.type)
    # On a CPU every chunk's logits go to one buffer: a fresh chunk-sized tensor per chunk costs
    # its page faults each time (it is too large for the allocator to keep).  oneDNN's product
    # allocates its own, and with those faults it still measured 10% faster over a chunk loop.
    reuse = (hidden.device.type == "cpu" and not is_tracing(hidden) and n > step
             and not _onednn_serves(hidden, weight, bias))
    buffer = hidden.new_empty((step, vocab)) if reuse else None
    for start in range(0, n, step):
        first = start == 0
        rows = slice(start, min(n, start + step))
        h = hidden[rows]
        dlogits = None  # the previous chunk's gradient goes before this one's logits are allocated
        logits = _chunk_logits(h, weight, bias, buffer)
        loss, dlogits = kernel(logits, targets[rows], ignore_index, any_grad)
        loss_rows[rows] = loss
        del logits
        if not any_grad:
            continue
        if row_scale is not None:
            dlogits.mul_(row_scale[rows].unsqueeze(1).to(dlogits.dtype))
        if grad_hidden is not None:
            torch.mm(dlogits, weight, out=grad_hidden[rows])
        if grad_weight is not None:
            if dlogits.dtype != acc:
                _accumulate(grad_weight, (dlogits.t() @ h).to(acc), first)
            elif first:
                torch.mm(dlogits.t(), h, out=grad_weight)
            else:
                grad_weight.addmm_(dlogits.t(), h)  # no (V, H) temporary per chunk
        if grad_bias is not None:
            _accumulate(grad_bias, dlogits.sum(0, dtype=acc), first)
    return loss_rows, grad_hidden, grad_weight, grad_bias


def _largest_magnitude(t: torch.Tensor) -> float:
    """``max |t|`` as a Python float (inf or NaN when ``t`` holds one); one pass, no temporary of ``t``'s size."""
    if t.numel() == 0:
        return 0.0
    low, high = torch.aminmax(t)
    return max(abs(float(low)), abs(float(high))) if not bool(torch.isnan(low) | torch.isnan(high)) else math.nan


def _logits_surely_finite(rows, weight, bias) -> bool:
    """True when every logit of ``rows @ weight.T + bias`` is finite in ``rows``' dtype, by a bound with room
    for the product's rounding (half the dtype's largest number)."""
    if rows.numel() == 0:
        return True
    row_sum = float(rows.abs().sum(-1, dtype=torch.float64).max())  # inf or NaN when a row holds one
    bound = row_sum * _largest_magnitude(weight) + (0.0 if bias is None else _largest_magnitude(bias))
    return bound < torch.finfo(rows.dtype).max / 2  # False for a NaN bound too


def _skippable_ignored_rows(hidden, weight, bias, targets, ignore_index):
    """Indices of the rows to compute when the others (targets equal to ``ignore_index``) may be skipped, else None.

    An ignored row adds nothing to the loss and, while its logits are finite, nothing to any
    gradient, so it costs nothing if left out.  Eagerly on a CPU only (the gather needs the
    count of kept rows on the host, a sync on a GPU and a dynamic shape while tracing).
    When an ignored row's logits are not finite (a non-finite hidden state or bias, or finite
    ones whose product overflows), its softmax is NaN and PyTorch spreads that NaN into the
    gradients: then every row is computed.  Finite logits are proven by a bound, not computed:
    ``|h . w_j + b_j| <= ||h||_1 max|W| + max|b|`` below the dtype's largest number.
    """
    if hidden.device.type != "cpu" or is_tracing(hidden):
        return None
    ignored = targets == ignore_index
    if not bool(ignored.any()):
        return None
    if not _logits_surely_finite(hidden[ignored], weight, bias):
        return None
    return (~ignored).nonzero().squeeze(1)


def _linear_ce_chunks(kernel, hidden, weight, bias, targets, ignore_index, row_scale, need):
    """Per-row losses and (for ``need`` = which of hidden, weight, bias) gradients, chunk by chunk.

    Gradients are of ``sum_i row_scale[i] * loss_i`` (``row_scale`` None = all ones); weight
    and bias gradients accumulate in float32 (float64 for float64 inputs), so many chunks do
    not pile up 16-bit rounding.  Rows whose target is ``ignore_index`` are gathered out first
    where that cannot change a number (:func:`_skippable_ignored_rows`): padding costs nothing.
    """
    kept = _skippable_ignored_rows(hidden, weight, bias, targets, ignore_index)
    if kept is None:
        return _dense_chunks(kernel, hidden, weight, bias, targets, ignore_index, row_scale, need)
    scale = row_scale.index_select(0, kept) if row_scale is not None else None
    loss, gh, gw, gb = _dense_chunks(kernel, hidden.index_select(0, kept), weight, bias, targets.index_select(0, kept),
                                     ignore_index, scale, need)
    if not bool(torch.isfinite(loss).all()):
        # A kept row overflowed or met a non-finite weight; an ignored row may too: compute them all.
        return _dense_chunks(kernel, hidden, weight, bias, targets, ignore_index, row_scale, need)
    loss_rows = loss.new_zeros(hidden.shape[0]).index_copy_(0, kept, loss)
    if gh is not None:
        gh = torch.zeros_like(hidden).index_copy_(0, kept, gh)
    return loss_rows, gh, gw, gb


class _LinearCrossEntropy(torch.autograd.Function):
    """Chunked ``cross_entropy(hidden @ weight.T + bias)`` on a backend's kernel; never holds the full logits.

    For mean/sum the gradients are computed during the forward (one logits pass) and only
    scaled, in place, by the backward; for ``"none"`` the per-row upstream gradients are
    needed first, so the backward recomputes the chunks (and may run more than once).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, reduction, kernel, op_name, result_dtype):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        precompute = reduction != "none" and any(need)
        loss_rows, gh, gw, gb = _linear_ce_chunks(kernel, hidden, weight, bias, targets, ignore_index, None,
                                                  need if precompute else (False, False, False))
        ctx.reduction, ctx.ignore_index, ctx.need, ctx.kernel = reduction, ignore_index, need, kernel
        ctx.weight_dtype = weight.dtype
        ctx.op_name = op_name
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, bias, targets)
            return loss_rows.to(result_dtype)
        ignored = targets == ignore_index
        kept = targets.numel() - ignored.sum()
        ctx.grads, ctx.kept = (gh, gw, gb), kept
        ctx.ignored = ignored.view(-1) if need[0] else None
        # Traced (torch.compile), the backward scales out of place, so a second backward is no hazard; and
        # dynamo refuses the guard's mutation there.
        ctx.saved_gradient = None if torch.compiler.is_compiling() else _SavedGradient(op_name)
        total = loss_rows.sum()
        return (total / kept if reduction == "mean" else total).to(result_dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        anchors = [*ctx.saved_tensors, grad_loss] if torch.is_grad_enabled() else []
        if ctx.reduction == "none":
            hidden, weight, bias, targets = ctx.saved_tensors
            with torch.no_grad():  # kernel results either way (create_graph is refused below)
                _, gh, gw, gb = _linear_ce_chunks(ctx.kernel, hidden, weight, bias, targets, ctx.ignore_index,
                                                  grad_loss.to(acc_dtype(hidden.dtype)), ctx.need)
        else:
            if ctx.saved_gradient is not None:
                ctx.saved_gradient.take()
            factor = grad_loss.to(acc_dtype(grad_loss.dtype))
            if ctx.reduction == "mean":
                factor = factor / ctx.kept.clamp(min=1)
            # All rows ignored: no upstream gradient reaches any row, as in PyTorch (finite rows get 0, not 0 * inf).
            factor = torch.where(ctx.kept > 0, factor, torch.zeros_like(factor))
            gh, gw, gb = ctx.grads
            # Ignored rows of the hidden gradient keep the kernel's values, as in PyTorch (see the CE op).
            gh = scale_saved_grad(gh, factor.where(~ctx.ignored, 1).unsqueeze(1)) if gh is not None else None
            gw, gb = (scale_saved_grad(g, factor) if g is not None else None for g in (gw, gb))
            ctx.grads = ctx.ignored = None
        gw = gw.to(ctx.weight_dtype) if gw is not None else None
        gb = gb.to(ctx.weight_dtype) if gb is not None else None
        gh, gw, gb = guard_second_derivative(second_derivative_message(ctx.op_name), (gh, gw, gb), anchors)
        return gh, gw, gb, None, None, None, None, None, None


def fused_linear_cross_entropy(ops, hidden, weight, targets, *, bias=None, ignore_index=-100, reduction="mean"):
    """Cross-entropy of the output head on ``ops``' cross-entropy kernel, without the ``(N, V)`` logits."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type) and hidden.dtype != torch.float64:  # (autocast leaves float64)
        # As under autocast F.linear multiplies in the autocast dtype and F.cross_entropy returns float32:
        # the chunks take the cast inputs with autocast off (their out= products keep the dtypes given).
        # The loss is reduced in float32 from the float32 row losses, never rounded to 16 bits on the way.
        # (hidden, weight and bias may differ in dtype here: autocast_inputs gives them its one dtype.)
        hidden, weight, bias = autocast_inputs(hidden, weight, bias)
        with torch.autocast(device_type, enabled=False):
            return _linear_cross_entropy(ops, hidden, weight, targets, bias, ignore_index, reduction, torch.float32)
    return _linear_cross_entropy(ops, hidden, weight, targets, bias, ignore_index, reduction, hidden.dtype)


def _linear_cross_entropy(ops, hidden, weight, targets, bias, ignore_index, reduction, result_dtype):
    """:func:`fused_linear_cross_entropy` with the loss returned in ``result_dtype``."""
    kernel = _gradient_in_place(kernels(ops).cross_entropy_fwd, _inplace_kernel(ops))
    op_name = f"{ops}::cross_entropy_fwd (linear cross-entropy)" if isinstance(ops, str) else "linear cross-entropy"
    flat = hidden.reshape(hidden.shape[:-1].numel(), hidden.shape[-1]).contiguous()  # (-1 cannot size H = 0)
    flat_targets = _flat_targets(targets)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))):
        # No gradient will be asked for (evaluation, no_grad): the loss only, without the Function, whose
        # forward would otherwise compute the gradients (it cannot see that grad mode was off).
        loss_rows, *_ = _linear_ce_chunks(kernel, flat, weight, bias, flat_targets, int(ignore_index), None,
                                          (False, False, False))
        return reduce_loss(loss_rows, targets, ignore_index, reduction, result_dtype)
    loss = _LinearCrossEntropy.apply(flat, weight, bias, flat_targets, int(ignore_index), reduction, kernel, op_name,
                                     result_dtype)
    return loss.view(targets.shape) if reduction == "none" else loss
