"""gptfast.qwen3 against ``llms_from_scratch.qwen3``: same API, same parameters, same logits."""

import http.client
import io
import json
import os
import sys
import types
import urllib.error

import pytest
import torch

from gptfast import ops
from dropin_model_checks import (assert_blocks_of_the_users_get_the_references_mask, assert_loaded_like_the_reference,
                                 assert_logits_bitwise, assert_parameter_count, assert_same_public_api,
                                 assert_training_gradients_bitwise, seeded_pair)
from hf_checkpoints import QWEN3_SPECIALS as SPECIALS
from hf_checkpoints import random_hf_state_dict, write_checkpoint, write_qwen3_tokenizer

ref = pytest.importorskip("llms_from_scratch.qwen3", reason="llms-from-scratch is a test dependency")
import gptfast.qwen3 as ours  # noqa: E402
from gptfast import weights  # noqa: E402
from gptfast.models import hf_folder, hub  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def tiny_cfg(n_kv_groups=2, qk_norm=True, dtype=torch.float32, num_experts=0, head_dim=8, **extra):
    cfg = {"vocab_size": 101, "context_length": 48, "emb_dim": 32, "hidden_dim": 40, "n_layers": 2, "n_heads": 4,
           "head_dim": head_dim, "n_kv_groups": n_kv_groups, "qk_norm": qk_norm, "dtype": dtype,
           "rope_base": 1_000_000.0, "num_experts": num_experts, **extra}
    if num_experts:
        cfg.update(num_experts_per_tok=2, moe_intermediate_size=24)
    return cfg


RATIOS = [pytest.param(4, id="ratio1"), pytest.param(2, id="ratio2"), pytest.param(1, id="ratio4")]
QK_NORM = [pytest.param(True, id="qknorm"), pytest.param(False, id="no-qknorm")]


def test_every_public_name_of_the_reference_exists_with_the_same_signature():
    assert_same_public_api(ours, ref, 12)
    configs = [n for n in vars(ref) if "CONFIG" in n]
    assert len(configs) == 7
    for config in configs:
        assert getattr(ours, config) == getattr(ref, config), config
    assert ours.Qwen3Tokenizer._SPECIALS == ref.Qwen3Tokenizer._SPECIALS


def _pair(cfg, seed=123, cls_name="Qwen3Model"):
    return seeded_pair(ref, ours, cls_name, cfg, seed)


@pytest.mark.parametrize("cfg", [tiny_cfg(2, dtype=torch.bfloat16), tiny_cfg(1, qk_norm=False),
                                 tiny_cfg(2, num_experts=4), tiny_cfg(4, head_dim=None)],
                         ids=["bf16-qknorm", "no-qknorm", "moe", "head_dim-None"])
