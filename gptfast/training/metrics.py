"""Per-step metrics of the pretraining script: the csv/json files, the loss plot and the log line.

Every file is written atomically through :mod:`gptfast.files`.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..files import atomic_savefig, atomic_write_text

METRIC_FIELDS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "val_loss", "elapsed_s")


def write_metrics(out_dir: Path, history: list[dict]) -> None:
    """``metrics.csv`` and ``metrics.json`` with one row per logged step."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=METRIC_FIELDS)
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k, "") for k in METRIC_FIELDS})
    atomic_write_text(out_dir / "metrics.csv", table.getvalue())
    atomic_write_text(out_dir / "metrics.json", json.dumps(history, indent=1))


def write_summary(out_dir: Path, summary: dict) -> Path:
    """``summary.json``: the run's totals."""
    path = Path(out_dir) / "summary.json"
    atomic_write_text(path, json.dumps(summary, indent=1))
    return path


def plot_loss_curve(out_dir: Path, history: list[dict]) -> Path | None:
    """``loss.png``: training loss per step and the validation losses."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    train = [(r["step"], r["loss"]) for r in history if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in history if r.get("val_loss") is not None]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    path = Path(out_dir) / "loss.png"
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
    return path


def format_row(row: dict) -> str:
    """One log line for a logged step."""
    mfu = "n/a" if row.get("mfu") is None else f"{100 * row['mfu']:.1f}%"
    text = (f"step {row['step']:>6} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | "
            f"{row['tokens_per_s']:,.0f} tok/s | MFU {mfu}")
    if row.get("val_loss") is not None:
        text += f" | val {row['val_loss']:.4f}"
    return text
