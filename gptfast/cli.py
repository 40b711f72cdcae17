"""Command line: ``gptfast train`` (the chapter-5 run), ``gptfast train-gpu`` (the GPU pretraining script,
also ``python -m gptfast.train``) and ``gptfast generate`` (streamed sampling).

Expected failures print one line on stderr and exit with status 2; ``--debug`` or
``GPTFAST_DEBUG=1`` shows the traceback instead.  Ctrl-C, at any moment, prints one line and
exits with status 130.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from pathlib import Path
from typing import NamedTuple

# Only the standard library and gptfast.errors at import time: torch and the models are imported by
# main, which holds a Ctrl-C back during those seconds of importing and then reports it like any other.
from .devices import usable_device
from .errors import (OneLineArgumentParser, debug_requested, interrupts_deferred, non_empty_path, one_line,
                     raised_by_interrupt, report_interrupt, run_cli)

DEFAULT_PROMPT = "Every effort moves you"


def _add_common_flags(parser):
    from . import ops

    parser.add_argument("--backend", default=None, choices=ops.BACKEND_CHOICES,
                        help="gptfast.ops kernel backend of every fused op (default: $GPTFAST_BACKEND or auto)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or GPTFAST_DEBUG=1)")


def _model_config(args) -> dict:
    from .models.gpt_config import GPT_CONFIG_124M, gpt2_config

    cfg = dict(GPT_CONFIG_124M) if args.model == "gpt2-ctx256" else gpt2_config(args.model)
    if args.context_length is not None:
        cfg["context_length"] = args.context_length
    return cfg


def build_parser() -> OneLineArgumentParser:
    """The ``gptfast`` parser with its three subcommands (imports torch: the device defaults need it)."""
    import argparse

    import torch

    from .training import pretrain

    parser = OneLineArgumentParser(prog="gptfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)  # the subcommands' parsers are of the same class

    sub.add_parser("train-gpu", parents=[pretrain.build_parser(add_help=False)],
                   help="the fast training script (python -m gptfast.train): bf16, compile, DDP",
                   description=pretrain.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    train = sub.add_parser("train", help="pretrain on a text file (default: the embedded the-verdict)")
    train.add_argument("--data", default=None, type=non_empty_path,
                       help="UTF-8 text file (default: the-verdict, shipped with gptfast)")
    train.add_argument("--model", default="gpt2-ctx256",
                       choices=["gpt2-ctx256", "tiny", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"],
                       help="gpt2-ctx256 is the book's 124M config with context 256")
    train.add_argument("--context-length", type=int, default=None)
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--batch-size", type=int, default=2)
    # None: the book's 4e-4 and 0.1 for a new run; a --resume keeps the checkpoint's unless given.
    train.add_argument("--lr", type=float, default=None, help="default 4e-4 (a --resume: the checkpoint's)")
    train.add_argument("--weight-decay", type=float, default=None, help="default 0.1 (a --resume: the checkpoint's)")
    train.add_argument("--eval-freq", type=int, default=5)
    train.add_argument("--eval-iter", type=int, default=5)
    train.add_argument("--train-ratio", type=float, default=0.90)
    train.add_argument("--start-context", default=DEFAULT_PROMPT)
    train.add_argument("--seed", type=int, default=123)
    train.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    train.add_argument("--out-dir", default="runs/verdict", type=non_empty_path,
                       help="checkpoint and loss plot go here")
    keep = train.add_mutually_exclusive_group()
    keep.add_argument("--resume", action="store_true", help="continue from out-dir's checkpoint")
    keep.add_argument("--overwrite", action="store_true",
                      help="replace out-dir's checkpoint with this run's (without --resume or --overwrite, a run "
                           "refuses an out-dir that holds one)")
    _add_common_flags(train)

    gen = sub.add_parser("generate", help="stream text from a checkpoint, GPT-2 safetensors weights or a Hugging "
                                          "Face Llama 3 / Qwen3 folder")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=non_empty_path,
                        help="a checkpoint written by `gptfast train` or `gptfast train-gpu`")
    source.add_argument("--safetensors", type=non_empty_path,
                        help="Hugging Face GPT-2 model.safetensors (or its folder), or a Llama 3 / Qwen3 model folder "
                             "(its config.json says which)")
    gen.add_argument("--model", default=None, choices=["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"],
                     help="GPT-2 size of the safetensors weights (default gpt2)")
    gen.add_argument("--tokenizer", default=None, type=non_empty_path,
                     help="Llama 3 / Qwen3: the tokenizer file (default: the folder's tokenizer.json for Qwen3, "
                          "original/tokenizer.model for Llama 3)")
    gen.add_argument("--chat", action="store_true",
                     help="Llama 3 / Qwen3: wrap the prompt in the model's chat template and stop at the end of "
                          "the reply")
    gen.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="Llama 3 / Qwen3: the model's dtype (default: the checkpoint's config.json)")
    gen.add_argument("--prompt", default=DEFAULT_PROMPT)
    gen.add_argument("--max-new-tokens", type=int, default=50)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=123)
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    _add_common_flags(gen)
    return parser


def _select_backend(name) -> None:
    """``--backend``, else ``$GPTFAST_BACKEND``: one that is no backend or cannot run here is refused now, before
    anything is read or made (a one-line error)."""
    from . import ops

    ops.use_backend(ops.check_backend_choice(name))


CHAPTER_CHECKPOINT = "model_and_optimizer.pth"
DEFAULT_LR, DEFAULT_WEIGHT_DECAY = 4e-4, 0.1  # chapter 5's AdamW
# Entries of the chapter checkpoint beside the reference's two: the CPU random state at its end, and the
# losses of every run that led to it (the loss plot of a resumed run covers them all).
RNG_KEY, HISTORY_KEY = "rng_state", "history"
# And the settings that decide which batches its steps saw: a resumed run must keep them (see _run_settings).
RUN_KEY = "run"
_SETTING_FLAGS = {"batch_size": "--batch-size", "train_ratio": "--train-ratio", "seed": "--seed"}
LOSS_PLOT = "loss-plot.png"


def _check_train_flags(args) -> None:
    """The train flags no file is needed for, checked before anything is read or made."""
    from .training.pretrain_config import check_seed

    for flag, value in (("--eval-freq", args.eval_freq), ("--eval-iter", args.eval_iter),
                        ("--batch-size", args.batch_size), ("--context-length", args.context_length)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.epochs < 0:
        raise ValueError(f"--epochs must be >= 0, got {args.epochs}")
    for flag, value in (("--lr", args.lr), ("--weight-decay", args.weight_decay)):
        if value is not None and not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{flag} must be a finite number >= 0, got {value}")
    # Python's slicing would read a negative ratio from the end: -0.1 would train on the first 90%.
    if not 0 < args.train_ratio < 1:
        raise ValueError(f"--train-ratio must lie strictly between 0 and 1, got {args.train_ratio}")
    check_seed(args.seed)


def _check_start_context(text: str) -> None:
    """``--start-context``, which each epoch's sample continues, encodes to at least one token (found now, not
    after the first epoch)."""
    from .tokenizer import get_tokenizer
    from .training.loops import text_to_token_ids

    if not text or text_to_token_ids(text, get_tokenizer()).numel() == 0:
        raise ValueError("--start-context is empty: each epoch's sample continues it, give at least one token")


def _check_out_dir(args) -> Path:
    """``--out-dir`` can hold the run's files, and a checkpoint already there is replaced only on request."""
    from .files import check_dir_path, check_output_files

    out_dir = check_dir_path(args.out_dir, name="--out-dir")
    check_output_files(out_dir, (CHAPTER_CHECKPOINT, LOSS_PLOT), name="--out-dir")
    if (out_dir / CHAPTER_CHECKPOINT).exists() and not (args.resume or args.overwrite):
        raise ValueError(f"--out-dir {str(out_dir)!r} already holds a checkpoint ({CHAPTER_CHECKPOINT}): pass "
                         "--resume to continue it or --overwrite to replace it")
    return out_dir


