"""Fine-tuning benchmarks: gptfast's ch06/ch07 drop-ins against ``llms_from_scratch`` in the same run.

GPT-2 124M shape (context 1024, dropout 0, random weights), fp32 on CPU:

* ``finetune-responses``: chapter 7's test-set responses for 24 prompts of 60-120 tokens, up to
  64 new tokens each, greedy, stop at ``<|endoftext|>``: the book's loop of one reference
  ``generate`` per prompt against one ``gptfast.ch07.generate_responses`` call (batched,
  KV-cached).  ``extra_info.same_responses`` counts the prompts whose texts agree.
* ``finetune-ch06-step``: one classification step (batch 8, 120 tokens, the book's frozen
  model with its last block, final norm and a 2-class head trainable, AdamW): the reference
  model with ``ch06.calc_loss_batch`` against gptfast's with its own.
* ``finetune-ch07-step``: one instruction step (batch 8, sequences of 60-120 tokens padded by
  ``custom_collate_fn``, targets ``-100`` on padding, whole model trainable, AdamW): the reference
  model with chapter 5's ``calc_loss_batch`` against gptfast's with ``ch07.calc_loss_batch``;
  ``extra_info.peak_bytes`` per implementation (``bench_utils.peak_memory``).

Each step is the body of the chapter's training loop (``zero_grad``, loss, ``backward``, ``step``)
with the user's ``torch.optim.AdamW`` as the book builds it.  ``gptfast`` steps the way its loops
(``train_classifier_simple``, ``train_model_simple``) do, inside ``fused_optimizer_steps`` (torch's
fused update for that optimizer); ``gptfast-own-loop`` is the same model and loss in a loop the user
wrote, whose plain AdamW steps as the book's.

The two step benchmarks run the implementations in turn, round after round (like
``test_bench_train.py``), so load on a shared machine hits all alike; per-implementation
medians and ``speedup_vs_reference`` are in ``extra_info``.

``GPTFAST_BENCH_FINETUNE_TINY=1`` shrinks everything (a 2-layer 64-wide model, 4 prompts,
8 new tokens, one round) to check that the file runs; its numbers mean nothing.
"""

from __future__ import annotations

import gc
import os
import random

import pytest
import torch

from bench_utils import DEVICE, ON_GPU, peak_memory, run_benchmark, run_interleaved

TINY = os.environ.get("GPTFAST_BENCH_FINETUNE_TINY") == "1"
NUM_PROMPTS, NEW_TOKENS = (4, 8) if TINY else (24, 64)
PROMPT_TOKENS = (60, 120)
BATCH, CH06_TOKENS = 8, 120
ROUNDS = 1 if TINY else 3
IMPLS = ("reference", "gptfast")
STEP_IMPLS = ("reference", "gptfast", "gptfast-own-loop")
pytestmark = pytest.mark.skipif(ON_GPU, reason="CPU fp32 shapes")


def _model_name():
    return "tiny (2 layers, 64 wide)" if TINY else "GPT-2 124M"


def _config():
    if TINY:
        return {"vocab_size": 50257, "context_length": 256, "emb_dim": 64, "n_heads": 4, "n_layers": 2,
                "drop_rate": 0.0, "qkv_bias": True}
    from gptfast.models import gpt2_config

    return gpt2_config("gpt2", drop_rate=0.0)


def _model(impl):
    """The reference's or gptfast's GPTModel, same seed (same weights)."""
    if impl == "reference":
        from llms_from_scratch.ch04 import GPTModel
    else:
        from gptfast.ch04 import GPTModel
    torch.manual_seed(123)
    return GPTModel(_config()).to(DEVICE)


def _release():
    gc.collect()


def _interleaved(benchmark, steps, group, **info):
    """Time ``steps[impl]()`` for every impl in turn each round; per-impl medians go to ``extra_info``."""
    run_interleaved(benchmark, steps, rounds=ROUNDS, group=group, impl="reference and gptfast, interleaved",
                    dtype="float32", **info)


# ----------------------------------------------------------------------------- responses


def _entries(tokenizer):
    """Instruction entries whose formatted prompts hold 60-120 tokens, evenly spread."""
    from gptfast.ch07 import format_input

    rng = random.Random(0)
    words = [" the", " a", " of", " and", " to", " in", " is", " that", " for", " it", " with", " as", " on"]
    lo, hi = PROMPT_TOKENS
    entries = []
    for i in range(NUM_PROMPTS):
        target = lo + (hi - lo) * i // max(NUM_PROMPTS - 1, 1)
        entry = {"instruction": "Rewrite the text.", "input": "Text:", "output": "done"}
        while len(tokenizer.encode(format_input(entry))) < target:
            entry["input"] += rng.choice(words)
        entries.append(entry)
    return entries


def _book_loop(model, entries, tokenizer):
    """Chapter 7's loop over the test set: one reference ``generate`` per entry."""
    from llms_from_scratch.ch05 import generate, text_to_token_ids, token_ids_to_text

    from gptfast.ch07 import format_input  # the reference's text (tested); its module needs psutil

    responses = []
    for entry in entries:
        input_text = format_input(entry)
        token_ids = generate(model=model, idx=text_to_token_ids(input_text, tokenizer).to(DEVICE),
                             max_new_tokens=NEW_TOKENS, context_size=_config()["context_length"], eos_id=50256)
        generated_text = token_ids_to_text(token_ids, tokenizer)
        responses.append(generated_text[len(input_text):].replace("### Response:", "").strip())
    return responses


