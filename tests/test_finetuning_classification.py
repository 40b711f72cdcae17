"""Chapter 6 against the reference: data preparation, SpamDataset, last-token loss/accuracy, one training run."""

import random
import zipfile

import pytest
import torch
from torch.utils.data import DataLoader

from book_reference import TINY, assert_same_state, reference, twin_models
from gptfast import ch06, ops
from gptfast.finetuning import heads

pd = pytest.importorskip("pandas")
ref_ch06 = reference("ch06")

WORDS = ("free prize call now win cash claim urgent reply txt meet you later home dinner ok sure lol see "
         "tomorrow thanks mum work bus late what time love").split()


def _messages(seed=0, n_ham=40, n_spam=12):
    rng = random.Random(seed)
    rows = [("ham", " ".join(rng.choices(WORDS[9:], k=rng.randint(1, 12)))) for _ in range(n_ham)]
    rows += [("spam", " ".join(rng.choices(WORDS[:12], k=rng.randint(3, 14)))) for _ in range(n_spam)]
    rng.shuffle(rows)
    return rows


def _spam_zip(tmp_path):
    """A zip laid out like the UCI download (one tab-separated ``SMSSpamCollection``), as a file:// URL."""
    zip_path = tmp_path / "source.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        archive.writestr("SMSSpamCollection", "".join(f"{label}\t{text}\n" for label, text in _messages()))
        archive.writestr("readme", "SMS spam collection (test copy)\n")
    return zip_path.as_uri()


@pytest.fixture(scope="module")
def tokenizer():
    import tiktoken

    return tiktoken.get_encoding("gpt2")


@pytest.fixture
def csv_files(tmp_path):
    """train/validation/test CSVs made the book's way (balanced, labels 0/1, 70/10/20 split)."""
    url = _spam_zip(tmp_path)
    tsv = tmp_path / "extracted" / "SMSSpamCollection.tsv"
    ch06.download_and_unzip_spam_data(url, tmp_path / "sms.zip", tmp_path / "extracted", tsv)
    df = pd.read_csv(tsv, sep="\t", header=None, names=["Label", "Text"])
    balanced = ch06.create_balanced_dataset(df)
    balanced["Label"] = balanced["Label"].map({"ham": 0, "spam": 1})
    paths = []
    for name, frame in zip(("train", "validation", "test"), ch06.random_split(balanced, 0.7, 0.1)):
        frame.to_csv(tmp_path / f"{name}.csv", index=None)
        paths.append(tmp_path / f"{name}.csv")
    return paths


def test_download_extracts_and_renames_like_the_reference(tmp_path, capsys):
    url = _spam_zip(tmp_path)
    outputs = []
    for module, sub in ((ref_ch06, "ref"), (ch06, "ours")):
        folder = tmp_path / sub
        folder.mkdir()  # the reference writes the zip into an existing folder
        target = folder / "extracted" / "SMSSpamCollection.tsv"
        module.download_and_unzip_spam_data(url, folder / "sms.zip", folder / "extracted", target)
        outputs.append(target.read_bytes())
        assert capsys.readouterr().out == f"File downloaded and saved as {target}\n"
    assert outputs[0] == outputs[1] and outputs[0].startswith(b"ham\t") or outputs[0].startswith(b"spam\t")
    assert not list((tmp_path / "ours").glob(".*.tmp"))
    # A second call finds the file and downloads nothing (a broken URL would fail otherwise).
    target = tmp_path / "ours" / "extracted" / "SMSSpamCollection.tsv"
    ch06.download_and_unzip_spam_data("file:///nonexistent.zip", tmp_path / "x.zip", tmp_path / "y", str(target))
    assert "already exists" in capsys.readouterr().out


def test_a_zip_without_the_table_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("other.txt", "x")
    with pytest.raises(ValueError, match="SMSSpamCollection"):
        ch06.download_and_unzip_spam_data(bad.as_uri(), tmp_path / "sms.zip", tmp_path / "ex", tmp_path / "t.tsv")


