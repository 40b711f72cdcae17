"""End-to-end training-step benchmarks: gptfast against llms-from-scratch in the same run.

CPU: GPT-2 124M, context 256, batch 2, fp32: one AdamW step (forward, backward,
update) of

* ``reference``: ``llms_from_scratch``'s GPTModel and ``calc_loss_batch``,
* ``gptfast-dropin``: gptfast's GPTModel (ops backend "auto") with its ``calc_loss_batch``,
  the same optimizer: only the kernels differ,
* ``gptfast-cli``: the step of ``gptfast train`` (the main job): the drop-in with the chapter's
  optimizer as the command builds it (``chapter_adamw``: torch's fused AdamW on a fused backend),
* ``gptfast-train``: one step of ``gptfast.train``'s Trainer (padded vocab, fused linear
  cross-entropy, fused AdamW, grad clipping).

The two commands' variants step in a worker process of their own with the host-memory setting
the commands apply to their process (``gptfast.training.host_memory``: freed blocks kept for
reuse); the reference and the drop-in step in the benchmark's process with malloc as it is, as a
user's script runs them.  All variants step in turn, one at a time.

GPU: GPT-2 124M, context 1024, batch 16, bf16, compiled: the reference's optimized
recipe (``gpu/reference_recipe.py``) against ``gptfast.train``'s Trainer; tokens/s and MFU in
``extra_info``.  Both use dropout 0.1 and no gradient clipping, like the recipe.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from bench_utils import DEVICE, ON_GPU, record_interleaved, run_benchmark

CPU_CONTEXT, CPU_BATCH = 256, 2
GPU_CONTEXT, GPU_BATCH = 1024, 16


def _book_config():
    from gptfast.models import GPT_CONFIG_124M

    return dict(GPT_CONFIG_124M)


def _random_batch(batch, context, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, 50257, (batch, context + 1), generator=g)
    return rows[:, :-1].to(DEVICE), rows[:, 1:].to(DEVICE)


def _trainer(model, context, batch, out_dir, compile_, dtype, grad_clip, dropout):
    from gptfast import train

    config = train.parse_config([
        "--model", model, "--context-length", str(context), "--batch-size", str(batch), "--max-steps", "1000",
        "--warmup-steps", "10", "--device", str(DEVICE), "--dtype", dtype, "--out-dir", out_dir,
        "--grad-clip", str(grad_clip), "--dropout", str(dropout), "--no-progress",
        "--compile" if compile_ else "--no-compile"])
    return train.Trainer(config, device=DEVICE)


def _step_and_extra(trainer):
    """Per-step closure over successive steps of a Trainer, and its MFU inputs."""
    counter = iter(range(10**9))
    return (lambda: trainer.train_step(next(counter))), trainer.flops_per_token, trainer.peak_flops


def _add_rates(benchmark, tokens_per_step, flops_per_token=None, peak=None):
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return
    tps = tokens_per_step / stats.stats.median
    benchmark.extra_info["tokens_per_s"] = tps
    if flops_per_token and peak:
        benchmark.extra_info["mfu"] = tps * flops_per_token / peak


def _release():
    gc.collect()
    if ON_GPU:
        torch._dynamo.reset()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- CPU

CPU_IMPLS = ("reference", "gptfast-dropin", "gptfast-cli", "gptfast-train")
# The variants that are a gptfast command's step, which runs in the command's own process.
COMMAND_IMPLS = ("gptfast-cli", "gptfast-train")


class _StepWorker:
    """One variant's training step in a child process set up as its command sets up its own.

    The child applies ``keep_freed_host_memory`` (process-wide, so it must not reach the other
    variants), builds the step with ``_cpu_step`` and runs one step per request; a request
    returns the step's seconds as the child timed them.
    """

    def __init__(self, impl):
        self.impl = impl
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--step-worker", impl],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=Path(__file__).resolve().parent)
        self.note = self._reply().removeprefix("ready ")

    def _reply(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.impl} step worker exited with {self.proc.wait()}")
        return line.strip()

    def __call__(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return float(self._reply())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _serve_steps(impl):
    """The worker's side of :class:`_StepWorker`: one timed step per line read from stdin."""
    from gptfast.training.host_memory import keep_freed_host_memory

    note = keep_freed_host_memory()
    with tempfile.TemporaryDirectory() as out_dir:
        step = _cpu_step(impl, out_dir)
        print("ready", note, flush=True)
        for _ in sys.stdin:
            t0 = time.perf_counter()
            step()
            print(time.perf_counter() - t0, flush=True)