def _read_resume_state(ckpt_path: Path, cfg: dict, device):
    """``--resume``: the checkpoint at ``ckpt_path``, checked to be one of a model with config ``cfg``."""
    from .training.checkpoints import read_checkpoint

    if not ckpt_path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
    try:
        state = read_checkpoint(ckpt_path, map_location=device)
    except ValueError as exc:
        raise ValueError(f"--resume: {exc}") from None
    if state.get("config", cfg) != cfg:
        raise ValueError(f"--resume: checkpoint config {state['config']} differs from {cfg}")
    return state


def _run_settings(args, text: str) -> dict:
    """The settings of this run that decide which batches a step sees: the text (by its SHA-256, with the file
    it came from for messages), the batch size, the split and the seed the loaders and the model start from."""
    return {"data_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "data": str(Path(args.data).resolve()) if args.data is not None else None,
            "batch_size": args.batch_size, "train_ratio": args.train_ratio, "seed": args.seed}


def _data_name(path) -> str:
    return repr(path) if path is not None else "the embedded the-verdict"


def _check_resume_settings(resume_state: dict, settings: dict, ckpt_path: Path) -> None:
    """``ValueError`` naming each flag in which ``--resume`` differs from the run that wrote the checkpoint.

    A run resumed on another text, split, batch size or seed would go on with batches the saved run never
    drew (a forgotten ``--data`` would train the rest of the run on the-verdict); a checkpoint that recorded
    no settings (the reference's, or one written before they were kept) is not checked.
    """
    saved = resume_state.get(RUN_KEY)
    if not isinstance(saved, dict):
        return
    diffs = []
    if saved.get("data_sha256", settings["data_sha256"]) != settings["data_sha256"]:
        was, now = _data_name(saved.get("data")), _data_name(settings["data"])
        diffs.append(f"--data: checkpoint {was}, now {now}" if was != now else
                     f"--data: the text of {now} has changed since the checkpoint was written")
    for key, flag in _SETTING_FLAGS.items():
        if key in saved and saved[key] != settings[key]:
            diffs.append(f"{flag}: checkpoint {saved[key]!r}, now {settings[key]!r}")
    if diffs:
        raise ValueError(f"--resume: checkpoint {ckpt_path} was trained with other settings ({'; '.join(diffs)}): "
                         "give the checkpoint's, or --overwrite to start a new run")