def test_balancing_and_splitting_match_the_reference():
    df = pd.DataFrame(_messages(seed=3, n_ham=57, n_spam=19), columns=["Label", "Text"])
    ours, ref = ch06.create_balanced_dataset(df), ref_ch06.create_balanced_dataset(df)
    pd.testing.assert_frame_equal(ours, ref)
    assert (ours["Label"] == "spam").sum() == (ours["Label"] == "ham").sum() == 19
    for fracs in ((0.7, 0.1), (0.5, 0.5), (1.0, 0.0), (0.33, 0.2)):
        for a, b in zip(ch06.random_split(ours, *fracs), ref_ch06.random_split(ref, *fracs)):
            pd.testing.assert_frame_equal(a, b)


def test_bad_data_arguments_are_clear_errors(tmp_path, tokenizer, csv_files):
    df = pd.DataFrame(_messages(), columns=["Label", "Text"])
    with pytest.raises(ValueError, match="train_frac"):
        ch06.random_split(df, 1.5, 0.1)
    with pytest.raises(ValueError, match="validation_frac"):
        ch06.random_split(df, 0.5, -0.1)
    with pytest.raises(ValueError, match="exceed 1"):
        ch06.random_split(df, 0.7, 0.4)
    with pytest.raises(ValueError, match="Label"):
        ch06.create_balanced_dataset(df.rename(columns={"Label": "y"}))
    with pytest.raises(ValueError, match="max_length"):
        ch06.SpamDataset(csv_files[0], tokenizer, max_length=0)
    for labels in (["ham", "spam"], [1.5, 0.0], [1.0, None], [float("inf"), 0.0], [1e30, 1.0]):
        pd.DataFrame({"Label": labels, "Text": ["hi", "yo"]}).to_csv(tmp_path / "raw.csv", index=None)
        with pytest.raises(ValueError, match="Label must hold integer class ids"):
            ch06.SpamDataset(tmp_path / "raw.csv", tokenizer)
    for pad in (1.5, None, "x"):
        with pytest.raises(TypeError, match="pad_token_id must be an int token id"):
            ch06.SpamDataset(csv_files[0], tokenizer, pad_token_id=pad)
    pd.DataFrame({"Label": [1.0, 0.0], "Text": ["hi", "yo"]}).to_csv(tmp_path / "floats.csv", index=None)
    ours, ref = ch06.SpamDataset(tmp_path / "floats.csv", tokenizer), ref_ch06.SpamDataset(tmp_path / "floats.csv",
                                                                                           tokenizer)
    assert [ours[i][1] for i in range(2)] == [ref[i][1] for i in range(2)] == [torch.tensor(1), torch.tensor(0)]


@pytest.mark.parametrize("max_length", [None, 5])
def test_a_file_with_no_messages_is_an_empty_data_set_as_in_the_reference(tmp_path, tokenizer, max_length):
    pd.DataFrame({"Label": [], "Text": []}).to_csv(tmp_path / "empty.csv", index=None)  # a split that came out empty
    ours = ch06.SpamDataset(tmp_path / "empty.csv", tokenizer, max_length=max_length)
    ref = ref_ch06.SpamDataset(tmp_path / "empty.csv", tokenizer, max_length=max_length)
    assert len(ours) == len(ref) == 0 and ours.max_length == ref.max_length


