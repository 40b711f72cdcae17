"""Benchmark results: collect pytest-benchmark JSON into one results file, and render it.

    # turn pytest-benchmark output into benchmarks/results/<name>.json (device, versions, commit, command)
    python benchmarks/report.py collect out1.json [out2.json ...] --out benchmarks/results/x.json \\
        --command "pytest benchmarks ..." --note "shared machine"
    # Markdown table + PNG bar chart of the latest (or a given) results file
    python benchmarks/report.py [render] [benchmarks/results/x.json]

Speed-ups are ratios of medians measured in the same run: "vs torch path" divides the torch
path's median (backend "torch", the reference model, or the reference's recipe) by each
entry's; "vs best plain PyTorch" does the same against the strongest non-gptfast baseline of
the group (``scaled_dot_product_attention``, the top-k softmax sampler).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TORCH_PATH = ("reference-recipe", "reference", "torch")
PLAIN_PYTORCH_BEST = ("sdpa", "topk_softmax")


# ----------------------------------------------------------------------------- collect


def environment() -> dict:
    """Versions, device and commit of this machine."""
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": None}
    try:
        import os

        info["cpu_count"] = os.cpu_count()
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception as exc:  # noqa: BLE001 - a report must not fail on a broken torch
        info["torch_error"] = str(exc)
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    try:
        from gptfast import ops

        info["backends"] = ops.backend_status()
    except Exception as exc:  # noqa: BLE001
        info["backends_error"] = str(exc)
    repo = Path(__file__).resolve().parents[1]
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                        timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        info["worktree_dirty"] = bool(dirty)
    except Exception:  # noqa: BLE001
        info["commit"] = None
    return info


def rows_from_pytest_benchmark(data: dict) -> list[dict]:
    """One flat row per benchmark of a pytest-benchmark JSON file."""
    rows = []
    for bench in data.get("benchmarks", []):
        stats = bench.get("stats", {})
        extra = dict(bench.get("extra_info", {}))
        rows += interleaved_rows(bench.get("group"), extra)
        rows.append({
            "name": bench.get("name"), "group": bench.get("group"),
            "impl": extra.pop("impl", None), "op": extra.pop("op", None),
            "median_s": stats.get("median"), "mean_s": stats.get("mean"), "min_s": stats.get("min"),
            "stddev_s": stats.get("stddev"), "rounds": stats.get("rounds"), **extra,
        })
    return rows


def interleaved_rows(group, extra) -> list[dict]:
    """One row per variant of a benchmark that timed several variants in turn (``per_impl_median_s``)."""
    medians = extra.get("per_impl_median_s") or {}
    rates = extra.get("per_impl_tokens_per_s") or {}
    rounds = extra.get("speedup_per_round") or {}
    round_medians = extra.get("speedup_median_of_rounds") or {}
    return [{"name": f"{group} [{impl}]", "group": f"{group} per variant", "impl": impl, "op": extra.get("op"),
             "median_s": median, "tokens_per_s": rates.get(impl), "round_speedups": rounds.get(impl),
             "round_speedup_median": round_medians.get(impl),
             "shape": extra.get("shape"), "dtype": extra.get("dtype"), "device": extra.get("device")}
            for impl, median in medians.items()]


def collect(inputs, out, command, note, steps=None) -> dict:
    """Merge pytest-benchmark files (missing/broken ones are recorded, not fatal) into one results file."""
    results, problems = [], []
    for path in inputs:
        try:
            results += rows_from_pytest_benchmark(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            problems.append(f"{path}: {exc}")
    doc = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "command": command, "note": note, "environment": environment(), "results": results,
           "unreadable_inputs": problems}
    if steps:
        doc["steps"] = steps
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(doc, indent=1, default=str))
    return doc


# ----------------------------------------------------------------------------- render


def latest_results(directory=RESULTS_DIR) -> Path:
    files = sorted(Path(directory).glob("*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no results JSON in {directory}")
    return files[-1]


def _baseline(rows, names):
    for name in names:
        for row in rows:
            if row.get("impl") == name and row.get("median_s"):
                return row
    return None


def speedups(rows: list[dict]) -> list[dict]:
    """Rows of one results file with ``vs_torch`` / ``vs_best_plain`` ratios filled in, per group."""
    out, groups = [], {}
    for row in rows:
        groups.setdefault(row.get("group"), []).append(row)
    for group, members in groups.items():
        torch_path = _baseline(members, TORCH_PATH)
        best_plain = _baseline(members, PLAIN_PYTORCH_BEST)
        for row in sorted(members, key=lambda r: r.get("median_s") or float("inf")):
            row = dict(row)
            if row.get("median_s"):
                if torch_path:
                    row["vs_torch"] = torch_path["median_s"] / row["median_s"]
                    row["torch_path"] = torch_path["impl"]
                if best_plain:
                    row["vs_best_plain"] = best_plain["median_s"] / row["median_s"]
                    row["best_plain"] = best_plain["impl"]
            out.append(row)
    return out


def _fmt(value, spec, scale=1.0):
    if value is None:
        return ""
    if isinstance(value, dict):  # an interleaved benchmark records one value per implementation
        return ", ".join(f"{impl} {format(v * scale, spec)}" for impl, v in value.items())
    return format(value * scale, spec)


def markdown(doc: dict) -> str:
    env = doc.get("environment", {})
    lines = [f"# gptfast benchmarks ({doc.get('created', '?')})", "",
             f"- device: {env.get('device')} ({env.get('cpu_count')} CPUs visible), torch {env.get('torch')}, "
             f"triton {env.get('triton')}, CUDA {env.get('cuda')}, commit {env.get('commit')}"
             f"{' (dirty tree)' if env.get('worktree_dirty') else ''}",
             f"- command: `{doc.get('command')}`"]
    if doc.get("note"):
        lines.append(f"- note: {doc['note']}")
    lines += ["", "| group | impl | median ms | vs torch path | vs best plain PyTorch | peak MB | extra |",
              "|---|---|---:|---:|---:|---:|---|"]
    for row in speedups(doc.get("results", [])):
        extra = []
        if row.get("tokens_per_s"):
            extra.append(f"{_fmt(row['tokens_per_s'], '.3g')} tok/s")
        if row.get("mfu"):
            extra.append(f"MFU {_fmt(row['mfu'], '.1f', 100)}%")
        if row.get("tflops"):
            extra.append(f"{_fmt(row['tflops'], '.3g')} TFLOP/s")
        for key in ("gbytes_per_s", "gb_per_s"):  # gb_per_s: the weight-read rate of a decode benchmark
            if row.get(key):
                extra.append(f"{_fmt(row[key], '.1f')} GB/s")
        if row.get("round_speedups") and row.get("impl") != "reference":
            ratios = row["round_speedups"]
            middle = row.get("round_speedup_median") or statistics.median(ratios)  # older files lack the median
            extra.append(f"per round vs reference {', '.join(_fmt(r, '.2f') + 'x' for r in ratios)} "
                         f"(median {_fmt(middle, '.2f')}x)")
        peak = row.get("peak_bytes")
        lines.append(f"| {row.get('group')} | {row.get('impl')} | {_fmt(row.get('median_s'), '.3f', 1e3)} | "
                     f"{_fmt(row.get('vs_torch'), '.2f')}{'x' if row.get('vs_torch') else ''} | "
                     f"{_fmt(row.get('vs_best_plain'), '.2f')}{'x' if row.get('vs_best_plain') else ''} | "
                     f"{_fmt(peak, '.1f', 1 / 2**20)} | {', '.join(extra)} |")
    if doc.get("steps"):
        lines += ["", "| step | exit status | seconds |", "|---|---:|---:|"]
        lines += [f"| {s.get('name')} | {s.get('rc')} | {s.get('seconds')} |" for s in doc["steps"]]
    return "\n".join(lines) + "\n"


def bar_chart(doc: dict, path: Path) -> Path | None:
    """Horizontal bars: each entry's speed-up over its group's torch path (1.0 = same speed)."""
    rows = [r for r in speedups(doc.get("results", [])) if r.get("vs_torch")]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['group'][:80]} | {r['impl']}" for r in rows]
    values = [r["vs_torch"] for r in rows]
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(rows) + 1.2))
    ax.barh(range(len(rows)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")  # ratios from 0.5x to 100x+ side by side
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f}x", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up vs the torch path (median time ratio, same run; log scale)")
    ax.set_title(f"gptfast benchmarks on {doc.get('environment', {}).get('device')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(results_path=None) -> tuple[Path, Path | None]:
    """Write ``<results>.md`` and ``<results>.png`` beside the results file; print the Markdown."""
    path = Path(results_path) if results_path else latest_results()
    doc = json.loads(path.read_text())
    md = markdown(doc)
    md_path = path.with_suffix(".md")
    md_path.write_text(md)
    png = bar_chart(doc, path.with_suffix(".png"))
    print(md)
    return md_path, png


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "collect":
        p = argparse.ArgumentParser(prog="report.py collect")
        p.add_argument("inputs", nargs="+", help="pytest-benchmark --benchmark-json files")
        p.add_argument("--out", required=True)
        p.add_argument("--command", default="")
        p.add_argument("--note", default="")
        p.add_argument("--steps", default=None, help="JSON-lines file of {name, rc, seconds} per step")
        a = p.parse_args(argv[1:])
        steps = None
        if a.steps and Path(a.steps).is_file():
            steps = [json.loads(line) for line in Path(a.steps).read_text().splitlines() if line.strip()]
        collect(a.inputs, a.out, a.command, a.note, steps)
        print(f"wrote {a.out}")
        return 0
    if argv and argv[0] == "render":
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="report.py")
    p.add_argument("results", nargs="?", help="results JSON (default: the newest in benchmarks/results/)")
    a = p.parse_args(argv)
    try:
        md_path, png = render(a.results)
    except FileNotFoundError as exc:
        print(f"report.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {md_path}" + (f" and {png}" if png else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