def _read_data(path) -> str:
    """The text of ``--data`` (the-verdict without it); a folder, a missing or a non-UTF-8 file is named."""
    from .data import load_text

    try:
        return load_text(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"--data: {exc}") from None
    except OSError as exc:
        raise OSError(f"--data: {one_line(exc)}") from None
    except ValueError as exc:
        raise ValueError(f"--data: {exc}") from None


def _chapter_loaders(args, text: str, cfg: dict):
    """The chapter's train and validation loaders of ``text``, refused when they give no training batch."""
    from .data import train_val_loaders

    try:
        train_loader, val_loader = train_val_loaders(text, cfg, args.batch_size, args.train_ratio, args.seed)
    except ValueError as exc:  # a split too short for one window
        raise ValueError(f"{exc}: use more text (--data), another --train-ratio or a shorter --context-length") \
            from None
    if len(train_loader) == 0:  # drop_last: fewer windows than a batch give no step at all
        raise ValueError(f"--batch-size {args.batch_size} is more than the {len(train_loader.dataset)} windows of "
                         f"--context-length {cfg['context_length']} tokens the training split gives: use a smaller "
                         "--batch-size or --context-length, or more text")
    return train_loader, val_loader


def run_train(args) -> int:
    """The chapter-5 pretraining run; saves ``model_and_optimizer.pth`` and ``loss-plot.png`` in out-dir.

    Every flag, the data and out-dir are checked before out-dir is made and before the model is built; a run
    that fails leaves no empty out-dir it made behind.
    """
    from .files import removing_new_empty_dirs

    _check_train_flags(args)
    _check_start_context(args.start_context)
    device = usable_device(args.device)
    _select_backend(args.backend)
    cfg = _model_config(args)
    out_dir = _check_out_dir(args)
    resume_state = _read_resume_state(out_dir / CHAPTER_CHECKPOINT, cfg, device) if args.resume else None
    text = _read_data(args.data)
    settings = _run_settings(args, text)
    if resume_state is not None:
        _check_resume_settings(resume_state, settings, out_dir / CHAPTER_CHECKPOINT)
    # The chapter's order: seed and build the loaders, then seed again and build the model, so the
    # shuffling and dropout draws of `--backend torch` follow the book's run.
    train_loader, val_loader = _chapter_loaders(args, text, cfg)
    with removing_new_empty_dirs(out_dir):
        return _train_and_save(args, cfg, device, out_dir, train_loader, val_loader, resume_state, settings)


