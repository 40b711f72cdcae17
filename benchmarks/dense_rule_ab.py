"""Which layers take oneDNN's forward product, measured both ways in one process, step after step.

    python benchmarks/dense_rule_ab.py {gpt|book|user|lora} [--rounds N]

Three training steps run in turn, round after round (who goes first rotates, the first round is a
warm-up): the reference's, gptfast's with oneDNN for the output head alone (``heads``: the rule
before every large layer took it) and gptfast's with :func:`gptfast.ops.linear.onednn_pays` as it
is (``layers``).  The two gptfast steps are separate models of the same seed; only the size rule
differs, switched before each step.

* ``gpt``: GPT-2 124M, context 256, batch 2, the step of ``gptfast train`` (``test_bench_train``'s
  ``gptfast-cli``) without the command's host-memory setting;
* ``book``, ``user``: ``test_bench_llama_train``'s Llama-shaped step (8 layers, 512 wide, batch 4,
  context 256) in chapter 5's loop and in the user's own;
* ``lora``: appendix E's step, each package's own: GPT-2 124M frozen, a 2-class head, every linear layer
  wrapped by ``replace_linear_with_lora`` (rank 16, alpha 16), chapter 6's ``calc_loss_batch`` on
  ``test_bench_finetuning``'s batch (8 x 120 tokens), AdamW over the trainable parameters.

Prints per-variant medians, each gptfast variant's speedup over the reference, and the
``heads / layers`` time ratio of every round.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent


def _lora_step(impl):
    """Appendix E's LoRA fine-tuning step of ``impl``'s package ("reference" or "gptfast")."""
    import test_bench_finetuning as bench

    if impl == "reference":
        from llms_from_scratch.appendix_e import replace_linear_with_lora
        from llms_from_scratch.ch06 import calc_loss_batch
    else:
        from gptfast.appendix_e import replace_linear_with_lora
        from gptfast.ch06 import calc_loss_batch
    model = bench._model(impl)
    model.requires_grad_(False)
    torch.manual_seed(123)
    model.out_head = torch.nn.Linear(bench._config()["emb_dim"], 2)
    replace_linear_with_lora(model, rank=16, alpha=16)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50257, (bench.BATCH, bench.CH06_TOKENS), generator=g)
    y = torch.randint(0, 2, (bench.BATCH,), generator=g)

    def step():
        optimizer.zero_grad()
        calc_loss_batch(x, y, model, "cpu").backward()
        optimizer.step()

    return step


def _step_builder(case):
    """``make(impl)``: one training step of ``case`` for ``impl`` "reference" or "gptfast", built from scratch."""
    if case == "lora":
        return _lora_step
    if case == "gpt":
        import test_bench_train as bench

        out_dir = tempfile.mkdtemp()
        return lambda impl: bench._cpu_step("reference" if impl == "reference" else "gptfast-cli", out_dir)
    import test_bench_llama_train as bench

    cfg = bench._config()
    tokens = torch.randint(0, cfg["vocab_size"], (bench.BATCH, bench.CONTEXT + 1),
                           generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]
    return lambda impl: bench._step(impl, case, x, y)[0]


def _steps(case):
    """``{variant: step}`` for ``case``; the two gptfast variants are built alike."""
    make = _step_builder(case)
    return {"reference": make("reference"), "heads": make("gptfast"), "layers": make("gptfast")}


def measure(case, rounds):
    """Per-variant lists of step seconds (warm-up round left out)."""
    from gptfast.ops import linear

    layers_rule = linear.onednn_pays

    def heads_rule(rows, weight):
        return weight.shape[0] >= linear.ONEDNN_MIN_VOCAB

    steps = _steps(case)
    names = tuple(steps)
    times = {name: [] for name in names}
    try:
        for r in range(rounds + 1):
            first = r % len(names)
            for name in names[first:] + names[:first]:
                linear.onednn_pays = heads_rule if name == "heads" else layers_rule
                t0 = time.perf_counter()
                steps[name]()
                if r:
                    times[name].append(time.perf_counter() - t0)
    finally:
        linear.onednn_pays = layers_rule
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("case", choices=("gpt", "book", "user", "lora"))
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    sys.path.insert(0, str(BENCH_DIR))
    times = measure(args.case, args.rounds)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"{args.case}: medians " + ", ".join(f"{n} {m:.3f} s" for n, m in medians.items()))
    print("speedup over the reference: " + ", ".join(
        f"{n} {medians['reference'] / medians[n]:.3f}x" for n in ("heads", "layers")))
    print("heads / layers per round: " + ", ".join(f"{h / l:.3f}" for h, l in zip(times["heads"], times["layers"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
