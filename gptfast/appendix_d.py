"""Drop-in for ``llms_from_scratch.appendix_d``."""

from .training.loops import (calc_loss_batch, evaluate_model, find_highest_gradient, generate_and_print_sample,
                             train_model)
from ._star import with_reference_imports

__all__ = ["find_highest_gradient", "train_model", "calc_loss_batch", "evaluate_model", "generate_and_print_sample"]


# The names a star import of the reference's module also gives (see gptfast/_star.py).
__all__, __getattr__, __dir__ = with_reference_imports(__name__, __all__, {
    "math": "math",
    "torch": "torch",
})
