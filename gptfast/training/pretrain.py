"""GPU-oriented pretraining: ``python -m gptfast.train``, ``gptfast train-gpu`` (or ``torchrun --nproc_per_node N
-m gptfast.train``).

What makes it fast: bf16 autocast, TF32 matmuls, fused AdamW, ``torch.compile``,
the vocabulary padded to a multiple of 64 (50,257 -> 50,304 rows, the padded rows
never reach the loss), attention and the fused output-head cross-entropy from
``gptfast.ops`` (``--backend``), random windows from a memory-mapped uint16 token
cache.  What makes it safe: checkpoints holding everything needed to continue
bit-for-bit (model, optimizer, scheduler, step, RNG states, data position,
config) with a checksum, written atomically; the output folder checked before any
work; clear one-line errors for bad input; per-step metrics in ``--out-dir``.

A run is described by one :class:`PretrainConfig`; the command line only fills it in.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .. import ops
from ..errors import run_cli
from ..files import check_dir_path, check_output_files, check_writable_dir, removing_new_empty_dirs
from ..models.gpt import GPTModel
from ..models.gpt_config import GPT2_VOCAB_SIZE, gpt2_config
from .checkpoints import (MODEL_KEY, apply_checkpoint, check_model_state, export_state, fit_state_to_model,
                          load_gpt2_safetensors, read_checkpoint, write_checkpoint)
from .host_memory import keep_freed_host_memory
from .metrics import format_row, plot_loss_curve, write_metrics, write_summary
from .pretrain_config import PretrainConfig
from .pretrain_config import build_parser as _build_parser
from .token_cache import TokenWindows, build_token_cache, find_text_files, load_tokens, split_tokens

GPT2_VOCAB = GPT2_VOCAB_SIZE
CHECKPOINT_NAME = "ckpt.pt"
EXPORT_NAME = "model.pth"
# Dense bf16 tensor-core peak (TFLOP/s) per GPU, and the TF32 peak used for --dtype fp32.
PEAK_TFLOPS = {"H100": (989.0, 494.0), "H200": (989.0, 494.0), "A100": (312.0, 156.0),
               "L4": (121.0, 60.0), "A10": (125.0, 62.5)}
# Settings that change which batches a step sees or how it updates the weights: a resumed run must keep them
# (--max-steps may grow, extending a run; its schedule then follows the new length).
RUN_SIGNATURE_KEYS = ("batch_size", "grad_accum", "world_size", "seed", "dtype", "val_fraction", "data",
                      "lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip")


# ----------------------------------------------------------------------------- setup


def setup_distributed(device_flag):
    """Join torchrun's process group when launched by it; return ``(rank, world_size, device)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and (device_flag is None or device_flag.startswith("cuda"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        return dist.get_rank(), world, device
    device = device_flag or ("cuda" if torch.cuda.is_available() else "cpu")
    return 0, 1, torch.device(device)


def padded_vocab(vocab_size: int, multiple: int = 64) -> int:
    """Round the vocabulary up so the output-head matmul has tensor-core friendly shapes."""
    return (vocab_size + multiple - 1) // multiple * multiple


def model_config(config: PretrainConfig) -> dict:
    """The model's config with the padded vocabulary and the run's context length and dropout."""
    cfg = gpt2_config(config.model)
    if config.context_length is not None:
        cfg["context_length"] = config.context_length
    cfg["drop_rate"] = config.dropout
    cfg["vocab_size"] = padded_vocab(GPT2_VOCAB)
    return cfg


def build_model(cfg: dict, seed: int) -> GPTModel:
    """A seeded GPTModel whose padded output rows start (and stay) at zero."""
    torch.manual_seed(seed)
    model = GPTModel(cfg)
    with torch.no_grad():
        model.out_head.weight[GPT2_VOCAB:].zero_()
    return model


