"""The one checkpoint format and loader: checksums, every kind of bad file, and loads that change nothing."""

import os
import re

import pytest
import torch

import llms_from_scratch.ch04 as ref_ch04

from gptfast.models import GPTModel
from gptfast.training.checkpoints import (CHECKSUM_KEY, load_checkpoint, model_from_checkpoint, read_checkpoint,
                                          save_checkpoint, state_checksum, trim_vocabulary, write_checkpoint)

CFG = {"vocab_size": 300, "context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0,
       "qkv_bias": False}


def trained_pair(seed=0):
    torch.manual_seed(seed)
    model = GPTModel(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 300, (1, 5))).sum().backward()
    opt.step()
    return model, opt


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_saved_checkpoints_carry_a_checksum_that_is_verified(tmp_path):
    model, opt = trained_pair()
    path = save_checkpoint(tmp_path / "c.pth", model, opt, config=CFG)
    raw = torch.load(path, weights_only=True)
    assert raw[CHECKSUM_KEY]["sha256"] == state_checksum(raw)
    restored = GPTModel(CFG)
    load_checkpoint(path, restored, torch.optim.AdamW(restored.parameters(), lr=1e-3))
    assert_unchanged(restored, snapshot(model))


@pytest.mark.parametrize("entry", ["model", "optimizer", "config"])
def test_a_changed_value_fails_the_checksum(tmp_path, entry):
    model, opt = trained_pair()
    path = save_checkpoint(tmp_path / "c.pth", model, opt, config=CFG)
    raw = torch.load(path, weights_only=True)
    if entry == "model":
        raw["model_state_dict"]["out_head.weight"][3, 4] += 1e-3
    elif entry == "optimizer":
        raw["optimizer_state_dict"]["state"][0]["exp_avg"].view(-1)[0] += 1
    else:
        raw["config"]["drop_rate"] = 0.5
    torch.save(raw, path)  # the old checksum stays
    target = GPTModel(CFG)
    before = snapshot(target)
    with pytest.raises(ValueError, match="corrupted"):
        load_checkpoint(path, target)
    assert_unchanged(target, before)


def test_a_flipped_byte_on_disk_is_reported(tmp_path):
    model = GPTModel(CFG)
    with torch.no_grad():  # a recognisable byte pattern to find in the file
        model.out_head.weight.copy_(torch.arange(model.out_head.weight.numel()).view_as(model.out_head.weight))
    path = save_checkpoint(tmp_path / "c.pth", model)
    data = bytearray(path.read_bytes())
    offset = data.find(torch.arange(64, dtype=torch.float32).numpy().tobytes())
    assert offset > 0
    data[offset + 130] ^= 0x01  # one bit of one float
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted|cannot be read"):
        read_checkpoint(path)


def test_the_references_format_still_loads_without_a_checksum(tmp_path):
    model, opt = trained_pair()
    ref = ref_ch04.GPTModel(CFG)
    ref.load_state_dict(model.state_dict())
    torch.save({"model_state_dict": ref.state_dict(), "optimizer_state_dict": opt.state_dict()}, tmp_path / "r.pth")
    restored = GPTModel(CFG)
    opt2 = torch.optim.AdamW(restored.parameters(), lr=1e-3)
    load_checkpoint(tmp_path / "r.pth", restored, opt2)
    assert_unchanged(restored, snapshot(model))
    assert opt2.state_dict()["state"][0]["step"] == 1


def _bad_files(tmp_path):
    good = save_checkpoint(tmp_path / "good.pth", GPTModel(CFG), config=CFG).read_bytes()
    files = {
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "random bytes": os.urandom(4096),
        "text": b"model_state_dict: not really\n" * 20,
    }
    paths = {}
    for name, content in files.items():
        paths[name] = tmp_path / f"{name.replace(' ', '_')}.pth"
        paths[name].write_bytes(content)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    paths["foreign: a list"] = tmp_path / "list.pth"
    torch.save({"weights": "none", "epoch": 3}, tmp_path / "dict.pth")
    paths["foreign: a dict without tensors"] = tmp_path / "dict.pth"
    paths["a folder"] = tmp_path
    return paths


def test_every_kind_of_bad_file_is_a_value_error_and_changes_nothing(tmp_path):
    target = GPTModel(CFG)
    before = snapshot(target)
    for name, path in _bad_files(tmp_path).items():
        with pytest.raises(ValueError):
            load_checkpoint(path, target)
        assert_unchanged(target, before)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pth", target)


@pytest.mark.parametrize("config,message", [
    ({k: v for k, v in CFG.items() if k != "n_heads"}, "missing 'n_heads'"),
    ({**CFG, "emb_dim": "16"}, "'emb_dim' must be int"),
    ({**CFG, "qkv_bias": 1}, "'qkv_bias' must be bool"),
    ({**CFG, "n_layers": 0}, "'n_layers' must be >= 1"),
    ("not a dict", "must be a dict"),
])
def test_config_with_missing_keys_or_wrong_types(tmp_path, config, message):
    write_checkpoint(tmp_path / "c.pth", {"model_state_dict": GPTModel(CFG).state_dict(), "config": config})
    with pytest.raises(ValueError, match=message):
        model_from_checkpoint(tmp_path / "c.pth")


