"""The ``gptfast`` command line: train, resume, generate, and its error messages."""

import contextlib
import io
import re
import shutil
import signal
import subprocess
import sys
import textwrap

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
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(capture):
        patch.setenv("GPTFAST_KEEP_HOST_MEMORY", "0")  # the test process keeps its malloc settings
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


def test_train_refuses_to_save_a_diverged_model_and_reports_the_rate_of_every_step(trained, tmp_path, capsys):
    """A loss that became nan leaves the checkpoint it would replace as it was (one line, status 2); the rate it
    printed, ``trained in S s (R tokens/s)``, counts every input token of the epoch (R * S), not only those seen
    by the last evaluation (here the first step's)."""
    from gptfast.data import train_val_loaders
    from gptfast.models import TINY_CONFIG
    from gptfast.resources import default_text

    run = _copy_run(trained, tmp_path)
    before = (run / "model_and_optimizer.pth").read_bytes()
    assert main(["train", "--model", "tiny", "--epochs", "1", "--eval-freq", "100", "--batch-size", "4", "--out-dir",
                 str(run), "--backend", "torch", "--overwrite", "--lr", "1e30"]) == 2
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1].split("\r")[-1]  # after the progress bar's line
    assert last.startswith("gptfast train: error: training diverged") and "nothing was saved" in last, captured.err
    assert "Traceback" not in captured.err
    assert (run / "model_and_optimizer.pth").read_bytes() == before
    line = next(line for line in captured.out.splitlines() if line.startswith("trained in "))
    seconds, rate = float(line.split()[2]), float(line.split("(")[1].split()[0])
    train_loader, _ = train_val_loaders(default_text(), TINY_CONFIG, 4, 0.9, 123)
    tokens = sum(x.numel() for x, _ in train_loader)
    assert rate * seconds == pytest.approx(tokens, rel=0.06, abs=2 * seconds)  # (the figures are rounded)


def test_train_says_what_it_did_with_host_memory(trained):
    header = trained[1].splitlines()[0]
    assert header.startswith("gptfast train:") and "host memory: malloc left as it is (GPTFAST_KEEP_HOST_MEMORY=0)" in header


def test_train_prints_what_the_books_chapter_5_script_prints(trained):
    """Same seeds, same order (loaders, then model), same losses and samples as the reference run."""
    ref_ch02 = pytest.importorskip("llms_from_scratch.ch02")
    ref_ch04 = pytest.importorskip("llms_from_scratch.ch04")
    ref_ch05 = pytest.importorskip("llms_from_scratch.ch05")
    from gptfast.models import TINY_CONFIG
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


def test_resume_keeps_the_checkpoints_rates_unless_flags_give_new_ones(trained, tmp_path, capsys):
    """A resumed run trains at the saved learning rate and weight decay; --lr / --weight-decay given with --resume
    change them (they used to be read back from the optimizer state, silently undoing the flags)."""
    rates = lambda: [(g["lr"], g["weight_decay"]) for g in torch.load(  # noqa: E731
        tmp_path / "model_and_optimizer.pth", weights_only=True)["optimizer_state_dict"]["param_groups"]]
    _copy_run(trained, tmp_path)
    assert _train(tmp_path, "--resume", "--lr", "1e-5", "--weight-decay", "0.05") == 0
    assert rates() and all(rate == (1e-5, 0.05) for rate in rates())
    assert _train(tmp_path, "--resume") == 0
    assert all(rate == (1e-5, 0.05) for rate in rates())
    capsys.readouterr()


def _epoch_lines(out):
    return [line for line in out.splitlines() if line.startswith("Ep ")]


def test_one_epoch_resumed_for_another_is_the_two_epoch_run(tmp_path, capsys):
    """The checkpoint keeps the random stream: the resumed epoch shuffles (and drops out) as a two-epoch run's
    second epoch, not as the first again, so the weights come out the same. The resumed run goes on counting
    epochs, steps and tokens from the saved ones: it evaluates at the two-epoch run's steps (with 18 steps an
    epoch, --eval-freq 5 evaluates at step 20, the resumed run's third) and prints that run's lines. The loss
    plot's history covers both runs."""
    whole, resumed, eval_freq = tmp_path / "whole", tmp_path / "resumed", "5"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GPTFAST_KEEP_HOST_MEMORY", "0")
        assert _train(whole, "--epochs", "2", "--eval-freq", eval_freq) == 0
        whole_lines = _epoch_lines(capsys.readouterr().out)
        assert _train(resumed, "--eval-freq", eval_freq) == 0
        first_lines = _epoch_lines(capsys.readouterr().out)
        assert _train(resumed, "--resume", "--eval-freq", eval_freq) == 0
        resumed_lines = _epoch_lines(capsys.readouterr().out)
    assert resumed_lines and resumed_lines[0].startswith("Ep 2 (Step 0000")
    assert first_lines + resumed_lines == whole_lines
    a, b = (torch.load(d / "model_and_optimizer.pth", weights_only=True) for d in (whole, resumed))
    for key, value in a["model_state_dict"].items():
        assert torch.equal(value, b["model_state_dict"][key]), key
    assert a["history"] == b["history"]
    assert a["history"]["epochs"] == 2 and a["history"]["steps"] == 36
    assert a["history"]["tokens_seen"][-1] <= a["history"]["tokens"]


