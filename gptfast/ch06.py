"""Drop-in for ``llms_from_scratch.ch06``."""

from .finetuning.classification import (SpamDataset, calc_accuracy_loader, calc_loss_batch, calc_loss_loader,
                                        classify_review, create_balanced_dataset, download_and_unzip_spam_data,
                                        evaluate_model, plot_values, random_split, train_classifier_simple)

__all__ = ["download_and_unzip_spam_data", "create_balanced_dataset", "random_split", "SpamDataset",
           "calc_accuracy_loader", "calc_loss_batch", "calc_loss_loader", "evaluate_model",
           "train_classifier_simple", "plot_values", "classify_review"]
