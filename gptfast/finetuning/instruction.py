"""Instruction fine-tuning (chapter 7): the Alpaca-style data, padding collate, loss, training and responses.

The reference names (``download_and_load_file``, ``format_input``, ``InstructionDataset``,
``custom_collate_draft_1/2``, ``custom_collate_fn``) give the same tensors as
``llms_from_scratch.ch07``; the collate functions build each batch as one tensor
instead of one per example.  Beyond the reference:

* :func:`calc_loss_batch` (and the loader, evaluation and training loop around it)
  computes only what the loss reads: each row up to its last kept target, and the
  output head only at kept targets, so padded targets (``ignore_index``) cost neither
  transformer work, logits nor memory; the loss runs through the fused cross-entropy /
  fused linear cross-entropy.  With the ``"torch"`` ops backend it is
  op for op chapter 5's ``calc_loss_batch``, so numbers are bitwise the reference's.
* :func:`generate_responses` generates the test-set responses of a list of entries
  in batched calls (KV cache, per-row prompt lengths, stop at ``eos_id``) and returns
  the texts the book's one-prompt-at-a-time loop extracts (the greedy tokens agree up to
  float rounding of near-tied logits).
"""

from __future__ import annotations

import json
import numbers
import os
import urllib.request

import torch
from torch.utils.data import Dataset

from .. import ops
from ..ch05 import text_to_token_ids
from ..files import atomic_write_text
from ..generation import context_length, generate_batch
from ..training.loops import evaluate_losses, mean_batch_loss, train_simple_with_loss
from .classification import require_token_id
from .heads import final_hidden_states, head_loss, is_book_gpt, packed_hidden_states, reference_numerics

# ----------------------------------------------------------------------------- data


def download_and_load_file(file_path, url):
    """Load the instruction JSON at ``file_path``, downloading it from ``url`` first if it is missing.

    The download is written to a temporary file and renamed, so an interrupted one leaves nothing behind.
    """
    if not os.path.exists(file_path):
        with urllib.request.urlopen(url) as response:
            text_data = response.read().decode("utf-8")
        atomic_write_text(file_path, text_data)
    with open(file_path, "r", encoding="utf-8") as file:
        return json.load(file)


def format_input(entry):
    """The Alpaca-style prompt of ``entry``: preamble, ``### Instruction:``, and ``### Input:`` when non-empty."""
    text = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            f"request.\n\n### Instruction:\n{entry['instruction']}")
    if entry["input"]:
        text += f"\n\n### Input:\n{entry['input']}"
    return text


def _full_text(entry):
    return format_input(entry) + f"\n\n### Response:\n{entry['output']}"


class InstructionDataset(Dataset):
    """Entries (dicts with ``instruction``, ``input``, ``output``) tokenized as prompt plus response.

    Items are lists of token ids (``encoded_texts``), padded later by the collate function.
    """

    def __init__(self, data, tokenizer):
        self.data = data  # may be empty, as the reference's (a split with no entries gives no batches)
        texts = [_full_text(entry) for entry in data]
        encode_batch = getattr(tokenizer, "encode_batch", None)
        if _is_tiktoken(tokenizer) and encode_batch is not None:
            # tiktoken's batch encoder gives each text's encode(), tokenized on several threads.
            self.encoded_texts = encode_batch(texts)
        else:
            self.encoded_texts = [tokenizer.encode(text) for text in texts]

    def __getitem__(self, index):
        return self.encoded_texts[index]

    def __len__(self):
        return len(self.data)


def _is_tiktoken(tokenizer) -> bool:
    return type(tokenizer).__module__.startswith("tiktoken")


# ----------------------------------------------------------------------------- collate


def _token_id_row(item, i):
    """``batch[i]`` as a list of ints: a sequence of ints or of 0-d integer tensors, or a 1-D integer tensor."""
    if isinstance(item, torch.Tensor):
        item = item.tolist()
    if not isinstance(item, (list, tuple)):
        raise TypeError(f"batch[{i}] must be a sequence of int token ids, got {type(item).__name__}")
    row = []
    for token in item:
        if isinstance(token, torch.Tensor) and token.dim() == 0 and not token.is_floating_point() \
                and not token.is_complex():
            token = token.item()
        if not isinstance(token, numbers.Integral):
            raise TypeError(f"batch[{i}] must hold int token ids, got an element of type {type(token).__name__}")
        row.append(token)
    return row


