"""``python -m gptfast.train``: the GPU pretraining script (it lives in :mod:`gptfast.training.pretrain`)."""

import contextlib
import sys

from .errors import interrupts_deferred

try:
    with interrupts_deferred() if __name__ == "__main__" else contextlib.nullcontext():
        from .models.gpt_config import gpt2_config
        from .training.pretrain import (CHECKPOINT_NAME, EXPORT_NAME, GPT2_VOCAB, LanguageModelLoss, PretrainConfig,
                                        Trainer, build_model, build_parser, check_resume_config, device_peak_flops,
                                        export_for_generation, flops_per_token, load_initial_weights, lr_at, main,
                                        make_optimizer, model_config, padded_vocab, parse_config, run,
                                        train_from_config)
except (KeyboardInterrupt, Exception) as exc:  # Ctrl-C while torch imports (perhaps wrapped by it): one line
    from .errors import raised_by_interrupt, report_interrupt

    if __name__ != "__main__" or not raised_by_interrupt(exc):
        raise

    sys.exit(report_interrupt("gptfast.train"))

__all__ = ["PretrainConfig", "Trainer", "build_parser", "parse_config", "run", "train_from_config", "main",
           "model_config", "build_model", "LanguageModelLoss", "make_optimizer", "lr_at", "flops_per_token",
           "device_peak_flops", "load_initial_weights", "export_for_generation", "check_resume_config",
           "padded_vocab", "gpt2_config", "CHECKPOINT_NAME", "EXPORT_NAME", "GPT2_VOCAB"]

if __name__ == "__main__":
    sys.exit(main())