def _tokens_per_epoch(loader) -> int:
    """Input tokens one pass over ``loader`` trains on (its windows, less the partial batch ``drop_last`` skips)."""
    rows = len(loader.dataset)
    if loader.drop_last:
        rows -= rows % loader.batch_size
    return rows * len(loader.dataset[0][0]) if rows else 0


def _saved_history(resume_state, train_loader) -> dict:
    """The epochs, steps, tokens, losses and token counts the checkpoint being resumed recorded (none for a new
    run, or for a checkpoint written before they were saved). A checkpoint with epochs but no step or token total
    gets those of as many passes over ``train_loader``."""
    saved = (resume_state or {}).get(HISTORY_KEY)
    keys = ("train_losses", "val_losses", "tokens_seen")
    if not (isinstance(saved, dict) and isinstance(saved.get("epochs"), int)
            and all(isinstance(saved.get(key), list) for key in keys)):
        return {"epochs": 0, "steps": 0, "tokens": 0, **{key: [] for key in keys}}
    for key, per_epoch in (("steps", len(train_loader)), ("tokens", _tokens_per_epoch(train_loader))):
        if not isinstance(saved.get(key), int):
            saved[key] = saved["epochs"] * per_epoch
    return saved


def _restore_random_state(saved, device) -> None:
    """Set the random generators to a checkpoint's: the states :func:`~gptfast.training.pretrain.rng_state` saved,
    or the CPU generator's state alone (checkpoints written before the GPU's was kept); none: left as they are."""
    import torch

    from .training.pretrain import set_rng_state

    if isinstance(saved, torch.Tensor):
        torch.set_rng_state(saved.cpu())
    elif isinstance(saved, dict) and isinstance(saved.get("torch"), torch.Tensor) and "python" in saved:
        set_rng_state(saved, device)


def _train_and_save(args, cfg, device, out_dir: Path, train_loader, val_loader, resume_state, settings) -> int:
    """The checked run: make out-dir, build the model, train, save the checkpoint and the loss plot."""
    import torch

    with interrupts_deferred():  # the loss plot's imports, done now: a Ctrl-C inside them would be lost
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401

    from . import ops

    from .files import check_writable_dir
    from .models.gpt import GPTModel
    from .tokenizer import get_tokenizer
    from .training.checkpoints import apply_checkpoint, save_checkpoint
    from .training.host_memory import keep_freed_host_memory
    from .training.loops import RunSoFar, calc_loss_batch, plot_losses, train_simple_with_loss
    from .training.optimizers import chapter_adamw
    from .training.pretrain import refuse_diverged, rng_state

    check_writable_dir(out_dir, name="--out-dir")  # before training, not after it
    ckpt_path = out_dir / CHAPTER_CHECKPOINT
    torch.manual_seed(args.seed)
    model = GPTModel(cfg).to(device)
    optimizer = chapter_adamw(model.parameters(), lr=DEFAULT_LR if args.lr is None else args.lr,
                              weight_decay=DEFAULT_WEIGHT_DECAY if args.weight_decay is None else args.weight_decay)
    if resume_state is not None:
        apply_checkpoint(resume_state, model, optimizer, source=f"--resume: checkpoint {ckpt_path}")
        # The optimizer state brings the saved rates back; a flag given for this run overrides them.
        for group in optimizer.param_groups:
            for key, value in (("lr", args.lr), ("weight_decay", args.weight_decay)):
                if value is not None:
                    group[key] = value
    # The steps reuse their large blocks instead of faulting them in again (CPU training only).
    host = f"; {keep_freed_host_memory()}" if device.type == "cpu" else ""
    print(f"gptfast train: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{len(train_loader)} train / {len(val_loader)} val batches, backend {ops.get_backend()}, "
          f"device {device}{host}")
    history = _saved_history(resume_state, train_loader)
    if resume_state is not None:
        # The saved run's random streams go on (the CPU's, and a GPU's dropout): the next epoch is shuffled
        # (and dropped out) as that run's next epoch would be, not as its first one again.
        _restore_random_state(resume_state.get(RNG_KEY), device)
    start = time.perf_counter()
    # Chapter 5's loop (``train_model_simple``), its epochs, steps and token counts going on from the saved run's.
    train_losses, val_losses, tokens_seen = train_simple_with_loss(
        calc_loss_batch, model, train_loader, val_loader, optimizer, device, num_epochs=args.epochs,
        eval_freq=args.eval_freq, eval_iter=args.eval_iter, start_context=args.start_context,
        tokenizer=get_tokenizer(), progress=True,
        so_far=RunSoFar(history["epochs"], history["steps"], history["tokens"]))
    elapsed = time.perf_counter() - start
    epoch_tokens = _tokens_per_epoch(train_loader)
    print(f"trained in {elapsed:.1f} s ({epoch_tokens * args.epochs / elapsed:.0f} tokens/s)")
    refuse_diverged(model)
    history = {"epochs": history["epochs"] + args.epochs, "steps": history["steps"] + len(train_loader) * args.epochs,
               "tokens": history["tokens"] + epoch_tokens * args.epochs,
               "train_losses": history["train_losses"] + train_losses,
               "val_losses": history["val_losses"] + val_losses,
               "tokens_seen": history["tokens_seen"] + [int(t) for t in tokens_seen]}
    save_checkpoint(ckpt_path, model, optimizer, config=cfg,
                    **{RNG_KEY: rng_state(device), HISTORY_KEY: history, RUN_KEY: settings})
    if not history["train_losses"]:  # no evaluation ran (no epochs, or fewer steps than --eval-freq): nothing to plot
        print(f"saved {ckpt_path} (no loss plot: no evaluation ran)")
        return 0
    epochs = torch.linspace(0, history["epochs"], len(history["train_losses"])).tolist()
    plot_losses(epochs, history["tokens_seen"], history["train_losses"], history["val_losses"],
                save_path=out_dir / LOSS_PLOT, show=False)
    print(f"saved {ckpt_path} and {out_dir / LOSS_PLOT}")
    return 0


