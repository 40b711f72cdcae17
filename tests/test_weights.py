"""GPT-2 weight loading: the OpenAI params dict, the TF checkpoint reader, HF safetensors, downloads.

Valid weights load exactly as the reference loads them.  Every bad input (a wrong shape in any block,
a missing key, a wrong block count / vocabulary / context length, qkv_bias mismatch, non-float or
non-finite values, corrupt or foreign files) raises one ValueError naming the problem and leaves the
model bit for bit as it was.  Downloads are atomic and checked for completeness; no test uses the
network (a local http.server on 127.0.0.1 or a patched urlopen).
"""

import http.server
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
import urllib.error

import numpy as np
import pytest
import torch

from gptfast import weights
from gptfast.models import GPTModel

ref_ch04 = pytest.importorskip("llms_from_scratch.ch04")
import llms_from_scratch.ch05 as ref_ch05  # noqa: E402

CFG = {"vocab_size": 300, "context_length": 16, "emb_dim": 24, "n_heads": 3, "n_layers": 2, "drop_rate": 0.0,
       "qkv_bias": True}


def _openai_params(cfg, seed=0):
    """A random params dict in the exact layout OpenAI's TF checkpoint loader produces."""
    rng = np.random.default_rng(seed)
    d, v, t = cfg["emb_dim"], cfg["vocab_size"], cfg["context_length"]

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    def block():
        return {"attn": {"c_attn": {"w": r(d, 3 * d), "b": r(3 * d)}, "c_proj": {"w": r(d, d), "b": r(d)}},
                "mlp": {"c_fc": {"w": r(d, 4 * d), "b": r(4 * d)}, "c_proj": {"w": r(4 * d, d), "b": r(d)}},
                "ln_1": {"g": r(d), "b": r(d)}, "ln_2": {"g": r(d), "b": r(d)}}

    return {"wte": r(v, d), "wpe": r(t, d), "g": r(d), "b": r(d), "blocks": [block() for _ in range(cfg["n_layers"])]}


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


def _snapshot(model):
    """Every tensor (cloned) and every parameter object of ``model``, to prove a failed load changed nothing."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: id(p) for k, p in model.named_parameters()})


def _assert_unchanged(model, snapshot):
    tensors, ids = snapshot
    now = model.state_dict()
    assert list(now) == list(tensors)
    for name, before in tensors.items():
        assert now[name].dtype == before.dtype and torch.equal(now[name], before), f"{name} was overwritten"
    assert {k: id(p) for k, p in model.named_parameters()} == ids, "parameter objects were replaced"


# ----------------------------------------------------------------------------- the OpenAI params dict


def test_load_weights_into_gpt_equals_the_reference_loader():
    params = _openai_params(CFG)
    ours = GPTModel(CFG)
    ref = ref_ch04.GPTModel(CFG)
    weights.load_weights_into_gpt(ours, params)
    ref_ch05.load_weights_into_gpt(ref, params)
    _assert_same_weights(ours, ref)
    assert torch.equal(ours.out_head.weight, torch.from_numpy(params["wte"]))
    assert ours.out_head.weight.data_ptr() != ours.tok_emb.weight.data_ptr()  # two parameters, as in the book
    assert all(p.is_contiguous() and p.requires_grad for p in ours.parameters())


def test_load_weights_into_the_reference_model_and_from_tensors():
    """The loader also fills the book's own GPTModel, and accepts torch tensors (float32 or bfloat16)."""
    params = _openai_params(CFG, seed=1)
    ref = ref_ch04.GPTModel(CFG)
    ref_ch05.load_weights_into_gpt(ref, params)
    ours_into_ref = ref_ch04.GPTModel(CFG)
    weights.load_weights_into_gpt(ours_into_ref, params)
    _assert_same_weights(ours_into_ref, ref)

    def to_tensors(node):
        if isinstance(node, dict):
            return {k: to_tensors(v) for k, v in node.items()}
        if isinstance(node, list):
            return [to_tensors(v) for v in node]
        return torch.from_numpy(node)

    from_tensors = GPTModel(CFG)
    weights.load_weights_into_gpt(from_tensors, to_tensors(params))
    _assert_same_weights(from_tensors, ref)


def test_assign_checks_shapes():
    with pytest.raises(ValueError, match="Shape mismatch"):
        weights.assign(torch.zeros(2, 3), np.zeros((3, 2)))
    p = weights.assign(torch.zeros(2, 3, dtype=torch.bfloat16), np.ones((2, 3), dtype=np.float32))
    assert isinstance(p, torch.nn.Parameter) and p.dtype == torch.bfloat16


