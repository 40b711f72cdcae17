"""How far a CPU step is from its matmul floor: the step's own dense products, replayed alone.

    python benchmarks/matmul_floor.py {train|ch06|ch07|llama|llama-book|flce} [--rounds N]

Every dense product ATen runs during one step (``mm``, ``addmm``, ``addmm_``, ``bmm``,
``baddbmm``, oneDNN's ``_linear_pointwise``; forward and backward) is recorded with its
shapes, strides and dtype.  Each distinct product is then run alone on fresh tensors of the
same layout and its best time, times how often the step ran it, summed: the step's
**matmul floor**, what the step would take if everything but those products cost nothing.
The operands are warm in cache when a product is timed alone, so the floor errs low.
Products inside gptfast's own kernels (the attention's tiles) are not ATen calls and count
as the rest of the step.

The reference's step and gptfast's step at the same shape are timed in turn, round after
round, in the same run.  ``reference step / gptfast floor`` is the largest speedup any
implementation doing gptfast's products at torch's matmul speed could reach on this
machine; ``floor / step`` is the share of each step spent in products.

Cases (the benchmarks' own shapes and steps):

* ``train``: GPT-2 124M, context 256, batch 2, dropout 0.1: the reference's model, chapter 5's
  loss and a plain AdamW against the step ``gptfast train`` runs (``test_bench_train``'s
  ``gptfast-cli``), here without the command's host-memory setting;
* ``ch06``: ``test_bench_finetuning``'s classification step (batch 8 x 120, last block trainable);
* ``ch07``: ``test_bench_finetuning``'s instruction step (batch 8, 60-119 tokens padded);
* ``llama``, ``llama-book``: ``test_bench_llama_train``'s step (8 layers, 512 wide, batch 4, context 256),
  the user's loop and chapter 5's;
* ``flce``: the fused linear cross-entropy fwd+bwd, N=512 H=768 V=50257, backend ``torch``
  (the reference's way) against ``cpu``.

Prints a markdown section.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import profile

aten = torch.ops.aten


def _linear_pointwise():
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return getattr(mkldnn, "_linear_pointwise", None) if mkldnn is not None else None


# The dense products a step runs through ATen, by the profiler's event name: the op overload
# for each count of tensor arguments (an out= form has one more).
PRODUCT_OPS = {
    "aten::mm": {2: aten.mm.default, 3: aten.mm.out},
    "aten::addmm": {3: aten.addmm.default, 4: aten.addmm.out},
    "aten::addmm_": {3: aten.addmm_.default},
    "aten::bmm": {2: aten.bmm.default, 3: aten.bmm.out},
    "aten::baddbmm": {3: aten.baddbmm.default},
    "aten::baddbmm_": {3: aten.baddbmm_.default},
}
_ONEDNN_LINEAR = _linear_pointwise()
if _ONEDNN_LINEAR is not None:  # with and without a bias
    PRODUCT_OPS["mkldnn::_linear_pointwise"] = {2: _ONEDNN_LINEAR.default, 3: _ONEDNN_LINEAR.default}


class TensorLayout(collections.namedtuple("TensorLayout", "shape stride dtype")):
    """What a replay needs of a recorded tensor argument: its shape, strides and dtype (not its values)."""

    def make(self) -> torch.Tensor:
        """A fresh tensor of this layout, filled with small normal values (no denormals, no NaN)."""
        span = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride)) if all(self.shape) else 0
        return torch.randn(span).mul_(0.1).to(self.dtype).as_strided(self.shape, self.stride)


def _describe(value):
    """A hashable description of one recorded argument: tensors by layout, lists element-wise, the rest as is."""
    if hasattr(value, "sizes") and hasattr(value, "strides"):
        return TensorLayout(tuple(value.sizes), tuple(value.strides), value.dtype)
    if isinstance(value, (list, tuple)):
        return tuple(_describe(v) for v in value)
    return value


def _materialize(value):
    if isinstance(value, TensorLayout):
        return value.make()
    if isinstance(value, tuple):
        return [_materialize(v) for v in value]
    return value


def _product_key(event):
    """``(op overload, argument descriptions)`` of a profiled product event."""
    args = tuple(_describe(i) for i in event.extra_fields.inputs)
    tensors = sum(isinstance(a, TensorLayout) for a in args)
    overloads = PRODUCT_OPS[event.name]
    return overloads.get(tensors, overloads[max(overloads)]), args


def _collect(events, calls) -> int:
    """Count the product events under ``events`` into ``calls``; their total nanoseconds."""
    nanoseconds = 0
    for event in events:
        if event.name in PRODUCT_OPS:
            calls[_product_key(event)] += 1  # its children are the product's own work
            nanoseconds += event.duration_time_ns
        else:
            nanoseconds += _collect(event.children, calls)
    return nanoseconds


def record_products(step) -> collections.Counter:
    """The products one call of ``step()`` runs through ATen, forward and backward: ``{(op, args): count}``.

    The counter's ``in_step_seconds`` attribute is their summed wall time within that (profiled) step.

    Read from torch.profiler's recorded inputs (shapes and strides) rather than a dispatch
    mode, which gptfast's ops would take for tracing and answer with another path.
    """
    with profile(record_shapes=True) as prof:
        step()
    calls = collections.Counter()
    calls.in_step_seconds = _collect(prof.profiler.kineto_results.experimental_event_tree(), calls) / 1e9
    return calls


def _bound_call(func, args):
    """``func`` applied to the recorded ``args`` (profiler order: tensors and scalars positionally, out last)."""
    kwargs = {}
    if func.__name__.startswith("_linear_pointwise"):
        args = [*args[:3], "none", [], ""]  # the profiler does not record strings: the plain product
    if func._overloadname == "out":
        *args, kwargs["out"] = args
    if func.__name__.split(".")[0] in ("addmm", "addmm_", "baddbmm", "baddbmm_") and len(args) == 5:
        *args, kwargs["beta"], kwargs["alpha"] = args  # keyword-only in the schema
    return lambda: func(*args, **kwargs)


def replay_seconds(key, repeats: int = 3) -> float:
    """Best time of one recorded product run alone on fresh tensors of its layout (after one warm-up call)."""
    func, args = key
    run = _bound_call(func, _materialize(args))
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def product_floor(calls: collections.Counter) -> tuple[float, list]:
    """Total seconds of ``calls`` replayed alone, and per product ``(seconds in the step, count, op, shapes)``."""
    rows = []
    for key, count in calls.items():
        seconds = replay_seconds(key) * count
        shapes = [a.shape for a in key[1] if isinstance(a, TensorLayout)]
        rows.append((seconds, count, str(key[0]), shapes))
    rows.sort(key=lambda r: -r[0])
    return sum(r[0] for r in rows), rows


def flops(calls: collections.Counter) -> float:
    """Floating-point operations of ``calls`` (2 per multiply-add)."""
    total = 0.0
    for (func, args), count in calls.items():
        tensors = [a for a in args if isinstance(a, TensorLayout)]
        if func._overloadname == "out":
            tensors.pop()
        name = func.__name__.split(".")[0]
        if name in ("mm", "addmm", "addmm_"):
            a, b = tensors[-2:]
            total += 2 * a.shape[0] * a.shape[1] * b.shape[1] * count
        elif name in ("bmm", "baddbmm", "baddbmm_"):
            a, b = tensors[-2:]
            total += 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2] * count
        else:  # oneDNN's linear: (rows, in) by weight (out, in)
            x, w = tensors[:2]
            total += 2 * x.shape[0] * x.shape[1] * w.shape[0] * count
    return total


# ----------------------------------------------------------------------------- the cases

BENCH_DIR = Path(__file__).resolve().parent


def _train_steps(out_dir):
    import test_bench_train as bench

    return {impl: bench._cpu_step(impl, out_dir) for impl in ("reference", "gptfast-cli")}


def _ch06_steps(out_dir):
    import test_bench_finetuning as bench

    return {impl: bench._ch06_step(impl) for impl in bench.IMPLS}


def _ch07_steps(out_dir):
    import test_bench_finetuning as bench

    return {impl: bench._ch07_step(impl)[0] for impl in bench.IMPLS}


def _llama_steps(loop):
    """``test_bench_llama_train``'s steps in ``loop`` ("user" or "book"), one per package."""
    def steps(out_dir):
        import test_bench_llama_train as bench

        cfg = bench._config()
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg["vocab_size"], (bench.BATCH, bench.CONTEXT + 1), generator=g)
        x, y = tokens[:, :-1], tokens[:, 1:]
        return {impl: bench._step(impl, loop, x, y)[0] for impl in bench.IMPLS}

    return steps


