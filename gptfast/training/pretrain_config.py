"""The pretraining script's run description: :class:`PretrainConfig` and the command-line flags that fill it."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass

from .. import ops
from ..devices import usable_device
from ..errors import OneLineArgumentParser, non_empty_path
from ..models.gpt_config import MODEL_NAMES

MODEL_CHOICES = ("tiny", *MODEL_NAMES)
# The seeds every command takes: torch's generators take any of them, and the per-step seed of the
# training data is derived from them modulo 2**64.
SEED_LIMIT = 2**63


def check_seed(seed: int) -> None:
    """``ValueError`` naming ``--seed`` unless ``seed`` lies in ``[0, 2**63)``."""
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"--seed must be in [0, 2**63), got {seed}")


@dataclass
class PretrainConfig:
    """Everything that describes one pretraining run (the command-line flags, one field each)."""

    model: str = "gpt2"
    data: str | None = None
    cache_dir: str | None = None
    val_fraction: float = 0.1
    batch_size: int = 8
    context_length: int | None = None
    grad_accum: int = 1
    max_steps: int = 100
    stop_at: int | None = None
    lr: float = 6e-4
    warmup_steps: int = 10
    min_lr: float = 6e-5
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dropout: float = 0.0
    eval_every: int = 50
    eval_batches: int = 10
    save_every: int | None = None
    log_every: int = 1
    device: str | None = None
    dtype: str | None = None
    compile: bool | None = None
    backend: str | None = None
    out_dir: str = "runs/train"
    resume: bool = False
    init_from: str | None = None
    peak_tflops: float | None = None
    seed: int = 1337
    no_progress: bool = False

    @classmethod
    def from_args(cls, args) -> "PretrainConfig":
        """The config from an argparse namespace holding (at least) every field."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    def validate(self) -> "PretrainConfig":
        """Reject bad values with a message naming the flag; returns ``self``."""
        if self.model not in MODEL_CHOICES:
            raise ValueError(f"--model: unknown model {self.model!r}; choose one of {', '.join(MODEL_CHOICES)}")
        for name in ("batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("context_length", "save_every", "stop_at"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.stop_at is not None and self.stop_at > self.max_steps:
            # The run ends at --max-steps whatever --stop-at says: a later stop would be silently cut short.
            raise ValueError(f"--stop-at {self.stop_at} is past --max-steps {self.max_steps}, where the run ends: "
                             f"give --stop-at <= {self.max_steps} or a larger --max-steps")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "dropout", "val_fraction", "peak_tflops"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError(f"--peak-tflops must be > 0, got {self.peak_tflops}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        check_seed(self.seed)
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need --lr > 0 and 0 <= --min-lr <= --lr, got {self.lr} and {self.min_lr}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("--grad-clip and --weight-decay must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.resume and self.init_from:
            raise ValueError("--init-from and --resume do not go together: --resume continues from OUT_DIR's "
                             "checkpoint, whose weights would replace --init-from's")
        if self.dtype not in (None, "fp32", "bf16"):
            raise ValueError(f"--dtype must be fp32 or bf16, got {self.dtype!r}")
        if self.backend is not None and self.backend not in ops.BACKEND_CHOICES:
            raise ValueError(f"--backend must be one of {ops.BACKEND_CHOICES}, got {self.backend!r}")
        if self.device is not None:
            usable_device(self.device)
        return self


def build_parser(add_help: bool = True, description: str | None = None) -> argparse.ArgumentParser:
    """The flags of :class:`PretrainConfig` (defaults from it); ``add_help=False`` to embed it in ``gptfast``."""
    d = PretrainConfig()
    p = OneLineArgumentParser(prog="python -m gptfast.train", description=description, add_help=add_help,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d.model, help=f"model size: one of {', '.join(MODEL_CHOICES)}")
    p.add_argument("--data", default=d.data, type=non_empty_path,
                   help="a text file or a folder of them (default: the-verdict, shipped with gptfast)")
    p.add_argument("--cache-dir", default=d.cache_dir, type=non_empty_path,
                   help="token cache folder (default: OUT_DIR/token_cache)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help="last part of the tokens held out")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per micro-batch per process")
    p.add_argument("--context-length", type=int, default=d.context_length,
                   help="default: the model's context length")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps; the schedule ends here")
    p.add_argument("--stop-at", type=int, default=d.stop_at,
                   help="stop (with a checkpoint) after this step, as if interrupted; the lr schedule "
                        "still follows --max-steps")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--min-lr", type=float, default=d.min_lr, help="learning rate at the end of the cosine decay")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="on matrices and embeddings only")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max global grad norm; 0 disables")
    p.add_argument("--dropout", type=float, default=d.dropout, help="dropout rate of the model")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="validation loss every N steps (and at the end)")
    p.add_argument("--eval-batches", type=int, default=d.eval_batches, help="validation batches per evaluation")
    p.add_argument("--save-every", type=int, default=d.save_every,
                   help="checkpoint every N steps (default: --eval-every)")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--device", default=d.device, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=d.dtype, choices=("fp32", "bf16"),
                   help="bf16 = bf16 autocast with fp32 weights (default on GPUs that support it)")
    p.add_argument("--compile", default=d.compile, action=argparse.BooleanOptionalAction,
                   help="torch.compile the model and loss (default: on for CUDA, off for CPU)")
    p.add_argument("--backend", default=d.backend, choices=ops.BACKEND_CHOICES,
                   help="gptfast.ops backend of every fused op (default: $GPTFAST_BACKEND or auto)")
    p.add_argument("--out-dir", default=d.out_dir, type=non_empty_path,
                   help="checkpoints, metrics and the loss plot go here")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt")
    p.add_argument("--init-from", default=d.init_from, type=non_empty_path,
                   help="start from weights: a gptfast/llms-from-scratch checkpoint, or GPT-2 model.safetensors "
                        "(file or folder)")
    p.add_argument("--peak-tflops", type=float, default=d.peak_tflops,
                   help="device peak TFLOP/s for MFU (default: known GPUs; MFU is n/a on CPU without it)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (or set GPTFAST_DEBUG=1)")
    return p