def _cpu_step(impl, out_dir):
    """A closure running one training step of ``impl`` at the CPU shape."""
    if impl == "gptfast-train":
        trainer = _trainer("gpt2", CPU_CONTEXT, CPU_BATCH, out_dir, False, "fp32", 1.0, 0.1)
        return _step_and_extra(trainer)[0]
    torch.manual_seed(123)
    if impl == "reference":
        from llms_from_scratch.ch04 import GPTModel
        from llms_from_scratch.ch05 import calc_loss_batch
    else:
        from gptfast.models import GPTModel
        from gptfast.training import calc_loss_batch
    model = GPTModel(_book_config()).to(DEVICE).train()
    if impl == "gptfast-cli":
        from gptfast.training.optimizers import chapter_adamw

        optimizer = chapter_adamw(model.parameters(), lr=4e-4, weight_decay=0.1)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    x, y = _random_batch(CPU_BATCH, CPU_CONTEXT)

    def step():
        optimizer.zero_grad()
        calc_loss_batch(x, y, model, DEVICE).backward()
        optimizer.step()

    return step


@pytest.mark.skipif(ON_GPU, reason="the CPU end-to-end shape; the GPU comparison is test_gpu_train_step")
def test_cpu_train_step_interleaved(benchmark):
    """The CPU variants stepped in turn, round after round, so shared-machine load hits all alike.

    pytest-benchmark times whole rounds (one step of each); the per-variant medians and
    tokens/s are in ``extra_info`` (``report.py`` expands them into one row each).
    """
    from gptfast import ops

    tokens = CPU_BATCH * CPU_CONTEXT
    times = {impl: [] for impl in CPU_IMPLS}
    workers = {impl: _StepWorker(impl) for impl in COMMAND_IMPLS}
    try:
        with tempfile.TemporaryDirectory() as out_dir:
            steps = {impl: _cpu_step(impl, out_dir) for impl in CPU_IMPLS if impl not in workers}
            rotation = iter(range(10**9))

            def one_round():
                offset = next(rotation)
                first = offset % len(CPU_IMPLS)
                order = CPU_IMPLS[first:] + CPU_IMPLS[:first]  # rotate who goes first
                for impl in order:
                    if impl in workers:
                        times[impl].append(workers[impl]())
                        continue
                    t0 = time.perf_counter()
                    steps[impl]()
                    times[impl].append(time.perf_counter() - t0)

            run_benchmark(benchmark, one_round, rounds=3, group=f"train step GPT-2 124M ctx {CPU_CONTEXT} batch "
                          f"{CPU_BATCH} fp32 (interleaved)", op="train_step", impl="all variants, interleaved",
                          shape=dict(B=CPU_BATCH, T=CPU_CONTEXT, model="124M"), dtype="float32",
                          tokens_per_step=tokens, backend=ops.get_backend(),
                          command_processes={impl: w.note for impl, w in workers.items()})
    finally:
        for worker in workers.values():
            worker.close()
    medians = record_interleaved(benchmark, times)
    benchmark.extra_info["per_impl_tokens_per_s"] = {impl: tokens / m for impl, m in medians.items()}
    _release()


# ----------------------------------------------------------------------------- GPU


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["reference-recipe", "gptfast-train"])
def test_gpu_train_step(benchmark, impl):
    from gptfast import ops, train

    torch.cuda.reset_peak_memory_stats()
    tokens = GPU_BATCH * GPU_CONTEXT
    group = f"train step GPT-2 124M ctx {GPU_CONTEXT} batch {GPU_BATCH} bf16 compiled"
    info = dict(op="train_step", impl=impl, shape=dict(B=GPU_BATCH, T=GPU_CONTEXT, model="124M"), dtype="bfloat16",
                tokens_per_step=tokens)
    peak = train.device_peak_flops(DEVICE, "bf16", None)
    flops = train.flops_per_token(train.gpt2_config("gpt2", context_length=GPU_CONTEXT), GPU_CONTEXT)
    recipe = trainer = None
    with tempfile.TemporaryDirectory() as out_dir:
        if impl == "reference-recipe":
            from gpu.reference_recipe import ReferenceRecipe, random_batch

            recipe = ReferenceRecipe(context_length=GPU_CONTEXT, device=DEVICE)
            x, y = random_batch(GPU_BATCH, GPU_CONTEXT, DEVICE)
            fn = lambda: recipe.train_step(x, y)  # noqa: E731
            info["model_source"] = recipe.model_source
        else:
            trainer = _trainer("gpt2", GPU_CONTEXT, GPU_BATCH, out_dir, True, "bf16", 0.0, 0.1)
            fn, flops, peak = _step_and_extra(trainer)
            info["backend"] = ops.get_backend()
        for _ in range(3):  # compilation and autotuning happen here, outside the timing
            fn()
        torch.cuda.synchronize()
        run_benchmark(benchmark, fn, rounds=15, group=group, **info)
    benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    _add_rates(benchmark, tokens, flops, peak)
    fn = recipe = trainer = None  # drop the model before freeing the cache for the next variant
    _release()


if __name__ == "__main__" and sys.argv[1:2] == ["--step-worker"]:
    _serve_steps(sys.argv[2])
