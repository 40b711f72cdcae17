"""The matmul-floor script's recording and replay: which products a step runs, their FLOPs, and that
every recorded form (plain, out=, in-place with beta/alpha, batched, oneDNN's linear) replays."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
import torch.nn.functional as F

REPO = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("matmul_floor", REPO / "benchmarks" / "matmul_floor.py")
matmul_floor = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(matmul_floor)

aten = torch.ops.aten


def _by_op(calls):
    counts = {}
    for (func, _), n in calls.items():
        counts[str(func)] = counts.get(str(func), 0) + n
    return counts


def test_records_forward_and_backward_products_of_a_two_layer_mlp():
    torch.manual_seed(0)
    first, second = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)
    x = torch.randn(5, 8)  # no gradient for the input: the first layer's input gradient is never computed

    def step():
        second(torch.relu(first(x))).sum().backward()

    calls = matmul_floor.record_products(step)
    # Two forward addmm; backward: the second layer's input and weight gradients, the first's weight gradient.
    assert _by_op(calls) == {"aten.addmm.default": 2, "aten.mm.default": 3}
    expected = 2 * (5 * 8 * 16 + 5 * 16 * 4) + 2 * (5 * 4 * 16 + 4 * 5 * 16 + 16 * 5 * 8)
    assert matmul_floor.flops(calls) == expected


def test_records_strides_and_counts_repeats():
    a = torch.randn(6, 3)
    b = torch.randn(4, 3)

    def step():
        for _ in range(3):
            torch.mm(a, b.t())

    calls = matmul_floor.record_products(step)
    assert list(calls.values()) == [3]
    (func, args), = calls
    assert func == aten.mm.default
    assert args[1] == matmul_floor.TensorLayout((3, 4), (1, 3), torch.float32)  # the transposed view, as run


@pytest.mark.parametrize("form", ["mm.out", "addmm_", "addmm.out", "bmm", "baddbmm", "linear_pointwise"])
def test_every_recorded_form_replays(form):
    a, b = torch.randn(6, 5), torch.randn(5, 7)
    if form == "mm.out":
        step = lambda: torch.mm(a, b, out=torch.empty(6, 7))  # noqa: E731
        op, gflop = aten.mm.out, 2 * 6 * 5 * 7
    elif form == "addmm_":
        acc = torch.zeros(6, 7)
        step = lambda: acc.addmm_(a, b, beta=0.5, alpha=2.0)  # noqa: E731
        op, gflop = aten.addmm_.default, 2 * 6 * 5 * 7
    elif form == "addmm.out":
        step = lambda: torch.addmm(torch.zeros(7), a, b, beta=0.0, out=torch.empty(6, 7))  # noqa: E731
        op, gflop = aten.addmm.out, 2 * 6 * 5 * 7
    elif form == "bmm":
        step = lambda: torch.bmm(a.expand(2, 6, 5), b.expand(2, 5, 7))  # noqa: E731
        op, gflop = aten.bmm.default, 2 * 2 * 6 * 5 * 7
    elif form == "baddbmm":
        step = lambda: torch.baddbmm(torch.zeros(2, 6, 7), a.expand(2, 6, 5), b.expand(2, 5, 7), alpha=3)  # noqa: E731
        op, gflop = aten.baddbmm.default, 2 * 2 * 6 * 5 * 7
    else:
        linear = matmul_floor._linear_pointwise()
        if linear is None or not torch.backends.mkldnn.is_available():
            pytest.skip("no oneDNN linear in this torch build")
        w = torch.randn(7, 5)
        step = lambda: linear(a, w, None, "none", [], "")  # noqa: E731
        op, gflop = linear.default, 2 * 6 * 5 * 7
    calls = matmul_floor.record_products(step)
    assert [func for func, _ in calls] == [op]
    assert matmul_floor.flops(calls) == gflop
    seconds, rows = matmul_floor.product_floor(calls)
    assert seconds > 0 and rows[0][1] == 1


def test_replayed_product_computes_the_recorded_shape():
    x, w = torch.randn(4, 3), torch.randn(2, 3)
    calls = matmul_floor.record_products(lambda: F.linear(x, w, torch.zeros(2)))
    (key,) = calls
    func, args = key
    out = matmul_floor._bound_call(func, matmul_floor._materialize(args))()
    assert out.shape == (4, 2)


def test_rejects_rounds_below_one(capsys):
    with pytest.raises(SystemExit) as exc:
        matmul_floor.main(["flce", "--rounds", "0"])
    assert exc.value.code == 2
    assert "--rounds" in capsys.readouterr().err
