"""``gptfast generate`` on a Hugging Face Llama 3 / Qwen3 folder: config.json read into the book's config,
the weights through the book's loaders, the book's tokenizers and chat templates, and the text the
reference generates from the same folder."""

from __future__ import annotations

import base64
import json

import pytest
import torch

from gptfast.cli import main
from gptfast.models import hf_folder
from hf_checkpoints import random_hf_state_dict, write_checkpoint, write_qwen3_tokenizer

ref_ch05 = pytest.importorskip("llms_from_scratch.ch05", reason="llms-from-scratch is a test dependency")
ref_qwen3 = pytest.importorskip("llms_from_scratch.qwen3", reason="llms-from-scratch is a test dependency")
ref_llama3 = pytest.importorskip("llms_from_scratch.llama3", reason="llms-from-scratch is a test dependency")
import gptfast.llama3 as our_llama3  # noqa: E402
import gptfast.qwen3 as our_qwen3  # noqa: E402

# The real config.json of Qwen/Qwen3-0.6B and meta-llama/Llama-3.2-1B, as the Hub serves them.
QWEN3_06B_CONFIG_JSON = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
    "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28,
    "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936}
LLAMA32_1B_CONFIG_JSON = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256}
QWEN3_MOE_CONFIG_JSON = {
    "model_type": "qwen3_moe", "hidden_size": 2048, "num_attention_heads": 32, "num_hidden_layers": 48,
    "num_key_value_heads": 4, "head_dim": 128, "max_position_embeddings": 262144, "rope_theta": 10000000,
    "rms_norm_eps": 1e-06, "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
    "intermediate_size": 6144, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
    "hidden_act": "silu", "torch_dtype": "bfloat16", "vocab_size": 151936, "tie_word_embeddings": False}


def _write_config(folder, config):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.mark.parametrize("config_json, expected", [
    (QWEN3_06B_CONFIG_JSON, ("qwen3", our_qwen3.QWEN_CONFIG_06_B)),
    (LLAMA32_1B_CONFIG_JSON, ("llama3", our_llama3.LLAMA32_CONFIG_1B)),
    (QWEN3_MOE_CONFIG_JSON, ("qwen3", our_qwen3.QWEN3_CONFIG_30B_A3B)),
], ids=["qwen3-0.6b", "llama3.2-1b", "qwen3-30b-a3b"])
def test_a_real_config_json_reads_as_the_books_config(tmp_path, config_json, expected):
    family, cfg = hf_folder.read_config(_write_config(tmp_path, config_json))
    assert (family, cfg) == expected


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mistral"}, "model_type 'mistral'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"rms_norm_eps": 1e-5}, "rms_norm_eps"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling"),
    ({"hidden_size": "1024"}, "'hidden_size' must be a positive integer"),
    ({"num_hidden_layers": None}, "'num_hidden_layers' must be a positive integer"),
    ({"num_hidden_layers": -1}, "'num_hidden_layers' must be a positive integer, got -1"),
    ({"rope_theta": 0}, "'rope_theta' must be a positive number"),
    ({"use_sliding_window": True}, "sliding-window"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding-window"),
    ({"torch_dtype": "int8"}, "torch_dtype 'int8'"),
], ids=["model-type", "bias", "activation", "eps", "rope-scaling", "string", "null", "negative", "zero-theta",
        "sliding-window", "sliding-layers", "dtype"])
def test_a_config_the_books_models_would_compute_differently_is_refused(tmp_path, change, message):
    config = {**QWEN3_06B_CONFIG_JSON, **change}
    with pytest.raises(ValueError, match=message):
        hf_folder.read_config(_write_config(tmp_path, config))


