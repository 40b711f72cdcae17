"""A Hugging Face Llama 3 / Qwen3 checkpoint folder as the book's model and tokenizer.

A folder the Hub gives for ``meta-llama/Llama-3.2-1B(-Instruct)`` or ``Qwen/Qwen3-*`` holds
``config.json``, the weights (``model.safetensors`` or shards with their index) and the
tokenizer (Qwen3: ``tokenizer.json``; Llama 3: Meta's tiktoken ``original/tokenizer.model``).
:func:`read_config` turns ``config.json`` into the book's configuration dict (the real
Qwen3-0.6B folder gives ``QWEN_CONFIG_06_B``, Llama-3.2-1B's ``LLAMA32_CONFIG_1B``),
:func:`load_model` builds gptfast's model from it and loads the weights with the book's
loaders, and :func:`load_tokenizer` wraps the book's tokenizer with its chat template and
the id that ends a reply.  A checkpoint these models would compute differently (biases, another
activation, another norm epsilon) is refused with a ``ValueError`` naming the setting, never
loaded into a model that would then give other numbers.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import llama3, qwen3
from ..weights import _TORCH_FLOATS, _all_finite
from .hub import load_safetensors_folder

CONFIG_NAME = "config.json"
FAMILIES = {"llama": "llama3", "qwen3": "qwen3", "qwen3_moe": "qwen3"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The norms' epsilon each model family computes with (the book's, fixed in its modules).
NORM_EPS = {"llama3": llama3._NORM_EPS, "qwen3": qwen3._NORM_EPS}


def is_hf_model_folder(path) -> bool:
    """True when ``path`` is a folder with a ``config.json`` naming a Llama or Qwen3 architecture."""
    config = Path(path) / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        return _read_json(config).get("model_type") in FAMILIES
    except ValueError:
        return True  # a broken config.json in a model folder: read_config names what is wrong


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a JSON file: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds {type(data).__name__}, not a JSON object")
    return data


def _get(hf: dict, key: str, path: Path, kind=int):
    """``hf[key]`` checked to be a positive ``kind`` (a bool is no number)."""
    if key not in hf:
        raise ValueError(f"{path} has no {key!r}")
    value = hf[key]
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind) or not value > 0:
        raise ValueError(f"{path}: {key!r} must be a positive {'number' if kind is float else 'integer'}, "
                         f"got {value!r}")
    return kind(value)


def _refuse_unsupported(hf: dict, path: Path, family: str, rope_scaling: dict | None) -> None:
    """Settings the book's modules do not compute: loading would give a model with other numbers."""
    if hf.get("quantization_config") is not None:
        # Quantized weights (FP8 codes, packed integers) need their scales applied; read as plain floats
        # they would be other weights.
        raise ValueError(f"{path}: quantization_config {hf['quantization_config']!r} is not supported: the book's "
                         f"models load unquantized float16 / bfloat16 / float32 weights")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act {hf['hidden_act']!r} is not supported (the book's models use silu)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ValueError(f"{path}: {key} is true, but the book's {family} layers have no biases")
    eps = hf.get("rms_norm_eps", NORM_EPS[family])
    if not isinstance(eps, (int, float)) or abs(eps - NORM_EPS[family]) > 1e-12:
        raise ValueError(f"{path}: rms_norm_eps {eps!r} differs from the {NORM_EPS[family]} the book's {family} "
                         "norms use")
    if family == "qwen3" and rope_scaling:
        raise ValueError(f"{path}: rope scaling {rope_scaling!r} is not supported for Qwen3 (the book's has none)")
    if family == "llama3" and "head_dim" in hf and "hidden_size" in hf and "num_attention_heads" in hf \
            and hf["head_dim"] * hf["num_attention_heads"] != hf["hidden_size"]:
        raise ValueError(f"{path}: head_dim {hf['head_dim']!r} is not hidden_size / num_attention_heads, the only "
                         "head size the book's Llama 3 has")
    if hf.get("model_type") == "qwen3_moe":
        # The book's mixture sits in every block and renormalises the chosen experts' weights.
        if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
            raise ValueError(f"{path}: dense blocks between the expert blocks (mlp_only_layers, "
                             "decoder_sparse_step) are not supported: the book's model has experts in every block")
        if hf.get("norm_topk_prob") is not True:  # Hugging Face's default is false
            raise ValueError(f"{path}: norm_topk_prob is {hf.get('norm_topk_prob', 'unset (false)')}, but the book's "
                             "router renormalises the chosen experts' probabilities")
    if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or ()):
        raise ValueError(f"{path}: sliding-window attention is not supported (the book's models attend to every "
                         "earlier token)")


