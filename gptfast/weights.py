"""Loading OpenAI's GPT-2 weights: the TF checkpoint params dict and Hugging Face safetensors."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

GPT2_MODEL_SIZES = ("124M", "355M", "774M", "1558M")
GPT2_FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
              "model.ckpt.index", "model.ckpt.meta", "vocab.bpe")
GPT2_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
GPT2_BACKUP_URL = "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2"


def assign(left, right):
    """A new Parameter holding ``right``, after checking it has ``left``'s shape.

    ``right`` may be a numpy array or a tensor; the result keeps ``left``'s dtype and device.
    """
    if tuple(left.shape) != tuple(right.shape):
        raise ValueError(f"Shape mismatch. Left: {left.shape}, Right: {right.shape}")
    value = torch.as_tensor(np.ascontiguousarray(right) if isinstance(right, np.ndarray) else right)
    return torch.nn.Parameter(value.to(device=left.device, dtype=left.dtype).clone())


def _set(module, name, value):
    setattr(module, name, assign(getattr(module, name), value))


def load_weights_into_gpt(gpt, params):
    """Copy an OpenAI GPT-2 params dict (as ``load_gpt2_params_from_tf_ckpt`` returns) into ``gpt``.

    TF stores linear weights as ``(in, out)``; ``nn.Linear`` wants ``(out, in)``,
    hence the transposes.  The output head is tied to the token embedding.
    """
    if len(params["blocks"]) != len(gpt.trf_blocks):
        raise ValueError(f"params have {len(params['blocks'])} blocks, the model {len(gpt.trf_blocks)}")
    _set(gpt.pos_emb, "weight", params["wpe"])
    _set(gpt.tok_emb, "weight", params["wte"])
    for block, p in zip(gpt.trf_blocks, params["blocks"]):
        att, ff = block.att, block.ff
        q_w, k_w, v_w = np.split(p["attn"]["c_attn"]["w"], 3, axis=-1)
        q_b, k_b, v_b = np.split(p["attn"]["c_attn"]["b"], 3, axis=-1)
        for linear, w, b in ((att.W_query, q_w, q_b), (att.W_key, k_w, k_b), (att.W_value, v_w, v_b)):
            _set(linear, "weight", w.T)
            _set(linear, "bias", b)
        for linear, src in ((att.out_proj, p["attn"]["c_proj"]), (ff.layers[0], p["mlp"]["c_fc"]),
                            (ff.layers[2], p["mlp"]["c_proj"])):
            _set(linear, "weight", src["w"].T)
            _set(linear, "bias", src["b"])
        for norm, src in ((block.norm1, p["ln_1"]), (block.norm2, p["ln_2"])):
            _set(norm, "scale", src["g"])
            _set(norm, "shift", src["b"])
    _set(gpt.final_norm, "scale", params["g"])
    _set(gpt.final_norm, "shift", params["b"])
    _set(gpt.out_head, "weight", params["wte"])


def _import_tensorflow():
    try:
        import tensorflow as tf
    except ImportError:
        raise ImportError(
            "reading OpenAI's TensorFlow checkpoint needs TensorFlow: pip install tensorflow "
            "(or load Hugging Face safetensors with gptfast.weights.load_hf_gpt2_into_gpt, which does not)"
        ) from None
    return tf


def load_gpt2_params_from_tf_ckpt(ckpt_path, settings):
    """Read a GPT-2 TF checkpoint into a nested params dict (``blocks`` list, ``wte``, ``wpe``, ``g``, ``b``)."""
    tf = _import_tensorflow()
    params = {"blocks": [{} for _ in range(settings["n_layer"])]}
    for name, _ in tf.train.list_variables(ckpt_path):
        array = np.squeeze(tf.train.load_variable(ckpt_path, name))
        parts = name.split("/")[1:]  # drop the leading "model/"
        target = params["blocks"][int(parts[0][1:])] if parts[0].startswith("h") else params
        for key in parts[1:-1]:
            target = target.setdefault(key, {})
        target[parts[-1]] = array
    return params


def download_file(url, destination, backup_url=None):
    """Download ``url`` to ``destination`` with a progress bar, trying ``backup_url`` if it fails.

    A file already there with the server's size is kept.  Raises ``ConnectionError``
    when neither address can be reached.
    """
    from tqdm import tqdm

    def attempt(address):
        with urllib.request.urlopen(address, timeout=60) as response:
            size = int(response.headers.get("Content-Length", 0))
            if os.path.exists(destination) and size and os.path.getsize(destination) == size:
                return
            with tqdm(total=size, unit="iB", unit_scale=True, desc=os.path.basename(address)) as bar, \
                    open(destination, "wb") as out:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    bar.update(len(chunk))

    errors = []
    for address in (url, backup_url):
        if address is None:
            continue
        try:
            attempt(address)
            return
        except (urllib.error.URLError, OSError) as exc:
            errors.append(f"{address}: {exc}")
    raise ConnectionError("could not download " + os.path.basename(destination) + ":\n  " + "\n  ".join(errors))


def download_and_load_gpt2(model_size, models_dir):
    """Download (unless already in ``models_dir/model_size``) and load OpenAI's GPT-2 checkpoint.

    Returns ``(settings, params)`` for ``load_weights_into_gpt``.  Offline, files
    already present are used; missing ones raise ``ConnectionError``.
    """
    if model_size not in GPT2_MODEL_SIZES:
        raise ValueError(f"Model size not in {GPT2_MODEL_SIZES}")
    model_dir = os.path.join(models_dir, model_size)
    os.makedirs(model_dir, exist_ok=True)
    for filename in GPT2_FILES:
        path = os.path.join(model_dir, filename)
        if os.path.exists(path) and os.path.getsize(path) > 0:
            continue  # already downloaded: works offline
        download_file(f"{GPT2_BASE_URL}/{model_size}/{filename}", path,
                      f"{GPT2_BACKUP_URL}/{model_size}/{filename}")
    tf = _import_tensorflow()
    settings = json.loads(Path(model_dir, "hparams.json").read_text(encoding="utf-8"))
    params = load_gpt2_params_from_tf_ckpt(tf.train.latest_checkpoint(model_dir), settings)
    return settings, params


def hf_state_dict_to_params(state_dict) -> dict:
    """Turn a Hugging Face GPT-2 state dict (``h.{i}.attn.c_attn.weight`` ...) into the OpenAI params dict.

    HF's ``Conv1D`` weights are ``(in, out)`` like TF's, so no transposes are needed
    here; a ``transformer.`` prefix (``GPT2LMHeadModel``) is accepted.
    """
    sd = {k.removeprefix("transformer."): v for k, v in state_dict.items()}

    def arr(key):
        if key not in sd:
            raise ValueError(f"Hugging Face GPT-2 weights lack {key!r}")
        value = sd[key]
        return value.float().numpy() if isinstance(value, torch.Tensor) else np.asarray(value, dtype=np.float32)

    n_layers = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("h.")), default=-1)
    if n_layers == 0:
        raise ValueError("no transformer blocks (h.0...) found in the Hugging Face GPT-2 weights")

    def block(i):
        def wb(name):
            return {"w": arr(f"h.{i}.{name}.weight"), "b": arr(f"h.{i}.{name}.bias")}

        def ln(name):
            return {"g": arr(f"h.{i}.{name}.weight"), "b": arr(f"h.{i}.{name}.bias")}

        return {"attn": {"c_attn": wb("attn.c_attn"), "c_proj": wb("attn.c_proj")},
                "mlp": {"c_fc": wb("mlp.c_fc"), "c_proj": wb("mlp.c_proj")},
                "ln_1": ln("ln_1"), "ln_2": ln("ln_2")}

    return {"wte": arr("wte.weight"), "wpe": arr("wpe.weight"), "g": arr("ln_f.weight"), "b": arr("ln_f.bias"),
            "blocks": [block(i) for i in range(n_layers)]}


def load_hf_gpt2_into_gpt(gpt, path):
    """Load Hugging Face GPT-2 weights (``model.safetensors``, or a folder holding it) into ``gpt``."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    load_weights_into_gpt(gpt, hf_state_dict_to_params(load_file(str(path))))
    return gpt
