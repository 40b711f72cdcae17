"""Before/after speed of two gptfast checkouts, measured in the same run, round after round.

Each round runs every case once in each tree, in a fresh subprocess of that tree's Python (its
own venv with its own gptfast install), alternating which tree goes first; a shared machine's
load then hits both alike.  Reports per-case medians and the after/before speed ratio as
Markdown, and the raw numbers as JSON::

    python benchmarks/compare_trees.py --before /path/to/old/.venv/bin/python \\
        --after .venv/bin/python --rounds 3 --json results.json

Cases (CPU, fp32, the default backend): attention fwd+bwd B=2 H=12 T=256 D=64, cross-entropy
fwd+bwd N=512 V=50257, sampling B=8 V=50257 top_k=25, the 124M training step (context 256,
batch 2, AdamW) and 124M cached generation (context 1024, 4-token prompt, 64 new tokens).
Only the public API that both trees share is used.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap

# Each snippet prints one float: seconds per unit of work (median of its inner repeats).
_PRELUDE = textwrap.dedent("""
    import statistics, time, torch
    torch.manual_seed(0)
    def timed(fn, repeats, warmup=1):
        for _ in range(warmup):
            fn()
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter(); fn(); out.append(time.perf_counter() - t0)
        return statistics.median(out)
""")

CASES = {
    "attention fwd+bwd B2 H12 T256 D64": """
        from gptfast import ops
        q, k, v = (torch.randn(2, 12, 256, 64, requires_grad=True) for _ in range(3))
        def step():
            ops.causal_attention(q, k, v).sum().backward()
        print(timed(step, 10))
    """,
    "cross-entropy fwd+bwd N512 V50257": """
        from gptfast import ops
        logits = torch.randn(512, 50257, requires_grad=True)
        targets = torch.randint(0, 50257, (512,))
        def step():
            ops.cross_entropy(logits, targets).backward()
        print(timed(step, 10))
    """,
    "sampling B8 V50257 top_k=25": """
        from gptfast import ops
        logits = torch.randn(8, 50257)
        g = torch.Generator().manual_seed(1)
        print(timed(lambda: ops.sample_next_token(logits, temperature=1.0, top_k=25, generator=g), 300, warmup=20))
    """,
    "train step 124M ctx256 batch2": """
        from gptfast.ch04 import GPTModel
        from gptfast.ch05 import calc_loss_batch
        cfg = {"vocab_size": 50257, "context_length": 256, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
               "drop_rate": 0.1, "qkv_bias": False}
        model = GPTModel(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
        x = torch.randint(0, 50257, (2, 256)); y = torch.randint(0, 50257, (2, 256))
        def step():
            opt.zero_grad(); calc_loss_batch(x, y, model, torch.device("cpu")).backward(); opt.step()
        print(timed(step, 3))
    """,
    "generate 124M ctx1024 64 tokens (per token)": """
        from gptfast.ch05 import generate
        from gptfast.ch04 import GPTModel
        cfg = {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
               "drop_rate": 0.0, "qkv_bias": True}
        model = GPTModel(cfg).eval()
        idx = torch.tensor([[6109, 3626, 6100, 345]])
        print(timed(lambda: generate(model, idx, 64, 1024), 2) / 64)
    """,
}


def run_case(python: str, code: str) -> float:
    """Seconds per unit reported by ``code`` run in a fresh ``python`` subprocess.

    ``-P`` and a neutral working directory: with ``-c`` Python would put the current
    directory first on ``sys.path``, and run from a checkout every interpreter would
    import that checkout's gptfast instead of its own venv's.
    """
    script = _PRELUDE + textwrap.dedent(code)
    done = subprocess.run([python, "-P", "-c", script], capture_output=True, text=True, check=True,
                          cwd=tempfile.gettempdir())
    return float(done.stdout.strip().splitlines()[-1])


def gptfast_location(python: str) -> str:
    """The folder ``python`` imports gptfast from, the way :func:`run_case` runs it."""
    done = subprocess.run([python, "-P", "-c", "import gptfast, os; print(os.path.dirname(gptfast.__file__))"],
                          capture_output=True, text=True, check=True, cwd=tempfile.gettempdir())
    return done.stdout.strip()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="Python of the venv with the old gptfast")
    parser.add_argument("--after", required=True, help="Python of the venv with the new gptfast")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the raw seconds here")
    parser.add_argument("--cases", nargs="*", help="run only cases whose name contains one of these words")
    args = parser.parse_args(argv)
    cases = {name: code for name, code in CASES.items()
             if not args.cases or any(word in name for word in args.cases)}
    where = {which: gptfast_location(getattr(args, which)) for which in ("before", "after")}
    if where["before"] == where["after"]:
        parser.error(f"both interpreters import gptfast from {where['before']}: nothing to compare")
    print(f"before: gptfast from {where['before']}; after: gptfast from {where['after']}", file=sys.stderr)
    times = {name: {"before": [], "after": []} for name in cases}
    for r in range(args.rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        for name, code in cases.items():
            for which in order:
                times[name][which].append(run_case(getattr(args, which), code))
            print(f"round {r + 1}: {name}: before {times[name]['before'][-1]:.4f}s after "
                  f"{times[name]['after'][-1]:.4f}s", file=sys.stderr, flush=True)
    print("| case | before (s) | after (s) | after speed / before |")
    print("| --- | --- | --- | --- |")
    for name, t in times.items():
        before, after = statistics.median(t["before"]), statistics.median(t["after"])
        print(f"| {name} | {before:.4f} | {after:.4f} | {before / after:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gptfast_from": where, "seconds": times}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