def test_state_dict_keys_shapes_dtypes_devices_and_seeded_values_are_the_references(cfg):
    r, o = _pair(cfg)
    rs, os_ = r.state_dict(), o.state_dict()
    assert list(rs) == list(os_)
    for key in rs:
        a, b = rs[key], os_[key]
        assert (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device), key
        if not a.is_meta:
            assert torch.equal(a, b), key
    assert torch.equal(r.cos, o.cos) and torch.equal(r.sin, o.sin)
    # the same random draws were consumed: the next one agrees too
    torch.manual_seed(123)
    ref.Qwen3Model(cfg)
    after_ref = torch.rand(3)
    torch.manual_seed(123)
    ours.Qwen3Model(cfg)
    assert torch.equal(torch.rand(3), after_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("qk_norm", QK_NORM)
@pytest.mark.parametrize("n_kv_groups", RATIOS)
@pytest.mark.parametrize("seq_len", [1, 13, 48])
def test_logits_are_bitwise_the_references_with_the_torch_backend(seq_len, n_kv_groups, qk_norm, dtype):
    cfg = tiny_cfg(n_kv_groups, qk_norm, dtype)
    r, o = _pair(cfg)
    assert_logits_bitwise(r, o, cfg["vocab_size"], seq_len, dtype)


def test_default_backend_matches_the_reference_within_fp32_tolerance():
    cfg = tiny_cfg(2)
    r, o = _pair(cfg)
    idx = torch.randint(0, cfg["vocab_size"], (3, 29))
    with torch.no_grad():
        torch.testing.assert_close(o(idx), r(idx), atol=1e-5, rtol=1e-5)


def test_training_gradients_are_bitwise_the_references_with_the_torch_backend():
    cfg = tiny_cfg(2)
    r, o = _pair(cfg)
    assert_training_gradients_bitwise(r, o, cfg["vocab_size"])


@pytest.mark.parametrize("qk_norm", QK_NORM)
def test_attention_with_an_explicit_mask_is_the_references(qk_norm):
    torch.manual_seed(0)
    r = ref.GroupedQueryAttention(24, 4, 2, head_dim=6, qk_norm=qk_norm)
    o = ours.GroupedQueryAttention(24, 4, 2, head_dim=6, qk_norm=qk_norm)
    o.load_state_dict(r.state_dict())
    cos, sin = ref.compute_rope_params(6, 10_000, 16)
    x = torch.randn(2, 9, 24)
    causal = torch.triu(torch.ones(9, 9, dtype=torch.bool), diagonal=1)
    padded = causal[None, None].expand(2, 1, 9, 9).clone()
    padded[1, :, :, :3] = True  # row 1: three left-padding keys hidden
    padded[1, :, :3, 0] = False  # ...except one key for the padding queries themselves (no empty rows)
    with ops.use_backend("torch"):
        for mask in (causal, padded):
            assert torch.equal(o(x, mask, cos, sin), r(x, mask, cos, sin))
        assert torch.equal(o(x, None, cos, sin), r(x, causal, cos, sin))


# ----------------------------------------------------------------------------- RMSNorm and RoPE


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("qwen3_compatible", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_is_the_references(bias, qwen3_compatible, dtype):
    torch.manual_seed(0)
    r = ref.RMSNorm(24, eps=1e-5, bias=bias, qwen3_compatible=qwen3_compatible)
    o = ours.RMSNorm(24, eps=1e-5, bias=bias, qwen3_compatible=qwen3_compatible)
    assert list(o.state_dict()) == list(r.state_dict())
    with torch.no_grad():
        for p in r.parameters():
            p.normal_()
    o.load_state_dict(r.state_dict())
    x = (torch.randn(3, 5, 24) * 4).to(dtype)
    expected = r(x)
    with ops.use_backend("torch"):  # the oracle: the reference's numbers bit for bit
        assert torch.equal(o(x), expected)
    got = o(x)  # the default backend: the fused kernel where one serves
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, **({} if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)))
    # and it is a root-mean-square norm: unit RMS before scale/shift
    plain = ours.RMSNorm(24, eps=0.0)(x.float())
    torch.testing.assert_close(plain.pow(2).mean(-1), torch.ones(3, 5), atol=1e-5, rtol=0)


def test_rope_tables_and_rotation_are_the_references():
    cos, sin = ours.compute_rope_params(16, 1_000_000.0, 64)
    ref_cos, ref_sin = ref.compute_rope_params(16, 1_000_000.0, 64)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    x = torch.randn(2, 3, 7, 16).to(torch.bfloat16)
    assert torch.equal(ours.apply_rope(x, cos, sin), ref.apply_rope(x, cos, sin))


# ----------------------------------------------------------------------------- mixture of experts


