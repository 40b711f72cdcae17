"""Appendix E (LoRA) and appendix A (toy network) against the reference: initial values, outputs,
gradients, parameter counts, frozen base weights, and no ``A @ B`` or base-weight gradient ever built."""

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from book_reference import TINY, reference, twin_models
from gptfast import appendix_a, appendix_e, ops

ref_e = reference("appendix_e")
ref_a = reference("appendix_a")


def _twin_lora(in_dim=48, out_dim=40, rank=4, alpha=8.0, bias=True):
    torch.manual_seed(0)
    base = torch.nn.Linear(in_dim, out_dim, bias=bias)
    pair = []
    for module in (ref_e, appendix_e):
        linear = torch.nn.Linear(in_dim, out_dim, bias=bias)
        linear.load_state_dict(base.state_dict())
        torch.manual_seed(1)
        pair.append(module.LinearWithLoRA(linear, rank, alpha))
    for layer in pair:  # B starts at zero; give it values so the update shows in every output
        with torch.no_grad():
            layer.lora.B.copy_(torch.linspace(-1, 1, rank * out_dim).view(rank, out_dim))
    return pair


def test_lora_layer_initial_values_and_keys_match_the_reference():
    for shape in ((768, 768, 16, 16), (5, 3, 1, 0.5)):
        torch.manual_seed(123)
        ref = ref_e.LoRALayer(*shape)
        torch.manual_seed(123)
        ours = appendix_e.LoRALayer(*shape)
        assert list(ours.state_dict()) == list(ref.state_dict()) == ["A", "B"]
        assert torch.equal(ours.A, ref.A) and torch.equal(ours.B, ref.B) and ours.alpha == ref.alpha
        x = torch.randn(2, 3, shape[0])
        with torch.no_grad():
            ours.B.normal_(), ref.B.copy_(ours.B)
        assert torch.equal(ours(x), ref(x))


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("bias,shape", [(True, (2, 5, 48)), (False, (7, 48)), (True, (48,))])
def test_linear_with_lora_outputs_and_gradients_match_the_reference(backend, bias, shape):
    ref, ours = _twin_lora(bias=bias)
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(shape)
    x_ref = x.clone().requires_grad_()
    x = x.requires_grad_()
    with ops.use_backend(backend):
        out = ours(x)
    expected = ref(x_ref)
    weight = torch.randn_like(expected)
    (out * weight).sum().backward()
    (expected * weight).sum().backward()
    pairs = [("out", out, expected), ("x.grad", x.grad, x_ref.grad)]
    pairs += [(name, p.grad, q.grad) for (name, p), q in zip(ours.named_parameters(), ref.parameters())]
    for name, a, b in pairs:
        if backend == "torch":
            assert torch.equal(a, b), name
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def _book_lora_pair(cfg, rank=4, alpha=8):
    """Appendix E's recipe on twin GPTs: freeze everything, then wrap every Linear (the head included)."""
    models = twin_models(cfg)
    for model, module in zip(models, (ref_e, appendix_e)):
        for p in model.parameters():
            p.requires_grad = False
        torch.manual_seed(5)
        module.replace_linear_with_lora(model, rank=rank, alpha=alpha)
    return models


def _trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_replace_linear_with_lora_gives_the_references_model():
    ref, ours = _book_lora_pair(TINY)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name
    assert _trainable(ours) == _trainable(ref) > 0
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    wrapped = [m for m in ours.modules() if isinstance(m, appendix_e.LinearWithLoRA)]
    assert len(wrapped) == TINY["n_layers"] * 6 + 1  # q, k, v, out_proj, two feed-forward layers; the head


def test_the_books_124m_lora_parameter_count():
    # The book: 124,441,346 parameters for the classifier; 2,666,528 trainable after LoRA (rank 16).
    from gptfast.models import GPT_CONFIG_124M

    cfg = {**GPT_CONFIG_124M, "context_length": 1024, "qkv_bias": True}
    with torch.device("meta"):
        _, ours = twin_models(cfg)
        ours.out_head = torch.nn.Linear(768, 2)
    assert _trainable(ours) == 124_441_346
    ours.requires_grad_(False)
    appendix_e.replace_linear_with_lora(ours, rank=16, alpha=16)
    assert _trainable(ours) == 2_666_528


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_a_lora_training_step_matches_the_reference_and_leaves_base_weights_without_gradients(backend):
    cfg = {**TINY, "drop_rate": 0.0}
    ref, ours = _book_lora_pair(cfg)
    idx = torch.randint(0, cfg["vocab_size"], (2, 9))
    targets = torch.randint(0, cfg["vocab_size"], (2, 9))
    ref_ch05 = reference("ch05")
    from gptfast import ch05

    for model, module in ((ours, ch05), (ref, ref_ch05)):
        # SGD: AdamW would turn rounding noise in near-zero gradients into full-size steps.
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for _ in range(2):
            optimizer.zero_grad()
            with ops.use_backend(backend):
                module.calc_loss_batch(idx, targets, model, "cpu").backward()
            optimizer.step()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        if not p.requires_grad:
            assert p.grad is None, f"{name} is frozen but got a gradient buffer"
        if backend == "torch":
            assert torch.equal(p, q), name
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