class LanguageModelLoss(nn.Module):
    """Next-token loss of a GPTModel over the real vocabulary only, through ``ops.linear_cross_entropy``.

    Only the first 50,257 rows of the padded output head enter the loss, so the
    padded logits are never formed and get no probability mass; fused backends
    never build the ``(tokens, vocab)`` logits at all.
    """

    def __init__(self, model: GPTModel, vocab_size: int = GPT2_VOCAB, compute_dtype=None):
        super().__init__()
        self.model = model
        self.vocab_size = vocab_size
        self.compute_dtype = compute_dtype

    def forward(self, inputs, targets):
        hidden = self.model.hidden_states(inputs)
        weight = self.model.out_head.weight[: self.vocab_size]
        if self.compute_dtype is not None:
            # The fused loss wants one dtype; under autocast the residual stream stays fp32.
            hidden, weight = hidden.to(self.compute_dtype), weight.to(self.compute_dtype)
        return ops.linear_cross_entropy(hidden, weight, targets)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device):
    """AdamW (fused where this torch supports it) with decay on 2-D weights only, not on biases and norms."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type in ("cuda", "cpu"))
    except (RuntimeError, TypeError):  # fused AdamW not built for this device / torch
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def lr_at(step: int, config: PretrainConfig) -> float:
    """Linear warmup to ``--lr`` over ``--warmup-steps``, then cosine decay to ``--min-lr`` at the last step.

    Step ``warmup_steps - 1`` (step 0 without warmup) runs at the peak and step ``max_steps - 1`` at
    ``--min-lr``; steps past the end (a finished run resumed with a larger ``--max-steps`` reads
    the last one's rate) stay at ``--min-lr``, and a schedule without room to decay stays at the peak.
    """
    lr, warmup = config.lr, config.warmup_steps
    if step < warmup:
        return lr * (step + 1) / warmup
    peak_step = max(warmup - 1, 0)
    span = config.max_steps - 1 - peak_step
    if span <= 0:
        return lr
    progress = min(1.0, (step - peak_step) / span)
    return config.min_lr + (lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def flops_per_token(cfg: dict, context_length: int, vocab_size: int = GPT2_VOCAB) -> float:
    """Training FLOPs per token: 6 per matmul weight (fwd + bwd) plus the attention score/value matmuls."""
    d, layers = cfg["emb_dim"], cfg["n_layers"]
    per_layer = 4 * d * d + 8 * d * d  # q, k, v, out projections + the 4x MLP
    matmul_params = layers * per_layer + vocab_size * d
    attention = 12 * layers * d * context_length  # QK^T and AV, fwd + bwd, causal mask not discounted
    return 6.0 * matmul_params + attention


def device_peak_flops(device: torch.device, dtype: str, override_tflops):
    """Peak FLOP/s of one device for MFU, or None when unknown (CPU without ``--peak-tflops``)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, tf32) in PEAK_TFLOPS.items():
        if key in name:
            return (bf16 if dtype == "bf16" else tf32) * 1e12
    return None


def rng_state(device: torch.device) -> dict:
    """Every random state that affects training (dropout masks come from torch's generators)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what :func:`rng_state` saved, wherever its tensors were loaded (torch takes the states as CPU
    byte tensors: a checkpoint read with ``map_location="cuda"`` brings them back on the GPU)."""
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def refuse_diverged(model: nn.Module) -> None:
    """A ``RuntimeError`` when a parameter of ``model`` is no longer finite (the loss diverged): saving it would
    replace the last good checkpoint with one that cannot generate."""
    bad = next((name for name, p in model.named_parameters() if not bool(p.detach().isfinite().all())), None)
    if bad is not None:
        raise RuntimeError(f"training diverged: {bad} is no longer finite (the loss became nan or inf); nothing was "
                           "saved: lower --lr or check the data")


def require_finite(name: str, value, step: int):
    """``value`` (a float or None), or the divergence error naming ``name`` and the 0-based ``step`` when it is
    nan or inf: such a value would also make metrics.json invalid JSON."""
    if value is not None and not math.isfinite(value):
        raise RuntimeError(f"{name} became {value} at step {step}: lower --lr or check the data")
    return value


# ----------------------------------------------------------------------------- weights