def test_resume_takes_the_random_state_of_either_checkpoint_format():
    """The checkpoint keeps every generator's state (CPU, Python, and a GPU's when training on one); one written
    before kept only the CPU generator's tensor. Either sets the CPU stream back."""
    from gptfast.cli import _restore_random_state
    from gptfast.training.pretrain import rng_state

    cpu = torch.device("cpu")
    for take in (rng_state, lambda _: torch.get_rng_state()):
        saved = take(cpu)
        expected = torch.rand(3)
        torch.rand(5)
        _restore_random_state(saved, cpu)
        assert torch.equal(torch.rand(3), expected)


class _LoadedOnTheGpu(torch.Tensor):
    """A saved state tensor as ``map_location="cuda"`` gives it back: it must be moved with ``.cpu()`` first."""

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor)


def test_resume_moves_random_states_read_onto_another_device_to_the_cpu(monkeypatch):
    """``--resume`` reads the checkpoint onto ``--device``; torch takes generator states only as CPU tensors."""
    from gptfast.cli import _restore_random_state
    from gptfast.training.pretrain import rng_state

    set_rng_state = torch.set_rng_state

    def cpu_tensors_only(state):
        if type(state) is not torch.Tensor:
            raise TypeError("RNG state must be a torch.ByteTensor on the CPU")
        set_rng_state(state)

    monkeypatch.setattr(torch, "set_rng_state", cpu_tensors_only)
    cpu = torch.device("cpu")
    for take in (rng_state, lambda _: torch.get_rng_state()):
        saved = take(cpu)
        saved = ({**saved, "torch": saved["torch"].as_subclass(_LoadedOnTheGpu)} if isinstance(saved, dict)
                 else saved.as_subclass(_LoadedOnTheGpu))
        expected = torch.rand(3)
        torch.rand(5)
        _restore_random_state(saved, cpu)
        assert torch.equal(torch.rand(3), expected)


def test_resume_with_a_different_config_is_an_error(trained, tmp_path, capsys):
    _copy_run(trained, tmp_path)
    assert _train(tmp_path, "--resume", "--context-length", "32") == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "differs" in err and "'context_length': 32" in err


def test_the_checkpoint_records_the_settings_that_decide_the_batches(trained):
    import hashlib

    from gptfast.resources import default_text

    state = torch.load(trained[0] / "model_and_optimizer.pth", weights_only=True)
    assert state["run"] == {"data_sha256": hashlib.sha256(default_text().encode()).hexdigest(), "data": None,
                            "batch_size": 4, "train_ratio": 0.9, "seed": 123}


