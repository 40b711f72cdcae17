"""Drop-in for ``llms_from_scratch.ch05``."""

from .generation import generate, generate_text_simple
from .training.loops import (calc_loss_batch, calc_loss_loader, evaluate_model, generate_and_print_sample,
                             plot_losses, text_to_token_ids, token_ids_to_text, train_model_simple)
from .weights import (assign, download_and_load_gpt2, download_file, load_gpt2_params_from_tf_ckpt,
                      load_weights_into_gpt)
from ._star import with_reference_imports

__all__ = ["generate", "generate_text_simple", "train_model_simple", "evaluate_model", "generate_and_print_sample",
           "assign", "load_weights_into_gpt", "text_to_token_ids", "token_ids_to_text", "calc_loss_batch",
           "calc_loss_loader", "plot_losses", "download_and_load_gpt2", "download_file",
           "load_gpt2_params_from_tf_ckpt"]


# The names a star import of the reference's module also gives (see gptfast/_star.py).
__all__, __getattr__, __dir__ = with_reference_imports(__name__, __all__, {
    "MaxNLocator": "matplotlib.ticker:MaxNLocator",
    "json": "json",
    "np": "numpy",
    "os": "os",
    "plt": "matplotlib.pyplot",
    "torch": "torch",
    "tqdm": "tqdm:tqdm",
    "urllib": "urllib.request",
})
