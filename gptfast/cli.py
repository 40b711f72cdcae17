"""Command line: ``gptfast train`` (the chapter-5 run), ``gptfast train-gpu`` (``gptfast.train``) and
``gptfast generate`` (streamed sampling)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from . import ops
from .config import GPT_CONFIG_124M, gpt2_config

DEFAULT_PROMPT = "Every effort moves you"


def _add_backend_flag(parser):
    parser.add_argument("--backend", default=None, choices=ops.BACKEND_CHOICES,
                        help="kernel backend for attention, loss and sampling (default: $GPTFAST_BACKEND or auto)")


def _model_config(args) -> dict:
    cfg = dict(GPT_CONFIG_124M) if args.model == "gpt2-ctx256" else gpt2_config(args.model)
    if args.context_length is not None:
        cfg["context_length"] = args.context_length
    return cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("train-gpu", help="the fast training script (python -m gptfast.train): bf16, compile, DDP; "
                                     "see gptfast train-gpu --help", add_help=False)
    train = sub.add_parser("train", help="pretrain on a text file (default: the embedded the-verdict)")
    train.add_argument("--data", default=None, help="UTF-8 text file (default: the-verdict, shipped with gptfast)")
    train.add_argument("--model", default="gpt2-ctx256",
                       choices=["gpt2-ctx256", "tiny", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"],
                       help="gpt2-ctx256 is the book's 124M config with context 256")
    train.add_argument("--context-length", type=int, default=None)
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--batch-size", type=int, default=2)
    train.add_argument("--lr", type=float, default=4e-4)
    train.add_argument("--weight-decay", type=float, default=0.1)
    train.add_argument("--eval-freq", type=int, default=5)
    train.add_argument("--eval-iter", type=int, default=5)
    train.add_argument("--train-ratio", type=float, default=0.90)
    train.add_argument("--start-context", default=DEFAULT_PROMPT)
    train.add_argument("--seed", type=int, default=123)
    train.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    train.add_argument("--out-dir", default="runs/verdict", help="checkpoint and loss plot go here")
    train.add_argument("--resume", action="store_true", help="continue from out-dir's checkpoint")
    _add_backend_flag(train)

    gen = sub.add_parser("generate", help="stream text from a checkpoint or GPT-2 safetensors weights")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint written by `gptfast train`")
    source.add_argument("--safetensors", help="Hugging Face GPT-2 model.safetensors (or its folder)")
    gen.add_argument("--model", default="gpt2", choices=["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"],
                     help="GPT-2 size of the safetensors weights")
    gen.add_argument("--prompt", default=DEFAULT_PROMPT)
    gen.add_argument("--max-new-tokens", type=int, default=50)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=123)
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    _add_backend_flag(gen)
    return parser


def run_train(args) -> int:
    """The chapter-5 pretraining run; saves ``model_and_optimizer.pth`` and ``loss-plot.png`` in out-dir."""
    import matplotlib

    matplotlib.use("Agg")
    from .data import load_text, train_val_loaders
    from .model import GPTModel
    from .tokenizer import get_tokenizer
    from .training import load_checkpoint, plot_losses, save_checkpoint, train_model_simple

    cfg = _model_config(args)
    text = load_text(args.data)
    out_dir = Path(args.out_dir)
    ckpt_path = out_dir / "model_and_optimizer.pth"
    # The chapter's order: seed and build the loaders, then seed again and build the model, so the
    # shuffling and dropout draws of `--backend torch` follow the book's run.
    train_loader, val_loader = train_val_loaders(text, cfg, args.batch_size, args.train_ratio, args.seed)
    torch.manual_seed(args.seed)
    model = GPTModel(cfg).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if args.resume:
        state = load_checkpoint(ckpt_path, model, optimizer, map_location=args.device)
        if state.get("config", cfg) != cfg:
            raise ValueError(f"--resume: checkpoint config {state['config']} differs from {cfg}")
    print(f"gptfast train: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{len(train_loader)} train / {len(val_loader)} val batches, backend {ops.get_backend()}, "
          f"device {args.device}")
    start = time.perf_counter()
    train_losses, val_losses, tokens_seen = train_model_simple(
        model, train_loader, val_loader, optimizer, args.device, num_epochs=args.epochs,
        eval_freq=args.eval_freq, eval_iter=args.eval_iter, start_context=args.start_context,
        tokenizer=get_tokenizer(), progress=True)
    elapsed = time.perf_counter() - start
    print(f"trained in {elapsed:.1f} s ({tokens_seen[-1] / elapsed if tokens_seen else 0:.0f} tokens/s)")
    save_checkpoint(ckpt_path, model, optimizer, config=cfg)
    if train_losses:
        epochs = torch.linspace(0, args.epochs, len(train_losses)).tolist()
        plot_losses(epochs, tokens_seen, train_losses, val_losses, save_path=out_dir / "loss-plot.png", show=False)
    print(f"saved {ckpt_path} and {out_dir / 'loss-plot.png'}")
    return 0


def load_model_for_generation(args):
    """Build the model from ``--checkpoint`` (config stored inside) or ``--safetensors``."""
    from .model import GPTModel
    from .training import load_checkpoint
    from .weights import load_hf_gpt2_into_gpt

    if args.checkpoint:
        path = Path(args.checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        cfg = torch.load(path, map_location="cpu", weights_only=True).get("config", GPT_CONFIG_124M)
        model = GPTModel(cfg)
        load_checkpoint(path, model)
    else:
        cfg = gpt2_config(args.model)
        model = load_hf_gpt2_into_gpt(GPTModel(cfg), args.safetensors)
    return model.to(args.device).eval(), cfg


def run_generate(args) -> int:
    """Stream ``--max-new-tokens`` tokens after ``--prompt`` to stdout."""
    from .generation import stream_text
    from .tokenizer import ENDOFTEXT_ID, get_tokenizer
    from .training import text_to_token_ids

    model, cfg = load_model_for_generation(args)
    tokenizer = get_tokenizer()
    torch.manual_seed(args.seed)
    idx = text_to_token_ids(args.prompt, tokenizer).to(args.device)
    if idx.shape[1] > cfg["context_length"]:
        raise ValueError(f"--prompt has {idx.shape[1]} tokens, more than the context length {cfg['context_length']}")
    sys.stdout.write(args.prompt)
    for chunk in stream_text(model, idx, args.max_new_tokens, tokenizer, context_size=cfg["context_length"],
                             temperature=args.temperature, top_k=args.top_k, eos_id=ENDOFTEXT_ID):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def main(argv=None) -> int:
    """Entry point of the ``gptfast`` command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train-gpu"]:  # the GPU training script, with its own flags
        from .train import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.backend is not None:
        ops.use_backend(args.backend)
    try:
        return run_train(args) if args.command == "train" else run_generate(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"gptfast {args.command}: error: {exc}", file=sys.stderr)
        return 2
