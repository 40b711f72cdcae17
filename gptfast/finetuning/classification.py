"""Classification fine-tuning (chapter 6): the SMS spam data, last-token loss and accuracy, the training loop.

Same functions, parameters and results as ``llms_from_scratch.ch06``.  The loss and
accuracy read only the last position's logits; for gptfast's ``GPTModel`` they are
computed for that position alone (see :mod:`gptfast.finetuning.heads`), and the loss
runs through ``gptfast.ops.cross_entropy``.  With the ``"torch"`` ops backend every
number is bitwise the reference's.
"""

from __future__ import annotations

import math
import numbers
import urllib.request
import zipfile
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .. import ops
from ..files import atomic_savefig, atomic_write
from ..training.loops import batches_to_use, evaluate_losses, mean_batch_loss, require_evaluation_schedule
from ..training.optimizers import fused_optimizer_steps
from .heads import last_token_logits

# The file name inside the UCI zip archive.
_ARCHIVE_MEMBER = "SMSSpamCollection"
_SAMPLE_SEED = 123


# ----------------------------------------------------------------------------- data


def download_and_unzip_spam_data(url, zip_path, extracted_path, data_file_path):
    """Download the SMS spam zip from ``url``, extract it and rename its table to ``data_file_path``.

    Does nothing (but say so) when ``data_file_path`` exists.  The zip is written to a
    temporary file and renamed, so an interrupted download never leaves a broken archive.
    """
    zip_path, extracted_path, data_file_path = Path(zip_path), Path(extracted_path), Path(data_file_path)
    if data_file_path.exists():
        print(f"{data_file_path} already exists. Skipping download and extraction.")
        return
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url) as response, atomic_write(zip_path, "wb") as out:
        while chunk := response.read(1 << 20):
            out.write(chunk)
    with zipfile.ZipFile(zip_path, "r") as archive:
        if _ARCHIVE_MEMBER not in archive.namelist():
            raise ValueError(f"{zip_path} holds no {_ARCHIVE_MEMBER!r} file; is {url!r} the SMS spam collection?")
        archive.extractall(extracted_path)
    (extracted_path / _ARCHIVE_MEMBER).replace(data_file_path)
    print(f"File downloaded and saved as {data_file_path}")


def _require_label_column(df, name="df"):
    if "Label" not in getattr(df, "columns", ()):
        raise ValueError(f"{name} must be a pandas DataFrame with a 'Label' column")


def create_balanced_dataset(df):
    """All "spam" rows plus as many "ham" rows, sampled with ``random_state=123`` (ham first)."""
    import pandas as pd

    _require_label_column(df)
    spam = df[df["Label"] == "spam"]
    ham = df[df["Label"] == "ham"].sample(spam.shape[0], random_state=_SAMPLE_SEED)
    return pd.concat([ham, spam])


def random_split(df, train_frac, validation_frac):
    """Shuffle ``df`` (``random_state=123``) and cut it into train, validation and test frames."""
    for name, frac in (("train_frac", train_frac), ("validation_frac", validation_frac)):
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {frac}")
    if train_frac + validation_frac > 1.0:
        raise ValueError(f"train_frac + validation_frac must not exceed 1, got {train_frac + validation_frac}")
    shuffled = df.sample(frac=1, random_state=_SAMPLE_SEED).reset_index(drop=True)
    train_end = int(len(shuffled) * train_frac)
    validation_end = train_end + int(len(shuffled) * validation_frac)
    return shuffled[:train_end], shuffled[train_end:validation_end], shuffled[validation_end:]