def _padded_batch(batch, pad_token_id):
    """``(B, longest + 1)`` int64: each sequence, then ``pad_token_id`` to the end (at least one)."""
    require_token_id("pad_token_id", pad_token_id)
    if not isinstance(batch, (list, tuple)) or len(batch) == 0:
        raise ValueError("batch must be a non-empty list of token-id sequences")
    rows = [_token_id_row(item, i) for i, item in enumerate(batch)]
    width = max(len(row) for row in rows) + 1
    return torch.tensor([list(row) + [pad_token_id] * (width - len(row)) for row in rows], dtype=torch.long)


def custom_collate_draft_1(batch, pad_token_id=50256, device="cpu"):
    """Inputs only: every sequence plus an end token, padded with ``pad_token_id`` to the longest."""
    return _padded_batch(batch, pad_token_id)[:, :-1].contiguous().to(device)


def custom_collate_draft_2(batch, pad_token_id=50256, device="cpu"):
    """``(inputs, targets)``: padded sequences and the same shifted left by one (padding not masked)."""
    padded = _padded_batch(batch, pad_token_id)
    return padded[:, :-1].contiguous().to(device), padded[:, 1:].contiguous().to(device)


def custom_collate_fn(batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None, device="cpu"):
    """``(inputs, targets)`` for instruction tuning.

    Targets keep the first ``pad_token_id`` of each row (the end-of-text the model must
    learn) and have every later one replaced by ``ignore_index``; both are then cut to
    ``allowed_max_length`` tokens when given.
    """
    if allowed_max_length is not None and (not isinstance(allowed_max_length, numbers.Integral)
                                           or allowed_max_length < 1):
        raise ValueError(f"allowed_max_length must be a positive int or None, got {allowed_max_length!r}")
    if not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    padded = _padded_batch(batch, pad_token_id)
    inputs, targets = padded[:, :-1], padded[:, 1:].clone()
    is_pad = targets == pad_token_id
    later_pad = is_pad & (is_pad.cumsum(dim=1) > 1)
    targets.masked_fill_(later_pad, ignore_index)
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    return inputs.contiguous().to(device), targets.contiguous().to(device)


# ----------------------------------------------------------------------------- loss and training


def calc_loss_batch(input_batch, target_batch, model, device, ignore_index=-100):
    """Mean next-token cross-entropy over the targets that are not ``ignore_index``.

    For gptfast's ``GPTModel`` (and any backend but ``"torch"``) only the positions that
    count are computed: each row up to its last kept target (causal attention: later
    positions cannot change earlier ones), rows without one left out, and the output head
    only where the target is kept, through the fused linear cross-entropy.  On a CPU the
    cut rows run packed into one sequence; elsewhere as one batch cut to the longest.
    """
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    keep = target_batch != ignore_index
    if reference_numerics() or not is_book_gpt(model) or not _cuttable(input_batch, target_batch, model) \
            or not bool(keep.any()):
        # The reference's way (also for a batch without any target: its loss is NaN, as there; and for inputs the
        # cut rows would hide: targets of another shape, more tokens than the model has positions, which the
        # reference's forward and loss refuse).
        logits = model(input_batch)
        return ops.cross_entropy(logits.flatten(0, 1), target_batch.flatten(), ignore_index=ignore_index)
    lengths = _needed_lengths(keep)
    if input_batch.device.type == "cpu":
        # On a CPU time grows with the number of positions: pack the rows, each cut at its last kept
        # target, into one sequence (the matmuls stay large and no padding is computed).
        rows = [r for r, n in enumerate(lengths) if n > 0]
        hidden = packed_hidden_states(model, [input_batch[r, :lengths[r]] for r in rows])
        kept = torch.cat([keep[r, :lengths[r]] for r in rows])
        targets = torch.cat([target_batch[r, :lengths[r]] for r in rows])
        return head_loss(hidden[kept], model.out_head, targets[kept], ignore_index=ignore_index)
    hidden, targets = [], []
    # On a GPU one pass with the common padding trimmed; groups of similar length would launch
    # several passes of smaller kernels.
    for rows, length in _row_groups(lengths, split=False):
        index = torch.tensor(rows, device=input_batch.device)
        group_keep = keep.index_select(0, index)[:, :length].flatten()
        states = final_hidden_states(model, input_batch.index_select(0, index)[:, :length]).flatten(0, 1)
        hidden.append(states[group_keep])
        targets.append(target_batch.index_select(0, index)[:, :length].flatten()[group_keep])
    return head_loss(torch.cat(hidden), model.out_head, torch.cat(targets), ignore_index=ignore_index)


