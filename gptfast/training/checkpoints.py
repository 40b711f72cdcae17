"""One checkpoint format family and one loader for every checkpoint gptfast reads or writes.

The format is the reference's: a ``torch.save``'d dict with ``model_state_dict`` and,
when there is an optimizer, ``optimizer_state_dict``, plus any extra entries (``config``,
and for the pretraining script ``scheduler_state_dict``, ``step``, ``rng`` ...).  gptfast
adds ``checksum``: a sha256 over every tensor's dtype, shape and bytes and every other
value of the dict, so bytes flipped on disk are reported on load instead of loading
silently.  Files are written through :mod:`gptfast.files` (temporary file, then rename).

Reading accepts gptfast's checkpoints, the reference's (no checksum: nothing to verify)
and a bare ``state_dict``.  Everything is validated before anything is assigned, so a
failed load leaves the model and optimizer unchanged.  Failures are ``ValueError`` (or
``FileNotFoundError`` for a missing file), never a pickle or zip error.
"""

from __future__ import annotations

import hashlib
import numbers
import warnings
from pathlib import Path

import torch

from ..files import atomic_torch_save
from ..models.gpt_config import GPT2_VOCAB_SIZE

MODEL_KEY = "model_state_dict"
OPTIMIZER_KEY = "optimizer_state_dict"
CHECKSUM_KEY = "checksum"
# What a model config must hold, and the type of each entry.
CONFIG_TYPES = {"vocab_size": int, "context_length": int, "emb_dim": int, "n_heads": int, "n_layers": int,
                "drop_rate": numbers.Real, "qkv_bias": bool}


# ----------------------------------------------------------------------------- checksums


def _feed(digest, obj) -> None:
    """Hash ``obj`` into ``digest``: tensors by dtype, shape and bytes, containers in a fixed order."""
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().to("cpu").contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}:".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        digest.update(f"D{len(obj)}:".encode())
        for key in sorted(obj, key=repr):
            _feed(digest, key)
            _feed(digest, obj[key])
    elif isinstance(obj, (list, tuple)):
        digest.update(f"{type(obj).__name__[0]}{len(obj)}:".encode())
        for item in obj:
            _feed(digest, item)
    else:  # numbers, strings, None: repr round-trips them exactly
        digest.update(f"V{type(obj).__name__}:{obj!r};".encode())


