"""Chapter 7 against the reference: data, prompts, collate functions, the padded-target loss, one training
epoch, batched responses and the Ollama helpers (against a local stand-in server)."""

import http.server
import json
import random
import threading

import pytest
import torch
from torch.utils.data import DataLoader

from book_reference import TINY, assert_same_state, reference, twin_models
from gptfast import ch07, ops
from gptfast.finetuning import ollama

ref_ch05 = reference("ch05")
ref_ch07 = reference("ch07")

WORDS = "rewrite the sentence in passive voice name a fruit what is capital of France give synonym for fast".split()


def _entries(n=12, seed=0):
    rng = random.Random(seed)
    sentence = lambda lo, hi: " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))  # noqa: E731
    return [{"instruction": sentence(2, 8), "input": sentence(1, 6) if rng.random() < 0.6 else "",
             "output": sentence(1, 10)} for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    import tiktoken

    return tiktoken.get_encoding("gpt2")


def test_download_and_load_file_matches_the_reference(tmp_path):
    source = tmp_path / "source.json"
    source.write_text(json.dumps(_entries(), indent=2), encoding="utf-8")
    ours = ch07.download_and_load_file(tmp_path / "ours.json", source.as_uri())
    ref = ref_ch07.download_and_load_file(str(tmp_path / "ref.json"), source.as_uri())
    assert ours == ref == _entries()
    assert (tmp_path / "ours.json").read_bytes() == (tmp_path / "ref.json").read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))
    # An existing file is read, not downloaded again.
    assert ch07.download_and_load_file(tmp_path / "ours.json", "file:///nonexistent.json") == ours


def test_format_input_matches_the_reference():
    for entry in _entries(20) + [{"instruction": "", "input": "", "output": ""}]:
        assert ch07.format_input(entry) == ref_ch07.format_input(entry)


def test_instruction_dataset_matches_the_reference(tokenizer):
    data = _entries(15)
    ours, ref = ch07.InstructionDataset(data, tokenizer), ref_ch07.InstructionDataset(data, tokenizer)
    assert ours.encoded_texts == ref.encoded_texts and len(ours) == len(ref) == 15
    assert all(ours[i] == ref[i] for i in range(15))
    empty, ref_empty = ch07.InstructionDataset([], tokenizer), ref_ch07.InstructionDataset([], tokenizer)
    assert len(empty) == len(ref_empty) == 0 and empty.encoded_texts == ref_empty.encoded_texts == []

    class Plain:  # any object with encode() works too
        encode = staticmethod(tokenizer.encode)

    assert ch07.InstructionDataset(data, Plain()).encoded_texts == ref.encoded_texts


def _random_batches(seed=0, count=40):
    rng = random.Random(seed)
    for _ in range(count):
        size = rng.randint(1, 5)
        # Short and empty sequences, and pad ids inside a sequence (the reference masks those too).
        yield [[rng.choice([3, 7, 11, 50256, 42]) for _ in range(rng.randint(0, 9))] for _ in range(size)]


def _assert_same(got, expected):
    got = got if isinstance(got, tuple) else (got,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        if b.numel() == 0:  # the reference's torch.tensor([]) of an all-empty batch is float32; ids stay int64
            assert a.shape == b.shape and a.dtype == torch.int64
            continue
        assert a.dtype == b.dtype and a.shape == b.shape and a.is_contiguous() and torch.equal(a, b)


def test_collate_functions_match_the_reference_on_random_batches():
    for batch in _random_batches():
        _assert_same(ch07.custom_collate_draft_1(batch), ref_ch07.custom_collate_draft_1(batch))
        _assert_same(ch07.custom_collate_draft_2(batch, pad_token_id=7),
                     ref_ch07.custom_collate_draft_2(batch, pad_token_id=7))
        for kwargs in ({}, {"allowed_max_length": 1}, {"allowed_max_length": 4}, {"allowed_max_length": 100},
                       {"pad_token_id": 3, "ignore_index": -1}):
            _assert_same(ch07.custom_collate_fn(batch, **kwargs), ref_ch07.custom_collate_fn(batch, **kwargs))


def test_the_books_collate_example():
    batch = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]
    inputs, targets = ch07.custom_collate_fn(batch)
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]]
    assert targets.tolist() == [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [8, 9, 50256, -100, -100]]
    # Tensors and tuples as items; the input lists are not modified.
    assert torch.equal(ch07.custom_collate_fn([torch.tensor([0, 1, 2, 3, 4]), (5, 6), [7, 8, 9]])[1], targets)
    assert batch == [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]
    # Lists of 0-d tensors (list(torch.tensor(...))), as the reference collates them.
    tensor_rows = [list(torch.tensor(row)) for row in batch]
    for fn in (ch07.custom_collate_draft_1, ch07.custom_collate_draft_2, ch07.custom_collate_fn):
        _assert_same(fn(tensor_rows), getattr(ref_ch07, fn.__name__)(tensor_rows))