def _dtype(hf: dict, path: Path) -> torch.dtype:
    name = hf.get("torch_dtype", hf.get("dtype", "float32"))
    if name not in DTYPES:
        raise ValueError(f"{path}: torch_dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _rope_type(settings: dict) -> str:
    return settings.get("rope_type", settings.get("type", "default"))


def _rope_settings(hf: dict, path: Path) -> tuple[float, dict | None]:
    """``(rope_theta, scaling)`` of a ``config.json``: the flat ``rope_theta`` and ``rope_scaling`` transformers 4
    writes, or the ``rope_parameters`` dict of transformers 5 (its ``rope_type`` "default" is no scaling).

    A file holding both that disagree is refused: either reading would be a guess.
    """
    params = hf.get("rope_parameters")
    if params is None:
        scaling = hf.get("rope_scaling") or None
        if scaling is not None and not isinstance(scaling, dict):
            raise ValueError(f"{path}: rope_scaling must be a dict, got {scaling!r}")
        return _get(hf, "rope_theta", path, float), scaling
    if not isinstance(params, dict) or "rope_theta" not in params:
        # Per-layer-type parameters ({"full_attention": {...}, ...}) belong to hybrid models the book has not.
        raise ValueError(f"{path}: rope_parameters must be one dict with a 'rope_theta', got {params!r}")
    theta = _get(params, "rope_theta", path, float)
    scaling = None if _rope_type(params) == "default" else params
    flat_theta, flat_scaling = hf.get("rope_theta"), hf.get("rope_scaling") or None
    if (flat_theta is not None and flat_theta != theta) or (
            flat_scaling is not None and (not isinstance(flat_scaling, dict) or scaling is None
                                          or any(params.get(k) != v for k, v in flat_scaling.items()
                                                 if k not in ("type", "rope_type")))):
        raise ValueError(f"{path}: rope_theta {flat_theta!r} / rope_scaling {flat_scaling!r} disagree with "
                         f"rope_parameters {params!r}")
    return theta, scaling


def _llama_rope_freq(scaling: dict | None, path: Path):
    """Llama 3's frequency ``scaling`` (rope type ``llama3``) as the book's ``rope_freq``; ``None`` without it."""
    if not scaling:
        return None
    if _rope_type(scaling) != "llama3":
        raise ValueError(f"{path}: rope scaling {scaling!r} is not Llama 3's (rope_type 'llama3')")
    return {"factor": _get(scaling, "factor", path, float),
            "low_freq_factor": _get(scaling, "low_freq_factor", path, float),
            "high_freq_factor": _get(scaling, "high_freq_factor", path, float),
            "original_context_length": _get(scaling, "original_max_position_embeddings", path)}


def read_config(folder) -> tuple[str, dict]:
    """``(family, cfg)`` of the checkpoint in ``folder``: ``"llama3"`` or ``"qwen3"`` and the book's config dict
    (the keys of ``LLAMA32_CONFIG_1B`` / ``QWEN_CONFIG_06_B`` / ``QWEN3_CONFIG_30B_A3B``)."""
    return _config_from(_folder_config(folder), Path(folder) / CONFIG_NAME)


def _folder_config(folder) -> dict:
    """The folder's ``config.json``, read."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}: not a Hugging Face model folder")
    return _read_json(path)


def _config_from(hf: dict, path: Path) -> tuple[str, dict]:
    """:func:`read_config` of the ``config.json`` at ``path``, read into ``hf``."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{path}: model_type {model_type!r} is not one of {', '.join(FAMILIES)}")
    family = FAMILIES[model_type]
    rope_base, rope_scaling = _rope_settings(hf, path)
    _refuse_unsupported(hf, path, family, rope_scaling)
    emb_dim, n_heads = _get(hf, "hidden_size", path), _get(hf, "num_attention_heads", path)
    cfg = {"vocab_size": _get(hf, "vocab_size", path),
           "context_length": _get(hf, "max_position_embeddings", path),
           "emb_dim": emb_dim, "n_heads": n_heads, "n_layers": _get(hf, "num_hidden_layers", path)}
    if model_type != "qwen3_moe":
        cfg["hidden_dim"] = _get(hf, "intermediate_size", path)
    if family == "qwen3":
        cfg["head_dim"] = _get(hf, "head_dim", path) if "head_dim" in hf else emb_dim // n_heads
        cfg["qk_norm"] = True
    cfg["n_kv_groups"] = _get(hf, "num_key_value_heads", path) if "num_key_value_heads" in hf else n_heads
    cfg["rope_base"] = rope_base
    cfg["dtype"] = _dtype(hf, path)
    if family == "llama3":
        cfg["rope_freq"] = _llama_rope_freq(rope_scaling, path)
    if model_type == "qwen3_moe":
        cfg.update(num_experts=_get(hf, "num_experts", path), num_experts_per_tok=_get(hf, "num_experts_per_tok", path),
                   moe_intermediate_size=_get(hf, "moe_intermediate_size", path))
    return family, cfg


