"""Loading OpenAI's GPT-2 weights: the TF checkpoint params dict and Hugging Face safetensors.

Every loader here validates the whole set of weights against the model first (every key present,
every shape fitting, floating dtypes, finite values) and only then replaces the model's parameters,
so a failed load raises ``ValueError`` naming what is wrong and leaves the model exactly as it was.
Downloads go to a temporary file that is renamed into place only once it is complete.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

from .files import path_inside, save_response

GPT2_MODEL_SIZES = ("124M", "355M", "774M", "1558M")
GPT2_FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
              "model.ckpt.index", "model.ckpt.meta", "vocab.bpe")
GPT2_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
GPT2_BACKUP_URL = "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2"

# The floating dtypes accepted; other floats (float128, float8) and every non-float are refused.
_NUMPY_FLOATS = (np.float16, np.float32, np.float64)
_TORCH_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def assign(left, right):
    """A new Parameter holding ``right``, after checking it has ``left``'s shape.

    ``right`` may be a numpy array or a tensor; the result keeps ``left``'s dtype and device, and is
    contiguous.  The reference keeps a transposed numpy array's layout (the GPT-2 checkpoint's
    ``w.T``); the fused decode and head kernels read contiguous weights without a copy per call, and
    the products then round differently (logits ~1e-6 apart on backend ``"torch"``, not bitwise).
    """
    if tuple(left.shape) != tuple(right.shape):
        raise ValueError(f"Shape mismatch. Left: {left.shape}, Right: {right.shape}")
    value = torch.as_tensor(np.ascontiguousarray(right) if isinstance(right, np.ndarray) else right)
    return torch.nn.Parameter(value.to(device=left.device, dtype=left.dtype).clone())


# ----------------------------------------------------------------------------- validate, then assign


def _leaf(params, path: tuple):
    """``params[path[0]][path[1]]...``, or a ValueError naming the first key that is missing."""
    node = params
    for depth, key in enumerate(path):
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"GPT-2 params lack {_source_name(path[: depth + 1])}") from None
    return node


def _source_name(path: tuple) -> str:
    """``("blocks", 3, "attn", "c_attn", "w")`` -> ``"blocks[3].attn.c_attn.w"``."""
    text = ""
    for key in path:
        text += f"[{key}]" if isinstance(key, int) else ("." if text else "") + str(key)
    return text


def _as_float_tensor(value, name: str) -> torch.Tensor:
    """``value`` (numpy array or tensor) as a floating tensor; anything else is a ValueError naming ``name``."""
    if isinstance(value, np.ndarray):
        if value.dtype.type not in _NUMPY_FLOATS:
            raise ValueError(f"GPT-2 weight {name} has dtype {value.dtype}; a floating array "
                             "(float16, float32 or float64) is needed")
        # torch reads native byte order only; a big-endian array is converted, not misread.
        return torch.from_numpy(np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("=")))
    if isinstance(value, torch.Tensor):
        if value.dtype not in _TORCH_FLOATS:
            raise ValueError(f"GPT-2 weight {name} has dtype {value.dtype}; a floating tensor "
                             "(float16, bfloat16, float32 or float64) is needed")
        return value.detach()
    raise ValueError(f"GPT-2 weight {name} is a {type(value).__name__}, not a numpy array or tensor")


def _model_part(gpt, path: str):
    """The submodule or tensor at ``path`` (``"trf_blocks.3.att.W_query"``), or a ValueError naming it."""
    node = gpt
    for attr in path.split("."):
        try:
            node = node[int(attr)] if attr.isdigit() else getattr(node, attr)
        except (AttributeError, IndexError, TypeError):
            raise ValueError(f"the model has no {path}: it is not a GPT-2-style GPTModel "
                             "(tok_emb, pos_emb, trf_blocks, final_norm, out_head)") from None
    return node


def _target(gpt, module_path: str, attr: str) -> tuple:
    """``(module, attr, full_name, current_tensor)`` for one model parameter that will be replaced."""
    module = _model_part(gpt, module_path)
    name = f"{module_path}.{attr}"
    current = getattr(module, attr, None)
    if not isinstance(current, torch.Tensor):
        raise ValueError(f"the model has no tensor {name}")
    return module, attr, name, current


def _check_shape(value: torch.Tensor, expected: tuple, source: str, model_name: str, what: str = "") -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"GPT-2 weight {source} has shape {tuple(value.shape)}, the model's {model_name} "
                         f"needs {tuple(expected)}{what}")


# What a wrong shape of each top-level weight usually means.
_WHY = {"wte": " (vocab_size x emb_dim: build the model with the weights' vocab_size)",
        "wpe": " (context_length x emb_dim: GPT-2 checkpoints need context_length 1024)",
        "lm_head.weight": " (vocab_size x emb_dim)"}


def _add(plan: list, gpt, module_path: str, attr: str, source: str, value: torch.Tensor, *,
         transpose: bool = False, why: str = "") -> None:
    """Check ``value`` against the model's ``module_path.attr`` and queue it.

    TF and HF ``Conv1D`` store linear weights as ``(in, out)``; ``nn.Linear`` holds ``(out, in)``,
    so ``transpose`` compares against the reversed shape and queues ``value.T``.
    """
    module, attr, name, current = _target(gpt, module_path, attr)
    expected = tuple(reversed(current.shape)) if transpose else tuple(current.shape)
    _check_shape(value, expected, source, name, why)
    plan.append((module, attr, name, source, value.T if transpose else value))


def _plan_qkv(plan: list, gpt, base: str, w: torch.Tensor, b: torch.Tensor, w_name: str, b_name: str) -> None:
    """Queue the query/key/value weights and biases cut from ``c_attn`` (side by side: ``(in, 3*out)``)."""
    names = ("W_query", "W_key", "W_value")
    d_out, d_in = _target(gpt, f"{base}.att.W_query", "weight")[3].shape
    _check_shape(w, (d_in, 3 * d_out), w_name, f"{base}.att.W_query/W_key/W_value.weight",
                 " (emb_dim x 3*emb_dim, query|key|value side by side)")
    _check_shape(b, (3 * d_out,), b_name, f"{base}.att.W_query/W_key/W_value.bias", " (3*emb_dim)")
    if any(not isinstance(getattr(_model_part(gpt, f"{base}.att.{n}"), "bias", None), torch.Tensor) for n in names):
        raise ValueError(f"the model's {base}.att has no query/key/value biases (built with qkv_bias=False), "
                         f"but the GPT-2 weights have them ({b_name}): build the model with qkv_bias=True")
    for n, w_part, b_part in zip(names, w.chunk(3, dim=-1), b.chunk(3, dim=-1)):
        _add(plan, gpt, f"{base}.att.{n}", "weight", w_name, w_part, transpose=True, why=" (its third, transposed)")
        _add(plan, gpt, f"{base}.att.{n}", "bias", b_name, b_part, why=" (its third)")


def _plan_block(plan: list, gpt, params, i: int) -> None:
    """Queue the assignments of transformer block ``i``, each checked."""
    base = f"trf_blocks.{i}"

    def take(*path):
        full = ("blocks", i) + path
        return _source_name(full), _as_float_tensor(_leaf(params, full), _source_name(full))

    (w_name, w), (b_name, b) = take("attn", "c_attn", "w"), take("attn", "c_attn", "b")
    _plan_qkv(plan, gpt, base, w, b, w_name, b_name)
    for module_path, leaf in ((f"{base}.att.out_proj", ("attn", "c_proj")), (f"{base}.ff.layers.0", ("mlp", "c_fc")),
                              (f"{base}.ff.layers.2", ("mlp", "c_proj"))):
        _add(plan, gpt, module_path, "weight", *take(*leaf, "w"), transpose=True, why=" (transposed)")
        _add(plan, gpt, module_path, "bias", *take(*leaf, "b"))
    for module_path, leaf in ((f"{base}.norm1", "ln_1"), (f"{base}.norm2", "ln_2")):
        _add(plan, gpt, module_path, "scale", *take(leaf, "g"))
        _add(plan, gpt, module_path, "shift", *take(leaf, "b"))


def _plan_load(gpt, params, head=None) -> list:
    """Every ``(module, attr, name, source, value)`` assignment the load makes, after checking all of them."""
    if not hasattr(params, "keys"):
        raise ValueError(f"GPT-2 params must be a dict (wte, wpe, g, b, blocks), got {type(params).__name__}")
    blocks = _leaf(params, ("blocks",))
    if not isinstance(blocks, (list, tuple)):
        raise ValueError(f"GPT-2 params' blocks must be a list, got {type(blocks).__name__}")
    model_blocks = _model_part(gpt, "trf_blocks")
    if len(blocks) != len(model_blocks):
        raise ValueError(f"GPT-2 params have {len(blocks)} transformer blocks, the model {len(model_blocks)} "
                         "(n_layers): build the model with the weights' n_layers")

    plan = []

    def top(module_path, attr, source, value=None):
        if value is None:
            value = _as_float_tensor(_leaf(params, (source,)), source)
        _add(plan, gpt, module_path, attr, source, value, why=_WHY.get(source, ""))

    # The reference's order: embeddings, blocks, final norm, head.
    top("pos_emb", "weight", "wpe")
    top("tok_emb", "weight", "wte")
    for i in range(len(blocks)):
        _plan_block(plan, gpt, params, i)
    top("final_norm", "scale", "g")
    top("final_norm", "shift", "b")
    if head is None:
        top("out_head", "weight", "wte")  # GPT-2 ties the output head to the token embedding
    else:
        top("out_head", "weight", "lm_head.weight", _as_float_tensor(head, "lm_head.weight"))
    return plan


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite; a NaN or inf makes the sum non-finite, so the sum (one cheap
    reduction, no mask) settles the usual case and only an overflowing sum needs the element check."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _materialize(plan) -> list:
    """New parameter tensors in each target's dtype and device, each checked finite; the model is not touched."""
    ready = []
    for module, attr, name, source, value in plan:
        current = getattr(module, attr)
        with torch.no_grad():
            tensor = torch.empty(current.shape, dtype=current.dtype, device=current.device).copy_(value)
        if not _all_finite(tensor):
            cause = ("NaN or inf values" if not _all_finite(value)
                     else f"values too large for the model's {current.dtype}")
            raise ValueError(f"GPT-2 weight {source} has {cause} (for the model's {name})")
        ready.append((module, attr, tensor))
    return ready


