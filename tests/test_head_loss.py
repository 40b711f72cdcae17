"""The next-token loss with the output head fused into it (gptfast.finetuning.heads.next_token_loss),
as chapter 5's ``calc_loss_batch`` uses it: same numbers as the model's logits through the
cross-entropy, the ``(b, t, vocab)`` logits never built where a fused backend serves the head,
and the plain path wherever the head cannot be split off."""

from __future__ import annotations

import pytest
import torch

import parity
from gptfast import ch05, ops
from gptfast.finetuning import heads
from gptfast.models import GPTModel, GPTModelFast, blocks, gpt2_config
from parity import needs_cpu_backend

VOCAB = 300


def _model(cls=GPTModel, seed=5):
    torch.manual_seed(seed)
    return cls(gpt2_config("tiny", vocab_size=VOCAB, drop_rate=0.0)).train()


def _batch(seed=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (2, 11), generator=g)
    y = torch.randint(0, VOCAB, (2, 11), generator=g)
    y[1, 7:] = -100  # padding, as chapter 7's collate writes it
    return x, y


def _loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _head_calls(model, monkeypatch):
    """Shapes of the inputs the head's logits are computed for: the head called (spied on ``nn.Linear``'s class,
    so that the head stays a plain linear) or its weight multiplied by the models' ``apply_linear``."""
    calls, forward, dense_linear = [], torch.nn.Linear.forward, blocks.dense_linear

    def spy(self, h):
        if self is model.out_head:
            calls.append(h.shape)
        return forward(self, h)

    def spy_logits(x, weight, bias):
        if weight is model.out_head.weight:
            calls.append(x.shape)
        return dense_linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.Linear, "forward", spy)
    monkeypatch.setattr(blocks, "dense_linear", spy_logits)
    return calls


def _fused_loss_calls(monkeypatch):
    """Shapes of the hidden states ``ops.linear_cross_entropy`` is called with."""
    calls, fused = [], ops.linear_cross_entropy

    def spy(hidden, weight, *args, **kwargs):
        calls.append(hidden.shape)
        return fused(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(ops, "linear_cross_entropy", spy)
    return calls


@needs_cpu_backend
@pytest.mark.parametrize("cls", [GPTModel, GPTModelFast])
def test_fused_head_loss_matches_the_logits_path_without_building_logits(cls, monkeypatch):
    x, y = _batch()
    model = _model(cls)
    with ops.use_backend("torch"):
        ref_loss, ref_grads = _loss_and_grads(model, lambda: torch.nn.functional.cross_entropy(
            model(x).flatten(0, 1), y.flatten()))
    calls, fused = _head_calls(model, monkeypatch), _fused_loss_calls(monkeypatch)
    with ops.use_backend("cpu"):
        assert heads.head_is_separable(model)
        loss, grads = _loss_and_grads(model, lambda: ch05.calc_loss_batch(x, y, model, "cpu"))
    assert calls == [] and fused == [torch.Size([22, 64])]  # the head ran inside the fused linear cross-entropy
    parity.assert_close(loss, ref_loss, torch.float32, "fused head loss")
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


def test_torch_backend_runs_the_reference_way(monkeypatch):
    x, y = _batch()
    model = _model()
    calls = _head_calls(model, monkeypatch)
    with ops.use_backend("torch"):
        loss = ch05.calc_loss_batch(x, y, model, "cpu")
    assert calls == [torch.Size([2, 11, 64])]  # model(x): the full logits, then the loss
    assert torch.equal(loss, torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()))


class _ScaledHead(GPTModel):
    def forward(self, in_idx):
        return super().forward(in_idx) * 0.5


class _ScaledLinear(torch.nn.Linear):
    def forward(self, x):
        return super().forward(x) * 0.5


def _halve_calls(module):
    """Set a ``forward`` on ``module``'s instance (as wrappers do) that halves what it returns."""
    forward = module.forward
    module.forward = lambda *args: forward(*args) * 0.5


@needs_cpu_backend
@pytest.mark.parametrize("case", ["forward overridden", "hook on the head", "hook on the model", "global hook",
                                  "LoRA-style head", "forward set on the head", "forward set on the model",
                                  "linear subclass head", "backward hook on the head", "backward hook on the model"])
