"""Fetching files from the Hugging Face Hub and reading safetensors checkpoints from a folder.

Downloads land in a temporary file beside the destination and are renamed into
place only when complete, so an interrupted download never leaves a truncated file
that a later run would take for the real one.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

import torch

from ..files import path_inside, save_response
from ..weights import DOWNLOAD_TIMEOUT_S, NETWORK_ERRORS, read_weight_map

__all__ = ["HF_BASE_URL", "download_from_huggingface", "download_from_huggingface_from_snapshots",
           "load_safetensors_folder", "assign", "load_tensor_into", "hf_blocks_to_fill"]

HF_BASE_URL = "https://huggingface.co"
SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"


def download_from_huggingface(repo_id, filename, local_dir, revision="main"):
    """Download ``filename`` of Hub repository ``repo_id`` into ``local_dir`` unless it is already there.

    Returns the local path.  A failed, stalled (no bytes for ``DOWNLOAD_TIMEOUT_S`` seconds) or cut-short
    download raises ``OSError`` naming the URL (``urllib``'s ``HTTPError`` with the server's code, as in the
    reference, when the server refused) and leaves nothing behind; a ``filename`` leading outside
    ``local_dir`` is a ``ValueError``.
    """
    url = f"{HF_BASE_URL}/{repo_id}/resolve/{revision}/{filename}"
    path_inside(local_dir, filename)  # refuses a filename leading outside local_dir
    dest_path = os.path.join(local_dir, filename)  # the path as the reference spells it (returned and printed)
    Path(dest_path).parent.mkdir(parents=True, exist_ok=True)
    if os.path.exists(dest_path):
        print(f"File already exists: {dest_path}")
        return dest_path
    print(f"Downloading {url} to {dest_path}...")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            save_response(response, dest_path)
    except (OSError, *NETWORK_ERRORS) as exc:  # http.client's errors (a cut-short chunk) are no OSError
        raise _download_error(exc, f"could not download {url} to {dest_path}") from exc
    return dest_path


def _download_error(exc: Exception, message: str) -> OSError:
    """``exc`` as the same kind of error (``HTTPError`` with its code, ``URLError``, ``OSError``), its message
    naming what failed: code catching the reference's ``urllib`` errors keeps working."""
    reason = getattr(exc, "reason", None) or exc
    if isinstance(exc, urllib.error.HTTPError):
        return urllib.error.HTTPError(exc.url, exc.code, f"{message}: {reason}", exc.headers, None)
    if isinstance(exc, urllib.error.URLError):
        return urllib.error.URLError(f"{message}: {reason}")
    return OSError(f"{message}: {reason}")


def load_safetensors_folder(folder):
    """All tensors of the Hugging Face checkpoint in ``folder``, as one ``{name: tensor}`` dict.

    Reads ``model.safetensors.index.json`` and its shards when present, else the
    single ``model.safetensors``.  Each tensor the index names comes from the shard it names it in; a
    tensor held by two shards, or missing from its shard, is a ``ValueError``: which copy to take would
    depend on the order the shards are read in.
    """
    folder = Path(folder)
    index_path, single_path = folder / SHARD_INDEX, folder / SINGLE_FILE
    if index_path.exists():
        return _load_shards(index_path, folder)
    if single_path.exists():
        from safetensors.torch import load_file

        return load_file(str(single_path))
    raise FileNotFoundError(f"No {SINGLE_FILE} or {SHARD_INDEX} found in {folder}.")


def _load_shards(index_path: Path, folder: Path) -> dict:
    """The tensors of the shards ``index_path`` names, each checked to be in its named shard and no other."""
    from safetensors import safe_open

    weight_map = read_weight_map(index_path)
    holder = {}  # tensor name -> the shard it was read from
    weights = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = path_inside(folder, shard)
        if not shard_path.is_file():
            raise FileNotFoundError(f"{index_path} names shard {shard!r}, which is not in {folder}")
        with safe_open(str(shard_path), framework="pt") as handle:
            for name in handle.keys():
                if name in holder:
                    raise ValueError(f"{folder}: tensor {name!r} is in two shards, {holder[name]!r} and {shard!r}")
                holder[name] = shard
                weights[name] = handle.get_tensor(name)
    misplaced = sorted(name for name, shard in weight_map.items() if holder.get(name) != shard)
    if misplaced:
        name = misplaced[0]
        where = f"is in {holder[name]!r}" if name in holder else "is in no shard"
        raise ValueError(f"{index_path} puts tensor {name!r} in {weight_map[name]!r}, but it {where}"
                         + (f" ({len(misplaced)} tensors in all)" if len(misplaced) > 1 else ""))
    return weights


def download_from_huggingface_from_snapshots(repo_id, local_dir):
    """Download the whole Hub repository ``repo_id`` into ``local_dir`` and return its weights dict."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ImportError("download_from_huggingface_from_snapshots needs the 'huggingface_hub' package "
                          "(pip install huggingface_hub)") from exc
    repo_dir = snapshot_download(repo_id=repo_id, local_dir=local_dir)
    return load_safetensors_folder(repo_dir)


# ----------------------------------------------------------------------------- copying HF tensors into a model


def assign(left, right, tensor_name="unknown"):
    """A new Parameter holding a copy of ``right`` (tensor or array-like), after checking ``left``'s shape."""
    if tuple(left.shape) != tuple(right.shape):
        raise ValueError(f"Shape mismatch in tensor '{tensor_name}'. Left: {left.shape}, Right: {right.shape}")
    if isinstance(right, torch.Tensor):
        return torch.nn.Parameter(right.clone().detach())
    return torch.nn.Parameter(torch.tensor(right))


def load_tensor_into(module, attr, params, key):
    """Replace ``module.<attr>`` with a Parameter copy of ``params[key]`` (a clear KeyError names a missing one)."""
    try:
        value = params[key]
    except KeyError:
        raise KeyError(f"checkpoint has no tensor {key!r}") from None
    setattr(module, attr, assign(getattr(module, attr), value, key))


def hf_blocks_to_fill(model, param_config, params):
    """Check ``param_config["n_layers"]`` against the model, load the token embedding, and yield
    ``(block, "model.layers.N")`` for each block a Hugging Face Llama/Qwen checkpoint fills."""
    n_layers = param_config["n_layers"]
    if n_layers > len(model.trf_blocks):
        raise ValueError(f"param_config has n_layers={n_layers}, the model only {len(model.trf_blocks)} blocks")
    load_tensor_into(model.tok_emb, "weight", params, "model.embed_tokens.weight")
    for i in range(n_layers):
        yield model.trf_blocks[i], f"model.layers.{i}"
