"""Tokenizer, datasets, GPT-2 weight loading (OpenAI params dict, TF checkpoint reader, HF safetensors), checkpoints."""

import sys
import types
import urllib.error

import numpy as np
import pytest
import torch

from gptfast import weights
from gptfast.data import GPTDatasetV1, create_dataloader_v1, load_text
from gptfast.models import GPTModel
from gptfast.resources import default_text
from gptfast.tokenizer import get_tokenizer
from gptfast.training.checkpoints import load_checkpoint, save_checkpoint

ref_ch04 = pytest.importorskip("llms_from_scratch.ch04")
import llms_from_scratch.ch05 as ref_ch05  # noqa: E402

CFG = {"vocab_size": 300, "context_length": 16, "emb_dim": 24, "n_heads": 3, "n_layers": 2, "drop_rate": 0.0,
       "qkv_bias": True}


def test_the_seed_chapter_token_figures():
    tok = get_tokenizer()
    assert tok.encode("Every effort moves you") == [6109, 3626, 6100, 345]
    text = default_text()
    assert len(text) == 20_479
    assert len(tok.encode(text)) == 5_145


def test_offline_tokenizer_equals_tiktoken_gpt2():
    import tiktoken

    reference = tiktoken.get_encoding("gpt2")  # reads TIKTOKEN_CACHE_DIR (set by conftest)
    ours = get_tokenizer()
    samples = [default_text(), "Hello, do you like tea? <|endoftext|> In the sunlit terraces", "naïve café 😀  \n\t x"]
    for s in samples:
        assert ours.encode(s, allowed_special="all") == reference.encode(s, allowed_special="all")
    assert ours.n_vocab == reference.n_vocab == 50257
    assert ours.decode(ours.encode(samples[2])) == samples[2]


def test_dataset_windows_and_too_short_text():
    tok = get_tokenizer()
    ds = GPTDatasetV1(default_text(), tok, max_length=4, stride=1)
    x, y = ds[0]
    assert x.tolist() == tok.encode(default_text())[:4] and torch.equal(y[:-1], x[1:])
    assert len(ds) == 5_145 - 4
    with pytest.raises(ValueError, match="too short for one window"):
        create_dataloader_v1("only a few words", max_length=256)
    with pytest.raises(ValueError, match="max_length and stride"):
        GPTDatasetV1("text", tok, max_length=0, stride=1)


def test_load_text_errors_on_a_missing_file(tmp_path):
    assert load_text(None) == default_text()
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_text(tmp_path / "missing.txt")


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
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_load_weights_into_gpt_equals_the_reference_loader():
    params = _openai_params(CFG)
    ours = GPTModel(CFG)
    ref = ref_ch04.GPTModel(CFG)
    weights.load_weights_into_gpt(ours, params)
    ref_ch05.load_weights_into_gpt(ref, params)
    _assert_same_weights(ours, ref)
    assert torch.equal(ours.out_head.weight, torch.from_numpy(params["wte"]))


def test_assign_checks_shapes():
    with pytest.raises(ValueError, match="Shape mismatch"):
        weights.assign(torch.zeros(2, 3), np.zeros((3, 2)))
    p = weights.assign(torch.zeros(2, 3, dtype=torch.bfloat16), np.ones((2, 3), dtype=np.float32))
    assert isinstance(p, torch.nn.Parameter) and p.dtype == torch.bfloat16


def test_load_weights_rejects_a_wrong_number_of_blocks():
    with pytest.raises(ValueError, match="blocks"):
        weights.load_weights_into_gpt(GPTModel({**CFG, "n_layers": 3}), _openai_params(CFG))


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


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_hugging_face_safetensors_load_like_the_openai_params(tmp_path, prefix):
    from safetensors.torch import save_file

    params = _openai_params(CFG, seed=3)
    save_file(_hf_state_dict(params, prefix), str(tmp_path / "model.safetensors"))
    from_hf = weights.load_hf_gpt2_into_gpt(GPTModel(CFG), tmp_path)  # folder form
    from_params = GPTModel(CFG)
    weights.load_weights_into_gpt(from_params, params)
    _assert_same_weights(from_hf, from_params)


def test_safetensors_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="safetensors file not found"):
        weights.load_hf_gpt2_into_gpt(GPTModel(CFG), tmp_path / "nope.safetensors")
    sd = _hf_state_dict(_openai_params(CFG))
    del sd["h.1.mlp.c_fc.bias"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="h.1.mlp.c_fc.bias"):
        weights.load_hf_gpt2_into_gpt(GPTModel(CFG), tmp_path / "model.safetensors")