def load_initial_weights(model: GPTModel, path, cfg: dict) -> None:
    """``--init-from``: GPT-2 safetensors (file or folder) or a checkpoint holding a GPTModel state dict.

    Everything is read and checked before the model is touched.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--init-from path not found: {path}")
    if path.is_dir() or path.suffix == ".safetensors":
        source_cfg = {**cfg, "vocab_size": GPT2_VOCAB, "context_length": 1024}
        if cfg["context_length"] > 1024:
            raise ValueError(f"--context-length {cfg['context_length']} exceeds GPT-2's 1024 positions")
        state = load_gpt2_safetensors(GPTModel(source_cfg), path, "--init-from").state_dict()
    else:
        try:
            state = read_checkpoint(path)[MODEL_KEY]
        except ValueError as exc:
            raise ValueError(f"--init-from: {exc}") from None
    fitted = fit_state_to_model(state, model)
    try:
        check_model_state(model, fitted, f"--init-from {path}")
    except ValueError as exc:
        raise ValueError(f"--init-from {path} does not fit --model with this config: {exc}") from None
    model.load_state_dict(fitted, strict=True)


def export_for_generation(model: GPTModel, cfg: dict, path: Path) -> None:
    """Save the weights with the padded rows cut off, loadable by ``gptfast generate --checkpoint``."""
    write_checkpoint(path, export_state(model, cfg, GPT2_VOCAB))


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """One training run: model, optimizer, schedule, data, checkpoints and metrics.

    ``train_step(step)`` runs one optimizer step on the windows of that step; the
    benchmarks call it directly to time the step alone.
    """

    def __init__(self, config: PretrainConfig, rank=0, world_size=1, device=None):
        if not isinstance(config, PretrainConfig):
            raise TypeError(f"config must be a PretrainConfig, got {type(config).__name__}")
        self.config = config.validate()
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device) if device is not None else torch.device(config.device or "cpu")
        self.is_main = rank == 0
        self.dtype = config.dtype or ("bf16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported()
                                      else "fp32")
        self.amp_dtype = torch.bfloat16 if self.dtype == "bf16" else None
        text_files = check_run_paths(config)  # before any folder is made
        self.cfg = model_config(config)  # the model's config dict (GPTModel(cfg))
        self.context_length = self.cfg["context_length"]
        require_data_for_a_window(text_files, config, self.context_length)  # before a model of that context is built
        # The model and --init-from's weights before any folder or token cache is made: a file that does not
        # fit is refused leaving nothing behind.
        self.model = build_model(self.cfg, config.seed).to(self.device)
        if config.init_from:
            load_initial_weights(self.model, config.init_from, self.cfg)
        # Found now, not after hours of training: an out-dir that is read-only.
        self.out_dir = check_writable_dir(config.out_dir, name="--out-dir")
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        self.train_data, self.val_data = self._load_data()
        self.loss_module = LanguageModelLoss(self.model, compute_dtype=self.amp_dtype)
        self.optimizer = make_optimizer(self.model, config.lr, config.weight_decay, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_at(s, config) / config.lr)
        self.step_module = self._wrap(self.loss_module)
        self.start_step, self.history = 0, []
        self.tokens_per_step = config.batch_size * config.grad_accum * world_size * self.context_length
        self.flops_per_token = flops_per_token(self.cfg, self.context_length)
        self.peak_flops = device_peak_flops(self.device, self.dtype, config.peak_tflops)

    # -- data

    def _load_data(self):
        config = self.config
        data, cache_dir = data_path(config), token_cache_dir(config)
        # One process tokenises; the others wait and then read the same cache file.
        if self.is_main:
            cache_file = build_token_cache(data, cache_dir)
        self._barrier()
        if not self.is_main:
            cache_file = build_token_cache(data, cache_dir)
        train_tokens, val_tokens = split_tokens(load_tokens(cache_file), config.val_fraction)
        require_training_window(len(train_tokens), len(val_tokens), self.context_length, config, data)
        windows = len(train_tokens) - self.context_length
        if config.batch_size > windows:  # found now, not by the memory a batch of them would take
            raise ValueError(f"--batch-size {config.batch_size} is more than the {windows} windows of "
                             f"{self.context_length + 1} tokens the training split of --data {data} holds")
        train = TokenWindows(train_tokens, self.context_length, config.seed, name=f"--data {data}")
        val = None
        if len(val_tokens) >= self.context_length + 1:
            val = TokenWindows(val_tokens, self.context_length, config.seed, name="validation split")
        elif self.is_main:
            print(f"note: validation split has {len(val_tokens)} tokens, less than one window of "
                  f"{self.context_length + 1}: no validation loss", file=sys.stderr)
        return train, val

    def micro_batches(self, step: int):
        """This process's ``grad_accum`` micro-batches of step ``step`` (its slice of the global draw)."""
        a = self.config
        offsets = self.train_data.step_offsets(step, a.grad_accum * self.world_size * a.batch_size)
        offsets = offsets.view(a.grad_accum, self.world_size * a.batch_size)
        mine = offsets[:, self.rank * a.batch_size:(self.rank + 1) * a.batch_size]
        for row in mine:
            x, y = self.train_data.gather(row)
            if self.device.type == "cuda":
                x, y = x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device,
                                                                                            non_blocking=True)
            yield x, y

    # -- model wrapping

    def _wrap(self, module):
        wrapped = module
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = DDP(module, device_ids=ids)
        use_compile = self.config.compile if self.config.compile is not None else self.device.type == "cuda"
        if use_compile:
            wrapped = torch.compile(wrapped)
        return wrapped

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _barrier(self):
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    # -- one step

    def train_step(self, step: int) -> torch.Tensor:
        """Forward, backward (with accumulation), clip, optimizer and scheduler step; returns the mean loss."""
        a = self.config
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(self.micro_batches(step)):
            last = i == a.grad_accum - 1
            # Only the last micro-batch all-reduces gradients under DDP.
            sync = self._ddp().no_sync() if self.world_size > 1 and not last else nullcontext()
            with sync:
                with self._autocast():
                    loss = self.step_module(x, y) / a.grad_accum
                loss.backward()
            total += loss.detach()
        self.grad_norm = None
        if a.grad_clip > 0:
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), a.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(total, op=dist.ReduceOp.SUM)
            total /= self.world_size
        return total

    def _ddp(self):
        """The DDP module inside ``torch.compile``'s wrapper."""
        return getattr(self.step_module, "_orig_mod", self.step_module)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over the fixed validation windows (None without a validation split)."""
        if self.val_data is None:
            return None
        self.model.eval()
        x_all, y_all = self.val_data.fixed_windows(self.config.eval_batches * self.config.batch_size)
        total = 0.0
        for x, y in zip(x_all.split(self.config.batch_size), y_all.split(self.config.batch_size)):
            with self._autocast():
                # Each batch's mean weighted by its windows: a short last batch counts for what it holds.
                total += self.loss_module(x.to(self.device), y.to(self.device)).float().item() * x.shape[0]
        self.model.train()
        return total / x_all.shape[0]

    # -- checkpoints

    def signature(self) -> dict:
        """The run's settings a resumed run must keep (:data:`RUN_SIGNATURE_KEYS`)."""
        config = self.config
        values = {"batch_size": config.batch_size, "grad_accum": config.grad_accum, "world_size": self.world_size,
                  "seed": config.seed, "dtype": self.dtype, "val_fraction": config.val_fraction,
                  "data": self._data_fingerprint(), "lr": config.lr, "min_lr": config.min_lr,
                  "warmup_steps": config.warmup_steps, "weight_decay": config.weight_decay,
                  "grad_clip": config.grad_clip}
        return {k: values[k] for k in RUN_SIGNATURE_KEYS}

    def _data_fingerprint(self) -> str:
        """Token counts and a hash of the first and last tokens of each split: other data shows as other text."""
        digest = hashlib.sha1()
        counts = []
        for split in (self.train_data, self.val_data):
            tokens = np.asarray([] if split is None else split.tokens)
            counts.append(str(len(tokens)))
            for part in (tokens[:65536], tokens[-65536:]):
                digest.update(np.ascontiguousarray(part, dtype=np.int64).tobytes())
        return f"{'/'.join(counts)} tokens, {digest.hexdigest()[:16]}"

    def save_checkpoint(self, next_step: int) -> Path:
        """Write ``ckpt.pt`` atomically, with its checksum (main process only); a model whose parameters are no
        longer finite is refused (every process, so that none goes on waiting for the others)."""
        refuse_diverged(self.model)
        path = self.out_dir / CHECKPOINT_NAME
        if not self.is_main:
            return path
        return write_checkpoint(path, {
            "model_state_dict": self.model.state_dict(),
            "optimizer_state_dict": self.optimizer.state_dict(),
            "scheduler_state_dict": self.scheduler.state_dict(),
            "step": next_step,
            "config": self.cfg,
            "run": self.signature(),
            "rng": rng_state(self.device),
            # Batches are a pure function of (seed, step): the next step is the whole data position.
            "data_state": {"seed": self.config.seed, "next_step": next_step},
            "history": self.history,
        })

    def resume(self) -> None:
        """Load ``ckpt.pt`` from the out-dir after checking all of it belongs to this configuration."""
        path = self.out_dir / CHECKPOINT_NAME
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}")
        try:
            state = read_checkpoint(path)
        except ValueError as exc:
            raise ValueError(f"--resume: {exc}") from None
        check_resume_state(state, path)
        check_resume_config(state, self.cfg, self.signature(), path)
        require_steps_left(int(state["step"]), self.config, path)
        apply_checkpoint(state, self.model, self.optimizer, source=f"--resume: checkpoint {path}")
        self.scheduler.load_state_dict(state["scheduler_state_dict"])
        # The saved learning rate is the old schedule's; with another --max-steps the next step must run at
        # the new schedule's (LambdaLR's own product, so an unchanged schedule resumes bit for bit).
        for group, base, schedule in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                         self.scheduler.lr_lambdas):
            group["lr"] = base * schedule(self.scheduler.last_epoch)
        set_rng_state(state["rng"], self.device)
        self.start_step = int(state["step"])
        self.history = list(state.get("history", []))