def _moe_pair(cfg, tmp_path, seed=5):
    r, o = _pair(cfg)
    params = hub.load_safetensors_folder(write_checkpoint(random_hf_state_dict(o, seed=seed), tmp_path, shards=2))
    param_config = {"n_layers": cfg["n_layers"], "num_experts": cfg["num_experts"]}
    ref.load_weights_into_qwen(r, param_config, params)
    ours.load_weights_into_qwen(o, param_config, params)
    return r, o, params


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("qk_norm", QK_NORM)
def test_moe_logits_are_bitwise_the_references_with_the_torch_backend(tmp_path, qk_norm, dtype):
    cfg = tiny_cfg(2, qk_norm, dtype, num_experts=4)
    r, o, _ = _moe_pair(cfg, tmp_path)
    assert not any(p.is_meta for p in o.parameters())
    idx = torch.randint(0, cfg["vocab_size"], (2, 17))
    with torch.no_grad(), ops.use_backend("torch"):
        assert torch.equal(o(idx), r(idx))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_routed_experts_match_the_dense_reference_with_the_default_backend(tmp_path, dtype, tol):
    cfg = tiny_cfg(2, dtype=dtype, num_experts=6)
    r, o, _ = _moe_pair(cfg, tmp_path)
    if dtype == torch.float32:
        # Whole model in fp32 only: in bf16 a near-tie between two experts' router scores may
        # route a token differently after a last-bit difference upstream.
        idx = torch.randint(0, cfg["vocab_size"], (3, 21))
        with torch.no_grad(), ops.use_backend("auto"):
            torch.testing.assert_close(o(idx), r(idx), atol=tol, rtol=tol)
    # the mixture on its own: each token only runs its 2 routed experts of 6
    ff, x = o.trf_blocks[0].ff, torch.randn(2, 5, 32).to(dtype)
    calls = []
    original = ff.expert
    ff.expert = lambda e, h: calls.append(h.shape[0]) or original(e, h)
    with torch.no_grad(), ops.use_backend("auto"):
        routed = ff(x)
    assert sum(calls) == 2 * 10 and len(calls) <= 6
    with torch.no_grad(), ops.use_backend("torch"):
        torch.testing.assert_close(routed.float(), r.trf_blocks[0].ff(x).float(), atol=tol, rtol=tol)


