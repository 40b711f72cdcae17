"""gptfast against the real ``llms-from-scratch``: same API, same parameters, same numbers."""

import importlib
import inspect

import pytest
import torch

from gptfast import ops
from gptfast.models import GPT_CONFIG_124M

ref_ch02 = pytest.importorskip("llms_from_scratch.ch02", reason="llms-from-scratch is a test dependency")
import llms_from_scratch.appendix_d as ref_appendix_d  # noqa: E402
import llms_from_scratch.ch04 as ref_ch04  # noqa: E402
import llms_from_scratch.ch05 as ref_ch05  # noqa: E402

import gptfast.appendix_d as appendix_d  # noqa: E402
import gptfast.ch02 as ch02  # noqa: E402
import gptfast.ch04 as ch04  # noqa: E402
import gptfast.ch05 as ch05  # noqa: E402

TINY = {"vocab_size": 50257, "context_length": 32, "emb_dim": 32, "n_heads": 4, "n_layers": 2, "drop_rate": 0.1,
        "qkv_bias": True}
MODULES = ["ch02", "ch03", "ch04", "ch05", "appendix_d"]


def _public_members(module):
    return {name: obj for name, obj in vars(module).items()
            if not name.startswith("_") and getattr(obj, "__module__", None) == module.__name__
            and (inspect.isfunction(obj) or inspect.isclass(obj))}


@pytest.mark.parametrize("chapter", MODULES)
def test_every_public_reference_name_exists_with_the_same_parameters(chapter):
    ref = importlib.import_module(f"llms_from_scratch.{chapter}")
    ours = importlib.import_module(f"gptfast.{chapter}")
    members = _public_members(ref)
    assert members, f"no public members found in {ref.__name__}"
    for name, ref_obj in members.items():
        assert hasattr(ours, name), f"gptfast.{chapter} lacks {name}"
        ref_params = list(inspect.signature(ref_obj).parameters.values())
        our_params = list(inspect.signature(getattr(ours, name)).parameters.values())
        # Same names, kinds and defaults, in order; extra trailing optional parameters are allowed.
        assert [(p.name, p.kind, p.default) for p in our_params[:len(ref_params)]] == \
               [(p.name, p.kind, p.default) for p in ref_params], f"{chapter}.{name} signature differs"
        assert all(p.default is not inspect.Parameter.empty for p in our_params[len(ref_params):])


DROP_IN_MODULES = ["ch02", "ch03", "ch04", "ch05", "ch06", "ch07", "appendix_a", "appendix_d", "appendix_e", "llama3",
                   "qwen3", "kv_cache.gpt2", "kv_cache.llama3", "kv_cache.qwen3", "kv_cache.generate",
                   "kv_cache_batched.qwen3", "kv_cache_batched.generate", "kv_cache_batched.utils"]


def _star_import(module_name):
    names = {}
    exec(f"from {module_name} import *", names)
    return {name: value for name, value in names.items() if name != "__builtins__"}


@pytest.mark.parametrize("module", DROP_IN_MODULES)
def test_a_star_import_gives_the_references_names(module):
    """The reference's modules have no __all__: a star import also gives what they import (torch, nn, plt ...),
    which notebook code may use; and no more, so ch07 does not replace chapter 5's training loop."""
    ref, ours = _star_import(f"llms_from_scratch.{module}"), _star_import(f"gptfast.{module}")
    assert sorted(ours) == sorted(ref)
    for name, value in ref.items():
        if inspect.ismodule(value):  # the same module object (gptfast's own classes and functions differ)
            assert ours[name] is value, name


def test_the_reference_imports_are_loaded_only_when_asked_for():
    import subprocess
    import sys
    code = ("import sys, gptfast.ch06; print('matplotlib.pyplot' in sys.modules); "
            "from gptfast.ch06 import *; print('matplotlib.pyplot' in sys.modules, plt.__name__, urllib.request.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True", "matplotlib.pyplot", "urllib.request"]


def _pair(cfg, seed=123):
    torch.manual_seed(seed)
    ref = ref_ch04.GPTModel(cfg)
    torch.manual_seed(seed)
    ours = ch04.GPTModel(cfg)
    return ref, ours