def require_data_for_a_window(files: list[Path], config: PretrainConfig, context_length: int) -> None:
    """A ``ValueError`` naming --context-length when --data's text ``files`` cannot hold one window of it, found
    from their sizes before anything is tokenised or built (a GPT-2 token is at least one byte)."""
    most_tokens = sum(f.stat().st_size for f in files) + len(files) - 1  # an end-of-text token between files
    if context_length + 1 > most_tokens:
        raise ValueError(f"--data {data_path(config)} is shorter than one training window: its {most_tokens} bytes "
                         f"of text hold at most {most_tokens} tokens, and --context-length {context_length} needs at "
                         f"least {context_length + 1} (use more text or a shorter --context-length)")


def require_training_window(n_train: int, n_val: int, context_length: int, config: PretrainConfig, data) -> None:
    """A ``ValueError`` naming --val-fraction when the text holds a training window but the validation split
    leaves the training split less than one (a text too short in itself is --data's error)."""
    window = context_length + 1
    if n_train < window <= n_train + n_val:
        raise ValueError(f"--val-fraction {config.val_fraction} leaves the training split of --data {data} "
                         f"{n_train} of its {n_train + n_val} tokens, less than one window of {window} "
                         f"(--context-length {context_length}): give a smaller --val-fraction")


def require_steps_left(done: int, config: PretrainConfig, path: Path) -> None:
    """A ``ValueError`` when a checkpoint that has run ``done`` steps leaves this run nothing to do: the run would
    otherwise rewrite the finished run's summary (its step count, its speed) with one of no steps."""
    if config.stop_at is not None and config.stop_at <= done and config.stop_at < config.max_steps:
        raise ValueError(f"--resume: checkpoint {path} has already run {done} steps, --stop-at {config.stop_at} "
                         f"leaves none to run: give --stop-at above {done}")
    if done > config.max_steps:
        raise ValueError(f"--resume: checkpoint {path} has already run {done} steps, more than --max-steps "
                         f"{config.max_steps}: give a --max-steps above {done} to extend the run")
    if done == config.max_steps:
        raise ValueError(f"--resume: checkpoint {path} has already run all {done} steps of --max-steps "
                         f"{config.max_steps}: give a larger --max-steps to extend the run")


