"""A small Llama-3-shaped model's training step: gptfast's drop-in against ``llms_from_scratch``, same run.

The shape is Llama 3.2's layout scaled down to train on a laptop CPU: 8 layers, 512 wide,
8 query heads sharing 2 key/value heads (grouped-query ratio 4), SwiGLU hidden 1536,
a 32000-token vocabulary, RoPE with Llama 3's frequency scaling, context 256, batch 4,
fp32, AdamW.  The user's loop is the same for both (``F.cross_entropy`` on the model's
logits, ``backward``, ``optimizer.step``): only the import line differs, so whatever
gptfast gains comes from its model (fused attention over grouped k/v, fused norms).

The two implementations step in turn, round after round, so load on a shared machine
hits both alike; ``extra_info`` has per-implementation medians, tokens/s and
``speedup_vs_reference``, and ``loss_difference`` (first-step losses, same seed and batch).

``GPTFAST_BENCH_LLAMA_TRAIN_TINY=1`` shrinks the model (2 layers, 64 wide) and the rounds
to check that the file runs; its numbers mean nothing.
"""

from __future__ import annotations

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


def _step(impl, x, y):
    """A closure running one training step of ``impl``'s ``Llama3Model`` (seeded: both start from the same weights)."""
    if impl == "reference":
        from llms_from_scratch.llama3 import Llama3Model
    else:
        from gptfast.llama3 import Llama3Model
    torch.manual_seed(123)
    model = Llama3Model(_config()).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    losses = []

    def step():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    return step, losses


def test_llama_train_step_interleaved(benchmark):
    cfg = _config()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg["vocab_size"], (BATCH, CONTEXT + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    made = {impl: _step(impl, x, y) for impl in IMPLS}
    medians = run_interleaved(benchmark, {impl: made[impl][0] for impl in IMPLS}, rounds=ROUNDS,
                              group="llama-train-step", impl="reference and gptfast, interleaved", dtype="float32",
                              batch=BATCH, context=CONTEXT,
                              model="tiny" if TINY else "Llama-3-shaped, 8 layers, 512 wide, GQA 8/2")
    benchmark.extra_info["per_impl_tokens_per_s"] = {impl: BATCH * CONTEXT / m for impl, m in medians.items()}
    benchmark.extra_info["loss_difference"] = abs(made["reference"][1][0] - made["gptfast"][1][0])