def _same_output_under_a_seed(ours, ref, idx, seed):
    """Both models' outputs of ``idx``, each after ``torch.manual_seed(seed)`` (the same dropout draws): equal."""
    torch.manual_seed(seed)
    out_ref = ref(idx)
    torch.manual_seed(seed)
    out = ours(idx)
    assert torch.equal(out, out_ref)
    return out, out_ref


def _assert_same_gradients(ours, ref):
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad), f"gradient of {name} differs"


def test_state_dict_keys_order_shapes_and_seeded_values_are_identical():
    ref, ours = _pair(TINY)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(ref_sd) == list(our_sd)
    for key in ref_sd:
        assert ref_sd[key].shape == our_sd[key].shape, key
        assert torch.equal(ref_sd[key], our_sd[key]), f"{key} differs under the same seed"


def test_checkpoints_load_both_ways_strictly():
    ref, ours = _pair(TINY)
    torch.manual_seed(5)
    other = ch04.GPTModel(TINY)
    other.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(other.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), ref.state_dict().values()))


@pytest.mark.parametrize("context_length,count", [(1024, 163_009_536), (256, 162_419_712)])
def test_parameter_count_of_the_book_124m_config(context_length, count):
    # 163,009,536 is the book's chapter-4 figure, for context 1024; chapter 5's context 256
    # has 768 * 768 fewer position-embedding weights.  Both must equal the reference.
    cfg = {**GPT_CONFIG_124M, "context_length": context_length}
    model = ch04.GPTModel(cfg)
    assert sum(p.numel() for p in model.parameters()) == count
    assert sum(p.numel() for p in ref_ch04.GPTModel(cfg).parameters()) == count


# GPT-2's real head size (12 heads of 64) at the chapter-5 context, two layers to keep it quick.
GPT2_SHAPED = {**GPT_CONFIG_124M, "n_layers": 2}


@pytest.mark.parametrize("cfg,seq_len", [(TINY, 17), (GPT2_SHAPED, 1), (GPT2_SHAPED, 200)])
def test_eval_logits_match_the_reference_with_the_default_backend(cfg, seq_len):
    ref, ours = _pair(cfg)
    ref.eval(), ours.eval()
    idx = torch.randint(0, cfg["vocab_size"], (2, seq_len))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), ref(idx), atol=2e-4, rtol=0)


@pytest.mark.parametrize("seq_len", [1, 9, TINY["context_length"]])
def test_training_mode_with_dropout_is_bitwise_identical_with_the_torch_backend(seq_len):
    ref, ours = _pair(TINY)
    idx = torch.randint(0, TINY["vocab_size"], (2, seq_len))
    with ops.use_backend("torch"):
        _same_output_under_a_seed(ours, ref, idx, seed=9)
        target = torch.randint(0, TINY["vocab_size"], (2, seq_len))
        torch.manual_seed(10)
        ch05.calc_loss_batch(idx, target, ours, "cpu").backward()
        torch.manual_seed(10)  # the reference loss with the same dropout draws
        ref_ch05.calc_loss_batch(idx, target, ref, "cpu").backward()
    _assert_same_gradients(ours, ref)


@pytest.mark.parametrize("training", [False, True])
def test_the_fast_variant_is_bitwise_the_references_with_the_torch_backend(training):
    """``GPTModelFast``'s attention is PyTorch's ``scaled_dot_product_attention`` in the reference: the torch
    backend makes the same call, so logits and gradients are bitwise, dropout draws included."""
    torch.manual_seed(0)
    ref = ref_ch04.GPTModelFast(TINY).train(training)
    torch.manual_seed(0)
    ours = ch04.GPTModelFast(TINY).train(training)
    idx = torch.randint(0, TINY["vocab_size"], (2, 11))
    with ops.use_backend("torch"):
        out, out_ref = _same_output_under_a_seed(ours, ref, idx, seed=3)
        out.square().mean().backward()
        out_ref.square().mean().backward()
    _assert_same_gradients(ours, ref)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_inputs_of_no_tokens_give_empty_outputs_as_the_references(backend):
    import llms_from_scratch.ch03 as ref_ch03

    import gptfast.ch03 as ch03

    with ops.use_backend(backend):
        for cls in (ch04.GPTModel, ch04.GPTModelFast):
            assert cls(TINY)(torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0, TINY["vocab_size"])
        for name, args in [("CausalAttention", (8, 6, 16, 0.0)), ("MultiHeadAttention", (8, 6, 16, 0.0, 2)),
                           ("PyTorchMultiHeadAttention", (8, 6, 2))]:
            x = torch.zeros(2, 0, 8, requires_grad=True)
            out, ref_out = getattr(ch03, name)(*args)(x), getattr(ref_ch03, name)(*args)(x)
            assert out.shape == ref_out.shape == (2, 0, 6)
            out.sum().backward()  # connected to the projections, as the reference's
            assert x.grad.shape == x.shape