def test_load_keeps_the_model_dtype():
    params = _openai_params(CFG, seed=2)
    model = GPTModel(CFG).to(torch.bfloat16)
    weights.load_weights_into_gpt(model, params)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.equal(model.tok_emb.weight, torch.from_numpy(params["wte"]).to(torch.bfloat16))


def test_load_weights_rejects_a_wrong_number_of_blocks():
    with pytest.raises(ValueError, match="blocks"):
        weights.load_weights_into_gpt(GPTModel({**CFG, "n_layers": 3}), _openai_params(CFG))


def _set_leaf(params, path, value):
    node = params
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def _del_leaf(params, path):
    node = params
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]


def _nan_at(path, index=(0,)):
    def mutate(params):
        node = params
        for key in path:
            node = node[key]
        node[index] = np.nan
    return mutate


def _inf_at(path):
    def mutate(params):
        node = params
        for key in path:
            node = node[key]
        node.flat[-1] = np.inf
    return mutate


D, V, T = CFG["emb_dim"], CFG["vocab_size"], CFG["context_length"]

# (what is wrong, how to break valid params, model config changes, message the error must contain)
BAD_PARAMS = [
    ("last block's mlp.c_fc.w shape", lambda p: _set_leaf(p, ("blocks", 1, "mlp", "c_fc", "w"),
                                                          np.zeros((D, 4 * D + 1), np.float32)), {},
     r"blocks\[1\]\.mlp\.c_fc\.w has shape \(24, 97\).*trf_blocks\.1\.ff\.layers\.0\.weight needs \(24, 96\)"),
    ("last block's ln_2.b shape", lambda p: _set_leaf(p, ("blocks", 1, "ln_2", "b"), np.zeros(D + 1, np.float32)),
     {}, r"blocks\[1\]\.ln_2\.b has shape \(25,\)"),
    ("first block's c_attn.w transposed", lambda p: _set_leaf(p, ("blocks", 0, "attn", "c_attn", "w"),
                                                              np.zeros((3 * D, D), np.float32)), {},
     r"blocks\[0\]\.attn\.c_attn\.w has shape \(72, 24\)"),
    ("c_attn.w columns not 3 * emb_dim", lambda p: _set_leaf(p, ("blocks", 1, "attn", "c_attn", "w"),
                                                             np.zeros((D, 3 * D + 1), np.float32)), {},
     r"blocks\[1\]\.attn\.c_attn\.w has shape \(24, 73\)"),
    ("c_attn.b length", lambda p: _set_leaf(p, ("blocks", 1, "attn", "c_attn", "b"), np.zeros(3 * D - 3, np.float32)),
     {}, r"blocks\[1\]\.attn\.c_attn\.b has shape \(69,\)"),
    ("final norm shape", lambda p: _set_leaf(p, ("g",), np.zeros(D + 2, np.float32)), {}, r"GPT-2 weight g has shape"),
    ("missing block key", lambda p: _del_leaf(p, ("blocks", 1, "ln_2", "b")), {}, r"lack blocks\[1\]\.ln_2\.b"),
    ("missing block subtree", lambda p: _del_leaf(p, ("blocks", 1, "mlp")), {}, r"lack blocks\[1\]\.mlp"),
    ("missing top-level key", lambda p: _del_leaf(p, ("g",)), {}, r"lack g\b"),
    ("missing wte", lambda p: _del_leaf(p, ("wte",)), {}, r"lack wte"),
    ("missing blocks", lambda p: _del_leaf(p, ("blocks",)), {}, r"lack blocks"),
    ("block is None", lambda p: _set_leaf(p, ("blocks", 1), None), {}, r"lack blocks\[1\]\.attn"),
    ("blocks not a list", lambda p: _set_leaf(p, ("blocks",), {"0": {}}), {}, r"blocks must be a list"),
    ("fewer blocks than the model", lambda p: None, {"n_layers": 3}, r"2 transformer blocks, the model 3 \(n_layers\)"),
    ("more blocks than the model", lambda p: None, {"n_layers": 1}, r"2 transformer blocks, the model 1 \(n_layers\)"),
    ("wrong vocabulary", lambda p: None, {"vocab_size": 301}, r"wte has shape \(300, 24\).*needs \(301, 24\).*vocab"),
    ("wrong context length", lambda p: None, {"context_length": 32},
     r"wpe has shape \(16, 24\).*needs \(32, 24\).*context_length"),
    ("wrong emb_dim", lambda p: None, {"emb_dim": 12}, r"wpe has shape \(16, 24\).*needs \(16, 12\)"),
    ("model without qkv biases", lambda p: None, {"qkv_bias": False}, r"qkv_bias=False.*qkv_bias=True"),
    ("int32 weight", lambda p: _set_leaf(p, ("blocks", 1, "attn", "c_proj", "w"), np.zeros((D, D), np.int32)), {},
     r"blocks\[1\]\.attn\.c_proj\.w has dtype int32"),
    ("bool weight", lambda p: _set_leaf(p, ("b",), np.ones(D, bool)), {}, r"weight b has dtype bool"),
    ("object array", lambda p: _set_leaf(p, ("wpe",), np.empty((T, D), object)), {}, r"wpe has dtype object"),
    ("int64 tensor", lambda p: _set_leaf(p, ("wte",), torch.zeros(V, D, dtype=torch.int64)), {},
     r"wte has dtype torch.int64"),
    ("complex tensor", lambda p: _set_leaf(p, ("g",), torch.zeros(D, dtype=torch.complex64)), {}, r"g has dtype"),
    ("a list, not an array", lambda p: _set_leaf(p, ("g",), [1.0] * D), {}, r"g is a list, not a numpy array"),
    ("NaN in the last block", _nan_at(("blocks", 1, "ln_2", "g")), {}, r"blocks\[1\]\.ln_2\.g has NaN or inf"),
    ("NaN in c_attn (value part)", _nan_at(("blocks", 1, "attn", "c_attn", "w"), (0, 3 * D - 1)), {},
     r"blocks\[1\]\.attn\.c_attn\.w has NaN or inf"),
    ("inf in wte", _inf_at(("wte",)), {}, r"wte has NaN or inf"),
    ("float64 too large for float32",
     lambda p: _set_leaf(p, ("blocks", 1, "mlp", "c_proj", "b"), np.full(D, 1e300)), {},
     r"blocks\[1\]\.mlp\.c_proj\.b has values too large for the model's torch.float32"),
]


