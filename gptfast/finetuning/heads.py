"""What the fine-tuning losses need from the GPT: the hidden states of the positions that count.

The book computes every position's logits and then keeps a few: classification keeps
the last position, instruction tuning drops every target equal to ``ignore_index``.
For the book's ``GPTModel`` layout the helpers here compute only what is kept:

* :func:`last_token_hidden` runs the last transformer block for the last position only
  (its keys and values still see every position), so the last block's query projection,
  attention output, feed-forward and their backward shrink by the sequence length;
* :func:`head_loss` applies the output head to the kept rows only, through the fused
  (linear) cross-entropy;
* :func:`next_token_loss` is the chapter 5 loss of gptfast's GPT, Llama 3 and Qwen3 models
  (forward: hidden states, then a plain linear head): the head and the loss run as one fused op
  where a backend serves it, so the ``(b, t, vocab)`` logits are never built.

With the ``"torch"`` ops backend (the parity oracle) everything runs the reference's
way instead, op for op, so results are bitwise those of ``llms_from_scratch``.
"""

from __future__ import annotations

import torch

from .. import ops
from ..ch04 import GPTModel, MultiHeadAttention, TransformerBlock
from ..models.blocks import is_plain_linear, runs_own_forward
from ..models.gpt import GPTModelFast, merge_heads, residual_block, runs_fused_core, split_heads
from ..models.llama3 import Llama3Model
from ..models.qwen3 import Qwen3Model


def reference_numerics() -> bool:
    """True when the selected ops backend is ``"torch"``: then reproduce the reference op for op."""
    return ops.get_backend() == "torch"


def is_book_gpt(model) -> bool:
    """True for gptfast's ``GPTModel`` whose blocks are the book's (the layout the shortcuts rely on), every
    module in it running its own forward (no hook, no override), and each attention core the fused op
    (:func:`runs_fused_core`).

    Every module counts, not only the blocks: the shortcuts call the sub-layers (norms, projections,
    feed-forward, head) on fewer or packed positions, so a hook on any of them would see other shapes
    and could change the loss.
    """
    if not (isinstance(model, GPTModel) and type(model.trf_blocks) is torch.nn.Sequential):
        return False
    blocks = list(model.trf_blocks)
    return all(isinstance(block, TransformerBlock) and isinstance(block.att, MultiHeadAttention)
               and runs_fused_core(block.att) for block in blocks) and all(
        runs_own_forward(m) for m in model.modules())


def _embed(model, idx):
    positions = torch.arange(idx.shape[1], device=idx.device)
    return model.drop_emb(model.tok_emb(idx) + model.pos_emb(positions))


def final_hidden_states(model, idx):
    """``(b, t, emb_dim)`` states after the final norm: the model's forward without the output head."""
    return model.final_norm(model.trf_blocks(_embed(model, idx)))


def _per_row_attention(att, bounds):
    """``att`` over packed rows: causal attention within each ``(start, end)`` span of the token axis only."""
    lengths = [b - a for a, b in bounds]

    def attention(h):
        q, k, v = (split_heads(att, proj(h)).split(lengths, dim=2) for proj in (att.W_query, att.W_key, att.W_value))
        # split, not one slice per row: its backward writes the rows' gradients into one tensor, where each
        # slice's backward would zero-fill a whole (1, heads, tokens, head_dim) gradient and add them up.
        spans = [ops.causal_attention(*row, dropout_p=att.dropout.p, training=att.dropout.training) for row in zip(q, k, v)]
        return att.out_proj(merge_heads(att, torch.cat(spans, dim=2)))
    return attention


def packed_hidden_states(model, rows):
    """Final-norm states ``(sum of lengths, emb_dim)`` of the 1-D token rows ``rows``, run as one packed sequence.

    Each row keeps its own positions (0, 1, ...) and attends only to itself, so its states
    are those of the row run alone; the linear layers see every row's tokens at once and
    no position is spent on padding.  For a book-layout GPT (:func:`is_book_gpt`).
    """
    bounds, start = [], 0
    for row in rows:
        bounds.append((start, start + row.shape[0]))
        start += row.shape[0]
    idx = torch.cat(rows).unsqueeze(0)
    positions = torch.cat([torch.arange(row.shape[0], device=idx.device) for row in rows])
    x = model.drop_emb(model.tok_emb(idx) + model.pos_emb(positions))
    for block in model.trf_blocks:
        x = residual_block(block, x, _per_row_attention(block.att, bounds))
    return model.final_norm(x)[0]