@pytest.mark.parametrize("max_length,pad", [(None, 50256), (5, 50256), (40, 7)])
def test_spam_dataset_matches_the_reference(csv_files, tokenizer, max_length, pad):
    ours = ch06.SpamDataset(csv_files[0], tokenizer, max_length=max_length, pad_token_id=pad)
    ref = ref_ch06.SpamDataset(csv_files[0], tokenizer, max_length=max_length, pad_token_id=pad)
    assert ours.max_length == ref.max_length and ours.encoded_texts == ref.encoded_texts and len(ours) == len(ref)
    for i in range(len(ref)):
        for a, b in zip(ours[i], ref[i]):
            assert torch.equal(a, b) and a.dtype == b.dtype and a.shape == b.shape
    # Items are copies: changing one leaves the dataset as it was.
    ours[0][0].zero_()
    assert torch.equal(ours[0][0], ref[0][0])
    # Items are read from encoded_texts and data at each call, as the reference's: edits show in them.
    for ds in (ours, ref):
        ds.data.loc[0, "Label"] = 1 - int(ds.data.loc[0, "Label"])
        ds.encoded_texts[1] = [7] * ds.max_length
    for i in range(2):
        assert all(torch.equal(a, b) for a, b in zip(ours[i], ref[i]))
    ours.data["Label"] = ours.data["Label"].astype(float)
    ours.data.loc[0, "Label"] = 0.5
    with pytest.raises(ValueError, match="item 0: Label must be an integer class id"):
        ours[0]


def _classifier_pair(cfg, seed=123):
    """The book's classification setup on twin models: frozen, new 2-class head, last block and norm trainable."""
    models = twin_models(cfg, seed)
    for model in models:
        for p in model.parameters():
            p.requires_grad = False
        torch.manual_seed(123)
        model.out_head = torch.nn.Linear(cfg["emb_dim"], 2)
        for p in (*model.trf_blocks[-1].parameters(), *model.final_norm.parameters()):
            p.requires_grad = True
    return models


def _loaders(csv_files, tokenizer, batch_size=4):
    train = ch06.SpamDataset(csv_files[0], tokenizer)
    val = ch06.SpamDataset(csv_files[1], tokenizer, max_length=train.max_length)
    torch.manual_seed(123)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True),
            DataLoader(val, batch_size=batch_size, drop_last=False))