def load_model_for_generation(args):
    """Build the model from ``--checkpoint`` (config stored inside) or ``--safetensors`` (GPT-2 weights).

    A padded vocabulary (the GPU script's ``ckpt.pt``) is cut to GPT-2's, so a padded id is never produced.
    """
    from .models.gpt import GPTModel
    from .models.gpt_config import GPT_CONFIG_124M, gpt2_config
    from .training.checkpoints import load_gpt2_safetensors, model_from_checkpoint

    device = usable_device(args.device)
    if args.checkpoint:
        model, cfg = model_from_checkpoint(args.checkpoint, default_config=GPT_CONFIG_124M)
    else:
        path = Path(args.safetensors)
        if not path.exists():
            raise FileNotFoundError(f"--safetensors path not found: {path}")
        cfg = gpt2_config(args.model or "gpt2")
        model = load_gpt2_safetensors(GPTModel(cfg), path)
    return model.to(device).eval(), cfg


class _Generation(NamedTuple):
    """What ``gptfast generate`` streams from: the model, its config, the tokenizer, the end token the stream
    stops at, every token that ends the text, and the prompt's ids ``(1, T)``."""

    model: object  # a torch.nn.Module
    cfg: dict
    tokenizer: object
    eos_id: int
    stop_ids: frozenset
    prompt_ids: object  # a torch.Tensor


def _gpt2_generation(args) -> _Generation:
    """What to stream from a GPT-2 checkpoint or safetensors file."""
    from .tokenizer import ENDOFTEXT_ID, get_tokenizer
    from .training.loops import text_to_token_ids

    for flag, value in (("--tokenizer", args.tokenizer), ("--chat", args.chat), ("--dtype", args.dtype)):
        if value:
            raise ValueError(f"{flag} applies to Llama 3 / Qwen3 model folders, not to GPT-2 weights")
    model, cfg = load_model_for_generation(args)
    tokenizer = get_tokenizer()
    prompt_ids = text_to_token_ids(args.prompt, tokenizer)
    _check_prompt_fits(args, prompt_ids, cfg)  # the checkpoint holds the config: known only once it is read
    return _Generation(model, cfg, tokenizer, ENDOFTEXT_ID, frozenset({ENDOFTEXT_ID}), prompt_ids)