def _load_into_gpt(gpt, params, head=None) -> None:
    ready = _materialize(_plan_load(gpt, params, head))
    # Everything is checked and converted: only now are the model's parameters replaced.
    for module, attr, tensor in ready:
        setattr(module, attr, torch.nn.Parameter(tensor))


def load_weights_into_gpt(gpt, params):
    """Copy an OpenAI GPT-2 params dict (as ``load_gpt2_params_from_tf_ckpt`` returns) into ``gpt``.

    TF stores linear weights as ``(in, out)``; ``nn.Linear`` wants ``(out, in)``,
    hence the transposes.  The output head is tied to the token embedding.
    Every key, shape, dtype (floating) and value (finite) is checked before the first
    parameter is replaced: a failed load raises ``ValueError`` naming the weight and
    leaves ``gpt`` unchanged.  New parameters keep the model's dtype and device.
    """
    _load_into_gpt(gpt, params)


# ----------------------------------------------------------------------------- OpenAI's TF checkpoint


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
    try:
        n_layer = int(settings["n_layer"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"GPT-2 hparams need an integer n_layer, got {settings!r}") from None
    params = {"blocks": [{} for _ in range(n_layer)]}
    for name, _ in tf.train.list_variables(ckpt_path):
        array = np.squeeze(tf.train.load_variable(ckpt_path, name))
        parts = name.split("/")[1:]  # drop the leading "model/"
        if not parts:
            continue  # not a model variable
        target = params
        if parts[0].startswith("h"):
            if not parts[0][1:].isdigit() or int(parts[0][1:]) >= n_layer:
                raise ValueError(f"TF checkpoint variable {name!r} is not one of the n_layer={n_layer} blocks")
            target = params["blocks"][int(parts[0][1:])]
        for key in parts[1:-1]:
            target = target.setdefault(key, {})
        target[parts[-1]] = array
    return params


# ----------------------------------------------------------------------------- downloads


# What a failed transfer raises; a local write error (a missing folder, a full disk) is not one of
# them and propagates as it is instead of being reported as a connection problem.
NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, ssl.SSLError)
# Seconds a connection may wait for the server (to connect, or for the next bytes): a stalled server is then
# a TimeoutError instead of a download that never ends.
DOWNLOAD_TIMEOUT_S = 60