def test_bad_collate_inputs_are_clear_errors():
    for fn in (ch07.custom_collate_draft_1, ch07.custom_collate_draft_2, ch07.custom_collate_fn):
        with pytest.raises(ValueError, match="batch must be a non-empty list"):
            fn([])
        with pytest.raises(TypeError, match=r"batch\[1\] must hold int token ids, got an element of type str"):
            fn([[1, 2], ["a"]])
        with pytest.raises(TypeError, match=r"batch\[0\] must hold int token ids, got an element of type Tensor"):
            fn([[torch.tensor(1.5)]])
    for bad in (0, -3, 1.5):
        with pytest.raises(ValueError, match="allowed_max_length"):
            ch07.custom_collate_fn([[1, 2]], allowed_max_length=bad)
    with pytest.raises(TypeError, match="ignore_index"):
        ch07.custom_collate_fn([[1, 2]], ignore_index=None)
    for fn in (ch07.custom_collate_draft_1, ch07.custom_collate_draft_2, ch07.custom_collate_fn):
        with pytest.raises(TypeError, match="pad_token_id must be an int token id"):
            fn([[1, 2]], pad_token_id=1.5)  # its targets would never match 1.5: no padding masked


def _loaders(tokenizer, data, batch_size=4, allowed_max_length=40):
    collate = lambda batch: ch07.custom_collate_fn(batch, allowed_max_length=allowed_max_length)  # noqa: E731
    train = ch07.InstructionDataset(data[:12], tokenizer)
    val = ch07.InstructionDataset(data[12:], tokenizer)
    torch.manual_seed(123)
    return (DataLoader(train, batch_size=batch_size, collate_fn=collate, shuffle=True, drop_last=True),
            DataLoader(val, batch_size=batch_size, collate_fn=collate))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_calc_loss_batch_matches_chapter_5s_loss_values_and_gradients(tokenizer, backend):
    ref, ours = twin_models({**TINY, "drop_rate": 0.0})
    inputs, targets = ch07.custom_collate_fn([tokenizer.encode(ch07.format_input(e)) for e in _entries(5)],
                                             allowed_max_length=TINY["context_length"])
    assert (targets == -100).any()
    with ops.use_backend(backend):
        loss = ch07.calc_loss_batch(inputs, targets, ours, "cpu")
    expected = ref_ch05.calc_loss_batch(inputs, targets, ref, "cpu")
    if backend == "torch":
        assert torch.equal(loss, expected)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    loss.backward(), expected.backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        if backend == "torch":
            assert torch.equal(p.grad, q.grad), name
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_rows_run_packed_each_cut_to_its_last_target_rows_without_targets_left_out(monkeypatch):
    from gptfast.finetuning import instruction

    ref, ours = twin_models({**TINY, "drop_rate": 0.0})
    rows = [list(range(100, 100 + n)) for n in (5, 40, 12, 38, 1)]
    inputs, targets = ch07.custom_collate_fn(rows)
    targets[2, :] = -100  # a row without any target adds nothing
    seen = []
    real = instruction.packed_hidden_states
    monkeypatch.setattr(instruction, "packed_hidden_states",
                        lambda m, rs: seen.append([tuple(r.shape) for r in rs]) or real(m, rs))
    loss = ch07.calc_loss_batch(inputs, targets, ours, "cpu")
    expected = ref_ch05.calc_loss_batch(inputs, targets, ref, "cpu")
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    loss.backward(), expected.backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    # One packed sequence of rows 0, 1, 3 and 4 (row 2 has no target), each cut at its last kept
    # target (a row of n tokens keeps n targets: n - 1 tokens and the end-of-text).
    assert seen == [[(5,), (40,), (38,), (1,)]]