def test_inputs_the_reference_cannot_take_raise_clear_errors():
    import gptfast.ch03 as ch03

    for att in (ch03.CausalAttention(8, 6, 16, 0.0), ch03.MultiHeadAttention(8, 6, 16, 0.0, 2)):
        with pytest.raises(ValueError, match="17 tokens, more than the attention's context_length"):
            att(torch.zeros(1, 17, 8))
    model = ch04.GPTModel(TINY)
    for shape in [(5,), (1, 2, 3)]:
        with pytest.raises(ValueError, match=r"in_idx must be \(batch, tokens\)"):
            model(torch.zeros(shape, dtype=torch.long))


def test_the_books_two_example_cross_entropy():
    # Chapter 5's example: "every effort moves" -> " effort moves you", "I really like" -> " really like chocolate".
    inputs = torch.tensor([[16833, 3626, 6100], [40, 1107, 588]])
    targets = torch.tensor([[3626, 6100, 345], [1107, 588, 11311]])
    ref, ours = _pair(GPT_CONFIG_124M)
    ref.eval(), ours.eval()
    with torch.no_grad():
        expected = ref_ch05.calc_loss_batch(inputs, targets, ref, "cpu")
        got = ch05.calc_loss_batch(inputs, targets, ours, "cpu")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert 10.0 < float(got) < 11.5  # ~ln(50257) for an untrained model


@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (0.0, 3), (1.4, None), (1.4, 25), (0.7, 1)])
def test_generate_reproduces_the_reference_under_a_seed(temperature, top_k):
    ref, ours = _pair(TINY)
    ref.eval(), ours.eval()
    idx = torch.tensor([[6109, 3626, 6100, 345]])
    with ops.use_backend("torch"):
        torch.manual_seed(321)
        expected = ref_ch05.generate(ref, idx, 40, TINY["context_length"], temperature=temperature, top_k=top_k)
        torch.manual_seed(321)
        got = ch05.generate(ours, idx, 40, TINY["context_length"], temperature=temperature, top_k=top_k)
    assert torch.equal(got, expected)


def test_generate_draws_from_the_models_own_dtype_like_the_reference():
    """Greedy and sampled tokens of float64 and bfloat16 models are the reference's on backend ``torch``: the
    logits are not rounded to float32 first (which merges float64 logits 1e-12 apart)."""
    ref, ours = _pair(TINY)
    for model in (ref, ours):
        model.eval().double()
        with torch.no_grad():  # every position's final features 1, and two logits 1e-12 apart
            model.final_norm.scale.zero_(), model.final_norm.shift.fill_(1.0)
            model.out_head.weight.zero_()
            model.out_head.weight[3] = 1.0
            model.out_head.weight[5] = 1.0 + 1e-12
    idx = torch.tensor([[6109, 3626]])
    with ops.use_backend("torch"):
        expected = ref_ch05.generate(ref, idx, 3, TINY["context_length"])
        assert expected[0, 2:].tolist() == [5, 5, 5]  # the setup does what it says
        assert torch.equal(ch05.generate(ours, idx, 3, TINY["context_length"]), expected)
    ref, ours = _pair(TINY)
    ref.eval().bfloat16(), ours.eval().bfloat16()
    with ops.use_backend("torch"):
        for seed in range(6):
            torch.manual_seed(seed)
            expected = ref_ch05.generate(ref, idx, 12, TINY["context_length"], temperature=1.0)
            torch.manual_seed(seed)
            assert torch.equal(ch05.generate(ours, idx, 12, TINY["context_length"], temperature=1.0), expected)