def test_models_whose_head_cannot_be_split_off_keep_their_forward(case, request):
    x, y = _batch()
    model = _model(_ScaledHead if case == "forward overridden" else GPTModel)
    if case == "hook on the head":
        model.out_head.register_forward_hook(lambda m, i, out: out * 0.5)
    elif case == "hook on the model":
        model.register_forward_hook(lambda m, i, out: out * 0.5)
    elif case == "global hook":  # registered for every module, acting on the head's logits
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda m, i, out: out * 0.5 if m is model.out_head else None)
        request.addfinalizer(handle.remove)
    elif case == "LoRA-style head":
        from gptfast.appendix_e import LinearWithLoRA
        torch.manual_seed(1)
        model.out_head = LinearWithLoRA(model.out_head, rank=2, alpha=4)
        torch.nn.init.normal_(model.out_head.lora.B)
    elif case == "forward set on the head":
        _halve_calls(model.out_head)
    elif case == "forward set on the model":
        _halve_calls(model)
    elif case == "linear subclass head":
        head = model.out_head
        model.out_head = _ScaledLinear(head.in_features, head.out_features, bias=False)
        model.out_head.weight = head.weight
    elif case.startswith("backward hook"):
        target = model.out_head if case.endswith("head") else model
        target.register_full_backward_pre_hook(lambda module, grad_output: tuple(g * 0.5 for g in grad_output))
    assert not heads.head_is_separable(model)
    with ops.use_backend("cpu"):
        loss, grads = _loss_and_grads(model, lambda: ch05.calc_loss_batch(x, y, model, "cpu"))
    with ops.use_backend("torch"):  # the oracle calls every module as the reference does
        expected, expected_grads = _loss_and_grads(model, lambda: torch.nn.functional.cross_entropy(
            model(x).flatten(0, 1), y.flatten()))
    parity.assert_close(loss, expected, torch.float32, case)
    for name, g in grads.items():
        torch.testing.assert_close(g, expected_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


@needs_cpu_backend
@pytest.mark.parametrize("case", ["forward set on the head", "linear subclass head"])
def test_the_models_forward_calls_a_head_with_a_forward_of_its_own(case):
    """The model's forward computes a plain head from its weight; any other head is called."""
    x, _ = _batch()
    model = _model()
    if case == "forward set on the head":
        _halve_calls(model.out_head)
    else:
        head = model.out_head
        model.out_head = _ScaledLinear(head.in_features, head.out_features, bias=False)
        model.out_head.weight = head.weight
    with ops.use_backend("torch"):
        expected = model(x)
    with ops.use_backend("cpu"):
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- Llama 3 and Qwen3


def _rotary_pair(family, cls_name, cfg_extra):
    """The reference's ``family`` model and gptfast's, built under the same seed, with a tiny config."""
    import importlib

    ref = pytest.importorskip(f"llms_from_scratch.{family}", reason="llms-from-scratch is a test dependency")
    ours = importlib.import_module(f"gptfast.{family}")
    cfg = dict(vocab_size=VOCAB, context_length=16, emb_dim=32, n_heads=4, n_layers=2, hidden_dim=48,
               n_kv_groups=2, dtype=torch.float32, **cfg_extra)
    torch.manual_seed(3)
    r = getattr(ref, cls_name)(cfg).train()
    torch.manual_seed(3)
    return _materialize_experts(r), _materialize_experts(getattr(ours, cls_name)(cfg).train())


def _materialize_experts(model):
    """Seeded real weights for the linear layers built on the meta device (the mixture's experts), in module order."""
    g = torch.Generator().manual_seed(4)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.is_meta:
            module.weight = torch.nn.Parameter(torch.randn(module.weight.shape, generator=g) * 0.2)
    return model


_LLAMA = dict(rope_base=500_000.0, rope_freq={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_context_length": 8})
_QWEN = dict(rope_base=1_000_000.0, head_dim=8, qk_norm=True, num_experts=0)
_QWEN_MOE = dict(_QWEN, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24)
ROTARY_MODELS = [pytest.param("llama3", "Llama3Model", _LLAMA, id="llama3"),
                 pytest.param("llama3", "Llama3ModelFast", _LLAMA, id="llama3-fast"),
                 pytest.param("qwen3", "Qwen3Model", _QWEN, id="qwen3"),
                 pytest.param("qwen3", "Qwen3Model", dict(_QWEN, qk_norm=False), id="qwen3-no-qknorm"),
                 pytest.param("qwen3", "Qwen3Model", _QWEN_MOE, id="qwen3-moe")]


@needs_cpu_backend
@pytest.mark.parametrize("family, cls_name, extra", ROTARY_MODELS)
def test_llama_and_qwen_models_train_through_the_fused_head_loss_like_the_reference(family, cls_name, extra,
                                                                                     monkeypatch):
    """Chapter 5's loss on a Llama 3 / Qwen3 model: the reference's loss and gradients, the logits never built."""
    ref_ch05 = pytest.importorskip("llms_from_scratch.ch05", reason="llms-from-scratch is a test dependency")
    x, y = _batch()
    r, model = _rotary_pair(family, cls_name, extra)
    expected, expected_grads = _loss_and_grads(r, lambda: ref_ch05.calc_loss_batch(x, y, r, "cpu"))
    calls, fused = _head_calls(model, monkeypatch), _fused_loss_calls(monkeypatch)
    with ops.use_backend("cpu"):
        assert heads.head_is_separable(model)
        loss, grads = _loss_and_grads(model, lambda: ch05.calc_loss_batch(x, y, model, "cpu"))
    assert calls == [] and fused == [torch.Size([22, 32])]  # the head ran inside the fused linear cross-entropy
    parity.assert_close(loss, expected, torch.float32, f"{cls_name} fused head loss")
    assert grads.keys() == expected_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, expected_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


# Not the fast variants: the reference's runs scaled_dot_product_attention, equal to the plain model up to rounding.
@pytest.mark.parametrize("family, cls_name, extra", [ROTARY_MODELS[0], ROTARY_MODELS[2]])
def test_llama_and_qwen_models_with_the_torch_backend_are_bitwise_the_reference(family, cls_name, extra, monkeypatch):
    ref_ch05 = pytest.importorskip("llms_from_scratch.ch05", reason="llms-from-scratch is a test dependency")
    x, y = _batch()
    r, model = _rotary_pair(family, cls_name, extra)
    expected, expected_grads = _loss_and_grads(r, lambda: ref_ch05.calc_loss_batch(x, y, r, "cpu"))
    calls = _head_calls(model, monkeypatch)
    with ops.use_backend("torch"):
        loss, grads = _loss_and_grads(model, lambda: ch05.calc_loss_batch(x, y, model, "cpu"))
    assert calls == [torch.Size([2, 11, 32])]  # model(x): the full logits, then the loss
    assert torch.equal(loss, expected)
    for name, g in grads.items():
        assert torch.equal(g, expected_grads[name]), name


@pytest.mark.parametrize("case", ["llama3 forward overridden", "qwen3 forward overridden", "hook on the head",
                                  "llama3 KV-cache model", "qwen3 KV-cache model", "qwen3 batched model"])
def test_llama_and_qwen_models_whose_head_cannot_be_split_off_are_called(case):
    import importlib

    family = "qwen3" if case.startswith("qwen3") else "llama3"
    cls_name = "Qwen3Model" if family == "qwen3" else "Llama3Model"
    extra = _QWEN if family == "qwen3" else _LLAMA
    cfg = dict(vocab_size=VOCAB, context_length=16, emb_dim=32, n_heads=4, n_layers=2, hidden_dim=48,
               n_kv_groups=2, dtype=torch.float32, **extra)
    if case.endswith("KV-cache model"):
        module = importlib.import_module(f"gptfast.kv_cache.{family}")
    elif case == "qwen3 batched model":
        module = importlib.import_module("gptfast.kv_cache_batched.qwen3")
    else:
        module = importlib.import_module(f"gptfast.{family}")
    cls = getattr(module, cls_name)
    if case.endswith("forward overridden"):
        cls = type("Scaled", (cls,), {"forward": lambda self, idx: super(cls, self).forward(idx) * 0.5})
    torch.manual_seed(3)
    model = cls(cfg)
    if case == "hook on the head":
        model.out_head.register_forward_hook(lambda m, i, out: out * 0.5)
    assert not heads.head_is_separable(model)
    x, y = _batch()
    with ops.use_backend("cpu"):
        loss = ch05.calc_loss_batch(x, y, model, "cpu")
    with ops.use_backend("torch"):
        expected = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    parity.assert_close(loss, expected, torch.float32, case)