class _ShapeLog(TorchDispatchMode):
    """Records the shape of every new tensor an aten op produces (views such as ``W.t()`` allocate nothing)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.shapes.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_no_weight_sized_tensor_is_built_when_the_base_is_frozen(backend):
    in_dim, out_dim = 48, 40
    layer = appendix_e.LinearWithLoRA(torch.nn.Linear(in_dim, out_dim), rank=3, alpha=2, freeze_base=True)
    assert not layer.linear.weight.requires_grad and not layer.linear.bias.requires_grad
    x = torch.randn(6, 5, in_dim)
    log = _ShapeLog()
    with ops.use_backend(backend), log:
        layer(x).sum().backward()
    # Neither A @ B nor a gradient of the base weight: nothing of the weight's size or its transpose.
    weight_sized = [(f, s) for f, s in log.shapes if s in ((in_dim, out_dim), (out_dim, in_dim))]
    assert weight_sized == [] and log.shapes
    assert layer.linear.weight.grad is None and layer.linear.bias.grad is None
    assert layer.lora.A.grad.shape == (in_dim, 3) and layer.lora.B.grad.shape == (3, out_dim)


def test_freeze_base_in_replace_linear_with_lora():
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Linear(5, 2)))
    appendix_e.replace_linear_with_lora(model, rank=2, alpha=1, freeze_base=True)
    assert _trainable(model) == (4 * 2 + 2 * 5) + (5 * 2 + 2 * 2)
    assert isinstance(model[2][0], appendix_e.LinearWithLoRA)


def test_bad_lora_arguments_are_clear_errors():
    for bad_rank, error in ((-2, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match="rank"):
            appendix_e.LoRALayer(4, 4, bad_rank, 1.0)
        with pytest.raises(error, match="rank"):
            appendix_e.replace_linear_with_lora(torch.nn.Linear(2, 2), bad_rank, 1.0)
    with pytest.raises(TypeError, match="alpha"):
        appendix_e.LinearWithLoRA(torch.nn.Linear(2, 2), 1, "big")
    with pytest.raises(ValueError, match="in_dim"):
        appendix_e.LoRALayer(0, 4, 2, 1.0)
    with pytest.raises(TypeError, match="linear"):
        appendix_e.LinearWithLoRA(torch.nn.Conv1d(2, 2, 1), 1, 1.0)


def test_what_the_reference_accepts_works_the_same():
    """Rank 0 (no update), a tensor alpha (learnable: it gets a gradient) and a wrapped module that is not an
    nn.Linear but says its sizes: the reference takes them, so gptfast does, with the same outputs."""
    import llms_from_scratch.appendix_e as ref_appendix_e

    class Scaled(torch.nn.Module):  # a linear layer of the user's own
        def __init__(self):
            super().__init__()
            self.inner, self.in_features, self.out_features = torch.nn.Linear(6, 5), 6, 5

        def forward(self, x):
            return 2 * self.inner(x)

    x = torch.randn(3, 6)
    for make_base, rank, alpha in ((lambda: torch.nn.Linear(6, 5), 0, 2.0),
                                   (lambda: torch.nn.Linear(6, 5), 2, torch.nn.Parameter(torch.tensor(1.5))),
                                   (Scaled, 2, 3.0)):
        outputs = []
        for module in (ref_appendix_e, appendix_e):
            torch.manual_seed(0)
            base = make_base()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's warning on initialising a rank-0 matrix
                layer = module.LinearWithLoRA(base, rank, alpha)
            torch.nn.init.normal_(layer.lora.B)  # a trained update, so alpha matters
            outputs.append(layer(x))
        torch.testing.assert_close(outputs[1], outputs[0])
        if isinstance(alpha, torch.Tensor):
            alpha.grad = None
            outputs[1].sum().backward()
            assert alpha.grad is not None


# ----------------------------------------------------------------------------- appendix A


def test_neural_network_matches_the_reference_under_a_seed():
    torch.manual_seed(123)
    ref = ref_a.NeuralNetwork(50, 3)
    torch.manual_seed(123)
    ours = appendix_a.NeuralNetwork(50, 3)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == 2213  # the appendix's count
    x = torch.rand(4, 50)
    assert torch.equal(ours(x), ref(x))
    with pytest.raises(ValueError, match="num_outputs"):
        appendix_a.NeuralNetwork(2, 0)


def test_toy_dataset_matches_the_reference():
    X = torch.tensor([[-1.2, 3.1], [-0.9, 2.9], [-0.5, 2.6], [2.3, -1.1], [2.7, -1.5]])
    y = torch.tensor([0, 0, 0, 1, 1])
    ours, ref = appendix_a.ToyDataset(X, y), ref_a.ToyDataset(X, y)
    assert len(ours) == len(ref) == 5
    for i in range(5):
        assert all(torch.equal(a, b) for a, b in zip(ours[i], ref[i]))
    with pytest.raises(ValueError, match="X and y"):
        appendix_a.ToyDataset(X, y[:3])


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_appendix_e_classifier_loss_and_gradients_match_the_reference(backend):
    # Appendix E fine-tunes chapter 6's classifier: a 2-class head, then LoRA on every Linear.
    cfg = {**TINY, "drop_rate": 0.0}
    models = twin_models(cfg)
    for model, module in zip(models, (ref_e, appendix_e)):
        torch.manual_seed(3)
        model.out_head = torch.nn.Linear(cfg["emb_dim"], 2)
        model.requires_grad_(False)
        torch.manual_seed(5)
        module.replace_linear_with_lora(model, rank=4, alpha=8)
        for m in model.modules():  # non-zero B, so that the update reaches the loss
            if hasattr(m, "B") and isinstance(m.B, torch.nn.Parameter):
                with torch.no_grad():
                    m.B.copy_(torch.linspace(-0.5, 0.5, m.B.numel()).view_as(m.B))
    ref, ours = models
    from gptfast import ch06

    ref_ch06 = reference("ch06")
    idx, labels = torch.randint(0, cfg["vocab_size"], (3, 11)), torch.tensor([1, 0, 1])
    with ops.use_backend(backend):
        loss = ch06.calc_loss_batch(idx, labels, ours, "cpu")
    expected = ref_ch06.calc_loss_batch(idx, labels, ref, "cpu")
    loss.backward(), expected.backward()
    pairs = [("loss", loss, expected)] + [(n, p.grad, q.grad) for (n, p), q in
                                         zip(ours.named_parameters(), ref.parameters()) if p.requires_grad]
    assert len(pairs) > 20
    scale = max(float(b.detach().abs().max()) for _, _, b in pairs[1:])
    for name, a, b in pairs:
        if backend == "torch":
            assert torch.equal(a, b), name
        # fp32 rounding through every layer and the fused attention kernels: an absolute error of
        # ~1e-3 of the largest gradient, which small gradients (the last block's queries) feel most.
        torch.testing.assert_close(a, b, atol=1e-3 * scale, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")


def test_a_lora_model_generates_like_the_reference():
    """Generation walks a model's layers only when its projections are plain linear layers; a LoRA-wrapped GPT
    runs the model's own forward each step, as the reference's loop does."""
    from gptfast import ch04

    ref_ch04 = reference("ch04")
    ref, ours = _book_lora_pair(TINY)
    for model in (ref, ours):
        for module in model.modules():
            if isinstance(module, (ref_e.LoRALayer, appendix_e.LoRALayer)):
                with torch.no_grad():
                    module.B.normal_(generator=torch.Generator().manual_seed(2))
    ref.eval(), ours.eval()
    idx = torch.tensor([[5, 17, 300, 42]])
    expected = ref_ch04.generate_text_simple(ref, idx, 6, TINY["context_length"])
    for backend in ("torch", "auto"):
        with ops.use_backend(backend):
            assert torch.equal(ch04.generate_text_simple(ours, idx, 6, TINY["context_length"]), expected)


def test_lora_under_autocast_returns_the_autocast_dtype():
    ref_layer, ours = _twin_lora()
    x = torch.randn(3, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = ref_layer(x)
        for backend in ("torch", "auto"):
            with ops.use_backend(backend):
                got = ours(x)
            assert got.dtype == expected.dtype == torch.bfloat16
            torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("change", ["hook on the linear", "hook on the lora", "pruned linear"])
def test_the_parts_of_a_lora_layer_run_their_own_forward(change):
    """The fused sum reads the parts' weights: a hook (pruning's too) on a part sends it through the parts."""
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    layer = appendix_e.LinearWithLoRA(torch.nn.Linear(6, 5), rank=2, alpha=4)
    torch.nn.init.normal_(layer.lora.B)
    x = torch.randn(3, 6, requires_grad=True)
    if change == "hook on the linear":
        layer.linear.register_forward_hook(lambda module, args, out: out * 0)
    elif change == "hook on the lora":
        layer.lora.register_forward_hook(lambda module, args, out: out * 0)
    else:
        prune.l1_unstructured(layer.linear, "weight", 0.5)
    with ops.use_backend("torch"):
        expected = layer(x)
    for _ in range(2):  # pruning recomputes its weight each call: twice shows the backward is sound
        got = layer(x)
        got.sum().backward()
    torch.testing.assert_close(got, expected)
