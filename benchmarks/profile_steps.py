"""Per-op CPU profile (torch.profiler, self time) of one training step, reference against gptfast.

    python benchmarks/profile_steps.py {train|ch07} {reference|gptfast}

``train``: GPT-2 124M, context 256, batch 2, dropout 0.1, AdamW, chapter 5's ``calc_loss_batch``
(reference) against ``gptfast.training.calc_loss_batch``.  ``ch07``: batch 8 of 60-119 tokens padded
by ``custom_collate_fn`` (targets -100 on padding), dropout 0, whole model trainable, AdamW: chapter
5's loss (the reference's way) against ``gptfast.ch07.calc_loss_batch``.  One warm-up step, then one
profiled step; ``PROFILE_THREADS`` (default 1: per-op shares stay readable on a shared machine)
sets torch's threads.  Prints a markdown section with the per-op table.
"""

from __future__ import annotations

import os
import random
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile


def _model(impl, drop_rate):
    from gptfast.models import GPT_CONFIG_124M
    if impl == "reference":
        from llms_from_scratch.ch04 import GPTModel
    else:
        from gptfast.ch04 import GPTModel
    torch.manual_seed(123)
    return GPTModel(dict(GPT_CONFIG_124M, drop_rate=drop_rate)).train()


def _train_batch():
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 50257, (2, 257), generator=g)
    return rows[:, :-1], rows[:, 1:]


def _ch07_batch():
    from gptfast.ch07 import custom_collate_fn
    rng = random.Random(0)
    rows = [[rng.randrange(50256) for _ in range(rng.randint(60, 119))] for _ in range(7)]
    rows.append([rng.randrange(50256) for _ in range(119)])
    return custom_collate_fn(rows)


def main(case, impl):
    torch.set_num_threads(int(os.environ.get("PROFILE_THREADS", "1")))
    from llms_from_scratch.ch05 import calc_loss_batch as reference_loss
    if case == "train":
        from gptfast.training import calc_loss_batch as gptfast_loss
        x, y = _train_batch()
    else:
        from gptfast.ch07 import calc_loss_batch as gptfast_loss
        x, y = _ch07_batch()
    loss_fn = reference_loss if impl == "reference" else gptfast_loss
    model = _model(impl, 0.1 if case == "train" else 0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)

    def step():
        optimizer.zero_grad()
        loss_fn(x, y, model, "cpu").backward()
        optimizer.step()

    step()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    seconds = time.perf_counter() - t0
    print(f"## {case} step, {impl}: {seconds:.3f} s profiled, {torch.get_num_threads()} thread(s) "
          f"(load {os.getloadavg()[0]:.2f}), batch {tuple(x.shape)}, ignored targets {int((y == -100).sum())}")
    print("```")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=55))
    print("```")


if __name__ == "__main__":
    main(*sys.argv[1:3])