def download_file(url, destination, backup_url=None):
    """Download ``url`` to ``destination`` with a progress bar, trying ``backup_url`` if it fails.

    A file already there with the server's size is kept.  The bytes go to a temporary file
    beside ``destination`` that replaces it only when complete (as many bytes as the server
    announced), so an interrupted download never leaves a truncated file.  Raises
    ``ConnectionError`` when neither address gives the whole file.
    """
    from tqdm import tqdm

    def attempt(address):
        with urllib.request.urlopen(address, timeout=DOWNLOAD_TIMEOUT_S) as response:
            size = int(response.headers.get("Content-Length", 0) or 0)
            if os.path.exists(destination) and size and os.path.getsize(destination) == size:
                return
            with tqdm(total=size, unit="iB", unit_scale=True, desc=os.path.basename(address)) as bar:
                save_response(response, destination, bar.update)

    errors = []
    for address in (url, backup_url):
        if address is None:
            continue
        try:
            attempt(address)
            return
        except NETWORK_ERRORS as exc:
            errors.append(f"{address}: {exc}")
    raise ConnectionError("could not download " + os.path.basename(destination) + ":\n  " + "\n  ".join(errors))


def download_and_load_gpt2(model_size, models_dir):
    """Download (unless already in ``models_dir/model_size``) and load OpenAI's GPT-2 checkpoint.

    Returns ``(settings, params)`` for ``load_weights_into_gpt``.  Offline, files
    already present are used; missing ones raise ``ConnectionError``.  Downloads are
    written atomically, so a file present is a complete one.
    """
    if model_size not in GPT2_MODEL_SIZES:
        raise ValueError(f"Model size not in {GPT2_MODEL_SIZES}")
    tf = _import_tensorflow()  # before any download: without TensorFlow the files could not be read
    model_dir = os.path.join(models_dir, model_size)
    os.makedirs(model_dir, exist_ok=True)
    for filename in GPT2_FILES:
        path = os.path.join(model_dir, filename)
        if os.path.exists(path) and os.path.getsize(path) > 0:
            continue  # already downloaded: works offline
        download_file(f"{GPT2_BASE_URL}/{model_size}/{filename}", path,
                      f"{GPT2_BACKUP_URL}/{model_size}/{filename}")
    hparams = Path(model_dir, "hparams.json")
    try:
        settings = json.loads(hparams.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{hparams} is not valid JSON ({exc}); delete it to download it again") from None
    params = load_gpt2_params_from_tf_ckpt(tf.train.latest_checkpoint(model_dir), settings)
    return settings, params


# ----------------------------------------------------------------------------- Hugging Face safetensors

# The Hugging Face GPT-2 keys the loader reads (after any "transformer." prefix is removed); others,
# such as the causal-mask buffers h.{i}.attn.bias / masked_bias some files carry, are skipped.
_HF_KEY = re.compile(r"(wte|wpe|ln_f)\.(weight|bias)"
                     r"|h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj|ln_1|ln_2)\.(weight|bias)"
                     r"|lm_head\.weight")


def hf_state_dict_to_params(state_dict) -> dict:
    """Turn a Hugging Face GPT-2 state dict (``h.{i}.attn.c_attn.weight`` ...) into the OpenAI params dict.

    HF's ``Conv1D`` weights are ``(in, out)`` like TF's, so no transposes are needed
    here; a ``transformer.`` prefix (``GPT2LMHeadModel``) is accepted.  Missing keys,
    non-floating tensors and a file with no blocks raise ``ValueError``.
    """
    sd = {k.removeprefix("transformer."): v for k, v in state_dict.items()}

    def arr(key):
        if key not in sd:
            raise ValueError(f"Hugging Face GPT-2 weights lack {key!r}")
        value = _as_float_tensor(sd[key], repr(key)).cpu()
        # numpy has no bfloat16, and float32 holds every bfloat16 exactly; the other dtypes stay as they are,
        # so a float64 weight is rounded once, to the model's dtype, and a finite one is never called inf.
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()

    indices = {int(m.group(3)) for k in sd if (m := _HF_KEY.fullmatch(k)) and m.group(3) is not None}
    n_layers = 1 + max(indices, default=-1)
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


@contextlib.contextmanager
def _safetensors_errors(path: Path):
    """Turn the safetensors library's errors about a file's content (and a Rust panic, which is a
    BaseException) into one ValueError; I/O errors such as a permission denied stay what they are."""
    try:
        yield
    except (ValueError, OSError):
        raise
    except BaseException as exc:
        if isinstance(exc, Exception) or type(exc).__name__ == "PanicException":
            raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None
        raise


def check_safetensors_header(path) -> None:
    """``ValueError`` naming ``path`` unless it is a safetensors file whose header is whole and covers the file
    (a truncated file fails here); reads the header only."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():  # safetensors would say only "No such device"
        raise ValueError(f"{path} is a folder, not a safetensors file")
    with _safetensors_errors(path):
        with safe_open(str(path), framework="pt"):
            pass


def read_weight_map(index) -> dict:
    """The ``weight_map`` (tensor name -> shard file name) of a ``model.safetensors.index.json``, or a
    ``ValueError`` naming the index when it is no JSON object with such a map."""
    index = Path(index)
    if index.is_dir():
        raise ValueError(f"{index} is a folder, not the JSON index of the weight files")
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{index} is not a JSON file: {exc}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index} has no 'weight_map' of tensor names to shard files")
    return weight_map


def _index_shards(index: Path, folder: Path) -> list:
    """The shard files a ``model.safetensors.index.json`` names, each problem of the index named with it."""
    return [path_inside(folder, shard) for shard in sorted(set(read_weight_map(index).values()))]


def check_safetensors_folder(folder) -> None:
    """Check a Hugging Face model folder's weight files before any tensor is read: the
    ``model.safetensors.index.json`` (when there is one) maps tensor names to shard files, and each file it
    names, or else ``model.safetensors``, has a whole safetensors header (:func:`check_safetensors_header`).
    Each problem is a ``ValueError`` naming its file; a missing file is left for the loader to name."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = _index_shards(index, folder) if index.exists() else [folder / "model.safetensors"]
    for path in files:
        if path.exists():
            check_safetensors_header(path)


def _read_gpt2_safetensors(path: Path) -> dict:
    """The GPT-2 tensors of a safetensors file, dtypes checked from the header before any data is read."""
    from safetensors import safe_open

    with _safetensors_errors(path):
        with safe_open(str(path), framework="pt") as handle:
            keys = [k for k in handle.keys() if _HF_KEY.fullmatch(k.removeprefix("transformer."))]
            if any(k.startswith("model.layers.") for k in handle.keys()):  # the Hub's Llama / Qwen names
                raise ValueError(f"{path} holds a Llama 3 / Qwen3 checkpoint's tensors (model.layers...), not GPT-2's:"
                                 " such a checkpoint needs its config.json beside it")
            if not keys:
                raise ValueError(f"{path} holds no GPT-2 weights (no wte.weight, h.0..., ln_f...): "
                                 f"its tensors are {sorted(handle.keys())[:5]}...")
            for key in keys:
                dtype = handle.get_slice(key).get_dtype()
                if dtype not in ("F16", "BF16", "F32", "F64"):
                    raise ValueError(f"{path}: tensor {key!r} has dtype {dtype}; GPT-2 weights are floating")
            return {key: handle.get_tensor(key) for key in keys}


def load_hf_gpt2_into_gpt(gpt, path):
    """Load Hugging Face GPT-2 weights (``model.safetensors``, or a folder holding it) into ``gpt``.

    The file is read and checked in full (format, keys, shapes, dtypes, finite values) before
    any parameter of ``gpt`` is replaced; a bad file raises ``ValueError`` and leaves ``gpt``
    unchanged.  The output head takes ``lm_head.weight`` when the file has one, else the token
    embedding (GPT-2 ties them).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    tensors = _read_gpt2_safetensors(path)
    head = next((v for k, v in tensors.items() if k.removeprefix("transformer.") == "lm_head.weight"), None)
    _load_into_gpt(gpt, hf_state_dict_to_params(tensors), head)
    return gpt