def test_generate_stops_at_eos_like_the_reference():
    ref, ours = _pair(TINY)
    ref.eval(), ours.eval()
    idx = torch.tensor([[6109, 3626]])
    full = ref_ch05.generate(ref, idx, 12, TINY["context_length"])
    eos = int(full[0, 5])  # the 4th generated token: generation must stop right before it
    expected = ref_ch05.generate(ref, idx, 12, TINY["context_length"], eos_id=eos)
    got = ch05.generate(ours, idx, 12, TINY["context_length"], eos_id=eos)
    assert torch.equal(got, expected)
    assert got.shape[1] < full.shape[1]


def test_batched_generate_with_top_k_and_eos_finishes_rows_independently():
    _, ours = _pair(TINY)
    ours.eval()
    prompts = torch.tensor([[6109, 3626, 6100], [40, 1107, 588]])
    with ops.use_backend("torch"):
        greedy = ch05.generate(ours, prompts, 10, TINY["context_length"], top_k=5)
        eos = int(greedy[0, 5])  # row 0's third new token
        assert eos not in greedy[1, 3:].tolist(), "pick a different prompt: eos would also end row 1"
        out = ch05.generate(ours, prompts, 10, TINY["context_length"], top_k=5, eos_id=eos)
    # Row 0 stops before its eos and is padded with eos; row 1 runs the full 10 tokens.
    assert out.shape == greedy.shape
    assert torch.equal(out[0, :5], greedy[0, :5])
    assert (out[0, 5:] == eos).all()
    assert torch.equal(out[1], greedy[1])
    with ops.use_backend("torch"):
        torch.manual_seed(3)
        sampled = ch05.generate(ours, prompts, 6, TINY["context_length"], temperature=1.0, top_k=4, eos_id=eos)
    assert sampled.shape[0] == 2 and sampled.shape[1] <= 9


def _verdict_text():
    from gptfast.resources import default_text
    return default_text()


def test_dataloaders_yield_the_reference_batches_under_a_seed():
    text = _verdict_text()
    torch.manual_seed(123)
    ref_batches = list(ref_ch02.create_dataloader_v1(text, batch_size=4, max_length=64, stride=32))
    torch.manual_seed(123)
    our_batches = list(ch02.create_dataloader_v1(text, batch_size=4, max_length=64, stride=32))
    assert len(ref_batches) == len(our_batches) > 10
    for (xr, yr), (x, y) in zip(ref_batches, our_batches):
        assert torch.equal(xr, x) and torch.equal(yr, y)


def test_dataset_items_own_their_tokens_like_the_references():
    """Changing one item in place changes that item only (the windows overlap, their tensors do not)."""
    from gptfast.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    text = _verdict_text()[:2000]
    datasets = [module.GPTDatasetV1(text, tokenizer, max_length=8, stride=4) for module in (ref_ch02, ch02)]
    for dataset in datasets:
        x, _ = dataset[0]
        x[5] = 999
    (ref_x0, ref_y0), (x0, y0) = datasets[0][0], datasets[1][0]
    assert torch.equal(x0, ref_x0) and torch.equal(y0, ref_y0) and int(y0[4]) != 999
    assert torch.equal(datasets[1][1][0], datasets[0][1][0])


def _loaders(module, text, cfg, batch_size=2):
    split = int(0.9 * len(text))
    torch.manual_seed(123)
    ctx = cfg["context_length"]
    train = module.create_dataloader_v1(text[:split], batch_size=batch_size, max_length=ctx, stride=ctx,
                                        drop_last=True, shuffle=True, num_workers=0)
    val = module.create_dataloader_v1(text[split:], batch_size=batch_size, max_length=ctx, stride=ctx,
                                      drop_last=False, shuffle=False, num_workers=0)
    return train, val


