"""Tokenizer, datasets and checkpoints (GPT-2 weight loading is tested in test_weights.py)."""

import pytest
import torch

from gptfast.data import GPTDatasetV1, create_dataloader_v1, load_text, train_val_loaders
from gptfast.models import GPTModel
from gptfast.resources import default_text
from gptfast.tokenizer import get_tokenizer
from gptfast.training.checkpoints import load_checkpoint, save_checkpoint

ref_ch02 = pytest.importorskip("llms_from_scratch.ch02")
ref_ch04 = pytest.importorskip("llms_from_scratch.ch04")

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


def test_the_tokenizer_reads_the_shipped_ranks_not_tiktokens_cache(monkeypatch):
    """tiktoken's loader copies a local file into a shared cache folder and later reads that copy unchecked;
    the shipped ranks are read directly."""
    import tiktoken.load

    def refuse(*args, **kwargs):
        raise AssertionError("tiktoken.load was used")

    monkeypatch.setattr(tiktoken.load, "load_tiktoken_bpe", refuse)
    get_tokenizer.cache_clear()
    try:
        assert get_tokenizer().encode("Every effort moves you") == [6109, 3626, 6100, 345]
    finally:
        get_tokenizer.cache_clear()


def test_dataset_windows_and_too_short_text():
    tok = get_tokenizer()
    ds = GPTDatasetV1(default_text(), tok, max_length=4, stride=1)
    x, y = ds[0]
    assert x.tolist() == tok.encode(default_text())[:4] and torch.equal(y[:-1], x[1:])
    assert len(ds) == 5_145 - 4
    with pytest.raises(ValueError, match="too short for one window"):
        create_dataloader_v1("only a few words", max_length=256)
    # Unshuffled, as the reference's: an empty loader (chapter 5's validation split with a long context).
    loader = create_dataloader_v1("only a few words", max_length=256, shuffle=False)
    reference = ref_ch02.create_dataloader_v1("only a few words", max_length=256, shuffle=False)
    assert len(loader) == len(reference) == 0 and list(loader) == []
    with pytest.raises(ValueError, match="validation split .* too short"):
        train_val_loaders("only a few words " * 200, {"context_length": 256})
    with pytest.raises(ValueError, match="max_length and stride"):
        GPTDatasetV1("text", tok, max_length=0, stride=1)


def test_load_text_errors_on_a_missing_file(tmp_path):
    assert load_text(None) == default_text()
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_text(tmp_path / "missing.txt")


def _assert_same_weights(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


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


@pytest.mark.parametrize("ids", [[1.5, 2.7, 3.9, 4.2], [True, False, True]])
def test_token_ids_that_are_not_integers_are_refused(ids):
    """A tokenizer that returns floats (or bools) is an error, not ids cut to integers."""

    class OddTokenizer:
        def encode(self, text, allowed_special=None):
            return ids

    with pytest.raises(TypeError, match="tokenizer.encode"):
        GPTDatasetV1("x", OddTokenizer(), max_length=2, stride=1)
    OddTokenizer.encode = lambda self, text, allowed_special=None: [3, 1, 4, 1]
    assert GPTDatasetV1("x", OddTokenizer(), max_length=2, stride=1)[1][1].tolist() == [4, 1]


def test_an_uninstalled_checkout_reads_its_own_data_folder(tmp_path):
    """Run from a checkout on sys.path (no install, so no ``gptfast.embedded``), the text and ranks come from data/."""
    import pathlib
    import shutil
    import subprocess
    import sys
    import sysconfig

    repo = pathlib.Path(__file__).resolve().parents[1]
    checkout = tmp_path / "checkout"
    shutil.copytree(repo / "gptfast", checkout / "gptfast", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copytree(repo / "data", checkout / "data")
    # -S: no site-packages .pth files, so the editable install's finder cannot supply gptfast.embedded.
    script = (f"import sys; sys.path[:0] = [{str(checkout)!r}, {sysconfig.get_paths()['purelib']!r}]\n"
              "import gptfast.resources as r, gptfast.tokenizer as t\n"
              "assert r.resource_path('the-verdict.txt').parent.parent == __import__('pathlib').Path("
              f"{str(checkout)!r}), r.resource_path('the-verdict.txt')\n"
              "print(len(r.default_text()), len(t.get_tokenizer().encode(r.default_text())))\n")
    done = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["20479", "5145"]