def state_checksum(state: dict) -> str:
    """sha256 (hex) over every entry of a checkpoint dict except its ``checksum``."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in state.items() if k != CHECKSUM_KEY})
    return digest.hexdigest()


def _verify_checksum(state: dict, path) -> None:
    stored = state.get(CHECKSUM_KEY)
    if stored is None:
        return  # the reference's checkpoints carry none
    if not isinstance(stored, dict) or not isinstance(stored.get("sha256"), str):
        raise ValueError(f"checkpoint {path} has a malformed checksum entry")
    if stored["sha256"] != state_checksum(state):
        raise ValueError(f"checkpoint {path} is corrupted: its tensors do not match the stored sha256 checksum")


# ----------------------------------------------------------------------------- writing


def write_checkpoint(path, state: dict) -> Path:
    """Add the checksum to ``state`` (a dict with ``model_state_dict``) and save it atomically."""
    if not isinstance(state, dict) or not isinstance(state.get(MODEL_KEY), dict):
        raise ValueError(f"a checkpoint needs a {MODEL_KEY!r} dict")
    state = {k: v for k, v in state.items() if k != CHECKSUM_KEY}
    state[CHECKSUM_KEY] = {"sha256": state_checksum(state)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(state, path)
    return path


# Param-group entries that say how an optimizer computes, not what it trains: a checkpoint saves them unset
# and the optimizer that loads it keeps its own (a fused AdamW's "fused": True would otherwise switch on
# fused steps in a run resumed with backend "torch", or in the reference's own optimizer).
IMPLEMENTATION_KEYS = ("fused", "foreach")
# What the loading optimizer keeps of its own: also "capturable", which with "fused" decides where torch
# puts each parameter's step count while loading.
LOADER_KEEPS = IMPLEMENTATION_KEYS + ("capturable",)


def save_checkpoint(path, model, optimizer=None, **extra):
    """Save ``model`` (and ``optimizer``) in the reference's format plus ``extra`` entries and a checksum.

    The optimizer's implementation choices (``fused``, ``foreach``) are saved unset.
    """
    state = {MODEL_KEY: model.state_dict(), **extra}
    if optimizer is not None:
        optimizer_state = optimizer.state_dict()
        for group in optimizer_state["param_groups"]:
            for key in IMPLEMENTATION_KEYS:
                if key in group:
                    group[key] = None
        state[OPTIMIZER_KEY] = optimizer_state
    return write_checkpoint(path, state)


# ----------------------------------------------------------------------------- reading and checking


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:200] + "...") if len(text) > 200 else (text or type(exc).__name__)


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def check_config(config, source="config") -> dict:
    """Raise ``ValueError`` naming every missing key or wrong type of a GPT model config; return it."""
    if not isinstance(config, dict):
        raise ValueError(f"{source} must be a dict, got {type(config).__name__}")
    problems = [f"missing {k!r}" for k in CONFIG_TYPES if k not in config]
    for key, kind in CONFIG_TYPES.items():
        value = config.get(key)
        if key not in config:
            continue
        wrong_kind = not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))
        if wrong_kind:
            problems.append(f"{key!r} must be {kind.__name__}, got {type(value).__name__} {value!r}")
        elif kind is int and value < 1:
            problems.append(f"{key!r} must be >= 1, got {value}")
        elif key == "drop_rate" and not 0 <= value < 1:
            problems.append(f"'drop_rate' must be in [0, 1), got {value}")
    if not problems and config["emb_dim"] % config["n_heads"]:
        problems.append(f"'emb_dim' {config['emb_dim']} is not divisible by 'n_heads' {config['n_heads']}")
    if problems:
        raise ValueError(f"{source} is not a valid model config: " + "; ".join(problems))
    return config


def read_checkpoint(path, map_location="cpu") -> dict:
    """Read and check a checkpoint file without touching any model.

    Returns a dict with at least ``model_state_dict`` (a bare ``state_dict`` file is
    wrapped).  Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for
    anything else: a folder, an empty, truncated, corrupt or foreign file, a checksum
    mismatch, weights holding NaN or inf, or a ``config`` entry with missing keys or wrong types.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise ValueError(f"checkpoint {path} is not a file")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # torch's note on a pickle protocol other than its own would add lines to the one-line error below
            # (or to a good read): which protocol wrote the file does not matter to the user.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors all mean: not a checkpoint we can read
        # The parser's own message ("invalid load key", "PytorchStreamReader failed ...") rarely helps a
        # user; --debug shows it with the traceback.
        raise ValueError(f"checkpoint {path} cannot be read: it is truncated, corrupt or not a PyTorch "
                         f"checkpoint ({type(exc).__name__})") from None
    if _is_state_dict(state) and MODEL_KEY not in state:
        state = {MODEL_KEY: state}
    if not isinstance(state, dict) or not _is_state_dict(state.get(MODEL_KEY)):
        raise ValueError(f"checkpoint {path} holds no model state_dict ({MODEL_KEY!r} of named tensors)")
    _verify_checksum(state, path)
    _require_finite_weights(state[MODEL_KEY], path)
    if "config" in state:
        check_config(state["config"], f"checkpoint {path}: config")
    return state


def _require_finite_weights(model_state: dict, path) -> None:
    """``ValueError`` naming the first weight holding NaN or inf: a diverged run's weights generate garbage (greedy
    decoding still "works") and resume into NaN losses, so such a file is refused as soon as it is read."""
    for name, tensor in model_state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"checkpoint {path}: weight {name!r} holds NaN or inf (a diverged run?); "
                             "it cannot be used")


