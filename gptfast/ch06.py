"""Drop-in for ``llms_from_scratch.ch06``."""

from .finetuning.classification import (SpamDataset, calc_accuracy_loader, calc_loss_batch, calc_loss_loader,
                                        classify_review, create_balanced_dataset, download_and_unzip_spam_data,
                                        evaluate_model, plot_values, random_split, train_classifier_simple)
from ._star import with_reference_imports

__all__ = ["download_and_unzip_spam_data", "create_balanced_dataset", "random_split", "SpamDataset",
           "calc_accuracy_loader", "calc_loss_batch", "calc_loss_loader", "evaluate_model",
           "train_classifier_simple", "plot_values", "classify_review"]


# The names a star import of the reference's module also gives (see gptfast/_star.py).
__all__, __getattr__, __dir__ = with_reference_imports(__name__, __all__, {
    "Dataset": "torch.utils.data:Dataset",
    "Path": "pathlib:Path",
    "os": "os",
    "pd": "pandas",
    "plt": "matplotlib.pyplot",
    "torch": "torch",
    "urllib": "urllib.request",
    "zipfile": "zipfile",
})