def _flce_steps(out_dir):
    from gptfast import ops

    n, h, v = 512, 768, 50257
    torch.manual_seed(0)
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (torch.randn(v, h) * 0.02).requires_grad_()
    targets = torch.randint(0, v, (n,))

    def make(backend):
        def step():
            hidden.grad = weight.grad = None
            ops.linear_cross_entropy(hidden, weight, targets, backend=backend).backward()
        return step

    return {"torch path": make("torch"), "gptfast (cpu)": make("cpu")}


CASES = {
    "train": ("GPT-2 124M training step, context 256, batch 2, dropout 0.1", _train_steps),
    "ch06": ("ch06 classification step, GPT-2 124M, batch 8 x 120 tokens, last block and head trainable",
             _ch06_steps),
    "ch07": ("ch07 instruction step, GPT-2 124M, batch 8 of 60-119 tokens padded", _ch07_steps),
    "llama": ("Llama-shaped training step, 8 layers, 512 wide, GQA 8/2, batch 4, context 256, the user's loop",
              _llama_steps("user")),
    "llama-book": ("Llama-shaped training step, 8 layers, 512 wide, GQA 8/2, batch 4, context 256, "
                   "chapter 5's loop", _llama_steps("book")),
    "flce": ("linear cross-entropy fwd+bwd, N=512 H=768 V=50257", _flce_steps),
}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def measure(case: str, rounds: int, setting: str = "malloc as it is") -> str:
    """Time the case's steps in turn, record and replay their products; the markdown section."""
    title, make_steps = CASES[case]
    with tempfile.TemporaryDirectory() as out_dir:
        steps = make_steps(out_dir)
        for step in steps.values():  # warm-up: optimizer state, allocator, first-call setup
            step()
        times = {impl: [] for impl in steps}
        for _ in range(rounds):
            for impl, step in steps.items():
                start = time.perf_counter()
                step()
                times[impl].append(time.perf_counter() - start)
        calls = {impl: record_products(step) for impl, step in steps.items()}
    floors = {impl: product_floor(c) for impl, c in calls.items()}
    reference, ours = list(steps)
    median = {impl: statistics.median(t) for impl, t in times.items()}
    lines = [f"## {case}: {title}", "",
             f"At {_commit()}, torch {torch.__version__}, {torch.get_num_threads()} threads, load "
             f"{os.getloadavg()[0]:.2f}; {rounds} rounds in turn; {setting}.", "",
             "| | step (median) | products | GFLOP | products in a step | products alone (floor) | GFLOP/s alone "
             "| floor / step |", "|---|---|---|---|---|---|---|---|"]
    for impl in steps:
        floor = floors[impl][0]
        gflop = flops(calls[impl]) / 1e9
        lines.append(f"| {impl} | {median[impl]:.3f} s | {sum(calls[impl].values())} | {gflop:.1f} "
                     f"| {calls[impl].in_step_seconds:.3f} s | {floor:.3f} s "
                     f"| {gflop / floor:.0f} | {floor / median[impl]:.0%} |")
    lines += ["", f"Measured speedup: {median[reference] / median[ours]:.2f}x. Largest speedup {ours}'s products "
              f"allow (reference step / {ours} floor): {median[reference] / floors[ours][0]:.2f}x.", "",
              f"{ours}'s costliest products:", "", "| seconds in the step | calls | op | shapes |", "|---|---|---|---|"]
    for seconds, count, name, shapes in floors[ours][1][:8]:
        lines.append(f"| {seconds:.3f} | {count} | {name} | {' x '.join(str(list(s)) for s in shapes)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("case", choices=sorted(CASES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="keep freed host memory for reuse, as gptfast's training commands set up their process "
                             "(process-wide: every implementation gets it)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    sys.path.insert(0, str(BENCH_DIR))
    setting = "malloc as it is"
    if args.keep_freed_memory:
        from gptfast.training.host_memory import keep_freed_host_memory

        setting = f"freed host memory kept ({keep_freed_host_memory()})"
    print(measure(args.case, args.rounds, setting))
    return 0


if __name__ == "__main__":
    sys.exit(main())