@pytest.mark.parametrize("flags,named", [
    (["--seed", "7"], ["--seed: checkpoint 123, now 7"]),
    (["--batch-size", "2", "--train-ratio", "0.8"], ["--batch-size: checkpoint 4, now 2",
                                                      "--train-ratio: checkpoint 0.9, now 0.8"]),
    ("other-text", ["--data: checkpoint the embedded the-verdict, now "]),
])
def test_resume_with_other_data_or_batches_is_one_line_naming_the_flags(trained, tmp_path, capsys, flags, named):
    """A forgotten --data (or another seed, split or batch size) would go on with batches the saved run never
    drew; the checkpoint is left as it was."""
    run = _copy_run(trained, tmp_path / "run")
    if flags == "other-text":
        other = tmp_path / "other.txt"
        other.write_text("A different story altogether. " * 400, encoding="utf-8")
        flags = ["--data", str(other)]
    before = (run / "model_and_optimizer.pth").read_bytes()
    assert _train(run, "--resume", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "--resume" in err and "--overwrite" in err and all(text in err for text in named), err
    assert (run / "model_and_optimizer.pth").read_bytes() == before


def test_resume_on_a_data_file_whose_text_changed_says_so(tmp_path, capsys):
    data = tmp_path / "story.txt"
    data.write_text("Every effort moves you forward, one step at a time. " * 300, encoding="utf-8")
    run = tmp_path / "run"
    assert _train(run, "--data", str(data), "--eval-freq", "100") == 0
    data.write_text("Every effort moves you backward, one step at a time. " * 300, encoding="utf-8")
    assert _train(run, "--resume", "--data", str(data), "--eval-freq", "100") == 2
    assert f"the text of {str(data.resolve())!r} has changed" in capsys.readouterr().err
    data.write_text("Every effort moves you forward, one step at a time. " * 300, encoding="utf-8")
    assert _train(run, "--resume", "--data", str(data), "--eval-freq", "100") == 0  # the same text resumes


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
    for flags, message in ((["--top-k", "0"], "--top-k"), (["--temperature", "-1"], "--temperature"),
                           (["--max-new-tokens", "-3"], "--max-new-tokens"), (["--prompt", ""], "--prompt is empty"),
                           (["--prompt", "word " * 70], "context length"), (["--top-k", "100000"], "--top-k")):
        assert main(["generate", "--checkpoint", ckpt, *flags]) == 2
        out, err = capsys.readouterr()
        assert message in err and out == ""  # the error stands alone: nothing was streamed before it


def test_generate_refuses_flags_it_would_otherwise_ignore_or_misuse(trained, capsys):
    ckpt = str(trained[0] / "model_and_optimizer.pth")
    for flags, message in ((["--temperature", "inf"], "--temperature must be a finite number"),
                           (["--temperature", "nan"], "--temperature must be a finite number"),
                           (["--model", "gpt2-xl"], "--model gpt2-xl applies to --safetensors GPT-2 weights")):
        line = _one_line_error(capsys, ["generate", "--checkpoint", ckpt, *flags])
        assert message in line, line


def test_train_refuses_evaluation_counts_below_one_before_training(tmp_path, capsys):
    for flag in ("--eval-freq", "--eval-iter"):
        assert main(["train", "--model", "tiny", "--epochs", "1", "--batch-size", "4", "--out-dir", str(tmp_path),
                     flag, "0"]) == 2
        out, err = capsys.readouterr()
        assert f"{flag} must be >= 1" in err and "Traceback" not in err and out == ""


@pytest.mark.parametrize("flags, message", [
    (["--train-ratio", "-0.1"], "--train-ratio must lie strictly between 0 and 1, got -0.1"),
    (["--train-ratio", "0"], "--train-ratio must lie strictly between 0 and 1"),
    (["--train-ratio", "1"], "--train-ratio must lie strictly between 0 and 1"),
    (["--train-ratio", "nan"], "--train-ratio must lie strictly between 0 and 1"),
    (["--train-ratio", "0.999"], "the validation split (the text after the first 99.9%)"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--context-length", "0"], "--context-length must be >= 1"),
    (["--lr", "-1"], "--lr must be a finite number >= 0"),
    (["--lr", "nan"], "--lr must be a finite number >= 0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0"),
    (["--start-context", ""], "--start-context is empty"),
    (["--batch-size", "100"], "--batch-size 100 is more than the 72 windows of --context-length 64"),
    (["--resume"], "--resume: no checkpoint at"),
    (["--device", "meta"], "--device meta holds no data"),
    (["--device", "cpu:x"], "--device 'cpu:x' is not a device"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_train_names_a_bad_flag_before_it_makes_out_dir(tmp_path, capsys, flags, message):
    out_dir = tmp_path / "new" / "run"
    line = _one_line_error(capsys, ["train", "--model", "tiny", "--out-dir", str(out_dir), *flags])
    assert message in line, line
    assert not (tmp_path / "new").exists()


def test_train_names_data_it_cannot_read_before_it_makes_out_dir(tmp_path, capsys):
    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    for data, message in ((not_utf8, "is not UTF-8 text: byte 0xe9 at offset 3"), (tmp_path, "is a folder")):
        line = _one_line_error(capsys, ["train", "--model", "tiny", "--out-dir", str(tmp_path / "o"), "--data",
                                        str(data)])
        assert line.startswith("gptfast train: error: --data: data file ") and message in line, line
        assert not (tmp_path / "o").exists()


def test_train_names_data_whose_read_fails_without_a_file_name(tmp_path, capsys, monkeypatch):
    """An I/O error raised by the read itself (as ``/proc/self/mem`` gives) carries no file name of its own."""
    import errno
    from pathlib import Path

    bad = tmp_path / "unreadable.txt"
    bad.write_text("some text")
    read_text = Path.read_text

    def failing_read(self, *args, **kwargs):
        if self == bad:
            raise OSError(errno.EIO, "Input/output error")
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", failing_read)
    line = _one_line_error(capsys, ["train", "--model", "tiny", "--out-dir", str(tmp_path / "o"), "--data", str(bad)])
    assert line == f"gptfast train: error: --data: could not read data file {bad}: Input/output error", line
    assert not (tmp_path / "o").exists()


def test_train_replaces_a_checkpoint_only_with_overwrite(trained, tmp_path, capsys):
    _copy_run(trained, tmp_path)
    ckpt = tmp_path / "model_and_optimizer.pth"
    ckpt.write_bytes(b"an older run's checkpoint")
    line = _one_line_error(capsys, ["train", "--model", "tiny", "--out-dir", str(tmp_path)])
    assert "already holds a checkpoint" in line and "--resume" in line and "--overwrite" in line
    assert ckpt.read_bytes() == b"an older run's checkpoint"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GPTFAST_KEEP_HOST_MEMORY", "0")
        assert _train(tmp_path, "--overwrite", "--epochs", "0") == 0  # no training: only the save matters
    assert "model_state_dict" in torch.load(ckpt, weights_only=True)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["train", "--out-dir", str(tmp_path), "--resume", "--overwrite"])
    assert "--overwrite: not allowed with argument --resume" in capsys.readouterr().err
    assert "--overwrite" in _help_of("train")


def _help_of(command):
    capture = io.StringIO()
    with contextlib.redirect_stdout(capture), pytest.raises(SystemExit):
        main([command, "--help"])
    return capture.getvalue()


def test_a_train_run_stopped_after_making_out_dir_leaves_no_empty_folder(tmp_path, capsys, monkeypatch):
    from gptfast.training import loops

    def interrupted(*args, **kwargs):
        assert (tmp_path / "new" / "run").is_dir()  # made before training
        raise KeyboardInterrupt

    monkeypatch.setattr(loops, "train_simple_with_loss", interrupted)
    monkeypatch.setenv("GPTFAST_KEEP_HOST_MEMORY", "0")
    assert _train(tmp_path / "new" / "run") == 130
    assert capsys.readouterr().err == "gptfast train: interrupted\n"
    assert not (tmp_path / "new").exists()


def test_train_gpu_subcommand_hands_over_to_the_training_script(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train-gpu", "--help"])
    assert exit_info.value.code == 0
    assert "--grad-accum" in capsys.readouterr().out
    assert main(["train-gpu", "--model", "nonexistent-size"]) == 2


# ``python -m gptfast ARGS`` that, when it starts importing torch, says so on stdout and spends 3 s there, as torch's
# import does, taking a Ctrl-C the way C-level module set-up may: passing it on, wrapping it in an error of its own,
# or swallowing it (the import then goes on as if nothing came).
# The child first takes Ctrl-C as a terminal's program does: a parent that ignores SIGINT (a pytest-xdist
# worker) would otherwise pass that on, and Python then installs no handler.
_ANNOUNCES_THE_TORCH_IMPORT = textwrap.dedent("""
    import runpy, signal, sys, time

    signal.signal(signal.SIGINT, signal.default_int_handler)

    class Announce:
        def find_spec(self, name, path=None, target=None):
            if name == "torch":
                sys.meta_path.remove(self)
                print("importing torch", flush=True)
                end = time.monotonic() + 3
                while time.monotonic() < end:
                    try:
                        time.sleep(0.05)
                    except KeyboardInterrupt as exc:
                        if MODE == "wrap":  # its own error, raised while handling the Ctrl-C
                            raise RuntimeError("Failed to load torch") from exc
                        if MODE == "pass":
                            raise
            return None

    sys.meta_path.insert(0, Announce())
    runpy.run_module("gptfast", run_name="__main__", alter_sys=True)
""")


@pytest.mark.parametrize("mode", ["pass", "wrap", "swallow"])
@pytest.mark.parametrize("module, args, prog", [("gptfast", ["generate", "--checkpoint", "c.pth"], "gptfast generate"),
                                               ("gptfast.train", ["--model", "tiny"], "gptfast.train")])
def test_ctrl_c_while_the_command_starts_is_one_line_and_status_130(module, args, prog, mode):
    """Held back until the import is done, the Ctrl-C is never lost, whatever the import would have made of it."""
    code = f"MODE = {mode!r}\n" + _ANNOUNCES_THE_TORCH_IMPORT.replace('"gptfast"', repr(module))
    child = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline() == "importing torch\n"
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130 and err == f"{prog}: interrupted\n", err


def test_a_bad_flag_value_is_one_line_and_help_is_still_the_full_help(capsys):
    for argv, flag in ((["generate", "--checkpoint", "c", "--max-new-tokens", "abc"], "--max-new-tokens"),
                       (["train", "--epochs", "x"], "--epochs"), (["train-gpu", "--max-steps", "x"], "--max-steps")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
        assert err.startswith(f"gptfast {argv[0]}: error: argument {flag}: invalid int value") and "--help" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("usage: gptfast generate") and "--max-new-tokens" in out


def _train_gpu(out_dir, *flags):
    return ["train-gpu", "--model", "tiny", "--device", "cpu", "--no-progress", "--out-dir", str(out_dir), *flags]


@pytest.mark.parametrize("case", ["cache-dir-is-a-file", "resume-and-init-from", "missing-init-from", "not-utf8",
                                  "stop-at-past-max-steps"])
def test_train_gpu_names_bad_paths_and_flags_and_leaves_no_folder_it_made(tmp_path, capsys, monkeypatch, case):
    monkeypatch.setenv("GPTFAST_KEEP_HOST_MEMORY", "0")  # the test process keeps its malloc settings
    a_file = tmp_path / "tiny.txt"
    a_file.write_text("x")
    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    flags, message = {
        "cache-dir-is-a-file": (["--cache-dir", str(a_file)], f"--cache-dir '{a_file}' is not usable: '{a_file}' is "
                                                              "a file, not a folder"),
        "resume-and-init-from": (["--resume", "--init-from", str(a_file)], "--init-from and --resume do not go"),
        "missing-init-from": (["--init-from", str(tmp_path / "none.pt")], "--init-from path not found"),
        "not-utf8": (["--data", str(not_utf8)], f"--data: {not_utf8} is not UTF-8 text: byte 0xe9 at offset 3"),
        "stop-at-past-max-steps": (["--max-steps", "2", "--stop-at", "3"],
                                   "--stop-at 3 is past --max-steps 2, where the run ends"),
    }[case]
    line = _one_line_error(capsys, _train_gpu(tmp_path / "new" / "run", *flags))
    assert message in line, line
    assert not (tmp_path / "new").exists()  # not-utf8: made for the token cache, then removed as it stayed empty


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "gptfast", "--help"], capture_output=True, text=True, check=True)
    assert "train" in out.stdout and "generate" in out.stdout
    with pytest.raises(SystemExit):
        main(["train", "--backend", "nonexistent"])


# ----------------------------------------------------------------------------- expected failures: one line each


GOOD_CFG = {"vocab_size": 50257, "context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
            "drop_rate": 0.0, "qkv_bias": False}


def _bad_checkpoints(folder):
    """Broken or foreign files a user might pass as a checkpoint: name -> path."""
    import os

    from gptfast.models import GPTModel
    from gptfast.training.checkpoints import save_checkpoint, write_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    good = save_checkpoint(folder / "good.pth", GPTModel(GOOD_CFG), config=GOOD_CFG)
    data = good.read_bytes()
    files = {"empty": b"", "truncated": data[: len(data) // 3], "random": os.urandom(3000),
             "text": b"this is a text file\n" * 50}
    paths = {}
    for name, content in files.items():
        paths[name] = folder / f"{name}.pth"
        paths[name].write_bytes(content)
    paths["foreign"] = folder / "foreign.pth"
    torch.save({"epoch": 3, "note": "no tensors"}, paths["foreign"])
    state = GPTModel(GOOD_CFG).state_dict()
    paths["config missing keys"] = write_checkpoint(folder / "cfg_missing.pth", {
        "model_state_dict": state, "config": {k: v for k, v in GOOD_CFG.items() if k != "emb_dim"}})
    paths["config wrong types"] = write_checkpoint(folder / "cfg_types.pth", {
        "model_state_dict": state, "config": {**GOOD_CFG, "n_layers": "1"}})
    raw = torch.load(good, weights_only=True)
    raw["model_state_dict"]["out_head.weight"][0, 0] += 1.0
    paths["checksum mismatch"] = folder / "flipped.pth"
    torch.save(raw, paths["checksum mismatch"])
    paths["missing"] = folder / "does-not-exist.pth"
    return paths


def _one_line_error(capsys, argv):
    """Run ``gptfast argv`` in-process; return its single stderr line (asserting there is exactly one)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_seed_out_of_range_is_named_by_every_command(tmp_path, capsys):
    huge = str(10**23)
    for argv in (["train", "--model", "tiny", "--out-dir", str(tmp_path / "o"), "--seed", huge],
                 ["generate", "--checkpoint", str(tmp_path / "c.pth"), "--seed", huge],
                 ["generate", "--checkpoint", str(tmp_path / "c.pth"), "--seed", "-1"],
                 ["train-gpu", "--model", "tiny", "--out-dir", str(tmp_path / "o"), "--seed", str(2**63)]):
        assert "--seed must be in [0, 2**63), got" in _one_line_error(capsys, argv)


def test_the_largest_seed_draws_training_windows():
    import numpy as np

    from gptfast.training.token_cache import TokenWindows

    windows = TokenWindows(np.arange(1000, dtype=np.uint16), 16, seed=2**63 - 1)
    assert windows.step_offsets(5, 8).shape == (8,)
    assert not torch.equal(windows.step_offsets(5, 8), windows.step_offsets(6, 8))


def test_generate_reports_every_bad_checkpoint_in_one_line(tmp_path, capsys):
    for name, path in _bad_checkpoints(tmp_path).items():
        line = _one_line_error(capsys, ["generate", "--checkpoint", str(path), "--max-new-tokens", "2"])
        assert line.startswith("gptfast generate: error:") and path.name in line, (name, line)
    assert "corrupted" in _one_line_error(capsys, ["generate", "--checkpoint", str(tmp_path / "flipped.pth")])
    assert "'emb_dim'" in _one_line_error(capsys, ["generate", "--checkpoint", str(tmp_path / "cfg_missing.pth")])


def test_unavailable_backend_is_one_line_for_every_command(tmp_path, capsys):
    missing = [b for b in ("cuda", "triton", "cpu") if b not in __import__("gptfast").ops.available_backends()]
    if not missing:
        pytest.skip("every backend is available here")
    good = _bad_checkpoints(tmp_path / "c")["config wrong types"].parent / "good.pth"
    for argv in (["generate", "--checkpoint", str(good)], ["train", "--model", "tiny", "--out-dir", str(tmp_path)],
                 ["train-gpu", "--model", "tiny", "--out-dir", str(tmp_path), "--device", "cpu"]):
        line = _one_line_error(capsys, [*argv, "--backend", missing[0]])
        assert missing[0] in line and "not available" in line


def test_a_bad_environment_backend_is_one_line_before_anything_is_made(tmp_path, capsys, monkeypatch):
    """``$GPTFAST_BACKEND`` (what ``--backend`` defaults to) is checked as the flag is: before any output, model or
    folder, not at the first op."""
    good = _bad_checkpoints(tmp_path / "c")["config wrong types"].parent / "good.pth"
    missing = [b for b in ("cuda", "triton", "cpu") if b not in __import__("gptfast").ops.available_backends()]
    for value, expected in [("bogus", "GPTFAST_BACKEND must be one of"), (" torch ", "GPTFAST_BACKEND must be one of"),
                            *[(name, "not available") for name in missing[:1]]]:
        monkeypatch.setenv("GPTFAST_BACKEND", value)
        for command in (["generate", "--checkpoint", str(good), "--max-new-tokens", "2"],
                        ["train", "--model", "tiny", "--out-dir", str(tmp_path / "t")],
                        ["train-gpu", "--model", "tiny", "--out-dir", str(tmp_path / "g"), "--device", "cpu"]):
            assert main(command) == 2
            captured = capsys.readouterr()
            assert captured.out == "", (value, command)  # no prompt echoed, no model announced
            lines = captured.err.strip().splitlines()
            assert len(lines) == 1 and expected in lines[0], (value, command, captured.err)
        assert not (tmp_path / "t").exists() and not (tmp_path / "g").exists()


def test_train_finds_an_unusable_out_dir_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for out_dir in (blocker, blocker / "below"):
        line = _one_line_error(capsys, ["train", "--model", "tiny", "--out-dir", str(out_dir), "--epochs", "50"])
        assert "--out-dir" in line and "a-file" in line
    assert "Train loss" not in capsys.readouterr().out  # nothing was trained


def test_train_resume_from_a_truncated_checkpoint_is_one_line(trained, tmp_path, capsys):
    _copy_run(trained, tmp_path)
    ckpt = tmp_path / "model_and_optimizer.pth"
    before = ckpt.read_bytes()
    ckpt.write_bytes(before[: len(before) // 2])
    line = _one_line_error(capsys, ["train", "--model", "tiny", "--out-dir", str(tmp_path), "--resume"])
    assert "cannot be read" in line


def _run_subprocess(args, env_extra=None):
    import os

    env = {**os.environ, **(env_extra or {})}
    env.pop("GPTFAST_DEBUG", None) if not env_extra or "GPTFAST_DEBUG" not in env_extra else None
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, env=env)


def test_commands_in_a_fresh_process_print_one_line_and_no_traceback(tmp_path):
    bad = _bad_checkpoints(tmp_path / "c")
    cases = [
        ["-m", "gptfast", "generate", "--checkpoint", str(bad["truncated"])],
        ["-m", "gptfast", "generate", "--checkpoint", str(bad["random"])],
        ["-m", "gptfast", "train", "--model", "tiny", "--out-dir", str(bad["text"])],
        ["-m", "gptfast.train", "--model", "tiny", "--device", "cpu", "--out-dir", str(tmp_path / "o"),
         "--init-from", str(bad["text"])],
    ]
    for args in cases:
        result = _run_subprocess(args)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    debug = _run_subprocess(cases[0], {"GPTFAST_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr  # the traceback is there when asked for


def test_debug_flag_lets_the_exception_through(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["generate", "--checkpoint", str(tmp_path / "none.pth"), "--debug"])


def test_generate_from_a_padded_vocabulary_checkpoint_never_emits_a_padded_id(tmp_path, capsys):
    from gptfast.models import GPTModel
    from gptfast.training.checkpoints import write_checkpoint

    padded = {**GOOD_CFG, "vocab_size": 50304}
    model = GPTModel(padded)
    with torch.no_grad():
        model.out_head.weight[50257:] = 1e4  # the padded rows would win every step
    path = write_checkpoint(tmp_path / "ckpt.pt", {"model_state_dict": model.state_dict(), "config": padded})
    for extra in ([], ["--temperature", "1.0", "--top-k", "3"]):
        assert main(["generate", "--checkpoint", str(path), "--max-new-tokens", "6", "--device", "cpu",
                     *extra]) == 0
        out = capsys.readouterr()
        assert out.out.startswith("Every effort moves you") and out.err == ""


def test_a_prompt_outside_a_small_vocabulary_is_named_before_anything_is_written(tmp_path, capsys):
    from gptfast.models import GPTModel
    from gptfast.training.checkpoints import write_checkpoint

    small = {**GOOD_CFG, "vocab_size": 97}
    path = write_checkpoint(tmp_path / "ckpt.pt", {"model_state_dict": GPTModel(small).state_dict(), "config": small})
    assert main(["generate", "--checkpoint", str(path), "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "--prompt holds token id" in err and "vocabulary of 97" in err


def test_train_finds_output_paths_that_are_folders_before_training(tmp_path, capsys):
    (tmp_path / "model_and_optimizer.pth").mkdir()
    line = _one_line_error(capsys, ["train", "--model", "tiny", "--out-dir", str(tmp_path), "--epochs", "1"])
    assert "model_and_optimizer.pth is a folder" in line
    assert "Train loss" not in capsys.readouterr().out  # nothing was trained


def test_unreadable_safetensors_is_one_line(tmp_path, capsys):
    import os

    bad = tmp_path / "model.safetensors"
    bad.write_bytes(os.urandom(3000))
    line = _one_line_error(capsys, ["generate", "--safetensors", str(bad), "--max-new-tokens", "1"])
    # The loader's own ValueError names the file; the CLI's wrapper says "GPT-2 safetensors" for other errors.
    assert re.search(r"model\.safetensors is not a readable (GPT-2 )?safetensors file", line), line
    line = _one_line_error(capsys, ["generate", "--safetensors", str(tmp_path / "none.safetensors")])
    assert "not found" in line


def test_a_gpt2_weights_folder_whose_model_safetensors_is_a_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "model.safetensors").mkdir()
    line = _one_line_error(capsys, ["generate", "--safetensors", str(tmp_path), "--max-new-tokens", "1"])
    assert "model.safetensors is a folder, not a safetensors file" in line, line


def _adamw_steps(make, steps=3):
    """Weights after ``steps`` updates by the optimizer ``make(params)`` from fixed weights and gradients."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(37, 19)), torch.nn.Parameter(torch.randn(19))]
    optimizer = make(params)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()
    return [p.detach() for p in params], optimizer


def test_the_chapter_optimizer_is_the_books_on_backend_torch_and_torchs_fused_adamw_otherwise():
    from gptfast import ops
    from gptfast.training.optimizers import chapter_adamw

    book, _ = _adamw_steps(lambda ps: torch.optim.AdamW(ps, lr=4e-4, weight_decay=0.1))
    with ops.use_backend("torch"):
        ours, optimizer = _adamw_steps(lambda ps: chapter_adamw(ps, lr=4e-4, weight_decay=0.1))
    assert not optimizer.defaults["fused"] and all(torch.equal(a, b) for a, b in zip(ours, book))
    with ops.use_backend("auto"):
        fused, optimizer = _adamw_steps(lambda ps: chapter_adamw(ps, lr=4e-4, weight_decay=0.1))
    assert optimizer.defaults["fused"] and optimizer.defaults["weight_decay"] == 0.1
    torch.manual_seed(0)
    start = [torch.randn(37, 19), torch.randn(19)]
    for a, b, s in zip(fused, book, start):
        assert not torch.equal(a, s)  # the steps moved the weights ...
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # ... as the book's update, summed in another order


def test_train_on_a_fused_backend_steps_with_the_fused_optimizer(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GPTFAST_KEEP_HOST_MEMORY", "0")
    assert main(["train", "--model", "tiny", "--epochs", "1", "--eval-freq", "100", "--eval-iter", "1",
                 "--batch-size", "4", "--out-dir", str(tmp_path), "--backend", "auto"]) == 0
    state = torch.load(tmp_path / "model_and_optimizer.pth", weights_only=True)
    # How the optimizer computed is not saved: a run resumed with backend "torch" steps the book's AdamW.
    assert state["optimizer_state_dict"]["param_groups"][0]["fused"] is None
    from gptfast import ops
    from gptfast.models import GPTModel
    from gptfast.training.checkpoints import load_checkpoint
    from gptfast.training.optimizers import chapter_adamw

    model = GPTModel(state["config"])
    with ops.use_backend("torch"):
        optimizer = chapter_adamw(model.parameters(), lr=4e-4, weight_decay=0.1)
    load_checkpoint(tmp_path / "model_and_optimizer.pth", model, optimizer)
    assert not optimizer.param_groups[0]["fused"]
    with ops.use_backend("auto"):
        fused = chapter_adamw(model.parameters(), lr=4e-4, weight_decay=0.1)
    load_checkpoint(tmp_path / "model_and_optimizer.pth", model, fused)
    assert fused.param_groups[0]["fused"] is True
    capsys.readouterr()


def test_generate_writes_the_bytes_a_stop_token_cut_short():
    from gptfast.cli import write_until_stop
    from gptfast.generation.api import _text_chunks

    class ByteTokenizer:  # token i < 256 is byte i; 300 is the stop token
        def decode(self, ids):
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace") + "<stop>" * ids.count(300)

    def written(ids):
        out = io.StringIO()
        write_until_stop(_text_chunks((torch.tensor([[i]]) for i in ids), ByteTokenizer()), {300}, ByteTokenizer(),
                         out)
        return out.getvalue()

    euro = list("€".encode())  # three tokens
    assert written([ord("a"), *euro, ord("b"), 300, ord("c")]) == "a€b"
    assert written([ord("a"), *euro[:2], 300, ord("c")]) == "a\ufffd"  # before: "a", the two bytes lost
    assert written([ord("a"), 300]) == "a"
    assert written([*euro[:1]]) == "\ufffd"  # the stream's own end releases them too


def test_generate_names_a_device_that_holds_no_data_before_reading_the_checkpoint(tmp_path, capsys):
    for device in ("meta", "cpu:x"):
        assert main(["generate", "--checkpoint", str(tmp_path / "none.pth"), "--device", device]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith(f"gptfast generate: error: --device ") and "none.pth" not in err, err


def test_a_ctrl_c_another_error_wraps_is_still_reported_as_an_interrupt(capsys):
    """Libraries (torch's import among them) may raise their own error while handling the Ctrl-C."""
    from gptfast.errors import run_cli

    def wrapped_interrupt():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise RuntimeError("Failed to load a library") from exc

    def implicitly_wrapped_interrupt():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise OSError("cannot read a file")

    for body in (wrapped_interrupt, implicitly_wrapped_interrupt):
        assert run_cli("gptfast train", body) == 130
        assert capsys.readouterr().err == "gptfast train: interrupted\n"
    with pytest.raises(RuntimeError):
        run_cli("gptfast train", wrapped_interrupt, debug=True)
    assert run_cli("gptfast train", lambda: (_ for _ in ()).throw(RuntimeError("bad"))) == 2
    assert capsys.readouterr().err == "gptfast train: error: bad\n"


def _flag_error(capsys, argv):
    """Run ``gptfast argv`` in-process, refused by its parser (exit status 2); return its single stderr line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_an_empty_out_dir_is_refused_by_every_training_command(tmp_path, capsys, monkeypatch):
    """``--out-dir ''`` (an unset shell variable) would be the current folder: refused before anything is written."""
    monkeypatch.chdir(tmp_path)
    for argv in (["train", "--model", "tiny", "--epochs", "1", "--out-dir", ""],
                 ["train-gpu", "--model", "tiny", "--device", "cpu", "--max-steps", "1", "--out-dir", ""]):
        assert "argument --out-dir: is empty" in _flag_error(capsys, argv)
    assert list(tmp_path.iterdir()) == []


def test_interrupts_deferred_holds_a_ctrl_c_until_the_body_is_done():
    from gptfast.errors import interrupts_deferred

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        done = []
        with pytest.raises(KeyboardInterrupt):
            with interrupts_deferred():
                signal.raise_signal(signal.SIGINT)
                done.append("rest of the body")
        assert done == ["rest of the body"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with interrupts_deferred():  # no Ctrl-C: nothing raised
            pass
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # ignored Ctrl-C (nohup, a pytest-xdist worker) stays ignored
        with interrupts_deferred():
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("argv, flag", [
    (["train", "--model", "tiny", "--data", ""], "--data"),
    (["generate", "--checkpoint", ""], "--checkpoint"),
    (["generate", "--safetensors", ""], "--safetensors"),
    (["generate", "--safetensors", "folder", "--tokenizer", ""], "--tokenizer"),
    (["train-gpu", "--model", "tiny", "--data", ""], "--data"),
    (["train-gpu", "--model", "tiny", "--init-from", ""], "--init-from"),
    (["train-gpu", "--model", "tiny", "--cache-dir", ""], "--cache-dir"),
])
def test_an_empty_path_flag_is_refused_naming_it(argv, flag, capsys, tmp_path, monkeypatch):
    """An empty value would be read as the current folder (every text file in it, for --data) or as no value."""
    monkeypatch.chdir(tmp_path)
    line = _flag_error(capsys, argv)
    assert f"argument {flag}: is empty" in line, line
    assert list(tmp_path.iterdir()) == []