def test_calc_loss_loader_matches_the_reference():
    text = _verdict_text()
    ref, ours = _pair(TINY)
    ref.eval(), ours.eval()
    with torch.no_grad(), ops.use_backend("torch"):
        ref_loss = ref_ch05.calc_loss_loader(_loaders(ref_ch02, text, TINY)[1], ref, "cpu")
        loss = ch05.calc_loss_loader(_loaders(ch02, text, TINY)[1], ours, "cpu")
    assert loss == ref_loss


def _run_training(chapter_mod, data_mod, model, text, trainer, **kwargs):
    from gptfast.tokenizer import get_tokenizer
    train, val = _loaders(data_mod, text[:6000], TINY)
    torch.manual_seed(77)
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    return getattr(chapter_mod, trainer)(model, train, val, optimizer, "cpu", **kwargs,
                                         start_context="Every effort moves you", tokenizer=get_tokenizer())


def test_train_model_simple_reproduces_the_reference(capsys):
    text = _verdict_text()
    ref, ours = _pair(TINY)
    with ops.use_backend("torch"):
        expected = _run_training(ref_ch05, ref_ch02, ref, text, "train_model_simple", num_epochs=2, eval_freq=3,
                                 eval_iter=2)
        ref_out = capsys.readouterr().out
        got = _run_training(ch05, ch02, ours, text, "train_model_simple", num_epochs=2, eval_freq=3, eval_iter=2)
        our_out = capsys.readouterr().out
    assert got == expected
    assert our_out == ref_out  # same progress lines and samples


def test_appendix_d_train_model_reproduces_the_reference(capsys, monkeypatch):
    """The same losses, rates and gradients, and clipping on the same steps (this model's gradient norms stay
    under 1, so a clip on a step the reference skips would not show in the numbers alone)."""
    text = _verdict_text()
    clip_grad_norm = torch.nn.utils.clip_grad_norm_
    clipped = []

    def counting_clip(*args, **kwargs):
        clipped[-1] += 1
        return clip_grad_norm(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", counting_clip)
    # a warmup of 2.5 steps: both compare the step with it, so the printed version clips from step 3 too
    for orig, warmup_steps in ((False, 3), (True, 3), (True, 2.5)):
        ref, ours = _pair(TINY)
        with ops.use_backend("torch"):
            clipped.append(0)
            expected = _run_training(ref_appendix_d, ref_ch02, ref, text, "train_model", n_epochs=2, eval_freq=4,
                                     eval_iter=1, warmup_steps=warmup_steps, orig_book_version=orig)
            clipped.append(0)
            got = _run_training(appendix_d, ch02, ours, text, "train_model", n_epochs=2, eval_freq=4, eval_iter=1,
                                warmup_steps=warmup_steps, orig_book_version=orig)
        assert got == expected
        assert clipped[-1] == clipped[-2]
        assert torch.equal(appendix_d.find_highest_gradient(ours), ref_appendix_d.find_highest_gradient(ref))
    capsys.readouterr()


def test_appendix_d_warmup_rates_and_highest_gradient_are_the_references():
    """The warmup rate is initial + step * increment, the increment divided first (the other grouping rounds
    differently); the highest gradient is compared parameter by parameter, so a NaN later on is passed over."""
    from gptfast.training.loops import warmup_cosine_lr

    for peak, initial, warmup in ((1e-3, 3e-5, 6), (1e-3, 3e-5, 10), (5e-4, 3e-5, 10)):
        increment = (peak - initial) / warmup
        for step in range(warmup):
            assert warmup_cosine_lr(step, warmup, 100, peak, initial, 1e-6) == initial + step * increment
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    for i, p in enumerate(model.parameters()):
        p.grad = torch.full_like(p, float(i + 1))
    model[1].weight.grad[0, 0] = float("nan")
    expected = ref_appendix_d.find_highest_gradient(model)
    got = appendix_d.find_highest_gradient(model)
    assert torch.equal(got, expected) and got.dtype == expected.dtype


# ----------------------------------------------------------------------------- the user's own modules


def _twins(cfg):
    torch.manual_seed(3)
    ref = ref_ch04.GPTModel(cfg)
    ours = ch04.GPTModel(cfg)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _change(model, case):
    """Apply one user change the fused attention core cannot stand in for."""
    for block in model.trf_blocks:
        att = block.att
        if case == "hook on the attention dropout":
            att.dropout.register_forward_hook(lambda module, args, out: out * 0.5)
        elif case == "dropout replaced by Identity":
            att.dropout = torch.nn.Identity()
        elif case == "mask zeroed (no causality)":
            att.mask.zero_()
        elif case == "each position sees only itself":
            att.mask.copy_(1 - torch.eye(att.mask.shape[0]))
        elif case == "dropout left in training in an eval model":
            att.dropout.train()


CASES = ["hook on the attention dropout", "dropout replaced by Identity", "mask zeroed (no causality)",
         "each position sees only itself", "dropout left in training in an eval model"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_a_changed_attention_mask_or_dropout_module_takes_effect(case, backend):
    """The fused core stands in for the mask and the dropout module only while they are the book's."""
    drop = case == "dropout left in training in an eval model"
    ref, ours = _twins({**TINY, "vocab_size": 300, "drop_rate": 0.5 if drop else 0.0})
    x = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(4))
    for model in (ref, ours):
        model.eval()
        _change(model, case)
    torch.manual_seed(5)
    expected = ref(x)
    with ops.use_backend(backend):
        torch.manual_seed(5)
        got = ours(x)
    if backend == "torch":
        assert torch.equal(got, expected)
    elif drop:  # dropout active in attention, with the fused op's own draws (statistically the same)
        with ops.use_backend(backend):
            assert not torch.equal(ours(x), ours(x))
    else:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_attention_dropout_follows_its_own_module_mode():
    """``model.train()`` then every ``nn.Dropout`` put in eval mode: deterministic, as in the reference."""
    _, ours = _twins({**TINY, "vocab_size": 300, "drop_rate": 0.5})
    ours.train()
    for module in ours.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    x = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(4))
    assert torch.equal(ours(x), ours(x))