def data_path(config: PretrainConfig) -> Path:
    """``--data``, or the-verdict shipped with gptfast."""
    from ..resources import resource_path

    return Path(config.data if config.data is not None else resource_path("the-verdict.txt"))


def token_cache_dir(config: PretrainConfig) -> Path:
    """``--cache-dir``, or OUT_DIR/token_cache."""
    return Path(config.cache_dir) if config.cache_dir else Path(config.out_dir) / "token_cache"


def check_run_paths(config: PretrainConfig) -> list[Path]:
    """The run's paths, checked before any folder is made: ``--out-dir`` and ``--cache-dir`` are folders or can be,
    ``--data`` holds text, ``--init-from`` exists, and OUT_DIR's checkpoint is there for ``--resume`` and only
    then (:func:`check_outputs_writable`).  Returns --data's text files."""
    out_dir = check_dir_path(config.out_dir, name="--out-dir")
    check_dir_path(token_cache_dir(config), name="--cache-dir")
    check_outputs_writable(out_dir, resume=config.resume)
    if config.resume and not (out_dir / CHECKPOINT_NAME).is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {out_dir / CHECKPOINT_NAME}")
    text_files = find_text_files(data_path(config))
    if config.init_from and not Path(config.init_from).exists():
        raise FileNotFoundError(f"--init-from path not found: {config.init_from}")
    return text_files