def _fake_tensorflow(variables):
    """A stand-in for the two tf.train functions the checkpoint reader uses (TensorFlow is not installed here)."""
    tf = types.ModuleType("tensorflow")
    tf.train = types.SimpleNamespace(
        list_variables=lambda path: [(name, list(v.shape)) for name, v in variables.items()],
        load_variable=lambda path, name: variables[name],
        latest_checkpoint=lambda folder: f"{folder}/model.ckpt",
    )
    return tf


def test_tf_checkpoint_reader_builds_the_params_dict(monkeypatch):
    params = _openai_params(CFG, seed=5)
    # OpenAI's variable names; TF stores weights with a leading singleton axis that the reader squeezes.
    variables = {"model/wte": params["wte"], "model/wpe": params["wpe"], "model/ln_f/g": params["g"],
                 "model/ln_f/b": params["b"]}
    for i, blk in enumerate(params["blocks"]):
        for path, leaf in (("attn/c_attn", blk["attn"]["c_attn"]), ("attn/c_proj", blk["attn"]["c_proj"]),
                           ("mlp/c_fc", blk["mlp"]["c_fc"]), ("mlp/c_proj", blk["mlp"]["c_proj"]),
                           ("ln_1", blk["ln_1"]), ("ln_2", blk["ln_2"])):
            for key, value in leaf.items():
                variables[f"model/h{i}/{path}/{key}"] = value[None]
    monkeypatch.setitem(sys.modules, "tensorflow", _fake_tensorflow(variables))
    loaded = weights.load_gpt2_params_from_tf_ckpt("ckpt", {"n_layer": CFG["n_layers"]})
    assert set(loaded) == {"blocks", "wte", "wpe", "g", "b"}  # ln_f/g lands at the top level, as in the book
    a, b = GPTModel(CFG), GPTModel(CFG)
    weights.load_weights_into_gpt(a, loaded)
    weights.load_weights_into_gpt(b, params)
    _assert_same_weights(a, b)


def test_missing_tensorflow_gives_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(ImportError, match="needs TensorFlow"):
        weights.load_gpt2_params_from_tf_ckpt("ckpt", {"n_layer": 1})


def test_download_offline_raises_connection_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(weights.urllib.request, "urlopen", offline)
    with pytest.raises(ConnectionError, match="could not download checkpoint"):
        weights.download_and_load_gpt2("124M", tmp_path)
    with pytest.raises(ValueError, match="Model size"):
        weights.download_and_load_gpt2("125M", tmp_path)


def test_download_uses_files_already_present(tmp_path, monkeypatch):
    folder = tmp_path / "124M"
    folder.mkdir()
    for name in weights.GPT2_FILES:
        (folder / name).write_text("{}" if name == "hparams.json" else "x")
    monkeypatch.setattr(weights.urllib.request, "urlopen", lambda *a, **k: pytest.fail("must not download"))
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(ImportError, match="needs TensorFlow"):
        weights.download_and_load_gpt2("124M", tmp_path)


def test_checkpoint_round_trip_in_the_reference_format(tmp_path):
    torch.manual_seed(0)
    model = GPTModel(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 300, (1, 5))).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "ckpt.pth", model, opt, config=CFG)
    raw = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    assert {"model_state_dict", "optimizer_state_dict", "config"} <= set(raw)

    ref = ref_ch04.GPTModel(CFG)
    ref.load_state_dict(raw["model_state_dict"], strict=True)  # the reference reads it as it reads its own
    restored = GPTModel(CFG)
    opt2 = torch.optim.AdamW(restored.parameters(), lr=1e-3)
    load_checkpoint(tmp_path / "ckpt.pth", restored, opt2)
    _assert_same_weights(restored, model)
    assert opt2.state_dict()["state"][0]["step"] == 1

    torch.save(ref.state_dict(), tmp_path / "bare.pth")  # a bare state_dict, as the book saves model.pth
    load_checkpoint(tmp_path / "bare.pth", GPTModel(CFG))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pth", GPTModel(CFG))
    save_checkpoint(tmp_path / "c.pth", GPTModel(CFG))
    with pytest.raises(ValueError, match="does not match the model"):
        load_checkpoint(tmp_path / "c.pth", GPTModel({**CFG, "emb_dim": 12}))
    with pytest.raises(ValueError, match="no optimizer state"):
        model = GPTModel(CFG)
        load_checkpoint(tmp_path / "c.pth", model, torch.optim.AdamW(model.parameters()))
