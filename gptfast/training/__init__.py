"""Training: the book's loops and the GPU pretraining script, with one checkpoint format.

* ``loops``: chapter 5 and appendix D (``train_model_simple``, ``train_model``, losses, evaluation, ``plot_losses``);
* ``checkpoints``: the one checkpoint format family (reference-compatible, with a checksum) and its loader;
* ``pretrain``: the GPU pretraining script (``python -m gptfast.train``, ``gptfast train-gpu``), driven by a
  :class:`~gptfast.training.pretrain_config.PretrainConfig`;
* ``token_cache``: the script's memory-mapped uint16 token cache and its random windows;
* ``pretrain_config``: the script's run description (:class:`~gptfast.training.pretrain_config.PretrainConfig`)
  and its flags;
* ``metrics``: the script's metrics files, loss plot and log line.
"""

from .checkpoints import load_checkpoint, read_checkpoint, save_checkpoint
from .loops import (calc_loss_batch, calc_loss_loader, evaluate_model, find_highest_gradient,
                    generate_and_print_sample, plot_losses, text_to_token_ids, token_ids_to_text, train_model,
                    train_model_simple, warmup_cosine_lr)

__all__ = ["calc_loss_batch", "calc_loss_loader", "evaluate_model", "find_highest_gradient",
           "generate_and_print_sample", "plot_losses", "text_to_token_ids", "token_ids_to_text", "train_model",
           "train_model_simple", "warmup_cosine_lr", "save_checkpoint", "load_checkpoint", "read_checkpoint"]
