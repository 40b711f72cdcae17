"""A small Llama-3-shaped model's training step: gptfast against ``llms_from_scratch``, same run.

The shape is Llama 3.2's layout scaled down to train on a laptop CPU: 8 layers, 512 wide,
8 query heads sharing 2 key/value heads (grouped-query ratio 4), SwiGLU hidden 1536,
a 32000-token vocabulary, RoPE with Llama 3's frequency scaling, context 256, batch 4,
fp32, AdamW.  Two loops, each run by both packages:

* ``user loop``: the user's own step (``F.cross_entropy`` on the model's logits, ``backward``,
  ``optimizer.step``); only the import line of the model differs, so whatever gptfast gains
  comes from its model (fused attention over grouped k/v, fused norms and RoPE).
* ``book loop``: the step of chapter 5's ``train_model_simple``, each package's own:
  ``calc_loss_batch`` then the user's ``torch.optim.AdamW`` step.  gptfast's runs the output head
  inside the fused linear cross-entropy (the logits are never built) and steps the optimizer
  inside ``fused_optimizer_steps``, as its ``train_model_simple`` does.

The two implementations step in turn, round after round, so load on a shared machine
hits both alike; ``extra_info`` has per-implementation medians, tokens/s and
``speedup_vs_reference``, and ``loss_difference`` (first-step losses, same seed and batch).

``GPTFAST_BENCH_LLAMA_TRAIN_TINY=1`` shrinks the model (2 layers, 64 wide) and the rounds
to check that the file runs; its numbers mean nothing.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

from bench_utils import ON_GPU, run_interleaved

TINY = os.environ.get("GPTFAST_BENCH_LLAMA_TRAIN_TINY") == "1"
BATCH, CONTEXT = (2, 32) if TINY else (4, 256)
ROUNDS = 1 if TINY else 3
IMPLS = ("reference", "gptfast")
pytestmark = pytest.mark.skipif(ON_GPU, reason="CPU fp32 shape")


def _config():
    size = (dict(emb_dim=64, n_heads=4, n_layers=2, hidden_dim=128, n_kv_groups=2, vocab_size=1000) if TINY else
            dict(emb_dim=512, n_heads=8, n_layers=8, hidden_dim=1536, n_kv_groups=2, vocab_size=32000))
    return {**size, "context_length": CONTEXT, "rope_base": 500000.0, "dtype": torch.float32,
            "rope_freq": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_context_length": 8192}}


def _model_class(impl):
    if impl == "reference":
        from llms_from_scratch.llama3 import Llama3Model
    else:
        from gptfast.llama3 import Llama3Model
    return Llama3Model


def _user_loss(impl):
    """The user's loss: ``F.cross_entropy`` on the model's logits, whichever package built the model."""
    return lambda x, y, model: F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def _book_loss(impl):
    """Chapter 5's ``calc_loss_batch`` of ``impl``'s package."""
    if impl == "reference":
        from llms_from_scratch.ch05 import calc_loss_batch
    else:
        from gptfast.ch05 import calc_loss_batch
    return lambda x, y, model: calc_loss_batch(x, y, model, "cpu")


def _optimizer_steps(impl, loop, optimizer):
    """What the optimizer steps inside: gptfast's chapter 5 loop steps in ``fused_optimizer_steps``."""
    if impl == "gptfast" and loop == "book":
        from gptfast.training.optimizers import fused_optimizer_steps
        return fused_optimizer_steps(optimizer)
    return contextlib.nullcontext()


def _step(impl, loop, x, y):
    """A closure running one training step of ``impl``'s ``Llama3Model`` in ``loop`` (seeded: both start from the
    same weights), and the list its losses go to."""
    torch.manual_seed(123)
    model = _model_class(impl)(_config()).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    loss_fn = (_book_loss if loop == "book" else _user_loss)(impl)
    losses = []

    def step():
        with _optimizer_steps(impl, loop, optimizer):
            optimizer.zero_grad()
            loss = loss_fn(x, y, model)
            loss.backward()
            optimizer.step()
        losses.append(loss.item())

    return step, losses


@pytest.mark.parametrize("loop", ["user", "book"])
def test_llama_train_step_interleaved(benchmark, loop):
    cfg = _config()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg["vocab_size"], (BATCH, CONTEXT + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    made = {impl: _step(impl, loop, x, y) for impl in IMPLS}
    medians = run_interleaved(benchmark, {impl: made[impl][0] for impl in IMPLS}, rounds=ROUNDS,
                              group=f"llama-train-step, {loop} loop", impl="reference and gptfast, interleaved",
                              dtype="float32", batch=BATCH, context=CONTEXT,
                              model="tiny" if TINY else "Llama-3-shaped, 8 layers, 512 wide, GQA 8/2")
    benchmark.extra_info["per_impl_tokens_per_s"] = {impl: BATCH * CONTEXT / m for impl, m in medians.items()}
    benchmark.extra_info["loss_difference"] = abs(made["reference"][1][0] - made["gptfast"][1][0])