@pytest.mark.parametrize("what, mutate, cfg_change, message", BAD_PARAMS, ids=[c[0] for c in BAD_PARAMS])
def test_a_failed_load_names_the_problem_and_leaves_the_model_unchanged(what, mutate, cfg_change, message):
    params = _openai_params(CFG, seed=4)
    mutate(params)
    torch.manual_seed(0)
    model = GPTModel({**CFG, **cfg_change})
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        weights.load_weights_into_gpt(model, params)
    _assert_unchanged(model, before)


def test_the_reference_does_leave_a_half_overwritten_model():
    """Why the all-or-nothing load matters: the reference assigns the embeddings before it finds a bad block."""
    params = _openai_params(CFG, seed=4)
    params["blocks"][1]["ln_2"]["b"] = np.zeros(D + 1, np.float32)
    model = ref_ch04.GPTModel(CFG)
    before = model.tok_emb.weight.detach().clone()
    with pytest.raises(ValueError):
        ref_ch05.load_weights_into_gpt(model, params)
    assert not torch.equal(model.tok_emb.weight, before)


@pytest.mark.parametrize("dtype, big", [(torch.float16, 1e5), (torch.bfloat16, np.finfo(np.float32).max)])
def test_a_half_precision_model_rejects_values_that_overflow_it(dtype, big):
    params = _openai_params(CFG, seed=4)
    params["blocks"][0]["ln_1"]["g"][3] = big  # finite in float32, inf once rounded to ``dtype``
    if True:
        model = GPTModel(CFG).to(dtype)
        before = _snapshot(model)
        with pytest.raises(ValueError, match=r"blocks\[0\]\.ln_1\.g has values too large"):
            weights.load_weights_into_gpt(model, params)
        _assert_unchanged(model, before)