@pytest.mark.parametrize("change, message", [
    ({"head_dim": 128}, "head_dim 128"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "not Llama 3's"),
    ({"mlp_bias": True}, "mlp_bias"),
], ids=["head-dim", "rope-scaling", "mlp-bias"])
def test_llama_settings_the_book_does_not_have_are_refused(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        hf_folder.read_config(_write_config(tmp_path, {**LLAMA32_1B_CONFIG_JSON, **change}))


@pytest.mark.parametrize("change, message", [({"mlp_only_layers": [0]}, "mlp_only_layers"),
                                             ({"decoder_sparse_step": 2}, "decoder_sparse_step"),
                                             ({"norm_topk_prob": False}, "norm_topk_prob is False"),
                                             ({"norm_topk_prob": None}, "norm_topk_prob is None"),
                                             ({"num_experts": 0}, "'num_experts' must be a positive integer")])
def test_mixtures_other_than_the_books_are_refused(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        hf_folder.read_config(_write_config(tmp_path, {**QWEN3_MOE_CONFIG_JSON, **change}))


def test_a_mixture_config_without_norm_topk_prob_is_refused_as_hugging_faces_default_is_false(tmp_path):
    config = {k: v for k, v in QWEN3_MOE_CONFIG_JSON.items() if k != "norm_topk_prob"}
    with pytest.raises(ValueError, match=r"norm_topk_prob is unset \(false\)"):
        hf_folder.read_config(_write_config(tmp_path, config))


def test_llama_without_rope_scaling_reads_as_no_frequency_scaling(tmp_path):
    _, cfg = hf_folder.read_config(_write_config(tmp_path, {**LLAMA32_1B_CONFIG_JSON, "rope_scaling": None}))
    assert cfg["rope_freq"] is None


def _as_transformers_5(config_json):
    """``config_json`` as transformers 5 writes it: theta and scaling in one ``rope_parameters`` dict."""
    config = {k: v for k, v in config_json.items() if k not in ("rope_theta", "rope_scaling")}
    config["rope_parameters"] = {**(config_json.get("rope_scaling") or {"rope_type": "default"}),
                                 "rope_theta": config_json["rope_theta"]}
    return config


@pytest.mark.parametrize("config_json", [QWEN3_06B_CONFIG_JSON, LLAMA32_1B_CONFIG_JSON, QWEN3_MOE_CONFIG_JSON],
                         ids=["qwen3-0.6b", "llama3.2-1b", "qwen3-30b-a3b"])
def test_a_transformers_5_config_reads_as_the_transformers_4_one(tmp_path, config_json):
    """Read as missing, Llama 3's frequency scaling would go and every position past the first would rotate
    differently."""
    expected = hf_folder.read_config(_write_config(tmp_path / "v4", config_json))
    assert hf_folder.read_config(_write_config(tmp_path / "v5", _as_transformers_5(config_json))) == expected
    both = {**config_json, "rope_parameters": _as_transformers_5(config_json)["rope_parameters"]}
    assert hf_folder.read_config(_write_config(tmp_path / "both", both)) == expected


@pytest.mark.parametrize("case, message", [
    ("other-theta", "disagree with rope_parameters"),
    ("other-factor", "disagree with rope_parameters"),
    ("scaling-dropped", "disagree with rope_parameters"),
    ("per-layer-type", "one dict with a 'rope_theta'"),
    ("linear", "not Llama 3's"),
])
def test_rope_parameters_that_disagree_or_the_book_has_not_are_refused(tmp_path, case, message):
    v5 = _as_transformers_5(LLAMA32_1B_CONFIG_JSON)
    params = v5["rope_parameters"]
    config = {
        "other-theta": {**LLAMA32_1B_CONFIG_JSON, "rope_parameters": {**params, "rope_theta": 10000.0}},
        "other-factor": {**LLAMA32_1B_CONFIG_JSON, "rope_parameters": {**params, "factor": 8.0}},
        "scaling-dropped": {**LLAMA32_1B_CONFIG_JSON, "rope_parameters": {"rope_type": "default",
                                                                         "rope_theta": 500000.0}},
        "per-layer-type": {**v5, "rope_parameters": {"full_attention": params}},
        "linear": {**v5, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}},
    }[case]
    with pytest.raises(ValueError, match=message):
        hf_folder.read_config(_write_config(tmp_path, config))
    qwen = _as_transformers_5(QWEN3_06B_CONFIG_JSON)
    qwen["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}
    with pytest.raises(ValueError, match="not supported for Qwen3"):
        hf_folder.read_config(_write_config(tmp_path / "qwen", qwen))


# ----------------------------------------------------------------------------- tiny folders, end to end

QWEN_VOCAB = 420  # the model's rows: the tokenizer's 400 and some it never spells


def _qwen_tokenizer(path):
    write_qwen3_tokenizer(path, ["Every effort moves you forward, hello world.", "user assistant think tell me a story"])


def _qwen_hf_config(**change):
    return {**QWEN3_06B_CONFIG_JSON, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64,
            "vocab_size": QWEN_VOCAB, "torch_dtype": "float32", **change}


def _qwen_folder(root, *, tie=False, dtype=torch.float32, shards=1, seed=0):
    """A tiny Qwen3 folder: config.json, random weights in the Hub's layout and a trained tokenizer.json."""
    folder = _write_config(root, _qwen_hf_config(tie_word_embeddings=tie, torch_dtype=str(dtype).split(".")[1]))
    _, cfg = hf_folder.read_config(folder)
    params = random_hf_state_dict(our_qwen3.Qwen3Model(cfg), seed=seed, tie_embeddings=tie)
    write_checkpoint(params, folder, shards=shards)
    _qwen_tokenizer(folder / "tokenizer.json")
    return folder


def _reference_text(family, folder, prompt_ids, max_new_tokens, eos_id, dtype=None):
    """The new tokens the reference's model, loaded from ``folder`` by its own loader, generates greedily."""
    _, cfg = hf_folder.read_config(folder)
    if dtype is not None:
        cfg["dtype"] = dtype
    module = ref_qwen3 if family == "qwen3" else ref_llama3
    model = (module.Qwen3Model if family == "qwen3" else module.Llama3Model)(cfg)
    loader = module.load_weights_into_qwen if family == "qwen3" else module.load_weights_into_llama
    loader(model, cfg, hf_folder.load_safetensors_folder(folder))
    model.to(cfg["dtype"])  # the reference's loaders copy the checkpoint's tensors as they are
    idx = torch.tensor([prompt_ids])
    out = ref_ch05.generate(model.eval(), idx, max_new_tokens, cfg["context_length"], eos_id=eos_id)
    return out[0, idx.shape[1]:].tolist()


def _generate(capsys, folder, prompt, *flags):
    capsys.readouterr()  # what the reference's loader printed is not the command's
    assert main(["generate", "--safetensors", str(folder), "--prompt", prompt, *flags]) == 0
    out, err = capsys.readouterr()
    return out, err


@pytest.mark.parametrize("backend", ["torch", None])
@pytest.mark.parametrize("tie, shards", [(False, 1), (True, 2)], ids=["untied", "tied-sharded"])
def test_qwen3_folder_generates_the_references_text(tmp_path, capsys, backend, tie, shards):
    folder = _qwen_folder(tmp_path, tie=tie, shards=shards)
    prompt = "Every effort moves you"
    tokenizer = ref_qwen3.Qwen3Tokenizer(str(folder / "tokenizer.json"), apply_chat_template=False)
    ids = tokenizer.encode(prompt)
    expected = _reference_text("qwen3", folder, ids, 12, tokenizer.eos_token_id)
    out, err = _generate(capsys, folder, prompt, "--max-new-tokens", "12",
                         *(["--backend", backend] if backend else []))
    assert out == prompt + tokenizer.decode(expected) + "\n"
    assert ("Model uses weight tying." in err) == tie  # the loader's line stays off the streamed text
    if shards == 1:  # a weights file inside the folder reads the folder
        again, _ = _generate(capsys, folder / "model.safetensors", prompt, "--max-new-tokens", "12",
                             *(["--backend", backend] if backend else []))
        assert again == out


def test_qwen3_chat_wraps_the_prompt_and_stops_at_the_end_of_the_reply(tmp_path, capsys):
    folder = _qwen_folder(tmp_path)
    tokenizer = ref_qwen3.Qwen3Tokenizer(str(folder / "tokenizer.json"), apply_chat_template=True,
                                         add_generation_prompt=True)
    ids = tokenizer.encode("tell me a story")
    end = tokenizer._special_to_id["<|im_end|>"]
    first = _reference_text("qwen3", folder, ids, 1, None)[0]
    # Give <|im_end|> twice the head row of the reply's first token: the reply then ends before it starts.
    params = hf_folder.load_safetensors_folder(folder)
    params["lm_head.weight"][end] = 2 * params["lm_head.weight"][first]
    write_checkpoint(params, folder)
    assert _reference_text("qwen3", folder, ids, 5, end) == []
    out, _ = _generate(capsys, folder, "tell me a story", "--chat", "--max-new-tokens", "5", "--backend", "torch")
    assert out == "tell me a story\n\n"
    # Without --chat the same weights go on past <|im_end|> (no template, another end token).
    out, _ = _generate(capsys, folder, "tell me a story", "--max-new-tokens", "5", "--backend", "torch")
    plain = ref_qwen3.Qwen3Tokenizer(str(folder / "tokenizer.json"), apply_chat_template=False)
    expected = _reference_text("qwen3", folder, plain.encode("tell me a story"), 5, plain.eos_token_id)
    assert out == "tell me a story" + plain.decode(expected) + "\n" and expected


def test_qwen3_chat_prompt_ids_are_the_references(tmp_path):
    folder = _qwen_folder(tmp_path)
    ours = hf_folder.load_tokenizer("qwen3", folder / "tokenizer.json", chat=True)
    theirs = ref_qwen3.Qwen3Tokenizer(str(folder / "tokenizer.json"), apply_chat_template=True,
                                      add_generation_prompt=True)
    assert ours.encode("tell me a story") == theirs.encode("tell me a story")
    assert ours.eos_id == theirs._special_to_id["<|im_end|>"]
    assert hf_folder.load_tokenizer("qwen3", folder / "tokenizer.json").eos_id == theirs._special_to_id["<|endoftext|>"]


def test_a_bf16_checkpoint_loads_in_the_dtypes_a_model_built_from_its_config_has(tmp_path, capsys):
    folder = _qwen_folder(tmp_path, dtype=torch.bfloat16)
    _, cfg = hf_folder.read_config(folder)
    assert cfg["dtype"] == torch.bfloat16
    model, _, _ = hf_folder.load_model(folder)
    built = our_qwen3.Qwen3Model(cfg)
    assert {n: p.dtype for n, p in model.named_parameters()} == {n: p.dtype for n, p in built.named_parameters()}
    assert model.trf_blocks[0].norm1.scale.dtype == torch.float32  # the book keeps norm scales in float32
    as_fp32, _, _ = hf_folder.load_model(folder, dtype=torch.float32)
    assert {p.dtype for p in as_fp32.parameters()} == {torch.float32}
    params = hf_folder.load_safetensors_folder(folder)
    assert torch.equal(as_fp32.out_head.weight, params["lm_head.weight"].float())
    # --dtype float32 on the bf16 checkpoint gives the reference's float32 text.
    tokenizer = ref_qwen3.Qwen3Tokenizer(str(folder / "tokenizer.json"), apply_chat_template=False)
    expected = _reference_text("qwen3", folder, tokenizer.encode("hello world"), 8, tokenizer.eos_token_id,
                               dtype=torch.float32)
    out, _ = _generate(capsys, folder, "hello world", "--dtype", "float32", "--max-new-tokens", "8",
                       "--backend", "torch")
    assert out == "hello world" + tokenizer.decode(expected) + "\n"
    # The checkpoint's own bf16 streams too.
    out, _ = _generate(capsys, folder, "hello world", "--max-new-tokens", "4")
    assert out.startswith("hello world") and out.endswith("\n")


def test_qwen3_mixture_of_experts_folder_generates_the_references_text(tmp_path, capsys):
    config = {**QWEN3_MOE_CONFIG_JSON, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64, "num_experts": 4,
              "num_experts_per_tok": 2, "moe_intermediate_size": 24, "vocab_size": QWEN_VOCAB,
              "torch_dtype": "float32"}
    folder = _write_config(tmp_path, config)
    _, cfg = hf_folder.read_config(folder)
    write_checkpoint(random_hf_state_dict(our_qwen3.Qwen3Model(cfg), seed=3), folder)
    _qwen_tokenizer(folder / "tokenizer.json")
    tokenizer = ref_qwen3.Qwen3Tokenizer(str(folder / "tokenizer.json"), apply_chat_template=False)
    expected = _reference_text("qwen3", folder, tokenizer.encode("hello world"), 8, tokenizer.eos_token_id)
    out, _ = _generate(capsys, folder, "hello world", "--max-new-tokens", "8", "--backend", "torch")
    assert out == "hello world" + tokenizer.decode(expected) + "\n"


# Llama 3: Meta's tiktoken file; the tiny one spells every byte and a few merges (ids 0-265).
LLAMA_MERGES = [b"ll", b"he", b"hell", b"hello", b" w", b"or", b" wor", b"ld", b" world", b"\n\n"]
LLAMA_TEXT_IDS = 256 + len(LLAMA_MERGES)


def _llama_folder(root, *, chat_end_first=False, spelled_only=True, vocab_size=None):
    """A tiny Llama 3 folder (tied head, as Llama-3.2-1B) whose token rows past the tiny tokenizer's are zero, so
    greedy decoding stays on ids the tokenizer can spell (with ``spelled_only``)."""
    config = {**LLAMA32_1B_CONFIG_JSON, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64,
              "torch_dtype": "float32",
              "rope_scaling": {**LLAMA32_1B_CONFIG_JSON["rope_scaling"], "original_max_position_embeddings": 16},
              **({"vocab_size": vocab_size} if vocab_size else {})}
    folder = _write_config(root, config)
    _, cfg = hf_folder.read_config(folder)
    params = random_hf_state_dict(our_llama3.Llama3Model(cfg), seed=1, tie_embeddings=True)
    if spelled_only:
        params["model.embed_tokens.weight"][LLAMA_TEXT_IDS:] = 0
    write_checkpoint(params, folder)
    tokens = [bytes([i]) for i in range(256)] + LLAMA_MERGES
    (folder / "original").mkdir()
    (folder / "original" / "tokenizer.model").write_bytes(
        b"".join(base64.b64encode(t) + b" " + str(i).encode() + b"\n" for i, t in enumerate(tokens)))
    return folder


@pytest.fixture
def tiktoken_cache(tmp_path, monkeypatch):
    # tiktoken's loader would copy the file into its cache folder: keep that inside the test's folder.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))


@pytest.mark.parametrize("chat", [False, True], ids=["base", "chat"])
def test_llama3_folder_generates_the_references_text(tmp_path, capsys, tiktoken_cache, chat):
    folder = _llama_folder(tmp_path / "model")
    tokenizer = ref_llama3.Llama3Tokenizer(str(folder / "original" / "tokenizer.model"))
    prompt = "hello world"
    ids = ref_llama3.ChatFormat(tokenizer).encode(prompt) if chat else tokenizer.encode(prompt, bos=True)
    end = tokenizer.special["<|eot_id|>" if chat else "<|end_of_text|>"]
    assert ids[0] == tokenizer.special["<|begin_of_text|>"]
    expected = _reference_text("llama3", folder, ids, 10, end)
    assert expected and max(expected) < LLAMA_TEXT_IDS
    out, err = _generate(capsys, folder, prompt, "--max-new-tokens", "10", "--backend", "torch",
                         *(["--chat"] if chat else []))
    assert out == prompt + ("\n" if chat else "") + tokenizer.decode(expected) + "\n"
    assert "Model uses weight tying." in err


# ----------------------------------------------------------------------------- one-line errors


def _error(capsys, *argv):
    capsys.readouterr()
    assert main(["generate", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("gptfast generate: error: ")
    return err


def test_a_missing_tokenizer_is_one_line_naming_the_file(tmp_path, capsys):
    folder = _qwen_folder(tmp_path)
    (folder / "tokenizer.json").unlink()
    assert "tokenizer.json" in _error(capsys, "--safetensors", str(folder))
    other = tmp_path / "elsewhere.json"
    assert "elsewhere.json" in _error(capsys, "--safetensors", str(folder), "--tokenizer", str(other))


def test_llama_tokenizer_is_looked_up_where_the_hub_puts_it(tmp_path, capsys, tiktoken_cache):
    folder = _llama_folder(tmp_path / "model")
    moved = folder / "tokenizer.model"
    (folder / "original" / "tokenizer.model").rename(moved)
    assert hf_folder.default_tokenizer_path(folder, "llama3") == moved
    out, _ = _generate(capsys, folder, "hello", "--max-new-tokens", "2")
    assert out.startswith("hello")
    moved.unlink()
    assert "original/tokenizer.model" in _error(capsys, "--safetensors", str(folder))


def test_a_checkpoint_missing_a_tensor_is_one_line_naming_it(tmp_path, capsys):
    folder = _qwen_folder(tmp_path)
    params = hf_folder.load_safetensors_folder(folder)
    del params["model.layers.1.mlp.down_proj.weight"]
    write_checkpoint(params, folder)
    assert "model.layers.1.mlp.down_proj.weight" in _error(capsys, "--safetensors", str(folder))


def test_a_prompt_or_top_k_the_config_cannot_take_is_one_line_before_the_weights_load(tmp_path, capsys):
    """Limits config.json states (context, vocabulary) are checked before the weights are read: no loader line
    ("Model uses weight tying.") comes before the error."""
    folder = _qwen_folder(tmp_path, tie=True)
    assert "--top-k must be <= the vocabulary size" in _error(capsys, "--safetensors", str(folder), "--prompt",
                                                              "hello", "--top-k", str(QWEN_VOCAB + 1))
    assert "more than the context length 64" in _error(capsys, "--safetensors", str(folder), "--prompt",
                                                       "hello world " * 40)


def test_an_integer_tensor_or_a_missing_config_is_one_line_naming_it(tmp_path, capsys):
    folder = _qwen_folder(tmp_path)
    params = hf_folder.load_safetensors_folder(folder)
    params["model.norm.weight"] = params["model.norm.weight"].to(torch.int32)
    write_checkpoint(params, folder)
    err = _error(capsys, "--safetensors", str(folder))
    assert "'model.norm.weight' has dtype torch.int32" in err
    (folder / "config.json").unlink()
    assert "needs its config.json beside it" in _error(capsys, "--safetensors", str(folder / "model.safetensors"))


def test_a_bad_config_is_one_line(tmp_path, capsys):
    folder = _qwen_folder(tmp_path)
    (folder / "config.json").write_text("{not json", encoding="utf-8")
    assert "config.json is not a JSON file" in _error(capsys, "--safetensors", str(folder))
    _write_config(folder, _qwen_hf_config(attention_bias=True))
    assert "attention_bias" in _error(capsys, "--safetensors", str(folder))


def test_gpt2_flags_and_llama_qwen_flags_do_not_mix(tmp_path, capsys):
    folder = _qwen_folder(tmp_path)
    assert "--model gpt2-medium names a GPT-2 size" in _error(capsys, "--safetensors", str(folder), "--model",
                                                              "gpt2-medium")
    (tmp_path / "gpt2").mkdir()
    gpt2 = tmp_path / "gpt2" / "model.safetensors"
    gpt2.write_bytes(b"")
    for flags in (["--chat"], ["--dtype", "bfloat16"], ["--tokenizer", str(folder / "tokenizer.json")]):
        assert f"{flags[0]} applies to Llama 3 / Qwen3" in _error(capsys, "--safetensors", str(gpt2), *flags)


def test_loading_initialises_nothing_and_keeps_the_rope_tables(tmp_path, monkeypatch):
    folder = _qwen_folder(tmp_path)
    touched = []
    for name in ("kaiming_uniform_", "uniform_", "normal_", "ones_", "zeros_"):
        init = getattr(torch.nn.init, name)

        def spy(tensor, *args, init=init, **kwargs):
            if not tensor.is_meta:
                touched.append(tuple(tensor.shape))
            return init(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.nn.init, name, spy)
    model, cfg, _ = hf_folder.load_model(folder)
    assert touched == []  # nothing was initialised: every value is the checkpoint's
    monkeypatch.undo()
    built = our_qwen3.Qwen3Model(cfg)
    assert torch.equal(model.cos, built.cos) and torch.equal(model.sin, built.sin)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    params = hf_folder.load_safetensors_folder(folder)
    assert torch.equal(model.trf_blocks[1].ff.fc3.weight, params["model.layers.1.mlp.down_proj.weight"])
    # A parameter no loader fills is named, not left on the meta device.
    fill = hf_folder.qwen3.load_weights_into_qwen
    monkeypatch.setattr(hf_folder.qwen3, "load_weights_into_qwen", lambda m, c, p: (
        fill(m, c, p), setattr(m.final_norm, "scale", torch.nn.Parameter(torch.empty(32, device="meta")))))
    with pytest.raises(ValueError, match="filled no value for final_norm.scale"):
        hf_folder.load_model(folder)


def test_the_head_follows_tie_word_embeddings_as_hugging_face_does(tmp_path, capsys):
    folder = _qwen_folder(tmp_path)  # untied, with its own lm_head.weight
    params = hf_folder.load_safetensors_folder(folder)
    model, _, _ = hf_folder.load_model(folder)
    assert torch.equal(model.out_head.weight, params["lm_head.weight"])
    _write_config(folder, _qwen_hf_config(tie_word_embeddings=True))  # tied: the file's lm_head is not used
    model, _, _ = hf_folder.load_model(folder)
    assert torch.equal(model.out_head.weight, params["model.embed_tokens.weight"])
    assert not torch.equal(model.out_head.weight, params["lm_head.weight"])
    assert model.out_head.weight is model.tok_emb.weight  # one tensor, not a copy of the embedding
    for dtype in (torch.bfloat16, torch.float32):  # still one after a cast to another dtype
        model, _, _ = hf_folder.load_model(folder, dtype=dtype)
        assert model.out_head.weight is model.tok_emb.weight and model.out_head.weight.dtype == dtype
    _write_config(folder, _qwen_hf_config(tie_word_embeddings=False))
    del params["lm_head.weight"]
    write_checkpoint(params, folder)
    with pytest.raises(ValueError, match="tie_word_embeddings is not true, but the checkpoint holds no lm_head"):
        hf_folder.load_model(folder)


def test_generation_stops_at_the_folders_own_end_tokens(tmp_path, capsys):
    folder = _qwen_folder(tmp_path)
    tokenizer = ref_qwen3.Qwen3Tokenizer(str(folder / "tokenizer.json"), apply_chat_template=False)
    ids = tokenizer.encode("hello world")
    expected = _reference_text("qwen3", folder, ids, 8, None)
    stop_at = 3 if expected[3] not in expected[:3] else expected.index(expected[3])
    # generation_config.json names the fourth new token an end token (with an id the tokenizer has too).
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [expected[3], 151643]}))
    out, _ = _generate(capsys, folder, "hello world", "--max-new-tokens", "8", "--backend", "torch")
    assert out == "hello world" + tokenizer.decode(expected[:stop_at]) + "\n"
    ours = hf_folder.load_tokenizer("qwen3", folder / "tokenizer.json", folder=folder)
    assert ours.stop_ids == {tokenizer.eos_token_id, expected[3], 151643, 151645}  # 151645: config.json's
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": "end"}))
    assert "eos_token_id must be a token id" in _error(capsys, "--safetensors", str(folder))


def test_a_tokenizer_file_the_tokenizers_package_cannot_read_is_one_line(tmp_path, capsys):
    folder = _qwen_folder(tmp_path)
    for text in ("{not json", '{"a": 1}'):
        (folder / "tokenizer.json").write_text(text, encoding="utf-8")
        assert "is not a Hugging Face tokenizer.json" in _error(capsys, "--safetensors", str(folder))


@pytest.mark.parametrize("module_name", ["kv_cache.llama3", "kv_cache.qwen3", "kv_cache_batched.qwen3"])
def test_the_cache_models_hidden_states_are_their_forward_without_the_head(tmp_path, module_name):
    import importlib

    module = importlib.import_module(f"gptfast.{module_name}")
    if "qwen3" in module_name:
        config, cls_name = _qwen_hf_config(), "Qwen3Model"
    else:
        config, cls_name = {**LLAMA32_1B_CONFIG_JSON, "hidden_size": 32, "intermediate_size": 48,
                            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                            "head_dim": 8, "max_position_embeddings": 64, "vocab_size": 300,
                            "torch_dtype": "float32"}, "Llama3Model"
    _, cfg = hf_folder.read_config(_write_config(tmp_path, config))
    torch.manual_seed(0)
    model = getattr(module, cls_name)(cfg).eval()
    idx = torch.randint(0, cfg["vocab_size"], (2, 5))
    with torch.no_grad():
        hidden = model.hidden_states(idx)
        assert hidden.shape == (2, 5, 32)
        torch.testing.assert_close(model.out_head(hidden), model(idx), atol=1e-5, rtol=1e-5)


def test_a_tokenizer_that_does_not_fit_the_models_vocabulary_is_named_with_both_sizes(tmp_path, capsys,
                                                                                        tiktoken_cache):
    # Llama 3's tiktoken cannot decode an id it has no token for: a model with rows past its ids is refused.
    folder = _llama_folder(tmp_path / "llama", vocab_size=128_300)
    (folder / "model.safetensors").unlink()  # refused before the weights are read
    err = _error(capsys, "--safetensors", str(folder))
    assert "original/tokenizer.model has 128258 token ids" in err and "vocab_size is 128300" in err
    # Qwen3's tokenizer may have fewer ids than the model has rows (the real models do), but not more.
    folder = _write_config(tmp_path / "qwen", _qwen_hf_config(vocab_size=300))
    _qwen_tokenizer(folder / "tokenizer.json")
    ids = __import__("tokenizers").Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    assert ids > 300
    err = _error(capsys, "--safetensors", str(folder))
    assert f"tokenizer.json has {ids} token ids" in err and "vocab_size is 300" in err


def test_a_token_the_tokenizer_cannot_decode_is_one_line_naming_the_tokenizer(tmp_path, capsys, tiktoken_cache):
    folder = _llama_folder(tmp_path / "model", spelled_only=False)  # the model picks ids the tokenizer lacks
    capsys.readouterr()
    assert main(["generate", "--safetensors", str(folder), "--prompt", "hello", "--max-new-tokens", "5"]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("hello") and "Traceback" not in err
    # The loader's note on the tied head, then the error.
    assert err.splitlines()[:-1] == ["Model uses weight tying."], err
    error = err.splitlines()[-1]
    assert error.startswith("gptfast generate: error: tokenizer ") and "tokenizer.model cannot decode" in error


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def _replace_with_a_folder(path):
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize("shards, break_it, message", [
    (1, lambda f: _truncate(f / "model.safetensors"), "model.safetensors is not a readable safetensors file"),
    (1, lambda f: _replace_with_a_folder(f / "model.safetensors"), "model.safetensors is a folder"),
    (2, lambda f: _truncate(f / "model-00002-of-00002.safetensors"),
     "model-00002-of-00002.safetensors is not a readable safetensors file"),
    (2, lambda f: (f / "model.safetensors.index.json").write_text("[]"),
     "model.safetensors.index.json has no 'weight_map'"),
    (2, lambda f: (f / "model.safetensors.index.json").write_text("{not json"),
     "model.safetensors.index.json is not a JSON file"),
], ids=["truncated", "folder", "truncated-shard", "index-list", "index-not-json"])
def test_broken_weight_files_are_one_line_naming_the_file(tmp_path, capsys, shards, break_it, message):
    folder = _qwen_folder(tmp_path, shards=shards)
    break_it(folder)
    assert message in _error(capsys, "--safetensors", str(folder))
