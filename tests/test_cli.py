"""The ``gptfast`` command line: train, resume, generate, and its error messages."""

import contextlib
import io
import shutil
import subprocess
import sys

import pytest
import torch

from gptfast.cli import main


def _train(tmp_path, *extra):
    return main(["train", "--model", "tiny", "--epochs", "1", "--eval-freq", "2", "--eval-iter", "1",
                 "--batch-size", "4", "--out-dir", str(tmp_path), "--backend", "torch", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short training run shared by the tests below: (out_dir, printed output)."""
    out_dir = tmp_path_factory.mktemp("run")
    capture = io.StringIO()
    with contextlib.redirect_stdout(capture):
        assert _train(out_dir) == 0
    return out_dir, capture.getvalue()


def _copy_run(trained, tmp_path):
    shutil.copytree(trained[0], tmp_path, dirs_exist_ok=True)
    return tmp_path


def test_train_writes_checkpoint_and_plot_and_prints_losses_and_a_sample(trained):
    tmp_path, out = trained
    assert "Train loss" in out and "Val loss" in out
    assert "Every effort moves you" in out  # the per-epoch sample
    state = torch.load(tmp_path / "model_and_optimizer.pth", weights_only=True)
    assert {"model_state_dict", "optimizer_state_dict", "config"} <= set(state)
    assert (tmp_path / "loss-plot.png").stat().st_size > 1000


def test_train_prints_what_the_books_chapter_5_script_prints(trained):
    """Same seeds, same order (loaders, then model), same losses and samples as the reference run."""
    ref_ch02 = pytest.importorskip("llms_from_scratch.ch02")
    ref_ch04 = pytest.importorskip("llms_from_scratch.ch04")
    ref_ch05 = pytest.importorskip("llms_from_scratch.ch05")
    from gptfast.config import TINY_CONFIG
    from gptfast.resources import default_text
    from gptfast.tokenizer import get_tokenizer

    text = default_text()
    split = int(0.90 * len(text))
    ctx = TINY_CONFIG["context_length"]
    torch.manual_seed(123)
    train = ref_ch02.create_dataloader_v1(text[:split], batch_size=4, max_length=ctx, stride=ctx)
    val = ref_ch02.create_dataloader_v1(text[split:], batch_size=4, max_length=ctx, stride=ctx, shuffle=False,
                                        drop_last=False)
    torch.manual_seed(123)
    model = ref_ch04.GPTModel(TINY_CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    capture = io.StringIO()
    with contextlib.redirect_stdout(capture):
        ref_ch05.train_model_simple(model, train, val, optimizer, "cpu", num_epochs=1, eval_freq=2, eval_iter=1,
                                    start_context="Every effort moves you", tokenizer=get_tokenizer())
    expected = capture.getvalue().splitlines()
    printed = trained[1].splitlines()
    assert expected and all(line in printed for line in expected)
    assert [line for line in printed if line.startswith("Ep ")] == [l for l in expected if l.startswith("Ep ")]


def test_resume_continues_from_the_checkpoint(trained, tmp_path, capsys):
    _copy_run(trained, tmp_path)
    before = torch.load(tmp_path / "model_and_optimizer.pth", weights_only=True)
    assert _train(tmp_path, "--resume") == 0
    after = torch.load(tmp_path / "model_and_optimizer.pth", weights_only=True)
    steps = [s["step"] for s in after["optimizer_state_dict"]["state"].values()]
    first = [s["step"] for s in before["optimizer_state_dict"]["state"].values()]
    assert all(a == 2 * b for a, b in zip(steps, first))  # the optimizer went on counting
    capsys.readouterr()


def test_resume_with_a_different_config_is_an_error(trained, tmp_path, capsys):
    _copy_run(trained, tmp_path)
    assert _train(tmp_path, "--resume", "--context-length", "32") == 2
    assert "does not match the model" in capsys.readouterr().err


def test_train_with_missing_data_file_is_a_clear_error(tmp_path, capsys):
    assert _train(tmp_path, "--data", str(tmp_path / "missing.txt")) == 2
    assert "data file not found" in capsys.readouterr().err


def test_generate_streams_from_a_checkpoint(trained, capsys):
    ckpt = str(trained[0] / "model_and_optimizer.pth")
    assert main(["generate", "--checkpoint", ckpt, "--prompt", "Every effort", "--max-new-tokens", "8",
                 "--temperature", "0.8", "--top-k", "5", "--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("Every effort") and len(first) > len("Every effort\n")
    assert main(["generate", "--checkpoint", ckpt, "--prompt", "Every effort", "--max-new-tokens", "8",
                 "--temperature", "0.8", "--top-k", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out == first  # seeded: the same text again


def test_generate_errors(trained, tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "nope.pth")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    ckpt = str(trained[0] / "model_and_optimizer.pth")
    assert main(["generate", "--checkpoint", ckpt, "--top-k", "0"]) == 2
    assert "top_k" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", ckpt, "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", ckpt, "--prompt", "word " * 70]) == 2
    assert "context length" in capsys.readouterr().err


def test_train_gpu_subcommand_hands_over_to_the_training_script(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train-gpu", "--help"])
    assert exit_info.value.code == 0
    assert "--grad-accum" in capsys.readouterr().out
    assert main(["train-gpu", "--model", "nonexistent-size"]) == 2


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "gptfast", "--help"], capture_output=True, text=True, check=True)
    assert "train" in out.stdout and "generate" in out.stdout
    with pytest.raises(SystemExit):
        main(["train", "--backend", "nonexistent"])