def test_huge_but_finite_values_load():
    """Values whose sum overflows are still finite: the cheap sum check must not reject them."""
    params = _openai_params(CFG, seed=4)
    params["wte"][:4] = np.finfo(np.float32).max
    model = GPTModel(CFG)
    weights.load_weights_into_gpt(model, params)
    assert torch.equal(model.tok_emb.weight, torch.from_numpy(params["wte"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_on_the_gpu_gets_gpu_parameters_or_stays_unchanged():
    params = _openai_params(CFG, seed=8)
    model = GPTModel(CFG).cuda()
    weights.load_weights_into_gpt(model, params)
    assert all(p.is_cuda for p in model.parameters())
    assert torch.equal(model.tok_emb.weight.cpu(), torch.from_numpy(params["wte"]))
    params["blocks"][1]["ln_2"]["g"][0] = np.nan
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"blocks\[1\]\.ln_2\.g has NaN or inf"):
        weights.load_weights_into_gpt(model, params)
    _assert_unchanged(model, before)


def test_params_must_be_a_dict():
    with pytest.raises(ValueError, match="params must be a dict"):
        weights.load_weights_into_gpt(GPTModel(CFG), [1, 2])


def test_a_model_of_another_layout_is_reported_not_half_loaded():
    from gptfast.models import TransformerBlockFast

    model = GPTModel(CFG)
    model.trf_blocks[1] = TransformerBlockFast(CFG)  # fused qkv: no W_query
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"the model has no trf_blocks\.1\.att\.W_query"):
        weights.load_weights_into_gpt(model, _openai_params(CFG))
    _assert_unchanged(model, before)


# ----------------------------------------------------------------------------- Hugging Face safetensors


def _hf_state_dict(params, prefix=""):
    """The same weights under Hugging Face GPT-2 names (Conv1D keeps TF's (in, out) layout)."""
    sd = {f"{prefix}wte.weight": params["wte"], f"{prefix}wpe.weight": params["wpe"],
          f"{prefix}ln_f.weight": params["g"], f"{prefix}ln_f.bias": params["b"]}
    for i, blk in enumerate(params["blocks"]):
        for hf, src in (("attn.c_attn", blk["attn"]["c_attn"]), ("attn.c_proj", blk["attn"]["c_proj"]),
                        ("mlp.c_fc", blk["mlp"]["c_fc"]), ("mlp.c_proj", blk["mlp"]["c_proj"])):
            sd[f"{prefix}h.{i}.{hf}.weight"], sd[f"{prefix}h.{i}.{hf}.bias"] = src["w"], src["b"]
        for hf, src in (("ln_1", blk["ln_1"]), ("ln_2", blk["ln_2"])):
            sd[f"{prefix}h.{i}.{hf}.weight"], sd[f"{prefix}h.{i}.{hf}.bias"] = src["g"], src["b"]
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


def _save(sd, path):
    from safetensors.torch import save_file

    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_hugging_face_safetensors_load_like_the_openai_params(tmp_path, prefix):
    params = _openai_params(CFG, seed=3)
    _save(_hf_state_dict(params, prefix), tmp_path / "model.safetensors")
    from_hf = weights.load_hf_gpt2_into_gpt(GPTModel(CFG), tmp_path)  # folder form
    from_params = GPTModel(CFG)
    weights.load_weights_into_gpt(from_params, params)
    _assert_same_weights(from_hf, from_params)


def test_safetensors_with_mask_buffers_and_a_tied_or_untied_lm_head(tmp_path):
    params = _openai_params(CFG, seed=3)
    expected = GPTModel(CFG)
    weights.load_weights_into_gpt(expected, params)

    sd = _hf_state_dict(params, "transformer.")
    for i in range(CFG["n_layers"]):  # the causal-mask buffers older GPT-2 files carry are skipped
        sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, T, T))
        sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()  # tied: equal to wte
    _assert_same_weights(weights.load_hf_gpt2_into_gpt(GPTModel(CFG), _save(sd, tmp_path / "tied.safetensors")),
                         expected)

    untied = torch.from_numpy(np.random.default_rng(9).standard_normal((V, D)).astype(np.float32))
    sd["lm_head.weight"] = untied
    model = weights.load_hf_gpt2_into_gpt(GPTModel(CFG), _save(sd, tmp_path / "untied.safetensors"))
    assert torch.equal(model.out_head.weight, untied)
    assert torch.equal(model.tok_emb.weight, expected.tok_emb.weight)


def test_bf16_safetensors_load(tmp_path):
    params = _openai_params(CFG, seed=6)
    sd = {k: v.to(torch.bfloat16) for k, v in _hf_state_dict(params).items()}
    model = weights.load_hf_gpt2_into_gpt(GPTModel(CFG), _save(sd, tmp_path / "model.safetensors"))
    assert torch.equal(model.tok_emb.weight, sd["wte.weight"].float())
    assert torch.equal(model.trf_blocks[1].att.W_value.weight, sd["h.1.attn.c_attn.weight"].float()[:, 2 * D:].T)