class SpamDataset(Dataset):
    """Texts of a CSV (columns ``Text`` and integer ``Label``), tokenized and padded to one length.

    ``max_length`` truncates every text; by default it is the longest encoded text.
    Items are ``(token_ids, label)`` int64 tensors, as in the reference.
    """

    def __init__(self, csv_file, tokenizer, max_length=None, pad_token_id=50256):
        import pandas as pd

        if max_length is not None and (not _is_int(max_length) or max_length < 1):
            raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
        require_token_id("pad_token_id", pad_token_id)
        self.data = pd.read_csv(csv_file)
        for column in ("Text", "Label"):
            if column not in self.data.columns:
                raise ValueError(f"csv_file {str(csv_file)!r} has no {column!r} column")
        self.encoded_texts = [tokenizer.encode(_text(text, i)) for i, text in enumerate(self.data["Text"])]
        if max_length is None:
            self.max_length = self._longest_encoded_length()
        else:
            self.max_length = max_length
            self.encoded_texts = [ids[:max_length] for ids in self.encoded_texts]
        self.encoded_texts = [ids + [pad_token_id] * (self.max_length - len(ids)) for ids in self.encoded_texts]
        labels = self.data["Label"]
        # Whole numbers written as floats (1.0) are class ids too, as in the reference; 1.5 or NaN is no class
        # (the reference's torch.tensor(label, dtype=torch.long) would truncate it silently).
        # An infinite label, or one past int64, would turn into -2**63.
        whole_floats = pd.api.types.is_float_dtype(labels) and bool(labels.map(_is_class_id).all())
        # An empty file (a split that came out empty) reads as an object column: an empty data set, as the reference's.
        if len(labels) > 0 and not (pd.api.types.is_integer_dtype(labels) or whole_floats):
            raise ValueError(f"csv_file {str(csv_file)!r}: Label must hold integer class ids (e.g. ham 0, spam 1), "
                             f"got dtype {labels.dtype}")

    def __getitem__(self, index):
        # Read from encoded_texts and data on every call, as the reference does, so that an edit to either
        # shows in the items.
        label = self.data["Label"].iat[index]
        if not _is_class_id(label):
            raise ValueError(f"SpamDataset item {index}: Label must be an integer class id, got {label!r}")
        return torch.tensor(self.encoded_texts[index], dtype=torch.long), torch.tensor(int(label), dtype=torch.long)

    def __len__(self):
        return len(self.data)

    def _longest_encoded_length(self):
        return max((len(ids) for ids in self.encoded_texts), default=0)


def _is_class_id(value) -> bool:
    """True for an integer, or a float holding a whole number within int64 (a label read as 1.0)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return True
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
        and float(value).is_integer() and abs(value) < 2.0**63


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def require_token_id(name: str, value) -> None:
    """``TypeError`` naming ``name`` unless ``value`` is an int token id (a float would pad with its truncation,
    and targets compared with 1.5 would never match it)."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int token id, got {value!r}")


def _text(value, row):
    if not isinstance(value, str):
        raise TypeError(f"csv_file row {row}: Text must be a string, got {value!r}")
    return value


# ----------------------------------------------------------------------------- loss, accuracy, training


def calc_accuracy_loader(data_loader, model, device, num_batches=None):
    """Share of examples whose last-token argmax equals the label, over the first ``num_batches`` batches."""
    model.eval()
    num_batches = batches_to_use(data_loader, num_batches)
    correct, seen = 0, 0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        input_batch, target_batch = input_batch.to(device), target_batch.to(device)
        with torch.no_grad():
            predicted = torch.argmax(last_token_logits(model, input_batch), dim=-1)
        seen += predicted.shape[0]
        correct += (predicted == target_batch).sum().item()
    return correct / seen


def calc_loss_batch(input_batch, target_batch, model, device):
    """Cross-entropy of the last position's logits against the class labels (``gptfast.ops.cross_entropy``).

    Floating-point targets (class probabilities, as ``torch.nn.functional.cross_entropy`` takes them)
    go to torch's cross-entropy, as in the reference; the fused op takes class indices only.
    """
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = last_token_logits(model, input_batch)
    if target_batch.is_floating_point():
        return torch.nn.functional.cross_entropy(logits, target_batch)
    return ops.cross_entropy(logits, target_batch)


def calc_loss_loader(data_loader, model, device, num_batches=None):
    """Mean of :func:`calc_loss_batch` over the first ``num_batches`` batches; NaN for an empty loader."""
    return mean_batch_loss(calc_loss_batch, data_loader, model, device, num_batches)