def _heads(att, x):
    """``(b, t, d_out)`` -> ``(b, heads, t, head_dim)``."""
    b, t, _ = x.shape
    return x.view(b, t, att.num_heads, att.head_dim).transpose(1, 2)


def _last_position_of_block(block, x):
    """``block(x)[:, -1:]`` computed for the last position only: ``(b, 1, emb_dim)``."""
    att = block.att
    normed = block.norm1(x)
    keys, values = _heads(att, att.W_key(normed)), _heads(att, att.W_value(normed))
    query = _heads(att, att.W_query(normed[:, -1:]))
    # The last query sees every key, so the causal op computes exactly its row of the full attention.
    context = ops.causal_attention(query, keys, values, dropout_p=att.dropout.p, training=att.dropout.training)
    context = context.transpose(1, 2).reshape(x.shape[0], 1, att.d_out)
    last = x[:, -1:] + block.drop_resid(att.out_proj(context))
    return last + block.drop_resid(block.ff(block.norm2(last)))


def last_token_hidden(model, idx):
    """Final-norm hidden state of the last position, ``(b, emb_dim)``, for a book-layout GPT."""
    x = _embed(model, idx)
    blocks = list(model.trf_blocks)
    for block in blocks[:-1]:
        x = block(x)
    x = _last_position_of_block(blocks[-1], x) if blocks else x[:, -1:]
    return model.final_norm(x)[:, 0]


def last_token_logits(model, idx):
    """Logits of the last position, ``(b, num_outputs)``: the reference's ``model(idx)[:, -1, :]``."""
    # Input of another shape goes through the model's forward, whose checks name what is wrong with it.
    if reference_numerics() or not is_book_gpt(model) or not (torch.is_tensor(idx) and idx.dim() == 2):
        return model(idx)[:, -1, :]
    return model.out_head(last_token_hidden(model, idx))


def _fused_linear_cross_entropy_serves(hidden, head, targets) -> bool:
    args, kwargs = (hidden, head.weight, targets), {"bias": head.bias}
    return ops.resolve("linear_cross_entropy", hidden.device, args, kwargs)[0] != "torch"


def head_loss(hidden, head, targets, ignore_index=-100):
    """Mean cross-entropy of ``head(hidden)`` against ``targets`` (rows equal to ``ignore_index`` skipped).

    A plain ``nn.Linear`` head (no hook, no forward of its own) goes through
    ``ops.linear_cross_entropy`` where a fused backend serves it (the logits are never built);
    any other head is called, then ``ops.cross_entropy``.
    """
    if is_plain_linear(head) and _fused_linear_cross_entropy_serves(hidden, head, targets):
        return ops.linear_cross_entropy(hidden, head.weight, targets, bias=head.bias, ignore_index=ignore_index)
    return ops.cross_entropy(head(hidden), targets, ignore_index=ignore_index)


def head_is_separable(model) -> bool:
    """True when ``model(idx)`` is exactly ``model.out_head(model.hidden_states(idx))``, out_head a plain ``nn.Linear``.

    gptfast's GPT-2, Llama 3 and Qwen3 models (not their KV-cache variants, whose forward takes a cache)
    qualify unless a subclass overrides ``forward``, a ``forward`` is set on the model's or the head's
    instance, or a hook would run on either, its own or a global one (calling the parts directly would
    skip it).
    """
    return (type(model).forward in _SEPARABLE_FORWARDS and hasattr(model, "hidden_states")
            and runs_own_forward(model) and is_plain_linear(getattr(model, "out_head", None)))


# Forwards that are ``apply_linear(self.out_head, self.hidden_states(in_idx))`` and nothing else.
_SEPARABLE_FORWARDS = (GPTModel.forward, GPTModelFast.forward, Llama3Model.forward, Qwen3Model.forward)


def next_token_loss(model, input_batch, target_batch, ignore_index=-100):
    """Mean cross-entropy of ``model(input_batch)`` against ``target_batch``, the head fused into the loss.

    With the ``"torch"`` backend, or a model whose head cannot be split off, it is the
    reference's ``cross_entropy(model(x).flatten(0, 1), y.flatten())`` op for op.
    """
    if reference_numerics() or not head_is_separable(model):
        logits = model(input_batch)
        return ops.cross_entropy(logits.flatten(0, 1), target_batch.flatten(), ignore_index=ignore_index)
    hidden = model.hidden_states(input_batch)
    return head_loss(hidden.flatten(0, 1), model.out_head, target_batch.flatten(), ignore_index=ignore_index)