def test_float64_safetensors_load_without_a_detour_through_float32(tmp_path):
    """A float64 weight is rounded once, to the model's dtype: a float64 model holds it exactly, and a finite
    value too large for a float32 model is named as such, not as a NaN or inf in the file."""
    sd = {k: v.double() + 1e-12 for k, v in _hf_state_dict(_openai_params(CFG, seed=6)).items()}
    model = weights.load_hf_gpt2_into_gpt(GPTModel(CFG).double(), _save(sd, tmp_path / "f64.safetensors"))
    assert torch.equal(model.tok_emb.weight, sd["wte.weight"])
    sd["wte.weight"][0, 0] = 1e300
    model = GPTModel(CFG).double()
    model = weights.load_hf_gpt2_into_gpt(model, _save(sd, tmp_path / "big.safetensors"))
    assert model.tok_emb.weight[0, 0].item() == 1e300
    with pytest.raises(ValueError, match=r"wte has values too large for the model's torch.float32"):
        weights.load_hf_gpt2_into_gpt(GPTModel(CFG), tmp_path / "big.safetensors")


def test_safetensors_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="safetensors file not found"):
        weights.load_hf_gpt2_into_gpt(GPTModel(CFG), tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="safetensors file not found"):
        weights.load_hf_gpt2_into_gpt(GPTModel(CFG), tmp_path)  # a folder without model.safetensors
    sd = _hf_state_dict(_openai_params(CFG))
    del sd["h.1.mlp.c_fc.bias"]
    _save(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="h.1.mlp.c_fc.bias"):
        weights.load_hf_gpt2_into_gpt(GPTModel(CFG), tmp_path / "model.safetensors")


def _valid_file_bytes(tmp_path):
    return _save(_hf_state_dict(_openai_params(CFG, seed=7)), tmp_path / "valid.safetensors").read_bytes()


def _header(entries: dict, data: bytes) -> bytes:
    header = json.dumps(entries).encode()
    return len(header).to_bytes(8, "little") + header + data


def _sd_with(change):
    def build(tmp_path):
        sd = _hf_state_dict(_openai_params(CFG, seed=7))
        change(sd)
        return _save(sd, tmp_path / "f.safetensors").read_bytes()
    return build


def _torch_pickle(tmp_path):
    torch.save(GPTModel(CFG).state_dict(), tmp_path / "model.pth")
    return (tmp_path / "model.pth").read_bytes()


def _drop(key):
    return lambda sd: sd.pop(key)


def _put(key, value):
    return lambda sd: sd.__setitem__(key, value)


def _rename_block(src, dst):
    """Move block ``src`` to index ``dst``, so the file has a gap where ``src`` was."""
    def change(sd):
        for key in [k for k in sd if k.startswith(f"h.{src}.")]:
            sd[key.replace(f"h.{src}.", f"h.{dst}.", 1)] = sd.pop(key)
    return change


def _nan_in(key):
    def change(sd):
        sd[key] = sd[key].clone()
        sd[key].view(-1)[-1] = float("nan")
    return change


