"""The book's losses, evaluation and training loops (chapter 5 and appendix D), and its loss plot."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import ops
from ..files import atomic_savefig
from ..generation import generate_text_simple
from ..models.layers import require_positive_int
from ..tokenizer import ENDOFTEXT
from .optimizers import fused_optimizer_steps


def text_to_token_ids(text, tokenizer):
    """Encode ``text`` to a ``(1, n)`` tensor of token ids."""
    return torch.tensor(tokenizer.encode(text, allowed_special={ENDOFTEXT})).unsqueeze(0)


def token_ids_to_text(token_ids, tokenizer):
    """Decode a ``(1, n)`` or ``(n,)`` tensor of token ids to text."""
    return tokenizer.decode(token_ids.squeeze(0).tolist())


def calc_loss_batch(input_batch, target_batch, model, device):
    """Mean next-token cross-entropy of one batch.

    For gptfast's GPT models the output head and the loss run as one fused op where a
    backend serves it (the ``(b, t, vocab)`` logits are never built); otherwise, and with
    backend ``"torch"``, it is ``ops.cross_entropy(model(x).flatten(0, 1), y.flatten())``.
    """
    from ..finetuning.heads import next_token_loss  # here: finetuning imports this module

    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    return next_token_loss(model, input_batch, target_batch)


def batches_to_use(data_loader, num_batches, name="num_batches") -> int:
    """How many of ``data_loader``'s batches a ``num_batches`` limit takes (all for ``None``); a limit that is not
    a positive int is an error naming ``name`` (the reference divides by it: 0 fails, -1 gives -0.0)."""
    if num_batches is None:
        return len(data_loader)
    return min(require_positive_int(name, num_batches), len(data_loader))


def mean_batch_loss(loss_batch, data_loader, model, device, num_batches=None, name="num_batches"):
    """Average of ``loss_batch(input_batch, target_batch, model, device)`` over the first ``num_batches``
    batches (all by default); NaN for an empty loader.  Every ``calc_loss_loader`` is this with its own loss."""
    num_batches = batches_to_use(data_loader, num_batches, name)
    if len(data_loader) == 0:
        return float("nan")
    total = 0.0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total += loss_batch(input_batch, target_batch, model, device).item()
    return total / num_batches


def evaluate_losses(loss_batch, model, train_loader, val_loader, device, eval_iter):
    """Train and validation :func:`mean_batch_loss` of ``loss_batch`` over ``eval_iter`` batches each,
    in eval mode without gradients; the model is left in training mode."""
    model.eval()
    with torch.no_grad():
        train_loss = mean_batch_loss(loss_batch, train_loader, model, device, num_batches=eval_iter, name="eval_iter")
        val_loss = mean_batch_loss(loss_batch, val_loader, model, device, num_batches=eval_iter, name="eval_iter")
    model.train()
    return train_loss, val_loss


def calc_loss_loader(data_loader, model, device, num_batches=None):
    """Average batch loss over the first ``num_batches`` batches (all by default); NaN for an empty loader."""
    return mean_batch_loss(calc_loss_batch, data_loader, model, device, num_batches)


def evaluate_model(model, train_loader, val_loader, device, eval_iter):
    """Train and validation loss over ``eval_iter`` batches each, in eval mode without gradients."""
    return evaluate_losses(calc_loss_batch, model, train_loader, val_loader, device, eval_iter)


def generate_and_print_sample(model, tokenizer, device, start_context):
    """Print 50 greedy tokens after ``start_context`` on one line."""
    model.eval()
    context_size = model.pos_emb.weight.shape[0]
    encoded = text_to_token_ids(start_context, tokenizer).to(device)
    with torch.no_grad():
        token_ids = generate_text_simple(model=model, idx=encoded, max_new_tokens=50, context_size=context_size)
    print(token_ids_to_text(token_ids, tokenizer).replace("\n", " "))
    model.train()


def _record_evaluation(loss_batch, model, train_loader, val_loader, device, eval_iter, history, tokens_seen,
                       label):
    train_loss, val_loss = evaluate_losses(loss_batch, model, train_loader, val_loader, device, eval_iter)
    history[0].append(train_loss)
    history[1].append(val_loss)
    history[2].append(tokens_seen)
    print(f"{label}: Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")


def _batches(loader, progress, epoch, last_epoch):
    """The loader itself, or wrapped in a tqdm bar when ``progress`` is set."""
    if not progress:
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc=f"epoch {epoch + 1}/{last_epoch}", unit="step", leave=False)


def require_evaluation_schedule(eval_freq, eval_iter):
    """Check a loop's ``eval_freq`` and ``eval_iter`` before its first step: a bad value found only at the
    first evaluation would leave the model already changed by a step."""
    require_positive_int("eval_freq", eval_freq)
    if eval_iter is not None:  # None evaluates on every batch, as the reference's loader loss does
        require_positive_int("eval_iter", eval_iter)


class RunSoFar(NamedTuple):
    """What an earlier run of the same training did: its epochs, optimizer steps and input tokens."""

    epochs: int = 0
    steps: int = 0
    tokens: int = 0


def train_simple_with_loss(loss_batch, model, train_loader, val_loader, optimizer, device, num_epochs,
                           eval_freq, eval_iter, start_context, tokenizer, progress=False, so_far=RunSoFar()):
    """Chapter 5's loop with the per-batch loss ``loss_batch(input_batch, target_batch, model, device)``
    as a parameter (chapter 7 runs it with the instruction loss).

    The optimizer steps inside :func:`~gptfast.training.optimizers.fused_optimizer_steps`: a plain
    ``torch.optim.AdamW`` on CPU runs torch's fused update (backend ``"torch"``: the book's own).
    ``so_far`` continues a resumed run: epochs, steps and token counts go on from it, so the evaluations fall on
    the steps the uninterrupted run evaluates at and the printed labels and counts are that run's.

    Returns ``(train_losses, val_losses, track_tokens_seen)``.
    """
    require_evaluation_schedule(eval_freq, eval_iter)
    history = ([], [], [])
    tokens_seen, global_step = so_far.tokens, so_far.steps - 1
    last_epoch = so_far.epochs + num_epochs
    with fused_optimizer_steps(optimizer):
        for epoch in range(so_far.epochs, last_epoch):
            model.train()
            for input_batch, target_batch in _batches(train_loader, progress, epoch, last_epoch):
                optimizer.zero_grad()
                loss = loss_batch(input_batch, target_batch, model, device)
                loss.backward()
                optimizer.step()
                tokens_seen += input_batch.numel()
                global_step += 1
                if global_step % eval_freq == 0:
                    _record_evaluation(loss_batch, model, train_loader, val_loader, device, eval_iter, history,
                                       tokens_seen, f"Ep {epoch + 1} (Step {global_step:06d})")
            generate_and_print_sample(model, tokenizer, device, start_context)
    return history


def train_model_simple(model, train_loader, val_loader, optimizer, device, num_epochs,
                       eval_freq, eval_iter, start_context, tokenizer, progress=False):
    """Chapter 5's loop: AdamW steps, evaluation every ``eval_freq`` steps, a sample after each epoch.

    ``progress=True`` (not in the reference) shows a tqdm bar per epoch.
    Returns ``(train_losses, val_losses, track_tokens_seen)``.
    """
    return train_simple_with_loss(calc_loss_batch, model, train_loader, val_loader, optimizer, device, num_epochs,
                                  eval_freq, eval_iter, start_context, tokenizer, progress)


def find_highest_gradient(model):
    """Largest single gradient value over all parameters (None before any backward).

    Compared parameter by parameter as the reference does, so its answer's dtype is that
    parameter's, and a NaN maximum after the first parameter's never replaces the value held.
    """
    highest = None
    for param in model.parameters():
        if param.grad is not None:
            candidate = param.grad.detach().max()
            if highest is None or candidate > highest:
                highest = candidate
    return highest


def warmup_cosine_lr(step, warmup_steps, total_steps, peak_lr, initial_lr, min_lr):
    """Appendix D's schedule: linear warmup from ``initial_lr``, then cosine decay to ``min_lr``."""
    if step < warmup_steps:
        return initial_lr + step * ((peak_lr - initial_lr) / warmup_steps)  # the reference's rounding
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def train_model(model, train_loader, val_loader, optimizer, device,
                n_epochs, eval_freq, eval_iter, start_context, tokenizer,
                warmup_steps, initial_lr=3e-05, min_lr=1e-6, orig_book_version=False):
    """Appendix D's loop: warmup + cosine learning rate and gradient clipping (max norm 1).

    Clipping starts at the step after warmup (``orig_book_version=True``, as printed in
    the book) or at the first step after warmup has ended (default).  The optimizer steps as in
    :func:`train_simple_with_loss`.
    Returns ``(train_losses, val_losses, track_tokens_seen, track_lrs)``.
    """
    require_evaluation_schedule(eval_freq, eval_iter)
    history, track_lrs = ([], [], []), []
    tokens_seen, global_step = 0, -1
    peak_lr = optimizer.param_groups[0]["lr"]
    total_steps = len(train_loader) * n_epochs
    with fused_optimizer_steps(optimizer):
        for epoch in range(n_epochs):
            model.train()
            for input_batch, target_batch in train_loader:
                optimizer.zero_grad()
                global_step += 1
                lr = warmup_cosine_lr(global_step, warmup_steps, total_steps, peak_lr, initial_lr, min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                track_lrs.append(lr)
                loss = calc_loss_batch(input_batch, target_batch, model, device)
                loss.backward()
                # compared as the reference compares: warmup_steps need not be an int
                past_warmup = global_step > warmup_steps if orig_book_version else global_step >= warmup_steps
                if past_warmup:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
                optimizer.step()
                tokens_seen += input_batch.numel()
                if global_step % eval_freq == 0:
                    _record_evaluation(calc_loss_batch, model, train_loader, val_loader, device, eval_iter, history,
                                       tokens_seen, f"Ep {epoch + 1} (Iter {global_step:06d})")
            generate_and_print_sample(model, tokenizer, device, start_context)
    return (*history, track_lrs)


def plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, save_path="loss-plot.pdf", show=True):
    """Plot train/validation loss against epochs (bottom axis) and tokens seen (top axis).

    The file is written atomically (a temporary file renamed over ``save_path``).  Returns None as the
    reference does (a returned figure would be drawn a second time at the end of a notebook cell); the
    figure stays pyplot's current one (``plt.gcf()``).
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train_losses, label="Training loss")
    ax1.plot(epochs_seen, val_losses, linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax1.twiny()
    ax2.plot(tokens_seen, train_losses, alpha=0)  # invisible: only aligns the tokens axis
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    atomic_savefig(fig, save_path)
    if show:
        plt.show()