def _hf_folder_generation(args, folder) -> _Generation:
    """What to stream from the Llama 3 / Qwen3 model ``folder`` (``--safetensors``)."""
    import torch

    from .models import hf_folder
    from .weights import check_safetensors_folder

    if args.model is not None:
        raise ValueError(f"--model {args.model} names a GPT-2 size, but {args.safetensors} holds a Llama 3 / "
                         "Qwen3 model (its config.json describes it)")
    device = usable_device(args.device)
    family, config = hf_folder.read_config(folder)  # a bad config is named before the weights are read
    tokenizer_path = args.tokenizer or hf_folder.default_tokenizer_path(folder, family)
    tokenizer = hf_folder.load_tokenizer(family, tokenizer_path, chat=args.chat, folder=folder)
    _check_tokenizer_fits(tokenizer, family, tokenizer_path, config["vocab_size"], folder)
    prompt_ids = torch.tensor([tokenizer.encode(args.prompt)], dtype=torch.long)
    _check_prompt_fits(args, prompt_ids, config)  # from config.json: before the weights are read
    dtype = hf_folder.DTYPES[args.dtype] if args.dtype else None
    check_safetensors_folder(folder)  # a broken weights file or index is named before any tensor is read
    model, cfg, _ = hf_folder.load_model(folder, dtype=dtype, device=device)
    tokenizer = _DecodeErrorsNamed(tokenizer, tokenizer_path)
    return _Generation(model, cfg, tokenizer, tokenizer.eos_id, tokenizer.stop_ids, prompt_ids)


def _tokenizer_id_count(tokenizer, family) -> int:
    """How many token ids the book's tokenizer of ``family`` (inside ``hf_folder.load_tokenizer``'s) knows: its
    highest id + 1."""
    if family == "llama3":
        return tokenizer.tokenizer.model.n_vocab  # the tiktoken encoding's highest id + 1
    return tokenizer.tokenizer._tok.get_vocab_size(with_added_tokens=True)


def _check_tokenizer_fits(tokenizer, family, path, vocab_size, folder) -> None:
    """``ValueError`` naming the tokenizer file and both sizes when the tokenizer is not the model's.

    Llama 3's tiktoken raises on an id it has no token for, so the model may have no rows past the tokenizer's
    highest id (the book's tokenizer has two reserved ids past Llama 3's 128,256 rows: more ids are fine).
    Qwen3 models have more rows than their tokenizer has ids (151,936 for 151,669; the tokenizers package
    decodes those ids as no text), never fewer: a tokenizer with ids past the model's rows is another model's.
    """
    count = _tokenizer_id_count(tokenizer, family)
    if (family == "llama3" and vocab_size > count) or (family != "llama3" and count > vocab_size):
        raise ValueError(f"tokenizer {path} has {count} token ids, but the model's vocab_size is {vocab_size} "
                         f"({Path(folder) / 'config.json'}): the tokenizer does not belong to this model")


class _DecodeErrorsNamed:
    """The tokenizer ``tokenizer`` whose decode of an id it has no token for (tiktoken's KeyError, where a
    tokenizer file leaves gaps in the model's vocabulary) is a ValueError naming the tokenizer file."""

    def __init__(self, tokenizer, path):
        self.tokenizer = tokenizer
        self.path = path

    def decode(self, ids):
        try:
            return self.tokenizer.decode(ids)
        except KeyError as exc:
            raise ValueError(f"tokenizer {self.path} cannot decode a token the model generated "
                             f"({exc.args[0] if exc.args else exc}): the tokenizer does not belong to this model") \
                from None

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def _hf_model_folder(args):
    """The Llama 3 / Qwen3 folder ``--safetensors`` names (itself, or the folder of a weights file inside one), or
    ``None`` (GPT-2 weights, or ``--checkpoint``)."""
    from .models.hf_folder import is_hf_model_folder

    if not args.safetensors:
        return None
    path = Path(args.safetensors)
    for folder in (path, path.parent) if path.is_file() else (path,):
        if is_hf_model_folder(folder):
            return folder
    return None