def check_model_state(model, model_state: dict, source) -> None:
    """``ValueError`` unless ``model_state`` has exactly ``model``'s keys and shapes (nothing is assigned)."""
    own = model.state_dict()
    missing = [k for k in own if k not in model_state]
    unexpected = [k for k in model_state if k not in own]
    wrong = [f"{k} {tuple(model_state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in model_state and model_state[k].shape != v.shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
        if items:
            problems.append(f"{label}: {', '.join(items[:4])}" + (f" (+{len(items) - 4} more)" if len(items) > 4
                                                                  else ""))
    if problems:
        raise ValueError(f"{source} does not match the model: " + "; ".join(problems))


def check_optimizer_state(optimizer, opt_state, source) -> None:
    """``ValueError`` unless ``opt_state`` fits ``optimizer``'s parameter groups and parameter shapes."""
    if not isinstance(opt_state, dict) or not isinstance(opt_state.get("param_groups"), list) \
            or not isinstance(opt_state.get("state"), dict):
        raise ValueError(f"{source} has no usable optimizer state")
    groups = optimizer.param_groups
    saved = opt_state["param_groups"]
    if len(saved) != len(groups) or any(not isinstance(s, dict) or len(s.get("params", ())) != len(g["params"])
                                        for s, g in zip(saved, groups)):
        raise ValueError(f"{source}: the optimizer state has other parameter groups than this optimizer")
    params = {pid: p for s, g in zip(saved, groups) for pid, p in zip(s["params"], g["params"])}
    for pid, entry in opt_state["state"].items():
        param = params.get(pid)
        if param is None or not isinstance(entry, dict):
            raise ValueError(f"{source}: the optimizer state names an unknown parameter {pid!r}")
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                raise ValueError(f"{source}: optimizer state {name!r} of a parameter has shape "
                                 f"{tuple(value.shape)}, the parameter {tuple(param.shape)}")


def apply_checkpoint(state: dict, model, optimizer=None, source="checkpoint") -> None:
    """Assign a checkpoint read by :func:`read_checkpoint` after checking all of it fits."""
    check_model_state(model, state[MODEL_KEY], source)
    if optimizer is not None:
        if OPTIMIZER_KEY not in state:
            raise ValueError(f"{source} has no optimizer state to resume from")
        check_optimizer_state(optimizer, state[OPTIMIZER_KEY], source)
    model.load_state_dict(state[MODEL_KEY], strict=True)
    if optimizer is not None:
        # The loading optimizer keeps its own implementation: its choices go into the groups it loads, before
        # loading, since torch places the step counts (CPU or the parameters' device) by the loaded groups.
        saved = state[OPTIMIZER_KEY]
        own = [{k: group[k] for k in LOADER_KEEPS if k in group} for group in optimizer.param_groups]
        groups = [{**group, **choice} for group, choice in zip(saved["param_groups"], own)]
        optimizer.load_state_dict({**saved, "param_groups": groups})


def load_checkpoint(path, model, optimizer=None, map_location="cpu"):
    """Load a checkpoint saved by ``save_checkpoint``, the reference, or a bare ``state_dict``.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a file that
    is not a readable checkpoint, fails its checksum, has a bad config, or does not fit
    ``model`` (or ``optimizer``).  A failed load changes nothing.  Returns the loaded dictionary.
    """
    state = read_checkpoint(path, map_location)
    apply_checkpoint(state, model, optimizer, source=f"checkpoint {path}")
    return state


# ----------------------------------------------------------------------------- padded vocabularies


def fit_state_to_model(model_state: dict, model) -> dict:
    """Fit a GPTModel state dict to ``model``: pad vocabulary rows, cut position rows, keep own masks."""
    own = model.state_dict()
    fitted = {}
    for key, value in model_state.items():
        if key.endswith(".mask"):  # the causal-mask buffers depend only on the context length
            continue
        target = own.get(key)
        if target is not None and value.dim() == 2 and key in ("tok_emb.weight", "out_head.weight") \
                and value.shape[0] < target.shape[0]:
            value = torch.cat([value, value.new_zeros(target.shape[0] - value.shape[0], value.shape[1])])
        if target is not None and key == "pos_emb.weight" and value.shape[0] > target.shape[0]:
            value = value[: target.shape[0]]
        fitted[key] = value
    for key, value in own.items():
        if key.endswith(".mask"):
            fitted[key] = value
    return fitted


def trim_vocabulary(model, vocab_size: int = GPT2_VOCAB_SIZE):
    """Cut a padded vocabulary (e.g. 50,304 rows) to its first ``vocab_size`` rows, in place.

    The pretraining script pads the embedding and output head for faster matmuls; the
    padded rows are not tokens, so generation must never produce them.
    """
    rows = model.tok_emb.weight.shape[0]
    if rows <= vocab_size:
        return model
    with torch.no_grad():
        tok_emb = torch.nn.Embedding(vocab_size, model.tok_emb.embedding_dim, device=model.tok_emb.weight.device,
                                     dtype=model.tok_emb.weight.dtype)
        tok_emb.weight.copy_(model.tok_emb.weight[:vocab_size])
        head = torch.nn.Linear(model.out_head.in_features, vocab_size, bias=model.out_head.bias is not None,
                               device=model.out_head.weight.device, dtype=model.out_head.weight.dtype)
        head.weight.copy_(model.out_head.weight[:vocab_size])
        if model.out_head.bias is not None:
            head.bias.copy_(model.out_head.bias[:vocab_size])
    model.tok_emb, model.out_head = tok_emb, head
    return model


def check_config_fits_weights(config: dict, model_state: dict, source="checkpoint") -> None:
    """``ValueError`` unless the embeddings and the block count of ``model_state`` are those ``config`` describes.

    Checked before a model of ``config`` is built: a context length or vocabulary the weights do not have
    would otherwise size the embeddings and every block's causal mask (context_length² entries) first.
    """
    expected = {"tok_emb.weight": (config["vocab_size"], config["emb_dim"]),
                "pos_emb.weight": (config["context_length"], config["emb_dim"])}
    problems = []
    for key, shape in expected.items():
        tensor = model_state.get(key)
        if tensor is None:
            problems.append(f"no {key!r}")
        elif tuple(tensor.shape) != shape:
            problems.append(f"{key!r} is {tuple(tensor.shape)}, the config needs {shape}")
    blocks = {key.split(".")[1] for key in model_state if key.startswith("trf_blocks.")}
    if len(blocks) != config["n_layers"]:
        problems.append(f"{len(blocks)} transformer blocks, the config's 'n_layers' is {config['n_layers']}")
    if problems:
        raise ValueError(f"{source}: its config does not fit its weights: " + "; ".join(problems))


def model_from_checkpoint(path, default_config=None, map_location="cpu"):
    """A ``GPTModel`` built from a checkpoint's ``config`` (or ``default_config``) with its weights.

    A padded vocabulary (the pretraining script's ``ckpt.pt``) is cut to GPT-2's 50,257
    tokens.  Returns ``(model, config)``; ``config["vocab_size"]`` is the model's vocabulary.
    """
    from ..models.gpt import GPTModel

    state = read_checkpoint(path, map_location)
    config = state.get("config", default_config)
    if config is None:
        raise ValueError(f"checkpoint {path} has no config; the model size is unknown")
    config = dict(check_config(config, f"checkpoint {path}: config"))
    check_config_fits_weights(config, state[MODEL_KEY], f"checkpoint {path}")
    model = GPTModel(config)
    apply_checkpoint(state, model, source=f"checkpoint {path}")
    if config["vocab_size"] > GPT2_VOCAB_SIZE:
        trim_vocabulary(model, GPT2_VOCAB_SIZE)
        config["vocab_size"] = GPT2_VOCAB_SIZE
    return model, config


def export_state(model, config: dict, vocab_size: int = GPT2_VOCAB_SIZE) -> dict:
    """A checkpoint dict of ``model`` with a padded vocabulary cut to ``vocab_size`` rows, and its config."""
    state = dict(model.state_dict())
    for key in ("tok_emb.weight", "out_head.weight"):
        state[key] = state[key][:vocab_size].clone()
    return {MODEL_KEY: state, "config": {**config, "vocab_size": vocab_size}}


def load_gpt2_safetensors(model, path, source="--safetensors"):
    """Hugging Face GPT-2 ``model.safetensors`` (file or folder) into ``model``; an unreadable file is a ``ValueError``.

    The safetensors parser reports damaged files with its own exception type; this names the
    file and the flag instead.
    """
    from ..weights import load_hf_gpt2_into_gpt

    try:
        return load_hf_gpt2_into_gpt(model, path)
    except (ValueError, OSError):
        raise
    except Exception as exc:  # the parser's own error type: a damaged or foreign file
        raise ValueError(f"{source} {path} is not a readable GPT-2 safetensors file: {_first_line(exc)}") from None