def _train(module, model, loaders, epochs=1, eval_iter=2):
    torch.manual_seed(5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
    torch.manual_seed(7)  # dropout draws and the shuffling of the train loader
    return module.train_classifier_simple(model, *loaders, optimizer, "cpu", num_epochs=epochs, eval_freq=2,
                                          eval_iter=eval_iter)


def test_one_training_epoch_is_bitwise_the_reference_with_the_torch_backend(csv_files, tokenizer, capsys):
    ref, ours = _classifier_pair(TINY)  # dropout 0.1: the same masks are drawn
    loaders = _loaders(csv_files, tokenizer)
    with ops.use_backend("torch"):
        expected = _train(ref_ch06, ref, loaders)
        ref_out = capsys.readouterr().out
        got = _train(ch06, ours, loaders)
        our_out = capsys.readouterr().out
    assert got == expected
    assert our_out == ref_out and "Training accuracy" in our_out
    assert_same_state(ours, ref)
    assert len(got[0]) >= 2 and got[-1] == len(loaders[0]) * 4


def test_eval_iter_none_evaluates_every_batch_as_the_reference_does(csv_files, tokenizer, capsys):
    ref, ours = _classifier_pair(TINY)
    loaders = _loaders(csv_files, tokenizer)
    with ops.use_backend("torch"):
        expected = _train(ref_ch06, ref, loaders, eval_iter=None)
        got = _train(ch06, ours, loaders, eval_iter=None)
    assert got == expected
    assert_same_state(ours, ref)


def test_one_training_epoch_matches_the_reference_on_the_fast_path(csv_files, tokenizer, capsys):
    cfg = {**TINY, "drop_rate": 0.0}  # the last-token shortcut draws dropout masks for fewer positions
    ref, ours = _classifier_pair(cfg)
    loaders = _loaders(csv_files, tokenizer)
    expected = _train(ref_ch06, ref, loaders, epochs=2)
    got = _train(ch06, ours, loaders, epochs=2)
    capsys.readouterr()
    for ours_list, ref_list in zip(got[:4], expected[:4]):
        assert ours_list == pytest.approx(ref_list, rel=1e-5, abs=1e-6)
    assert got[4] == expected[4]
    ours_state, ref_state = ours.state_dict(), ref.state_dict()
    for key in ref_state:
        # The key bias shifts every score of a query equally, so its true gradient is zero and AdamW
        # turns the rounding noise of either computation into full-size steps: nothing to compare.
        if not key.endswith("W_key.bias"):
            torch.testing.assert_close(ours_state[key], ref_state[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_loss_and_accuracy_loaders_match_the_reference(csv_files, tokenizer, backend):
    ref, ours = _classifier_pair(TINY)
    ref.eval(), ours.eval()
    loaders = _loaders(csv_files, tokenizer)
    rel = 0 if backend == "torch" else 1e-6

    def both(fn_ours, fn_ref, *args):
        # The train loader shuffles: both sides must draw the same order.
        torch.manual_seed(11)
        got = fn_ours(*args[:1], ours, *args[1:])
        torch.manual_seed(11)
        return got, fn_ref(*args[:1], ref, *args[1:])

    with ops.use_backend(backend):
        for num_batches in (None, 1, 99):
            for loader in loaders:
                got, expected = both(ch06.calc_accuracy_loader, ref_ch06.calc_accuracy_loader, loader, "cpu",
                                     num_batches)
                assert got == expected
                got, expected = both(ch06.calc_loss_loader, ref_ch06.calc_loss_loader, loader, "cpu", num_batches)
                assert got == pytest.approx(expected, rel=rel)
        torch.manual_seed(11)
        got = ch06.evaluate_model(ours, *loaders, "cpu", 2)
        torch.manual_seed(11)
        assert got == pytest.approx(ref_ch06.evaluate_model(ref, *loaders, "cpu", 2), rel=rel)
    assert ours.training  # evaluate_model returns the model to training mode
    assert torch.isnan(torch.tensor(ch06.calc_loss_loader(DataLoader([], batch_size=2), ours, "cpu")))


@pytest.mark.parametrize("seq_len", [1, 2, 17, TINY["context_length"]])
def test_last_token_shortcut_equals_the_full_forward_values_and_gradients(seq_len):
    cfg = {**TINY, "drop_rate": 0.0}
    _, model = _classifier_pair(cfg)
    _, twin = _classifier_pair(cfg)
    idx = torch.randint(0, cfg["vocab_size"], (3, seq_len))
    labels = torch.tensor([0, 1, 1])
    fast = ch06.calc_loss_batch(idx, labels, model, "cpu")
    with ops.use_backend("torch"):
        full = ch06.calc_loss_batch(idx, labels, twin, "cpu")
    torch.testing.assert_close(fast, full, atol=1e-6, rtol=1e-6)
    fast.backward(), full.backward()
    grads = [(n, p.grad, q.grad) for (n, p), q in zip(model.named_parameters(), twin.parameters())
             if p.requires_grad]
    assert len(grads) > 10
    for name, a, b in grads:
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    # The shortcut itself, and the plain path for a model of another layout.
    with torch.no_grad():
        torch.testing.assert_close(heads.last_token_logits(model, idx), model(idx)[:, -1], atol=1e-6, rtol=1e-6)
    assert heads.is_book_gpt(model) and not heads.is_book_gpt(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("where", ["model", "last block", "attention", "subclass", "head", "forward set on the head"])
def test_hooks_and_overridden_forwards_are_honoured_by_the_loss_shortcuts(where):
    """The shortcuts compute a model's parts themselves; a hook or an overridden forward on the model, a block,
    an attention module or the head makes them call the model, so the loss is the one the model's forward gives."""
    cfg = {**TINY, "drop_rate": 0.0}
    _, model = _classifier_pair(cfg)
    idx = torch.randint(0, cfg["vocab_size"], (3, 7), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 1])

    def halve(module, args, output):
        return output / 2

    if where == "subclass":
        class Halved(type(model)):
            def forward(self, in_idx):
                return super().forward(in_idx) / 2

        model.__class__ = Halved
    elif where == "forward set on the head":
        head_forward = model.out_head.forward
        model.out_head.forward = lambda x: head_forward(x) / 2
    else:
        target = {"model": model, "last block": model.trf_blocks[-1], "attention": model.trf_blocks[0].att,
                  "head": model.out_head}[where]
        target.register_forward_hook(halve)
    assert not heads.is_book_gpt(model)
    with ops.use_backend("torch"):  # the oracle calls every module as the reference does
        expected = torch.nn.functional.cross_entropy(model(idx)[:, -1, :], labels)
    torch.testing.assert_close(ch06.calc_loss_batch(idx, labels, model, "cpu"), expected)


@pytest.mark.parametrize("where", ["feed-forward", "first norm", "query projection", "final norm"])
def test_hooks_on_sub_layers_are_honoured_by_the_loss_shortcuts(where):
    """A hook that mixes positions, on any layer the last-token shortcut calls on the last position only,
    makes the loss the one the model's forward gives (the hook then sees every position)."""
    cfg = {**TINY, "drop_rate": 0.0}
    _, model = _classifier_pair(cfg)
    idx = torch.randint(0, cfg["vocab_size"], (3, 7), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 1])
    last = model.trf_blocks[-1]
    target = {"feed-forward": last.ff, "first norm": last.norm1, "query projection": last.att.W_query,
              "final norm": model.final_norm}[where]
    target.register_forward_hook(lambda module, args, output: output - output.mean(dim=1, keepdim=True))
    assert not heads.is_book_gpt(model)
    with ops.use_backend("torch"):
        expected = torch.nn.functional.cross_entropy(model(idx)[:, -1, :], labels)
    torch.testing.assert_close(ch06.calc_loss_batch(idx, labels, model, "cpu"), expected)


def test_a_model_without_transformer_blocks_still_classifies():
    cfg = {**TINY, "n_layers": 0, "drop_rate": 0.0}
    _, ours = twin_models(cfg)
    idx = torch.randint(0, 50257, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(heads.last_token_logits(ours, idx), ours(idx)[:, -1], atol=1e-6, rtol=1e-6)


def test_classify_review_matches_the_reference(tokenizer):
    ref, ours = _classifier_pair(TINY)
    texts = ["You are a winner you have been specially selected to receive $1000 cash",
             "Hey, just wanted to check if we're still on for dinner tonight? Let me know!", "ok"]
    for backend in ("torch", "auto"):
        with ops.use_backend(backend):
            for text in texts:
                for max_length in (3, 20, TINY["context_length"]):
                    assert ch06.classify_review(text, ours, tokenizer, "cpu", max_length=max_length) == \
                        ref_ch06.classify_review(text, ref, tokenizer, "cpu", max_length=max_length)
    # No max_length: an error in the reference, the unpadded text here.
    ids = torch.tensor([tokenizer.encode(texts[0])])
    with torch.no_grad():
        expected = "spam" if ours(ids)[0, -1].argmax().item() == 1 else "not spam"
    assert ch06.classify_review(texts[0], ours, tokenizer, "cpu") == expected
    for bad in (0, TINY["context_length"] + 1, 2.5):
        with pytest.raises(ValueError, match="max_length"):
            ch06.classify_review("hi", ours, tokenizer, "cpu", max_length=bad)
    with pytest.raises(ValueError, match="text"):
        ch06.classify_review("", ours, tokenizer, "cpu")


def test_plot_values_writes_the_pdf(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    import matplotlib.pyplot as plt

    # None, as the reference's: a returned figure would be drawn twice at the end of a notebook cell
    assert ch06.plot_values([0, 1, 2], [0, 8, 16], [0.9, 0.7, 0.5], [1.0, 0.8, 0.6], label="accuracy",
                            show=False) is None
    fig = plt.gcf()
    assert (tmp_path / "accuracy-plot.pdf").read_bytes().startswith(b"%PDF")
    assert fig.axes[0].get_ylabel() == "Accuracy"
    assert [line.get_label() for line in fig.axes[0].lines] == ["Training accuracy", "Validation accuracy"]


def test_plot_losses_writes_the_file_and_returns_none_like_the_reference(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    from gptfast import ch05

    matplotlib.use("Agg")
    assert ch05.plot_losses([0, 1], [0, 8], [0.9, 0.7], [1.0, 0.8], save_path=tmp_path / "loss.pdf", show=False) is None
    assert (tmp_path / "loss.pdf").read_bytes().startswith(b"%PDF")
    assert plt.gcf().axes[0].get_ylabel() == "Loss"


def test_batch_limits_that_are_not_positive_ints_are_named(csv_files, tokenizer):
    """The reference divides by the limit (0 fails, -1 gives -0.0, 1.5 averages two batches over 1.5)."""
    _, ours = _classifier_pair(TINY)
    loader = _loaders(csv_files, tokenizer)[1]
    for bad, error in ((0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)):
        for fn in (ch06.calc_loss_loader, ch06.calc_accuracy_loader):
            with pytest.raises(error, match="num_batches must be"):
                fn(loader, ours, "cpu", num_batches=bad)
        with pytest.raises(error, match="eval_iter must be"):
            ch06.evaluate_model(ours, loader, loader, "cpu", bad)
    with pytest.raises(TypeError, match="pad_token_id must be an int token id"):
        ch06.classify_review("hi", ours, tokenizer, "cpu", max_length=4, pad_token_id=0.5)


def test_probability_targets_give_the_reference_loss():
    """Class probabilities as targets (which torch's cross-entropy takes) give the reference's loss: bitwise
    on backend "torch", within fp32 rounding on the default backend."""
    ref, ours = _classifier_pair({**TINY, "drop_rate": 0.0})
    idx = torch.randint(0, TINY["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([[0.2, 0.8], [1.0, 0.0]])
    expected = ref_ch06.calc_loss_batch(idx, targets, ref, "cpu")
    with ops.use_backend("torch"):
        assert torch.equal(ch06.calc_loss_batch(idx, targets, ours, "cpu"), expected)
    torch.testing.assert_close(ch06.calc_loss_batch(idx, targets, ours, "cpu"), expected)


def test_token_ids_without_a_batch_axis_are_refused_by_name():
    _, ours = _classifier_pair({**TINY, "drop_rate": 0.0})
    idx = torch.randint(0, TINY["vocab_size"], (5,))
    with pytest.raises(ValueError, match="in_idx"):
        ch06.calc_loss_batch(idx, torch.tensor([1]), ours, "cpu")
    with pytest.raises(ValueError, match="in_idx"):
        ch06.calc_accuracy_loader([(idx, torch.tensor([1]))], ours, "cpu")


@pytest.mark.parametrize("bad", [dict(eval_freq=0), dict(eval_iter=0), dict(eval_freq=1.5)])
def test_evaluation_settings_are_checked_before_the_first_step(bad):
    """A bad eval_freq or eval_iter is an error naming it, raised before any step changes the model."""
    _, model = _classifier_pair({**TINY, "drop_rate": 0.0})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = (torch.randint(0, TINY["vocab_size"], (2, 5)), torch.tensor([0, 1]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    settings = {"eval_freq": 1, "eval_iter": 1, **bad}
    error = TypeError if isinstance(next(iter(bad.values())), float) else ValueError
    with pytest.raises(error, match=next(iter(bad))):
        ch06.train_classifier_simple(model, [batch], [batch], optimizer, "cpu", 1, **settings)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