def load_model(folder, dtype=None, device="cpu"):
    """``(model, cfg, family)``: gptfast's ``Llama3Model`` / ``Qwen3Model`` for the checkpoint in ``folder``, its
    weights loaded (in ``dtype`` when given, else the checkpoint's), in eval mode on ``device``.

    The model is built on the meta device, so no weight is initialised only to be overwritten; its RoPE tables
    are then computed for real.  The head follows ``tie_word_embeddings`` as Hugging Face does: tied, it is the
    token embedding (the same tensor, not a copy: 311 MB less for Qwen3-0.6B in bf16) even where the file also
    holds an ``lm_head.weight``; untied, the file must hold one.  The book's loaders print a line when the head
    is tied: it goes to stderr here, so a command streaming text on stdout keeps only the text there.
    """
    hf = _folder_config(folder)
    family, cfg = _config_from(hf, Path(folder) / CONFIG_NAME)
    tied = hf.get("tie_word_embeddings", False) is True
    if dtype is not None:
        cfg["dtype"] = dtype
    params = load_safetensors_folder(folder)
    # An integer would fail in the loaders with an error naming neither; a float8 tensor holds quantized codes
    # that, cast, would load as other numbers.
    not_floating = next((name for name, t in params.items() if t.dtype not in _TORCH_FLOATS), None)
    if not_floating is not None:
        raise ValueError(f"{folder}: tensor {not_floating!r} has dtype {params[not_floating].dtype}; a Llama 3 / "
                         "Qwen3 checkpoint's tensors are float16, bfloat16, float32 or float64")
    if tied:
        params = {name: tensor for name, tensor in params.items() if name != "lm_head.weight"}
    elif "lm_head.weight" not in params:
        raise ValueError(f"{folder}: tie_word_embeddings is not true, but the checkpoint holds no lm_head.weight")
    module = llama3 if family == "llama3" else qwen3
    with torch.device("meta"):  # every parameter comes from the checkpoint: none is initialised first
        model = (module.Llama3Model if family == "llama3" else module.Qwen3Model)(cfg)
    model.cos, model.sin = module.rope_tables_for(cfg)
    built = {name: p.dtype for name, p in model.named_parameters()}
    loader = module.load_weights_into_llama if family == "llama3" else module.load_weights_into_qwen
    try:
        with contextlib.redirect_stdout(sys.stderr):
            loader(model, cfg, params)
    except KeyError as exc:  # a tensor the config needs is missing from the checkpoint
        raise ValueError(f"{folder}: {exc.args[0]}") from None
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{folder}: the loader filled no value for {', '.join(left[:3])}")
    _cast_parameters(model, built, folder)
    if tied:  # the loaders give the head a copy of the embedding; inference needs only the one tensor
        model.out_head.weight = model.tok_emb.weight
    return model.to(device).eval(), cfg, family