@pytest.mark.parametrize("where", ["hook on the head", "forward set on the head"])
def test_a_head_that_computes_otherwise_is_called_by_the_loss(tokenizer, where):
    """The fast path multiplies the kept rows by the head's weight; a hooked or patched head makes it call the model."""
    _, ours = twin_models({**TINY, "drop_rate": 0.0})
    if where == "hook on the head":
        ours.out_head.register_forward_hook(lambda module, args, output: output / 2)
    else:
        forward = ours.out_head.forward
        ours.out_head.forward = lambda x: forward(x) / 2
    inputs, targets = ch07.custom_collate_fn([tokenizer.encode(ch07.format_input(e)) for e in _entries(3)],
                                             allowed_max_length=TINY["context_length"])
    with ops.use_backend("torch"):
        expected = ch07.calc_loss_batch(inputs, targets, ours, "cpu")
    with ops.use_backend("auto"):
        torch.testing.assert_close(ch07.calc_loss_batch(inputs, targets, ours, "cpu"), expected,
                                   atol=1e-6, rtol=1e-6)


def test_packed_rows_give_each_row_its_own_states():
    from gptfast.finetuning.heads import final_hidden_states, packed_hidden_states

    _, ours = twin_models({**TINY, "drop_rate": 0.0})
    rows = [torch.randint(0, TINY["vocab_size"], (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 1, 13)]
    packed = packed_hidden_states(ours, rows)
    alone = torch.cat([final_hidden_states(ours, row.unsqueeze(0))[0] for row in rows])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_row_groups():
    from gptfast.finetuning.instruction import _row_groups

    assert _row_groups([10, 0, 100, 90, 50, 86, 84]) == [([2, 3, 5], 100), ([6], 84), ([4], 50), ([0], 10)]
    assert _row_groups([10, 0, 100, 90], split=False) == [([2, 3, 0], 100)]
    assert _row_groups([0, 0]) == [] and _row_groups([0], split=False) == []


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_inputs_the_cut_rows_would_hide_fail_or_count_as_in_the_reference(backend):
    """Rows are cut at their last kept target only for one target per input token within the model's positions:
    other targets and longer inputs get the reference's computation (its value, or its error)."""
    ref_ch05 = reference("ch05")
    ref, ours = twin_models({**TINY, "vocab_size": 300, "context_length": 8})
    ref.eval(), ours.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 300, (2, 6), generator=g)
    with ops.use_backend(backend):
        for shape in ((2, 5), (1, 6), (3, 6)):
            with pytest.raises(ValueError):
                ch07.calc_loss_batch(x, torch.randint(0, 300, shape, generator=g), ours, "cpu")
        for shape in ((12,), (2, 6, 1)):  # as many targets as tokens: the reference flattens them
            y = torch.randint(0, 300, shape, generator=g)
            expected = ref_ch05.calc_loss_batch(x, y, ref, "cpu")
            torch.testing.assert_close(ch07.calc_loss_batch(x, y, ours, "cpu"), expected, rtol=1e-5, atol=1e-5)
        longer = torch.randint(0, 300, (2, 10), generator=g)  # past the 8 positions, its last targets ignored
        targets = longer.clone()
        targets[:, 6:] = -100
        with pytest.raises(IndexError):
            ref_ch05.calc_loss_batch(longer, targets, ref, "cpu")
        with pytest.raises(IndexError):
            ch07.calc_loss_batch(longer, targets, ours, "cpu")


