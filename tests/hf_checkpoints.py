"""Small Hugging Face-layout checkpoints for the Llama 3 / Qwen3 loader tests.

Real weights cannot be downloaded here, so the tests turn a model's state dict
into the tensor names a Hugging Face ``model.safetensors`` uses and write it the
way the Hub stores it: one file, or shards plus ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

_BLOCK_NAMES = {
    "att.W_query.weight": "self_attn.q_proj.weight",
    "att.W_key.weight": "self_attn.k_proj.weight",
    "att.W_value.weight": "self_attn.v_proj.weight",
    "att.out_proj.weight": "self_attn.o_proj.weight",
    "att.q_norm.scale": "self_attn.q_norm.weight",
    "att.k_norm.scale": "self_attn.k_norm.weight",
    "ff.fc1.weight": "mlp.gate_proj.weight",
    "ff.fc2.weight": "mlp.up_proj.weight",
    "ff.fc3.weight": "mlp.down_proj.weight",
    "ff.gate.weight": "mlp.gate.weight",
    "norm1.weight": "input_layernorm.weight",
    "norm1.scale": "input_layernorm.weight",
    "norm2.weight": "post_attention_layernorm.weight",
    "norm2.scale": "post_attention_layernorm.weight",
}
_TOP_NAMES = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "final_norm.scale": "model.norm.weight",
    "out_head.weight": "lm_head.weight",
}
_EXPERT_NAMES = {"fc1": "gate_proj", "fc2": "up_proj", "fc3": "down_proj"}


def hf_name(key: str) -> str:
    """The Hugging Face tensor name of one of our (= the reference's) state_dict keys."""
    if key in _TOP_NAMES:
        return _TOP_NAMES[key]
    _, layer, rest = key.split(".", 2)  # trf_blocks.<layer>.<rest>
    if rest in _BLOCK_NAMES:
        return f"model.layers.{layer}.{_BLOCK_NAMES[rest]}"
    ff, fc, expert, _ = rest.split(".")  # ff.fc1.<expert>.weight
    return f"model.layers.{layer}.mlp.experts.{expert}.{_EXPERT_NAMES[fc]}.weight"


def hf_state_dict(state_dict, tie_embeddings=False):
    """``{hf_name: tensor}`` from a model state dict; ``tie_embeddings`` drops ``lm_head.weight``."""
    out = {hf_name(k): v.detach().clone().contiguous() for k, v in state_dict.items()}
    if tie_embeddings:
        del out["lm_head.weight"]
    return out


def random_hf_state_dict(model, seed=0, scale=0.2, tie_embeddings=False):
    """Random values for every tensor of ``model`` (meta experts included), under HF names."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in model.state_dict().items():
        data = torch.randn(tuple(value.shape), generator=g) * scale
        if key.endswith(".scale") or key.endswith("norm.weight") or key.endswith("norm1.weight") \
                or key.endswith("norm2.weight"):
            data = 1.0 + data  # norms around one, as trained checkpoints have them
        out[hf_name(key)] = data.to(value.dtype)
    if tie_embeddings:
        del out["lm_head.weight"]
    return out


def write_checkpoint(params, folder, shards=1):
    """Write ``params`` to ``folder`` as the Hub does: one ``model.safetensors`` or ``shards`` files plus an index."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(params)
    if shards == 1:
        save_file(params, str(folder / "model.safetensors"))
        return folder
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: params[n] for n in names[i::shards]}
        save_file(part, str(folder / shard))
        weight_map.update({n: shard for n in part})
    with open(folder / "model.safetensors.index.json", "w", encoding="utf-8") as handle:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, handle)
    return folder


QWEN3_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def write_qwen3_tokenizer(path, texts, vocab_size=400):
    """A small byte-level BPE ``tokenizer.json`` in Qwen3's layout (its special tokens included), trained on
    ``texts``; skips the test where the ``tokenizers`` package is missing.  Returns ``path``."""
    import pytest

    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN3_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text for text in texts for _ in range(20)], trainer=trainer)
    tok.save(str(path))
    return path