@pytest.mark.parametrize("impl", IMPLS)
def test_ch07_response_generation(benchmark, impl):
    import tiktoken

    from gptfast.ch07 import format_input, generate_responses

    tokenizer = tiktoken.get_encoding("gpt2")
    entries = _entries(tokenizer)
    model = _model(impl).eval()
    out = {}
    if impl == "reference":
        fn = lambda: out.__setitem__("r", _book_loop(model, entries, tokenizer))  # noqa: E731
    else:
        fn = lambda: out.__setitem__("r", generate_responses(  # noqa: E731
            model, entries, tokenizer, max_new_tokens=NEW_TOKENS, batch_size=NUM_PROMPTS))
    lengths = [len(tokenizer.encode(format_input(e))) for e in entries]
    run_benchmark(benchmark, fn, rounds=1 if impl == "reference" else ROUNDS, group="finetune-responses",
                  impl=impl, dtype="float32", prompts=NUM_PROMPTS, prompt_tokens=[min(lengths), max(lengths)],
                  max_new_tokens=NEW_TOKENS)
    if impl == "gptfast":  # agreement with the book's loop (the reference model has the same weights)
        expected = _book_loop(_model("reference").eval(), entries[:4], tokenizer)
        benchmark.extra_info["same_responses"] = sum(a == b for a, b in zip(out["r"], expected))
        benchmark.extra_info["compared_responses"] = len(expected)
    _release()


# ----------------------------------------------------------------------------- training steps


def _ch06_step(impl):
    """One step of the book's classification fine-tuning (frozen model, last block and head trainable)."""
    import llms_from_scratch.ch06 as ref_ch06

    import gptfast.ch06 as ch06

    module = ref_ch06 if impl == "reference" else ch06
    model = _model(impl)
    model.requires_grad_(False)
    torch.manual_seed(123)
    model.out_head = torch.nn.Linear(_config()["emb_dim"], 2).to(DEVICE)
    model.trf_blocks[-1].requires_grad_(True)
    model.final_norm.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50257, (BATCH, CH06_TOKENS), generator=g).to(DEVICE)
    y = torch.randint(0, 2, (BATCH,), generator=g).to(DEVICE)

    def step():
        optimizer.zero_grad()
        module.calc_loss_batch(x, y, model, DEVICE).backward()
        optimizer.step()

    return _as_its_loop_steps(impl, step, optimizer)


def _as_its_loop_steps(impl, step, optimizer):
    """``step`` as ``impl``'s training loop runs it: gptfast's loops step inside ``fused_optimizer_steps``."""
    if impl != "gptfast":
        return step
    from gptfast.training.optimizers import fused_optimizer_steps

    def loop_step():
        with fused_optimizer_steps(optimizer):
            step()

    return loop_step


def test_ch06_finetune_step(benchmark):
    steps = {impl: _ch06_step(impl) for impl in STEP_IMPLS}
    _interleaved(benchmark, steps, "finetune-ch06-step", batch=BATCH, tokens=CH06_TOKENS, model=_model_name())
    steps = None
    _release()


def _instruction_batch():
    from gptfast.ch07 import custom_collate_fn

    rng = random.Random(0)
    lo, hi = PROMPT_TOKENS
    rows = [[rng.randrange(50256) for _ in range(rng.randint(lo, hi - 1))] for _ in range(BATCH - 1)]
    rows.append([rng.randrange(50256) for _ in range(hi - 1)])  # the longest row sets the padded length
    return custom_collate_fn(rows, device=DEVICE)


def _ch07_step(impl):
    """One step of the book's instruction fine-tuning (whole model trainable, padded targets ignored)."""
    if impl == "reference":
        from llms_from_scratch.ch05 import calc_loss_batch
    else:
        from gptfast.ch07 import calc_loss_batch
    model = _model(impl).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
    x, y = _instruction_batch()

    def step():
        optimizer.zero_grad()
        calc_loss_batch(x, y, model, DEVICE).backward()
        optimizer.step()

    def forward_backward():  # what the peak-memory figure covers: the optimizer state exists already
        optimizer.zero_grad(set_to_none=True)
        calc_loss_batch(x, y, model, DEVICE).backward()

    return _as_its_loop_steps(impl, step, optimizer), forward_backward


def test_ch07_finetune_step(benchmark):
    pairs = {impl: _ch07_step(impl) for impl in STEP_IMPLS}
    x, y = _instruction_batch()
    _interleaved(benchmark, {impl: pair[0] for impl, pair in pairs.items()}, "finetune-ch07-step", batch=BATCH,
                 tokens=int(x.shape[1]), ignored_targets=int((y == -100).sum()), model=_model_name())
    peaks = {}
    for impl in IMPLS:  # the own-loop variant's forward and backward are gptfast's
        measured = peak_memory(pairs[impl][1])
        peaks[impl] = measured["peak_bytes"]
        benchmark.extra_info["memory_method"] = measured["memory_method"]
    benchmark.extra_info["peak_bytes"] = peaks
    pairs = None
    _release()
