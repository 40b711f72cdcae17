"""Drop-in for ``llms_from_scratch.ch07``.

Beyond the reference: ``generate_responses`` (the test-set responses in batched calls)
and the instruction loss and training loop (``calc_loss_batch``, ``calc_loss_loader``,
``evaluate_model``, ``train_model_simple``) that skip padded targets.
"""

from .finetuning.instruction import (InstructionDataset, calc_loss_batch, calc_loss_loader, custom_collate_draft_1,
                                     custom_collate_draft_2, custom_collate_fn, download_and_load_file,
                                     evaluate_model, format_input, generate_responses, train_model_simple)
from .finetuning.ollama import check_if_running, generate_model_scores, query_model

__all__ = ["download_and_load_file", "format_input", "InstructionDataset", "custom_collate_draft_1",
           "custom_collate_draft_2", "custom_collate_fn", "check_if_running", "query_model",
           "generate_model_scores", "generate_responses", "calc_loss_batch", "calc_loss_loader", "evaluate_model",
           "train_model_simple"]