# What a run writes into --out-dir (besides the token cache).
OUTPUT_NAMES = (CHECKPOINT_NAME, EXPORT_NAME, "metrics.csv", "metrics.json", "summary.json", "loss.png")


def check_outputs_writable(out_dir: Path, resume: bool) -> None:
    """Before any work: no output path is a folder, and a checkpoint already there is only continued (``--resume``),
    never silently replaced by a new run's."""
    check_output_files(out_dir, OUTPUT_NAMES, name="--out-dir")
    checkpoint = out_dir / CHECKPOINT_NAME
    if not resume and checkpoint.exists():
        raise ValueError(f"--out-dir {str(out_dir)!r} already holds a training checkpoint ({CHECKPOINT_NAME}): pass "
                         "--resume to continue it, or choose another --out-dir (or remove it) to start over")


RESUME_ENTRIES = {"optimizer_state_dict": dict, "scheduler_state_dict": dict, "step": int, "config": dict,
                  "rng": dict}


def check_resume_state(state: dict, path) -> None:
    """``ValueError`` unless the checkpoint has every entry a resumed run needs (e.g. not an exported model)."""
    problems = [f"{k!r} ({kind.__name__})" for k, kind in RESUME_ENTRIES.items()
                if not isinstance(state.get(k), kind) or isinstance(state.get(k), bool)]
    rng = state.get("rng")
    if isinstance(rng, dict) and not isinstance(rng.get("torch"), torch.Tensor):
        problems.append("'rng.torch' (tensor)")
    if problems:
        raise ValueError(f"--resume: checkpoint {path} is not a training checkpoint of this script; missing or "
                         f"malformed: {', '.join(problems)}")


def check_resume_config(state: dict, cfg: dict, signature: dict, path) -> None:
    """Raise ``ValueError`` naming every setting in which the checkpoint differs from this run."""
    diffs = [f"model {k}: checkpoint {state['config'].get(k)!r}, now {cfg.get(k)!r}"
             for k in sorted(set(cfg) | set(state.get("config", {}))) if state["config"].get(k) != cfg.get(k)]
    saved_run = state.get("run", {})
    # A checkpoint written before a setting was recorded is not checked for it.
    diffs += [f"{k}: checkpoint {saved_run.get(k)!r}, now {signature[k]!r}"
              for k in signature if k in saved_run and saved_run[k] != signature[k]]
    if diffs:
        raise ValueError(f"--resume: checkpoint {path} was written with a different configuration ("
                         + "; ".join(diffs) + ")")


# ----------------------------------------------------------------------------- main loop


def run(config: PretrainConfig, rank=0, world_size=1, device=None) -> dict:
    """Train per ``config``; returns the summary (also written to OUT_DIR/summary.json).

    A run that fails (bad input found late, Ctrl-C) leaves behind no empty folder it made.
    """
    with removing_new_empty_dirs(config.out_dir, token_cache_dir(config)):
        return _run(config, rank, world_size, device)