@pytest.mark.parametrize("case", ["hook on trf_blocks", "an entry that is not a block",
                                  "each position sees only itself", "a callable, not a module"])
def test_generation_calls_what_it_cannot_stand_in_for(case):
    ref, ours = _twins({**TINY, "vocab_size": 300, "drop_rate": 0.0})
    idx = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(4))
    for model in (ref, ours):
        model.eval()
        if case == "hook on trf_blocks":
            model.trf_blocks.register_forward_hook(lambda module, args, out: out.flip(-1))
        elif case == "an entry that is not a block":
            model.trf_blocks.append(torch.nn.Tanh())
        elif case == "each position sees only itself":
            _change(model, case)
    if case == "a callable, not a module":
        table = torch.randn(300, 300, generator=torch.Generator().manual_seed(6))
        ref = ours = lambda ids: table[ids]  # noqa: E731
    expected = ref_ch05.generate(ref, idx, 6, 16)
    if case != "a callable, not a module":
        unchanged = ch04.GPTModel({**TINY, "vocab_size": 300, "drop_rate": 0.0}).eval()
        unchanged.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.endswith(".mask")},
                                  strict=False)
        assert not torch.equal(ref_ch05.generate(unchanged, idx, 6, 16), expected)  # the change changes tokens
    assert torch.equal(ch05.generate(ours, idx, 6, 16), expected)
    assert torch.equal(ch04.generate_text_simple(ours, idx, 6, 16), ref_ch04.generate_text_simple(ref, idx, 6, 16))


class _PostNormBlock(torch.nn.Module):
    """A user's own block with the book's part names, computing post-norm (the book's is pre-norm)."""

    def __init__(self, cfg):
        super().__init__()
        e = cfg["emb_dim"]
        self.att = ref_ch04.MultiHeadAttention(e, e, cfg["context_length"], cfg["drop_rate"], cfg["n_heads"])
        self.ff = ref_ch04.FeedForward(cfg)
        self.norm1, self.norm2 = ref_ch04.LayerNorm(e), ref_ch04.LayerNorm(e)
        self.drop_resid = torch.nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        x = self.norm1(x + self.drop_resid(self.att(x)))
        return self.norm2(x + self.drop_resid(self.ff(x)))


