"""Drop-in for ``llms_from_scratch.appendix_d``."""

from .training.loops import (calc_loss_batch, evaluate_model, find_highest_gradient, generate_and_print_sample,
                             train_model)

__all__ = ["find_highest_gradient", "train_model", "calc_loss_batch", "evaluate_model", "generate_and_print_sample"]