def evaluate_model(model, train_loader, val_loader, device, eval_iter):
    """Train and validation loss over ``eval_iter`` batches each, in eval mode without gradients."""
    return evaluate_losses(calc_loss_batch, model, train_loader, val_loader, device, eval_iter)


def train_classifier_simple(model, train_loader, val_loader, optimizer, device, num_epochs,
                            eval_freq, eval_iter):
    """Chapter 6's loop: a step per batch, losses every ``eval_freq`` steps, accuracies after each epoch.

    The optimizer steps inside :func:`~gptfast.training.optimizers.fused_optimizer_steps`, as in chapter 5's loop.

    Returns ``(train_losses, val_losses, train_accs, val_accs, examples_seen)``.
    """
    # Checked before the first step, which would otherwise change the model before the first evaluation fails.
    require_evaluation_schedule(eval_freq, eval_iter)
    train_losses, val_losses, train_accs, val_accs = [], [], [], []
    examples_seen, global_step = 0, -1
    with fused_optimizer_steps(optimizer):
        for epoch in range(num_epochs):
            model.train()
            for input_batch, target_batch in train_loader:
                optimizer.zero_grad()
                loss = calc_loss_batch(input_batch, target_batch, model, device)
                loss.backward()
                optimizer.step()
                examples_seen += input_batch.shape[0]
                global_step += 1
                if global_step % eval_freq == 0:
                    train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
                    train_losses.append(train_loss)
                    val_losses.append(val_loss)
                    print(f"Ep {epoch+1} (Step {global_step:06d}): "
                          f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
            train_accuracy = calc_accuracy_loader(train_loader, model, device, num_batches=eval_iter)
            val_accuracy = calc_accuracy_loader(val_loader, model, device, num_batches=eval_iter)
            print(f"Training accuracy: {train_accuracy*100:.2f}% | ", end="")
            print(f"Validation accuracy: {val_accuracy*100:.2f}%")
            train_accs.append(train_accuracy)
            val_accs.append(val_accuracy)
    return train_losses, val_losses, train_accs, val_accs, examples_seen


def plot_values(epochs_seen, examples_seen, train_values, val_values, label="loss", show=True):
    """Plot training/validation ``label`` against epochs and examples seen; saves ``{label}-plot.pdf``.

    ``show=False`` (not in the reference) skips ``plt.show()``.  Returns None as the reference does (a returned
    figure would be drawn twice at the end of a notebook cell); the figure stays pyplot's current one.
    """
    import matplotlib.pyplot as plt

    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train_values, label=f"Training {label}")
    ax1.plot(epochs_seen, val_values, linestyle="-.", label=f"Validation {label}")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel(label.capitalize())
    ax1.legend()
    ax2 = ax1.twiny()
    ax2.plot(examples_seen, train_values, alpha=0)  # invisible: only aligns the examples axis
    ax2.set_xlabel("Examples seen")
    fig.tight_layout()
    atomic_savefig(fig, f"{label}-plot.pdf")
    if show:
        plt.show()


def classify_review(text, model, tokenizer, device, max_length=None, pad_token_id=50256):
    """"spam" or "not spam" for ``text``, padded (or truncated) to ``max_length`` tokens like the training data.

    ``max_length=None`` (an error in the reference) classifies the text unpadded, cut to
    the model's context length.
    """
    model.eval()
    context_length = model.pos_emb.weight.shape[0]
    if max_length is not None and (not _is_int(max_length) or not 1 <= max_length <= context_length):
        raise ValueError(f"max_length must be an int in [1, {context_length}] (the model's context), "
                         f"got {max_length!r}")
    require_token_id("pad_token_id", pad_token_id)
    input_ids = tokenizer.encode(text)[:context_length if max_length is None else max_length]
    if max_length is not None:
        input_ids += [pad_token_id] * (max_length - len(input_ids))
    if not input_ids:
        raise ValueError("text must encode to at least one token")
    input_tensor = torch.tensor(input_ids, device=device).unsqueeze(0)
    with torch.no_grad():
        predicted = torch.argmax(last_token_logits(model, input_tensor), dim=-1).item()
    return "spam" if predicted == 1 else "not spam"