@pytest.mark.parametrize("config,message", [
    ({**CFG, "context_length": 1 << 20}, "'pos_emb.weight' is"),
    ({**CFG, "vocab_size": 7}, "'tok_emb.weight' is"),
    ({**CFG, "n_layers": 5}, "transformer blocks, the config's 'n_layers' is 5"),
])
def test_a_config_that_does_not_fit_the_weights_is_refused_before_a_model_is_built(tmp_path, monkeypatch, config,
                                                                                    message):
    """A context of 2^20 positions would make each block's causal mask a 2^40-entry tensor before the weights'
    shapes were compared."""
    import gptfast.models.gpt as gpt

    write_checkpoint(tmp_path / "c.pth", {"model_state_dict": GPTModel(CFG).state_dict(), "config": config})
    monkeypatch.setattr(gpt, "GPTModel", lambda *a: pytest.fail("a model was built"))
    with pytest.raises(ValueError, match="config does not fit its weights.*" + re.escape(message)):
        model_from_checkpoint(tmp_path / "c.pth")


def test_a_failed_load_leaves_model_and_optimizer_unchanged(tmp_path):
    model, opt = trained_pair(seed=1)
    state = model.state_dict()
    state["trf_blocks.1.ff.layers.0.weight"] = torch.zeros(3, 3)  # one block's shape wrong, the rest fine
    torch.save({"model_state_dict": state}, tmp_path / "bad_shape.pth")
    target, target_opt = trained_pair(seed=2)
    before, opt_before = snapshot(target), target_opt.state_dict()["state"][0]["exp_avg"].clone()
    with pytest.raises(ValueError, match="shape mismatch"):
        load_checkpoint(tmp_path / "bad_shape.pth", target)
    assert_unchanged(target, before)

    other_opt = torch.optim.AdamW(list(GPTModel(CFG).parameters())[:3], lr=1e-3)  # other parameter groups
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": other_opt.state_dict()},
               tmp_path / "bad_opt.pth")
    with pytest.raises(ValueError, match="optimizer"):
        load_checkpoint(tmp_path / "bad_opt.pth", target, target_opt)
    assert_unchanged(target, before)
    assert torch.equal(target_opt.state_dict()["state"][0]["exp_avg"], opt_before)


def test_padded_vocabularies_are_cut_so_padded_rows_never_win(tmp_path):
    padded = {**CFG, "vocab_size": 50304}
    model = GPTModel(padded)
    with torch.no_grad():
        model.out_head.weight[50257:] = 1e4  # the padded rows would win every argmax
    write_checkpoint(tmp_path / "ckpt.pt", {"model_state_dict": model.state_dict(), "config": padded})
    loaded, config = model_from_checkpoint(tmp_path / "ckpt.pt")
    assert config["vocab_size"] == 50257 and loaded.out_head.weight.shape[0] == 50257
    assert loaded.tok_emb.weight.shape[0] == 50257
    idx = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(loaded(idx), model(idx)[..., :50257])
    from gptfast.generation import generate

    out = generate(loaded, idx, 5, 16)
    assert int(out.max()) < 50257
    assert trim_vocabulary(loaded) is loaded and loaded.out_head.weight.shape[0] == 50257  # already cut: no-op


def test_a_plain_pickle_file_is_one_error_and_no_warning(tmp_path):
    """torch warns about a pickle protocol not its own; that would be more lines next to the one-line error."""
    import pickle
    import warnings

    path = tmp_path / "pickled.pth"
    path.write_bytes(pickle.dumps({"x": 1}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="cannot be read"):
            read_checkpoint(path)
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_holding_nan_or_inf_are_refused_when_read(tmp_path, bad):
    """A diverged run's weights (saved without the checksum, as the reference saves) are refused, naming a weight."""
    model = GPTModel({"vocab_size": 11, "context_length": 4, "emb_dim": 8, "n_heads": 2, "n_layers": 1,
                      "drop_rate": 0.0, "qkv_bias": False})
    state = model.state_dict()
    state["trf_blocks.0.ff.layers.0.weight"][1, 2] = bad
    torch.save({"model_state_dict": state}, tmp_path / "diverged.pth")
    with pytest.raises(ValueError, match=r"'trf_blocks.0.ff.layers.0.weight' holds NaN or inf"):
        read_checkpoint(tmp_path / "diverged.pth")
    with pytest.raises(ValueError, match="holds NaN or inf"):
        model_from_checkpoint(tmp_path / "diverged.pth")  # `gptfast generate --checkpoint`: before any model is built
