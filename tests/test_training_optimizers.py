"""The book's loops step a user's plain AdamW with torch's fused update on a fused backend, and leave it as given."""

from __future__ import annotations

import pytest
import torch

from gptfast import ops
from gptfast.training.optimizers import fused_optimizer_steps


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(37, 19)), torch.nn.Parameter(torch.randn(19))]


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def _step_ops(optimizer):
    """Names of the ATen ops one ``optimizer.step()`` runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        optimizer.step()
    return {event.name for event in prof.events()}


def _steps(optimizer, params, seeds, fused_block):
    for seed in seeds:
        _grads(params, seed)
        if fused_block:
            with fused_optimizer_steps(optimizer):
                optimizer.step()
        else:
            optimizer.step()


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=4e-4, weight_decay=0.1),
    lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=0.01, amsgrad=True),
], ids=["adamw", "adam-amsgrad"])
def test_steps_in_the_block_are_fused_and_agree_with_the_books_to_rounding(make):
    book_params, fused_params = _params(), _params()
    book, ours = make(book_params), make(fused_params)
    _steps(book, book_params, range(3), fused_block=False)
    with ops.use_backend("auto"), fused_optimizer_steps(ours):
        assert all(group["fused"] is True for group in ours.param_groups)
        _grads(fused_params, 0)
        assert any("fused_adam" in name for name in _step_ops(ours))
        _steps(ours, fused_params, (1, 2), fused_block=False)
    assert all(group["fused"] is None for group in ours.param_groups)  # left as the user built it
    _grads(fused_params, 3)
    assert not any("fused_adam" in name for name in _step_ops(ours))
    _grads(book_params, 3)
    book.step()
    start = _params()
    for a, b, s in zip(fused_params, book_params, start):
        assert not torch.equal(a, s)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # The state the fused steps kept is the book's layout: it loads into a plain optimizer and steps on.
    plain = torch.optim.AdamW(_params(), lr=4e-4)
    plain.load_state_dict(ours.state_dict())
    assert plain.param_groups[0]["fused"] is None
    assert {k: v.dtype for k, v in ours.state[fused_params[0]].items()} == \
        {k: v.dtype for k, v in book.state[book_params[0]].items()}
    assert ours.state[fused_params[0]]["step"].device.type == "cpu"


def test_backend_torch_leaves_the_books_optimizer_bitwise():
    book_params, our_params = _params(), _params()
    book = torch.optim.AdamW(book_params, lr=4e-4, weight_decay=0.1)
    ours = torch.optim.AdamW(our_params, lr=4e-4, weight_decay=0.1)
    _steps(book, book_params, range(3), fused_block=False)
    with ops.use_backend("torch"):
        with fused_optimizer_steps(ours):
            assert ours.param_groups[0]["fused"] is None
        _steps(ours, our_params, range(3), fused_block=True)
    assert all(torch.equal(a, b) for a, b in zip(our_params, book_params))


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, foreach=False),
    lambda ps: torch.optim.AdamW(ps, foreach=True),
    lambda ps: torch.optim.AdamW(ps, fused=False),
    lambda ps: torch.optim.SGD(ps, lr=0.1),
    lambda ps: type("MyAdamW", (torch.optim.AdamW,), {})(ps),
], ids=["foreach-false", "foreach-true", "fused-false", "sgd", "subclass"])
def test_an_optimizer_whose_owner_chose_its_implementation_is_not_touched(make):
    optimizer = make(_params())
    before = [dict((k, v) for k, v in group.items() if k != "params") for group in optimizer.param_groups]
    with ops.use_backend("auto"), fused_optimizer_steps(optimizer):
        after = [dict((k, v) for k, v in group.items() if k != "params") for group in optimizer.param_groups]
    assert after == before


def test_only_the_groups_that_can_take_it_are_fused():
    chosen = [torch.nn.Parameter(torch.randn(3, 4))]  # its owner chose the single-tensor path
    integer = [torch.zeros(3, dtype=torch.int64)]  # not a float parameter: the fused kernel refuses it
    optimizer = torch.optim.AdamW([{"params": _params()}, {"params": chosen, "foreach": False}])
    optimizer.add_param_group({"params": integer})
    with ops.use_backend("auto"), fused_optimizer_steps(optimizer):
        assert [group["fused"] for group in optimizer.param_groups] == [True, None, None]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_parameters_keep_the_books_update(dtype):
    """The book's AdamW computes in the parameters' dtype, the fused one in float32: in float16 eps=1e-8 rounds to
    0, so a parameter without gradient turns NaN in the book's update and stays finite in the fused one."""
    from gptfast.training.optimizers import chapter_adamw

    def trained(backend):
        torch.manual_seed(0)
        weights = torch.nn.Parameter(torch.ones(4, dtype=dtype))
        with ops.use_backend(backend):
            optimizer = chapter_adamw([weights], lr=0.1, weight_decay=0.0)
            assert optimizer.param_groups[0].get("fused") in (None, False)
            with fused_optimizer_steps(optimizer):
                assert optimizer.param_groups[0]["fused"] in (None, False)
                weights.grad = torch.tensor([1.0, 0.0, -1.0, 0.0], dtype=dtype)
                optimizer.step()
        return weights.detach()

    fused_backend, book = trained("auto"), trained("torch")
    torch.testing.assert_close(fused_backend, book, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(book).any() == (dtype == torch.float16)


def test_a_torch_without_fused_cpu_kernels_keeps_the_books_path(monkeypatch):
    from gptfast.training import optimizers

    optimizer = torch.optim.AdamW(_params())
    with ops.use_backend("auto"), fused_optimizer_steps(optimizer):
        assert optimizer.param_groups[0]["fused"] is True
    monkeypatch.setattr(optimizers, "_torch_fuses_adam_on_cpu", lambda: False)
    with ops.use_backend("auto"), fused_optimizer_steps(optimizer):
        assert optimizer.param_groups[0]["fused"] is None


def test_the_groups_are_restored_when_the_block_raises():
    optimizer = torch.optim.AdamW(_params())
    with pytest.raises(KeyError), ops.use_backend("auto"), fused_optimizer_steps(optimizer):
        raise KeyError("inside the loop")
    assert optimizer.param_groups[0]["fused"] is None


def test_the_books_loops_step_inside_the_block(monkeypatch):
    """Each loop steps with the groups fused, and hands the optimizer back as it came."""
    from gptfast.finetuning import classification
    from gptfast.training import loops

    seen = []

    def record(optimizer, args, kwargs):
        seen.append(optimizer.param_groups[0]["fused"])

    model = torch.nn.Linear(4, 3)
    batches = [(torch.randn(2, 4), torch.tensor([0, 2]))] * 2
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.register_step_pre_hook(record)
    loss = lambda x, y, m, d: torch.nn.functional.cross_entropy(m(x), y)  # noqa: E731
    monkeypatch.setattr(loops, "generate_and_print_sample", lambda *a: None)
    monkeypatch.setattr(loops, "calc_loss_batch", loss)
    monkeypatch.setattr(classification, "calc_loss_batch", loss)
    monkeypatch.setattr(classification, "calc_accuracy_loader", lambda *a, **k: 0.5)
    with ops.use_backend("auto"):
        loops.train_simple_with_loss(loss, model, batches, batches, optimizer, "cpu", 1, 100, 1, "", None)
        loops.train_model(model, batches, batches, optimizer, "cpu", 1, 100, 1, "", None, warmup_steps=1)
        classification.train_classifier_simple(model, batches, batches, optimizer, "cpu", 1, 100, 1)
    with ops.use_backend("torch"):
        loops.train_simple_with_loss(loss, model, batches, batches, optimizer, "cpu", 1, 100, 1, "", None)
    assert seen == [True] * 6 + [None] * 2
    assert optimizer.param_groups[0]["fused"] is None


@pytest.mark.parametrize("eval_freq, eval_iter, error, name", [
    (0, 1, ValueError, "eval_freq"), (1, 0, ValueError, "eval_iter"), (1.5, 1, TypeError, "eval_freq"),
], ids=["eval_freq=0", "eval_iter=0", "eval_freq=1.5"])
def test_the_books_loops_refuse_a_bad_evaluation_schedule_before_any_step(monkeypatch, eval_freq, eval_iter, error,
                                                                          name):
    """The reference fails only at its first evaluation, after a step has changed the model; these fail first."""
    from gptfast.training import loops

    model = torch.nn.Linear(4, 3)
    batches = [(torch.randn(2, 4), torch.tensor([0, 2]))] * 2
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps = []
    optimizer.register_step_pre_hook(lambda *a: steps.append(1))
    loss = lambda x, y, m, d: torch.nn.functional.cross_entropy(m(x), y)  # noqa: E731
    monkeypatch.setattr(loops, "generate_and_print_sample", lambda *a: None)
    monkeypatch.setattr(loops, "calc_loss_batch", loss)
    with pytest.raises(error, match=name):
        loops.train_model_simple(model, batches, batches, optimizer, "cpu", 1, eval_freq, eval_iter, "", None)
    with pytest.raises(error, match=name):
        loops.train_model(model, batches, batches, optimizer, "cpu", 1, eval_freq, eval_iter, "", None,
                          warmup_steps=1)
    assert steps == []