class _PreNormBlock(_PostNormBlock):
    """The book's block copied into a notebook: the formula the cached passes compute."""

    def forward(self, x):
        x = x + self.drop_resid(self.att(self.norm1(x)))
        return x + self.drop_resid(self.ff(self.norm2(x)))


@pytest.mark.parametrize("block_class,stays_cached", [(_PostNormBlock, False), (_PreNormBlock, True)],
                         ids=["another formula", "a notebook copy"])
def test_generation_checks_classes_of_the_users_own_against_their_forward(block_class, stays_cached, monkeypatch):
    from gptfast.generation import decoding

    cfg = {**TINY, "vocab_size": 300, "drop_rate": 0.0}
    torch.manual_seed(1)
    model = ref_ch04.GPTModel(cfg)
    model.trf_blocks = torch.nn.Sequential(*[block_class(cfg) for _ in range(cfg["n_layers"])])
    model.eval()
    idx = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(4))
    decoders = []
    real_init = decoding.Decoder.__init__
    monkeypatch.setattr(decoding.Decoder, "__init__",
                        lambda self, *a, **k: decoders.append(self) or real_init(self, *a, **k))
    assert torch.equal(ch05.generate(model, idx, 6, 16), ref_ch05.generate(model, idx, 6, 16))
    assert decoders and decoders[-1].probe and decoders[-1].cached == stays_cached


def test_a_changed_mask_is_honoured_under_torch_compile_and_in_inference_mode():
    _, ours = _twins({**TINY, "vocab_size": 300, "drop_rate": 0.0})
    ours.eval()
    x = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(4))
    for block in ours.trf_blocks:
        block.att.mask.zero_()
    eager = ours(x)
    torch.testing.assert_close(torch.compile(ours, backend="eager", fullgraph=True)(x), eager)
    with torch.inference_mode():
        converted = ours.to(torch.float64)  # its buffers become inference tensors, without version counters
        torch.testing.assert_close(converted(x).float(), eager, atol=1e-5, rtol=1e-5)


def test_the_kv_cache_attention_without_a_mask_buffer_runs_a_changed_dropout_module():
    import llms_from_scratch.kv_cache.gpt2 as ref_gpt2

    import gptfast.kv_cache.gpt2 as gpt2

    cfg = {**TINY, "vocab_size": 300, "drop_rate": 0.0}
    torch.manual_seed(3)
    ref = ref_gpt2.GPTModel(cfg).eval()
    ours = gpt2.GPTModel(cfg).eval()
    ours.load_state_dict(ref.state_dict())
    for model in (ref, ours):
        model.trf_blocks[0].att.dropout.register_forward_hook(lambda module, args, out: out * 0.5)
    x = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_a_forward_patched_with_functools_wraps_is_still_the_users(monkeypatch):
    import functools

    from gptfast.models.blocks import overrides_library_forward
    from gptfast.models.gpt import FeedForward

    original = FeedForward.forward
    assert not overrides_library_forward(FeedForward)
    monkeypatch.setattr(FeedForward, "forward", functools.wraps(original)(lambda self, x: original(self, x) * 0))
    assert overrides_library_forward(FeedForward)


def test_a_reference_import_that_is_missing_or_broken_is_only_a_missing_attribute(tmp_path, monkeypatch):
    import sys
    import types
    from gptfast._star import with_reference_imports
    (tmp_path / "broken_for_the_test").mkdir()
    (tmp_path / "broken_for_the_test" / "__init__.py").write_text("raise ImportError('no native part')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = types.ModuleType("drop_in_for_the_test")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    names, getattr_, dir_ = with_reference_imports(module.__name__, ["own"], {
        "json": "json", "absent": "no_such_package_for_the_test", "broken": "broken_for_the_test"})
    module.__getattr__, module.own = getattr_, 1
    assert names == ["own", "json", "broken"]  # an absent package is no star-import name
    assert module.json is __import__("json") and not hasattr(module, "absent") and not hasattr(module, "broken")
    assert {"own", "json", "broken"} <= set(dir_())
    import gptfast.ch05
    assert "plt" in dir(gptfast.ch05) and "generate" in dir(gptfast.ch05)  # tab completion sees them