# (what is wrong, the file's bytes, message the error must contain)
BAD_FILES = [
    ("empty file", lambda tmp: b"", r"not a readable safetensors file"),
    ("five bytes", lambda tmp: b"\x01\x02\x03\x04\x05", r"not a readable safetensors file"),
    ("truncated header", lambda tmp: _valid_file_bytes(tmp)[:40], r"not a readable safetensors file"),
    ("truncated data", lambda tmp: _valid_file_bytes(tmp)[:-100], r"not a readable safetensors file"),
    ("one byte missing", lambda tmp: _valid_file_bytes(tmp)[:-1], r"not a readable safetensors file"),
    ("one byte too many", lambda tmp: _valid_file_bytes(tmp) + b"\0", r"not a readable safetensors file"),
    ("random bytes", lambda tmp: np.random.default_rng(0).bytes(5000), r"not a readable safetensors file"),
    ("a text file", lambda tmp: b"this is not a model\n" * 50, r"not a readable safetensors file"),
    ("a torch pickle", _torch_pickle, r"not a readable safetensors file"),
    ("header is not JSON", lambda tmp: _header({}, b"")[:8] + b"{nope", r"not a readable safetensors file"),
    ("offsets beyond the data", lambda tmp: _header(
        {"wte.weight": {"dtype": "F32", "shape": [V, D], "data_offsets": [0, V * D * 4]}}, b"\0" * 64),
     r"not a readable safetensors file"),
    ("a header of no GPT-2 tensors", lambda tmp: _save({"model.embed_tokens.weight": torch.zeros(4, 4)},
                                                       tmp / "llama.safetensors").read_bytes(),
     r"holds no GPT-2 weights"),
    ("a missing block key", _sd_with(_drop("h.1.ln_2.bias")), r"lack 'h\.1\.ln_2\.bias'"),
    ("a missing wte", _sd_with(_drop("wte.weight")), r"lack 'wte\.weight'"),
    ("a wrong shape in the last block", _sd_with(_put("h.1.mlp.c_proj.weight", torch.zeros(4 * D, D + 1))),
     r"blocks\[1\]\.mlp\.c_proj\.w has shape \(96, 25\)"),
    ("a third block the model lacks", _sd_with(lambda sd: sd.update(
        {k.replace("h.1.", "h.2."): v.clone() for k, v in list(sd.items()) if k.startswith("h.1.")})),
     r"3 transformer blocks, the model 2"),
    ("a missing middle block", _sd_with(_rename_block(1, 2)), r"lack 'h\.1\."),
    ("a wrong vocabulary", _sd_with(_put("wte.weight", torch.zeros(V + 7, D))), r"wte has shape \(307, 24\)"),
    ("a wrong context length", _sd_with(_put("wpe.weight", torch.zeros(1024, D))), r"wpe has shape \(1024, 24\)"),
    ("a wrong lm_head shape", _sd_with(_put("lm_head.weight", torch.zeros(V, D + 1))), r"lm_head\.weight has shape"),
    ("an int64 weight", _sd_with(_put("h.0.attn.c_proj.weight", torch.zeros(D, D, dtype=torch.int64))),
     r"'h\.0\.attn\.c_proj\.weight' has dtype I64"),
    ("a uint8 weight", _sd_with(_put("ln_f.bias", torch.zeros(D, dtype=torch.uint8))), r"'ln_f\.bias' has dtype U8"),
    ("a NaN in the last block", _sd_with(_nan_in("h.1.ln_2.weight")), r"blocks\[1\]\.ln_2\.g has NaN or inf"),
    ("a NaN in the lm_head", _sd_with(lambda sd: (sd.__setitem__("lm_head.weight", sd["wte.weight"].clone()),
                                                  _nan_in("lm_head.weight")(sd))), r"lm_head\.weight has NaN or inf"),
]