def _run(config: PretrainConfig, rank, world_size, device) -> dict:
    trainer = Trainer(config, rank, world_size, device)
    if config.resume:
        trainer.resume()
    if trainer.is_main:
        n_params = sum(p.numel() for p in trainer.model.parameters())
        print(f"gptfast.train: {config.model} ({n_params:,} parameters, vocab padded to {trainer.cfg['vocab_size']}), "
              f"{world_size} process(es) on {trainer.device}, {trainer.dtype}, backend {ops.get_backend()}, "
              f"{trainer.tokens_per_step:,} tokens/step, {len(trainer.train_data.tokens):,} training tokens")
    save_every = config.save_every or config.eval_every
    last_step = config.stop_at or config.max_steps  # validate() keeps --stop-at within --max-steps
    from tqdm import tqdm

    bar = tqdm(total=last_step, initial=trainer.start_step, unit="step", dynamic_ncols=True,
               disable=config.no_progress or not trainer.is_main)
    rates, start_time = [], time.perf_counter()
    for step in range(trainer.start_step, last_step):
        t0 = time.perf_counter()
        lr = trainer.optimizer.param_groups[0]["lr"]
        loss = trainer.train_step(step)
        done = step + 1
        evaluate_now = done % config.eval_every == 0 or done == config.max_steps
        if done % config.log_every == 0 or done == last_step or evaluate_now:
            # .item() waits for the device: the timing below covers the whole step
            loss_value = require_finite("loss", loss.item(), step)
            grad_norm = None if trainer.grad_norm is None else require_finite("grad_norm", float(trainer.grad_norm),
                                                                               step)
            dt = time.perf_counter() - t0
            tps = trainer.tokens_per_step / dt
            mfu = None if trainer.peak_flops is None else \
                tps * trainer.flops_per_token / (trainer.peak_flops * world_size)
            row = {"step": step, "loss": loss_value, "lr": lr, "tokens_per_s": tps, "mfu": mfu,
                   "grad_norm": grad_norm,
                   "elapsed_s": time.perf_counter() - start_time}
            if evaluate_now:
                row["val_loss"] = require_finite("val_loss", trainer.evaluate(), step)
            trainer.history.append(row)
            rates.append(tps)
            if trainer.is_main:
                bar.write(format_row(row))
        bar.update(1)
        if done % save_every == 0 or done == last_step:
            trainer.save_checkpoint(done)
            if trainer.is_main:
                write_metrics(trainer.out_dir, trainer.history)
    bar.close()
    # The first steps include compilation and warm-up: leave them out of the mean when there are enough.
    steady = rates[3:] if len(rates) > 6 else rates
    mean_tps = sum(steady) / len(steady) if steady else None
    summary = {
        "model": config.model, "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "device": str(trainer.device), "world_size": world_size, "dtype": trainer.dtype,
        "backend": ops.get_backend(), "steps": last_step, "tokens_per_step": trainer.tokens_per_step,
        "mean_tokens_per_s": mean_tps,
        "mfu": None if mean_tps is None or trainer.peak_flops is None
        else mean_tps * trainer.flops_per_token / (trainer.peak_flops * world_size),
        "final_loss": trainer.history[-1]["loss"] if trainer.history else None,
        "final_val_loss": next((r["val_loss"] for r in reversed(trainer.history)
                                if r.get("val_loss") is not None), None),
    }
    if trainer.is_main:
        write_metrics(trainer.out_dir, trainer.history)
        write_summary(trainer.out_dir, summary)
        if last_step == config.max_steps:
            export_for_generation(trainer.model, trainer.cfg, trainer.out_dir / EXPORT_NAME)
            plot_loss_curve(trainer.out_dir, trainer.history)
        mfu = "n/a" if summary["mfu"] is None else f"{100 * summary['mfu']:.1f}%"
        tps_text = "n/a" if mean_tps is None else f"{mean_tps:,.0f}"
        print(f"done: {last_step} steps, final loss {summary['final_loss']}, {tps_text} tokens/s, MFU {mfu}; "
              f"outputs in {trainer.out_dir}")
    return summary


def build_parser(add_help: bool = True):
    """The script's flags (see :mod:`gptfast.training.pretrain_config`), described by this module's docstring."""
    return _build_parser(add_help=add_help, description=__doc__)


def parse_config(argv=None) -> PretrainConfig:
    """The :class:`PretrainConfig` of a command line (not yet validated)."""
    return PretrainConfig.from_args(build_parser().parse_args(argv))


def train_from_config(config: PretrainConfig) -> int:
    """Validate ``config``, select its backend, join torchrun's group if launched by it, and train."""
    config.validate()
    rank, world, device = 0, 1, None
    try:
        backend = ops.check_backend_choice(config.backend)  # ($GPTFAST_BACKEND too, before anything is made)
        if config.backend is not None:
            ops.use_backend(backend)
            # Autograd may run backward on another thread: let the environment carry the choice too.
            os.environ["GPTFAST_BACKEND"] = backend
        rank, world, device = setup_distributed(config.device)
        if device.type == "cpu":  # the steps reuse their large blocks instead of faulting them in again
            note = keep_freed_host_memory()
            if rank == 0:
                print(note)
        run(config, rank, world, device)
    finally:
        if world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    """Entry point of ``python -m gptfast.train``; bad input exits with status 2 and a one-line error."""
    args = build_parser().parse_args(argv)
    config = PretrainConfig.from_args(args)
    return run_cli("gptfast.train", lambda: train_from_config(config), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
