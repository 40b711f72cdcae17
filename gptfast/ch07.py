"""Drop-in for ``llms_from_scratch.ch07``.

Beyond the reference: ``generate_responses`` (the test-set responses in batched calls)
and the instruction loss and training loop (``calc_loss_batch``, ``calc_loss_loader``,
``evaluate_model``, ``train_model_simple``) that skip padded targets; imported by name,
they are not part of a star import.
"""

from .finetuning.instruction import (InstructionDataset, calc_loss_batch, calc_loss_loader, custom_collate_draft_1,
                                     custom_collate_draft_2, custom_collate_fn, download_and_load_file,
                                     evaluate_model, format_input, generate_responses, train_model_simple)
from .finetuning.ollama import check_if_running, generate_model_scores, query_model
from ._star import with_reference_imports

# The names beyond the reference are imported by name only: in a star import after chapter 5's they would
# replace its loss and training loop (the reference's chapter 7 has none of its own).
__all__ = ["download_and_load_file", "format_input", "InstructionDataset", "custom_collate_draft_1",
           "custom_collate_draft_2", "custom_collate_fn", "check_if_running", "query_model",
           "generate_model_scores"]


# The names a star import of the reference's module also gives (see gptfast/_star.py).
__all__, __getattr__, __dir__ = with_reference_imports(__name__, __all__, {
    "Dataset": "torch.utils.data:Dataset",
    "json": "json",
    "os": "os",
    "psutil": "psutil",
    "torch": "torch",
    "tqdm": "tqdm:tqdm",
    "urllib": "urllib.request",
})