def _cast_parameters(model, dtypes, folder) -> None:
    """Each parameter in the dtype the model built from the config gave it (``dtypes``, by name).

    The loaders copy the checkpoint's tensors as they are, so a bf16 checkpoint loaded for ``--dtype float32``
    would otherwise mix dtypes.  Norm scales the book keeps in float32 hold the checkpoint's values exactly.
    A finite weight the dtype cannot hold (a bf16 1e5 as float16) is a ``ValueError`` naming it: cast, it would
    be inf.
    """
    for module_name, module in model.named_modules():
        for name, p in list(module._parameters.items()):
            full_name = f"{module_name}.{name}" if module_name else name
            wanted = dtypes.get(full_name)
            if p is not None and wanted is not None and p.dtype != wanted:
                cast = p.detach().to(wanted)
                if not _all_finite(cast) and _all_finite(p.detach()):
                    raise ValueError(f"{folder}: {full_name} has values too large for {wanted} (largest magnitude "
                                     f"{p.detach().abs().max().item():g}): load it in the checkpoint's dtype or "
                                     "float32")
                module._parameters[name] = torch.nn.Parameter(cast, requires_grad=p.requires_grad)


@dataclass
class ChatTokenizer:
    """A family's tokenizer for generation: ``encode(text)`` gives the prompt's ids (in the chat template with
    ``chat``), ``decode(ids)`` the text; ``eos_id`` is the token that ends the reply, ``stop_ids`` every token
    that ends generation (``eos_id`` and the folder's own end tokens)."""

    tokenizer: object
    family: str
    chat: bool
    eos_id: int
    stop_ids: frozenset

    def encode(self, text):
        if self.family == "qwen3":
            return self.tokenizer.encode(text, chat_wrapped=self.chat)
        if self.chat:
            return llama3.ChatFormat(self.tokenizer).encode(text)
        return self.tokenizer.encode(text, bos=True)

    def decode(self, ids):
        return self.tokenizer.decode(ids)


def default_tokenizer_path(folder, family) -> Path:
    """Where the Hub puts the tokenizer file the book's tokenizer reads."""
    folder = Path(folder)
    if family == "qwen3":
        return folder / "tokenizer.json"
    for candidate in (folder / "original" / "tokenizer.model", folder / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    return folder / "original" / "tokenizer.model"


def load_tokenizer(family, path, chat=False, folder=None) -> ChatTokenizer:
    """The book's tokenizer of ``family`` read from ``path``, the reply ending at ``<|im_end|>`` (Qwen3) /
    ``<|eot_id|>`` (Llama 3) in a chat, else at ``<|endoftext|>`` / ``<|end_of_text|>``.

    With the model's ``folder``, generation also stops at the end tokens its ``config.json`` and
    ``generation_config.json`` name (``eos_token_id``), as Hugging Face's generation does: an instruct model
    continuing plain text may still close its turn.
    """
    if family == "qwen3":
        tokenizer = qwen3.Qwen3Tokenizer(str(path), apply_chat_template=chat, add_generation_prompt=chat)
        ids = tokenizer._special_to_id
        eos_id = ids["<|im_end|>" if chat and "<|im_end|>" in ids else "<|endoftext|>"]
    else:
        tokenizer = llama3.Llama3Tokenizer(str(path))
        eos_id = tokenizer.special["<|eot_id|>" if chat else "<|end_of_text|>"]
    stops = frozenset({eos_id, *(folder_end_tokens(folder) if folder is not None else ())})
    return ChatTokenizer(tokenizer, family, chat, eos_id, stops)


def folder_end_tokens(folder) -> set:
    """The ``eos_token_id`` values (an id or a list of ids) of the folder's ``config.json`` and
    ``generation_config.json``."""
    found = set()
    for name in (CONFIG_NAME, "generation_config.json"):
        path = Path(folder) / name
        if not path.is_file():
            continue
        value = _read_json(path).get("eos_token_id")
        values = value if isinstance(value, list) else [] if value is None else [value]
        for token in values:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ValueError(f"{path}: eos_token_id must be a token id or a list of them, got {value!r}")
            found.add(token)
    return found