def _cuttable(input_batch, target_batch, model) -> bool:
    """Whether rows may be cut at their last kept target: one target per input token, ``(batch, tokens)``, and
    no more tokens than the model has positions (cut rows would pass what the whole rows do not)."""
    return (input_batch.dim() == 2 and target_batch.shape == input_batch.shape
            and input_batch.shape[1] <= context_length(model))


def _needed_lengths(keep):
    """Per row, one past the last position whose target is kept (0 for a row without any)."""
    positions = torch.arange(1, keep.shape[1] + 1, device=keep.device)
    return (keep * positions).amax(dim=1).tolist()


# A row joins the current group while its length is above this share of the group's longest row.
_GROUP_LENGTH_RATIO = 0.85


def _row_groups(lengths, split=True):
    """Rows to run together, as ``(row_ids, length)`` pairs, longest rows first; empty rows left out.

    Each group is cut to its longest row, so padding past a row's last target costs
    nothing when rows of similar length are grouped.  ``calc_loss_batch`` uses one group
    (``split=False``, only the common padding trimmed) on every device: on a CPU, where
    time grows with the number of positions, split groups still measured slower (the
    smaller matmuls of several passes cost more than the positions they save).
    """
    order = sorted((r for r, n in enumerate(lengths) if n > 0), key=lambda r: -lengths[r])
    if not split:
        return [(order, lengths[order[0]])] if order else []
    groups = []
    for r in order:
        if groups and lengths[r] > _GROUP_LENGTH_RATIO * groups[-1][1]:
            groups[-1][0].append(r)
        else:
            groups.append(([r], lengths[r]))
    return groups


def calc_loss_loader(data_loader, model, device, num_batches=None):
    """Mean of :func:`calc_loss_batch` over the first ``num_batches`` batches; NaN for an empty loader."""
    return mean_batch_loss(calc_loss_batch, data_loader, model, device, num_batches)


def evaluate_model(model, train_loader, val_loader, device, eval_iter):
    """Train and validation loss over ``eval_iter`` batches each, in eval mode without gradients."""
    return evaluate_losses(calc_loss_batch, model, train_loader, val_loader, device, eval_iter)


def train_model_simple(model, train_loader, val_loader, optimizer, device, num_epochs,
                       eval_freq, eval_iter, start_context, tokenizer):
    """Chapter 5's training loop, as chapter 7 uses it, with the instruction loss of :func:`calc_loss_batch`.

    Same steps, prints and return value ``(train_losses, val_losses, track_tokens_seen)``
    as ``ch05.train_model_simple``.
    """
    return train_simple_with_loss(calc_loss_batch, model, train_loader, val_loader, optimizer, device, num_epochs,
                                  eval_freq, eval_iter, start_context, tokenizer)


# ----------------------------------------------------------------------------- responses


def _response_text(generated_text, input_text):
    """What the book keeps of a generation: the text after the prompt, without the response header."""
    return generated_text[len(input_text):].replace("### Response:", "").strip()


def generate_responses(model, entries, tokenizer, *, max_new_tokens=256, context_size=None, eos_id=50256,
                       batch_size=16, response_key=None):
    """The model's response to each entry, generated greedily in batches of ``batch_size`` prompts.

    Gives the texts of the book's loop (``generate(..., eos_id=50256)`` on ``format_input(entry)``,
    decode, cut the prompt, drop ``### Response:``, strip), one batched KV-cache call per
    ``batch_size`` entries.  With ``response_key`` (e.g. ``"model_response"``) each entry also
    gets its response stored under that key.  Puts ``model`` in eval mode, as the book does
    before generating.  Returns the list of responses.
    """
    if not isinstance(entries, (list, tuple)) or len(entries) == 0:
        raise ValueError("entries must be a non-empty list of instruction entries")
    if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    input_texts = [format_input(entry) for entry in entries]
    responses = []
    model.eval()
    for start in range(0, len(entries), batch_size):
        texts = input_texts[start:start + batch_size]
        prompts = [text_to_token_ids(text, tokenizer)[0] for text in texts]
        with torch.no_grad():
            result = generate_batch(model, prompts, max_new_tokens, context_size=context_size, eos_id=eos_id)
        for row, text in enumerate(texts):
            responses.append(_response_text(tokenizer.decode(result.row(row).tolist()), text))
    if response_key is not None:
        for entry, response in zip(entries, responses):
            entry[response_key] = response
    return responses