@pytest.mark.parametrize("what, make, message", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_a_bad_safetensors_file_is_one_value_error_and_the_model_is_unchanged(tmp_path, what, make, message):
    path = tmp_path / "model.safetensors"
    path.write_bytes(make(tmp_path))
    torch.manual_seed(0)
    model = GPTModel(CFG)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        weights.load_hf_gpt2_into_gpt(model, path)
    _assert_unchanged(model, before)


def test_hf_state_dict_rejects_integer_tensors():
    sd = _hf_state_dict(_openai_params(CFG))
    sd["h.0.ln_1.weight"] = torch.ones(D, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"'h\.0\.ln_1\.weight' has dtype torch.int32"):
        weights.hf_state_dict_to_params(sd)
    with pytest.raises(ValueError, match="no transformer blocks"):
        weights.hf_state_dict_to_params({"wte.weight": torch.zeros(3, 2), "h.x.attn.bias": torch.zeros(1)})


# ----------------------------------------------------------------------------- OpenAI's TF checkpoint


def _fake_tensorflow(variables):
    """A stand-in for the tf.train functions the checkpoint reader uses (TensorFlow is not installed here)."""
    tf = types.ModuleType("tensorflow")
    tf.train = types.SimpleNamespace(
        list_variables=lambda path: [(name, list(v.shape)) for name, v in variables.items()],
        load_variable=lambda path, name: variables[name],
        latest_checkpoint=lambda folder: f"{folder}/model.ckpt",
    )
    return tf


def _tf_variables(params):
    # OpenAI's variable names; TF stores weights with a leading singleton axis that the reader squeezes.
    variables = {"model/wte": params["wte"], "model/wpe": params["wpe"], "model/ln_f/g": params["g"],
                 "model/ln_f/b": params["b"]}
    for i, blk in enumerate(params["blocks"]):
        for path, leaf in (("attn/c_attn", blk["attn"]["c_attn"]), ("attn/c_proj", blk["attn"]["c_proj"]),
                           ("mlp/c_fc", blk["mlp"]["c_fc"]), ("mlp/c_proj", blk["mlp"]["c_proj"]),
                           ("ln_1", blk["ln_1"]), ("ln_2", blk["ln_2"])):
            for key, value in leaf.items():
                variables[f"model/h{i}/{path}/{key}"] = value[None]
    return variables


def test_tf_checkpoint_reader_builds_the_params_dict(monkeypatch):
    params = _openai_params(CFG, seed=5)
    monkeypatch.setitem(sys.modules, "tensorflow", _fake_tensorflow(_tf_variables(params)))
    loaded = weights.load_gpt2_params_from_tf_ckpt("ckpt", {"n_layer": CFG["n_layers"]})
    assert set(loaded) == {"blocks", "wte", "wpe", "g", "b"}  # ln_f/g lands at the top level, as in the book
    a, b = GPTModel(CFG), GPTModel(CFG)
    weights.load_weights_into_gpt(a, loaded)
    weights.load_weights_into_gpt(b, params)
    _assert_same_weights(a, b)


def test_tf_checkpoint_with_more_blocks_than_hparams_is_a_value_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", _fake_tensorflow(_tf_variables(_openai_params(CFG))))
    with pytest.raises(ValueError, match=r"'model/h1/.*' is not one of the n_layer=1 blocks"):
        weights.load_gpt2_params_from_tf_ckpt("ckpt", {"n_layer": 1})
    with pytest.raises(ValueError, match="integer n_layer"):
        weights.load_gpt2_params_from_tf_ckpt("ckpt", {"n_embd": 24})


def test_missing_tensorflow_gives_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(ImportError, match="needs TensorFlow"):
        weights.load_gpt2_params_from_tf_ckpt("ckpt", {"n_layer": 1})


# ----------------------------------------------------------------------------- downloads


def test_download_offline_raises_connection_error(tmp_path, monkeypatch):
    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(weights.urllib.request, "urlopen", offline)
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # not installed: said before any download
    with pytest.raises(ImportError, match="needs TensorFlow"):
        weights.download_and_load_gpt2("124M", tmp_path)
    assert calls == []
    monkeypatch.setitem(sys.modules, "tensorflow", _fake_tensorflow({}))
    with pytest.raises(ConnectionError, match="could not download checkpoint"):
        weights.download_and_load_gpt2("124M", tmp_path)
    with pytest.raises(ValueError, match="Model size"):
        weights.download_and_load_gpt2("125M", tmp_path)
    assert os.listdir(tmp_path / "124M") == []


def test_download_uses_files_already_present(tmp_path, monkeypatch):
    folder = tmp_path / "124M"
    folder.mkdir()
    for name in weights.GPT2_FILES:
        (folder / name).write_text("{}" if name == "hparams.json" else "x")
    monkeypatch.setattr(weights.urllib.request, "urlopen", lambda *a, **k: pytest.fail("must not download"))
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(ImportError, match="needs TensorFlow"):
        weights.download_and_load_gpt2("124M", tmp_path)


def test_a_corrupt_hparams_file_is_a_value_error(tmp_path, monkeypatch):
    folder = tmp_path / "124M"
    folder.mkdir()
    for name in weights.GPT2_FILES:
        (folder / name).write_text("{not json" if name == "hparams.json" else "x")
    monkeypatch.setitem(sys.modules, "tensorflow", _fake_tensorflow({}))
    with pytest.raises(ValueError, match="hparams.json is not valid JSON"):
        weights.download_and_load_gpt2("124M", tmp_path)


class _Server:
    """A local HTTP server (127.0.0.1 only) serving ``files``; paths under /short/ send half the announced bytes,
    paths under /stall/ send half and then wait until ``release`` is set."""

    def __init__(self, files):
        self.files = files
        self.release = threading.Event()
        self.requests = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                mode, _, name = self.path.lstrip("/").partition("/")
                body = server.files.get(name.rsplit("/", 1)[-1])
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if mode == "ok":
                    self.wfile.write(body)
                    return
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                if mode == "stall":
                    server.release.wait(30)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    payload = np.random.default_rng(1).bytes(300_000)  # several 64 KiB chunks
    srv = _Server({name: (b'{"n_layer": 2}' if name == "hparams.json" else payload + name.encode())
                   for name in weights.GPT2_FILES})
    yield srv
    srv.close()


def test_download_file_writes_the_whole_file(tmp_path, server):
    dest = tmp_path / "vocab.bpe"
    weights.download_file(f"{server.url}/ok/vocab.bpe", str(dest))
    assert dest.read_bytes() == server.files["vocab.bpe"]
    assert os.listdir(tmp_path) == ["vocab.bpe"]


def test_a_short_download_never_lands_and_the_backup_is_tried(tmp_path, server):
    dest = tmp_path / "encoder.json"
    with pytest.raises(ConnectionError, match=r"closed after \d+ of \d+ bytes"):
        weights.download_file(f"{server.url}/short/encoder.json", str(dest), f"{server.url}/short/encoder.json")
    assert os.listdir(tmp_path) == []  # no truncated file, no temporary left behind
    dest.write_bytes(b"old")
    with pytest.raises(ConnectionError):
        weights.download_file(f"{server.url}/short/encoder.json", str(dest))
    assert dest.read_bytes() == b"old"  # a failed download keeps what was there
    weights.download_file(f"{server.url}/short/encoder.json", str(dest), f"{server.url}/ok/encoder.json")
    assert dest.read_bytes() == server.files["encoder.json"]
    assert os.listdir(tmp_path) == ["encoder.json"]


def test_a_local_write_error_is_not_reported_as_a_connection_error(tmp_path, server):
    with pytest.raises(FileNotFoundError):
        weights.download_file(f"{server.url}/ok/vocab.bpe", str(tmp_path / "missing" / "vocab.bpe"))


def test_an_interrupted_download_leaves_no_file(tmp_path, monkeypatch):
    class Response:
        headers = {"Content-Length": str(3 << 16)}

        def __init__(self):
            self.chunks = 0

        def read(self, n):
            self.chunks += 1
            if self.chunks == 3:
                raise KeyboardInterrupt  # the user presses Ctrl-C mid-download
            return b"x" * n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(weights.urllib.request, "urlopen", lambda *a, **k: Response())
    with pytest.raises(KeyboardInterrupt):
        weights.download_file("http://example.invalid/model.ckpt.meta", str(tmp_path / "model.ckpt.meta"))
    assert os.listdir(tmp_path) == []


_DOWNLOAD_CHILD = textwrap.dedent("""
    import sys
    from gptfast.weights import download_file
    download_file(sys.argv[1], sys.argv[2])
""")


def test_a_killed_download_is_not_reused_as_already_present(tmp_path, server, monkeypatch):
    folder = tmp_path / "124M"
    folder.mkdir()
    dest = folder / "model.ckpt.data-00000-of-00001"
    child = subprocess.Popen([sys.executable, "-c", _DOWNLOAD_CHILD, f"{server.url}/stall/{dest.name}", str(dest)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size > 0 for p in folder.glob(f".{dest.name}.*.tmp")):
            assert child.poll() is None and time.monotonic() < deadline, "the download never started"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not dest.exists()  # only a stray temporary: never taken for the finished file

    server.release.set()
    monkeypatch.setattr(weights, "GPT2_BASE_URL", f"{server.url}/ok")
    monkeypatch.setattr(weights, "GPT2_BACKUP_URL", f"{server.url}/ok")
    params = _openai_params(CFG)
    monkeypatch.setitem(sys.modules, "tensorflow", _fake_tensorflow(_tf_variables(params)))
    settings, loaded = weights.download_and_load_gpt2("124M", tmp_path)
    assert settings == {"n_layer": 2}
    for name in weights.GPT2_FILES:
        assert (folder / name).read_bytes() == server.files[name]
    model = GPTModel(CFG)
    weights.load_weights_into_gpt(model, loaded)
    assert torch.equal(model.tok_emb.weight, torch.from_numpy(params["wte"]))


def test_download_and_load_never_keeps_a_truncated_file(tmp_path, server, monkeypatch):
    monkeypatch.setattr(weights, "GPT2_BASE_URL", f"{server.url}/short")
    monkeypatch.setattr(weights, "GPT2_BACKUP_URL", f"{server.url}/short")
    monkeypatch.setitem(sys.modules, "tensorflow", _fake_tensorflow(_tf_variables(_openai_params(CFG))))
    with pytest.raises(ConnectionError, match="could not download checkpoint"):
        weights.download_and_load_gpt2("124M", tmp_path)
    assert os.listdir(tmp_path / "124M") == []
    monkeypatch.setattr(weights, "GPT2_BASE_URL", f"{server.url}/ok")
    settings, _ = weights.download_and_load_gpt2("124M", tmp_path)
    assert settings == {"n_layer": 2}
    assert sorted(os.listdir(tmp_path / "124M")) == sorted(weights.GPT2_FILES)