def test_a_batch_without_targets_gives_nan_like_the_reference():
    ref, ours = twin_models({**TINY, "drop_rate": 0.0})
    inputs, targets = torch.tensor([[1, 2, 3]]), torch.full((1, 3), -100)
    assert torch.isnan(ch07.calc_loss_batch(inputs, targets, ours, "cpu"))
    assert torch.isnan(ref_ch05.calc_loss_batch(inputs, targets, ref, "cpu"))


def _train(train_fn, model, loaders, tokenizer, epochs=1):
    torch.manual_seed(5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
    torch.manual_seed(7)
    return train_fn(model, *loaders, optimizer, "cpu", num_epochs=epochs, eval_freq=2, eval_iter=2,
                    start_context=ch07.format_input(_entries(1, seed=9)[0]), tokenizer=tokenizer)


def test_one_instruction_epoch_is_bitwise_the_reference_with_the_torch_backend(tokenizer, capsys):
    ref, ours = twin_models(TINY)  # dropout 0.1: the same masks are drawn
    loaders = _loaders(tokenizer, _entries(18))
    with ops.use_backend("torch"):
        expected = _train(ref_ch05.train_model_simple, ref, loaders, tokenizer)
        ref_out = capsys.readouterr().out
        got = _train(ch07.train_model_simple, ours, loaders, tokenizer)
        our_out = capsys.readouterr().out
    assert got == expected and len(got[0]) == 2
    assert our_out == ref_out and "Train loss" in our_out
    assert_same_state(ours, ref)


def test_one_instruction_epoch_matches_the_reference_on_the_fast_path(tokenizer, capsys):
    ref, ours = twin_models({**TINY, "drop_rate": 0.0})
    loaders = _loaders(tokenizer, _entries(18))
    expected = _train(ref_ch05.train_model_simple, ref, loaders, tokenizer)
    got = _train(ch07.train_model_simple, ours, loaders, tokenizer)
    capsys.readouterr()
    assert got[0] == pytest.approx(expected[0], rel=1e-5) and got[1] == pytest.approx(expected[1], rel=1e-5)
    assert got[2] == expected[2]
    ours_state, ref_state = ours.state_dict(), ref.state_dict()
    for key in ref_state:
        if not key.endswith("W_key.bias"):  # zero true gradient: AdamW amplifies rounding noise there
            torch.testing.assert_close(ours_state[key], ref_state[key], atol=2e-5, rtol=1e-4)
    torch.manual_seed(3)
    ours_eval = ch07.evaluate_model(ours, *loaders, "cpu", 3)
    torch.manual_seed(3)
    assert ours_eval == pytest.approx(ref_ch05.evaluate_model(ref, *loaders, "cpu", 3), rel=1e-5)


def _book_responses(model, entries, tokenizer, max_new_tokens, context_size, eos_id):
    """Chapter 7's loop: one reference ``generate`` call per entry."""
    responses = []
    for entry in entries:
        input_text = ref_ch07.format_input(entry)
        token_ids = ref_ch05.generate(model=model, idx=ref_ch05.text_to_token_ids(input_text, tokenizer),
                                      max_new_tokens=max_new_tokens, context_size=context_size, eos_id=eos_id)
        generated_text = ref_ch05.token_ids_to_text(token_ids, tokenizer)
        responses.append(generated_text[len(input_text):].replace("### Response:", "").strip())
    return responses


@pytest.mark.parametrize("context_length", [64, 256])
def test_generate_responses_gives_the_books_loop_texts(tokenizer, context_length):
    cfg = {**TINY, "context_length": context_length, "drop_rate": 0.0}
    ref, ours = twin_models(cfg)
    ref.eval()
    entries = _entries(5, seed=4)
    # An end token the model does emit, so that rows stop at different steps.
    first = ref_ch05.generate(ref, ref_ch05.text_to_token_ids(ch07.format_input(entries[0]), tokenizer), 6,
                              context_length)
    eos_id = int(first[0, -3])
    expected = _book_responses(ref, entries, tokenizer, 16, context_length, eos_id)
    got = ch07.generate_responses(ours, entries, tokenizer, max_new_tokens=16, eos_id=eos_id, batch_size=3,
                                  context_size=context_length, response_key="model_response")
    assert got == expected
    assert [e["model_response"] for e in entries] == expected
    assert ch07.generate_responses(ours, entries[:2], tokenizer, max_new_tokens=16, eos_id=eos_id) == expected[:2]
    assert "model_response" not in _entries(5, seed=4)[0]


def test_generate_responses_rejects_bad_arguments(tokenizer):
    _, ours = twin_models()
    with pytest.raises(ValueError, match="entries"):
        ch07.generate_responses(ours, [], tokenizer)
    with pytest.raises(ValueError, match="batch_size"):
        ch07.generate_responses(ours, _entries(1), tokenizer, batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        ch07.generate_responses(ours, _entries(1), tokenizer, max_new_tokens=-1)


# ----------------------------------------------------------------------------- Ollama


class _FakeOllama(http.server.BaseHTTPRequestHandler):
    """Answers /api/chat like Ollama: JSON lines, the reply split over several messages."""

    requests = []
    replies = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, self.headers["Content-Type"], body))
        reply = type(self).replies.pop(0)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.end_headers()
        for i in range(0, len(reply), 2):
            chunk = {"model": body["model"], "message": {"role": "assistant", "content": reply[i:i + 2]},
                     "done": False}
            self.wfile.write((json.dumps(chunk) + "\n").encode())
        self.wfile.write((json.dumps({"done": True, "message": {"role": "assistant", "content": ""}}) + "\n")
                         .encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_ollama():
    _FakeOllama.requests, _FakeOllama.replies = [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeOllama)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api/chat", _FakeOllama
    server.shutdown()
    server.server_close()


def test_query_model_posts_the_deterministic_chat_request(fake_ollama):
    url, handler = fake_ollama
    handler.replies = ["Hello there, I am a llama."] * 2
    assert ch07.query_model("Say hi", model="phi3", url=url) == "Hello there, I am a llama."
    assert ref_ch07.query_model("Say hi", model="phi3", url=url) == "Hello there, I am a llama."
    (path, ctype, ours), (_, _, ref) = handler.requests
    assert path == "/api/chat" and ctype == "application/json" and ours == ref
    assert ours["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048}
    assert ours["messages"] == [{"role": "user", "content": "Say hi"}]


def test_generate_model_scores_asks_the_books_prompt_and_skips_non_numbers(fake_ollama, capsys):
    url, handler = fake_ollama
    entries = [dict(e, model_response=f"answer {i}") for i, e in enumerate(_entries(3))]
    handler.replies = ["85", "not sure", "40"]
    assert ch07.generate_model_scores(entries, "model_response", model="llama3", url=url) == [85, 40]
    assert "Could not convert score: not sure" in capsys.readouterr().out
    prompt = handler.requests[1][2]["messages"][0]["content"]
    assert prompt == (f"Given the input `{ref_ch07.format_input(entries[1])}` and correct output "
                      f"`{entries[1]['output']}`, score the model response `answer 1` on a scale from 0 to 100, "
                      "where 100 is the best score. Respond with the integer number only.")


def test_no_server_is_a_clear_connection_error():
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConnectionError, match="no Ollama server answered.*ollama serve"):
        ch07.query_model("hi", url=f"http://127.0.0.1:{port}/api/chat")
    import urllib.error
    with pytest.raises(urllib.error.URLError, match="^no Ollama server answered"):  # what the reference raises
        ch07.query_model("hi", url=f"http://127.0.0.1:{port}/api/chat")
    with pytest.raises(ConnectionError, match="no Ollama server"):
        ch07.generate_model_scores([dict(_entries(1)[0], r="x")], "r",
                                   url=f"http://127.0.0.1:{port}/api/chat")


def test_check_if_running_looks_at_process_names():
    psutil = pytest.importorskip("psutil")
    own = psutil.Process().name()
    assert ch07.check_if_running(own) is True
    assert ch07.check_if_running("no-such-process-name-3f9c2e") is False
    assert ollama.DEFAULT_CHAT_URL == "http://localhost:11434/api/chat"