def _check_generate_flags(args) -> None:
    """The generate flags no file is needed for, checked before any is read and anything is written: an error
    then stands alone on its line."""
    from .training.pretrain_config import check_seed

    if args.checkpoint and args.model is not None:
        raise ValueError(f"--model {args.model} applies to --safetensors GPT-2 weights: a --checkpoint holds its "
                         "model's config")
    if not args.prompt:
        raise ValueError("--prompt is empty: give at least one token of text to continue")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    # The library takes any temperature >= 0, as the book's generate does; an infinite one here is a typo.
    if not (args.temperature >= 0 and math.isfinite(args.temperature)):
        raise ValueError(f"--temperature must be a finite number >= 0 (0 means greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    check_seed(args.seed)


def _check_prompt_fits(args, idx, cfg) -> None:
    """``--prompt``'s token ids ``idx`` (on the CPU) and ``--top-k`` within the model's context and vocabulary."""
    if idx.numel() == 0:
        raise ValueError("--prompt encodes to no tokens: give at least one token of text to continue")
    if idx.shape[1] > cfg["context_length"]:
        raise ValueError(f"--prompt has {idx.shape[1]} tokens, more than the context length {cfg['context_length']}")
    if int(idx.max()) >= cfg["vocab_size"]:
        raise ValueError(f"--prompt holds token id {int(idx.max())}, outside the checkpoint's vocabulary of "
                         f"{cfg['vocab_size']}")
    if args.top_k is not None and args.top_k > cfg["vocab_size"]:
        raise ValueError(f"--top-k must be <= the vocabulary size {cfg['vocab_size']}, got {args.top_k}")


def run_generate(args) -> int:
    """Stream ``--max-new-tokens`` tokens after ``--prompt`` to stdout."""
    import torch

    from .generation import stream_text

    _check_generate_flags(args)
    _select_backend(args.backend)
    folder = _hf_model_folder(args)
    loaded = _gpt2_generation(args) if folder is None else _hf_folder_generation(args, folder)
    model, cfg, tokenizer, eos_id, stop_ids, idx = loaded
    torch.manual_seed(args.seed)
    idx = idx.to(next(model.parameters()).device)
    # The stream checks its arguments when made: before the prompt is written.
    # The stream stops at one end token (the model's own); the loop below at any of the others.
    chunks = stream_text(model, idx, args.max_new_tokens, tokenizer, context_size=cfg["context_length"],
                         temperature=args.temperature, top_k=args.top_k, eos_id=eos_id)
    sys.stdout.write(args.prompt + ("\n" if args.chat else ""))  # a chat's reply starts on a line of its own
    write_until_stop(chunks, stop_ids, tokenizer, sys.stdout)
    sys.stdout.write("\n")
    return 0


def write_until_stop(chunks, stop_ids, tokenizer, out) -> None:
    """Write the streamed ``chunks``' text to ``out`` up to the first chunk of a token in ``stop_ids``.

    A stop token's chunk is not written, but the bytes held back before it (a character the stop
    token cut short) are: as the tokenizer decodes them on their own, as at the end of a stream.
    """
    held: list[int] = []  # tokens since the last chunk with text: their bytes wait for a character's end
    for chunk in chunks:
        if chunk.token_id in stop_ids:
            if held:
                out.write(tokenizer.decode(held))
            break
        if chunk.text:
            held.clear()
        elif chunk.token_id is not None:
            held.append(chunk.token_id)
        out.write(chunk.text)
        out.flush()


def run_train_gpu(args) -> int:
    """``gptfast train-gpu``: the GPU pretraining script with the parsed flags."""
    from .training import pretrain

    return pretrain.train_from_config(pretrain.PretrainConfig.from_args(args))


COMMANDS = {"train": run_train, "generate": run_generate, "train-gpu": run_train_gpu}


def _prog(argv) -> str:
    """``gptfast`` and the command ``argv`` names, as its messages begin."""
    command = next((arg for arg in (sys.argv[1:] if argv is None else argv) if arg in COMMANDS), None)
    return "gptfast" if command is None else f"gptfast {command}"


def main(argv=None) -> int:
    """Entry point of the ``gptfast`` command."""
    try:
        with interrupts_deferred():  # the seconds of importing torch and the models
            parser = build_parser()
        args = parser.parse_args(argv)
    except (KeyboardInterrupt, Exception) as exc:  # torch's import may wrap a Ctrl-C in an error of its own
        if debug_requested() or not raised_by_interrupt(exc):
            raise
        return report_interrupt(_prog(argv))
    return run_cli(f"gptfast {args.command}", lambda: COMMANDS[args.command](args), debug=args.debug)