def test_experts_without_tokens_get_zero_gradients_as_in_the_reference(tmp_path):
    """One token reaches 2 of 4 experts: the others' gradients are zeros, not None (AdamW skips a None)."""
    cfg = tiny_cfg(2, num_experts=4)
    r, o, _ = _moe_pair(cfg, tmp_path)
    idx = torch.randint(0, cfg["vocab_size"], (1, 1), generator=torch.Generator().manual_seed(2))
    r(idx).sum().backward()
    with ops.use_backend("auto"):
        o(idx).sum().backward()
    unrouted = 0
    for (name, p), q in zip(o.named_parameters(), r.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
        unrouted += ".fc1." in name and not q.grad.any()
    assert unrouted == 2 * cfg["n_layers"]


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_experts_wrapped_by_the_user_run(tmp_path, backend):
    from gptfast.appendix_e import LinearWithLoRA

    cfg = tiny_cfg(2, num_experts=4)
    _, o, _ = _moe_pair(cfg, tmp_path)
    ff = o.trf_blocks[0].ff
    plain = o(torch.tensor([[3, 4]]))
    torch.manual_seed(4)
    for e in range(cfg["num_experts"]):
        ff.fc1[e] = LinearWithLoRA(ff.fc1[e], rank=2, alpha=4)
        torch.nn.init.normal_(ff.fc1[e].lora.B)  # a low-rank update that changes the output
    with ops.use_backend("torch"):  # every expert on every token, each wrapper called as a module
        expected = o(torch.tensor([[3, 4]]))
    assert not torch.allclose(expected, plain)
    with ops.use_backend(backend):
        torch.testing.assert_close(o(torch.tensor([[3, 4]])), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_running_experts_before_loading_them_is_a_clear_error(backend):
    # Experts are created on the meta device; a real input times a meta weight gives
    # uninitialised memory (the reference returns such logits).  Ours refuses.
    cfg = tiny_cfg(2, num_experts=4)
    _, o = _pair(cfg)
    with pytest.raises(RuntimeError, match="load_weights_into_qwen"), ops.use_backend(backend):
        o(torch.randint(0, cfg["vocab_size"], (1, 5)))
    # shape inference with everything on the meta device still works
    ff = o.trf_blocks[0].ff.to("meta")
    with ops.use_backend(backend):
        assert ff(torch.empty(2, 3, 32, device="meta")).shape == (2, 3, 32)


# ----------------------------------------------------------------------------- weights


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("tie_embeddings", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("qk_norm", QK_NORM)
def test_safetensors_checkpoint_loads_like_the_reference(tmp_path, shards, tie_embeddings, qk_norm, capsys):
    cfg = tiny_cfg(2, qk_norm)
    r, o = _pair(cfg)
    params = random_hf_state_dict(o, seed=9, tie_embeddings=tie_embeddings)
    loaded = hub.load_safetensors_folder(write_checkpoint(params, tmp_path, shards))
    assert set(loaded) == set(params)
    ours.load_weights_into_qwen(o, {"n_layers": cfg["n_layers"], "hidden_dim": cfg["hidden_dim"]}, loaded)
    ref.load_weights_into_qwen(r, {"n_layers": cfg["n_layers"], "hidden_dim": cfg["hidden_dim"]}, loaded)
    assert capsys.readouterr().out.count("Model uses weight tying.") == (2 if tie_embeddings else 0)
    assert_loaded_like_the_reference(o, r, params, tie_embeddings, cfg["vocab_size"])


def test_loader_follows_the_model_when_param_config_says_num_experts_0():
    # The reference's own test config carries "num_experts": 0 for a dense model; the reference
    # loader then looks for a router.  Ours decides by the model's blocks.
    cfg = tiny_cfg(2)
    _, o = _pair(cfg)
    params = random_hf_state_dict(o, seed=1)
    ours.load_weights_into_qwen(o, cfg, params)
    assert torch.equal(o.trf_blocks[1].ff.fc2.weight, params["model.layers.1.mlp.up_proj.weight"])


def test_loader_names_the_missing_or_misshapen_tensor():
    cfg = tiny_cfg(2, num_experts=3)
    _, o = _pair(cfg)
    params = random_hf_state_dict(o, seed=2)
    missing = dict(params)
    del missing["model.layers.1.mlp.experts.2.down_proj.weight"]
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.experts\.2\.down_proj\.weight"):
        ours.load_weights_into_qwen(o, cfg, missing)
    wrong = dict(params)
    wrong["model.layers.0.self_attn.q_norm.weight"] = torch.ones(9)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_norm\.weight"):
        ours.load_weights_into_qwen(o, cfg, wrong)


# ----------------------------------------------------------------------------- downloads


class _FakeResponse(io.BytesIO):
    def __init__(self, body, length=None):
        super().__init__(body)
        self.headers = {"Content-Length": str(len(body) if length is None else length)}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_download_writes_the_file_once_and_reuses_it(tmp_path, monkeypatch, capsys):
    urls = []

    def fake_urlopen(url, timeout=None):
        urls.append(url)
        return _FakeResponse(b'{"hello": 1}')

    monkeypatch.setattr(hub.urllib.request, "urlopen", fake_urlopen)
    path = ours.download_from_huggingface("Qwen/Qwen3-0.6B", "tokenizer.json", str(tmp_path / "q"))
    assert urls == ["https://huggingface.co/Qwen/Qwen3-0.6B/resolve/main/tokenizer.json"]
    assert open(path, "rb").read() == b'{"hello": 1}'
    assert ours.download_from_huggingface("Qwen/Qwen3-0.6B", "tokenizer.json", str(tmp_path / "q")) == path
    assert len(urls) == 1 and "File already exists" in capsys.readouterr().out
    # the path as the reference spells it: local_dir joined with the filename, unnormalised
    monkeypatch.chdir(tmp_path)
    import llms_from_scratch.qwen3 as reference
    for local_dir in (".", "q/", str(tmp_path) + "//q"):
        ours.download_from_huggingface("Qwen/Qwen3-0.6B", "tokenizer.json", local_dir)  # there from now on
        capsys.readouterr()
        assert (ours.download_from_huggingface("Qwen/Qwen3-0.6B", "tokenizer.json", local_dir)
                == reference.download_from_huggingface("Qwen/Qwen3-0.6B", "tokenizer.json", local_dir))
        printed = capsys.readouterr().out.splitlines()
        assert printed[0] == printed[1], local_dir


def test_failed_download_names_the_url_and_leaves_no_file(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(hub.urllib.request, "urlopen", offline)
    with pytest.raises(OSError, match=r"https://huggingface.co/x/y/resolve/main/tokenizer.json.*no network"):
        ours.download_from_huggingface("x/y", "tokenizer.json", str(tmp_path))
    assert list(tmp_path.iterdir()) == []

    class Broken(_FakeResponse):
        def read(self, *args):
            raise ConnectionResetError("cut off")

    monkeypatch.setattr(hub.urllib.request, "urlopen", lambda url, timeout=None: Broken(b""))
    with pytest.raises(OSError, match="cut off"):
        ours.download_from_huggingface("x/y", "tokenizer.json", str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # no truncated file a later run would take for the real one


def test_a_refused_download_keeps_urllibs_error_types(tmp_path, monkeypatch):
    """Code written for the reference catches ``HTTPError`` (and reads its code) or ``URLError``."""
    def not_found(url, timeout=None):
        raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)

    monkeypatch.setattr(hub.urllib.request, "urlopen", not_found)
    with pytest.raises(urllib.error.HTTPError, match=r"resolve/main/tokenizer.json.*Not Found") as caught:
        ours.download_from_huggingface("x/y", "tokenizer.json", str(tmp_path))
    assert caught.value.code == 404 and caught.value.url.endswith("/x/y/resolve/main/tokenizer.json")
    monkeypatch.setattr(hub.urllib.request, "urlopen", lambda url, timeout=None: (_ for _ in ()).throw(
        urllib.error.URLError("no network")))
    with pytest.raises(urllib.error.URLError, match="no network"):
        ours.download_from_huggingface("x/y", "tokenizer.json", str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_a_cut_short_download_is_an_error_and_leaves_no_file(tmp_path, monkeypatch):
    """A server closing early reads as a normal end of data: the announced length tells it apart."""
    monkeypatch.setattr(hub.urllib.request, "urlopen", lambda url, timeout=None: _FakeResponse(b'{"hel', length=12))
    with pytest.raises(OSError, match="closed after 5 of 12 bytes"):
        ours.download_from_huggingface("x/y", "tokenizer.json", str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_a_download_waits_for_a_stalled_server_no_longer_than_the_gpt2_download(tmp_path, monkeypatch):
    timeouts = []

    def fake_urlopen(url, timeout=None):
        timeouts.append(timeout)
        return _FakeResponse(b"{}")

    monkeypatch.setattr(hub.urllib.request, "urlopen", fake_urlopen)
    ours.download_from_huggingface("x/y", "config.json", str(tmp_path))
    assert timeouts == [weights.DOWNLOAD_TIMEOUT_S] and 0 < weights.DOWNLOAD_TIMEOUT_S <= 60


def test_a_cut_short_chunked_download_is_the_named_download_error(tmp_path, monkeypatch):
    """A chunked body cut off mid-chunk raises http.client's IncompleteRead, which is no OSError."""
    class CutChunk(_FakeResponse):
        def read(self, *args):
            raise http.client.IncompleteRead(b"partial", 249)

    monkeypatch.setattr(hub.urllib.request, "urlopen", lambda url, timeout=None: CutChunk(b"", length=0))
    with pytest.raises(OSError, match=r"could not download https://huggingface.co/x/y/resolve/main/config.json"):
        ours.download_from_huggingface("x/y", "config.json", str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def _two_shards(folder, first, second, weight_map):
    folder.mkdir()
    save_file(first, str(folder / "a.safetensors"))
    save_file(second, str(folder / "b.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def test_each_tensor_comes_from_the_shard_the_index_names_and_from_no_other(tmp_path):
    names = {"x": "a.safetensors", "y": "b.safetensors"}
    stale = _two_shards(tmp_path / "stale", {"x": torch.ones(2)}, {"x": torch.zeros(2), "y": torch.ones(1)}, names)
    with pytest.raises(ValueError, match=r"tensor 'x' is in two shards, 'a.safetensors' and 'b.safetensors'"):
        hub.load_safetensors_folder(stale)
    moved = _two_shards(tmp_path / "moved", {"y": torch.ones(1)}, {"x": torch.ones(2)}, names)
    with pytest.raises(ValueError, match=r"puts tensor 'x' in 'a.safetensors', but it is in 'b.safetensors'"):
        hub.load_safetensors_folder(moved)
    good = _two_shards(tmp_path / "good", {"x": torch.ones(2)}, {"y": torch.zeros(1)}, names)
    loaded = hub.load_safetensors_folder(good)
    assert set(loaded) == {"x", "y"} and torch.equal(loaded["x"], torch.ones(2))


@pytest.mark.parametrize("index", ["[]", '{"weight_map": {"x": 3}}', '{"weight_map": {"x": null}}', "not json"])
def test_a_malformed_shard_index_is_a_value_error_naming_it(tmp_path, index):
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError, match=r"model.safetensors.index.json (has no 'weight_map'|is not a JSON file)"):
        hub.load_safetensors_folder(tmp_path)


def _hf_qwen3_config(folder, **change):
    """A tiny Qwen3 ``config.json`` (bf16, tied head) in ``folder``; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    hf = {"model_type": "qwen3", "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 8, "num_hidden_layers": 2, "intermediate_size": 48, "max_position_embeddings": 32,
          "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "vocab_size": 64, "tie_word_embeddings": True,
          "torch_dtype": "bfloat16", **change}
    (folder / "config.json").write_text(json.dumps(hf))
    return folder


def _hf_qwen3_weights(folder):
    """Random weights, under the Hub's names, for the model the folder's config.json describes."""
    with torch.device("meta"):
        model = ours.Qwen3Model(hf_folder.read_config(folder)[1])
    return random_hf_state_dict(model, tie_embeddings=True)


def test_a_quantized_checkpoint_is_refused_not_loaded_as_other_weights(tmp_path):
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    folder = _hf_qwen3_config(tmp_path / "fp8", quantization_config=fp8)
    with pytest.raises(ValueError, match=r"fp8.config\.json: quantization_config .*'fp8'.* is not supported"):
        hf_folder.read_config(folder)
    # float8 codes without a quantization_config: cast to bf16 they would be other numbers
    folder = _hf_qwen3_config(tmp_path / "codes")
    params = _hf_qwen3_weights(folder)
    name = "model.layers.0.self_attn.q_proj.weight"
    params[name] = params[name].to(torch.float8_e4m3fn)
    write_checkpoint(params, folder)
    with pytest.raises(ValueError, match=rf"tensor '{name}' has dtype torch.float8_e4m3fn"):
        hf_folder.load_model(folder)


def test_a_weight_the_requested_dtype_cannot_hold_is_refused_not_made_inf(tmp_path, capsys):
    folder = _hf_qwen3_config(tmp_path)
    params = _hf_qwen3_weights(folder)
    params["model.layers.0.mlp.down_proj.weight"][0, 0] = 1e5  # a bfloat16 holds it, a float16 does not
    write_checkpoint(params, folder)
    with pytest.raises(ValueError, match=r"trf_blocks.0.ff.fc3.weight has values too large for torch.float16"):
        hf_folder.load_model(folder, dtype=torch.float16)
    model, _, _ = hf_folder.load_model(folder)
    assert model.trf_blocks[0].ff.fc3.weight[0, 0].item() == 99840.0  # 1e5 in bfloat16


def test_file_names_cannot_lead_outside_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(hub.urllib.request, "urlopen", lambda url, timeout=None: _FakeResponse(b"{}"))
    with pytest.raises(ValueError, match="leads outside"):
        ours.download_from_huggingface("x/y", "../escaped.json", str(tmp_path / "sub"))
    assert not (tmp_path / "escaped.json").exists()
    path = ours.download_from_huggingface("x/y", "nested/tokenizer.json", str(tmp_path / "sub"))
    assert open(path, "rb").read() == b"{}"
    folder = write_checkpoint({"model.norm.weight": torch.ones(4)}, tmp_path / "ckpt", shards=1)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": "../outside.safetensors"}}))
    with pytest.raises(ValueError, match="leads outside"):
        hub.load_safetensors_folder(folder)
    # A Hugging Face cache snapshot: its shards are links into a sibling blobs folder, and that is fine.
    snapshot, blobs = tmp_path / "hf" / "snapshots" / "abc", tmp_path / "hf" / "blobs"
    write_checkpoint({"model.norm.weight": torch.arange(4.0), "lm_head.weight": torch.ones(2, 4)}, blobs, shards=2)
    snapshot.mkdir(parents=True)
    for entry in blobs.iterdir():
        (snapshot / entry.name).symlink_to(os.path.relpath(entry, snapshot))
    assert torch.equal(hub.load_safetensors_folder(snapshot)["model.norm.weight"], torch.arange(4.0))


def test_snapshot_download_returns_the_checkpoint_tensors(tmp_path, monkeypatch):
    params = {"model.norm.weight": torch.arange(4.0), "lm_head.weight": torch.ones(2, 4)}
    calls = []

    def snapshot_download(repo_id, local_dir):
        calls.append((repo_id, local_dir))
        return str(write_checkpoint(params, tmp_path / "snap", shards=2))

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    weights = ours.download_from_huggingface_from_snapshots("Qwen/Qwen3-0.6B", str(tmp_path / "snap"))
    assert calls == [("Qwen/Qwen3-0.6B", str(tmp_path / "snap"))]
    assert set(weights) == set(params) and all(torch.equal(weights[k], params[k]) for k in params)


# ----------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    return write_qwen3_tokenizer(tmp_path_factory.mktemp("qwen-tok") / "tokenizer.json",
                                 ["Give me a short introduction to large language models.",
                                  "user assistant think hello world"])


@pytest.mark.parametrize("repo_id", [None, "Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B-Base"])
@pytest.mark.parametrize("add_generation_prompt,add_thinking", [(False, False), (True, False), (True, True)])
def test_tokenizer_gives_the_references_ids(tokenizer_file, repo_id, add_generation_prompt, add_thinking):
    kwargs = dict(tokenizer_file_path=str(tokenizer_file), repo_id=repo_id,
                  add_generation_prompt=add_generation_prompt, add_thinking=add_thinking)
    mine, theirs = ours.Qwen3Tokenizer(**kwargs), ref.Qwen3Tokenizer(**kwargs)
    assert (mine.eos_token_id, mine.pad_token_id) == (theirs.eos_token_id, theirs.pad_token_id)
    assert mine._special_to_id == theirs._special_to_id and len(mine._special_to_id) == len(SPECIALS)
    for text in ["Give me a short introduction to large language models.", "hello <think>world</think>",
                 " <|im_end|> ", "<|im_start|>user\nhi<|im_end|>\n", ""]:
        for wrapped in (None, False, True):
            ids = mine.encode(text, chat_wrapped=wrapped)
            assert ids == theirs.encode(text, chat_wrapped=wrapped), (text, wrapped)
            assert mine.decode(ids) == theirs.decode(ids)
    expected_eos = "<|im_end|>" if repo_id and "Base" not in repo_id else "<|endoftext|>"
    assert mine.decode([mine.eos_token_id]) == expected_eos


def test_missing_tokenizer_file_is_a_clear_error(tmp_path):
    pytest.importorskip("tokenizers")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        ours.Qwen3Tokenizer(str(tmp_path / "tokenizer.json"))


def test_tokenizer_without_the_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install tokenizers"):
        ours.Qwen3Tokenizer(str(tmp_path / "tokenizer.json"))


# ----------------------------------------------------------------------------- bad input


def test_bad_head_counts_and_expert_counts_are_value_errors_naming_the_argument():
    with pytest.raises(ValueError, match="num_heads.*num_kv_groups"):
        ours.GroupedQueryAttention(32, 4, 3)
    with pytest.raises(ValueError, match="d_in.*num_heads"):
        ours.GroupedQueryAttention(30, 4, 2)
    with pytest.raises(ValueError, match="num_heads.*num_kv_groups"):
        ours.Qwen3Model(tiny_cfg(3))
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        ours.Qwen3Model(tiny_cfg(2, num_experts=1))
    with pytest.raises(ValueError, match="head_dim must be even"):
        ours.compute_rope_params(7)


def test_bad_token_ids_are_clear_errors():
    cfg = tiny_cfg(2)
    _, o = _pair(cfg)
    with pytest.raises(ValueError, match="context_length 48"):
        o(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="token id 101"):
        o(torch.tensor([[101]]))


def test_token_ids_of_an_embedding_grown_for_added_tokens_are_looked_up_as_in_the_reference():
    """Ids are checked against the embedding's rows, not the config's vocabulary: a model whose embedding and head
    were grown (tokens added for fine-tuning, the config left as built) takes the new ids, as the reference does."""
    import llms_from_scratch.kv_cache.qwen3 as ref_cached
    import gptfast.kv_cache.qwen3 as ours_cached

    cfg = tiny_cfg(2)
    for ref_module, our_module in ((ref, ours), (ref_cached, ours_cached)):
        r, o = seeded_pair(ref_module, our_module, "Qwen3Model", cfg, 123)
        for model in (r, o):
            torch.manual_seed(4)
            model.tok_emb = torch.nn.Embedding(cfg["vocab_size"] + 10, cfg["emb_dim"])
            model.out_head = torch.nn.Linear(cfg["emb_dim"], cfg["vocab_size"] + 10, bias=False)
        idx = torch.tensor([[1, cfg["vocab_size"] + 5]])
        with ops.use_backend("torch"):
            assert torch.equal(o(idx), r(idx))
        with pytest.raises(ValueError, match=f"token id {cfg['vocab_size'] + 10}"):
            o(torch.tensor([[cfg["vocab_size"] + 10]]))


def test_model_compiles_as_one_graph_with_the_same_logits():
    # The reference's README quotes torch.compile speeds: the drop-in must compile without graph breaks.
    cfg = tiny_cfg(2)
    _, o = _pair(cfg)
    idx = torch.randint(0, cfg["vocab_size"], (2, 9))
    torch._dynamo.reset()
    with torch.no_grad(), ops.use_backend("torch"):
        compiled = torch.compile(o, backend="eager", fullgraph=True)
        assert torch.equal(compiled(idx), o(idx))


@pytest.mark.parametrize("config,total,without_embedding", [("QWEN_CONFIG_06_B", 751_632_384, 596_049_920),
                                                            ("QWEN3_CONFIG_1_7B", None, None)])
def test_real_configs_have_the_references_parameter_count(config, total, without_embedding):
    # Qwen3-0.6B: the figures the book's notebook prints
    assert_parameter_count(ours, ref, "Qwen3Model", config, total, without_embedding)


def test_a_block_of_the_references_own_class_gets_the_mask_it_needs():
    cfg = tiny_cfg()
    r, o = _pair(cfg)
    assert_blocks_of_the_users_get_the_references_mask(ref, r, o, cfg)


@pytest.mark.parametrize("num_experts", [0, 4], ids=["dense", "moe"])
def test_an_empty_input_gives_empty_logits_as_in_the_reference(num_experts):
    cfg = tiny_cfg(2, num_experts=num_experts)
    r, o = _pair(cfg)
    for shape in ((2, 0), (0, 5)):
        idx = torch.zeros(shape, dtype=torch.long)
        with torch.no_grad():
            assert o.eval()(idx).shape == r.eval()(idx).shape == (*shape, cfg["vocab_size"])
    if num_experts:
        return  # (the reference's experts stay on the meta device until weights are loaded: no backward there)
    # Trained on it, every parameter gets a (zero) gradient in both, not none: an optimizer would skip those.
    for model in (r, o):
        model.train()(torch.zeros((2, 0), dtype=torch.long)).sum().backward()
    assert [p.grad is None for p in o.parameters()] == [p.grad is None for p in r.parameters()]
